// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `hotplug_and_launch` target's model of `add_region`'s documented rules: the
//! memories it runs on (`CONFIGS`), the shapes its input takes ([`Op`], [`Place`],
//! [`Size`], [`Offset`], [`Backing`]), what it knows of a live region, and which rules
//! an addition breaks (`expect_add`) and what the listeners make of it
//! (`listeners_on_add`).

use std::os::unix::fs::MetadataExt;

use arbitrary::Arbitrary;
use guest_memfd::{GuestMemfd, GuestMemfdFlags, PageRange, SharedBacking, PAGE_SIZE};
use vm_private_memory::{
    Error, LayoutError, PageState, UnavailableReason, GUEST_PHYS_LIMIT, X86_MMIO_HOLE,
};

use crate::launch_script::StepScript;

/// How one memory is built.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    pub(crate) dual: bool,
    pub(crate) vmm_binds: bool,
    pub(crate) hole: bool,
    /// Memslot numbers `0..slots` (else all the host's).
    pub(crate) slots: Option<u32>,
}

/// The four memories (see the target's module doc).
pub(crate) const CONFIGS: [Config; 4] = [
    Config {
        dual: false,
        vmm_binds: false,
        hole: true,
        slots: None,
    },
    Config {
        dual: false,
        vmm_binds: true,
        hole: false,
        slots: Some(6),
    },
    Config {
        dual: true,
        vmm_binds: false,
        hole: false,
        slots: Some(6),
    },
    Config {
        dual: true,
        vmm_binds: true,
        hole: true,
        slots: None,
    },
];

/// A guest-physical address, shaped towards the places that matter.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Place {
    /// A live region's start, plus `delta` pages.
    Region {
        /// Which region (modulo their number).
        index: u8,
        /// Pages from its start.
        delta: i8,
    },
    /// A live region's end, plus `delta` pages.
    RegionEnd {
        /// Which region (modulo their number).
        index: u8,
        /// Pages from its end.
        delta: i8,
    },
    /// Page `page` (below 256 MiB).
    Low(u16),
    /// The MMIO hole's start (3 GiB) or end (4 GiB), plus `delta` pages.
    Hole {
        /// The end, else the start.
        end: bool,
        /// Pages from that edge.
        delta: i16,
    },
    /// `GUEST_PHYS_LIMIT` minus `pages` pages.
    Limit(u16),
    /// `2^(32 + bits % 17)` plus `delta` pages: around physical address widths.
    Wide {
        /// The power of two, `32 + bits % 17`.
        bits: u8,
        /// Pages from it.
        delta: i8,
    },
    /// Any page-aligned address.
    Raw(u64),
}

impl Place {
    pub(crate) fn gpa(self, regions: &[Known]) -> u64 {
        let pages = |delta: i64| delta.wrapping_mul(PAGE_SIZE as i64) as u64;
        let region = |index: u8| regions.get(usize::from(index) % regions.len().max(1));
        match self {
            Place::Region { index, delta } => region(index)
                .map_or(0, |r| r.guest.start())
                .wrapping_add(pages(delta.into())),
            Place::RegionEnd { index, delta } => region(index)
                .map_or(0, |r| r.guest.end())
                .wrapping_add(pages(delta.into())),
            Place::Low(page) => u64::from(page) * PAGE_SIZE,
            Place::Hole { end, delta } => {
                let edge = if end {
                    X86_MMIO_HOLE.0 + X86_MMIO_HOLE.1
                } else {
                    X86_MMIO_HOLE.0
                };
                edge.wrapping_add(pages(delta.into()))
            }
            Place::Limit(below) => GUEST_PHYS_LIMIT.wrapping_sub(u64::from(below) * PAGE_SIZE),
            Place::Wide { bits, delta } => {
                (1u64 << (32 + bits % 17)).wrapping_add(pages(delta.into()))
            }
            Place::Raw(v) => v & !(PAGE_SIZE - 1),
        }
    }
}

/// A length in pages.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Size {
    /// 1 to 32 pages.
    Pages(u8),
    /// 2 MiB.
    Huge,
    /// 16 to 256 pages.
    Big(u8),
    /// Any number of pages.
    Raw(u64),
}

/// `[at, at + size)`, if it is a range at all.
pub(crate) fn range_of(at: u64, size: Size) -> Option<PageRange> {
    PageRange::new(at, size.pages().checked_mul(PAGE_SIZE)?).ok()
}

impl Size {
    pub(crate) fn pages(self) -> u64 {
        match self {
            Size::Pages(n) => u64::from(n % 32) + 1,
            Size::Huge => 512,
            Size::Big(n) => (u64::from(n % 16) + 1) * 16,
            Size::Raw(n) => n,
        }
    }
}

/// A file offset.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Offset {
    /// `n` pages.
    Page(u8),
    /// The file's size minus `n` pages.
    EndMinus(u8),
    /// A live region's own offset (in its file), plus `delta` pages.
    Like {
        /// Which region (modulo their number).
        region: u8,
        /// Pages from its offset.
        delta: i8,
    },
    /// Not page-aligned.
    Unaligned(u16),
    /// Anything.
    Raw(u64),
}

impl Offset {
    pub(crate) fn get(self, size: u64, regions: &[Known]) -> u64 {
        match self {
            Offset::Page(n) => u64::from(n) * PAGE_SIZE,
            Offset::EndMinus(n) => size.wrapping_sub(u64::from(n) * PAGE_SIZE),
            Offset::Like { region, delta } => regions
                .get(usize::from(region) % regions.len().max(1))
                .map_or(0, |r| r.offset)
                .wrapping_add((i64::from(delta) * PAGE_SIZE as i64) as u64),
            Offset::Unaligned(v) => u64::from(v) % (PAGE_SIZE - 1) + 1 + PAGE_SIZE,
            Offset::Raw(v) => v,
        }
    }
}

/// A file and an offset in it.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Backing {
    /// A file of the pool.
    Pool {
        /// Which file (modulo their number).
        file: u8,
        /// Where in it.
        offset: Offset,
    },
    /// The file of a live region, if the pool has it, at that region's offset plus
    /// `delta` pages.
    OfRegion {
        /// Which region (modulo their number).
        region: u8,
        /// Pages from its offset.
        delta: i8,
    },
}

/// One operation of an input.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Op {
    /// Create a guest_memfd for the pool.
    NewFile {
        /// Its size (1 to 512 pages).
        size: Size,
        /// Its flags: none, `MMAP`, `INIT_SHARED` or both (`flags % 4`).
        flags: u8,
    },
    /// Create a sealed memfd for the pool of shared sides.
    NewSharedFile {
        /// Its size (1 to 512 pages).
        size: Size,
    },
    /// `add_region`.
    Add {
        /// Where.
        at: Place,
        /// How long.
        size: Size,
        /// The file (if the pool has it), else a new one.
        backing: Option<Backing>,
        /// Its pages start shared, else private.
        shared: bool,
    },
    /// `add_region_with_shared`.
    AddWithShared {
        /// Where.
        at: Place,
        /// How long.
        size: Size,
        /// The guest_memfd (if the pool has it), else a new one.
        backing: Option<Backing>,
        /// The shared side.
        side: Backing,
        /// Its pages start shared, else private.
        shared: bool,
    },
    /// `remove_region`, or `remove_unbound_region` on VMM-bound memory.
    Remove {
        /// The region's start, or not.
        at: Place,
        /// On VMM-bound memory, also `remove_unbound_region` (after `remove_region`,
        /// which it refuses).
        unbound: bool,
    },
    /// `convert`.
    Convert {
        /// Where.
        at: Place,
        /// How long.
        size: Size,
        /// To private, else shared.
        private: bool,
    },
    /// Set the listeners' faults (on memory that binds its own memslots only).
    Listeners {
        /// Each refuses every `populate`.
        refuse: [bool; 2],
        /// Each panics in every `discard`.
        panic: [bool; 2],
    },
    /// `launch_private`.
    Launch {
        /// Where.
        at: Place,
        /// How long (up to 512 pages).
        size: Size,
        /// The image's content: page `n` is filled with `fill + n`.
        fill: u8,
        /// What each of the first three steps does (later ones succeed).
        steps: [StepScript; 3],
    },
}

/// What this target knows of a live region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Known {
    pub(crate) guest: PageRange,
    /// `backing()`'s `gmem_inode`, `gmem_offset`, `gmem_size`.
    pub(crate) inode: u64,
    pub(crate) offset: u64,
    pub(crate) size: u64,
    /// The shared side from the pool of shared files: its (device, inode) and range.
    pub(crate) side: Option<((u64, u64), PageRange)>,
}

/// Why the model refuses an addition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Why {
    PastLimit,
    Reserved,
    Overlap,
    Flags,
    /// A file range that is unaligned, overflows or leaves its file (either file).
    FileRange,
    InUse,
    SharedNeedsDual,
    SharedOverlap,
    NoSlot,
}

/// The rule `e` says an addition broke, if it is one the model knows.
pub(crate) fn why(e: &Error) -> Option<Why> {
    Some(match e {
        Error::Layout { reason, .. } => match reason {
            LayoutError::PastLimit { .. } => Why::PastLimit,
            LayoutError::OverlapsReserved(_) => Why::Reserved,
            LayoutError::OverlapsRegion(_) => Why::Overlap,
            LayoutError::BackingInUse { .. } => Why::InUse,
            _ => return None,
        },
        Error::StrategyUnavailable { reason, .. } => match reason {
            UnavailableReason::FlagsOwnedByStrategy { .. }
            | UnavailableReason::BackingLacksFlags { .. } => Why::Flags,
            UnavailableReason::SharedBackingNeedsDual => Why::SharedNeedsDual,
            _ => return None,
        },
        Error::File(_) => Why::FileRange,
        Error::SharedBackingOverlap { .. } => Why::SharedOverlap,
        Error::NoFreeSlot { .. } => Why::NoSlot,
        _ => return None,
    })
}

/// What the listeners make of an operation (memories that bind their own memslots).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Modes {
    pub(crate) refuse: [bool; 2],
    pub(crate) panic: [bool; 2],
}

/// The outcome of an addition the layout rules accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Added,
    Refused,
    /// A listener refused, and one that had accepted could not let go: the region stays,
    /// shared, named in `kept_shared`.
    Kept,
}

/// The (device, inode) of `file`.
pub(crate) fn inode(file: &std::fs::File) -> (u64, u64) {
    let meta = file.metadata().expect("fstat of a pool file");
    (meta.dev(), meta.ino())
}

/// The rules an addition of `guest` to memory built as `config`, with `known` its
/// regions, breaks (empty: it should be accepted).
pub(crate) fn expect_add(
    config: &Config,
    known: &[Known],
    guest: PageRange,
    backing: Option<(&GuestMemfd, u64)>,
    side: Option<(&SharedBacking, u64)>,
) -> Vec<Why> {
    let mut broken = Vec::new();
    if guest.end() > GUEST_PHYS_LIMIT {
        broken.push(Why::PastLimit);
    }
    let hole = PageRange::new(X86_MMIO_HOLE.0, X86_MMIO_HOLE.1).unwrap();
    if config.hole && hole.intersection(&guest).is_some() {
        broken.push(Why::Reserved);
    }
    if known.iter().any(|k| k.guest.intersection(&guest).is_some()) {
        broken.push(Why::Overlap);
    }
    if let Some((file, offset)) = backing {
        let owned = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
        let fits = if config.dual {
            !file.flags().intersects(owned)
        } else {
            file.flags().contains(owned)
        };
        if !fits {
            broken.push(Why::Flags);
        }
        match PageRange::new(offset, guest.len()) {
            Ok(range) if range.end() <= file.size() => {
                let (_, ino) = inode(file.file());
                let used = |k: &Known| {
                    k.inode == ino
                        && PageRange::new(k.offset, k.guest.len())
                            .is_ok_and(|r| r.intersection(&range).is_some())
                };
                if known.iter().any(used) {
                    broken.push(Why::InUse);
                }
            }
            _ => broken.push(Why::FileRange),
        }
    }
    if let Some((file, offset)) = side {
        if !config.dual {
            broken.push(Why::SharedNeedsDual);
        } else {
            match PageRange::new(offset, guest.len()) {
                Ok(range) if range.end() <= file.size() => {
                    let id = inode(file.file());
                    let used = |k: &Known| {
                        k.side
                            .is_some_and(|(f, r)| f == id && r.intersection(&range).is_some())
                    };
                    if known.iter().any(used) {
                        broken.push(Why::SharedOverlap);
                    }
                }
                _ => broken.push(Why::FileRange),
            }
        }
    }
    if config.slots.is_some_and(|n| known.len() >= n as usize) {
        broken.push(Why::NoSlot);
    }
    broken
}

/// What the listeners, in modes `m`, make of an addition that passes the layout rules.
pub(crate) fn listeners_on_add(m: Modes, initial: PageState) -> Outcome {
    match initial {
        PageState::Private => Outcome::Added,
        // Offered to the first listener, then the second.
        PageState::Shared if m.refuse[0] => Outcome::Refused,
        // The first accepted; taking it back from it fails if it cannot let go.
        PageState::Shared if m.refuse[1] && m.panic[0] => Outcome::Kept,
        PageState::Shared if m.refuse[1] => Outcome::Refused,
        PageState::Shared => Outcome::Added,
    }
}
