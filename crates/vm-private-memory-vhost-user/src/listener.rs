// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The listener behind an attachment: the backend's table, changed message by message.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard};

use guest_memfd::PageRange;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_private_memory::{MemoryListener, SharedPages, Strategy};

use crate::error::Error;
use crate::region::{uncovered, BackendRegion};

pub(crate) struct State {
    pub(crate) frontend: Frontend,
    /// The backend's table as this mapper made it, by guest start.
    pub(crate) table: BTreeMap<u64, BackendRegion>,
    /// Errors no conversion could carry (see [`crate::VhostUserAttachment::take_errors`]).
    pub(crate) errors: Vec<Error>,
    /// Set once the attachment is being released: nothing is added any more.
    pub(crate) detached: bool,
}

impl State {
    /// `ADD_MEM_REG` of `region` from the memfd `fd`, and the backend's acknowledgement.
    fn add(&mut self, region: &BackendRegion, fd: RawFd) -> Result<(), vhost::Error> {
        // Asked for on every message: a clone of the frontend may have changed the flags
        // it shares with this one.
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        self.frontend.add_mem_region(&region.info(fd)).map(|_| ())
    }

    /// `REM_MEM_REG` of the whole of `region`, and the backend's acknowledgement.
    fn remove(&mut self, region: &BackendRegion) -> Result<(), vhost::Error> {
        self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        self.frontend.remove_mem_region(&region.info(-1))
    }
}

/// The listener behind a [`crate::VhostUserAttachment`].
pub(crate) struct Mapper {
    pub(crate) budget: usize,
    pub(crate) backend_slots: u64,
    pub(crate) shared: SharedPages,
    pub(crate) state: Mutex<State>,
}

impl Mapper {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
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
            if let Err(refused) = state.add(region, *fd) {
                // All or none: take back what this call added. If the backend does not
                // let one go, keep the range (the conversion goes on) rather than let a
                // page it may map turn private.
                for (done, _) in wanted[..i].iter().rev() {
                    match state.remove(done) {
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
    pub(crate) fn remove_all(&self) -> Option<Error> {
        let mut state = self.lock();
        state.detached = true;
        let regions: Vec<BackendRegion> = state.table.values().copied().collect();
        let mut refused = None;
        for region in regions {
            match state.remove(&region) {
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
        // The parts of `range` removed so far.
        let mut removed: Vec<PageRange> = Vec::new();
        for region in overlapping.into_iter().rev() {
            // REM_MEM_REG names the whole region; the backend acknowledges it once it no
            // longer accesses the region's mapping.
            if let Err(e) = state.remove(&region) {
                // The conversion stops and `range` stays shared: put back what this
                // revocation removed of it (still shared: `discard` runs before the bits
                // change). What cannot be is missing until offered again.
                let restored = removed.len();
                for part in removed {
                    if let Err(e) = self.add_shared(&mut state, part) {
                        state.errors.push(e);
                    }
                }
                drop(state);
                panic!(
                    "the vhost-user backend did not acknowledge REM_MEM_REG of guest [{:#x}, {:#x}): {e}; it may still map the region, so the conversion stops and [{:#x}, {:#x}) stays shared ({restored} part(s) of it removed before were added back; VhostUserAttachment::take_errors names any that could not be)",
                    region.guest.start(),
                    region.guest.end(),
                    range.start(),
                    range.end()
                );
            }
            state.table.remove(&region.guest.start());
            removed.extend(region.guest.intersection(&range));
            for part in leftovers(&region) {
                if let Err(e) = self.add_shared(&mut state, part.guest) {
                    state.errors.push(e);
                }
            }
        }
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
