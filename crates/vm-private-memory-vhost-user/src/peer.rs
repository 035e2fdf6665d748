// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which process the backend is, to tell whether it has exited.
//!
//! The VMM that spawned the backend knows its pid, and may give it
//! ([`crate::VhostUserMapper::with_backend_pid`]): a pidfd is opened from it at once
//! (`pidfd_open`). Otherwise the frontend's socket tells its peer, which is a guess: `SO_PEERCRED` gives the pid of the process that
//! made the backend's listening socket (or the other end of a socket pair), and
//! `SO_PEERPIDFD` (Linux 6.5) a pidfd of that very process, which a reused pid cannot be
//! mistaken for. On older kernels a pidfd is opened from the pid when the mapper is made
//! (`pidfd_open`, Linux 5.3). A pidfd turns readable once its process has exited (a
//! zombie has let go of its memory too).
//!
//! The peer is the process that called `listen` on the backend's socket, which is not
//! the backend when a supervisor made the socket (systemd socket activation, a
//! management daemon passing the descriptor, a daemon that forks a child per
//! connection): then it names a process that may outlive the backend, or exit before it.
//!
//! What this cannot see: another process that holds the mappings (a child the backend
//! forked inherits them, and a daemon's socket may have been made by a parent that has
//! since exited), a process the backend passed the memfd's descriptor to, a socket made
//! in this process (a socket pair whose other end went to the backend: the peer is this
//! process), or a peer in a pid namespace this process cannot see. For the last two it
//! answers "unknown"; the first two it cannot tell from the backend.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vhost::vhost_user::Frontend;

/// Where a mapper's idea of the backend's process comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PidSource {
    /// The VMM gave it ([`crate::VhostUserMapper::with_backend_pid`]).
    Given,
    /// The frontend's socket (`SO_PEERCRED`, `SO_PEERPIDFD`): the process that made the
    /// backend's listening socket, which is the backend unless a supervisor made it.
    ListeningSocket,
}

impl PidSource {
    /// The process, as the messages name it.
    pub(crate) fn process(self) -> &'static str {
        match self {
            PidSource::Given => "the vhost-user backend's process",
            PidSource::ListeningSocket => {
                "the process that made the vhost-user backend's listening socket"
            }
        }
    }

    /// What else the VMM can do, as the messages say it.
    pub(crate) fn otherwise(self) -> &'static str {
        match self {
            PidSource::Given => "",
            PidSource::ListeningSocket => " That process is the backend unless a supervisor made the socket (systemd socket activation, a daemon that passed the descriptor or forks a backend per connection), which may outlive the backend: then give the mapper the backend's own pid (VhostUserMapper::with_backend_pid), or, once the backend's process is known to be gone, call assume_backend_exited on the attachment.",
        }
    }
}

/// The backend's process, as far as the VMM or the socket tells.
#[derive(Debug)]
pub(crate) enum Peer {
    /// A pidfd of it.
    Known {
        pid: u32,
        pidfd: OwnedFd,
        source: PidSource,
    },
    /// It had exited when the mapper was made.
    Gone,
    /// Not known (see the module documentation).
    Unknown,
}

/// Whether the backend's process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// It runs (or has not been seen to exit).
    Running { pid: u32, source: PidSource },
    /// It has exited.
    Exited,
    /// Not known.
    Unknown,
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `SO_PEERCRED`'s pid; `None` if unknown (0: a pid namespace this process cannot see).
fn peer_pid(socket: RawFd) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of `len` bytes, the size of `ucred`,
    // which is what SO_PEERCRED writes; `socket` is a descriptor the caller keeps open.
    let ret = unsafe {
        libc::getsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (ret == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// `SO_PEERPIDFD`: a pidfd of the peer, or the errno.
fn peer_pidfd(socket: RawFd) -> Result<OwnedFd, i32> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `fd` and `len` are valid for writes of `len` bytes, the size of an int,
    // which is what SO_PEERPIDFD writes; `socket` is a descriptor the caller keeps open.
    let ret = unsafe {
        libc::getsockopt(
            socket,
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just made `fd` for this process; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_open(pid)`, or the errno.
fn pidfd_open(pid: u32) -> Result<OwnedFd, i32> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; it
    // touches no memory of this process.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if ret < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just made this descriptor for this process; nothing else owns
    // it.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

impl Peer {
    /// The process at the other end of `frontend`'s socket.
    pub(crate) fn of(frontend: &Frontend) -> Peer {
        let socket = frontend.as_raw_fd();
        let Some(pid) = peer_pid(socket) else {
            return Peer::Unknown;
        };
        if pid == std::process::id() {
            // A socket pair made here: its peer credentials are this process's own.
            return Peer::Unknown;
        }
        let pidfd = match peer_pidfd(socket) {
            Err(libc::ENOPROTOOPT | libc::EINVAL) => pidfd_open(pid),
            other => other,
        };
        match pidfd {
            Ok(pidfd) => Peer::Known {
                pid,
                pidfd,
                source: PidSource::ListeningSocket,
            },
            Err(libc::ESRCH) => Peer::Gone,
            Err(_) => Peer::Unknown,
        }
    }

    /// The process `pid`, as the VMM gives it: a pidfd of it, opened now; the errno of
    /// `pidfd_open` if that fails.
    pub(crate) fn given(pid: u32) -> Result<Peer, i32> {
        Ok(Peer::Known {
            pid,
            pidfd: pidfd_open(pid)?,
            source: PidSource::Given,
        })
    }

    /// Whether the process runs now.
    pub(crate) fn liveness(&self) -> Liveness {
        match self {
            Peer::Known { pid, pidfd, source } => {
                let mut poll = libc::pollfd {
                    fd: pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `poll` is one valid pollfd, for a descriptor this owns; a zero
                // timeout does not block.
                match unsafe { libc::poll(&mut poll, 1, 0) } {
                    0 => Liveness::Running {
                        pid: *pid,
                        source: *source,
                    },
                    1 if poll.revents & libc::POLLIN != 0 => Liveness::Exited,
                    _ => Liveness::Unknown,
                }
            }
            Peer::Gone => Liveness::Exited,
            Peer::Unknown => Liveness::Unknown,
        }
    }

    /// The process's pid, if known and it has not been seen to exit (once it has, the
    /// pid may name another process).
    pub(crate) fn pid(&self) -> Option<u32> {
        match (self, self.liveness()) {
            (_, Liveness::Exited) | (Peer::Gone | Peer::Unknown, _) => None,
            (Peer::Known { pid, .. }, _) => Some(*pid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_socket_pair_made_here_has_no_known_peer() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let peer = Peer::of(&Frontend::from_stream(ours, 1));
        assert!(matches!(peer, Peer::Unknown), "{peer:?}");
        assert_eq!(peer.liveness(), Liveness::Unknown);
    }

    #[test]
    fn a_pid_given_is_followed_until_its_process_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let peer = Peer::given(child.id()).unwrap();
        assert_eq!(
            peer.liveness(),
            Liveness::Running {
                pid: child.id(),
                source: PidSource::Given
            }
        );
        assert_eq!(peer.pid(), Some(child.id()));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(peer.liveness(), Liveness::Exited);
        assert_eq!(peer.pid(), None);
        // A pid no process has.
        assert_eq!(Peer::given(i32::MAX as u32).unwrap_err(), libc::ESRCH);
    }
}
