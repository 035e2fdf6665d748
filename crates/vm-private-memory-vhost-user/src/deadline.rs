// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A bound on the wait for the backend's reply.
//!
//! vhost's `Frontend` reads a reply until the whole message is in, and takes `EAGAIN`
//! and `EINTR` as "try again": a receive timeout on its socket (`SO_RCVTIMEO`, or
//! `SO_SNDTIMEO` for the send) only makes it wait again, so it cannot bound the wait.
//! What does is shutting the socket down: a blocked read (the mapper's, or a clone's)
//! returns at once with the end of the stream, a blocked send fails, and so does every
//! later message. A missed reply leaves the protocol out of step anyway (a late reply
//! would be read as the answer to the next request), so the connection is of no further
//! use. A watchdog thread, asleep unless a message is out, does the shutting down.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;

/// Shuts a frontend's socket down when a message is not answered in time.
pub(crate) struct Deadline {
    watch: Arc<Watch>,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

/// What the caller and the watchdog share.
struct Watch {
    timer: Mutex<Timer>,
    wake: Condvar,
    /// A duplicate of the frontend's socket: the same socket, and a descriptor that
    /// cannot be closed (and its number reused) under the watchdog.
    socket: UnixStream,
}

#[derive(Default)]
struct Timer {
    /// The message out, and when its reply is due.
    armed: Option<(u64, Instant)>,
    /// The last message's number.
    last: u64,
    /// The message whose reply did not come in time.
    missed: Option<u64>,
    /// The deadline is being dropped.
    quit: bool,
}

impl Watch {
    fn lock(&self) -> MutexGuard<'_, Timer> {
        // Nothing panics while holding it.
        self.timer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn watch(&self) {
        let mut timer = self.lock();
        loop {
            if timer.quit {
                return;
            }
            match timer.armed {
                None => timer = self.wake.wait(timer).unwrap_or_else(|p| p.into_inner()),
                Some((message, due)) => {
                    let now = Instant::now();
                    if now >= due {
                        let _ = self.socket.shutdown(Shutdown::Both);
                        timer.missed = Some(message);
                        timer.armed = None;
                    } else {
                        timer = self
                            .wake
                            .wait_timeout(timer, due - now)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                }
            }
        }
    }
}

/// Disarms the watchdog for `message` when dropped, however [`Deadline::run`]'s exchange
/// ends.
struct Disarm<'a> {
    watch: &'a Watch,
    message: u64,
}

impl Drop for Disarm<'_> {
    fn drop(&mut self) {
        let mut timer = self.watch.lock();
        if matches!(timer.armed, Some((armed, _)) if armed == self.message) {
            timer.armed = None;
        }
    }
}

/// When the replies to messages sent from `now` on are due, given `timeout`; `None` (no
/// deadline) if that is past what an `Instant` can hold.
fn due(now: Instant, timeout: Duration) -> Option<Instant> {
    now.checked_add(timeout)
}

impl Deadline {
    /// A deadline of `timeout` for the messages on `frontend`'s socket: from each
    /// [`Deadline::start`] on.
    pub(crate) fn new(frontend: &Frontend, timeout: Duration) -> io::Result<Self> {
        let fd = frontend.as_raw_fd();
        // SAFETY: `fd` is the frontend's socket, open for as long as `frontend` (which
        // this borrows) lives; it is only duplicated here, and the duplicate owned.
        let socket = UnixStream::from(unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?);
        let watch = Arc::new(Watch {
            timer: Mutex::new(Timer::default()),
            wake: Condvar::new(),
            socket,
        });
        let thread = {
            let watch = Arc::clone(&watch);
            std::thread::Builder::new()
                .name("vhost-user-deadline".to_owned())
                .spawn(move || watch.watch())?
        };
        Ok(Deadline {
            watch,
            timeout,
            thread: Some(thread),
        })
    }

    /// The reply timeout: each message's time for its answer, and each listener call's
    /// time for sending.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The timeout from now: when the answer to a message sent now is due, or when a
    /// listener call starting now must stop sending; `None` (no deadline) for a timeout
    /// too long to add to now (`Duration::MAX`).
    pub(crate) fn start(&self) -> Option<Instant> {
        due(Instant::now(), self.timeout)
    }

    /// Runs `exchange` (one message and the wait for its reply), and shuts the socket
    /// down if it has not returned by `due` (never, if `None`). Returns what it
    /// returned, and whether the socket was shut down for it (then the connection is
    /// gone, whatever `exchange` returned: a reply that came at the last moment still
    /// counts).
    ///
    /// The watchdog is disarmed when `exchange` returns or unwinds: a panic in it does
    /// not leave the socket to be shut down later, under whatever message comes next.
    pub(crate) fn run<T>(&self, due: Option<Instant>, exchange: impl FnOnce() -> T) -> (T, bool) {
        let message = {
            let mut timer = self.watch.lock();
            timer.last += 1;
            timer.armed = due.map(|due| (timer.last, due));
            timer.last
        };
        self.watch.wake.notify_one();
        let out = {
            let _disarm = Disarm {
                watch: &self.watch,
                message,
            };
            exchange()
        };
        (out, self.watch.lock().missed == Some(message))
    }

    /// The request code of the message that waits first on the socket (the first word
    /// of its vhost-user header: request code, flags, size, each a little-endian `u32`),
    /// if one waits, read with `recv(MSG_PEEK | MSG_DONTWAIT)`: nothing is taken off the
    /// socket, and nothing blocks. `None` if nothing waits, the stream has ended, fewer
    /// bytes than the code wait, or `recv` fails. Between two of the mapper's messages
    /// nothing waits, unless the backend sent what no message asked for (a reply twice)
    /// or a reply to a message of one of the frontend's clones waits for the clone to
    /// read it.
    ///
    /// Not `FIONREAD`: a VMM's seccomp filter may allow `ioctl` on the converting thread
    /// (a vCPU's) only for KVM's and VFIO's numbers, and `recvfrom` (libc's `recv`) along
    /// with the `recvmsg` the frontend uses anyway.
    pub(crate) fn waiting_request(&self) -> Option<u32> {
        let mut header = [0u8; 12];
        // SAFETY: `header` is valid for writes of its length, which is what recv is
        // given; MSG_PEEK leaves the bytes on the socket and MSG_DONTWAIT keeps it from
        // blocking; the socket is this deadline's own duplicate, open for as long as it
        // lives.
        let got = unsafe {
            libc::recv(
                self.watch.socket.as_raw_fd(),
                header.as_mut_ptr().cast(),
                header.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(got) {
            Ok(n) if n >= 4 => Some(u32::from_le_bytes([
                header[0], header[1], header[2], header[3],
            ])),
            _ => None,
        }
    }

    /// Shuts the socket down now: nothing more goes through it, for the mapper or the
    /// frontend's clones.
    pub(crate) fn shut_down(&self) {
        let _ = self.watch.socket.shutdown(Shutdown::Both);
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        self.watch.lock().quit = true;
        self.watch.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
    use vhost::vhost_user::VhostUserFrontend;
    use vhost::VhostBackend;

    /// A frontend with `REPLY_ACK` and `CONFIGURE_MEM_SLOTS` acknowledged, whose peer
    /// answers `GET_FEATURES` and nothing else (it reads every message until the end of
    /// the stream).
    fn silent_peer() -> Frontend {
        let (ours, peer) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut header = [0u8; 12];
            while (&peer).read_exact(&mut header).is_ok() {
                let word =
                    |i: usize| u32::from_le_bytes(header[4 * i..4 * i + 4].try_into().unwrap());
                let mut body = vec![0u8; word(2) as usize];
                if (&peer).read_exact(&mut body).is_err() {
                    break;
                }
                if word(0) == 1 {
                    // GET_FEATURES: VHOST_USER_F_PROTOCOL_FEATURES.
                    let mut reply = Vec::new();
                    reply.extend(1u32.to_le_bytes());
                    reply.extend(0x5u32.to_le_bytes());
                    reply.extend(8u32.to_le_bytes());
                    reply.extend((1u64 << 30).to_le_bytes());
                    (&peer).write_all(&reply).unwrap();
                }
            }
        });
        let mut frontend = Frontend::from_stream(ours, 1);
        frontend
            .set_features(frontend.get_features().unwrap())
            .unwrap();
        frontend
            .set_protocol_features(
                VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            )
            .unwrap();
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        frontend
    }

    #[test]
    fn a_reply_that_does_not_come_ends_the_wait_and_the_connection() {
        let mut frontend = silent_peer();
        let deadline = Deadline::new(&frontend, Duration::from_millis(50)).unwrap();
        let region = vhost::VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: 4096,
            userspace_addr: 0x1000,
            mmap_offset: 0,
            mmap_handle: -1,
        };
        let (result, missed) =
            deadline.run(deadline.start(), || frontend.remove_mem_region(&region));
        assert!(missed);
        assert!(result.is_err(), "{result:?}");
        // The socket is shut down: the next message fails at once.
        let (result, missed) =
            deadline.run(deadline.start(), || frontend.remove_mem_region(&region));
        assert!(!missed);
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn an_exchange_that_unwinds_leaves_the_watchdog_disarmed() {
        let frontend = silent_peer();
        let deadline = Deadline::new(&frontend, Duration::from_millis(50)).unwrap();
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            deadline.run(deadline.start(), || {
                std::panic::resume_unwind(Box::new("the exchange panicked"))
            })
        }));
        assert!(unwound.is_err());
        // Well past the deadline the exchange had: the socket is still open.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(frontend.get_features().unwrap(), 1 << 30);
    }

    #[test]
    fn a_timeout_too_long_to_add_to_now_is_no_deadline() {
        let now = Instant::now();
        assert_eq!(due(now, Duration::MAX), None);
        assert_eq!(
            due(now, Duration::from_secs(10)),
            Some(now + Duration::from_secs(10))
        );
        // And a message under it is answered, not cut off.
        let frontend = silent_peer();
        let deadline = Deadline::new(&frontend, Duration::MAX).unwrap();
        assert_eq!(deadline.start(), None);
        let (features, missed) = deadline.run(deadline.start(), || frontend.get_features());
        assert!(!missed);
        assert_eq!(features.unwrap(), 1 << 30);
    }

    #[test]
    fn a_reply_in_time_leaves_the_connection_alone() {
        let frontend = silent_peer();
        let deadline = Deadline::new(&frontend, Duration::from_secs(10)).unwrap();
        let (features, missed) = deadline.run(deadline.start(), || frontend.get_features());
        assert!(!missed);
        assert_eq!(features.unwrap(), 1 << 30);
        // Still connected, after the deadline is gone too.
        drop(deadline);
        assert_eq!(frontend.get_features().unwrap(), 1 << 30);
    }
}
