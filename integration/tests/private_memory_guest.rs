// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The backend seen from a running guest: pages discarded or converted by
//! `vm-private-memory` read as fresh zeros in the guest, and listeners hear first.

mod common;

use std::sync::Arc;

use common::Log;
use guest_memfd::{PageRange, PAGE_SIZE};
use integration::{programs, StopReason, TestVm};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{MemoryBuilder, PageState, PrivateMemoryManager, Strategy};

const GIB4: u64 = 4 << 30;
const SIZE: u64 = 2 << 20;
const PATTERN: u64 = 0x0123_4567_89ab_cdef;

fn guest_on_private_memory(test: &str) -> Option<(TestVm, PrivateMemoryManager)> {
    if !common::guest_memfd_or_skip(test) {
        return None;
    }
    let vm = TestVm::new(programs::FILL_THEN_SUM, &[GIB4, SIZE, PATTERN]).unwrap();
    let memory = MemoryBuilder::new(vm.shared_vm())
        .region_at(GIB4, SIZE)
        .slots(1, 100)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build();
    match memory {
        Ok(memory) => Some((vm, memory)),
        Err(e) => {
            println!("SKIPPED {test}: {e}");
            None
        }
    }
}

#[test]
fn a_guest_re_faults_zeroed_pages_after_a_discard() {
    let Some((mut vm, memory)) =
        guest_on_private_memory("a_guest_re_faults_zeroed_pages_after_a_discard")
    else {
        return;
    };
    let log = Arc::new(Log::default());
    let _s = memory.subscribe(PageRange::new(GIB4, SIZE).unwrap(), log.clone());
    assert_eq!(vm.run().unwrap().reason, StopReason::Pause);
    // The guest's writes are visible to the host through the backend.
    let ram = memory.guest_memory();
    assert_eq!(
        ram.memory().read_obj::<u64>(GuestAddress(GIB4)).unwrap(),
        PATTERN
    );

    let balloon = PageRange::new(GIB4 + 8 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
    assert_eq!(memory.discard(balloon).unwrap(), 4 * PAGE_SIZE);
    let done = vm.run_to_done().unwrap();
    let zero_words = 4 * PAGE_SIZE / 8;
    assert_eq!(done.rbx, zero_words, "words the guest read as zero");
    assert_eq!(
        done.rax,
        SIZE / 8 - zero_words,
        "words still holding the pattern"
    );
    assert_eq!(*log.0.lock().unwrap(), vec![format!("discard {balloon}")]);
}

#[test]
fn a_guest_sees_fresh_pages_after_a_private_round_trip() {
    let Some((mut vm, memory)) =
        guest_on_private_memory("a_guest_sees_fresh_pages_after_a_private_round_trip")
    else {
        return;
    };
    assert_eq!(vm.run().unwrap().reason, StopReason::Pause);
    let range = PageRange::new(GIB4, 16 * PAGE_SIZE).unwrap();
    memory.convert(range, PageState::Private).unwrap();
    // While private, the host cannot read what the guest wrote there.
    let ram = memory.guest_memory();
    assert!(ram.memory().read_obj::<u64>(GuestAddress(GIB4)).is_err());
    memory.convert(range, PageState::Shared).unwrap();
    let done = vm.run_to_done().unwrap();
    assert_eq!(done.rbx, 16 * PAGE_SIZE / 8);
    assert_eq!(done.rax, (SIZE - 16 * PAGE_SIZE) / 8);
}
