// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The conversion engine on the real `/dev/kvm`: what changes, what listeners hear, and
//! that every failure leaves bits, KVM's view and listeners as they were.

mod common;

use std::sync::{Arc, Mutex};

use common::{dual, in_place, in_place_or_skip, pr, Heard, Recorder};
use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vm_private_memory::{
    ContentMode, Error, GuestMemoryPrivate, MemoryListener, PageState, PrivateMemoryManager,
};

const MIB2: u64 = 2 << 20;

fn states(m: &PrivateMemoryManager, size: u64) -> Vec<PageState> {
    (0..size / PAGE_SIZE)
        .map(|p| m.state_of(p * PAGE_SIZE).unwrap())
        .collect()
}

#[test]
fn converting_changes_only_pages_in_the_other_state_and_reports_them() {
    if !in_place_or_skip("converting_changes_only_pages_in_the_other_state_and_reports_them") {
        return;
    }
    let m = in_place(2 * MIB2, PageState::Private);
    assert_eq!(m.private_pages(), 1024);
    let r = m.convert(pr(0, MIB2), PageState::Shared).unwrap();
    assert_eq!(r.pages_changed, 512);
    assert_eq!(r.bytes_discarded, MIB2);
    assert_eq!((r.pages_changed, r.runs_changed), (MIB2 / PAGE_SIZE, 1));
    // Again: nothing to do.
    let again = m.convert(pr(0, MIB2), PageState::Shared).unwrap();
    assert_eq!(again.pages_changed, 0);
    assert_eq!((again.pages_changed, again.runs_changed), (0, 0));
    // A range that is half shared, half private changes only the private half.
    let r = m
        .convert(pr(MIB2 - 4 * PAGE_SIZE, 8 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(r.pages_changed, 4);
    assert_eq!((r.pages_changed, r.runs_changed), (4, 1));
    assert_eq!(m.private_pages(), 1024 - 516);
}

#[test]
fn content_is_discarded_on_conversion_unless_preserved() {
    if !in_place_or_skip("content_is_discarded_on_conversion_unless_preserved") {
        return;
    }
    let m = in_place(MIB2, PageState::Shared);
    let mem = m.guest_memory().memory();
    mem.write_obj(0xdead_beefu32, GuestAddress(0)).unwrap();
    mem.write_obj(0xcafe_f00du32, GuestAddress(PAGE_SIZE))
        .unwrap();
    let page0 = pr(0, PAGE_SIZE);
    let page1 = pr(PAGE_SIZE, PAGE_SIZE);
    m.convert(page0, PageState::Private).unwrap();
    m.convert(page0, PageState::Shared).unwrap();
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0)).unwrap(),
        0,
        "a fresh page"
    );
    let r = m
        .convert_with(page1, PageState::Private, ContentMode::Preserve)
        .unwrap();
    assert_eq!(r.bytes_discarded, 0);
    m.convert_with(page1, PageState::Shared, ContentMode::Preserve)
        .unwrap();
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(PAGE_SIZE)).unwrap(),
        0xcafe_f00d
    );
}

/// Regions sharing one file: a conversion of one page of the second region punches that
/// page at the region's offset in the file, and nothing else, with or without a failure
/// to roll back (nothing subscribed).
#[test]
fn a_conversion_punches_its_own_pages_in_a_file_shared_by_regions() {
    if !in_place_or_skip("a_conversion_punches_its_own_pages_in_a_file_shared_by_regions") {
        return;
    }
    let m = vm_private_memory::MemoryBuilder::new(common::vm())
        .region_at(0, MIB2)
        .region_at(4 * MIB2, MIB2)
        .strategy(vm_private_memory::Strategy::InPlace)
        .single_file(true)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let mem = m.guest_memory().memory();
    let second = 4 * MIB2;
    for base in [0, second] {
        for page in 0..8 {
            let at = GuestAddress(base + page * PAGE_SIZE);
            mem.write_obj(0x5a5a_0000u32 + page as u32, at).unwrap();
        }
    }
    let page = pr(second + 3 * PAGE_SIZE, PAGE_SIZE);
    // A held slice makes the first attempt fail: it is rolled back, content untouched.
    {
        let _held = mem.get_slice(GuestAddress(page.start()), 8).unwrap();
        let err = m.convert(page, PageState::Private).unwrap_err();
        assert!(matches!(err, Error::HostAccessInFlight { .. }), "{err}");
    }
    assert_eq!(m.state_of(page.start()), Some(PageState::Shared));
    let report = m.convert(page, PageState::Private).unwrap();
    assert_eq!(
        (report.pages_changed, report.bytes_discarded),
        (1, PAGE_SIZE)
    );
    m.convert(page, PageState::Shared).unwrap();
    for base in [0, second] {
        for p in 0..8 {
            let read = mem
                .read_obj::<u32>(GuestAddress(base + p * PAGE_SIZE))
                .unwrap();
            let expected = if base + p * PAGE_SIZE == page.start() {
                0
            } else {
                0x5a5a_0000 + p as u32
            };
            assert_eq!(read, expected, "page {p} of the region at {base:#x}");
        }
    }
}

#[test]
fn ranges_outside_guest_memory_are_refused() {
    if !in_place_or_skip("ranges_outside_guest_memory_are_refused") {
        return;
    }
    let m = vm_private_memory::MemoryBuilder::new(common::vm())
        .region_at(0, MIB2)
        .region_at(2 * MIB2, MIB2) // a hole at [2 MiB, 4 MiB)
        .build()
        .unwrap();
    for (range, outside) in [
        (pr(MIB2 - PAGE_SIZE, 2 * PAGE_SIZE), MIB2),
        (pr(0, 3 * MIB2), MIB2),
        (pr(3 * MIB2, PAGE_SIZE), 3 * MIB2),
        (pr(1 << 40, PAGE_SIZE), 1 << 40),
    ] {
        match m.convert(range, PageState::Shared) {
            Err(Error::OutsideGuestMemory { first_outside, .. }) => {
                assert_eq!(first_outside, outside, "{range}")
            }
            other => panic!("{range}: {other:?}"),
        }
        assert!(m.discard(range).is_err());
    }
    // Nothing changed on the way.
    assert_eq!(m.private_pages(), 1024);
}

#[test]
fn listeners_hear_clipped_ranges_in_order_while_access_is_still_allowed() {
    if !in_place_or_skip("listeners_hear_clipped_ranges_in_order_while_access_is_still_allowed") {
        return;
    }
    // A listener that, as a DMA user would, touches its range in every callback.
    struct Toucher {
        view: GuestMemoryAtomic<GuestMemoryPrivate>,
        log: Mutex<Vec<(Heard, bool)>>,
    }
    impl MemoryListener for Toucher {
        fn discard(&self, range: PageRange) {
            let ok = self
                .view
                .memory()
                .read_obj::<u8>(GuestAddress(range.start()))
                .is_ok();
            self.log.lock().unwrap().push((Heard::Discard(range), ok));
        }
        fn populate(
            &self,
            range: PageRange,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let ok = self
                .view
                .memory()
                .read_obj::<u8>(GuestAddress(range.start()))
                .is_ok();
            self.log.lock().unwrap().push((Heard::Populate(range), ok));
            Ok(())
        }
    }
    let m = in_place(2 * MIB2, PageState::Private);
    let toucher = Arc::new(Toucher {
        view: m.guest_memory(),
        log: Mutex::new(Vec::new()),
    });
    let other = Arc::new(Recorder::default());
    let _a = m.subscribe(pr(PAGE_SIZE, 3 * PAGE_SIZE), toucher.clone());
    let b = m.subscribe(pr(0, 2 * MIB2), other.clone());

    m.convert(pr(0, 8 * PAGE_SIZE), PageState::Shared).unwrap();
    m.convert(pr(2 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert_eq!(
        *toucher.log.lock().unwrap(),
        vec![
            (Heard::Populate(pr(PAGE_SIZE, 3 * PAGE_SIZE)), true),
            (Heard::Discard(pr(2 * PAGE_SIZE, PAGE_SIZE)), true),
        ],
        "populate after access is granted, discard before it is revoked"
    );
    assert_eq!(
        *other.heard.lock().unwrap(),
        vec![
            Heard::Populate(pr(0, 8 * PAGE_SIZE)),
            Heard::Discard(pr(2 * PAGE_SIZE, PAGE_SIZE))
        ]
    );
    // Unsubscribed: hears nothing more.
    drop(b);
    assert_eq!(m.listener_count(), 1);
    m.convert(pr(0, PAGE_SIZE), PageState::Private).unwrap();
    assert_eq!(other.heard.lock().unwrap().len(), 2);
}

#[test]
fn a_listener_that_converts_gets_an_error() {
    if !in_place_or_skip("a_listener_that_converts_gets_an_error") {
        return;
    }
    struct Converter {
        memory: Mutex<Option<Arc<PrivateMemoryManager>>>,
        result: Mutex<Option<String>>,
    }
    impl MemoryListener for Converter {
        fn discard(&self, _: PageRange) {}
        fn populate(
            &self,
            range: PageRange,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            let memory = self.memory.lock().unwrap().clone().unwrap();
            let r = memory.convert(range, PageState::Private).map(drop);
            let d = memory.discard(range).map(drop);
            let reentrant = |x: &Result<(), Error>| matches!(x, Err(Error::Reentrant { .. }));
            *self.result.lock().unwrap() = Some(format!("{} {}", reentrant(&r), reentrant(&d)));
            Ok(())
        }
    }
    let m = Arc::new(in_place(MIB2, PageState::Private));
    let converter = Arc::new(Converter {
        memory: Mutex::new(Some(m.clone())),
        result: Mutex::new(None),
    });
    let _s = m.subscribe(pr(0, MIB2), converter.clone());
    m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap();
    let result = converter.result.lock().unwrap().clone().unwrap();
    assert_eq!(result, "true true");
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    converter.memory.lock().unwrap().take(); // break the cycle
}

#[test]
fn a_refusing_listener_rolls_the_conversion_back() {
    if !in_place_or_skip("a_refusing_listener_rolls_the_conversion_back") {
        return;
    }
    let (m, view) = dual(MIB2, PageState::Private);
    let accepting = Arc::new(Recorder::default());
    let refusing = Arc::new(Recorder::default());
    *refusing.refuse.lock().unwrap() = true;
    let _a = m.subscribe(pr(0, MIB2), accepting.clone());
    let _r = m.subscribe(pr(PAGE_SIZE, PAGE_SIZE), refusing.clone());
    let before = states(&m, MIB2);
    view.calls.lock().unwrap().clear();

    let err = m
        .convert(pr(0, 4 * PAGE_SIZE), PageState::Shared)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ListenerRefused {
                reason: vm_private_memory::ListenerRefusal::Refused(_),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("[0x1000, 0x2000)"), "{err}");
    assert!(err.to_string().contains("test refuses"), "{err}");
    assert_eq!(states(&m, MIB2), before);
    // KVM's view went shared and came back private.
    assert_eq!(
        *view.calls.lock().unwrap(),
        vec![
            (pr(0, 4 * PAGE_SIZE), PageState::Shared),
            (pr(0, 4 * PAGE_SIZE), PageState::Private)
        ]
    );
    // The listener that had accepted got its range taken back.
    assert_eq!(
        *accepting.heard.lock().unwrap(),
        vec![
            Heard::Populate(pr(0, 4 * PAGE_SIZE)),
            Heard::Discard(pr(0, 4 * PAGE_SIZE))
        ]
    );
}

/// How a test makes a conversion fail, each through what a real conversion can meet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    /// `KVM_SET_MEMORY_ATTRIBUTES` fails (dual; the VM stand-in refuses it).
    KvmAttributes,
    /// A listener refuses to populate (conversion to shared).
    ListenerRefuses,
    /// Punching fails, on any file (`EIO`).
    Punch,
    /// Punching the guest_memfd fails (`EIO`); the shared side's file still works.
    PunchGuestMemfd,
    /// A host access (a slice still held) keeps touching a page going private.
    HostAccessHeld,
}

/// Each step of both directions, on both strategies, that can fail, made to fail: bits,
/// KVM's view and the listeners' view end as they began, and every step that had run is
/// undone. In-place, both ways a conversion runs are covered: one run (every page of the
/// range in the other state) and a range with a page already in the target state (two
/// runs, through the plan). The conversion's steps, in order, and where each is undone from:
/// - to private: listeners hear `discard` and the bits change (neither can fail: both are
///   undone by the failures after them), host accesses in flight are waited for, KVM's
///   attributes (dual), the punch;
/// - to shared: the punch (in-place, first) or the shared side's clearing (dual, first),
///   KVM's attributes (dual), the bits (cannot fail), listeners' `populate`, the
///   guest_memfd's punch (dual, last).
#[test]
fn a_failure_at_any_step_leaves_everything_as_it_was() {
    if !in_place_or_skip("a_failure_at_any_step_leaves_everything_as_it_was") {
        return;
    }
    let range = pr(4 * PAGE_SIZE, 8 * PAGE_SIZE);
    for (dual_strategy, fragmented) in [(false, false), (false, true), (true, false)] {
        for to in [PageState::Private, PageState::Shared] {
            for failure in [
                Failure::KvmAttributes,
                Failure::ListenerRefuses,
                Failure::Punch,
                Failure::PunchGuestMemfd,
                Failure::HostAccessHeld,
            ] {
                let applies = match failure {
                    Failure::KvmAttributes => dual_strategy,
                    Failure::ListenerRefuses => to == PageState::Shared,
                    Failure::Punch => true,
                    // Dual, to shared, the guest_memfd is punched last, after the shared
                    // side was cleared (elsewhere it is the only file punched).
                    Failure::PunchGuestMemfd => dual_strategy && to == PageState::Shared,
                    Failure::HostAccessHeld => to == PageState::Private,
                };
                if !applies {
                    continue;
                }
                let what = format!(
                    "dual={dual_strategy} fragmented={fragmented} to={to} failure={failure:?}"
                );
                let initial = to.flipped();
                let (m, view) = if dual_strategy {
                    let (m, v) = dual(MIB2, initial);
                    (m, Some(v))
                } else {
                    (in_place(MIB2, initial), None)
                };
                // A page in the middle already in the target state splits the range in two.
                let runs = if fragmented {
                    let middle = range.start() + 3 * PAGE_SIZE;
                    m.convert(pr(middle, PAGE_SIZE), to).unwrap();
                    vec![
                        pr(range.start(), 3 * PAGE_SIZE),
                        pr(middle + PAGE_SIZE, 4 * PAGE_SIZE),
                    ]
                } else {
                    vec![range]
                };
                let listener = Arc::new(Recorder::default());
                let _s = m.subscribe(pr(0, MIB2), listener.clone());
                let refusing = Arc::new(Recorder::default());
                *refusing.refuse.lock().unwrap() = failure == Failure::ListenerRefuses;
                let _r = m.subscribe(pr(0, MIB2), refusing.clone());
                let before = states(&m, MIB2);
                if let Some(v) = &view {
                    v.calls.lock().unwrap().clear();
                    *v.fail.lock().unwrap() = failure == Failure::KvmAttributes;
                }

                let result = match failure {
                    Failure::Punch => common::with_failing_punch(None, || m.convert(range, to)),
                    Failure::PunchGuestMemfd => {
                        let fd = view.as_ref().unwrap().guest_memfds.lock().unwrap()[0];
                        common::with_failing_punch(Some(fd), || m.convert(range, to))
                    }
                    Failure::HostAccessHeld => {
                        let view = m.guest_memory();
                        let mem = view.memory();
                        let _held = mem.get_slice(GuestAddress(range.start()), 8).unwrap();
                        m.convert(range, to)
                    }
                    _ => m.convert(range, to),
                };
                match (&result, failure) {
                    (Err(Error::SetAttributes { .. }), Failure::KvmAttributes)
                    | (Err(Error::ListenerRefused { .. }), Failure::ListenerRefuses)
                    | (Err(Error::HostAccessInFlight { .. }), Failure::HostAccessHeld) => {}
                    (
                        Err(e @ Error::Punch { range: punched, .. }),
                        Failure::Punch | Failure::PunchGuestMemfd,
                    ) => {
                        assert_eq!(e.errno(), Some(libc::EIO), "{what}: {e}");
                        // Named by its guest range, inside the conversion's.
                        assert!(
                            punched.start >= range.start()
                                && punched.start + punched.len <= range.end(),
                            "{what}: {e}"
                        );
                        assert!(
                            e.to_string().contains("punching guest range"),
                            "{what}: {e}"
                        );
                    }
                    _ => panic!("{what}: {result:?}"),
                }
                assert_eq!(states(&m, MIB2), before, "{what}: bits");
                if let Some(v) = &view {
                    let calls = v.calls.lock().unwrap();
                    let net: i64 = calls
                        .iter()
                        .map(|(_, s)| if *s == to { 1 } else { -1 })
                        .sum();
                    assert_eq!(net, 0, "{what}: KVM's view {calls:?}");
                    // A refusal or a failed punch comes after KVM's view changed (except
                    // the shared side's clearing, first when going shared): it was changed
                    // back.
                    let kvm_changed = !matches!(
                        (to, failure),
                        (_, Failure::KvmAttributes | Failure::HostAccessHeld)
                            | (PageState::Shared, Failure::Punch)
                    );
                    assert_eq!(
                        calls.len(),
                        if kvm_changed { 2 } else { 0 },
                        "{what}: {calls:?}"
                    );
                }
                let heard = listener.heard.lock().unwrap().clone();
                let discards = heard
                    .iter()
                    .filter(|h| matches!(h, Heard::Discard(_)))
                    .count();
                assert_eq!(
                    discards,
                    heard.len() - discards,
                    "{what}: listeners {heard:?}"
                );
                // To private, listeners heard `discard` before any step could fail, and
                // got the range back; to shared, they were told only after KVM's view and
                // the bits changed, and had it taken back.
                let told = |heard: fn(PageRange) -> Heard| runs.iter().map(move |r| heard(*r));
                let expected: Vec<Heard> = match (to, failure) {
                    (PageState::Private, _) => {
                        told(Heard::Discard).chain(told(Heard::Populate)).collect()
                    }
                    // The first run is offered to every listener in subscription order:
                    // the refusing one (subscribed second) stops the pass there.
                    (PageState::Shared, Failure::ListenerRefuses) => {
                        vec![Heard::Populate(runs[0]), Heard::Discard(runs[0])]
                    }
                    (PageState::Shared, Failure::PunchGuestMemfd) => told(Heard::Populate)
                        .chain(told(Heard::Discard).rev())
                        .collect(),
                    (PageState::Shared, _) => vec![],
                };
                assert_eq!(heard, expected, "{what}");

                // And once the failure is gone, the same conversion goes through.
                *refusing.refuse.lock().unwrap() = false;
                if let Some(v) = &view {
                    *v.fail.lock().unwrap() = false;
                }
                let pages = if fragmented { 7 } else { 8 };
                assert_eq!(m.convert(range, to).unwrap().pages_changed, pages, "{what}");
            }
        }
    }
}

#[test]
fn dual_frees_the_shared_side_when_pages_go_private() {
    let (m, view) = dual(MIB2, PageState::Shared);
    let mem = m.guest_memory().memory();
    mem.write_slice(&vec![0x5a; MIB2 as usize], GuestAddress(0))
        .unwrap();
    assert_eq!(
        common::shared_side_bytes(&m),
        MIB2,
        "written pages are held"
    );
    let r = m.convert(pr(0, MIB2 / 2), PageState::Private).unwrap();
    assert_eq!(r.bytes_discarded, MIB2 / 2);
    assert_eq!(
        common::shared_side_bytes(&m),
        MIB2 / 2,
        "the private half is freed"
    );
    assert_eq!(
        view.calls.lock().unwrap().last(),
        Some(&(pr(0, MIB2 / 2), PageState::Private))
    );
    // Preserving content across sides is impossible with two files.
    assert!(matches!(
        m.convert_with(pr(0, PAGE_SIZE), PageState::Shared, ContentMode::Preserve),
        Err(Error::StrategyUnavailable {
            reason: vm_private_memory::UnavailableReason::PreserveNeedsInPlace,
            ..
        })
    ));
    // Back to shared: the page is fresh.
    m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
}

#[test]
fn discard_frees_pages_tells_listeners_and_keeps_states() {
    if !in_place_or_skip("discard_frees_pages_tells_listeners_and_keeps_states") {
        return;
    }
    let m = in_place(MIB2, PageState::Shared);
    let listener = Arc::new(Recorder::default());
    let _s = m.subscribe(pr(0, MIB2), listener.clone());
    let mem = m.guest_memory().memory();
    mem.write_obj(0x77u64, GuestAddress(PAGE_SIZE)).unwrap();
    m.convert(pr(3 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    let before = states(&m, MIB2);
    let bytes = m.discard(pr(0, 4 * PAGE_SIZE)).unwrap();
    assert_eq!(bytes, 4 * PAGE_SIZE);
    assert_eq!(states(&m, MIB2), before);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(PAGE_SIZE)).unwrap(), 0);
    assert_eq!(
        listener.heard.lock().unwrap().last(),
        Some(&Heard::Discard(pr(0, 4 * PAGE_SIZE)))
    );
}
