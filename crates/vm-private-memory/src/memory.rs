//! The guest's RAM: regions, memslots, the conversion lock and the listeners.

use std::sync::{Arc, Mutex, MutexGuard};

use guest_memfd::{GuestMemfd, PageRange};

use crate::builder::{gmem_flags, make_region};
use kvm_ioctls::VmFd;
use vm_allocator::IdAllocator;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestRegionCollection,
};

use crate::attributes::PageState;
use crate::error::{Error, GpaRange, Result};
use crate::kvm_view::KvmView;
use crate::listener::{in_callback, Listeners, MemoryListener, Subscription};
use crate::region::PrivateRegion;
use crate::strategy::Strategy;

/// The vm-memory view of the guest's RAM: use it wherever `GuestMemoryMmap` was used.
pub type GuestMemoryPrivate = GuestRegionCollection<PrivateRegion>;

/// State that only changes under the conversion lock.
pub(crate) struct Engine {
    /// The collection now published in the `GuestMemoryAtomic`: the engine replaces it
    /// only under this lock, so conversions read it here without an atomic load.
    pub(crate) current: Arc<GuestMemoryPrivate>,
    pub(crate) slots: IdAllocator,
    pub(crate) slot_limit: u32,
    /// How long a conversion to private waits for host accesses in flight.
    pub(crate) patience: std::time::Duration,
    #[cfg(feature = "fault-injection")]
    pub(crate) fail_at: Option<crate::convert::Step>,
}

impl Engine {
    pub(crate) fn new(
        current: Arc<GuestMemoryPrivate>,
        slots: IdAllocator,
        slot_limit: u32,
    ) -> Self {
        Engine {
            current,
            slots,
            slot_limit,
            patience: crate::builder::DEFAULT_ACCESS_PATIENCE,
            #[cfg(feature = "fault-injection")]
            fail_at: None,
        }
    }
}

/// Guest RAM with private and shared pages, on one VM.
///
/// [`PrivateMemory::memory`] gives the vm-memory view (a [`GuestMemoryAtomic`] over
/// [`GuestMemoryPrivate`]) for device emulation, loaders and vCPU set-up; this type owns
/// the memslots and changes pages between private and shared ([`PrivateMemory::convert`]).
/// Dropping it unbinds every memslot.
pub struct PrivateMemory {
    pub(crate) vm: Arc<VmFd>,
    pub(crate) strategy: Strategy,
    pub(crate) memory: GuestMemoryAtomic<GuestMemoryPrivate>,
    pub(crate) engine: Mutex<Engine>,
    pub(crate) listeners: Listeners,
    pub(crate) kvm_view: Arc<dyn KvmView>,
}

impl std::fmt::Debug for PrivateMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateMemory")
            .field("strategy", &self.strategy)
            .field("regions", &self.regions())
            .finish()
    }
}

impl PrivateMemory {
    pub(crate) fn assemble(
        vm: Arc<VmFd>,
        strategy: Strategy,
        memory: GuestMemoryAtomic<GuestMemoryPrivate>,
        engine: Mutex<Engine>,
        kvm_view: Arc<dyn KvmView>,
    ) -> Self {
        PrivateMemory {
            vm,
            strategy,
            memory,
            engine,
            listeners: Listeners::default(),
            kvm_view,
        }
    }

    pub(crate) fn lock_engine(&self) -> MutexGuard<'_, Engine> {
        // The engine's state is only changed by whole, undoable steps; a panic in a
        // listener leaves it consistent.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn bind_all(&self) -> Result<()> {
        let snapshot = self.memory.memory();
        for region in snapshot.iter() {
            let slot = region.memslot()?;
            // SAFETY: the slot's userspace memory is the region's host mapping, owned by
            // the region, which this memory keeps alive (in its collection) until the slot
            // is unbound by `remove_region` or `Drop`.
            unsafe { slot.bind(&self.vm) }?;
        }
        Ok(())
    }

    pub(crate) fn set_kvm_view_all(&self, state: PageState) -> Result<()> {
        for region in self.memory.memory().iter() {
            self.kvm_view.set(region.guest_range(), state)?;
        }
        Ok(())
    }

    /// The vm-memory view, shared: clone it into device threads, loaders, vCPU set-up.
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemoryPrivate> {
        self.memory.clone()
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// The backing strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The guest-physical range of every region, in address order.
    pub fn regions(&self) -> Vec<PageRange> {
        self.memory
            .memory()
            .iter()
            .map(PrivateRegion::guest_range)
            .collect()
    }

    /// The state of the page holding `gpa`, or `None` outside guest memory.
    pub fn state_of(&self, gpa: u64) -> Option<PageState> {
        let snapshot = self.memory.memory();
        let region = snapshot.find_region(GuestAddress(gpa))?;
        region.state_at(gpa - region.guest_range().start())
    }

    /// How many pages are private, over all regions.
    pub fn private_pages(&self) -> u64 {
        self.memory
            .memory()
            .iter()
            .map(|r| r.attributes().count_private())
            .sum()
    }

    /// Bytes of per-page metadata held, over all regions.
    pub fn metadata_bytes(&self) -> usize {
        self.memory
            .memory()
            .iter()
            .map(|r| r.attributes().metadata_bytes())
            .sum()
    }

    /// Subscribes `listener` to `range`; it hears of every conversion, discard and
    /// removal that touches it, clipped to it, until the returned handle is dropped.
    pub fn subscribe(&self, range: PageRange, listener: Arc<dyn MemoryListener>) -> Subscription {
        self.listeners.subscribe(range, listener)
    }

    /// How many listeners are subscribed.
    pub fn listener_count(&self) -> usize {
        self.listeners.count()
    }

    /// Splits `range` by region: `(region, offset in the region, length)` for each piece,
    /// in order; an item is an error naming the first address outside guest memory.
    pub(crate) fn split(snapshot: &GuestMemoryPrivate, range: PageRange) -> Split<'_> {
        Split {
            snapshot,
            range,
            at: range.start(),
        }
    }

    /// Adds a region over `guest`, bound to a new memslot, its pages in `initial` state.
    /// It is backed by `backing`: a file and offset (for example the file of a region
    /// removed before, to keep its content), or `None` for a new guest_memfd.
    ///
    /// Re-using a file keeps its content: with `initial` shared and the in-place strategy,
    /// whatever the guest had written there, private pages included, becomes readable by
    /// the host. Discard ranges first if that is not wanted.
    pub fn add_region(
        &self,
        guest: PageRange,
        backing: Option<(GuestMemfd, u64)>,
        initial: PageState,
    ) -> Result<()> {
        if in_callback() {
            return Err(Error::Reentrant { range: gpa(guest) });
        }
        let mut engine = self.lock_engine();
        let (gmem, offset) = match backing {
            Some(b) => b,
            None => (
                GuestMemfd::create(&self.vm, guest.len(), gmem_flags(self.strategy))?,
                0,
            ),
        };
        let limit = engine.slot_limit;
        let slot = engine
            .slots
            .allocate_id()
            .map_err(|_| Error::NoFreeSlot { limit })?;
        let result = self.insert_region(&mut engine, guest, gmem, offset, initial, slot);
        if result.is_err() {
            let _ = engine.slots.free_id(slot);
        }
        result
    }

    fn insert_region(
        &self,
        engine: &mut Engine,
        guest: PageRange,
        gmem: GuestMemfd,
        offset: u64,
        initial: PageState,
        slot: u32,
    ) -> Result<()> {
        let region = Arc::new(make_region(
            self.strategy,
            guest,
            gmem,
            offset,
            initial,
            slot,
        )?);
        let snapshot = self.memory.memory();
        let with = snapshot
            .insert_region(Arc::clone(&region))
            .map_err(|e| Error::Layout {
                range: gpa(guest),
                reason: e.to_string(),
            })?;
        let memslot = region.memslot()?;
        // SAFETY: the slot's userspace memory is the region's host mapping, which the
        // collection installed below keeps alive until `remove_region` or `Drop` unbinds.
        unsafe { memslot.bind(&self.vm) }?;
        // KVM keeps memory attributes per guest-physical address, across memslot
        // deletion: set them for the new region whatever they were before.
        if self.strategy == Strategy::Dual {
            if let Err(e) = self.kvm_view.set(guest, initial) {
                let _ = memslot.unbind(&self.vm);
                return Err(e);
            }
        }
        let guard = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        guard.replace(with);
        engine.current = self.memory.memory().into_inner();
        Ok(())
    }

    /// Removes the region that starts at `start`: listeners hear `discard` for its
    /// shared pages, its memslot is deleted (KVM drops its mappings; guest accesses to
    /// the range then exit as MMIO), and it leaves the vm-memory view. vCPUs may run.
    /// Returns the range and the file and offset that backed it, so it can be re-added.
    pub fn remove_region(&self, start: u64) -> Result<(PageRange, GuestMemfd, u64)> {
        if in_callback() {
            return Err(Error::Reentrant {
                range: GpaRange { start, len: 0 },
            });
        }
        let mut engine = self.lock_engine();
        let _listeners = self.listeners.hold();
        let snapshot = Arc::clone(&engine.current);
        let region = snapshot
            .iter()
            .find(|r| r.guest_range().start() == start)
            .ok_or(Error::NoSuchRegion(GuestAddress(start)))?;
        let guest = region.guest_range();
        let shared: Vec<PageRange> = shared_runs(region);
        self.listeners.discard(&shared);
        if let Err(e) = region.memslot().and_then(|slot| slot.unbind(&self.vm)) {
            self.listeners.restore(&shared);
            return Err(e.into());
        }
        let guard = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        let (without, _removed) = snapshot
            .remove_region(GuestAddress(start), guest.len())
            .map_err(|e| Error::Layout {
                range: gpa(guest),
                reason: e.to_string(),
            })?;
        guard.replace(without);
        engine.current = self.memory.memory().into_inner();
        let _ = engine.slots.free_id(region.slot());
        Ok((guest, region.gmem().clone(), region.gmem_offset()))
    }
}

/// The shared pages of a region, as guest-physical ranges.
pub(crate) fn shared_runs(region: &PrivateRegion) -> Vec<PageRange> {
    let base = region.guest_range().start();
    region
        .attributes()
        .runs(0, region.attributes().pages())
        .filter(|(_, _, s)| *s == PageState::Shared)
        .filter_map(|(first, count, _)| PageRange::from_pages(first, count).ok())
        .filter_map(|r| r.checked_add(base).ok())
        .collect()
}

pub(crate) fn gpa(range: PageRange) -> GpaRange {
    GpaRange {
        start: range.start(),
        len: range.len(),
    }
}

impl Drop for PrivateMemory {
    /// Unbinds every region this memory bound, from the engine's own list (not from the
    /// `GuestMemoryAtomic`, which a caller may have replaced). If a slot cannot be
    /// unbound (the kernel refused), KVM may still use its memory: every region is then
    /// leaked, mappings and all, rather than unmapped.
    fn drop(&mut self) {
        let engine = self.lock_engine();
        let mut all_unbound = true;
        for region in engine.current.iter() {
            all_unbound &= region
                .memslot()
                .is_ok_and(|slot| slot.unbind(&self.vm).is_ok());
        }
        if !all_unbound {
            std::mem::forget(Arc::clone(&engine.current));
        }
    }
}

/// Iterator over the pieces of a range, region by region ([`PrivateMemory::split`]).
pub(crate) struct Split<'a> {
    snapshot: &'a GuestMemoryPrivate,
    range: PageRange,
    at: u64,
}

impl<'a> Iterator for Split<'a> {
    type Item = Result<(&'a PrivateRegion, u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.range.end() {
            return None;
        }
        let Some(region) = self.snapshot.find_region(GuestAddress(self.at)) else {
            let first_outside = self.at;
            self.at = self.range.end();
            return Some(Err(Error::OutsideGuestMemory {
                range: gpa(self.range),
                first_outside,
            }));
        };
        let offset = self.at - region.guest_range().start();
        let len = (region.guest_range().end() - self.at).min(self.range.end() - self.at);
        self.at += len;
        Some(Ok((region, offset, len)))
    }
}
