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
//! the bookkeeping is thread-local and uses no atomic read-modify-write.

use std::cell::Cell;
use std::marker::PhantomData;

use vm_memory::bitmap::{Bitmap, BitmapSlice, WithBitmapSlice};

use crate::inflight::{access_barrier, Slot, Tracker, ENTRIES};

/// Every thread's published accesses, process-wide: host address ranges are unique in a
/// process, so one tracker serves every memory.
#[cfg(not(loom))]
pub(crate) static TRACKER: Tracker = Tracker::new();

/// The calling thread's view of its slot. Cells only, no destructor: usable at any
/// point of the thread's life, including while other thread-locals are destroyed.
struct Local {
    slot: Cell<Option<&'static Slot>>,
    /// Bit `i` set: entry `i` is in use.
    used: Cell<u32>,
    /// Guards sharing each entry (a clone shares its original's entry).
    refs: [Cell<u64>; ENTRIES],
    /// Set once the thread's slot was given back at exit, or none was left for it: its
    /// accesses are counted without a slot.
    exited: Cell<bool>,
}

#[cfg(not(loom))]
thread_local! {
    static LOCAL: Local = const {
        Local {
            slot: Cell::new(None),
            used: Cell::new(0),
            refs: [const { Cell::new(0) }; ENTRIES],
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// Guards nothing (an empty access, or a region's own bitmap).
    Nothing,
    /// Entry `i` of the thread's slot.
    Entry(u8),
    /// Counted in the slot's overflow, for host addresses `[start, end)`.
    Overflow {
        /// First byte.
        start: usize,
        /// One past the last byte.
        end: usize,
    },
    /// Counted in the tracker's unregistered accesses.
    Unregistered,
}

/// Publishes a host access for as long as it lives (see the module documentation).
///
/// This is the bitmap slice type of [`crate::GuestRegionPrivate`]'s `VolatileSlice`s. It tracks
/// no dirty pages: `mark_dirty` does nothing and `dirty_at` is always false.
#[derive(Debug)]
pub struct AccessGuard {
    held: Held,
    /// Guards stay on the thread that made them.
    _thread_bound: PhantomData<*const ()>,
}

impl AccessGuard {
    /// A guard that guards nothing.
    pub(crate) fn nothing() -> Self {
        AccessGuard {
            held: Held::Nothing,
            _thread_bound: PhantomData,
        }
    }

    /// Publishes host addresses `[start, end)` (`end > start`), then executes the access
    /// side's barrier: check the page bits after this returns.
    #[inline(never)]
    pub(crate) fn publish(start: usize, end: usize) -> Self {
        #[cfg(not(loom))]
        let held = LOCAL.with(|local| {
            let Some(slot) = own_slot(local) else {
                TRACKER.add_unregistered();
                return Held::Unregistered;
            };
            let free = !local.used.get() & ((1u32 << ENTRIES) - 1);
            if free == 0 {
                slot.add_overflow(start, end);
                return Held::Overflow { start, end };
            }
            let index = free.trailing_zeros() as usize;
            local.used.set(local.used.get() | 1 << index);
            local.refs[index].set(1);
            slot.publish(index, start, end);
            Held::Entry(index as u8)
        });
        #[cfg(loom)]
        let held = {
            let _ = (start, end);
            Held::Nothing
        };
        access_barrier();
        AccessGuard {
            held,
            _thread_bound: PhantomData,
        }
    }
}

impl Clone for AccessGuard {
    #[inline]
    fn clone(&self) -> Self {
        if self.held != Held::Nothing {
            self.share();
        }
        AccessGuard {
            held: self.held,
            _thread_bound: PhantomData,
        }
    }
}

impl AccessGuard {
    /// Counts one more guard of this publication. Out of line, like [`AccessGuard::end`]:
    /// the access path stays small enough for vm-memory's generic code around it to be
    /// inlined (measured: `read_obj::<u64>` went from 14 ns to 70 ns with it inlined).
    #[inline(never)]
    fn share(&self) {
        #[cfg(not(loom))]
        match self.held {
            Held::Nothing => {}
            Held::Entry(i) => LOCAL.with(|local| {
                let refs = &local.refs[usize::from(i)];
                refs.set(refs.get() + 1);
            }),
            Held::Overflow { start, end } => LOCAL.with(|local| {
                if let Some(slot) = local.slot.get() {
                    slot.add_overflow(start, end);
                }
            }),
            Held::Unregistered => TRACKER.add_unregistered(),
        }
    }

    /// Ends this guard's share of its publication.
    #[inline(never)]
    fn end(&self) {
        #[cfg(not(loom))]
        match self.held {
            Held::Nothing => {}
            Held::Entry(i) => LOCAL.with(|local| {
                let i = usize::from(i);
                let refs = local.refs[i].get() - 1;
                local.refs[i].set(refs);
                if refs == 0 {
                    local.used.set(local.used.get() & !(1 << i));
                    if let Some(slot) = local.slot.get() {
                        slot.withdraw(i);
                    }
                }
            }),
            Held::Overflow { .. } => LOCAL.with(|local| {
                if let Some(slot) = local.slot.get() {
                    slot.remove_overflow();
                }
            }),
            Held::Unregistered => TRACKER.remove_unregistered(),
        }
    }
}

impl Drop for AccessGuard {
    #[inline]
    fn drop(&mut self) {
        if self.held != Held::Nothing {
            self.end();
        }
    }
}

impl WithBitmapSlice<'_> for AccessGuard {
    type S = AccessGuard;
}

impl BitmapSlice for AccessGuard {}

impl Bitmap for AccessGuard {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    /// A sub-slice shares this guard's publication.
    fn slice_at(&self, _offset: usize) -> AccessGuard {
        self.clone()
    }
}

/// The bitmap type of [`crate::GuestRegionPrivate`]: no dirty tracking, and slices that
/// carry an [`AccessGuard`].
#[derive(Clone, Copy, Debug, Default)]
pub struct HostAccess;

impl<'a> WithBitmapSlice<'a> for HostAccess {
    type S = AccessGuard;
}

impl Bitmap for HostAccess {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    /// A guard that guards nothing: only the region's checked accessors publish.
    fn slice_at(&self, _offset: usize) -> AccessGuard {
        AccessGuard::nothing()
    }
}
