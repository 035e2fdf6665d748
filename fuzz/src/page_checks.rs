// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Page maps (the state of pages before and after an operation) and what the crate
//! promises of them.

use guest_memfd::{PageRange, PAGE_SIZE};
use vm_private_memory::{ByteRange, Error, MemoryState, PageState, PrivateMemoryManager};

/// The state of each page in `pages` (guest-physical addresses), by `state_of`.
pub fn page_map(
    memory: &PrivateMemoryManager,
    pages: impl IntoIterator<Item = u64>,
) -> Vec<(u64, Option<PageState>)> {
    pages
        .into_iter()
        .map(|gpa| (gpa, memory.state_of(gpa)))
        .collect()
}

/// The guest-physical address of every page of `ranges`.
pub fn pages_of(ranges: &[PageRange]) -> impl Iterator<Item = u64> + '_ {
    ranges
        .iter()
        .flat_map(|r| (r.first_page()..r.first_page() + r.page_count()).map(|p| p * PAGE_SIZE))
}

/// Checks that an operation that turns `range` to `to` was all or nothing, from the
/// page maps taken before and after it over the same pages ([`page_map`]): on `Ok`
/// every page of `range` is `to` and no other changed; on an error other than
/// [`Error::RollbackFailed`] no page changed; on `RollbackFailed` only pages inside its
/// `kept_shared` (now shared) or `kept_private` (now private) ranges changed.
///
/// # Panics
///
/// When a check fails: that is the finding.
pub fn check_all_or_nothing(
    what: &str,
    range: Option<PageRange>,
    to: PageState,
    before: &[(u64, Option<PageState>)],
    after: &[(u64, Option<PageState>)],
    result: Result<(), &Error>,
) {
    assert_eq!(
        before.len(),
        after.len(),
        "{what}: page maps of other pages"
    );
    let inside = |gpa: u64, ranges: &[ByteRange]| {
        ranges
            .iter()
            .any(|r| gpa >= r.start && gpa - r.start < r.len)
    };
    for (&(gpa, old), &(at, new)) in before.iter().zip(after) {
        assert_eq!(gpa, at, "{what}: page maps of other pages");
        match result {
            Ok(()) if range.is_some_and(|r| r.contains_addr(gpa)) => {
                assert_eq!(new, Some(to), "{what}: succeeded, page {gpa:#x} is {new:?}")
            }
            Err(Error::RollbackFailed {
                kept_shared,
                kept_private,
                ..
            }) if old != new => {
                let kept = (new == Some(PageState::Shared) && inside(gpa, kept_shared))
                    || (new == Some(PageState::Private) && inside(gpa, kept_private));
                assert!(
                    kept,
                    "{what}: failed ({}), and page {gpa:#x} went from {old:?} to {new:?} outside what it names",
                    result.err().map(|e| e.to_string()).unwrap_or_default()
                );
            }
            _ => assert_eq!(new, old, "{what}: page {gpa:#x} changed ({result:?})",),
        }
    }
}

/// Checks that no page changed between two page maps of the same pages.
///
/// # Panics
///
/// When a page changed: that is the finding.
pub fn check_unchanged(
    what: &str,
    before: &[(u64, Option<PageState>)],
    after: &[(u64, Option<PageState>)],
) {
    assert_eq!(
        before.len(),
        after.len(),
        "{what}: page maps of other pages"
    );
    for (&(gpa, old), &(at, new)) in before.iter().zip(after) {
        assert_eq!(gpa, at, "{what}: page maps of other pages");
        assert_eq!(new, old, "{what}: page {gpa:#x} changed");
    }
}

/// Every page of every region of `state`, in address order, with its state: the page
/// map of [`page_map`] over the regions' pages, read from one `state()` (one hold of
/// the conversion lock, and cheap) instead of `state_of` page by page.
///
/// # Panics
///
/// If `state` has an invalid map (`state()` never does).
pub fn state_map(state: &MemoryState) -> Vec<(u64, Option<PageState>)> {
    let mut map = Vec::new();
    for region in &state.regions {
        let first = map.len();
        map.extend(pages_of(&[region.guest]).map(|gpa| (gpa, Some(PageState::Shared))));
        for run in region.private_runs().expect("state() has valid runs") {
            let (start, end) = (
                first + run.first as usize,
                first + (run.first + run.count) as usize,
            );
            for page in &mut map[start..end] {
                page.1 = Some(PageState::Private);
            }
        }
    }
    map
}

/// Checks that `state_of` agrees with `state` (taken just before) at both ends of
/// every region and of every run of pages in one state, and on the pages either side
/// of each region: where a disagreement would show first.
///
/// # Panics
///
/// When they disagree: that is the finding.
pub fn check_state_of(what: &str, memory: &PrivateMemoryManager, state: &MemoryState) {
    let check = |gpa: u64, expected: Option<PageState>| {
        assert_eq!(
            memory.state_of(gpa),
            expected,
            "{what}: state_of({gpa:#x}) disagrees with state()"
        );
    };
    let inside = |gpa: u64| state.regions.iter().any(|r| r.guest.contains_addr(gpa));
    for region in &state.regions {
        let guest = region.guest;
        let last = guest.page_count() - 1;
        let at = |page: u64| guest.start() + page * PAGE_SIZE;
        let mut private_end = 0;
        for run in region.private_runs().expect("state() has valid runs") {
            // The shared run before it, then the run itself.
            if run.first > private_end {
                check(at(private_end), Some(PageState::Shared));
                check(at(run.first - 1), Some(PageState::Shared));
            }
            check(at(run.first), Some(PageState::Private));
            check(at(run.first + run.count - 1), Some(PageState::Private));
            private_end = run.first + run.count;
        }
        if private_end <= last {
            check(at(private_end), Some(PageState::Shared));
            check(at(last), Some(PageState::Shared));
        }
        for outside in [guest.start().checked_sub(PAGE_SIZE), Some(guest.end())] {
            if let Some(gpa) = outside.filter(|&gpa| !inside(gpa)) {
                check(gpa, None);
            }
        }
    }
}
