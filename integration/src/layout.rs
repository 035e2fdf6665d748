// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Where the harness puts things in guest-physical memory.
//!
//! The boot region, guest-physical `[0, 2 MiB)`, holds the descriptor tables, the page
//! tables, the guest program and its stack. Everything else belongs to the tests.

/// Size of the boot region.
pub const BOOT_SIZE: u64 = 2 << 20;
/// The global descriptor table.
pub const GDT_ADDR: u64 = 0x1000;
/// The task-state segment (64-bit TSS, 104 bytes).
pub const TSS_ADDR: u64 = 0x2000;
/// The top-level page table (PML4).
pub const PML4_ADDR: u64 = 0x10000;
/// The page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x11000;
/// The first page directory; one per GiB follows it.
pub const PD_ADDR: u64 = 0x12000;
/// How much guest-physical memory is identity-mapped, with 2 MiB pages.
pub const MAPPED_GIB: u64 = 64;
/// Where the guest program is loaded and starts.
pub const CODE_ADDR: u64 = 0x10_0000;
/// The largest guest program.
pub const CODE_MAX: u64 = 0x8_0000;
/// The initial stack pointer (the stack grows down from the end of the boot region).
pub const STACK_TOP: u64 = BOOT_SIZE;

/// GDT selectors. Index 1: kernel code, 2: kernel data, 3: user data, 4: user code,
/// 5-6: the TSS.
pub mod selector {
    /// Kernel 64-bit code.
    pub const KERNEL_CODE: u16 = 0x08;
    /// Kernel data.
    pub const KERNEL_DATA: u16 = 0x10;
    /// User data, requested privilege level 3.
    pub const USER_DATA: u16 = 0x18 | 3;
    /// User 64-bit code, requested privilege level 3.
    pub const USER_CODE: u16 = 0x20 | 3;
    /// The TSS.
    pub const TSS: u16 = 0x28;
}

/// The GDT's descriptors, as 8-byte words (the TSS takes two).
pub fn gdt_entries() -> [u64; 7] {
    let tss_limit = 0x67u64;
    let tss_low = tss_limit
        | ((TSS_ADDR & 0xff_ffff) << 16)
        | (0x8b << 40) // present, type 0xb: busy 64-bit TSS
        | (((TSS_ADDR >> 24) & 0xff) << 56);
    let tss_high = TSS_ADDR >> 32;
    [
        0,
        0x00af_9b00_0000_ffff, // kernel code: L, present, DPL 0, execute/read
        0x00cf_9300_0000_ffff, // kernel data: present, DPL 0, read/write
        0x00cf_f300_0000_ffff, // user data: present, DPL 3, read/write
        0x00af_fb00_0000_ffff, // user code: L, present, DPL 3, execute/read
        tss_low,
        tss_high,
    ]
}

/// Page-table entry bits.
pub mod pte {
    /// Present.
    pub const PRESENT: u64 = 1 << 0;
    /// Writable.
    pub const WRITABLE: u64 = 1 << 1;
    /// Accessible from CPL3.
    pub const USER: u64 = 1 << 2;
    /// A large (2 MiB) page, in a page directory.
    pub const HUGE: u64 = 1 << 7;
}

/// The identity map as `(guest address, entry)` pairs: one PML4 entry, `MAPPED_GIB` PDPT
/// entries and 512 2 MiB pages per GiB, all writable and user-accessible.
pub fn page_table_entries() -> impl Iterator<Item = (u64, u64)> {
    let table = pte::PRESENT | pte::WRITABLE | pte::USER;
    let pml4 = std::iter::once((PML4_ADDR, PDPT_ADDR | table));
    let pdpt =
        (0..MAPPED_GIB).map(move |gib| (PDPT_ADDR + gib * 8, (PD_ADDR + gib * 0x1000) | table));
    let pds = (0..MAPPED_GIB * 512).map(move |i| (PD_ADDR + i * 8, (i << 21) | table | pte::HUGE));
    pml4.chain(pdpt).chain(pds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_fit_below_the_program() {
        let last_pd_end = PD_ADDR + MAPPED_GIB * 0x1000;
        const { assert!(PD_ADDR + MAPPED_GIB * 0x1000 <= CODE_ADDR) };
        const { assert!(CODE_ADDR + CODE_MAX < STACK_TOP) };
        assert!(page_table_entries().all(|(addr, _)| addr < last_pd_end));
    }

    #[test]
    fn the_map_is_an_identity_map() {
        let pages: Vec<_> = page_table_entries()
            .filter(|(_, e)| e & pte::HUGE != 0)
            .collect();
        assert_eq!(pages.len() as u64, MAPPED_GIB * 512);
        let (addr, entry) = pages[2048 + 3];
        assert_eq!(addr, PD_ADDR + (2048 + 3) * 8);
        assert_eq!(entry & !0xfff, (4 << 30) + 3 * (2 << 20));
    }
}
