// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Saving and restoring the layout and the private/shared map (snapshot, live update).
//!
//! Runtime types stay separate from these serde types. A state carries a CRC-32 of its
//! content, checked when it is decoded and again when it is restored, and restoring
//! checks it against the memory and files it is applied to; a damaged or mismatched state
//! is an error, never a panic, and changes nothing.
//!
//! The checksum catches accidents (a flipped bit on disk or on the wire, a truncated
//! edit), not attacks: anyone can recompute it ([`MemoryState::update_checksum`]). It is
//! not an authentication scheme; a VMM that loads states from an untrusted place must
//! authenticate them itself (a MAC or signature over the serialized bytes).

mod encoding;
mod error;
mod restore;

use std::sync::Arc;

use guest_memfd::{PageRange, VmMemoryOps};
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryBackend;

use crate::builder::MemoryBuilder;
use crate::guard::DirtyBitmap;
use crate::listener::in_callback;
use crate::memory::PrivateMemoryManager;
use crate::strategy::Strategy;

pub use encoding::PrivatePages;
pub use error::StateError;
pub use restore::SharedContent;

/// The version of [`MemoryState`] this crate writes and reads. Version 2 added the
/// checksum and the bitmap form of the map; version 3 what ties a state to the memory
/// it was taken over (each region's file). Older states are refused.
pub const STATE_VERSION: u32 = 3;

/// A file's identity, as `fstat` gives it: its device and inode. Clones and
/// descriptors of one file passed to another process (a live update) share it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdentity {
    /// `st_dev`.
    pub device: u64,
    /// `st_ino`.
    pub inode: u64,
}

impl std::fmt::Display for FileIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "device {:#x}, inode {}", self.device, self.inode)
    }
}

/// A run of private pages: `count` pages from page `first` of its region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// The first page, counted from the region's start.
    pub first: u64,
    /// How many pages.
    pub count: u64,
}

/// One region: where it is, which file range backs it, and its private pages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Its guest-physical range (checked on deserialization).
    pub guest: PageRange,
    /// Where in its guest_memfd it starts.
    pub gmem_offset: u64,
    /// The size of that guest_memfd.
    pub gmem_size: u64,
    /// That guest_memfd's identity (all zeros if `fstat` failed, which matches no file).
    /// Older states have none, and are refused for their version.
    #[serde(default)]
    pub gmem_file: FileIdentity,
    /// How many changes of state that guest_memfd's pages had seen
    /// ([`guest_memfd::GuestMemfd::conversions`]): a restore that keeps content takes
    /// only a state with the count the file has now. `u64::MAX` in a state taken inside
    /// a listener callback, whose map may be half-way through a change.
    #[serde(default)]
    pub gmem_conversions: u64,
    /// Its private pages, as runs or as a bitmap, whichever is shorter.
    pub private: PrivatePages,
}

impl RegionState {
    /// Its private pages as runs, in order, whatever their form, after checking them
    /// (in order, not empty, not overlapping, inside the region).
    ///
    /// # Errors
    ///
    /// [`StateError::BadRun`], [`StateError::BitmapLength`] or
    /// [`StateError::BitmapPadding`] when the map is not a valid map of this region.
    pub fn private_runs(&self) -> Result<Vec<PageRun>, StateError> {
        self.private.runs(self.guest)
    }
}

/// The layout and private/shared map of a [`PrivateMemoryManager`].
///
/// # Size
///
/// Each region's map is written in the shorter of two forms ([`PrivatePages`]), so it
/// never costs more than the base64 of its bitmap. Serialized with serde_json, a state
/// of regions whose bitmaps (one bit per 4 KiB page) total `B` bytes takes at most
/// `4/3 B + 4` bytes per region for the maps (base64 rounding and quotes), plus at most
/// 150 bytes per region (its place and file, with 20-digit numbers) and 100 bytes for
/// the rest. For one 1 GiB region (a 32 KiB bitmap) that is at most 43,950 bytes
/// whatever the pattern (alternating pages included), under 1.5 times the bitmap plus
/// 1 KiB; a map of a few runs takes a few dozen bytes per run.
///
/// # Integrity
///
/// `checksum` is the CRC-32 (IEEE, crc32fast) of the version, strategy, every
/// region's place and file (its identity included), and its map in the form written. Deserialization refuses a state
/// whose version is not [`STATE_VERSION`] (naming both) or whose checksum does not
/// match, and [`PrivateMemoryManager::restore_state`] checks again. A CRC detects accidental
/// damage (a flipped bit on disk or on the wire, a truncated edit), not deliberate change:
/// anyone can recompute it ([`MemoryState::update_checksum`]). A VMM that loads states
/// from an untrusted place must authenticate them itself (a MAC or signature over the
/// serialized bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "UncheckedState")]
pub struct MemoryState {
    /// [`STATE_VERSION`] when written.
    pub version: u32,
    /// The backing strategy.
    pub strategy: Strategy,
    /// Every region, in address order.
    pub regions: Vec<RegionState>,
    /// The CRC-32 of the fields above ([`MemoryState::computed_checksum`]).
    pub checksum: u32,
}

/// A state as read, before its version, checksum and maps are checked. A version 1
/// state (no checksum, runs only) reads as one too, so it is refused for its version.
#[derive(Deserialize)]
struct UncheckedState {
    version: u32,
    strategy: Strategy,
    regions: Vec<RegionState>,
    #[serde(default)]
    checksum: Option<u32>,
}

impl TryFrom<UncheckedState> for MemoryState {
    type Error = StateError;

    fn try_from(raw: UncheckedState) -> Result<Self, StateError> {
        if raw.version != STATE_VERSION {
            return Err(StateError::Version {
                found: raw.version,
                supported: STATE_VERSION,
            });
        }
        let state = MemoryState {
            version: raw.version,
            strategy: raw.strategy,
            regions: raw.regions,
            checksum: raw.checksum.ok_or(StateError::MissingChecksum)?,
        };
        state.checked_runs()?;
        Ok(state)
    }
}

impl MemoryState {
    /// A builder for memory with this state's layout and strategy (no content): build it,
    /// then [`PrivateMemoryManager::restore_state`]. A state holds regions only: add the
    /// source's reserved ranges ([`MemoryBuilder::reserve`],
    /// [`MemoryBuilder::x86_mmio_hole`]) and memslot numbers to the builder again, or
    /// hotplug on the restored memory will not keep out of them.
    pub fn builder(&self, vm: Arc<dyn VmMemoryOps>) -> MemoryBuilder {
        self.regions
            .iter()
            .fold(MemoryBuilder::new(vm).strategy(self.strategy), |b, r| {
                b.region_at(r.guest.start(), r.guest.len())
            })
    }

    /// The CRC-32 of this state's content, as [`MemoryState::checksum`] should hold it.
    pub fn computed_checksum(&self) -> u32 {
        encoding::checksum(self)
    }

    /// Sets [`MemoryState::checksum`] to match the content, after editing a state by
    /// hand (the checksum guards against accidents, not edits).
    pub fn update_checksum(&mut self) {
        self.checksum = self.computed_checksum();
    }

    /// Checks what can be checked without a memory: the version, the checksum, and that
    /// every region's map is valid.
    ///
    /// # Errors
    ///
    /// [`StateError::Version`], [`StateError::Checksum`], or the error of
    /// [`RegionState::private_runs`] for the first region whose map is invalid.
    pub fn verify(&self) -> Result<(), StateError> {
        self.checked_runs().map(drop)
    }

    /// What [`MemoryState::verify`] checks; the private runs of every region.
    fn checked_runs(&self) -> Result<Vec<Vec<PageRun>>, StateError> {
        if self.version != STATE_VERSION {
            return Err(StateError::Version {
                found: self.version,
                supported: STATE_VERSION,
            });
        }
        let computed = self.computed_checksum();
        if computed != self.checksum {
            return Err(StateError::Checksum {
                stored: self.checksum,
                computed,
            });
        }
        self.regions.iter().map(RegionState::private_runs).collect()
    }
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// The current layout and private/shared map, with its checksum. Taken under the
    /// conversion lock, so no conversion is half-way through it (inside a listener
    /// callback, which already runs under it, the map is the one being changed).
    pub fn state(&self) -> MemoryState {
        let engine = (!in_callback()).then(|| self.lock_engine());
        let current = match &engine {
            Some(engine) => Arc::clone(&engine.current),
            None => self.listed().into_inner(),
        };
        let regions = current
            .iter()
            .map(|region| RegionState {
                guest: region.guest_range(),
                gmem_offset: region.gmem_offset(),
                gmem_size: region.gmem().size(),
                gmem_file: crate::region_setup::file_id(region.gmem().file())
                    .map(|(device, inode)| FileIdentity { device, inode })
                    .unwrap_or_default(),
                // Inside a callback the map is half-way through a change that may yet
                // be rolled back (uncounted): a count no file reaches, so that no
                // restore keeps content by such a state.
                gmem_conversions: if engine.is_some() {
                    region.gmem().conversions()
                } else {
                    u64::MAX
                },
                private: PrivatePages::of(region.attributes()),
            })
            .collect();
        drop(engine);
        let mut state = MemoryState {
            version: STATE_VERSION,
            strategy: self.strategy,
            regions,
            checksum: 0,
        };
        state.update_checksum();
        state
    }
}
