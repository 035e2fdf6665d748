// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Scenario 4 (invalidation-driven remapping while the guest runs) and scenario 5 (two
//! vCPUs converting at once while a device thread reads shared memory), on real KVM.

mod common;

use common::{private_memory_or_skip, Log};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use guest_memfd::{GuestMemfd, GuestMemfdFlags, PageRange, PAGE_SIZE};
use integration::{programs, Driver, NoDevice, DATA_ADDR};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{PageState, KVM_EAGAIN, MAP_GPA_RANGE_ENCRYPTED};

const MIB: u64 = 1 << 20;

/// Scenario 4: the host discards a range under a running guest (the guest then reads
/// zeros, a listener heard first), then removes the data region and re-adds it backed by
/// another guest_memfd at another offset (the guest sees that file's content).
#[test]
fn scenario_4_discard_and_remap_under_a_running_guest() {
    if !private_memory_or_skip("scenario_4_discard_and_remap_under_a_running_guest") {
        return;
    }
    let size = 2 * MIB;
    let mut guest = common::guest(programs::DRIVER, size, 1, false);
    guest.start(0, &[]).unwrap();
    let memory = guest.memory().clone();
    if memory.strategy() == vm_private_memory::Strategy::Dual {
        println!(
            "SKIPPED scenario_4_discard_and_remap_under_a_running_guest: it prepares the new \
             content through a guest_memfd mapping, which the dual strategy's files lack"
        );
        return;
    }
    let log = Arc::new(Log::default());
    let _s = memory.subscribe(PageRange::new(DATA_ADDR, size).unwrap(), log.clone());
    let dev = &mut NoDevice;
    let mut d = Driver::new(guest.vcpu(0), dev).unwrap();

    d.fill(DATA_ADDR, size, 0x61, dev).unwrap();
    let hole = PageRange::new(DATA_ADDR + 16 * PAGE_SIZE, 8 * PAGE_SIZE).unwrap();
    memory.discard(hole).unwrap();
    assert_eq!(*log.0.lock().unwrap(), vec![format!("discard {hole}")]);
    d.check(hole.start(), hole.len(), 0, dev).unwrap();
    d.check(DATA_ADDR, hole.start() - DATA_ADDR, 0x61, dev)
        .unwrap();
    d.check(hole.end(), DATA_ADDR + size - hole.end(), 0x61, dev)
        .unwrap();

    // Remap: a second file, whose upper half the host prepares with new content.
    let vm = memory.vm().clone();
    let file = GuestMemfd::create(
        &vm,
        2 * size,
        GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
    )
    .unwrap();
    let staging = file.map_range(PageRange::new(size, size).unwrap()).unwrap();
    let content = vec![0x7e; size as usize];
    vm_memory::VolatileMemory::as_volatile_slice(&staging)
        .write_slice(&content, 0)
        .unwrap();
    drop(staging);
    log.0.lock().unwrap().clear();
    let (range, _old, _) = memory.remove_region(DATA_ADDR).unwrap();
    assert_eq!(
        *log.0.lock().unwrap(),
        vec![format!("discard {range}")],
        "listeners heard before the slot went"
    );
    memory
        .add_region(range, Some((file, size)), PageState::Shared)
        .unwrap();
    d.check(DATA_ADDR, size, 0x7e, dev).unwrap();
    assert_eq!(
        memory
            .guest_memory()
            .memory()
            .read_obj::<u8>(GuestAddress(DATA_ADDR))
            .unwrap(),
        0x7e
    );
    d.done(dev).unwrap();
}

/// How many times a guest asks again after a busy answer before the test gives up.
const BUSY_RETRIES: u32 = 50;

/// The guest's MapGPA as Linux's TDX and SEV-SNP guests make it: a busy answer
/// (`-KVM_EAGAIN`, a device still reading pages that were going private, rolled back) is
/// asked again. Returns the final answer; counts the busy ones in `busy`.
fn map_until_answered(
    d: &mut Driver,
    range: PageRange,
    attributes: u64,
    dev: &mut NoDevice,
    busy: &mut u32,
) -> u64 {
    for _ in 0..=BUSY_RETRIES {
        let answer = d.map(range.start(), range.len(), attributes, dev).unwrap();
        if answer != KVM_EAGAIN.wrapping_neg() {
            return answer;
        }
        *busy += 1;
    }
    panic!("{range}: still busy after {BUSY_RETRIES} retries");
}

/// Scenario 5: two vCPUs convert their own ranges (writing private bytes into them while
/// private) and a range they share, again and again, while a device thread reads the
/// shared range and an area nobody converts. Every request is answered 0 in the end: a
/// busy answer (`-KVM_EAGAIN`: the device still read the shared range when it was going
/// private, and the memory's patience ran out) is asked again, as guests do, and such
/// answers stay rare (at most one per round and vCPU). The converted
/// range reads zero or is refused, never anything else; the untouched area keeps the
/// host's bytes; each vCPU finds its range fresh after every conversion.
///
/// The device does not read the ranges the vCPUs write private bytes into: a host copy
/// that passed its check just before a conversion to private can still be copying when
/// the guest writes (the window the crate documents for the in-place strategy), and a
/// test that relied on never hitting that window would be flaky.
#[test]
fn scenario_5_two_vcpus_convert_while_a_device_reads() {
    if !private_memory_or_skip("scenario_5_two_vcpus_convert_while_a_device_reads") {
        return;
    }
    const ROUNDS: usize = 40;
    let size = 8 * MIB;
    let mut guest = common::guest(programs::DRIVER, size, 2, false);
    guest.start(0, &[]).unwrap();
    guest.start(1, &[]).unwrap();
    let memory = guest.memory().clone();
    let own = |i: u64| PageRange::new(DATA_ADDR + i * 2 * MIB, 2 * MIB).unwrap();
    let common = PageRange::new(DATA_ADDR + 4 * MIB, MIB).unwrap();
    let sentinel = PageRange::new(DATA_ADDR + 6 * MIB, 2 * MIB).unwrap();
    let ram = memory.guest_memory();
    ram.memory()
        .write_slice(
            &vec![0x5a; sentinel.len() as usize],
            GuestAddress(sentinel.start()),
        )
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let (reads, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let device = {
        let (ram, stop, reads, refused) =
            (ram.clone(), stop.clone(), reads.clone(), refused.clone());
        std::thread::spawn(move || {
            let mut bad = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mem = ram.memory();
                // The common range is only ever converted, never written: readable or
                // refused, it must read zero.
                for page in 0..common.page_count() {
                    let gpa = common.start() + page * PAGE_SIZE;
                    match mem.read_obj::<u64>(GuestAddress(gpa)) {
                        Ok(0) => reads.fetch_add(1, Ordering::Relaxed),
                        Ok(v) => {
                            bad.push(format!("{gpa:#x} read {v:#x}"));
                            0
                        }
                        Err(_) => refused.fetch_add(1, Ordering::Relaxed),
                    };
                }
                let mut probe = [0u8; 64];
                mem.read_slice(&mut probe, GuestAddress(sentinel.start() + 4096))
                    .unwrap();
                if probe != [0x5a; 64] {
                    bad.push("sentinel changed".into());
                }
                std::thread::yield_now();
            }
            bad
        })
    };

    let workers: Vec<_> = guest
        .take_vcpus()
        .into_iter()
        .map(|mut vcpu| {
            std::thread::spawn(move || {
                let i = vcpu.index() as u64;
                let dev = &mut NoDevice;
                let mut d = Driver::new(&mut vcpu, dev).unwrap();
                let mine = own(i);
                let private_byte = 0xa0 + i as u8;
                let (mut answers, mut busy) = (Vec::new(), 0);
                for round in 0..ROUNDS {
                    let encrypted = MAP_GPA_RANGE_ENCRYPTED;
                    answers.push(map_until_answered(&mut d, mine, encrypted, dev, &mut busy));
                    d.check(mine.start(), mine.len(), 0, dev).unwrap();
                    d.fill(mine.start(), mine.len(), private_byte, dev).unwrap();
                    answers.push(map_until_answered(&mut d, mine, 0, dev, &mut busy));
                    d.check(mine.start(), mine.len(), 0, dev).unwrap();
                    let attrs = if (round + i as usize) % 2 == 0 {
                        MAP_GPA_RANGE_ENCRYPTED
                    } else {
                        0
                    };
                    answers.push(map_until_answered(&mut d, common, attrs, dev, &mut busy));
                }
                d.done(dev).unwrap();
                println!("SCENARIO-5 vcpu={i} busy_answers={busy}");
                assert!(busy as usize <= ROUNDS, "vCPU {i}: {busy} busy answers");
                answers
            })
        })
        .collect();
    for worker in workers {
        let answers = worker.join().unwrap();
        assert_eq!(answers.len(), 3 * ROUNDS);
        assert!(answers.iter().all(|&a| a == 0), "{answers:?}");
    }
    stop.store(true, Ordering::Relaxed);
    let bad = device.join().unwrap();
    assert!(bad.is_empty(), "{bad:?}");
    assert!(reads.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed) > 0);
    // Both own ranges ended shared and fresh; the sentinel is intact.
    let mem = ram.memory();
    for i in 0..2 {
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(own(i).start())).unwrap(),
            0
        );
    }
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(sentinel.end() - 1))
            .unwrap(),
        0x5a
    );
}
