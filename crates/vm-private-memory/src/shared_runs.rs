// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The shared pages of guest memory, run by run, with what device code needs to map
//! them: for a device's IOMMU (VFIO) or for another process (vhost-user).

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};

use crate::attributes::{PageAttributes, PageState};
use crate::guard::DirtyBitmap;
use crate::memory::GuestMemoryPrivate;
use crate::region::{GuestRegionPrivate, SharedSide};

/// What reading shared runs needs of a region, whatever its dirty bitmap: device code
/// (and its crates) sees one type of run for every kind of memory.
pub(crate) trait RunRegion: Sync {
    fn guest_range(&self) -> PageRange;
    fn host_start(&self) -> usize;
    fn shared_side(&self) -> Option<&SharedSide>;
    fn attributes(&self) -> &PageAttributes;
}

impl<B: Bitmap + Sync> RunRegion for GuestRegionPrivate<B> {
    fn guest_range(&self) -> PageRange {
        GuestRegionPrivate::guest_range(self)
    }

    fn host_start(&self) -> usize {
        self.host_range().0
    }

    fn shared_side(&self) -> Option<&SharedSide> {
        GuestRegionPrivate::shared_side(self)
    }

    fn attributes(&self) -> &PageAttributes {
        GuestRegionPrivate::attributes(self)
    }
}

/// A list of regions in address order, read for shared runs.
pub(crate) trait RegionList: Send + Sync {
    /// The region holding guest address `at`, or else the first one after it.
    fn region_from(&self, at: u64) -> Option<&dyn RunRegion>;
}

impl<B: DirtyBitmap> RegionList for GuestMemoryPrivate<B> {
    fn region_from(&self, at: u64) -> Option<&dyn RunRegion> {
        self.iter()
            .find(|r| r.guest_range().end() > at)
            .map(|r| r as &dyn RunRegion)
    }
}

/// Where the current list of regions is loaded from.
trait ListSource: Send + Sync {
    fn load(&self) -> Arc<dyn RegionList>;
}

impl<B: DirtyBitmap> ListSource for GuestMemoryAtomic<GuestMemoryPrivate<B>> {
    fn load(&self) -> Arc<dyn RegionList> {
        self.memory().into_inner()
    }
}

/// Runs of consecutive shared pages inside one region each, in address order (from
/// [`SharedPagesSnapshot::runs`]).
pub struct SharedRuns<'a> {
    memory: &'a dyn RegionList,
    range: PageRange,
    /// The next guest address to look at.
    at: u64,
}

impl std::fmt::Debug for SharedRuns<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRuns")
            .field("range", &self.range)
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

/// One run of consecutive shared pages inside one region.
#[derive(Clone, Copy)]
pub struct SharedRun<'a> {
    region: &'a dyn RunRegion,
    guest: PageRange,
}

impl std::fmt::Debug for SharedRun<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRun")
            .field("guest", &self.guest)
            .field("host_address", &self.host_address())
            .field("file", &self.file())
            .finish()
    }
}

/// A file another process may map to reach a run's pages: the dual strategy's sealed
/// memfd of shared pages. Its private pages hold nothing there (they are punched when
/// they go private), so the file never gives away a private page's content; a mapping
/// of it must still be given up when the run goes private (see [`SharedRun`]).
#[derive(Clone, Copy, Debug)]
pub struct SharedFile<'a> {
    /// The file.
    pub fd: BorrowedFd<'a>,
    /// Where the run's first page is in the file.
    pub offset: u64,
}

/// The runs of shared pages of `memory` inside `range`, in address order, one region at
/// a time: a run never spans two regions, and parts of `range` outside guest memory are
/// skipped. Nothing is allocated: a fragmented guest costs time per run, not memory.
/// Crate-internal: the public way in is the owner's [`SharedPages`].
pub(crate) fn shared_runs(memory: &dyn RegionList, range: PageRange) -> SharedRuns<'_> {
    SharedRuns {
        memory,
        range,
        at: range.start(),
    }
}

impl<'a> Iterator for SharedRuns<'a> {
    type Item = SharedRun<'a>;

    fn next(&mut self) -> Option<SharedRun<'a>> {
        let end = self.range.end();
        while self.at < end {
            // The region holding `at`, or else the first one after it.
            let region = self.memory.region_from(self.at)?;
            let inside = region.guest_range();
            let from = self.at.max(inside.start());
            let to = end.min(inside.end());
            if from >= to {
                // The next region starts past the range.
                self.at = end;
                return None;
            }
            let bits = region.attributes();
            let first = (from - inside.start()) / PAGE_SIZE;
            let count = (to - from) / PAGE_SIZE;
            let Some(start) = bits.find(first, count, PageState::Shared) else {
                self.at = to;
                continue;
            };
            let stop = bits
                .find(start, first + count - start, PageState::Private)
                .unwrap_or(first + count);
            self.at = inside.start() + stop * PAGE_SIZE;
            let guest = PageRange::from_pages(start, stop - start)
                .and_then(|r| r.checked_add(inside.start()))
                .ok()?;
            return Some(SharedRun { region, guest });
        }
        None
    }
}

impl<'a> SharedRun<'a> {
    /// The run's guest-physical range (the IOVA a device uses when the IOMMU maps guest
    /// memory one to one).
    pub fn guest_range(&self) -> PageRange {
        self.guest
    }

    /// The host address of the run's first byte in the region's mapping; the run's pages
    /// follow it for [`PageRange::len`] bytes. Dual strategy: the shared side's mapping.
    ///
    /// A raw pointer: using it needs `unsafe`, and the caller promises what the memory
    /// cannot check there: to touch the run only while it is shared (a listener hears
    /// `discard` before any of it turns private, and must stop then), and only within
    /// its bytes (in place, the neighbouring pages of the mapping may be private).
    pub fn host_address(&self) -> *mut u8 {
        let start = self.region.host_start();
        let offset = self.guest.start() - self.region.guest_range().start();
        (start + offset as usize) as *mut u8
    }

    /// Where another process may map the run: the dual strategy's shared side (a sealed
    /// memfd, or the VMM's own file given with
    /// [`crate::MemoryBuilder::region_at_with_shared`]) and the run's offset in it. The
    /// descriptor reaches the whole file. `None` in-place: that file is the guest_memfd, whose private
    /// pages another process must never map.
    pub fn file(&self) -> Option<SharedFile<'a>> {
        let shared = self.region.shared_side()?;
        let in_region = self.guest.start() - self.region.guest_range().start();
        Some(SharedFile {
            fd: shared.backing.as_fd(),
            offset: shared.offset + in_region,
        })
    }
}

/// The owner's grant to device code of the shared pages, their host addresses and, with
/// the dual strategy, the file another process may map
/// ([`crate::PrivateMemoryManager::shared_pages`]). It reads the memory's own list of regions,
/// which no holder of the vm-memory view can replace, and only the owner hands it out:
/// the vm-memory view alone reaches no file.
///
/// What it tells is a snapshot of the bits: a run may go private as soon as it was
/// read. Code that keeps what it learns here (a device's IOMMU mapping, a backend's
/// memory table, a mapping of the file) must hear of revocations as a
/// [`crate::MemoryListener`], subscribed with
/// [`crate::PrivateMemoryManager::subscribe_with_replay`], which offers what is shared now and
/// every change after it without a gap.
///
/// ```
/// use std::sync::Arc;
/// use guest_memfd::PageRange;
/// use vm_private_memory::{MemoryBuilder, PageState};
///
/// // Needs /dev/kvm: without it, the example says so and stops.
/// let Ok(kvm) = kvm_ioctls::Kvm::new() else {
///     println!("SKIPPED: this example needs /dev/kvm");
///     return;
/// };
/// let vm = Arc::new(kvm.create_vm().unwrap());
/// // And guest_memfd with MMAP | INIT_SHARED (Linux 6.18), for in-place memory.
/// if !guest_memfd::Capabilities::of_vm(&*vm).in_place_capable() {
///     println!("SKIPPED: this example needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
///     return;
/// }
/// let memory = MemoryBuilder::new(vm).region_at(0, 4 << 20).build().unwrap();
/// memory.convert(PageRange::new(0x10000, 0x3000).unwrap(), PageState::Shared).unwrap();
/// memory.convert(PageRange::new(0x20000, 0x1000).unwrap(), PageState::Shared).unwrap();
///
/// let snapshot = memory.shared_pages().snapshot();
/// let whole = PageRange::new(0, 4 << 20).unwrap();
/// let runs: Vec<_> = snapshot.runs(whole).map(|run| run.guest_range()).collect();
/// assert_eq!(
///     runs,
///     [PageRange::new(0x10000, 0x3000).unwrap(), PageRange::new(0x20000, 0x1000).unwrap()]
/// );
/// ```
///
/// The vm-memory view does not reach it:
///
/// ```compile_fail
/// # fn f(view: &vm_private_memory::GuestMemoryPrivate, range: guest_memfd::PageRange) {
/// let files = vm_private_memory::shared_runs(view, range); // crate-internal
/// # }
/// ```
#[derive(Clone)]
pub struct SharedPages {
    listed: Arc<dyn ListSource>,
}

impl std::fmt::Debug for SharedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPages").finish_non_exhaustive()
    }
}

impl SharedPages {
    pub(crate) fn new<B: DirtyBitmap>(listed: GuestMemoryAtomic<GuestMemoryPrivate<B>>) -> Self {
        SharedPages {
            listed: Arc::new(listed),
        }
    }

    /// The memory's regions as they are now (later changes of the region list are not
    /// seen; changes of the bits are).
    pub fn snapshot(&self) -> SharedPagesSnapshot {
        SharedPagesSnapshot {
            regions: self.listed.load(),
        }
    }
}

/// The memory's regions at one moment, to read shared runs from ([`SharedPages`]).
pub struct SharedPagesSnapshot {
    regions: Arc<dyn RegionList>,
}

impl std::fmt::Debug for SharedPagesSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPagesSnapshot")
            .finish_non_exhaustive()
    }
}

impl SharedPagesSnapshot {
    /// The runs of shared pages inside `range`, in address order, one region at a time:
    /// a run never spans two regions, and parts of `range` outside guest memory are
    /// skipped. Nothing is allocated: a fragmented guest costs time per run, not memory.
    pub fn runs(&self, range: PageRange) -> SharedRuns<'_> {
        shared_runs(&*self.regions, range)
    }
}
