// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Scenario 3: the layouts of the kernel's `private_mem_conversions_test.c`, on a running
//! guest whose memory is `vm-private-memory` (in-place strategy). The guest (driven one
//! command at a time) fills, checks and converts by KVM_HC_MAP_GPA_RANGE; the host checks
//! through the backend's `Bytes`. Every command's result is checked by the guest itself.

mod common;

use common::private_memory_or_skip;

use guest_memfd::PAGE_SIZE;
use integration::{programs, Driver, NoDevice, DATA_ADDR};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{GuestMemoryPrivate, PageState, MAP_GPA_RANGE_ENCRYPTED};

const AREA: u64 = 4 << 20;
const P1: u8 = 0x11;
const P2: u8 = 0x22;
const P3: u8 = 0x33;
const P4: u8 = 0x44;

fn host_byte(ram: &GuestMemoryPrivate, gpa: u64) -> Option<u8> {
    ram.read_obj::<u8>(GuestAddress(gpa)).ok()
}

fn run_case(offset: u64, size: u64) {
    let what = format!("(offset {offset:#x}, size {size:#x})");
    let mut guest = common::guest(programs::DRIVER, AREA, 1, false);
    guest.start(0, &[]).unwrap();
    let memory = guest.memory().clone();
    let view = memory.guest_memory();
    let dev = &mut NoDevice;
    let mut d = Driver::new(guest.vcpu(0), dev).unwrap();
    let (base, start, end) = (DATA_ADDR, DATA_ADDR + offset, DATA_ADDR + offset + size);
    let pages = size / PAGE_SIZE;

    // 1. All shared: the guest writes, the host sees it.
    d.fill(base, AREA, P1, dev).unwrap();
    let ram = view.memory();
    for gpa in [base, start, end - 1, base + AREA - 1] {
        assert_eq!(host_byte(&ram, gpa), Some(P1), "{what} at {gpa:#x}");
    }

    // 2. The range goes private: it arrives fresh, the guest writes it, the rest is intact,
    //    and the host can read none of it.
    assert_eq!(
        d.map(start, size, MAP_GPA_RANGE_ENCRYPTED, dev).unwrap(),
        0,
        "{what}"
    );
    d.check(start, size, 0, dev).unwrap();
    d.fill(start, size, P2, dev).unwrap();
    d.check(base, offset, P1, dev).unwrap();
    d.check(end, base + AREA - end, P1, dev).unwrap();
    assert_eq!(host_byte(&ram, start), None, "{what}");
    assert_eq!(host_byte(&ram, end - 1), None, "{what}");
    assert_eq!(host_byte(&ram, end), Some(P1), "{what}");

    // 3. Odd pages go back to shared (holes in the private range); the host writes them,
    //    the guest sees the host's bytes there and its own private bytes elsewhere.
    for page in (1..pages).step_by(2) {
        let gpa = start + page * PAGE_SIZE;
        assert_eq!(
            d.map(gpa, PAGE_SIZE, 0, dev).unwrap(),
            0,
            "{what} page {page}"
        );
        ram.write_slice(&[P3; PAGE_SIZE as usize], GuestAddress(gpa))
            .unwrap();
    }
    for page in 0..pages {
        let gpa = start + page * PAGE_SIZE;
        let expected = if page % 2 == 1 { P3 } else { P2 };
        d.check(gpa, PAGE_SIZE, expected, dev).unwrap();
        let host = host_byte(&ram, gpa);
        assert_eq!(
            host,
            (page % 2 == 1).then_some(P3),
            "{what} host, page {page}"
        );
    }

    // 4. The whole range back to shared: the private pages arrive fresh, the shared ones
    //    keep the host's bytes.
    assert_eq!(d.map(start, size, 0, dev).unwrap(), 0, "{what}");
    for page in 0..pages {
        let gpa = start + page * PAGE_SIZE;
        let expected = if page % 2 == 1 { P3 } else { 0 };
        d.check(gpa, PAGE_SIZE, expected, dev).unwrap();
        assert_eq!(host_byte(&ram, gpa), Some(expected), "{what} page {page}");
    }
    assert!((0..AREA / PAGE_SIZE)
        .all(|p| memory.state_of(base + p * PAGE_SIZE) == Some(PageState::Shared)));

    // 5. Punching holes: precisely over the range, then over the whole area.
    let range = guest_memfd::PageRange::new(start, size).unwrap();
    memory.discard(range).unwrap();
    d.check(start, size, 0, dev).unwrap();
    d.check(base, offset, P1, dev).unwrap();
    d.fill(base, AREA, P4, dev).unwrap();
    memory
        .discard(guest_memfd::PageRange::new(base, AREA).unwrap())
        .unwrap();
    d.check(base, AREA, 0, dev).unwrap();
    d.done(dev).unwrap();
}

#[test]
fn scenario_3_the_layouts_of_private_mem_conversions_test() {
    if !private_memory_or_skip("scenario_3_the_layouts_of_private_mem_conversions_test") {
        return;
    }
    let (k4, m2) = (PAGE_SIZE, 2 << 20);
    for (offset, size) in [(0, k4), (0, m2), (k4, k4), (k4, m2), (m2, k4)] {
        run_case(offset, size);
    }
}

#[test]
fn the_driver_reports_a_wrong_byte() {
    if !private_memory_or_skip("the_driver_reports_a_wrong_byte") {
        return;
    }
    let mut guest = common::guest(programs::DRIVER, 2 << 20, 1, false);
    guest.start(0, &[]).unwrap();
    let view = guest.memory().guest_memory();
    let dev = &mut NoDevice;
    let mut d = Driver::new(guest.vcpu(0), dev).unwrap();
    d.fill(DATA_ADDR, 8192, 7, dev).unwrap();
    view.memory()
        .write_obj(9u8, GuestAddress(DATA_ADDR + 5000))
        .unwrap();
    match d.check(DATA_ADDR, 8192, 7, dev) {
        Err(integration::Error::GuestFailed { rax, rbx }) => {
            assert_eq!((rax, rbx), (DATA_ADDR + 5000, 9));
        }
        other => panic!("{other:?}"),
    }
}
