// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Loading guest images, on the real `/dev/kvm`: a loader's ranges are checked with an
//! error that names the first private page, and in-place memory takes bytes into pages
//! that end up private.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use common::{dual, in_place, in_place_or_skip, pr};
use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{ContentMode, Error, MemoryListener, PageState, Strategy};

const SIZE: u64 = 4 << 20;

#[test]
fn a_loader_range_check_names_the_first_private_page() {
    if !in_place_or_skip("a_loader_range_check_names_the_first_private_page") {
        return;
    }
    let m = in_place(SIZE, PageState::Private);
    m.convert(pr(0x10000, 0x4000), PageState::Shared).unwrap();
    m.check_host_access(0x10000, 0x4000).unwrap();
    m.check_host_access(0x10123, 0x100).unwrap();
    m.check_host_access(0x10000, 0).unwrap();
    // Unaligned at both ends, reaching one byte into the first private page.
    match m.check_host_access(0x10008, 0x4000 - 8 + 1) {
        Err(Error::PrivatePage { range, page }) => {
            assert_eq!((range.start, range.len, page), (0x10008, 0x3ff9, 0x14000));
        }
        other => panic!("not a private-page refusal: {other:?}"),
    }
    m.convert(pr(SIZE - PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    match m.check_host_access(SIZE - 8, 16) {
        Err(Error::OutsideGuestMemory { first_outside, .. }) => assert_eq!(first_outside, SIZE),
        other => panic!("not an outside refusal: {other:?}"),
    }
    assert!(matches!(
        m.check_host_access(u64::MAX - 4, 16),
        Err(Error::File(guest_memfd::Error::RangeOverflow { .. }))
    ));
    // linux-loader itself only says "CommandLineCopy": the check says where.
    let mut line = linux_loader::cmdline::Cmdline::new(64).unwrap();
    line.insert_str("console=ttyS0").unwrap();
    let view = m.guest_memory();
    assert!(
        linux_loader::loader::load_cmdline(&*view.memory(), GuestAddress(0x14000), &line).is_err()
    );
    assert!(matches!(
        m.check_host_access(0x14000, 14),
        Err(Error::PrivatePage { page: 0x14000, .. })
    ));
}

#[test]
fn bytes_load_into_pages_that_end_up_private() {
    if !in_place_or_skip("bytes_load_into_pages_that_end_up_private") {
        return;
    }
    let m = in_place(SIZE, PageState::Private);
    let image: Vec<u8> = (0..3 * PAGE_SIZE as usize + 100)
        .map(|i| (i % 251) as u8)
        .collect();
    let at = 0x20000 + 50;
    m.load_private(at, &image).unwrap();
    let pages = pr(0x20000, 4 * PAGE_SIZE);
    // Private afterwards: the host cannot read it back...
    for page in 0..4 {
        assert_eq!(
            m.state_of(0x20000 + page * PAGE_SIZE),
            Some(PageState::Private)
        );
    }
    assert_eq!(m.private_pages(), SIZE / PAGE_SIZE);
    let view = m.guest_memory();
    assert!(view.memory().read_obj::<u8>(GuestAddress(at)).is_err());
    // ...but the guest sees the bytes: made shared again keeping content (in-place),
    // they are there, and the uncovered ends of the pages are zero.
    m.convert_with(pages, PageState::Shared, ContentMode::Preserve)
        .unwrap();
    let mut back = vec![0u8; image.len()];
    view.memory()
        .read_slice(&mut back, GuestAddress(at))
        .unwrap();
    assert_eq!(back, image);
    assert_eq!(
        view.memory().read_obj::<u8>(GuestAddress(0x20000)).unwrap(),
        0
    );
    assert_eq!(
        view.memory()
            .read_obj::<u8>(GuestAddress(pages.end() - 1))
            .unwrap(),
        0
    );

    // Bad input changes nothing.
    assert!(matches!(
        m.load_private(SIZE - 10, &[1; 20]),
        Err(Error::OutsideGuestMemory { .. })
    ));
    assert_eq!(m.state_of(SIZE - PAGE_SIZE), Some(PageState::Private));
    m.load_private(0x1000, &[]).unwrap();
    assert_eq!(m.state_of(0x1000), Some(PageState::Private));
}

#[test]
fn the_dual_strategy_refuses_to_load_private_pages() {
    let (m, _) = dual(SIZE, PageState::Private);
    let err = m.load_private(0, &[1; 8]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StrategyUnavailable {
                strategy: Strategy::Dual,
                reason: vm_private_memory::UnavailableReason::LoadNeedsInPlace,
            }
        ),
        "{err}"
    );
    // The dual strategy runs; it cannot do this, and the message says what to do.
    let text = err.to_string();
    assert!(
        text.starts_with("the dual strategy cannot do this"),
        "{text}"
    );
    assert!(text.contains("launch_private"), "{text}");
    assert_eq!(m.private_pages(), SIZE / PAGE_SIZE);
}

/// A device that cannot let go of pages `discard` takes from it the first `panics` times
/// (it panics: the conversion to private stops and is undone).
struct ClingsFor {
    panics: AtomicU32,
}

impl MemoryListener for ClingsFor {
    fn discard(&self, _: PageRange) {
        if self
            .panics
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            panic!("the device still maps the page");
        }
    }

    fn populate(&self, _: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(())
    }
}

/// The load's last step (making the pages private with their content) fails: the pages
/// still end up private, emptied, and the error is the step's.
#[test]
fn a_load_whose_last_step_fails_still_ends_private() {
    let m = in_place(SIZE, PageState::Private);
    let device = Arc::new(ClingsFor {
        panics: AtomicU32::new(1),
    });
    let _subscribed = m.subscribe(pr(0, SIZE), device);
    let err = m
        .load_private(0x20000, b"kernel image bytes")
        .expect_err("the device refused the first discard");
    assert!(matches!(err, Error::ListenerRefused { .. }), "{err}");
    assert_eq!(m.state_of(0x20000), Some(PageState::Private));
    assert!(m
        .guest_memory()
        .memory()
        .read_obj::<u8>(GuestAddress(0x20000))
        .is_err());
    // Emptied: made shared keeping content, the page holds zeros.
    m.convert_with(
        pr(0x20000, PAGE_SIZE),
        PageState::Shared,
        ContentMode::Preserve,
    )
    .unwrap();
    let mut back = [0xffu8; 18];
    m.guest_memory()
        .memory()
        .read_slice(&mut back, GuestAddress(0x20000))
        .unwrap();
    assert_eq!(back, [0u8; 18]);
}

/// Neither the last step nor the way back to private works: the error says the pages
/// stay shared (`kept_shared`), not that the load was undone.
#[test]
fn a_load_that_cannot_make_its_pages_private_says_they_stay_shared() {
    let m = in_place(SIZE, PageState::Private);
    let device = Arc::new(ClingsFor {
        panics: AtomicU32::new(u32::MAX),
    });
    let _subscribed = m.subscribe(pr(0, SIZE), device);
    let err = m
        .load_private(0x20000 + 8, b"kernel image bytes")
        .expect_err("the device never lets go");
    match &err {
        Error::RollbackFailed {
            cause, kept_shared, ..
        } => {
            assert!(matches!(**cause, Error::ListenerRefused { .. }), "{err}");
            assert_eq!(kept_shared.len(), 1, "{err}");
            assert_eq!(
                (kept_shared[0].start, kept_shared[0].len),
                (0x20000, PAGE_SIZE)
            );
        }
        other => panic!("not a failed rollback: {other}"),
    }
    assert!(err.to_string().contains("stay shared"), "{err}");
    assert_eq!(m.state_of(0x20000), Some(PageState::Shared));
}

/// Pages already shared keep the bytes the load does not cover; pages that were private
/// arrive empty (as the documentation says).
#[test]
fn a_load_keeps_the_other_bytes_of_pages_already_shared() {
    let m = in_place(SIZE, PageState::Private);
    m.convert(pr(0x30000, PAGE_SIZE), PageState::Shared)
        .unwrap();
    m.guest_memory()
        .memory()
        .write_obj(0xabcd_u64, GuestAddress(0x30000))
        .unwrap();
    m.load_private(0x30000 + 64, &[7; 64]).unwrap();
    m.convert_with(
        pr(0x30000, PAGE_SIZE),
        PageState::Shared,
        ContentMode::Preserve,
    )
    .unwrap();
    let view = m.guest_memory().memory();
    assert_eq!(view.read_obj::<u64>(GuestAddress(0x30000)).unwrap(), 0xabcd);
    assert_eq!(view.read_obj::<u8>(GuestAddress(0x30000 + 64)).unwrap(), 7);
}
