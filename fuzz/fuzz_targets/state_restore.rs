// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Arbitrary bytes through `MemoryState`'s decoding (`serde_json`) and
//! `PrivateMemoryManager::restore_state` on real in-place memory on `/dev/kvm`.
//!
//! Layout (one VM and one memory per process): region A = 32 pages at 0, region B = 32
//! pages at 64 pages (a hole between). Every input starts from the same map: A's pages
//! 4..8 and B's pages 0..16 shared, the rest private.
//!
//! Invariants, for every input that decodes:
//! - `restore_state` succeeds only when the state is consistent with this memory, and
//!   then every page is in the state it describes; a consistent state is not refused;
//! - on error nothing changed: `state()` and every page's `state_of` are as before;
//! - after a success, `state()` restores onto the same memory without change, and
//!   round-trips through the encoding.
//!
//! Each input is tried twice: as decoded (`serde_json::from_slice::<MemoryState>`, which
//! checks version and checksum), and read field by field with its checksum recomputed
//! ([`rechecksummed`]), so that mutated maps reach `restore_state`'s own checks. Apart
//! from [`expected_map`] and [`rechecksummed`], the two functions that know the state's
//! fields (adapt them when the encoding changes), the target uses only the public
//! surface: decoding, `restore_state`, `state()`, `state_of`. The corpus seeds in
//! `corpus/state_restore/` are `state()` outputs (`cargo run --example state_seeds`).

#![no_main]

use std::sync::OnceLock;

use guest_memfd::{PageRange, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_private_memory::{MemoryState, PageState, PrivateMemoryManager, RegionState, Strategy};
use vm_private_memory_fuzz::{in_place_memory, vm};

/// `(first page, pages)` of each region.
const REGIONS: [(u64, u64); 2] = [(0, 32), (64, 32)];
/// Ranges shared at the start of every input, as `(first page, pages)`.
const BASELINE_SHARED: [(u64, u64); 2] = [(4, 4), (64, 16)];

fn memory() -> &'static PrivateMemoryManager {
    static MEMORY: OnceLock<PrivateMemoryManager> = OnceLock::new();
    MEMORY.get_or_init(|| {
        let regions: Vec<_> = REGIONS
            .iter()
            .map(|&(first, pages)| (first * PAGE_SIZE, pages * PAGE_SIZE))
            .collect();
        in_place_memory(vm(), &regions, PageState::Private)
    })
}

/// Every page of every region, in address order.
fn pages() -> impl Iterator<Item = u64> {
    REGIONS
        .iter()
        .flat_map(|&(first, pages)| (first..first + pages).map(|p| p * PAGE_SIZE))
}

fn page_map(memory: &PrivateMemoryManager) -> Vec<PageState> {
    pages()
        .map(|gpa| memory.state_of(gpa).expect("inside a region"))
        .collect()
}

/// The page map `state` describes, in the order of [`pages`], if it is consistent with
/// this memory (whose own state is `current`): intact (`verify`: version, checksum), the
/// same strategy, the same regions at the same file offsets of files of the same size,
/// and private pages that are runs non-empty, in order, not overlapping and inside their
/// region. `None` if it is not consistent.
fn expected_map(state: &MemoryState, current: &MemoryState) -> Option<Vec<PageState>> {
    if state.verify().is_err()
        || state.strategy != current.strategy
        || state.regions.len() != current.regions.len()
    {
        return None;
    }
    let mut map = Vec::new();
    for (saved, region) in state.regions.iter().zip(&current.regions) {
        if saved.guest != region.guest
            || saved.gmem_offset != region.gmem_offset
            || saved.gmem_size != region.gmem_size
        {
            return None;
        }
        let pages = region.guest.page_count();
        let mut states = vec![PageState::Shared; pages as usize];
        let mut next_free = 0u64;
        for run in saved.private_runs().ok()? {
            let end = run.first.checked_add(run.count)?;
            if run.count == 0 || run.first < next_free || end > pages {
                return None;
            }
            states[run.first as usize..end as usize].fill(PageState::Private);
            next_free = end;
        }
        map.extend(states);
    }
    Some(map)
}

/// `data` read field by field with a correct checksum put in, so that mutated states
/// reach `restore_state` instead of stopping at the checksum (decoding checks it).
#[derive(serde::Deserialize)]
struct Fields {
    version: u32,
    strategy: Strategy,
    regions: Vec<RegionState>,
}

fn rechecksummed(data: &[u8]) -> Option<MemoryState> {
    let fields: Fields = serde_json::from_slice(data).ok()?;
    let mut state = MemoryState {
        version: fields.version,
        strategy: fields.strategy,
        regions: fields.regions,
        checksum: 0,
    };
    state.update_checksum();
    Some(state)
}

fn reset(memory: &PrivateMemoryManager) {
    for (first, pages) in REGIONS {
        memory
            .convert(
                PageRange::from_pages(first, pages).unwrap(),
                PageState::Private,
            )
            .unwrap();
    }
    for (first, pages) in BASELINE_SHARED {
        memory
            .convert(
                PageRange::from_pages(first, pages).unwrap(),
                PageState::Shared,
            )
            .unwrap();
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(state) = serde_json::from_slice::<MemoryState>(data) {
        restore(&state);
    }
    if let Some(state) = rechecksummed(data) {
        restore(&state);
    }
});

/// Restores `state` from the baseline and checks the invariants.
fn restore(state: &MemoryState) {
    let memory = memory();
    reset(memory);
    let before = memory.state();
    let map_before = page_map(memory);
    let expected = expected_map(state, &before);
    match (memory.restore_state(state), expected) {
        (Ok(()), Some(map)) => {
            assert_eq!(page_map(memory), map, "restored map differs from {state:?}");
            let after = memory.state();
            memory
                .restore_state(&after)
                .expect("state() restores onto its own memory");
            assert_eq!(memory.state(), after, "restoring state() changed it");
            let json = serde_json::to_vec(&after).expect("state() encodes");
            let back: MemoryState = serde_json::from_slice(&json).expect("state() decodes");
            assert_eq!(back, after, "state() does not round-trip");
        }
        (Ok(()), None) => panic!("restore_state accepted an inconsistent state: {state:?}"),
        (Err(e), Some(_)) => panic!("restore_state refused a consistent state ({e}): {state:?}"),
        (Err(_), None) => {
            assert_eq!(memory.state(), before, "a refused restore changed state()");
            assert_eq!(
                page_map(memory),
                map_before,
                "a refused restore changed pages"
            );
        }
    }
}
