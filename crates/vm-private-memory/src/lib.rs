// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A vm-memory backend for KVM guest private memory.
//!
//! Confidential guests (Intel TDX, AMD SEV-SNP) keep most of their RAM *private*: KVM
//! serves it from a guest_memfd, and the host must not read or write it. A few pages are
//! *shared* for I/O (bounce buffers, virtio rings), and the guest converts pages between
//! the two at run time. This crate is the VMM's side of that: guest RAM made of
//! guest_memfd regions, with one private/shared bit per page, that plugs into vm-memory
//! so device emulation, loaders and vCPU set-up keep working, and that refuses every host
//! access to a private page.
//!
//! # Pieces
//!
//! - [`MemoryBuilder`] lays regions out in guest-physical space (vm-allocator), chooses a
//!   [`Strategy`] from the VM's capabilities, creates the files and binds each region to
//!   a memslot (`KVM_SET_USER_MEMORY_REGION2`, slot numbers from vm-allocator).
//! - [`PrivateMemoryManager`] owns it all. [`PrivateMemoryManager::memory`] is the vm-memory view, a
//!   `GuestMemoryAtomic<GuestRegionCollection<GuestRegionPrivate>>`: `Bytes`, `GuestMemory`
//!   (with `Permissions`), `GuestMemoryBackend` and linux-loader work on it unchanged.
//! - [`PrivateMemoryManager::convert`] changes pages between private and shared, all or nothing;
//!   [`PrivateMemoryManager::discard`] frees pages (balloon, free page reporting).
//! - [`MemoryListener`]s (VFIO DMA maps, vhost-user tables, queue caches) hear `discard`
//!   before host access to a range is revoked and `populate` after it is granted.
//! - [`ConversionRequest`], [`PrivateMemoryManager::serve_memory_fault`] and
//!   [`PrivateMemoryManager::handle_map_gpa_range`] serve the guest's requests
//!   (`KVM_EXIT_MEMORY_FAULT`, `KVM_HC_MAP_GPA_RANGE`), checking every field.
//! - [`MemoryState`] saves and restores the layout and the private/shared map.
//! - Dirty tracking of host writes, as `GuestMemoryMmap<AtomicBitmap>` does it: build
//!   with [`MemoryBuilder::build_with_bitmap`] and read
//!   [`GuestRegionPrivate::dirty_bitmap`] (KVM refuses dirty logging on guest_memfd
//!   memslots, so guest writes are not tracked).
//! - [`VmMemoryOps`] (from `guest-memfd`) is every VM call this crate makes: implemented for
//!   kvm-ioctls' `VmFd`, and implementable by a VMM's own hypervisor wrapper, which
//!   [`MemoryBuilder::new`] then takes instead.
//!
//! # Strategies
//!
//! - **In-place** (Linux 6.18+, default VM type): one guest_memfd per region, created
//!   `MMAP | INIT_SHARED`, bound as a gmem-only slot and mapped by the host. KVM treats
//!   every page as shared; "private" is this crate's host access policy. Conversions
//!   punch the page so it arrives fresh, or keep it with [`ContentMode::Preserve`].
//! - **Dual** (TDX, SEV-SNP, `KVM_X86_SW_PROTECTED_VM`): a guest_memfd without `MMAP`
//!   for private pages and a sealed memfd for shared ones; `KVM_SET_MEMORY_ATTRIBUTES`
//!   tells KVM which side serves each page, and the side no longer used is punched, so
//!   memory is never held twice.
//!
//! # Host access policy
//!
//! Every host access path of the vm-memory view (`Bytes`, `get_slice`,
//! `GuestMemory::get_slices` and the helpers built on them) checks the bits of exactly
//! the pages it would touch (or, in a region with no private page, its count of private
//! pages), without locks, and fails with a `PermissionDenied` error
//! wrapping [`Error::PrivatePage`] if any is private; memory is not touched.
//! `get_host_address` answers only while its *whole region* is shared, because rust-vmm
//! code maps `get_host_address(0)` plus the region's length (VFIO, vhost-user).
//!
//! **The guarantee.** Once [`PrivateMemoryManager::convert`] to private returns, no host access
//! made through a vm-memory call can still read or write the page: every slice the view
//! hands out carries an [`AccessGuard`] that publishes its host range before the bits are
//! checked and withdraws it when the slice (and every slice cut from it) is dropped, and
//! the conversion waits for the published ranges that touch its pages before it punches
//! them or tells KVM. `Bytes` calls take a slice, copy and drop it, so they are covered
//! whole. A `VolatileSlice` kept by a caller holds its pages: a conversion of them waits
//! at most the memory's patience ([`MemoryBuilder::access_patience`], 20 ms by
//! default), then fails, rolled back, with [`Error::HostAccessInFlight`] (a guest's
//! request is answered `-EAGAIN`, so a guest cannot stall a vCPU through a device that
//! holds a slice). Holders learn of the revocation from a [`MemoryListener`]'s `discard`,
//! which runs before the bits change. A raw pointer (`get_host_address`, `as_ptr`) is
//! not covered: its holder must subscribe a listener. Accesses never fault the process,
//! and KVM's own accesses through the host mapping are untouched.
//!
//! The cost: the access side publishes with two plain stores and a compiler barrier,
//! and withdraws with one store; the conversion side runs
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` (skipped while no other thread owns a
//! slot of the access tracker, that is, has accessed memory and not exited), which makes
//! every running thread of the process execute a full barrier (see `BENCHMARKS.md` for
//! both). A VMM that confines its threads with seccomp must allow `membarrier`: where
//! it fails a conversion to private is refused ([`Error::HostAccessBarrier`]). The
//! protocol is model-checked with loom (`RUSTFLAGS="--cfg loom"`).
//!
//! One vm-memory behaviour to know: an access that spans two regions is done region by
//! region, and a refusal in the second surfaces as a short access (`PartialBuffer`)
//! after the first region's part was done.
//!
//! # Example
//!
//! ```
//! use std::sync::Arc;
//! use guest_memfd::PageRange;
//! use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
//! use vm_private_memory::{private_page_refusal, MemoryBuilder, PageState};
//!
//! // Needs /dev/kvm: without it, the example says so and stops.
//! let Ok(kvm) = kvm_ioctls::Kvm::new() else {
//!     println!("SKIPPED: this example needs /dev/kvm");
//!     return;
//! };
//! let vm = Arc::new(kvm.create_vm().unwrap());
//! // And guest_memfd with MMAP | INIT_SHARED (Linux 6.18), for in-place memory.
//! if !guest_memfd::Capabilities::of_vm(&*vm).in_place_capable() {
//!     println!("SKIPPED: this example needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
//!     return;
//! }
//! // 4 MiB of guest RAM at 0, all private, as a TDX or SNP guest starts.
//! let memory = MemoryBuilder::new(vm)
//!     .region_at(0, 4 << 20)
//!     .initial_state(PageState::Private)
//!     .build()
//!     .unwrap();
//! let guest_ram = memory.guest_memory();
//!
//! // The host cannot read private memory.
//! let err = guest_ram.memory().read_obj::<u64>(GuestAddress(0x1000)).unwrap_err();
//! assert!(private_page_refusal(&err).is_some());
//!
//! // The guest asks (KVM_HC_MAP_GPA_RANGE) for 16 pages at 1 MiB to become shared.
//! assert_eq!(memory.handle_map_gpa_range(1 << 20, 16, 0), 0);
//! guest_ram.memory().write_obj(0xfeed_u64, GuestAddress(1 << 20)).unwrap();
//!
//! // And back to private: the host is locked out again, and the page will be fresh.
//! let back = PageRange::new(1 << 20, 16 * 4096).unwrap();
//! memory.convert(back, PageState::Private).unwrap();
//! assert!(guest_ram.memory().read_obj::<u64>(GuestAddress(1 << 20)).is_err());
//! ```

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(clippy::missing_errors_doc, clippy::missing_panics_doc)]
// Under `--cfg loom` only the model of the access protocol is built for real.
#![cfg_attr(loom, allow(dead_code, unused_imports, unused_variables))]

// Guest-physical addresses and lengths are `u64` and are cast to `usize` for host
// mappings, slices and bitmap indices: on a narrower target those casts would truncate.
#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "vm-private-memory needs a 64-bit target: it casts guest addresses and lengths (u64) to usize"
);

mod attributes;
mod backing;
mod builder;
mod changed_pages;
mod convert;
mod error;
mod exits;
mod guard;
mod inflight;
mod kvm_view;
mod listener;
mod load;
mod memory;
mod region;
mod region_setup;
mod regions;
mod shared_runs;
mod state;
mod strategy;
mod sync;
mod vcpu_exits;
mod vmm_memslots;

pub use attributes::{PageAttributes, PageState, Run, Runs};
pub use backing::RegionBacking;
pub use builder::{
    MemoryBuilder, DEFAULT_ACCESS_PATIENCE, GUEST_PHYS_LIMIT, MAX_ACCESS_PATIENCE,
    REGION_ALIGNMENT, X86_MMIO_HOLE,
};
pub use convert::{ContentMode, ConversionReport, LaunchSource, LaunchStepError, Step};
pub use error::{ByteRange, Error, LayoutError, ListenerRefusal, Result};

/// The old name of [`ByteRange`].
#[deprecated(note = "renamed ByteRange: a range of bytes, beside PageRange's whole pages")]
pub type GpaRange = ByteRange;
pub use exits::{
    ConversionRequest, RequestError, GUEST_BYTES_PER_STEP, GUEST_RUNS_PER_STEP, KVM_EAGAIN,
    KVM_EFAULT, KVM_EINVAL, KVM_ENOSYS, MAP_GPA_RANGE_ENCRYPTED, MAP_GPA_RANGE_KNOWN,
    MAP_GPA_RANGE_PAGE_SZ_1G, MAP_GPA_RANGE_PAGE_SZ_2M,
};
pub use guard::{AccessGuard, DirtyBitmap, HostAccess};
pub use guest_memfd::VmMemoryOps;
pub use listener::{MemoryListener, Subscription};
pub use memory::{GuestMemoryPrivate, PrivateMemoryManager};
pub use region::{private_page_refusal, GuestRegionPrivate};
pub use shared_runs::{SharedFile, SharedPages, SharedPagesSnapshot, SharedRun, SharedRuns};
pub use state::{
    FileIdentity, MemoryState, PageRun, PrivatePages, RegionState, SharedContent, StateError,
    STATE_VERSION,
};
pub use strategy::{Strategy, UnavailableReason};
