// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Extra guest_memfd creation flags a VMM asks for (`MemoryBuilder::guest_memfd_flags`):
//! every guest_memfd the memory creates carries them, and flags the host does not offer
//! are refused before any file is created. Real `/dev/kvm` where it has in-place
//! guest_memfd, else the stand-in for it; KVM's attribute call stood in for the dual
//! strategy.

mod common;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use common::{gpa_is_free, pr, vm, RecordingVm};
use guest_memfd::{GuestMemfdFlags, VmMemoryOps};
use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region2};
use vm_private_memory::{Error, MemoryBuilder, PageState, Strategy, UnavailableReason};
use vmm_sys_util::errno;

const MIB2: u64 = 2 << 20;

/// A host that offers one more guest_memfd flag than the kernel here (as a patched
/// kernel offers `NO_DIRECT_MAP`): it records the flags asked for and creates the file
/// without that bit.
struct OffersMore {
    inner: Arc<dyn VmMemoryOps>,
    asked: Mutex<Vec<u64>>,
}

const MORE: u64 = 1 << 30;

impl VmMemoryOps for OffersMore {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        let answer = self.inner.check_extension_raw(cap);
        if cap == guest_memfd::uapi::KVM_CAP_GUEST_MEMFD_FLAGS {
            return answer | MORE as i32;
        }
        answer
    }

    fn create_guest_memfd(
        &self,
        mut request: kvm_create_guest_memfd,
    ) -> Result<OwnedFd, errno::Error> {
        self.asked.lock().unwrap().push(request.flags);
        request.flags &= !MORE;
        self.inner.create_guest_memfd(request)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        // SAFETY: the caller upholds the trait's contract, the same for the VM wrapped.
        unsafe { self.inner.set_user_memory_region2(region) }
    }
}

#[test]
fn extra_flags_reach_every_guest_memfd_the_memory_creates() {
    if !common::in_place_or_skip("extra_flags_reach_every_guest_memfd_the_memory_creates") {
        return;
    }
    let vm = Arc::new(OffersMore {
        inner: vm(),
        asked: Mutex::default(),
    });
    let extra = GuestMemfdFlags::from_bits_retain(MORE);
    let memory = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .region_at(4 * MIB2, MIB2)
        .strategy(Strategy::InPlace)
        .guest_memfd_flags(extra)
        .build()
        .unwrap();
    memory
        .add_region(pr(8 * MIB2, MIB2), None, PageState::Private)
        .unwrap();
    let expected = (GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED | extra).bits();
    assert_eq!(vm.asked.lock().unwrap()[..], [expected; 3]);
}

#[test]
fn the_dual_strategy_refuses_flags_that_would_move_its_shared_pages() {
    let vm = vm();
    for flags in [
        GuestMemfdFlags::MMAP,
        GuestMemfdFlags::INIT_SHARED,
        GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
    ] {
        let err = MemoryBuilder::new(RecordingVm::new(vm.clone()))
            .region_at(0, MIB2)
            .strategy(Strategy::Dual)
            .guest_memfd_flags(flags)
            .build()
            .unwrap_err();
        match &err {
            Error::StrategyUnavailable {
                reason: UnavailableReason::FlagsOwnedByStrategy { flags: refused },
                ..
            } => assert_eq!(*refused, flags),
            other => panic!("{other}"),
        }
    }
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
}

#[test]
fn flags_the_host_does_not_offer_are_refused_before_any_file() {
    let vm = vm();
    let unknown = GuestMemfdFlags::from_bits_retain(1 << 40);
    let err = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .guest_memfd_flags(unknown)
        .build()
        .unwrap_err();
    match &err {
        Error::File(guest_memfd::Error::UnsupportedFlags { unsupported, .. }) => {
            assert_eq!(*unsupported, unknown)
        }
        other => panic!("{other}"),
    }
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
}
