// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A whole change of page states (a restored map), applied under one hold of the
//! conversion lock and undone as a whole on failure.

use guest_memfd::PageRange;

use super::{left_changes, note_conversions, ContentMode, Plan, Progress, Undone};
use crate::attributes::PageState;
use crate::error::{ByteRange, Error, Result};
use crate::guard::DirtyBitmap;
use crate::listener::in_callback;
use crate::memory::{GuestMemoryPrivate, PrivateMemoryManager};
use crate::strategy::{Strategy, UnavailableReason};

/// The pages a whole change turns private and shared: guest-physical ranges, each inside
/// one region, in address order, in the state they leave.
#[derive(Debug, Default)]
pub(crate) struct Retarget {
    /// Ranges, now shared, that become private.
    pub(crate) to_private: Vec<PageRange>,
    /// Ranges, now private, that become shared.
    pub(crate) to_shared: Vec<PageRange>,
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Under one hold of the conversion lock: asks `plan` (given the engine's own list
    /// of regions) what to change, then turns `to_private` private and `to_shared`
    /// shared, all or nothing. On any failure the bits, KVM's view and the listeners'
    /// view are as before (except what [`Error::RollbackFailed`] names), and the error
    /// is returned.
    ///
    /// Content: a page becoming private keeps it (hiding is safe). A page becoming
    /// shared follows `shared`: [`ContentMode::Discard`] punches it before the host may
    /// see it, [`ContentMode::Preserve`] (in-place only) keeps it. The dual strategy
    /// punches the sides no longer used only once everything else has succeeded.
    ///
    /// `range` names the change in a [`Error::Reentrant`] refusal.
    pub(crate) fn retarget(
        &self,
        range: ByteRange,
        shared: ContentMode,
        plan: impl FnOnce(&GuestMemoryPrivate<B>) -> Result<Retarget>,
    ) -> Result<()> {
        if in_callback() {
            return Err(Error::Reentrant { range });
        }
        let dual = self.strategy == Strategy::Dual;
        if dual && shared == ContentMode::Preserve {
            return Err(Error::StrategyUnavailable {
                strategy: self.strategy,
                reason: UnavailableReason::PreserveNeedsInPlace,
            });
        }
        let engine = self.lock_engine();
        let _listeners = self.listeners.hold();
        let snapshot = &*engine.current;
        let Retarget {
            to_private,
            to_shared,
        } = plan(snapshot)?;
        let private = Plan {
            snapshot,
            requested: range,
            changed: to_private,
        };
        let shared_plan = Plan {
            snapshot,
            requested: private.requested,
            changed: to_shared,
        };
        let applied = (|| -> Result<()> {
            // A failure, with what the rollback could not put back.
            let failed = |e: Error, undone: Undone| undone.into_error(e);
            // Private first: hiding pages never shows the host anything. The dual strategy's
            // punches wait until the end (`Preserve` here means "not yet").
            let mut made_private = Progress::default();
            if !private.changed.is_empty() {
                let mode = ContentMode::Preserve;
                if let Err(e) = self.run_steps(
                    &engine,
                    &private,
                    PageState::Private,
                    mode,
                    &mut made_private,
                ) {
                    let unknown = self.undo(&engine, &private, made_private);
                    return Err(failed(e, unknown));
                }
            }
            let mut made_shared = Progress::default();
            if !shared_plan.changed.is_empty() {
                // Dual: whatever reached the shared side while these pages were private must
                // not greet the host (the pages were private, so nothing is lost).
                if dual {
                    if let Err(e) = shared_plan.pieces().try_for_each(|p| p.clear_shared_side()) {
                        let unknown = self.undo(&engine, &private, made_private);
                        return Err(failed(e, unknown));
                    }
                }
                let mode = if dual { ContentMode::Preserve } else { shared };
                if let Err(e) = self.run_steps(
                    &engine,
                    &shared_plan,
                    PageState::Shared,
                    mode,
                    &mut made_shared,
                ) {
                    let mut unknown = self.undo(&engine, &shared_plan, made_shared);
                    unknown.extend(self.undo(&engine, &private, made_private));
                    return Err(failed(e, unknown));
                }
            }
            if dual {
                let punched = private
                    .pieces()
                    .try_for_each(|p| p.discard_old_side(PageState::Private).map(drop))
                    .and_then(|()| {
                        shared_plan
                            .pieces()
                            .try_for_each(|p| p.discard_old_side(PageState::Shared).map(drop))
                    });
                if let Err(e) = punched {
                    let mut unknown = self.undo(&engine, &shared_plan, made_shared);
                    unknown.extend(self.undo(&engine, &private, made_private));
                    return Err(failed(e, unknown));
                }
            }
            Ok(())
        })();
        if left_changes(&applied) {
            note_conversions(private.pieces().map(|p| p.region));
            note_conversions(shared_plan.pieces().map(|p| p.region));
        }
        applied
    }
}
