// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The conversion of one run: a range inside one in-place region whose pages are all in
//! the other state. This is what a guest's 4 KiB `KVM_HC_MAP_GPA_RANGE` asks for, many
//! thousands of times a second, so it skips the general path's plan (a list of changed
//! ranges, each looked up again per step) and makes the same steps, in the same order
//! and with the same rollback, on the one range directly. In 4 KiB steps this took the
//! overhead over the raw punch from about 10% to about 5% (`BENCHMARKS.md`, conversion
//! in 4 KiB steps).

use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::undo::without;
use super::{wait_for_host_accesses, ContentMode, ConversionReport, StepLimit, Undone};
use crate::attributes::PageState;
use crate::error::{Error, Result};
use crate::guard::DirtyBitmap;
use crate::listener::{Listeners, Refusal};
use crate::memory::{gpa, Engine, GuestMemoryPrivate, PrivateMemoryManager};
use crate::region::GuestRegionPrivate;
use crate::strategy::Strategy;

/// A range that one run of the in-place strategy converts.
pub(super) struct OneRun<'a, B> {
    region: &'a GuestRegionPrivate<B>,
    /// The guest-physical range.
    guest: PageRange,
    /// Its first page in the region.
    first_page: u64,
    /// Its pages in the region's guest_memfd.
    in_file: PageRange,
}

impl<'a, B: DirtyBitmap> OneRun<'a, B> {
    /// `range` as one run towards `to`, if it is one: it lies inside one in-place region
    /// of `snapshot`, every page of it is in the other state, and it fits in `limit`.
    #[inline]
    pub(super) fn of(
        snapshot: &'a GuestMemoryPrivate<B>,
        range: PageRange,
        to: PageState,
        limit: StepLimit,
    ) -> Option<Self> {
        if range.len() > limit.bytes {
            return None;
        }
        let region = snapshot.find_region(GuestAddress(range.start()))?;
        let inside = region.guest_range();
        if region.strategy() != Strategy::InPlace || range.end() > inside.end() {
            return None;
        }
        let first_page = (range.start() - inside.start()) / PAGE_SIZE;
        let in_file = range
            .checked_sub(inside.start())
            .and_then(|in_region| in_region.checked_add(region.gmem_offset()))
            .ok()?;
        region
            .attributes()
            .all(first_page, range.page_count(), to.flipped())
            .then_some(OneRun {
                region,
                guest: range,
                first_page,
                in_file,
            })
    }

    /// The region the run lies in.
    #[inline]
    pub(super) fn region(&self) -> &'a GuestRegionPrivate<B> {
        self.region
    }

    #[inline]
    fn flip(&self, to: PageState) {
        self.region
            .flip(self.first_page, self.guest.page_count(), to);
    }

    /// Punches the run in the region's guest_memfd.
    #[inline]
    fn punch(&self) -> Result<()> {
        self.region
            .gmem()
            .discard(self.in_file)
            .map_err(|source| Error::Punch {
                range: gpa(self.guest),
                source,
            })
    }
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Converts `run` to `to`, in the general path's order (`run_steps`): towards
    /// private, listeners hear `discard`, the bits change, host accesses in flight are
    /// waited for, then the page is punched; towards shared, the page is punched before
    /// the host may see it, then the bits change and listeners are offered it. On failure
    /// what was done is undone, newest first, as there.
    pub(super) fn convert_one_run(
        &self,
        engine: &Engine<B>,
        run: OneRun<'_, B>,
        to: PageState,
        mode: ContentMode,
    ) -> Result<ConversionReport> {
        let guest = std::slice::from_ref(&run.guest);
        let discard = mode == ContentMode::Discard;
        // While nothing is subscribed the notification calls are skipped outright: their
        // code is cold after a punch, and a call into it costs more than its work.
        let held = self.listeners.hold();
        let listening = held.is_some();
        match to {
            PageState::Private => {
                if listening {
                    self.listeners
                        .discard(guest)
                        .map_err(Undone::of_revocation)?;
                }
                run.flip(PageState::Private);
                let hidden = wait_for_host_accesses(engine, &engine.current, gpa(run.guest))
                    .and_then(|()| if discard { run.punch() } else { Ok(()) });
                if let Err(e) = hidden {
                    run.flip(PageState::Shared);
                    let listeners_refused = if listening {
                        self.listeners.restore(guest).into_iter().map(gpa).collect()
                    } else {
                        Vec::new()
                    };
                    return Err(Undone {
                        listeners_refused,
                        ..Undone::default()
                    }
                    .into_error(e));
                }
            }
            PageState::Shared => {
                if discard {
                    run.punch()?;
                }
                run.flip(PageState::Shared);
                if listening {
                    if let Err(refusal) = self.listeners.populate(guest) {
                        return Err(self.undo_one_run(engine, &run, refusal));
                    }
                }
            }
        }
        Ok(ConversionReport {
            pages_changed: run.guest.page_count(),
            bytes_discarded: if discard { run.guest.len() } else { 0 },
            runs_changed: 1,
            lock_holds: 1,
            ..ConversionReport::default()
        })
    }
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Undoes a conversion of `run` to shared that a listener refused: the listeners
    /// that accepted it let go of it, and the run turns private again, except the parts
    /// a listener cannot let go of, which stay shared (as in the general path's undo).
    #[cold]
    fn undo_one_run(&self, engine: &Engine<B>, run: &OneRun<'_, B>, refusal: Refusal) -> Error {
        let held = Listeners::withdraw(refusal.accepted);
        let mut back = without(std::slice::from_ref(&run.guest), &held);
        let region_start = run.region.guest_range().start();
        let flip_back = |back: &[PageRange], state: PageState| {
            for part in back {
                let first = (part.start() - region_start) / PAGE_SIZE;
                run.region.flip(first, part.page_count(), state);
            }
        };
        flip_back(&back, PageState::Private);
        // A host access that passed its check while the run was shared may still touch
        // it: wait, as a conversion to private does; past the memory's patience the run
        // stays shared (and is named).
        if wait_for_host_accesses(engine, &engine.current, gpa(run.guest)).is_err() {
            flip_back(&back, PageState::Shared);
            back.clear();
        }
        Undone {
            kept_shared: without(std::slice::from_ref(&run.guest), &back)
                .into_iter()
                .map(gpa)
                .collect(),
            ..Undone::default()
        }
        .into_error(Error::ListenerRefused {
            range: gpa(refusal.range),
            reason: refusal.reason,
        })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {

    use super::*;
    use crate::MemoryBuilder;

    const MIB: u64 = 1 << 20;

    fn pr(start: u64, len: u64) -> PageRange {
        PageRange::new(start, len).unwrap()
    }

    /// The direct path is taken for exactly one run of one in-place region that fits the
    /// step, and its punch lands at the region's own offset in a file shared by regions.
    #[test]
    fn one_run_is_recognised_only_for_one_run_of_one_in_place_region() {
        // Real KVM where it has in-place guest_memfd, else the stand-in for it.
        let vm = guest_memfd::stand_in::vm_for_logic_tests();
        // Two regions in one file: the second one's pages start 2 MiB into it.
        let memory = MemoryBuilder::new(vm)
            .region_at(MIB, 2 * MIB)
            .region_at(8 * MIB, 2 * MIB)
            .strategy(Strategy::InPlace)
            .single_file(true)
            .initial_state(PageState::Private)
            .build()
            .unwrap();
        memory
            .convert(pr(8 * MIB + 2 * PAGE_SIZE, PAGE_SIZE), PageState::Shared)
            .unwrap();
        let engine = memory.lock_engine();
        let of = |start, len, to, limit| {
            OneRun::of(&engine.current, pr(start, len), to, limit).map(|run| {
                (
                    run.region.guest_range().start(),
                    run.first_page,
                    run.in_file,
                )
            })
        };
        let none = StepLimit::NONE;
        assert_eq!(
            of(MIB + 4 * PAGE_SIZE, 8 * PAGE_SIZE, PageState::Shared, none),
            Some((MIB, 4, pr(4 * PAGE_SIZE, 8 * PAGE_SIZE)))
        );
        assert_eq!(
            of(
                8 * MIB + 3 * PAGE_SIZE,
                4 * PAGE_SIZE,
                PageState::Shared,
                none
            ),
            Some((8 * MIB, 3, pr(2 * MIB + 3 * PAGE_SIZE, 4 * PAGE_SIZE)))
        );
        assert_eq!(
            of(8 * MIB + 2 * PAGE_SIZE, PAGE_SIZE, PageState::Private, none),
            Some((8 * MIB, 2, pr(2 * MIB + 2 * PAGE_SIZE, PAGE_SIZE)))
        );
        // Pages already in the target state, or a page of each state.
        assert_eq!(of(MIB, PAGE_SIZE, PageState::Private, none), None);
        assert_eq!(of(8 * MIB, 4 * PAGE_SIZE, PageState::Shared, none), None);
        // Past a region's end, outside guest memory, over a step's byte bound.
        assert_eq!(
            of(3 * MIB - PAGE_SIZE, 2 * PAGE_SIZE, PageState::Shared, none),
            None
        );
        assert_eq!(of(4 * MIB, PAGE_SIZE, PageState::Shared, none), None);
        let small = StepLimit {
            runs: 1,
            bytes: 4 * PAGE_SIZE,
        };
        assert_eq!(of(MIB, 8 * PAGE_SIZE, PageState::Shared, small), None);
        assert!(of(MIB, 4 * PAGE_SIZE, PageState::Shared, small).is_some());
    }
}
