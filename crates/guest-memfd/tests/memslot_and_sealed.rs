// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memslot bindings and sealed memfds on the real `/dev/kvm`.

mod common;

use common::{require_mmap, vm};
use guest_memfd::{
    Error, GuestMemfd, GuestMemfdFlags, Memslot, PageRange, SealedMemfd, PAGE_SIZE,
    SHARED_MEMORY_SEALS,
};

const MIB2: u64 = 2 << 20;
const GIB4: u64 = 4 << 30;

fn shared_flags() -> GuestMemfdFlags {
    GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED
}

#[test]
fn a_slot_binds_unbinds_and_rebinds_at_another_offset() {
    let vm = vm();
    if !require_mmap(&vm, "a_slot_binds_unbinds_and_rebinds_at_another_offset") {
        return;
    }
    let gmem = GuestMemfd::create(&vm, 2 * MIB2, shared_flags()).unwrap();
    let map = gmem.map().unwrap();
    let guest = PageRange::new(GIB4, MIB2).unwrap();
    let slot = Memslot::new(3, guest, &gmem, 0)
        .unwrap()
        .with_userspace_mapping(&map)
        .unwrap();
    let region = slot.region();
    assert_eq!(region.slot, 3);
    assert_eq!(region.guest_phys_addr, GIB4);
    assert_eq!(region.memory_size, MIB2);
    assert_eq!(region.userspace_addr, map.as_ptr() as u64);
    assert_eq!(region.flags, kvm_bindings::KVM_MEM_GUEST_MEMFD);
    // SAFETY: `map` outlives the binding; the slot is unbound below.
    unsafe { slot.bind(&vm) }.unwrap();
    slot.unbind(&vm).unwrap();

    let second_half = Memslot::new(3, guest, &gmem, MIB2).unwrap();
    assert_eq!(
        second_half.gmem_range(),
        PageRange::new(MIB2, MIB2).unwrap()
    );
    // SAFETY: no userspace address is set.
    unsafe { second_half.bind(&vm) }.unwrap();
    second_half.unbind(&vm).unwrap();
}

#[test]
fn one_file_backs_two_slots_at_different_offsets() {
    let Some(vm) =
        common::vm_with_guest_memfd_or_skip("one_file_backs_two_slots_at_different_offsets")
    else {
        return;
    };
    let gmem = GuestMemfd::create(&vm, 2 * MIB2, GuestMemfdFlags::empty()).unwrap();
    let low = Memslot::new(0, PageRange::new(0, MIB2).unwrap(), &gmem, 0).unwrap();
    let high = Memslot::new(1, PageRange::new(GIB4, MIB2).unwrap(), &gmem, MIB2).unwrap();
    // SAFETY: no userspace address is set on either slot.
    unsafe {
        low.bind(&vm).unwrap();
        high.bind(&vm).unwrap();
    }
    // Overlapping file ranges in two slots: the kernel refuses (EINVAL up to 6.18,
    // EEXIST on 7.3, as the nested lab shows), our error carries it.
    let overlap = Memslot::new(2, PageRange::new(2 * GIB4, MIB2).unwrap(), &gmem, 0).unwrap();
    // SAFETY: no userspace address is set.
    let err = unsafe { overlap.bind(&vm) }.unwrap_err();
    match &err {
        Error::SetMemoryRegion {
            slot,
            action,
            guest_range,
            source,
        } => {
            assert_eq!(*slot, 2);
            assert_eq!(*action, "bind");
            assert_eq!(guest_range.start(), 2 * GIB4);
            assert!(
                [libc::EINVAL, libc::EEXIST].contains(&source.errno()),
                "{source}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("memslot 2"), "{err}");
    assert!(
        matches!(err.errno(), Some(libc::EINVAL | libc::EEXIST)),
        "{err}"
    );
}

#[test]
fn another_vms_guest_memfd_is_refused_by_the_kernel_with_context() {
    let Some(vm_a) = common::vm_with_guest_memfd_or_skip(
        "another_vms_guest_memfd_is_refused_by_the_kernel_with_context",
    ) else {
        return;
    };
    let vm_b = vm();
    let foreign = GuestMemfd::create(&vm_b, MIB2, GuestMemfdFlags::empty()).unwrap();
    let slot = Memslot::new(0, PageRange::new(0, MIB2).unwrap(), &foreign, 0).unwrap();
    // SAFETY: no userspace address is set.
    let err = unsafe { slot.bind(&vm_a) }.unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    assert!(err.to_string().contains("[0x0, 0x200000)"), "{err}");
}

#[test]
fn slots_that_overrun_the_file_are_refused_before_the_ioctl() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip(
        "slots_that_overrun_the_file_are_refused_before_the_ioctl",
    ) else {
        return;
    };
    let gmem = GuestMemfd::create(&vm, MIB2, GuestMemfdFlags::empty()).unwrap();
    let guest = PageRange::new(GIB4, MIB2).unwrap();
    // Offset + size past the end of the file.
    match Memslot::new(0, guest, &gmem, PAGE_SIZE) {
        Err(Error::OutOfBounds { range, file_size }) => {
            assert_eq!(range, PageRange::new(PAGE_SIZE, MIB2).unwrap());
            assert_eq!(file_size, MIB2);
        }
        other => panic!("{other:?}"),
    }
    // Offset past the end.
    assert!(matches!(
        Memslot::new(0, PageRange::new(0, PAGE_SIZE).unwrap(), &gmem, MIB2),
        Err(Error::OutOfBounds { .. })
    ));
    // Unaligned offset.
    assert!(matches!(
        Memslot::new(0, PageRange::new(0, PAGE_SIZE).unwrap(), &gmem, 512),
        Err(Error::UnalignedRange { .. })
    ));
    // Offset that overflows with the size.
    assert!(matches!(
        Memslot::new(0, guest, &gmem, u64::MAX - PAGE_SIZE + 1),
        Err(Error::RangeOverflow { .. })
    ));
}

#[test]
fn userspace_addresses_are_checked() {
    let vm = vm();
    if !require_mmap(&vm, "userspace_addresses_are_checked") {
        return;
    }
    let gmem = GuestMemfd::create(&vm, MIB2, shared_flags()).unwrap();
    let slot = Memslot::new(0, PageRange::new(0, MIB2).unwrap(), &gmem, 0).unwrap();
    assert!(matches!(
        slot.with_userspace_addr(0x1234),
        Err(Error::UnalignedUserspaceAddress {
            slot: 0,
            addr: 0x1234
        })
    ));
    let small = gmem
        .map_range(PageRange::new(0, PAGE_SIZE).unwrap())
        .unwrap();
    match slot.with_userspace_mapping(&small) {
        Err(Error::MappingTooSmall {
            mapping_len,
            slot_len,
            ..
        }) => assert_eq!((mapping_len, slot_len), (PAGE_SIZE, MIB2)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn slot_numbers_beyond_the_host_limit_are_refused_before_the_ioctl() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip(
        "slot_numbers_beyond_the_host_limit_are_refused_before_the_ioctl",
    ) else {
        return;
    };
    let limit = vm.check_extension_int(kvm_ioctls::Cap::NrMemslots) as u32;
    assert!(limit > 0);
    let gmem = GuestMemfd::create(&vm, MIB2, GuestMemfdFlags::empty()).unwrap();
    let slot = Memslot::new(limit, PageRange::new(0, MIB2).unwrap(), &gmem, 0).unwrap();
    // SAFETY: no userspace address is set.
    match unsafe { slot.bind(&vm) } {
        Err(Error::SlotOutOfRange { slot, limit: l }) => assert_eq!((slot, l), (limit, limit)),
        other => panic!("{other:?}"),
    }
    let last = Memslot::new(limit - 1, PageRange::new(0, MIB2).unwrap(), &gmem, 0).unwrap();
    // SAFETY: no userspace address is set.
    unsafe { last.bind(&vm) }.unwrap();
}

#[test]
fn a_sealed_memfd_cannot_change_size_and_discards_to_zero() {
    let shared = SealedMemfd::create("test-shared", 4 * PAGE_SIZE).unwrap();
    assert_eq!(shared.seals().unwrap(), SHARED_MEMORY_SEALS);
    assert_eq!(shared.file().metadata().unwrap().len(), 4 * PAGE_SIZE);
    // The seals hold: neither shrink nor grow, nor more seals.
    assert!(shared.file().set_len(PAGE_SIZE).is_err());
    assert!(shared.file().set_len(8 * PAGE_SIZE).is_err());
    use std::os::fd::AsRawFd;
    // SAFETY: F_ADD_SEALS takes an integer; the fd is owned by `shared`.
    let ret = unsafe { libc::fcntl(shared.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
    assert_eq!(ret, -1);

    let map = shared.map().unwrap();
    // SAFETY: `map` is a live read-write mapping of 4 pages owned by this test.
    let mem = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), 4 * PAGE_SIZE as usize) };
    mem.fill(0x5a);
    shared
        .discard(PageRange::new(PAGE_SIZE, PAGE_SIZE).unwrap())
        .unwrap();
    assert!(mem[..PAGE_SIZE as usize].iter().all(|&b| b == 0x5a));
    assert!(mem[PAGE_SIZE as usize..2 * PAGE_SIZE as usize]
        .iter()
        .all(|&b| b == 0));
    assert!(mem[2 * PAGE_SIZE as usize..].iter().all(|&b| b == 0x5a));
}

#[test]
fn a_sealed_memfd_refuses_bad_input() {
    assert!(matches!(
        SealedMemfd::create("x", 0),
        Err(Error::InvalidSize { size: 0 })
    ));
    assert!(matches!(
        SealedMemfd::create("x", PAGE_SIZE + 1),
        Err(Error::InvalidSize { .. })
    ));
    assert!(matches!(
        SealedMemfd::create("a\0b", PAGE_SIZE),
        Err(Error::InvalidName { .. })
    ));
    let shared = SealedMemfd::create("x", PAGE_SIZE).unwrap();
    let past = PageRange::new(PAGE_SIZE, PAGE_SIZE).unwrap();
    assert!(matches!(
        shared.discard(past),
        Err(Error::OutOfBounds { .. })
    ));
    assert!(matches!(
        shared.map_range(past),
        Err(Error::OutOfBounds { .. })
    ));
}

/// A fact of the kernel a migrating VMM must know: KVM refuses dirty logging
/// (`KVM_MEM_LOG_DIRTY_PAGES`) on a memslot bound to a guest_memfd.
#[test]
fn kvm_refuses_dirty_logging_on_a_guest_memfd_memslot() {
    use guest_memfd::VmMemoryOps;
    let vm = vm();
    if !require_mmap(&vm, "kvm_refuses_dirty_logging_on_a_guest_memfd_memslot") {
        return;
    }
    let gmem = GuestMemfd::create(&vm, MIB2, shared_flags()).unwrap();
    let map = gmem.map().unwrap();
    let slot = Memslot::new(5, PageRange::new(0, MIB2).unwrap(), &gmem, 0)
        .unwrap()
        .with_userspace_mapping(&map)
        .unwrap();
    let mut region = slot.region();
    region.flags |= kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
    // SAFETY: `map` outlives the call; were the slot created, it is deleted below
    // (memory_size 0) before `map` goes.
    let logged = unsafe { VmMemoryOps::set_user_memory_region2(&vm, region) };
    assert_eq!(
        logged.map(|()| 0).unwrap_or_else(|e| e.errno()),
        libc::EINVAL
    );
    // The same slot without dirty logging binds.
    // SAFETY: as above; unbound right after.
    unsafe { slot.bind(&vm) }.unwrap();
    slot.unbind(&vm).unwrap();
}

/// KVM's guest_memfd memslots are immutable: binding the same slot again, even exactly
/// as it is, is refused (the stand-in for KVM, `guest_memfd::stand_in`, answers the
/// same, and this pins it on the kernel).
#[test]
fn a_guest_memfd_slot_cannot_be_set_again_even_unchanged() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip(
        "a_guest_memfd_slot_cannot_be_set_again_even_unchanged",
    ) else {
        return;
    };
    let gmem = GuestMemfd::create(&vm, MIB2, GuestMemfdFlags::empty()).unwrap();
    let slot = Memslot::new(5, PageRange::new(GIB4, MIB2).unwrap(), &gmem, 0).unwrap();
    // SAFETY: no userspace address is set.
    unsafe { slot.bind(&vm) }.unwrap();
    // SAFETY: as above.
    let again = unsafe { kvm_ioctls::VmFd::set_user_memory_region2(&vm, slot.region()) };
    assert_eq!(again.unwrap_err().errno(), libc::EINVAL);
    slot.unbind(&vm).unwrap();
}
