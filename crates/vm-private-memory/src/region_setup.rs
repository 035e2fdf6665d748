// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Setting up regions, at build time or hotplugged: the checks on what the VMM gives for
//! them (shared backings, NUMA policies), and one region's host mapping, with its policy
//! set, or with the dual strategy its shared side (a new sealed memfd where the VMM gave
//! no file).

use std::os::unix::fs::MetadataExt;

use guest_memfd::{
    GuestMemfd, NumaPolicy, NumaSupport, PageRange, SealedMemfd, SharedBacking, VmOps,
};

use crate::attributes::PageState;
use crate::error::{Error, Result};
use crate::guard::DirtyBitmap;
use crate::region::{GuestRegionPrivate, RegionParts, SharedSide};
use crate::strategy::{Strategy, UnavailableReason};

/// Checks the regions' NUMA policies before anything is created: the in-place strategy
/// only, nodes this process may use, and a kernel that applies them (probed once, by
/// behaviour). Says whether to set them: not where a single node is usable.
pub(crate) fn check_policies<'a>(
    strategy: Strategy,
    vm: &dyn VmOps,
    policies: impl IntoIterator<Item = &'a NumaPolicy>,
) -> Result<bool> {
    let mut given = policies.into_iter().peekable();
    if given.peek().is_none() {
        return Ok(false);
    }
    if strategy != Strategy::InPlace {
        return Err(Error::StrategyUnavailable {
            strategy,
            reason: UnavailableReason::NumaPolicyNeedsInPlace,
        });
    }
    for policy in given {
        policy.check()?;
    }
    match guest_memfd::numa_policy_support(vm)? {
        NumaSupport::Honoured => Ok(true),
        NumaSupport::SingleNode => Ok(false),
        support => Err(Error::NumaPolicyIgnored { support }),
    }
}

/// A range of a file: its (device, inode) and the bytes.
pub(crate) type FileRange = ((u64, u64), PageRange);

/// The range of `backing` at `offset` a region of `len` bytes would use, the file named
/// by (device, inode), checked: the dual strategy only, inside the file, and overlapping
/// none of `taken`.
pub(crate) fn check_shared_backing(
    strategy: Strategy,
    len: u64,
    backing: &SharedBacking,
    offset: u64,
    taken: &[FileRange],
) -> Result<FileRange> {
    if strategy != Strategy::Dual {
        return Err(Error::StrategyUnavailable {
            strategy,
            reason: UnavailableReason::SharedBackingNeedsDual,
        });
    }
    let in_file = PageRange::new(offset, len)?;
    backing.check_range(in_file)?;
    let file = file_id(backing)?;
    if let Some((_, other)) = taken
        .iter()
        .find(|(f, r)| *f == file && r.intersection(&in_file).is_some())
    {
        return Err(Error::SharedBackingOverlap {
            first: *other,
            second: in_file,
        });
    }
    Ok((file, in_file))
}

/// The (device, inode) of `backing`'s file.
pub(crate) fn file_id(backing: &SharedBacking) -> Result<(u64, u64)> {
    let meta = backing.file().metadata().map_err(Error::Stat)?;
    Ok((meta.dev(), meta.ino()))
}

/// A region over `guest`, backed by `gmem` from `gmem_offset`, with its host
/// mapping (and, dual, its shared side: `shared`, the VMM's file and offset, or a new
/// sealed memfd; in place, `policy` set on the mapping).
pub(crate) fn make_region<B: DirtyBitmap>(
    strategy: Strategy,
    guest: PageRange,
    (gmem, gmem_offset): (GuestMemfd, u64),
    initial: PageState,
    slot: u32,
    shared: Option<(SharedBacking, u64)>,
    policy: Option<NumaPolicy>,
) -> Result<GuestRegionPrivate<B>> {
    let file_range = PageRange::new(gmem_offset, guest.len())?;
    gmem.check_range(file_range)?;
    let (shared, host) = match strategy {
        Strategy::InPlace => {
            let host = gmem.map_range(file_range)?;
            // Before any page of the mapping is touched: pages allocated from now on
            // follow it.
            if let Some(policy) = policy {
                policy.apply(&host)?;
            }
            (None, host)
        }
        Strategy::Dual => {
            let (backing, offset) = match shared {
                Some(given) => given,
                None => (
                    SharedBacking::from(SealedMemfd::create("guest-shared", guest.len())?),
                    0,
                ),
            };
            let side = SharedSide { backing, offset };
            let in_file = side.in_file(PageRange::new(0, guest.len())?)?;
            let host = side.backing.map_range(in_file)?;
            // The shared side of private pages holds nothing: a file the VMM gave may
            // hold old bytes (and a file that cannot be punched shows here, not at the
            // first conversion).
            if initial == PageState::Private {
                side.backing.discard(in_file)?;
            }
            (Some(side), host)
        }
    };
    Ok(GuestRegionPrivate::new(RegionParts {
        guest,
        strategy,
        gmem,
        gmem_offset,
        shared,
        host,
        initial,
        slot,
    }))
}
