// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Laying out guest RAM and creating its files.

use std::sync::Arc;

use guest_memfd::{
    Capabilities, GuestMemfd, GuestMemfdFlags, NumaPolicy, PageRange, SharedBacking, VmMemoryOps,
};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vm_memory::{GuestMemoryBackend, GuestRegionCollection};

use crate::attributes::PageState;
use crate::error::{ByteRange, Error, LayoutError, Result};
use crate::guard::DirtyBitmap;
use crate::kvm_view::set_kvm_view;
use crate::memory::{bind_regions, unbind_regions, Engine, PrivateMemoryManager};
use crate::region::GuestRegionPrivate;
use crate::region_setup::{check_gmem_flags, check_policies, check_shared_backing, make_region};
use crate::strategy::Strategy;

/// The guest-physical address space the builder lays regions out in (48 bits).
pub const GUEST_PHYS_LIMIT: u64 = 1 << 48;
/// Regions placed by the builder start on this boundary (2 MiB, a huge page).
pub const REGION_ALIGNMENT: u64 = 2 << 20;
/// How long a conversion to private waits, by default, for host accesses still touching
/// its pages before it fails ([`MemoryBuilder::access_patience`]).
pub const DEFAULT_ACCESS_PATIENCE: std::time::Duration = std::time::Duration::from_millis(20);
/// The longest a conversion to private waits for host accesses in flight, whatever
/// [`MemoryBuilder::access_patience`] asks.
pub const MAX_ACCESS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);
/// The x86 MMIO hole below 4 GiB, which [`MemoryBuilder::x86_mmio_hole`] reserves.
pub const X86_MMIO_HOLE: (u64, u64) = (3 << 30, 1 << 30);

#[derive(Debug)]
enum Placement {
    At(u64),
    Anywhere,
}

/// One region the builder is asked for: where, how big, and what the VMM gave for it.
#[derive(Debug)]
struct RegionSpec {
    placement: Placement,
    size: u64,
    /// The VMM's shared side (dual strategy): its file and the offset in it.
    shared: Option<(SharedBacking, u64)>,
    /// Where its pages are allocated (in-place strategy).
    policy: Option<NumaPolicy>,
}

impl RegionSpec {
    fn new(placement: Placement, size: u64) -> Self {
        RegionSpec {
            placement,
            size,
            shared: None,
            policy: None,
        }
    }
}

/// Builds a [`PrivateMemoryManager`]: where each region goes in guest-physical space, which
/// strategy backs it, its initial state, and its memslots.
///
/// The VM is anything that implements [`VmMemoryOps`]: a kvm-ioctls `VmFd`, or a VMM's own
/// hypervisor wrapper.
///
/// ```
/// use std::sync::Arc;
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
/// let memory = MemoryBuilder::new(vm.clone())
///     .x86_mmio_hole()
///     .region_at(0, 2 << 20)
///     .region(4 << 20) // placed after the first, below the hole
///     .initial_state(PageState::Private)
///     .build()
///     .unwrap();
/// assert_eq!(memory.regions().len(), 2);
/// ```
///
/// Every method returns the builder: a call whose result is dropped configures nothing,
/// and the compiler says so.
///
/// ```compile_fail
/// #![deny(unused_must_use)]
/// fn configure(vm: std::sync::Arc<dyn guest_memfd::VmMemoryOps>) {
///     let builder = vm_private_memory::MemoryBuilder::new(vm);
///     builder.region(2 << 20); // the region is lost: an error under deny(unused_must_use)
/// }
/// ```
#[must_use = "a MemoryBuilder does nothing until `build` is called on it"]
pub struct MemoryBuilder {
    vm: Arc<dyn VmMemoryOps>,
    regions: Vec<RegionSpec>,
    reserved: Vec<(u64, u64)>,
    strategy: Option<Strategy>,
    initial: PageState,
    single_file: bool,
    slots: (u32, Option<u32>),
    patience: std::time::Duration,
    extra_flags: GuestMemfdFlags,
    /// The VMM binds the memslots itself.
    vmm_binds: bool,
}

// By hand: the VM is an `Arc<dyn VmMemoryOps>`, which has no `Debug`.
impl std::fmt::Debug for MemoryBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBuilder")
            .field("regions", &self.regions)
            .field("reserved", &self.reserved)
            .field("strategy", &self.strategy)
            .field("initial", &self.initial)
            .field("single_file", &self.single_file)
            .field("slots", &self.slots)
            .field("patience", &self.patience)
            .field("extra_flags", &self.extra_flags)
            .field("vmm_binds", &self.vmm_binds)
            .finish_non_exhaustive()
    }
}

impl MemoryBuilder {
    /// Starts a layout for `vm`: no regions, strategy chosen from the VM's capabilities,
    /// pages initially private (as a TDX or SNP guest starts), one guest_memfd per region.
    ///
    /// `vm` is an `Arc` of a kvm-ioctls `VmFd` or of any other [`VmMemoryOps`]; the memory
    /// keeps it, and makes every VM call through it. From an `Arc<VmFd>` named `vm`, pass
    /// `vm.clone()`: `Arc::clone(&vm)` would be inferred as `Arc<dyn VmMemoryOps>` and not
    /// compile.
    pub fn new(vm: Arc<dyn VmMemoryOps>) -> Self {
        MemoryBuilder {
            vm,
            regions: Vec::new(),
            reserved: Vec::new(),
            strategy: None,
            initial: PageState::Private,
            single_file: false,
            slots: (0, None),
            patience: DEFAULT_ACCESS_PATIENCE,
            extra_flags: GuestMemfdFlags::empty(),
            vmm_binds: false,
        }
    }

    /// Adds a region of `size` bytes at guest-physical `gpa`.
    pub fn region_at(mut self, gpa: u64, size: u64) -> Self {
        self.regions.push(RegionSpec::new(Placement::At(gpa), size));
        self
    }

    /// Adds a region of `size` bytes at guest-physical `gpa` whose memory is placed on
    /// NUMA nodes by `policy` (in-place strategy; Linux 6.19 or later): the policy is set
    /// on the region's guest_memfd through its mapping (`mbind`) before any page is
    /// allocated, and guest_memfd applies it to every page it allocates there, whether
    /// the guest or the host touches it first, and again after a conversion punched a
    /// page. The build checks that the nodes have memory this process may use and, by
    /// behaviour, that the kernel applies the policy
    /// ([`guest_memfd::numa_policy_support`]); where a single node is usable, every page
    /// lands on it and no policy is set. The policy belongs to the guest_memfd file, per
    /// range of the file: it follows the file through
    /// [`PrivateMemoryManager::remove_region`] and `add_region` at the same offset.
    /// Regions added later take one with
    /// [`PrivateMemoryManager::add_region_with_policy`].
    ///
    /// The dual strategy refuses it: its guest_memfd has no mapping to carry a policy
    /// ([`crate::UnavailableReason::NumaPolicyNeedsInPlace`] says what to do instead). On Linux
    /// 7.3 a private-capable VM may create a mappable guest_memfd whose mapping takes a
    /// policy, but KVM then takes the memslot's shared pages from the guest_memfd as
    /// well, bypassing the shared side (the nested lab's test
    /// `a_mappable_guest_memfd_on_a_private_capable_vm_takes_its_shared_pages_too`).
    pub fn region_at_with_policy(mut self, gpa: u64, size: u64, policy: NumaPolicy) -> Self {
        self.regions.push(RegionSpec {
            policy: Some(policy),
            ..RegionSpec::new(Placement::At(gpa), size)
        });
        self
    }

    /// Adds a region of `size` bytes at guest-physical `gpa` whose shared pages live in
    /// the VMM's own file, from byte `offset` (dual strategy only): a memory zone the
    /// VMM set up itself (a memfd with a NUMA policy, a tmpfs or shared file), instead
    /// of a sealed memfd this crate creates. The file must hold `[offset, offset + size)`
    /// and be punchable in 4 KiB units (hugetlbfs maps only at huge-page-aligned offsets,
    /// and punching part of a huge page frees nothing); with pages initially
    /// private the range is punched at build time, so a file that cannot be fails
    /// then. Device code is given this file and offset for the shared runs
    /// ([`PrivateMemoryManager::shared_pages`]).
    ///
    /// Two regions may share a file, at ranges that do not overlap.
    pub fn region_at_with_shared(
        mut self,
        gpa: u64,
        size: u64,
        backing: SharedBacking,
        offset: u64,
    ) -> Self {
        self.regions.push(RegionSpec {
            shared: Some((backing, offset)),
            ..RegionSpec::new(Placement::At(gpa), size)
        });
        self
    }

    /// Adds a region of `size` bytes at the lowest free, 2 MiB-aligned address (after
    /// fixed regions and reserved holes are placed).
    pub fn region(mut self, size: u64) -> Self {
        self.regions
            .push(RegionSpec::new(Placement::Anywhere, size));
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
    /// The range must lie inside the host's (`KVM_CAP_NR_MEMSLOTS`) and hold a number for
    /// every region; `build` checks both before creating anything.
    pub fn slots(mut self, first: u32, last: u32) -> Self {
        self.slots = (first, Some(last));
        self
    }

    /// Sets extra guest_memfd creation flags, on top of the ones the strategy needs
    /// (`MMAP | INIT_SHARED` in place, none for dual), for every guest_memfd this memory
    /// creates,
    /// now and in [`PrivateMemoryManager::add_region`]: flags a host offers beyond those
    /// (`KVM_CAP_GUEST_MEMFD_FLAGS`, such as a patched kernel's `NO_DIRECT_MAP`; unknown
    /// bits are kept with `GuestMemfdFlags::from_bits_retain`). Flags the host does not
    /// offer fail [`MemoryBuilder::build`] with the file layer's `UnsupportedFlags`,
    /// naming them, before any file is created. The dual strategy refuses `MMAP` and
    /// `INIT_SHARED` ([`crate::UnavailableReason::FlagsOwnedByStrategy`]): a mappable
    /// guest_memfd would bind as a slot whose shared pages KVM takes from the
    /// guest_memfd, while devices use the shared side.
    pub fn guest_memfd_flags(mut self, extra: GuestMemfdFlags) -> Self {
        self.extra_flags = extra;
        self
    }

    /// Leaves binding the regions' memslots to the VMM, which numbers and binds its own
    /// slots (as Cloud Hypervisor and Firecracker do): the memory is built with its files
    /// and mappings (and, dual, KVM's view of pages starting private), and
    /// [`PrivateMemoryManager::memslots`] hands out the exact
    /// `KVM_SET_USER_MEMORY_REGION2` description of each region for the VMM to bind.
    /// Slot numbers come from [`MemoryBuilder::slots`]'s range.
    ///
    /// The contract that keeps memory sound: a region's mapping must outlive its slot. So
    /// a dropped memory leaks its mappings (they stay mapped for the process's life)
    /// until the VMM says, with the `unsafe`
    /// [`PrivateMemoryManager::release_memslots`], that it has deleted every slot.
    /// Regions may still come and go (memory hotplug): a region added with
    /// [`PrivateMemoryManager::add_region`] is described for the VMM to bind, and one
    /// whose slot the VMM deleted leaves with the `unsafe`
    /// [`PrivateMemoryManager::remove_unbound_region`] ([`PrivateMemoryManager::remove_region`]
    /// is refused, [`Error::VmmBindsMemslots`]).
    pub fn vmm_binds_memslots(mut self) -> Self {
        self.vmm_binds = true;
        self
    }

    /// How long a conversion to private waits for host accesses (a `Bytes` call, a
    /// `VolatileSlice` still held) that touch its pages before it fails, rolled back, with
    /// [`Error::HostAccessInFlight`] ([`DEFAULT_ACCESS_PATIENCE`] by default). A guest
    /// cannot stall its vCPU longer than this through a device that holds a slice. A
    /// conversion never waits without bound: longer values are cut to
    /// [`MAX_ACCESS_PATIENCE`].
    pub fn access_patience(mut self, patience: std::time::Duration) -> Self {
        self.patience = patience.min(MAX_ACCESS_PATIENCE);
        self
    }

    /// The memslot numbers to use, after checking that they lie inside the host's
    /// `host_limit` and that there is one for every region.
    fn slot_range(&self, host_limit: u32) -> Result<(u32, u32)> {
        let first = self.slots.0;
        let last = self.slots.1.unwrap_or(host_limit.saturating_sub(1));
        let fits = first <= last
            && last < host_limit
            && self.regions.len() as u64 <= u64::from(last - first) + 1;
        if !fits {
            return Err(Error::NotEnoughSlots {
                regions: self.regions.len(),
                first,
                last,
                host_limit,
            });
        }
        Ok((first, last))
    }

    fn layout(&self) -> Result<Vec<PageRange>> {
        if self.regions.is_empty() {
            return Err(Error::NoRegions);
        }
        let mut space = AddressAllocator::new(0, GUEST_PHYS_LIMIT).map_err(|e| Error::Layout {
            range: ByteRange {
                start: 0,
                len: GUEST_PHYS_LIMIT,
            },
            reason: LayoutError::Allocator(e),
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
        let regions = self.regions.iter().enumerate().map(|(i, spec)| Request {
            at: match spec.placement {
                Placement::At(gpa) => Some(gpa),
                Placement::Anywhere => None,
            },
            size: spec.size,
            region: Some(i),
        });
        let mut requests: Vec<Request> = holes.chain(regions).collect();
        requests.sort_by_key(|r| r.at.is_none());
        let mut placed = vec![None; self.regions.len()];
        // vm-allocator 0.1.4's ExactMatch finds the node holding the start address
        // without checking that it is free, so a fixed range wholly inside one already
        // taken is granted; every range taken is kept here to check fixed ones against.
        let mut taken: Vec<(PageRange, bool)> = Vec::new();
        for request in requests {
            let layout_err = |reason: LayoutError| Error::Layout {
                range: ByteRange {
                    start: request.at.unwrap_or(0),
                    len: request.size,
                },
                reason,
            };
            let range = PageRange::new(request.at.unwrap_or(0), request.size)?;
            if let Some(&(other, reserved)) = request
                .at
                .and_then(|_| taken.iter().find(|t| t.0.intersection(&range).is_some()))
            {
                return Err(layout_err(if reserved {
                    LayoutError::OverlapsReserved(other)
                } else {
                    LayoutError::OverlapsRegion(other)
                }));
            }
            let (policy, align) = match request.at {
                Some(gpa) => (AllocPolicy::ExactMatch(gpa), guest_memfd::PAGE_SIZE),
                None => (AllocPolicy::FirstMatch, REGION_ALIGNMENT),
            };
            let got = space.allocate(range.len(), align, policy).map_err(|e| {
                match (request.at, request.region) {
                    // A floating region has no address to name: say what did not fit.
                    (None, Some(index)) => Error::NoRoomForRegion {
                        index,
                        size: request.size,
                    },
                    _ => layout_err(LayoutError::Allocator(e)),
                }
            })?;
            let got = PageRange::new(got.start(), range.len())?;
            taken.push((got, request.region.is_none()));
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
    ///
    /// # Errors
    ///
    /// Before anything is created: [`Error::StrategyUnavailable`] if the VM cannot run
    /// the strategy, [`Error::NotEnoughSlots`] if the memslot numbers (configured with
    /// [`MemoryBuilder::slots`], inside the host's) are fewer than the regions,
    /// [`Error::NoRegions`] and [`Error::Layout`] for a bad layout; for regions with a
    /// NUMA policy, the errors [`MemoryBuilder::region_at_with_policy`] names. Then the
    /// file layer's or KVM's error if creating, mapping or binding a region fails, and
    /// [`Error::NumaPolicyNotSet`] if the kernel refuses a policy when it is set; nothing
    /// stays bound.
    pub fn build(self) -> Result<PrivateMemoryManager> {
        self.build_with_bitmap()
    }

    /// [`MemoryBuilder::build`], with regions whose dirty bitmap is `B`: vm-memory's
    /// `AtomicBitmap` records every host write made through the vm-memory view, as in
    /// `GuestMemoryMmap<AtomicBitmap>` (see [`crate::GuestRegionPrivate`], "Dirty
    /// tracking"). Regions added later ([`PrivateMemoryManager::add_region`]) get one too.
    /// `AtomicBitmap` is behind vm-memory's `backend-bitmap` feature, which the VMM
    /// enables in its own `Cargo.toml`.
    ///
    /// # Errors
    ///
    /// As [`MemoryBuilder::build`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use vm_memory::bitmap::AtomicBitmap;
    /// use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
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
    /// let memory = MemoryBuilder::new(vm)
    ///     .region_at(0, 2 << 20)
    ///     .initial_state(PageState::Shared)
    ///     .build_with_bitmap::<AtomicBitmap>()
    ///     .unwrap();
    ///
    /// // Device emulation writes a shared page...
    /// memory.guest_memory().memory().write_obj(7u64, GuestAddress(0x5008)).unwrap();
    ///
    /// // ...and a migration pass finds it dirty.
    /// let view = memory.guest_memory().memory();
    /// let region = view.find_region(GuestAddress(0)).unwrap();
    /// let dirty = region.dirty_bitmap().get_and_reset();
    /// assert_eq!(dirty[0], 1 << 5); // page 5, counting from the region's start
    /// ```
    pub fn build_with_bitmap<B: DirtyBitmap>(mut self) -> Result<PrivateMemoryManager<B>> {
        let caps = Capabilities::of_vm(&*self.vm);
        let strategy = Strategy::choose(self.strategy, &caps)?;
        let flags = gmem_flags(strategy) | self.extra_flags;
        check_gmem_flags(strategy, flags)?;
        check_shared_backings(strategy, &self.regions)?;
        // With a single usable node every page lands there anyway: no policy is set (a
        // kernel without NUMA has no mbind to set it with).
        let policies = self.regions.iter().filter_map(|spec| spec.policy.as_ref());
        if !check_policies(strategy, &*self.vm, policies)? {
            self.regions.iter_mut().for_each(|spec| spec.policy = None);
        }
        let host_limit = if caps.nr_memslots > 0 {
            caps.nr_memslots
        } else {
            32764
        };
        let (first_slot, last_slot) = self.slot_range(host_limit)?;
        let layout = self.layout()?;
        let mut slot_ids = IdAllocator::new(first_slot, last_slot).map_err(|e| Error::Layout {
            range: ByteRange { start: 0, len: 0 },
            reason: LayoutError::SlotRange {
                first: first_slot,
                last: last_slot,
                source: e,
            },
        })?;
        let no_free_slot = || Error::NoFreeSlot {
            first: first_slot,
            last: last_slot,
            host_limit,
        };

        let shared_file = if self.single_file {
            let total = layout.iter().map(PageRange::len).sum();
            Some(GuestMemfd::create(&*self.vm, total, flags)?)
        } else {
            None
        };
        let mut regions: Vec<Arc<GuestRegionPrivate<B>>> = Vec::with_capacity(layout.len());
        let mut offset = 0;
        for (index, guest) in layout.into_iter().enumerate() {
            let (gmem, gmem_offset) = match &shared_file {
                Some(file) => (file.clone(), offset),
                None => (GuestMemfd::create(&*self.vm, guest.len(), flags)?, 0),
            };
            offset += guest.len();
            let slot = slot_ids.allocate_id().map_err(|_| no_free_slot())?;
            let spec = &mut self.regions[index];
            let region = make_region(
                strategy,
                guest,
                (gmem, gmem_offset),
                self.initial,
                slot,
                spec.shared.take(),
                spec.policy,
            )?;
            regions.push(Arc::new(region));
        }
        regions.sort_by_key(|r| r.guest_range().start());
        let collection =
            GuestRegionCollection::from_arc_regions(regions).map_err(|e| Error::Layout {
                range: ByteRange { start: 0, len: 0 },
                reason: LayoutError::Collection(e),
            })?;
        let collection = Arc::new(collection);
        if !self.vmm_binds {
            bind_regions(&*self.vm, &collection)?;
        }
        // KVM keeps attributes per address, across memslots and earlier memories on the
        // same VM: set them whatever the initial state.
        if strategy == Strategy::Dual {
            for region in collection.iter() {
                if let Err(e) = set_kvm_view(&*self.vm, region.guest_range(), self.initial) {
                    if !self.vmm_binds {
                        unbind_regions(&*self.vm, &collection, collection.num_regions());
                    }
                    return Err(e);
                }
            }
        }
        let mut engine = Engine::new(
            Arc::clone(&collection),
            slot_ids,
            (first_slot, last_slot),
            host_limit,
        );
        engine.patience = self.patience;
        engine.gmem_flags = flags;
        engine.reserved = self
            .reserved
            .iter()
            .map(|&(gpa, size)| PageRange::new(gpa, size))
            .collect::<std::result::Result<_, _>>()?;
        Ok(PrivateMemoryManager::assemble(
            self.vm,
            strategy,
            collection,
            engine,
            self.vmm_binds,
        ))
    }
}

/// The guest_memfd flags `strategy` needs.
pub(crate) fn gmem_flags(strategy: Strategy) -> GuestMemfdFlags {
    match strategy {
        Strategy::InPlace => GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
        Strategy::Dual => GuestMemfdFlags::empty(),
    }
}

/// Checks the VMM's shared backings before anything is created: the dual strategy only,
/// each range inside its file, and no two ranges of one file overlapping.
fn check_shared_backings(strategy: Strategy, regions: &[RegionSpec]) -> Result<()> {
    let mut taken = Vec::new();
    for spec in regions {
        let Some((backing, offset)) = &spec.shared else {
            continue;
        };
        let range = check_shared_backing(strategy, spec.size, backing, *offset, &taken)?;
        taken.push(range);
    }
    Ok(())
}
