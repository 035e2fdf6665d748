// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Binding a guest_memfd to guest-physical memory: `KVM_SET_USER_MEMORY_REGION2`.

use std::os::fd::AsRawFd;

use kvm_bindings::{kvm_userspace_memory_region2, KVM_CAP_NR_MEMSLOTS, KVM_MEM_GUEST_MEMFD};
use vm_memory::mmap::MmapRegion;

use crate::error::{Error, Result};
use crate::memfd::GuestMemfd;
use crate::range::{is_page_aligned, PageRange};
use crate::vm_ops::VmMemoryOps;

/// A checked memslot backed by a guest_memfd, ready to bind.
///
/// It describes `guest_range` of guest-physical memory, served by the guest_memfd at
/// `gmem_offset`, and (for shared accesses and for emulated guest code) by the host
/// memory at `userspace_addr`. Construction rejects what the kernel would reject: an
/// unaligned offset or address, and a slot that runs past the end of the file.
///
/// ```no_run
/// use guest_memfd::{GuestMemfd, GuestMemfdFlags, Memslot, PageRange};
///
/// // Needs /dev/kvm: without it, the example says so and stops.
/// let Ok(kvm) = kvm_ioctls::Kvm::new() else {
///     println!("SKIPPED: this example needs /dev/kvm");
///     return;
/// };
/// let vm = kvm.create_vm().unwrap();
/// let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
/// let gmem = GuestMemfd::create(&vm, 2 << 20, flags).unwrap();
/// let mapping = gmem.map().unwrap();
/// let slot = Memslot::new(1, PageRange::new(4 << 30, 2 << 20).unwrap(), &gmem, 0)
///     .unwrap()
///     .with_userspace_mapping(&mapping)
///     .unwrap();
/// // SAFETY: `mapping` stays mapped until the slot is unbound below.
/// unsafe { slot.bind(&vm) }.unwrap();
/// slot.unbind(&vm).unwrap();
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Memslot<'a> {
    slot: u32,
    guest_range: PageRange,
    gmem: &'a GuestMemfd,
    /// The range of `gmem` the slot uses, checked to lie inside it.
    gmem_range: PageRange,
    userspace_addr: u64,
}

impl<'a> Memslot<'a> {
    /// Describes slot `slot`: `guest_range` backed by `gmem` from `gmem_offset` on.
    ///
    /// # Errors
    ///
    /// [`Error::UnalignedRange`] for an unaligned offset, [`Error::RangeOverflow`] if
    /// the file range would end past `u64::MAX`, and [`Error::OutOfBounds`] if the slot
    /// would run past the end of the file.
    pub fn new(
        slot: u32,
        guest_range: PageRange,
        gmem: &'a GuestMemfd,
        gmem_offset: u64,
    ) -> Result<Self> {
        let file_range = PageRange::new(gmem_offset, guest_range.len())?;
        gmem.check_range(file_range)?;
        Ok(Memslot {
            slot,
            guest_range,
            gmem,
            gmem_range: file_range,
            userspace_addr: 0,
        })
    }

    /// Sets the host address that backs shared accesses (and KVM's emulator) to
    /// `mapping`, which must be at least as large as the slot.
    ///
    /// # Errors
    ///
    /// [`Error::MappingTooSmall`] if `mapping` is smaller than the slot;
    /// [`Error::UnalignedUserspaceAddress`] if it does not start on a page boundary.
    pub fn with_userspace_mapping(self, mapping: &MmapRegion) -> Result<Self> {
        let mapping_len = mapping.size() as u64;
        if mapping_len < self.guest_range.len() {
            return Err(Error::MappingTooSmall {
                slot: self.slot,
                mapping_len,
                slot_len: self.guest_range.len(),
            });
        }
        self.with_userspace_addr(mapping.as_ptr() as u64)
    }

    /// Sets the host address that backs shared accesses; it must be page-aligned. Zero
    /// (the default) means none.
    ///
    /// # Errors
    ///
    /// [`Error::UnalignedUserspaceAddress`] if `addr` is not a multiple of
    /// [`crate::PAGE_SIZE`].
    pub fn with_userspace_addr(mut self, addr: u64) -> Result<Self> {
        if !is_page_aligned(addr) {
            return Err(Error::UnalignedUserspaceAddress {
                slot: self.slot,
                addr,
            });
        }
        self.userspace_addr = addr;
        Ok(self)
    }

    /// The slot number (address space in the upper 16 bits, as KVM defines it).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The guest-physical range the slot covers.
    pub fn guest_range(&self) -> PageRange {
        self.guest_range
    }

    /// The range of the guest_memfd the slot uses.
    pub fn gmem_range(&self) -> PageRange {
        self.gmem_range
    }

    /// The host address that backs shared accesses, or zero.
    pub fn userspace_addr(&self) -> u64 {
        self.userspace_addr
    }

    /// The `kvm_userspace_memory_region2` this slot binds with.
    pub fn region(&self) -> kvm_userspace_memory_region2 {
        kvm_userspace_memory_region2 {
            slot: self.slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: self.guest_range.start(),
            memory_size: self.guest_range.len(),
            userspace_addr: self.userspace_addr,
            guest_memfd_offset: self.gmem_range.start(),
            guest_memfd: self.gmem.as_raw_fd() as u32,
            ..Default::default()
        }
    }

    /// Creates the slot in `vm` (a kvm-ioctls `VmFd`, or any other [`VmMemoryOps`]).
    ///
    /// # Errors
    ///
    /// [`Error::SlotOutOfRange`] if the slot number is at or above the VM's
    /// `KVM_CAP_NR_MEMSLOTS`; [`Error::SetMemoryRegion`] with the kernel's errno if
    /// `KVM_SET_USER_MEMORY_REGION2` fails (an overlapping slot, a foreign guest_memfd; a
    /// file range another slot is bound to answers `EINVAL` up to Linux 6.18, `EEXIST` on
    /// 7.3).
    ///
    /// # Safety
    ///
    /// If a userspace address was set, the host memory there must stay mapped, and must
    /// not be used for anything but this guest's memory, until the slot is unbound (or
    /// the VM is closed): the guest and KVM read and write it.
    pub unsafe fn bind(&self, vm: &(impl VmMemoryOps + ?Sized)) -> Result<()> {
        self.check_slot_limit(vm)?;
        // SAFETY: the caller guarantees the userspace memory outlives the binding; the
        // guest_memfd is borrowed for the call, so its fd number is valid.
        unsafe { vm.set_user_memory_region2(self.region()) }.map_err(|source| {
            Error::SetMemoryRegion {
                slot: self.slot,
                action: "bind",
                guest_range: self.guest_range,
                source,
            }
        })
    }

    /// Deletes the slot from `vm`. KVM first invalidates every guest mapping through it; a
    /// later guest access to the range exits to userspace as MMIO.
    ///
    /// # Errors
    ///
    /// [`Error::SetMemoryRegion`] with the kernel's errno if the deletion fails.
    pub fn unbind(&self, vm: &(impl VmMemoryOps + ?Sized)) -> Result<()> {
        let region = kvm_userspace_memory_region2 {
            memory_size: 0,
            ..self.region()
        };
        // SAFETY: deleting a slot makes KVM stop using its userspace memory; it never
        // starts to access new host memory.
        unsafe { vm.set_user_memory_region2(region) }.map_err(|source| Error::SetMemoryRegion {
            slot: self.slot,
            action: "unbind",
            guest_range: self.guest_range,
            source,
        })
    }

    fn check_slot_limit(&self, vm: &(impl VmMemoryOps + ?Sized)) -> Result<()> {
        let limit = u32::try_from(vm.check_extension_raw(KVM_CAP_NR_MEMSLOTS)).unwrap_or(0);
        let id = self.slot & 0xffff;
        if limit > 0 && id >= limit {
            return Err(Error::SlotOutOfRange {
                slot: self.slot,
                limit,
            });
        }
        Ok(())
    }
}
