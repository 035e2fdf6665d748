// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Undoing a conversion that failed part way, and saying what could not be undone.
//!
//! A rollback puts back, newest first, what the conversion did. Two things can stop it
//! from putting everything back, and the caller hears of both
//! ([`Error::RollbackFailed`]): KVM may refuse to set its view back (that view is then
//! unknown), and a listener may be unable to let go of a range it accepted (it panicked
//! in `discard`: a device may still map it). Such a range must not turn private, so the
//! conversion to shared is left standing for it, and only for it.

use guest_memfd::PageRange;

use super::{wait_for_host_accesses, Piece, Plan, Progress};
use crate::attributes::PageState;
use crate::error::{ByteRange, Error};
use crate::guard::DirtyBitmap;
use crate::kvm_view::set_kvm_view;
use crate::listener::{Listeners, Revocation};
use crate::memory::{gpa, Engine, PrivateMemoryManager};
use crate::strategy::Strategy;

/// What a rollback could not put back.
#[derive(Default)]
pub(crate) struct Undone {
    /// Ranges whose state in KVM is unknown.
    pub(crate) unknown: Vec<ByteRange>,
    /// Ranges listeners refused to take back.
    pub(crate) listeners_refused: Vec<ByteRange>,
    /// Ranges left shared because a listener could not let go of them, or making them
    /// private again failed.
    pub(crate) kept_shared: Vec<ByteRange>,
    /// Ranges left private because making them shared again failed.
    pub(crate) kept_private: Vec<ByteRange>,
}

impl Undone {
    /// Adds what another rollback could not put back.
    pub(crate) fn extend(&mut self, other: Undone) {
        self.unknown.extend(other.unknown);
        self.listeners_refused.extend(other.listeners_refused);
        self.kept_shared.extend(other.kept_shared);
        self.kept_private.extend(other.kept_private);
    }

    /// The error for a step that failed with `cause` and was rolled back this far.
    pub(crate) fn into_error(self, cause: Error) -> Error {
        if self.unknown.is_empty()
            && self.listeners_refused.is_empty()
            && self.kept_shared.is_empty()
            && self.kept_private.is_empty()
        {
            return cause;
        }
        Error::RollbackFailed {
            cause: Box::new(cause),
            unknown: self.unknown.into(),
            listeners_refused: self.listeners_refused.into(),
            kept_shared: self.kept_shared.into(),
            kept_private: self.kept_private.into(),
        }
    }

    /// The error for a revocation a listener stopped: [`Error::ListenerRefused`], or
    /// [`Error::RollbackFailed`] if listeners told before it refused their ranges back.
    pub(crate) fn of_revocation(stopped: Revocation) -> Error {
        Undone {
            listeners_refused: stopped.refused_back.into_iter().map(gpa).collect(),
            ..Undone::default()
        }
        .into_error(Error::ListenerRefused {
            range: gpa(stopped.range),
            reason: stopped.reason,
        })
    }
}

/// `ranges` (sorted, disjoint) without the pages of `holes` (any order, may overlap):
/// each part lies inside the range it comes from.
pub(crate) fn without(ranges: &[PageRange], holes: &[PageRange]) -> Vec<PageRange> {
    let mut holes = holes.to_vec();
    holes.sort_by_key(PageRange::start);
    let mut parts = Vec::new();
    for range in ranges {
        let mut at = range.start();
        for hole in holes.iter().filter_map(|h| h.intersection(range)) {
            if hole.start() > at {
                parts.extend(PageRange::new(at, hole.start() - at).ok());
            }
            at = at.max(hole.end());
        }
        if at < range.end() {
            parts.extend(PageRange::new(at, range.end() - at).ok());
        }
    }
    parts
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Undoes what `done` says was done, newest first, and returns what could not be
    /// put back. Ranges a listener cannot let go of stay shared: bits, KVM's view, and
    /// (dual) their private side punched as a finished conversion would have.
    pub(super) fn undo(&self, engine: &Engine<B>, plan: &Plan<'_, B>, done: Progress) -> Undone {
        let held = Listeners::withdraw(done.populated);
        // What goes back: everything, or (rarely) everything but what a listener holds.
        let (owned_back, mut kept) = if held.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            let back = without(&plan.changed, &held);
            let kept = without(&plan.changed, &back);
            (back, kept)
        };
        let back: &[PageRange] = if held.is_empty() {
            &plan.changed
        } else {
            &owned_back
        };
        let mut unknown = Vec::new();
        let kvm_changed = match (done.kvm, done.kvm_partial) {
            (Some(state), _) => Some((state, plan.changed.len())),
            (None, partial) => partial,
        };
        if let Some((state, count)) = kvm_changed {
            let changed = &plan.changed[..count];
            let changed_back = without(changed, &kept);
            let targets = if kept.is_empty() {
                changed
            } else {
                &changed_back
            };
            for range in targets {
                if set_kvm_view(&*self.vm, *range, state.flipped()).is_err() {
                    unknown.push(gpa(*range));
                }
            }
        }
        if let Some(state) = done.bits {
            for range in back {
                Piece::of(plan.snapshot, *range).set_bits(state.flipped());
            }
            // In place, pages going private again may still be touched by a host access
            // that passed its check while they were shared: wait, as a conversion to
            // private does. Past the memory's patience they stay shared (and are named).
            // (Dual: the host's accesses reach the shared side, never private content.)
            let in_place = self.strategy == Strategy::InPlace;
            if in_place
                && state == PageState::Shared
                && wait_for_host_accesses(engine, plan.snapshot, plan.requested).is_err()
            {
                for range in back {
                    Piece::of(plan.snapshot, *range).set_bits(PageState::Shared);
                }
                kept.extend_from_slice(back);
            }
        }
        let mut listeners_refused = Vec::new();
        if done.notified_discard {
            listeners_refused = self
                .listeners
                .restore(&plan.changed)
                .into_iter()
                .map(gpa)
                .collect();
        }
        // Pages left shared are a finished conversion to shared: with the dual strategy
        // their private side goes, as the last step would have done. If that punch
        // fails they stay shared all the same; the guest's old private content then
        // waits in the guest_memfd, out of the host's reach.
        if self.strategy == Strategy::Dual && done.bits == Some(PageState::Shared) {
            for range in &kept {
                let _ = Piece::of(plan.snapshot, *range).discard_old_side(PageState::Shared);
            }
        }
        Undone {
            unknown,
            listeners_refused,
            kept_shared: kept.into_iter().map(gpa).collect(),
            kept_private: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(start: u64, pages: u64) -> PageRange {
        PageRange::new(start * 4096, pages * 4096).unwrap()
    }

    #[test]
    fn ranges_without_holes_keep_every_page_outside_them() {
        let ranges = [pr(0, 4), pr(10, 6)];
        assert_eq!(without(&ranges, &[]), ranges);
        assert_eq!(
            without(&ranges, &[pr(1, 2)]),
            [pr(0, 1), pr(3, 1), pr(10, 6)]
        );
        // Holes out of order, overlapping each other, spanning ranges.
        assert_eq!(
            without(&ranges, &[pr(12, 2), pr(3, 8), pr(13, 2)]),
            [pr(0, 3), pr(11, 1), pr(15, 1)]
        );
        assert_eq!(without(&ranges, &[pr(0, 20)]), []);
    }
}
