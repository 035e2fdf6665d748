// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Laying out guest RAM, choosing a strategy, and memslots on a real VM.

mod common;

use std::sync::Arc;

use common::{gpa_is_free, in_place_or_skip, pr, vm, Heard, Recorder};
use guest_memfd::{Capabilities, PAGE_SIZE};
use vm_private_memory::{Error, MemoryBuilder, PageState, Strategy, UnavailableReason};

const MIB2: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

#[test]
fn floating_regions_go_around_the_mmio_hole() {
    if !in_place_or_skip("floating_regions_go_around_the_mmio_hole") {
        return;
    }
    let m = MemoryBuilder::new(vm())
        .x86_mmio_hole()
        .region(2 * GIB)
        .region(2 * GIB)
        .region(MIB2)
        .build()
        .unwrap();
    assert_eq!(
        m.regions(),
        vec![pr(0, 2 * GIB), pr(2 * GIB, MIB2), pr(4 * GIB, 2 * GIB)]
    );
}

#[test]
fn bad_layouts_are_refused_with_the_region_named() {
    let cases: Vec<(MemoryBuilder, &str)> = vec![
        (MemoryBuilder::new(vm()), "no memory region"),
        (
            MemoryBuilder::new(vm())
                .region_at(0, MIB2)
                .region_at(MIB2 / 2, MIB2),
            "[0x100000, 0x300000)",
        ),
        (
            MemoryBuilder::new(vm())
                .x86_mmio_hole()
                .region_at(3 * GIB + MIB2, MIB2),
            "[0xc0200000, 0xc0400000)",
        ),
        (
            MemoryBuilder::new(vm()).region_at(0x800, MIB2),
            "not page-aligned",
        ),
        (
            MemoryBuilder::new(vm()).region(MIB2 + 1),
            "not page-aligned",
        ),
        (MemoryBuilder::new(vm()).region(0), "empty"),
        (
            MemoryBuilder::new(vm()).region_at(1 << 48, MIB2),
            "[0x1000000000000, 0x1000000200000)",
        ),
        (
            MemoryBuilder::new(vm())
                .slots(5, 5)
                .region(MIB2)
                .region(MIB2),
            "memslots 5..=5",
        ),
        // A floating region with no room is named by its index and size, not address 0.
        (
            MemoryBuilder::new(vm())
                .region_at(0, MIB2)
                .region(vm_private_memory::GUEST_PHYS_LIMIT),
            "region 1 (0x1000000000000 bytes, placed by the builder) does not fit",
        ),
    ];
    for (builder, needle) in cases {
        let err = builder.build().unwrap_err();
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
}

#[test]
fn the_strategy_follows_the_vm_and_an_impossible_one_is_explained() {
    let vm = vm();
    let caps = Capabilities::of_vm(&vm);
    let auto = MemoryBuilder::new(vm.clone()).region(MIB2).build();
    let expected = if caps.dual_capable() {
        Some(Strategy::Dual)
    } else if caps.in_place_capable() {
        Some(Strategy::InPlace)
    } else {
        None
    };
    assert_eq!(auto.as_ref().ok().map(|m| m.strategy()), expected);
    drop(auto);
    for strategy in [Strategy::Dual, Strategy::InPlace] {
        let result = MemoryBuilder::new(vm.clone())
            .region(MIB2)
            .strategy(strategy)
            .build();
        match strategy.unavailable_because(&caps) {
            None => assert_eq!(result.unwrap().strategy(), strategy),
            Some(reason) => match result {
                Err(Error::StrategyUnavailable {
                    strategy: s,
                    reason: r,
                }) => {
                    assert_eq!((s, &r), (strategy, &reason));
                    if strategy == Strategy::Dual {
                        assert!(
                            matches!(r, UnavailableReason::NoPrivateAttribute { .. }),
                            "{r}"
                        );
                        assert!(r.to_string().contains("KVM_CAP_MEMORY_ATTRIBUTES"), "{r}");
                    }
                }
                other => panic!("{strategy}: {other:?}"),
            },
        }
    }
}

#[test]
fn one_file_can_back_every_region() {
    if !in_place_or_skip("one_file_can_back_every_region") {
        return;
    }
    let m = MemoryBuilder::new(vm())
        .region_at(0, MIB2)
        .region_at(4 * GIB, 2 * MIB2)
        .single_file(true)
        .build()
        .unwrap();
    let (low, high) = (m.backing(0).unwrap(), m.backing(4 * GIB).unwrap());
    assert_eq!(low.gmem_size, 3 * MIB2);
    assert_eq!((low.gmem_offset, high.gmem_offset), (0, MIB2));
    assert_eq!(low.gmem_inode, high.gmem_inode);
}

#[test]
fn a_sparse_half_terabyte_costs_one_bit_per_page() {
    if !in_place_or_skip("a_sparse_half_terabyte_costs_one_bit_per_page") {
        return;
    }
    // Half a TiB above 4 GiB fits a guest-physical space of 40 bits (the nested lab's
    // CPU has no more; KVM refuses a slot past it with EINVAL).
    let tib = 1u64 << 39;
    let m = MemoryBuilder::new(vm())
        .region_at(4 * GIB, tib)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    assert_eq!(m.private_pages(), tib / PAGE_SIZE);
    let per_gib = m.metadata_bytes() as u64 / (tib / GIB);
    assert!(per_gib <= 40 << 10, "{per_gib} bytes per GiB");
    assert_eq!(per_gib, 32 << 10);
}

#[test]
fn regions_are_bound_removed_and_re_added_at_another_offset_while_a_vcpu_exists() {
    // Slots changing under a vCPU: the kernel's part, on real KVM only.
    let Some(vm) = common::kvm_in_place_or_skip(
        "regions_are_bound_removed_and_re_added_at_another_offset_while_a_vcpu_exists",
    ) else {
        return;
    };
    let _vcpu = vm.create_vcpu(0).unwrap();
    let m = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .region_at(MIB2, MIB2)
        .single_file(true)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    assert!(
        !gpa_is_free(&*vm, pr(MIB2, MIB2)),
        "the region's slot is bound"
    );

    let listener = Arc::new(Recorder::default());
    let _s = m.subscribe(pr(0, 2 * MIB2), listener.clone());
    m.convert(pr(MIB2, PAGE_SIZE), PageState::Private).unwrap();
    let (range, gmem, offset) = m.remove_region(MIB2).unwrap();
    assert_eq!((range, offset), (pr(MIB2, MIB2), MIB2));
    assert_eq!(
        listener.heard.lock().unwrap().last(),
        Some(&Heard::Discard(pr(MIB2 + PAGE_SIZE, MIB2 - PAGE_SIZE))),
        "listeners hear of the shared pages first"
    );
    assert!(gpa_is_free(&*vm, pr(MIB2, MIB2)), "the slot is gone");
    assert_eq!(m.regions(), vec![pr(0, MIB2)]);
    assert!(matches!(m.remove_region(MIB2), Err(Error::NoSuchRegion(_))));

    // Re-add the range backed by the *first* half of the same file, once the region
    // that used that half is gone too (one file range may back one slot only).
    let (low, _, low_offset) = m.remove_region(0).unwrap();
    assert_eq!((low, low_offset), (pr(0, MIB2), 0));
    m.add_region(pr(MIB2, MIB2), Some((gmem.clone(), 0)), PageState::Shared)
        .unwrap();
    m.add_region(pr(0, MIB2), None, PageState::Shared).unwrap();
    assert!(!gpa_is_free(&*vm, pr(MIB2, MIB2)));
    assert_eq!(m.regions(), vec![pr(0, MIB2), pr(MIB2, MIB2)]);
    // Overlapping regions, and offsets past the file, are refused.
    assert!(m
        .add_region(pr(MIB2, MIB2), None, PageState::Shared)
        .is_err());
    assert!(matches!(
        m.add_region(
            pr(8 * MIB2, MIB2),
            Some((gmem, 2 * MIB2)),
            PageState::Shared
        ),
        Err(Error::File(guest_memfd::Error::OutOfBounds { .. }))
    ));
    assert_eq!(m.regions().len(), 2);
}

#[test]
fn dropping_the_memory_unbinds_its_slots() {
    let vm = vm();
    let m = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .build()
        .unwrap();
    assert!(!gpa_is_free(&vm, pr(0, MIB2)));
    drop(m);
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
}

/// A VM whose guest_memfd takes no flags (a kernel before 6.18) and which has no
/// memory attributes: neither strategy can run.
struct NoFlagsNoAttributes(std::sync::Arc<dyn guest_memfd::VmMemoryOps>);

impl guest_memfd::VmMemoryOps for NoFlagsNoAttributes {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        if cap == guest_memfd::uapi::KVM_CAP_GUEST_MEMFD_FLAGS
            || cap == kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES
        {
            return 0;
        }
        self.0.check_extension_raw(cap)
    }

    fn create_guest_memfd(
        &self,
        request: kvm_bindings::kvm_create_guest_memfd,
    ) -> Result<std::os::fd::OwnedFd, vmm_sys_util::errno::Error> {
        self.0.create_guest_memfd(request)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_bindings::kvm_userspace_memory_region2,
    ) -> Result<(), vmm_sys_util::errno::Error> {
        // SAFETY: the caller upholds the trait's contract, the same for the VM wrapped.
        unsafe { self.0.set_user_memory_region2(region) }
    }
}

/// With no strategy asked for and none possible, the error names why for each, and
/// reads the same through `Debug` (what `main() -> Result` and `unwrap` print).
#[test]
fn when_no_strategy_can_run_the_error_names_both_reasons() {
    let vm = std::sync::Arc::new(NoFlagsNoAttributes(vm()));
    let err = MemoryBuilder::new(vm).region(MIB2).build().unwrap_err();
    assert!(
        matches!(
            err,
            Error::NoStrategy {
                in_place: UnavailableReason::NotMappable { .. },
                dual: UnavailableReason::NoPrivateAttribute { .. },
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("in-place: guest_memfd accepts flags"),
        "{text}"
    );
    assert!(text.contains("dual: KVM_CAP_MEMORY_ATTRIBUTES"), "{text}");
    assert_eq!(format!("{err:?}"), text);
}
