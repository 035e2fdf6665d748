// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest cases of the kernel's `guest_memfd_test.c`, and the seed's invalidation,
//! shown on a running guest on the real `/dev/kvm`.

mod common;

use guest_memfd::{supported_flags, GuestMemfd, GuestMemfdFlags, Memslot, PageRange, PAGE_SIZE};
use integration::{programs, Error, StopReason, TestVm};
use vm_memory::{Bytes, VolatileMemory};

const GIB4: u64 = 4 << 30;

fn mappable(vm: &TestVm, test: &str) -> bool {
    let wanted = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let ok = supported_flags(vm.vm()).contains(wanted);
    if !ok {
        println!("SKIPPED {test}: this host lacks GUEST_MEMFD_FLAG_MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
    }
    ok
}

/// Host writes 0xaa through the guest_memfd's mapping, the guest (CPL3) checks every byte
/// and writes 0xff, the host reads 0xff back: the selftest's `test_guest_memfd_guest`.
#[test]
fn guest_round_trip_through_a_memslot_at_4_gib() {
    if !common::guest_memfd_or_skip("guest_round_trip_through_a_memslot_at_4_gib") {
        return;
    }
    let size = PAGE_SIZE;
    let mut vm = TestVm::new(programs::ROUND_TRIP, &[GIB4, size]).unwrap();
    if !mappable(&vm, "guest_round_trip_through_a_memslot_at_4_gib") {
        return;
    }
    let mem = vm
        .add_memory(1, PageRange::new(GIB4, size).unwrap())
        .unwrap();
    mem.fill(0xaa);
    vm.run_to_done().unwrap();
    let back = mem.read(0, size as usize).unwrap();
    assert!(
        back.iter().all(|&b| b == 0xff),
        "the guest's writes reach the file"
    );

    // A fresh mapping of the file sees the same bytes.
    let again = mem.gmem().map().unwrap();
    let mut buf = vec![0u8; size as usize];
    again.as_volatile_slice().read_slice(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0xff));
}

/// The guest program's check can fail: without the host's 0xaa it reports the offset.
#[test]
fn guest_round_trip_detects_wrong_content() {
    if !common::guest_memfd_or_skip("guest_round_trip_detects_wrong_content") {
        return;
    }
    let size = 2 * PAGE_SIZE;
    let mut vm = TestVm::new(programs::ROUND_TRIP, &[GIB4, size]).unwrap();
    if !mappable(&vm, "guest_round_trip_detects_wrong_content") {
        return;
    }
    let mem = vm
        .add_memory(1, PageRange::new(GIB4, size).unwrap())
        .unwrap();
    mem.fill(0xaa);
    mem.write(5000, &[0x12]).unwrap();
    match vm.run_to_done() {
        Err(Error::GuestFailed { rax, rbx }) => assert_eq!((rax, rbx), (5000, 0x12)),
        other => panic!("{other:?}"),
    }
}

/// The seed's `invalidate_page_range`: the guest writes a pattern at CPL3, the host
/// punches a hole in the guest_memfd while the guest has those pages mapped, and the
/// guest then reads zeros there (and its pattern everywhere else).
#[test]
fn a_running_guest_reads_zeros_after_the_host_punches_a_hole() {
    if !common::guest_memfd_or_skip("a_running_guest_reads_zeros_after_the_host_punches_a_hole") {
        return;
    }
    const SIZE: u64 = 2 << 20;
    const PATTERN: u64 = 0x5a5a_0123_4567_89ab;
    let mut vm = TestVm::new(programs::FILL_THEN_SUM, &[GIB4, SIZE, PATTERN]).unwrap();
    if !mappable(
        &vm,
        "a_running_guest_reads_zeros_after_the_host_punches_a_hole",
    ) {
        return;
    }
    let mem = vm
        .add_memory(1, PageRange::new(GIB4, SIZE).unwrap())
        .unwrap();

    let stop = vm.run().unwrap();
    assert_eq!(stop.reason, StopReason::Pause);
    // Punch pages 1 and 2 and the last page while the guest has them mapped.
    let gmem = mem.gmem();
    gmem.discard(PageRange::new(PAGE_SIZE, 2 * PAGE_SIZE).unwrap())
        .unwrap();
    gmem.discard(PageRange::new(SIZE - PAGE_SIZE, PAGE_SIZE).unwrap())
        .unwrap();
    let done = vm.run_to_done().unwrap();

    let words = SIZE / 8;
    let punched_words = 3 * PAGE_SIZE / 8;
    assert_eq!(done.rbx, punched_words, "words the guest read as zero");
    assert_eq!(
        done.rax,
        words - punched_words,
        "words still holding the pattern"
    );
}

/// Closing a bound guest_memfd (dropping the last `GuestMemfd`, with no host mapping left)
/// does not keep the memory alive behind the guest's back: KVM unbinds the file, and the
/// guest's next access fails `KVM_RUN` with EFAULT and a `KVM_EXIT_MEMORY_FAULT` (shared,
/// flags 0) naming the page. Before the close, the same guest uses the slot normally.
#[test]
fn a_guest_touching_a_closed_guest_memfd_gets_a_memory_fault_exit() {
    if !common::guest_memfd_or_skip(
        "a_guest_touching_a_closed_guest_memfd_gets_a_memory_fault_exit",
    ) {
        return;
    }
    const SIZE: u64 = 4 * PAGE_SIZE;
    let mut vm = TestVm::new(programs::FILL_THEN_SUM, &[GIB4, SIZE, 0x77]).unwrap();
    if !mappable(
        &vm,
        "a_guest_touching_a_closed_guest_memfd_gets_a_memory_fault_exit",
    ) {
        return;
    }
    let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let gmem = GuestMemfd::create(vm.vm(), SIZE, flags).unwrap();
    // A gmem-only slot: CPL3 guest accesses go to the guest_memfd itself.
    let slot = Memslot::new(1, PageRange::new(GIB4, SIZE).unwrap(), &gmem, 0).unwrap();
    // SAFETY: no userspace address is set.
    unsafe { slot.bind(vm.vm()) }.unwrap();
    assert_eq!(
        vm.run().unwrap().reason,
        StopReason::Pause,
        "the slot works"
    );
    drop(gmem);
    match vm.run_to_done() {
        Err(Error::MemoryFault { flags, gpa, size }) => {
            assert_eq!((flags, gpa, size), (0, GIB4, PAGE_SIZE));
        }
        other => panic!("{other:?}"),
    }
}
