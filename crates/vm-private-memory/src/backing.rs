// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the owner may learn of the files behind its regions.
//!
//! The files themselves stay inside the crate: a `GuestMemfd` handed to safe code could be
//! mapped whole (`GuestMemfd::map`), private pages included. The owner gets their
//! identity, sizes and the memory they hold, which is what accounting, live update and
//! tests need.

use std::os::unix::fs::MetadataExt;

use guest_memfd::PageRange;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::error::{Error, Result};
use crate::guard::DirtyBitmap;
use crate::memory::PrivateMemoryManager;

/// The files behind one region, as the owner sees them ([`PrivateMemoryManager::backing`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionBacking {
    /// The region's guest-physical range.
    pub guest: PageRange,
    /// The guest_memfd's inode number: regions backed by one file share it.
    pub gmem_inode: u64,
    /// The guest_memfd's size.
    pub gmem_size: u64,
    /// Where in the guest_memfd the region starts.
    pub gmem_offset: u64,
    /// Bytes of memory the shared side holds over the region's range (dual strategy:
    /// the data `SEEK_DATA` finds in its file there); `None` in-place, whose shared pages live in the guest_memfd.
    pub shared_bytes_held: Option<u64>,
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// The files behind the region that starts at `start`.
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchRegion`] if no region starts there; [`Error::Stat`] if `fstat` of
    /// one of its files fails.
    pub fn backing(&self, start: u64) -> Result<RegionBacking> {
        // The engine's list without the conversion lock: a listener may ask.
        let listed = self.listed();
        let region = listed
            .iter()
            .find(|r| r.guest_range().start() == start)
            .ok_or(Error::NoSuchRegion(GuestAddress(start)))?;
        let gmem = region.gmem().file().metadata().map_err(Error::Stat)?;
        let shared_bytes_held = match region.shared_side() {
            Some(shared) => {
                let whole = PageRange::new(0, region.guest_range().len())?;
                Some(shared.backing.allocated_bytes(shared.in_file(whole)?)?)
            }
            None => None,
        };
        Ok(RegionBacking {
            guest: region.guest_range(),
            gmem_inode: gmem.ino(),
            gmem_size: region.gmem().size(),
            gmem_offset: region.gmem_offset(),
            shared_bytes_held,
        })
    }
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// The NUMA node whose memory holds the page at `gpa`, as the kernel says; `None` if
    /// the page is not resident. It reads no content and tells what the host kernel
    /// knows of any page (see [`guest_memfd::node_of_page`]), so placement can be checked
    /// without a raw address. In place that includes private pages where the kernel lets
    /// the host map them (Linux 6.18 to 7.x do; this crate keeps its own accesses off
    /// them); a kernel that refuses answers `EFAULT`. With the dual strategy it is the
    /// shared side's page (a private page lives in a guest_memfd with no mapping).
    ///
    /// It holds the conversion lock while it asks, so that no conversion or discard
    /// frees the page between the kernel's two answers (which would allocate it again).
    ///
    /// # Errors
    ///
    /// [`Error::Reentrant`] from a listener callback; [`Error::OutsideGuestMemory`] if
    /// no region holds `gpa`; the file layer's [`Numa`](guest_memfd::Error::Numa) error
    /// (as [`Error::File`]) with the kernel's errno (`ENOSYS` on a kernel without NUMA).
    pub fn node_of(&self, gpa: u64) -> Result<Option<u32>> {
        if crate::listener::in_callback() {
            return Err(Error::Reentrant {
                range: crate::ByteRange { start: gpa, len: 1 },
            });
        }
        let engine = self.lock_engine();
        let listed = &engine.current;
        let region = listed
            .find_region(GuestAddress(gpa))
            .ok_or(Error::OutsideGuestMemory {
                range: crate::ByteRange { start: gpa, len: 1 },
                first_outside: gpa,
            })?;
        let page = (gpa - region.guest_range().start()) / guest_memfd::PAGE_SIZE;
        let (start, _) = region.host_range();
        let addr = start + (page * guest_memfd::PAGE_SIZE) as usize;
        Ok(guest_memfd::node_of_page(addr)?)
    }
}
