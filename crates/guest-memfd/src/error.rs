// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The errors of this crate: one enum, each variant naming the operation, the range or
//! value at fault and, where the kernel answered, its errno.

use std::io;

use vm_memory::mmap::MmapRegionError;
use vmm_sys_util::errno;

use crate::flags::GuestMemfdFlags;
use crate::range::{PageRange, PAGE_SIZE};

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Which file space operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpaceOp {
    /// `fallocate(FALLOC_FL_KEEP_SIZE)`: back the range with memory.
    Allocate,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`: free the range.
    Discard,
}

impl std::fmt::Display for SpaceOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SpaceOp::Allocate => "allocate",
            SpaceOp::Discard => "discard (punch hole)",
        })
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A range of length zero was given.
    #[error("the range at {start:#x} is empty: give a length of at least one page ({PAGE_SIZE:#x} bytes)")]
    EmptyRange {
        /// Its start.
        start: u64,
    },
    /// A range whose start or length is not a multiple of the page size.
    #[error("the range at {start:#x} of {len:#x} bytes is not page-aligned: guest_memfd works in whole {PAGE_SIZE:#x}-byte pages, so round both start and length to the page size")]
    UnalignedRange {
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A range whose end does not fit in 64 bits.
    #[error("the range at {start:#x} of {len:#x} bytes overflows the 64-bit address space")]
    RangeOverflow {
        /// Its start.
        start: u64,
        /// Its length.
        len: u64,
    },
    /// A range that does not lie inside the file it was applied to.
    #[error("the range {range} is not inside the file of {file_size:#x} bytes: use a range below the file size")]
    OutOfBounds {
        /// The range given.
        range: PageRange,
        /// The size of the file.
        file_size: u64,
    },
    /// A range of a guest_memfd that overlaps one another user holds
    /// ([`crate::GuestMemfd::claim`]).
    #[error("bytes {requested} of the guest_memfd overlap bytes {claimed} another region holds: use another offset, or another file")]
    RangeClaimed {
        /// The range asked for.
        requested: PageRange,
        /// The claim it overlaps.
        claimed: PageRange,
    },
    /// A file size that is zero or not a multiple of the page size.
    #[error("a file size of {size:#x} bytes is invalid: it must be a non-zero multiple of the page size ({PAGE_SIZE:#x})")]
    InvalidSize {
        /// The size given.
        size: u64,
    },
    /// The VM (kernel) has no guest_memfd at all.
    #[error("this VM does not support guest_memfd (KVM_CAP_GUEST_MEMFD is 0): a Linux 6.8 or later host with CONFIG_KVM_GUEST_MEMFD is needed")]
    GuestMemfdUnsupported,
    /// Creation flags that the VM does not accept.
    #[error("guest_memfd flags {requested} are not supported by this VM, which accepts {supported} (KVM_CAP_GUEST_MEMFD_FLAGS): leave out {unsupported}")]
    UnsupportedFlags {
        /// The flags asked for.
        requested: GuestMemfdFlags,
        /// The flags the VM accepts.
        supported: GuestMemfdFlags,
        /// The difference.
        unsupported: GuestMemfdFlags,
    },
    /// `KVM_CREATE_GUEST_MEMFD` failed.
    #[error("KVM_CREATE_GUEST_MEMFD of {size:#x} bytes with flags {flags} failed: {source}")]
    Create {
        /// The size asked for.
        size: u64,
        /// The flags asked for.
        flags: GuestMemfdFlags,
        /// The kernel's answer.
        source: errno::Error,
    },
    /// `fallocate` failed.
    #[error("{op} of {range} failed: {source}")]
    FileSpace {
        /// Which operation.
        op: SpaceOp,
        /// The file range.
        range: PageRange,
        /// The kernel's answer.
        source: errno::Error,
    },
    /// A mapping was asked of a guest_memfd created without `MMAP`.
    #[error("this guest_memfd was created with flags {flags}, without MMAP, so it cannot be mapped: create it with GuestMemfdFlags::MMAP")]
    NotMappable {
        /// The file's flags.
        flags: GuestMemfdFlags,
    },
    /// A mapping was asked of a guest_memfd whose pages do not start shared: every access
    /// through such a mapping would raise SIGBUS.
    #[error("this guest_memfd was created with flags {flags}, without INIT_SHARED: its pages are private to the guest and every host access through a mapping would raise SIGBUS; create it with MMAP | INIT_SHARED to map it")]
    NotShared {
        /// The file's flags.
        flags: GuestMemfdFlags,
    },
    /// `mmap` failed.
    #[error("mmap(MAP_SHARED) of {range} failed: {source}")]
    Map {
        /// The file range.
        range: PageRange,
        /// vm-memory's error, which carries the errno.
        source: MmapRegionError,
    },
    /// `fstat` on the file failed.
    #[error("fstat failed: {0}")]
    Stat(#[source] io::Error),
    /// A shared backing file could not be sealed against changing size.
    #[error("the shared backing file cannot be sealed against shrinking and growing: {source} (EINVAL: not a memfd; EPERM: made without MFD_ALLOW_SEALING, or sealed already); create it with memfd_create(MFD_ALLOW_SEALING), or use SharedBacking::from_file_unsealed and keep it from shrinking")]
    NotSealable {
        /// The kernel's errno.
        source: errno::Error,
    },
    /// `lseek(SEEK_DATA / SEEK_HOLE)` on the file (or duplicating its descriptor for it)
    /// failed.
    #[error("lseek(SEEK_DATA/SEEK_HOLE) failed: {0}")]
    Seek(#[source] io::Error),
    /// The name given to a sealed memfd contains a NUL byte.
    #[error("the memfd name {name:?} contains a NUL byte")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// `memfd_create`, `ftruncate` or `fcntl(F_ADD_SEALS)` failed.
    #[error("{step} of the sealed memfd {name:?} ({size:#x} bytes) failed: {source}")]
    SealedMemfd {
        /// `memfd_create`, `ftruncate` or `F_ADD_SEALS`.
        step: &'static str,
        /// The memfd's name.
        name: String,
        /// Its size.
        size: u64,
        /// The kernel's answer.
        source: io::Error,
    },
    /// A memslot's userspace address is not page-aligned.
    #[error("memslot {slot}: userspace address {addr:#x} is not page-aligned")]
    UnalignedUserspaceAddress {
        /// The slot.
        slot: u32,
        /// The address given.
        addr: u64,
    },
    /// A memslot's userspace mapping is smaller than the slot.
    #[error("memslot {slot}: the userspace mapping of {mapping_len:#x} bytes is smaller than the slot's {slot_len:#x} bytes")]
    MappingTooSmall {
        /// The slot.
        slot: u32,
        /// The mapping's length.
        mapping_len: u64,
        /// The slot's length.
        slot_len: u64,
    },
    /// A memslot number at or above the host's limit.
    #[error("memslot {slot} is out of range: this host has {limit} memslots per address space (KVM_CAP_NR_MEMSLOTS)")]
    SlotOutOfRange {
        /// The slot.
        slot: u32,
        /// The host's limit.
        limit: u32,
    },
    /// `KVM_SET_USER_MEMORY_REGION2` failed.
    #[error("KVM_SET_USER_MEMORY_REGION2 for memslot {slot} ({action} guest range {guest_range}) failed: {source}")]
    SetMemoryRegion {
        /// The slot.
        slot: u32,
        /// `bind` or `unbind`.
        action: &'static str,
        /// The guest-physical range.
        guest_range: PageRange,
        /// The kernel's answer.
        source: errno::Error,
    },
    /// A NUMA node set with no node in it.
    #[error("a NUMA node set must name at least one node")]
    EmptyNodeSet,
    /// A NUMA node number too large for a node set.
    #[error("NUMA node {node} is out of range: node sets hold nodes 0 to 63")]
    NodeOutOfRange {
        /// The node given.
        node: u32,
    },
    /// A NUMA node this process cannot place memory on: offline, without memory, or
    /// outside its cpuset.
    #[error("NUMA node {node} is not a node this process may place memory on, which are {usable:?} (online nodes with memory, within its cpuset): name only those")]
    NoSuchNode {
        /// The node given.
        node: u32,
        /// The nodes this process may use ([`crate::usable_nodes`]).
        usable: Vec<u32>,
    },
    /// A NUMA system call (`mbind`, `get_mempolicy`, `set_mempolicy`, `mincore`) or
    /// reading the host's nodes failed.
    #[error("{op} failed: {source}")]
    Numa {
        /// What was done.
        op: &'static str,
        /// The kernel's answer.
        source: errno::Error,
    },
}

impl Error {
    /// The errno the kernel answered with, if this error came from a system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Create { source, .. }
            | Error::FileSpace { source, .. }
            | Error::SetMemoryRegion { source, .. }
            | Error::NotSealable { source }
            | Error::Numa { source, .. } => Some(source.errno()),
            Error::Map {
                source: MmapRegionError::Mmap(e),
                ..
            }
            | Error::Stat(e)
            | Error::Seek(e)
            | Error::SealedMemfd { source: e, .. } => e.raw_os_error(),
            _ => None,
        }
    }
}
