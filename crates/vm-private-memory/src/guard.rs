// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guard a host access holds while it may touch guest memory.
//!
//! vm-memory's `VolatileSlice<B>` carries a value of the region's bitmap slice type `B`
//! and clones it into every sub-slice. This crate's regions use [`HostAccess`], whose
//! slice type is an [`AccessGuard`]: a slice handed out by the vm-memory view publishes
//! its host range (see the `inflight` module) for exactly as long as it, or any slice
//! cut from it, lives. `Bytes` calls and `GuestMemory` helpers take such a slice, copy
//! and drop it, so a conversion to private waits for them; a caller that keeps a slice
//! makes conversions of *its* pages wait, then fail (rolled back) once the memory's
//! patience runs out, and should subscribe a listener to hear `discard` first.
//!
//! Guards are bound to their thread (`VolatileSlice` is neither `Send` nor `Sync`), so
//! the bookkeeping uses no atomic read-modify-write: a guard points at its thread's
//! entry, and sharing or ending it is a plain increment or decrement there, inlined into
//! the access path; only publishing looks up the thread's slot. The exception is a
//! thread without a slot (one exiting, past its slot's release, or beyond the
//! tracker's slots): its accesses are counted in one process-wide atomic.
//!
//! A thread holds up to `inflight::ENTRIES` accesses in entries of their own; past
//! that, further ones share one spill entry whose range grows to cover them all until
//! every one of them has ended. A thread that keeps a slice past eight others therefore
//! holds, for as long as it keeps it, every page any of its spilled accesses touched:
//! conversions of those pages fail with `HostAccessInFlight`. Keep slices short-lived.

use std::cell::Cell;
use std::marker::PhantomData;

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice, BS};

use crate::inflight::{access_barrier, Entry, Slot, Tracker};

/// Every thread's published accesses, process-wide: host address ranges are unique in a
/// process, so one tracker serves every memory.
#[cfg(not(loom))]
pub(crate) static TRACKER: Tracker = Tracker::new();

/// The calling thread's view of its slot. Cells only, no destructor: usable at any
/// point of the thread's life, including while other thread-locals are destroyed.
struct Local {
    slot: Cell<Option<&'static Slot>>,
    /// Set once the thread's slot was given back at exit, or none was left for it: its
    /// accesses are counted without a slot.
    exited: Cell<bool>,
}

#[cfg(not(loom))]
thread_local! {
    static LOCAL: Local = const {
        Local {
            slot: Cell::new(None),
            exited: Cell::new(false),
        }
    };
    /// Gives the slot back when the thread exits.
    static OWNER: SlotOwner = const { SlotOwner };
}

/// Its destructor releases the thread's slot.
struct SlotOwner;

impl Drop for SlotOwner {
    fn drop(&mut self) {
        #[cfg(not(loom))]
        LOCAL.with(|local| {
            local.exited.set(true);
            // With accesses still published (guards held by thread-locals destroyed
            // later) the slot stays this thread's for good, so their drops still reach it.
            if local.slot.get().is_some_and(|slot| TRACKER.release(slot)) {
                local.slot.set(None);
            }
        });
    }
}

/// The calling thread's slot, registering one on first use; `None` while the thread
/// exits.
#[cfg(not(loom))]
fn own_slot(local: &Local) -> Option<&'static Slot> {
    if let Some(slot) = local.slot.get() {
        return Some(slot);
    }
    if local.exited.get() || OWNER.try_with(|_| ()).is_err() {
        return None;
    }
    let slot = TRACKER.register();
    match slot {
        Some(slot) => local.slot.set(Some(slot)),
        // Every slot is taken: this thread's accesses are counted without one.
        None => local.exited.set(true),
    }
    slot
}

/// The calling thread's slot, if it has one (for a conversion on this thread).
#[cfg(not(loom))]
pub(crate) fn current_slot() -> Option<&'static Slot> {
    LOCAL.with(|local| local.slot.get())
}

/// What a guard holds: nothing (`None`: an empty access, or a region's own bitmap), or
/// an entry of the thread's slot (its spill entry included), shared with the other
/// guards of the same access, or [`UNREGISTERED`]. One pointer, so that a slice with a
/// guard is as small as it can be: vm-memory moves slices by value through its access
/// path.
type Held = Option<&'static Entry>;

/// Stands for one count of the tracker's accesses by threads without a slot: a guard
/// that holds it counts there (an atomic read-modify-write), never in the entry.
#[cfg(not(loom))]
static UNREGISTERED: Entry = Entry::unused();

/// Whether `entry` is [`UNREGISTERED`].
#[inline]
fn is_unregistered(entry: &Entry) -> bool {
    #[cfg(not(loom))]
    return std::ptr::eq(entry, &UNREGISTERED);
    #[cfg(loom)]
    {
        let _ = entry;
        false
    }
}

/// Publishes a host access for as long as it lives (see the module documentation), and
/// carries the slice `S` of the region's dirty bitmap.
///
/// This is the bitmap slice type of [`crate::GuestRegionPrivate`]'s `VolatileSlice`s.
/// Dirty tracking is `S`'s: `mark_dirty` and `dirty_at` go to it (with the default `()`
/// nothing is tracked), and [`AccessGuard::dirty_bitmap`] reads it.
#[derive(Debug)]
pub struct AccessGuard<S = ()> {
    held: Held,
    /// The region's dirty bitmap, at this slice's offset.
    inner: S,
    /// Guards stay on the thread that made them.
    _thread_bound: PhantomData<*const ()>,
}

impl<S> AccessGuard<S> {
    /// The slice of the region's dirty bitmap this guard carries (vm-memory's
    /// `RefSlice` for an `AtomicBitmap` region).
    pub fn dirty_bitmap(&self) -> &S {
        &self.inner
    }
}

impl<S> AccessGuard<S> {
    /// A guard that guards nothing, carrying `inner`.
    #[inline]
    pub(crate) fn nothing(inner: S) -> Self {
        AccessGuard {
            held: None,
            inner,
            _thread_bound: PhantomData,
        }
    }

    /// Publishes host addresses `[start, end)` (`end > start`), then executes the access
    /// side's barrier: check the page bits after this returns. The guard carries `inner`.
    #[inline]
    pub(crate) fn publish(start: usize, end: usize, inner: S) -> Self {
        AccessGuard {
            held: publish(start, end),
            inner,
            _thread_bound: PhantomData,
        }
    }
}

/// Publishes host addresses `[start, end)` and executes the access side's barrier. The
/// usual case (the thread has its slot and holds no other access) is inline: one read of
/// thread-local storage, one load and two stores; the rest out of line.
#[inline]
fn publish(start: usize, end: usize) -> Held {
    #[cfg(not(loom))]
    if let Some(entry) = LOCAL
        .with(|local| local.slot.get())
        .and_then(|slot| slot.publish_first(start, end))
    {
        access_barrier();
        return Some(entry);
    }
    publish_elsewhere(start, end)
}

/// [`publish`] when the thread's first entry is taken, or it has no slot yet.
#[inline(never)]
fn publish_elsewhere(start: usize, end: usize) -> Held {
    #[cfg(not(loom))]
    let held = match LOCAL.with(|local| local.slot.get()) {
        Some(slot) => slot.publish(start, end),
        None => publish_without_slot(start, end),
    };
    #[cfg(not(loom))]
    let held = Some(held);
    #[cfg(loom)]
    let held = {
        let _ = (start, end);
        None
    };
    access_barrier();
    held
}

/// [`publish`] for a thread without a slot yet: registers one, or counts the access in
/// the tracker where it cannot (the thread exits, or every slot is taken).
#[cfg(not(loom))]
#[cold]
#[inline(never)]
fn publish_without_slot(start: usize, end: usize) -> &'static Entry {
    match LOCAL.with(own_slot) {
        Some(slot) => slot.publish(start, end),
        None => {
            TRACKER.add_unregistered();
            // `access_barrier` may be a compiler barrier only (it pairs with the
            // conversion's membarrier, which this path may not get: `quiesce` skips it
            // while no other thread owns a slot and it saw no such access counted).
            crate::sync::fence(crate::sync::Ordering::SeqCst);
            &UNREGISTERED
        }
    }
}

/// Counts one more access by a thread without a slot (a guard cloned while its thread
/// exits). Inline, with no call: a guard's clone and drop must not make their callers in
/// vm-memory's access path set up for unwinding.
#[inline(always)]
fn share_unregistered() {
    #[cfg(not(loom))]
    TRACKER.add_unregistered();
}

/// Ends an access counted by the tracker. Inline, as [`share_unregistered`].
#[inline(always)]
fn end_unregistered() {
    #[cfg(not(loom))]
    TRACKER.remove_unregistered();
}

impl<S: Clone> Clone for AccessGuard<S> {
    #[inline]
    fn clone(&self) -> Self {
        self.with_inner(self.inner.clone())
    }
}

impl<S> AccessGuard<S> {
    /// Another guard of this publication, carrying `inner`.
    #[inline]
    fn with_inner<T>(&self, inner: T) -> AccessGuard<T> {
        if let Some(entry) = self.held {
            if is_unregistered(entry) {
                share_unregistered();
            } else {
                entry.add_guard();
            }
        }
        AccessGuard {
            held: self.held,
            inner,
            _thread_bound: PhantomData,
        }
    }
}

impl<S> Drop for AccessGuard<S> {
    #[inline]
    fn drop(&mut self) {
        if let Some(entry) = self.held {
            if is_unregistered(entry) {
                end_unregistered();
            } else {
                entry.drop_guard();
            }
        }
    }
}

impl<S: BitmapSlice> WithBitmapSlice<'_> for AccessGuard<S> {
    type S = AccessGuard<S>;
}

impl<S: BitmapSlice> BitmapSlice for AccessGuard<S> {}

impl<S: BitmapSlice> Bitmap for AccessGuard<S> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.inner.mark_dirty(offset, len)
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.inner.dirty_at(offset)
    }

    /// A sub-slice shares this guard's publication.
    #[inline]
    fn slice_at(&self, offset: usize) -> AccessGuard<S> {
        self.with_inner(self.inner.slice_at(offset))
    }
}

/// The bitmap type of [`crate::GuestRegionPrivate`]: the region's dirty bitmap `B`
/// (`()`, tracking nothing, by default; vm-memory's `AtomicBitmap` to track host
/// writes), whose slices carry an [`AccessGuard`].
///
/// Only a region makes one. A `HostAccess` of its own would let vm-memory code outside
/// the region hand out slices without the access guard: vm-memory's `IommuMemory`
/// replaces every slice's bitmap with a slice of its own IOVA bitmap, so over this
/// memory it would drop the guard and let a held slice write a page after it went
/// private. So there is no way to make one, and `IommuMemory` cannot be built over this
/// memory (translate IOVAs before reaching the vm-memory view instead):
///
/// ```compile_fail
/// let bitmap = vm_private_memory::HostAccess::<()>::default();
/// ```
#[derive(Clone, Copy, Debug)]
pub struct HostAccess<B = ()> {
    dirty: B,
}

impl<B> HostAccess<B> {
    /// Wraps the region's dirty bitmap.
    pub(crate) fn new(dirty: B) -> Self {
        HostAccess { dirty }
    }

    /// The region's dirty bitmap: what host code wrote through the vm-memory view.
    pub fn dirty_bitmap(&self) -> &B {
        &self.dirty
    }
}

impl<'a, B: Bitmap> WithBitmapSlice<'a> for HostAccess<B> {
    type S = AccessGuard<BS<'a, B>>;
}

impl<B: Bitmap> Bitmap for HostAccess<B> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.dirty.mark_dirty(offset, len)
    }

    #[inline]
    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty.dirty_at(offset)
    }

    /// A guard that guards nothing: only the region's checked accessors publish.
    #[inline]
    fn slice_at(&self, offset: usize) -> AccessGuard<BS<'_, B>> {
        AccessGuard::nothing(self.dirty.slice_at(offset))
    }
}

/// A dirty bitmap a region can carry: what vm-memory's `GuestMemoryMmap<B>` takes, and
/// shareable between threads. `()` (no tracking) and vm-memory's `AtomicBitmap` are the
/// usual ones; every type with these traits is one.
pub trait DirtyBitmap: NewBitmap + Send + Sync + std::fmt::Debug + 'static {}

impl<T: NewBitmap + Send + Sync + std::fmt::Debug + 'static> DirtyBitmap for T {}
