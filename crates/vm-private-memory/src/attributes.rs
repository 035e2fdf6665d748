// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One bit per 4 KiB page: private (1) or shared (0).
//!
//! Readers (every host access) load whole 64-page words with `Acquire` and never lock.
//! Only the conversion engine writes, under the memory's conversion lock, with `Release`
//! stores, so a reader sees each word either before or after a change, never torn.
//!
//! A set bit means "not in the initial state", so a new map is all zeros whatever the
//! initial state, and its memory comes from zeroed, lazily backed allocator pages: a
//! sparse 1 TiB guest costs nothing until its pages change.

use crate::sync::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The state of a page.
///
/// Exhaustive by design: a page is private or shared, and code matches on exactly these
/// two (a third state would change every caller's meaning, not extend it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PageState {
    /// Only the guest may access it (KVM serves it from guest_memfd).
    Private,
    /// The host may access it too (device emulation, bounce buffers).
    Shared,
}

impl PageState {
    /// The other state.
    pub fn flipped(self) -> PageState {
        match self {
            PageState::Private => PageState::Shared,
            PageState::Shared => PageState::Private,
        }
    }
}

impl std::fmt::Display for PageState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PageState::Private => "private",
            PageState::Shared => "shared",
        })
    }
}

/// The private/shared bits of one region's pages.
#[derive(Debug)]
pub struct PageAttributes {
    words: Box<[AtomicU64]>,
    pages: u64,
    initial: PageState,
    /// XOR a stored word with this to get its private bits: all ones when pages start
    /// private (a clear bit then means private), zero when they start shared.
    to_private: u64,
}

/// A run of consecutive pages in one state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Run {
    /// Its first page (an index among the region's pages).
    pub first: u64,
    /// How many pages.
    pub count: u64,
    /// Their state.
    pub state: PageState,
}

impl Run {
    /// A run of `count` pages from page `first`, in `state`.
    pub fn new(first: u64, count: u64, state: PageState) -> Self {
        Run {
            first,
            count,
            state,
        }
    }
}

impl PageAttributes {
    /// `pages` pages, all in `initial` state. Memory: one bit per page, rounded up to 64.
    pub fn new(pages: u64, initial: PageState) -> Self {
        PageAttributes {
            words: zeroed_words(pages.div_ceil(64) as usize),
            pages,
            initial,
            to_private: match initial {
                PageState::Private => u64::MAX,
                PageState::Shared => 0,
            },
        }
    }

    /// The stored bit pattern that means `state`.
    fn stored(&self, state: PageState) -> bool {
        state != self.initial
    }

    /// The bits of word `word` that belong to pages `[first, end)`.
    fn mask_of_word(word: u64, first: u64, end: u64) -> u64 {
        let lo = (word * 64).max(first);
        let hi = ((word + 1) * 64).min(end);
        if lo >= hi {
            return 0;
        }
        let width = hi - lo;
        let ones = if width == 64 {
            u64::MAX
        } else {
            (1u64 << width) - 1
        };
        ones << (lo - word * 64)
    }

    /// The first private page among pages `first..=last` (`last < pages()`), if any.
    /// This is the check on every host access: most accesses fall within one 64-page
    /// word, which costs one load.
    #[inline]
    pub(crate) fn first_private(&self, first: u64, last: u64) -> Option<u64> {
        debug_assert!(first <= last && last < self.pages);
        let (w0, w1) = (first / 64, last / 64);
        if w0 == w1 {
            let width = last - first + 1;
            let mask = (u64::MAX >> (64 - width)) << (first % 64);
            let private =
                (self.words[w0 as usize].load(Ordering::Acquire) ^ self.to_private) & mask;
            return (private != 0).then(|| w0 * 64 + u64::from(private.trailing_zeros()));
        }
        self.find(first, last - first + 1, PageState::Private)
    }

    /// Whether pages `first..=last` (`last < pages()`) are all shared, answered only
    /// where they lie in one 64-page word (one load; `None` otherwise). Inline on every
    /// host access to a region with private pages; [`PageAttributes::first_private`]
    /// answers the rest.
    #[inline]
    pub(crate) fn shared_within_word(&self, first: u64, last: u64) -> Option<bool> {
        debug_assert!(first <= last && last < self.pages);
        let word = first / 64;
        if word != last / 64 {
            return None;
        }
        let width = last - first + 1;
        let mask = (u64::MAX >> (64 - width)) << (first % 64);
        let bits = self.words.get(word as usize)?.load(Ordering::Acquire);
        Some((bits ^ self.to_private) & mask == 0)
    }

    /// How many pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of metadata held.
    pub fn metadata_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.words)
    }

    /// The state of page `page`, or `None` if the map has no such page
    /// (`page >= pages()`).
    pub fn get(&self, page: u64) -> Option<PageState> {
        if page >= self.pages {
            return None;
        }
        let word = self.words.get(usize::try_from(page / 64).ok()?)?;
        Some(if word.load(Ordering::Acquire) & (1 << (page % 64)) != 0 {
            self.initial.flipped()
        } else {
            self.initial
        })
    }

    /// The first page in `[first, first + count)` that is in `state`, if any. Pages past
    /// the end of the map are not searched (any `first` and `count` may be given, their
    /// sum may overflow: the range is clipped to `[0, pages())`).
    pub fn find(&self, first: u64, count: u64, state: PageState) -> Option<u64> {
        let end = first.saturating_add(count).min(self.pages);
        let mut word = first / 64;
        while word * 64 < end {
            // `word * 64 < end <= pages`, so the word exists.
            let bits = self.words.get(word as usize)?.load(Ordering::Acquire);
            let bits = if self.stored(state) { bits } else { !bits }
                & Self::mask_of_word(word, first, end);
            if bits != 0 {
                return Some(word * 64 + u64::from(bits.trailing_zeros()));
            }
            word += 1;
        }
        None
    }

    /// Whether every page of `[first, first + count)` exists and is in `state`: `false`
    /// if the range reaches past the end of the map (or `first + count` overflows), since
    /// a page the map does not have is in no state. An empty range inside the map
    /// (`count == 0`, `first <= pages()`) is `true`.
    pub fn all(&self, first: u64, count: u64, state: PageState) -> bool {
        match first.checked_add(count) {
            Some(end) if end <= self.pages => self.find(first, count, state.flipped()).is_none(),
            _ => false,
        }
    }

    /// Puts pages `[first, first + count)` in `state`. Only the conversion engine calls this,
    /// under the conversion lock, so read-modify-write of a word cannot race with another
    /// writer.
    pub(crate) fn set(&self, first: u64, count: u64, state: PageState) {
        let end = first.saturating_add(count).min(self.pages);
        let mut word = first / 64;
        while word * 64 < end {
            let mask = Self::mask_of_word(word, first, end);
            let Some(cell) = self.words.get(word as usize) else {
                return;
            };
            if self.stored(state) {
                cell.fetch_or(mask, Ordering::Release);
            } else {
                cell.fetch_and(!mask, Ordering::Release);
            }
            word += 1;
        }
    }

    /// The runs of equal state covering `[first, first + count)`, in order, clipped to the
    /// map like [`PageAttributes::find`] (nothing at all if `first >= pages()`).
    pub fn runs(&self, first: u64, count: u64) -> Runs<'_> {
        Runs {
            attributes: self,
            next: first,
            end: first.saturating_add(count).min(self.pages),
        }
    }

    /// How many pages are private.
    pub fn count_private(&self) -> u64 {
        let flipped: u64 = self
            .words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum();
        match self.initial {
            PageState::Private => self.pages - flipped,
            PageState::Shared => flipped,
        }
    }
}

/// Iterator over the runs of equal state in a page range ([`PageAttributes::runs`]).
#[derive(Debug)]
pub struct Runs<'a> {
    attributes: &'a PageAttributes,
    next: u64,
    end: u64,
}

impl Iterator for Runs<'_> {
    type Item = Run;

    fn next(&mut self) -> Option<Run> {
        if self.next >= self.end {
            return None;
        }
        let start = self.next;
        let state = self.attributes.get(start)?;
        let stop = self
            .attributes
            .find(start, self.end - start, state.flipped())
            .unwrap_or(self.end);
        self.next = stop;
        Some(Run::new(start, stop - start, state))
    }
}

/// `count` zeroed atomic words (loom's atomics are built one by one).
#[cfg(loom)]
fn zeroed_words(count: usize) -> Box<[AtomicU64]> {
    (0..count).map(|_| AtomicU64::new(0)).collect()
}

/// `count` zeroed atomic words, from a zeroed allocation (`calloc`, which the kernel
/// backs lazily for large sizes) instead of a loop that writes every word.
#[cfg(not(loom))]
fn zeroed_words(count: usize) -> Box<[AtomicU64]> {
    const { assert!(std::mem::align_of::<AtomicU64>() == std::mem::align_of::<u64>()) };
    let plain: Box<[u64]> = vec![0u64; count].into_boxed_slice();
    let raw = Box::into_raw(plain) as *mut [AtomicU64];
    // SAFETY: `AtomicU64` has the same size and bit validity as `u64` (std's documented
    // guarantee) and, as asserted above, the same alignment on this target, so the
    // allocation is a valid `[AtomicU64]` of the same length; ownership moves from one
    // box to the other and the allocation is freed with the same layout.
    unsafe { Box::from_raw(raw) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_within_word_agrees_with_first_private() {
        for initial in [PageState::Private, PageState::Shared] {
            for pages in [1u64, 63, 64, 65, 130, 200] {
                let a = PageAttributes::new(pages, initial);
                for (first, count) in [(3, 1), (62, 5), (64, 64), (130, 9), (199, 1)] {
                    if first < pages {
                        a.set(first, count.min(pages - first), initial.flipped());
                    }
                }
                for first in 0..pages {
                    for last in first..(first + 70).min(pages) {
                        match a.shared_within_word(first, last) {
                            Some(shared) => assert_eq!(
                                shared,
                                a.first_private(first, last).is_none(),
                                "{initial:?} {pages} pages, {first}..={last}"
                            ),
                            None => assert_ne!(first / 64, last / 64),
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn initial_state_is_exact_at_the_edges() {
        let a = PageAttributes::new(130, PageState::Private);
        assert_eq!(a.count_private(), 130);
        assert_eq!(a.get(129), Some(PageState::Private));
        let b = PageAttributes::new(130, PageState::Shared);
        assert_eq!(b.count_private(), 0);
        assert!(b.all(0, 130, PageState::Shared));
    }

    #[test]
    fn set_find_and_runs_across_words() {
        let a = PageAttributes::new(200, PageState::Shared);
        a.set(60, 10, PageState::Private);
        assert_eq!(a.find(0, 200, PageState::Private), Some(60));
        assert_eq!(a.find(61, 200, PageState::Shared), Some(70));
        assert!(a.all(60, 10, PageState::Private));
        assert!(!a.all(59, 2, PageState::Private));
        assert_eq!(
            a.runs(50, 30).collect::<Vec<_>>(),
            vec![
                Run::new(50, 10, PageState::Shared),
                Run::new(60, 10, PageState::Private),
                Run::new(70, 10, PageState::Shared)
            ]
        );
        a.set(0, 200, PageState::Private);
        assert_eq!(a.count_private(), 200);
        a.set(64, 64, PageState::Shared);
        assert_eq!(a.count_private(), 136);
        assert_eq!(a.runs(0, 200).count(), 3);
    }

    #[test]
    fn queries_past_the_end_are_clipped() {
        let a = PageAttributes::new(10, PageState::Private);
        assert_eq!(a.find(5, u64::MAX, PageState::Shared), None);
        assert_eq!(a.find(1, u64::MAX, PageState::Private), Some(1));
        assert!(!a.all(1, u64::MAX, PageState::Shared));
        assert_eq!(
            a.runs(8, 100).collect::<Vec<_>>(),
            vec![Run::new(8, 2, PageState::Private)]
        );
    }

    #[test]
    fn the_fast_check_agrees_with_the_general_search() {
        for initial in [PageState::Private, PageState::Shared] {
            let a = PageAttributes::new(200, initial);
            // A pattern with runs of both states across word boundaries.
            for (first, count) in [(3, 1), (62, 5), (64, 64), (130, 9), (199, 1)] {
                a.set(first, count, initial.flipped());
            }
            for first in 0..200 {
                for last in first..(first + 70).min(200) {
                    assert_eq!(
                        a.first_private(first, last),
                        a.find(first, last - first + 1, PageState::Private),
                        "{initial} {first}..={last}"
                    );
                }
            }
        }
    }

    #[test]
    fn metadata_is_one_bit_per_page() {
        let gib_pages = (1u64 << 30) / 4096;
        let a = PageAttributes::new(gib_pages, PageState::Shared);
        assert_eq!(a.metadata_bytes() as u64, gib_pages / 8);
    }

    #[test]
    fn get_answers_none_outside_the_map() {
        for initial in [PageState::Private, PageState::Shared] {
            let a = PageAttributes::new(130, initial);
            assert_eq!(a.get(129), Some(initial));
            assert_eq!(a.get(130), None, "the page just past the end");
            assert_eq!(a.get(191), None, "a page in the last word's padding");
            assert_eq!(a.get(192), None);
            assert_eq!(a.get(u64::MAX), None);
        }
        assert_eq!(PageAttributes::new(0, PageState::Shared).get(0), None);
    }

    #[test]
    fn all_is_false_for_pages_past_the_end() {
        let a = PageAttributes::new(10, PageState::Shared);
        assert!(a.all(0, 10, PageState::Shared));
        assert!(a.all(10, 0, PageState::Shared), "an empty range at the end");
        assert!(!a.all(10, 1, PageState::Shared));
        assert!(!a.all(9, 2, PageState::Shared));
        assert!(!a.all(11, 0, PageState::Shared));
        assert!(!a.all(u64::MAX, 1, PageState::Shared));
        assert!(!a.all(1, u64::MAX, PageState::Shared));
        assert!(!a.all(u64::MAX, u64::MAX, PageState::Private));
    }

    /// The state of page `p` after setting `ops` on a map in `initial` state, the simple way.
    fn model(initial: PageState, ops: &[(u64, u64, bool)], p: u64) -> PageState {
        ops.iter()
            .rev()
            .find(|(first, count, _)| p >= *first && p - first < *count)
            .map_or(initial, |&(_, _, private)| {
                if private {
                    PageState::Private
                } else {
                    PageState::Shared
                }
            })
    }

    fn any_u64() -> impl proptest::strategy::Strategy<Value = u64> {
        use proptest::prelude::*;
        prop_oneof![
            0u64..300,
            Just(u64::MAX),
            Just(u64::MAX - 1),
            Just(u64::MAX / 64),
            any::<u64>(),
        ]
    }

    proptest::proptest! {
        /// Every public query answers, for any input, what a page-by-page model answers.
        #[test]
        fn queries_are_total_and_agree_with_a_model(
            pages in 0u64..260,
            initial_private in proptest::bool::ANY,
            ops in proptest::collection::vec((0u64..280, 0u64..150, proptest::bool::ANY), 0..6),
            first in any_u64(),
            count in any_u64(),
        ) {
            let initial = if initial_private { PageState::Private } else { PageState::Shared };
            let a = PageAttributes::new(pages, initial);
            for &(f, c, private) in &ops {
                a.set(f, c, if private { PageState::Private } else { PageState::Shared });
            }
            let state = |p: u64| model(initial, &ops, p);
            for p in [first, count, pages, pages.wrapping_sub(1)] {
                let expected = (p < pages).then(|| state(p));
                proptest::prop_assert_eq!(a.get(p), expected);
            }
            let end = first.saturating_add(count).min(pages);
            let in_map = first..end.max(first);
            for s in [PageState::Private, PageState::Shared] {
                proptest::prop_assert_eq!(
                    a.find(first, count, s),
                    in_map.clone().find(|&p| state(p) == s)
                );
                let exists = first.checked_add(count).is_some_and(|e| e <= pages);
                proptest::prop_assert_eq!(
                    a.all(first, count, s),
                    exists && in_map.clone().all(|p| state(p) == s)
                );
            }
            let runs: Vec<Run> = a.runs(first, count).collect();
            let mut expected: Vec<Run> = Vec::new();
            for p in in_map {
                match expected.last_mut() {
                    Some(run) if run.state == state(p) && run.first + run.count == p => {
                        run.count += 1
                    }
                    _ => expected.push(Run::new(p, 1, state(p))),
                }
            }
            proptest::prop_assert_eq!(runs, expected);
            let private = (0..pages).filter(|&p| state(p) == PageState::Private).count();
            proptest::prop_assert_eq!(a.count_private(), private as u64);
        }
    }
}
