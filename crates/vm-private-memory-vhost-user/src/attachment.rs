// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What an attached mapper gives its owner: the table, errors, and detaching.

use std::sync::Arc;

use guest_memfd::PAGE_SIZE;
use vm_private_memory::Subscription;

use crate::error::{DetachError, Error, StillRunning};
use crate::kept::Kept;
use crate::listener::Mapper;
use crate::peer::{Liveness, PidSource};
use crate::region::BackendRegion;

/// A [`VhostUserMapper`](crate::VhostUserMapper) attached to a memory: the backend's table holds exactly the
/// shared runs it was offered, until this is dropped or detached.
pub struct VhostUserAttachment {
    pub(crate) mapper: Arc<Mapper>,
    /// Ends only when the table is let go of: an unwind through the attachment (a
    /// detach that panicked part way) forgets it, and the regions left stay followed.
    pub(crate) subscription: Kept<Subscription>,
}

impl std::fmt::Debug for VhostUserAttachment {
    /// Never waits: while a message is out, the slots used show as `None`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let slots_used = match self.mapper.state.try_lock() {
            Ok(state) => Some(state.table.len()),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner().table.len()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        f.debug_struct("VhostUserAttachment")
            .field("budget", &self.mapper.budget)
            .field("slots_used", &slots_used)
            .field("broken", &self.is_broken())
            .finish_non_exhaustive()
    }
}

/// The accessors that read the table ([`VhostUserAttachment::regions`],
/// [`VhostUserAttachment::slots_used`], [`VhostUserAttachment::is_mapped`],
/// [`VhostUserAttachment::take_errors`]) take the mapper's lock, which a conversion holds
/// while its messages are out: they wait for it (as long as a listener call takes: less
/// than twice the reply timeout). [`VhostUserAttachment::is_broken`],
/// [`VhostUserAttachment::broken_reason`], [`VhostUserAttachment::backend_pid`] and
/// `Debug` never wait.
impl VhostUserAttachment {
    /// The backend's memory table as this mapper made it, in guest address order. Waits
    /// while a message is out.
    pub fn regions(&self) -> Vec<BackendRegion> {
        self.mapper.lock().table.values().copied().collect()
    }

    /// How many regions (memory slots) this mapper holds in the backend's table. Waits
    /// while a message is out.
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

    /// Whether the page holding `gpa` is in the backend's table now. Waits while a
    /// message is out.
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
    /// backend refuses one (or the call has no time left to send it,
    /// [`Error::OutOfTime`]), the revocation still stands (the conversion goes on) and
    /// that part is missing from the backend's table until it is offered again. And when
    /// a refused conversion to shared takes back the regions it added, a removal the
    /// backend refuses (or that there is no time left for) keeps the conversion (rather
    /// than turn a page the backend may map private). When a revocation stops halfway
    /// (the backend refuses the removal of one of several regions over the range, or
    /// there is no time left for it), the parts of the range already removed are added
    /// back, since the range stays shared (unless a refused detach stopped all
    /// additions); one that cannot be (over the slot budget, refused, or out of the
    /// call's time) is missing from the table until a conversion offers it again. Each
    /// error names the range.
    ///
    /// The attachment keeps the first 64 errors until they are taken, and only counts
    /// later ones: the list then ends with [`Error::ErrorsDropped`], which says how many.
    /// Take them after each conversion the VMM serves for the guest (or each batch of
    /// them), and whenever [`VhostUserAttachment::is_broken`] turns true. Waits while a
    /// message is out.
    pub fn take_errors(&self) -> Vec<Error> {
        self.mapper.lock().errors.take()
    }

    /// Whether the backend is broken: a message went unanswered (its reply timeout
    /// passed, the connection closed or broke, or the answer was not the message's), or
    /// a reply no message asked for waited on the socket. A message that was never sent
    /// for want of time ([`Error::OutOfTime`]) does not break it.
    ///
    /// The mapper then sends it nothing more. Conversions to private (and discards) of
    /// ranges the table still holds are refused, since the backend may still map them;
    /// ranges outside the table still go private. Conversions to shared in the attached
    /// range are refused ([`Error::Broken`]), except after a refused detach
    /// ([`DetachError`]): that attachment adds nothing any more, so a conversion to
    /// shared is accepted and goes on without the backend mapping the range. The way
    /// out is [`VhostUserAttachment::backend_exited`]. Never waits, not even while a
    /// message is out.
    pub fn is_broken(&self) -> bool {
        self.mapper.broken.get().is_some()
    }

    /// What broke the backend (the message that went unanswered, and why), if it is
    /// broken. Never waits.
    pub fn broken_reason(&self) -> Option<String> {
        self.mapper.broken.get().cloned()
    }

    /// The pid of the backend's process, if known and it has not been seen to exit:
    /// the one given to [`VhostUserMapper::with_backend_pid`], or else the frontend's
    /// socket's peer (`SO_PEERCRED`): the process that made the backend's listening
    /// socket when the VMM connected (a supervisor, if one made it), the one that
    /// connected when the VMM listened. `None` once that process has exited (its pid may
    /// name another process by then), and `None` when it is not known (a socket pair, a
    /// peer that had exited when the mapper was made, another pid namespace). Never
    /// waits.
    ///
    /// [`VhostUserMapper::with_backend_pid`]: crate::VhostUserMapper::with_backend_pid
    pub fn backend_pid(&self) -> Option<u32> {
        self.mapper.peer.pid()
    }

    /// Declares that the backend's process has exited, and lets go of its table without
    /// a message: the regions are forgotten and conversions are no longer followed, so
    /// the ranges the table held may turn private again. This is the way out of a
    /// broken backend ([`VhostUserAttachment::is_broken`]), and the way to detach from a
    /// backend that exited.
    ///
    /// Call it only once the backend's process has exited: a process that has exited
    /// maps nothing, but a live one keeps its mappings of the memfd whatever its
    /// connection's state, and would keep reading and writing pages that then turn
    /// private (and allocate them again on the shared side). A backend that is stuck
    /// rather than gone must be killed first (`SIGKILL`), and waited for until it has
    /// exited. Reaping it is not needed (a zombie maps nothing, and its pidfd says it
    /// has exited), nor possible for a process the VMM did not spawn.
    ///
    /// What it checks: the backend's process must have exited, followed by a pidfd (so
    /// a reused pid is not mistaken for it) taken when the mapper was made: of the pid
    /// the VMM gave ([`VhostUserMapper::with_backend_pid`]), or else of the process at
    /// the other end of the frontend's socket (`SO_PEERPIDFD`, or, on a kernel without
    /// it, `SO_PEERCRED` and `pidfd_open`). When the VMM connected, that process made
    /// the backend's listening socket, which is not the backend when a supervisor made
    /// it (systemd socket activation, a management daemon passing the descriptor, a
    /// daemon that forks its backend): a supervisor that outlives the backend makes
    /// this refuse for as long as it runs (do not kill it: give the mapper the
    /// backend's pid, or use [`VhostUserAttachment::assume_backend_exited`]), and one
    /// that exits first lets it through while the backend runs. When the VMM listened
    /// and accepted (Cloud Hypervisor's `vhost_mode=server`), it is the process that
    /// connected, usually the backend. What it cannot check: another process that
    /// holds the mappings (one the backend forked inherits them), a process the backend
    /// passed the memfd's descriptor to, a socket made in the VMM (a socket pair: its
    /// peer credentials are the VMM's own), a peer that had already exited when the
    /// mapper was made, or a backend in a pid namespace the VMM cannot see; nor can it
    /// when `poll` on the pidfd fails. There it takes the caller's word.
    ///
    /// For a reconnected backend (a new process, or the same one on a new connection
    /// once it has lost its mappings), the VMM makes a new attachment as it made this
    /// one: connect a new `Frontend`, negotiate, [`VhostUserMapper::new`] and
    /// [`VhostUserMapper::attach`] (which gives the new backend the runs shared then),
    /// and set its vrings up again.
    ///
    /// [`VhostUserMapper::new`]: crate::VhostUserMapper::new
    /// [`VhostUserMapper::attach`]: crate::VhostUserMapper::attach
    /// [`VhostUserMapper::with_backend_pid`]: crate::VhostUserMapper::with_backend_pid
    ///
    /// # Errors
    ///
    /// [`StillRunning`], holding this attachment unchanged, if that process is known to
    /// be running; it says where the mapper has the process from.
    pub fn backend_exited(mut self) -> Result<(), StillRunning> {
        if let Liveness::Running { pid, source } = self.mapper.peer.liveness() {
            return Err(StillRunning {
                pid,
                origin: source,
                attachment: self,
            });
        }
        self.let_go();
        Ok(())
    }

    /// As [`VhostUserAttachment::backend_exited`], without any check: **this takes the
    /// VMM's word** that the backend's process, and every process that may hold its
    /// mappings of guest memory, has exited. The table is forgotten without a message,
    /// and conversions are no longer followed, whatever the pidfd says.
    ///
    /// It is for a VMM that knows better than the mapper: the backend's listening
    /// socket was made by a supervisor that outlives the backend (so
    /// [`StillRunning`] names the supervisor), and the VMM has seen the backend itself
    /// exit. If the backend still runs, it keeps reading and writing the pages its
    /// table held, which may then turn private (and be allocated again on the shared
    /// side, holding the guest's memory twice). Prefer
    /// [`VhostUserMapper::with_backend_pid`](crate::VhostUserMapper::with_backend_pid),
    /// which lets `backend_exited` check the right process.
    pub fn assume_backend_exited(mut self) {
        self.let_go();
    }

    /// Forgets the table without a message, and stops following conversions.
    fn let_go(&mut self) {
        {
            let mut state = self.mapper.lock();
            state.detached = true;
            state.table.clear();
        }
        self.subscription.end();
    }

    /// Removes every region from the backend's table (each acknowledged), then stops
    /// following conversions.
    ///
    /// # Errors
    ///
    /// [`DetachError`] if regions are left in the table, holding the attachment (as
    /// [`StillRunning`] does) and why: if the backend is broken (or breaks on the way),
    /// what broke it ([`Error::NoReply`], [`Error::Lost`], or [`Error::Broken`]), after
    /// which it is sent nothing more; otherwise the first region the backend did not
    /// acknowledge ([`Error::Remove`]: it may still map it) or that there was no time
    /// left to send ([`Error::OutOfTime`]). The attachment handed back keeps following
    /// the conversions of the regions left, so that they cannot turn private unnoticed
    /// (a conversion of one to private tries its removal again, and is refused if it
    /// fails); it adds nothing any more (a conversion to shared goes on without the
    /// backend), and a region that a removal there takes out is not added back. With it
    /// the VMM can call `detach` again once the backend lets go (unless it is broken:
    /// [`VhostUserAttachment::is_broken`]), or, once the backend's process has exited
    /// (killed if it is stuck, and waited for), [`VhostUserAttachment::backend_exited`].
    /// Dropping it is dropping the attachment (see `Drop`).
    pub fn detach(mut self) -> Result<(), DetachError> {
        match self.release() {
            Ok(()) => Ok(()),
            Err(error) => Err(DetachError {
                error,
                attachment: self,
            }),
        }
    }

    fn release(&mut self) -> Result<(), Error> {
        match self.mapper.remove_all() {
            None => {
                self.subscription.end();
                Ok(())
            }
            // Still subscribed: the regions left cannot go private unnoticed.
            Some(e) => Err(e),
        }
    }
}

impl Drop for VhostUserAttachment {
    /// As [`VhostUserAttachment::detach`], with nowhere to hand the attachment back to.
    /// If regions are left in the table:
    ///
    /// - if the backend is broken, the VMM gave its pid
    ///   ([`VhostUserMapper::with_backend_pid`](crate::VhostUserMapper::with_backend_pid)),
    ///   and that process has exited (the pidfd the mapper opened from it says so), the
    ///   table is let go of, as `backend_exited` does. The socket's peer is not enough
    ///   for that, whatever its pidfd says: it may be a supervisor (or a parent that
    ///   daemonized) that exited while the backend runs on;
    /// - otherwise the memory's subscription is leaked, so that those regions' pages
    ///   cannot turn private while the backend may map them (their conversions to
    ///   private are refused, for as long as the memory lives, unless the backend later
    ///   acknowledges the removal a conversion tries again). With it stay, until the
    ///   memory is dropped, the mapper's thread (the reply deadline's) and its two
    ///   descriptors of the frontend's socket (the frontend and a duplicate).
    ///
    /// To keep a way out, detach with [`VhostUserAttachment::detach`], which hands the
    /// attachment back, rather than dropping it.
    fn drop(&mut self) {
        if self.release().is_err()
            && self.mapper.broken.get().is_some()
            && self.mapper.peer.liveness()
                == (Liveness::Exited {
                    source: PidSource::Given,
                })
        {
            self.let_go();
        }
    }
}
