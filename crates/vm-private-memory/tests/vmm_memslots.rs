// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Memslots the VMM binds itself (`MemoryBuilder::vmm_binds_memslots`) on the real
//! `/dev/kvm` (or the stand-in for it, where the host has no in-place guest_memfd): the descriptions are exact and bind as they are, conversions work on
//! them, regions cannot come and go, and a dropped memory keeps its mappings until the
//! VMM says it deleted every slot.

mod common;

use std::sync::Arc;

use common::{gpa_is_free, in_place_or_skip, pr, vm};
use guest_memfd::VmMemoryOps;
use guest_memfd::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vm_private_memory::{Error, MemoryBuilder, PageState, PrivateMemoryManager, Strategy};

const MIB2: u64 = 2 << 20;

fn vmm_bound(vm: &Arc<dyn VmMemoryOps>) -> PrivateMemoryManager {
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
fn vmm_sets(vm: &dyn VmMemoryOps, memory: &PrivateMemoryManager, delete: bool) {
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
        .guest_memory()
        .memory()
        .read_obj::<u8>(GuestAddress(0))
        .is_err());
    memory
        .guest_memory()
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
        .guest_memory()
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
        .guest_memory()
        .memory()
        .write_obj(0xadd_u64, GuestAddress(added.start()))
        .unwrap();
    drop(memory);
    // SAFETY: the test checks that the memory kept this mapping; it is only read.
    let word = unsafe { std::ptr::read_volatile(new.userspace_addr as *const u64) };
    assert_eq!(word, 0xadd);
}

/// Whether this process still maps a file with inode `inode` (from /proc/self/maps,
/// which names each mapping's inode: unlike an address, it cannot be reused by another
/// test's mapping while the file lives).
fn maps_inode(inode: u64) -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .any(|line| line.split_whitespace().nth(4) == Some(&inode.to_string()))
}

/// A listener that, hearing `populate`, asks the memory for its memslots and backing,
/// as a VMM's hotplug listener binding a new slot would.
struct AsksForSlots {
    memory: std::sync::Mutex<std::sync::Weak<PrivateMemoryManager>>,
    heard: std::sync::Mutex<Vec<(usize, bool, bool)>>,
}

impl vm_private_memory::MemoryListener for AsksForSlots {
    fn discard(&self, _range: guest_memfd::PageRange) {}

    fn populate(
        &self,
        range: guest_memfd::PageRange,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(memory) = self.memory.lock().unwrap().upgrade() else {
            return Ok(());
        };
        let slots = memory.memslots()?.len();
        let backing = memory.backing(range.start()).is_ok();
        let vmm = memory.vmm_binds_memslots();
        self.heard.lock().unwrap().push((slots, backing, vmm));
        Ok(())
    }
}

#[test]
fn a_listener_may_ask_for_the_memslots_while_a_region_is_added() {
    if !in_place_or_skip("a_listener_may_ask_for_the_memslots_while_a_region_is_added") {
        return;
    }
    let vm = vm();
    let memory = Arc::new(vmm_bound(&vm));
    let listener = Arc::new(AsksForSlots {
        memory: std::sync::Mutex::new(Arc::downgrade(&memory)),
        heard: Default::default(),
    });
    let _subscription = memory.subscribe(pr(0, 64 * MIB2), listener.clone());
    let (done, finished) = std::sync::mpsc::channel();
    let adder = Arc::clone(&memory);
    std::thread::spawn(move || {
        let added = adder.add_region(pr(16 * MIB2, MIB2), None, PageState::Shared);
        let converted = adder.convert(pr(0, PAGE_SIZE), PageState::Private);
        let back = adder.convert(pr(0, PAGE_SIZE), PageState::Shared);
        done.send((added, converted, back)).unwrap();
    });
    let (added, converted, back) = finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("a listener asking for the memslots deadlocked the memory");
    added.unwrap();
    converted.unwrap();
    back.unwrap();
    // The new region is listed when its pages are offered; then the conversion back.
    assert_eq!(
        *listener.heard.lock().unwrap(),
        [(3, true, true), (3, true, true)]
    );
    // SAFETY: the VMM bound nothing.
    unsafe { memory.release_memslots() };
}

#[test]
fn a_hotplugged_region_a_listener_refuses_leaves_the_release_standing() {
    if !in_place_or_skip("a_hotplugged_region_a_listener_refuses_leaves_the_release_standing") {
        return;
    }
    let vm = vm();
    let memory = vmm_bound(&vm);
    let inode = memory.backing(0).unwrap().gmem_inode;
    // SAFETY: the VMM bound nothing.
    unsafe { memory.release_memslots() };
    let refuser = Arc::new(common::Recorder::default());
    *refuser.refuse.lock().unwrap() = true;
    let subscription = memory.subscribe(pr(0, 64 * MIB2), refuser);
    let added = pr(16 * MIB2, MIB2);
    assert!(matches!(
        memory.add_region(added, None, PageState::Shared),
        Err(Error::ListenerRefused { .. })
    ));
    assert_eq!(
        memory.memslots().unwrap().len(),
        2,
        "the refused region left"
    );
    drop(subscription);
    assert!(maps_inode(inode));
    drop(memory);
    // Nothing the VMM was told of is unreleased: the mappings are freed.
    assert!(
        !maps_inode(inode),
        "the release was taken back by a refused addition"
    );
}

#[test]
fn a_region_whose_removal_fails_stays_and_its_slot_can_be_bound_again() {
    if !in_place_or_skip("a_region_whose_removal_fails_stays_and_its_slot_can_be_bound_again") {
        return;
    }
    let vm = vm();
    let memory = vmm_bound(&vm);
    vmm_sets(&vm, &memory, false);
    let view = memory.guest_memory();
    let mem = view.memory();
    let second = memory.memslots().unwrap()[1];
    let held = mem.get_slice(GuestAddress(8 * MIB2), 8).unwrap();
    let mut delete = second;
    delete.memory_size = 0;
    // SAFETY: deleting a slot has no requirement.
    unsafe { vm.set_user_memory_region2(delete) }.unwrap();
    // SAFETY: its slot was deleted just above; on an error it is bound again below.
    let err = unsafe { memory.remove_unbound_region(8 * MIB2) }.unwrap_err();
    assert!(matches!(err, Error::HostAccessInFlight { .. }), "{err}");
    // Still there, as it was: bind it again and use it.
    assert_eq!(memory.memslots().unwrap()[1], second);
    // SAFETY: the region's own mapping, still this memory's.
    unsafe { vm.set_user_memory_region2(second) }.unwrap();
    held.write_obj(7u64, 0).unwrap();
    drop(held);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(8 * MIB2)).unwrap(), 7);
    assert!(!gpa_is_free(&vm, pr(8 * MIB2, MIB2)));
    vmm_sets(&vm, &memory, true);
    // SAFETY: every slot described was deleted.
    unsafe { memory.release_memslots() };
}

/// A listener that binds every new region's slot from `populate`, as soon as the memory
/// lists it, and records the guest_memfd inode of what it bound.
struct BindsFromPopulate {
    vm: Arc<dyn VmMemoryOps>,
    memory: std::sync::Mutex<std::sync::Weak<PrivateMemoryManager>>,
    bound: std::sync::Mutex<Vec<(kvm_bindings::kvm_userspace_memory_region2, u64)>>,
}

impl vm_private_memory::MemoryListener for BindsFromPopulate {
    fn discard(&self, _range: guest_memfd::PageRange) {}

    fn populate(
        &self,
        range: guest_memfd::PageRange,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let Some(memory) = self.memory.lock().unwrap().upgrade() else {
            return Ok(());
        };
        for slot in memory.memslots()? {
            if slot.guest_phys_addr == range.start() {
                let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
                // SAFETY: fstat writes a `stat` into the buffer it is given; the
                // descriptor is the memory's guest_memfd, open while it lives.
                let ret = unsafe { libc::fstat(slot.guest_memfd as i32, stat.as_mut_ptr()) };
                assert_eq!(ret, 0);
                // SAFETY: fstat succeeded, so it filled the buffer.
                let inode = unsafe { stat.assume_init() }.st_ino;
                // SAFETY: the slot's own mapping; the test checks it is never freed.
                unsafe { self.vm.set_user_memory_region2(slot) }?;
                self.bound.lock().unwrap().push((slot, inode));
            }
        }
        Ok(())
    }
}

#[test]
fn a_refused_addition_the_vmm_may_have_bound_keeps_its_mapping() {
    if !in_place_or_skip("a_refused_addition_the_vmm_may_have_bound_keeps_its_mapping") {
        return;
    }
    let vm = vm();
    let memory = Arc::new(vmm_bound(&vm));
    let binder = Arc::new(BindsFromPopulate {
        vm: vm.clone(),
        memory: std::sync::Mutex::new(Arc::downgrade(&memory)),
        bound: Default::default(),
    });
    let refuser = Arc::new(common::Recorder::default());
    *refuser.refuse.lock().unwrap() = true;
    let _first = memory.subscribe(pr(0, 64 * MIB2), binder.clone());
    let _second = memory.subscribe(pr(0, 64 * MIB2), refuser);
    let added = pr(16 * MIB2, MIB2);
    let err = memory
        .add_region(added, None, PageState::Shared)
        .unwrap_err();
    assert!(matches!(err, Error::ListenerRefused { .. }), "{err}");
    assert_eq!(
        memory.memslots().unwrap().len(),
        2,
        "the region left the memory"
    );
    let (slot, inode) = binder.bound.lock().unwrap()[0];
    // The slot the listener bound is still bound, so its mapping must still be there.
    assert!(!gpa_is_free(&vm, added));
    assert!(
        maps_inode(inode),
        "the mapping under a bound slot was freed"
    );
    let mut delete = slot;
    delete.memory_size = 0;
    // SAFETY: deleting a slot has no requirement.
    unsafe { vm.set_user_memory_region2(delete) }.unwrap();
    // The slot number stays taken: the next addition gets another.
    memory
        .add_region(pr(20 * MIB2, MIB2), None, PageState::Private)
        .unwrap();
    let numbers: Vec<u32> = memory.memslots().unwrap().iter().map(|s| s.slot).collect();
    assert!(
        !numbers.contains(&slot.slot),
        "{numbers:?} reuses {}",
        slot.slot
    );
    // SAFETY: the VMM bound nothing else.
    unsafe { memory.release_memslots() };
}

/// A memory that binds its own memslots hands out no descriptions (raw host addresses
/// of private pages, guest_memfd descriptors): there is nothing for the VMM to bind.
#[test]
fn a_memory_binding_its_own_memslots_hands_out_no_descriptions() {
    let memory = MemoryBuilder::new(vm())
        .region_at(0, MIB2)
        .strategy(Strategy::InPlace)
        .build()
        .unwrap();
    let err = memory.memslots().expect_err("nothing for the VMM to bind");
    assert!(matches!(err, Error::MemoryBindsMemslots), "{err}");
    assert!(err.to_string().contains("vmm_binds_memslots"), "{err}");
}
