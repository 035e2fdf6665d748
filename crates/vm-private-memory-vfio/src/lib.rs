// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A VFIO device's IOMMU mapping kept equal to the shared pages of confidential guest
//! memory.
//!
//! A device assigned with VFIO reaches guest memory through whatever the VMM mapped in
//! its IOMMU, and rust-vmm's usual idiom (`get_host_address(0)` plus the region's length,
//! as vfio-ioctls' `vfio_map_guest_memory` does) maps every page, private ones included:
//! the device could then DMA into a guest's private page, and pinning would allocate the
//! shared side of every page. [`DmaMapper`] maps exactly the shared pages instead, and
//! follows conversions:
//!
//! - when attached ([`DmaMapper::attach`]) it maps what is shared now, through
//!   [`PrivateMemoryManager::subscribe_with_replay`], so no conversion slips in between;
//! - a conversion to shared maps the new pages after the bits change (`populate`); a
//!   mapping the kernel refuses, or one past the mapping budget, refuses the conversion,
//!   which is rolled back;
//! - a conversion to private unmaps the pages before the bits change (`discard`), so once
//!   `convert` returns no DMA reaches them; an unmap the kernel refuses stops the
//!   conversion (the page stays shared and mapped), and a page the IOMMU no longer maps
//!   (the VMM unmapped it, or the device left the container) is simply forgotten;
//! - dropping the [`DmaAttachment`] unmaps every page before it stops following
//!   conversions, so no page can turn private while mapped.
//!
//! The IOVA of a page is its guest-physical address. Each 4 KiB page is a mapping of its
//! own: the VFIO type1 IOMMU refuses to unmap part of a mapping, and a guest may convert
//! any single page back to private, so a mapping that spans pages could not be revoked
//! exactly without unmapping, for a moment, pages that stay shared. QEMU's VFIO listener
//! for discardable RAM maps at its minimum granularity for the same reason. Mappings are
//! a bounded resource (type1 allows 65,535 per container unless its `dma_entry_limit`
//! parameter says otherwise): [`DmaMapper::with_budget`] sets how many this mapper may
//! hold, and a conversion that would exceed it is refused whole.
//!
//! Both of vfio-ioctls' IOMMU back ends work, since both implement [`VfioOps`]: the VFIO
//! container ([`vfio_ioctls::VfioContainer`], type1v2) and iommufd
//! ([`vfio_ioctls::VfioIommufd`], VFIO cdev).
//!
//! # Example
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//! use guest_memfd::PageRange;
//! use vm_private_memory::{MemoryBuilder, PageState};
//! use vm_private_memory_vfio::DmaMapper;
//! use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
//!
//! // Needs /dev/kvm: without it, the example says so and stops.
//! let Ok(kvm) = kvm_ioctls::Kvm::new() else {
//!     println!("SKIPPED: this example needs /dev/kvm");
//!     return;
//! };
//! let vm = Arc::new(kvm.create_vm().unwrap());
//! let memory = MemoryBuilder::new(vm).region_at(0, 1 << 30).build().unwrap();
//!
//! // The device and its container, as a VMM opens them.
//! let container = Arc::new(VfioContainer::new(None).unwrap());
//! let iommu: Arc<dyn VfioOps> = container.clone();
//! let _device =
//!     VfioDevice::new(Path::new("/sys/bus/pci/devices/0000:00:03.0"), iommu.clone(), false)
//!         .unwrap();
//!
//! // Map what is shared now and follow every conversion from here on. Keep the
//! // attachment for as long as the device is assigned; dropping it unmaps everything.
//! let dma = DmaMapper::new(iommu)
//!     .attach(&memory, PageRange::new(0, 1 << 30).unwrap())
//!     .unwrap();
//!
//! // A bounce buffer the guest shares is mapped before `convert` returns ...
//! let window = PageRange::new(0x10_0000, 0x20_0000).unwrap();
//! memory.convert(window, PageState::Shared).unwrap();
//! assert!(dma.is_mapped(0x10_0000));
//! // ... and unmapped before the page turns private.
//! memory.convert(window, PageState::Private).unwrap();
//! assert!(!dma.is_mapped(0x10_0000));
//! dma.detach().unwrap();
//! ```
//!
//! [`PrivateMemoryManager::subscribe_with_replay`]: vm_private_memory::PrivateMemoryManager::subscribe_with_replay

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(clippy::missing_errors_doc, clippy::missing_panics_doc)]

#[cfg(not(target_pointer_width = "64"))]
compile_error!("vm-private-memory-vfio needs a 64-bit target: it casts guest addresses to usize");

mod mapper;
mod unmap;

pub use mapper::{DmaAttachment, DmaMapper, Error, DEFAULT_MAPPING_BUDGET};
pub use vfio_ioctls::VfioOps;
