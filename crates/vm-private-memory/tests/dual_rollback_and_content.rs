// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The dual strategy's edges, with KVM's attribute call stood in (real memslots, files
//! and mappings on `/dev/kvm`): a rollback that fails is reported as such, and a page
//! turned shared arrives empty whatever reached its shared side while it was private.

mod common;

use std::os::unix::fs::FileExt;

use common::{dual, pr};
use guest_memfd::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{Error, PageState};

const SIZE: u64 = 2 << 20;

#[test]
fn a_failed_rollback_of_kvm_s_view_is_reported_with_the_ranges() {
    let (m, vm) = dual(SIZE, PageState::Private);
    // Pages 0 and 2 private, page 1 shared: converting [0, 3) changes two ranges.
    m.convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    let before = vm.calls.lock().unwrap().len();
    // KVM takes the first range, then refuses everything: the second range and the undo
    // of the first.
    *vm.fail_after.lock().unwrap() = Some(before + 1);
    let err = m
        .convert(pr(0, 3 * PAGE_SIZE), PageState::Shared)
        .unwrap_err();
    match &err {
        Error::RollbackFailed {
            cause,
            unknown,
            listeners_refused,
            ..
        } => {
            assert!(listeners_refused.is_empty(), "{listeners_refused:?}");
            assert!(matches!(**cause, Error::SetAttributes { .. }), "{cause}");
            assert_eq!(unknown.len(), 1);
            assert_eq!((unknown[0].start, unknown[0].len), (0, PAGE_SIZE));
            assert_eq!(err.errno(), Some(libc::EIO));
        }
        other => panic!("a failed rollback reported as {other}"),
    }
    assert!(err.to_string().contains("unknown"), "{err}");
    // The bits went back; only KVM's view of page 0 is in doubt.
    assert_eq!(m.state_of(0), Some(PageState::Private));
    assert_eq!(m.state_of(2 * PAGE_SIZE), Some(PageState::Private));

    // A failure whose undo succeeds is the plain error.
    *vm.fail_after.lock().unwrap() = None;
    *vm.fail.lock().unwrap() = true;
    assert!(matches!(
        m.convert(pr(0, 3 * PAGE_SIZE), PageState::Shared),
        Err(Error::SetAttributes { .. })
    ));
}

#[test]
fn a_page_turned_shared_arrives_empty_whatever_reached_its_shared_side() {
    // The shared side in the VMM's own file, at an offset.
    let zone = guest_memfd::SealedMemfd::create("vmm-zone", 2 * SIZE).unwrap();
    let file = zone.file().try_clone().unwrap();
    let m = vm_private_memory::MemoryBuilder::new(common::RecordingVm::new(common::vm()))
        .region_at_with_shared(0, SIZE, guest_memfd::SharedBacking::from(zone), SIZE)
        .strategy(vm_private_memory::Strategy::Dual)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    let view = m.guest_memory();
    let page = 5 * PAGE_SIZE;
    // Something with the shared file (another process mapping it, a late write) puts
    // bytes on the shared side of a private page.
    file.write_all_at(&[0xee; 64], SIZE + page).unwrap();
    m.convert(pr(page, PAGE_SIZE), PageState::Shared).unwrap();
    assert_eq!(
        view.memory().read_obj::<u64>(GuestAddress(page)).unwrap(),
        0,
        "stale shared-side bytes greeted the host"
    );
    // With content discarded either way, a round trip leaves the page empty too.
    view.memory().write_obj(7u64, GuestAddress(page)).unwrap();
    m.convert(pr(page, PAGE_SIZE), PageState::Private).unwrap();
    m.convert(pr(page, PAGE_SIZE), PageState::Shared).unwrap();
    assert_eq!(
        view.memory().read_obj::<u64>(GuestAddress(page)).unwrap(),
        0
    );
}

#[test]
fn a_listener_refusing_a_range_back_on_rollback_is_reported() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use vm_private_memory::MemoryListener;

    /// Takes ranges while `accept` is set; refuses them afterwards.
    struct Fickle {
        accept: AtomicBool,
    }
    impl MemoryListener for Fickle {
        fn discard(&self, _: guest_memfd::PageRange) {}
        fn populate(
            &self,
            _: guest_memfd::PageRange,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            if self.accept.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err("no longer".into())
            }
        }
    }

    let (m, vm) = dual(SIZE, PageState::Shared);
    let listener = Arc::new(Fickle {
        accept: AtomicBool::new(true),
    });
    let _sub = m.subscribe(pr(0, SIZE), listener.clone());
    // The listener heard `discard` for the page, KVM then refuses: the rollback offers
    // the page back, and the listener refuses it.
    listener.accept.store(false, Ordering::SeqCst);
    *vm.fail.lock().unwrap() = true;
    match m.convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Private) {
        Err(Error::RollbackFailed {
            cause,
            unknown,
            listeners_refused,
            ..
        }) => {
            assert!(matches!(*cause, Error::SetAttributes { .. }), "{cause}");
            assert!(unknown.is_empty(), "{unknown:?}");
            assert_eq!(listeners_refused.len(), 1);
            assert_eq!(
                (listeners_refused[0].start, listeners_refused[0].len),
                (PAGE_SIZE, PAGE_SIZE)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Shared));
}

/// KVM keeps memory attributes per address, across memories built on one VM: a memory
/// that starts shared says so to KVM, whatever an earlier one left there.
#[test]
fn a_memory_that_starts_shared_sets_kvm_s_view_whatever_an_earlier_one_left() {
    let recording = common::RecordingVm::new(common::vm());
    let build = |initial| {
        vm_private_memory::MemoryBuilder::new(recording.clone())
            .region_at(0, SIZE)
            .strategy(vm_private_memory::Strategy::Dual)
            .initial_state(initial)
            .build()
            .unwrap()
    };
    drop(build(PageState::Private));
    drop(build(PageState::Shared));
    assert_eq!(
        recording.calls.lock().unwrap()[..],
        [
            (pr(0, SIZE), PageState::Private),
            (pr(0, SIZE), PageState::Shared)
        ]
    );
}
