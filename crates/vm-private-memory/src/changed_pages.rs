// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the done steps of a guest request changed, kept so that a later step's failure
//! can undo them: one bit per page of the request, in chunks allocated only where a step
//! changed pages. A request costs at most one bit per page it spans (1/32768 of its size)
//! whatever the guest made of its memory, and nothing where it changed nothing.
//!
//! Hand-written: no maintained crate offers a sparse bitmap with run iteration that fits
//! here without pulling a larger dependency for a few dozen lines.

use std::collections::BTreeMap;

use guest_memfd::{PageRange, PAGE_SIZE};

/// Pages per chunk: 32768, 128 MiB of guest memory in 4 KiB of bits.
const CHUNK_PAGES: u64 = 1 << 15;
const WORDS: usize = (CHUNK_PAGES / 64) as usize;

/// The pages of a request (counted from its first byte) that its done steps changed.
pub(crate) struct ChangedPages {
    start: u64,
    chunks: BTreeMap<u64, Box<[u64; WORDS]>>,
}

impl ChangedPages {
    /// An empty record for a request that starts at guest address `start`.
    pub(crate) fn new(start: u64) -> Self {
        ChangedPages {
            start,
            chunks: BTreeMap::new(),
        }
    }

    /// Whether no page is recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Records the pages of `run`, a guest range inside the request.
    pub(crate) fn mark(&mut self, run: PageRange) {
        let mut page = (run.start() - self.start) / PAGE_SIZE;
        let end = page + run.page_count();
        while page < end {
            let chunk = self
                .chunks
                .entry(page / CHUNK_PAGES)
                .or_insert_with(|| Box::new([0; WORDS]));
            let in_chunk = page % CHUNK_PAGES;
            let upto = (in_chunk + (end - page)).min(CHUNK_PAGES);
            let mut bit = in_chunk;
            while bit < upto {
                let low = bit % 64;
                let n = (upto - bit).min(64 - low);
                let ones = if n == 64 { u64::MAX } else { (1 << n) - 1 };
                chunk[(bit / 64) as usize] |= ones << low;
                bit += n;
            }
            page += upto - in_chunk;
        }
    }

    /// The recorded pages as guest ranges, in address order, each as long as it goes.
    pub(crate) fn runs(&self) -> impl Iterator<Item = PageRange> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            let first = self.next_with(at, true)?;
            let end = self.next_with(first, false).unwrap_or(first);
            at = end;
            PageRange::from_pages(first, end - first)
                .and_then(|r| r.checked_add(self.start))
                .ok()
        })
    }

    /// The first page at or after `from` whose bit is `set`; for a clear bit there is
    /// always one (past the last chunk every bit is clear).
    fn next_with(&self, from: u64, set: bool) -> Option<u64> {
        let mut page = from;
        loop {
            let index = page / CHUNK_PAGES;
            let Some(chunk) = self.chunks.get(&index) else {
                if !set {
                    return Some(page);
                }
                // The next chunk that holds any bit.
                let (&next, _) = self.chunks.range(index + 1..).next()?;
                page = next * CHUNK_PAGES;
                continue;
            };
            let mut bit = page % CHUNK_PAGES;
            while bit < CHUNK_PAGES {
                let word = chunk[(bit / 64) as usize];
                let word = if set { word } else { !word } >> (bit % 64);
                if word != 0 {
                    return Some(index * CHUNK_PAGES + bit + u64::from(word.trailing_zeros()));
                }
                bit = (bit / 64 + 1) * 64;
            }
            page = (index + 1) * CHUNK_PAGES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(first_page: u64, pages: u64) -> PageRange {
        PageRange::from_pages(first_page, pages).unwrap()
    }

    #[test]
    fn runs_come_back_merged_in_order_across_chunks_and_gaps() {
        let base = 1 << 30;
        let mut changed = ChangedPages::new(base);
        assert!(changed.is_empty());
        assert_eq!(changed.runs().count(), 0);
        let at = |first: u64, pages: u64| pr(base / PAGE_SIZE + first, pages);
        // Two runs that touch (one step ended inside a run), one across a chunk edge,
        // one far away, and single pages at word edges.
        changed.mark(at(10, 5));
        changed.mark(at(15, 3));
        changed.mark(at(CHUNK_PAGES - 2, 4));
        changed.mark(at(63, 1));
        changed.mark(at(64, 1));
        changed.mark(at(100 * CHUNK_PAGES + 7, 1));
        let runs: Vec<_> = changed.runs().collect();
        assert_eq!(
            runs,
            [
                at(10, 8),
                at(63, 2),
                at(CHUNK_PAGES - 2, 4),
                at(100 * CHUNK_PAGES + 7, 1)
            ]
        );
        // Three chunks hold bits, whatever lies between them.
        assert_eq!(changed.chunks.len(), 3);
    }

    proptest::proptest! {
        /// Whatever is marked, the runs are the maximal runs of marked pages, in order
        /// (starts drawn near word and chunk edges as often as anywhere).
        #[test]
        fn runs_are_those_of_a_naive_model(
            marks in proptest::collection::vec(
                (0u64..4, 0u64..3, 0u64..130, 1u64..300),
                0..16,
            )
        ) {
            let mut changed = ChangedPages::new(0);
            let mut model = std::collections::BTreeSet::new();
            for (chunk, word, bit, pages) in marks {
                let first = (chunk * CHUNK_PAGES + word * 64 + bit).saturating_sub(64);
                changed.mark(pr(first, pages));
                model.extend(first..first + pages);
            }
            let mut want: Vec<PageRange> = Vec::new();
            for page in model {
                match want.last_mut() {
                    Some(last) if last.end() == page * PAGE_SIZE => {
                        *last = pr(last.start() / PAGE_SIZE, last.page_count() + 1);
                    }
                    _ => want.push(pr(page, 1)),
                }
            }
            let got: Vec<PageRange> = changed.runs().collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_run_filling_whole_chunks_ends_where_the_bits_end() {
        let mut changed = ChangedPages::new(0);
        changed.mark(pr(0, 2 * CHUNK_PAGES));
        let runs: Vec<_> = changed.runs().collect();
        assert_eq!(runs, [pr(0, 2 * CHUNK_PAGES)]);
    }
}
