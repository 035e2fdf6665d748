// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Puts a vCPU into 64-bit mode at CPL3, ready to run a guest program.
//!
//! Guest CPL0 code is emulated on our hosts (about 2 us an instruction), CPL3 code runs
//! natively, so the vCPU starts directly in user mode: long mode with paging, user code
//! and data segments, IOPL 3 so the program may use port I/O to talk to the harness.

use kvm_bindings::{kvm_regs, kvm_segment};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::error::{Error, Result};
use crate::layout::{selector, GDT_ADDR, PML4_ADDR, TSS_ADDR};

pub(crate) const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
pub(crate) const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
pub(crate) const CR0_PG: u64 = 1 << 31;
pub(crate) const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub(crate) const EFER_LME: u64 = 1 << 8;
pub(crate) const EFER_LMA: u64 = 1 << 10;
pub(crate) const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// A flat segment: base 0, 4 GiB, present, code or data (`type_`), 64-bit if `long`.
pub(crate) fn segment(selector: u16, type_: u8, dpl: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// The privilege level a guest program starts at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Privilege {
    /// CPL3 with IOPL 3: native speed on our hosts, port I/O allowed, no hypercalls
    /// (KVM answers a CPL3 hypercall with -KVM_EPERM).
    User,
    /// CPL0: what a hypercall (`vmmcall`) needs. On our hosts CPL0 code is emulated and
    /// `vmmcall` never returns; use it in the nested lab only.
    Kernel,
}

/// Sets CPUID (the host's supported set), the special registers for long mode at CPL3,
/// and the general registers: `rip` = `entry`, `rsp` = `stack_top`, and the six argument
/// registers (`rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`) from `args`.
pub fn enter_user_mode(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    entry: u64,
    stack_top: u64,
    args: &[u64],
) -> Result<()> {
    enter_long_mode(kvm, vcpu, Privilege::User, entry, stack_top, args)
}

/// As [`enter_user_mode`], at the given privilege level.
pub fn enter_long_mode(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    privilege: Privilege,
    entry: u64,
    stack_top: u64,
    args: &[u64],
) -> Result<()> {
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (crate::layout::gdt_entries().len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let (code, data, dpl) = match privilege {
        Privilege::User => (selector::USER_CODE, selector::USER_DATA, 3),
        Privilege::Kernel => (selector::KERNEL_CODE, selector::KERNEL_DATA, 0),
    };
    sregs.cs = segment(code, 0xb, dpl, true);
    let data = segment(data, 0x3, dpl, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: 0x67,
        selector: selector::TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;

    let mut regs = kvm_regs {
        rip: entry,
        rsp: stack_top,
        rflags: RFLAGS_RESERVED | RFLAGS_IOPL3,
        ..Default::default()
    };
    let slots = [
        &mut regs.rdi,
        &mut regs.rsi,
        &mut regs.rdx,
        &mut regs.rcx,
        &mut regs.r8,
        &mut regs.r9,
    ];
    if args.len() > slots.len() {
        return Err(Error::TooManyArguments(args.len()));
    }
    for (slot, value) in slots.into_iter().zip(args) {
        *slot = *value;
    }
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
}
