// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The block device on anonymous memory, requests built as a driver builds them.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_INT_VRING,
};

use super::flaky_memory::FlakyMemory;
use super::test_rig::*;
use super::*;
use crate::linux::virtio::test_driver::*;

const IMAGE_LEN: usize = 64 << 10;

fn rig() -> Rig {
    Rig::new(&pattern(IMAGE_LEN, 1), 16, WITHOUT_EVENT_IDX)
}

fn sector(n: usize) -> std::ops::Range<usize> {
    n * 512..(n + 1) * 512
}

#[test]
fn a_read_copies_the_image_into_guest_memory() {
    let mut rig = rig();
    let data = [writable(BUFFERS, 512), writable(BUFFERS + 0x1000, 1024)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 3, &data),
        (VIRTIO_BLK_S_OK, 1537)
    );
    let image = pattern(IMAGE_LEN, 1);
    assert_eq!(rig.driver.bytes(BUFFERS, 512), image[sector(3)]);
    assert_eq!(
        rig.driver.bytes(BUFFERS + 0x1000, 1024),
        image[4 * 512..6 * 512]
    );
    let stats = rig.stats();
    assert_eq!((stats.reads, stats.bytes_read, stats.failed), (1, 1536, 0));
}

#[test]
fn a_read_may_end_its_buffer_with_the_status() {
    let mut rig = rig();
    rig.driver.fill(HEADER, &rig_header(VIRTIO_BLK_T_IN, 7));
    rig.driver.fill(BUFFERS + 512, &[UNTOUCHED]);
    // One buffer of 513 bytes: a sector of data, then the status.
    let used = rig.raw(&[readable(HEADER, 16), writable(BUFFERS, 513)]);
    assert_eq!(used, 513);
    assert_eq!(rig.driver.bytes(BUFFERS + 512, 1), [VIRTIO_BLK_S_OK as u8]);
    assert_eq!(
        rig.driver.bytes(BUFFERS, 512),
        pattern(IMAGE_LEN, 1)[sector(7)]
    );
}

#[test]
fn a_write_copies_guest_memory_to_the_image() {
    let mut rig = rig();
    let written = pattern(1536, 9);
    rig.driver.fill(BUFFERS, &written[..1024]);
    rig.driver.fill(BUFFERS + 0x2000, &written[1024..]);
    let data = [readable(BUFFERS, 1024), readable(BUFFERS + 0x2000, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 5, &data),
        (VIRTIO_BLK_S_OK, 1)
    );
    let mut expected = pattern(IMAGE_LEN, 1);
    expected[5 * 512..8 * 512].copy_from_slice(&written);
    assert_eq!(rig.image_bytes(), expected);
    let stats = rig.stats();
    assert_eq!(
        (stats.writes, stats.bytes_written, stats.failed),
        (1, 1536, 0)
    );
}

#[test]
fn flush_and_get_id_are_served() {
    let mut rig = rig();
    assert_eq!(
        rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]),
        (VIRTIO_BLK_S_OK, 1)
    );
    rig.driver.fill(BUFFERS, &[UNTOUCHED; 24]);
    let id = [writable(BUFFERS, 20)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_GET_ID, 0, &id),
        (VIRTIO_BLK_S_OK, 21)
    );
    let mut expected = BLOCK_ID.as_bytes().to_vec();
    expected.resize(20, 0);
    expected.extend([UNTOUCHED; 4]);
    assert_eq!(rig.driver.bytes(BUFFERS, 24), expected);
    let stats = rig.stats();
    assert_eq!((stats.flushes, stats.get_ids, stats.failed), (1, 1, 0));
}

#[test]
fn an_unknown_request_type_is_unsupported() {
    let mut rig = rig();
    rig.driver.fill(BUFFERS, &[0; 16]);
    let data = [readable(BUFFERS, 16)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_DISCARD, 0, &data),
        (VIRTIO_BLK_S_UNSUPP, 1)
    );
    assert_eq!(rig.request(0xdead, 0, &[]), (VIRTIO_BLK_S_UNSUPP, 1));
    let stats = rig.stats();
    assert_eq!((stats.unsupported, stats.failed), (2, 0));
    assert_eq!(rig.image_bytes(), pattern(IMAGE_LEN, 1));
}

#[test]
fn a_request_past_the_capacity_fails_and_moves_nothing() {
    let mut rig = rig();
    let last = (IMAGE_LEN / 512) as u64 - 1;
    rig.driver.fill(BUFFERS, &[UNTOUCHED; 1024]);
    let data = [writable(BUFFERS, 1024)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, last, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.driver.bytes(BUFFERS, 1024), [UNTOUCHED; 1024]);
    let data = [readable(BUFFERS, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, last + 1, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.image_bytes(), pattern(IMAGE_LEN, 1));
    assert!(rig.events().contains("past the disk's 0x80 sectors"));
    // The last sector itself is fine.
    let data = [writable(BUFFERS, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, last, &data),
        (VIRTIO_BLK_S_OK, 513)
    );
    assert_eq!(rig.stats().failed, 2);
}

#[test]
fn a_sector_that_overflows_fails() {
    let mut rig = rig();
    let data = [writable(BUFFERS, 1024)];
    for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 + 1] {
        assert_eq!(
            rig.request(VIRTIO_BLK_T_IN, sector, &data),
            (VIRTIO_BLK_S_IOERR, 1),
            "sector {sector:#x}"
        );
    }
    let events = rig.events();
    assert_eq!(events.matches("overflows").count(), 3, "{events}");
}

#[test]
fn a_header_short_long_writable_or_missing_fails() {
    let mut rig = rig();
    rig.driver.fill(HEADER, &rig_header(VIRTIO_BLK_T_IN, 0));
    rig.driver.fill(BUFFERS, &[UNTOUCHED; 512]);
    let status = writable(STATUS, 1);
    let data = writable(BUFFERS, 512);
    let chains = [
        vec![readable(HEADER, 8), data, status],
        vec![readable(HEADER, 17), data, status],
        vec![writable(HEADER, 16), data, status],
        vec![status],
    ];
    for chain in chains {
        rig.driver.fill(STATUS, &[UNTOUCHED]);
        let used = rig.raw(&chain);
        assert_eq!(
            (rig.status_byte(), used),
            (VIRTIO_BLK_S_IOERR, 1),
            "{chain:?}"
        );
    }
    assert_eq!(rig.driver.bytes(BUFFERS, 512), [UNTOUCHED; 512]);
    let events = rig.events();
    for why in ["is not 16 bytes", "is device-writable", "without a header"] {
        assert!(events.contains(why), "{why}: {events}");
    }
    assert_eq!(rig.stats().failed, 4);
}

#[test]
fn data_in_the_wrong_direction_fails_and_moves_nothing() {
    let mut rig = rig();
    rig.driver.fill(BUFFERS, &[UNTOUCHED; 1024]);
    // A read into a buffer the device may only read.
    let data = [writable(BUFFERS, 512), readable(BUFFERS + 512, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.driver.bytes(BUFFERS, 1024), [UNTOUCHED; 1024]);
    // A write from a buffer the device may only write.
    let data = [readable(BUFFERS, 512), writable(BUFFERS + 512, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    // A write whose status descriptor carries writable bytes before the status.
    rig.driver
        .fill(HEADER + 0x200, &rig_header(VIRTIO_BLK_T_OUT, 0));
    let chain = [
        readable(HEADER + 0x200, 16),
        readable(BUFFERS, 512),
        writable(STATUS, 2),
    ];
    assert_eq!(rig.raw(&chain), 1);
    assert_eq!(rig.driver.bytes(STATUS + 1, 1), [VIRTIO_BLK_S_IOERR as u8]);
    // A get-id into a readable buffer.
    let data = [readable(BUFFERS, 20)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_GET_ID, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.driver.bytes(BUFFERS, 1024), [UNTOUCHED; 1024]);
    assert_eq!(rig.image_bytes(), pattern(IMAGE_LEN, 1));
    assert_eq!(rig.stats().failed, 4);
}

#[test]
fn data_in_partial_sectors_fails() {
    let mut rig = rig();
    rig.driver.fill(BUFFERS, &[UNTOUCHED; 512]);
    let data = [writable(BUFFERS, 100)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.driver.bytes(BUFFERS, 512), [UNTOUCHED; 512]);
    assert!(rig.events().contains("not whole sectors"));
}

#[test]
fn more_descriptors_than_seg_max_fail_and_seg_max_is_served() {
    let mut rig = Rig::new(&pattern(IMAGE_LEN, 1), 256, WITHOUT_EVENT_IDX);
    let segments =
        |n: u64| -> Vec<Buf> { (0..n).map(|i| writable(BUFFERS + i * 512, 512)).collect() };
    rig.driver
        .fill(BUFFERS, &vec![UNTOUCHED; (SEG_MAX as usize + 1) * 512]);
    let too_many = segments(u64::from(SEG_MAX) + 1);
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &too_many),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.driver.bytes(BUFFERS, 512), [UNTOUCHED; 512]);
    assert!(rig.events().contains("more than seg_max 128"));
    let most = segments(u64::from(SEG_MAX));
    let used = 128 * 512 + 1;
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &most),
        (VIRTIO_BLK_S_OK, used)
    );
    assert_eq!(rig.driver.bytes(BUFFERS, IMAGE_LEN), pattern(IMAGE_LEN, 1));
}

#[test]
fn more_data_than_a_request_may_carry_fails_before_memory_is_touched() {
    let mut rig = rig();
    // Far outside guest memory: refused for its size before any address is looked at.
    let half = (MAX_REQUEST_BYTES / 2 + 512) as u32;
    let data = [writable(1 << 40, half), writable(2 << 40, half)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    let events = rig.events();
    assert!(events.contains("more than 0x800000"), "{events}");
    assert!(!events.contains("guest 0x10000000000"), "{events}");
}

#[test]
fn data_outside_guest_memory_fails_whole_and_the_log_names_the_range() {
    let mut rig = rig();
    // A write from beyond the end of RAM: the image keeps its bytes.
    let data = [readable(BUFFERS, 512), readable(RAM_SIZE + 0x1000, 0x400)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 2, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.image_bytes(), pattern(IMAGE_LEN, 1));
    let events = rig.events();
    assert!(events.contains("0x400 bytes at guest 0x101000"), "{events}");
    // A read into a buffer that only starts in RAM: not even its first part is written.
    rig.driver.fill(RAM_SIZE - 512, &[UNTOUCHED; 512]);
    let data = [writable(BUFFERS, 512), writable(RAM_SIZE - 512, 1024)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.driver.bytes(RAM_SIZE - 512, 512), [UNTOUCHED; 512]);
    assert!(rig.events().contains("0x400 bytes at guest 0xffe00"));
    assert_eq!(rig.stats().failed, 2);
}

#[test]
fn each_served_notification_raises_the_interrupt() {
    let mut rig = rig();
    assert!(rig.irq.read().is_err(), "nothing pending yet");
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.irq.read().unwrap(), 1);
    let cause = read_reg(&mut rig.transport, VIRTIO_MMIO_INTERRUPT_STATUS);
    assert_eq!(cause, VIRTIO_MMIO_INT_VRING);
    write_reg(&mut rig.transport, VIRTIO_MMIO_INTERRUPT_ACK, cause);
    assert_eq!(
        read_reg(&mut rig.transport, VIRTIO_MMIO_INTERRUPT_STATUS),
        0
    );
    // A notification with nothing available returns nothing and raises nothing.
    rig.driver.notify(&mut rig.transport);
    assert!(rig.irq.read().is_err());
}

#[test]
fn with_event_idx_the_driver_chooses_when_to_be_interrupted() {
    let mut rig = Rig::new(&pattern(IMAGE_LEN, 1), 16, FEATURES);
    assert_ne!(
        rig.transport.acked_features() & feature(VIRTIO_RING_F_EVENT_IDX),
        0
    );
    // used_event 0: interrupt when the first chain is used.
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.irq.read().unwrap(), 1);
    // The device asks to be notified at the next available index.
    assert_eq!(rig.driver.avail_event(), 1);
    // used_event 5: no interrupt for the second chain...
    rig.driver.set_used_event(5);
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert!(rig.irq.read().is_err());
    // ...nor until the sixth (used index 6) passes it.
    for _ in 2..5 {
        rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    assert!(rig.irq.read().is_err());
    rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(rig.irq.read().unwrap(), 1);
    assert_eq!(rig.stats().flushes, 6);
}

#[test]
fn one_notification_serves_every_available_request_and_counts_them() {
    let mut rig = rig();
    rig.driver.fill(BUFFERS + 0x1000, &pattern(1024, 4));
    // Three chains at once: a read, a write, a get-id.
    rig.driver.fill(HEADER, &rig_header(VIRTIO_BLK_T_IN, 1));
    rig.driver
        .fill(HEADER + 0x20, &rig_header(VIRTIO_BLK_T_OUT, 10));
    rig.driver
        .fill(HEADER + 0x40, &rig_header(VIRTIO_BLK_T_GET_ID, 0));
    let chains = [
        [
            readable(HEADER, 16),
            writable(BUFFERS, 512),
            writable(STATUS, 1),
        ],
        [
            readable(HEADER + 0x20, 16),
            readable(BUFFERS + 0x1000, 1024),
            writable(STATUS + 1, 1),
        ],
        [
            readable(HEADER + 0x40, 16),
            writable(BUFFERS + 0x2000, 20),
            writable(STATUS + 2, 1),
        ],
    ];
    let heads: Vec<u16> = chains.iter().map(|c| rig.driver.add_chain(c)).collect();
    rig.driver.notify(&mut rig.transport);
    assert_eq!(rig.driver.used_idx(), 3);
    for (n, (head, len)) in heads.iter().zip([513, 1, 21]).enumerate() {
        assert_eq!(rig.driver.used(n as u16), (u32::from(*head), len));
    }
    assert_eq!(rig.driver.bytes(STATUS, 3), [VIRTIO_BLK_S_OK as u8; 3]);
    assert_eq!(rig.irq.read().unwrap(), 1, "one interrupt for the batch");
    assert_eq!(rig.image_bytes()[10 * 512..12 * 512], pattern(1024, 4));

    let stats = rig.stats();
    let counts = (
        stats.notifications,
        stats.reads,
        stats.writes,
        stats.get_ids,
    );
    assert_eq!(counts, (1, 1, 1, 1));
    assert_eq!(
        (stats.bytes_read, stats.bytes_written, stats.failed),
        (512, 1024, 0)
    );
    assert!(stats.memory_time > Duration::ZERO);
    assert!(stats.queue_time > Duration::ZERO);
    assert!(stats.disk_time > Duration::ZERO);
    // Disjoint parts of the whole.
    let parts = stats.memory_time + stats.queue_time + stats.disk_time;
    assert!(parts <= stats.total_time, "{stats:?}");
    rig.transport.device_mut().clear_stats();
    assert_eq!(rig.stats(), BlkStats::default());
}

#[test]
fn a_data_buffer_is_looked_up_once_and_its_data_moved_through_that_slice() {
    let memory = FlakyMemory::new();
    let driver = TestDriver::on(memory.clone(), 16);
    let mut rig = Rig::on(driver, &pattern(IMAGE_LEN, 1), WITHOUT_EVENT_IDX);
    // Any lookup of the buffer after the first is refused, as when its page turns
    // private after the check: the data moves through the slice the check took.
    for request_type in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let data = [if request_type == VIRTIO_BLK_T_IN {
            writable(BUFFERS, 1024)
        } else {
            readable(BUFFERS, 1024)
        }];
        let head = rig.submit(request_type, 4, &data);
        memory.watch(BUFFERS, Some(1));
        rig.served(head);
        assert_eq!(memory.lookups(), 1, "type {request_type}");
        memory.unwatch();
        assert_eq!(rig.status_byte(), VIRTIO_BLK_S_OK, "type {request_type}");
    }
    let image = pattern(IMAGE_LEN, 1);
    assert_eq!(
        rig.driver.bytes(BUFFERS, 1024),
        image[sector(4).start..sector(5).end]
    );
    assert_eq!(rig.image_bytes(), image);
    let stats = rig.stats();
    assert_eq!((stats.reads, stats.writes, stats.failed), (1, 1, 0));
}

/// Whether `device` offers `VIRTIO_BLK_F_RO`.
fn offers_read_only(device: &BlockDevice) -> bool {
    device.features() & feature(VIRTIO_BLK_F_RO) != 0
}

/// Checks that a read-only device started by `rig` refuses a write, leaving the image
/// as it was, and serves a read.
fn assert_writes_refused(rig: &mut Rig) {
    assert_ne!(rig.transport.acked_features() & feature(VIRTIO_BLK_F_RO), 0);
    rig.driver.fill(BUFFERS, &pattern(512, 7));
    let data = [readable(BUFFERS, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_OUT, 0, &data),
        (VIRTIO_BLK_S_IOERR, 1)
    );
    assert_eq!(rig.image_bytes(), pattern(IMAGE_LEN, 1));
    assert!(rig.events().contains("the disk is read-only"));
    let data = [writable(BUFFERS, 512)];
    assert_eq!(
        rig.request(VIRTIO_BLK_T_IN, 0, &data),
        (VIRTIO_BLK_S_OK, 513)
    );
    let stats = rig.stats();
    assert_eq!((stats.reads, stats.writes, stats.failed), (1, 0, 1));
}

#[test]
fn an_image_opened_read_only_is_offered_read_only() {
    let image = image_file(&pattern(IMAGE_LEN, 1));
    let read_write = BlockDevice::new(image.as_file().try_clone().unwrap()).unwrap();
    assert!(!read_write.is_read_only());
    assert!(!offers_read_only(&read_write));
    let file = std::fs::File::open(image.as_path()).unwrap();
    let device = BlockDevice::new(file).unwrap();
    assert!(device.is_read_only());
    assert!(offers_read_only(&device));
    let features = device.features();
    let mut rig = Rig::serving(TestDriver::new(16), image, device, features);
    assert_writes_refused(&mut rig);
}

#[test]
fn a_device_made_read_only_refuses_writes_to_a_writable_image() {
    let image = image_file(&pattern(IMAGE_LEN, 1));
    let device = BlockDevice::read_only(image.as_file().try_clone().unwrap()).unwrap();
    assert!(offers_read_only(&device));
    let features = device.features() & !feature(VIRTIO_RING_F_EVENT_IDX);
    let mut rig = Rig::serving(TestDriver::new(16), image, device, features);
    assert_writes_refused(&mut rig);
}
