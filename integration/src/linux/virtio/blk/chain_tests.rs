// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Requests the device has no truthful answer for: a chain it cannot follow or that has
//! no status byte, a status byte it cannot write. None is returned (a driver would read
//! a stale status as the answer): the queue stops, `DEVICE_NEEDS_RESET` is set, and the
//! log says why, naming the chain's head.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_STATUS,
};

use super::test_rig::*;
use super::QUEUE_SIZE;
use crate::linux::virtio::test_driver::*;

const IMAGE_LEN: usize = 64 << 10;

fn rig() -> Rig {
    Rig::new(&pattern(IMAGE_LEN, 1), 16, WITHOUT_EVENT_IDX)
}

/// Checks that the chain at `head` was not returned, that the device asks for a reset
/// and says so through a configuration interrupt, that the log gives `why` and the
/// head, that the request counts as one failure and nothing else, and that nothing
/// more is served.
fn assert_stopped(rig: &mut Rig, head: u16, why: &str) {
    assert_eq!(rig.driver.used_idx(), 0, "not returned");
    assert_ne!(rig.transport.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    let cause = read_reg(&mut rig.transport, VIRTIO_MMIO_INTERRUPT_STATUS);
    assert_eq!(cause, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(rig.irq.read().unwrap(), 1);
    let events = rig.events();
    assert!(events.contains(why), "{why}: {events}");
    let head = format!("request at descriptor {head}");
    assert!(events.contains(&head), "{head}: {events}");
    assert!(events.contains("DEVICE_NEEDS_RESET"), "{events}");
    let stats = rig.stats();
    let outcomes = [
        stats.reads,
        stats.writes,
        stats.flushes,
        stats.get_ids,
        stats.unsupported,
        stats.failed,
    ];
    assert_eq!(outcomes, [0, 0, 0, 0, 0, 1], "{stats:?}");
    // A request made after it is not served.
    rig.submit(VIRTIO_BLK_T_FLUSH, 0, &[]);
    rig.driver.notify(&mut rig.transport);
    assert_eq!(rig.driver.used_idx(), 0);
    assert_eq!(rig.stats().notifications, 1);
}

#[test]
fn a_status_the_device_cannot_write_stops_the_queue_until_a_reset() {
    let mut rig = rig();
    rig.driver.fill(BUFFERS, &pattern(512, 3));
    rig.driver.fill(HEADER, &rig_header(VIRTIO_BLK_T_OUT, 0));
    let chain = [
        readable(HEADER, 16),
        readable(BUFFERS, 512),
        writable(RAM_SIZE + 8, 1),
    ];
    let head = rig.driver.add_chain(&chain);
    rig.driver.notify(&mut rig.transport);
    // Nothing written: the device tries the status before it carries the request out.
    assert_eq!(rig.image_bytes(), pattern(IMAGE_LEN, 1));
    assert_stopped(&mut rig, head, "status byte at guest 0x100008");
    // Served again once the driver resets the device and starts again.
    write_reg(&mut rig.transport, VIRTIO_MMIO_STATUS, 0);
    let driver = TestDriver::on(rig.driver.memory.clone(), 16);
    driver.start(&mut rig.transport, WITHOUT_EVENT_IDX);
    rig.driver = driver;
    assert_eq!(
        rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
}

#[test]
fn a_chain_with_no_status_byte_stops_the_queue() {
    // Its last descriptor is device-readable, or empty: the device has nowhere to answer.
    for last in [readable(STATUS, 1), writable(STATUS, 0)] {
        let mut rig = rig();
        rig.driver.fill(HEADER, &rig_header(VIRTIO_BLK_T_IN, 0));
        rig.driver.fill(BUFFERS, &[UNTOUCHED; 512]);
        rig.driver.fill(STATUS, &[UNTOUCHED]);
        let chain = [readable(HEADER, 16), writable(BUFFERS, 512), last];
        let head = rig.driver.add_chain(&chain);
        rig.driver.notify(&mut rig.transport);
        assert_eq!(rig.status_byte(), u32::from(UNTOUCHED), "{last:?}");
        assert_eq!(rig.driver.bytes(BUFFERS, 512), [UNTOUCHED; 512]);
        assert_stopped(&mut rig, head, "no status byte");
    }
}

#[test]
fn a_chain_cut_short_looping_or_empty_stops_the_queue() {
    let data = writable(BUFFERS, 512);
    // The data descriptor goes on to an index past the table, or back to the header:
    // virtio-queue ends both chains early, with the data descriptor last. Taking it for
    // the status would write into the guest's buffer. 16 descriptors are followed
    // around the loop: the queue's size. And a head past the table: no descriptor.
    let cases = [
        (Some(200), "cut short after 2 descriptors"),
        (Some(0), "cut short after 16 descriptors"),
        (None, "empty chain"),
    ];
    for (next, why) in cases {
        let mut rig = rig();
        rig.driver.fill(HEADER, &rig_header(VIRTIO_BLK_T_IN, 0));
        rig.driver.fill(BUFFERS, &[UNTOUCHED; 512]);
        let head = match next {
            Some(next) => {
                let head = rig.driver.add_chain(&[readable(HEADER, 16), data]);
                let next = if next == 0 { head } else { next };
                rig.driver.write_descriptor(head + 1, data, Some(next));
                rig.driver.notify(&mut rig.transport);
                head
            }
            None => {
                rig.driver.make_available(200);
                rig.driver.notify(&mut rig.transport);
                200
            }
        };
        assert_eq!(rig.driver.bytes(BUFFERS, 512), [UNTOUCHED; 512], "{why}");
        assert_stopped(&mut rig, head, why);
    }
}

#[test]
fn a_chain_longer_than_the_walk_limit_stops_the_queue() {
    let mut rig = rig();
    rig.driver.fill(HEADER, &rig_header(VIRTIO_BLK_T_IN, 0));
    rig.driver.fill(STATUS, &[UNTOUCHED]);
    // An indirect table (which the device never offers, but virtio-queue follows) of
    // one descriptor more than a ring's chain may have, a well-formed request otherwise.
    let mut chain = vec![readable(HEADER, 16)];
    chain.resize(usize::from(QUEUE_SIZE), writable(BUFFERS, 512));
    chain.push(writable(STATUS, 1));
    let head = rig.driver.add_indirect_chain(0x4000, &chain);
    rig.driver.notify(&mut rig.transport);
    assert_eq!(rig.status_byte(), u32::from(UNTOUCHED));
    assert_stopped(&mut rig, head, "chain longer than 256 descriptors");
}
