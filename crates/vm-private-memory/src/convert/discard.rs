// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Freeing pages without changing their state (balloon, free page reporting), in
//! bounded steps.

use guest_memfd::{PageRange, PAGE_SIZE};

use super::{plan_step, Piece, StepLimit};
use crate::attributes::PageState;
use crate::error::{Error, Result};
use crate::guard::DirtyBitmap;
use crate::listener::in_callback;
use crate::memory::{gpa, PrivateMemoryManager};

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Frees `range` (balloon, free page reporting): listeners hear `discard`, every
    /// page is punched from the side that backs it, and the guest re-faults fresh zeroed
    /// pages. States do not change. Returns the bytes punched. Shared pages freed are
    /// marked dirty in the regions' dirty bitmaps (their bytes changed, to zeros).
    ///
    /// The range is freed in steps of at most [`crate::GUEST_RUNS_PER_STEP`] runs and
    /// [`crate::GUEST_BYTES_PER_STEP`] bytes, each under one hold of the conversion lock
    /// (listeners hear each step's part before it is punched), so that a guest reporting
    /// a fragmented range cannot hold the lock for long.
    ///
    /// # Errors
    ///
    /// [`Error::Reentrant`] if called from a listener callback and
    /// [`Error::OutsideGuestMemory`] if `range` reaches outside every region (nothing is
    /// done); [`Error::ListenerRefused`] if a listener panics in `discard` (the steps
    /// before were done; [`Error::RollbackFailed`] if listeners told before it then
    /// refused their ranges back, named in `listeners_refused`); [`Error::Punch`] if a
    /// punch fails, after listeners heard
    /// `discard` and the runs before it were punched (they read as zeros; nothing else
    /// changed).
    pub fn discard(&self, range: PageRange) -> Result<u64> {
        if in_callback() {
            return Err(Error::Reentrant { range: gpa(range) });
        }
        self.check_inside(range)?;
        let mut bytes = 0;
        Self::in_steps(range, |rest| {
            let (step, next) = self.discard_step(rest)?;
            bytes += step;
            Ok(next)
        })?;
        Ok(bytes)
    }

    /// Frees the start of `range` under one hold of the conversion lock, in a step of
    /// [`StepLimit::GUEST`]. Returns the bytes punched and where it stopped.
    fn discard_step(&self, range: PageRange) -> Result<(u64, u64)> {
        let engine = self.lock_engine();
        let _listeners = self.listeners.hold();
        let mut pieces = Vec::new();
        let next = plan_step(
            &engine.current,
            range,
            StepLimit::GUEST,
            |_| true,
            |region, first_page, pages, state| {
                pieces.push((
                    Piece {
                        region,
                        first_page,
                        pages,
                    },
                    state,
                ));
                Ok(())
            },
        )?;
        let told = PageRange::new(range.start(), next - range.start())?;
        self.listeners
            .discard(&[told])
            .map_err(super::Undone::of_revocation)?;
        let mut bytes = 0;
        for (piece, state) in pieces {
            // The side that backs a page is the one a conversion *to* the other state
            // would punch.
            bytes += piece.discard_old_side(state.flipped())?;
            // A shared page's bytes changed (to zeros) as surely as if the host had
            // written them: a migration pass that sent them must send them again.
            if state == PageState::Shared {
                let offset = piece.first_page * PAGE_SIZE;
                piece
                    .region
                    .dirty_bitmap()
                    .mark_dirty(offset as usize, (piece.pages * PAGE_SIZE) as usize);
            }
        }
        Ok((bytes, next))
    }
}
