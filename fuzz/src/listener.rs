// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A model listener ([`ModelListener`]) and the page sets it is checked against.

use std::collections::BTreeMap;
use std::sync::Mutex;

use arbitrary::Arbitrary;
use guest_memfd::PageRange;
use vm_private_memory::{MemoryListener, PrivateMemoryManager};

/// A set of pages (page numbers, `gpa / 4 KiB`), kept as disjoint, non-adjacent runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageSet {
    /// First page of each run -> one past its last page.
    runs: BTreeMap<u64, u64>,
}

impl PageSet {
    /// Adds the pages of `range`.
    pub fn insert(&mut self, range: PageRange) {
        let (mut start, mut end) = (range.first_page(), range.first_page() + range.page_count());
        // Runs that touch or overlap [start, end) merge into it.
        let touching: Vec<(u64, u64)> = self
            .runs
            .range(..=end)
            .rev()
            .take_while(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.runs.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.runs.insert(start, end);
    }

    /// Takes out the pages of `range`.
    pub fn remove(&mut self, range: PageRange) {
        let (start, end) = (range.first_page(), range.first_page() + range.page_count());
        let overlapping: Vec<(u64, u64)> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(_, &e)| e > start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in overlapping {
            self.runs.remove(&s);
            if s < start {
                self.runs.insert(s, start);
            }
            if e > end {
                self.runs.insert(end, e);
            }
        }
    }

    /// Whether any page of `range` is in the set.
    pub fn intersects(&self, range: PageRange) -> bool {
        let (start, end) = (range.first_page(), range.first_page() + range.page_count());
        self.runs
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    /// Whether the page `page` is in the set.
    pub fn contains(&self, page: u64) -> bool {
        self.runs
            .range(..=page)
            .next_back()
            .is_some_and(|(_, &e)| e > page)
    }

    /// Adds the pages `[first, end)`, which lie past every page of the set.
    fn push(&mut self, first: u64, end: u64) {
        match self.runs.last_entry() {
            Some(mut last) if *last.get() == first => *last.get_mut() = end,
            _ => {
                self.runs.insert(first, end);
            }
        }
    }

    /// The pages of the set inside `range`.
    pub fn clipped(&self, range: PageRange) -> PageSet {
        let (start, end) = (range.first_page(), range.first_page() + range.page_count());
        let mut clipped = PageSet::default();
        let first = self.runs.range(..start).next_back();
        for (&s, &e) in first.into_iter().chain(self.runs.range(start..end)) {
            let (s, e) = (s.max(start), e.min(end));
            if s < e {
                clipped.push(s, e);
            }
        }
        clipped
    }

    /// The pages of the set that `other` lacks, as runs `(first page, one past the last)`.
    pub fn missing_from(&self, other: &PageSet) -> Vec<(u64, u64)> {
        let mut missing = Vec::new();
        let mut others = other.runs.iter().peekable();
        for (&start, &end) in &self.runs {
            let mut at = start;
            // Runs of `other` that end before this one starts cannot cover it.
            while others.next_if(|(_, &e)| e <= at).is_some() {}
            while at < end {
                match others.peek() {
                    Some(&(&s, &e)) if s <= at => {
                        at = e.min(end);
                        if e <= end {
                            others.next();
                        }
                    }
                    Some(&(&s, _)) => {
                        missing.push((at, s.min(end)));
                        at = s.min(end);
                    }
                    None => {
                        missing.push((at, end));
                        at = end;
                    }
                }
            }
        }
        missing
    }
}

/// The shared pages of `memory`, from its `state()` (one hold of the conversion lock).
pub fn shared_set(memory: &PrivateMemoryManager) -> PageSet {
    let mut shared = PageSet::default();
    // Regions in address order, runs in order in each: the shared runs come in order.
    for region in memory.state().regions {
        let first = region.guest.first_page();
        let mut at = first;
        for run in region.private_runs().expect("state() has valid runs") {
            if first + run.first > at {
                shared.push(at, first + run.first);
            }
            at = first + run.first + run.count;
        }
        let end = first + region.guest.page_count();
        if end > at {
            shared.push(at, end);
        }
    }
    shared
}

/// When a [`ModelListener`] misbehaves: never, at its `n`-th call of that kind (counted
/// from 0 since it was armed), or at that call and every later one.
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Fault {
    /// Never.
    #[default]
    Never,
    /// At call `n` only.
    At(u16),
    /// At call `n` and every later one.
    From(u16),
}

impl Fault {
    fn hits(self, call: u32) -> bool {
        match self {
            Fault::Never => false,
            Fault::At(n) => call == u32::from(n),
            Fault::From(n) => call >= u32::from(n),
        }
    }
}

#[derive(Debug, Default)]
struct ListenerModel {
    held: PageSet,
    refuse_populate: Fault,
    panic_discard: Fault,
    populates: u32,
    discards: u32,
    faults: u32,
    /// A `populate` of pages the listener already held (it maps them twice).
    twice: Option<PageRange>,
}

/// A [`MemoryListener`] that keeps the pages it holds (accepted in `populate`, not yet
/// let go of in `discard`), and misbehaves when told to: refuses a `populate` (returns
/// an error; it then holds nothing of that range), or cannot let go in a `discard`
/// (it "panics" with `resume_unwind`, which runs no panic hook, so libFuzzer's
/// abort-on-panic hook stays out of it; it still holds the range). Its faults are armed
/// with [`ModelListener::arm`], which also restarts the call counts.
///
/// The memory promises, whatever the listener does: it never holds a page that is not
/// shared (it hears `discard` before a page turns private, and a page it cannot let go
/// of stays shared); and, as long as no operation reported [`Error::RollbackFailed`](vm_private_memory::Error::RollbackFailed)
/// (which names what listeners lost or kept), it holds exactly the shared pages of its
/// subscription.
#[derive(Debug, Default)]
pub struct ModelListener {
    model: Mutex<ListenerModel>,
}

impl ModelListener {
    fn model(&self) -> std::sync::MutexGuard<'_, ListenerModel> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets its faults and restarts its call counts.
    pub fn arm(&self, refuse_populate: Fault, panic_discard: Fault) {
        let mut model = self.model();
        model.refuse_populate = refuse_populate;
        model.panic_discard = panic_discard;
        model.populates = 0;
        model.discards = 0;
        model.faults = 0;
    }

    /// Declares that it holds exactly `held` (a new subscription's starting point).
    pub fn set_held(&self, held: PageSet) {
        self.model().held = held;
    }

    /// The pages it holds.
    pub fn held(&self) -> PageSet {
        self.model().held.clone()
    }

    /// How many times it misbehaved since it was armed.
    pub fn faults(&self) -> u32 {
        self.model().faults
    }

    /// Checks that it holds only shared pages (`shared`, the memory's shared pages),
    /// and, if `exact`, all those of `subscription`; and that it was never offered pages
    /// it held already.
    ///
    /// # Panics
    ///
    /// When a check fails: that is the finding.
    pub fn check(&self, what: &str, shared: &PageSet, subscription: PageRange, exact: bool) {
        let model = self.model();
        if let Some(range) = model.twice {
            panic!("{what}: a listener was offered {range}, which it held already");
        }
        let not_shared = model.held.missing_from(shared);
        assert!(
            not_shared.is_empty(),
            "{what}: a listener holds pages that are not shared (runs of page numbers): {not_shared:x?}"
        );
        if exact {
            let (start, end) = (
                subscription.first_page(),
                subscription.first_page() + subscription.page_count(),
            );
            let covers = |set: &PageSet| {
                set.runs.first_key_value().is_none_or(|(&s, _)| s >= start)
                    && set.runs.last_key_value().is_none_or(|(_, &e)| e <= end)
            };
            let clipped;
            let expected = if covers(shared) {
                shared
            } else {
                clipped = shared.clipped(subscription);
                &clipped
            };
            let missing = expected.missing_from(&model.held);
            assert!(
                missing.is_empty(),
                "{what}: a listener was not offered shared pages of its subscription (runs of page numbers): {missing:x?}"
            );
        }
    }
}

impl MemoryListener for ModelListener {
    fn discard(&self, range: PageRange) {
        let mut model = self.model();
        let call = model.discards;
        model.discards += 1;
        if model.panic_discard.hits(call) {
            model.faults += 1;
            drop(model);
            std::panic::resume_unwind(Box::new(format!("cannot let go of {range}")));
        }
        model.held.remove(range);
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut model = self.model();
        let call = model.populates;
        model.populates += 1;
        if model.refuse_populate.hits(call) {
            model.faults += 1;
            return Err(format!("refusing {range}").into());
        }
        if model.held.intersects(range) && model.twice.is_none() {
            model.twice = Some(range);
        }
        model.held.insert(range);
        Ok(())
    }
}
