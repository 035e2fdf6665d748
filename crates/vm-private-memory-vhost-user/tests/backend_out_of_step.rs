// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A backend that answers out of turn: the mapper against the test backend in another
//! process, whose relay is told to send a reply twice (a buggy backend acknowledging a
//! message twice). The second copy would be read as the answer to the next message, and
//! a removal taken as done that the backend never did: the mapper finds it waiting on
//! the socket before the next message, takes the backend as broken, and sends nothing.

mod common;

use common::*;
use guest_memfd::PAGE_SIZE;
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
