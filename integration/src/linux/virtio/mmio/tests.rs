// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The transport's registers, negotiation and reset, driven as a driver would.

use std::fs::File;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED,
};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::linux::virtio::test_driver::*;
use crate::linux::virtio::{BlockDevice, SEG_MAX, SIZE_MAX};

const VERSION_1: u64 = feature(VIRTIO_F_VERSION_1);
const ACCESS_PLATFORM: u64 = feature(VIRTIO_F_ACCESS_PLATFORM);

/// A transport for a block device on an image of `sectors` sectors and `extra` bytes.
fn transport(
    sectors: u64,
    extra: u64,
) -> (TestDriver, TestTransport<BlockDevice>, EventFd, TempFile) {
    let image = TempFile::new().unwrap();
    image.as_file().set_len(sectors * 512 + extra).unwrap();
    let disk: File = image.as_file().try_clone().unwrap();
    let driver = TestDriver::new(16);
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let device = BlockDevice::new(disk).unwrap();
    let transport =
        MmioTransport::new(device, driver.memory.clone(), irq.try_clone().unwrap()).unwrap();
    (driver, transport, irq, image)
}

fn offered(transport: &TestTransport<BlockDevice>) -> u64 {
    transport.device().features()
}

#[test]
fn the_device_identifies_itself() {
    let (_driver, mut t, _irq, _image) = transport(8, 0);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_VERSION), 2);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_DEVICE_ID), 2);
    // No vendor.
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_VENDOR_ID), 0);
    // One queue of 256 entries; the next index has none.
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
    // No shared memory region: its length reads as -1.
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
}

#[test]
fn the_memory_may_be_a_plain_reference() {
    let ram =
        vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 0x10000)])
            .unwrap();
    let image = TempFile::new().unwrap();
    let device = BlockDevice::new(image.as_file().try_clone().unwrap()).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(device, &ram, irq).unwrap();
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    // An empty image: no sectors.
    assert_eq!(read_reg(&mut t, 0x100), 0);
}

#[test]
fn features_are_read_32_bits_at_a_time_by_select() {
    let (_driver, mut t, _irq, _image) = transport(8, 0);
    write_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let low = read_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
    write_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    let high = read_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES);
    write_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    // VERSION_1 (32) and ACCESS_PLATFORM (33) in the high word.
    assert_eq!(high & 0b11, 0b11, "high word {high:#x}");
    for bit in [
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
    ] {
        assert_ne!(low & (1 << bit), 0, "bit {bit} of {low:#x}");
    }
    assert_eq!(u64::from(high) << 32 | u64::from(low), offered(&t));
}

#[test]
fn features_ok_needs_version_1_and_access_platform_and_nothing_unoffered() {
    let (driver, mut t, _irq, _image) = transport(8, 0);
    let all = offered(&t);
    let refusals = [
        (all & !VERSION_1, "VIRTIO_F_VERSION_1"),
        (all & !ACCESS_PLATFORM, "VIRTIO_F_ACCESS_PLATFORM"),
        (all | 1 << 50, "never offered"),
    ];
    for (features, why) in refusals {
        let status = driver.negotiate(&mut t, features);
        assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0, "{features:#x}");
        let events = t.take_events();
        assert!(
            events
                .iter()
                .any(|e| e.contains("FEATURES_OK refused") && e.contains(why)),
            "{events:?}"
        );
        // DRIVER_OK cannot follow.
        write_reg(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(
            read_reg(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK,
            0
        );
    }
    for features in [all, VERSION_1 | ACCESS_PLATFORM] {
        let status = driver.negotiate(&mut t, features);
        assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0, "{features:#x}");
        assert_eq!(t.acked_features(), features);
    }
}

#[test]
fn driver_features_are_settled_by_features_ok() {
    let (driver, mut t, _irq, _image) = transport(8, 0);
    let minimal = VERSION_1 | ACCESS_PLATFORM;
    driver.negotiate(&mut t, minimal);
    write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    write_reg(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << VIRTIO_BLK_F_FLUSH);
    assert_eq!(t.acked_features(), minimal);
}

#[test]
fn driver_ok_activates_the_device_and_a_reset_forgets_everything() {
    let (driver, mut t, irq, _image) = transport(8, 0);
    let all = offered(&t);
    driver.start(&mut t, all);
    let running = VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK;
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_STATUS), running);
    assert_eq!(t.device().acked_features(), all);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    assert_eq!(
        read_reg(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW),
        DESC_TABLE as u32
    );
    assert_eq!(
        read_reg(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW),
        AVAIL_RING as u32
    );
    assert_eq!(
        read_reg(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW),
        USED_RING as u32
    );
    // An interrupt pending, to see the reset clear it.
    t.interrupt(VIRTIO_MMIO_INT_VRING);
    assert_eq!(irq.read().unwrap(), 1);

    write_reg(&mut t, VIRTIO_MMIO_STATUS, 0);
    assert_eq!(t.status(), 0);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW), 0);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW), 0);
    assert_eq!(t.acked_features(), 0);
    assert_eq!(t.device().acked_features(), 0);
    // And the driver can start over.
    driver.start(&mut t, all);
    assert_eq!(t.status(), running);
}

#[test]
fn a_status_write_that_clears_bits_is_ignored() {
    let (driver, mut t, _irq, _image) = transport(8, 0);
    let all = offered(&t);
    let status = driver.negotiate(&mut t, all);
    write_reg(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    assert_eq!(t.status(), status);
    assert!(t
        .take_events()
        .iter()
        .any(|e| e.contains("without a reset")));
    // FAILED is a bit the driver may add.
    write_reg(&mut t, VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_FAILED);
    assert_eq!(t.status(), status | VIRTIO_CONFIG_S_FAILED);
}

#[test]
fn queue_registers_are_frozen_once_the_queue_is_ready() {
    let (driver, mut t, _irq, _image) = transport(8, 0);
    let all = offered(&t);
    driver.start(&mut t, all);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8000);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 1);
    assert_eq!(
        read_reg(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW),
        DESC_TABLE as u32
    );
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH), 0);
    // A queue that does not exist takes nothing and reads as absent.
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 7);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
}

#[test]
fn a_queue_outside_guest_memory_needs_a_reset_at_driver_ok() {
    let (driver, mut t, irq, _image) = transport(8, 0);
    let all = offered(&t);
    let status = driver.negotiate(&mut t, all);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    write_reg(
        &mut t,
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        (RAM_SIZE + 0x1000) as u32,
    );
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL_RING as u32);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, USED_RING as u32);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    write_reg(
        &mut t,
        VIRTIO_MMIO_STATUS,
        status | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(
        read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
        VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(irq.read().unwrap(), 1);
    let events = t.take_events();
    assert!(events.iter().any(|e| e.contains("0x101000")), "{events:?}");
    // The driver acknowledges the interrupt; a notification serves nothing.
    write_reg(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    driver.notify(&mut t);
    assert_eq!(t.device().stats().notifications, 0);
}

#[test]
fn a_queue_made_ready_after_driver_ok_is_refused() {
    let (driver, mut t, irq, _image) = transport(8, 0);
    let all = offered(&t);
    let status = driver.negotiate(&mut t, all);
    // Described with its rings outside guest memory, but made ready only after
    // DRIVER_OK: the activation found no queue to check.
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    write_reg(
        &mut t,
        VIRTIO_MMIO_QUEUE_DESC_LOW,
        (RAM_SIZE + 0x1000) as u32,
    );
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, AVAIL_RING as u32);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, USED_RING as u32);
    write_reg(
        &mut t,
        VIRTIO_MMIO_STATUS,
        status | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    let events = t.take_events();
    assert!(
        events
            .iter()
            .any(|e| e.contains("queue 0 made ready after DRIVER_OK: refused")),
        "{events:?}"
    );
    driver.notify(&mut t);
    assert_eq!(t.device().stats().notifications, 0);
    assert!(irq.read().is_err(), "no interrupt");
    // A queue taken out of service after DRIVER_OK cannot come back either.
    driver.start(&mut t, all);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    // A ready queue told again that it is ready stays so, without a word.
    driver.start(&mut t, all);
    t.take_events();
    write_reg(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(read_reg(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
    assert!(t.take_events().is_empty());
}

#[test]
fn a_notification_before_driver_ok_serves_nothing() {
    let (driver, mut t, irq, _image) = transport(8, 0);
    let all = offered(&t);
    driver.negotiate(&mut t, all);
    driver.notify(&mut t);
    assert_eq!(t.device().stats().notifications, 0);
    assert!(irq.read().is_err(), "no interrupt");
}

#[test]
fn the_config_space_gives_capacity_and_limits_at_any_width() {
    // 9 sectors and a partial one, which does not count.
    let (_driver, mut t, _irq, _image) = transport(9, 100);
    let mut capacity = [0u8; 8];
    t.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 9);
    assert_eq!(read_reg(&mut t, 0x100), 9);
    assert_eq!(read_reg(&mut t, 0x104), 0);
    assert_eq!(read_reg(&mut t, 0x108), SIZE_MAX);
    assert_eq!(read_reg(&mut t, 0x10c), SEG_MAX);
    let mut byte = [0xffu8; 1];
    t.read(0x100, &mut byte);
    assert_eq!(byte, [9]);
    // Past the fields offered, and far past the window: zeros.
    assert_eq!(read_reg(&mut t, 0x110), 0);
    let mut far = [0xffu8; 4];
    t.read(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    // The fields are read-only.
    t.write(0x100, &[0xff; 8]);
    assert_eq!(read_reg(&mut t, 0x100), 9);
}

#[test]
fn odd_register_accesses_read_zero_and_change_nothing() {
    let (driver, mut t, _irq, _image) = transport(8, 0);
    let all = offered(&t);
    let status = driver.negotiate(&mut t, all);
    for (offset, len) in [(0u64, 2usize), (0, 8), (2, 4), (0x71, 1), (0xff, 1), (0, 0)] {
        let mut data = vec![0xffu8; len];
        t.read(offset, &mut data);
        assert!(data.iter().all(|&b| b == 0), "{offset:#x}/{len}: {data:?}");
    }
    // A 2-byte, a misaligned and an 8-byte write to Status: none is a reset.
    t.write(u64::from(VIRTIO_MMIO_STATUS), &[0, 0]);
    t.write(u64::from(VIRTIO_MMIO_STATUS) + 1, &[0, 0, 0, 0]);
    t.write(u64::from(VIRTIO_MMIO_STATUS), &[0; 8]);
    assert_eq!(t.status(), status);
    // A register that does not exist.
    write_reg(&mut t, 0x0f0, 0xdead_beef);
    assert_eq!(read_reg(&mut t, 0x0f0), 0);
}

#[test]
fn the_command_line_names_the_window_and_its_interrupt() {
    assert_eq!(
        cmdline_device(0xd000_0000, 5),
        "virtio_mmio.device=4K@0xd0000000:5"
    );
}
