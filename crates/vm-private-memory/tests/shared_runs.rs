// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Shared runs for device code on the real `/dev/kvm`: the query, and a subscription that
//! starts from what is shared now without racing conversions.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{dual, in_place, in_place_or_skip, pr, Heard, Recorder};
use guest_memfd::{PageRange, PAGE_SIZE};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vm_private_memory::{
    Error, MemoryBuilder, MemoryListener, PageState, PrivateMemoryManager, Strategy,
};

const MIB2: u64 = 2 << 20;

/// Two in-place regions, at 0 and 8 MiB, all private.
fn two_regions() -> PrivateMemoryManager {
    MemoryBuilder::new(common::vm())
        .region_at(0, MIB2)
        .region_at(4 * MIB2, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()
        .unwrap()
}

fn runs_of(m: &PrivateMemoryManager, range: PageRange) -> Vec<PageRange> {
    m.shared_pages()
        .snapshot()
        .runs(range)
        .map(|r| r.guest_range())
        .collect()
}

#[test]
fn shared_runs_are_exact_clipped_and_never_span_regions() {
    if !in_place_or_skip("shared_runs_are_exact_clipped_and_never_span_regions") {
        return;
    }
    let m = two_regions();
    let second = 4 * MIB2;
    for (start, len) in [
        (0, PAGE_SIZE),
        (3 * PAGE_SIZE, 2 * PAGE_SIZE),
        (MIB2 - PAGE_SIZE, PAGE_SIZE),
        (second, 3 * PAGE_SIZE),
    ] {
        m.convert(pr(start, len), PageState::Shared).unwrap();
    }
    // Everything from 0 to the end of the second region, the hole between included.
    let all = pr(0, second + MIB2);
    assert_eq!(
        runs_of(&m, all),
        [
            pr(0, PAGE_SIZE),
            pr(3 * PAGE_SIZE, 2 * PAGE_SIZE),
            pr(MIB2 - PAGE_SIZE, PAGE_SIZE),
            pr(second, 3 * PAGE_SIZE),
        ]
    );
    // Clipped at both ends; a range wholly in the hole or past memory yields nothing.
    assert_eq!(
        runs_of(&m, pr(4 * PAGE_SIZE, second + PAGE_SIZE - 4 * PAGE_SIZE)),
        [
            pr(4 * PAGE_SIZE, PAGE_SIZE),
            pr(MIB2 - PAGE_SIZE, PAGE_SIZE),
            pr(second, PAGE_SIZE)
        ]
    );
    assert!(runs_of(&m, pr(MIB2, MIB2)).is_empty());
    assert!(runs_of(&m, pr(1 << 40, MIB2)).is_empty());
    // A fully shared region is one run, even next to another shared region.
    m.convert(pr(0, MIB2), PageState::Shared).unwrap();
    assert_eq!(runs_of(&m, all)[0], pr(0, MIB2));
}

#[test]
fn a_run_gives_its_host_address_and_only_the_dual_shared_file() {
    if !in_place_or_skip("a_run_gives_its_host_address_and_only_the_dual_shared_file") {
        return;
    }
    let m = in_place(MIB2, PageState::Private);
    m.convert(pr(5 * PAGE_SIZE, 2 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    let view = m.guest_memory();
    let mem = view.memory();
    let snapshot = m.shared_pages().snapshot();
    let run = snapshot.runs(pr(0, MIB2)).next().unwrap();
    let slice = mem.get_slice(GuestAddress(5 * PAGE_SIZE), 8).unwrap();
    assert_eq!(run.host_address().cast_const(), slice.ptr_guard().as_ptr());
    // In-place, the only file is the guest_memfd: never handed out.
    assert!(run.file().is_none());

    let (d, _vm) = dual(MIB2, PageState::Private);
    d.convert(pr(5 * PAGE_SIZE, 2 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    let snapshot = d.shared_pages().snapshot();
    let run = snapshot.runs(pr(0, MIB2)).next().unwrap();
    let file = run.file().expect("the dual strategy's shared memfd");
    assert_eq!(file.offset, 5 * PAGE_SIZE);
    let handed = std::fs::File::from(file.fd.try_clone_to_owned().unwrap());
    assert_ne!(
        handed.metadata().unwrap().ino(),
        d.backing(0).unwrap().gmem_inode,
        "the file handed out is not the guest_memfd"
    );
}

#[test]
fn a_replayed_subscription_hears_what_is_shared_then_every_change() {
    if !in_place_or_skip("a_replayed_subscription_hears_what_is_shared_then_every_change") {
        return;
    }
    let m = two_regions();
    m.convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    m.convert(pr(4 * MIB2, 2 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    let listener = Arc::new(Recorder::default());
    let _s = m
        .subscribe_with_replay(pr(0, 5 * MIB2), listener.clone())
        .unwrap();
    m.convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert_eq!(
        *listener.heard.lock().unwrap(),
        [
            Heard::Populate(pr(PAGE_SIZE, PAGE_SIZE)),
            Heard::Populate(pr(4 * MIB2, 2 * PAGE_SIZE)),
            Heard::Discard(pr(PAGE_SIZE, PAGE_SIZE)),
        ]
    );
}

/// Accepts `accept` runs, then refuses.
struct RefusesAfter {
    accept: Mutex<usize>,
    heard: Mutex<Vec<Heard>>,
}

impl MemoryListener for RefusesAfter {
    fn discard(&self, range: PageRange) {
        self.heard.lock().unwrap().push(Heard::Discard(range));
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.heard.lock().unwrap().push(Heard::Populate(range));
        let mut left = self.accept.lock().unwrap();
        if *left == 0 {
            return Err("no more mappings".into());
        }
        *left -= 1;
        Ok(())
    }
}

#[test]
fn a_refused_replay_takes_back_what_was_accepted_and_does_not_subscribe() {
    if !in_place_or_skip("a_refused_replay_takes_back_what_was_accepted_and_does_not_subscribe") {
        return;
    }
    let m = in_place(MIB2, PageState::Private);
    for page in [1, 3, 5] {
        m.convert(pr(page * PAGE_SIZE, PAGE_SIZE), PageState::Shared)
            .unwrap();
    }
    let listener = Arc::new(RefusesAfter {
        accept: Mutex::new(2),
        heard: Mutex::default(),
    });
    let err = m
        .subscribe_with_replay(pr(0, MIB2), listener.clone())
        .unwrap_err();
    assert!(
        matches!(err, Error::ListenerRefused { range, .. } if range.start == 5 * PAGE_SIZE),
        "{err}"
    );
    assert!(err.to_string().contains("no more mappings"), "{err}");
    assert_eq!(m.listener_count(), 0);
    let page = |p: u64| pr(p * PAGE_SIZE, PAGE_SIZE);
    assert_eq!(
        *listener.heard.lock().unwrap(),
        [
            Heard::Populate(page(1)),
            Heard::Populate(page(3)),
            Heard::Populate(page(5)),
            Heard::Discard(page(3)),
            Heard::Discard(page(1)),
        ]
    );
    // Not subscribed: later conversions are not heard.
    m.convert(page(7), PageState::Shared).unwrap();
    assert_eq!(listener.heard.lock().unwrap().len(), 5);
}

/// Keeps the set of pages it was told are shared.
#[derive(Default)]
struct SharedSet(Mutex<BTreeSet<u64>>);

impl MemoryListener for SharedSet {
    fn discard(&self, range: PageRange) {
        let mut set = self.0.lock().unwrap();
        for p in 0..range.page_count() {
            assert!(
                set.remove(&(range.start() + p * PAGE_SIZE)),
                "discard of a page never offered"
            );
        }
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut set = self.0.lock().unwrap();
        for p in 0..range.page_count() {
            assert!(
                set.insert(range.start() + p * PAGE_SIZE),
                "populate of a page offered already"
            );
        }
        Ok(())
    }
}

/// Subscriptions made while another thread keeps converting pages: each listener's view
/// (what it was offered minus what it was told to let go) ends equal to the pages that
/// are shared, never offered a page twice nor told to let go of one it never had.
#[test]
fn a_replayed_subscription_never_misses_a_conversion_racing_it() {
    if !in_place_or_skip("a_replayed_subscription_never_misses_a_conversion_racing_it") {
        return;
    }
    let m = Arc::new(in_place(MIB2, PageState::Private));
    let stop = Arc::new(AtomicBool::new(false));
    let converter = {
        let (m, stop) = (Arc::clone(&m), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut seed = 0x9e37_79b9_u64;
            while !stop.load(Ordering::Relaxed) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let page = seed % 64;
                let to = if seed & (1 << 20) == 0 {
                    PageState::Shared
                } else {
                    PageState::Private
                };
                m.convert(pr(page * PAGE_SIZE, PAGE_SIZE), to).unwrap();
            }
        })
    };
    let mut listeners = Vec::new();
    for _ in 0..200 {
        let listener = Arc::new(SharedSet::default());
        let s = m
            .subscribe_with_replay(pr(0, 64 * PAGE_SIZE), listener.clone())
            .unwrap();
        listeners.push((listener, s));
    }
    stop.store(true, Ordering::Relaxed);
    converter.join().unwrap();
    let shared: BTreeSet<u64> = runs_of(&m, pr(0, MIB2))
        .iter()
        .flat_map(|r| (0..r.page_count()).map(move |p| r.start() + p * PAGE_SIZE))
        .collect();
    for (listener, _) in &listeners {
        assert_eq!(*listener.0.lock().unwrap(), shared);
    }
}
