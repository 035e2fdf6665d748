// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Claims on ranges of a guest_memfd: one user (a region of guest memory) per byte of
//! the file, whichever memory, VM binding or process-local list the users belong to.
//!
//! KVM refuses to bind one range of a guest_memfd to two memslots, but only when both
//! are bound through it: a VMM that binds memslots itself, or a second memory over the
//! same file, would otherwise map the same pages at two guest addresses, one private and
//! one shared. The claims live with the file (every clone of a `GuestMemfd` shares them),
//! so a range is free only once its last user released it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::range::PageRange;

/// The ranges of one file that users hold.
pub(crate) type Claims = Arc<Mutex<Vec<PageRange>>>;

/// A range of a guest_memfd that one user holds ([`crate::GuestMemfd::claim`]): no other
/// claim may overlap it until it is released, by [`RangeClaim::release`] or by dropping
/// it. A claim that is leaked (`std::mem::forget`, as for memory KVM may still map) holds
/// its range for good.
#[derive(Debug)]
pub struct RangeClaim {
    claims: Claims,
    range: PageRange,
    released: AtomicBool,
}

impl RangeClaim {
    /// Claims `range` in `claims`, if no claim there overlaps it.
    pub(crate) fn take(claims: &Claims, range: PageRange) -> Result<Self> {
        let mut held = claims.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = held.iter().find(|c| c.intersection(&range).is_some()) {
            return Err(Error::RangeClaimed {
                requested: range,
                claimed: *other,
            });
        }
        held.push(range);
        Ok(RangeClaim {
            claims: Arc::clone(claims),
            range,
            released: AtomicBool::new(false),
        })
    }

    /// The bytes of the file claimed.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// Gives the range back (once; later calls and the drop do nothing).
    pub fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut held = self.claims.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = held.iter().position(|c| *c == self.range) {
            held.swap_remove(i);
        }
    }
}

impl Drop for RangeClaim {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pr(start: u64, len: u64) -> PageRange {
        PageRange::new(start, len).unwrap()
    }

    #[test]
    fn overlapping_claims_are_refused_until_released_and_a_leaked_one_holds_for_good() {
        let claims = Claims::default();
        let first = RangeClaim::take(&claims, pr(0, 0x4000)).unwrap();
        let err = RangeClaim::take(&claims, pr(0x3000, 0x2000)).unwrap_err();
        assert!(
            matches!(err, Error::RangeClaimed { requested, claimed }
                if requested == pr(0x3000, 0x2000) && claimed == pr(0, 0x4000)),
            "{err}"
        );
        // Next to it is free.
        let second = RangeClaim::take(&claims, pr(0x4000, 0x1000)).unwrap();
        first.release();
        first.release();
        let again = RangeClaim::take(&claims, pr(0x3000, 0x1000)).unwrap();
        drop(again);
        drop(second);
        assert!(claims.lock().unwrap().is_empty());
        std::mem::forget(RangeClaim::take(&claims, pr(0, 0x1000)).unwrap());
        assert!(RangeClaim::take(&claims, pr(0, 0x1000)).is_err());
    }
}
