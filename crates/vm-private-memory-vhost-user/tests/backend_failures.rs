// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A backend that answers, but refuses: the mapper against the test backend in another
//! process, whose relay is told to refuse removals (`REM_MEM_REG` answered with a
//! failure, the region kept mapped). A refused removal stops the conversion with the
//! range still shared and still in the backend's table, whatever a clone of the
//! frontend did to the header flags, and a revocation refused halfway adds back what it
//! had already removed.

mod common;

use common::*;
use guest_memfd::PAGE_SIZE;
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vm_private_memory::{Error, ListenerRefusal, PageState};
use vm_private_memory_vhost_user::Error as MapperError;

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
    h.set_removals(Answer::Refuse, 0);

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
    h.set_removals(Answer::Acknowledge, 0);
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
    h.set_removals(Answer::Refuse, 0);
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
/// Two adjacent regions of one shared run, and a conversion of the run to private: the
/// backend acknowledges the first removal and refuses the second.
#[test]
fn a_revocation_refused_halfway_adds_back_what_it_had_removed() {
    let mut h = Harness::new(None);
    let (a, b) = (0x20000, 0x21000);
    h.memory
        .convert(pr(a, PAGE_SIZE), PageState::Shared)
        .unwrap();
    h.memory
        .convert(pr(b, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert!(h
        .mapper()
        .regions()
        .iter()
        .any(|r| r.guest == pr(a, PAGE_SIZE)));
    assert!(h
        .mapper()
        .regions()
        .iter()
        .any(|r| r.guest == pr(b, PAGE_SIZE)));
    h.set_removals(Answer::Refuse, 1);

    let err = h
        .memory
        .convert(pr(a, 2 * PAGE_SIZE), PageState::Private)
        .unwrap_err();
    assert!(
        panic_message(&err).contains("did not acknowledge REM_MEM_REG of guest [0x21000, 0x22000)"),
        "{err}"
    );
    // Both pages stay shared, and both are in the table and mapped again: the first
    // region's removal was acknowledged, so the mapper added it back.
    assert_eq!(h.memory.state_of(a), Some(PageState::Shared));
    assert_eq!(h.memory.state_of(b), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(a));
    assert!(h.mapper().is_mapped(b));
    h.assert_backend_maps_the_table();
    assert!(h.mapper().take_errors().is_empty());
    assert_eq!(h.request(b"a is back", a, 64).status, 0);
    assert_eq!(h.read(a, 9), b"a is back");
}

/// As above, but the slot budget leaves no room to add the removed part back: the
/// mapper says so in `take_errors`.
#[test]
fn a_part_that_cannot_be_added_back_is_reported() {
    // Ring, buffers, and the two regions of the run: the budget.
    let mut h = Harness::new(Some(4));
    let (a, b) = (0x20000, 0x22000);
    h.memory
        .convert(pr(a, 2 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    h.memory
        .convert(pr(b, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(h.mapper().slots_used(), 4);
    h.set_removals(Answer::Refuse, 1);

    // [a + 1 page, b + 1 page) splits the first region (its first page stays) and takes
    // all of the second: the first removal and the re-addition of the first page go
    // through, the second removal is refused, and there is no slot left to add the
    // first region's second page back.
    let range = pr(a + PAGE_SIZE, 2 * PAGE_SIZE);
    let err = h.memory.convert(range, PageState::Private).unwrap_err();
    assert!(panic_message(&err).contains("did not acknowledge"), "{err}");
    assert_eq!(h.memory.state_of(a + PAGE_SIZE), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(a));
    assert!(!h.mapper().is_mapped(a + PAGE_SIZE));
    assert!(h.mapper().is_mapped(b));
    h.assert_backend_maps_the_table();
    let errors = h.mapper().take_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let text = errors[0].to_string();
    assert!(text.contains("[0x21000, 0x22000)"), "{text}");
    assert!(
        matches!(errors[0], MapperError::SlotBudget { .. }),
        "{text}"
    );

    // Once offered again (a conversion to shared of the page), it is back.
    h.set_removals(Answer::Acknowledge, 0);
    h.memory
        .convert(pr(b, PAGE_SIZE), PageState::Private)
        .unwrap();
    for state in [PageState::Private, PageState::Shared] {
        h.memory
            .convert(pr(a + PAGE_SIZE, PAGE_SIZE), state)
            .unwrap();
    }
    assert!(h.mapper().is_mapped(a + PAGE_SIZE));
    h.assert_backend_maps_the_table();
}

/// A refusal a guest can cause at will (here a page in the middle of a run going private
/// over the slot budget) reaches the conversion's error with its message, and does not
/// go through the process's panic hook (no message on stderr, no backtrace).
#[test]
fn a_refusal_carries_its_message_without_running_the_panic_hook() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Panics raised in this crate's own code, seen by the hook.
    static MAPPER_PANICS: AtomicUsize = AtomicUsize::new(0);

    // The ring and the buffers: two regions, the whole budget.
    let h = Harness::new(Some(2));
    assert_eq!(h.mapper().slots_used(), 2);

    // Any other panic (another test's failure) goes to the hook there was.
    let previous = Arc::new(std::panic::take_hook());
    let chained = Arc::clone(&previous);
    std::panic::set_hook(Box::new(move |info| {
        let ours = info
            .location()
            .is_some_and(|l| l.file().contains("vm-private-memory-vhost-user/src/"));
        if ours {
            MAPPER_PANICS.fetch_add(1, Ordering::SeqCst);
        } else {
            chained(info);
        }
    }));
    let errors: Vec<Error> = (0..20)
        .map(|_| {
            h.memory
                .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
                .unwrap_err()
        })
        .collect();
    drop(std::panic::take_hook());
    std::panic::set_hook(Box::new(move |info| previous(info)));

    for err in &errors {
        let message = panic_message(err);
        assert!(
            message.contains("splits a region and needs 3 memory slots"),
            "{message}"
        );
        assert!(message.contains("nothing was revoked"), "{message}");
    }
    assert_eq!(MAPPER_PANICS.load(Ordering::SeqCst), 0);
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));
    h.assert_backend_maps_the_table();
}

/// A detach the backend refuses hands the attachment back, which keeps following the
/// regions left (they cannot turn private) and adds nothing more; once the backend lets
/// go, detaching again goes through.
#[test]
fn a_refused_detach_hands_the_attachment_back_to_try_again() {
    let mut h = Harness::new(None);
    let (a, b) = (0x20000, 0x21000);
    for page in [a, b] {
        h.memory
            .convert(pr(page, PAGE_SIZE), PageState::Shared)
            .unwrap();
    }
    assert_eq!(h.mapper().slots_used(), 4);
    h.set_removals(Answer::Refuse, 0);

    let refused = h.take_attachment().detach().unwrap_err();
    assert!(
        matches!(refused.error, MapperError::Remove { .. }),
        "{}",
        refused.error
    );
    assert!(refused.to_string().contains("detach again"), "{refused}");
    let attachment = refused.attachment;
    assert!(!attachment.is_broken());
    assert_eq!(attachment.slots_used(), 4);
    assert_eq!(h.memory.listener_count(), 1);

    // [a, b] is two regions: the first removal goes through, the second is refused. The
    // conversion stops with both pages shared, and the page taken out is not added
    // back (the attachment adds nothing more), which the refusal says.
    h.set_removals(Answer::Refuse, 1);
    let err = h
        .memory
        .convert(pr(a, 2 * PAGE_SIZE), PageState::Private)
        .unwrap_err();
    let message = panic_message(&err);
    assert!(message.contains("did not acknowledge"), "{message}");
    assert!(message.contains("are not added back"), "{message}");
    assert_eq!(h.memory.state_of(a), Some(PageState::Shared));
    assert_eq!(h.memory.state_of(b), Some(PageState::Shared));
    assert!(!attachment.is_mapped(a));
    assert!(attachment.is_mapped(b));
    assert!(attachment.take_errors().is_empty());

    // The backend lets go: the detach goes through.
    h.set_removals(Answer::Acknowledge, 0);
    attachment.detach().unwrap();
    assert_eq!(h.memory.listener_count(), 0);
    h.memory
        .convert(pr(a, 2 * PAGE_SIZE), PageState::Private)
        .unwrap();
}
