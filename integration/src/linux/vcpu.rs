// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The boot vCPU's state for the 64-bit Linux boot protocol: CPUID, registers, FPU and
//! local APIC.

use kvm_bindings::{kvm_fpu, kvm_regs, CpuId};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

use super::boot::{GDT, GDT_ADDR, PML4_ADDR, ZERO_PAGE_ADDR};
use crate::cpu::{segment, CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_RESERVED};
use crate::error::{Error, Result};

const BOOT_CS: u16 = 0x10;
const BOOT_DS: u16 = 0x18;

/// CPUID leaf 1, ECX: XSAVE (26), OSXSAVE (27), AVX (28, which needs XSAVE).
const LEAF1_ECX_XSAVE: u32 = (1 << 26) | (1 << 27) | (1 << 28);
/// CPUID leaf 1, ECX bit 31: running under a hypervisor (the guest then looks for KVM's
/// leaves).
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1, ECX bit 24: the local APIC timer has TSC-deadline mode. KVM emulates it
/// but leaves it out of KVM_GET_SUPPORTED_CPUID (KVM_CAP_TSC_DEADLINE_TIMER says).
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// KVM's paravirtual feature leaf, and its "no I/O delay" bit.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;

/// Leaf 7 (subleaf 0) features that need XSAVE-managed state: EBX AVX2 (5) and the
/// AVX-512 family (16, 17, 21, 26-28, 30, 31); ECX AVX-512 VBMI (1), VBMI2 (6), GFNI (8),
/// VAES (9), VPCLMULQDQ (10), VNNI (11), BITALG (12), VPOPCNTDQ (14); EDX AVX-512
/// 4VNNIW (2), 4FMAPS (3), VP2INTERSECT (8), AMX-BF16 (22), AVX-512 FP16 (23), AMX-TILE
/// (24), AMX-INT8 (25).
const LEAF7_EBX_XSAVE_STATE: u32 =
    (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (0b111 << 26) | (1 << 30) | (1 << 31);
const LEAF7_ECX_XSAVE_STATE: u32 = (1 << 1) | (1 << 6) | (0b11111 << 8) | (1 << 14);
const LEAF7_EDX_XSAVE_STATE: u32 = (1 << 2) | (1 << 3) | (1 << 8) | (0b1111 << 22);

/// KVM's supported CPUID with XSAVE hidden, and KVM's paravirtual memory structures
/// hidden unless `paravirt`.
///
/// TCG's nested SVM, which runs our lab's L1, does not intercept XSETBV: a guest that
/// sees XSAVE resets L1 now and then (HOST.md). What needs XSAVE-managed state (AVX and
/// its successors, AMX) goes with it.
///
/// With `paravirt` the guest gets KVM's paravirtual features as KVM offers them
/// (kvmclock, steal time, PV EOI, async page faults): KVM writes those structures
/// through the memslot's host mapping, which in place is the guest_memfd's own, so the
/// guest reads them whether its pages are private or shared. With the dual strategy a
/// private page's host mapping is the shared side, where the guest never looks: keep
/// them hidden there.
pub fn guest_cpuid(kvm: &Kvm, paravirt: bool) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // AVX's fused multiply-add (12) and F16C (29) need its state too.
                entry.ecx &= !((1 << 12) | (1 << 29));
                entry.ecx &= !LEAF1_ECX_XSAVE;
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
                // APIC ID 0 for the boot vCPU.
                entry.ebx &= 0x00ff_ffff;
            }
            // KVM's paravirtual features: only "no I/O delay". kvmclock, steal time, PV
            // EOI and async page faults are structures KVM writes into guest memory
            // through the host mapping: for a private page, into the shared side, where
            // the guest never looks (TDX and SNP guests do without them for the same
            // reason). Without kvmclock the guest learns the TSC's frequency from
            // `tsc_early_khz=` (LinuxVm::new adds it). The peer on shared memory gets
            // the same CPUID.
            KVM_CPUID_FEATURES if !paravirt => {
                entry.eax &= KVM_FEATURE_NOP_IO_DELAY;
            }
            7 if entry.index == 0 => {
                entry.ebx &= !LEAF7_EBX_XSAVE_STATE;
                entry.ecx &= !LEAF7_ECX_XSAVE_STATE;
                entry.edx &= !LEAF7_EDX_XSAVE_STATE;
            }
            // AVX-VNNI (4), AVX-512 BF16 (5).
            7 if entry.index == 1 => entry.eax &= !((1 << 4) | (1 << 5)),
            // XSAVE state enumeration: nothing, as XSAVE is absent.
            0xd => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Puts the vCPU where the 64-bit boot protocol wants it: CPUID set first (KVM refuses
/// long mode before it on 6.12), paging on with the boot page tables, `__BOOT_CS` and
/// `__BOOT_DS` loaded, interrupts off, `rsi` = the zero page, `rip` = `entry`.
pub fn enter_linux(kvm: &Kvm, vcpu: &VcpuFd, entry: u64, stack: u64, paravirt: bool) -> Result<()> {
    vcpu.set_cpuid2(&guest_cpuid(kvm, paravirt)?)
        .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;

    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = segment(BOOT_CS, 0xb, 0, true);
    let data = segment(BOOT_DS, 0x3, 0, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)
        .map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;

    let regs = kvm_regs {
        rip: entry,
        rsp: stack,
        rbp: stack,
        rsi: ZERO_PAGE_ADDR,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
    wire_lapic(vcpu)
}

/// LINT0 takes the PIC's interrupts (ExtINT), LINT1 is NMI: the virtual-wire setup a
/// BIOS leaves for a kernel that finds no MP table.
fn wire_lapic(vcpu: &VcpuFd) -> Result<()> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DELIVERY_EXTINT: u32 = 0b111 << 8;
    const DELIVERY_NMI: u32 = 0b100 << 8;
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
    for (offset, mode) in [(LVT_LINT0, DELIVERY_EXTINT), (LVT_LINT1, DELIVERY_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !(0b111 << 8)) | mode;
        for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = byte as _;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))
}
