// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One message to the backend and its acknowledgement, within the reply deadline; and
//! the broken state, once a message goes unanswered.

use std::os::fd::RawFd;
use std::sync::{Arc, OnceLock};

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

/// The mapper's side of the frontend's socket.
pub(crate) struct Channel {
    frontend: Frontend,
    /// Shuts the frontend's socket down when a reply is late.
    deadline: Deadline,
    broken: BrokenBy,
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
        Channel {
            frontend,
            deadline,
            broken,
        }
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

    /// `ADD_MEM_REG` of `region` from the memfd `fd`, and the backend's acknowledgement.
    pub(crate) fn add(&mut self, region: &BackendRegion, fd: RawFd) -> Result<(), Error> {
        self.exchange(Request::Add(fd), region)
    }

    /// `REM_MEM_REG` of the whole of `region`, and the backend's acknowledgement.
    pub(crate) fn remove(&mut self, region: &BackendRegion) -> Result<(), Error> {
        self.exchange(Request::Remove, region)
    }

    /// Sends `request` for `region` and waits (within the deadline) for the backend's
    /// acknowledgement. A message not answered in time, or whose answer is lost, breaks
    /// the backend: the socket is shut down and nothing more is sent. Then the region
    /// counts as mapped by the backend (a late `ADD_MEM_REG` may have been done, a
    /// `REM_MEM_REG` not): the error is [`Error::NoReply`] or [`Error::Lost`]. A message whose answer came just as the deadline
    /// passed breaks it too, but counts as answered. Once broken, nothing is sent:
    /// [`Error::Broken`].
    fn exchange(&mut self, request: Request, region: &BackendRegion) -> Result<(), Error> {
        if let Some(broken) = self.broken(region.guest) {
            return Err(broken);
        }
        let name = match request {
            Request::Add(_) => "ADD_MEM_REG",
            Request::Remove => "REM_MEM_REG",
        };
        let frontend = &mut self.frontend;
        let (result, missed) = self.deadline.run(|| {
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
            self.break_off(format!("{what} within {timeout:?}"));
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
