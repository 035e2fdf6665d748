// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The listener that keeps an IOMMU's mapping equal to the shared pages.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use guest_memfd::{PageRange, PAGE_SIZE};
use vfio_ioctls::{VfioError, VfioOps};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vm_private_memory::{
    shared_runs, GuestMemoryPrivate, MemoryListener, PrivateMemory, Subscription,
};

/// How many mappings a [`DmaMapper`] may hold unless told otherwise: VFIO type1's
/// default `dma_entry_limit`.
pub const DEFAULT_MAPPING_BUDGET: usize = 65_535;

/// Why a [`DmaMapper`] refused to map a range (the conversion that offered it is rolled
/// back, and carries this as its [`vm_private_memory::ListenerRefusal`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Mapping the range would take more mappings than the budget allows.
    #[error(
        "mapping [{:#x}, {:#x}) for DMA needs {needed} more IOMMU mappings, but {held} of a budget of {budget} are held: share less, or raise the budget (DmaMapper::with_budget) and the IOMMU's own limit (type1: dma_entry_limit)",
        range.start(), range.end()
    )]
    OverBudget {
        /// The range offered.
        range: PageRange,
        /// Mappings it needs.
        needed: usize,
        /// Mappings held before it.
        held: usize,
        /// The budget.
        budget: usize,
    },
    /// A page of the range is not in guest memory as this mapper sees it (its view of
    /// the memory is not the one the memory publishes).
    #[error("guest page {gpa:#x} offered for DMA is not shared guest memory in this mapper's view: attach the mapper to the memory whose view it was given")]
    NotInView {
        /// The page's guest-physical address.
        gpa: u64,
    },
    /// The IOMMU refused a mapping.
    #[error("mapping guest page {iova:#x} for DMA failed: {source}")]
    Map {
        /// The page's IOVA (its guest-physical address).
        iova: u64,
        /// vfio-ioctls' error, with the kernel's errno.
        #[source]
        source: VfioError,
    },
}

/// A [`MemoryListener`] that keeps a VFIO IOMMU's mapping of guest memory equal to its
/// shared pages, one 4 KiB mapping per page, IOVA = guest-physical address (see the
/// crate documentation).
pub struct DmaMapper {
    iommu: Arc<dyn VfioOps>,
    memory: GuestMemoryAtomic<GuestMemoryPrivate>,
    budget: usize,
    /// The IOVAs of the pages mapped now.
    mapped: Mutex<BTreeSet<u64>>,
}

impl std::fmt::Debug for DmaMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMapper")
            .field("budget", &self.budget)
            .field("mapped_pages", &self.mapped_pages())
            .finish_non_exhaustive()
    }
}

impl DmaMapper {
    /// A mapper that maps into `iommu` (a `VfioContainer` or `VfioIommufd` the device is
    /// attached to) the shared pages of `memory`, the view of the memory it will be
    /// attached to ([`PrivateMemory::memory`]). It maps nothing until attached.
    pub fn new(iommu: Arc<dyn VfioOps>, memory: GuestMemoryAtomic<GuestMemoryPrivate>) -> Self {
        DmaMapper {
            iommu,
            memory,
            budget: DEFAULT_MAPPING_BUDGET,
            mapped: Mutex::new(BTreeSet::new()),
        }
    }

    /// Allows at most `budget` mappings (pages) at once; [`DEFAULT_MAPPING_BUDGET`] by
    /// default. Set it to what the IOMMU allows this device's container minus what
    /// the VMM maps there itself.
    pub fn with_budget(mut self, budget: usize) -> Self {
        self.budget = budget;
        self
    }

    /// Maps every page of `range` that is shared now and subscribes to `memory`, so that
    /// every later conversion in `range` is followed, with nothing missed in between.
    /// Keep the returned subscription for as long as the device may DMA; dropping it
    /// stops following conversions (drop the mapper too, which unmaps what it holds).
    ///
    /// # Errors
    ///
    /// [`vm_private_memory::Error::ListenerRefused`] if the pages shared now cannot all
    /// be mapped (over budget, or the IOMMU refused): nothing stays mapped and nothing
    /// is subscribed. [`vm_private_memory::Error::Reentrant`] from a listener callback.
    pub fn attach(
        self: &Arc<Self>,
        memory: &PrivateMemory,
        range: PageRange,
    ) -> vm_private_memory::Result<Subscription> {
        let listener: Arc<dyn MemoryListener> = Arc::clone(self) as Arc<dyn MemoryListener>;
        memory.subscribe_with_replay(range, listener)
    }

    /// How many pages are mapped now.
    pub fn mapped_pages(&self) -> usize {
        self.lock().len()
    }

    /// Whether the page holding `gpa` is mapped now.
    pub fn is_mapped(&self, gpa: u64) -> bool {
        self.lock().contains(&(gpa & !(PAGE_SIZE - 1)))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<u64>> {
        // Every change of the set is whole (insert or remove after the ioctl), so a
        // panic elsewhere leaves it consistent.
        self.mapped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Maps the shared pages of `range` not mapped yet, all or none.
    fn map_range(&self, range: PageRange) -> Result<(), Error> {
        let mut mapped = self.lock();
        let view = self.memory.memory();
        // What to map, checked whole before the first ioctl: (IOVA, host address).
        let mut wanted = Vec::new();
        // Runs come in address order; the first page they skip is not shared guest memory.
        let mut next = range.start();
        for run in shared_runs(&view, range) {
            let guest = run.guest_range();
            if guest.start() != next {
                break;
            }
            let host = run.host_address();
            for page in 0..guest.page_count() {
                let iova = guest.start() + page * PAGE_SIZE;
                if !mapped.contains(&iova) {
                    wanted.push((iova, host.wrapping_add((page * PAGE_SIZE) as usize)));
                }
            }
            next = guest.end();
        }
        if next != range.end() {
            return Err(Error::NotInView { gpa: next });
        }
        if mapped.len() + wanted.len() > self.budget {
            return Err(Error::OverBudget {
                range,
                needed: wanted.len(),
                held: mapped.len(),
                budget: self.budget,
            });
        }
        for (i, &(iova, host)) in wanted.iter().enumerate() {
            // SAFETY: `host` is the page's address in its region's mapping, which stays
            // mapped while the region is in guest memory; the page is shared now and is
            // unmapped here (`discard`) before it turns private or its region leaves
            // (both notify listeners first). This crate and vm-private-memory touch guest
            // memory only through volatile accesses, never through Rust references, as
            // the DMA contract asks.
            let result = unsafe { self.iommu.vfio_dma_map(iova, PAGE_SIZE as usize, host) };
            if let Err(source) = result {
                // All or none: take back what this call mapped.
                for &(done, _) in wanted[..i].iter().rev() {
                    if self.iommu.vfio_dma_unmap(done, PAGE_SIZE as usize).is_ok() {
                        mapped.remove(&done);
                    }
                }
                return Err(Error::Map { iova, source });
            }
            mapped.insert(iova);
        }
        Ok(())
    }
}

impl MemoryListener for DmaMapper {
    /// Unmaps every mapped page of `range`. If the IOMMU refuses an unmap, this panics
    /// (after unmapping what it could): vm-private-memory takes a panic in `discard` as
    /// "cannot let go" and stops the conversion, so the page stays shared while it is
    /// still mapped.
    fn discard(&self, range: PageRange) {
        let mut mapped = self.lock();
        let inside: Vec<u64> = mapped.range(range.start()..range.end()).copied().collect();
        let mut refused = None;
        for iova in inside {
            match self.iommu.vfio_dma_unmap(iova, PAGE_SIZE as usize) {
                Ok(()) => {
                    mapped.remove(&iova);
                }
                Err(e) => refused = refused.or(Some((iova, e))),
            }
        }
        if let Some((iova, e)) = refused {
            drop(mapped);
            panic!("the IOMMU refused to unmap guest page {iova:#x}, which stays mapped: {e}");
        }
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.map_range(range)?)
    }
}

impl Drop for DmaMapper {
    /// Unmaps whatever is still mapped (best effort: the device should be gone by now).
    fn drop(&mut self) {
        let mapped = std::mem::take(&mut *self.lock());
        for iova in mapped {
            let _ = self.iommu.vfio_dma_unmap(iova, PAGE_SIZE as usize);
        }
    }
}
