// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The driver's side of virtio, simulated for the tests: the registers it writes, and
//! the descriptor table and available ring it fills in guest memory (plain anonymous
//! `GuestMemoryMmap`), laid out apart so no ring overlaps another at any queue size.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use super::{MmioTransport, VirtioDevice};

/// The guest memory the tests use.
pub type TestMemory = GuestMemoryAtomic<GuestMemoryMmap>;
/// A transport on the tests' memory.
pub type TestTransport<D> = MmioTransport<TestMemory, D>;

/// The guest's RAM: [0, 1 MiB).
pub const RAM_SIZE: u64 = 0x10_0000;
/// The descriptor table (up to 256 descriptors: 4 KiB).
pub const DESC_TABLE: u64 = 0x1000;
/// The available ring (driver area).
pub const AVAIL_RING: u64 = 0x2000;
/// The used ring (device area).
pub const USED_RING: u64 = 0x3000;
/// Where the tests put request buffers.
pub const BUFFERS: u64 = 0x1_0000;

/// One descriptor as the driver describes it: where, how long, and whether the device
/// writes it.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub device_writable: bool,
}

/// A device-readable buffer.
pub fn readable(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        device_writable: false,
    }
}

/// A device-writable buffer.
pub fn writable(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        device_writable: true,
    }
}

/// Reads the 32-bit register at `offset`.
pub fn read_reg<M: GuestAddressSpace, D: VirtioDevice>(
    transport: &mut MmioTransport<M, D>,
    offset: u32,
) -> u32 {
    let mut data = [0u8; 4];
    transport.read(offset.into(), &mut data);
    u32::from_le_bytes(data)
}

/// Writes the 32-bit register at `offset`.
pub fn write_reg<M: GuestAddressSpace, D: VirtioDevice>(
    transport: &mut MmioTransport<M, D>,
    offset: u32,
    value: u32,
) {
    transport.write(offset.into(), &value.to_le_bytes());
}

/// The simulated driver of one queue (queue 0), on guest memory `M`.
#[derive(Debug)]
pub struct TestDriver<M = TestMemory> {
    pub memory: M,
    pub size: u16,
    /// Where the available ring goes ([`AVAIL_RING`] unless a test moves it).
    pub avail_ring: u64,
    next_descriptor: u16,
    avail_idx: u16,
}

impl TestDriver {
    /// A driver of a queue of `size` entries, on fresh zeroed anonymous memory of
    /// [`RAM_SIZE`] bytes.
    pub fn new(size: u16) -> Self {
        let ram = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)])
            .expect("anonymous guest memory");
        TestDriver::on(GuestMemoryAtomic::new(ram), size)
    }
}

impl<M: GuestAddressSpace> TestDriver<M> {
    /// A driver of a queue of `size` entries on `memory`, which must hold the rings'
    /// addresses.
    pub fn on(memory: M, size: u16) -> Self {
        TestDriver {
            memory,
            size,
            avail_ring: AVAIL_RING,
            next_descriptor: 0,
            avail_idx: 0,
        }
    }

    /// Negotiates: acknowledges the device, accepts `features`, and returns the status
    /// read back after setting FEATURES_OK (without it, the device refused them).
    pub fn negotiate<D: VirtioDevice>(
        &self,
        transport: &mut MmioTransport<M, D>,
        features: u64,
    ) -> u32 {
        write_reg(transport, VIRTIO_MMIO_STATUS, 0);
        let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        write_reg(transport, VIRTIO_MMIO_STATUS, status);
        status |= VIRTIO_CONFIG_S_DRIVER;
        write_reg(transport, VIRTIO_MMIO_STATUS, status);
        for (select, half) in [(0, features as u32), (1, (features >> 32) as u32)] {
            write_reg(transport, VIRTIO_MMIO_DRIVER_FEATURES_SEL, select);
            write_reg(transport, VIRTIO_MMIO_DRIVER_FEATURES, half);
        }
        write_reg(
            transport,
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        read_reg(transport, VIRTIO_MMIO_STATUS)
    }

    /// Negotiates `features`, sets queue 0 up, and sets DRIVER_OK.
    pub fn start<D: VirtioDevice>(&self, transport: &mut MmioTransport<M, D>, features: u64) {
        let status = self.negotiate(transport, features);
        assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0, "features refused");
        write_reg(transport, VIRTIO_MMIO_QUEUE_SEL, 0);
        write_reg(transport, VIRTIO_MMIO_QUEUE_NUM, self.size.into());
        for (low, high, addr) in [
            (
                VIRTIO_MMIO_QUEUE_DESC_LOW,
                VIRTIO_MMIO_QUEUE_DESC_HIGH,
                DESC_TABLE,
            ),
            (
                VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
                self.avail_ring,
            ),
            (
                VIRTIO_MMIO_QUEUE_USED_LOW,
                VIRTIO_MMIO_QUEUE_USED_HIGH,
                USED_RING,
            ),
        ] {
            write_reg(transport, low, addr as u32);
            write_reg(transport, high, (addr >> 32) as u32);
        }
        write_reg(transport, VIRTIO_MMIO_QUEUE_READY, 1);
        write_reg(
            transport,
            VIRTIO_MMIO_STATUS,
            status | VIRTIO_CONFIG_S_DRIVER_OK,
        );
    }

    /// Writes a chain of `bufs` into the descriptor table and makes it available;
    /// returns its head's index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_descriptor;
        for (position, buf) in bufs.iter().enumerate() {
            let index = self.next_descriptor;
            self.next_descriptor = (index + 1) % self.size;
            let next = (position + 1 < bufs.len()).then_some(self.next_descriptor);
            self.write_descriptor(index, *buf, next);
        }
        self.make_available(head);
        head
    }

    /// Makes available a chain of one descriptor that refers to an indirect table at
    /// `table`, which holds `bufs` chained in order; returns its head.
    pub fn add_indirect_chain(&mut self, table: u64, bufs: &[Buf]) -> u16 {
        for (index, buf) in (0u16..).zip(bufs) {
            let next = (usize::from(index) + 1 < bufs.len()).then_some(index + 1);
            self.write_descriptor_in(table, index, *buf, next);
        }
        let head = self.next_descriptor;
        self.next_descriptor = (head + 1) % self.size;
        let len = 16 * bufs.len() as u32;
        let descriptor = Descriptor::new(table, len, VRING_DESC_F_INDIRECT as u16, 0);
        self.write_raw(DESC_TABLE, head, descriptor);
        self.make_available(head);
        head
    }

    /// Writes descriptor `index`: `buf`, followed by descriptor `next` if any.
    pub fn write_descriptor(&self, index: u16, buf: Buf, next: Option<u16>) {
        self.write_descriptor_in(DESC_TABLE, index, buf, next);
    }

    /// Writes descriptor `index` of the table at `table`.
    fn write_descriptor_in(&self, table: u64, index: u16, buf: Buf, next: Option<u16>) {
        let mut flags = 0;
        if buf.device_writable {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        let descriptor = Descriptor::new(buf.addr, buf.len, flags, next.unwrap_or(0));
        self.write_raw(table, index, descriptor);
    }

    fn write_raw(&self, table: u64, index: u16, descriptor: Descriptor) {
        let at = table + 16 * u64::from(index);
        self.memory
            .memory()
            .write_obj(RawDescriptor::from(descriptor), GuestAddress(at))
            .unwrap();
    }

    /// Puts `head` in the next slot of the available ring and publishes it.
    pub fn make_available(&mut self, head: u16) {
        let memory = self.memory.memory();
        let slot = self.avail_ring + 4 + 2 * u64::from(self.avail_idx % self.size);
        memory.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        memory
            .write_obj(self.avail_idx, GuestAddress(self.avail_ring + 2))
            .unwrap();
    }

    /// Sets the available ring's `used_event` (heeded with EVENT_IDX).
    pub fn set_used_event(&self, value: u16) {
        let at = self.avail_ring + 4 + 2 * u64::from(self.size);
        self.memory
            .memory()
            .write_obj(value, GuestAddress(at))
            .unwrap();
    }

    /// The used ring's `avail_event` (written by the device with EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        let at = USED_RING + 4 + 8 * u64::from(self.size);
        self.memory.memory().read_obj(GuestAddress(at)).unwrap()
    }

    /// The used ring's index: how many chains the device returned.
    pub fn used_idx(&self) -> u16 {
        self.memory
            .memory()
            .read_obj(GuestAddress(USED_RING + 2))
            .unwrap()
    }

    /// The `n`th used element: (descriptor index, used length).
    pub fn used(&self, n: u16) -> (u32, u32) {
        let at = USED_RING + 4 + 8 * u64::from(n % self.size);
        let memory = self.memory.memory();
        let id = memory.read_obj(GuestAddress(at)).unwrap();
        let len = memory.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    /// Notifies queue 0.
    pub fn notify<D: VirtioDevice>(&self, transport: &mut MmioTransport<M, D>) {
        write_reg(transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    }

    /// Writes `bytes` into guest memory at `addr`.
    pub fn fill(&self, addr: u64, bytes: &[u8]) {
        self.memory
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .unwrap();
    }

    /// Reads `len` bytes of guest memory at `addr`.
    pub fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.memory
            .memory()
            .read_slice(&mut bytes, GuestAddress(addr))
            .unwrap();
        bytes
    }
}
