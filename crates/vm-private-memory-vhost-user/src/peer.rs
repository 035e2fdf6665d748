// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Which process the backend is, to tell whether it has exited.
//!
//! The VMM that spawned the backend knows its pid, and may give it
//! ([`crate::VhostUserMapper::with_backend_pid`]): a pidfd is opened from it at once
//! (`pidfd_open`). Otherwise the frontend's socket tells its peer, which is a guess whose
//! worth depends on which side listened:
//!
//! - **The VMM connects** (the backend, or whoever made its socket, listens): the peer
//!   credentials are those of the process that called `listen`, which is not the backend
//!   when a supervisor made the socket (systemd socket activation, a management daemon
//!   passing the descriptor, a daemon that forks a child per connection): then it names a
//!   process that may outlive the backend, or exit before it.
//! - **The VMM listens and accepts** (Cloud Hypervisor's `vhost_mode=server`): the peer
//!   credentials are those of the process that called `connect`, usually the backend
//!   itself.
//!
//! `SO_PEERPIDFD` (Linux 6.5) gives a pidfd of that very process, which a reused pid
//! cannot be mistaken for. Only where the kernel does not know the option
//! (`ENOPROTOOPT`) is a pidfd opened from `SO_PEERCRED`'s pid (`pidfd_open`, Linux 5.3):
//! a kernel that knows it and fails (`EINVAL`: the peer is gone, `ESRCH`) leaves the
//! process unknown, since its pid may name another process by now. A pidfd turns
//! readable once its process has exited (a zombie has let go of its memory too: reaping
//! it is not needed).
//!
//! What this cannot see: another process that holds the mappings (a child the backend
//! forked inherits them, and a daemon's socket may have been made by a parent that has
//! since exited), a process the backend passed the memfd's descriptor to, a socket made
//! in this process (a socket pair whose other end went to the backend: the peer is this
//! process), a peer that had exited when the mapper was made, or a peer in a pid
//! namespace this process cannot see. For the last three it answers "unknown"; the first
//! two it cannot tell from the backend. Dropping an attachment lets go of a broken
//! backend's table by itself only for a pid the VMM gave (see
//! [`crate::VhostUserAttachment`]'s `Drop`): the socket's peer is too weak a guess for
//! that.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vhost::vhost_user::Frontend;

/// Where a mapper's idea of the backend's process comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PidSource {
    /// The VMM gave it ([`crate::VhostUserMapper::with_backend_pid`]).
    Given,
    /// The frontend's socket (`SO_PEERPIDFD`, `SO_PEERCRED`): its peer. When the VMM
    /// connected, that is the process that made the backend's listening socket (called
    /// `listen`), which is the backend unless a supervisor made it; when the VMM listened
    /// and accepted (Cloud Hypervisor's `vhost_mode=server`), the process that connected,
    /// usually the backend.
    ListeningSocket,
}

impl PidSource {
    /// The process, as the messages name it.
    pub(crate) fn process(self) -> &'static str {
        match self {
            PidSource::Given => "the vhost-user backend's process",
            PidSource::ListeningSocket => {
                "the process at the other end of the vhost-user frontend's socket"
            }
        }
    }

    /// What the VMM does about the process, as the messages say it.
    pub(crate) fn advice(self) -> &'static str {
        match self {
            PidSource::Given => "kill it (SIGKILL if it is stuck) and wait until it has exited, then call backend_exited again with the attachment this error holds.",
            PidSource::ListeningSocket => "if it is the backend, kill it (SIGKILL if it is stuck) and wait until it has exited, then call backend_exited again with the attachment this error holds.",
        }
    }

    /// What else the VMM can do, as the messages say it.
    pub(crate) fn otherwise(self) -> &'static str {
        match self {
            PidSource::Given => "",
            PidSource::ListeningSocket => " That process made the backend's listening socket (when the VMM connected) or connected to the VMM's (when the VMM listened): it is the backend unless a supervisor made the socket (systemd socket activation, a daemon that passed the descriptor or forks a backend per connection), which may outlive the backend. Do not kill a supervisor: give the mapper the backend's own pid (VhostUserMapper::with_backend_pid), or, once the backend's own process has exited, call assume_backend_exited on the attachment.",
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
    /// Not known (see the module documentation).
    Unknown,
}

/// Whether the backend's process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// It runs (or has not been seen to exit).
    Running { pid: u32, source: PidSource },
    /// It has exited: its pidfd says so.
    Exited { source: PidSource },
    /// Not known: no pidfd (see the module documentation), or `poll` on it failed.
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
            // A kernel without SO_PEERPIDFD (before 6.5): the pid it is, opened now. One
            // that has the option and fails (EINVAL: the peer task is gone, ESRCH) says
            // the pid may name another process by now: nothing is opened from it.
            Err(libc::ENOPROTOOPT) => pidfd_open(pid),
            other => other,
        };
        match pidfd {
            Ok(pidfd) => Peer::Known {
                pid,
                pidfd,
                source: PidSource::ListeningSocket,
            },
            // Gone, or not known: either way nothing to follow, and no word that the
            // backend (which the peer may not be) has exited.
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
                    1 if poll.revents & libc::POLLIN != 0 => Liveness::Exited { source: *source },
                    // poll failed: not known.
                    _ => Liveness::Unknown,
                }
            }
            Peer::Unknown => Liveness::Unknown,
        }
    }

    /// The process's pid, if known and it has not been seen to exit (once it has, the
    /// pid may name another process).
    pub(crate) fn pid(&self) -> Option<u32> {
        match (self, self.liveness()) {
            (_, Liveness::Exited { .. }) | (Peer::Unknown, _) => None,
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
        assert_eq!(
            peer.liveness(),
            Liveness::Exited {
                source: PidSource::Given
            }
        );
        assert_eq!(peer.pid(), None);
        // A pid no process has.
        assert_eq!(Peer::given(i32::MAX as u32).unwrap_err(), libc::ESRCH);
        // Not pids: 0, a number pid_t cannot hold; and a thread other than the first
        // (EINVAL before Linux 6.9, ENOENT since).
        assert_eq!(Peer::given(0).unwrap_err(), libc::EINVAL);
        assert_eq!(Peer::given(u32::MAX).unwrap_err(), libc::EINVAL);
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            // SAFETY: gettid takes nothing and returns the calling thread's id.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap() as u32;
        assert_ne!(tid, std::process::id());
        let errno = Peer::given(tid).unwrap_err();
        assert!(errno == libc::EINVAL || errno == libc::ENOENT, "{errno}");
        drop(done_tx);
        other.join().unwrap();
    }
}
