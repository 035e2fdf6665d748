// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio-mmio transport ([`MmioTransport`]) and a virtio-blk device ([`BlockDevice`])
//! for the Linux guest, so it has a disk whose requests go through guest memory with
//! vm-memory's `Bytes` calls: on private memory, on the pages the guest shares.
//!
//! Both are written here by hand: rust-vmm's `virtio-device` and `virtio-blk` crates (the
//! transport state machine and the block request parser) are not published on
//! crates.io, and the VMMs that have their own (Firecracker, Cloud Hypervisor) do not
//! offer them as libraries. What is published is used: `virtio-queue` for the split
//! virtqueues (descriptor chains, used ring, event index) and `virtio-bindings` for the
//! specification's constants.
//!
//! The two are kept apart by the [`VirtioDevice`] trait: the transport owns the
//! registers, the feature negotiation, the queues' configuration and the interrupt; the
//! device serves a queue when the driver notifies it, and tells the transport whether to
//! interrupt and whether it can go on ([`QueueOutcome`]). Requests are served
//! synchronously, inside the MMIO write to `QueueNotify`, on the vCPU thread that made
//! it.
//!
//! The machine a VMM wires (one device; any base in the MMIO hole and any free GSI do):
//!
//! ```no_run
//! use integration::linux::virtio::{
//!     cmdline_device, BlockDevice, MmioTransport, MMIO_REGION_SIZE,
//! };
//! use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! const BASE: u64 = 0xd000_0000;
//! const GSI: u32 = 5;
//! # fn wire(vm: &kvm_ioctls::VmFd) -> Result<(), Box<dyn std::error::Error>> {
//! let memory = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::from_ranges(&[(
//!     GuestAddress(0),
//!     256 << 20,
//! )])?);
//! let disk = std::fs::OpenOptions::new().read(true).write(true).open("disk.img")?;
//! let irq = EventFd::new(libc::EFD_NONBLOCK)?;
//! vm.register_irqfd(&irq, GSI)?;
//! let mut blk = MmioTransport::new(BlockDevice::new(disk)?, memory, irq)?;
//! // On the kernel command line: virtio_mmio.device=4K@0xd0000000:5
//! let arg = cmdline_device(BASE, GSI);
//! // In the vCPU loop, for an exit at `addr` in [BASE, BASE + MMIO_REGION_SIZE):
//! # let (addr, mut data) = (BASE, [0u8; 4]);
//! blk.read(addr - BASE, &mut data); // VcpuExit::MmioRead
//! blk.write(addr - BASE, &data); // VcpuExit::MmioWrite (serves requests on QueueNotify)
//! for event in blk.take_events() {
//!     eprintln!("{event}");
//! }
//! println!("{:?}", blk.device().stats());
//! # Ok(()) }
//! ```

mod blk;
mod mmio;
#[cfg(test)]
mod test_driver;

use std::collections::VecDeque;

use virtio_queue::Queue;
use vm_memory::GuestMemory;

pub use blk::{
    BlkStats, BlockDevice, BLOCK_ID, MAX_REQUEST_BYTES, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
pub use mmio::{cmdline_device, MmioTransport, MMIO_REGION_SIZE, VENDOR_ID};

/// Why a virtio device or transport could not be made.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    /// A device asked for a queue of a size virtio does not allow.
    #[error("queue {index}: maximum size {size} is not a power of two in [1, 32768]")]
    QueueSize {
        /// The queue.
        index: usize,
        /// The size asked for.
        size: u16,
    },
    /// The disk image could not be inspected.
    #[error("the disk image: {0}")]
    Disk(#[source] std::io::Error),
}

/// What serving a queue asks of the transport.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueOutcome {
    /// Buffers were returned to the used ring and the driver wants to hear of it: raise
    /// the used-buffer interrupt.
    pub interrupt: bool,
    /// The device cannot go on with this queue (it has no truthful answer to give for a
    /// request, or the ring itself is unreachable): set `DEVICE_NEEDS_RESET` and serve
    /// nothing more until the driver resets the device.
    ///
    /// This is not a recovery path for a Linux guest. Linux never looks at
    /// `DEVICE_NEEDS_RESET`: the configuration interrupt that announces it reaches
    /// virtio-blk's `config_changed`, which only reads the capacity again, and virtio-blk
    /// has no timeout handler, so the requests the device did not return stay pending
    /// and the guest's disk hangs. The device stops anyway because every other choice
    /// is a lie (returning a request whose status it could not write lets the driver
    /// read a stale status byte, usually 0, `VIRTIO_BLK_S_OK`); the VMM learns why from
    /// the event log and the status register.
    pub needs_reset: bool,
}

/// A device behind a virtio transport: what it is, what it offers, and how it serves its
/// queues. The transport does everything else.
pub trait VirtioDevice {
    /// The virtio device ID (virtio 1.2 section 5): 2 for a block device.
    fn device_type(&self) -> u32;

    /// The feature bits the device offers, transport features (`VERSION_1`,
    /// `ACCESS_PLATFORM`, `RING_EVENT_IDX`) included.
    fn features(&self) -> u64;

    /// The largest size of each of the device's queues; how many queues it has is the
    /// slice's length.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads `data.len()` bytes of the device's configuration space from `offset`; bytes
    /// past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver's write to the configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set `DRIVER_OK` with the features it accepted: the device may serve.
    fn activate(&mut self, acked_features: u64);

    /// The driver reset the device: forget the negotiated state.
    fn reset(&mut self);

    /// The driver notified queue `index`: serve what it made available in `queue`,
    /// reaching the buffers through `memory`, noting what went wrong in `log`.
    fn process_queue<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        index: u16,
        queue: &mut Queue,
        log: &mut EventLog,
    ) -> QueueOutcome;
}

/// What went wrong in a device, for the VMM to print: each event one line, the most
/// recent [`EventLog::CAPACITY`] kept, so a guest that fails every request cannot make
/// the VMM's memory grow.
#[derive(Debug, Default)]
pub struct EventLog {
    events: VecDeque<String>,
    dropped: u64,
}

impl EventLog {
    /// How many events are kept until [`EventLog::take`]; older ones are dropped.
    pub const CAPACITY: usize = 256;

    /// Records one event, dropping the oldest if the log is full.
    pub fn push(&mut self, event: String) {
        if self.events.len() >= Self::CAPACITY {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(event);
    }

    /// The events recorded since the last call, oldest first.
    pub fn take(&mut self) -> Vec<String> {
        self.events.drain(..).collect()
    }

    /// How many events were dropped, in all, because the log was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_latest_events_and_counts_the_rest() {
        let mut log = EventLog::default();
        for i in 0..EventLog::CAPACITY + 3 {
            log.push(format!("event {i}"));
        }
        assert_eq!(log.dropped(), 3);
        let events = log.take();
        assert_eq!(events.len(), EventLog::CAPACITY);
        assert_eq!(events.first().map(String::as_str), Some("event 3"));
        assert!(log.take().is_empty());
    }
}
