// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Conversion exits for VMMs on kvm-ioctls: asking KVM to forward the guest's
//! conversion hypercalls, and serving a [`VcpuExit`] that carries one.
//!
//! The hypervisor-neutral entry points are [`PrivateMemoryManager::serve_hypercall`] and
//! [`PrivateMemoryManager::serve_memory_fault`]; this module is a convenience on top.

use guest_memfd::{uapi::KVM_HC_MAP_GPA_RANGE, Capabilities};
use kvm_ioctls::VcpuExit;

use crate::convert::ConversionReport;
use crate::error::{Error, Result};
use crate::guard::DirtyBitmap;
use crate::memory::PrivateMemoryManager;

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Asks the hypervisor to let the guest's `KVM_HC_MAP_GPA_RANGE` hypercalls (how
    /// TDX's MapGPA and SEV-SNP's page-state changes reach a VMM) exit to the VMM as
    /// `KVM_EXIT_HYPERCALL` (`KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)`), through the
    /// memory's [`guest_memfd::VmMemoryOps`]. Returns whether the host offers it: without it,
    /// KVM refuses the hypercall itself (the guest gets `-KVM_ENOSYS`: a TDX MapGPA or
    /// SEV-SNP page-state change fails) and no conversion reaches this memory. The
    /// kernel replaces the VM's whole set of forwarded hypercalls with this one. Call it
    /// once, before the guest runs.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vm_private_memory::MemoryBuilder;
    ///
    /// // Needs /dev/kvm: without it, the example says so and stops.
    /// let Ok(kvm) = kvm_ioctls::Kvm::new() else {
    ///     println!("SKIPPED: this example needs /dev/kvm");
    ///     return;
    /// };
    /// let vm = Arc::new(kvm.create_vm().unwrap());
    /// // And guest_memfd with MMAP | INIT_SHARED (Linux 6.18), for in-place memory.
    /// if !guest_memfd::Capabilities::of_vm(&*vm).in_place_capable() {
    ///     println!("SKIPPED: this example needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
    ///     return;
    /// }
    /// let memory = MemoryBuilder::new(vm).region_at(0, 2 << 20).build().unwrap();
    /// if !memory.enable_map_gpa_range_exits().unwrap() {
    ///     println!("this host answers KVM_HC_MAP_GPA_RANGE itself");
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::EnableExits`] if the host offers the exit but refuses to enable it.
    pub fn enable_map_gpa_range_exits(&self) -> Result<bool> {
        if !Capabilities::of_vm(&*self.vm).map_gpa_range_exit() {
            return Ok(false);
        }
        self.vm
            .enable_hypercall_exits(1 << KVM_HC_MAP_GPA_RANGE)
            .map_err(Error::EnableExits)?;
        Ok(true)
    }

    /// Serves `exit` if it is a conversion request: a `KVM_HC_MAP_GPA_RANGE` hypercall
    /// (the answer goes into its `ret`, for the guest's `rax`) or a memory fault inside
    /// this memory (the range is converted to what the guest used). Returns `None` for
    /// any other exit, a fault outside this memory included, which is the VMM's to
    /// handle, and otherwise what the request did or why it was refused.
    ///
    /// After a hypercall the vCPU goes on either way: the guest has its answer. A memory
    /// fault has no answer: after `Err` the same access faults again, so re-enter only
    /// for [`Error::HostAccessInFlight`] (a host access still held the pages; retry a
    /// bounded number of times) or an [`Error::HostAccessBarrier`] whose `errno()` is
    /// `ENOMEM`, and otherwise stop the vCPU. A fault served with no
    /// page changed that comes back is not a conversion at all (a poisoned page reports
    /// the same exit): stop the vCPU then too.
    ///
    /// ```no_run
    /// use kvm_ioctls::{VcpuExit, VcpuFd};
    /// use vm_private_memory::PrivateMemoryManager;
    ///
    /// fn run(memory: &PrivateMemoryManager, vcpu: &mut VcpuFd) {
    ///     loop {
    ///         let mut exit = vcpu.run().unwrap();
    ///         let is_fault = matches!(exit, VcpuExit::MemoryFault { .. });
    ///         match memory.serve_vcpu_exit(&mut exit) {
    ///             Some(Ok(_)) => continue,
    ///             // A hypercall's guest got its answer; a fault would only come back.
    ///             Some(Err(e)) if !is_fault => eprintln!("conversion refused: {e}"),
    ///             Some(Err(e)) => panic!("the vCPU cannot go on: {e}"),
    ///             None => { /* MMIO, port I/O, shutdown... */ }
    ///         }
    ///     }
    /// }
    /// ```
    pub fn serve_vcpu_exit(&self, exit: &mut VcpuExit<'_>) -> Option<Result<ConversionReport>> {
        match exit {
            VcpuExit::Hypercall(call) if call.nr == KVM_HC_MAP_GPA_RANGE => {
                let served = self.serve_map_gpa_range(call.args[0], call.args[1], call.args[2]);
                *call.ret = served.as_ref().map_or_else(Error::hypercall_code, |_| 0);
                Some(served)
            }
            VcpuExit::MemoryFault { flags, gpa, size } => {
                match self.serve_memory_fault(*flags, *gpa, *size) {
                    // Not this memory's: another device's, or no memory at all.
                    Err(Error::OutsideGuestMemory { .. }) => None,
                    served => Some(served),
                }
            }
            _ => None,
        }
    }
}
