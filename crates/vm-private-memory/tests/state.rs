// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Saving and restoring the layout and the private/shared map.

mod common;

use common::{in_place_or_skip, pr, vm};
use guest_memfd::PAGE_SIZE;
use proptest::prelude::*;
use std::sync::Arc;

use common::{Heard, Recorder};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{
    ContentMode, Error, MemoryBuilder, MemoryState, PageRun, PageState, PrivateMemoryManager,
    PrivatePages, SharedContent, StateError, Strategy, Subscription,
};

const MIB2: u64 = 2 << 20;

fn source() -> PrivateMemoryManager {
    let m = MemoryBuilder::new(vm())
        .region_at(0, MIB2)
        .region_at(4 << 30, MIB2)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    m.convert(pr(PAGE_SIZE, 3 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    m.convert(pr(4 << 30, MIB2), PageState::Shared).unwrap();
    m.convert(pr((4 << 30) + 8 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    m
}

fn states(m: &PrivateMemoryManager) -> Vec<PageState> {
    m.regions()
        .iter()
        .flat_map(|r| (0..r.page_count()).map(move |p| r.start() + p * PAGE_SIZE))
        .map(|a| m.state_of(a).unwrap())
        .collect()
}

#[test]
fn state_round_trips_through_json_into_fresh_memory() {
    if !in_place_or_skip("state_round_trips_through_json_into_fresh_memory") {
        return;
    }
    let m = source();
    let state = m.state();
    assert_eq!(
        state.regions[0].private,
        PrivatePages::Runs(vec![
            PageRun { first: 0, count: 1 },
            PageRun {
                first: 4,
                count: 508
            }
        ])
    );
    assert_eq!(
        state.regions[1].private,
        PrivatePages::Runs(vec![PageRun { first: 8, count: 1 }])
    );
    let json = serde_json::to_string(&state).unwrap();
    let back: MemoryState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let fresh = back.builder(vm()).build().unwrap();
    assert_ne!(states(&fresh), states(&m));
    fresh.restore_state(&back).unwrap();
    assert_eq!(states(&fresh), states(&m));
    // The same layout and map; another memory, over other files.
    let again = fresh.state();
    for (a, b) in again.regions.iter().zip(&state.regions) {
        assert_eq!(
            (a.guest, a.gmem_offset, a.gmem_size),
            (b.guest, b.gmem_offset, b.gmem_size)
        );
        assert_eq!(a.private, b.private);
        assert_ne!(a.gmem_file, b.gmem_file);
    }
}

#[test]
fn corrupted_or_mismatched_states_are_errors() {
    if !in_place_or_skip("corrupted_or_mismatched_states_are_errors") {
        return;
    }
    let m = source();
    let good = m.state();
    let before = states(&m);
    /// A damaged state, and what its refusal must say.
    type Case = (MemoryState, fn(&StateError) -> bool);
    let mut cases: Vec<Case> = Vec::new();
    let mut s = good.clone();
    s.version = 99;
    cases.push((s, |e| {
        matches!(
            e,
            StateError::Version {
                found: 99,
                supported: vm_private_memory::STATE_VERSION
            }
        )
    }));
    let mut s = good.clone();
    s.checksum ^= 1;
    cases.push((s, |e| matches!(e, StateError::Checksum { .. })));
    let mut s = good.clone();
    s.strategy = match s.strategy {
        vm_private_memory::Strategy::InPlace => vm_private_memory::Strategy::Dual,
        _ => vm_private_memory::Strategy::InPlace,
    };
    cases.push((s, |e| matches!(e, StateError::Strategy { .. })));
    let mut s = good.clone();
    s.regions.pop();
    cases.push((s, |e| {
        matches!(
            e,
            StateError::RegionCount {
                saved: 1,
                actual: 2
            }
        )
    }));
    let mut s = good.clone();
    s.regions[1].gmem_size *= 2;
    cases.push((s, |e| matches!(e, StateError::Region { index: 1, .. })));
    let mut s = good.clone();
    s.regions[1].guest = pr(8 << 30, MIB2);
    cases.push((s, |e| matches!(e, StateError::Region { index: 1, .. })));
    // Overlapping, past the region, overflowing, empty.
    for runs in [
        vec![(4, 2), (5, 1)],
        vec![(500, 100)],
        vec![(u64::MAX, 2)],
        vec![(3, 0)],
    ] {
        let mut s = good.clone();
        s.regions[0].private = PrivatePages::Runs(
            runs.iter()
                .map(|&(first, count)| PageRun { first, count })
                .collect(),
        );
        cases.push((s, |e| matches!(e, StateError::BadRun { .. })));
    }
    let mut s = good.clone();
    s.regions[0].private = PrivatePages::Bitmap(vec![0xff; 63]);
    cases.push((s, |e| {
        matches!(
            e,
            StateError::BitmapLength {
                len: 63,
                expected: 64,
                ..
            }
        )
    }));
    let mut s = good.clone();
    s.regions[1].guest = pr(4 << 30, MIB2 - PAGE_SIZE);
    s.regions[1].private = PrivatePages::Bitmap(vec![0xff; 64]);
    cases.push((s, |e| {
        matches!(e, StateError::BitmapPadding { pages: 511, .. })
    }));
    for (i, (mut state, expected)) in cases.into_iter().enumerate() {
        if i > 1 {
            // The first two cases are about the version and the checksum; the others
            // are edited by hand on purpose and carry a matching checksum.
            state.update_checksum();
        }
        match m.restore_state(&state) {
            Err(Error::StateMismatch(why)) => assert!(expected(&why), "case {i}: {why}"),
            other => panic!("case {i}: {other:?}"),
        }
        assert_eq!(states(&m), before, "case {i}: nothing changed");
    }
    // Malformed documents do not even deserialize.
    let json = serde_json::to_string(&good).unwrap();
    for bad in [
        json.replacen("\"start\":0", "\"start\":1", 1),
        json.replacen("\"len\":2097152", "\"len\":0", 1),
        json.replacen("in-place", "sideways", 1),
        "{}".to_string(),
        "[1,2,3]".to_string(),
    ] {
        assert!(serde_json::from_str::<MemoryState>(&bad).is_err(), "{bad}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Arbitrary runs never panic: they restore exactly, or are refused and change nothing.
    #[test]
    fn arbitrary_runs_restore_or_are_refused(runs in proptest::collection::vec((0u64..600, 0u64..80), 0..6)) {
        if !in_place_or_skip("arbitrary_runs_restore_or_are_refused") {
            return Ok(());
        }
        let m = MemoryBuilder::new(vm()).region_at(0, MIB2).build().unwrap();
        let mut state = m.state();
        state.regions[0].private = PrivatePages::Runs(runs.iter().map(|&(first, count)| PageRun { first, count }).collect());
        state.update_checksum();
        let before = states(&m);
        match m.restore_state(&state) {
            Ok(()) => {
                let expected: Vec<PageState> = (0..512u64)
                    .map(|p| {
                        if runs.iter().any(|&(first, count)| p >= first && p < first + count) {
                            PageState::Private
                        } else {
                            PageState::Shared
                        }
                    })
                    .collect();
                prop_assert_eq!(states(&m), expected);
            }
            Err(_) => prop_assert_eq!(states(&m), before),
        }
    }
}

/// Two 2 MiB in-place regions, all private, with a listener on each; the second refuses
/// `populate` while its `refuse` is set.
fn two_regions_with_listeners() -> (PrivateMemoryManager, Vec<Arc<Recorder>>, Vec<Subscription>) {
    let m = MemoryBuilder::new(vm())
        .region_at(0, MIB2)
        .region_at(4 << 30, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    let recorders = vec![Arc::new(Recorder::default()), Arc::new(Recorder::default())];
    let subscriptions = m
        .regions()
        .into_iter()
        .zip(&recorders)
        .map(|(range, r)| m.subscribe(range, r.clone()))
        .collect();
    (m, recorders, subscriptions)
}

fn runs(list: &[(u64, u64)]) -> PrivatePages {
    PrivatePages::Runs(
        list.iter()
            .map(|&(first, count)| PageRun { first, count })
            .collect(),
    )
}

#[test]
fn a_restore_refused_on_a_later_region_changes_no_region() {
    if !in_place_or_skip("a_restore_refused_on_a_later_region_changes_no_region") {
        return;
    }
    let (m, recorders, _subscriptions) = two_regions_with_listeners();
    m.convert(pr(8 * PAGE_SIZE, 4 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    let before = states(&m);
    recorders[0].heard.lock().unwrap().clear();
    // Region 0: pages 0-3 become shared and 8-11 private; region 1: pages 0-3 shared,
    // which its listener refuses.
    let mut target = m.state();
    target.regions[0].private = runs(&[(4, 508)]);
    target.regions[1].private = runs(&[(4, 508)]);
    target.update_checksum();
    *recorders[1].refuse.lock().unwrap() = true;
    let err = m.restore_state(&target).unwrap_err();
    assert!(matches!(err, Error::ListenerRefused { .. }), "{err}");
    assert_eq!(states(&m), before, "no region changed");
    // Region 0's listener got back what it had: 8-11 were taken and given back, 0-3
    // offered and taken back.
    assert_eq!(
        *recorders[0].heard.lock().unwrap(),
        vec![
            Heard::Discard(pr(8 * PAGE_SIZE, 4 * PAGE_SIZE)),
            Heard::Populate(pr(0, 4 * PAGE_SIZE)),
            Heard::Discard(pr(0, 4 * PAGE_SIZE)),
            Heard::Populate(pr(8 * PAGE_SIZE, 4 * PAGE_SIZE)),
        ]
    );
    // Accepted, the same state applies whole.
    *recorders[1].refuse.lock().unwrap() = false;
    m.restore_state(&target).unwrap();
    let state = m.state();
    assert_eq!(state.regions[0].private, runs(&[(4, 508)]));
    assert_eq!(state.regions[1].private, runs(&[(4, 508)]));
}

/// In-place memory whose page 1 is private and holds `SECRET`, and a state saved when
/// that page was shared.
fn a_secret_hidden_after_a_save() -> (PrivateMemoryManager, MemoryState) {
    a_secret_hidden_after_a_save_on(vm())
}

fn a_secret_hidden_after_a_save_on(
    vm: Arc<dyn guest_memfd::VmMemoryOps>,
) -> (PrivateMemoryManager, MemoryState) {
    let m = MemoryBuilder::new(vm)
        .region_at(0, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    let page = pr(PAGE_SIZE, PAGE_SIZE);
    m.convert(page, PageState::Shared).unwrap();
    let saved = m.state();
    m.guest_memory()
        .memory()
        .write_obj(SECRET, GuestAddress(PAGE_SIZE))
        .unwrap();
    m.convert_with(page, PageState::Private, ContentMode::Preserve)
        .unwrap();
    (m, saved)
}

const SECRET: u64 = 0x5ec2_e75e_c2e7_5ec2;

#[test]
fn a_restore_onto_live_memory_does_not_reveal_private_content() {
    if !in_place_or_skip("a_restore_onto_live_memory_does_not_reveal_private_content") {
        return;
    }
    let (m, saved) = a_secret_hidden_after_a_save();
    m.restore_state(&saved).unwrap();
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Shared));
    let seen: u64 = m
        .guest_memory()
        .memory()
        .read_obj(GuestAddress(PAGE_SIZE))
        .unwrap();
    assert_eq!(seen, 0, "the page became shared empty");
}

/// `SharedContent::Keep` with a state of the same memory, taken before the guest hid a
/// secret in a page the state has shared: refused, nothing changes.
#[test]
fn keeping_content_with_a_stale_state_of_the_same_memory_is_refused() {
    if !in_place_or_skip("keeping_content_with_a_stale_state_of_the_same_memory_is_refused") {
        return;
    }
    let (m, saved) = a_secret_hidden_after_a_save();
    let err = m
        .restore_state_with(&saved, SharedContent::Keep)
        .expect_err("the state is stale");
    assert!(
        matches!(
            err,
            Error::StateMismatch(StateError::KeepAfterConversions { region })
                if region == pr(0, MIB2)
        ),
        "{err}"
    );
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Private));
    // A state that changes nothing about shared pages is fine.
    m.restore_state_with(&m.state(), SharedContent::Keep)
        .unwrap();
}

/// The same stale state carried over to another memory with the file (as a live update
/// would) is refused too: the file's pages changed state after it was taken.
#[test]
fn keeping_content_with_a_stale_state_moved_to_another_memory_is_refused() {
    if !in_place_or_skip("keeping_content_with_a_stale_state_moved_to_another_memory_is_refused") {
        return;
    }
    let vm = vm();
    let (old, saved) = a_secret_hidden_after_a_save_on(vm.clone());
    let (range, file, offset) = old.remove_region(0).unwrap();
    drop(old);
    let new = MemoryBuilder::new(vm)
        .region_at(64 * MIB2, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    new.add_region(range, Some((file, offset)), PageState::Private)
        .unwrap();
    new.remove_region(64 * MIB2).unwrap();
    let err = new
        .restore_state_with(&saved, SharedContent::Keep)
        .expect_err("the file's pages changed after the save");
    assert!(
        matches!(
            err,
            Error::StateMismatch(StateError::KeepAfterConversions { .. })
        ),
        "{err}"
    );
    assert_eq!(new.private_pages(), MIB2 / PAGE_SIZE);
}

/// `SharedContent::Keep` with a state of another memory (other files): refused.
#[test]
fn keeping_content_with_a_state_of_other_files_is_refused() {
    if !in_place_or_skip("keeping_content_with_a_state_of_other_files_is_refused") {
        return;
    }
    let (other, _) = a_secret_hidden_after_a_save();
    let mut saved = other.state();
    saved.regions[0].private = runs(&[(2, 510)]);
    saved.update_checksum();
    let m = common::in_place(MIB2, PageState::Private);
    let err = m
        .restore_state_with(&saved, SharedContent::Keep)
        .expect_err("another memory's files");
    assert!(
        matches!(
            err,
            Error::StateMismatch(StateError::KeepOverAnotherFile { index: 0, .. })
        ),
        "{err}"
    );
    assert_eq!(m.private_pages(), MIB2 / PAGE_SIZE);
}

/// A live update: a new memory built over the old one's guest_memfd file takes the old
/// memory's last state, keeping the shared pages' content (virtio rings and buffers).
#[test]
fn a_live_update_over_the_same_files_keeps_shared_content() {
    if !in_place_or_skip("a_live_update_over_the_same_files_keeps_shared_content") {
        return;
    }
    let vm = vm();
    let old = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    old.convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    old.guest_memory()
        .memory()
        .write_obj(SECRET, GuestAddress(PAGE_SIZE))
        .unwrap();
    let saved = old.state();
    // The old process hands its file over and goes.
    let (range, file, offset) = old.remove_region(0).unwrap();
    drop(old);
    let new = MemoryBuilder::new(vm)
        .region_at(64 * MIB2, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    new.add_region(range, Some((file, offset)), PageState::Shared)
        .unwrap();
    new.remove_region(64 * MIB2).unwrap();
    new.restore_state_with(&saved, SharedContent::Keep).unwrap();
    let seen: u64 = new
        .guest_memory()
        .memory()
        .read_obj(GuestAddress(PAGE_SIZE))
        .unwrap();
    assert_eq!(seen, SECRET);
    assert_eq!(new.private_pages(), MIB2 / PAGE_SIZE - 1);
}

#[test]
fn pages_a_restore_makes_private_keep_their_content() {
    if !in_place_or_skip("pages_a_restore_makes_private_keep_their_content") {
        return;
    }
    // A snapshot restored into fresh memory: built shared, content written, map applied.
    let m = common::in_place(MIB2, PageState::Shared);
    m.guest_memory()
        .memory()
        .write_obj(SECRET, GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    let mut target = m.state();
    target.regions[0].private = runs(&[(2, 4)]);
    target.update_checksum();
    m.restore_state(&target).unwrap();
    assert_eq!(m.state_of(3 * PAGE_SIZE), Some(PageState::Private));
    m.convert_with(
        pr(3 * PAGE_SIZE, PAGE_SIZE),
        PageState::Shared,
        ContentMode::Preserve,
    )
    .unwrap();
    let seen: u64 = m
        .guest_memory()
        .memory()
        .read_obj(GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    assert_eq!(seen, SECRET);
}

#[test]
fn keeping_shared_content_is_refused_by_the_dual_strategy() {
    let (m, _view) = common::dual(MIB2, PageState::Private);
    let before = states(&m);
    let err = m
        .restore_state_with(&m.state(), SharedContent::Keep)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::StrategyUnavailable {
                reason: vm_private_memory::UnavailableReason::PreserveNeedsInPlace,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(states(&m), before);
}

/// A file re-added private lets the guest write private pages at once: a state taken
/// before that keeps no content.
#[test]
fn keeping_content_after_a_file_was_re_added_private_is_refused() {
    if !in_place_or_skip("keeping_content_after_a_file_was_re_added_private_is_refused") {
        return;
    }
    let m = common::in_place(MIB2, PageState::Shared);
    let saved = m.state();
    let (range, file, offset) = m.remove_region(0).unwrap();
    m.add_region(range, Some((file, offset)), PageState::Private)
        .unwrap();
    let err = m
        .restore_state_with(&saved, SharedContent::Keep)
        .expect_err("the guest may have written private pages since");
    assert!(
        matches!(
            err,
            Error::StateMismatch(StateError::KeepAfterConversions { .. })
        ),
        "{err}"
    );
    assert_eq!(m.private_pages(), MIB2 / PAGE_SIZE);
}

/// A restore that keeps content and is rolled back whole (a listener refused) changed
/// nothing: the same state may be tried again.
#[test]
fn a_rolled_back_restore_that_keeps_content_can_be_tried_again() {
    if !in_place_or_skip("a_rolled_back_restore_that_keeps_content_can_be_tried_again") {
        return;
    }
    let m = common::in_place(MIB2, PageState::Private);
    let mut target = m.state();
    target.regions[0].private = runs(&[(4, 508)]);
    target.update_checksum();
    let recorder = Arc::new(Recorder::default());
    *recorder.refuse.lock().unwrap() = true;
    let subscription = m.subscribe(pr(0, MIB2), recorder.clone());
    assert!(matches!(
        m.restore_state_with(&target, SharedContent::Keep),
        Err(Error::ListenerRefused { .. })
    ));
    assert_eq!(m.private_pages(), MIB2 / PAGE_SIZE);
    drop(subscription);
    m.restore_state_with(&target, SharedContent::Keep).unwrap();
    assert_eq!(m.private_pages(), 508);
}

/// A refused addition over a file changes nothing, not even what a saved state of that
/// file allows: a restore that keeps content still takes it.
#[test]
fn a_refused_addition_does_not_stale_a_saved_state() {
    if !in_place_or_skip("a_refused_addition_does_not_stale_a_saved_state") {
        return;
    }
    let vm = vm();
    let m = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let flags = guest_memfd::GuestMemfdFlags::MMAP | guest_memfd::GuestMemfdFlags::INIT_SHARED;
    let file = guest_memfd::GuestMemfd::create(&*vm, MIB2, flags).unwrap();
    m.add_region(
        pr(64 * MIB2, MIB2),
        Some((file.clone(), 0)),
        PageState::Shared,
    )
    .unwrap();
    let saved = m.state();
    // The same bytes again, private: refused.
    assert!(m
        .add_region(pr(128 * MIB2, MIB2), Some((file, 0)), PageState::Private)
        .is_err());
    m.restore_state_with(&saved, SharedContent::Keep).unwrap();
}

/// A listener that saves the memory's state while it is offered pages (the map is then
/// half-way through a change).
struct SavesStateWhenOffered {
    memory: std::sync::Mutex<Option<Arc<PrivateMemoryManager>>>,
    saved: std::sync::Mutex<Option<MemoryState>>,
}

impl vm_private_memory::MemoryListener for SavesStateWhenOffered {
    fn discard(&self, _: guest_memfd::PageRange) {}

    fn populate(
        &self,
        _: guest_memfd::PageRange,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let memory = self.memory.lock().unwrap().clone().unwrap();
        *self.saved.lock().unwrap() = Some(memory.state());
        Ok(())
    }
}

/// A state taken inside a callback, of a change then rolled back whole, is never taken
/// by a restore that keeps content: the page it shows shared went back to private and
/// may hold the guest's secrets since.
#[test]
fn a_state_taken_inside_a_callback_is_never_kept() {
    if !in_place_or_skip("a_state_taken_inside_a_callback_is_never_kept") {
        return;
    }
    let m = Arc::new(common::in_place(MIB2, PageState::Private));
    let saver = Arc::new(SavesStateWhenOffered {
        memory: std::sync::Mutex::new(Some(Arc::clone(&m))),
        saved: std::sync::Mutex::new(None),
    });
    let refuser = Arc::new(Recorder::default());
    *refuser.refuse.lock().unwrap() = true;
    let _first = m.subscribe(pr(0, MIB2), saver.clone());
    let _second = m.subscribe(pr(0, MIB2), refuser);
    assert!(m
        .convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .is_err());
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Private));
    let saved = saver
        .saved
        .lock()
        .unwrap()
        .take()
        .expect("the saver was offered the page");
    saver.memory.lock().unwrap().take();
    assert!(matches!(
        m.restore_state_with(&saved, SharedContent::Keep),
        Err(Error::StateMismatch(
            StateError::KeepAfterConversions { .. }
        ))
    ));
    assert_eq!(m.state_of(PAGE_SIZE), Some(PageState::Private));
}
