// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest requests served in steps (`serve_request`, `serve_memory_fault`,
//! `handle_map_gpa_range`) over fragmented memory, with listeners that refuse or cannot
//! let go part way, on both strategies (one VM and one memory each, built once per
//! process, every conversion to private waiting for host accesses with no patience).
//!
//! Layout, in pages: region A = 0..1024 and region B = 1024..2560 (adjacent, 10 MiB
//! together), a hole at 2560..2816, region C = 2816..3072. A request changes at most
//! `GUEST_RUNS_PER_STEP` (1024) runs per step, so one over most of A and B alternating
//! private and shared pages takes two steps; `GUEST_BYTES_PER_STEP` (256 MiB) is out of
//! reach.
//!
//! Each input sets a prior map (all private, then optionally shared stripes over A and B,
//! the input's way to ask for a fragmented map, then up to four segments: a range, a
//! period, how many pages of each period, the state; applied with one `restore_state`),
//! subscribes two listeners with `subscribe_with_replay` (a well-behaved one over all of
//! guest memory, a faulty one over a range the input picks, in the order it picks), then
//! serves up to two requests. Before each, the faulty listener is armed: refuse its
//! `n`-th `populate` (or every one from the `n`-th), panic in its `n`-th `discard` (or every
//! one from the `n`-th), counted over the request and its rollback; and a host slice of a
//! page may be held over the request (a conversion of it to private fails at once:
//! `Error::HostAccessInFlight`, `-KVM_EAGAIN`).
//!
//! Invariants, for every request:
//! - all or nothing: on success every page of the range is in the state asked for and
//!   no other changed; on an error other than `Error::RollbackFailed` no page changed; on
//!   `RollbackFailed { kept_shared, kept_private, .. }` only pages inside those ranges
//!   changed (now shared, resp. private); `RollbackFailed` only when something could
//!   fail during the rollback too (two listener faults, or one and a held page); a
//!   request outside guest memory is refused, and one inside is not (unless a fault or
//!   a held page makes it fail), nor served despite a listener's fault;
//! - the hypercall's answer: 0 on success, `-KVM_EINVAL` outside memory, `-KVM_EAGAIN`
//!   for a held page, `-KVM_EFAULT` for a failed conversion, each with the page states
//!   above (an `-KVM_EFAULT` after a failed rollback is checked only as far as the
//!   answer tells: listeners' safety);
//! - the report: `pages_changed` is the pages that were in the other state; its runs lie
//!   between the changed runs merged and split at region boundaries, and `lock_holds`
//!   between `ceil(runs / 1024)` and `runs / 1024 + 1`;
//! - listeners never hold a page that is not shared, and hold every shared page of
//!   their subscription while no `RollbackFailed` was reported; never offered a page
//!   twice; dual: what the memory told KVM (the attribute stand-in) is every page's state;
//!   `state_of` agrees with `state()` (whose map the checks read) at the request's edges
//!   and at both ends of every run.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use guest_memfd::{PageRange, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vm_private_memory::{
    ConversionReport, ConversionRequest, Error, MemoryBuilder, MemoryState, PageRun, PageState,
    PrivateMemoryManager, PrivatePages, Strategy, GUEST_RUNS_PER_STEP, KVM_EAGAIN, KVM_EFAULT,
    KVM_EINVAL,
};
use vm_private_memory_fuzz::oracle::{ENCRYPTED, MEMORY_EXIT_FLAG_PRIVATE, PAGE_SZ_1G, PAGE_SZ_2M};
use vm_private_memory_fuzz::{
    check_all_or_nothing, check_state_of, check_unchanged, dual_builder, shared_set, vm,
    AttributesRecord, Fault, ModelListener, PageSet,
};

/// `(first page, pages)` of each region.
const REGIONS: [(u64, u64); 3] = [(0, 1024), (1024, 1536), (2816, 256)];
/// Pages the checks look at: the regions, the hole, and 256 pages past C.
const WINDOW_PAGES: u64 = 3328;
/// Where A and B end: the largest range inside memory.
const SPAN_END: u64 = 2560;
/// Where C starts and ends.
const C: (u64, u64) = (2816, 3072);
/// The longest segment of the prior map that may be striped.
const STRIPED_PAGES: u64 = 256;

/// A page number in the window.
#[derive(Arbitrary, Clone, Copy, Debug)]
enum Start {
    /// Any page of the window.
    Page(u16),
    /// A region's first page, plus `delta` pages.
    Edge { region: u8, delta: i8 },
}

impl Start {
    fn page(self) -> u64 {
        match self {
            Start::Page(p) => u64::from(p) % WINDOW_PAGES,
            Start::Edge { region, delta } => {
                let (first, _) = REGIONS[usize::from(region) % REGIONS.len()];
                first.saturating_add_signed(delta.into())
            }
        }
    }
}

/// A number of pages.
#[derive(Arbitrary, Clone, Copy, Debug)]
enum Len {
    /// 1 to 256.
    Short(u8),
    /// 1 to the window's size.
    Long(u16),
    /// To the end of A and B (at least one page).
    Span,
}

impl Len {
    fn pages(self, first: u64) -> u64 {
        match self {
            Len::Short(n) => u64::from(n) + 1,
            Len::Long(n) => u64::from(n) % WINDOW_PAGES + 1,
            Len::Span => SPAN_END.saturating_sub(first).max(1),
        }
    }
}

/// Part of the prior map: from `first`, `len` pages, of which the first `duty` of each
/// `period` are set to the state (1 to 8 pages per period; a segment longer than
/// [`STRIPED_PAGES`] is set whole, so that a fragmented map, which costs a system call
/// per run at every conversion, comes only from [`Stripes`]).
#[derive(Arbitrary, Clone, Copy, Debug)]
struct Segment {
    first: Start,
    len: Len,
    period: u8,
    duty: u8,
    private: bool,
}

/// How the request reaches the memory.
#[derive(Arbitrary, Clone, Copy, Debug)]
enum Via {
    /// `serve_request` of a checked request.
    Serve,
    /// `handle_map_gpa_range`, with a page-size hint (none, 2 MiB, 1 GiB).
    MapGpaRange { hint: u8 },
    /// `serve_memory_fault`, its size `short` bytes less than the range (rounded up).
    MemoryFault { short: u16 },
}

#[derive(Arbitrary, Clone, Copy, Debug)]
struct Request {
    first: Start,
    len: Len,
    private: bool,
    via: Via,
    refuse_populate: Fault,
    panic_discard: Fault,
    /// A page whose host slice is held over the request (if it is shared then).
    hold: Option<u16>,
}

/// A fragmented prior map over all of A and B: pages shared where
/// `(page + phase) % period < duty`, with a period of 2 to 5 pages (more than 1024 runs
/// of each state for a period of 2).
#[derive(Arbitrary, Clone, Copy, Debug)]
struct Stripes {
    period: u8,
    duty: u8,
    phase: u8,
}

#[derive(Arbitrary, Debug)]
struct Input {
    dual: bool,
    stripes: Option<Stripes>,
    segments: Vec<Segment>,
    /// The faulty listener's subscription: `(first page, pages)`, or all of memory.
    faulty_range: Option<(Start, Len)>,
    faulty_first: bool,
    requests: Vec<Request>,
}

struct Subject {
    memory: PrivateMemoryManager,
    record: Option<Arc<AttributesRecord>>,
}

fn subjects() -> &'static Mutex<[Subject; 2]> {
    static SUBJECTS: OnceLock<Mutex<[Subject; 2]>> = OnceLock::new();
    SUBJECTS.get_or_init(|| {
        let layout = |builder: MemoryBuilder| {
            REGIONS
                .iter()
                .fold(builder, |b, &(first, pages)| {
                    b.region_at(first * PAGE_SIZE, pages * PAGE_SIZE)
                })
                .initial_state(PageState::Private)
                .access_patience(Duration::ZERO)
                .build()
                .expect("the target's memory on this host")
        };
        let in_place = layout(MemoryBuilder::new(vm()).strategy(Strategy::InPlace));
        // A VM of its own: each memory numbers its memslots from 0.
        let (builder, record) = dual_builder(vm(), 0, WINDOW_PAGES as usize);
        let dual = layout(builder);
        Mutex::new([
            Subject {
                memory: in_place,
                record: None,
            },
            Subject {
                memory: dual,
                record: Some(record),
            },
        ])
    })
}

fn range(first: u64, pages: u64) -> Option<PageRange> {
    PageRange::from_pages(first, pages).ok()
}

/// Whether every page of `[first, first + pages)` lies in a region.
fn inside(first: u64, pages: u64) -> bool {
    let end = first + pages;
    (end <= SPAN_END) || (first >= C.0 && end <= C.1)
}

/// Every page of the window with its state, from `state()`: one hold of the lock.
fn window_map(memory: &PrivateMemoryManager) -> Vec<(u64, Option<PageState>)> {
    let mut map: Vec<(u64, Option<PageState>)> =
        (0..WINDOW_PAGES).map(|p| (p * PAGE_SIZE, None)).collect();
    for region in memory.state().regions {
        let first = region.guest.first_page();
        for page in first..first + region.guest.page_count() {
            map[page as usize].1 = Some(PageState::Shared);
        }
        for run in region.private_runs().expect("state() has valid runs") {
            for page in first + run.first..first + run.first + run.count {
                map[page as usize].1 = Some(PageState::Private);
            }
        }
    }
    map
}

/// Sets the map: all private, then `stripes`, then `segments` in order; with one
/// `restore_state`.
fn set_prior(memory: &PrivateMemoryManager, stripes: Option<Stripes>, segments: &[Segment]) {
    let mut private = vec![true; WINDOW_PAGES as usize];
    if let Some(s) = stripes {
        let period = u64::from(s.period % 4) + 2;
        let duty = u64::from(s.duty) % (period - 1) + 1;
        for page in 0..SPAN_END {
            if (page + u64::from(s.phase)) % period < duty {
                private[page as usize] = false;
            }
        }
    }
    for s in segments {
        let first = s.first.page();
        let pages = s.len.pages(first);
        let period = if pages <= STRIPED_PAGES {
            u64::from(s.period % 8) + 1
        } else {
            1
        };
        let duty = u64::from(s.duty) % (period + 1);
        let end = (first + pages).min(WINDOW_PAGES);
        for page in first..end {
            if (page - first) % period < duty {
                private[page as usize] = s.private;
            }
        }
    }
    let mut state: MemoryState = memory.state();
    for region in &mut state.regions {
        let first = region.guest.first_page();
        let mut runs: Vec<PageRun> = Vec::new();
        for page in 0..region.guest.page_count() {
            if !private[(first + page) as usize] {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.first + run.count == page => run.count += 1,
                _ => runs.push(PageRun {
                    first: page,
                    count: 1,
                }),
            }
        }
        region.private = PrivatePages::Runs(runs);
    }
    state.update_checksum();
    memory
        .restore_state(&state)
        .unwrap_or_else(|e| panic!("setting the prior map: {e}"));
}

/// The runs of pages of `range` whose state is not `to` in `map`, merged, and split at
/// region boundaries.
fn changed_runs(
    map: &[(u64, Option<PageState>)],
    first: u64,
    pages: u64,
    to: PageState,
) -> (u64, u64) {
    let starts: Vec<u64> = REGIONS.iter().map(|r| r.0).collect();
    let (mut merged, mut split) = (0, 0);
    let mut previous = false;
    for page in first..first + pages {
        let changes = map[page as usize].1 != Some(to);
        if changes && !previous {
            merged += 1;
            split += 1;
        } else if changes && starts.contains(&page) {
            split += 1;
        }
        previous = changes;
    }
    (merged, split)
}

/// What a request gave back: the crate's answer, or the hypercall's.
#[derive(Debug)]
enum Answer {
    Served(Result<ConversionReport, Error>),
    Code(u64),
}

fuzz_target!(|input: Input| {
    let subjects = subjects().lock().unwrap_or_else(|p| p.into_inner());
    let subject = &subjects[usize::from(input.dual)];
    let memory = &subject.memory;
    let segments: Vec<Segment> = input.segments.iter().take(4).copied().collect();
    set_prior(memory, input.stripes, &segments);

    let whole = range(0, WINDOW_PAGES).unwrap();
    let faulty_sub = input
        .faulty_range
        .and_then(|(start, len)| {
            let first = start.page();
            range(first, len.pages(first).min(WINDOW_PAGES - first))
        })
        .unwrap_or(whole);
    let benign = Arc::new(ModelListener::default());
    let faulty = Arc::new(ModelListener::default());
    let mut subscriptions = Vec::new();
    let order = if input.faulty_first {
        [(&faulty, faulty_sub), (&benign, whole)]
    } else {
        [(&benign, whole), (&faulty, faulty_sub)]
    };
    for (listener, sub) in order {
        let subscription = memory
            .subscribe_with_replay(sub, listener.clone())
            .unwrap_or_else(|e| panic!("subscribing a listener that takes everything: {e}"));
        subscriptions.push(subscription);
    }
    let listeners = [(&benign, whole), (&faulty, faulty_sub)];
    let shared = shared_set(memory);
    for (listener, sub) in listeners {
        listener.check("after replay", &shared, sub, true);
    }

    // No `RollbackFailed` yet: listeners hold exactly the shared pages they subscribed.
    let mut exact = true;
    for request in input.requests.iter().take(2) {
        let first = request.first.page();
        let pages = request.len.pages(first);
        let Some(asked) = range(first, pages) else {
            continue;
        };
        let to = if request.private {
            PageState::Private
        } else {
            PageState::Shared
        };
        let what = format!(
            "{} memory, prior {:?} then {segments:?}, faulty listener over {faulty_sub}, request {asked} to {to}: {request:?}",
            memory.strategy(),
            input.stripes
        );
        faulty.arm(request.refuse_populate, request.panic_discard);
        benign.arm(Fault::Never, Fault::Never);
        let before = window_map(memory);
        let view = memory.guest_memory().memory();
        let held_slice = request.hold.and_then(|page| {
            let gpa = u64::from(page) % WINDOW_PAGES * PAGE_SIZE;
            view.get_slice(GuestAddress(gpa), PAGE_SIZE as usize).ok()
        });
        let holding = held_slice.is_some();
        let gpa = asked.start();
        let answer = match request.via {
            Via::Serve => {
                Answer::Served(memory.serve_request(ConversionRequest { range: asked, to }))
            }
            Via::MemoryFault { short } => {
                let flags = if request.private {
                    MEMORY_EXIT_FLAG_PRIVATE
                } else {
                    0
                };
                let size = asked.len() - u64::from(short) % PAGE_SIZE;
                Answer::Served(memory.serve_memory_fault(flags, gpa, size))
            }
            Via::MapGpaRange { hint } => {
                let hint = [0, PAGE_SZ_2M, PAGE_SZ_1G][usize::from(hint % 3)];
                let attributes = hint | if request.private { ENCRYPTED } else { 0 };
                Answer::Code(memory.handle_map_gpa_range(gpa, pages, attributes))
            }
        };
        drop(held_slice);
        drop(view);
        let after = window_map(memory);
        let faults = faulty.faults();
        let in_memory = inside(first, pages);
        // A rollback can fail only if something fails during it too: with one failure
        // for the request (a fault of the listener, or a held page going private) and
        // one in the rollback (a fault, or a held page when shared pages go back).
        let rollback_may_fail = faults >= 2 || (holding && faults >= 1);
        let failure_possible = faults >= 1 || (holding && to == PageState::Private);
        let map_before = &before[..];
        let checked = |result: Result<(), &Error>| {
            let clipped = if in_memory { Some(asked) } else { None };
            check_all_or_nothing(&what, clipped, to, map_before, &after, result);
        };
        match &answer {
            Answer::Served(Ok(report)) => {
                assert!(in_memory, "{what}: served outside memory: {report:?}");
                assert_eq!(faults, 0, "{what}: served although a listener failed");
                checked(Ok(()));
                let changed = map_before[first as usize..(first + pages) as usize]
                    .iter()
                    .filter(|(_, s)| *s != Some(to))
                    .count() as u64;
                assert_eq!(report.pages_changed, changed, "{what}: pages changed");
                let (merged, split) = changed_runs(map_before, first, pages, to);
                let runs = report.runs_changed;
                assert!(
                    merged <= runs && runs <= split,
                    "{what}: {runs} runs changed, expected {merged} (merged) to {split} (split)"
                );
                assert!(
                    report.lock_holds >= runs.div_ceil(GUEST_RUNS_PER_STEP)
                        && report.lock_holds <= runs / GUEST_RUNS_PER_STEP + 1,
                    "{what}: {runs} runs in {} steps",
                    report.lock_holds
                );
            }
            Answer::Served(Err(e)) => {
                if let Error::OutsideGuestMemory { .. } = e {
                    assert!(!in_memory, "{what}: refused as outside memory");
                } else {
                    assert!(in_memory, "{what}: outside memory, refused with {e}");
                    assert!(failure_possible, "{what}: nothing could fail, got {e}");
                }
                if let Error::RollbackFailed { .. } = e {
                    assert!(
                        rollback_may_fail,
                        "{what}: nothing could fail in the rollback, got {e}"
                    );
                    exact = false;
                }
                checked(Err(e));
            }
            Answer::Code(0) => {
                assert!(in_memory, "{what}: served outside memory");
                assert_eq!(faults, 0, "{what}: served although a listener failed");
                checked(Ok(()));
            }
            Answer::Code(code) => {
                let code = code.wrapping_neg();
                if code == KVM_EINVAL {
                    assert!(!in_memory, "{what}: -KVM_EINVAL inside memory");
                } else {
                    assert!(in_memory, "{what}: outside memory, answered -{code}");
                    assert!(
                        code == KVM_EFAULT || (code == KVM_EAGAIN && holding),
                        "{what}: answered -{code}"
                    );
                    assert!(
                        failure_possible,
                        "{what}: nothing could fail, answered -{code}"
                    );
                }
                if code == KVM_EFAULT && rollback_may_fail {
                    // Maybe a `RollbackFailed`, whose ranges the answer does not tell.
                    exact = false;
                } else {
                    check_unchanged(&what, map_before, &after);
                }
            }
        }
        // The bits as `state_of` reads them: at the request's edges, and at those of
        // every run.
        for page in [first, first + pages - 1, first + pages] {
            if let Some(&(gpa, state)) = after.get(page as usize) {
                assert_eq!(memory.state_of(gpa), state, "{what}: state_of({gpa:#x})");
            }
        }
        check_state_of(&what, memory, &memory.state());
        if let Some(record) = &subject.record {
            for (&(gpa, state), private) in after.iter().zip(record.window()) {
                if let Some(state) = state {
                    assert_eq!(
                        private,
                        state == PageState::Private,
                        "{what}: KVM's view of {gpa:#x} ({state})"
                    );
                }
            }
        }
        let shared: PageSet = shared_set(memory);
        for (listener, sub) in listeners {
            listener.check(&what, &shared, sub, exact);
        }
    }
    drop(subscriptions);
});
