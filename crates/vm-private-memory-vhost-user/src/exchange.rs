// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One message to the backend and its acknowledgement, within the reply deadline; and
//! the broken state, once a message goes unanswered.
//!
//! Two bounds, both of the reply timeout: a listener call (one changed run of a
//! conversion step, one attached run, a detach) sends messages only until one timeout
//! from its start has passed, and each message sent waits for its answer at most one
//! timeout from its sending. A message that would go out once the call's time is spent
//! is not sent, which leaves the protocol in step ([`Error::OutOfTime`], the backend
//! not broken); an answer that does not come within its own timeout leaves it out of
//! step (the backend broken). So one call holds the conversion lock for less than twice
//! the timeout, and a backend that answers every message, if slowly, is never broken
//! for it.

use std::os::fd::RawFd;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use guest_memfd::PageRange;
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag};
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use crate::deadline::Deadline;
use crate::error::Error;
use crate::region::BackendRegion;

/// What broke the backend, once something did. Shared between the channel (which sets
/// it, under the mapper's state lock) and the attachment (which reads it without that
/// lock: [`crate::VhostUserAttachment::is_broken`] never waits for a message).
pub(crate) type BrokenBy = Arc<OnceLock<String>>;

/// The mapper's side of the frontend's socket.
pub(crate) struct Channel {
    frontend: Frontend,
    /// Shuts the frontend's socket down when a reply is late.
    deadline: Deadline,
    broken: BrokenBy,
    /// Until when the current listener call may send messages ([`Channel::begin`]);
    /// `None`: no limit.
    due: Option<Instant>,
}

/// A message of the mapper's.
#[derive(Clone, Copy)]
enum Request {
    Add(RawFd),
    Remove,
}

/// Whether the frontend's failure left the protocol in step: nothing was sent, or the
/// backend answered (with a failure). Anything else (no answer, a closed or broken
/// connection, an answer that was not this message's) leaves it out of step.
fn in_step(error: &vhost::Error) -> bool {
    use vhost::vhost_user::Error as E;
    matches!(
        error,
        vhost::Error::VhostUserProtocol(
            E::BackendInternalError
                | E::InvalidParam
                | E::InvalidOperation(_)
                | E::InactiveFeature(_)
                | E::InactiveOperation(_)
                | E::OversizedMsg
        )
    )
}

impl Channel {
    pub(crate) fn new(frontend: Frontend, deadline: Deadline, broken: BrokenBy) -> Self {
        let due = deadline.start();
        Channel {
            frontend,
            deadline,
            broken,
            due,
        }
    }

    /// Starts a listener call (one changed run of a conversion step, revoked or added;
    /// one run added by attach; a detach): it may send messages for one reply timeout
    /// from now. Each message sent gets the whole timeout for its answer.
    pub(crate) fn begin(&mut self) {
        self.due = self.deadline.start();
    }

    /// Whether the backend is broken.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken.get().is_some()
    }

    /// The error for `range` while the backend is broken, if it is.
    pub(crate) fn broken(&self, range: PageRange) -> Option<Error> {
        self.broken.get().map(|why| Error::Broken {
            range,
            why: why.clone(),
        })
    }

    /// Takes the backend as broken (the first reason stays), and shuts the socket down:
    /// nothing more goes through it.
    fn break_off(&self, why: String) {
        let _ = self.broken.set(why);
        self.deadline.shut_down();
    }

    /// The request that a reply waiting on the socket answers, if it is one of the
    /// mapper's own (`ADD_MEM_REG`, `REM_MEM_REG`): no message of the mapper's is out
    /// between two exchanges, and the VMM does not send these on this frontend, so such a
    /// reply is one no message asked for (the backend answered a message twice, or out
    /// of turn). A reply to any other request is left alone: it answers a message of one
    /// of the VMM's clones of the frontend, which holds the frontend until it has read it
    /// (however long its thread waits to run), so the mapper's message waits for it. One
    /// that no message asked for is read as the answer to the next message of whoever
    /// sends next, and the frontend's own check (the reply names another request) fails
    /// that message, which breaks the backend if it is the mapper's.
    fn stale(&self) -> Option<&'static str> {
        match self.deadline.waiting_request()? {
            code if code == u32::from(FrontendReq::ADD_MEM_REG) => Some("ADD_MEM_REG"),
            code if code == u32::from(FrontendReq::REM_MEM_REG) => Some("REM_MEM_REG"),
            _ => None,
        }
    }

    /// `ADD_MEM_REG` of `region` from the memfd `fd`, and the backend's acknowledgement.
    pub(crate) fn add(&mut self, region: &BackendRegion, fd: RawFd) -> Result<(), Error> {
        self.exchange(Request::Add(fd), region)
    }

    /// `REM_MEM_REG` of the whole of `region`, and the backend's acknowledgement.
    pub(crate) fn remove(&mut self, region: &BackendRegion) -> Result<(), Error> {
        self.exchange(Request::Remove, region)
    }

    /// Sends `request` for `region` and waits, at most one reply timeout, for the
    /// backend's acknowledgement.
    ///
    /// A message that would be sent once the call's time is spent ([`Channel::begin`])
    /// is not sent: nothing is out of step, the backend is not broken, and the error is
    /// [`Error::OutOfTime`] (the region is not mapped, or still mapped, as before). A
    /// backend that answers each of many messages just in time cannot hold one call for
    /// many timeouts.
    ///
    /// A message not answered within its timeout, or whose answer is lost, breaks the
    /// backend: the socket is shut down and nothing more is sent. Then the region counts
    /// as mapped by the backend (a late `ADD_MEM_REG` may have been done, a `REM_MEM_REG`
    /// not): the error is [`Error::NoReply`] or [`Error::Lost`]. A message whose answer
    /// came just as its timeout passed breaks it too, but counts as answered. Once
    /// broken, nothing is sent: [`Error::Broken`].
    ///
    /// Before the message, the socket must hold no reply to an `ADD_MEM_REG` or
    /// `REM_MEM_REG` (one the backend sent twice, or out of turn): it would be read as
    /// this message's answer, and a removal taken as acknowledged that the backend never
    /// did. The protocol is out of step then: the backend breaks, and the message is not
    /// sent ([`Error::Broken`]). A reply to another request is a clone's, left to it (see
    /// `stale`). A duplicate that arrives after this look, or waits behind a clone's
    /// reply, is not seen.
    fn exchange(&mut self, request: Request, region: &BackendRegion) -> Result<(), Error> {
        if let Some(broken) = self.broken(region.guest) {
            return Err(broken);
        }
        let name = match request {
            Request::Add(_) => "ADD_MEM_REG",
            Request::Remove => "REM_MEM_REG",
        };
        if self.due.is_some_and(|due| Instant::now() >= due) {
            return Err(Error::OutOfTime {
                request: name,
                range: region.guest,
                timeout: self.deadline.timeout(),
            });
        }
        if let Some(answered) = self.stale() {
            let why = format!(
                "a reply to {answered} that no message asked for waited on the frontend's socket before {name} of guest [{:#x}, {:#x}) was sent: the backend answered a message twice or out of turn, so its next answer could be taken for the wrong message's",
                region.guest.start(),
                region.guest.end()
            );
            self.break_off(why.clone());
            return Err(Error::Broken {
                range: region.guest,
                why,
            });
        }
        let frontend = &mut self.frontend;
        let (result, missed) = self.deadline.run(self.deadline.start(), || {
            // Asked for on every message: a clone of the frontend may have changed the
            // flags it shares with this one.
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            match request {
                Request::Add(fd) => frontend.add_mem_region(&region.info(fd)).map(|_| ()),
                Request::Remove => frontend.remove_mem_region(&region.info(-1)),
            }
        });
        let timeout = self.deadline.timeout();
        let what = format!(
            "{name} of guest [{:#x}, {:#x}) got no answer",
            region.guest.start(),
            region.guest.end()
        );
        if missed {
            self.break_off(format!(
                "{what} within the reply deadline ({timeout:?} from its sending)"
            ));
        }
        match result {
            Ok(()) => Ok(()),
            Err(_) if missed => Err(Error::NoReply {
                request: name,
                range: region.guest,
                timeout,
            }),
            Err(source) if in_step(&source) => Err(match request {
                Request::Add(_) => Error::Add {
                    range: region.guest,
                    source,
                },
                Request::Remove => Error::Remove {
                    range: region.guest,
                    source,
                },
            }),
            Err(source) => {
                self.break_off(format!("{what}: {source}"));
                Err(Error::Lost {
                    request: name,
                    range: region.guest,
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost::vhost_user::Error as E;

    #[test]
    fn only_a_failure_answered_or_never_sent_leaves_the_protocol_in_step() {
        let io = || std::io::Error::from_raw_os_error(libc::EPIPE);
        for answered in [E::BackendInternalError, E::InvalidParam, E::OversizedMsg] {
            assert!(in_step(&vhost::Error::VhostUserProtocol(answered)));
        }
        for lost in [
            E::PartialMessage,
            E::Disconnected,
            E::InvalidMessage,
            E::SocketBroken(io()),
            E::SocketError(io()),
            E::SocketRetry(io()),
        ] {
            assert!(!in_step(&vhost::Error::VhostUserProtocol(lost)));
        }
        assert!(!in_step(&vhost::Error::IOError(io())));
    }
}
