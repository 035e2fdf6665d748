// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The errors of the backend: one enum, each variant naming the range, the step and,
//! where the kernel answered, its errno.

use guest_memfd::PageRange;
use vm_memory::{GuestAddress, GuestRegionCollectionError};
use vmm_sys_util::errno;

use crate::attributes::PageState;
use crate::strategy::{Strategy, UnavailableReason};

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A guest-physical range of bytes, as errors name it: `[start, end)`, any bytes (a
/// loader's range need not be page-aligned), unlike [`guest_memfd::PageRange`], which
/// holds whole pages and is what operations take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl std::fmt::Display for ByteRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{:#x}, {:#x})",
            self.start,
            self.start.saturating_add(self.len)
        )
    }
}

/// Why a region cannot be placed ([`Error::Layout`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// The region overlaps a region already in the memory (or already placed by the
    /// builder).
    #[error("it overlaps region {0}")]
    OverlapsRegion(PageRange),
    /// The region overlaps a range reserved with [`crate::MemoryBuilder::reserve`] (or
    /// [`crate::MemoryBuilder::x86_mmio_hole`]).
    #[error("it overlaps the reserved range {0}")]
    OverlapsReserved(PageRange),
    /// vm-allocator could not manage the guest-physical space or place the region in it
    /// (no free space large enough, a fixed address already taken, or past
    /// [`crate::GUEST_PHYS_LIMIT`]).
    #[error("{0}")]
    Allocator(#[source] vm_allocator::Error),
    /// vm-allocator refused the memslot number range.
    #[error("memslot range {first}..={last}: {source}")]
    SlotRange {
        /// The first memslot number configured.
        first: u32,
        /// The last memslot number configured.
        last: u32,
        /// vm-allocator's error.
        source: vm_allocator::Error,
    },
    /// vm-memory refused the region collection (regions overlapping, or no region at
    /// the address to remove).
    #[error("{0}")]
    Collection(#[source] GuestRegionCollectionError),
    /// The region reaches past the guest-physical space this memory lays regions out in
    /// ([`crate::GUEST_PHYS_LIMIT`]).
    #[error("it reaches past the guest-physical limit {limit:#x}")]
    PastLimit {
        /// The first address past the space.
        limit: u64,
    },
    /// The guest_memfd range given for the region is held by another region (of this
    /// memory or another, bound or not): two guest ranges over the same file pages would
    /// let one read the other's private pages. KVM refuses such a binding itself, but
    /// not where the VMM binds the memslots or another memory holds the range.
    #[error("bytes {file_range} of its guest_memfd overlap bytes {claimed} another region holds: give another offset, or a new file")]
    BackingInUse {
        /// The bytes of the file the region would use.
        file_range: PageRange,
        /// The bytes another region holds.
        claimed: PageRange,
    },
}

/// Why a listener refused a range ([`Error::ListenerRefused`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerRefusal {
    /// [`crate::MemoryListener::populate`] returned this error.
    #[error("{0}")]
    Refused(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The listener panicked; the panic was caught.
    #[error("the listener panicked: {message}")]
    Panicked {
        /// The panic's message (`"a panic"` if it was neither a `&str` nor a `String`).
        message: String,
    },
}

/// Everything that can go wrong in this crate.
///
/// Its `Debug` text is its `Display` text (each message carries its cause), so that
/// `fn main() -> Result<(), Error>` and `unwrap` print a sentence, not a structure.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file layer refused (bad range, ioctl or fallocate failure).
    #[error(transparent)]
    File(#[from] guest_memfd::Error),
    /// Punching (freeing) pages of a conversion or discard failed: `range` is the guest
    /// range of the run, the file layer's error names the file's bytes and the errno.
    #[error("punching guest range {range} failed: {source}")]
    Punch {
        /// The guest-physical range of the run being punched.
        range: ByteRange,
        /// The file layer's error (`fallocate`'s errno and the file's bytes).
        #[source]
        source: guest_memfd::Error,
    },
    /// The requested strategy cannot run on this host or VM, or cannot do what was
    /// asked of it.
    #[error("{}", strategy_refusal(*strategy, reason))]
    StrategyUnavailable {
        /// The strategy asked for.
        strategy: Strategy,
        /// Why: the capability the VM lacks, or the operation the strategy cannot do.
        #[source]
        reason: UnavailableReason,
    },
    /// Regions overlap, or a region does not fit the guest-physical layout.
    #[error("region {range} cannot be placed: {reason}")]
    Layout {
        /// The region.
        range: ByteRange,
        /// Why: an overlap, or vm-allocator's or vm-memory's error.
        #[source]
        reason: LayoutError,
    },
    /// No strategy was asked for, and the VM can run neither: what each lacks.
    #[error("neither backing strategy can run on this VM: in-place: {in_place}; dual: {dual}")]
    NoStrategy {
        /// Why the in-place strategy cannot run.
        in_place: UnavailableReason,
        /// Why the dual strategy cannot run.
        dual: UnavailableReason,
    },
    /// A region the builder places itself ([`crate::MemoryBuilder::region`]) finds no
    /// room: no free range of its size, on a [`crate::REGION_ALIGNMENT`] boundary, is
    /// left below [`crate::GUEST_PHYS_LIMIT`] outside the fixed regions and reserved
    /// ranges.
    #[error("region {index} ({size:#x} bytes, placed by the builder) does not fit: no free range of that size on a 2 MiB boundary is left below {limit:#x} outside the fixed regions and reserved ranges; make it smaller or place it with region_at", limit = crate::GUEST_PHYS_LIMIT)]
    NoRoomForRegion {
        /// The region's index, in the order the builder was given regions.
        index: usize,
        /// Its size in bytes.
        size: u64,
    },
    /// The builder was given no region.
    #[error("no memory region was added: add at least one with MemoryBuilder::region")]
    NoRegions,
    /// A guest-physical range that touches an address outside every region.
    #[error(
        "the range {range} is not inside guest memory (first address outside: {first_outside:#x})"
    )]
    OutsideGuestMemory {
        /// The range given.
        range: ByteRange,
        /// The first address that belongs to no region.
        first_outside: u64,
    },
    /// A host access touched a private page.
    #[error("host access to {range} refused: page {page:#x} is private to the guest")]
    PrivatePage {
        /// The range accessed.
        range: ByteRange,
        /// The guest-physical address of the first private page in it.
        page: u64,
    },
    /// A listener refused a range it was offered (`populate`) or could not let go of one
    /// (a panic in `discard`); the operation was undone.
    #[error("a listener refused {range}: {reason}; the operation was undone")]
    ListenerRefused {
        /// The range offered to the listener (clipped to its subscription).
        range: ByteRange,
        /// The listener's error, or its panic.
        #[source]
        reason: ListenerRefusal,
    },
    /// A listener (or anything it called) tried to convert, discard, add or remove memory
    /// while being notified.
    #[error("a change to {range} was requested from inside a listener callback: listeners must not convert, discard, add or remove memory")]
    Reentrant {
        /// The range asked for.
        range: ByteRange,
    },
    /// `KVM_SET_MEMORY_ATTRIBUTES` failed.
    #[error("KVM_SET_MEMORY_ATTRIBUTES({state}) of {range} failed: {source}")]
    SetAttributes {
        /// The range.
        range: ByteRange,
        /// The state asked for.
        state: PageState,
        /// The kernel's answer.
        source: errno::Error,
    },
    /// The region at an address does not exist (remove, resize).
    #[error("no region starts at {:#x}", .0 .0)]
    NoSuchRegion(GuestAddress),
    /// All memslot numbers this memory may use are in use (adding a region).
    #[error("no memslot number is free: memslots {first}..={last} (configured with MemoryBuilder::slots, or all the host offers) are all in use, and this host has {host_limit} per address space (KVM_CAP_NR_MEMSLOTS); remove a region first or configure more slots")]
    NoFreeSlot {
        /// The first memslot number this memory may use.
        first: u32,
        /// The last memslot number this memory may use.
        last: u32,
        /// The host's memslots per address space.
        host_limit: u32,
    },
    /// The builder was asked for more regions than it has memslot numbers, or for a
    /// memslot range the host cannot offer; found before any file is created.
    #[error("{regions} regions need {regions} memslots, but memslots {first}..={last} were configured (MemoryBuilder::slots; by default all the host offers) and this host has {host_limit} per address space (KVM_CAP_NR_MEMSLOTS), numbered 0..{host_limit}: use fewer, larger regions or a wider slot range inside the host's")]
    NotEnoughSlots {
        /// How many regions were asked for.
        regions: usize,
        /// The first memslot number configured.
        first: u32,
        /// The last memslot number configured.
        last: u32,
        /// The host's memslots per address space.
        host_limit: u32,
    },
    /// A host access through the vm-memory view (a `Bytes` call, or a `VolatileSlice`
    /// still held) was still touching a page of the conversion when the memory's
    /// patience ran out. The conversion was rolled back; retry it once the holder has
    /// dropped its slice (listeners hear `discard` first, so a well-behaved holder does).
    /// A guest's request gets a retryable answer ([`crate::KVM_EAGAIN`]).
    #[error("converting {range} to private waited {waited:?} for a host access still touching it; the conversion was rolled back and may be retried")]
    HostAccessInFlight {
        /// The range asked for.
        range: ByteRange,
        /// How long the conversion waited.
        waited: std::time::Duration,
    },
    /// The barrier that makes host accesses in flight visible to a conversion to
    /// private, or to a region's removal
    /// (`membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`), failed on the calling thread
    /// after the process had registered for it: which host accesses still touch the
    /// pages could not be told, so the operation was rolled back. `EPERM` or `ENOSYS`
    /// means a seccomp filter on the calling thread refuses `membarrier` (allow command
    /// 8 there); that will not pass, and a guest's request gets `-KVM_EFAULT`. `ENOMEM`
    /// (the kernel could not allocate, three times) may pass: a guest's request gets
    /// the retryable `-KVM_EAGAIN`.
    #[error("{range}: membarrier failed ({source}), so the host accesses in flight could not be waited for; rolled back (if a seccomp filter on this thread refuses membarrier, allow it)")]
    HostAccessBarrier {
        /// The range asked for.
        range: ByteRange,
        /// `membarrier`'s error.
        source: std::io::Error,
    },
    /// An operation failed, and so did part of its rollback. KVM's view of `unknown`
    /// may be either state. Listeners refused to take back `listeners_refused`, which
    /// they held before: the bits were put back, and those listeners no longer map them.
    /// `kept_shared` was left shared although the operation meant it private or undone:
    /// a listener could not let go of it (it panicked in `discard` while what it had
    /// accepted was taken back), so the conversion to shared stands there (bits, KVM's
    /// view), and only that listener may map it; for
    /// [`crate::PrivateMemoryManager::subscribe_with_replay`] the listener keeps hearing
    /// `discard` for those runs until it lets go.
    ///
    /// A guest request or a load undone after a later step failed may leave shared what
    /// could not be made private again (`kept_shared`), and private what could not be
    /// made shared again (`kept_private`: the guest, told its request failed, may take
    /// those pages for shared; its accesses then fault and ask again).
    ///
    /// To recover, once the listener can let go, convert `kept_shared` to private (it
    /// hears `discard`), then to shared again if it should be shared: a conversion to
    /// shared of pages already shared offers them to no listener. Or treat the VM as
    /// broken and stop it.
    #[error(
        "{cause}; the rollback failed too:{}",
        rollback_failures(unknown, listeners_refused, kept_shared, kept_private)
    )]
    #[non_exhaustive]
    RollbackFailed {
        /// Why the operation failed.
        cause: Box<Error>,
        /// The ranges whose state in KVM is unknown.
        unknown: Box<[ByteRange]>,
        /// The ranges listeners refused (or panicked on) when offered back.
        listeners_refused: Box<[ByteRange]>,
        /// The ranges left shared although the operation meant them private or undone.
        kept_shared: Box<[ByteRange]>,
        /// The ranges left private although undoing the operation meant them shared.
        kept_private: Box<[ByteRange]>,
    },
    /// Writing a loader's bytes into guest memory failed.
    #[error("loading {range} failed: {source}")]
    Load {
        /// The bytes' guest-physical range.
        range: ByteRange,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
    /// `fstat` of one of a region's files failed.
    #[error("fstat of a region's file failed: {0}")]
    Stat(#[source] std::io::Error),
    /// A saved state is damaged, of another version, or does not describe the memory it
    /// is restored into; nothing was changed.
    #[error("the saved state is refused: {0}")]
    StateMismatch(#[from] crate::state::StateError),
    /// `KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)` for `KVM_HC_MAP_GPA_RANGE` failed although
    /// the host offers it.
    #[error("enabling KVM_HC_MAP_GPA_RANGE exits (KVM_ENABLE_CAP(KVM_CAP_EXIT_HYPERCALL)) failed: {0}; the guest's conversion hypercalls will be answered by KVM, not served")]
    EnableExits(#[source] errno::Error),
    /// A launch population ([`crate::PrivateMemoryManager::launch_private`]) was given a range
    /// with private pages: the content it makes private must be in shared pages.
    #[error("launching {range} needs every page shared (written through the shared side), and {first_private:#x} is private; nothing was changed")]
    LaunchNeedsShared {
        /// The range asked for.
        range: ByteRange,
        /// The first private page.
        first_private: u64,
    },
    /// A launch step (the vendor call) refused a range; the launch was rolled back.
    #[error("the launch step refused {range}: {source}; the launch was rolled back (the pages are shared, with their content)")]
    LaunchStep {
        /// The range the step was given.
        range: ByteRange,
        /// The step's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A region was given a NUMA policy ([`crate::MemoryBuilder::region_at_with_policy`],
    /// [`crate::PrivateMemoryManager::add_region_with_policy`]) on a kernel whose
    /// guest_memfd ignores it: a probe page bound to one node landed on another.
    #[error("this kernel does not apply a guest_memfd's NUMA policy: {support}; build without a policy, or on a kernel that has it")]
    NumaPolicyIgnored {
        /// What the probe found ([`guest_memfd::numa_policy_support`]).
        support: guest_memfd::NumaSupport,
    },
    /// Setting a region's NUMA policy on its guest_memfd mapping (`mbind`) failed after
    /// the policy's checks passed: a node went offline, or this process's allowed nodes
    /// changed, in between. Nothing of the region is kept.
    #[error("setting the NUMA policy of guest-physical {range} failed: {source}; check the policy's nodes against guest_memfd::usable_nodes() and try again")]
    NumaPolicyNotSet {
        /// The region's guest-physical range.
        range: ByteRange,
        /// The file layer's error, with the kernel's errno.
        #[source]
        source: guest_memfd::Error,
    },
    /// Two regions were given the same file as shared backing at overlapping ranges: a
    /// page of one would be a page of the other.
    #[error("the shared backing file ranges {first} and {second} overlap: give each region its own range of the file")]
    SharedBackingOverlap {
        /// The range of the file one region was given.
        first: PageRange,
        /// The overlapping range another region was given.
        second: PageRange,
    },
    /// [`crate::PrivateMemoryManager::remove_region`] on a memory whose memslots the VMM
    /// binds ([`crate::MemoryBuilder::vmm_binds_memslots`]): the VMM deletes the slot,
    /// then removes the region with
    /// [`crate::PrivateMemoryManager::remove_unbound_region`].
    #[error("cannot remove the region at {range} here: the VMM binds this memory's memslots (MemoryBuilder::vmm_binds_memslots); delete its slot, then call remove_unbound_region")]
    VmmBindsMemslots {
        /// The region's range (its start only, for a removal).
        range: ByteRange,
    },
    /// [`crate::PrivateMemoryManager::memslots`] on a memory that binds its own
    /// memslots: there is nothing for the VMM to bind.
    #[error("this memory binds its own memslots: their descriptions (raw host addresses and guest_memfd descriptors) are handed out only with MemoryBuilder::vmm_binds_memslots")]
    MemoryBindsMemslots,
    /// A guest's conversion request was malformed.
    #[error("malformed conversion request from the guest: {0}")]
    BadRequest(#[from] crate::exits::RequestError),
}

impl Error {
    /// The errno the kernel answered with, if the error came from a system call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::File(e) | Error::Punch { source: e, .. } => e.errno(),
            Error::SetAttributes { source, .. } => Some(source.errno()),
            Error::EnableExits(source) => Some(source.errno()),
            Error::RollbackFailed { cause, .. } => cause.errno(),
            Error::NumaPolicyNotSet { source, .. } => source.errno(),
            Error::HostAccessBarrier { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A strategy's refusal: one it cannot run at all ("not available"), or one it runs but
/// cannot do this with.
fn strategy_refusal(strategy: Strategy, reason: &UnavailableReason) -> String {
    if reason.is_capability() {
        format!("the {strategy} strategy is not available: {reason}")
    } else {
        format!("the {strategy} strategy cannot do this: {reason}")
    }
}

/// What a rollback could not put back, naming only what happened.
fn rollback_failures(
    unknown: &[ByteRange],
    listeners_refused: &[ByteRange],
    kept_shared: &[ByteRange],
    kept_private: &[ByteRange],
) -> String {
    let mut parts = Vec::new();
    if !unknown.is_empty() {
        parts.push(format!(
            " KVM's view of {} range(s) is unknown{}",
            unknown.len(),
            first(unknown)
        ));
    }
    if !listeners_refused.is_empty() {
        parts.push(format!(
            " listeners refused {} range(s) back{}",
            listeners_refused.len(),
            first(listeners_refused)
        ));
    }
    if !kept_shared.is_empty() {
        parts.push(format!(
            " {} range(s) stay shared (a listener could not let go of them, or making them private again failed){}",
            kept_shared.len(),
            first(kept_shared)
        ));
    }
    if !kept_private.is_empty() {
        parts.push(format!(
            " {} range(s) stay private (making them shared again failed){}",
            kept_private.len(),
            first(kept_private)
        ));
    }
    parts.join(";")
}

/// The ranges of a non-empty list, for messages: `": [a, b), [c, d)"`, the first
/// eight and how many more (the error's fields hold them all).
fn first(ranges: &[ByteRange]) -> String {
    const SHOWN: usize = 8;
    if ranges.is_empty() {
        return String::new();
    }
    let shown: Vec<String> = ranges.iter().take(SHOWN).map(|r| r.to_string()).collect();
    let more = ranges.len().saturating_sub(SHOWN);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(": {}{more}", shown.join(", "))
}
