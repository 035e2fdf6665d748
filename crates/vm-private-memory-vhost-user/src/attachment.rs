// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What an attached mapper gives its owner: the table, errors, and detaching.

use std::sync::Arc;

use guest_memfd::PAGE_SIZE;
use vm_private_memory::Subscription;

use crate::error::Error;
use crate::listener::Mapper;
use crate::region::BackendRegion;

/// A [`VhostUserMapper`](crate::VhostUserMapper) attached to a memory: the backend's table holds exactly the
/// shared runs it was offered, until this is dropped or detached.
pub struct VhostUserAttachment {
    pub(crate) mapper: Arc<Mapper>,
    pub(crate) subscription: Option<Subscription>,
}

impl std::fmt::Debug for VhostUserAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserAttachment")
            .field("budget", &self.mapper.budget)
            .field("slots_used", &self.slots_used())
            .finish_non_exhaustive()
    }
}

impl VhostUserAttachment {
    /// The backend's memory table as this mapper made it, in guest address order.
    pub fn regions(&self) -> Vec<BackendRegion> {
        self.mapper.lock().table.values().copied().collect()
    }

    /// How many regions (memory slots) this mapper holds in the backend's table.
    pub fn slots_used(&self) -> usize {
        self.mapper.lock().table.len()
    }

    /// How many regions this mapper may hold in the backend's table.
    pub fn slot_budget(&self) -> usize {
        self.mapper.budget
    }

    /// What the backend answered to `GET_MAX_MEM_SLOTS`.
    pub fn backend_slots(&self) -> u64 {
        self.mapper.backend_slots
    }

    /// Whether the page holding `gpa` is in the backend's table now.
    pub fn is_mapped(&self, gpa: u64) -> bool {
        let page = gpa & !(PAGE_SIZE - 1);
        self.mapper
            .lock()
            .table
            .range(..=page)
            .next_back()
            .is_some_and(|(_, r)| r.guest.end() > page)
    }

    /// Takes the errors that no conversion could carry. When a region is split by a
    /// revocation, the parts that stay shared are added back after the removal; if the
    /// backend refuses one, the revocation still stands (the conversion goes on) and that
    /// part is missing from the backend's table until it is offered again. And when a
    /// refused conversion to shared takes back the regions it added, a removal the
    /// backend refuses keeps the conversion (rather than turn a page the backend may map
    /// private). When a revocation stops halfway (the backend refuses the removal of
    /// one of several regions over the range), the parts of the range already removed
    /// are added back, since the range stays shared; one that cannot be (over the slot
    /// budget, refused) is missing from the table until a conversion offers it again.
    /// Each error names the range.
    pub fn take_errors(&self) -> Vec<Error> {
        std::mem::take(&mut self.mapper.lock().errors)
    }

    /// Removes every region from the backend's table (each acknowledged), then stops
    /// following conversions.
    ///
    /// # Errors
    ///
    /// [`Error::Remove`] for the first region the backend did not acknowledge: it may
    /// still map it, and the mapper keeps following its conversions so that it cannot
    /// turn private unnoticed (a conversion of it to private tries the removal again,
    /// and is refused if it fails).
    pub fn detach(mut self) -> Result<(), Error> {
        self.release()
    }

    fn release(&mut self) -> Result<(), Error> {
        match self.mapper.remove_all() {
            None => {
                drop(self.subscription.take());
                Ok(())
            }
            Some(e) => {
                // Still subscribed: the regions left cannot go private unnoticed.
                std::mem::forget(self.subscription.take());
                Err(e)
            }
        }
    }
}

impl Drop for VhostUserAttachment {
    /// As [`VhostUserAttachment::detach`]; a region the backend does not let go keeps the
    /// memory's subscription alive (it is leaked), so that its pages cannot turn private.
    fn drop(&mut self) {
        let _ = self.release();
    }
}
