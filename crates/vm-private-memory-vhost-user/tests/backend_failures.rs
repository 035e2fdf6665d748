// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A backend that answers, but refuses: the mapper against the test backend in another
//! process, whose relay is told to refuse removals (`REM_MEM_REG` answered with a
//! failure, the region kept mapped). A refused removal stops the conversion with the
//! range still shared and still in the backend's table, whatever a clone of the
//! frontend did to the header flags.

mod common;

use common::*;
use guest_memfd::PAGE_SIZE;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vm_private_memory::{Error, ListenerRefusal, PageState};

/// The backend's `main` when this binary is started as the backend; nothing otherwise.
#[test]
fn backend_process() {
    serve_if_asked();
}

/// The message of the panic with which the mapper stopped `err`'s conversion.
fn panic_message(err: &Error) -> &str {
    match err {
        Error::ListenerRefused {
            reason: ListenerRefusal::Panicked { message },
            ..
        } => message,
        other => panic!("not a revocation the mapper stopped: {other}"),
    }
}

#[test]
fn a_removal_the_backend_refuses_stops_the_conversion_and_the_page_stays_shared_and_mapped() {
    let mut h = Harness::new(None);
    assert_eq!(h.request(b"before", OUTPUT, 64).status, 0);
    h.set_removals(Removals::Refuse, 0);

    let err = h
        .memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap_err();
    let message = panic_message(&err);
    assert!(
        message.contains("did not acknowledge REM_MEM_REG of guest [0x10000, 0x13000)"),
        "{message}"
    );
    assert!(message.contains("stays shared"), "{message}");
    // Nothing changed: the page is shared, in the table, mapped by the backend (which
    // kept its memory), and the device still uses it.
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(OUTPUT));
    h.assert_backend_maps_the_table();
    assert_eq!(h.request(b"still shared", OUTPUT, 64).status, 0);
    assert_eq!(h.read_output(12), b"still shared");

    // The backend accepts again: the same conversion goes through.
    h.set_removals(Removals::Acknowledge, 0);
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert!(!h.mapper().is_mapped(OUTPUT));
    h.assert_backend_maps_the_table();
    assert_eq!(h.request(b"now private", OUTPUT, 64).status, 1);
    assert!(h.mapper().take_errors().is_empty());
}

#[test]
fn a_clone_that_cleared_the_header_flags_does_not_stop_removals_being_waited_for() {
    let mut h = Harness::new(None);
    h.set_removals(Removals::Refuse, 0);
    // The VMM's own clone of the frontend clears the flags the mapper set.
    h.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());

    // The removal still asks for, and waits for, the backend's answer: a refusal.
    let err = h
        .memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap_err();
    assert!(panic_message(&err).contains("did not acknowledge"), "{err}");
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(OUTPUT));
    h.assert_backend_maps_the_table();
}
