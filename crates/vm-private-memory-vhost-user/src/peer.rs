// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which process the backend is, to tell whether it has exited.
//!
//! The frontend's socket knows its peer: `SO_PEERCRED` gives the pid of the process that
//! made the backend's listening socket (or the other end of a socket pair), and
//! `SO_PEERPIDFD` (Linux 6.5) a pidfd of that very process, which a reused pid cannot be
//! mistaken for. On older kernels a pidfd is opened from the pid when the mapper is made
//! (`pidfd_open`, Linux 5.3). A pidfd turns readable once its process has exited (a
//! zombie has let go of its memory too).
//!
//! What this cannot see: another process that holds the mappings (a child the backend
//! forked inherits them, and a daemon's socket may have been made by a parent that has
//! since exited), a process the backend passed the memfd's descriptor to, a socket made
//! in this process (a socket pair whose other end went to the backend: the peer is this
//! process), or a peer in a pid namespace this process cannot see. For the last two it
//! answers "unknown"; the first two it cannot tell from the backend.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vhost::vhost_user::Frontend;

/// The backend's process, as far as the socket tells.
#[derive(Debug)]
pub(crate) enum Peer {
    /// A pidfd of it.
    Known { pid: u32, pidfd: OwnedFd },
    /// It had exited when the mapper was made.
    Gone { pid: u32 },
    /// Not known (see the module documentation).
    Unknown,
}

/// Whether the backend's process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// It runs (or has not been seen to exit).
    Running { pid: u32 },
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
            Ok(pidfd) => Peer::Known { pid, pidfd },
            Err(libc::ESRCH) => Peer::Gone { pid },
            Err(_) => Peer::Unknown,
        }
    }

    /// Whether the process runs now.
    pub(crate) fn liveness(&self) -> Liveness {
        match self {
            Peer::Known { pid, pidfd } => {
                let mut poll = libc::pollfd {
                    fd: pidfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: `poll` is one valid pollfd, for a descriptor this owns; a zero
                // timeout does not block.
                match unsafe { libc::poll(&mut poll, 1, 0) } {
                    0 => Liveness::Running { pid: *pid },
                    1 if poll.revents & libc::POLLIN != 0 => Liveness::Exited,
                    _ => Liveness::Unknown,
                }
            }
            Peer::Gone { .. } => Liveness::Exited,
            Peer::Unknown => Liveness::Unknown,
        }
    }

    /// The process's pid, if known.
    pub(crate) fn pid(&self) -> Option<u32> {
        match self {
            Peer::Known { pid, .. } | Peer::Gone { pid } => Some(*pid),
            Peer::Unknown => None,
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
}
