// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A backend whose listening socket a supervisor made and handed over (systemd socket
//! activation, a management daemon passing the descriptor): the frontend's peer
//! credentials name the supervisor, which outlives the backend. Without the backend's
//! pid, `backend_exited` refuses for as long as the supervisor runs, says whom it
//! names, and `assume_backend_exited` is the way out; with the pid the VMM gives
//! (`with_backend_pid`), it follows the backend itself.

mod common;

use std::time::Duration;

use common::*;
use guest_memfd::PAGE_SIZE;
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
        "the process that made the vhost-user backend's listening socket",
        "VhostUserMapper::with_backend_pid",
        "assume_backend_exited",
    ] {
        assert!(text.contains(said), "{text}");
    }
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
