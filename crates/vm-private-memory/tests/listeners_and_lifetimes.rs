// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Listeners and regions over their lifetimes: a panicking or converting listener, a
//! dropped subscription, a region re-added, a memory dropped behind a replaced view.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{dual, gpa_is_free, in_place, in_place_or_skip, pr, vm, Heard, Recorder};
use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
use vm_private_memory::{
    GuestMemoryPrivate, MemoryBuilder, MemoryListener, PageState, PrivateMemoryManager,
};

const MIB2: u64 = 2 << 20;

/// Replacing the published collection behind the memory's back must not leave a slot
/// bound to a mapping that drop then frees.
#[test]
fn drop_unbinds_its_regions_even_if_the_published_collection_was_replaced() {
    let vm = vm();
    let m = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .build()
        .unwrap();
    let view = m.guest_memory();
    view.lock().unwrap().replace(GuestMemoryPrivate::new());
    drop(view);
    drop(m);
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
}

/// A panicking listener is a refusal: the conversion rolls back and nothing is left
/// half done; a panic in `discard` does not stop the conversion.
///
/// The listener unwinds with `resume_unwind`, which is what `panic!` does after the panic
/// hook has printed its report: the memory catches both the same way, and a green test
/// run prints no panic report.
#[test]
fn a_panicking_listener_is_contained() {
    struct Panics {
        in_populate: bool,
    }
    impl MemoryListener for Panics {
        fn discard(&self, _: PageRange) {
            if !self.in_populate {
                std::panic::resume_unwind(Box::new("discard panics"));
            }
        }
        fn populate(&self, _: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            if self.in_populate {
                std::panic::resume_unwind(Box::new("populate panics"));
            }
            Ok(())
        }
    }
    let (m, view) = dual(MIB2, PageState::Private);
    let accepting = Arc::new(Recorder::default());
    let _a = m.subscribe(pr(0, MIB2), accepting.clone());
    let s = m.subscribe(pr(0, MIB2), Arc::new(Panics { in_populate: true }));
    let err = m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap_err();
    assert!(
        matches!(
            &err,
            vm_private_memory::Error::ListenerRefused {
                reason: vm_private_memory::ListenerRefusal::Panicked { message },
                ..
            } if message == "populate panics"
        ),
        "{err}"
    );
    assert!(err.to_string().contains("populate panics"), "{err}");
    assert_eq!(m.state_of(0), Some(PageState::Private));
    assert_eq!(
        view.calls.lock().unwrap().last(),
        Some(&(pr(0, PAGE_SIZE), PageState::Private))
    );
    assert_eq!(
        accepting.heard.lock().unwrap().len(),
        2,
        "accepted, then withdrawn"
    );
    drop(s);
    // A listener that panics in `discard` has not let go of its access: the conversion
    // to private must not go ahead, and the listeners told before it get the range back.
    m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap();
    let _d = m.subscribe(pr(0, MIB2), Arc::new(Panics { in_populate: false }));
    accepting.heard.lock().unwrap().clear();
    let err = m.convert(pr(0, PAGE_SIZE), PageState::Private).unwrap_err();
    assert!(
        matches!(
            &err,
            vm_private_memory::Error::ListenerRefused {
                reason: vm_private_memory::ListenerRefusal::Panicked { message },
                ..
            } if message == "discard panics"
        ),
        "{err}"
    );
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    assert_eq!(
        *accepting.heard.lock().unwrap(),
        vec![
            Heard::Discard(pr(0, PAGE_SIZE)),
            Heard::Populate(pr(0, PAGE_SIZE))
        ]
    );
    // Nor may the region leave, nor its pages be discarded.
    assert!(m.remove_region(0).is_err());
    assert!(m.discard(pr(0, PAGE_SIZE)).is_err());
    assert_eq!(m.regions().len(), 1);
}

/// Dual: KVM keeps attributes per address across memslot deletion, so a region re-added
/// as shared must set them.
#[test]
fn dual_re_add_sets_kvm_attributes_to_the_initial_state() {
    let (m, view) = dual(MIB2, PageState::Private);
    let (range, _, _) = m.remove_region(0).unwrap();
    view.calls.lock().unwrap().clear();
    m.add_region(range, None, PageState::Shared).unwrap();
    assert_eq!(
        *view.calls.lock().unwrap(),
        vec![(range, PageState::Shared)]
    );
}

/// Region changes from inside a listener are refused, not deadlocked.
#[test]
fn region_changes_from_a_listener_are_refused() {
    if !in_place_or_skip("region_changes_from_a_listener_are_refused") {
        return;
    }
    struct Remover {
        memory: Mutex<Option<Arc<PrivateMemoryManager>>>,
        results: Mutex<Vec<String>>,
    }
    impl MemoryListener for Remover {
        fn discard(&self, _: PageRange) {}
        fn populate(&self, _: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let m = self.memory.lock().unwrap().clone().unwrap();
            let r = m.remove_region(0).err().map(|e| e.to_string());
            let a = m
                .add_region(pr(8 * MIB2, MIB2), None, PageState::Shared)
                .err()
                .map(|e| e.to_string());
            self.results.lock().unwrap().push(format!("{r:?} {a:?}"));
            Ok(())
        }
    }
    let m = Arc::new(in_place(MIB2, PageState::Private));
    let remover = Arc::new(Remover {
        memory: Mutex::new(Some(m.clone())),
        results: Mutex::new(Vec::new()),
    });
    let _s = m.subscribe(pr(0, MIB2), remover.clone());
    m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap();
    let results = remover.results.lock().unwrap().join("");
    assert_eq!(
        results.matches("inside a listener callback").count(),
        2,
        "{results}"
    );
    assert_eq!(m.regions(), vec![pr(0, MIB2)]);
    remover.memory.lock().unwrap().take();
}

/// Once `drop(Subscription)` returns, its listener is not called again, even if a
/// conversion on another thread was notifying it.
#[test]
fn a_dropped_subscription_is_not_called_after_drop_returns() {
    if !in_place_or_skip("a_dropped_subscription_is_not_called_after_drop_returns") {
        return;
    }
    struct Slow {
        entered: AtomicBool,
        calls_running: AtomicUsize,
        calls: AtomicUsize,
    }
    impl MemoryListener for Slow {
        fn discard(&self, _: PageRange) {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.calls_running.fetch_add(1, Ordering::SeqCst);
            self.entered.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            self.calls_running.fetch_sub(1, Ordering::SeqCst);
        }
        fn populate(&self, _: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let m = Arc::new(in_place(MIB2, PageState::Shared));
    let slow = Arc::new(Slow {
        entered: AtomicBool::new(false),
        calls_running: AtomicUsize::new(0),
        calls: AtomicUsize::new(0),
    });
    let sub = m.subscribe(pr(0, MIB2), slow.clone());
    let converter = {
        let m = m.clone();
        std::thread::spawn(move || m.convert(pr(0, PAGE_SIZE), PageState::Private).unwrap())
    };
    while !slow.entered.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    drop(sub);
    assert_eq!(
        slow.calls_running.load(Ordering::SeqCst),
        0,
        "drop waited for the call"
    );
    converter.join().unwrap();
    let calls = slow.calls.load(Ordering::SeqCst);
    m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap();
    assert_eq!(
        slow.calls.load(Ordering::SeqCst),
        calls,
        "not called after drop"
    );
}

/// A region added with shared pages is offered to the listeners over it, as a conversion
/// to shared is; a refusal fails the addition with nothing changed.
#[test]
fn a_region_added_shared_is_offered_to_listeners_and_a_refusal_undoes_the_addition() {
    let (m, _vm) = dual(MIB2, PageState::Private);
    let recorder = Arc::new(Recorder::default());
    let _sub = m.subscribe(pr(0, 64 * MIB2), recorder.clone());
    let added = pr(4 * MIB2, MIB2);
    m.add_region(added, None, PageState::Shared).unwrap();
    assert_eq!(recorder.heard.lock().unwrap()[..], [Heard::Populate(added)]);
    // A region added private offers nothing.
    m.add_region(pr(8 * MIB2, MIB2), None, PageState::Private)
        .unwrap();
    assert_eq!(recorder.heard.lock().unwrap().len(), 1);

    *recorder.refuse.lock().unwrap() = true;
    let refused = pr(12 * MIB2, MIB2);
    match m.add_region(refused, None, PageState::Shared) {
        Err(vm_private_memory::Error::ListenerRefused { range, .. }) => {
            assert_eq!((range.start, range.len), (refused.start(), refused.len()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state_of(refused.start()), None, "the region stayed");
    assert!(m
        .guest_memory()
        .memory()
        .find_region(vm_memory::GuestAddress(refused.start()))
        .is_none());
    // The slot went back too: the same range can be added once the listener accepts.
    *recorder.refuse.lock().unwrap() = false;
    m.add_region(refused, None, PageState::Shared).unwrap();
    assert_eq!(m.state_of(refused.start()), Some(PageState::Shared));
}
