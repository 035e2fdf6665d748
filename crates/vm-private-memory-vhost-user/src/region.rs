// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The regions of a backend's memory table.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use guest_memfd::PageRange;
use vhost::VhostUserMemoryRegionInfo;

/// One region of the backend's memory table, as the mapper added it (`ADD_MEM_REG`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRegion {
    /// Its guest-physical range: a run of shared pages, or part of one.
    pub guest: PageRange,
    /// The frontend's host address of its first byte (the message's `userspace_addr`,
    /// which the backend uses to translate the frontend's vring addresses).
    pub userspace_addr: u64,
    /// Its offset in the sealed memfd of shared pages (the message's `mmap_offset`).
    pub mmap_offset: u64,
}

impl BackendRegion {
    pub(crate) fn info(&self, fd: RawFd) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.guest.start(),
            memory_size: self.guest.len(),
            userspace_addr: self.userspace_addr,
            mmap_offset: self.mmap_offset,
            mmap_handle: fd,
        }
    }

    /// The part of the region over `part`, which lies inside it.
    pub(crate) fn clip(&self, part: PageRange) -> BackendRegion {
        let delta = part.start() - self.guest.start();
        BackendRegion {
            guest: part,
            userspace_addr: self.userspace_addr + delta,
            mmap_offset: self.mmap_offset + delta,
        }
    }
}

/// The parts of `range` not covered by `table`'s regions, in order.
pub(crate) fn uncovered(table: &BTreeMap<u64, BackendRegion>, range: PageRange) -> Vec<PageRange> {
    let mut covered: Vec<PageRange> = table
        .range(..range.end())
        .rev()
        .take_while(|(_, r)| r.guest.end() > range.start())
        .map(|(_, r)| r.guest)
        .collect();
    covered.reverse();
    let mut gaps = Vec::new();
    let mut at = range.start();
    for c in covered {
        if c.start() > at {
            gaps.extend(PageRange::new(at, c.start() - at).ok());
        }
        at = at.max(c.end());
    }
    if at < range.end() {
        gaps.extend(PageRange::new(at, range.end() - at).ok());
    }
    gaps
}
