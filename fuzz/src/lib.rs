// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the fuzz targets in `fuzz_targets/`.
//!
//! - [`oracle`]: the conversion-request rules of KVM's ABI, written again from the ABI
//!   (not from `vm_private_memory::exits`), for the targets to compare the crate against.
//! - [`Num`]: an `Arbitrary` integer shaped towards the values that matter (page
//!   multiples, small counts, values near `u64::MAX`), so inputs reach the interesting
//!   branches more often than raw random `u64`s would.
//! - [`vm`], [`in_place_memory`], [`dual_memory`], [`dual_builder`]: real memory on
//!   `/dev/kvm`. Memslots and VMs are limited, so every target builds its VM and memories
//!   once per process.
//! - [`check_page`]: host readability through vm-memory's `Bytes` against `state_of`.
//! - [`listener`]: [`ModelListener`], a listener that keeps the pages it holds and
//!   refuses or cannot let go when told to ([`Fault`]), checked against the shared pages
//!   ([`shared_set`], as a [`PageSet`]).
//! - [`page_checks`]: [`page_map`], [`state_map`], [`check_state_of`],
//!   [`check_all_or_nothing`], [`check_unchanged`]: page states before and after an
//!   operation, and what the crate promises of them.
//! - [`hotplug_model`], [`hotplug_subject`], [`hotplug_calls`], [`launch_script`],
//!   [`hotplug_invariants`]: the parts of the `hotplug_and_launch` target (its file keeps
//!   the driver and the doc of its model and invariants).

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use guest_memfd::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress};
use vm_private_memory::VmMemoryOps;
use vm_private_memory::{
    private_page_refusal, GuestMemoryPrivate, MemoryBuilder, PageState, PrivateMemoryManager,
    Strategy,
};

pub mod hotplug_calls;
pub mod hotplug_invariants;
pub mod hotplug_model;
pub mod hotplug_subject;
pub mod launch_script;
pub mod listener;
pub mod page_checks;

pub use listener::{shared_set, Fault, ModelListener, PageSet};
pub use page_checks::{
    check_all_or_nothing, check_state_of, check_unchanged, page_map, pages_of, state_map,
};

/// A `u64` shaped by its variant: the fuzzer picks the shape, then the value.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Num {
    /// A small value, as is.
    Small(u8),
    /// `page * 4 KiB + offset`, the offset 0 unless `misalign` is non-zero.
    Page {
        /// The page number (small: the targets' memory lies in the first pages).
        page: u8,
        /// A byte offset added to it (0 keeps it aligned).
        misalign: u16,
    },
    /// `u64::MAX - below`: ranges that wrap or end at the top of the address space.
    NearMax(u16),
    /// Any value.
    Raw(u64),
}

impl Num {
    /// The value.
    pub fn get(self) -> u64 {
        match self {
            Num::Small(v) => u64::from(v),
            Num::Page { page, misalign } => {
                u64::from(page) * PAGE_SIZE + u64::from(misalign) % PAGE_SIZE
            }
            Num::NearMax(below) => u64::MAX - u64::from(below),
            Num::Raw(v) => v,
        }
    }
}

/// The rules of guest conversion requests, from KVM's ABI.
///
/// - `KVM_HC_MAP_GPA_RANGE` (`Documentation/virt/kvm/x86/hypercalls.rst`,
///   `include/uapi/linux/kvm_para.h`): `rbx` = gpa, `rcx` = number of 4 KiB pages
///   (whatever the page-size hint), `rdx` = attributes: bit 4 `ENCRYPTED` (make private,
///   else shared), bits 0 and 1 the 2 MiB / 1 GiB page-size hints (at most one of them);
///   any other bit is invalid.
/// - `KVM_EXIT_MEMORY_FAULT` (`Documentation/virt/kvm/api.rst`): `flags`, `gpa`, `size`;
///   the only defined flag is `KVM_MEMORY_EXIT_FLAG_PRIVATE` (bit 3): set means the guest
///   accessed the range as private. The crate rounds `size` up to whole pages (KVM itself
///   reports page-sized faults), which this oracle follows.
/// - Both: the gpa is 4 KiB-aligned, the range is not empty, and `gpa + length` does not
///   pass `u64::MAX` (computed here in 128 bits, so no overflow can hide).
pub mod oracle {
    use super::PAGE_SIZE;

    /// `KVM_MEMORY_EXIT_FLAG_PRIVATE` (`include/uapi/linux/kvm.h`).
    pub const MEMORY_EXIT_FLAG_PRIVATE: u64 = 1 << 3;
    /// `KVM_MAP_GPA_RANGE_ENCRYPTED` (`include/uapi/linux/kvm_para.h`).
    pub const ENCRYPTED: u64 = 1 << 4;
    /// `KVM_MAP_GPA_RANGE_PAGE_SZ_2M`.
    pub const PAGE_SZ_2M: u64 = 1 << 0;
    /// `KVM_MAP_GPA_RANGE_PAGE_SZ_1G`.
    pub const PAGE_SZ_1G: u64 = 1 << 1;
    /// `KVM_HC_MAP_GPA_RANGE` (`include/uapi/linux/kvm_para.h`).
    pub const HC_MAP_GPA_RANGE: u64 = 12;

    /// Why the oracle refuses a request. A request may break several rules at once;
    /// the crate may report any one of them.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Rule {
        /// The gpa is not 4 KiB-aligned.
        Aligned,
        /// No page.
        NotEmpty,
        /// The end passes `u64::MAX`.
        NoOverflow,
        /// Undefined attribute bits, or both page-size hints.
        Attributes,
        /// Undefined memory-fault flags.
        Flags,
    }

    /// What a valid request asks: `[start, start + len)` private or not.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Verdict {
        /// The first byte.
        pub start: u64,
        /// The length in bytes (a page multiple, not zero).
        pub len: u64,
        /// Private (else shared).
        pub private: bool,
    }

    fn range(gpa: u64, len: u128, broken: &mut Vec<Rule>) -> Option<(u64, u64)> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            broken.push(Rule::Aligned);
        }
        if len == 0 {
            broken.push(Rule::NotEmpty);
        }
        if u128::from(gpa) + len > u128::from(u64::MAX) {
            broken.push(Rule::NoOverflow);
        }
        // When nothing is broken, `len` is at most `u64::MAX - gpa`.
        Some((gpa, u64::try_from(len).ok()?))
    }

    /// `KVM_HC_MAP_GPA_RANGE(gpa, pages, attributes)`: the verdict, or every rule broken.
    pub fn map_gpa_range(gpa: u64, pages: u64, attributes: u64) -> Result<Verdict, Vec<Rule>> {
        let mut broken = Vec::new();
        let known = ENCRYPTED | PAGE_SZ_2M | PAGE_SZ_1G;
        let both = PAGE_SZ_2M | PAGE_SZ_1G;
        if attributes & !known != 0 || attributes & both == both {
            broken.push(Rule::Attributes);
        }
        let len = u128::from(pages) * u128::from(PAGE_SIZE);
        let range = range(gpa, len, &mut broken);
        match range {
            Some((start, len)) if broken.is_empty() => Ok(Verdict {
                start,
                len,
                private: attributes & ENCRYPTED != 0,
            }),
            _ => Err(broken),
        }
    }

    /// `KVM_EXIT_MEMORY_FAULT(flags, gpa, size)`: the verdict, or every rule broken.
    pub fn memory_fault(flags: u64, gpa: u64, size: u64) -> Result<Verdict, Vec<Rule>> {
        let mut broken = Vec::new();
        if flags & !MEMORY_EXIT_FLAG_PRIVATE != 0 {
            broken.push(Rule::Flags);
        }
        let pages = u128::from(size).div_ceil(u128::from(PAGE_SIZE));
        let range = range(gpa, pages * u128::from(PAGE_SIZE), &mut broken);
        match range {
            Some((start, len)) if broken.is_empty() => Ok(Verdict {
                start,
                len,
                private: flags & MEMORY_EXIT_FLAG_PRIVATE != 0,
            }),
            _ => Err(broken),
        }
    }
}

/// A default-type VM: real where the host's KVM has in-place guest_memfd, else the
/// stand-in for KVM (`guest_memfd::stand_in`, which says so once): what is fuzzed is
/// this workspace's userspace logic, which both serve alike.
///
/// # Panics
///
/// If `/dev/kvm` opens but no VM can be created on it.
pub fn vm() -> Arc<dyn VmMemoryOps> {
    guest_memfd::stand_in::vm_for_logic_tests()
}

/// Builds in-place memory with `regions` (`(gpa, bytes)`), every page `initial`.
///
/// # Panics
///
/// If the host cannot build it (no in-place guest_memfd, no free memslot).
pub fn in_place_memory(
    vm: Arc<dyn VmMemoryOps>,
    regions: &[(u64, u64)],
    initial: PageState,
) -> PrivateMemoryManager {
    regions
        .iter()
        .fold(MemoryBuilder::new(vm), |b, &(gpa, len)| {
            b.region_at(gpa, len)
        })
        .strategy(Strategy::InPlace)
        .initial_state(initial)
        .build()
        .expect("in-place memory on this host")
}

/// KVM's private/shared view as the dual strategy set it, one entry per page of a
/// window, recorded by the stand-in that [`dual_memory`] installs.
#[derive(Debug)]
pub struct AttributesRecord {
    base: u64,
    private: Mutex<Vec<bool>>,
}

impl AttributesRecord {
    /// KVM's view of every page of the recorded window, from its first page.
    pub fn window(&self) -> Vec<bool> {
        self.private
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// KVM's view of the page at each of `gpas`, where inside the recorded window.
    pub fn are_private(&self, gpas: &[u64]) -> Vec<Option<bool>> {
        let map = self.private.lock().unwrap_or_else(|p| p.into_inner());
        gpas.iter()
            .map(|&gpa| {
                let page = usize::try_from(gpa.checked_sub(self.base)? / PAGE_SIZE).ok()?;
                map.get(page).copied()
            })
            .collect()
    }

    /// KVM's view of the page at `gpa`, if inside the recorded window.
    pub fn is_private(&self, gpa: u64) -> Option<bool> {
        let page = usize::try_from(gpa.checked_sub(self.base)? / PAGE_SIZE).ok()?;
        self.private
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(page)
            .copied()
    }
}

/// Builds dual-strategy memory with `regions` (`(gpa, bytes)`), every page `initial`,
/// and returns it with the record of what it told KVM about pages in
/// `[base, base + window_pages * 4 KiB)`: [`dual_builder`] with those regions.
///
/// # Panics
///
/// If the host cannot build it.
pub fn dual_memory(
    vm: Arc<dyn VmMemoryOps>,
    regions: &[(u64, u64)],
    initial: PageState,
    base: u64,
    window_pages: usize,
) -> (PrivateMemoryManager, Arc<AttributesRecord>) {
    let (builder, record) = dual_builder(vm, base, window_pages);
    let memory = regions
        .iter()
        .fold(builder, |b, &(gpa, len)| b.region_at(gpa, len))
        .initial_state(initial)
        .build()
        .expect("dual memory on this host (with the attribute stand-in)");
    (memory, record)
}

/// A builder of dual-strategy memory on `vm` (no region yet: add them, and whatever
/// else the target needs, then build), with the record of what the memory tells KVM
/// about pages in `[base, base + window_pages * 4 KiB)`.
///
/// This host has no `KVM_SET_MEMORY_ATTRIBUTES`, so the dual strategy runs on a stand-in
/// VM (a `VmMemoryOps` wrapping `vm`) that reports memory attributes and records that call
/// instead of making it; memslots, files and mappings are real. This is the only
/// function that knows how that stand-in is built.
pub fn dual_builder(
    vm: Arc<dyn VmMemoryOps>,
    base: u64,
    window_pages: usize,
) -> (MemoryBuilder, Arc<AttributesRecord>) {
    use std::os::fd::OwnedFd;

    use kvm_bindings::{
        kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
        KVM_CAP_MEMORY_ATTRIBUTES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    };
    use vmm_sys_util::errno;

    struct Recorder {
        vm: Arc<dyn VmMemoryOps>,
        record: Arc<AttributesRecord>,
    }

    impl VmMemoryOps for Recorder {
        fn check_extension_raw(&self, cap: u32) -> i32 {
            if cap == KVM_CAP_MEMORY_ATTRIBUTES {
                return KVM_MEMORY_ATTRIBUTE_PRIVATE as i32;
            }
            VmMemoryOps::check_extension_raw(&*self.vm, cap)
        }

        fn create_guest_memfd(
            &self,
            request: kvm_create_guest_memfd,
        ) -> Result<OwnedFd, errno::Error> {
            VmMemoryOps::create_guest_memfd(&*self.vm, request)
        }

        unsafe fn set_user_memory_region2(
            &self,
            region: kvm_userspace_memory_region2,
        ) -> Result<(), errno::Error> {
            // SAFETY: the caller upholds the trait's contract, the same for the VM this
            // forwards to.
            unsafe { VmMemoryOps::set_user_memory_region2(&*self.vm, region) }
        }

        fn set_memory_attributes(
            &self,
            attributes: kvm_memory_attributes,
        ) -> Result<(), errno::Error> {
            let private = attributes.attributes & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0;
            let mut map = self
                .record
                .private
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            // Pages below the window are skipped, not counted from its first page.
            let mut page = attributes.address / PAGE_SIZE;
            let end = page.saturating_add(attributes.size / PAGE_SIZE);
            page = page.max(self.record.base / PAGE_SIZE);
            while page < end {
                let index = page - self.record.base / PAGE_SIZE;
                match usize::try_from(index).ok().and_then(|p| map.get_mut(p)) {
                    Some(bit) => *bit = private,
                    None => break,
                }
                page += 1;
            }
            Ok(())
        }
    }

    let record = Arc::new(AttributesRecord {
        base,
        // KVM starts with every page shared.
        private: Mutex::new(vec![false; window_pages]),
    });
    let builder = MemoryBuilder::new(Arc::new(Recorder {
        vm,
        record: Arc::clone(&record),
    }))
    .strategy(Strategy::Dual);
    (builder, record)
}

/// Checks that the host can read the page at `gpa` through `view` exactly when
/// `memory.state_of(gpa)` says shared, that a refusal is the crate's private-page
/// refusal, and that an address outside memory is refused. Returns the state.
///
/// # Panics
///
/// When the check fails: that is the finding.
pub fn check_page(
    memory: &PrivateMemoryManager,
    view: &GuestMemoryPrivate,
    gpa: u64,
) -> Option<PageState> {
    let state = memory.state_of(gpa);
    let first = view.read_obj::<u64>(GuestAddress(gpa));
    let last = view.read_obj::<u8>(GuestAddress(gpa + PAGE_SIZE - 1));
    for (what, result) in [("first", first.map(|_| ())), ("last", last.map(|_| ()))] {
        match (state, result) {
            (Some(PageState::Shared), Ok(())) | (None, Err(_)) => {}
            (Some(PageState::Private), Err(e)) => assert!(
                private_page_refusal(&e).is_some(),
                "page {gpa:#x} is private, reading its {what} byte failed with another error: {e:?}"
            ),
            (state, result) => panic!(
                "page {gpa:#x}: state_of says {state:?}, reading its {what} byte gave {result:?}"
            ),
        }
    }
    state
}
