// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Safe, checked access to KVM's guest_memfd.
//!
//! A confidential guest (Intel TDX, AMD SEV-SNP) keeps its RAM in memory the host must
//! not read, write, map, swap or migrate. The 2021 KVM RFC this project grew from proposed
//! a memfd with a *guest seal* (`F_SEAL_GUEST`) for that; Linux 6.8 shipped the idea as
//! guest_memfd (`KVM_CREATE_GUEST_MEMFD`), and Linux 6.18 added a mappable flavour. This
//! crate is the bottom layer of the workspace: the file, its memslot binding, a sealed
//! memfd for the shared half of guest memory, and a probe of what the host supports.
//!
//! # The seed's seal rules, and how guest_memfd realises each
//!
//! | the guest seal (RFC)                     | guest_memfd (Linux 6.18)                                   | in this crate |
//! |------------------------------------------|------------------------------------------------------------|---------------|
//! | no `read`/`write` of the file            | `read`/`write` fail with `EINVAL`, `pread`/`pwrite` with `ESPIPE` | [`GuestMemfd`] offers neither |
//! | no `mmap`                                | `mmap` fails with `ENODEV` unless created with `MMAP`; `MAP_PRIVATE` always fails | [`GuestMemfd::map`] needs `MMAP \| INIT_SHARED`, maps `MAP_SHARED` only |
//! | no resize after sealing                  | size fixed at creation; `ftruncate` fails with `EINVAL`    | no resize method; [`GuestMemfd::size`] |
//! | truncate/punch page-aligned only         | unaligned `fallocate` fails with `EINVAL`                  | every range is a [`PageRange`], which cannot be unaligned |
//! | no swap, no migration                    | pages are unevictable and unmovable                        | nothing to do |
//! | one owner (one KVM instance)             | created on a VM fd; binding it to another VM fails         | [`GuestMemfd::create`] takes the VM |
//! | punch/truncate invalidates KVM's mapping (`invalidate_page_range`) | punch hole zaps the guest mapping; the guest re-faults a fresh zeroed page | [`GuestMemfd::discard`] |
//!
//! Invalid input is refused *before* any system call, with an [`Error`] that names the
//! range or value and says what to do: unaligned or empty ranges, ranges past the end
//! of the file, unsupported flags, unmappable files, memslots that overrun the file.
//!
//! # Example
//!
//! ```
//! use guest_memfd::{Capabilities, GuestMemfd, GuestMemfdFlags, Memslot, PageRange, PAGE_SIZE};
//!
//! // Needs /dev/kvm: without it, the example says so and stops.
//! let Ok(kvm) = kvm_ioctls::Kvm::new() else {
//!     println!("SKIPPED: this example needs /dev/kvm");
//!     return;
//! };
//! let vm = kvm.create_vm().unwrap();
//! let caps = Capabilities::of_vm(&vm);
//! if !caps.in_place_capable() {
//!     println!("SKIPPED: this example needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
//!     return;
//! }
//!
//! // 2 MiB of guest memory that the host may map while it is shared.
//! let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
//! let gmem = GuestMemfd::create(&vm, 2 << 20, flags).unwrap();
//! let mapping = gmem.map().unwrap();
//!
//! // Bind it at guest-physical 4 GiB.
//! let slot = Memslot::new(0, PageRange::new(4 << 30, 2 << 20).unwrap(), &gmem, 0)
//!     .unwrap()
//!     .with_userspace_mapping(&mapping)
//!     .unwrap();
//! // SAFETY: `mapping` outlives the binding: the slot is unbound before it is dropped.
//! unsafe { slot.bind(&vm) }.unwrap();
//!
//! // Discard (punch) the first page: KVM drops its mapping, the page reads zeros.
//! gmem.discard(PageRange::new(0, PAGE_SIZE).unwrap()).unwrap();
//!
//! // Unaligned ranges cannot even be expressed.
//! assert!(PageRange::new(1, PAGE_SIZE).is_err());
//! slot.unbind(&vm).unwrap();
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(clippy::missing_errors_doc, clippy::missing_panics_doc)]

// Guest-physical addresses, file offsets and lengths are `u64` and are cast to `usize`
// for mappings and slices: on a narrower target those casts would truncate.
#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "guest-memfd needs a 64-bit target: it casts guest addresses and file offsets (u64) to usize"
);

mod caps;
mod claim;
mod error;
mod file;
mod flags;
mod memfd;
mod memslot;
mod numa;
mod range;
mod sealed;
mod shared_backing;
#[cfg(feature = "test-utils")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-utils")))]
pub mod stand_in;
pub mod uapi;
mod vm_ops;

pub use caps::{vm_type_name, Capabilities, Finding, Report, VmTypeReport, VM_TYPE_NAMES};
pub use claim::RangeClaim;
pub use error::{Error, Result, SpaceOp};
pub use flags::GuestMemfdFlags;
pub use memfd::{supported_flags, GuestMemfd};
pub use memslot::Memslot;
pub use numa::{
    node_of_page, numa_policy_support, usable_nodes, NodeSet, NumaPolicy, NumaSupport, MAX_NODES,
};
pub use range::{is_page_aligned, Chunks, PageRange, PAGE_SIZE};
pub use sealed::{SealedMemfd, SHARED_MEMORY_SEALS};
pub use shared_backing::SharedBacking;
pub use vm_ops::VmMemoryOps;
/// The old name of [`VmMemoryOps`] (renamed apart from Cloud Hypervisor's
/// `hypervisor::vm::VmOps`); kept so that existing code builds.
#[doc(hidden)]
pub use vm_ops::VmMemoryOps as VmOps;
