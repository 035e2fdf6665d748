// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memslots on the real `/dev/kvm`: a region's memslot is bound exactly while the region
//! is in the memory's own list, whatever a caller does to the published view, and the
//! builder finds a shortage of memslot numbers before it creates anything.

mod common;

use std::time::{Duration, Instant};

use common::{gpa_is_free, in_place_or_skip, pr};
use guest_memfd::{Capabilities, PAGE_SIZE};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
use vm_private_memory::{
    Error, GuestMemoryPrivate, MemoryBuilder, PageState, PrivateMemoryManager, Strategy,
};

const MIB2: u64 = 2 << 20;

/// What `GuestMemoryAtomic::lock` lets any holder of the view do: publish another
/// collection (here an empty one).
fn replace_published_view(memory: &PrivateMemoryManager) {
    let view = memory.guest_memory();
    view.lock().unwrap().replace(GuestMemoryPrivate::new());
    assert_eq!(memory.guest_memory().memory().num_regions(), 0);
}

/// In-place memory of one region at 0 whose published view was then emptied.
fn one_region_with_its_view_replaced() -> (
    std::sync::Arc<dyn guest_memfd::VmMemoryOps>,
    PrivateMemoryManager,
) {
    let vm = common::vm();
    let memory = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .strategy(Strategy::InPlace)
        .build()
        .unwrap();
    replace_published_view(&memory);
    (vm, memory)
}

#[test]
fn a_region_stays_listed_and_bound_when_the_published_view_was_replaced() {
    if !in_place_or_skip("a_region_stays_listed_and_bound_when_the_published_view_was_replaced") {
        return;
    }
    let (vm, memory) = one_region_with_its_view_replaced();

    memory
        .add_region(pr(4 * MIB2, MIB2), None, PageState::Shared)
        .unwrap();
    assert_eq!(memory.regions(), vec![pr(0, MIB2), pr(4 * MIB2, MIB2)]);
    assert_eq!(
        memory.guest_memory().memory().num_regions(),
        2,
        "adding a region publishes the memory's own list again"
    );
    assert!(!gpa_is_free(&vm, pr(0, MIB2)), "the first region is bound");

    // The first region can still be removed, and its memslot goes with it.
    let (range, _file, _offset) = memory.remove_region(0).unwrap();
    assert_eq!(range, pr(0, MIB2));
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
    assert_eq!(memory.regions(), vec![pr(4 * MIB2, MIB2)]);
    drop(memory);
    assert!(gpa_is_free(&vm, pr(4 * MIB2, MIB2)));
}

#[test]
fn dropping_the_memory_unbinds_a_region_the_published_view_had_lost() {
    if !in_place_or_skip("dropping_the_memory_unbinds_a_region_the_published_view_had_lost") {
        return;
    }
    let (vm, memory) = one_region_with_its_view_replaced();
    memory
        .add_region(pr(4 * MIB2, MIB2), None, PageState::Private)
        .unwrap();
    drop(memory);
    assert!(
        gpa_is_free(&vm, pr(0, MIB2)),
        "no memslot may stay bound to a region's unmapped memory"
    );
    assert!(gpa_is_free(&vm, pr(4 * MIB2, MIB2)));
}

#[test]
fn a_region_that_fails_to_be_added_leaves_no_memslot_and_no_trace() {
    let (memory, stand_in) = common::dual(MIB2, PageState::Private);
    *stand_in.fail.lock().unwrap() = true;
    let err = memory
        .add_region(pr(4 * MIB2, MIB2), None, PageState::Private)
        .unwrap_err();
    assert!(matches!(err, Error::SetAttributes { .. }), "{err}");
    assert_eq!(memory.regions(), vec![pr(0, MIB2)]);
    assert_eq!(memory.guest_memory().memory().num_regions(), 1);
    assert!(gpa_is_free(&stand_in.inner, pr(4 * MIB2, MIB2)));
    // Overlapping an existing region is refused before anything is created.
    let err = memory
        .add_region(pr(MIB2 / 2, MIB2), None, PageState::Private)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Layout {
                reason: vm_private_memory::LayoutError::OverlapsRegion(r),
                ..
            } if r == pr(0, MIB2)
        ),
        "{err}"
    );
    // The slot number was given back: the same add goes through once KVM agrees.
    *stand_in.fail.lock().unwrap() = false;
    memory
        .add_region(pr(4 * MIB2, MIB2), None, PageState::Private)
        .unwrap();
    assert!(!gpa_is_free(&stand_in.inner, pr(4 * MIB2, MIB2)));
    drop(memory);
    assert!(gpa_is_free(&stand_in.inner, pr(4 * MIB2, MIB2)));
}

#[test]
fn a_slot_range_smaller_than_the_regions_is_refused_naming_it_and_the_host_limit() {
    let vm = common::vm();
    let host_limit = Capabilities::of_vm(&vm).nr_memslots;
    let err = MemoryBuilder::new(vm.clone())
        .slots(1, 2)
        .region(MIB2)
        .region(MIB2)
        .region(MIB2)
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("memslots 1..=2"), "{text}");
    assert!(
        text.contains(&format!("this host has {host_limit}")),
        "{text}"
    );
    assert!(text.contains("3 regions"), "{text}");
    // A range past the host's is refused the same way, whatever the regions.
    let err = MemoryBuilder::new(vm.clone())
        .slots(0, host_limit)
        .region(MIB2)
        .build()
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("memslots 0..={host_limit}")),
        "{err}"
    );
    // Nothing was left bound.
    assert!(gpa_is_free(&vm, pr(0, 6 * MIB2)));
}

#[test]
fn more_regions_than_the_host_has_memslots_fail_before_any_file_is_created() {
    let vm = common::vm();
    let host_limit = Capabilities::of_vm(&vm).nr_memslots;
    assert!(host_limit > 0);
    let builder = (0..=host_limit).fold(MemoryBuilder::new(vm.clone()), |b, _| b.region(PAGE_SIZE));
    let started = Instant::now();
    let err = builder.build().unwrap_err();
    let took = started.elapsed();
    match &err {
        Error::NotEnoughSlots {
            regions,
            first,
            last,
            host_limit: limit,
        } => {
            assert_eq!(*regions as u64, u64::from(host_limit) + 1);
            assert_eq!((*first, *last, *limit), (0, host_limit - 1, host_limit));
        }
        other => panic!("{other}"),
    }
    // Creating a file and a mapping per region takes about 20 s before the process runs
    // out of file descriptors; counting first takes no time.
    assert!(took < Duration::from_secs(2), "took {took:?}");
}
