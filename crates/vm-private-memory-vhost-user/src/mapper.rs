// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The listener that keeps a vhost-user backend's memory table equal to the shared runs.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use guest_memfd::{PageRange, PAGE_SIZE};

pub use crate::error::Error;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostUserMemoryRegionInfo;
use vm_private_memory::{MemoryListener, PrivateMemory, SharedPages, Strategy, Subscription};

/// The vhost-user protocol features a [`VhostUserMapper`] needs acknowledged:
/// `CONFIGURE_MEM_SLOTS` (`ADD_MEM_REG`, `REM_MEM_REG`, `GET_MAX_MEM_SLOTS`) and
/// `REPLY_ACK` (the backend confirms each removal).
pub const REQUIRED_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.union(VhostUserProtocolFeatures::REPLY_ACK);

/// One region of the backend's memory table, as the mapper added it (`ADD_MEM_REG`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRegion {
    /// Its guest-physical range: a run of shared pages, or part of one.
    pub guest: PageRange,
    /// The frontend's host address of its first byte (the message's `userspace_addr`,
    /// which the backend uses to translate the frontend's vring addresses).
    pub userspace_addr: u64,
    /// Its offset in the sealed memfd of shared pages (the message's `mmap_offset`).
    pub mmap_offset: u64,
}

impl BackendRegion {
    fn info(&self, fd: RawFd) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.guest.start(),
            memory_size: self.guest.len(),
            userspace_addr: self.userspace_addr,
            mmap_offset: self.mmap_offset,
            mmap_handle: fd,
        }
    }

    /// The part of the region over `part`, which lies inside it.
    fn clip(&self, part: PageRange) -> BackendRegion {
        let delta = part.start() - self.guest.start();
        BackendRegion {
            guest: part,
            userspace_addr: self.userspace_addr + delta,
            mmap_offset: self.mmap_offset + delta,
        }
    }
}

/// Keeps a vhost-user backend's memory table equal to the shared runs of guest memory,
/// and revokes the backend's mapping of a range (waiting for its acknowledgement) before
/// the range turns private. See the crate documentation for the protocol. Make it with
/// the frontend, configure it, then [`VhostUserMapper::attach`] it to the memory.
pub struct VhostUserMapper {
    frontend: Frontend,
    budget: usize,
    backend_slots: u64,
}

impl std::fmt::Debug for VhostUserMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserMapper")
            .field("budget", &self.budget)
            .field("backend_slots", &self.backend_slots)
            .finish_non_exhaustive()
    }
}

/// The parts of `range` not covered by `table`'s regions, in order.
fn uncovered(table: &BTreeMap<u64, BackendRegion>, range: PageRange) -> Vec<PageRange> {
    let mut covered: Vec<PageRange> = table
        .range(..range.end())
        .rev()
        .take_while(|(_, r)| r.guest.end() > range.start())
        .map(|(_, r)| r.guest)
        .collect();
    covered.reverse();
    let mut gaps = Vec::new();
    let mut at = range.start();
    for c in covered {
        if c.start() > at {
            gaps.extend(PageRange::new(at, c.start() - at).ok());
        }
        at = at.max(c.end());
    }
    if at < range.end() {
        gaps.extend(PageRange::new(at, range.end() - at).ok());
    }
    gaps
}

/// The most regions a mapper keeps in a backend's table, whatever the backend answers:
/// the vhost-user specification's `VHOST_USER_MAX_RAM_SLOTS`.
pub const MAX_SLOTS: usize = 512;

/// The slot budget for a backend that answered `GET_MAX_MEM_SLOTS` with `answered`: a
/// hostile or broken answer cannot make it unbounded.
fn slot_budget(answered: u64) -> usize {
    usize::try_from(answered).map_or(MAX_SLOTS, |n| n.min(MAX_SLOTS))
}

impl VhostUserMapper {
    /// A mapper for the backend behind `frontend`, for `memory`. It maps nothing until
    /// attached ([`VhostUserMapper::attach`]).
    ///
    /// `acked` is what the frontend acknowledged with `set_protocol_features`; it must
    /// hold [`REQUIRED_PROTOCOL_FEATURES`], and the backend must offer them (asked with
    /// `GET_PROTOCOL_FEATURES`, so the frontend must have asked `get_features` first).
    /// The backend's `GET_MAX_MEM_SLOTS` (at most [`MAX_SLOTS`]) is the slot budget.
    /// From here on every message of `frontend` asks for a reply (`NEED_REPLY`): each
    /// `ADD_MEM_REG` and
    /// `REM_MEM_REG` waits for the backend's acknowledgement. The VMM must not send
    /// `SET_MEM_TABLE` for this memory: the table is built region by region.
    ///
    /// # Errors
    ///
    /// [`Error::NoShareableFile`] for in-place memory (checked first, before any
    /// message); [`Error::NotNegotiated`], [`Error::NotOffered`] or [`Error::Query`]
    /// if the protocol features or the slot count are not there.
    pub fn new(
        mut frontend: Frontend,
        acked: VhostUserProtocolFeatures,
        memory: &PrivateMemory,
    ) -> Result<Self, Error> {
        shareable(memory)?;
        let missing = REQUIRED_PROTOCOL_FEATURES.difference(acked);
        if !missing.is_empty() {
            return Err(Error::NotNegotiated { missing });
        }
        let offered = frontend
            .get_protocol_features()
            .map_err(|source| Error::Query {
                request: "GET_PROTOCOL_FEATURES",
                source,
            })?;
        let missing = REQUIRED_PROTOCOL_FEATURES.difference(offered);
        if !missing.is_empty() {
            return Err(Error::NotOffered { missing });
        }
        let backend_slots = frontend
            .get_max_mem_slots()
            .map_err(|source| Error::Query {
                request: "GET_MAX_MEM_SLOTS",
                source,
            })?;
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        Ok(VhostUserMapper {
            frontend,
            budget: slot_budget(backend_slots),
            backend_slots,
        })
    }

    /// Allows at most `slots` regions in the backend's table (never more than the
    /// backend's `GET_MAX_MEM_SLOTS`): leave room for regions the VMM adds itself.
    pub fn with_slot_budget(mut self, slots: usize) -> Self {
        self.budget = slots.min(slot_budget(self.backend_slots));
        self
    }

    /// How many regions this mapper may hold in the backend's table.
    pub fn slot_budget(&self) -> usize {
        self.budget
    }

    /// What the backend answered to `GET_MAX_MEM_SLOTS`.
    pub fn backend_slots(&self) -> u64 {
        self.backend_slots
    }

    /// Adds every run of `range` that is shared now to the backend's table and follows
    /// every later conversion in `range`, with nothing missed in between
    /// ([`PrivateMemory::subscribe_with_replay`]). Host addresses and files come from
    /// `memory`'s own list of regions ([`PrivateMemory::shared_pages`]).
    ///
    /// The returned attachment holds the backend's table: keep it for as long as the
    /// backend serves the guest. Dropping it (or [`VhostUserAttachment::detach`])
    /// removes every region and only then stops following conversions, so no page can
    /// turn private while the backend still maps it.
    ///
    /// A region added later with shared pages ([`PrivateMemory::add_region`]) is added
    /// as it is added (a refusal fails the addition). Pages freed by
    /// [`PrivateMemory::discard`] (a balloon) are removed with it and stay so until a
    /// conversion next offers them: their memory is meant to go back to the host. A
    /// page the mapper holds is never private.
    ///
    /// # Errors
    ///
    /// [`Error::NoShareableFile`] for in-place memory; [`Error::Subscribe`] if the runs
    /// shared now cannot all be added (over the slot budget, or the backend refused
    /// one; the reason is an [`Error`]): nothing stays added.
    pub fn attach(
        self,
        memory: &PrivateMemory,
        range: PageRange,
    ) -> Result<VhostUserAttachment, Error> {
        shareable(memory)?;
        let mapper = Arc::new(Mapper {
            budget: self.budget,
            backend_slots: self.backend_slots,
            shared: memory.shared_pages(),
            state: Mutex::new(State {
                frontend: self.frontend,
                table: BTreeMap::new(),
                errors: Vec::new(),
                detached: false,
            }),
        });
        let listener: Arc<dyn MemoryListener> = Arc::clone(&mapper) as Arc<dyn MemoryListener>;
        let subscription = memory
            .subscribe_with_replay(range, listener)
            .map_err(Error::Subscribe)?;
        Ok(VhostUserAttachment {
            mapper,
            subscription: Some(subscription),
        })
    }
}

/// A [`VhostUserMapper`] attached to a memory: the backend's table holds exactly the
/// shared runs it was offered, until this is dropped or detached.
pub struct VhostUserAttachment {
    mapper: Arc<Mapper>,
    subscription: Option<Subscription>,
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
    /// private). Each error names the range.
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

struct State {
    frontend: Frontend,
    /// The backend's table as this mapper made it, by guest start.
    table: BTreeMap<u64, BackendRegion>,
    /// Errors no conversion could carry (see [`VhostUserAttachment::take_errors`]).
    errors: Vec<Error>,
    /// Set once the attachment is being released: nothing is added any more.
    detached: bool,
}

/// The listener behind a [`VhostUserAttachment`].
struct Mapper {
    budget: usize,
    backend_slots: u64,
    shared: SharedPages,
    state: Mutex<State>,
}

impl Mapper {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change of the state is whole (a table entry changes only after the
        // backend acknowledged the message), so a panic elsewhere leaves it consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the shared runs of `range` not in the table yet, all or none.
    fn add_shared(&self, state: &mut State, range: PageRange) -> Result<(), Error> {
        if state.detached {
            return Ok(());
        }
        let snapshot = self.shared.snapshot();
        // What to add, checked whole before the first message.
        let mut wanted: Vec<(BackendRegion, RawFd)> = Vec::new();
        for run in snapshot.runs(range) {
            let guest = run.guest_range();
            let file = run.file().ok_or(Error::NoShareableFile {
                strategy: Strategy::InPlace,
            })?;
            let whole = BackendRegion {
                guest,
                userspace_addr: run.host_address() as u64,
                mmap_offset: file.offset,
            };
            for gap in uncovered(&state.table, guest) {
                wanted.push((whole.clip(gap), file.fd.as_raw_fd()));
            }
        }
        let held = state.table.len();
        if held + wanted.len() > self.budget {
            return Err(Error::SlotBudget {
                range,
                needed: wanted.len(),
                held,
                budget: self.budget,
            });
        }
        for (i, (region, fd)) in wanted.iter().enumerate() {
            // The descriptor is the region's sealed memfd, kept open by `snapshot`.
            if let Err(refused) = state.frontend.add_mem_region(&region.info(*fd)) {
                // All or none: take back what this call added. If the backend does not
                // let one go, keep the range (the conversion goes on) rather than let a
                // page it may map turn private.
                for (done, _) in wanted[..i].iter().rev() {
                    match state.frontend.remove_mem_region(&done.info(-1)) {
                        Ok(()) => {
                            state.table.remove(&done.guest.start());
                        }
                        Err(source) => {
                            state.errors.push(Error::Add {
                                range: region.guest,
                                source: refused,
                            });
                            state.errors.push(Error::Remove {
                                range: done.guest,
                                source,
                            });
                            return Ok(());
                        }
                    }
                }
                return Err(Error::Add {
                    range: region.guest,
                    source: refused,
                });
            }
            state.table.insert(region.guest.start(), *region);
        }
        Ok(())
    }

    /// Stops adding, and removes every region; returns the first removal the backend did
    /// not acknowledge, if any (those regions stay in the table).
    fn remove_all(&self) -> Option<Error> {
        let mut state = self.lock();
        state.detached = true;
        let regions: Vec<BackendRegion> = state.table.values().copied().collect();
        let mut refused = None;
        for region in regions {
            match state.frontend.remove_mem_region(&region.info(-1)) {
                Ok(()) => {
                    state.table.remove(&region.guest.start());
                }
                Err(source) => {
                    refused = refused.or(Some(Error::Remove {
                        range: region.guest,
                        source,
                    }))
                }
            }
        }
        refused
    }

    /// Removes every region overlapping `range` and adds back the parts outside it.
    fn revoke(&self, range: PageRange) {
        let mut state = self.lock();
        let overlapping: Vec<BackendRegion> = state
            .table
            .range(..range.end())
            .rev()
            .take_while(|(_, r)| r.guest.end() > range.start())
            .map(|(_, r)| *r)
            .collect();
        let leftovers = |r: &BackendRegion| -> Vec<BackendRegion> {
            let mut parts = Vec::new();
            if r.guest.start() < range.start() {
                parts.extend(
                    PageRange::new(r.guest.start(), range.start() - r.guest.start())
                        .ok()
                        .map(|p| r.clip(p)),
                );
            }
            if r.guest.end() > range.end() {
                parts.extend(
                    PageRange::new(range.end(), r.guest.end() - range.end())
                        .ok()
                        .map(|p| r.clip(p)),
                );
            }
            parts
        };
        // The budget first, before any message: a revocation that cannot finish must
        // not start.
        let after = state.table.len() - overlapping.len()
            + overlapping
                .iter()
                .map(|r| leftovers(r).len())
                .sum::<usize>();
        if after > self.budget {
            drop(state);
            panic!(
                "revoking the vhost-user backend's access to [{:#x}, {:#x}) splits a region and needs {after} memory slots, over the budget of {}: nothing was revoked and the range stays shared; convert whole shared runs, or raise the slot budget",
                range.start(),
                range.end(),
                self.budget
            );
        }
        for region in overlapping.into_iter().rev() {
            // REM_MEM_REG names the whole region; the backend acknowledges it once it no
            // longer accesses the region's mapping.
            if let Err(e) = state.frontend.remove_mem_region(&region.info(-1)) {
                drop(state);
                panic!(
                    "the vhost-user backend did not acknowledge REM_MEM_REG of guest [{:#x}, {:#x}): {e}; it may still map the region, so the conversion stops and [{:#x}, {:#x}) stays shared",
                    region.guest.start(),
                    region.guest.end(),
                    range.start(),
                    range.end()
                );
            }
            state.table.remove(&region.guest.start());
            for part in leftovers(&region) {
                if let Err(e) = self.add_shared(&mut state, part.guest) {
                    state.errors.push(e);
                }
            }
        }
    }
}

fn shareable(memory: &PrivateMemory) -> Result<(), Error> {
    match memory.strategy() {
        Strategy::Dual => Ok(()),
        strategy => Err(Error::NoShareableFile { strategy }),
    }
}

impl MemoryListener for Mapper {
    /// Removes every region of the backend's table that overlaps `range`, each after the
    /// backend acknowledged it (`REM_MEM_REG` with `REPLY_ACK`), and adds back the parts
    /// that stay shared. Panics, which vm-private-memory takes as "cannot let go" and
    /// which stops the conversion with the range still shared: before any message if
    /// the regions needed would exceed the slot budget, and if the backend does not
    /// acknowledge a removal (it may still map the region).
    fn discard(&self, range: PageRange) {
        self.revoke(range);
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut state = self.lock();
        Ok(self.add_shared(&mut state, range)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_budget_is_the_backend_s_answer_capped_at_the_protocol_s_limit() {
        assert_eq!(slot_budget(6), 6);
        assert_eq!(slot_budget(509), 509);
        assert_eq!(slot_budget(512), MAX_SLOTS);
        assert_eq!(slot_budget(513), MAX_SLOTS);
        assert_eq!(slot_budget(u64::MAX), MAX_SLOTS);
    }
}
