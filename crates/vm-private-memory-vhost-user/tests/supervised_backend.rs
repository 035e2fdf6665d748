// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A backend whose listening socket a supervisor made and handed over (systemd socket
//! activation, a management daemon passing the descriptor): the frontend's peer
//! credentials name the supervisor, which outlives the backend. Without the backend's
//! pid, `backend_exited` refuses for as long as the supervisor runs, says whom it
//! names, and `assume_backend_exited` is the way out; with the pid the VMM gives
//! (`with_backend_pid`), it follows the backend itself. A supervisor that exits while
//! the backend runs on (a daemon's parent) does not make a drop let go of the table.

mod common;

use std::time::Duration;

use common::*;
use guest_memfd::PAGE_SIZE;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::VhostUserFrontend;
use vm_private_memory::PageState;
use vm_private_memory_vhost_user::{Error as MapperError, PidSource, VhostUserMapper};

/// The backend's (or the supervisor's) `main` when this binary is started as one;
/// nothing otherwise.
#[test]
fn backend_process() {
    serve_if_asked();
}

/// No test here waits longer than this for anything.
const LIMIT: Duration = Duration::from_secs(60);

#[test]
fn a_supervisor_s_socket_names_the_supervisor_and_assume_backend_exited_lets_go() {
    let mut supervised = within(LIMIT, "the supervisor", Supervised::spawn);
    let (memory, _) = dual_memory();
    let mut frontend = supervised.connect();
    let acked = negotiate(&mut frontend);
    let attachment = VhostUserMapper::new(frontend.clone(), acked, &memory)
        .unwrap()
        .attach(&memory, pr(0, MEMORY))
        .unwrap();
    assert_ne!(supervised.supervisor_pid(), supervised.backend_pid);
    assert_eq!(attachment.backend_pid(), Some(supervised.supervisor_pid()));

    // The backend dies and its supervisor reaps it; its connection closes, and the
    // next removal breaks the attachment.
    within(LIMIT, "the backend's end", || supervised.kill_backend());
    let err = within(LIMIT, "the conversion to private", || {
        memory
            .convert(pr(DESC, PAGE_SIZE), PageState::Private)
            .unwrap_err()
    });
    assert!(err.to_string().contains("got no answer"), "{err}");
    assert!(attachment.is_broken());

    // The supervisor runs on: backend_exited refuses, and says it is not sure whom it
    // names, and what else there is to do.
    let refused = attachment.backend_exited().unwrap_err();
    assert_eq!(refused.pid, supervised.supervisor_pid());
    assert_eq!(refused.origin, PidSource::ListeningSocket);
    let text = refused.to_string();
    for said in [
        "the process at the other end of the vhost-user frontend's socket",
        "VhostUserMapper::with_backend_pid",
        "assume_backend_exited",
        // It may name a supervisor: killing it is not what the VMM is told to do.
        "if it is the backend, kill it",
        "Do not kill a supervisor",
    ] {
        assert!(text.contains(said), "{text}");
    }
    assert!(!text.contains("waitpid"), "{text}");
    assert_eq!(memory.listener_count(), 1);

    // The VMM saw the backend go: it takes its own word.
    refused.attachment.assume_backend_exited();
    assert_eq!(memory.listener_count(), 0);
    memory
        .convert(pr(DESC, PAGE_SIZE), PageState::Private)
        .unwrap();
}

#[test]
fn with_the_backend_s_pid_backend_exited_follows_the_backend_not_the_supervisor() {
    let mut supervised = within(LIMIT, "the supervisor", Supervised::spawn);
    let (memory, _) = dual_memory();
    let mut frontend = supervised.connect();
    let acked = negotiate(&mut frontend);

    // A pid no process has is refused when given.
    let err = VhostUserMapper::new(frontend.clone(), acked, &memory)
        .unwrap()
        .with_backend_pid(i32::MAX as u32)
        .unwrap_err();
    assert!(
        matches!(err, MapperError::BackendPid { pid, .. } if pid == i32::MAX as u32),
        "{err}"
    );

    let attachment = VhostUserMapper::new(frontend.clone(), acked, &memory)
        .unwrap()
        .with_backend_pid(supervised.backend_pid)
        .unwrap()
        .attach(&memory, pr(0, MEMORY))
        .unwrap();
    assert_eq!(attachment.backend_pid(), Some(supervised.backend_pid));

    // Running: refused, naming the backend.
    let refused = attachment.backend_exited().unwrap_err();
    assert_eq!(refused.pid, supervised.backend_pid);
    assert_eq!(refused.origin, PidSource::Given);
    let text = refused.to_string();
    assert!(text.contains("the vhost-user backend's process"), "{text}");
    assert!(!text.contains("assume_backend_exited"), "{text}");
    assert!(text.contains("wait until it has exited"), "{text}");
    let attachment = refused.attachment;

    // Killed and reaped (by the supervisor, which runs on): its pid is no longer
    // reported, and the attachment lets go.
    within(LIMIT, "the backend's end", || supervised.kill_backend());
    assert_eq!(attachment.backend_pid(), None);
    attachment.backend_exited().unwrap();
    assert_eq!(memory.listener_count(), 0);
    memory
        .convert(pr(DESC, PAGE_SIZE), PageState::Private)
        .unwrap();
}

/// The process that made the backend's listening socket exits (a daemon's parent that
/// forks and exits) and the backend runs on, stuck: the socket's peer is gone, which
/// says nothing of the backend. Dropping the broken attachment keeps following its
/// table, so that the ranges the backend still maps cannot turn private.
#[test]
fn a_drop_does_not_let_go_of_a_backend_whose_listening_socket_s_maker_exited() {
    let supervised = within(LIMIT, "the supervisor", Supervised::spawn_and_exit);
    let (memory, _) = dual_memory();
    let mut frontend = supervised.connect();
    let acked = negotiate(&mut frontend);
    let attachment = VhostUserMapper::new(frontend.clone(), acked, &memory)
        .unwrap()
        .with_reply_timeout(Duration::from_millis(200))
        .attach(&memory, pr(0, MEMORY))
        .unwrap();
    // The socket's peer had exited (and been reaped) when the mapper was made: not known.
    assert_eq!(attachment.backend_pid(), None);

    // The backend stops answering: the removal goes unanswered and the backend breaks,
    // with the ring pages still mapped by its (running) process.
    frontend
        .set_config(
            CONTROL_OFFSET,
            VhostUserConfigFlags::empty(),
            &Answer::Stall.control(Of::Removals, 0),
        )
        .unwrap();
    let err = within(LIMIT, "the conversion to private", || {
        memory
            .convert(pr(DESC, PAGE_SIZE), PageState::Private)
            .unwrap_err()
    });
    assert!(err.to_string().contains("did not answer"), "{err}");
    assert!(attachment.is_broken());
    assert!(attachment.is_mapped(DESC));

    // Dropped: still followed, and the range stays shared.
    drop(attachment);
    assert_eq!(memory.listener_count(), 1);
    assert!(memory
        .convert(pr(DESC, PAGE_SIZE), PageState::Private)
        .is_err());
    assert_eq!(memory.state_of(DESC), Some(PageState::Shared));
}
