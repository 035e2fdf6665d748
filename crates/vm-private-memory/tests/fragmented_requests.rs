// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A guest that fragments its memory cannot make one request cost the host much: its
//! requests are served in steps of bounded size under the conversion lock (real
//! `/dev/kvm`).

mod common;

use std::sync::Arc;

use common::{in_place, in_place_or_skip, pr, Heard, Recorder};
use guest_memfd::PAGE_SIZE;
use vm_private_memory::{
    ConversionRequest, Error, PageState, GUEST_BYTES_PER_STEP, GUEST_RUNS_PER_STEP,
};

#[test]
fn an_alternating_range_is_served_in_steps_of_bounded_runs() {
    if !in_place_or_skip("an_alternating_range_is_served_in_steps_of_bounded_runs") {
        return;
    }
    let pages = 4 * GUEST_RUNS_PER_STEP + 10;
    let size = (2 * pages * PAGE_SIZE).next_multiple_of(2 << 20);
    let m = in_place(size, PageState::Shared);
    for page in 0..pages {
        m.convert(pr(2 * page * PAGE_SIZE, PAGE_SIZE), PageState::Private)
            .unwrap();
    }
    let recorder = Arc::new(Recorder::default());
    let _sub = m.subscribe(pr(0, size), recorder.clone());
    // The guest asks for all of it to become shared: `pages` runs change.
    let request = ConversionRequest::from_map_gpa_range(0, size / PAGE_SIZE, 0).unwrap();
    let report = m.serve_request(request).unwrap();
    assert_eq!(report.runs_changed, pages);
    assert_eq!(report.pages_changed, pages);
    assert_eq!(report.lock_holds, pages.div_ceil(GUEST_RUNS_PER_STEP));
    assert_eq!(m.private_pages(), 0);
    // Listeners heard every run, once, in order.
    let heard = recorder.heard.lock().unwrap();
    assert_eq!(heard.len() as u64, pages);
    assert!(heard
        .iter()
        .enumerate()
        .all(|(i, h)| *h == Heard::Populate(pr(2 * i as u64 * PAGE_SIZE, PAGE_SIZE))));
}

#[test]
fn a_large_uniform_range_is_served_in_steps_of_bounded_bytes() {
    if !in_place_or_skip("a_large_uniform_range_is_served_in_steps_of_bounded_bytes") {
        return;
    }
    let size = 2 * GUEST_BYTES_PER_STEP + (2 << 20);
    let m = in_place(size, PageState::Private);
    let request = ConversionRequest::from_map_gpa_range(0, size / PAGE_SIZE, 0).unwrap();
    let report = m.serve_request(request).unwrap();
    assert_eq!(report.pages_changed, size / PAGE_SIZE);
    assert_eq!(report.lock_holds, 3);
    assert_eq!(report.runs_changed, 3);
    assert_eq!(m.private_pages(), 0);
    // The plain call stays one step.
    let report = m.convert(pr(0, size), PageState::Private).unwrap();
    assert_eq!((report.lock_holds, report.runs_changed), (1, 1));
}

#[test]
fn a_request_reaching_outside_guest_memory_changes_nothing() {
    if !in_place_or_skip("a_request_reaching_outside_guest_memory_changes_nothing") {
        return;
    }
    let size = 4 << 20;
    let m = in_place(size, PageState::Private);
    let request = ConversionRequest::from_map_gpa_range(0, size / PAGE_SIZE + 1, 0).unwrap();
    assert!(matches!(
        m.serve_request(request),
        Err(Error::OutsideGuestMemory { first_outside, .. }) if first_outside == size
    ));
    assert_eq!(m.private_pages(), size / PAGE_SIZE);
    assert_eq!(
        m.handle_map_gpa_range(0, size / PAGE_SIZE + 1, 0),
        (libc::EINVAL as u64).wrapping_neg()
    );
    assert_eq!(m.private_pages(), size / PAGE_SIZE);
}

#[test]
fn a_fragmented_discard_is_done_in_steps_listeners_hear_in_order() {
    if !in_place_or_skip("a_fragmented_discard_is_done_in_steps_listeners_hear_in_order") {
        return;
    }
    let pages = 2 * GUEST_RUNS_PER_STEP + 10;
    let size = (2 * pages * PAGE_SIZE).next_multiple_of(2 << 20);
    let m = in_place(size, PageState::Shared);
    for page in 0..pages {
        m.convert(pr(2 * page * PAGE_SIZE, PAGE_SIZE), PageState::Private)
            .unwrap();
    }
    let runs = m.state().regions[0].private_runs().unwrap().len() as u64 * 2;
    let recorder = Arc::new(Recorder::default());
    let _sub = m.subscribe(pr(0, size), recorder.clone());
    m.discard(pr(0, size)).unwrap();
    let heard = recorder.heard.lock().unwrap();
    // One `discard` per step, the steps back to back over the whole range.
    assert_eq!(
        heard.len() as u64,
        runs.div_ceil(GUEST_RUNS_PER_STEP),
        "{heard:?}"
    );
    let mut at = 0;
    for h in heard.iter() {
        let Heard::Discard(r) = h else {
            panic!("{h:?}")
        };
        assert_eq!(r.start(), at);
        at = r.end();
    }
    assert_eq!(at, size);
    // States did not change.
    assert_eq!(m.private_pages(), pages);
}

/// A listener that refuses `populate` of runs touching `refuse_populate`, and cannot let
/// go (panics in `discard`) of runs touching `cling_to`.
#[derive(Default)]
struct Picky {
    refuse_populate: std::sync::Mutex<Option<guest_memfd::PageRange>>,
    cling_to: std::sync::Mutex<Option<guest_memfd::PageRange>>,
}

impl vm_private_memory::MemoryListener for Picky {
    fn discard(&self, range: guest_memfd::PageRange) {
        let clung = *self.cling_to.lock().unwrap();
        if let Some(held) = clung {
            if held.intersection(&range).is_some() {
                quiet_device_panics();
                panic!("the device still maps {held}");
            }
        }
    }

    fn populate(
        &self,
        range: guest_memfd::PageRange,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        match *self.refuse_populate.lock().unwrap() {
            Some(refused) if refused.intersection(&range).is_some() => Err("refused".into()),
            _ => Ok(()),
        }
    }
}

/// Keeps the panics of devices that cannot let go (thousands, caught by the memory) out
/// of the test's output; every other panic is reported as usual.
fn quiet_device_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| info.payload().downcast_ref::<&str>().copied())
                .unwrap_or("");
            if !message.starts_with("the device still maps") {
                report(info);
            }
        }));
    });
}

/// Memory whose even pages (of `2 * pages`) are in `odd`'s other state: a request over
/// all of it changes `pages` runs, more than two steps' worth.
fn alternating(odd: PageState) -> (vm_private_memory::PrivateMemoryManager, u64, u64) {
    let pages = 2 * GUEST_RUNS_PER_STEP + 10;
    let size = (2 * pages * PAGE_SIZE).next_multiple_of(2 << 20);
    let m = in_place(size, odd);
    for page in 0..pages {
        m.convert(pr(2 * page * PAGE_SIZE, PAGE_SIZE), odd.flipped())
            .unwrap();
    }
    (m, pages, size)
}

fn even_pages_in(m: &vm_private_memory::PrivateMemoryManager, pages: u64, state: PageState) -> u64 {
    (0..pages)
        .filter(|p| m.state_of(2 * p * PAGE_SIZE) == Some(state))
        .count() as u64
}

/// A request whose third step fails is undone whole: the two steps before it go back, and
/// the guest, told its request failed, finds every page as it was.
#[test]
fn a_request_whose_later_step_fails_is_undone_whole() {
    let (m, pages, size) = alternating(PageState::Shared);
    let picky = Arc::new(Picky::default());
    // A run of the third step.
    let late = pr(2 * (2 * GUEST_RUNS_PER_STEP + 5) * PAGE_SIZE, PAGE_SIZE);
    *picky.refuse_populate.lock().unwrap() = Some(late);
    let _sub = m.subscribe(pr(0, size), picky);
    assert_eq!(
        m.handle_map_gpa_range(0, size / PAGE_SIZE, 0),
        (libc::EFAULT as u64).wrapping_neg()
    );
    assert_eq!(m.private_pages(), pages);
    assert_eq!(even_pages_in(&m, pages, PageState::Private), pages);
}

/// If undoing an earlier step fails (a device cannot let go of a page it was given), the
/// error names what stays shared; everything else went back.
#[test]
fn a_request_whose_undo_fails_names_the_pages_left_shared() {
    let (m, pages, size) = alternating(PageState::Shared);
    let picky = Arc::new(Picky::default());
    let late = pr(2 * (2 * GUEST_RUNS_PER_STEP + 5) * PAGE_SIZE, PAGE_SIZE);
    let early = pr(2 * 3 * PAGE_SIZE, PAGE_SIZE);
    *picky.refuse_populate.lock().unwrap() = Some(late);
    *picky.cling_to.lock().unwrap() = Some(early);
    let _sub = m.subscribe(pr(0, size), picky);
    let request = ConversionRequest::from_map_gpa_range(0, size / PAGE_SIZE, 0).unwrap();
    let err = m.serve_request(request).expect_err("a step was refused");
    match &err {
        Error::RollbackFailed {
            cause,
            kept_shared,
            kept_private,
            ..
        } => {
            assert!(matches!(**cause, Error::ListenerRefused { .. }), "{err}");
            let kept: Vec<_> = kept_shared.iter().map(|r| (r.start, r.len)).collect();
            assert_eq!(kept, [(early.start(), PAGE_SIZE)], "{err}");
            assert!(kept_private.is_empty(), "{err}");
        }
        other => panic!("not a failed rollback: {other}"),
    }
    assert_eq!(m.private_pages(), pages - 1);
    assert_eq!(m.state_of(early.start()), Some(PageState::Shared));
}

/// The same for a request towards private: what cannot go back to shared is named in
/// `kept_private`.
#[test]
fn a_request_towards_private_whose_undo_fails_names_the_pages_left_private() {
    let (m, pages, size) = alternating(PageState::Private);
    let picky = Arc::new(Picky::default());
    let late = pr(2 * (2 * GUEST_RUNS_PER_STEP + 5) * PAGE_SIZE, PAGE_SIZE);
    let early = pr(2 * 3 * PAGE_SIZE, PAGE_SIZE);
    *picky.cling_to.lock().unwrap() = Some(late);
    *picky.refuse_populate.lock().unwrap() = Some(early);
    let _sub = m.subscribe(pr(0, size), picky);
    let request = ConversionRequest::from_map_gpa_range(
        0,
        size / PAGE_SIZE,
        vm_private_memory::MAP_GPA_RANGE_ENCRYPTED,
    )
    .unwrap();
    let err = m.serve_request(request).expect_err("a step was refused");
    match &err {
        Error::RollbackFailed {
            kept_shared,
            kept_private,
            ..
        } => {
            let kept: Vec<_> = kept_private.iter().map(|r| (r.start, r.len)).collect();
            assert_eq!(kept, [(early.start(), PAGE_SIZE)], "{err}");
            assert!(kept_shared.is_empty(), "{err}");
        }
        other => panic!("not a failed rollback: {other}"),
    }
    assert!(err.to_string().contains("stay private"), "{err}");
    assert_eq!(even_pages_in(&m, pages, PageState::Shared), pages - 1);
    assert_eq!(m.state_of(early.start()), Some(PageState::Private));
}

/// The failing step's own rollback can leave pages too (a device that cannot let go of
/// anything): the error's top-level lists name them with those of the earlier steps, so
/// a VMM that recovers from them misses no page.
#[test]
fn the_failing_step_s_own_leftovers_are_named_at_the_top() {
    let (m, pages, size) = alternating(PageState::Shared);
    let picky = Arc::new(Picky::default());
    // A run of the second step is refused; no discard ever succeeds.
    *picky.refuse_populate.lock().unwrap() =
        Some(pr(2 * (GUEST_RUNS_PER_STEP + 5) * PAGE_SIZE, PAGE_SIZE));
    *picky.cling_to.lock().unwrap() = Some(pr(0, size));
    let _sub = m.subscribe(pr(0, size), picky);
    let request = ConversionRequest::from_map_gpa_range(0, size / PAGE_SIZE, 0).unwrap();
    let err = m.serve_request(request).expect_err("a step was refused");
    let Error::RollbackFailed {
        cause, kept_shared, ..
    } = &err
    else {
        panic!("not a failed rollback: {err}");
    };
    assert!(matches!(**cause, Error::ListenerRefused { .. }), "{err}");
    let named = |gpa: u64| {
        kept_shared
            .iter()
            .any(|r| r.start <= gpa && gpa < r.start + r.len)
    };
    let mut left_shared = 0;
    for page in 0..pages {
        let gpa = 2 * page * PAGE_SIZE;
        if m.state_of(gpa) == Some(PageState::Shared) {
            left_shared += 1;
            assert!(named(gpa), "{gpa:#x} stayed shared unnamed");
        }
    }
    // Both steps' pages stayed: more than the first step's.
    assert!(left_shared > GUEST_RUNS_PER_STEP, "{left_shared}");
}
