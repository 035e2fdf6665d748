// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A backend that answers out of turn: the mapper against the test backend in another
//! process, whose relay is told to send a reply twice (a buggy backend acknowledging a
//! message twice). The second copy would be read as the answer to the next message, and
//! a removal taken as done that the backend never did: the mapper finds it waiting on
//! the socket before the next message, takes the backend as broken, and sends nothing.
//! A reply to one of the VMM's own messages, waiting for the clone of the frontend that
//! sent it, is left to that clone however long it waits, and breaks nothing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use guest_memfd::PAGE_SIZE;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vm_private_memory::{Error, ListenerRefusal, PageState};
use vm_private_memory_vhost_user::Error as MapperError;

/// The backend's `main` when this binary is started as the backend; nothing otherwise.
#[test]
fn backend_process() {
    serve_if_asked();
}

/// The message of the refusal with which the mapper stopped `err`'s conversion.
fn refusal_message(err: &Error) -> &str {
    match err {
        Error::ListenerRefused {
            reason: ListenerRefusal::Panicked { message },
            ..
        } => message,
        other => panic!("not a revocation the mapper stopped: {other}"),
    }
}

#[test]
fn an_acknowledgement_sent_twice_breaks_the_backend_before_the_next_removal() {
    let mut h = Harness::new(None);
    let (a, b) = (0x40000, 0x50000);
    for page in [a, b] {
        h.memory
            .convert(pr(page, PAGE_SIZE), PageState::Shared)
            .unwrap();
    }
    h.assert_backend_maps_the_table();
    // The backend acknowledges the next removal twice, and never answers the ones after.
    h.set_removals(Answer::TwiceThenStall, 0);
    h.memory
        .convert(pr(a, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert!(!h.mapper().is_mapped(a));
    assert!(!h.mapper().is_broken());

    // The second acknowledgement waits on the socket: the next removal is not sent (it
    // would have been taken for acknowledged at once, with the page still mapped), the
    // conversion stops, and the page stays shared and mapped.
    let err = h
        .memory
        .convert(pr(b, PAGE_SIZE), PageState::Private)
        .unwrap_err();
    let message = refusal_message(&err);
    assert!(message.contains("no message asked for"), "{message}");
    assert!(
        message.contains("before REM_MEM_REG of guest [0x50000, 0x51000)"),
        "{message}"
    );
    assert_eq!(h.memory.state_of(b), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(b));
    assert!(h.mapper().is_broken());
    assert!(h
        .mapper()
        .broken_reason()
        .unwrap()
        .contains("answered a message twice or out of turn"));
    // (The backend's relay sees the connection shut down, and the backend exits.)
}

/// An addition acknowledged twice: the next addition is never sent, its conversion is
/// refused, and its page is not counted as in the backend's table.
#[test]
fn an_addition_not_sent_because_the_backend_broke_is_refused_and_not_counted_as_mapped() {
    let mut h = Harness::new(None);
    let (a, b) = (0x40000, 0x50000);
    h.set_additions(Answer::TwiceThenStall, 0);
    h.memory
        .convert(pr(a, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert!(h.mapper().is_mapped(a));
    h.assert_backend_maps_the_table();

    let err = h
        .memory
        .convert(pr(b, PAGE_SIZE), PageState::Shared)
        .unwrap_err();
    let Error::ListenerRefused {
        reason: ListenerRefusal::Refused(reason),
        ..
    } = &err
    else {
        panic!("{err}");
    };
    let reason = reason.downcast_ref::<MapperError>().expect("the mapper's");
    assert!(
        matches!(reason, MapperError::Broken { range, .. } if *range == pr(b, PAGE_SIZE)),
        "{reason}"
    );
    assert!(
        reason.to_string().contains("no message asked for"),
        "{reason}"
    );
    assert_eq!(h.memory.state_of(b), Some(PageState::Private));
    assert!(!h.mapper().is_mapped(b));
    assert!(h.mapper().is_mapped(a));
    assert!(h.mapper().is_broken());
    assert!(h.mapper().take_errors().is_empty());
}

/// While set, a thread that receives `SIGUSR1` waits in the handler: descheduled, as far
/// as the code it interrupted can tell.
static HOLD: AtomicBool = AtomicBool::new(false);

extern "C" fn hold(_: libc::c_int) {
    while HOLD.load(Ordering::SeqCst) {
        let ms = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: nanosleep reads `ms`, valid for the call, and writes nothing (no
        // remainder asked for); it is async-signal-safe.
        unsafe { libc::nanosleep(&ms, std::ptr::null_mut()) };
    }
}

/// The system call thread `tid` of this process is blocked in, if any.
fn blocked_in(tid: i32) -> Option<i64> {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/syscall")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// A clone of the frontend (the VMM's, reading the device's config at run time) sends
/// `GET_CONFIG` and its thread is held up (here by a signal handler) between the reply's
/// arrival and its read, far longer than the 20 ms a bounded wait would give it: the
/// reply waits on the socket. A conversion meanwhile finds it there, sees that it
/// answers no message of the mapper's, and waits for the clone (which holds the frontend
/// until it has read its reply) instead of breaking the backend.
#[test]
fn a_reply_waiting_for_a_clone_of_the_frontend_does_not_break_the_backend() {
    let limit = Duration::from_secs(60);
    let mut h = Harness::new(None);
    // The reply to GET_CONFIG comes after a while: the clone is blocked reading it when
    // it is held up.
    h.set_answer(Answer::Delay, Of::ConfigReads, 0);
    // SAFETY: a zeroed sigaction is a valid one to fill in; `hold` is async-signal-safe
    // (atomics and nanosleep), and SA_RESTART makes the interrupted recvmsg go on after
    // it. Only the thread this test signals runs it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = hold as extern "C" fn(libc::c_int) as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
    let tid = Arc::new(AtomicI32::new(0));
    let memory = &h.memory;
    let mut clone = h.frontend.clone();
    // Taken now: the frontend's `as_raw_fd` waits for the frontend, which the clone
    // holds while it waits for its reply.
    let socket = std::os::fd::AsRawFd::as_raw_fd(&h.frontend);
    let (config, conversion, broken_while_held) =
        within(limit, "the clone and the conversion", || {
            std::thread::scope(|s| {
                let clone_thread = {
                    let tid = Arc::clone(&tid);
                    s.spawn(move || {
                        // SAFETY: gettid takes nothing and returns this thread's id.
                        tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
                        clone.get_config(0, 24, VhostUserConfigFlags::empty(), &[0u8; 24])
                    })
                };
                // Held up once it waits for its reply (which the relay delays).
                let tid = loop {
                    let tid = tid.load(Ordering::SeqCst);
                    if tid != 0 && blocked_in(tid) == Some(libc::SYS_recvmsg) {
                        break tid;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                HOLD.store(true, Ordering::SeqCst);
                // SAFETY: tgkill takes ids and a signal and touches no memory; `tid` is a
                // thread of this process that is still running (blocked).
                let sent =
                    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, libc::SIGUSR1) };
                assert_eq!(sent, 0, "{}", std::io::Error::last_os_error());
                // The reply arrives, and waits.
                let waiting = || {
                    let mut header = [0u8; 12];
                    // SAFETY: `header` is valid for writes of its length; MSG_PEEK leaves
                    // the bytes there and MSG_DONTWAIT keeps recv from blocking; the socket
                    // is the frontend's, open for as long as `h` lives.
                    unsafe {
                        libc::recv(
                            socket,
                            header.as_mut_ptr().cast(),
                            header.len(),
                            libc::MSG_PEEK | libc::MSG_DONTWAIT,
                        )
                    }
                };
                while waiting() < 12 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let conversion =
                    s.spawn(|| memory.convert(pr(OUTPUT, PAGE_SIZE), PageState::Private));
                std::thread::sleep(Duration::from_millis(200));
                let broken_while_held = h.mapper().broken_reason();
                HOLD.store(false, Ordering::SeqCst);
                (
                    clone_thread.join().unwrap(),
                    conversion.join().unwrap(),
                    broken_while_held,
                )
            })
        });
    assert_eq!(broken_while_held, None);
    config.unwrap();
    conversion.unwrap();
    assert!(!h.mapper().is_broken());
    assert!(!h.mapper().is_mapped(OUTPUT));
    h.assert_backend_maps_the_table();
}
