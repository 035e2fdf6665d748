// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A listener that cannot let go of a range (it panics in `discard`: a device may still
//! map it) while an operation is being undone: that range stays shared, and the error
//! says so. Real memslots and files on `/dev/kvm`; the dual strategy's attribute calls
//! are stood in.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{dual, in_place_or_skip, pr, Heard, Recorder};
use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{ByteRange, Error, MemoryBuilder, MemoryListener, PageState, Strategy};

const SIZE: u64 = 2 << 20;

/// Accepts every range; panics in `discard` while `stuck` is set (like a device whose
/// unmap the IOMMU refuses). Records what it heard.
#[derive(Default)]
struct Holder {
    stuck: AtomicBool,
    heard: Mutex<Vec<Heard>>,
}

impl MemoryListener for Holder {
    fn discard(&self, range: PageRange) {
        self.heard.lock().unwrap().push(Heard::Discard(range));
        if self.stuck.load(Ordering::SeqCst) {
            // The quiet way to refuse: no panic report (MemoryListener::discard).
            std::panic::resume_unwind(Box::new(format!("cannot let go of {range}")));
        }
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.heard.lock().unwrap().push(Heard::Populate(range));
        Ok(())
    }
}

fn refuser() -> Arc<Recorder> {
    let r = Arc::new(Recorder::default());
    *r.refuse.lock().unwrap() = true;
    r
}

fn ranges(r: &[ByteRange]) -> Vec<(u64, u64)> {
    r.iter().map(|g| (g.start, g.len)).collect()
}

/// The pages in `state` among the first `pages` pages.
fn pages_in(m: &vm_private_memory::PrivateMemoryManager, pages: u64, state: PageState) -> Vec<u64> {
    (0..pages)
        .filter(|p| m.state_of(p * PAGE_SIZE) == Some(state))
        .collect()
}

#[test]
fn a_range_a_listener_cannot_let_go_of_stays_shared_when_a_conversion_to_shared_is_undone() {
    let (m, vm) = dual(SIZE, PageState::Private);
    let holder = Arc::new(Holder::default());
    let lets_go = Arc::new(Recorder::default());
    let refuses = refuser();
    // The holder follows pages [0, 4), another listener [8, 16), and the last one refuses.
    let _a = m.subscribe(pr(0, 4 * PAGE_SIZE), holder.clone());
    let _b = m.subscribe(pr(8 * PAGE_SIZE, 8 * PAGE_SIZE), lets_go.clone());
    let _c = m.subscribe(pr(0, 16 * PAGE_SIZE), refuses.clone());
    holder.stuck.store(true, Ordering::SeqCst);

    let err = m
        .convert(pr(0, 16 * PAGE_SIZE), PageState::Shared)
        .unwrap_err();
    match &err {
        Error::RollbackFailed {
            cause,
            unknown,
            listeners_refused,
            kept_shared,
            kept_private,
            ..
        } => {
            assert!(matches!(**cause, Error::ListenerRefused { .. }), "{cause}");
            assert!(unknown.is_empty() && listeners_refused.is_empty() && kept_private.is_empty());
            assert_eq!(ranges(kept_shared), [(0, 4 * PAGE_SIZE)]);
        }
        other => panic!("reported as {other}"),
    }
    assert!(err.to_string().contains("could not let go"), "{err}");
    // The pages the holder still holds are shared, in the bits and in KVM's view; the
    // rest went back to private.
    assert_eq!(pages_in(&m, 16, PageState::Shared), [0, 1, 2, 3]);
    let calls = vm.calls.lock().unwrap().clone();
    assert_eq!(
        calls[calls.len() - 2..],
        [
            (pr(0, 16 * PAGE_SIZE), PageState::Shared),
            (pr(4 * PAGE_SIZE, 12 * PAGE_SIZE), PageState::Private),
        ]
    );
    // The other listener let go of its range; the held range is still readable.
    assert_eq!(
        lets_go.heard.lock().unwrap().last(),
        Some(&Heard::Discard(pr(8 * PAGE_SIZE, 8 * PAGE_SIZE)))
    );
    let view = m.guest_memory();
    view.memory()
        .write_obj(9u64, GuestAddress(PAGE_SIZE))
        .unwrap();
    assert!(view
        .memory()
        .read_obj::<u64>(GuestAddress(4 * PAGE_SIZE))
        .is_err());

    // Once the holder can let go, the range converts to private as usual.
    holder.stuck.store(false, Ordering::SeqCst);
    *refuses.refuse.lock().unwrap() = false;
    m.convert(pr(0, 4 * PAGE_SIZE), PageState::Private).unwrap();
    assert_eq!(pages_in(&m, 16, PageState::Shared), Vec::<u64>::new());
    assert_eq!(
        holder.heard.lock().unwrap().last(),
        Some(&Heard::Discard(pr(0, 4 * PAGE_SIZE)))
    );
}

#[test]
fn one_run_in_place_keeps_shared_only_what_a_listener_cannot_let_go_of() {
    if !in_place_or_skip("one_run_in_place_keeps_shared_only_what_a_listener_cannot_let_go_of") {
        return;
    }
    let m = MemoryBuilder::new(common::vm())
        .region_at(0, SIZE)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    let holder = Arc::new(Holder::default());
    let _a = m.subscribe(pr(2 * PAGE_SIZE, 2 * PAGE_SIZE), holder.clone());
    let _b = m.subscribe(pr(0, SIZE), refuser());
    holder.stuck.store(true, Ordering::SeqCst);
    // One run of one in-place region: the direct path.
    match m.convert(pr(0, 8 * PAGE_SIZE), PageState::Shared) {
        Err(Error::RollbackFailed {
            cause, kept_shared, ..
        }) => {
            assert!(matches!(*cause, Error::ListenerRefused { .. }), "{cause}");
            assert_eq!(ranges(&kept_shared), [(2 * PAGE_SIZE, 2 * PAGE_SIZE)]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(pages_in(&m, 8, PageState::Shared), [2, 3]);
    // Without a stuck listener the same refusal is the plain error, all undone.
    holder.stuck.store(false, Ordering::SeqCst);
    assert!(matches!(
        m.convert(pr(4 * PAGE_SIZE, 4 * PAGE_SIZE), PageState::Shared),
        Err(Error::ListenerRefused { .. })
    ));
    assert_eq!(pages_in(&m, 8, PageState::Shared), [2, 3]);
}

#[test]
fn a_replay_the_listener_cannot_take_back_keeps_it_subscribed() {
    let (m, _vm) = dual(SIZE, PageState::Private);
    m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap();
    m.convert(pr(4 * PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();

    /// Accepts the first run offered, refuses the second, cannot let go of the first.
    #[derive(Default)]
    struct FirstOnly {
        offered: Mutex<u32>,
        holder: Holder,
    }
    impl MemoryListener for FirstOnly {
        fn discard(&self, range: PageRange) {
            self.holder.discard(range)
        }
        fn populate(
            &self,
            range: PageRange,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let mut offered = self.offered.lock().unwrap();
            *offered += 1;
            if *offered == 2 {
                return Err("full".into());
            }
            self.holder.populate(range)
        }
    }
    let listener = Arc::new(FirstOnly::default());
    listener.holder.stuck.store(true, Ordering::SeqCst);
    match m.subscribe_with_replay(pr(0, SIZE), listener.clone()) {
        Err(Error::RollbackFailed {
            cause, kept_shared, ..
        }) => {
            assert!(matches!(*cause, Error::ListenerRefused { .. }), "{cause}");
            assert_eq!(ranges(&kept_shared), [(0, PAGE_SIZE)]);
        }
        other => panic!("{other:?}"),
    }
    // It follows the page it may map, and nothing else: the page cannot go private
    // without it hearing, and conversions elsewhere are neither offered nor refused.
    assert_eq!(m.listener_count(), 1);
    let heard = listener.holder.heard.lock().unwrap().len();
    m.convert(pr(8 * PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    m.convert(pr(4 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert_eq!(listener.holder.heard.lock().unwrap().len(), heard);
    assert!(m.convert(pr(0, PAGE_SIZE), PageState::Private).is_err());
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    // Once it lets go, it is told, and it follows nothing any more.
    listener.holder.stuck.store(false, Ordering::SeqCst);
    m.convert(pr(0, PAGE_SIZE), PageState::Private).unwrap();
    assert_eq!(
        listener.holder.heard.lock().unwrap().last(),
        Some(&Heard::Discard(pr(0, PAGE_SIZE)))
    );
    assert_eq!(m.listener_count(), 0);

    // A listener that lets go is not subscribed after a refused replay.
    let (m, _vm) = dual(SIZE, PageState::Shared);
    let _ = m.subscribe_with_replay(pr(0, SIZE), refuser());
    assert_eq!(m.listener_count(), 0);
}

#[test]
fn a_listener_refusing_back_what_it_let_go_of_when_a_revocation_stops_is_reported() {
    let (m, _vm) = dual(SIZE, PageState::Shared);
    // The first listener lets go, then refuses the range back; the second cannot let go.
    let first = refuser();
    let second = Arc::new(Holder::default());
    second.stuck.store(true, Ordering::SeqCst);
    let _a = m.subscribe(pr(0, SIZE), first.clone());
    let _b = m.subscribe(pr(0, SIZE), second);
    match m.convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Private) {
        Err(Error::RollbackFailed {
            cause,
            listeners_refused,
            kept_shared,
            ..
        }) => {
            assert!(matches!(*cause, Error::ListenerRefused { .. }), "{cause}");
            assert_eq!(ranges(&listeners_refused), [(PAGE_SIZE, PAGE_SIZE)]);
            assert!(kept_shared.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Shared));
    assert_eq!(
        first.heard.lock().unwrap()[..],
        [
            Heard::Discard(pr(PAGE_SIZE, PAGE_SIZE)),
            Heard::Populate(pr(PAGE_SIZE, PAGE_SIZE))
        ]
    );
    // Freeing pages goes the same way.
    assert!(matches!(
        m.discard(pr(0, PAGE_SIZE)),
        Err(Error::RollbackFailed { .. })
    ));
}

#[test]
fn a_region_added_shared_that_a_listener_cannot_let_go_of_stays() {
    let (m, _vm) = dual(SIZE, PageState::Private);
    let holder = Arc::new(Holder::default());
    let added = pr(4 * SIZE, SIZE);
    // The holder follows only the first pages of the region.
    let _a = m.subscribe(pr(added.start(), 4 * PAGE_SIZE), holder.clone());
    let _b = m.subscribe(pr(0, 16 * SIZE), refuser());
    holder.stuck.store(true, Ordering::SeqCst);
    match m.add_region(added, None, PageState::Shared) {
        Err(Error::RollbackFailed {
            cause, kept_shared, ..
        }) => {
            assert!(matches!(*cause, Error::ListenerRefused { .. }), "{cause}");
            assert_eq!(ranges(&kept_shared), [(added.start(), added.len())]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(m.state_of(added.start()), Some(PageState::Shared));
    assert_eq!(m.state_of(added.end() - PAGE_SIZE), Some(PageState::Shared));
}

/// Maps page by page and panics after the first page of a longer range, as a listener
/// that hits an `expect` between two map calls would.
#[derive(Default)]
struct PanicsPartWay {
    mapped: Mutex<Vec<u64>>,
}

impl MemoryListener for PanicsPartWay {
    fn discard(&self, range: PageRange) {
        self.mapped
            .lock()
            .unwrap()
            .retain(|p| *p < range.start() || *p >= range.end());
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.mapped.lock().unwrap().push(range.start());
        if range.page_count() > 1 {
            std::panic::resume_unwind(Box::new("the second map call failed".to_owned()));
        }
        Ok(())
    }
}

#[test]
fn a_listener_that_panics_part_way_through_populate_is_told_to_let_go() {
    let (m, _vm) = dual(SIZE, PageState::Private);
    let listener = Arc::new(PanicsPartWay::default());
    let _s = m.subscribe(pr(0, SIZE), listener.clone());
    assert!(matches!(
        m.convert(pr(0, 2 * PAGE_SIZE), PageState::Shared),
        Err(Error::ListenerRefused { .. })
    ));
    assert_eq!(m.state_of(0), Some(PageState::Private));
    assert!(
        listener.mapped.lock().unwrap().is_empty(),
        "a private page is still mapped"
    );
    // The same on a replay.
    let (m, _vm) = dual(SIZE, PageState::Private);
    m.convert(pr(0, 2 * PAGE_SIZE), PageState::Shared).unwrap();
    let listener = Arc::new(PanicsPartWay::default());
    assert!(m
        .subscribe_with_replay(pr(0, SIZE), listener.clone())
        .is_err());
    assert!(listener.mapped.lock().unwrap().is_empty());
}

/// Owns the subscription of a listener of its own (a composite device), and drops its
/// own subscription on its first `discard`.
struct Composite {
    own: Mutex<Option<vm_private_memory::Subscription>>,
    _part: vm_private_memory::Subscription,
}

impl MemoryListener for Composite {
    fn discard(&self, _: PageRange) {
        drop(self.own.lock().unwrap().take());
    }

    fn populate(&self, _: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

#[test]
fn a_listener_whose_last_clone_goes_during_a_conversion_does_not_stall_it() {
    let (m, _vm) = dual(SIZE, PageState::Shared);
    let m = Arc::new(m);
    let part = m.subscribe(pr(0, SIZE), Arc::new(Recorder::default()));
    let composite = Arc::new(Composite {
        own: Mutex::new(None),
        _part: part,
    });
    let own = m.subscribe(pr(0, SIZE), composite.clone());
    *composite.own.lock().unwrap() = Some(own);
    // Only the memory's list holds it now: the conversion drops its last clone, and
    // with it the part's subscription, while it runs.
    drop(composite);
    let (done, finished) = std::sync::mpsc::channel();
    let converting = Arc::clone(&m);
    std::thread::spawn(move || {
        let _ = done.send(
            converting
                .convert(pr(0, PAGE_SIZE), PageState::Private)
                .map(drop),
        );
    });
    let result = finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the conversion stalled: a subscription dropped during it waited for it");
    result.unwrap();
    assert_eq!(m.listener_count(), 0);
}
