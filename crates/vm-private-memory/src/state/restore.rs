// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Applying a saved map to a memory: everything checked first, then applied all or
//! nothing, under one content rule.

use guest_memfd::PageRange;
use vm_memory::GuestMemoryBackend;

use super::{MemoryState, PageRun, StateError};
use crate::attributes::PageState;
use crate::convert::{ContentMode, Retarget};
use crate::error::{ByteRange, Result};
use crate::guard::DirtyBitmap;
use crate::memory::{GuestMemoryPrivate, PrivateMemoryManager};
use crate::region::GuestRegionPrivate;

/// What a page that becomes shared during [`PrivateMemoryManager::restore_state_with`] holds.
///
/// Pages that become private always keep their content: hiding a page from the host
/// shows nothing, and it is how a VMM restoring a snapshot into fresh in-place memory
/// puts private content back (build the memory shared, write every page, then restore
/// the map). Pages that become shared arrive empty unless the caller says otherwise,
/// since a page private in the memory restored into may hold the guest's secrets: a
/// state applied to live memory must not show them to the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SharedContent {
    /// A page that becomes shared arrives empty (zero), as after
    /// [`ContentMode::Discard`]. The right choice for a snapshot restored into fresh
    /// memory (write the shared pages' content after restoring) and for any memory whose
    /// current private pages are not the saved memory's own.
    #[default]
    Empty,
    /// A page that becomes shared keeps its content, as after [`ContentMode::Preserve`]:
    /// for a live update, where the memory restored into is another memory (a new
    /// process's) built over the saved memory's own guest_memfd files (the shared pages'
    /// content, virtio rings and buffers included, is still in them). In-place strategy
    /// only. The state must have been taken over those very files (each region's
    /// [`super::FileIdentity`]), and be the last: no page of those files may have
    /// changed state since (else private pages may hold what the guest wrote after it
    /// was taken, [`super::RegionState::gmem_conversions`]); both are refused. Take it
    /// once the guest stopped. The new memory takes each file shared
    /// ([`PrivateMemoryManager::add_region`] with [`crate::PageState::Shared`]: the file's
    /// content is the host's to read then anyway) and restores before the guest runs;
    /// adding it private counts as a change (the guest could write private pages at
    /// once). This crate does not yet take a guest_memfd received from another process,
    /// so today that happens within one process (the file
    /// [`PrivateMemoryManager::remove_region`] handed back).
    Keep,
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Makes this memory's private/shared map that of `state`, with
    /// [`SharedContent::Empty`]: pages that become private keep their content, pages
    /// that become shared arrive empty. See [`PrivateMemoryManager::restore_state_with`].
    ///
    /// # Errors
    ///
    /// As [`PrivateMemoryManager::restore_state_with`].
    pub fn restore_state(&self, state: &MemoryState) -> Result<()> {
        self.restore_state_with(state, SharedContent::Empty)
    }

    /// Makes this memory's private/shared map that of `state`, all or nothing.
    ///
    /// Everything is checked before any page changes: the version and checksum, every
    /// region's map, the strategy, and that the state describes this memory (the same
    /// regions, each at the same file offset of a file of the same real size, read from
    /// the file). Then, under one hold of the conversion lock, the pages whose state
    /// differs change through the conversion engine, so listeners hear of them and KVM's
    /// view follows: first those becoming private, then those becoming shared. If any
    /// step fails (a listener refusing, a system call failing), every page changed is
    /// changed back: the bits, KVM's view and the listeners' view are as before, except
    /// what [`Error::RollbackFailed`](crate::Error::RollbackFailed) names.
    ///
    /// Content follows [`SharedContent`]: a page becoming private keeps its content; a
    /// page becoming shared arrives empty, or with `SharedContent::Keep` (in-place only)
    /// keeps it. As with [`PrivateMemoryManager::convert`], a page punched on its way to shared
    /// stays empty if the restore is then rolled back, and the dual strategy punches the
    /// sides no longer used last, after everything else succeeded.
    ///
    /// # Errors
    ///
    /// [`Error::StateMismatch`](crate::Error::StateMismatch) when the state is damaged or does not describe this
    /// memory; [`Error::StrategyUnavailable`](crate::Error::StrategyUnavailable) for `SharedContent::Keep` on the dual
    /// strategy; [`Error::Reentrant`](crate::Error::Reentrant) from a listener callback; otherwise the error of
    /// the step that failed (as [`PrivateMemoryManager::convert`]), after rolling back.
    pub fn restore_state_with(&self, state: &MemoryState, shared: SharedContent) -> Result<()> {
        let targets = state.checked_runs()?;
        if state.strategy != self.strategy {
            return Err(StateError::Strategy {
                saved: state.strategy,
                actual: self.strategy,
            }
            .into());
        }
        let mode = match shared {
            SharedContent::Empty => ContentMode::Discard,
            SharedContent::Keep => ContentMode::Preserve,
        };
        let span = match (state.regions.first(), state.regions.last()) {
            (Some(first), Some(last)) => ByteRange {
                start: first.guest.start(),
                len: last.guest.end().saturating_sub(first.guest.start()),
            },
            _ => ByteRange { start: 0, len: 0 },
        };
        let keep = shared == SharedContent::Keep;
        self.retarget(span, mode, |current| {
            check_layout(state, current, keep)?;
            let mut retarget = Retarget::default();
            for (region, runs) in current.iter().zip(&targets) {
                diff(region, runs, &mut retarget)?;
            }
            Ok(retarget)
        })
    }
}

/// Checks that `state` describes the regions of `current`, one for one.
fn check_layout<B: DirtyBitmap>(
    state: &MemoryState,
    current: &GuestMemoryPrivate<B>,
    keep: bool,
) -> Result<()> {
    let actual = current.num_regions();
    if actual != state.regions.len() {
        return Err(StateError::RegionCount {
            saved: state.regions.len(),
            actual,
        }
        .into());
    }
    for (index, (saved, region)) in state.regions.iter().zip(current.iter()).enumerate() {
        let actual_size = region
            .gmem()
            .file()
            .metadata()
            .map_err(|source| StateError::FileSize {
                region: region.guest_range(),
                source,
            })?
            .len();
        if saved.guest != region.guest_range()
            || saved.gmem_offset != region.gmem_offset()
            || saved.gmem_size != actual_size
        {
            return Err(StateError::Region {
                index,
                saved: saved.guest,
                saved_offset: saved.gmem_offset,
                saved_size: saved.gmem_size,
                actual: region.guest_range(),
                actual_offset: region.gmem_offset(),
                actual_size,
            }
            .into());
        }
        if keep {
            let actual = crate::region_setup::file_id(region.gmem().file())
                .map(|(device, inode)| super::FileIdentity { device, inode })
                .unwrap_or_default();
            if saved.gmem_file != actual || actual == super::FileIdentity::default() {
                return Err(StateError::KeepOverAnotherFile {
                    index,
                    saved: saved.gmem_file,
                    actual,
                }
                .into());
            }
            if region.gmem().conversions() != saved.gmem_conversions {
                return Err(StateError::KeepAfterConversions {
                    region: region.guest_range(),
                }
                .into());
            }
        }
    }
    Ok(())
}

/// Adds to `retarget` the pages of `region` whose state differs from the map given by
/// `private` (checked runs of private pages; every other page shared), in address order.
fn diff<B: DirtyBitmap>(
    region: &GuestRegionPrivate<B>,
    private: &[PageRun],
    retarget: &mut Retarget,
) -> Result<()> {
    let attributes = region.attributes();
    let base = region.guest_range().start();
    let mut add = |first: u64, count: u64, to: PageState| -> Result<()> {
        for crate::attributes::Run {
            first: from,
            count: n,
            state,
        } in attributes.runs(first, count)
        {
            if state != to {
                let range = PageRange::from_pages(from, n)?.checked_add(base)?;
                match to {
                    PageState::Private => retarget.to_private.push(range),
                    PageState::Shared => retarget.to_shared.push(range),
                }
            }
        }
        Ok(())
    };
    let mut at = 0u64;
    for run in private {
        add(at, run.first.saturating_sub(at), PageState::Shared)?;
        add(run.first, run.count, PageState::Private)?;
        at = run.first.saturating_add(run.count);
    }
    add(at, attributes.pages().saturating_sub(at), PageState::Shared)
}
