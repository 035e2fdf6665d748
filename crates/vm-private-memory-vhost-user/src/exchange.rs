// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One message to the backend and its acknowledgement, within the reply deadline; and
//! the broken state, once a message goes unanswered.

use std::os::fd::RawFd;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use guest_memfd::PageRange;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend};

use crate::deadline::Deadline;
use crate::error::Error;
use crate::region::BackendRegion;

/// What broke the backend, once something did. Shared between the channel (which sets
/// it, under the mapper's state lock) and the attachment (which reads it without that
/// lock: [`crate::VhostUserAttachment::is_broken`] never waits for a message).
pub(crate) type BrokenBy = Arc<OnceLock<String>>;

/// How long bytes found waiting on the socket before a message may take to go: a reply
/// to a message of one of the VMM's clones of the frontend, on its way to the clone's
/// read. Bytes still there then are a reply no message asked for.
const STALE_GRACE: Duration = Duration::from_millis(20);

/// The mapper's side of the frontend's socket.
pub(crate) struct Channel {
    frontend: Frontend,
    /// Shuts the frontend's socket down when a reply is late.
    deadline: Deadline,
    broken: BrokenBy,
    /// When every reply of the current step (one listener call) is due
    /// ([`Channel::begin`]); `None`: no deadline.
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

    /// Starts a step (one listener call: a conversion's revocation or addition, one run
    /// added by attach, a detach): the replies to all its messages are due within one
    /// reply timeout from now. Each message gets what is left of it.
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

    /// How many bytes no message asked for wait on the socket, if any: bytes that are
    /// there before a message and still there [`STALE_GRACE`] later (or when the step's
    /// time is up, if sooner).
    fn stale(&self) -> Option<usize> {
        let grace = Instant::now() + STALE_GRACE;
        let until = self.due.map_or(grace, |due| due.min(grace));
        loop {
            let waiting = self.deadline.waiting();
            if waiting == 0 {
                return None;
            }
            if Instant::now() >= until {
                return Some(waiting);
            }
            std::thread::sleep(Duration::from_millis(1));
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

    /// Sends `request` for `region` and waits (until the step's replies are due) for the
    /// backend's acknowledgement. A message that would be sent once they are due is not
    /// sent, and breaks the backend as a missed reply does ([`Error::Broken`]): a backend
    /// that answers each message just in time cannot hold a conversion for many
    /// timeouts. A message not answered in time, or whose answer is lost, breaks
    /// the backend: the socket is shut down and nothing more is sent. Then the region
    /// counts as mapped by the backend (a late `ADD_MEM_REG` may have been done, a
    /// `REM_MEM_REG` not): the error is [`Error::NoReply`] or [`Error::Lost`]. A message whose answer came just as the deadline
    /// passed breaks it too, but counts as answered. Once broken, nothing is sent:
    /// [`Error::Broken`].
    ///
    /// Before the message, the socket must hold nothing to read: bytes waiting there
    /// (a reply the backend sent twice, or out of turn) would be read as this message's
    /// answer, and a removal taken as acknowledged that the backend never did. The
    /// protocol is out of step then: the backend breaks, and the message is not sent
    /// ([`Error::Broken`]). A duplicate that arrives after this check is not seen.
    fn exchange(&mut self, request: Request, region: &BackendRegion) -> Result<(), Error> {
        if let Some(broken) = self.broken(region.guest) {
            return Err(broken);
        }
        let name = match request {
            Request::Add(_) => "ADD_MEM_REG",
            Request::Remove => "REM_MEM_REG",
        };
        if self.due.is_some_and(|due| Instant::now() >= due) {
            let why = format!(
                "the reply deadline ({:?} for all the messages of one conversion, attached run or detach) ran out before {name} of guest [{:#x}, {:#x}) could be sent",
                self.deadline.timeout(),
                region.guest.start(),
                region.guest.end()
            );
            self.break_off(why.clone());
            return Err(Error::Broken {
                range: region.guest,
                why,
            });
        }
        if let Some(bytes) = self.stale() {
            let why = format!(
                "{bytes} bytes that no message asked for waited on the frontend's socket before {name} of guest [{:#x}, {:#x}) was sent: the backend answered a message twice or out of turn, so its next answer could be taken for the wrong message's",
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
        let (result, missed) = self.deadline.run(self.due, || {
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
                "{what} within the reply deadline ({timeout:?} for all the messages of one conversion, attached run or detach)"
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
