// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The typed entry points for conversion exits: hypercalls say why they refused, a
//! kvm-ioctls `VcpuExit` is served only when it is a conversion request, and the
//! hypercall exit is enabled through the memory's VM operations (real `/dev/kvm`).

mod common;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use common::{in_place_or_skip, vm};
use guest_memfd::uapi::KVM_HC_MAP_GPA_RANGE;
use guest_memfd::{VmMemoryOps, PAGE_SIZE};
use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region2};
use kvm_ioctls::{HypercallExit, VcpuExit};
use vm_private_memory::{
    Error, MemoryBuilder, PageState, PrivateMemoryManager, RequestError, Strategy, KVM_EAGAIN,
    KVM_EINVAL, KVM_ENOSYS, MAP_GPA_RANGE_ENCRYPTED,
};
use vmm_sys_util::errno;

const MIB2: u64 = 2 << 20;

fn memory() -> Option<PrivateMemoryManager> {
    in_place_or_skip("exit entry points").then(|| {
        MemoryBuilder::new(vm())
            .region_at(0, MIB2)
            .strategy(Strategy::InPlace)
            .initial_state(PageState::Shared)
            .build()
            .unwrap()
    })
}

#[test]
fn a_hypercall_says_why_it_was_refused_and_the_guest_gets_the_matching_code() {
    let Some(m) = memory() else { return };
    let refused = |nr, args: [u64; 3]| {
        let err = m.serve_hypercall(nr, args).unwrap_err();
        assert_eq!(m.handle_hypercall(nr, args), err.hypercall_code());
        err
    };
    let err = refused(99, [0, 1, 0]);
    assert!(
        matches!(err, Error::BadRequest(RequestError::UnknownHypercall(99))),
        "{err}"
    );
    assert_eq!(err.hypercall_code(), KVM_ENOSYS.wrapping_neg());
    let err = refused(KVM_HC_MAP_GPA_RANGE, [0x1001, 1, 0]);
    assert!(
        matches!(err, Error::BadRequest(RequestError::Unaligned(0x1001))),
        "{err}"
    );
    assert_eq!(err.hypercall_code(), KVM_EINVAL.wrapping_neg());
    let err = refused(KVM_HC_MAP_GPA_RANGE, [4 * MIB2, 1, 0]);
    assert!(matches!(err, Error::OutsideGuestMemory { .. }), "{err}");
    assert_eq!(err.hypercall_code(), KVM_EINVAL.wrapping_neg());
    // A held slice makes the conversion to private wait, then refuse, retryably.
    let view = vm_memory::GuestAddressSpace::memory(&m.guest_memory());
    let held =
        vm_memory::GuestMemoryBackend::get_slice(&*view, vm_memory::GuestAddress(0), 8).unwrap();
    let err = refused(KVM_HC_MAP_GPA_RANGE, [0, 1, MAP_GPA_RANGE_ENCRYPTED]);
    assert!(matches!(err, Error::HostAccessInFlight { .. }), "{err}");
    assert_eq!(err.hypercall_code(), KVM_EAGAIN.wrapping_neg());
    drop(held);
    // Served: the report says what changed.
    let report = m
        .serve_hypercall(KVM_HC_MAP_GPA_RANGE, [0, 2, MAP_GPA_RANGE_ENCRYPTED])
        .unwrap();
    assert_eq!(report.pages_changed, 2);
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Private));
}

#[test]
fn a_vcpu_exit_is_served_only_when_it_is_a_conversion_request() {
    let Some(m) = memory() else { return };
    let mut ret = 77;
    let mut exit = VcpuExit::Hypercall(HypercallExit {
        nr: KVM_HC_MAP_GPA_RANGE,
        args: [PAGE_SIZE, 1, MAP_GPA_RANGE_ENCRYPTED, 0, 0, 0],
        ret: &mut ret,
        longmode: 1,
    });
    let served = m.serve_vcpu_exit(&mut exit).expect("a conversion request");
    assert_eq!(served.unwrap().pages_changed, 1);
    assert_eq!(ret, 0);
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Private));

    // A refusal reaches the guest's rax and the VMM.
    let mut ret = 77;
    let mut exit = VcpuExit::Hypercall(HypercallExit {
        nr: KVM_HC_MAP_GPA_RANGE,
        args: [PAGE_SIZE + 1, 1, 0, 0, 0, 0],
        ret: &mut ret,
        longmode: 1,
    });
    assert!(matches!(
        m.serve_vcpu_exit(&mut exit),
        Some(Err(Error::BadRequest(RequestError::Unaligned(_))))
    ));
    assert_eq!(ret, KVM_EINVAL.wrapping_neg());

    // Another hypercall, and other exits, are the VMM's: untouched.
    let mut ret = 77;
    let mut exit = VcpuExit::Hypercall(HypercallExit {
        nr: 5,
        args: [0; 6],
        ret: &mut ret,
        longmode: 1,
    });
    assert!(m.serve_vcpu_exit(&mut exit).is_none());
    assert_eq!(ret, 77);
    assert!(m.serve_vcpu_exit(&mut VcpuExit::Hlt).is_none());

    // A memory fault converts to what the guest used.
    let mut exit = VcpuExit::MemoryFault {
        flags: 0,
        gpa: PAGE_SIZE,
        size: PAGE_SIZE,
    };
    assert!(m.serve_vcpu_exit(&mut exit).unwrap().is_ok());
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Shared));
    // One outside this memory is the VMM's.
    let mut exit = VcpuExit::MemoryFault {
        flags: 0,
        gpa: 64 * MIB2,
        size: PAGE_SIZE,
    };
    assert!(m.serve_vcpu_exit(&mut exit).is_none());
}

/// A VMM's own VM wrapper: forwards to a real VM, records hypercall-exit requests, and
/// may report the exit missing or refuse to enable it.
struct OwnWrapper {
    inner: Arc<dyn VmMemoryOps>,
    offers_exit: bool,
    refuse: bool,
    enabled: Mutex<Vec<u64>>,
}

impl VmMemoryOps for OwnWrapper {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        if cap == kvm_bindings::KVM_CAP_EXIT_HYPERCALL && !self.offers_exit {
            return 0;
        }
        self.inner.check_extension_raw(cap)
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        self.inner.create_guest_memfd(request)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        // SAFETY: the caller upholds the trait's contract, the same for the VM wrapped.
        unsafe { self.inner.set_user_memory_region2(region) }
    }

    fn enable_hypercall_exits(&self, hypercalls: u64) -> Result<(), errno::Error> {
        if self.refuse {
            return Err(errno::Error::new(libc::EINVAL));
        }
        self.enabled.lock().unwrap().push(hypercalls);
        self.inner.enable_hypercall_exits(hypercalls)
    }
}

#[test]
fn the_hypercall_exit_is_enabled_through_the_vm_operations() {
    let offers = guest_memfd::Capabilities::of_vm(&*vm()).map_gpa_range_exit();
    if !offers {
        println!("SKIPPED the_hypercall_exit_is_enabled_through_the_vm_operations: needs KVM_CAP_EXIT_HYPERCALL with KVM_HC_MAP_GPA_RANGE");
        return;
    }
    let own = |offers_exit, refuse| {
        let vm = Arc::new(OwnWrapper {
            inner: vm(),
            offers_exit,
            refuse,
            enabled: Mutex::default(),
        });
        let memory = MemoryBuilder::new(vm.clone())
            .region_at(0, MIB2)
            .build()
            .unwrap();
        (vm, memory)
    };
    let (vm, memory) = own(true, false);
    assert!(memory.enable_map_gpa_range_exits().unwrap());
    assert_eq!(vm.enabled.lock().unwrap()[..], [1 << KVM_HC_MAP_GPA_RANGE]);

    let (vm, memory) = own(false, false);
    assert!(!memory.enable_map_gpa_range_exits().unwrap());
    assert!(vm.enabled.lock().unwrap().is_empty());

    let (_vm, memory) = own(true, true);
    let err = memory.enable_map_gpa_range_exits().unwrap_err();
    assert!(matches!(err, Error::EnableExits(_)), "{err}");
    assert_eq!(err.errno(), Some(libc::EINVAL));
}

#[test]
fn kvm_ioctls_vm_fd_enables_the_hypercall_exit_for_real() {
    let Some(vm) =
        common::kvm_in_place_or_skip("kvm_ioctls_vm_fd_enables_the_hypercall_exit_for_real")
    else {
        return;
    };
    if !guest_memfd::Capabilities::of_vm(&*vm).map_gpa_range_exit() {
        println!("SKIPPED kvm_ioctls_vm_fd_enables_the_hypercall_exit_for_real: needs KVM_CAP_EXIT_HYPERCALL with KVM_HC_MAP_GPA_RANGE");
        return;
    }
    let memory = MemoryBuilder::new(vm).region_at(0, MIB2).build().unwrap();
    assert!(memory.enable_map_gpa_range_exits().unwrap());
}
