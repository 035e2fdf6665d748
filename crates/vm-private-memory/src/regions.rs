// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Adding and removing regions while the guest runs: memslots, the engine's list, the
//! published view, and what listeners hear of the shared pages that come and go.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use guest_memfd::{GuestMemfd, NumaPolicy, PageRange, SharedBacking};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::attributes::PageState;
use crate::convert::Undone;
use crate::error::{ByteRange, Error, LayoutError, Result};
use crate::guard::DirtyBitmap;
use crate::kvm_view::set_kvm_view;
use crate::listener::{in_callback, Listeners};
use crate::memory::{gpa, Engine, GuestMemoryPrivate, PrivateMemoryManager};
use crate::region::GuestRegionPrivate;
use crate::region_setup::{
    check_gmem_flags, check_policies, check_shared_backing, file_id, make_region,
};
use crate::strategy::Strategy;

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Adds a region over `guest`, bound to a new memslot, its pages in `initial` state.
    /// It is backed by `backing`: a file and offset (for example the file of a region
    /// removed before, to keep its content), or `None` for a new guest_memfd.
    ///
    /// In a memory whose memslots the VMM binds
    /// ([`crate::MemoryBuilder::vmm_binds_memslots`]) the new slot is not bound: its
    /// description joins [`PrivateMemoryManager::memslots`] (a slot number from the
    /// builder's range), and the VMM binds it before the guest uses the range (memory
    /// hotplug), and deletes it before [`PrivateMemoryManager::remove_unbound_region`].
    ///
    /// Re-using a file keeps its content: with `initial` shared and the in-place strategy,
    /// whatever the guest had written there, private pages included, becomes readable by
    /// the host. Discard ranges first if that is not wanted.
    ///
    /// The `GuestMemfd` handed back by [`PrivateMemoryManager::remove_region`] is the owner's
    /// tool, not device code's: its safe `map` maps every page, private ones included.
    /// Give it back here and drop other clones; keep it away from anything that holds
    /// only the vm-memory view.
    ///
    /// The region joins this memory's own list of regions, which is then published in the
    /// vm-memory view (replacing whatever a caller may have put there). With `initial`
    /// shared, listeners subscribed over `guest` are then offered it (`populate`), as
    /// after a conversion to shared: a device that maps shared pages maps it too.
    ///
    /// # Errors
    ///
    /// Before anything is created: [`Error::Layout`] if `guest` overlaps a region
    /// ([`crate::LayoutError::OverlapsRegion`]) or a range the builder reserved
    /// ([`crate::LayoutError::OverlapsReserved`]), or reaches past
    /// [`crate::GUEST_PHYS_LIMIT`] ([`crate::LayoutError::PastLimit`]);
    /// [`Error::StrategyUnavailable`] if `backing`'s flags do not fit the strategy (dual
    /// refuses `MMAP` and `INIT_SHARED`, in place needs both). Then [`Error::Layout`] with
    /// [`crate::LayoutError::BackingInUse`] if another region, of this memory or
    /// another, holds some of `backing`'s bytes (whoever binds the memslots; a removed
    /// region's bytes are free again, a dropped memory's once no old view keeps it);
    /// [`Error::NoFreeSlot`] if every
    /// memslot number this memory may use is taken, and the file layer's or KVM's error
    /// if creating, mapping, binding or (dual) marking the region fails;
    /// [`Error::ListenerRefused`] if a listener refuses the new shared pages (those that
    /// accepted let go, and the region is taken out again). On any of these nothing
    /// changed: no memslot is bound, the list and the view are as before.
    /// [`Error::RollbackFailed`] if, after a refusal, a listener could not let go (then
    /// `kept_shared` names the whole region) or the region could not be taken out again
    /// (`listeners_refused`: no listener maps it): the region stays, shared.
    ///
    /// `backing` is consumed either way: to keep a file whose addition may be refused,
    /// pass a clone of it.
    ///
    /// A dual region added here gets a new sealed memfd for its shared pages; to put
    /// them in the VMM's own file, use [`PrivateMemoryManager::add_region_with_shared`].
    ///
    /// With memslots the VMM binds, bind the new slot once this returns `Ok`. The region
    /// is listed while its shared pages are offered, so a listener may see it in
    /// [`PrivateMemoryManager::memslots`] and bind it then; if another listener then
    /// refuses it, the region leaves this memory but its mapping and slot number are
    /// kept for good (leaked), never freed under a slot the VMM may have bound: delete
    /// that slot if it was bound.
    pub fn add_region(
        &self,
        guest: PageRange,
        backing: Option<(GuestMemfd, u64)>,
        initial: PageState,
    ) -> Result<()> {
        self.add(guest, backing, None, None, initial)
    }

    /// [`PrivateMemoryManager::add_region`], with the region's pages placed on NUMA nodes
    /// by `policy`, as [`crate::MemoryBuilder::region_at_with_policy`] does at build time
    /// (in-place strategy, Linux 6.19 or later): memory hotplug into a zone of its own
    /// node. The policy is set through the region's mapping before the guest runs on it;
    /// pages `backing` already holds stay where they are. It belongs to the guest_memfd
    /// file, per range of the file: a file taken out with
    /// [`PrivateMemoryManager::remove_region`] and added again at the same offset
    /// without a policy keeps it for that range, and a policy given then replaces it.
    ///
    /// # Errors
    ///
    /// As [`PrivateMemoryManager::add_region`], and before anything is created:
    /// [`Error::StrategyUnavailable`] for dual memory
    /// ([`crate::UnavailableReason::NumaPolicyNeedsInPlace`]), the file layer's
    /// [`NoSuchNode`](guest_memfd::Error::NoSuchNode) or
    /// [`NodeOutOfRange`](guest_memfd::Error::NodeOutOfRange) (as [`Error::File`]) for nodes
    /// this process cannot use, [`Error::NumaPolicyIgnored`] on a kernel that ignores
    /// the policy. Then [`Error::NumaPolicyNotSet`] if the kernel refuses the policy when
    /// it is set (a node gone offline in between); nothing of the region is kept. Where
    /// a single node is usable every page lands there, and no policy is set.
    pub fn add_region_with_policy(
        &self,
        guest: PageRange,
        backing: Option<(GuestMemfd, u64)>,
        policy: NumaPolicy,
        initial: PageState,
    ) -> Result<()> {
        // Before the policy's checks, which probe the kernel: a listener cannot add.
        if in_callback() {
            return Err(Error::Reentrant { range: gpa(guest) });
        }
        let policy = check_policies(self.strategy, &*self.vm, [&policy])?.then_some(policy);
        self.add(guest, backing, None, policy, initial)
    }

    /// [`PrivateMemoryManager::add_region`], with the region's shared pages in the VMM's
    /// own file from byte `offset`, as [`crate::MemoryBuilder::region_at_with_shared`]
    /// does at build time (dual strategy only): memory hotplug into the VMM's own memory
    /// zone. A file re-added keeps its content in the pages added shared; with `initial`
    /// private, the range is punched.
    ///
    /// # Errors
    ///
    /// As [`PrivateMemoryManager::add_region`], and before anything is created:
    /// [`Error::StrategyUnavailable`] for in-place memory,
    /// [`Error::OutOfBounds`](guest_memfd::Error::OutOfBounds) (as [`Error::File`]) if
    /// the range reaches past the file's end, [`Error::SharedBackingOverlap`] if another
    /// region of this memory keeps its shared pages in the same bytes of that file.
    /// `shared` is consumed either way (clone it to keep it), and with `initial` private
    /// an addition that fails after the region was made has already punched its range
    /// of the file.
    pub fn add_region_with_shared(
        &self,
        guest: PageRange,
        backing: Option<(GuestMemfd, u64)>,
        shared: SharedBacking,
        offset: u64,
        initial: PageState,
    ) -> Result<()> {
        self.add(guest, backing, Some((shared, offset)), None, initial)
    }

    fn add(
        &self,
        guest: PageRange,
        backing: Option<(GuestMemfd, u64)>,
        shared: Option<(SharedBacking, u64)>,
        policy: Option<NumaPolicy>,
        initial: PageState,
    ) -> Result<()> {
        if in_callback() {
            return Err(Error::Reentrant { range: gpa(guest) });
        }
        let mut engine = self.lock_engine();
        let ours = !self.vmm_binds;
        check_placement(&engine, guest)?;
        if let Some((gmem, _)) = &backing {
            check_gmem_flags(self.strategy, gmem.flags())?;
        }
        // A re-used file added private: the guest may write its private pages at once,
        // without a conversion, so once the region is in, a state older than this must
        // not keep content (counted only if the addition stays).
        let reused_private = backing
            .as_ref()
            .filter(|_| initial == PageState::Private)
            .map(|(gmem, _)| gmem.clone());
        if let Some((file, offset)) = &shared {
            let taken = engine
                .current
                .iter()
                .filter_map(|r| {
                    let side = r.shared_side()?;
                    let whole = PageRange::new(0, r.guest_range().len()).ok()?;
                    Some((side, side.in_file(whole).ok()?))
                })
                .map(|(side, range)| Ok((file_id(side.backing.file())?, range)))
                .collect::<Result<Vec<_>>>()?;
            check_shared_backing(self.strategy, guest.len(), file, *offset, &taken)?;
        }
        let slot = engine
            .slots
            .allocate_id()
            .map_err(|_| engine.no_free_slot())?;
        let made = self.new_region(&engine, guest, backing, (shared, policy), initial, slot);
        let (region, with) = match made {
            Ok(made) => made,
            Err(e) => {
                let _ = engine.slots.free_id(slot);
                return Err(e);
            }
        };
        if let Err((e, still_bound)) = self.bind_new_region(guest, initial, &region, ours) {
            // Still bound (KVM refused to unbind): the slot number stays taken, and the
            // region was leaked so its memory stays mapped.
            if !still_bound {
                let _ = engine.slots.free_id(slot);
            }
            return Err(e);
        }
        let _listeners = self.listeners.hold();
        self.publish(&mut engine, with);
        let offered = match initial {
            PageState::Shared => self.offer_new_region(&mut engine, guest),
            PageState::Private => Ok(()),
        };
        // A new slot for the VMM to bind, if the region stayed (a listener that cannot
        // let go of it keeps it): a release said before it does not cover it.
        let stayed = engine
            .current
            .iter()
            .any(|r| r.guest_range().start() == guest.start());
        if self.vmm_binds && stayed {
            self.memslots_released.store(false, Ordering::Release);
        }
        if let (true, Some(gmem)) = (stayed, reused_private) {
            gmem.note_conversion();
        }
        offered
    }

    /// The region over `guest` and the engine's list with it, nothing bound yet.
    fn new_region(
        &self,
        engine: &Engine<B>,
        guest: PageRange,
        backing: Option<(GuestMemfd, u64)>,
        (shared, policy): (Option<(SharedBacking, u64)>, Option<NumaPolicy>),
        initial: PageState,
        slot: u32,
    ) -> Result<(Arc<GuestRegionPrivate<B>>, GuestMemoryPrivate<B>)> {
        let (gmem, offset) = match backing {
            Some(b) => b,
            None => (
                GuestMemfd::create(&*self.vm, guest.len(), engine.gmem_flags)?,
                0,
            ),
        };
        let region = Arc::new(make_region(
            self.strategy,
            guest,
            (gmem, offset),
            initial,
            slot,
            shared,
            policy,
        )?);
        let with = engine
            .current
            .insert_region(Arc::clone(&region))
            .map_err(|e| Error::Layout {
                range: gpa(guest),
                reason: LayoutError::Collection(e),
            })?;
        Ok((region, with))
    }

    /// Binds a new region's memslot (if `ours`: not when the VMM binds them) and (dual)
    /// sets KVM's view of it. On error, says whether the slot is still bound (KVM
    /// refused to unbind it; the region is leaked).
    fn bind_new_region(
        &self,
        guest: PageRange,
        initial: PageState,
        region: &Arc<GuestRegionPrivate<B>>,
        ours: bool,
    ) -> std::result::Result<(), (Error, bool)> {
        let memslot = region.memslot().map_err(|e| (e.into(), false))?;
        if ours {
            // SAFETY: the slot's userspace memory is the region's host mapping, which
            // the engine's list keeps alive until `remove_region` or `Drop` unbinds the
            // slot; on an error below the slot is unbound again, or the region leaked.
            unsafe { memslot.bind(&*self.vm) }.map_err(|e| (e.into(), false))?;
        }
        // KVM keeps memory attributes per guest-physical address, across memslot
        // deletion: set them for the new region whatever they were before.
        if self.strategy == Strategy::Dual {
            if let Err(e) = set_kvm_view(&*self.vm, guest, initial) {
                let still_bound = ours && memslot.unbind(&*self.vm).is_err();
                if still_bound {
                    std::mem::forget(Arc::clone(region));
                }
                return Err((e, still_bound));
            }
        }
        Ok(())
    }

    /// Removes the region that starts at `start`: listeners hear `discard` for its
    /// shared pages, its memslot is deleted (KVM drops its mappings; guest accesses to
    /// the range then exit as MMIO), and it leaves this memory's list and the vm-memory
    /// view. vCPUs may run. Returns the range and the file and offset that backed it, so
    /// it can be re-added.
    ///
    /// The host is locked out of the region for good before its memslot goes: every page
    /// counts as private to a view taken earlier (which keeps the region alive), and host
    /// accesses in flight on it are waited for, as for a conversion to private. So a file
    /// re-added with private pages is never reachable through an old view.
    ///
    /// # Errors
    ///
    /// [`Error::NoSuchRegion`] if no region of this memory's list starts at `start`;
    /// [`Error::ListenerRefused`] if a listener cannot let go of its shared pages (it
    /// panicked in `discard`); [`Error::HostAccessInFlight`] if a slice of it was still
    /// held when the memory's patience ran out; [`Error::HostAccessBarrier`] if the
    /// barrier that waits for such slices fails; KVM's error if the memslot cannot be
    /// deleted. On an error listeners get the shared pages back and nothing changed;
    /// [`Error::RollbackFailed`] names in `listeners_refused` what a listener refused
    /// back (it no longer maps those pages; the region stays).
    pub fn remove_region(&self, start: u64) -> Result<(PageRange, GuestMemfd, u64)> {
        if in_callback() {
            return Err(Error::Reentrant {
                range: ByteRange { start, len: 0 },
            });
        }
        let mut engine = self.lock_engine();
        if self.vmm_binds {
            return Err(Error::VmmBindsMemslots {
                range: ByteRange { start, len: 0 },
            });
        }
        let _listeners = self.listeners.hold();
        self.take_out(&mut engine, start, Listening::Tell)
    }

    /// Removes the region that starts at `start`, as [`PrivateMemoryManager::remove_region`]
    /// does, from a memory whose memslots the VMM binds
    /// ([`crate::MemoryBuilder::vmm_binds_memslots`]): the VMM has deleted the region's
    /// memslot first, so this memory unbinds nothing and may free the region's mapping
    /// once nothing else holds it. In a memory that binds its own memslots this is
    /// [`PrivateMemoryManager::remove_region`].
    ///
    /// # Safety
    ///
    /// The region's memslot (its entry in [`PrivateMemoryManager::memslots`]) must be
    /// deleted from the VM, and once this returns `Ok` never be bound again: KVM would
    /// read and write guest memory through a mapping that may be freed.
    ///
    /// # Errors
    ///
    /// As [`PrivateMemoryManager::remove_region`], without the memslot's. On an error the
    /// region stays in this memory as it was, and in [`PrivateMemoryManager::memslots`]:
    /// bind its slot again to give it back to the guest, or call this again (after a
    /// [`Error::HostAccessInFlight`], once the slice that held it is dropped).
    pub unsafe fn remove_unbound_region(&self, start: u64) -> Result<(PageRange, GuestMemfd, u64)> {
        if in_callback() {
            return Err(Error::Reentrant {
                range: ByteRange { start, len: 0 },
            });
        }
        let mut engine = self.lock_engine();
        let _listeners = self.listeners.hold();
        self.take_out(&mut engine, start, Listening::Tell)
    }

    /// Removes the region that starts at `start` as [`PrivateMemoryManager::remove_region`]
    /// says, with the engine locked and the listeners held; `listening` says whether
    /// listeners hear of its shared pages (not when undoing an addition they refused).
    fn take_out(
        &self,
        engine: &mut Engine<B>,
        start: u64,
        listening: Listening,
    ) -> Result<(PageRange, GuestMemfd, u64)> {
        let current = Arc::clone(&engine.current);
        let region = current
            .iter()
            .find(|r| r.guest_range().start() == start)
            .ok_or(Error::NoSuchRegion(GuestAddress(start)))?;
        let guest = region.guest_range();
        // Everything that can fail without side effects comes first.
        let memslot = region.memslot()?;
        let (without, removed) = current
            .remove_region(GuestAddress(start), guest.len())
            .map_err(|e| Error::Layout {
                range: gpa(guest),
                reason: LayoutError::Collection(e),
            })?;
        let shared: Vec<PageRange> = crate::shared_runs::shared_runs(&*current, guest)
            .map(|run| run.guest_range())
            .collect();
        let tell = listening == Listening::Tell;
        if tell {
            self.listeners
                .discard(&shared)
                .map_err(Undone::of_revocation)?;
        }
        // Lock the host out of the leaving region for good: a snapshot of the view taken
        // earlier keeps the region, and its file may be re-added with private pages.
        // Accesses already in flight are waited for, as for a conversion to private.
        let lock_out = |state: PageState| {
            for range in &shared {
                let first = (range.start() - guest.start()) / guest_memfd::PAGE_SIZE;
                region.set_states(first, range.page_count(), state);
            }
        };
        lock_out(PageState::Private);
        let undo = |e: Error| {
            lock_out(PageState::Shared);
            let listeners_refused = if tell {
                self.listeners
                    .restore(&shared)
                    .into_iter()
                    .map(gpa)
                    .collect()
            } else {
                Vec::new()
            };
            Err(Undone {
                listeners_refused,
                ..Default::default()
            }
            .into_error(e))
        };
        if let Err(e) = crate::convert::wait_for_host_accesses(engine, &current, gpa(guest)) {
            return undo(e);
        }
        // When the VMM binds the memslots, it deleted this one (`remove_unbound_region`)
        // or never bound it (an addition being undone): nothing to unbind.
        if !self.vmm_binds {
            if let Err(e) = memslot.unbind(&*self.vm) {
                return undo(e.into());
            }
        }
        self.publish(engine, without);
        if self.vmm_binds && listening == Listening::Quiet {
            // An addition undone after it was listed: a listener may have read its
            // description (`memslots()`) and bound it. Keep its mapping, and its slot
            // number, for good rather than free memory KVM may still map.
            std::mem::forget(removed);
        } else {
            let _ = engine.slots.free_id(region.slot());
            // Its file range is free again, even while an old view keeps the region
            // (locked out above).
            region.release_file_range();
        }
        Ok((guest, region.gmem().clone(), region.gmem_offset()))
    }

    /// Offers the shared pages of a region just added to the listeners. On a refusal
    /// the region is taken out again, unless a listener cannot let go of what it had
    /// accepted: the region then stays, and the error names those pages.
    fn offer_new_region(&self, engine: &mut Engine<B>, guest: PageRange) -> Result<()> {
        let Err(refusal) = self.listeners.populate(&[guest]) else {
            return Ok(());
        };
        let refused = Error::ListenerRefused {
            range: gpa(refusal.range),
            reason: refusal.reason,
        };
        let held = Listeners::withdraw(refusal.accepted);
        if !held.is_empty() {
            // The region cannot be taken out while a listener holds part of it: all of
            // it stays, shared.
            return Err(Undone {
                kept_shared: vec![gpa(guest)],
                ..Default::default()
            }
            .into_error(refused));
        }
        match self.take_out(engine, guest.start(), Listening::Quiet) {
            Ok(_) => Err(refused),
            // The region stays, shared, and no listener holds it.
            Err(_) => Err(Undone {
                listeners_refused: vec![gpa(guest)],
                ..Default::default()
            }
            .into_error(refused)),
        }
    }
}

/// Checks that a region over `guest` fits the memory's layout: inside
/// [`crate::GUEST_PHYS_LIMIT`], clear of the builder's reserved ranges and of every region.
fn check_placement<B: DirtyBitmap>(engine: &Engine<B>, guest: PageRange) -> Result<()> {
    let refuse = |reason| {
        Err(Error::Layout {
            range: gpa(guest),
            reason,
        })
    };
    if guest.end() > crate::GUEST_PHYS_LIMIT {
        return refuse(LayoutError::PastLimit {
            limit: crate::GUEST_PHYS_LIMIT,
        });
    }
    if let Some(hole) = engine
        .reserved
        .iter()
        .find(|hole| hole.intersection(&guest).is_some())
    {
        return refuse(LayoutError::OverlapsReserved(*hole));
    }
    if let Some(other) = engine
        .current
        .iter()
        .find(|r| r.guest_range().intersection(&guest).is_some())
    {
        return refuse(LayoutError::OverlapsRegion(other.guest_range()));
    }
    Ok(())
}

/// Whether removing a region tells listeners.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listening {
    Tell,
    Quiet,
}
