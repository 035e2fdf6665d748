// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `hotplug_and_launch` target's launch: the script each step runs ([`StepScript`]:
//! calls back into the memory, [`Reenter`], then success or refusal), the checks inside
//! a step, and what the launch's result must leave behind.

use std::sync::Arc;

use arbitrary::Arbitrary;
use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{Error, LaunchSource, PageState, PrivateMemoryManager, UnavailableReason};

use crate::hotplug_subject::Subject;
use crate::{check_all_or_nothing, pages_of, ModelListener};

/// A call back into the memory from inside a launch step.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Reenter {
    /// `convert` of the step's range.
    Convert {
        /// To private, else shared.
        private: bool,
    },
    /// `discard` of the step's range.
    Discard,
    /// `add_region` of a free range.
    Add,
    /// `remove_region` (and `remove_unbound_region` on VMM-bound memory) of the first
    /// region.
    Remove,
    /// `subscribe_with_replay` over the step's range.
    Subscribe,
    /// `state()`, which answers.
    State,
    /// `launch_private` of the step's range.
    Launch,
    /// A guest request (`serve_map_gpa_range`) over the step's range.
    Request,
    /// `restore_state`.
    Restore,
}

/// What one launch step does: up to two calls back, then success or refusal.
#[derive(Arbitrary, Clone, Copy, Debug, Default)]
pub struct StepScript {
    /// Calls back into the memory, in order.
    pub calls: [Option<Reenter>; 2],
    /// Whether the step then fails.
    pub refuse: bool,
}

impl Subject {
    /// Launches `range` with an image filled from `fill`, each step run as `steps` says,
    /// and checks what the launch leaves behind.
    pub(crate) fn launch(
        &mut self,
        what: &str,
        range: PageRange,
        fill: u8,
        steps: [StepScript; 3],
    ) {
        let pattern = |gpa: u64| fill.wrapping_add((gpa / PAGE_SIZE) as u8);
        let before = self.snapshot(Some(range));
        let all_shared =
            pages_of(&[range]).all(|gpa| self.memory.state_of(gpa) == Some(PageState::Shared));
        // The image, written through the shared side.
        let view = self.memory.guest_memory();
        if all_shared {
            for gpa in pages_of(&[range]) {
                view.memory()
                    .write_slice(&[pattern(gpa); PAGE_SIZE as usize], GuestAddress(gpa))
                    .expect("a shared page takes a write");
            }
        }
        let first_region = self.known.first().map_or(0, |k| k.guest.start());
        let free = PageRange::new(8 << 30, PAGE_SIZE).unwrap();
        let memory = &self.memory;
        let record = self.record.as_deref();
        let vmm_binds = self.config.vmm_binds;
        let mut seen: Vec<LaunchSource> = Vec::new();
        let result = memory.launch_private(range, |source| {
            let guest = source.guest;
            let step = steps.get(seen.len()).copied().unwrap_or_default();
            let what = format!("{what}: step {} on {guest}", seen.len());
            assert!(range.contains(&guest), "{what}: outside the range");
            assert!(
                memory.regions().iter().any(|r| r.contains(&guest)),
                "{what}: not inside one region"
            );
            assert!(
                seen.last().is_none_or(|s| s.guest.end() <= guest.start()),
                "{what}: out of order"
            );
            for gpa in pages_of(&[guest]) {
                assert_eq!(
                    memory.state_of(gpa),
                    Some(PageState::Private),
                    "{what}: page {gpa:#x} during the step"
                );
                if let Some(private) = record.and_then(|r| r.is_private(gpa)) {
                    assert!(private, "{what}: KVM's view of {gpa:#x} during the step");
                }
            }
            for page in 0..guest.page_count() {
                let first = source.host_address + page * PAGE_SIZE;
                // SAFETY: `host_address` is the shared side's mapping of `guest`, which the
                // memory keeps mapped, and its content intact, while the step runs
                // (`launch_private`'s contract); both bytes lie inside that page.
                let bytes = unsafe {
                    [
                        std::ptr::read_volatile(first as *const u8),
                        std::ptr::read_volatile((first + PAGE_SIZE - 1) as *const u8),
                    ]
                };
                let expected = pattern(guest.start() + page * PAGE_SIZE);
                assert_eq!(bytes, [expected; 2], "{what}: content of page {page}");
            }
            for call in step.calls.into_iter().flatten() {
                reenter(memory, vmm_binds, call, guest, first_region, free, &what);
            }
            seen.push(source);
            if step.refuse {
                Err("the vendor call refused".into())
            } else {
                Ok(())
            }
        });
        let what = format!("{what} (launch of {range}, {} step(s))", seen.len());
        self.note(result.as_ref().err());
        let after = self.snapshot(Some(range));
        let before_steps = matches!(
            result,
            Err(Error::StrategyUnavailable {
                reason: UnavailableReason::LaunchNeedsDual,
                ..
            }) | Err(Error::OutsideGuestMemory { .. })
                | Err(Error::LaunchNeedsShared { .. })
                | Err(Error::ListenerRefused { .. })
        );
        if before_steps {
            assert!(seen.is_empty(), "{what}: {result:?} after steps ran");
        }
        let inside = self.memory.regions();
        let in_memory = pages_of(&[range]).all(|gpa| inside.iter().any(|r| r.contains_addr(gpa)));
        let m = self.modes;
        match &result {
            Err(Error::StrategyUnavailable { .. }) => assert!(!self.config.dual, "{what}"),
            Err(Error::OutsideGuestMemory { .. }) => assert!(!in_memory, "{what}"),
            Err(Error::LaunchNeedsShared { first_private, .. }) => {
                let first = pages_of(&[range])
                    .find(|&gpa| self.memory.state_of(gpa) == Some(PageState::Private));
                assert_eq!(Some(*first_private), first, "{what}: first private page");
            }
            Err(Error::ListenerRefused { .. }) => assert!(m.panic.contains(&true), "{what}"),
            Err(Error::LaunchStep { range: r, .. }) => {
                let refused = seen.last().expect("a step refused").guest;
                assert_eq!((r.start, r.len), (refused.start(), refused.len()), "{what}");
                assert!(
                    steps.get(seen.len() - 1).is_some_and(|s| s.refuse),
                    "{what}: no step refused"
                );
            }
            Ok(()) => {
                assert!(self.config.dual && in_memory && all_shared, "{what}");
                assert!(
                    !m.panic.contains(&true),
                    "{what}: a listener could not let go"
                );
                assert!(
                    seen.iter().zip(&steps).all(|(_, s)| !s.refuse),
                    "{what}: a step refused"
                );
                // The pieces are the range, region by region.
                let mut at = range.start();
                for s in &seen {
                    assert_eq!(s.guest.start(), at, "{what}: pieces {seen:?}");
                    at = s.guest.end();
                }
                assert_eq!(at, range.end(), "{what}: pieces {seen:?}");
                let pieces = inside
                    .iter()
                    .filter(|r| r.intersection(&range).is_some())
                    .count();
                assert_eq!(seen.len(), pieces, "{what}: one step per region");
            }
            Err(Error::RollbackFailed { .. }) => {}
            Err(e) => panic!("{what}: unexpected {e}"),
        }
        check_all_or_nothing(
            &what,
            Some(range),
            PageState::Private,
            &before.pages,
            &after.pages,
            result.as_ref().map(drop),
        );
        // A rolled-back launch leaves the pages shared with their content.
        if matches!(result, Err(Error::LaunchStep { .. })) {
            let mut page = [0u8; PAGE_SIZE as usize];
            for gpa in pages_of(&[range]) {
                view.memory()
                    .read_slice(&mut page, GuestAddress(gpa))
                    .unwrap_or_else(|e| panic!("{what}: page {gpa:#x} after rollback: {e}"));
                assert!(
                    page.iter().all(|&b| b == pattern(gpa)),
                    "{what}: content of page {gpa:#x} after rollback"
                );
            }
        }
    }
}

/// Calls back into `memory` from inside a launch step on `guest`: every change must
/// be refused as re-entrant; `state()` answers, with the step's pages private.
fn reenter(
    memory: &PrivateMemoryManager,
    vmm_binds: bool,
    call: Reenter,
    guest: PageRange,
    first_region: u64,
    free: PageRange,
    what: &str,
) {
    fn refused<T: std::fmt::Debug>(what: &str, call: &str, result: Result<T, Error>) {
        assert!(
            matches!(result, Err(Error::Reentrant { .. })),
            "{what}: {call} from the step gave {result:?}"
        );
    }
    match call {
        Reenter::Convert { private } => {
            let to = if private {
                PageState::Private
            } else {
                PageState::Shared
            };
            refused(what, "convert", memory.convert(guest, to));
        }
        Reenter::Discard => refused(what, "discard", memory.discard(guest)),
        Reenter::Add => refused(
            what,
            "add_region",
            memory.add_region(free, None, PageState::Shared),
        ),
        Reenter::Remove => {
            refused(what, "remove_region", memory.remove_region(first_region));
            if vmm_binds {
                // SAFETY: this target never binds the memslots of VMM-bound memory.
                let result = unsafe { memory.remove_unbound_region(first_region) };
                refused(what, "remove_unbound_region", result);
            }
        }
        Reenter::Subscribe => refused(
            what,
            "subscribe_with_replay",
            memory.subscribe_with_replay(guest, Arc::new(ModelListener::default())),
        ),
        Reenter::State => {
            let state = memory.state();
            let guests: Vec<PageRange> = state.regions.iter().map(|r| r.guest).collect();
            assert_eq!(guests, memory.regions(), "{what}: state() from the step");
            for region in &state.regions {
                let Some(piece) = region.guest.intersection(&guest) else {
                    continue;
                };
                let runs = region.private_runs().expect("state() has valid runs");
                let first = (piece.start() - region.guest.start()) / PAGE_SIZE;
                let covered = runs
                    .iter()
                    .any(|r| r.first <= first && first + piece.page_count() <= r.first + r.count);
                assert!(
                    covered,
                    "{what}: state() from the step: {piece} not private"
                );
            }
        }
        Reenter::Launch => refused(
            what,
            "launch_private",
            memory.launch_private(guest, |s| panic!("{what}: nested step ran on {s:?}")),
        ),
        Reenter::Request => refused(
            what,
            "serve_map_gpa_range",
            memory.serve_map_gpa_range(guest.start(), guest.page_count(), 0),
        ),
        Reenter::Restore => {
            let state = memory.state();
            refused(what, "restore_state", memory.restore_state(&state));
        }
    }
}
