// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The conversion engine: pages between private and shared, all or nothing.

use guest_memfd::{PageRange, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::attributes::PageState;
use crate::error::{ByteRange, Error, Result};
use crate::guard::DirtyBitmap;
use crate::kvm_view::set_kvm_view;
use crate::listener::in_callback;
use crate::memory::{gpa, Engine, GuestMemoryPrivate, PrivateMemoryManager};
use crate::region::GuestRegionPrivate;
use crate::strategy::{Strategy, UnavailableReason};

mod batch;
mod discard;
mod launch;
mod one_run;
mod undo;
pub(crate) use batch::Retarget;
pub use launch::{LaunchSource, LaunchStepError};
use one_run::OneRun;
pub(crate) use undo::{without, Undone};

/// The steps of a conversion, in the order they can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Step {
    /// Listeners hear `discard` (conversion to private).
    NotifyDiscard,
    /// The bits change.
    Bits,
    /// Host accesses still in flight on the pages are waited for (conversion to private).
    WaitForAccesses,
    /// `KVM_SET_MEMORY_ATTRIBUTES` (dual strategy).
    KvmAttributes,
    /// Listeners are offered the range (conversion to shared).
    NotifyPopulate,
    /// The side no longer used is punched.
    DiscardOldSide,
}

/// What happens to a page's content when it changes side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ContentMode {
    /// The page arrives empty (zero), as TDX and SEV-SNP guests expect; the old side is
    /// freed, so memory is never held twice.
    #[default]
    Discard,
    /// The page keeps its content (pKVM-style sharing). In-place strategy only.
    Preserve,
}

/// What a conversion did. Its size does not grow with the request: a fragmented range
/// is summarised, not listed (listeners hear each changed range).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ConversionReport {
    /// Pages whose state changed (pages already in the target state are not counted).
    pub pages_changed: u64,
    /// Bytes of backing memory punched.
    pub bytes_discarded: u64,
    /// Runs of consecutive pages that changed.
    pub runs_changed: u64,
    /// How many times the conversion lock was taken (1 for [`PrivateMemoryManager::convert`];
    /// guest requests are served in bounded steps).
    pub lock_holds: u64,
    /// The longest of those holds (measured for guest requests only).
    pub longest_lock_hold: std::time::Duration,
}

impl ConversionReport {
    /// Adds `step`'s counts to this report.
    pub(crate) fn absorb(&mut self, step: &ConversionReport, held: std::time::Duration) {
        self.pages_changed += step.pages_changed;
        self.bytes_discarded += step.bytes_discarded;
        self.runs_changed += step.runs_changed;
        self.lock_holds += 1;
        self.longest_lock_hold = self.longest_lock_hold.max(held);
    }
}

/// The most ranges whose buffer the engine keeps between conversions.
const SCRATCH_KEPT: usize = 64;

/// Bounds on one hold of the conversion lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StepLimit {
    /// Changed runs: each costs system calls (a punch; dual: KVM's attributes).
    pub runs: u64,
    /// Changed bytes: punching costs time per byte held.
    pub bytes: u64,
}

impl StepLimit {
    /// No bound.
    pub const NONE: StepLimit = StepLimit {
        runs: u64::MAX,
        bytes: u64::MAX,
    };

    /// The bound on one step of work the guest asked for.
    pub const GUEST: StepLimit = StepLimit {
        runs: crate::exits::GUEST_RUNS_PER_STEP,
        bytes: crate::exits::GUEST_BYTES_PER_STEP,
    };
}

/// Plans one step over `range` (which lies in guest memory): hands `take` each run of
/// pages whose state `wanted` accepts, in address order, until `limit` runs or bytes are
/// taken (at least one page), and returns where the step ends (`range.end()` when the
/// whole range fits).
fn plan_step<'a, B: DirtyBitmap>(
    snapshot: &'a GuestMemoryPrivate<B>,
    range: PageRange,
    limit: StepLimit,
    wanted: impl Fn(PageState) -> bool,
    mut take: impl FnMut(&'a GuestRegionPrivate<B>, u64, u64, PageState) -> Result<()>,
) -> Result<u64> {
    let (mut runs, mut bytes) = (0u64, 0u64);
    for piece in PrivateMemoryManager::split(snapshot, range) {
        let (region, offset, len) = piece?;
        for crate::attributes::Run {
            first,
            count,
            state,
        } in region
            .attributes()
            .runs(offset / PAGE_SIZE, len / PAGE_SIZE)
        {
            if !wanted(state) {
                continue;
            }
            let left = limit.bytes.saturating_sub(bytes).max(PAGE_SIZE) / PAGE_SIZE;
            let pages = count.min(left);
            take(region, first, pages, state)?;
            runs += 1;
            bytes += pages * PAGE_SIZE;
            let end = region.guest_range().start() + (first + pages) * PAGE_SIZE;
            let full = pages < count || runs >= limit.runs || bytes >= limit.bytes;
            if full && end < range.end() {
                return Ok(end);
            }
        }
    }
    Ok(range.end())
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Checks that `range` lies wholly in guest memory, before a stepped operation
    /// changes anything.
    pub(crate) fn check_inside(&self, range: PageRange) -> Result<()> {
        Self::split(&self.listed(), range).try_for_each(|piece| piece.map(drop))
    }

    /// Runs `step` over `range` until it has covered it: each call does the start of
    /// what is left and returns where it stopped.
    pub(crate) fn in_steps(
        range: PageRange,
        mut step: impl FnMut(PageRange) -> Result<u64>,
    ) -> Result<()> {
        let mut rest = range;
        loop {
            let next = step(rest)?;
            if next >= rest.end() {
                return Ok(());
            }
            rest = PageRange::new(next, rest.end() - next)?;
        }
    }
}

/// One contiguous run of pages to change, inside one region.
struct Piece<'a, B> {
    region: &'a GuestRegionPrivate<B>,
    first_page: u64,
    pages: u64,
}

impl<'a, B: DirtyBitmap> Piece<'a, B> {
    /// The piece for `guest`, a range that lies inside one region of `snapshot`.
    fn of(snapshot: &'a GuestMemoryPrivate<B>, guest: PageRange) -> Self {
        let region = snapshot
            .find_region(GuestAddress(guest.start()))
            .expect("planned ranges lie inside a region");
        Piece {
            region,
            first_page: (guest.start() - region.guest_range().start()) / PAGE_SIZE,
            pages: guest.page_count(),
        }
    }

    /// Its guest-physical range.
    fn guest_range(&self) -> PageRange {
        self.region_range()
            .checked_add(self.region.guest_range().start())
            .expect("inside a region")
    }

    fn region_range(&self) -> PageRange {
        PageRange::from_pages(self.first_page, self.pages).expect("inside a region")
    }

    /// Punches the side that `to` no longer uses.
    fn discard_old_side(&self, to: PageState) -> Result<u64> {
        let in_region = self.region_range();
        let punched = match (self.region.strategy(), to) {
            (Strategy::Dual, PageState::Private) => {
                let shared = self.region.shared_side().expect("dual regions have one");
                shared.discard(in_region)
            }
            _ => in_region
                .checked_add(self.region.gmem_offset())
                .and_then(|in_file| self.region.gmem().discard(in_file)),
        };
        punched.map_err(|source| self.punch_error(source))?;
        Ok(in_region.len())
    }

    /// A failed punch of this piece, named by its guest range.
    fn punch_error(&self, source: guest_memfd::Error) -> Error {
        Error::Punch {
            range: gpa(self.guest_range()),
            source,
        }
    }

    fn set_bits(&self, state: PageState) {
        self.region.flip(self.first_page, self.pages, state);
    }

    /// Punches the shared side (dual strategy) of pages that are private now: whatever
    /// reached it while they were private must not greet the host once they are shared.
    fn clear_shared_side(&self) -> Result<()> {
        if let Some(shared) = self.region.shared_side() {
            shared
                .discard(self.region_range())
                .map_err(|source| self.punch_error(source))?;
        }
        Ok(())
    }
}

/// The ranges one conversion changes, each inside one region, in address order.
struct Plan<'a, B> {
    snapshot: &'a GuestMemoryPrivate<B>,
    requested: ByteRange,
    changed: Vec<PageRange>,
}

impl<'a, B: DirtyBitmap> Plan<'a, B> {
    fn pieces(&self) -> impl Iterator<Item = Piece<'a, B>> + '_ {
        self.changed.iter().map(|r| Piece::of(self.snapshot, *r))
    }

    fn set_bits(&self, state: PageState) {
        self.pieces().for_each(|p| p.set_bits(state));
    }
}

/// What a conversion has done so far, to undo in reverse order on failure.
#[derive(Default)]
struct Progress {
    /// Listeners were told `discard`.
    notified_discard: bool,
    /// The bits were set to this state.
    bits: Option<PageState>,
    /// KVM's view was set to this state.
    kvm: Option<PageState>,
    /// KVM's view of the first `n` changed ranges was set to this state, then a call
    /// failed.
    kvm_partial: Option<(PageState, usize)>,
    /// What listeners accepted in `populate`.
    populated: Vec<crate::listener::Accepted>,
    /// Bytes punched.
    discarded: u64,
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Converts `range` to `to`, discarding content ([`ContentMode::Discard`]).
    ///
    /// `range` may span regions but must lie wholly inside guest memory. Pages already in
    /// state `to` are left alone. On any failure (a listener refusing or panicking, an
    /// ioctl or fallocate error) the bits, KVM's view and the listeners' view are as
    /// before, except what [`Error::RollbackFailed`] names. Content is not undone: in-place, a page going shared is punched *before*
    /// the host may see it (so the guest's private content never reaches the host), so a
    /// refusal after that leaves the page private but empty; and a punch that fails part
    /// way through a conversion to private leaves the runs before it empty (shared
    /// again, reading zeros). The dual strategy punches the private side of pages going
    /// shared last and loses nothing there.
    ///
    /// # Errors
    ///
    /// Before anything changes: [`Error::Reentrant`] if called from a listener callback,
    /// [`Error::OutsideGuestMemory`] if `range` reaches outside every region. Then, rolled
    /// back as above: [`Error::ListenerRefused`] if a listener refuses (or panics in)
    /// `populate`; [`Error::HostAccessInFlight`] if a host access through the vm-memory
    /// view still touches a page going private when the memory's patience runs out;
    /// [`Error::HostAccessBarrier`] if the barrier that waits for such accesses fails
    /// (a seccomp filter that refuses `membarrier`);
    /// [`Error::SetAttributes`] (dual) if `KVM_SET_MEMORY_ATTRIBUTES` fails;
    /// [`Error::Punch`] if punching a page fails. [`Error::RollbackFailed`] if, after one
    /// of those, the rollback failed too: KVM's view of the ranges it lists as `unknown`
    /// is unknown; listeners refused `listeners_refused` back; or a listener could not
    /// let go of `kept_shared` (it panicked in `discard` while the conversion to shared
    /// was undone), and those pages stay shared.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use guest_memfd::PageRange;
    /// use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
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
    /// let memory = MemoryBuilder::new(vm).region_at(0, 4 << 20).build().unwrap();
    /// let view = memory.guest_memory();
    /// // Everything starts private: the host cannot read it.
    /// assert!(view.memory().read_obj::<u64>(GuestAddress(0x1000)).is_err());
    ///
    /// let report = memory.convert(PageRange::new(0, 2 << 20).unwrap(), PageState::Shared).unwrap();
    /// assert_eq!(report.pages_changed, 512);
    /// view.memory().write_obj(7u64, GuestAddress(0x1000)).unwrap();
    /// assert_eq!(view.memory().read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 7);
    /// ```
    pub fn convert(&self, range: PageRange, to: PageState) -> Result<ConversionReport> {
        self.convert_with(range, to, ContentMode::Discard)
    }

    /// Converts `range` to `to` with the given content mode.
    ///
    /// One call holds the conversion lock for as long as its system calls take, which
    /// grows with the number of runs it changes; guest requests are served in bounded
    /// steps instead ([`PrivateMemoryManager::serve_request`]).
    ///
    /// # Errors
    ///
    /// [`Error::StrategyUnavailable`] for [`ContentMode::Preserve`] with the dual
    /// strategy (nothing changes); otherwise as [`PrivateMemoryManager::convert`].
    pub fn convert_with(
        &self,
        range: PageRange,
        to: PageState,
        mode: ContentMode,
    ) -> Result<ConversionReport> {
        self.convert_step(range, to, mode, StepLimit::NONE, None)
            .map(|(report, _)| report)
    }

    /// Converts the start of `range` to `to`, all or nothing, under one hold of the
    /// conversion lock: at most `limit.runs` changed runs and `limit.bytes` changed bytes
    /// (at least one page). Returns the report and the end of the part converted
    /// (`range.end()` once the whole range is done). With `record`, the runs it changed
    /// are appended there once it succeeded.
    pub(crate) fn convert_step(
        &self,
        range: PageRange,
        to: PageState,
        mode: ContentMode,
        limit: StepLimit,
        record: Option<&mut Vec<PageRange>>,
    ) -> Result<(ConversionReport, u64)> {
        if in_callback() {
            return Err(Error::Reentrant { range: gpa(range) });
        }
        if mode == ContentMode::Preserve && self.strategy != Strategy::InPlace {
            return Err(Error::StrategyUnavailable {
                strategy: self.strategy,
                reason: UnavailableReason::PreserveNeedsInPlace,
            });
        }
        let mut engine = self.lock_engine();
        if let Some(run) = OneRun::of(&engine.current, range, to, limit) {
            let region = run.region();
            let converted = self.convert_one_run(&engine, run, to, mode);
            if left_changes(&converted) {
                region.gmem().note_conversion();
            }
            let report = converted?;
            if let Some(record) = record {
                record.push(range);
            }
            return Ok((report, range.end()));
        }
        let _listeners = self.listeners.hold();
        self.convert_planned(&mut engine, range, to, mode, limit, record)
    }

    /// Converts the start of `range` as [`PrivateMemoryManager::convert_step`] does, through a
    /// plan of the changed runs: any number of runs, regions and strategies. Kept out of
    /// line so that the one-run path stays a few cache lines of code.
    #[inline(never)]
    fn convert_planned(
        &self,
        engine: &mut Engine<B>,
        range: PageRange,
        to: PageState,
        mode: ContentMode,
        limit: StepLimit,
        record: Option<&mut Vec<PageRange>>,
    ) -> Result<(ConversionReport, u64)> {
        // The plan's list reuses the engine's buffer: no allocation per small conversion.
        let mut changed = std::mem::take(&mut engine.scratch);
        let snapshot = &*engine.current;
        let mut bytes = 0u64;
        let next = plan_step(
            snapshot,
            range,
            limit,
            |state| state != to,
            |region, first, pages, _| {
                changed.push(
                    PageRange::from_pages(first, pages)?
                        .checked_add(region.guest_range().start())?,
                );
                bytes += pages * PAGE_SIZE;
                Ok(())
            },
        )?;
        let plan = Plan {
            snapshot,
            requested: gpa(range),
            changed,
        };
        let mut done = Progress::default();
        let mut result = Ok(());
        if !plan.changed.is_empty() {
            if let Err(e) = self.run_steps(engine, &plan, to, mode, &mut done) {
                result = Err(self.undo(engine, &plan, done).into_error(e));
                done = Progress::default();
            }
        }
        if !plan.changed.is_empty() && left_changes(&result) {
            note_conversions(plan.pieces().map(|p| p.region));
        }
        let runs_changed = plan.changed.len() as u64;
        let mut changed = plan.changed;
        if let (Ok(()), Some(record)) = (&result, record) {
            record.extend_from_slice(&changed);
        }
        // Keep a small buffer for the next conversion; give a large one back.
        if changed.capacity() <= SCRATCH_KEPT {
            changed.clear();
            engine.scratch = changed;
        }
        result?;
        let report = ConversionReport {
            pages_changed: bytes / PAGE_SIZE,
            bytes_discarded: done.discarded,
            runs_changed,
            lock_holds: 1,
            ..ConversionReport::default()
        };
        Ok((report, next))
    }

    fn run_steps(
        &self,
        engine: &Engine<B>,
        plan: &Plan<'_, B>,
        to: PageState,
        mode: ContentMode,
        done: &mut Progress,
    ) -> Result<()> {
        let guest = &plan.changed;
        let dual = self.strategy == Strategy::Dual;
        let discard = mode == ContentMode::Discard;
        let punch = |done: &mut Progress| -> Result<()> {
            for piece in plan.pieces() {
                done.discarded += piece.discard_old_side(to)?;
            }
            Ok(())
        };
        match to {
            PageState::Private => {
                // A listener that cannot let go (it panicked) stops the conversion; the
                // listeners told before it have their ranges back already.
                self.listeners
                    .discard(guest)
                    .map_err(Undone::of_revocation)?;
                done.notified_discard = true;
                plan.set_bits(PageState::Private);
                done.bits = Some(PageState::Private);
                self.wait_for_accesses(engine, plan)?;
                if dual {
                    self.set_kvm(guest, PageState::Private, done)?;
                }
                if discard {
                    punch(done)?;
                }
            }
            PageState::Shared => {
                // In-place, the page the host will see is the very page the guest had
                // private: punch it before the host can look.
                if !dual && discard {
                    punch(done)?;
                }
                // Dual: the shared side should be empty, but bytes may have reached it
                // while the page was private (through a mapping of the shared file);
                // the page must still arrive empty.
                if dual && discard {
                    for piece in plan.pieces() {
                        piece.clear_shared_side()?;
                    }
                }
                if dual {
                    self.set_kvm(guest, PageState::Shared, done)?;
                }
                plan.set_bits(PageState::Shared);
                done.bits = Some(PageState::Shared);
                match self.listeners.populate(guest) {
                    Ok(accepted) => done.populated = accepted,
                    Err(refusal) => {
                        // Taken back by the undo, with the rest.
                        done.populated = refusal.accepted;
                        return Err(Error::ListenerRefused {
                            range: gpa(refusal.range),
                            reason: refusal.reason,
                        });
                    }
                }
                // Dual: the private side is punched last, so a refusal above loses nothing
                // (a whole change, `retarget`, punches it later still: `Preserve`).
                if dual && discard {
                    punch(done)?;
                }
            }
        }
        Ok(())
    }

    fn set_kvm(&self, guest: &[PageRange], state: PageState, done: &mut Progress) -> Result<()> {
        for (i, range) in guest.iter().enumerate() {
            if let Err(e) = set_kvm_view(&*self.vm, *range, state) {
                // The undo puts back the ranges already changed.
                done.kvm_partial = Some((state, i));
                return Err(e);
            }
        }
        done.kvm = Some(state);
        Ok(())
    }

    /// Waits until no host access that passed its check before the bits changed is still
    /// touching a page that is private now (see the `inflight` module).
    fn wait_for_accesses(&self, engine: &Engine<B>, plan: &Plan<'_, B>) -> Result<()> {
        wait_for_host_accesses(engine, plan.snapshot, plan.requested)
    }
}

/// Whether an operation's result leaves pages in another state than before: it
/// succeeded, or its rollback failed part way. Only such a result counts as a conversion
/// of their files ([`guest_memfd::GuestMemfd::note_conversion`]): a restore rolled back
/// whole may be tried again with the same state.
pub(crate) fn left_changes<T>(result: &Result<T>) -> bool {
    result.is_ok() || matches!(result, Err(Error::RollbackFailed { .. }))
}

/// Counts a conversion on the file of each region of `regions`, given in address order
/// (a region once, however many of its runs changed).
pub(crate) fn note_conversions<'a, B: DirtyBitmap + 'a>(
    regions: impl Iterator<Item = &'a GuestRegionPrivate<B>>,
) {
    let mut last: Option<&GuestRegionPrivate<B>> = None;
    for region in regions {
        if !last.is_some_and(|l| std::ptr::eq(l, region)) {
            region.gmem().note_conversion();
        }
        last = Some(region);
    }
}

/// Waits until no host access that passed its check before the bits changed is still
/// touching a page of `regions` that is private now (see the `inflight` module); fails
/// with [`Error::HostAccessInFlight`] naming `range` once the memory's patience is out.
pub(crate) fn wait_for_host_accesses<B: DirtyBitmap>(
    engine: &Engine<B>,
    regions: &GuestMemoryPrivate<B>,
    range: ByteRange,
) -> Result<()> {
    #[cfg(not(loom))]
    {
        use crate::inflight::{Patience, QuiesceError};
        let blocked = |start: usize, end: usize| {
            regions
                .iter()
                .any(|r| r.host_range_touches_private(start, end))
        };
        crate::guard::TRACKER
            .quiesce(
                crate::guard::current_slot(),
                blocked,
                Patience::new(engine.patience),
            )
            .map_err(|failure| match failure {
                QuiesceError::TimedOut(waited) => Error::HostAccessInFlight { range, waited },
                QuiesceError::Barrier(source) => Error::HostAccessBarrier { range, source },
            })?;
    }
    #[cfg(loom)]
    let _ = (engine, regions, range);
    Ok(())
}
