// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest's disk: a virtio-blk device on virtio-mmio ([`super::virtio`]) at
//! [`DISK_MMIO_BASE`], interrupting on [`DISK_IRQ`], backed by an image file. Its
//! requests reach guest memory through the RAM's own `Bytes`: on private memory only the
//! pages the guest shared can be read or written.
//!
//! The device serves its queue on the vCPU's thread, inside the guest's notification,
//! and its interrupt is raised there too, with `KVM_IRQ_LINE`, before the vCPU runs
//! again. An irqfd would hand the injection to a kernel worker that runs once the vCPU's
//! thread yields: in the nested lab, a guest that then spins without exiting could keep
//! it from running.

use std::fs::File;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::virtio::{cmdline_device, BlkStats, BlockDevice, MmioTransport, MMIO_REGION_SIZE};
use super::{GuestRam, LinuxVm};
use crate::error::{Error, Result};

/// Where the disk's virtio-mmio registers are: in the MMIO hole below 4 GiB, clear of
/// the I/O APIC, the local APIC and KVM's TSS at its top.
pub const DISK_MMIO_BASE: u64 = 0xd000_0000;

/// The disk's interrupt line: free on the PC's PIC (COM1 takes 4).
pub const DISK_IRQ: u32 = 5;

/// The kernel command-line argument that tells the guest where the disk is:
/// `virtio_mmio.device=4K@0xd0000000:5` (the guest kernel needs
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`). Without it the guest never looks there.
pub fn disk_cmdline() -> String {
    cmdline_device(DISK_MMIO_BASE, DISK_IRQ)
}

/// The disk of a [`LinuxVm`] on RAM `M`: the device, and the eventfd it signals its
/// interrupt on, which the VMM turns into a pulse of [`DISK_IRQ`].
#[derive(Debug)]
pub(super) struct Disk<M: GuestRam> {
    transport: MmioTransport<<M as GuestRam>::AddressSpace, BlockDevice>,
    interrupt: EventFd,
}

impl<M: GuestRam> LinuxVm<M> {
    /// Gives the guest `image` as its disk, a virtio-blk device at [`DISK_MMIO_BASE`] on
    /// [`DISK_IRQ`]; the guest finds it if its command line has [`disk_cmdline`]. The
    /// device offers `VIRTIO_F_ACCESS_PLATFORM`: a confidential guest bounces its
    /// buffers through pages it shared.
    ///
    /// # Errors
    ///
    /// [`Error::DiskAttached`] for a second disk; [`Error::Disk`] if the image's size
    /// cannot be read; KVM's error if the interrupt line cannot be driven.
    pub fn attach_disk(&mut self, image: File) -> Result<()> {
        if self.disk.is_some() {
            return Err(Error::DiskAttached);
        }
        let device = BlockDevice::new(image).map_err(Error::Disk)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
        let interrupt = irq.try_clone().map_err(|e| Error::Io("eventfd", e))?;
        // The line must work before the guest needs it: lowering it now tells.
        pulse(&self.vm, 0)?;
        let transport =
            MmioTransport::new(device, self.memory.address_space(), irq).map_err(Error::Disk)?;
        self.disk = Some(Disk {
            transport,
            interrupt,
        });
        Ok(())
    }

    /// What the disk served so far, and how long its requests spent in `Bytes` calls on
    /// guest memory; `None` without a disk.
    pub fn disk_stats(&self) -> Option<BlkStats> {
        self.disk
            .as_ref()
            .map(|disk| disk.transport.device().stats())
    }

    /// What went wrong in the disk since the last call (requests refused, each with its
    /// guest range; `DEVICE_NEEDS_RESET`), oldest first.
    pub fn take_disk_events(&mut self) -> Vec<String> {
        self.disk
            .as_mut()
            .map_or_else(Vec::new, |disk| disk.transport.take_events())
    }

    /// The disk's virtio device status register (`VIRTIO_CONFIG_S_*`); `None` without a
    /// disk.
    pub fn disk_status(&self) -> Option<u32> {
        self.disk.as_ref().map(|disk| disk.transport.status())
    }
}

/// Serves an MMIO read at `addr` if it is `disk`'s; whether it was. (A function of the
/// disk alone: the exit being served holds the vCPU.)
pub(super) fn disk_read<M: GuestRam>(
    disk: &mut Option<Disk<M>>,
    addr: u64,
    data: &mut [u8],
) -> bool {
    match (disk, disk_offset(addr)) {
        (Some(disk), Some(offset)) => {
            disk.transport.read(offset, data);
            true
        }
        _ => false,
    }
}

/// Serves an MMIO write at `addr` if it is `disk`'s (a queue notification serves the
/// requests then and there), and raises the interrupt it asked for on `vm`; whether it
/// was the disk's.
///
/// # Errors
///
/// `KVM_IRQ_LINE`'s, if the interrupt cannot be raised.
pub(super) fn disk_write<M: GuestRam>(
    disk: &mut Option<Disk<M>>,
    vm: &VmFd,
    addr: u64,
    data: &[u8],
) -> Result<bool> {
    let (Some(disk), Some(offset)) = (disk, disk_offset(addr)) else {
        return Ok(false);
    };
    disk.transport.write(offset, data);
    // Nonblocking: an error is "nothing signalled".
    if let Ok(count) = disk.interrupt.read() {
        pulse(vm, count)?;
    }
    Ok(true)
}

/// Raises and lowers [`DISK_IRQ`] (an edge on the PIC) if `count` interrupts were
/// signalled; with 0, only lowers it.
fn pulse(vm: &VmFd, count: u64) -> Result<()> {
    if count > 0 {
        vm.set_irq_line(DISK_IRQ, true)
            .map_err(|e| Error::Kvm("KVM_IRQ_LINE", e))?;
    }
    vm.set_irq_line(DISK_IRQ, false)
        .map_err(|e| Error::Kvm("KVM_IRQ_LINE", e))
}

/// `addr`'s offset in the disk's register window, if it is in it.
fn disk_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(DISK_MMIO_BASE)
        .filter(|&offset| offset < MMIO_REGION_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_register_window_is_the_disks() {
        assert_eq!(disk_offset(DISK_MMIO_BASE), Some(0));
        assert_eq!(disk_offset(DISK_MMIO_BASE + 0x100), Some(0x100));
        assert_eq!(
            disk_offset(DISK_MMIO_BASE + MMIO_REGION_SIZE - 1),
            Some(0xfff)
        );
        assert_eq!(disk_offset(DISK_MMIO_BASE + MMIO_REGION_SIZE), None);
        assert_eq!(disk_offset(DISK_MMIO_BASE - 1), None);
        assert_eq!(disk_offset(0), None);
        assert_eq!(disk_offset(u64::MAX), None);
        assert_eq!(disk_cmdline(), "virtio_mmio.device=4K@0xd0000000:5");
    }
}
