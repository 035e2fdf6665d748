// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The block device on private memory (`vm-private-memory` on real KVM where the host
//! has in-place guest_memfd, otherwise on its stand-in): buffers in shared pages are
//! served, a buffer with a private page fails without a byte of it moving, and a status
//! byte in a private page stops the queue.

use guest_memfd::PageRange;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_INT_CONFIG};
use vm_memory::GuestMemoryAtomic;
use vm_private_memory::{GuestMemoryPrivate, MemoryBuilder, PageState, PrivateMemoryManager};

use super::test_rig::{pattern, rig_header, Rig, HEADER, UNTOUCHED, WITHOUT_EVENT_IDX};
use super::FEATURES;
use crate::linux::virtio::test_driver::*;

/// The page the tests make private, right after the first page of buffers.
const PRIVATE_PAGE: u64 = BUFFERS + 0x1000;
const IMAGE_LEN: usize = 16 << 10;

/// A started device on 2 MiB of private memory, every page shared but [`PRIVATE_PAGE`].
fn rig() -> (
    Rig<GuestMemoryAtomic<GuestMemoryPrivate>>,
    PrivateMemoryManager,
) {
    let vm = guest_memfd::stand_in::vm_for_logic_tests();
    let memory = MemoryBuilder::new(vm)
        .region_at(0, 2 << 20)
        .initial_state(PageState::Shared)
        .build()
        .expect("private memory");
    let page = PageRange::new(PRIVATE_PAGE, 0x1000).unwrap();
    memory.convert(page, PageState::Private).unwrap();
    let driver = TestDriver::on(memory.guest_memory(), 16);
    (
        Rig::on(driver, &pattern(IMAGE_LEN, 1), WITHOUT_EVENT_IDX),
        memory,
    )
}

#[test]
fn requests_on_shared_pages_of_private_memory_are_served() {
    let (mut rig, _memory) = rig();
    let data = [writable(BUFFERS, 1024)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 2, &data),
        (VIRTIO_BLK_S_OK, 1025)
    );
    assert_eq!(
        rig.driver.bytes(BUFFERS, 1024),
        pattern(IMAGE_LEN, 1)[1024..2048]
    );
    rig.driver.fill(BUFFERS, &pattern(512, 7));
    let data = [readable(BUFFERS, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 0, &data),
        (VIRTIO_BLK_S_OK, 1)
    );
    assert_eq!(rig.image_bytes()[..512], pattern(512, 7));
}

#[test]
fn a_buffer_with_a_private_page_fails_and_not_a_byte_of_it_moves() {
    let (mut rig, memory) = rig();
    // A read into one buffer over a shared page and the private one after it.
    rig.driver.fill(BUFFERS, &[UNTOUCHED; 0x1000]);
    let data = [writable(BUFFERS, 0x2000)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.driver.bytes(BUFFERS, 0x1000), [UNTOUCHED; 0x1000]);
    let events = rig.events();
    assert!(
        events.contains("read request: 0x2000 bytes at guest 0x10000"),
        "{events}"
    );
    // A write from a private page, after a shared one: the image keeps its bytes.
    let data = [readable(BUFFERS, 512), readable(PRIVATE_PAGE + 0x200, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.image_bytes(), pattern(IMAGE_LEN, 1));
    let events = rig.events();
    assert!(
        events.contains("write request: 0x200 bytes at guest 0x11200"),
        "{events}"
    );
    assert_eq!(rig.stats().failed, 2);
    // The page is still private: the device did not make the host reach it.
    assert!(memory.check_host_access(PRIVATE_PAGE, 0x1000).is_err());
}

#[test]
fn a_status_byte_in_a_private_page_stops_the_queue_and_the_write_is_not_done() {
    let (mut rig, _memory) = rig();
    rig.driver.fill(HEADER, &rig_header(VIRTIO_BLK_T_OUT, 0));
    rig.driver.fill(BUFFERS, &pattern(512, 9));
    let status = writable(PRIVATE_PAGE + 0x10, 1);
    rig.driver
        .add_chain(&[readable(HEADER, 16), readable(BUFFERS, 512), status]);
    rig.driver.notify(&mut rig.transport);
    assert_eq!(rig.driver.used_idx(), 0);
    assert_eq!(rig.image_bytes(), pattern(IMAGE_LEN, 1));
    assert_ne!(rig.transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    let cause = read_reg(&mut rig.transport, VIRTIO_MMIO_INTERRUPT_STATUS);
    assert_eq!(cause, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(rig.irq.read().unwrap(), 1);
    let events = rig.events();
    assert!(events.contains("status byte at guest 0x11010"), "{events}");
}

/// A hostile driver can put its available ring's index on one page and the ring's
/// entries on the next, then make that page private: the index announces a chain that
/// cannot be read. The device gives up on the queue (`DEVICE_NEEDS_RESET`), naming it,
/// instead of asking again forever on the vCPU's thread (with EVENT_IDX) or returning
/// as if nothing were there, leaving the driver waiting (without).
fn assert_an_unreadable_announced_chain_stops_the_queue(features: u64) {
    let vm = guest_memfd::stand_in::vm_for_logic_tests();
    let memory = MemoryBuilder::new(vm)
        .region_at(0, 2 << 20)
        .initial_state(PageState::Shared)
        .build()
        .expect("private memory");
    let mut driver = TestDriver::on(memory.guest_memory(), 16);
    // The flags and index end page 0x4000; the entries start page 0x5000.
    driver.avail_ring = 0x5000 - 4;
    let mut rig = Rig::on(driver, &pattern(IMAGE_LEN, 1), features);
    rig.submit(VIRTIO_BLK_T_IN, 0, &[writable(BUFFERS, 512)]);
    let entries = PageRange::new(0x5000, 0x1000).unwrap();
    memory.convert(entries, PageState::Private).unwrap();
    rig.driver.notify(&mut rig.transport);
    assert_eq!(rig.driver.used_idx(), 0);
    assert_ne!(rig.transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(rig.irq.read().unwrap(), 1, "a configuration interrupt");
    let events = rig.events();
    assert!(
        events.contains("queue 0: the available ring announces a chain at index 0 that cannot be read (available index 1)"),
        "{events}"
    );
    assert_eq!(rig.stats().notifications, 1);
}

#[test]
fn an_announced_chain_whose_ring_entry_is_private_stops_the_queue_instead_of_spinning() {
    assert_an_unreadable_announced_chain_stops_the_queue(FEATURES);
}

#[test]
fn an_announced_chain_whose_ring_entry_is_private_stops_the_queue_without_event_idx_too() {
    assert_an_unreadable_announced_chain_stops_the_queue(WITHOUT_EVENT_IDX);
}
