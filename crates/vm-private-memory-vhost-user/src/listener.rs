// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The listener behind an attachment: the backend's table, changed message by message.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::thread::ThreadId;

use guest_memfd::PageRange;
use vm_private_memory::{MemoryListener, SharedPages, Strategy};

use crate::error::{Error, AFTER_BREAK};
use crate::error_log::ErrorLog;
use crate::exchange::{BrokenBy, Channel};
use crate::peer::Peer;
use crate::region::{uncovered, BackendRegion};

pub(crate) struct State {
    /// The frontend's socket, its deadline, and whether the backend is broken.
    pub(crate) channel: Channel,
    /// The backend's table as this mapper made it, by guest start. Once the backend is
    /// broken, also the region whose message went unanswered: what the backend may map.
    pub(crate) table: BTreeMap<u64, BackendRegion>,
    /// Errors no conversion could carry (see [`crate::VhostUserAttachment::take_errors`]).
    pub(crate) errors: ErrorLog,
    /// Set once the attachment is being released: nothing is added any more.
    pub(crate) detached: bool,
    /// The thread that attaches, while attach offers it the runs shared then
    /// (`subscribe_with_replay`, which calls `populate` on that thread). A conversion on
    /// another thread, between the replay's end and attach's clearing of this, is not
    /// part of it.
    pub(crate) attaching: Option<ThreadId>,
}

/// The listener behind a [`crate::VhostUserAttachment`].
pub(crate) struct Mapper {
    pub(crate) budget: usize,
    pub(crate) backend_slots: u64,
    /// The backend's process, to tell whether it has exited.
    pub(crate) peer: Peer,
    pub(crate) shared: SharedPages,
    /// What broke the backend, readable without waiting for `state`.
    pub(crate) broken: BrokenBy,
    pub(crate) state: Mutex<State>,
}

impl Mapper {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Every change of the state is whole (a table entry changes only after the
        // backend acknowledged the message), so a panic elsewhere leaves it consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the shared runs of `range` not in the table yet, all or none. If the backend
    /// breaks on the way, what was sent stays (the backend may map it) and the error goes
    /// to `errors`: the range is accepted, since it must stay shared.
    fn add_shared(&self, state: &mut State, range: PageRange) -> Result<(), Error> {
        if state.detached {
            return Ok(());
        }
        if let Some(broken) = state.channel.broken(range) {
            return Err(broken);
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
            match state.channel.add(region, *fd) {
                Ok(()) => {
                    state.table.insert(region.guest.start(), *region);
                }
                Err(lost) if lost.sent_unanswered() => {
                    // The backend may have mapped it, and may map what this call added
                    // before: keep all of it (the conversion goes on). A region that
                    // was not sent (the backend broke before it) is not kept: it is
                    // refused below, with what this call added if it cannot be taken
                    // back.
                    state.table.insert(region.guest.start(), *region);
                    state.errors.push(lost);
                    return Ok(());
                }
                Err(refused) => {
                    // All or none: take back what this call added. If the backend does
                    // not let one go, keep the range (the conversion goes on) rather than
                    // let a page it may map turn private.
                    for (done, _) in wanted[..i].iter().rev() {
                        match state.channel.remove(done) {
                            Ok(()) => {
                                state.table.remove(&done.guest.start());
                            }
                            Err(kept) => {
                                state.errors.push(refused);
                                state.errors.push(kept);
                                return Ok(());
                            }
                        }
                    }
                    return Err(refused);
                }
            }
        }
        Ok(())
    }

    /// Stops adding, and removes every region; returns the first removal the backend did
    /// not acknowledge, if any (those regions stay in the table), or, if the backend is
    /// broken or breaks on the way, what broke it (or [`Error::Broken`]): nothing more is
    /// sent then.
    pub(crate) fn remove_all(&self) -> Option<Error> {
        let mut state = self.lock();
        state.channel.begin();
        state.detached = true;
        let regions: Vec<BackendRegion> = state.table.values().copied().collect();
        let mut refused = None;
        for region in regions {
            match state.channel.remove(&region) {
                Ok(()) => {
                    state.table.remove(&region.guest.start());
                }
                Err(e) if state.channel.is_broken() => {
                    // What broke it (or says it is broken) is what the VMM must act on,
                    // rather than an earlier refusal: detaching again cannot help now.
                    refused = Some(e);
                    break;
                }
                Err(e) => refused = refused.or(Some(e)),
            }
        }
        refused
    }

    /// Removes every region overlapping `range` and adds back the parts outside it.
    fn revoke(&self, range: PageRange) {
        let mut state = self.lock();
        state.channel.begin();
        let overlapping: Vec<BackendRegion> = state
            .table
            .range(..range.end())
            .rev()
            .take_while(|(_, r)| r.guest.end() > range.start())
            .map(|(_, r)| *r)
            .collect();
        if overlapping.is_empty() {
            return;
        }
        if let Some(why) = self.broken.get() {
            drop(state);
            refuse(format!(
                "the vhost-user backend is broken and is sent nothing more ({why}); it may still map its regions over [{:#x}, {:#x}), so the conversion stops and the range stays shared. {AFTER_BREAK}",
                range.start(),
                range.end()
            ));
        }
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
            refuse(format!(
                "revoking the vhost-user backend's access to [{:#x}, {:#x}) splits a region and needs {after} memory slots, over the budget of {}: nothing was revoked and the range stays shared; convert whole shared runs, or raise the slot budget",
                range.start(),
                range.end(),
                self.budget
            ));
        }
        // The parts of `range` removed so far.
        let mut removed: Vec<PageRange> = Vec::new();
        for region in overlapping.into_iter().rev() {
            // REM_MEM_REG names the whole region; the backend acknowledges it once it no
            // longer accesses the region's mapping.
            if let Err(e) = state.channel.remove(&region) {
                // The conversion stops and `range` stays shared: put back what this
                // revocation removed of it (still shared: `discard` runs before the bits
                // change), unless the backend is broken. What cannot be is missing until
                // offered again.
                let restored = removed.len();
                let restore = if restored == 0 {
                    String::new()
                } else if state.detached {
                    // A detach was refused: nothing is added any more.
                    format!(" The {restored} part(s) of it that earlier removals took out are not added back: the attachment is detaching, and adds nothing more.")
                } else {
                    let errors_before = state.errors.count();
                    for part in removed {
                        if let Err(e) = self.add_shared(&mut state, part) {
                            state.errors.push(e);
                        }
                    }
                    match state.errors.count() - errors_before {
                        0 => format!(" The {restored} part(s) of it that earlier removals took out are added back."),
                        m => format!(" Of the {restored} part(s) of it that earlier removals took out, {m} could not be added back: VhostUserAttachment::take_errors names them."),
                    }
                };
                drop(state);
                match e {
                    Error::Remove { source, .. } => refuse(format!(
                        "the vhost-user backend did not acknowledge REM_MEM_REG of guest [{:#x}, {:#x}): {source}. It may still map the region, so the conversion stops and [{:#x}, {:#x}) stays shared.{restore}",
                        region.guest.start(),
                        region.guest.end(),
                        range.start(),
                        range.end()
                    )),
                    other => refuse(format!(
                        "{other} The conversion stops and [{:#x}, {:#x}) stays shared.{restore}",
                        range.start(),
                        range.end()
                    )),
                }
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

/// Stops the operation that called the listener, with `message`: "cannot let go", an
/// unwind that vm-private-memory catches and turns into the operation's error (the
/// message is its `ListenerRefusal::Panicked`). Not a `panic!`: the process's panic hook
/// (a message on stderr, a backtrace) does not run for a refusal, which a guest can
/// cause at will.
fn refuse(message: String) -> ! {
    std::panic::resume_unwind(Box::new(message))
}

impl MemoryListener for Mapper {
    /// Removes every region of the backend's table that overlaps `range`, each after the
    /// backend acknowledged it (`REM_MEM_REG` with `REPLY_ACK`), and adds back the parts
    /// that stay shared. Unwinds (without the panic hook), which vm-private-memory takes
    /// as "cannot let go" and which stops the conversion with the range still shared:
    /// before any message if
    /// the regions needed would exceed the slot budget or the backend is broken, and if
    /// the backend does not acknowledge a removal (it may still map the region). A range
    /// with no region of the table is let go of, broken or not.
    fn discard(&self, range: PageRange) {
        self.revoke(range);
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut state = self.lock();
        let replay = state.attaching == Some(std::thread::current().id());
        if replay && state.channel.is_broken() {
            // Attaching to a backend that broke on an earlier run: nothing is sent, so
            // there is nothing to take back. Accepting the run (it is shared, and the
            // backend does not map it) keeps the replay from being rolled back, which
            // would ask the broken backend to let go of what it may map: that cannot be
            // done, and attach would return no attachment to recover with.
            return Ok(());
        }
        state.channel.begin();
        match self.add_shared(&mut state, range) {
            Err(e) if replay && state.channel.is_broken() => {
                // The same, for a run on which it broke: what was sent stays in the
                // table, the rest is not mapped.
                state.errors.push(e);
                Ok(())
            }
            result => Ok(result?),
        }
    }
}
