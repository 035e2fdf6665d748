// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Dirty tracking of host writes, on the real `/dev/kvm`: memory built with vm-memory's
//! `AtomicBitmap` marks exactly the pages host code wrote through the vm-memory view,
//! in region offsets as `GuestMemoryMmap<AtomicBitmap>` does, and the bitmap composes
//! with the access guards (a held slice still holds back a conversion to private).

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{in_place_or_skip, pr, vm, RecordingVm};
use guest_memfd::PAGE_SIZE;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion};
use vm_private_memory::{
    private_page_refusal, ContentMode, Error, MemoryBuilder, PageState, PrivateMemoryManager,
    Strategy,
};

const REGION: u64 = 2 << 20;

/// Two adjacent in-place regions at 0 and 2 MiB, all shared, tracking host writes.
fn tracked(patience: Duration) -> PrivateMemoryManager<AtomicBitmap> {
    MemoryBuilder::new(vm())
        .region_at(0, REGION)
        .region_at(REGION, REGION)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .access_patience(patience)
        .build_with_bitmap::<AtomicBitmap>()
        .unwrap()
}

/// Every dirty page as (region start, page index in the region), read from the regions'
/// bitmaps (and cleared).
fn take_dirty(memory: &PrivateMemoryManager<AtomicBitmap>) -> BTreeSet<(u64, u64)> {
    let view = memory.guest_memory().memory();
    let mut dirty = BTreeSet::new();
    for region in view.iter() {
        let start = region.start_addr().0;
        for (word, bits) in region
            .dirty_bitmap()
            .get_and_reset()
            .into_iter()
            .enumerate()
        {
            for bit in 0..64 {
                if bits & (1 << bit) != 0 {
                    dirty.insert((start, word as u64 * 64 + bit));
                }
            }
        }
    }
    dirty
}

#[test]
fn host_writes_through_the_view_mark_exactly_their_pages() {
    if !in_place_or_skip("host_writes_through_the_view_mark_exactly_their_pages") {
        return;
    }
    let memory = tracked(Duration::from_millis(100));
    let view = memory.guest_memory();
    let mem = view.memory();
    assert!(take_dirty(&memory).is_empty(), "a new memory starts clean");

    // Reads mark nothing.
    let _: u64 = mem.read_obj(GuestAddress(0x7000)).unwrap();
    let _: u32 = mem.load(GuestAddress(0x8000), Ordering::Acquire).unwrap();
    assert!(take_dirty(&memory).is_empty(), "reads marked pages dirty");

    // `Bytes` writes, an atomic store, and a write through a slice, in both regions.
    mem.write_obj(7u64, GuestAddress(0x5008)).unwrap();
    mem.store(1u32, GuestAddress(REGION + 0x3000), Ordering::Release)
        .unwrap();
    mem.get_slice(GuestAddress(0x9ff8), 16)
        .unwrap()
        .write_slice(&[1; 16], 0)
        .unwrap();
    // One write across the boundary between the regions: the last page of the first
    // and the first page of the second.
    mem.write_slice(&[2; 0x2000], GuestAddress(REGION - PAGE_SIZE))
        .unwrap();

    let want: BTreeSet<(u64, u64)> = [
        (0, 5),
        (0, 9),
        (0, 10),
        (0, REGION / PAGE_SIZE - 1),
        (REGION, 0),
        (REGION, 3),
    ]
    .into();
    assert_eq!(take_dirty(&memory), want);
    assert!(take_dirty(&memory).is_empty(), "get_and_reset clears");
}

#[test]
fn refused_writes_mark_nothing_and_conversions_to_shared_mark_their_pages() {
    if !in_place_or_skip("refused_writes_mark_nothing_and_conversions_to_shared_mark_their_pages") {
        return;
    }
    let memory = tracked(Duration::from_millis(100));
    memory
        .convert(pr(0x10000, 0x2000), PageState::Private)
        .unwrap();
    let view = memory.guest_memory();
    let mem = view.memory();

    // Into a private page, and straddling a shared and a private one: refused whole.
    let err = mem.write_obj(1u64, GuestAddress(0x10000)).unwrap_err();
    assert!(private_page_refusal(&err).is_some(), "{err}");
    let err = mem
        .write_slice(&[3; 0x100], GuestAddress(0xff80))
        .unwrap_err();
    assert!(private_page_refusal(&err).is_some(), "{err}");
    assert!(
        take_dirty(&memory).is_empty(),
        "a refused write marked pages"
    );

    // A conversion to private marks nothing; one to shared marks the pages it shows the
    // host (their bytes are new to it: zeros, or content the guest kept).
    memory
        .convert(pr(0x20000, 0x4000), PageState::Private)
        .unwrap();
    assert!(
        take_dirty(&memory).is_empty(),
        "a conversion to private marked pages"
    );
    memory
        .convert_with(
            pr(0x10000, 0x2000),
            PageState::Shared,
            ContentMode::Preserve,
        )
        .unwrap();
    memory
        .convert(pr(0x20000, 0x4000), PageState::Shared)
        .unwrap();
    assert_eq!(
        take_dirty(&memory),
        [
            (0, 0x10),
            (0, 0x11),
            (0, 0x20),
            (0, 0x21),
            (0, 0x22),
            (0, 0x23)
        ]
        .into()
    );

    // The page that came back shared is tracked again.
    mem.write_obj(1u64, GuestAddress(0x11000)).unwrap();
    assert_eq!(take_dirty(&memory), [(0, 0x11)].into());
}

#[test]
fn a_held_slice_with_a_dirty_bitmap_still_holds_back_a_conversion() {
    if !in_place_or_skip("a_held_slice_with_a_dirty_bitmap_still_holds_back_a_conversion") {
        return;
    }
    let memory = tracked(Duration::from_millis(50));
    let view = memory.guest_memory();
    let mem = view.memory();
    let slice = mem.get_slice(GuestAddress(0x40000), 64).unwrap();
    // A sub-slice carries the bitmap at its own offset, and the guard with it.
    let sub = slice.subslice(32, 8).unwrap();
    drop(slice);
    assert!(!sub.bitmap().dirty_at(0));

    let err = memory
        .convert(pr(0x40000, PAGE_SIZE), PageState::Private)
        .unwrap_err();
    assert!(
        matches!(err, Error::HostAccessInFlight { .. }),
        "the held sub-slice should hold the conversion back: {err}"
    );
    sub.write_slice(&[9; 8], 0).unwrap();
    assert!(
        sub.bitmap().dirty_at(0),
        "the slice's bitmap reads its write"
    );
    assert!(sub.bitmap().dirty_bitmap().dirty_at(7));
    drop(sub);
    memory
        .convert(pr(0x40000, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert_eq!(take_dirty(&memory), [(0, 0x40)].into());
}

#[test]
fn a_region_added_later_tracks_host_writes() {
    if !in_place_or_skip("a_region_added_later_tracks_host_writes") {
        return;
    }
    let memory = tracked(Duration::from_millis(100));
    let added = pr(16 << 20, REGION);
    memory.add_region(added, None, PageState::Shared).unwrap();
    let view = memory.guest_memory();
    let mem = view.memory();
    let region = mem.find_region(GuestAddress(added.start())).unwrap();
    assert_eq!(region.dirty_bitmap().byte_size(), REGION as usize);
    mem.write_obj(5u16, GuestAddress(added.start() + 0x1ff_ffe))
        .unwrap();
    assert_eq!(take_dirty(&memory), [(added.start(), 0x1ff)].into());
}

#[test]
fn dual_memory_tracks_writes_to_its_shared_side() {
    // The dual strategy on the attribute stand-in (see tests/common).
    let stand_in = RecordingVm::new(vm());
    let memory = MemoryBuilder::new(stand_in)
        .region_at(0, REGION)
        .strategy(Strategy::Dual)
        .initial_state(PageState::Private)
        .build_with_bitmap::<AtomicBitmap>()
        .unwrap();
    memory
        .convert(pr(0x3000, 0x2000), PageState::Shared)
        .unwrap();
    let view = memory.guest_memory();
    let mem = view.memory();
    mem.write_slice(&[4; 0x1800], GuestAddress(0x3800)).unwrap();
    assert!(mem.write_obj(1u8, GuestAddress(0x5000)).is_err());
    assert_eq!(take_dirty(&memory), [(0, 3), (0, 4)].into());
}

/// A balloon's discard changes the bytes of the shared pages it frees (they read as zeros
/// afterwards): they are marked dirty, so a migration pass that sent them sends them
/// again; private pages it frees are not (the view never carried them).
#[test]
fn a_discard_marks_the_shared_pages_it_frees_dirty() {
    if !in_place_or_skip("a_discard_marks_the_shared_pages_it_frees_dirty") {
        return;
    }
    let memory = tracked(Duration::from_millis(100));
    memory
        .guest_memory()
        .memory()
        .write_obj(5u64, GuestAddress(0x30000))
        .unwrap();
    memory
        .convert(pr(0x32000, 0x1000), PageState::Private)
        .unwrap();
    // The migration pass sends what is dirty, and the guest balloons pages 0x30-0x33.
    take_dirty(&memory);
    memory.discard(pr(0x30000, 0x4000)).unwrap();
    assert_eq!(
        take_dirty(&memory),
        [(0, 0x30), (0, 0x31), (0, 0x33)].into()
    );
    assert_eq!(
        memory
            .guest_memory()
            .memory()
            .read_obj::<u64>(GuestAddress(0x30000))
            .unwrap(),
        0
    );
}
