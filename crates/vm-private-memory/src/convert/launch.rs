// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Launch population: pages the VMM wrote through the shared side become private the
//! way a vendor launch makes them (SEV-SNP's `SNP_LAUNCH_UPDATE`, TDX's
//! `KVM_TDX_INIT_MEM_REGION`): the hypervisor copies (and measures, encrypts) each page
//! from a source host address into the guest's private memory.
//!
//! The order follows what the kernel asks of those calls: the range must already be
//! private in KVM's view when the call runs (`kvm_gmem_populate` refuses shared pages),
//! and the source must still hold the content, so the shared side is punched only after
//! the call succeeded.

use guest_memfd::{PageRange, PAGE_SIZE};

use super::{note_conversions, plan_step, ContentMode, Plan, Progress, StepLimit};
use crate::attributes::PageState;
use crate::error::{Error, Result};
use crate::guard::DirtyBitmap;
use crate::listener::{as_marked_callback, in_callback, panic_message};
use crate::memory::{gpa, PrivateMemoryManager};
use crate::strategy::{Strategy, UnavailableReason};

/// What a launch step is given: the guest range to populate, and where its content is
/// in the VMM's address space (the shared side's mapping, which the step's ioctl reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LaunchSource {
    /// The guest-physical range, inside one region, private in KVM's view by now.
    pub guest: PageRange,
    /// The host address of its content (SNP's `uaddr`, TDX's `source_addr`): the shared
    /// side's mapping, which holds the image the VMM wrote there. For the vendor call
    /// during the step only: the shared side is punched once every step succeeded.
    pub host_address: u64,
}

/// A launch step's error: the reason the vendor call refused.
pub type LaunchStepError = Box<dyn std::error::Error + Send + Sync>;

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Makes `range` private the way a vendor launch does, with its content: every page
    /// of it must be shared (the VMM wrote the guest's initial image there through the
    /// vm-memory view). Under one hold of the conversion lock, listeners hear `discard`,
    /// the bits and KVM's view go private, host accesses in flight are waited for; then
    /// `step` runs once per region the range covers, given the guest range and the host
    /// address of its content, which stays intact while it runs; once every step
    /// succeeded the shared side is punched. Dual strategy only: the in-place strategy
    /// keeps content across conversions itself ([`PrivateMemoryManager::load_private`]).
    ///
    /// On real SEV-SNP or TDX the launch measurement already includes the pages stepped
    /// before a failure, so a rolled-back launch usually means tearing the VM down. With
    /// [`crate::MemoryBuilder::vmm_binds_memslots`], bind the slots before the call. A
    /// `step` that panics refuses: the panic is caught and the launch rolled back, as
    /// for [`Error::LaunchStep`] (whose source then names the panic). A VMM built with
    /// `panic = "abort"` (Firecracker's release profile) aborts instead, as it does for
    /// any panic.
    ///
    /// `step` is where the VMM makes its vendor call (`SNP_LAUNCH_UPDATE` with
    /// `uaddr = host_address`, `gfn_start = guest.start() >> 12`; TDX's
    /// `KVM_TDX_INIT_MEM_REGION`). It runs with the conversion lock held, so it must not
    /// call back into this memory to change it: converting, discarding, adding or
    /// removing regions and subscribing with replay (a `DmaMapper`'s `attach`) fail
    /// with [`Error::Reentrant`] there, and [`PrivateMemoryManager::state`] gives the
    /// map being changed. The hosts this crate is tested on have no launch call: the
    /// tests give a recording step.
    ///
    /// # Errors
    ///
    /// Before anything changes: [`Error::Reentrant`] from a listener callback,
    /// [`Error::StrategyUnavailable`] for the in-place strategy,
    /// [`Error::OutsideGuestMemory`], and [`Error::LaunchNeedsShared`] naming the first
    /// private page. Then, rolled back (the pages are shared again with their content,
    /// and whatever a step put in the private side is punched):
    /// [`Error::LaunchStep`] naming the range a step refused, or an error of the
    /// conversion as [`PrivateMemoryManager::convert`]. A failing punch of the shared side
    /// after every step succeeded is [`Error::Punch`]: the pages are private then, and
    /// only memory is held twice until they are converted again.
    pub fn launch_private(
        &self,
        range: PageRange,
        mut step: impl FnMut(LaunchSource) -> std::result::Result<(), LaunchStepError>,
    ) -> Result<()> {
        if in_callback() {
            return Err(Error::Reentrant { range: gpa(range) });
        }
        if self.strategy != Strategy::Dual {
            return Err(Error::StrategyUnavailable {
                strategy: self.strategy,
                reason: UnavailableReason::LaunchNeedsDual,
            });
        }
        let engine = self.lock_engine();
        let _listeners = self.listeners.hold();
        let snapshot = &*engine.current;
        let mut changed = Vec::new();
        let mut first_private = None;
        plan_step(
            snapshot,
            range,
            StepLimit::NONE,
            |_| true,
            |region, first, pages, state| {
                let guest = PageRange::from_pages(first, pages)?
                    .checked_add(region.guest_range().start())?;
                match state {
                    PageState::Shared => changed.push(guest),
                    PageState::Private => {
                        first_private = first_private.or(Some(guest.start()));
                    }
                }
                Ok(())
            },
        )?;
        if let Some(page) = first_private {
            return Err(Error::LaunchNeedsShared {
                range: gpa(range),
                first_private: page,
            });
        }
        let plan = Plan {
            snapshot,
            requested: gpa(range),
            changed,
        };
        let mut done = Progress::default();
        let made_private = self.run_steps(
            &engine,
            &plan,
            PageState::Private,
            ContentMode::Preserve,
            &mut done,
        );
        let stepped = made_private.and_then(|()| {
            plan.pieces().try_for_each(|piece| {
                let guest = piece.guest_range();
                let host_address =
                    piece.region.host_range().0 as u64 + piece.first_page * PAGE_SIZE;
                as_marked_callback(|| {
                    // A panicking step is a refusal, rolled back as one: the pages go
                    // back to shared with their content, as for a listener's panic.
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        step(LaunchSource {
                            guest,
                            host_address,
                        })
                    }))
                    .unwrap_or_else(|payload| {
                        Err(
                            format!("the launch step panicked: {}", panic_message(&*payload))
                                .into(),
                        )
                    })
                })
                .map_err(|source| Error::LaunchStep {
                    range: gpa(guest),
                    source,
                })
            })
        });
        // The pages end private (or, where the rollback failed, in either state): a
        // conversion of their files.
        let counted = || note_conversions(plan.pieces().map(|p| p.region));
        if let Err(e) = stepped {
            let undone = self.undo(&engine, &plan, done);
            // A step may have populated part of the private side: it goes.
            for piece in plan.pieces() {
                let _ = piece.discard_old_side(PageState::Shared);
            }
            let e = undone.into_error(e);
            if matches!(e, Error::RollbackFailed { .. }) {
                counted();
            }
            return Err(e);
        }
        counted();
        for piece in plan.pieces() {
            piece.discard_old_side(PageState::Private)?;
        }
        Ok(())
    }
}
