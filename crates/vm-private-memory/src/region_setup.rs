// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Setting up regions, at build time or hotplugged: the checks on what the VMM gives for
//! them (shared backings, NUMA policies), and one region's host mapping, with its policy
//! set, or with the dual strategy its shared side (a new sealed memfd where the VMM gave
//! no file).

use std::os::unix::fs::MetadataExt;

use guest_memfd::{
    GuestMemfd, GuestMemfdFlags, NumaPolicy, NumaSupport, PageRange, SealedMemfd, SharedBacking,
    VmMemoryOps,
};

use crate::attributes::PageState;
use crate::error::{ByteRange, Error, Result};
use crate::guard::DirtyBitmap;
use crate::region::{GuestRegionPrivate, RegionParts, SharedSide};
use crate::strategy::{Strategy, UnavailableReason};

/// Checks the regions' NUMA policies before anything is created: the in-place strategy
/// only, nodes this process may use, and a kernel that applies them (probed once, by
/// behaviour). Says whether to set them: not where a single node is usable.
pub(crate) fn check_policies<'a>(
    strategy: Strategy,
    vm: &dyn VmMemoryOps,
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
    let file = file_id(backing.file())?;
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

/// The (device, inode) of a file: clones and duplicated descriptors of one file agree.
pub(crate) fn file_id(file: &std::fs::File) -> Result<(u64, u64)> {
    let meta = file.metadata().map_err(Error::Stat)?;
    Ok((meta.dev(), meta.ino()))
}

/// Checks the flags of a guest_memfd for `strategy`: in place, the host maps it
/// (`MMAP | INIT_SHARED`); dual, it must not decide where shared pages live (KVM would
/// take them from it while devices use the shared side).
pub(crate) fn check_gmem_flags(strategy: Strategy, flags: GuestMemfdFlags) -> Result<()> {
    let owned = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let reason = match strategy {
        Strategy::Dual if flags.intersects(owned) => UnavailableReason::FlagsOwnedByStrategy {
            flags: flags & owned,
        },
        Strategy::InPlace if !flags.contains(owned) => UnavailableReason::BackingLacksFlags {
            flags: owned - flags,
        },
        _ => return Ok(()),
    };
    Err(Error::StrategyUnavailable { strategy, reason })
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
    // Before anything is mapped: a range another region holds (of this memory or
    // another, bound or not) would show its private pages through this one.
    let claim = gmem.claim(file_range).map_err(|e| match e {
        guest_memfd::Error::RangeClaimed { requested, claimed } => Error::Layout {
            range: ByteRange {
                start: guest.start(),
                len: guest.len(),
            },
            reason: crate::error::LayoutError::BackingInUse {
                file_range: requested,
                claimed,
            },
        },
        other => other.into(),
    })?;
    let (shared, host) = match strategy {
        Strategy::InPlace => {
            let host = gmem.map_range(file_range)?;
            // Before any page of the mapping is touched: pages allocated from now on
            // follow it.
            if let Some(policy) = policy {
                policy
                    .apply(&host)
                    .map_err(|source| Error::NumaPolicyNotSet {
                        range: ByteRange {
                            start: guest.start(),
                            len: guest.len(),
                        },
                        source,
                    })?;
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
        claim,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_memfd::{Capabilities, NodeSet};

    /// A policy the kernel refuses when it is set (here a node that is not online, which
    /// the builder's checks refuse first; a node going offline in between gets here)
    /// names the region's guest-physical range and the errno.
    #[test]
    fn a_policy_the_kernel_refuses_names_the_region() {
        // Real KVM where it has in-place guest_memfd, else the stand-in (`mbind` on its
        // memfd's mapping refuses an offline node as on a guest_memfd's).
        let vm = guest_memfd::stand_in::vm_for_logic_tests();
        assert!(Capabilities::of_vm(&*vm).in_place_capable());
        let guest = PageRange::new(0x4000_0000, 2 << 20).unwrap();
        let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
        let gmem = GuestMemfd::create(&*vm, guest.len(), flags).expect("a guest_memfd");
        let offline = guest_memfd::MAX_NODES - 1;
        let policy = NumaPolicy::Bind(NodeSet::new(&[offline]).unwrap());
        let err = make_region::<()>(
            Strategy::InPlace,
            guest,
            (gmem, 0),
            PageState::Shared,
            0,
            None,
            Some(policy),
        )
        .map(|_| ())
        .expect_err("mbind refuses a node that is not online");
        assert!(
            matches!(
                &err,
                Error::NumaPolicyNotSet { range, .. }
                    if *range == ByteRange { start: 0x4000_0000, len: 2 << 20 }
            ),
            "{err}"
        );
        // EINVAL for a node that is not online; ENOSYS from a kernel without NUMA.
        assert!(
            matches!(err.errno(), Some(libc::EINVAL | libc::ENOSYS)),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("[0x40000000, 0x40200000)"), "{text}");
        assert!(text.contains("usable_nodes"), "{text}");
    }
}
