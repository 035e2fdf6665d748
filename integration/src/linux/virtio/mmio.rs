// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio-mmio transport, version 2 ("modern") only: virtio 1.2 section 4.2.
//!
//! The driver finds the device at an MMIO window ([`MMIO_REGION_SIZE`] bytes; on Linux
//! without a device tree, [`cmdline_device`] names it on the kernel command line),
//! negotiates features through 32-bit registers, describes each virtqueue's three parts
//! by guest-physical address, and notifies a queue by writing its index to
//! `QueueNotify`. The device answers through one interrupt line (an irqfd here), whose
//! cause `InterruptStatus` gives: bit 0 for used buffers, bit 1 for a configuration
//! change (which is also how `DEVICE_NEEDS_RESET` reaches the driver; a Linux driver
//! ignores it, see [`QueueOutcome::needs_reset`](super::QueueOutcome::needs_reset)).
//!
//! The driver sets its queues up before `DRIVER_OK` (virtio 1.2 section 3.1.1): their
//! registers are frozen from then on, and a queue made ready only after it is refused,
//! so every queue the device serves had its rings checked at activation.

use std::fmt;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::EventFd;

use super::{EventLog, VirtioDevice, VirtioError};

/// The size of a device's MMIO window: its registers and, from 0x100, its configuration
/// space.
pub const MMIO_REGION_SIZE: u64 = 0x1000;

/// `MagicValue`: "virt" in little-endian.
const MAGIC: u32 = 0x7472_6976;
/// `Version`: the modern register layout.
const VERSION: u32 = 2;
/// `VendorID` this transport reports: 0, no vendor, as Firecracker's virtio-mmio devices
/// report (QEMU's report "QEMU", 0x554d4551). The specification gives it no meaning a
/// driver depends on: Linux's virtio-mmio driver copies it into the device's ID, and
/// its drivers, virtio-blk included, match any vendor.
pub const VENDOR_ID: u32 = 0;
/// `QueueReset` (virtio 1.2), absent from virtio-bindings: reads 0, the feature that
/// gives it meaning (`VIRTIO_F_RING_RESET`) is never offered.
const QUEUE_RESET: u32 = 0xc0;

/// The kernel command-line argument that declares a virtio-mmio device at `base`
/// interrupting on `irq` to a Linux guest without a device tree or ACPI entry for it
/// (`CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`): `virtio_mmio.device=4K@0xd0000000:5`.
pub fn cmdline_device(base: u64, irq: u32) -> String {
    format!(
        "virtio_mmio.device={}K@{base:#x}:{irq}",
        MMIO_REGION_SIZE >> 10
    )
}

const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// A virtio device behind a virtio-mmio register window.
///
/// `M` is the guest's memory (`GuestMemoryAtomic<GuestMemoryPrivate>` for private memory,
/// `GuestMemoryAtomic<GuestMemoryMmap>` or `&GuestMemoryMmap` for the ordinary VM); one
/// snapshot of it (`M::memory()`) serves each notification.
pub struct MmioTransport<M: GuestAddressSpace, D: VirtioDevice> {
    device: D,
    memory: M,
    irq: EventFd,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    log: EventLog,
}

impl<M: GuestAddressSpace, D: VirtioDevice + fmt::Debug> fmt::Debug for MmioTransport<M, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The memory is left out: an address space need not be `Debug`.
        f.debug_struct("MmioTransport")
            .field("device", &self.device)
            .field("queues", &self.queues)
            .field("driver_features", &self.driver_features)
            .field("status", &self.status)
            .field("interrupt_status", &self.interrupt_status)
            .finish_non_exhaustive()
    }
}

impl<M: GuestAddressSpace, D: VirtioDevice> MmioTransport<M, D> {
    /// `device` behind a fresh register window, reaching guest memory through `memory`
    /// and interrupting through `irq` (an irqfd the VMM registered for the device's GSI).
    ///
    /// # Errors
    ///
    /// [`VirtioError::QueueSize`] if the device asks for a queue size virtio forbids.
    pub fn new(device: D, memory: M, irq: EventFd) -> Result<Self, VirtioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| VirtioError::QueueSize { index, size })
            })
            .collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            device,
            memory,
            irq,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            log: EventLog::default(),
        })
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, for the VMM's own calls (its statistics, say).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The device status register (`VIRTIO_CONFIG_S_*` bits).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted (meaningful once `FEATURES_OK` is set).
    pub fn acked_features(&self) -> u64 {
        self.driver_features
    }

    /// What went wrong since the last call (refused negotiations, failed requests,
    /// `DEVICE_NEEDS_RESET`), oldest first, for the VMM to print.
    pub fn take_events(&mut self) -> Vec<String> {
        self.log.take()
    }

    /// How many events were dropped because nobody took them in time.
    pub fn events_dropped(&self) -> u64 {
        self.log.dropped()
    }

    /// A guest read of `data.len()` bytes at `offset` in the window. Registers answer
    /// aligned 4-byte reads only; the configuration space any width. Anything else reads
    /// as zero.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let config_offset = offset - u64::from(VIRTIO_MMIO_CONFIG);
            return self.device.read_config(config_offset, data);
        }
        // Below 0x100, so the register offset fits a u32.
        let (Ok(register), Ok(bytes)) = (u32::try_from(offset), <&mut [u8; 4]>::try_from(data))
        else {
            return;
        };
        if register % 4 == 0 {
            *bytes = self.read_register(register).to_le_bytes();
        }
    }

    /// A guest write of `data` at `offset` in the window. Registers take aligned 4-byte
    /// writes only; anything else is ignored. A write to `QueueNotify` serves the queue
    /// before it returns.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            let config_offset = offset - u64::from(VIRTIO_MMIO_CONFIG);
            return self.device.write_config(config_offset, data);
        }
        let (Ok(register), Ok(bytes)) = (u32::try_from(offset), <[u8; 4]>::try_from(data)) else {
            return;
        };
        if register % 4 == 0 {
            self.write_register(register, u32::from_le_bytes(bytes));
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_select).ok()?)
    }

    fn read_register(&self, register: u32) -> u32 {
        let queue = self.selected_queue();
        let low = |address: u64| address as u32;
        let high = |address: u64| (address >> 32) as u32;
        match register {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => low(self.device.features()),
                1 => high(self.device.features()),
                _ => 0,
            },
            // 0 tells the driver the queue does not exist.
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size().into()),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| q.ready().into()),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            // Write-only in the specification; read back for the VMM's and tests' sake.
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.map_or(0, |q| low(q.desc_table())),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.map_or(0, |q| high(q.desc_table())),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.map_or(0, |q| low(q.avail_ring())),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.map_or(0, |q| high(q.avail_ring())),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.map_or(0, |q| low(q.used_ring())),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.map_or(0, |q| high(q.used_ring())),
            // No shared memory regions: a region that does not exist has length -1.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            // The devices' configuration never changes while the driver reads it.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            QUEUE_RESET => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, register: u32, value: u32) {
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt_status &= !value,
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(register, value),
            _ => {}
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are settled once FEATURES_OK is set (virtio 1.2 section 3.1.1).
        if self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            return;
        }
        let value = u64::from(value);
        self.driver_features = match self.driver_features_select {
            0 => (self.driver_features & !0xffff_ffff) | value,
            1 => (self.driver_features & 0xffff_ffff) | (value << 32),
            _ => self.driver_features,
        };
    }

    fn write_queue_register(&mut self, register: u32, value: u32) {
        // The driver configures a queue before it is ready, and only then.
        let index = self.queue_select;
        let select = usize::try_from(index).ok();
        let Some(queue) = select.and_then(|index| self.queues.get_mut(index)) else {
            return;
        };
        if register == VIRTIO_MMIO_QUEUE_READY {
            let ready = value == 1;
            // Its rings were checked at DRIVER_OK, or never will be: a queue made ready
            // later would be served unchecked. Only VIRTIO_F_RING_RESET, never offered,
            // lets a driver enable a queue after DRIVER_OK (virtio 1.2 section 2.6.1).
            // Taking a queue out of service (0) is always allowed.
            if ready && !queue.ready() && self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
                return self.log.push(format!(
                    "virtio-mmio: queue {index} made ready after DRIVER_OK: refused, queues are set up before it"
                ));
            }
            return queue.set_ready(ready);
        }
        if queue.ready() || self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            return;
        }
        match register {
            // Refused (the size kept) unless a power of two up to the maximum.
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Ok(size) = u16::try_from(value) {
                    queue.set_size(size);
                }
            }
            // Misaligned addresses are refused and the old ones kept.
            VIRTIO_MMIO_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => queue.set_avail_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => queue.set_avail_ring_address(None, Some(value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => queue.set_used_ring_address(Some(value), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// Why the driver's features cannot be accepted, if they cannot.
    fn refuse_features(&self) -> Option<String> {
        let offered = self.device.features();
        let accepted = self.driver_features;
        if accepted & !offered != 0 {
            Some(format!(
                "features {:#x} were never offered",
                accepted & !offered
            ))
        } else if accepted & feature(VIRTIO_F_VERSION_1) == 0 {
            Some("VIRTIO_F_VERSION_1 not accepted: this transport is modern only".into())
        } else if offered & feature(VIRTIO_F_ACCESS_PLATFORM) != 0
            && accepted & feature(VIRTIO_F_ACCESS_PLATFORM) == 0
        {
            // Virtio 1.2 section 6.1 lets a device that offers ACCESS_PLATFORM fail
            // without it. A driver that declines it passes the device buffers wherever
            // they lie, bypassing the DMA API and its bounce buffers; with private
            // memory those buffers are private and every request would fail. Refused
            // here, the driver learns at probe time instead.
            Some("VIRTIO_F_ACCESS_PLATFORM not accepted: the device reaches only the memory the guest shares through its DMA API".into())
        } else {
            None
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            return self.reset();
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET is the device's to set; the driver only echoes it back.
        let mut new = (value & !VIRTIO_CONFIG_S_NEEDS_RESET) | (old & VIRTIO_CONFIG_S_NEEDS_RESET);
        // The driver sets the bits one at a time and clears them only by a reset.
        if new & old != old {
            return self.log.push(format!(
                "virtio-mmio: status {value:#x} clears bits of {old:#x} without a reset: ignored"
            ));
        }
        let newly = new & !old;
        if newly & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            if let Some(why) = self.refuse_features() {
                // Left clear: the driver reads the status back and gives up.
                new &= !VIRTIO_CONFIG_S_FEATURES_OK;
                self.log
                    .push(format!("virtio-mmio: FEATURES_OK refused: {why}"));
            }
        }
        if newly & VIRTIO_CONFIG_S_DRIVER_OK != 0 && new & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            new &= !VIRTIO_CONFIG_S_DRIVER_OK;
            self.log
                .push("virtio-mmio: DRIVER_OK before FEATURES_OK: ignored".into());
        }
        self.status = new;
        if newly & new & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let memory = self.memory.memory();
        let mut broken = None;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            queue.set_event_idx(event_idx);
            // A queue the driver did not make ready stays unused; one it did must lie in
            // guest memory.
            if queue.ready() && !queue.is_valid(&*memory) {
                broken = Some(index);
            }
        }
        self.device.activate(self.driver_features);
        if let Some(index) = broken {
            self.needs_reset(format!(
                "queue {index}'s rings are not in guest memory (descriptors {:#x}, driver {:#x}, device {:#x})",
                self.queues.get(index).map_or(0, |q| q.desc_table()),
                self.queues.get(index).map_or(0, |q| q.avail_ring()),
                self.queues.get(index).map_or(0, |q| q.used_ring()),
            ));
        }
    }

    fn notify(&mut self, value: u32) {
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue's index.
        let serving = VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & serving != VIRTIO_CONFIG_S_DRIVER_OK {
            return;
        }
        let (Ok(index), Ok(slot)) = (u16::try_from(value), usize::try_from(value)) else {
            return;
        };
        let Some(queue) = self.queues.get_mut(slot) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let memory = self.memory.memory();
        let outcome = self
            .device
            .process_queue(&*memory, index, queue, &mut self.log);
        if outcome.interrupt {
            self.interrupt(VIRTIO_MMIO_INT_VRING);
        }
        if outcome.needs_reset {
            self.needs_reset(format!("queue {index} stopped"));
        }
    }

    /// Sets `DEVICE_NEEDS_RESET` and, the driver running, tells it with a configuration
    /// change interrupt (virtio 1.2 section 2.1.2); no queue is served until a reset.
    ///
    /// What the specification offers, not a way out for a Linux guest: Linux ignores the
    /// bit and has no timeout that would reset the device, so its disk hangs (see
    /// [`QueueOutcome::needs_reset`](super::QueueOutcome::needs_reset)). It is set when
    /// the device has no truthful answer to give.
    fn needs_reset(&mut self, why: String) {
        self.log
            .push(format!("virtio-mmio: DEVICE_NEEDS_RESET: {why}"));
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.interrupt(VIRTIO_MMIO_INT_CONFIG);
        }
    }

    fn interrupt(&mut self, cause: u32) {
        self.interrupt_status |= cause;
        if let Err(e) = self.irq.write(1) {
            // Only an overflowing counter fails; the guest's next notification or the
            // driver's polling recovers, so note it and go on.
            self.log
                .push(format!("virtio-mmio: raising the interrupt failed: {e}"));
        }
    }

    fn reset(&mut self) {
        for queue in &mut self.queues {
            queue.reset();
        }
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.device.reset();
    }
}

#[cfg(test)]
mod tests;
