// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

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
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, Weak};

use guest_memfd::PageRange;

use crate::error::ListenerRefusal;

/// A host-side consumer of guest memory.
///
/// Callbacks run on the converting thread, while the conversion holds the memory's
/// conversion lock. A listener must not convert or discard memory (directly or through
/// anything it calls): such a call fails with [`crate::Error::Reentrant`].
pub trait MemoryListener: Send + Sync {
    /// Host access to `range` is about to be revoked: drop every mapping, cached pointer
    /// or DMA mapping of it now.
    ///
    /// A listener that cannot let go (an IOMMU refused the unmap, a backend did not
    /// confirm) says so by panicking: the panic is caught, and the revocation stops
    /// with the range still shared ([`crate::Error::ListenerRefused`]); during a
    /// rollback, the range stays shared ([`crate::Error::RollbackFailed`]'s
    /// `kept_shared`). This needs `panic = "unwind"`: with `panic = "abort"`, the
    /// process ends instead. `std::panic::resume_unwind(Box::new(reason))`, with a
    /// `String` reason, refuses without running the panic hook (no report on stderr,
    /// which a guest converting the range again and again would otherwise fill); the
    /// reason reaches [`crate::ListenerRefusal::Panicked`].
    fn discard(&self, range: PageRange);

    /// Host access to `range` has been granted. Return an error to refuse, which rolls
    /// the conversion back (the listener then receives `discard` for what it had
    /// accepted in the same conversion); the conversion's
    /// [`crate::Error::ListenerRefused`] carries it. A `&str` or `String` converts with
    /// `.into()`.
    ///
    /// A refusal must leave nothing of `range` mapped: it is not told `discard` for it.
    /// A panic counts as a refusal that may have mapped part of the range, so it is
    /// told `discard(range)` with the listeners that accepted.
    ///
    /// # Errors
    ///
    /// Whatever the listener's reason for refusing the range is.
    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>>;
}

struct Entry {
    id: u64,
    range: PageRange,
    listener: Arc<dyn MemoryListener>,
}

/// What subscriptions and notifications share.
#[derive(Default)]
struct Registry {
    entries: Mutex<Vec<Entry>>,
    /// Held (shared) for a whole conversion, discard or removal ([`Listeners::hold`]);
    /// taken exclusively by a dropped `Subscription`, so that once `drop` returns no
    /// operation that might still call its listener is running.
    gate: RwLock<()>,
}

/// The listeners of one memory, in subscription order.
#[derive(Default)]
pub(crate) struct Listeners {
    registry: Arc<Registry>,
    next_id: Mutex<u64>,
}

/// Keeps a listener subscribed; dropping it unsubscribes. Once `drop` returns the
/// listener is not called again: a conversion, discard or removal already running is
/// waited for (unless the subscription is dropped on the thread running it, from inside
/// a listener callback or as a listener it held is dropped, or was made after that
/// operation started).
#[must_use = "dropping the subscription unsubscribes the listener at once"]
pub struct Subscription {
    id: u64,
    registry: Weak<Registry>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(registry) = self.registry.upgrade() {
            lock(&registry.entries).retain(|e| e.id != self.id);
            // Wait for a notification pass that may hold a clone of our listener; not on
            // a thread that runs one (a callback, or the last clone of a listener that
            // owns a subscription dropped by a pass), which would wait for itself.
            if !in_callback() && HOLDING.with(Cell::get) == 0 {
                drop(registry.gate.write().unwrap_or_else(|p| p.into_inner()));
            }
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
    // Every critical section here is a single Vec operation, so a panic elsewhere cannot
    // leave the list half-changed.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

thread_local! {
    static IN_CALLBACK: Cell<bool> = const { Cell::new(false) };
    /// How many operations on this thread hold a registry's gate ([`Listeners::hold`]).
    static HOLDING: Cell<u32> = const { Cell::new(0) };
}

/// An operation's hold on the gate: dropped subscriptions wait until it goes.
pub(crate) struct Held<'a> {
    _gate: RwLockReadGuard<'a, ()>,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        HOLDING.with(|h| h.set(h.get() - 1));
    }
}

/// Whether the current thread is inside a listener callback.
pub(crate) fn in_callback() -> bool {
    IN_CALLBACK.with(Cell::get)
}

/// Runs `f`, code of the VMM's called with the conversion lock held (a launch step),
/// marked as a callback: its calls back into the memory fail with
/// [`crate::Error::Reentrant`] instead of waiting for the lock this thread holds. A
/// panic in it goes on (the mark is cleared on the way).
pub(crate) fn as_marked_callback<R>(f: impl FnOnce() -> R) -> R {
    struct Unmark(bool);
    impl Drop for Unmark {
        fn drop(&mut self) {
            IN_CALLBACK.with(|c| c.set(self.0));
        }
    }
    let _unmark = Unmark(IN_CALLBACK.with(|c| c.replace(true)));
    f()
}

/// Runs a listener callback `f`, marked as such. A panic in it is caught and returned as
/// `Err`, so that a misbehaving listener cannot leave a conversion half done.
fn as_callback<R>(f: impl FnOnce() -> R) -> Result<R, ListenerRefusal> {
    IN_CALLBACK.with(|c| c.set(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    IN_CALLBACK.with(|c| c.set(false));
    result.map_err(|payload| ListenerRefusal::Panicked {
        message: panic_message(&*payload),
    })
}

/// A caught panic's message (`"a panic"` if it was neither a `&str` nor a `String`).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// A revocation a listener stopped ([`Listeners::discard`]).
pub(crate) struct Revocation {
    /// The range the listener could not let go of.
    pub(crate) range: PageRange,
    /// Why (its panic).
    pub(crate) reason: ListenerRefusal,
    /// Parts of the ranges other listeners had let go of that they refused to take back.
    pub(crate) refused_back: Vec<PageRange>,
}

/// An offer a listener refused ([`Listeners::populate`]).
pub(crate) struct Refusal {
    /// The range refused.
    pub(crate) range: PageRange,
    /// Why.
    pub(crate) reason: ListenerRefusal,
    /// What listeners had accepted before it, for the caller to take back.
    pub(crate) accepted: Vec<Accepted>,
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
        lock(&self.registry.entries).push(Entry {
            id,
            range,
            listener,
        });
        Subscription {
            id,
            registry: Arc::downgrade(&self.registry),
        }
    }

    /// Keeps dropped subscriptions waiting until the returned guard goes: hold it for the
    /// whole of an operation that notifies listeners (including its rollback). Nothing
    /// to hold (and no lock taken) while nothing is subscribed; a subscription made while
    /// such an operation runs is not waited for by it.
    pub(crate) fn hold(&self) -> Option<Held<'_>> {
        self.any().then(|| {
            let gate = self.registry.gate.read().unwrap_or_else(|p| p.into_inner());
            HOLDING.with(|h| h.set(h.get() + 1));
            Held { _gate: gate }
        })
    }

    /// Whether anything may be subscribed (a `Subscription` still refers to the
    /// registry). While not, every notification pass is empty.
    #[inline]
    pub(crate) fn any(&self) -> bool {
        Arc::weak_count(&self.registry) > 0
    }

    pub(crate) fn count(&self) -> usize {
        lock(&self.registry.entries).len()
    }

    /// Runs a notification pass over the listeners overlapping `ranges`: `each` gets a
    /// listener and the range clipped to its subscription, in range order, then
    /// subscription order. Skips all locking when nothing was ever subscribed or every
    /// subscription is gone (no `Subscription` holds a reference to the registry).
    fn pass(
        &self,
        ranges: &[PageRange],
        mut each: impl FnMut(&Arc<dyn MemoryListener>, PageRange) -> bool,
    ) {
        if !self.any() {
            return;
        }
        for range in ranges {
            let audience: Vec<_> = lock(&self.registry.entries)
                .iter()
                .filter_map(|e| {
                    e.range
                        .intersection(range)
                        .map(|clipped| (Arc::clone(&e.listener), clipped))
                })
                .collect();
            for (listener, clipped) in audience {
                if !each(&listener, clipped) {
                    return;
                }
            }
        }
    }

    /// Tells every listener overlapping each range, in order, that host access is going.
    /// A listener that panics has not let go of its access: the listeners already told
    /// get their ranges back (newest first) and the panic is returned with the parts of
    /// those ranges refused back, so that the revocation does not go ahead.
    pub(crate) fn discard(&self, ranges: &[PageRange]) -> Result<(), Revocation> {
        let mut told: Vec<Accepted> = Vec::new();
        let mut failed = None;
        self.pass(ranges, |listener, range| {
            match as_callback(|| listener.discard(range)) {
                Ok(()) => {
                    told.push(Accepted {
                        listener: Arc::clone(listener),
                        range,
                    });
                    true
                }
                Err(reason) => {
                    failed = Some((range, reason));
                    false
                }
            }
        });
        match failed {
            None => Ok(()),
            Some((range, reason)) => {
                let refused_back = told
                    .into_iter()
                    .rev()
                    .filter(|t| !matches!(as_callback(|| t.listener.populate(t.range)), Ok(Ok(()))))
                    .map(|t| t.range)
                    .collect();
                Err(Revocation {
                    range,
                    reason,
                    refused_back,
                })
            }
        }
    }

    /// Offers each range to the listeners overlapping it, in order. On a refusal (or a
    /// panic), returns it with what was accepted before it: the caller takes that back
    /// ([`Listeners::withdraw`]) as part of its rollback.
    pub(crate) fn populate(&self, ranges: &[PageRange]) -> Result<Vec<Accepted>, Refusal> {
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut refusal = None;
        self.pass(ranges, |listener, range| {
            match as_callback(|| listener.populate(range))
                .and_then(|r| r.map_err(ListenerRefusal::Refused))
            {
                Ok(()) => {
                    accepted.push(Accepted {
                        listener: Arc::clone(listener),
                        range,
                    });
                    true
                }
                Err(reason) => {
                    // A listener that panicked may have mapped part of the range: it is
                    // asked to let go of it with the others.
                    if matches!(reason, ListenerRefusal::Panicked { .. }) {
                        accepted.push(Accepted {
                            listener: Arc::clone(listener),
                            range,
                        });
                    }
                    refusal = Some((range, reason));
                    false
                }
            }
        });
        match refusal {
            None => Ok(accepted),
            Some((range, reason)) => Err(Refusal {
                range,
                reason,
                accepted,
            }),
        }
    }

    /// Offers `runs` to `listener` alone, in order (a new subscriber learning what is
    /// shared already). On a refusal or panic, takes back what it had accepted, newest
    /// first, and returns the run refused, why, and the runs it could not let go of.
    pub(crate) fn replay(
        listener: &Arc<dyn MemoryListener>,
        runs: impl Iterator<Item = PageRange>,
    ) -> Result<(), (PageRange, ListenerRefusal, Vec<PageRange>)> {
        let mut accepted = Vec::new();
        for run in runs {
            match as_callback(|| listener.populate(run))
                .and_then(|r| r.map_err(ListenerRefusal::Refused))
            {
                Ok(()) => accepted.push(Accepted {
                    listener: Arc::clone(listener),
                    range: run,
                }),
                Err(reason) => {
                    if matches!(reason, ListenerRefusal::Panicked { .. }) {
                        accepted.push(Accepted {
                            listener: Arc::clone(listener),
                            range: run,
                        });
                    }
                    let held = Self::withdraw(accepted);
                    return Err((run, reason, held));
                }
            }
        }
        Ok(())
    }

    /// Takes back what listeners accepted, newest first, and returns the ranges a
    /// listener could not let go of (it panicked in `discard`): it may still map them,
    /// so they must stay shared.
    #[must_use = "ranges a listener still holds must stay shared"]
    pub(crate) fn withdraw(accepted: Vec<Accepted>) -> Vec<PageRange> {
        accepted
            .into_iter()
            .rev()
            .filter(|a| as_callback(|| a.listener.discard(a.range)).is_err())
            .map(|a| a.range)
            .collect()
    }

    /// Re-offers ranges after a rolled-back revocation, and returns the parts refused
    /// (or panicked on): those listeners no longer hold ranges they held before.
    pub(crate) fn restore(&self, ranges: &[PageRange]) -> Vec<PageRange> {
        let mut refused = Vec::new();
        self.pass(ranges, |listener, range| {
            if !matches!(as_callback(|| listener.populate(range)), Ok(Ok(()))) {
                refused.push(range);
            }
            true
        });
        refused
    }

    /// Keeps telling `listener` of the `held` runs alone (ones it could not let go of
    /// when a replay was undone): each is followed by a subscription of its own that
    /// forwards `discard` and offers nothing, and that ends once the listener has let go
    /// of the whole run.
    pub(crate) fn follow_held(&self, listener: &Arc<dyn MemoryListener>, held: &[PageRange]) {
        for run in held {
            let holdout = Arc::new(Holdout {
                listener: Arc::clone(listener),
                left: Mutex::new(vec![*run]),
                subscription: Mutex::new(None),
            });
            let subscription = self.subscribe(*run, holdout.clone());
            *lock(&holdout.subscription) = Some(subscription);
        }
    }
}

/// A listener's hold on a run it could not let go of ([`Listeners::follow_held`]).
struct Holdout {
    listener: Arc<dyn MemoryListener>,
    /// The parts of the run it still holds.
    left: Mutex<Vec<PageRange>>,
    /// Its own subscription, dropped once nothing is left.
    subscription: Mutex<Option<Subscription>>,
}

impl MemoryListener for Holdout {
    fn discard(&self, range: PageRange) {
        // A panic here (it still cannot let go) stops the revocation, as it should.
        self.listener.discard(range);
        let mut left = lock(&self.left);
        *left = crate::convert::without(&left, &[range]);
        if left.is_empty() {
            drop(lock(&self.subscription).take());
        }
    }

    fn populate(&self, _: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // The listener was never attached: it is offered nothing.
        Ok(())
    }
}
