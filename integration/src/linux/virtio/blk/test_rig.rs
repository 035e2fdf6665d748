// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A running block device with its simulated driver, for the device's tests: requests
//! built as a driver builds them, and what came back.

use std::os::unix::fs::FileExt;

use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

use super::{feature, BlkStats, BlockDevice, FEATURES, VIRTIO_RING_F_EVENT_IDX};
use crate::linux::virtio::test_driver::*;
use crate::linux::virtio::MmioTransport;

/// Where requests put their header and status; data goes from [`BUFFERS`] on.
pub(super) const HEADER: u64 = 0x8000;
pub(super) const STATUS: u64 = 0x8100;
/// What the tests write where the device should leave bytes alone.
pub(super) const UNTOUCHED: u8 = 0xa5;

/// The features a driver that wants every interrupt accepts.
pub(super) const WITHOUT_EVENT_IDX: u64 = FEATURES & !feature(VIRTIO_RING_F_EVENT_IDX);

/// Distinct bytes for an image or a buffer (`seed` tells buffers apart).
pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// A running device with its driver, its interrupt and its image.
pub(super) struct Rig<M: GuestAddressSpace = TestMemory> {
    pub driver: TestDriver<M>,
    pub transport: MmioTransport<M, BlockDevice>,
    pub irq: EventFd,
    pub image: TempFile,
}

impl Rig {
    /// A device on `image`, started with `features`, on anonymous memory, with a queue
    /// of `size` entries.
    pub fn new(image: &[u8], size: u16, features: u64) -> Self {
        Rig::on(TestDriver::new(size), image, features)
    }
}

/// An image file holding `bytes`.
pub(super) fn image_file(bytes: &[u8]) -> TempFile {
    let image = TempFile::new().unwrap();
    image.as_file().write_all_at(bytes, 0).unwrap();
    image
}

impl<M: GuestAddressSpace> Rig<M> {
    /// A device on `image_bytes`, started with `features` by `driver`, on its memory.
    pub fn on(driver: TestDriver<M>, image_bytes: &[u8], features: u64) -> Self {
        let image = image_file(image_bytes);
        let device = BlockDevice::new(image.as_file().try_clone().unwrap()).unwrap();
        Rig::serving(driver, image, device, features)
    }

    /// `device`, on `image`, started with `features` by `driver`, on its memory.
    pub fn serving(
        driver: TestDriver<M>,
        image: TempFile,
        device: BlockDevice,
        features: u64,
    ) -> Self {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut transport =
            MmioTransport::new(device, driver.memory.clone(), irq.try_clone().unwrap()).unwrap();
        driver.start(&mut transport, features);
        Rig {
            driver,
            transport,
            irq,
            image,
        }
    }

    /// Makes a request available: header at [`HEADER`], then `data`, then a status byte
    /// at [`STATUS`] (preset to [`UNTOUCHED`]); returns its head.
    pub fn submit(&mut self, request_type: u32, sector: u64, data: &[Buf]) -> u16 {
        self.driver.fill(HEADER, &rig_header(request_type, sector));
        self.driver.fill(STATUS, &[UNTOUCHED]);
        let mut chain = vec![readable(HEADER, 16)];
        chain.extend_from_slice(data);
        chain.push(writable(STATUS, 1));
        self.driver.add_chain(&chain)
    }

    /// Submits the chain `bufs` as is, notifies, and returns its used length.
    pub fn raw(&mut self, bufs: &[Buf]) -> u32 {
        let head = self.driver.add_chain(bufs);
        self.served(head)
    }

    /// Notifies and checks that the device returned `head` (and only it); its used length.
    pub fn served(&mut self, head: u16) -> u32 {
        let before = self.driver.used_idx();
        self.driver.notify(&mut self.transport);
        assert_eq!(
            self.driver.used_idx(),
            before.wrapping_add(1),
            "one chain returned"
        );
        let (id, len) = self.driver.used(before);
        assert_eq!(id, u32::from(head));
        len
    }

    /// One request, served: its status and used length.
    pub fn request(&mut self, request_type: u32, sector: u64, data: &[Buf]) -> (u32, u32) {
        let head = self.submit(request_type, sector, data);
        let len = self.served(head);
        (self.status_byte(), len)
    }

    pub fn status_byte(&self) -> u32 {
        self.driver.bytes(STATUS, 1)[0].into()
    }

    pub fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(self.image.as_path()).unwrap()
    }

    pub fn stats(&self) -> BlkStats {
        self.transport.device().stats()
    }

    /// The events logged since the last call, in one string.
    pub fn events(&mut self) -> String {
        self.transport.take_events().join("\n")
    }
}

/// A request header: type, reserved, sector.
pub(super) fn rig_header(request_type: u32, sector: u64) -> Vec<u8> {
    let mut header = request_type.to_le_bytes().to_vec();
    header.extend([0; 4]);
    header.extend(sector.to_le_bytes());
    header
}
