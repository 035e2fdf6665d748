// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memslots the VMM binds itself ([`crate::MemoryBuilder::vmm_binds_memslots`]): the
//! exact `KVM_SET_USER_MEMORY_REGION2` descriptions, and the explicit release that
//! keeps memory sound.
//!
//! Cloud Hypervisor and Firecracker number and bind their own slots (shared with VFIO
//! and device BARs). The rule that keeps memory sound: a region's host mapping must
//! outlive its slot, since KVM reads and writes guest memory through a slot's
//! `userspace_addr`. So this
//! memory never frees a mapping the VMM may still have bound: until the VMM says it has
//! deleted every slot (an `unsafe` call, because only it can know), dropping the memory
//! leaks the mappings instead.

use std::sync::atomic::Ordering;

use kvm_bindings::kvm_userspace_memory_region2;
use vm_memory::GuestMemoryBackend;

use crate::error::Result;
use crate::guard::DirtyBitmap;
use crate::memory::PrivateMemoryManager;

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// The memslot of each region, as `KVM_SET_USER_MEMORY_REGION2` takes it, in guest
    /// address order: the slot number (from [`crate::MemoryBuilder::slots`]'s range), the
    /// guest range, the region's host mapping as `userspace_addr` (which KVM requires to
    /// be the guest_memfd's own mapping in place), `KVM_MEM_GUEST_MEMFD`, the
    /// guest_memfd's descriptor and offset. With
    /// [`crate::MemoryBuilder::vmm_binds_memslots`] the VMM binds these itself: as they
    /// are, except the slot number, which the VMM may replace with one of its own
    /// numbering (this memory never binds or unbinds them); a changed address, size,
    /// mapping or file breaks what this memory enforces.
    ///
    /// The descriptions are raw: `userspace_addr` is the host address of every page of
    /// the region, private ones included, and `guest_memfd` the file's descriptor
    /// number. They are for `KVM_SET_USER_MEMORY_REGION2` only; reading through the
    /// address or taking the descriptor (both need `unsafe`) bypasses every check this
    /// memory makes, and the caller promises not to. A memory that binds its own
    /// memslots has nothing for the VMM to bind, and hands none out.
    ///
    /// # Errors
    ///
    /// [`crate::Error::MemoryBindsMemslots`] if the memory binds its own memslots; the
    /// file layer's error if a region's description cannot be made (a region whose host
    /// mapping does not cover its file range; the builder makes none such).
    pub fn memslots(&self) -> Result<Vec<kvm_userspace_memory_region2>> {
        if !self.vmm_binds {
            return Err(crate::Error::MemoryBindsMemslots);
        }
        // The engine's list without the conversion lock: a listener may ask (a region
        // being added is listed before its shared pages are offered).
        self.listed()
            .iter()
            .map(|region| Ok(region.memslot()?.region()))
            .collect()
    }

    /// Whether the VMM binds this memory's memslots
    /// ([`crate::MemoryBuilder::vmm_binds_memslots`]).
    pub fn vmm_binds_memslots(&self) -> bool {
        self.vmm_binds
    }

    /// Says that the VMM has deleted every memslot [`PrivateMemoryManager::memslots`]
    /// described (`KVM_SET_USER_MEMORY_REGION2` with `memory_size` 0), so that dropping
    /// this memory may free the regions' mappings. (The VM cannot be gone while this
    /// memory lives: the memory holds it.) A region added afterwards needs a release of
    /// its own: [`PrivateMemoryManager::add_region`] takes this one back. Without this call a
    /// memory whose memslots the VMM binds leaks its mappings when dropped. It does
    /// nothing for a memory that binds its own memslots.
    ///
    /// # Safety
    ///
    /// No memslot described by [`PrivateMemoryManager::memslots`] may still be bound in
    /// the VM, nor be bound again: KVM would read and write guest memory through a
    /// mapping this memory frees when dropped, and whatever is mapped there next would
    /// become guest memory.
    pub unsafe fn release_memslots(&self) {
        if self.vmm_binds {
            self.memslots_released.store(true, Ordering::Release);
        }
    }
}
