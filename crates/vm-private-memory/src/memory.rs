// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest's RAM: regions, memslots, the conversion lock and the listeners.

use std::sync::{Arc, Mutex, MutexGuard};

use guest_memfd::{PageRange, VmMemoryOps};

use vm_allocator::IdAllocator;
use vm_memory::atomic::GuestMemoryLoadGuard;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestRegionCollection,
};

use crate::attributes::PageState;
use crate::error::{ByteRange, Error, Result};
use crate::guard::DirtyBitmap;
use crate::listener::{in_callback, Listeners, MemoryListener, Subscription};
use crate::region::GuestRegionPrivate;
use crate::strategy::Strategy;

/// The vm-memory view of the guest's RAM: use it wherever `GuestMemoryMmap` was used.
pub type GuestMemoryPrivate<B = ()> = GuestRegionCollection<GuestRegionPrivate<B>>;

/// State that only changes under the conversion lock.
pub(crate) struct Engine<B> {
    /// The engine's list of regions: the single source of truth. Every region in it is
    /// bound to its memslot, and a region's memslot is unbound exactly when the region
    /// leaves it (`remove_region`, `Drop`). Conversions read it here without an atomic
    /// load; the published views are copies of it.
    pub(crate) current: Arc<GuestMemoryPrivate<B>>,
    pub(crate) slots: IdAllocator,
    /// The memslot numbers this memory may use, `first..=last`.
    pub(crate) slot_range: (u32, u32),
    /// The host's memslots per address space (`KVM_CAP_NR_MEMSLOTS`).
    pub(crate) host_limit: u32,
    /// How long a conversion to private waits for host accesses in flight.
    pub(crate) patience: std::time::Duration,
    /// A conversion plan's buffer, kept between conversions (small ones only).
    pub(crate) scratch: Vec<PageRange>,
    /// The flags of every guest_memfd this memory creates (the strategy's and the
    /// builder's extra ones).
    pub(crate) gmem_flags: guest_memfd::GuestMemfdFlags,
    /// The ranges the builder kept free of RAM ([`crate::MemoryBuilder::reserve`]), which
    /// regions added later keep free too.
    pub(crate) reserved: Vec<PageRange>,
}

impl<B> Engine<B> {
    pub(crate) fn new(
        current: Arc<GuestMemoryPrivate<B>>,
        slots: IdAllocator,
        slot_range: (u32, u32),
        host_limit: u32,
    ) -> Self {
        Engine {
            current,
            slots,
            slot_range,
            host_limit,
            patience: crate::builder::DEFAULT_ACCESS_PATIENCE,
            scratch: Vec::new(),
            gmem_flags: guest_memfd::GuestMemfdFlags::empty(),
            reserved: Vec::new(),
        }
    }

    pub(crate) fn no_free_slot(&self) -> Error {
        Error::NoFreeSlot {
            first: self.slot_range.0,
            last: self.slot_range.1,
            host_limit: self.host_limit,
        }
    }
}

/// Guest RAM with private and shared pages, on one VM.
///
/// [`PrivateMemoryManager::memory`] gives the vm-memory view (a [`GuestMemoryAtomic`] over
/// [`GuestMemoryPrivate`]) for device emulation, loaders and vCPU set-up; this type owns
/// the memslots and changes pages between private and shared ([`PrivateMemoryManager::convert`]).
/// Dropping it unbinds every memslot it bound (see
/// [`crate::MemoryBuilder::vmm_binds_memslots`] for slots the VMM binds).
///
/// # The published view belongs to this memory
///
/// vm-memory lets any holder of a [`GuestMemoryAtomic`] replace its collection
/// (`GuestMemoryAtomic::lock`). Do not: this memory keeps its own list of regions, and
/// that list alone decides which memslots are bound, what conversions, `remove_region`
/// and `Drop` act on, and what [`PrivateMemoryManager::regions`] and [`PrivateMemoryManager::state`]
/// report. A replaced collection is overwritten by the next `add_region` or
/// `remove_region`, which publish this memory's list again; until then devices see the
/// replacement. No replacement can make a region lose its memslot or keep one.
pub struct PrivateMemoryManager<B: DirtyBitmap = ()> {
    pub(crate) vm: Arc<dyn VmMemoryOps>,
    pub(crate) strategy: Strategy,
    /// The view handed out by `memory()`.
    pub(crate) memory: GuestMemoryAtomic<GuestMemoryPrivate<B>>,
    /// The engine's list, readable without the conversion lock (listeners may query
    /// while it is held); never handed out, so never replaced by anyone else.
    listed: GuestMemoryAtomic<GuestMemoryPrivate<B>>,
    pub(crate) engine: Mutex<Engine<B>>,
    pub(crate) listeners: Listeners,
    /// Whether the VMM binds the memslots ([`crate::MemoryBuilder::vmm_binds_memslots`]);
    /// else this memory binds them at build and `add_region` and unbinds them at
    /// `remove_region` and drop.
    pub(crate) vmm_binds: bool,
    /// The VMM said it deleted every memslot ([`PrivateMemoryManager::release_memslots`]):
    /// until then a dropped memory whose memslots the VMM binds leaks its mappings
    /// rather than free memory KVM may still map. Atomic, so that neither the query nor
    /// the release needs the conversion lock (a listener may call them).
    pub(crate) memslots_released: std::sync::atomic::AtomicBool,
}

impl<B: DirtyBitmap> std::fmt::Debug for PrivateMemoryManager<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateMemoryManager")
            .field("strategy", &self.strategy)
            .field("regions", &self.regions())
            .finish()
    }
}

/// Binds every region of `regions` to its memslot. On failure the slots bound so far are
/// unbound again (see [`unbind_regions`]) and the error is returned.
pub(crate) fn bind_regions<B: DirtyBitmap>(
    vm: &dyn VmMemoryOps,
    regions: &Arc<GuestMemoryPrivate<B>>,
) -> Result<()> {
    for (i, region) in regions.iter().enumerate() {
        let bound = region.memslot().map_err(Error::from).and_then(|slot| {
            // SAFETY: the slot's userspace memory is the region's host mapping, owned by
            // the region; the collection keeps the region alive until the slot is
            // unbound (by `unbind_regions`, `remove_region` or `Drop`), or leaks it.
            unsafe { slot.bind(vm) }.map_err(Error::from)
        });
        if let Err(e) = bound {
            unbind_regions(vm, regions, i);
            return Err(e);
        }
    }
    Ok(())
}

/// Unbinds the memslots of the first `count` regions of `regions`. If KVM refuses one,
/// it may still use that region's memory: the collection is then leaked, mappings and
/// all, rather than unmapped. Returns whether every slot was unbound.
pub(crate) fn unbind_regions<B: DirtyBitmap>(
    vm: &dyn VmMemoryOps,
    regions: &Arc<GuestMemoryPrivate<B>>,
    count: usize,
) -> bool {
    let mut all_unbound = true;
    for region in regions.iter().take(count) {
        all_unbound &= region.memslot().is_ok_and(|slot| slot.unbind(vm).is_ok());
    }
    if !all_unbound {
        std::mem::forget(Arc::clone(regions));
    }
    all_unbound
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Assembles a memory over `current`, whose regions are all bound already.
    pub(crate) fn assemble(
        vm: Arc<dyn VmMemoryOps>,
        strategy: Strategy,
        current: Arc<GuestMemoryPrivate<B>>,
        engine: Engine<B>,
        vmm_binds: bool,
    ) -> Self {
        PrivateMemoryManager {
            vm,
            strategy,
            memory: GuestMemoryAtomic::new((*current).clone()),
            listed: GuestMemoryAtomic::new((*current).clone()),
            engine: Mutex::new(Engine { current, ..engine }),
            listeners: Listeners::default(),
            vmm_binds,
            memslots_released: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn lock_engine(&self) -> MutexGuard<'_, Engine<B>> {
        // The engine's state is only changed by whole, undoable steps; a panic in a
        // listener leaves it consistent.
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine's list of regions, without taking the conversion lock.
    pub(crate) fn listed(&self) -> GuestMemoryLoadGuard<GuestMemoryPrivate<B>> {
        self.listed.memory()
    }

    /// Makes `collection` the engine's list and publishes it, replacing whatever the
    /// published view held. Called with the engine locked, after KVM's memslots match
    /// `collection`.
    pub(crate) fn publish(&self, engine: &mut Engine<B>, collection: GuestMemoryPrivate<B>) {
        let replace = |view: &GuestMemoryAtomic<GuestMemoryPrivate<B>>| {
            view.lock()
                .unwrap_or_else(|p| p.into_inner())
                .replace(collection.clone());
        };
        replace(&self.listed);
        replace(&self.memory);
        engine.current = Arc::new(collection);
    }

    /// The vm-memory view, shared: clone it into device threads, loaders, vCPU set-up
    /// (`memory.guest_memory().memory()` is a snapshot of it, as with any
    /// [`GuestMemoryAtomic`]).
    pub fn guest_memory(&self) -> GuestMemoryAtomic<GuestMemoryPrivate<B>> {
        self.memory.clone()
    }

    /// The old name of [`PrivateMemoryManager::guest_memory`].
    #[deprecated(note = "renamed guest_memory(): memory.memory().memory() read as a stutter")]
    pub fn memory(&self) -> GuestMemoryAtomic<GuestMemoryPrivate<B>> {
        self.guest_memory()
    }

    /// The VM, as the operations this memory uses on it. A VMM that needs its own VM
    /// type (a kvm-ioctls `VmFd` for vCPUs, for example) keeps its own handle.
    pub fn vm(&self) -> &Arc<dyn VmMemoryOps> {
        &self.vm
    }

    /// The backing strategy in use.
    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The guest-physical range of every region, in address order: this memory's own
    /// list, whatever the published view holds.
    pub fn regions(&self) -> Vec<PageRange> {
        self.listed()
            .iter()
            .map(GuestRegionPrivate::guest_range)
            .collect()
    }

    /// The state of the page holding `gpa`, or `None` outside guest memory.
    pub fn state_of(&self, gpa: u64) -> Option<PageState> {
        let snapshot = self.listed();
        let region = snapshot.find_region(GuestAddress(gpa))?;
        region.state_at(gpa - region.guest_range().start())
    }

    /// How many pages are private, over all regions.
    pub fn private_pages(&self) -> u64 {
        self.listed()
            .iter()
            .map(|r| r.attributes().count_private())
            .sum()
    }

    /// Bytes of per-page metadata held, over all regions.
    pub fn metadata_bytes(&self) -> usize {
        self.listed()
            .iter()
            .map(|r| r.attributes().metadata_bytes())
            .sum()
    }

    /// The shared pages for device code: runs, host addresses and (dual strategy) the
    /// file another process may map. The owner hands this to the device code it trusts
    /// with files; the vm-memory view alone does not reach them.
    pub fn shared_pages(&self) -> crate::SharedPages {
        crate::SharedPages::new(self.listed.clone())
    }

    /// Subscribes `listener` to `range`; it hears of every conversion, discard and
    /// removal that touches it, clipped to it, until the returned handle is dropped.
    ///
    /// It hears of operations that start after this call returns: one already running
    /// may or may not tell it, and it is not told which pages are shared now
    /// ([`PrivateMemoryManager::subscribe_with_replay`] does both without a gap).
    pub fn subscribe(&self, range: PageRange, listener: Arc<dyn MemoryListener>) -> Subscription {
        self.listeners.subscribe(range, listener)
    }

    /// Subscribes `listener` to `range` and first offers it, with `populate`, every run
    /// of `range` that is shared now, in address order. No conversion, discard or
    /// removal runs in between: the listener hears every change after the runs it was
    /// offered, without a gap. This is how device code that maps shared pages (a VFIO
    /// IOMMU, a vhost-user backend's table) starts: it never has to read the bits and
    /// race a conversion.
    ///
    /// The listener is called with the conversion lock held: it must not convert,
    /// discard or change regions (those calls fail with [`Error::Reentrant`]).
    ///
    /// # Errors
    ///
    /// [`Error::Reentrant`] if called from a listener callback; [`Error::ListenerRefused`]
    /// naming the run the listener refused (or panicked on): it is not subscribed, and
    /// the runs it had accepted are taken back with `discard`, newest first. If it
    /// panics in one of those `discard`s it may still map that run:
    /// [`Error::RollbackFailed`] names the runs in `kept_shared`, and the listener keeps
    /// hearing `discard` for those runs alone (and nothing else) until it has let go of
    /// them.
    pub fn subscribe_with_replay(
        &self,
        range: PageRange,
        listener: Arc<dyn MemoryListener>,
    ) -> Result<Subscription> {
        if in_callback() {
            return Err(Error::Reentrant { range: gpa(range) });
        }
        let engine = self.lock_engine();
        let subscription = self.listeners.subscribe(range, Arc::clone(&listener));
        let replayed = {
            let _listeners = self.listeners.hold();
            let runs = crate::shared_runs::shared_runs(&*engine.current, range)
                .map(|run| run.guest_range());
            Listeners::replay(&listener, runs)
        };
        match replayed {
            Ok(()) => Ok(subscription),
            Err((run, reason, held)) => {
                // Unsubscribed before any operation can tell it of a change.
                drop(subscription);
                let refused = Error::ListenerRefused {
                    range: gpa(run),
                    reason,
                };
                if held.is_empty() {
                    return Err(refused);
                }
                // It may still map runs it could not let go of: it hears when they go
                // private, and of nothing else.
                self.listeners.follow_held(&listener, &held);
                drop(engine);
                Err(crate::convert::Undone {
                    kept_shared: held.into_iter().map(gpa).collect(),
                    ..Default::default()
                }
                .into_error(refused))
            }
        }
    }

    /// How many listeners are subscribed.
    pub fn listener_count(&self) -> usize {
        self.listeners.count()
    }

    /// Splits `range` by region: `(region, offset in the region, length)` for each piece,
    /// in order; an item is an error naming the first address outside guest memory.
    pub(crate) fn split(snapshot: &GuestMemoryPrivate<B>, range: PageRange) -> Split<'_, B> {
        Split {
            snapshot,
            range,
            at: range.start(),
        }
    }
}

pub(crate) fn gpa(range: PageRange) -> ByteRange {
    ByteRange {
        start: range.start(),
        len: range.len(),
    }
}

impl<B: DirtyBitmap> Drop for PrivateMemoryManager<B> {
    /// Unbinds every region this memory bound, from the engine's own list (not from the
    /// `GuestMemoryAtomic`, which a caller may have replaced). If a slot cannot be
    /// unbound (the kernel refused), KVM may still use its memory: every region is then
    /// leaked, mappings and all, rather than unmapped. Memory whose memslots the VMM
    /// binds leaks its mappings the same way, unless the VMM released them
    /// ([`PrivateMemoryManager::release_memslots`]).
    fn drop(&mut self) {
        let engine = self.lock_engine();
        if !self.vmm_binds {
            // The regions' file ranges stay held while an old view keeps a region (it
            // may read its shared pages): they are freed with the last view.
            unbind_regions(&*self.vm, &engine.current, engine.current.num_regions());
        } else if !self
            .memslots_released
            .load(std::sync::atomic::Ordering::Acquire)
        {
            // The VMM's slots may still use the mappings: keep them, for good.
            std::mem::forget(Arc::clone(&engine.current));
        }
    }
}

/// Iterator over the pieces of a range, region by region ([`PrivateMemoryManager::split`]).
pub(crate) struct Split<'a, B> {
    snapshot: &'a GuestMemoryPrivate<B>,
    range: PageRange,
    at: u64,
}

impl<'a, B: DirtyBitmap> Iterator for Split<'a, B> {
    type Item = Result<(&'a GuestRegionPrivate<B>, u64, u64)>;

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
