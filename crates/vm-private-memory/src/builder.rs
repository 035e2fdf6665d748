//! Laying out guest RAM and creating its files.

use std::sync::{Arc, Mutex};

use guest_memfd::{Capabilities, GuestMemfd, GuestMemfdFlags, PageRange, SealedMemfd};
use kvm_ioctls::VmFd;
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_memory::{GuestMemoryAtomic, GuestRegionCollection};

use crate::attributes::PageState;
use crate::error::{Error, GpaRange, Result};
use crate::kvm_view::{KvmView, VmAttributes};
use crate::memory::{Engine, PrivateMemory};
use crate::region::{PrivateRegion, RegionParts};
use crate::strategy::Strategy;

/// The guest-physical address space the builder lays regions out in (48 bits).
pub const GUEST_PHYS_LIMIT: u64 = 1 << 48;
/// Regions placed by the builder start on this boundary (2 MiB, a huge page).
pub const REGION_ALIGNMENT: u64 = 2 << 20;
/// How long a conversion to private waits, by default, for host accesses still touching
/// its pages before it fails ([`MemoryBuilder::access_patience`]).
pub const DEFAULT_ACCESS_PATIENCE: std::time::Duration = std::time::Duration::from_millis(20);
/// The x86 MMIO hole below 4 GiB, which [`MemoryBuilder::x86_mmio_hole`] reserves.
pub const X86_MMIO_HOLE: (u64, u64) = (3 << 30, 1 << 30);

enum Placement {
    At(u64),
    Anywhere,
}

/// Builds a [`PrivateMemory`]: where each region goes in guest-physical space, which
/// strategy backs it, its initial state, and its memslots.
///
/// ```
/// use std::sync::Arc;
/// use vm_private_memory::{MemoryBuilder, PageState};
///
/// let kvm = kvm_ioctls::Kvm::new().unwrap();
/// let vm = Arc::new(kvm.create_vm().unwrap());
/// let memory = MemoryBuilder::new(Arc::clone(&vm))
///     .x86_mmio_hole()
///     .region_at(0, 2 << 20)
///     .region(4 << 20) // placed after the first, below the hole
///     .initial_state(PageState::Private)
///     .build()
///     .unwrap();
/// assert_eq!(memory.regions().len(), 2);
/// ```
pub struct MemoryBuilder {
    vm: Arc<VmFd>,
    regions: Vec<(Placement, u64)>,
    reserved: Vec<(u64, u64)>,
    strategy: Option<Strategy>,
    initial: PageState,
    single_file: bool,
    slots: (u32, Option<u32>),
    kvm_view: Option<Arc<dyn KvmView>>,
    patience: std::time::Duration,
}

impl MemoryBuilder {
    /// Starts a layout for `vm`: no regions, strategy chosen from the VM's capabilities,
    /// pages initially private (as a TDX or SNP guest starts), one guest_memfd per region.
    pub fn new(vm: Arc<VmFd>) -> Self {
        MemoryBuilder {
            vm,
            regions: Vec::new(),
            reserved: Vec::new(),
            strategy: None,
            initial: PageState::Private,
            single_file: false,
            slots: (0, None),
            kvm_view: None,
            patience: DEFAULT_ACCESS_PATIENCE,
        }
    }

    /// Adds a region of `size` bytes at guest-physical `gpa`.
    pub fn region_at(mut self, gpa: u64, size: u64) -> Self {
        self.regions.push((Placement::At(gpa), size));
        self
    }

    /// Adds a region of `size` bytes at the lowest free, 2 MiB-aligned address (after
    /// fixed regions and reserved holes are placed).
    pub fn region(mut self, size: u64) -> Self {
        self.regions.push((Placement::Anywhere, size));
        self
    }

    /// Keeps `[gpa, gpa + size)` free of RAM (an MMIO hole).
    pub fn reserve(mut self, gpa: u64, size: u64) -> Self {
        self.reserved.push((gpa, size));
        self
    }

    /// Keeps the x86 MMIO hole `[3 GiB, 4 GiB)` free of RAM.
    pub fn x86_mmio_hole(self) -> Self {
        self.reserve(X86_MMIO_HOLE.0, X86_MMIO_HOLE.1)
    }

    /// Uses `strategy` instead of choosing one; `build` says why if the VM cannot.
    pub fn strategy(mut self, strategy: Strategy) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// The state every page starts in.
    pub fn initial_state(mut self, state: PageState) -> Self {
        self.initial = state;
        self
    }

    /// Backs all regions with one guest_memfd, at consecutive offsets, instead of one
    /// file per region.
    pub fn single_file(mut self, single: bool) -> Self {
        self.single_file = single;
        self
    }

    /// Uses memslot numbers `first..=last` only (default: all the host offers, from 0).
    pub fn slots(mut self, first: u32, last: u32) -> Self {
        self.slots = (first, Some(last));
        self
    }

    /// How long a conversion to private waits for host accesses (a `Bytes` call, a
    /// `VolatileSlice` still held) that touch its pages before it fails, rolled back, with
    /// [`Error::HostAccessInFlight`] ([`DEFAULT_ACCESS_PATIENCE`] by default). A guest
    /// cannot stall its vCPU longer than this through a device that holds a slice.
    pub fn access_patience(mut self, patience: std::time::Duration) -> Self {
        self.patience = patience;
        self
    }

    /// Replaces `KVM_SET_MEMORY_ATTRIBUTES` with `view`, and lets the dual strategy be
    /// built on a VM without memory attributes. For tests only.
    #[cfg(feature = "fault-injection")]
    pub fn kvm_view(mut self, view: Arc<dyn KvmView>) -> Self {
        self.kvm_view = Some(view);
        self
    }

    fn layout(&self) -> Result<Vec<PageRange>> {
        if self.regions.is_empty() {
            return Err(Error::NoRegions);
        }
        let mut space = AddressAllocator::new(0, GUEST_PHYS_LIMIT).map_err(|e| Error::Layout {
            range: GpaRange {
                start: 0,
                len: GUEST_PHYS_LIMIT,
            },
            reason: e.to_string(),
        })?;
        // Reserved holes and fixed regions first, so floating regions fit around them.
        struct Request {
            at: Option<u64>,
            size: u64,
            region: Option<usize>,
        }
        let holes = self.reserved.iter().map(|&(gpa, size)| Request {
            at: Some(gpa),
            size,
            region: None,
        });
        let regions = self
            .regions
            .iter()
            .enumerate()
            .map(|(i, (p, size))| Request {
                at: match p {
                    Placement::At(gpa) => Some(*gpa),
                    Placement::Anywhere => None,
                },
                size: *size,
                region: Some(i),
            });
        let mut requests: Vec<Request> = holes.chain(regions).collect();
        requests.sort_by_key(|r| r.at.is_none());
        let mut placed = vec![None; self.regions.len()];
        // vm-allocator 0.1.4's ExactMatch finds the node holding the start address
        // without checking that it is free, so a fixed range wholly inside one already
        // taken is granted; every range taken is kept here to check fixed ones against.
        let mut taken: Vec<PageRange> = Vec::new();
        for request in requests {
            let layout_err = |reason: String| Error::Layout {
                range: GpaRange {
                    start: request.at.unwrap_or(0),
                    len: request.size,
                },
                reason,
            };
            let range = PageRange::new(request.at.unwrap_or(0), request.size)?;
            if let Some(other) = request
                .at
                .and_then(|_| taken.iter().find(|t| t.intersection(&range).is_some()))
            {
                return Err(layout_err(format!("it overlaps {other}")));
            }
            let (policy, align) = match request.at {
                Some(gpa) => (AllocPolicy::ExactMatch(gpa), guest_memfd::PAGE_SIZE),
                None => (AllocPolicy::FirstMatch, REGION_ALIGNMENT),
            };
            let got = space
                .allocate(range.len(), align, policy)
                .map_err(|e| layout_err(e.to_string()))?;
            let got = PageRange::new(got.start(), range.len())?;
            taken.push(got);
            if let Some(i) = request.region {
                placed[i] = Some(got);
            }
        }
        Ok(placed
            .into_iter()
            .map(|p| p.expect("every region placed"))
            .collect())
    }

    /// Lays the regions out, creates the files, maps the shared side and binds every
    /// region to a memslot.
    pub fn build(self) -> Result<PrivateMemory> {
        let caps = Capabilities::of_vm(&self.vm);
        let strategy = match (&self.kvm_view, self.strategy) {
            (Some(_), Some(Strategy::Dual)) => Strategy::Dual,
            _ => Strategy::choose(self.strategy, &caps)?,
        };
        let layout = self.layout()?;
        let limit = if caps.nr_memslots > 0 {
            caps.nr_memslots
        } else {
            32764
        };
        let last_slot = self.slots.1.unwrap_or(limit - 1).min(limit - 1);
        let mut slot_ids =
            IdAllocator::new(self.slots.0, last_slot).map_err(|e| Error::Layout {
                range: GpaRange { start: 0, len: 0 },
                reason: format!("memslot range {}..={last_slot}: {e}", self.slots.0),
            })?;

        let flags = gmem_flags(strategy);
        let shared_file = if self.single_file {
            let total = layout.iter().map(PageRange::len).sum();
            Some(GuestMemfd::create(&self.vm, total, flags)?)
        } else {
            None
        };
        let mut regions: Vec<Arc<PrivateRegion>> = Vec::with_capacity(layout.len());
        let mut offset = 0;
        for guest in layout {
            let (gmem, gmem_offset) = match &shared_file {
                Some(file) => (file.clone(), offset),
                None => (GuestMemfd::create(&self.vm, guest.len(), flags)?, 0),
            };
            offset += guest.len();
            let slot = slot_ids
                .allocate_id()
                .map_err(|_| Error::NoFreeSlot { limit })?;
            let region = make_region(strategy, guest, gmem, gmem_offset, self.initial, slot)?;
            regions.push(Arc::new(region));
        }
        regions.sort_by_key(|r| r.guest_range().start());
        let collection =
            GuestRegionCollection::from_arc_regions(regions).map_err(|e| Error::Layout {
                range: GpaRange { start: 0, len: 0 },
                reason: e.to_string(),
            })?;
        let kvm_view = self
            .kvm_view
            .unwrap_or_else(|| Arc::new(VmAttributes(Arc::clone(&self.vm))));
        let collection = Arc::new(collection);
        let memory = PrivateMemory::assemble(
            self.vm,
            strategy,
            GuestMemoryAtomic::from(Arc::clone(&collection)),
            Mutex::new(Engine::new(collection, slot_ids, limit)),
            kvm_view,
        );
        memory.lock_engine().patience = self.patience;
        memory.bind_all()?;
        if strategy == Strategy::Dual && self.initial == PageState::Private {
            memory.set_kvm_view_all(PageState::Private)?;
        }
        Ok(memory)
    }
}

/// The guest_memfd flags `strategy` needs.
pub(crate) fn gmem_flags(strategy: Strategy) -> GuestMemfdFlags {
    match strategy {
        Strategy::InPlace => GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
        Strategy::Dual => GuestMemfdFlags::empty(),
    }
}

/// A region over `guest`, backed by `gmem` from `gmem_offset`, with its host mapping
/// (and, dual, its sealed memfd).
pub(crate) fn make_region(
    strategy: Strategy,
    guest: PageRange,
    gmem: GuestMemfd,
    gmem_offset: u64,
    initial: PageState,
    slot: u32,
) -> Result<PrivateRegion> {
    let file_range = PageRange::new(gmem_offset, guest.len())?;
    gmem.check_range(file_range)?;
    let (shared, host) = match strategy {
        Strategy::InPlace => (None, gmem.map_range(file_range)?),
        Strategy::Dual => {
            let memfd = SealedMemfd::create("guest-shared", guest.len())?;
            let host = memfd.map()?;
            (Some(memfd), host)
        }
    };
    Ok(PrivateRegion::new(RegionParts {
        guest,
        strategy,
        gmem,
        gmem_offset,
        shared,
        host,
        initial,
        slot,
    }))
}
