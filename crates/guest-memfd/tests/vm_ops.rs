// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The VM operations trait on the real `/dev/kvm`: every function that takes a VM goes
//! through it, so a VMM's own VM type (here a wrapper that logs calls) serves as well as
//! kvm-ioctls' `VmFd`.

mod common;

use std::os::fd::OwnedFd;
use std::sync::Mutex;

use guest_memfd::{
    Capabilities, Error, GuestMemfd, GuestMemfdFlags, Memslot, PageRange, VmMemoryOps,
};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
    KVM_CAP_GUEST_MEMFD,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::errno;

const MIB2: u64 = 2 << 20;

/// A VMM's own VM type: forwards to a `VmFd`, logs each call, and can hide guest_memfd.
/// It leaves `set_memory_attributes` to the trait's default.
struct LoggingVm {
    vm: VmFd,
    hide_guest_memfd: bool,
    log: Mutex<Vec<String>>,
}

impl VmMemoryOps for LoggingVm {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        self.log.lock().unwrap().push(format!("check {cap}"));
        if self.hide_guest_memfd && cap == KVM_CAP_GUEST_MEMFD {
            return 0;
        }
        VmMemoryOps::check_extension_raw(&self.vm, cap)
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        self.log.lock().unwrap().push("create".into());
        VmMemoryOps::create_guest_memfd(&self.vm, request)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        self.log.lock().unwrap().push(format!(
            "region {} size {:#x}",
            region.slot, region.memory_size
        ));
        // SAFETY: the caller upholds the trait's contract, the same for the `VmFd`.
        unsafe { VmMemoryOps::set_user_memory_region2(&self.vm, region) }
    }
}

fn logging_vm(hide_guest_memfd: bool) -> LoggingVm {
    LoggingVm {
        vm: common::vm(),
        hide_guest_memfd,
        log: Mutex::default(),
    }
}

#[test]
fn a_vmm_s_own_vm_type_creates_binds_and_probes_through_the_trait() {
    if common::vm_with_guest_memfd_or_skip(
        "a_vmm_s_own_vm_type_creates_binds_and_probes_through_the_trait",
    )
    .is_none()
    {
        return;
    }
    let vm = logging_vm(false);
    assert_eq!(Capabilities::of_vm(&vm), Capabilities::of_vm(&vm.vm));
    vm.log.lock().unwrap().clear();

    let gmem = GuestMemfd::create(&vm, MIB2, GuestMemfdFlags::empty()).unwrap();
    let slot = Memslot::new(3, PageRange::new(1 << 32, MIB2).unwrap(), &gmem, 0).unwrap();
    // SAFETY: no userspace address is set.
    unsafe { slot.bind(&vm) }.unwrap();
    slot.unbind(&vm).unwrap();
    let log = vm.log.lock().unwrap().clone();
    assert!(log.contains(&"create".to_owned()), "{log:?}");
    assert!(log.contains(&format!("region 3 size {MIB2:#x}")), "{log:?}");
    assert_eq!(
        log.last().unwrap(),
        "region 3 size 0x0",
        "unbind deletes the slot"
    );
    // Through a trait object too.
    let dynamic: &dyn VmMemoryOps = &vm;
    assert!(GuestMemfd::create(dynamic, MIB2, GuestMemfdFlags::empty()).is_ok());
}

#[test]
fn a_vm_without_guest_memfd_is_refused_before_the_create_call() {
    let vm = logging_vm(true);
    let err = GuestMemfd::create(&vm, MIB2, GuestMemfdFlags::empty()).unwrap_err();
    assert!(matches!(err, Error::GuestMemfdUnsupported), "{err}");
    assert!(!vm.log.lock().unwrap().contains(&"create".to_owned()));
}

#[test]
fn memory_attributes_answer_as_the_kernel_does_without_them_by_default() {
    let vm = logging_vm(false);
    let attributes = kvm_memory_attributes {
        address: 0,
        size: MIB2,
        attributes: 0,
        flags: 0,
    };
    let err = vm.set_memory_attributes(attributes).unwrap_err();
    assert_eq!(err.errno(), libc::ENOTTY);
    // The `VmFd` implementation asks the kernel: where the VM takes no attribute, the
    // private one is refused, with ENOTTY where the kernel has no such ioctl (our 6.18
    // hosts) and EINVAL where it has (Linux 7.3's default VM, which takes attributes 0).
    if Capabilities::of_vm(&vm.vm).memory_attributes == 0 {
        let private = kvm_memory_attributes {
            attributes: u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE),
            ..attributes
        };
        let err = VmMemoryOps::set_memory_attributes(&vm.vm, private).unwrap_err();
        assert!(matches!(err.errno(), libc::ENOTTY | libc::EINVAL), "{err}");
    }
}
