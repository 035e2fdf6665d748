// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Loading guest images, on the real `/dev/kvm`: a loader's ranges are checked with an
//! error that names the first private page, and in-place memory takes bytes into pages
//! that end up private.

mod common;

use common::{dual, in_place, in_place_or_skip, pr};
use guest_memfd::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{ContentMode, Error, PageState, Strategy};

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
    let view = m.memory();
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
    let view = m.memory();
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
    assert!(matches!(
        m.load_private(0, &[1; 8]),
        Err(Error::StrategyUnavailable {
            strategy: Strategy::Dual,
            reason: vm_private_memory::UnavailableReason::LoadNeedsInPlace,
        })
    ));
    assert_eq!(m.private_pages(), SIZE / PAGE_SIZE);
}
