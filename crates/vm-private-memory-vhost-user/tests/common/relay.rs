// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The backend process's front door: a relay between the frontend and the rust-vmm
//! daemon, in the backend's process, that the frontend can tell to refuse or swallow
//! removals.
//!
//! rust-vmm's `vhost-user-backend` daemon ends the connection after any request its
//! handler fails, and changes its memory before it asks the device: it cannot refuse a
//! `REM_MEM_REG` and go on serving with the region still mapped. The relay can: with
//! [`Answer::Refuse`] it answers a removal (or an addition) itself with a failure (the
//! daemon never hears of it, so the region stays mapped, or unmapped), and with
//! [`Answer::Stall`] it stops reading the frontend's messages, as a backend stuck in its
//! handler does. Everything else goes through unchanged, with its descriptor (the
//! messages used here carry at most one).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// How the relay answers a removal (`REM_MEM_REG`), an addition (`ADD_MEM_REG`) or a
/// config read (`GET_CONFIG`), once the ones it was told to let through first are
/// through. The frontend sets it
/// with `SET_CONFIG` at [`CONTROL_OFFSET`] ([`Answer::control`]), which the relay
/// answers itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum Answer {
    /// Passes it to the daemon, which does it and acknowledges.
    #[default]
    Acknowledge = 0,
    /// Answers it with a failure (if a reply was asked for); the daemon never hears of
    /// it.
    Refuse = 1,
    /// Never answers, and reads nothing more from the frontend.
    Stall = 2,
    /// Passes it to the daemon, and sends the daemon's reply twice (in one write: the
    /// second is waiting on the frontend's socket once the first is read), as a buggy
    /// backend that acknowledges a message twice; the ones after it stall.
    TwiceThenStall = 3,
    /// Waits [`Answer::DELAYED_BY`], then passes it to the daemon.
    Delay = 4,
    /// Answers it with a failure, as [`Answer::Refuse`]; the ones after it stall.
    RefuseThenStall = 5,
}

/// Which requests an [`Answer`] is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Of {
    Removals = 0,
    Additions = 1,
    /// `GET_CONFIG`, which a VMM sends at run time on its own clone of the frontend.
    ConfigReads = 2,
}

/// Where in the config space [`Answer::control`] is written.
pub const CONTROL_OFFSET: u32 = 0x80;

impl Answer {
    /// How long [`Answer::Delay`] holds each message.
    pub const DELAYED_BY: std::time::Duration = std::time::Duration::from_millis(150);

    /// The bytes to write: answer `of` this way, after passing `first` through.
    pub fn control(self, of: Of, first: u8) -> [u8; 3] {
        [self as u8, first, of as u8]
    }

    fn from_byte(b: u8) -> Self {
        match b {
            1 => Answer::Refuse,
            2 => Answer::Stall,
            3 => Answer::TwiceThenStall,
            4 => Answer::Delay,
            5 => Answer::RefuseThenStall,
            _ => Answer::Acknowledge,
        }
    }
}

const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;
const HEADER: usize = 12;
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// One message: header, body, and the descriptor that came with it.
struct Message {
    bytes: Vec<u8>,
    file: Option<File>,
}

impl Message {
    fn word(&self, i: usize) -> u32 {
        u32::from_le_bytes(self.bytes[4 * i..4 * i + 4].try_into().unwrap())
    }

    fn request(&self) -> u32 {
        self.word(0)
    }

    fn needs_reply(&self) -> bool {
        self.word(1) & NEED_REPLY != 0
    }

    /// Reads one message; `None` at the end of the stream.
    fn read(from: &UnixStream) -> Option<Message> {
        let mut bytes = vec![0u8; HEADER];
        let mut file = None;
        let mut got = 0;
        while got < HEADER {
            let (n, f) = from.recv_with_fd(&mut bytes[got..]).ok()?;
            if n == 0 {
                return None;
            }
            file = file.or(f);
            got += n;
        }
        let size = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        bytes.resize(HEADER + size, 0);
        (&*from).read_exact(&mut bytes[HEADER..]).ok()?;
        Some(Message { bytes, file })
    }

    /// Writes the message, with its descriptor.
    fn write(&self, to: &UnixStream) -> Option<()> {
        let fds: Vec<RawFd> = self.file.iter().map(AsRawFd::as_raw_fd).collect();
        let sent = to.send_with_fds(&[&self.bytes[..]], &fds).ok()?;
        (&*to).write_all(&self.bytes[sent..]).ok()
    }

    /// The message twice over, in one message (it carries no descriptor).
    fn twice(&self) -> Message {
        Message {
            bytes: [&self.bytes[..], &self.bytes[..]].concat(),
            file: None,
        }
    }

    /// The `REPLY_ACK` answer to this request: 0 for success.
    fn ack(&self, value: u64) -> Message {
        let mut bytes = Vec::with_capacity(HEADER + 8);
        bytes.extend(self.request().to_le_bytes());
        bytes.extend((VERSION_1 | REPLY).to_le_bytes());
        bytes.extend(8u32.to_le_bytes());
        bytes.extend(value.to_le_bytes());
        Message { bytes, file: None }
    }

    /// The control bytes, if this is a `SET_CONFIG` of them: which request, how to
    /// answer it, after how many.
    fn control(&self) -> Option<(u32, (Answer, u8))> {
        // VhostUserConfig: offset, size, flags; then the bytes.
        if self.request() != SET_CONFIG || self.word(3) != CONTROL_OFFSET || self.word(4) != 3 {
            return None;
        }
        let request = match self.bytes[26] {
            b if b == Of::Additions as u8 => ADD_MEM_REG,
            b if b == Of::ConfigReads as u8 => GET_CONFIG,
            _ => REM_MEM_REG,
        };
        Some((request, (Answer::from_byte(self.bytes[24]), self.bytes[25])))
    }
}

/// Relays between the frontend and the daemon until the frontend hangs up (or, once
/// stalled, forever).
pub fn relay(frontend: UnixStream, daemon: UnixStream) {
    let to_frontend = Arc::new(Mutex::new(frontend.try_clone().unwrap()));
    // The request whose next reply goes back twice ([`Answer::TwiceThenStall`]), or 0.
    let twice = Arc::new(AtomicU32::new(0));
    // The daemon's replies go back as they are.
    let replies = {
        let daemon = daemon.try_clone().unwrap();
        let to_frontend = Arc::clone(&to_frontend);
        let twice = Arc::clone(&twice);
        std::thread::spawn(move || {
            while let Some(reply) = Message::read(&daemon) {
                let reply = match twice.compare_exchange(
                    reply.request(),
                    0,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                ) {
                    Ok(_) => reply.twice(),
                    Err(_) => reply,
                };
                if reply.write(&to_frontend.lock().unwrap()).is_none() {
                    break;
                }
            }
            let _ = to_frontend.lock().unwrap().shutdown(Shutdown::Both);
        })
    };
    // How to answer removals and additions, and how many to pass through first.
    let mut answers: HashMap<u32, (Answer, u8)> = HashMap::new();
    while let Some(request) = Message::read(&frontend) {
        let answer = |value| {
            if request.needs_reply() {
                let _ = request.ack(value).write(&to_frontend.lock().unwrap());
            }
        };
        if let Some((which, how)) = request.control() {
            answers.insert(which, how);
            answer(0);
            continue;
        }
        if let Some(how) = answers.get_mut(&request.request()) {
            match how {
                (_, first @ 1..) => *first -= 1,
                (Answer::Acknowledge, 0) => {}
                (Answer::Refuse, 0) => {
                    answer(1);
                    continue;
                }
                (Answer::RefuseThenStall, 0) => {
                    answer(1);
                    *how = (Answer::Stall, 0);
                    continue;
                }
                (Answer::Stall, 0) => loop {
                    std::thread::park();
                },
                (Answer::Delay, 0) => std::thread::sleep(Answer::DELAYED_BY),
                (Answer::TwiceThenStall, 0) => {
                    twice.store(request.request(), Ordering::SeqCst);
                    *how = (Answer::Stall, 0);
                }
            }
        }
        if request.write(&daemon).is_none() {
            break;
        }
    }
    let _ = daemon.shutdown(Shutdown::Both);
    let _ = replies.join();
}
