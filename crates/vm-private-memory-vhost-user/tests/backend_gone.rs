// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A backend that stops answering, or dies: the mapper against the test backend in
//! another process, whose relay is told to never answer a removal, or which is killed.
//! The conversion that waited for it fails (within the reply deadline) with the range
//! still shared, the attachment is broken and sends nothing more, and once the VMM has
//! reaped the process and declared it exited, conversions go on and a new backend can be
//! attached. Also: a backend too slow for a listener call's time (refused, not broken),
//! one that stops answering part way through attach (the attachment comes back broken),
//! and the ways out of a broken attachment (a refused detach hands it back; a drop lets
//! go only once the backend's process, by the pid the VMM gave, has exited).

mod common;

use std::time::{Duration, Instant};

use common::*;
use guest_memfd::PAGE_SIZE;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_private_memory::{Error, ListenerRefusal, PageState};
use vm_private_memory_vhost_user::{
    Error as MapperError, VhostUserMapper, REQUIRED_PROTOCOL_FEATURES,
};

/// The backend's `main` when this binary is started as the backend; nothing otherwise.
#[test]
fn backend_process() {
    serve_if_asked();
}

/// No test here waits longer than this for anything.
const LIMIT: Duration = Duration::from_secs(60);

/// A page that is shared but not in the table: made shared, then freed.
const FREED: u64 = 0x30000;

/// The message of the panic with which the mapper stopped `err`'s operation.
fn panic_message(err: &Error) -> &str {
    match err {
        Error::ListenerRefused {
            reason: ListenerRefusal::Panicked { message },
            ..
        } => message,
        other => panic!("not a revocation the mapper stopped: {other}"),
    }
}

/// What a broken attachment does with each kind of request: conversions to shared are
/// refused with `Error::Broken`, ranges of the table cannot turn private or be freed,
/// and ranges outside it can.
fn assert_broken_refusals(h: &mut Harness) {
    assert!(h.mapper().is_broken());
    assert!(h.mapper().broken_reason().is_some());

    let range = pr(0x40000, PAGE_SIZE);
    let err = h.memory.convert(range, PageState::Shared).unwrap_err();
    let Error::ListenerRefused {
        reason: ListenerRefusal::Refused(reason),
        ..
    } = &err
    else {
        panic!("{err}");
    };
    let reason = reason.downcast_ref::<MapperError>().expect("the mapper's");
    assert!(
        matches!(reason, MapperError::Broken { range: r, .. } if *r == range),
        "{reason}"
    );
    let text = reason.to_string();
    assert!(text.contains("[0x40000, 0x41000)"), "{text}");
    assert!(text.contains("backend_exited"), "{text}");
    assert_eq!(h.memory.state_of(0x40000), Some(PageState::Private));

    // A range of the table: the backend may still map it.
    let err = h.memory.discard(pr(INPUT, PAGE_SIZE)).unwrap_err();
    let message = panic_message(&err);
    assert!(message.contains("broken"), "{message}");
    assert!(message.contains("backend_exited"), "{message}");
    assert!(h.mapper().is_mapped(INPUT));

    // A range with no region of the table goes private.
    assert!(!h.mapper().is_mapped(FREED));
    h.memory
        .convert(pr(FREED, PAGE_SIZE), PageState::Private)
        .unwrap();
}

/// Makes [`FREED`] shared and out of the table.
fn free_a_shared_page(h: &mut Harness) {
    h.memory
        .convert(pr(FREED, PAGE_SIZE), PageState::Shared)
        .unwrap();
    h.memory.discard(pr(FREED, PAGE_SIZE)).unwrap();
    assert_eq!(h.memory.state_of(FREED), Some(PageState::Shared));
    assert!(!h.mapper().is_mapped(FREED));
}

#[test]
fn a_backend_that_never_answers_breaks_at_the_deadline_and_is_let_go_once_reaped() {
    let mut h = Harness::with(Options {
        reply_timeout: Some(Duration::from_millis(200)),
        ..Options::default()
    });
    assert_eq!(h.mapper().backend_pid(), Some(h.backend.pid()));
    free_a_shared_page(&mut h);
    h.set_removals(Answer::Stall, 0);

    // The removal is never answered: the conversion fails once the deadline passed,
    // with the page shared, in the table and still mapped by the (stuck) backend.
    let start = Instant::now();
    let err = within(LIMIT, "the conversion to private", || {
        h.memory
            .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
            .unwrap_err()
    });
    println!("the conversion returned after {:?}", start.elapsed());
    let message = panic_message(&err);
    assert!(
        message.contains(
            "did not answer REM_MEM_REG of guest [0x10000, 0x13000) within the reply deadline (200ms"
        ),
        "{message}"
    );
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(OUTPUT));
    h.assert_backend_maps_the_table();
    assert!(h
        .mapper()
        .broken_reason()
        .unwrap()
        .contains("within the reply deadline (200ms"));
    assert_broken_refusals(&mut h);

    // The backend still runs: declaring it exited is refused, and the attachment comes
    // back as it was.
    let refused = h.take_attachment().backend_exited().unwrap_err();
    assert_eq!(refused.pid, h.backend.pid());
    assert!(refused.to_string().contains("still running"), "{refused}");
    let attachment = refused.attachment;
    assert!(attachment.is_broken());
    assert!(attachment.is_mapped(OUTPUT));

    // Killed and reaped, it is gone: the attachment lets go without a message, and the
    // conversion goes through.
    h.backend.kill();
    h.backend.reap();
    attachment.backend_exited().unwrap();
    assert_eq!(h.memory.listener_count(), 0);
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap();

    // A new backend, attached as the first was: it gets the runs shared now, and serves
    // the queue.
    h.reconnect();
    assert!(!h.mapper().is_broken());
    assert!(h.mapper().is_mapped(INPUT));
    assert!(!h.mapper().is_mapped(OUTPUT));
    h.assert_backend_maps_the_table();
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(h.request(b"a new backend", OUTPUT, 64).status, 0);
    assert_eq!(h.read_output(13), b"a new backend");
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap();
    h.assert_backend_maps_the_table();
}

#[test]
fn a_backend_that_dies_breaks_the_attachment_and_is_let_go_once_reaped() {
    let mut h = Harness::new(None);
    free_a_shared_page(&mut h);
    assert_eq!(h.request(b"alive", OUTPUT, 64).status, 0);
    h.backend.kill();

    // Its connection is closed: the removal gets no answer, and the conversion fails
    // (no panic escapes, no wait) with the page shared.
    let err = within(LIMIT, "the conversion to private", || {
        h.memory
            .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
            .unwrap_err()
    });
    let message = panic_message(&err);
    assert!(
        message.contains("REM_MEM_REG of guest [0x10000, 0x13000) got no answer"),
        "{message}"
    );
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(OUTPUT));
    assert_broken_refusals(&mut h);
    let mapped_before = h.mapper().regions();

    h.backend.reap();
    h.take_attachment().backend_exited().unwrap();
    assert_eq!(h.memory.listener_count(), 0);
    for r in mapped_before {
        h.memory.convert(r.guest, PageState::Private).unwrap();
    }
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Private));
}

#[test]
fn an_addition_that_goes_unanswered_keeps_the_range_shared_and_counted_as_mapped() {
    let mut h = Harness::with(Options {
        reply_timeout: Some(Duration::from_millis(200)),
        ..Options::default()
    });
    h.set_additions(Answer::Stall, 0);
    let range = pr(0x40000, PAGE_SIZE);

    // The backend may or may not have mapped the region: the conversion to shared goes
    // on (the page must not turn private while the backend may map it), the region
    // counts as in the table, and the error waits in take_errors.
    within(LIMIT, "the conversion to shared", || {
        h.memory.convert(range, PageState::Shared).unwrap()
    });
    assert_eq!(h.memory.state_of(0x40000), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(0x40000));
    assert!(h.mapper().is_broken());
    let errors = h.mapper().take_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(
            &errors[0],
            MapperError::NoReply { request: "ADD_MEM_REG", range: r, .. } if *r == range
        ),
        "{}",
        errors[0]
    );
    let err = h.memory.convert(range, PageState::Private).unwrap_err();
    assert!(panic_message(&err).contains("broken"), "{err}");
    assert_eq!(h.memory.state_of(0x40000), Some(PageState::Shared));

    h.backend.kill();
    h.backend.reap();
    h.take_attachment().backend_exited().unwrap();
    h.memory.convert(range, PageState::Private).unwrap();
}

#[test]
fn detaching_from_a_broken_backend_hands_the_attachment_back_for_backend_exited() {
    let mut h = Harness::new(None);
    h.backend.kill();
    h.backend.reap();
    let err = within(LIMIT, "the conversion to private", || {
        h.memory
            .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
            .unwrap_err()
    });
    assert!(panic_message(&err).contains("got no answer"), "{err}");

    // Nothing is sent: the regions stay in the table, and the attachment comes back.
    let refused = within(LIMIT, "detach", || {
        h.take_attachment().detach().unwrap_err()
    });
    assert!(
        matches!(refused.error, MapperError::Broken { .. }),
        "{}",
        refused.error
    );
    assert!(refused.to_string().contains("backend_exited"), "{refused}");
    let attachment = refused.attachment;
    assert!(attachment.is_broken());
    assert!(attachment.is_mapped(OUTPUT));
    // Still followed: the ranges of the table cannot turn private.
    assert_eq!(h.memory.listener_count(), 1);
    assert!(h
        .memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .is_err());
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));

    // The backend is reaped: the attachment handed back lets go.
    attachment.backend_exited().unwrap();
    assert_eq!(h.memory.listener_count(), 0);
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap();
}

/// A detach whose first removal the backend refuses, and whose second it never
/// answers: the backend is broken, and the error handed back is what broke it, not the
/// refusal before it, so that it does not send the VMM to detach again (which would send
/// nothing).
#[test]
fn a_detach_that_breaks_the_backend_after_a_refusal_reports_what_broke_it() {
    let mut h = Harness::with(Options {
        reply_timeout: Some(Duration::from_millis(200)),
        ..Options::default()
    });
    assert_eq!(h.mapper().slots_used(), 2);
    h.set_removals(Answer::RefuseThenStall, 0);
    let refused = within(LIMIT, "detach", || {
        h.take_attachment().detach().unwrap_err()
    });
    assert!(
        matches!(
            refused.error,
            MapperError::NoReply {
                request: "REM_MEM_REG",
                ..
            }
        ),
        "{}",
        refused.error
    );
    let text = refused.to_string();
    assert!(text.contains("backend_exited"), "{text}");
    assert!(!text.contains("detach again"), "{text}");
    let attachment = refused.attachment;
    assert!(attachment.is_broken());
    assert_eq!(attachment.slots_used(), 2);
    // The attachment adds nothing any more: a conversion to shared goes on, unmapped.
    h.memory
        .convert(pr(0x40000, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert!(!attachment.is_mapped(0x40000));

    h.backend.kill();
    h.backend.reap();
    attachment.backend_exited().unwrap();
    assert_eq!(h.memory.listener_count(), 0);
}

/// Dropping an attachment whose regions cannot be removed: while the backend may still
/// run, the subscription stays (leaked) and the regions cannot turn private; once the
/// process whose pid the VMM gave has exited (and the pidfd says so), the table is let
/// go of. The socket's peer is not enough for a drop, even once it has exited.
#[test]
fn dropping_a_broken_attachment_lets_go_only_once_its_backend_has_exited() {
    // Stuck, and still running.
    let mut h = Harness::with(Options {
        reply_timeout: Some(Duration::from_millis(200)),
        ..Options::default()
    });
    h.set_removals(Answer::Stall, 0);
    let err = within(LIMIT, "the conversion to private", || {
        h.memory
            .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
            .unwrap_err()
    });
    assert!(panic_message(&err).contains("did not answer"), "{err}");
    drop(h.take_attachment());
    assert_eq!(h.memory.listener_count(), 1);
    assert!(h
        .memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .is_err());
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));

    // Killed and reaped: the removals of the drop get no answer, the backend breaks,
    // and the process whose pid the VMM gave is gone.
    let mut h = Harness::with(Options {
        give_backend_pid: true,
        ..Options::default()
    });
    h.backend.kill();
    h.backend.reap();
    within(LIMIT, "the drop", || drop(h.take_attachment()));
    assert_eq!(h.memory.listener_count(), 0);
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap();

    // The same with the socket's peer only (here the backend, but it could be a
    // supervisor or a daemon's parent that exited while the backend runs on): the drop
    // keeps following the table.
    let mut h = Harness::new(None);
    h.backend.kill();
    h.backend.reap();
    within(LIMIT, "the drop", || drop(h.take_attachment()));
    assert_eq!(h.memory.listener_count(), 1);
    assert!(h
        .memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .is_err());
}

/// While a removal is out (no deadline, a backend that never answers), the accessors that
/// do not read the table answer at once: `is_broken`, `broken_reason`, `Debug`.
#[test]
fn is_broken_answers_while_a_message_is_out() {
    let mut h = Harness::with(Options {
        reply_timeout: Some(Duration::MAX),
        ..Options::default()
    });
    h.set_removals(Answer::Stall, 0);
    let attachment = h.take_attachment();
    let memory = &h.memory;
    let backend = &mut h.backend;
    within(LIMIT, "the accessors and the conversion", || {
        std::thread::scope(|s| {
            let conversion = s.spawn(|| memory.convert(pr(OUTPUT, PAGE_SIZE), PageState::Private));
            // The removal is out once the mapper's lock is held: Debug cannot read the
            // slots used.
            while !format!("{attachment:?}").contains("slots_used: None") {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(!attachment.is_broken());
            assert_eq!(attachment.broken_reason(), None);
            // The backend dies: the removal gets no answer, and the backend is broken.
            backend.kill();
            let err = conversion.join().unwrap().unwrap_err();
            assert!(panic_message(&err).contains("got no answer"), "{err}");
        })
    });
    assert!(attachment.is_broken());
    assert!(format!("{attachment:?}").contains("broken: true"));
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));
    h.backend.reap();
    attachment.backend_exited().unwrap();
}

/// A backend that answers each removal within the reply timeout, but slowly: a listener
/// call sends messages only for one timeout from its start, so a revocation that needs
/// eight removals cannot hold the conversion lock for eight timeouts. The removal that
/// would go out once that time is spent is not sent: nothing is out of step, so the
/// backend is not broken; the conversion stops with the range shared, and a later one
/// goes through.
#[test]
fn a_slow_backend_runs_out_of_a_call_s_time_without_breaking() {
    let timeout = Duration::from_millis(500);
    // Each removal is answered well within its own timeout, and a few of them spend the
    // call's time.
    assert!(2 * Answer::DELAYED_BY < timeout && 8 * Answer::DELAYED_BY > 2 * timeout);
    let mut h = Harness::with(Options {
        reply_timeout: Some(timeout),
        ..Options::default()
    });
    // Eight pages shared one by one: eight regions (adjacent ones are not merged).
    let base = 0x40000;
    let range = pr(base, 8 * PAGE_SIZE);
    for page in pages(range) {
        h.memory
            .convert(pr(page, PAGE_SIZE), PageState::Shared)
            .unwrap();
    }
    assert_eq!(h.mapper().slots_used(), 2 + 8);
    h.set_removals(Answer::Delay, 0);

    let err = within(LIMIT, "the conversion to private", || {
        h.memory.convert(range, PageState::Private).unwrap_err()
    });
    let message = panic_message(&err);
    assert!(message.contains("REM_MEM_REG of guest"), "{message}");
    assert!(message.contains("was not sent"), "{message}");
    assert!(message.contains("the backend is not broken"), "{message}");
    assert!(message.contains("stays shared"), "{message}");
    assert!(!h.mapper().is_broken());
    for page in pages(range) {
        assert_eq!(h.memory.state_of(page), Some(PageState::Shared));
    }
    // The regions removed before the time ran out could not be added back in it either:
    // each is reported, and the backend maps exactly the table.
    let errors = h.mapper().take_errors();
    assert!(!errors.is_empty());
    for e in &errors {
        assert!(
            matches!(
                e,
                MapperError::OutOfTime {
                    request: "ADD_MEM_REG",
                    ..
                }
            ),
            "{e}"
        );
    }
    let missing: Vec<u64> = pages(range).filter(|p| !h.mapper().is_mapped(*p)).collect();
    assert_eq!(missing.len(), errors.len(), "{missing:x?} {errors:?}");
    h.assert_backend_maps_the_table();

    // The backend answers promptly again: the same conversion goes through.
    h.set_removals(Answer::Acknowledge, 0);
    h.memory.convert(range, PageState::Private).unwrap();
    assert!(!h.mapper().is_broken());
    assert_eq!(h.mapper().slots_used(), 2);
    h.assert_backend_maps_the_table();
    assert!(h.mapper().take_errors().is_empty());
}

/// A backend that stops answering part way through attach (the first run's addition goes
/// unanswered): attach still returns the attachment, broken, which the VMM recovers with
/// once the backend is reaped. Rolling the replay back instead would have asked the
/// broken backend to let go of the first run, failed, and left that run shared for ever
/// with nothing to call `backend_exited` on.
#[test]
fn attaching_to_a_backend_that_stops_answering_part_way_returns_a_broken_attachment() {
    let mut h = Harness::with(Options {
        reply_timeout: Some(Duration::from_millis(200)),
        ..Options::default()
    });
    h.detach();
    assert_eq!(h.memory.listener_count(), 0);
    h.set_additions(Answer::Stall, 0);
    let acked = REQUIRED_PROTOCOL_FEATURES | VhostUserProtocolFeatures::CONFIG;
    let mapper = VhostUserMapper::new(h.frontend.clone(), acked, &h.memory)
        .unwrap()
        .with_reply_timeout(Duration::from_millis(200));

    // Two runs are shared: the ring's and the buffers'. The first is sent and never
    // answered; the second is not sent.
    let attachment = within(LIMIT, "attach", || {
        mapper.attach(&h.memory, pr(0, MEMORY)).unwrap()
    });
    assert!(attachment.is_broken());
    assert!(attachment.is_mapped(DESC));
    assert!(!attachment.is_mapped(INPUT));
    let errors = attachment.take_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(
            &errors[0],
            MapperError::NoReply { request: "ADD_MEM_REG", range, .. } if *range == pr(DESC, 3 * PAGE_SIZE)
        ),
        "{}",
        errors[0]
    );
    assert_eq!(h.memory.listener_count(), 1);
    // The run the backend may map cannot go private; the other one can.
    assert!(h
        .memory
        .convert(pr(DESC, PAGE_SIZE), PageState::Private)
        .is_err());
    h.memory
        .convert(pr(INPUT, PAGE_SIZE), PageState::Private)
        .unwrap();

    h.backend.kill();
    h.backend.reap();
    attachment.backend_exited().unwrap();
    assert_eq!(h.memory.listener_count(), 0);
    h.memory
        .convert(pr(DESC, PAGE_SIZE), PageState::Private)
        .unwrap();
}
