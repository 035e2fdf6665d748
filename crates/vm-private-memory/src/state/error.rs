// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Why a saved state is refused.

use guest_memfd::PageRange;

use super::PageRun;
use crate::strategy::Strategy;

/// Why a [`super::MemoryState`] was refused, when decoded or restored. Nothing was
/// changed when one of these is returned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The state was written by a version of this crate whose format this one does not
    /// read.
    #[error(
        "state version {found} is not supported: this crate reads state version {supported} only"
    )]
    Version {
        /// The version the state says it has.
        found: u32,
        /// [`super::STATE_VERSION`], the only version read.
        supported: u32,
    },
    /// The state has no checksum.
    #[error("the state has no checksum")]
    MissingChecksum,
    /// The checksum does not match the content: the state was damaged (or edited without
    /// [`super::MemoryState::update_checksum`]).
    #[error("the state's checksum {stored:#010x} does not match its content ({computed:#010x}): it was damaged or edited")]
    Checksum {
        /// The checksum the state carries.
        stored: u32,
        /// The checksum of its content.
        computed: u32,
    },
    /// A run of private pages is empty, out of order, overlapping the one before, or
    /// reaches past the region.
    #[error("region {region}: private run {run:?} is empty, out of order, overlapping or past the region's {pages} pages")]
    BadRun {
        /// The region's guest-physical range.
        region: PageRange,
        /// The run.
        run: PageRun,
        /// How many pages the region has.
        pages: u64,
    },
    /// A bitmap has the wrong length for its region.
    #[error("region {region}: the private bitmap has {len} bytes, a region of {pages} pages needs {expected}")]
    BitmapLength {
        /// The region's guest-physical range.
        region: PageRange,
        /// The bitmap's length in bytes.
        len: usize,
        /// The length a bitmap of this region has.
        expected: usize,
        /// How many pages the region has.
        pages: u64,
    },
    /// A bitmap marks pages past the end of its region.
    #[error("region {region}: the private bitmap marks pages past the region's {pages} pages")]
    BitmapPadding {
        /// The region's guest-physical range.
        region: PageRange,
        /// How many pages the region has.
        pages: u64,
    },
    /// The state is for the other backing strategy.
    #[error("the state is for the {saved} strategy, this memory uses {actual}")]
    Strategy {
        /// The state's strategy.
        saved: Strategy,
        /// This memory's strategy.
        actual: Strategy,
    },
    /// The state and the memory have different numbers of regions.
    #[error("the state has {saved} regions, this memory {actual}")]
    RegionCount {
        /// Regions in the state.
        saved: usize,
        /// Regions in this memory.
        actual: usize,
    },
    /// A region of the state is not the memory's region at the same index: another
    /// place, or another file offset or file size.
    #[error("region {index}: {saved} at file offset {saved_offset:#x} of a {saved_size:#x}-byte file does not match {actual} at offset {actual_offset:#x} of a {actual_size:#x}-byte file")]
    Region {
        /// The region's index, in address order.
        index: usize,
        /// The state's guest-physical range.
        saved: PageRange,
        /// The state's offset in the guest_memfd.
        saved_offset: u64,
        /// The state's guest_memfd size.
        saved_size: u64,
        /// The memory's guest-physical range.
        actual: PageRange,
        /// The memory's offset in its guest_memfd.
        actual_offset: u64,
        /// The real size of the memory's guest_memfd.
        actual_size: u64,
    },
    /// [`crate::SharedContent::Keep`] with a state taken over another guest_memfd than
    /// this memory's region's: the pages it makes shared would show the host whatever
    /// that file's private pages hold.
    #[error("region {index}: the state was taken over another guest_memfd ({saved}; this memory's is {actual}): SharedContent::Keep would show the host what its private pages hold; restore with SharedContent::Empty")]
    KeepOverAnotherFile {
        /// The region's index, in address order.
        index: usize,
        /// The state's file.
        saved: super::FileIdentity,
        /// The memory's file.
        actual: super::FileIdentity,
    },
    /// [`crate::SharedContent::Keep`] with a state older than the last conversion of a
    /// region's guest_memfd pages (by any memory): its private pages may hold what the
    /// guest wrote since, which keeping content would show the host.
    #[error("pages of region {region}'s guest_memfd changed state after the state was taken: SharedContent::Keep takes only the last state of those files; restore with SharedContent::Empty")]
    KeepAfterConversions {
        /// The first region with converted pages.
        region: PageRange,
    },
    /// The size of a region's guest_memfd could not be read.
    #[error("region {region}: fstat of its guest_memfd failed: {source}")]
    FileSize {
        /// The region's guest-physical range.
        region: PageRange,
        /// The system's answer.
        source: std::io::Error,
    },
}
