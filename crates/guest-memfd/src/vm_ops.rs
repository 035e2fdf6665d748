// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VM operations this workspace needs from a hypervisor, as a trait: [`VmMemoryOps`].
//!
//! Everything that touches a VM (probing capabilities, creating a guest_memfd, binding
//! memslots, changing memory attributes, enabling hypercall exits) goes through this
//! trait. It is implemented for
//! kvm-ioctls' [`VmFd`]; a VMM with its own hypervisor wrapper (Cloud Hypervisor's
//! `hypervisor` crate, for example) implements it there and hands that to this crate, and
//! tests implement it to record calls or make them fail.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use kvm_bindings::{kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;

/// The VM operations guest private memory needs, each one KVM ioctl on a VM fd.
///
/// Implemented for kvm-ioctls' [`VmFd`] (and through [`Arc`], [`Box`] and references for
/// anything that implements it), so every function of this workspace that takes a VM
/// accepts `&VmFd` as well as a VMM's own wrapper. An implementation forwards each call
/// to its VM and returns the kernel's answer unchanged.
///
/// New operations (enabling hypercall exits, for example) are added as methods with a
/// default body, so an implementation written against this version keeps compiling; a
/// default answers as a kernel without the operation would (`ENOTTY`).
///
/// ```
/// use guest_memfd::{Capabilities, GuestMemfd, GuestMemfdFlags, VmMemoryOps};
///
/// // A VMM's own VM type: it implements the operations by forwarding to its fd.
/// struct MyVm(kvm_ioctls::VmFd);
///
/// impl VmMemoryOps for MyVm {
///     fn check_extension_raw(&self, cap: u32) -> i32 {
///         self.0.check_extension_raw(cap.into())
///     }
///     fn create_guest_memfd(
///         &self,
///         request: kvm_bindings::kvm_create_guest_memfd,
///     ) -> Result<std::os::fd::OwnedFd, vmm_sys_util::errno::Error> {
///         // Through the `VmFd` implementation, which takes ownership of the new fd.
///         VmMemoryOps::create_guest_memfd(&self.0, request)
///     }
///     unsafe fn set_user_memory_region2(
///         &self,
///         region: kvm_bindings::kvm_userspace_memory_region2,
///     ) -> Result<(), vmm_sys_util::errno::Error> {
///         // SAFETY: the caller upholds this method's contract, which is the one
///         // `VmFd::set_user_memory_region2` asks for.
///         unsafe { self.0.set_user_memory_region2(region) }
///     }
/// }
///
/// // Needs /dev/kvm: without it, the example says so and stops.
/// let Ok(kvm) = kvm_ioctls::Kvm::new() else {
///     println!("SKIPPED: this example needs /dev/kvm");
///     return;
/// };
/// let vm = MyVm(kvm.create_vm().unwrap());
/// if !Capabilities::of_vm(&vm).guest_memfd {
///     println!("SKIPPED: this example needs guest_memfd (KVM_CAP_GUEST_MEMFD (234) is 0)");
///     return;
/// }
/// let gmem = GuestMemfd::create(&vm, 2 << 20, GuestMemfdFlags::empty()).unwrap();
/// assert_eq!(gmem.size(), 2 << 20);
/// ```
pub trait VmMemoryOps: Send + Sync {
    /// `KVM_CHECK_EXTENSION` on the VM: the kernel's answer for capability `cap`
    /// (a `KVM_CAP_*` number), zero when absent, negative on error.
    fn check_extension_raw(&self, cap: u32) -> i32;

    /// `KVM_CREATE_GUEST_MEMFD`: a new guest_memfd, owned by the caller.
    ///
    /// # Errors
    ///
    /// The kernel's errno (`EINVAL` for a bad size or flags, `ENOTTY` without
    /// guest_memfd).
    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error>;

    /// `KVM_SET_USER_MEMORY_REGION2`: creates, changes or (with `memory_size` 0) deletes
    /// memslot `region.slot`.
    ///
    /// # Errors
    ///
    /// The kernel's errno: `EEXIST` for a guest-physical range another slot covers;
    /// `EINVAL` for a malformed slot or a foreign guest_memfd; for a guest_memfd range
    /// another slot is bound to, `EINVAL` up to Linux 6.18 and `EEXIST` on 7.3.
    ///
    /// # Safety
    ///
    /// As for kvm-ioctls' `VmFd::set_user_memory_region2`: when `memory_size` is not zero
    /// and `userspace_addr` is set, the host memory `[userspace_addr, userspace_addr +
    /// memory_size)` must stay mapped, and be used for nothing but this guest's memory,
    /// until the slot is deleted or the VM closed: the guest and KVM read and write it.
    /// Deleting a slot (`memory_size` 0) has no requirement.
    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error>;

    /// `KVM_SET_MEMORY_ATTRIBUTES`: sets the attributes (`KVM_MEMORY_ATTRIBUTE_PRIVATE`
    /// or none) of a guest-physical range.
    ///
    /// The default answers `ENOTTY`, as a kernel without memory attributes does: an
    /// implementation for a hypervisor without them need not write this method.
    ///
    /// # Errors
    ///
    /// The kernel's errno (`ENOTTY` without memory attributes, `EINVAL` for a bad range
    /// or attribute).
    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<(), errno::Error> {
        let _ = attributes;
        Err(errno::Error::new(libc::ENOTTY))
    }

    /// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)`: sets the hypercalls that exit to the
    /// VMM as `KVM_EXIT_HYPERCALL` to exactly those in `hypercalls` (bit `n` for
    /// hypercall `n`), replacing the VM's earlier set.
    ///
    /// The default answers `ENOTTY`, as a kernel without the capability does.
    ///
    /// # Errors
    ///
    /// The kernel's errno (`EINVAL` for a hypercall it cannot forward).
    fn enable_hypercall_exits(&self, hypercalls: u64) -> Result<(), errno::Error> {
        let _ = hypercalls;
        Err(errno::Error::new(libc::ENOTTY))
    }
}

impl VmMemoryOps for VmFd {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        VmFd::check_extension_raw(self, cap.into())
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        let fd = VmFd::create_guest_memfd(self, request)?;
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new file descriptor that nothing else
        // owns; the `OwnedFd` takes sole ownership of it and closes it on drop.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        // SAFETY: the caller upholds the trait's contract, which is the one kvm-ioctls
        // asks for: the userspace memory outlives the slot.
        unsafe { VmFd::set_user_memory_region2(self, region) }
    }

    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<(), errno::Error> {
        VmFd::set_memory_attributes(self, attributes)
    }

    fn enable_hypercall_exits(&self, hypercalls: u64) -> Result<(), errno::Error> {
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXIT_HYPERCALL,
            ..Default::default()
        };
        cap.args[0] = hypercalls;
        VmFd::enable_cap(self, &cap)
    }
}

macro_rules! forward_vm_ops {
    ($($wrapper:ty),*) => {$(
        impl<T: VmMemoryOps + ?Sized> VmMemoryOps for $wrapper {
            fn check_extension_raw(&self, cap: u32) -> i32 {
                (**self).check_extension_raw(cap)
            }

            fn create_guest_memfd(
                &self,
                request: kvm_create_guest_memfd,
            ) -> Result<OwnedFd, errno::Error> {
                (**self).create_guest_memfd(request)
            }

            unsafe fn set_user_memory_region2(
                &self,
                region: kvm_userspace_memory_region2,
            ) -> Result<(), errno::Error> {
                // SAFETY: the caller upholds the contract, which is the same for the
                // wrapped implementation.
                unsafe { (**self).set_user_memory_region2(region) }
            }

            fn set_memory_attributes(
                &self,
                attributes: kvm_memory_attributes,
            ) -> Result<(), errno::Error> {
                (**self).set_memory_attributes(attributes)
            }

            fn enable_hypercall_exits(&self, hypercalls: u64) -> Result<(), errno::Error> {
                (**self).enable_hypercall_exits(hypercalls)
            }
        }
    )*};
}

forward_vm_ops!(&T, Arc<T>, Box<T>);
