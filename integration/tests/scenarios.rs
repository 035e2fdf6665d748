// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The integration scenarios on real KVM (default VM type, in-place strategy): guests
//! whose memory is `vm-private-memory`, converting pages by the KVM_HC_MAP_GPA_RANGE ABI.

mod common;

use common::private_memory_or_skip;
use std::sync::{Arc, Mutex};

use guest_memfd::{PageRange, PAGE_SIZE};
use integration::{layout, programs, NoDevice, StopReason, SumDevice, DATA_ADDR};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{private_page_refusal, MemoryListener, PageState, KVM_EINVAL};

const MIB2: u64 = 2 << 20;

/// The checksum `checksum.S` computes over `words` words.
fn expected_checksum(words: u64) -> u64 {
    (0..words)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .fold(0u64, u64::wrapping_add)
        ^ words
}

/// Scenario 1: code, page tables, stack and data all private; the guest computes, the
/// host can read none of it.
#[test]
fn scenario_1_an_all_private_guest_computes_and_the_host_reads_nothing() {
    if !private_memory_or_skip(
        "scenario_1_an_all_private_guest_computes_and_the_host_reads_nothing",
    ) {
        return;
    }
    let size = 4 * MIB2;
    let mut guest = common::guest(programs::CHECKSUM, size, 1, true);
    guest.start(0, &[DATA_ADDR, size]).unwrap();
    let memory = guest.memory().clone();
    if memory.strategy() == vm_private_memory::Strategy::Dual {
        println!(
            "SKIPPED scenario_1_an_all_private_guest_computes_and_the_host_reads_nothing: \
             with the dual strategy the host cannot load code into private pages (a TDX/SNP launch does that)"
        );
        return;
    }
    assert_eq!(
        memory.private_pages(),
        (layout::BOOT_SIZE + size) / PAGE_SIZE
    );
    let done = guest.vcpu(0).run_to_done(&mut NoDevice).unwrap();
    assert_eq!(done.rax, expected_checksum(size / 8));

    let ram = memory.guest_memory();
    for (what, gpa) in [
        ("code", layout::CODE_ADDR),
        ("page tables", layout::PML4_ADDR),
        ("stack", layout::STACK_TOP - 8),
        ("data", DATA_ADDR),
        ("data end", DATA_ADDR + size - 8),
    ] {
        let err = ram.memory().read_obj::<u64>(GuestAddress(gpa)).unwrap_err();
        assert!(private_page_refusal(&err).is_some(), "{what}: {err}");
    }
}

/// Scenario 2: the guest shares a 2 MiB bounce buffer, a device answers through it, the
/// guest takes it back and finds it zeroed; the host can no longer read it.
#[test]
fn scenario_2_a_bounce_buffer_round_trip_through_shared_memory() {
    if !private_memory_or_skip("scenario_2_a_bounce_buffer_round_trip_through_shared_memory") {
        return;
    }
    let mut guest = common::guest(programs::BOUNCE, 2 * MIB2, 1, true);
    let buffer = DATA_ADDR + MIB2;
    guest.start(0, &[buffer, MIB2]).unwrap();
    let memory = guest.memory().clone();

    // A listener, as a DMA user of the buffer would be.
    #[derive(Default)]
    struct Dma(Mutex<Vec<(bool, PageRange)>>);
    impl MemoryListener for Dma {
        fn discard(&self, range: PageRange) {
            self.0.lock().unwrap().push((false, range));
        }
        fn populate(
            &self,
            range: PageRange,
        ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            self.0.lock().unwrap().push((true, range));
            Ok(())
        }
    }
    let dma = Arc::new(Dma::default());
    let _s = memory.subscribe(PageRange::new(buffer, MIB2).unwrap(), dma.clone());

    let mut device = SumDevice::default();
    let done = guest.vcpu(0).run_to_done(&mut device).unwrap();
    let expected: u64 = (0..4096u64).map(|i| (i * 7 + 3) & 0xff).sum();
    assert_eq!(done.rax, expected, "the device's answer reached the guest");
    assert_eq!(
        done.rbx, 0,
        "non-zero quadwords in the buffer after taking it back"
    );
    assert_eq!((device.served, device.refused), (1, 0));
    let whole = PageRange::new(buffer, MIB2).unwrap();
    assert_eq!(*dma.0.lock().unwrap(), vec![(true, whole), (false, whole)]);
    assert_eq!(memory.state_of(buffer), Some(PageState::Private));
    assert!(memory
        .guest_memory()
        .memory()
        .read_obj::<u64>(GuestAddress(buffer))
        .is_err());
}

/// Scenario 6: a hostile guest's malformed requests each get -KVM_EINVAL, the VMM keeps
/// serving it, and nothing changes in its memory.
#[test]
fn scenario_6_a_hostile_guest_gets_error_codes_and_changes_nothing() {
    if !private_memory_or_skip("scenario_6_a_hostile_guest_gets_error_codes_and_changes_nothing") {
        return;
    }
    let mut guest = common::guest(programs::HOSTILE, MIB2, 1, true);
    guest.start(0, &[]).unwrap();
    let memory = guest.memory().clone();
    let before = memory.state();
    let vcpu = guest.vcpu(0);
    let mut answers = Vec::new();
    loop {
        let stop = vcpu.run(&mut NoDevice).unwrap();
        match stop.reason {
            StopReason::Pause => answers.push((stop.regs.rbx, stop.regs.rax)),
            StopReason::Done => {
                assert_eq!(stop.regs.rax, answers.len() as u64);
                break;
            }
        }
    }
    assert_eq!(answers.len(), 10);
    for (index, answer) in &answers {
        assert_eq!(*answer, KVM_EINVAL.wrapping_neg(), "request {index}");
    }
    assert_eq!(memory.state(), before, "no page changed state");
}

/// The benchmark programs, small: first touch on private and on anonymous memory, and
/// round trips (bare exits and conversions) that every one answered.
#[test]
fn the_benchmark_programs_work() {
    if !private_memory_or_skip("the_benchmark_programs_work") {
        return;
    }
    let size = 4 * MIB2;
    let mut guest = common::guest(programs::TOUCH, size, 1, true);
    guest.start(0, &[DATA_ADDR, size]).unwrap();
    assert_eq!(
        guest.vcpu(0).run_to_done(&mut NoDevice).unwrap().rax,
        size / PAGE_SIZE
    );

    let mut vm = integration::TestVm::new(programs::TOUCH, &[DATA_ADDR, size]).unwrap();
    vm.add_anonymous_memory(1, PageRange::new(DATA_ADDR, size).unwrap())
        .unwrap();
    assert_eq!(vm.run_to_done().unwrap().rax, size / PAGE_SIZE);

    for (mode, trips) in [(0u64, 100u64), (1, 101)] {
        let mut guest = common::guest(programs::EXIT_LOOP, MIB2, 1, false);
        guest.start(0, &[DATA_ADDR, 1, trips, mode]).unwrap();
        let memory = guest.memory().clone();
        let vcpu = guest.vcpu(0);
        assert_eq!(vcpu.run_to_done(&mut NoDevice).unwrap().rax, trips);
        assert_eq!(vcpu.served().len() as u64, mode * trips);
        // An odd number of alternating conversions leaves the page private.
        let expected = if mode == 1 {
            PageState::Private
        } else {
            PageState::Shared
        };
        assert_eq!(memory.state_of(DATA_ADDR), Some(expected));
    }
}

/// The debug console: a guest's bytes reach the host, on both harness VMs.
#[test]
fn the_debug_console_carries_the_guests_text() {
    if !common::guest_memfd_or_skip("the_debug_console_carries_the_guests_text") {
        return;
    }
    let mut vm = integration::TestVm::new(programs::HELLO, &[]).unwrap();
    let done = vm.run_to_done().unwrap();
    assert_eq!(vm.console(), "hello from CPL3 on guest_memfd\n");
    assert_eq!(done.rax, vm.console().len() as u64);
    if !private_memory_or_skip("the_debug_console_carries_the_guests_text") {
        return;
    }
    let mut guest = common::guest(programs::HELLO, MIB2, 1, true);
    guest.start(0, &[]).unwrap();
    guest.vcpu(0).run_to_done(&mut NoDevice).unwrap();
    assert_eq!(guest.vcpu(0).console(), "hello from CPL3 on guest_memfd\n");
}
