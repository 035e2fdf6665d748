// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The crate's errors.

use std::time::Duration;

use guest_memfd::PageRange;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_private_memory::Strategy;

use crate::peer::PidSource;

/// What the VMM does about a broken backend, as the messages say it.
pub(crate) const AFTER_BREAK: &str = "Kill the backend's process if it still runs and wait until it has exited, then call VhostUserAttachment::backend_exited (or, if a supervisor that outlives the backend made its socket and the VMM has seen the backend itself exit, assume_backend_exited), and attach a new backend";

/// Why a [`VhostUserMapper`](crate::VhostUserMapper) could not be made or attached, or
/// refused a range (a conversion that offered it is rolled back and carries this as its
/// [`vm_private_memory::ListenerRefusal`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The memory has no file another process may map.
    #[error(
        "a vhost-user backend cannot be given memory of the {strategy:?} strategy: its only file is the guest_memfd, which holds private pages too, and no other process may map it; build the memory with Strategy::Dual, whose shared pages live in a sealed memfd of their own"
    )]
    NoShareableFile {
        /// The memory's strategy.
        strategy: Strategy,
    },
    /// The frontend did not acknowledge protocol features the mapper needs.
    #[error(
        "the vhost-user frontend has not acknowledged the protocol features {missing:?}, without which a backend's access cannot be revoked: ack VHOST_USER_F_PROTOCOL_FEATURES (set_features), then CONFIGURE_MEM_SLOTS and REPLY_ACK (set_protocol_features), and pass the features acknowledged"
    )]
    NotNegotiated {
        /// The protocol features missing from those acknowledged.
        missing: VhostUserProtocolFeatures,
    },
    /// The backend does not offer protocol features the mapper needs.
    #[error(
        "the vhost-user backend does not offer the protocol features {missing:?}: it cannot add and remove single memory regions with acknowledgements, so its access to pages that go private cannot be revoked; use a backend that supports CONFIGURE_MEM_SLOTS and REPLY_ACK"
    )]
    NotOffered {
        /// The protocol features the backend does not offer.
        missing: VhostUserProtocolFeatures,
    },
    /// A query to the backend failed.
    #[error("asking the vhost-user backend for {request} failed: {source} (was get_features called, and is the backend still connected?)")]
    Query {
        /// The request (`GET_PROTOCOL_FEATURES`, `GET_MAX_MEM_SLOTS`).
        request: &'static str,
        /// vhost's error, with the socket's errno where there is one.
        #[source]
        source: vhost::Error,
    },
    /// Mapping the range would take more memory slots than the budget allows.
    #[error(
        "mapping [{:#x}, {:#x}) into the vhost-user backend needs {needed} more memory slots, but {held} of a budget of {budget} are held: share fewer, larger ranges, or raise the backend's slot limit (GET_MAX_MEM_SLOTS) and this mapper's budget (VhostUserMapper::with_slot_budget)",
        range.start(), range.end()
    )]
    SlotBudget {
        /// The range offered.
        range: PageRange,
        /// Slots it needs.
        needed: usize,
        /// Slots held before it.
        held: usize,
        /// The budget.
        budget: usize,
    },
    /// The backend refused a region (it answered with a failure), or the frontend could
    /// not send it.
    #[error(
        "ADD_MEM_REG of guest [{:#x}, {:#x}) to the vhost-user backend failed: {source}; the backend does not map it (check the backend's log)",
        range.start(), range.end()
    )]
    Add {
        /// The region's guest-physical range.
        range: PageRange,
        /// vhost's error, with the socket's errno where there is one.
        #[source]
        source: vhost::Error,
    },
    /// The backend refused the removal of a region (it answered with a failure), or the
    /// frontend could not send it.
    #[error(
        "REM_MEM_REG of guest [{:#x}, {:#x}) from the vhost-user backend failed: {source}; the backend may still map it, so its conversions are still followed (a conversion of it to private is refused)",
        range.start(), range.end()
    )]
    Remove {
        /// The region's guest-physical range.
        range: PageRange,
        /// vhost's error, with the socket's errno where there is one.
        #[source]
        source: vhost::Error,
    },
    /// The backend did not answer a message within the reply timeout from its sending
    /// ([`VhostUserMapper::with_reply_timeout`]): it is broken from then on.
    ///
    /// [`VhostUserMapper::with_reply_timeout`]: crate::VhostUserMapper::with_reply_timeout
    #[error(
        "the vhost-user backend did not answer {request} of guest [{:#x}, {:#x}) within the reply deadline ({timeout:?} from its sending): it is taken as broken, its connection is shut down (a late answer would be read as the answer to the next message) and it is sent nothing more; it may still map the region. {after}.",
        range.start(), range.end(), after = AFTER_BREAK
    )]
    NoReply {
        /// The request (`ADD_MEM_REG`, `REM_MEM_REG`).
        request: &'static str,
        /// The region's guest-physical range.
        range: PageRange,
        /// The reply timeout.
        timeout: Duration,
    },
    /// The listener call's time for its messages (one reply timeout from its start: one
    /// changed run of a conversion step, one attached run, or a detach) was spent before
    /// this message could be sent, by the answers to the ones before it. Nothing was
    /// sent: the protocol is in step and the backend is **not** broken.
    ///
    /// A conversion to private that meets it stops with the range still shared; a
    /// conversion to shared is refused (or, if regions it added cannot be taken back in
    /// time, goes on with the error in
    /// [`VhostUserAttachment::take_errors`](crate::VhostUserAttachment::take_errors));
    /// a detach hands the attachment back ([`DetachError`]). Each may be tried again.
    #[error(
        "{request} of guest [{:#x}, {:#x}) was not sent to the vhost-user backend: this call's time for its messages ({timeout:?} from its start, for one changed run of a conversion step, one attached run or a detach) was spent on the answers to the messages before it. Nothing was sent and the backend is not broken: the operation is refused and may be tried again; if the backend is this slow by design, raise the reply timeout (VhostUserMapper::with_reply_timeout)",
        range.start(), range.end()
    )]
    OutOfTime {
        /// The request (`ADD_MEM_REG`, `REM_MEM_REG`).
        request: &'static str,
        /// The region's guest-physical range.
        range: PageRange,
        /// The reply timeout: the call's time for its messages.
        timeout: Duration,
    },
    /// The backend's answer did not come (the connection closed or broke) or was not the
    /// answer to the message: the protocol is out of step, and the backend is broken
    /// from then on.
    #[error(
        "{request} of guest [{:#x}, {:#x}) got no answer from the vhost-user backend: {source}; the protocol is out of step, so the backend is taken as broken, its connection is shut down and it is sent nothing more; it may still map the region. {after}.",
        range.start(), range.end(), after = AFTER_BREAK
    )]
    Lost {
        /// The request (`ADD_MEM_REG`, `REM_MEM_REG`).
        request: &'static str,
        /// The region's guest-physical range.
        range: PageRange,
        /// vhost's error, with the socket's errno where there is one (a closed
        /// connection reads as a partial message).
        #[source]
        source: vhost::Error,
    },
    /// The backend is broken (an earlier message went unanswered): the mapper sends it
    /// nothing more.
    #[error(
        "guest [{:#x}, {:#x}) cannot be mapped into or removed from the vhost-user backend: the backend is broken ({why}) and is sent nothing more. {after}",
        range.start(), range.end(), after = AFTER_BREAK
    )]
    Broken {
        /// The range offered, revoked or left in the table.
        range: PageRange,
        /// What broke it: the message that went unanswered, and why.
        why: String,
    },
    /// More errors came than an attachment keeps until they are taken: the last of
    /// [`VhostUserAttachment::take_errors`](crate::VhostUserAttachment::take_errors)'s
    /// list, after the ones kept.
    #[error(
        "{dropped} more errors came after the first {kept} and were dropped, only counted: take the errors (VhostUserAttachment::take_errors) after each conversion the VMM serves, and check is_broken"
    )]
    ErrorsDropped {
        /// How many were kept.
        kept: usize,
        /// How many came after them.
        dropped: usize,
    },
    /// The backend's pid, as the VMM gave it, names no process this one can follow.
    #[error(
        "pidfd_open({pid}), for the vhost-user backend's process, failed: {source} (ESRCH: no such process in this pid namespace, or it has exited and been reaped; EINVAL: not a pid, as 0 or one above i32::MAX; EINVAL, or ENOENT since Linux 6.9: the id of a thread other than its process's first; ENOSYS: a kernel older than 5.3); give the pid of the backend's process (its first thread's id) as the VMM spawned it, while it runs, or leave it out to take the socket's peer"
    )]
    BackendPid {
        /// The pid given.
        pid: u32,
        /// `pidfd_open`'s errno.
        #[source]
        source: std::io::Error,
    },
    /// The reply deadline could not be set up.
    #[error("setting up the vhost-user mapper's reply deadline (a duplicate of the frontend's socket, and a thread that shuts it down when a reply is late) failed: {0}")]
    Deadline(#[source] std::io::Error),
    /// Subscribing to the memory failed.
    #[error("subscribing the vhost-user mapper to guest memory failed: {0}")]
    Subscribe(#[source] vm_private_memory::Error),
}

impl Error {
    /// Whether this is a message that was sent and got no answer ([`Error::NoReply`],
    /// [`Error::Lost`]): the backend may have done it.
    pub(crate) fn sent_unanswered(&self) -> bool {
        matches!(self, Error::NoReply { .. } | Error::Lost { .. })
    }

    /// Whether this says the backend is broken ([`Error::NoReply`], [`Error::Lost`],
    /// [`Error::Broken`]).
    pub(crate) fn broke_the_backend(&self) -> bool {
        matches!(
            self,
            Error::NoReply { .. } | Error::Lost { .. } | Error::Broken { .. }
        )
    }

    /// What to do with a [`DetachError`] holding this.
    fn after_detach(&self) -> &'static str {
        if self.broke_the_backend() {
            "The backend is broken and is sent nothing more, so detach cannot remove them: kill the backend's process if it still runs and wait until it has exited, then call backend_exited on the attachment this error holds (or, if a supervisor that outlives the backend made its socket and the VMM has seen the backend itself exit, assume_backend_exited)"
        } else {
            "Call detach again on the attachment this error holds once the backend lets go (check is_broken first: if the backend broke since, detach sends nothing), or, once the backend's process has exited, backend_exited"
        }
    }
}

/// [`VhostUserAttachment::backend_exited`](crate::VhostUserAttachment::backend_exited)
/// refused: the backend's process still runs, as far as the mapper knows it. It holds
/// the attachment, unchanged.
///
/// What to do depends on where the mapper has the process from ([`StillRunning::origin`]):
/// the backend's own process ([`PidSource::Given`]) is killed (if it is stuck) and waited
/// for until it has exited (reaping it is not needed); the socket's peer
/// ([`PidSource::ListeningSocket`]) may be a supervisor, which must not be killed for
/// this. The message says which.
#[derive(Debug, thiserror::Error)]
#[error(
    "{} ({pid}) is still running, and a live backend keeps its mappings of guest memory until it exits: {}{}",
    .origin.process(),
    .origin.advice(),
    .origin.otherwise()
)]
#[non_exhaustive]
pub struct StillRunning {
    /// The pid of the process that still runs.
    pub pid: u32,
    /// Where the mapper has that process from: the VMM's word
    /// ([`VhostUserMapper::with_backend_pid`](crate::VhostUserMapper::with_backend_pid))
    /// or the socket's peer, which may be a supervisor rather than the backend.
    pub origin: PidSource,
    /// The attachment, as it was.
    pub attachment: crate::VhostUserAttachment,
}

/// [`VhostUserAttachment::detach`](crate::VhostUserAttachment::detach) left regions in
/// the backend's table. It holds the attachment, which keeps following those regions.
///
/// Its message says what to do, after `error`: detach again once the backend lets go,
/// or, if `error` is one that broke the backend ([`Error::NoReply`], [`Error::Lost`],
/// [`Error::Broken`]), wait for the backend's process to exit and call
/// [`VhostUserAttachment::backend_exited`](crate::VhostUserAttachment::backend_exited).
#[derive(Debug, thiserror::Error)]
#[error(
    "detaching from the vhost-user backend left regions in its table: {error}. The backend may still map them, so they stay followed and cannot turn private. {}",
    .error.after_detach()
)]
#[non_exhaustive]
pub struct DetachError {
    /// Why: what broke the backend, if it is broken (before the detach or during it);
    /// otherwise the first removal the backend did not acknowledge (or that there was
    /// no time left for, [`Error::OutOfTime`]).
    #[source]
    pub error: Error,
    /// The attachment, with the regions left in its table.
    pub attachment: crate::VhostUserAttachment,
}
