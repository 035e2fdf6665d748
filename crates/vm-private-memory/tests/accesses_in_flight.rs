// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Host accesses in flight and conversions to private, on the real `/dev/kvm`: once
//! `convert(.., Private)` returns, no host access made through a vm-memory call can still
//! reach the page; a slice held across a conversion makes it wait, then fail, rolled back.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{in_place_or_skip, pr, vm};
use guest_memfd::PAGE_SIZE;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vm_private_memory::{
    ContentMode, Error, MemoryBuilder, PageState, PrivateMemoryManager, Strategy, KVM_EAGAIN,
};

const SIZE: u64 = 4 << 20;
/// The page that goes back and forth: writers' ranges straddle it.
const PAGE: u64 = 1 << 20;

fn shared_memory(patience: Duration) -> PrivateMemoryManager {
    MemoryBuilder::new(vm())
        .region_at(0, SIZE)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .access_patience(patience)
        .build()
        .unwrap()
}

/// Writers hammer writes of 8 bytes to 64 KiB over `PAGE` while the main thread converts
/// it to private; after each conversion returns the writers are paused, the page comes
/// back with its content kept, and it must hold nothing: a byte there is a write that
/// passed its check before the conversion and landed after it.
#[test]
fn no_host_write_lands_in_a_page_after_it_went_private() {
    if !in_place_or_skip("no_host_write_lands_in_a_page_after_it_went_private") {
        return;
    }
    let memory = Arc::new(shared_memory(Duration::from_secs(1)));
    let view = memory.guest_memory();
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let writers = 2;
    let parked = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (view, stop, paused, parked) = (
                view.clone(),
                Arc::clone(&stop),
                Arc::clone(&paused),
                Arc::clone(&parked),
            );
            std::thread::spawn(move || {
                let big = vec![0xa5u8; 64 << 10];
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    if paused.load(Ordering::Acquire) {
                        parked.fetch_add(1, Ordering::AcqRel);
                        while paused.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
                            std::thread::yield_now();
                        }
                        parked.fetch_sub(1, Ordering::AcqRel);
                        continue;
                    }
                    let mem = view.memory();
                    n += 1;
                    let _ = match (n + w) % 3 {
                        0 => mem.write_obj(0x5a5a_5a5a_5a5a_5a5au64, GuestAddress(PAGE + 64)),
                        1 => mem.write_slice(&big[..PAGE_SIZE as usize], GuestAddress(PAGE)),
                        _ => mem.write_slice(&big, GuestAddress(PAGE - (32 << 10))),
                    };
                }
            })
        })
        .collect();

    let page = pr(PAGE, PAGE_SIZE);
    let started = Instant::now();
    let (mut rounds, mut late) = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(3) {
        memory.convert(page, PageState::Private).unwrap();
        paused.store(true, Ordering::Release);
        while parked.load(Ordering::Acquire) < writers {
            std::thread::yield_now();
        }
        memory
            .convert_with(page, PageState::Shared, ContentMode::Preserve)
            .unwrap();
        let mut content = vec![0u8; PAGE_SIZE as usize];
        view.memory()
            .read_slice(&mut content, GuestAddress(PAGE))
            .unwrap();
        late += u64::from(content.iter().any(|&b| b != 0));
        // Clean the page for the next round (the host may write it: it is shared).
        view.memory()
            .write_slice(&vec![0u8; PAGE_SIZE as usize], GuestAddress(PAGE))
            .unwrap();
        paused.store(false, Ordering::Release);
        while parked.load(Ordering::Acquire) > 0 {
            std::thread::yield_now();
        }
        rounds += 1;
    }
    stop.store(true, Ordering::Release);
    handles.into_iter().for_each(|h| h.join().unwrap());
    println!("{rounds} conversions raced by {writers} writers, {late} late writes");
    assert!(rounds > 50, "too few rounds to mean anything: {rounds}");
    assert_eq!(
        late, 0,
        "host writes landed in a private page after convert returned"
    );
}

#[test]
fn a_held_slice_makes_a_conversion_of_its_page_fail_rolled_back_and_retryable() {
    if !in_place_or_skip(
        "a_held_slice_makes_a_conversion_of_its_page_fail_rolled_back_and_retryable",
    ) {
        return;
    }
    let memory = shared_memory(Duration::from_millis(30));
    let view = memory.guest_memory();
    let mem = view.memory();
    let slice = mem.get_slice(GuestAddress(PAGE + 8), 16).unwrap();

    let started = Instant::now();
    let err = memory
        .convert(pr(PAGE, PAGE_SIZE), PageState::Private)
        .unwrap_err();
    let waited = started.elapsed();
    match &err {
        Error::HostAccessInFlight { range, waited } => {
            assert_eq!((range.start, range.len), (PAGE, PAGE_SIZE));
            assert!(*waited >= Duration::from_millis(30), "{waited:?}");
        }
        other => panic!("not an access-in-flight error: {other}"),
    }
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    // Rolled back: still shared, the slice still works, the memory is unchanged.
    assert_eq!(memory.state_of(PAGE), Some(PageState::Shared));
    assert_eq!(memory.private_pages(), 0);
    slice.write_obj(0x77u64, 0).unwrap();

    // The guest's request gets a retryable answer.
    assert_eq!(
        memory.handle_map_gpa_range(PAGE, 1, 1 << 4),
        KVM_EAGAIN.wrapping_neg()
    );

    // Pages the slice does not touch convert while it is held.
    memory
        .convert(pr(PAGE + PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    memory
        .convert(pr(0, PAGE_SIZE), PageState::Private)
        .unwrap();

    // Once dropped, the conversion goes through, and the page arrives empty.
    drop(slice);
    memory
        .convert(pr(PAGE, PAGE_SIZE), PageState::Private)
        .unwrap();
    memory
        .convert(pr(PAGE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(PAGE + 8)).unwrap(), 0);
}

#[test]
fn sub_slices_and_clones_keep_the_page_held_until_the_last_one_goes() {
    if !in_place_or_skip("sub_slices_and_clones_keep_the_page_held_until_the_last_one_goes") {
        return;
    }
    let memory = shared_memory(Duration::from_millis(10));
    let view = memory.guest_memory();
    let mem = view.memory();
    let page = pr(PAGE, PAGE_SIZE);
    let slice = mem.get_slice(GuestAddress(PAGE), 64).unwrap();
    let sub = slice.subslice(8, 8).unwrap();
    let copy = sub.clone();
    drop(slice);
    drop(sub);
    assert!(matches!(
        memory.convert(page, PageState::Private),
        Err(Error::HostAccessInFlight { .. })
    ));
    drop(copy);
    memory.convert(page, PageState::Private).unwrap();
}

#[test]
fn many_slices_held_at_once_are_all_waited_for() {
    if !in_place_or_skip("many_slices_held_at_once_are_all_waited_for") {
        return;
    }
    let memory = shared_memory(Duration::from_millis(10));
    let view = memory.guest_memory();
    let mem = view.memory();
    // More slices than a thread has entries: the last ones are covered by one range.
    let slices: Vec<_> = (0..20)
        .map(|i| mem.get_slice(GuestAddress(i * PAGE_SIZE), 8).unwrap())
        .collect();
    for held in [0, 15, 19] {
        assert!(
            matches!(
                memory.convert(pr(held * PAGE_SIZE, PAGE_SIZE), PageState::Private),
                Err(Error::HostAccessInFlight { .. })
            ),
            "page {held} is held"
        );
    }
    // Pages no slice touches still convert.
    memory
        .convert(pr(SIZE - PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    memory
        .convert(pr(20 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    drop(slices);
    memory
        .convert(pr(0, 20 * PAGE_SIZE), PageState::Private)
        .unwrap();
}

#[test]
fn a_slice_held_by_another_thread_is_waited_for_and_released() {
    if !in_place_or_skip("a_slice_held_by_another_thread_is_waited_for_and_released") {
        return;
    }
    let memory = Arc::new(shared_memory(Duration::from_secs(5)));
    let view = memory.guest_memory();
    let holding = Arc::new(Barrier::new(2));
    let holder = {
        let holding = Arc::clone(&holding);
        std::thread::spawn(move || {
            let mem = view.memory();
            let slice = mem.get_slice(GuestAddress(PAGE), 8).unwrap();
            holding.wait();
            std::thread::sleep(Duration::from_millis(50));
            slice.write_obj(1u64, 0).unwrap();
        })
    };
    holding.wait();
    let started = Instant::now();
    memory
        .convert(pr(PAGE, PAGE_SIZE), PageState::Private)
        .unwrap();
    let waited = started.elapsed();
    holder.join().unwrap();
    assert!(
        waited >= Duration::from_millis(40),
        "did not wait: {waited:?}"
    );
    // The holder's write came before the conversion's punch: the page is fresh.
    memory
        .convert(pr(PAGE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(
        memory
            .guest_memory()
            .memory()
            .read_obj::<u64>(GuestAddress(PAGE))
            .unwrap(),
        0
    );
}

#[test]
fn host_addresses_are_given_only_for_wholly_shared_regions() {
    if !in_place_or_skip("host_addresses_are_given_only_for_wholly_shared_regions") {
        return;
    }
    let memory = shared_memory(Duration::from_millis(10));
    let view = memory.guest_memory();
    let mem = view.memory();
    let region = mem.find_region(GuestAddress(0)).unwrap();
    let base = mem.get_host_address(GuestAddress(0)).unwrap();
    assert!(!base.is_null());
    assert!(region.all_shared());

    // One private page anywhere: the idiom `get_host_address(0)` + `len()` would map it.
    let last = SIZE - PAGE_SIZE;
    memory
        .convert(pr(last, PAGE_SIZE), PageState::Private)
        .unwrap();
    for addr in [0, PAGE, last] {
        let err = mem.get_host_address(GuestAddress(addr)).unwrap_err();
        let (range, page) = vm_private_memory::private_page_refusal(&err)
            .unwrap_or_else(|| panic!("not a refusal at {addr:#x}: {err}"));
        assert_eq!((range.start, range.len, page), (0, SIZE, last));
    }
    assert!(mem
        .find_region(GuestAddress(0))
        .unwrap()
        .get_host_address(vm_memory::MemoryRegionAddress(SIZE))
        .is_err());
    // Slices of the shared pages still work.
    mem.write_obj(3u64, GuestAddress(PAGE)).unwrap();
    memory
        .convert(pr(last, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(
        mem.get_host_address(GuestAddress(PAGE)).unwrap(),
        base.wrapping_add(PAGE as usize)
    );
}

#[test]
fn a_view_taken_before_a_region_was_removed_no_longer_reaches_it() {
    if !in_place_or_skip("a_view_taken_before_a_region_was_removed_no_longer_reaches_it") {
        return;
    }
    let memory = shared_memory(Duration::from_millis(10));
    let old = memory.guest_memory().memory();
    old.write_obj(1u64, GuestAddress(PAGE)).unwrap();
    // The region leaves, and its file comes back with every page private: what the guest
    // writes there must not be readable through the view held from before.
    let (range, file, offset) = memory.remove_region(0).unwrap();
    memory
        .add_region(range, Some((file, offset)), PageState::Private)
        .unwrap();
    let err = old.read_obj::<u64>(GuestAddress(PAGE)).unwrap_err();
    assert!(
        vm_private_memory::private_page_refusal(&err).is_some(),
        "{err}"
    );
    assert!(old.write_obj(2u64, GuestAddress(0)).is_err());
    assert!(old.get_slice(GuestAddress(SIZE - 8), 8).is_err());
}

#[test]
fn a_held_slice_makes_removing_its_region_fail_with_nothing_changed() {
    if !in_place_or_skip("a_held_slice_makes_removing_its_region_fail_with_nothing_changed") {
        return;
    }
    let memory = shared_memory(Duration::from_millis(10));
    let view = memory.guest_memory();
    let mem = view.memory();
    let slice = mem.get_slice(GuestAddress(PAGE), 8).unwrap();
    assert!(matches!(
        memory.remove_region(0),
        Err(Error::HostAccessInFlight { .. })
    ));
    assert_eq!(memory.regions().len(), 1);
    assert_eq!(memory.private_pages(), 0);
    slice.write_obj(3u64, 0).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(PAGE)).unwrap(), 3);
    drop(slice);
    memory.remove_region(0).unwrap();
}

#[test]
fn a_conversion_never_waits_without_bound_whatever_patience_is_asked() {
    if !in_place_or_skip("a_conversion_never_waits_without_bound_whatever_patience_is_asked") {
        return;
    }
    let memory = shared_memory(Duration::MAX);
    let view = memory.guest_memory();
    let mem = view.memory();
    let slice = mem.get_slice(GuestAddress(PAGE), 8).unwrap();
    let started = Instant::now();
    match memory.convert(pr(PAGE, PAGE_SIZE), PageState::Private) {
        Err(Error::HostAccessInFlight { waited, .. }) => {
            assert!(
                waited >= vm_private_memory::MAX_ACCESS_PATIENCE,
                "{waited:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(started.elapsed() < 3 * vm_private_memory::MAX_ACCESS_PATIENCE);
    assert_eq!(memory.state_of(PAGE), Some(PageState::Shared));
    drop(slice);
}

/// A device that refuses the pages offered to it, after another thread took a slice of
/// them while they were shared (it holds it for `hold`).
struct RefusesWhileASliceIsHeld {
    memory: std::sync::Mutex<Option<Arc<PrivateMemoryManager>>>,
    hold: Duration,
    holder: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl vm_private_memory::MemoryListener for RefusesWhileASliceIsHeld {
    fn discard(&self, _: guest_memfd::PageRange) {}

    fn populate(
        &self,
        range: guest_memfd::PageRange,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let memory = self.memory.lock().unwrap().clone().unwrap();
        let taken = Arc::new(Barrier::new(2));
        let hold = self.hold;
        let signal = Arc::clone(&taken);
        *self.holder.lock().unwrap() = Some(std::thread::spawn(move || {
            let view = memory.guest_memory().memory();
            let slice = view.get_slice(GuestAddress(range.start()), 8).unwrap();
            signal.wait();
            std::thread::sleep(hold);
            slice.write_obj(0xdead_u64, 0).unwrap();
        }));
        taken.wait();
        Err("no room for the pages".into())
    }
}

/// Undoing a conversion to shared that a device refused waits for host accesses that
/// took the pages while they were shared, as a conversion to private does; past the
/// memory's patience the pages stay shared and the error names them, instead of turning
/// private under a live slice.
#[test]
fn an_undone_conversion_to_shared_waits_for_slices_taken_meanwhile() {
    if !in_place_or_skip("an_undone_conversion_to_shared_waits_for_slices_taken_meanwhile") {
        return;
    }
    for (hold, stays_shared) in [
        (Duration::from_millis(2), false),
        (Duration::from_millis(300), true),
    ] {
        let memory = Arc::new(shared_memory(Duration::from_millis(100)));
        memory
            .convert(pr(PAGE, PAGE_SIZE), PageState::Private)
            .unwrap();
        let device = Arc::new(RefusesWhileASliceIsHeld {
            memory: std::sync::Mutex::new(Some(Arc::clone(&memory))),
            hold,
            holder: std::sync::Mutex::new(None),
        });
        let subscription = memory.subscribe(pr(0, SIZE), device.clone());
        let err = memory
            .convert(pr(PAGE, PAGE_SIZE), PageState::Shared)
            .expect_err("the device refuses");
        if stays_shared {
            match &err {
                Error::RollbackFailed { kept_shared, .. } => {
                    assert_eq!(
                        (kept_shared[0].start, kept_shared[0].len),
                        (PAGE, PAGE_SIZE)
                    );
                }
                other => panic!("not a failed rollback: {other}"),
            }
            assert_eq!(memory.state_of(PAGE), Some(PageState::Shared));
        } else {
            assert!(matches!(err, Error::ListenerRefused { .. }), "{err}");
            assert_eq!(memory.state_of(PAGE), Some(PageState::Private));
        }
        device
            .holder
            .lock()
            .unwrap()
            .take()
            .unwrap()
            .join()
            .unwrap();
        drop(subscription);
        device.memory.lock().unwrap().take();
    }
}
