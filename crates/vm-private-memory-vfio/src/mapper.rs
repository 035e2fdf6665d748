// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The listener that keeps an IOMMU's mapping equal to the shared pages.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

use guest_memfd::{PageRange, PAGE_SIZE};
use vfio_ioctls::{VfioError, VfioOps};
use vm_private_memory::{
    DirtyBitmap, MemoryListener, PrivateMemoryManager, SharedPages, Subscription,
};

use crate::unmap::{unmap_page, Unmapped};

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
    /// The IOMMU refused to unmap a page: it may still map it.
    #[error("the IOMMU refused to unmap guest page {iova:#x}, which it may still map for DMA: {source}; the page is kept shared until it can be unmapped")]
    Unmap {
        /// The page's IOVA (its guest-physical address).
        iova: u64,
        /// vfio-ioctls' error, with the kernel's errno.
        #[source]
        source: VfioError,
    },
    /// The IOMMU refused a mapping.
    #[error("mapping guest page {iova:#x} for DMA failed: {source} (EEXIST: something else maps that IOVA in this container; ENOSPC: the IOMMU's mapping limit, type1's dma_entry_limit, is reached)")]
    Map {
        /// The page's IOVA (its guest-physical address).
        iova: u64,
        /// vfio-ioctls' error, with the kernel's errno.
        #[source]
        source: VfioError,
    },
}

/// Keeps a VFIO IOMMU's mapping of guest memory equal to its shared pages, one 4 KiB
/// mapping per page, IOVA = guest-physical address (see the crate documentation).
/// Configure it, then [`DmaMapper::attach`] it to the memory.
#[must_use = "a DmaMapper maps nothing until `attach` is called on it"]
pub struct DmaMapper {
    iommu: Arc<dyn VfioOps>,
    budget: usize,
}

impl std::fmt::Debug for DmaMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMapper")
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl DmaMapper {
    /// A mapper into `iommu`: the `VfioContainer` or `VfioIommufd` the device is
    /// attached to.
    pub fn new(iommu: Arc<dyn VfioOps>) -> Self {
        DmaMapper {
            iommu,
            budget: DEFAULT_MAPPING_BUDGET,
        }
    }

    /// Allows at most `budget` mappings (pages) at once; [`DEFAULT_MAPPING_BUDGET`] by
    /// default. Set it to what the IOMMU allows this device's container minus what
    /// the VMM maps there itself.
    pub fn with_budget(mut self, budget: usize) -> Self {
        self.budget = budget;
        self
    }

    /// Maps every page of `range` that is shared now and follows every later conversion
    /// in `range`, with nothing missed in between
    /// ([`PrivateMemoryManager::subscribe_with_replay`]). Host addresses come from `memory`'s
    /// own list of regions ([`PrivateMemoryManager::shared_pages`]), which no holder of the
    /// vm-memory view can replace.
    ///
    /// The returned attachment holds the mapping: keep it for as long as the device may
    /// DMA. Dropping it (or [`DmaAttachment::detach`]) unmaps every page and only then
    /// stops following conversions, so no page can turn private while still mapped.
    ///
    /// A region added later with shared pages ([`PrivateMemoryManager::add_region`]) is mapped
    /// as it is added (a refusal fails the addition). Pages freed by
    /// [`PrivateMemoryManager::discard`] (a balloon) are unmapped with it and stay so until a
    /// conversion next offers them: their memory is meant to go back to the host. A
    /// page the mapper holds is never private.
    ///
    /// # Errors
    ///
    /// [`vm_private_memory::Error::ListenerRefused`] if the pages shared now cannot all
    /// be mapped (over budget, or the IOMMU refused; the reason is an [`Error`]):
    /// nothing stays mapped. [`vm_private_memory::Error::RollbackFailed`] if, after
    /// that, the IOMMU refused to unmap what had been mapped: its `kept_shared` pages
    /// stay mapped, and the memory keeps telling the mapper when they go private (it
    /// tries the unmap again) until they are unmapped.
    /// [`vm_private_memory::Error::Reentrant`] from a listener callback.
    pub fn attach<B: DirtyBitmap>(
        self,
        memory: &PrivateMemoryManager<B>,
        range: PageRange,
    ) -> vm_private_memory::Result<DmaAttachment> {
        let mapper = Arc::new(Mapper {
            iommu: self.iommu,
            shared: memory.shared_pages(),
            budget: self.budget,
            state: Mutex::new(State::default()),
        });
        let listener: Arc<dyn MemoryListener> = Arc::clone(&mapper) as Arc<dyn MemoryListener>;
        let subscription = memory.subscribe_with_replay(range, listener)?;
        Ok(DmaAttachment {
            mapper,
            subscription: Some(subscription),
        })
    }
}

/// A [`DmaMapper`] attached to a memory: the IOMMU maps exactly the shared pages it was
/// offered, until this is dropped or detached.
pub struct DmaAttachment {
    mapper: Arc<Mapper>,
    subscription: Option<Subscription>,
}

impl std::fmt::Debug for DmaAttachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaAttachment")
            .field("budget", &self.mapper.budget)
            .field("mapped_pages", &self.mapped_pages())
            .finish_non_exhaustive()
    }
}

impl DmaAttachment {
    /// How many pages are mapped now.
    pub fn mapped_pages(&self) -> usize {
        self.mapper.lock().mapped.len()
    }

    /// Whether the page holding `gpa` is mapped now.
    pub fn is_mapped(&self, gpa: u64) -> bool {
        self.mapper
            .lock()
            .mapped
            .contains(&(gpa & !(PAGE_SIZE - 1)))
    }

    /// Unmaps every page, then stops following conversions.
    ///
    /// # Errors
    ///
    /// [`Error::Unmap`] for the first page the IOMMU refused to unmap: the IOMMU may
    /// still map it, and the mapper keeps following its conversions so that it cannot
    /// turn private unnoticed (a conversion of it to private is refused).
    pub fn detach(mut self) -> Result<(), Error> {
        self.release()
    }

    fn release(&mut self) -> Result<(), Error> {
        let refused = self.mapper.unmap_all();
        match refused {
            None => {
                drop(self.subscription.take());
                Ok(())
            }
            Some(e) => {
                // Still subscribed: the pages left mapped cannot go private unnoticed.
                std::mem::forget(self.subscription.take());
                Err(e)
            }
        }
    }
}

impl Drop for DmaAttachment {
    /// As [`DmaAttachment::detach`]; a page the IOMMU refuses to unmap keeps the
    /// memory's subscription alive (it is leaked), so that page cannot turn private.
    fn drop(&mut self) {
        let _ = self.release();
    }
}

#[derive(Default)]
struct State {
    /// The IOVAs of the pages mapped now.
    mapped: BTreeSet<u64>,
    /// Set once the attachment is being released: nothing is mapped any more.
    detached: bool,
}

/// The listener behind a [`DmaAttachment`].
struct Mapper {
    iommu: Arc<dyn VfioOps>,
    shared: SharedPages,
    budget: usize,
    state: Mutex<State>,
}

impl Mapper {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every change of the state is whole (insert or remove after the ioctl), so a
        // panic elsewhere leaves it consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops mapping, and unmaps every page; returns the first refusal, if any (those
    /// pages stay in the set).
    fn unmap_all(&self) -> Option<Error> {
        let mut state = self.lock();
        state.detached = true;
        let mapped: Vec<u64> = state.mapped.iter().copied().collect();
        let mut refused = None;
        for iova in mapped {
            match unmap_page(&*self.iommu, iova) {
                Ok(Unmapped) => {
                    state.mapped.remove(&iova);
                }
                Err(e) => refused = refused.or(Some(e)),
            }
        }
        refused
    }

    /// Maps the shared pages of `range` not mapped yet, all or none.
    fn map_range(&self, range: PageRange) -> Result<(), Error> {
        let mut state = self.lock();
        if state.detached {
            return Ok(());
        }
        let snapshot = self.shared.snapshot();
        // What to map, checked whole before the first ioctl: (IOVA, host address).
        let mut wanted = Vec::new();
        // Runs come in address order; the first page they skip is not shared guest memory.
        let mut next = range.start();
        for run in snapshot.runs(range) {
            let guest = run.guest_range();
            if guest.start() != next {
                break;
            }
            let host = run.host_address();
            for page in 0..guest.page_count() {
                let iova = guest.start() + page * PAGE_SIZE;
                if !state.mapped.contains(&iova) {
                    wanted.push((iova, host.wrapping_add((page * PAGE_SIZE) as usize)));
                }
            }
            next = guest.end();
        }
        if next != range.end() {
            return Err(Error::NotInView { gpa: next });
        }
        if state.mapped.len() + wanted.len() > self.budget {
            return Err(Error::OverBudget {
                range,
                needed: wanted.len(),
                held: state.mapped.len(),
                budget: self.budget,
            });
        }
        for (i, &(iova, host)) in wanted.iter().enumerate() {
            // SAFETY: `host` is the page's address in its region's mapping, which stays
            // mapped while the region is in guest memory; the page is shared now and is
            // unmapped here (`discard`) before it turns private or its region leaves
            // (both notify listeners first), and before the attachment stops listening.
            // This crate and vm-private-memory touch guest memory only through volatile
            // accesses, never through Rust references, as the DMA contract asks.
            let result = unsafe { self.iommu.vfio_dma_map(iova, PAGE_SIZE as usize, host) };
            if let Err(source) = result {
                // All or none: take back what this call mapped.
                for &(done, _) in wanted[..i].iter().rev() {
                    if unmap_page(&*self.iommu, done).is_err() {
                        // A page that cannot be taken back must not turn private: accept
                        // the conversion instead (the pages not mapped are shared and
                        // unreachable by DMA, the safe side).
                        return Ok(());
                    }
                    state.mapped.remove(&done);
                }
                return Err(Error::Map { iova, source });
            }
            state.mapped.insert(iova);
        }
        Ok(())
    }
}

impl MemoryListener for Mapper {
    /// Unmaps every mapped page of `range`. If the IOMMU refuses an unmap, this panics
    /// (after unmapping what it could): vm-private-memory takes a panic in `discard` as
    /// "cannot let go" and stops the conversion, so the page stays shared while it is
    /// still mapped. A page the IOMMU no longer maps (the VMM unmapped it, or the device
    /// left its container) is simply forgotten.
    fn discard(&self, range: PageRange) {
        let mut state = self.lock();
        let inside: Vec<u64> = state
            .mapped
            .range(range.start()..range.end())
            .copied()
            .collect();
        let mut refused = None;
        for iova in inside {
            match unmap_page(&*self.iommu, iova) {
                Ok(Unmapped) => {
                    state.mapped.remove(&iova);
                }
                Err(e) => refused = refused.or(Some(e)),
            }
        }
        if let Some(e) = refused {
            drop(state);
            // Unwind without the panic hook: a guest converting the page again and
            // again must not fill the VMM's log with panic reports and backtraces.
            std::panic::resume_unwind(Box::new(e.to_string()));
        }
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.map_range(range)?)
    }
}
