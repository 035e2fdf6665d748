// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memslots the VMM binds itself (`MemoryBuilder::vmm_binds_memslots`) on the real
//! `/dev/kvm`: the descriptions are exact and bind as they are, conversions work on
//! them, regions cannot come and go, and a dropped memory keeps its mappings until the
//! VMM says it deleted every slot.

mod common;

use std::sync::Arc;

use common::{gpa_is_free, in_place_or_skip, pr, vm};
use guest_memfd::PAGE_SIZE;
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{Error, MemoryBuilder, PageState, PrivateMemoryManager, Strategy};

const MIB2: u64 = 2 << 20;

fn vmm_bound(vm: &Arc<VmFd>) -> PrivateMemoryManager {
    MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .region_at(8 * MIB2, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .slots(100, 120)
        .vmm_binds_memslots()
        .build()
        .unwrap()
}

/// Binds (or with `delete`, deletes) every slot `memory` describes, as a VMM does.
fn vmm_sets(vm: &VmFd, memory: &PrivateMemoryManager, delete: bool) {
    for mut region in memory.memslots().unwrap() {
        if delete {
            region.memory_size = 0;
        }
        // SAFETY: the description's mapping is the memory's own, which outlives the slot
        // (the tests delete the slots before releasing the memory, or leak it).
        unsafe { vm.set_user_memory_region2(region) }.unwrap();
    }
}

#[test]
fn the_vmm_binds_the_slots_it_is_handed_and_conversions_work_on_them() {
    if !in_place_or_skip("the_vmm_binds_the_slots_it_is_handed_and_conversions_work_on_them") {
        return;
    }
    let vm = vm();
    let memory = vmm_bound(&vm);
    assert!(memory.vmm_binds_memslots());
    // Nothing is bound until the VMM binds it.
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
    let slots = memory.memslots().unwrap();
    let described: Vec<_> = slots
        .iter()
        .map(|r| (r.slot, r.guest_phys_addr, r.memory_size, r.flags))
        .collect();
    let guest_memfd = kvm_bindings::KVM_MEM_GUEST_MEMFD;
    assert_eq!(
        described,
        [
            (100, 0, MIB2, guest_memfd),
            (101, 8 * MIB2, MIB2, guest_memfd)
        ]
    );
    vmm_sets(&vm, &memory, false);
    assert!(!gpa_is_free(&vm, pr(0, MIB2)));

    memory
        .convert(pr(0, 4 * PAGE_SIZE), PageState::Private)
        .unwrap();
    assert!(memory
        .memory()
        .memory()
        .read_obj::<u8>(GuestAddress(0))
        .is_err());
    memory
        .memory()
        .memory()
        .write_obj(9u64, GuestAddress(8 * MIB2))
        .unwrap();

    vmm_sets(&vm, &memory, true);
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
    // SAFETY: every slot described was deleted just above.
    unsafe { memory.release_memslots() };
}

#[test]
fn regions_come_and_go_with_the_vmm_binding_their_slots() {
    if !in_place_or_skip("regions_come_and_go_with_the_vmm_binding_their_slots") {
        return;
    }
    let vm = vm();
    let memory = vmm_bound(&vm);
    vmm_sets(&vm, &memory, false);
    // Hotplug: the new region is described, not bound, until the VMM binds it.
    let added = pr(16 * MIB2, MIB2);
    memory.add_region(added, None, PageState::Shared).unwrap();
    let slots = memory.memslots().unwrap();
    let new = *slots.last().unwrap();
    assert_eq!((new.slot, new.guest_phys_addr), (102, added.start()));
    assert!(gpa_is_free(&vm, added));
    // SAFETY: the new region's own mapping, which outlives the slot (deleted below).
    unsafe { vm.set_user_memory_region2(new) }.unwrap();
    assert!(!gpa_is_free(&vm, added));

    // Unplug: remove_region would unbind a slot that is the VMM's: refused.
    assert!(matches!(
        memory.remove_region(added.start()),
        Err(Error::VmmBindsMemslots { .. })
    ));
    let mut delete = new;
    delete.memory_size = 0;
    // SAFETY: deleting a slot has no requirement.
    unsafe { vm.set_user_memory_region2(delete) }.unwrap();
    // SAFETY: the region's slot was deleted just above.
    let (range, _file, _offset) = unsafe { memory.remove_unbound_region(added.start()) }.unwrap();
    assert_eq!(range, added);
    assert_eq!(memory.memslots().unwrap().len(), 2);
    assert!(gpa_is_free(&vm, added));

    vmm_sets(&vm, &memory, true);
    // SAFETY: every slot described was deleted.
    unsafe { memory.release_memslots() };
}

#[test]
fn a_dropped_memory_keeps_its_mappings_while_the_vmm_may_still_bind_them() {
    if !in_place_or_skip("a_dropped_memory_keeps_its_mappings_while_the_vmm_may_still_bind_them") {
        return;
    }
    let vm = vm();
    let memory = vmm_bound(&vm);
    vmm_sets(&vm, &memory, false);
    memory
        .memory()
        .memory()
        .write_obj(0x5eed_u64, GuestAddress(PAGE_SIZE))
        .unwrap();
    let host = memory.memslots().unwrap()[0].userspace_addr;
    drop(memory);
    // The slot is still bound: its mapping must still be there (were it unmapped, this
    // read would fault, and whatever was mapped there next would be guest memory).
    // SAFETY: the test checks exactly that the memory leaked this mapping, page 1 of the
    // first region, and it is only read.
    let word = unsafe { std::ptr::read_volatile((host + PAGE_SIZE) as *const u64) };
    assert_eq!(word, 0x5eed);
    assert!(!gpa_is_free(&vm, pr(0, MIB2)));
}

/// A release covers the slots described when it was said: a region added afterwards
/// keeps its mapping through a drop until released in turn.
#[test]
fn a_region_added_after_a_release_is_kept_until_released_again() {
    if !in_place_or_skip("a_region_added_after_a_release_is_kept_until_released_again") {
        return;
    }
    let vm = vm();
    let memory = vmm_bound(&vm);
    // SAFETY: the VMM bound nothing yet.
    unsafe { memory.release_memslots() };
    let added = pr(16 * MIB2, MIB2);
    memory.add_region(added, None, PageState::Shared).unwrap();
    let new = *memory.memslots().unwrap().last().unwrap();
    // SAFETY: the new region's own mapping, which this memory must now keep.
    unsafe { vm.set_user_memory_region2(new) }.unwrap();
    memory
        .memory()
        .memory()
        .write_obj(0xadd_u64, GuestAddress(added.start()))
        .unwrap();
    drop(memory);
    // SAFETY: the test checks that the memory kept this mapping; it is only read.
    let word = unsafe { std::ptr::read_volatile(new.userspace_addr as *const u64) };
    assert_eq!(word, 0xadd);
}
