// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The mapper before it is attached: the negotiation checked, the budget set.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guest_memfd::PageRange;
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vm_private_memory::{DirtyBitmap, MemoryListener, PrivateMemoryManager, Strategy};

use crate::attachment::VhostUserAttachment;
use crate::deadline::Deadline;
use crate::error::Error;
use crate::error_log::ErrorLog;
use crate::exchange::{BrokenBy, Channel};
use crate::kept::Kept;
use crate::listener::{Mapper, State};
use crate::peer::Peer;

/// The vhost-user protocol features a [`VhostUserMapper`] needs acknowledged:
/// `CONFIGURE_MEM_SLOTS` (`ADD_MEM_REG`, `REM_MEM_REG`, `GET_MAX_MEM_SLOTS`) and
/// `REPLY_ACK` (the backend confirms each removal).
pub const REQUIRED_PROTOCOL_FEATURES: VhostUserProtocolFeatures =
    VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS.union(VhostUserProtocolFeatures::REPLY_ACK);

/// Keeps a vhost-user backend's memory table equal to the shared runs of guest memory,
/// and revokes the backend's mapping of a range (waiting for its acknowledgement) before
/// the range turns private. See the crate documentation for the protocol. Make it with
/// the frontend, configure it, then [`VhostUserMapper::attach`] it to the memory.
pub struct VhostUserMapper {
    frontend: Frontend,
    budget: usize,
    backend_slots: u64,
    reply_timeout: Duration,
    peer: Peer,
}

impl std::fmt::Debug for VhostUserMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserMapper")
            .field("budget", &self.budget)
            .field("backend_slots", &self.backend_slots)
            .field("reply_timeout", &self.reply_timeout)
            .field("backend_pid", &self.peer.pid())
            .finish_non_exhaustive()
    }
}

/// How long a [`VhostUserMapper`] waits, by default, for the backend's answer to each
/// message, and how long each listener call may go on sending messages
/// ([`VhostUserMapper::with_reply_timeout`]): 10 s.
///
/// The wait happens on the converting thread, under the memory's conversion lock, so
/// every conversion of the memory (and the vCPUs asking for them) waits with it. A
/// backend acknowledges a removal only once its workers are done with the region, which
/// may take a slow request's time (a disk or network I/O in flight), so the timeout is
/// far above a request's usual latency; and a backend that stops answering is found out
/// within it, half the 20 s after which a Linux guest's soft-lockup detector reports a
/// stuck vCPU (`watchdog_thresh`, 10 by default, doubled). That bounds one message and
/// one listener call (less than twice the timeout: it sends only within the timeout from
/// its start), not one hold of the conversion lock: a conversion step calls the mapper
/// once per changed run, so a backend that answers every message just inside the
/// timeout may hold the lock for up to twice the timeout per changed run (see the crate
/// documentation). A VMM for which a vCPU's stall matters more than a slow backend's
/// refused conversions sets a shorter one.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest deadline [`VhostUserMapper::with_reply_timeout`] sets.
const MIN_REPLY_TIMEOUT: Duration = Duration::from_millis(1);

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
    /// From here on every message of `frontend` asks for a reply (`NEED_REPLY`, in the
    /// header flags its clones share), and the mapper sets the flag again right before
    /// each `ADD_MEM_REG` and `REM_MEM_REG` it sends: each waits for the backend's
    /// acknowledgement. So do the VMM's own messages on the frontend's clones: each of
    /// them waits for the backend's acknowledgement too (and fails if the backend
    /// refuses it). The VMM must not send `SET_MEM_TABLE` for this memory (the table is
    /// built region by region), nor `ADD_MEM_REG` or `REM_MEM_REG` on this frontend or
    /// its clones: a reply to either, waiting on the socket before one of the mapper's
    /// messages, is taken for one the backend sent twice, and breaks it.
    ///
    /// # Errors
    ///
    /// [`Error::NoShareableFile`] for in-place memory (checked first, before any
    /// message); [`Error::NotNegotiated`], [`Error::NotOffered`] or [`Error::Query`]
    /// if the protocol features or the slot count are not there.
    pub fn new<B: DirtyBitmap>(
        mut frontend: Frontend,
        acked: VhostUserProtocolFeatures,
        memory: &PrivateMemoryManager<B>,
    ) -> Result<Self, Error> {
        shareable(memory)?;
        let missing = REQUIRED_PROTOCOL_FEATURES.difference(acked);
        if !missing.is_empty() {
            return Err(Error::NotNegotiated { missing });
        }
        let peer = Peer::of(&frontend);
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
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
            peer,
        })
    }

    /// Allows at most `slots` regions in the backend's table (never more than the
    /// backend's `GET_MAX_MEM_SLOTS`): leave room for regions the VMM adds itself.
    ///
    /// The slots the table takes depend on the history of conversions: adjacent regions
    /// are never merged (a run shared page by page takes a slot per page), while
    /// detaching and attaching a new mapper takes one slot per shared run.
    pub fn with_slot_budget(mut self, slots: usize) -> Self {
        self.budget = slots.min(slot_budget(self.backend_slots));
        self
    }

    /// Takes `pid` as the backend's process, which
    /// [`VhostUserAttachment::backend_exited`] checks has exited and
    /// [`VhostUserAttachment::backend_pid`] reports, instead of the frontend's socket's
    /// peer (the process that made the backend's listening socket: a supervisor, when
    /// systemd's socket activation or a management daemon made it, or a daemon that
    /// forks its backend). The VMM that spawned the backend knows its pid: give it while
    /// the process runs. A pidfd of it is opened now (`pidfd_open`), so a pid reused
    /// later is not mistaken for it.
    ///
    /// # Errors
    ///
    /// [`Error::BackendPid`] if `pidfd_open` fails: no such process (`ESRCH`: not in this
    /// pid namespace, or exited and reaped already), not a pid (`EINVAL`: 0 or a number
    /// above `i32::MAX`), the id of a thread other than its process's first (`EINVAL`,
    /// or `ENOENT` since Linux 6.9), or a kernel older than 5.3 (`ENOSYS`).
    pub fn with_backend_pid(mut self, pid: u32) -> Result<Self, Error> {
        self.peer = Peer::given(pid).map_err(|errno| Error::BackendPid {
            pid,
            source: std::io::Error::from_raw_os_error(errno),
        })?;
        Ok(self)
    }

    /// How many regions this mapper may hold in the backend's table.
    pub fn slot_budget(&self) -> usize {
        self.budget
    }

    /// Waits at most `timeout` (at least 1 ms) for the backend's answer to each
    /// `ADD_MEM_REG` and `REM_MEM_REG` from its sending, and lets each listener call send
    /// messages only until `timeout` from its start has passed ([`DEFAULT_REPLY_TIMEOUT`]
    /// otherwise). A listener call is one call of the memory's into the mapper: one
    /// changed run of a conversion step, revoked or added (a conversion, a discard, a
    /// region's removal or addition, a rollback), one run added by
    /// [`VhostUserMapper::attach`], or a detach. So one call holds the conversion lock for
    /// less than twice `timeout`; a conversion step that changes many runs makes one
    /// call per run.
    ///
    /// A message that would go out once its call's time is spent is not sent
    /// ([`Error::OutOfTime`](crate::Error::OutOfTime)): nothing is out of step and the
    /// backend is not broken; the call refuses, and may be tried again.
    ///
    /// When a message's answer is late, the mapper shuts the frontend's socket down
    /// (both directions, for the frontend's clones too): the wait ends, and a late answer
    /// cannot be taken for the answer to the next message. The backend is then broken
    /// ([`VhostUserAttachment::is_broken`]): the mapper sends it nothing more, refuses to
    /// add ranges, and refuses to let a range of its table turn private, until the VMM
    /// declares the backend's process gone ([`VhostUserAttachment::backend_exited`]). A
    /// closed connection or an answer that is not the message's breaks it the same way.
    ///
    /// The deadline is kept by a thread of the attachment's, asleep unless a message is
    /// out. A timeout too long to add to the current time (`Duration::MAX`) is no
    /// deadline at all: the mapper then waits for as long as the backend takes.
    pub fn with_reply_timeout(mut self, timeout: Duration) -> Self {
        self.reply_timeout = timeout.max(MIN_REPLY_TIMEOUT);
        self
    }

    /// The reply timeout: how long each message waits for its answer, and how long each
    /// listener call may go on sending messages (so one call holds the conversion lock
    /// for less than twice it; see [`VhostUserMapper::with_reply_timeout`]).
    pub fn reply_timeout(&self) -> Duration {
        self.reply_timeout
    }

    /// What the backend answered to `GET_MAX_MEM_SLOTS`.
    pub fn backend_slots(&self) -> u64 {
        self.backend_slots
    }

    /// Adds every run of `range` that is shared now to the backend's table and follows
    /// every later conversion in `range`, with nothing missed in between
    /// ([`PrivateMemoryManager::subscribe_with_replay`]). Host addresses and files come from
    /// `memory`'s own list of regions ([`PrivateMemoryManager::shared_pages`]).
    ///
    /// The returned attachment holds the backend's table: keep it for as long as the
    /// backend serves the guest. Dropping it (or [`VhostUserAttachment::detach`])
    /// removes every region and only then stops following conversions, so no page can
    /// turn private while the backend still maps it.
    ///
    /// A region added later with shared pages ([`PrivateMemoryManager::add_region`]) is added
    /// as it is added (a refusal fails the addition). Pages freed by
    /// [`PrivateMemoryManager::discard`] (a balloon) are removed with it and stay so until a
    /// conversion next offers them: their memory is meant to go back to the host. A
    /// page the mapper holds is never private.
    ///
    /// **It may return a broken attachment: check [`VhostUserAttachment::is_broken`].**
    /// If the backend stops answering while the runs shared now are added (the reply
    /// deadline passes, the connection closes, an answer comes out of turn), the
    /// attachment comes back broken, with the error in
    /// [`VhostUserAttachment::take_errors`]: the backend may map what was sent, so those
    /// runs stay followed, and the runs after them are not sent (they stay shared, and
    /// the backend does not map them). The attachment is what the VMM recovers with:
    /// kill the backend and wait until it has exited, then
    /// [`VhostUserAttachment::backend_exited`].
    ///
    /// # Errors
    ///
    /// [`Error::NoShareableFile`] for in-place memory; [`Error::Deadline`] if the reply
    /// deadline's thread cannot be started (nothing was sent); [`Error::Subscribe`] if
    /// the runs shared now cannot all be added (over the slot budget, the backend
    /// refused one, or one run's additions ran out of time, [`Error::OutOfTime`]; the
    /// reason is an [`Error`]): nothing stays added, unless the backend
    /// did not let go of a region added before the refusal: the error is then
    /// vm-private-memory's `RollbackFailed`, whose `kept_shared` runs stay in the
    /// backend's table, and the memory keeps telling the mapper when they go private
    /// (it tries the removal again) until they are removed. If the backend also broke
    /// during that rollback (a removal went unanswered), no removal is tried again and
    /// those runs stay shared for as long as the memory lives: there is no attachment
    /// to declare the backend exited with.
    pub fn attach<B: DirtyBitmap>(
        self,
        memory: &PrivateMemoryManager<B>,
        range: PageRange,
    ) -> Result<VhostUserAttachment, Error> {
        shareable(memory)?;
        let deadline =
            Deadline::new(&self.frontend, self.reply_timeout).map_err(Error::Deadline)?;
        let broken = BrokenBy::default();
        let mapper = Arc::new(Mapper {
            budget: self.budget,
            backend_slots: self.backend_slots,
            peer: self.peer,
            shared: memory.shared_pages(),
            broken: Arc::clone(&broken),
            state: Mutex::new(State {
                channel: Channel::new(self.frontend, deadline, broken),
                table: BTreeMap::new(),
                errors: ErrorLog::default(),
                detached: false,
                attaching: Some(std::thread::current().id()),
            }),
        });
        let listener: Arc<dyn MemoryListener> = Arc::clone(&mapper) as Arc<dyn MemoryListener>;
        let subscribed = memory.subscribe_with_replay(range, listener);
        mapper.lock().attaching = None;
        let subscription = subscribed.map_err(Error::Subscribe)?;
        Ok(VhostUserAttachment {
            mapper,
            subscription: Kept::new(subscription),
        })
    }
}

pub(crate) fn shareable<B: DirtyBitmap>(memory: &PrivateMemoryManager<B>) -> Result<(), Error> {
    match memory.strategy() {
        Strategy::Dual => Ok(()),
        strategy => Err(Error::NoShareableFile { strategy }),
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
