// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host accesses in flight, and waiting them out before a page goes private.
//!
//! Every host access through the vm-memory view *publishes* the host address range it is
//! about to touch, then checks the page bits, then copies, then withdraws the range. A
//! conversion to private first sets the bits, then waits until no published range that
//! overlaps a private page remains. Either the access published before the conversion
//! looked (and the conversion waits for it), or the access checked the bits after they
//! changed (and refused): this is the classic store-buffering pattern, which needs a full
//! barrier between each side's store and its load.
//!
//! The barrier is asymmetric, as in userspace RCU: the access side, which runs on every
//! `Bytes` call, only stops the compiler from reordering; the conversion side makes every
//! thread of the process execute a full barrier with `membarrier(2)`
//! (`MEMBARRIER_CMD_PRIVATE_EXPEDITED`). Where `membarrier` is not available both sides
//! use a full fence. Under `--cfg loom` both sides use a full fence, which is the
//! semantics `membarrier` gives the pair.
//!
//! Each thread publishes into a [`Slot`] of its own (a few entries, one per access it
//! holds at once: a `VolatileSlice` keeps its entry until dropped); accesses beyond the
//! entries are counted in the slot's spill entry, whose range grows to cover all of them
//! until their count is back to zero. An entry counts the guards that share it (a
//! sub-slice shares its slice's entry): only the owning thread changes the count, with a
//! plain load and store, and a guard reaches its entry through a pointer, so sharing and
//! ending an access costs no lookup of thread-local storage and no atomic
//! read-modify-write.

use std::time::Duration;

use crate::sync::{fence, lock, AtomicBool, AtomicPtr, AtomicUsize, Mutex, Ordering};

/// Entries per thread: accesses one thread can hold at once before they are counted
/// conservatively in its slot's spill entry, under one range covering them all.
pub(crate) const ENTRIES: usize = 8;

/// One published access: host addresses `[start, end)`; `end == 0` when free.
#[derive(Debug)]
pub(crate) struct Entry {
    start: AtomicUsize,
    end: AtomicUsize,
    /// The guards sharing this entry beyond the first (a sub-slice shares its slice's
    /// entry). Only the slot's owner thread reads or writes it (an atomic only so that
    /// the slot can be shared). Counting from the second guard on keeps an access that
    /// is never shared at two stores to publish and one to withdraw.
    more_guards: AtomicUsize,
}

impl Entry {
    /// A free entry, for a `static`.
    #[cfg(not(loom))]
    pub(crate) const fn unused() -> Entry {
        Entry {
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            more_guards: AtomicUsize::new(0),
        }
    }

    fn new() -> Self {
        Entry {
            start: AtomicUsize::new(0),
            end: AtomicUsize::new(0),
            more_guards: AtomicUsize::new(0),
        }
    }

    /// Whether no access uses this entry. Owner thread only.
    #[inline]
    fn free(&self) -> bool {
        self.end.load(Ordering::Relaxed) == 0
    }

    /// Publishes `[start, end)` (`end > start`) in this free entry, for one guard.
    #[inline]
    fn publish(&self, start: usize, end: usize) {
        // Release on both: a conversion that reads this `end` (Acquire) reads this
        // `start` too, and one that reads this `start` (Acquire) while still holding an
        // older `end` knows that the access which used the entry before is over.
        self.start.store(start, Ordering::Release);
        self.end.store(end, Ordering::Release);
    }

    /// Counts one more guard of this entry's access. Owner thread only.
    #[inline]
    pub(crate) fn add_guard(&self) {
        let more = self.more_guards.load(Ordering::Relaxed);
        self.more_guards.store(more + 1, Ordering::Relaxed);
    }

    /// Ends one guard's share of this entry; the last one withdraws the access. Owner
    /// thread only.
    #[inline]
    pub(crate) fn drop_guard(&self) {
        let more = self.more_guards.load(Ordering::Relaxed);
        if more == 0 {
            self.end.store(0, Ordering::Release);
        } else {
            self.more_guards.store(more - 1, Ordering::Relaxed);
        }
    }
}

/// One thread's accesses in flight, as conversions see them. Only the owning thread
/// publishes; any thread may read.
#[derive(Debug)]
pub(crate) struct Slot {
    entries: [Entry; ENTRIES],
    /// The accesses beyond the entries, all under one range that grows to cover each
    /// new one until none is left.
    spill: Entry,
    /// Whether a live thread owns the slot.
    owned: AtomicBool,
}

impl Slot {
    fn new() -> Self {
        Slot {
            entries: std::array::from_fn(|_| Entry::new()),
            spill: Entry::new(),
            owned: AtomicBool::new(true),
        }
    }

    /// Publishes `[start, end)` in the first entry if it is free (the usual case: one
    /// access at a time), for one guard. Owner thread only.
    #[inline]
    pub(crate) fn publish_first(&self, start: usize, end: usize) -> Option<&Entry> {
        let entry = &self.entries[0];
        if !entry.free() {
            return None;
        }
        entry.publish(start, end);
        Some(entry)
    }

    /// Publishes `[start, end)` (`end > start`) for one guard, in a free entry or else
    /// in the spill entry, and returns that entry. Owner thread only; follow it with
    /// [`access_barrier`] before checking the page bits.
    pub(crate) fn publish(&self, start: usize, end: usize) -> &Entry {
        if let Some(entry) = self.entries.iter().find(|e| e.free()) {
            entry.publish(start, end);
            return entry;
        }
        let spill = &self.spill;
        if spill.free() {
            spill.publish(start, end);
        } else {
            // Only ever widened while in use: a conversion that reads the old `end` with
            // the new `start` sees a range covering the old accesses; the new access is
            // covered by the barrier pairing, as any newly published one.
            let old_start = spill.start.load(Ordering::Relaxed);
            let old_end = spill.end.load(Ordering::Relaxed);
            spill.start.store(start.min(old_start), Ordering::Release);
            spill.end.store(end.max(old_end), Ordering::Release);
            spill.add_guard();
        }
        spill
    }

    /// Whether nothing is published.
    fn idle(&self) -> bool {
        self.entries
            .iter()
            .chain(std::iter::once(&self.spill))
            .all(|e| e.end.load(Ordering::Acquire) == 0)
    }
}

/// Whether the two sides of the barrier are asymmetric (`membarrier` works), decided
/// when the first slot is registered, before any access can run.
#[cfg(not(loom))]
static ASYMMETRIC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The access side's barrier, between publishing and checking the bits.
#[inline]
pub(crate) fn access_barrier() {
    #[cfg(not(loom))]
    if ASYMMETRIC.load(std::sync::atomic::Ordering::Relaxed) {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        return;
    }
    fence(Ordering::SeqCst);
}

/// The conversion side's barrier, between changing the bits and reading the slots: every
/// thread of the process executes a full barrier before it returns. Fails with the
/// errno of `membarrier` if the kernel refused it (after a successful registration:
/// memory pressure, or a seccomp filter on this thread that refuses it): the access side
/// then has only a compiler barrier, so no fence here could make up for it, and the
/// conversion must not go on.
fn conversion_barrier() -> Result<(), std::io::Error> {
    #[cfg(not(loom))]
    if ASYMMETRIC.load(std::sync::atomic::Ordering::Relaxed) {
        let mut attempts = 0;
        loop {
            // SAFETY: membarrier takes integer arguments only; the return value is
            // checked.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    libc::MEMBARRIER_CMD_PRIVATE_EXPEDITED,
                    0,
                    0,
                )
            };
            if ret == 0 {
                return Ok(());
            }
            let err = std::io::Error::last_os_error();
            attempts += 1;
            // ENOMEM (the kernel's CPU mask) may pass; anything else will not.
            if attempts == 3 || err.raw_os_error() != Some(libc::ENOMEM) {
                return Err(err);
            }
            std::thread::yield_now();
        }
    }
    fence(Ordering::SeqCst);
    Ok(())
}

/// Registers the process for expedited private `membarrier`, once; where that fails the
/// access side falls back to a full fence.
#[cfg(not(loom))]
fn decide_barrier() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: membarrier takes integer arguments only; the return value is checked.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                libc::MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                0,
                0,
            )
        };
        ASYMMETRIC.store(ret == 0, std::sync::atomic::Ordering::SeqCst);
    });
}

/// The most threads that get a slot of their own; accesses by any further thread are
/// counted in [`Tracker`]'s `unregistered` (one atomic read-modify-write each).
#[cfg(not(loom))]
pub(crate) const MAX_SLOTS: usize = 4096;
#[cfg(loom)]
pub(crate) const MAX_SLOTS: usize = 4;

/// Every thread's slot. Slots are never freed, only handed to the next new thread once
/// their owner has exited with nothing published; the list is append-only, so a
/// conversion reads it without a lock.
#[derive(Debug)]
pub(crate) struct Tracker {
    /// Serialises registration and release.
    registry: Mutex<()>,
    /// `len` slots, each leaked from a `Box` once and never freed.
    slots: [AtomicPtr<Slot>; MAX_SLOTS],
    len: AtomicUsize,
    /// Accesses made by threads without a slot (exiting, or past `MAX_SLOTS`).
    unregistered: AtomicUsize,
}

/// Why [`Tracker::quiesce`] failed.
#[derive(Debug)]
pub(crate) enum QuiesceError {
    /// An access was still in flight when patience ran out, after this long.
    TimedOut(Duration),
    /// The conversion side's barrier (`membarrier`) failed.
    Barrier(std::io::Error),
}

/// How long a conversion waits for accesses in flight.
pub(crate) struct Patience {
    #[cfg(not(loom))]
    deadline: Option<std::time::Instant>,
    #[cfg(not(loom))]
    limit: Duration,
    spins: u32,
}

impl Patience {
    pub(crate) fn new(limit: Duration) -> Self {
        let _ = limit;
        Patience {
            #[cfg(not(loom))]
            deadline: None,
            #[cfg(not(loom))]
            limit,
            spins: 0,
        }
    }

    /// How long it has waited so far.
    fn waited(&self) -> Duration {
        #[cfg(not(loom))]
        if let Some(deadline) = self.deadline {
            let started = deadline.checked_sub(self.limit).unwrap_or(deadline);
            return std::time::Instant::now().saturating_duration_since(started);
        }
        Duration::ZERO
    }

    /// Waits a little; false once patience has run out.
    fn wait(&mut self) -> bool {
        self.spins = self.spins.saturating_add(1);
        #[cfg(loom)]
        {
            loom::thread::yield_now();
            self.spins < 3
        }
        #[cfg(not(loom))]
        {
            let now = std::time::Instant::now();
            let deadline = *self
                .deadline
                .get_or_insert_with(|| now.checked_add(self.limit).unwrap_or(now));
            if now >= deadline {
                return false;
            }
            if self.spins < 64 {
                std::hint::spin_loop();
            } else if self.spins < 128 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20).min(deadline - now));
            }
            true
        }
    }
}

impl Tracker {
    /// An empty tracker.
    #[cfg(not(loom))]
    pub(crate) const fn new() -> Self {
        Tracker {
            registry: Mutex::new(()),
            slots: [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_SLOTS],
            len: AtomicUsize::new(0),
            unregistered: AtomicUsize::new(0),
        }
    }

    /// An empty tracker.
    #[cfg(loom)]
    pub(crate) fn new() -> Self {
        Tracker {
            registry: Mutex::new(()),
            slots: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
            len: AtomicUsize::new(0),
            unregistered: AtomicUsize::new(0),
        }
    }

    /// The slots handed out so far.
    fn slots(&self) -> impl Iterator<Item = &'static Slot> + '_ {
        let len = self.len.load(Ordering::Acquire);
        self.slots[..len].iter().map(|p| {
            // SAFETY: the first `len` pointers were stored (before `len`, with Release,
            // read above with Acquire) from `Box::leak`, so each points to a live `Slot`
            // that is never freed.
            unsafe { &*p.load(Ordering::Acquire) }
        })
    }

    /// A slot for the calling thread, which owns it until [`Tracker::release`]; `None`
    /// once `MAX_SLOTS` threads own one.
    pub(crate) fn register(&self) -> Option<&'static Slot> {
        #[cfg(not(loom))]
        decide_barrier();
        let registry = lock(&self.registry);
        let slot = match self.slots().find(|s| !s.owned.load(Ordering::Relaxed)) {
            Some(slot) => {
                slot.owned.store(true, Ordering::SeqCst);
                slot
            }
            None => {
                let len = self.len.load(Ordering::Relaxed);
                if len == MAX_SLOTS {
                    return None;
                }
                let slot: &'static Slot = Box::leak(Box::new(Slot::new()));
                self.slots[len].store(std::ptr::from_ref(slot).cast_mut(), Ordering::Release);
                self.len.store(len + 1, Ordering::SeqCst);
                slot
            }
        };
        drop(registry);
        // Pairs with the fence in `quiesce`: a conversion that did not see this slot
        // owned has its bit changes seen by this thread's checks.
        fence(Ordering::SeqCst);
        Some(slot)
    }

    /// Gives `slot` back (its thread is exiting) and says whether it did. A slot with
    /// something still published stays owned for good, so that its late withdrawals
    /// cannot reach another thread's accesses.
    pub(crate) fn release(&self, slot: &'static Slot) -> bool {
        if !slot.idle() {
            return false;
        }
        let _registry = lock(&self.registry);
        slot.owned.store(false, Ordering::Release);
        true
    }

    /// Counts an access by a thread without a slot. The caller executes a full fence
    /// next: [`access_barrier`] may be a compiler barrier only.
    #[inline(always)]
    pub(crate) fn add_unregistered(&self) {
        self.unregistered.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends an access counted by [`Tracker::add_unregistered`].
    #[inline(always)]
    pub(crate) fn remove_unregistered(&self) {
        self.unregistered.fetch_sub(1, Ordering::Release);
    }

    /// Waits until no access that may have passed its check is in flight on a range that
    /// `blocked` says is private now. Call it after the bits changed. `own` is the calling
    /// thread's slot, if it has one: when no other thread owns a slot and no access
    /// without a slot is counted the barrier is skipped, since a thread registering later
    /// synchronises with this call through the SeqCst fences here and in
    /// [`Tracker::register`]. Fails once `patience` runs out, or if the barrier fails.
    pub(crate) fn quiesce(
        &self,
        own: Option<&'static Slot>,
        blocked: impl Fn(usize, usize) -> bool,
        mut patience: Patience,
    ) -> Result<(), QuiesceError> {
        // Pairs with the fence in `register`: either this sees a new thread's slot
        // owned, or that thread's checks see the bits this conversion changed.
        fence(Ordering::SeqCst);
        let others = self.slots().any(|s| {
            s.owned.load(Ordering::SeqCst) && !own.is_some_and(|own| std::ptr::eq(own, s))
        });
        if others || self.unregistered.load(Ordering::SeqCst) > 0 {
            conversion_barrier().map_err(QuiesceError::Barrier)?;
        }
        // The clock is read only once something has to be waited for.
        let timed_out = |patience: &Patience| Err(QuiesceError::TimedOut(patience.waited()));
        for slot in self.slots() {
            for entry in slot.entries.iter().chain(std::iter::once(&slot.spill)) {
                loop {
                    let end = entry.end.load(Ordering::Acquire);
                    if end == 0 || !blocked(entry.start.load(Ordering::Acquire), end) {
                        break;
                    }
                    if !patience.wait() {
                        return timed_out(&patience);
                    }
                }
            }
        }
        while self.unregistered.load(Ordering::Acquire) > 0 {
            if !patience.wait() {
                return timed_out(&patience);
            }
        }
        Ok(())
    }
}

#[cfg(all(test, loom))]
mod loom_model {
    //! The protocol, model-checked: a host access racing a conversion to private never
    //! touches the page once the conversion has returned.

    use std::sync::Arc;

    use loom::cell::UnsafeCell;

    use super::*;
    use crate::attributes::{PageAttributes, PageState};

    /// The guest's page: the access and the conversion's follow-up (the punch, the
    /// guest's private writes) both write it; loom reports any unsynchronised pair.
    struct Page(UnsafeCell<u64>);
    // SAFETY: every access to the cell is checked by loom's causality tracking, which is
    // what this model is for.
    unsafe impl Sync for Page {}

    /// What the access side does around the one access the conversion races.
    #[derive(Clone, Copy, PartialEq)]
    enum Variant {
        /// Publish, barrier, check, copy, withdraw.
        Plain,
        /// As `Plain`, but the copy goes through a sub-slice that outlives the slice
        /// whose guard published the access.
        SubSlice,
        /// Broken on purpose: check before publishing. The model must catch it.
        CheckFirst,
        /// The entry is used again at once for an access elsewhere, so the conversion
        /// may read it mid-change.
        Reuse,
        /// The thread gives its slot back (it exits) and another thread takes it over
        /// for an access elsewhere.
        Recycle,
        /// The access reads the region's count of private pages first, and the bits
        /// only where it is not zero; the conversion raises the count before it sets
        /// the bit (and, rolling back, clears the bit before it lowers the count).
        CountShortcut,
    }

    fn model(variant: Variant) {
        loom::model(move || {
            let tracker: &'static Tracker = Box::leak(Box::new(Tracker::new()));
            let bits = Arc::new(PageAttributes::new(1, PageState::Shared));
            let count = Arc::new(crate::sync::AtomicU64::new(0));
            let page = Arc::new(Page(UnsafeCell::new(0)));
            let host = 0x1000usize;
            let elsewhere = host + 0x10000;

            let reader = {
                let (bits, page, count) =
                    (Arc::clone(&bits), Arc::clone(&page), Arc::clone(&count));
                loom::thread::spawn(move || {
                    let slot = tracker.register().unwrap();
                    let (entry, shared) = if variant == Variant::CheckFirst {
                        let shared = bits.first_private(0, 0).is_none();
                        (slot.publish(host, host + 8), shared)
                    } else {
                        let entry = slot.publish(host, host + 8);
                        access_barrier();
                        let shared = if variant == Variant::CountShortcut
                            && count.load(Ordering::Acquire) == 0
                        {
                            true
                        } else {
                            bits.first_private(0, 0).is_none()
                        };
                        (entry, shared)
                    };
                    if variant == Variant::SubSlice {
                        // A sub-slice is cut, then the slice it came from is dropped.
                        entry.add_guard();
                        entry.drop_guard();
                    }
                    if shared {
                        // SAFETY: loom checks this write against the conversion's.
                        page.0.with_mut(|p| unsafe { *p = 1 });
                    }
                    entry.drop_guard();
                    match variant {
                        Variant::Reuse => {
                            let again = slot.publish(elsewhere, elsewhere + 8);
                            access_barrier();
                            again.drop_guard();
                        }
                        Variant::Recycle => {
                            assert!(tracker.release(slot));
                        }
                        _ => {}
                    }
                })
            };
            let successor = (variant == Variant::Recycle).then(|| {
                loom::thread::spawn(move || {
                    let slot = tracker.register().unwrap();
                    let entry = slot.publish(elsewhere, elsewhere + 8);
                    access_barrier();
                    entry.drop_guard();
                })
            });

            if variant == Variant::CountShortcut {
                count.fetch_add(1, Ordering::AcqRel);
            }
            bits.set(0, 1, PageState::Private);
            let done = tracker.quiesce(
                None,
                |s, e| s < host + 4096 && e > host,
                Patience::new(Duration::ZERO),
            );
            if done.is_ok() {
                // The conversion went through: the guest (or the punch) now owns the page.
                // SAFETY: loom checks this write against the access's.
                page.0.with_mut(|p| unsafe { *p = 2 });
            } else {
                bits.set(0, 1, PageState::Shared);
                if variant == Variant::CountShortcut {
                    count.fetch_sub(1, Ordering::AcqRel);
                }
            }
            reader.join().unwrap();
            if let Some(successor) = successor {
                successor.join().unwrap();
            }
        });
    }

    #[test]
    fn an_access_racing_a_conversion_never_touches_the_page_after_it() {
        model(Variant::Plain);
    }

    #[test]
    fn an_access_through_a_sub_slice_is_waited_for_until_its_last_guard() {
        model(Variant::SubSlice);
    }

    #[test]
    fn an_access_that_finds_no_private_page_counted_is_still_waited_for() {
        model(Variant::CountShortcut);
    }

    #[test]
    fn an_entry_used_again_at_once_is_still_waited_for() {
        model(Variant::Reuse);
    }

    #[test]
    fn a_slot_handed_to_another_thread_is_still_waited_for() {
        model(Variant::Recycle);
    }

    #[test]
    #[should_panic]
    fn the_model_catches_an_access_that_checks_before_it_publishes() {
        model(Variant::CheckFirst);
    }
}
