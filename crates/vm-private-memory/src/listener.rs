//! Invalidation listeners: host-side consumers of guest memory (VFIO DMA maps,
//! vhost-user tables, virtio queue caches) that must learn when host access to a range
//! is revoked or granted.
//!
//! This is the seed's `invalidate_page_range` lifted to userspace, with the contract of
//! QEMU's RamDiscardManager: [`MemoryListener::discard`] is called *before* host access to
//! a range is revoked (conversion to private, discard, region removal), and
//! [`MemoryListener::populate`] *after* it is granted (conversion to shared); `populate`
//! may refuse, which rolls the conversion back.

use std::cell::Cell;
use std::sync::{Arc, Mutex, Weak};

use guest_memfd::PageRange;

/// A host-side consumer of guest memory.
///
/// Callbacks run on the converting thread, while the conversion holds the memory's
/// conversion lock. A listener must not convert or discard memory (directly or through
/// anything it calls): such a call fails with [`crate::Error::Reentrant`].
pub trait MemoryListener: Send + Sync {
    /// Host access to `range` is about to be revoked: drop every mapping, cached pointer
    /// or DMA mapping of it now.
    fn discard(&self, range: PageRange);

    /// Host access to `range` has been granted. Return `Err(reason)` to refuse, which
    /// rolls the conversion back (the listener then receives `discard` for what it had
    /// accepted in the same conversion).
    fn populate(&self, range: PageRange) -> Result<(), String>;
}

struct Entry {
    id: u64,
    range: PageRange,
    listener: Arc<dyn MemoryListener>,
}

/// The listeners of one memory, in subscription order.
#[derive(Default)]
pub(crate) struct Listeners {
    entries: Arc<Mutex<Vec<Entry>>>,
    next_id: Mutex<u64>,
}

/// Whether `entries` is empty, without taking the lock when it is: conversions on memory
/// without listeners skip the notifications entirely. A subscription racing with a
/// conversion hears the next one.
fn is_empty(entries: &Arc<Mutex<Vec<Entry>>>) -> bool {
    // One strong reference (ours) and no weak ones: no subscription was ever handed out
    // or all were dropped.
    Arc::weak_count(entries) == 0
}

/// Keeps a listener subscribed; dropping it unsubscribes.
#[must_use = "dropping the subscription unsubscribes the listener at once"]
pub struct Subscription {
    id: u64,
    entries: Weak<Mutex<Vec<Entry>>>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(entries) = self.entries.upgrade() {
            lock(&entries).retain(|e| e.id != self.id);
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A listener that panicked cannot leave the list half-changed: every critical
    // section here is a single Vec operation.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is inside a listener callback.
pub(crate) fn in_callback() -> bool {
    IN_CALLBACK.with(Cell::get)
}

/// Runs `f` marked as a listener callback.
fn as_callback<R>(f: impl FnOnce() -> R) -> R {
    IN_CALLBACK.with(|c| c.set(true));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            IN_CALLBACK.with(|c| c.set(false));
        }
    }
    let _reset = Reset;
    f()
}

/// A listener's acceptance of a range, to undo on rollback.
pub(crate) struct Accepted {
    listener: Arc<dyn MemoryListener>,
    range: PageRange,
}

impl Listeners {
    pub(crate) fn subscribe(
        &self,
        range: PageRange,
        listener: Arc<dyn MemoryListener>,
    ) -> Subscription {
        let id = {
            let mut next = lock(&self.next_id);
            *next += 1;
            *next
        };
        lock(&self.entries).push(Entry {
            id,
            range,
            listener,
        });
        Subscription {
            id,
            entries: Arc::downgrade(&self.entries),
        }
    }

    pub(crate) fn count(&self) -> usize {
        lock(&self.entries).len()
    }

    /// The listeners overlapping `range`, with the clipped range each should hear.
    fn audience(&self, range: PageRange) -> Vec<(Arc<dyn MemoryListener>, PageRange)> {
        if is_empty(&self.entries) {
            return Vec::new();
        }
        lock(&self.entries)
            .iter()
            .filter_map(|e| {
                e.range
                    .intersection(&range)
                    .map(|clipped| (Arc::clone(&e.listener), clipped))
            })
            .collect()
    }

    /// Tells every listener overlapping each range, in order, that host access is going.
    pub(crate) fn discard(&self, ranges: &[PageRange]) {
        for range in ranges {
            for (listener, clipped) in self.audience(*range) {
                as_callback(|| listener.discard(clipped));
            }
        }
    }

    /// Offers each range to the listeners overlapping it, in order. On a refusal, the
    /// ranges already accepted are discarded again (in reverse) and the refusal returned.
    pub(crate) fn populate(
        &self,
        ranges: &[PageRange],
    ) -> Result<Vec<Accepted>, (PageRange, String)> {
        let mut accepted: Vec<Accepted> = Vec::new();
        for range in ranges {
            for (listener, clipped) in self.audience(*range) {
                match as_callback(|| listener.populate(clipped)) {
                    Ok(()) => accepted.push(Accepted {
                        listener,
                        range: clipped,
                    }),
                    Err(reason) => {
                        Self::withdraw(accepted);
                        return Err((clipped, reason));
                    }
                }
            }
        }
        Ok(accepted)
    }

    /// Takes back what listeners accepted, newest first.
    pub(crate) fn withdraw(accepted: Vec<Accepted>) {
        for a in accepted.into_iter().rev() {
            as_callback(|| a.listener.discard(a.range));
        }
    }

    /// Re-offers ranges after a rolled-back revocation; refusals are ignored, since the
    /// listener held these ranges before and the memory is back as it was.
    pub(crate) fn restore(&self, ranges: &[PageRange]) {
        for range in ranges {
            for (listener, clipped) in self.audience(*range) {
                let _ = as_callback(|| listener.populate(clipped));
            }
        }
    }
}
