// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The mapper against a rust-vmm `vhost-user-backend` device in another process (this
//! test binary, started again), on dual-strategy memory of a real VM (`/dev/kvm`) whose
//! memory attributes a stand-in takes. The test drives the device's virtio queue as a
//! guest driver would, and reads what the backend maps from `/proc/PID/maps`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use guest_memfd::PAGE_SIZE;
use vm_private_memory::{Error, ListenerRefusal, PageState};
use vm_private_memory_vhost_user::{Error as MapperError, VhostUserMapper};

/// The backend's `main` when this binary is started as the backend; nothing otherwise.
#[test]
fn backend_process() {
    serve_if_asked();
}

#[test]
fn the_backend_serves_the_queue_from_the_shared_runs_and_holds_only_the_shared_memfd() {
    let mut h = Harness::new(None);
    // One region per shared run, each at the run's offset in the memfd (region at 0).
    let regions: Vec<_> = h.mapper().regions().iter().map(|r| r.guest).collect();
    assert_eq!(regions, [pr(DESC, 3 * PAGE_SIZE), pr(INPUT, 3 * PAGE_SIZE)]);
    for r in h.mapper().regions() {
        assert_eq!(r.mmap_offset, r.guest.start());
        assert_eq!(r.userspace_addr, host_address(&h.memory, r.guest.start()));
    }
    assert_eq!(h.mapper().backend_slots(), 509);

    let message = b"through a shared page";
    let done = h.request(message, OUTPUT, 64);
    assert_eq!(
        done,
        Completion {
            used_len: message.len() as u32 + 1,
            status: 0
        }
    );
    assert_eq!(h.read_output(message.len()), message);
    assert_eq!(
        h.stats(),
        Stats {
            failed: 0,
            last_failed: 0,
            served: 1
        }
    );

    // The backend maps exactly the table's pages of the memfd, and never had the
    // guest_memfd: no descriptor or mapping of it.
    h.assert_backend_maps_the_table();
    let held = h.backend.files_held();
    assert!(held.contains(&memfd_id(&h.memory)));
    assert!(
        !held.contains(&h.guest_memfd),
        "{:?} in {held:?}",
        h.guest_memfd
    );
}

#[test]
fn a_region_away_from_guest_address_zero_is_given_at_its_offset_in_its_own_file() {
    let mut h = Harness::with(Options {
        high_region: true,
        ..Options::default()
    });
    // The second region's shared page: guest address HIGH, but its offset in the memfd
    // that backs the region is not HIGH.
    let high = h
        .mapper()
        .regions()
        .into_iter()
        .find(|r| r.guest.start() >= HIGH)
        .unwrap();
    assert_eq!(high.guest, pr(HIGH, PAGE_SIZE));
    assert_eq!(h.memfds.len(), 2, "a memfd per region");
    assert_ne!(high.mmap_offset, HIGH);
    assert!(high.mmap_offset < MEMORY + HIGH_SIZE, "{high:?}");
    assert_eq!(high.userspace_addr, host_address(&h.memory, HIGH));
    h.assert_backend_maps_the_table();

    // The device writes there through its own mapping: the frontend reads the bytes at
    // HIGH, so the backend mapped the right offset of the right file.
    let message = b"written at a high guest address";
    let done = h.request(message, HIGH, 64);
    assert_eq!(done.status, 0);
    assert_eq!(h.read(HIGH, message.len()), message);

    // Conversions in that region follow the same offsets.
    h.memory
        .convert(pr(HIGH + 0x3000, 2 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    let added = h
        .mapper()
        .regions()
        .into_iter()
        .find(|r| r.guest.start() == HIGH + 0x3000)
        .unwrap();
    assert_eq!(added.mmap_offset, high.mmap_offset + 0x3000);
    h.assert_backend_maps_the_table();
    h.memory
        .convert(pr(HIGH, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert!(!h.mapper().is_mapped(HIGH));
    h.assert_backend_maps_the_table();
    assert_eq!(h.request(message, HIGH + 0x4000, 64).status, 0);
    assert_eq!(h.read(HIGH + 0x4000, message.len()), message);
    assert_eq!(h.request(message, HIGH, 64).status, 1);
    assert!(h.mapper().take_errors().is_empty());
}

#[test]
fn a_page_that_goes_private_is_revoked_before_convert_returns_and_the_backend_reports_its_failed_access(
) {
    let mut h = Harness::new(None);
    let message = b"before and after";
    assert_eq!(h.request(message, OUTPUT, 64).status, 0);
    // The backend wrote the output page: the memfd holds it.
    let touched = shared_bytes_held(&h.memory);

    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap();
    // Revoked before `convert` returned: not in the table, not in the backend's mappings,
    // and the parts of the run that stay shared are back.
    assert!(!h.mapper().is_mapped(OUTPUT));
    let regions: Vec<_> = h.mapper().regions().iter().map(|r| r.guest).collect();
    assert_eq!(
        regions,
        [
            pr(DESC, 3 * PAGE_SIZE),
            pr(INPUT, PAGE_SIZE),
            pr(STATUS, PAGE_SIZE)
        ]
    );
    h.assert_backend_maps_the_table();
    assert!(!h
        .backend
        .mapped_file_pages(memfd_id(&h.memory))
        .contains(&OUTPUT));
    let punched = shared_bytes_held(&h.memory);
    assert_eq!(punched, touched - PAGE_SIZE, "the page was punched");

    // The guest's driver (or a stale request) points the device at the page again: the
    // backend's access fails and it says so, and the memfd does not grow.
    let done = h.request(message, OUTPUT, 64);
    assert_eq!(
        done,
        Completion {
            used_len: 0,
            status: 1
        }
    );
    assert_eq!(
        h.stats(),
        Stats {
            failed: 1,
            last_failed: OUTPUT,
            served: 1
        }
    );
    assert_eq!(shared_bytes_held(&h.memory), punched);

    // Shared again: the range is given back and the queue works on it.
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert!(h.mapper().is_mapped(OUTPUT));
    h.assert_backend_maps_the_table();
    assert_eq!(h.request(message, OUTPUT, 64).status, 0);
    assert_eq!(h.read_output(message.len()), message);
    assert_eq!(h.stats().served, 2);
}

#[test]
fn a_removal_is_acknowledged_only_after_the_request_in_flight_is_done() {
    let mut h = Harness::new(None);
    // Every page of the request is written (and held) once.
    assert_eq!(h.request(b"warm", OUTPUT, 64).status, 0);
    let before = shared_bytes_held(&h.memory);
    // The device holds this request between reading its input and writing its output.
    let message = [SLOW, 1, 2, 3];
    h.submit(&message, OUTPUT, 64);
    std::thread::sleep(SLOW_FOR / 4);

    let start = Instant::now();
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap();
    let waited = start.elapsed();
    // The removal waited for the worker, which wrote the page while it was still shared.
    assert!(waited >= SLOW_FOR / 2, "convert returned after {waited:?}");
    assert_eq!(
        h.complete(),
        Completion {
            used_len: message.len() as u32 + 1,
            status: 0
        }
    );
    // That write came before the punch, which freed it: nothing was allocated after.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(shared_bytes_held(&h.memory), before - PAGE_SIZE);
    h.assert_backend_maps_the_table();
}

#[test]
fn a_guest_fragmenting_past_the_slot_budget_gets_an_error_and_nothing_is_half_revoked() {
    let mut h = Harness::new(Some(6));
    assert_eq!(h.mapper().slot_budget(), 6);
    // Two regions (ring, buffers) plus four single pages: the budget.
    for i in 0..4 {
        h.memory
            .convert(
                pr(0x20000 + 2 * i * PAGE_SIZE, PAGE_SIZE),
                PageState::Shared,
            )
            .unwrap();
    }
    assert_eq!(h.mapper().slots_used(), 6);

    // One more is refused whole: the page stays private and nothing was added.
    let err = h
        .memory
        .convert(pr(0x30000, PAGE_SIZE), PageState::Shared)
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
        matches!(
            reason,
            MapperError::SlotBudget {
                needed: 1,
                held: 6,
                budget: 6,
                ..
            }
        ),
        "{reason}"
    );
    assert!(err.to_string().contains("0x30000"), "{err}");
    assert_eq!(h.memory.state_of(0x30000), Some(PageState::Private));
    assert_eq!(h.mapper().slots_used(), 6);
    h.assert_backend_maps_the_table();

    // A page in the middle of a run going private would split its region into two: over
    // the budget, so the conversion stops before anything is removed. The page stays
    // shared, in the table and in the backend's mappings, and the queue still uses it.
    let err = h
        .memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ListenerRefused {
                reason: ListenerRefusal::Panicked { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was revoked"), "{err}");
    assert_eq!(h.memory.state_of(OUTPUT), Some(PageState::Shared));
    assert!(h.mapper().is_mapped(OUTPUT));
    assert_eq!(h.mapper().slots_used(), 6);
    h.assert_backend_maps_the_table();
    assert_eq!(h.request(b"still here", OUTPUT, 64).status, 0);

    // Whole runs can always go private, which frees slots; then the split fits.
    h.memory
        .convert(pr(0x20000, PAGE_SIZE), PageState::Private)
        .unwrap();
    h.memory
        .convert(pr(OUTPUT, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert_eq!(h.mapper().slots_used(), 6);
    assert!(!h.mapper().is_mapped(OUTPUT));
    h.assert_backend_maps_the_table();
    assert!(h.mapper().take_errors().is_empty());
}

/// A random walk of conversions and discards: after every step the backend maps exactly
/// the pages the table holds, and those are the shared pages offered since they were
/// last revoked.
#[test]
fn the_backend_maps_exactly_the_shared_pages_after_any_sequence_and_nothing_once_detached() {
    let mut h = Harness::new(None);
    let area = pr(0x40000, 64 * PAGE_SIZE);
    // The model: a page is mapped from the conversion that makes it shared until one makes
    // it private or frees it (a freed page stays shared, but is mapped again only when
    // offered again).
    let mut model: BTreeSet<u64> = BTreeSet::new();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..300 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let first = (seed >> 8) % 60;
        let count = 1 + (seed >> 16) % 8;
        let range = pr(
            area.start() + first * PAGE_SIZE,
            count.min(64 - first) * PAGE_SIZE,
        );
        match (seed >> 24) % 3 {
            0 => {
                for page in pages(range) {
                    if h.memory.state_of(page) == Some(PageState::Private) {
                        model.insert(page);
                    }
                }
                h.memory.convert(range, PageState::Shared).unwrap();
            }
            1 => {
                h.memory.convert(range, PageState::Private).unwrap();
                pages(range).for_each(|p| {
                    model.remove(&p);
                });
            }
            _ => {
                h.memory.discard(range).unwrap();
                pages(range).for_each(|p| {
                    model.remove(&p);
                });
            }
        }
        let mapped: BTreeSet<u64> = h
            .mapper()
            .regions()
            .iter()
            .flat_map(|r| pages(r.guest))
            .filter(|p| area.start() <= *p && *p < area.end())
            .collect();
        assert_eq!(mapped, model);
        assert!(mapped.is_subset(&shared_pages(&h.memory, area)));
        // And the backend process itself maps exactly that, after every step.
        h.assert_backend_maps_the_table();
    }
    assert!(h.mapper().take_errors().is_empty());
    // And the queue still works.
    assert_eq!(h.request(b"after the walk", OUTPUT, 64).status, 0);

    // Detaching removes every region from the backend before it stops following
    // conversions; the memory no longer has a listener.
    h.detach();
    assert!(h.backend.mapped_file_pages(memfd_id(&h.memory)).is_empty());
    assert_eq!(h.memory.listener_count(), 0);
}

#[test]
fn in_place_memory_and_missing_protocol_features_are_refused_before_any_message() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use vhost::vhost_user::message::VhostUserProtocolFeatures as F;
    use vhost::vhost_user::Frontend;
    use vm_private_memory::{MemoryBuilder, Strategy};

    let (ours, mut peer) = UnixStream::pair().unwrap();
    peer.set_nonblocking(true).unwrap();
    let frontend = Frontend::from_stream(ours, 1);
    let both = F::CONFIGURE_MEM_SLOTS | F::REPLY_ACK;

    // In-place memory: on real KVM where the host has it, else on the stand-in.
    let in_place = MemoryBuilder::new(guest_memfd::stand_in::vm_for_logic_tests())
        .region_at(0, 2 << 20)
        .strategy(Strategy::InPlace)
        .build()
        .unwrap();
    let err = VhostUserMapper::new(frontend.clone(), both, &in_place).unwrap_err();
    assert!(
        matches!(
            err,
            MapperError::NoShareableFile {
                strategy: Strategy::InPlace
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Strategy::Dual"), "{err}");

    let (dual, _) = dual_memory();
    for (acked, missing) in [
        (F::CONFIGURE_MEM_SLOTS, F::REPLY_ACK),
        (F::REPLY_ACK | F::CONFIG, F::CONFIGURE_MEM_SLOTS),
    ] {
        let err = VhostUserMapper::new(frontend.clone(), acked, &dual).unwrap_err();
        assert!(
            matches!(err, MapperError::NotNegotiated { missing: m } if m == missing),
            "{err}"
        );
        assert!(err.to_string().contains("set_protocol_features"), "{err}");
    }
    // Nothing was sent.
    let mut byte = [0u8; 1];
    assert_eq!(
        peer.read(&mut byte).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
}
