//! Saving and restoring the layout and the private/shared map (snapshot, live update).
//!
//! Runtime types stay separate from these serde types; restoring checks a state against
//! the memory and files it is applied to, and a corrupted or mismatched state is an
//! error, never a panic.

use std::sync::Arc;

use guest_memfd::{PageRange, PAGE_SIZE};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};

use crate::attributes::PageState;
use crate::builder::MemoryBuilder;
use crate::convert::ContentMode;
use crate::error::{Error, Result};
use crate::memory::PrivateMemory;
use crate::strategy::Strategy;

/// The version of [`MemoryState`] this crate writes and reads.
pub const STATE_VERSION: u32 = 1;

/// A run of private pages: `count` pages from page `first` of its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// The first page, counted from the region's start.
    pub first: u64,
    /// How many pages.
    pub count: u64,
}

/// One region: where it is, which file range backs it, and its private pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Its guest-physical range (checked on deserialization).
    pub guest: PageRange,
    /// Where in its guest_memfd it starts.
    pub gmem_offset: u64,
    /// The size of that guest_memfd.
    pub gmem_size: u64,
    /// Its private pages, run-length encoded, in order, not overlapping.
    pub private: Vec<PageRun>,
}

/// The layout and private/shared map of a [`PrivateMemory`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// [`STATE_VERSION`] when written.
    pub version: u32,
    /// The backing strategy.
    pub strategy: Strategy,
    /// Every region, in address order.
    pub regions: Vec<RegionState>,
}

fn mismatch(what: String) -> Error {
    Error::StateMismatch(what)
}

impl MemoryState {
    /// A builder for memory with this state's layout and strategy (no content): build it,
    /// then [`PrivateMemory::restore_state`].
    pub fn builder(&self, vm: Arc<VmFd>) -> MemoryBuilder {
        self.regions
            .iter()
            .fold(MemoryBuilder::new(vm).strategy(self.strategy), |b, r| {
                b.region_at(r.guest.start(), r.guest.len())
            })
    }

    /// Checks the runs of every region: in order, not overlapping, inside the region.
    fn check_runs(&self) -> Result<()> {
        for region in &self.regions {
            let pages = region.guest.page_count();
            let mut next_free = 0u64;
            for run in &region.private {
                let end = run.first.checked_add(run.count);
                if run.count == 0 || run.first < next_free || end.is_none_or(|e| e > pages) {
                    return Err(mismatch(format!(
                        "region {}: private run {:?} is empty, out of order, overlapping or past the region's {pages} pages",
                        region.guest, run
                    )));
                }
                next_free = run.first + run.count;
            }
        }
        Ok(())
    }
}

impl PrivateMemory {
    /// The current layout and private/shared map.
    pub fn state(&self) -> MemoryState {
        let snapshot = self.memory.memory();
        let regions = snapshot
            .iter()
            .map(|region| RegionState {
                guest: region.guest_range(),
                gmem_offset: region.gmem_offset(),
                gmem_size: region.gmem().size(),
                private: region
                    .attributes()
                    .runs(0, region.attributes().pages())
                    .filter(|(_, _, state)| *state == PageState::Private)
                    .map(|(first, count, _)| PageRun { first, count })
                    .collect(),
            })
            .collect();
        MemoryState {
            version: STATE_VERSION,
            strategy: self.strategy,
            regions,
        }
    }

    /// Makes this memory's private/shared map that of `state`, after checking that
    /// `state` describes this memory: version, strategy, regions, and each region's file
    /// (its real size, read from the file, and offset). Pages change through the
    /// conversion engine, so listeners and KVM's view follow; in-place, content is kept.
    pub fn restore_state(&self, state: &MemoryState) -> Result<()> {
        if state.version != STATE_VERSION {
            return Err(mismatch(format!(
                "state version {} is not {STATE_VERSION}",
                state.version
            )));
        }
        if state.strategy != self.strategy {
            return Err(mismatch(format!(
                "the state is for the {} strategy, this memory uses {}",
                state.strategy, self.strategy
            )));
        }
        state.check_runs()?;
        let snapshot = self.memory.memory();
        let regions: Vec<_> = snapshot.iter().collect();
        if regions.len() != state.regions.len() {
            return Err(mismatch(format!(
                "the state has {} regions, this memory {}",
                state.regions.len(),
                regions.len()
            )));
        }
        for (saved, region) in state.regions.iter().zip(&regions) {
            let file_size = region
                .gmem()
                .file()
                .metadata()
                .map_err(|e| mismatch(format!("fstat of the guest_memfd failed: {e}")))?
                .len();
            if saved.guest != region.guest_range()
                || saved.gmem_offset != region.gmem_offset()
                || saved.gmem_size != file_size
            {
                return Err(mismatch(format!(
                    "region {} at file offset {:#x} of a {:#x}-byte file does not match region {} at offset {:#x} of a {:#x}-byte file",
                    saved.guest,
                    saved.gmem_offset,
                    saved.gmem_size,
                    region.guest_range(),
                    region.gmem_offset(),
                    file_size
                )));
            }
        }
        let mode = match self.strategy {
            Strategy::InPlace => ContentMode::Preserve,
            Strategy::Dual => ContentMode::Discard,
        };
        drop(regions);
        drop(snapshot);
        for saved in &state.regions {
            let base = saved.guest.start();
            let mut at = 0u64;
            for run in saved
                .private
                .iter()
                .copied()
                .chain(std::iter::once(PageRun {
                    first: saved.guest.page_count(),
                    count: 0,
                }))
            {
                if run.first > at {
                    let shared =
                        PageRange::new(base + at * PAGE_SIZE, (run.first - at) * PAGE_SIZE)?;
                    self.convert_with(shared, PageState::Shared, mode)?;
                }
                if run.count > 0 {
                    let private =
                        PageRange::new(base + run.first * PAGE_SIZE, run.count * PAGE_SIZE)?;
                    self.convert_with(private, PageState::Private, mode)?;
                }
                at = run.first + run.count;
            }
        }
        Ok(())
    }
}
