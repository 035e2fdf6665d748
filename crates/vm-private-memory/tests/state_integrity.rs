// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A saved state's checksum, size bound, encodings and version.

mod common;

use common::{in_place_or_skip, pr, vm};
use guest_memfd::PAGE_SIZE;
use vm_private_memory::{
    Error, MemoryBuilder, MemoryState, PageRun, PageState, PrivateMemoryManager, PrivatePages,
    StateError, Strategy, STATE_VERSION,
};

const GIB: u64 = 1 << 30;
/// The bitmap of 1 GiB: one bit per 4 KiB page.
const GIB_BITMAP: usize = (GIB / PAGE_SIZE / 8) as usize;

fn shared_gib() -> PrivateMemoryManager {
    MemoryBuilder::new(vm())
        .region_at(0, GIB)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .unwrap()
}

fn json(state: &MemoryState) -> String {
    serde_json::to_string(state).unwrap()
}

/// `memory` with its map set to `private`, through a restore.
fn with_map(memory: &PrivateMemoryManager, private: PrivatePages) {
    let mut target = memory.state();
    target.regions[0].private = private;
    target.update_checksum();
    memory.restore_state(&target).unwrap();
}

#[test]
fn alternating_pages_over_a_gib_fit_the_size_bound_and_round_trip() {
    if !in_place_or_skip("alternating_pages_over_a_gib_fit_the_size_bound_and_round_trip") {
        return;
    }
    let m = shared_gib();
    with_map(&m, PrivatePages::Bitmap(vec![0x55; GIB_BITMAP]));
    assert_eq!(m.private_pages(), GIB / PAGE_SIZE / 2);
    let state = m.state();
    assert!(matches!(state.regions[0].private, PrivatePages::Bitmap(_)));
    let text = json(&state);
    println!(
        "alternating pages, 1 GiB: {} bytes of JSON ({:.3}x the {GIB_BITMAP}-byte bitmap)",
        text.len(),
        text.len() as f64 / GIB_BITMAP as f64
    );
    assert!(text.len() <= GIB_BITMAP * 3 / 2 + 1024, "{}", text.len());

    let back: MemoryState = serde_json::from_str(&text).unwrap();
    assert_eq!(back, state);
    let fresh = back
        .builder(vm())
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    fresh.restore_state(&back).unwrap();
    assert!(same_map(&fresh.state(), &state));
    assert_eq!(fresh.state_of(0), Some(PageState::Private));
    assert_eq!(fresh.state_of(PAGE_SIZE), Some(PageState::Shared));
}

#[test]
fn a_sparse_state_stays_a_few_runs_and_round_trips() {
    if !in_place_or_skip("a_sparse_state_stays_a_few_runs_and_round_trips") {
        return;
    }
    let m = shared_gib();
    let runs = vec![
        PageRun {
            first: 0,
            count: 256,
        },
        PageRun {
            first: 100_000,
            count: 1,
        },
        PageRun {
            first: 262_000,
            count: 144,
        },
    ];
    with_map(&m, PrivatePages::Runs(runs.clone()));
    let state = m.state();
    assert_eq!(state.regions[0].private, PrivatePages::Runs(runs));
    let text = json(&state);
    println!("three runs, 1 GiB: {} bytes of JSON", text.len());
    assert!(text.len() < 512, "{text}");
    let back: MemoryState = serde_json::from_str(&text).unwrap();
    let fresh = back.builder(vm()).build().unwrap();
    fresh.restore_state(&back).unwrap();
    assert!(same_map(&fresh.state(), &state));
}

/// A 2 MiB in-place memory, shared, with private pages 4-7 and 100.
fn small() -> PrivateMemoryManager {
    let m = common::in_place(2 << 20, PageState::Shared);
    m.convert(pr(4 * PAGE_SIZE, 4 * PAGE_SIZE), PageState::Private)
        .unwrap();
    m.convert(pr(100 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    m
}

fn refused_as_damaged(text: &str) {
    let err = serde_json::from_str::<MemoryState>(text).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn a_flipped_digit_in_a_run_is_detected() {
    if !in_place_or_skip("a_flipped_digit_in_a_run_is_detected") {
        return;
    }
    let m = small();
    let state = m.state();
    let text = json(&state);
    // Page 100 becomes page 101: still one consistent run, another map.
    let flipped = text.replacen("\"first\":100,", "\"first\":101,", 1);
    assert_ne!(flipped, text);
    refused_as_damaged(&flipped);
    // Built in code rather than decoded, the same damage is refused by the restore.
    let mut damaged = state.clone();
    damaged.regions[0].private = PrivatePages::Runs(vec![
        PageRun { first: 4, count: 4 },
        PageRun {
            first: 101,
            count: 1,
        },
    ]);
    let before = m.state();
    let err = m.restore_state(&damaged).unwrap_err();
    assert!(
        matches!(err, Error::StateMismatch(StateError::Checksum { .. })),
        "{err}"
    );
    assert_eq!(m.state(), before);
}

#[test]
fn a_flipped_character_in_a_bitmap_is_detected() {
    if !in_place_or_skip("a_flipped_character_in_a_bitmap_is_detected") {
        return;
    }
    let m = small();
    let mut state = m.state();
    // The bitmap form of the same map.
    let PrivatePages::Runs(runs) = &state.regions[0].private else {
        panic!("a sparse map is written as runs");
    };
    let mut bits = vec![0u8; 64];
    for run in runs {
        for page in run.first..run.first + run.count {
            bits[(page / 8) as usize] |= 1 << (page % 8);
        }
    }
    state.regions[0].private = PrivatePages::Bitmap(bits);
    state.update_checksum();
    let text = json(&state);
    let back: MemoryState = serde_json::from_str(&text).unwrap();
    assert_eq!(back, state, "the bitmap form round trips");
    let fresh = common::in_place(2 << 20, PageState::Shared);
    fresh.restore_state(&back).unwrap();
    assert_eq!(fresh.private_pages(), 5);
    assert_eq!(fresh.state_of(100 * PAGE_SIZE), Some(PageState::Private));

    // Byte 0 of the bitmap is 0xf0 ("8A..." in base64): "8" -> "9" still decodes.
    let at = text.find("\"private\":\"").unwrap() + "\"private\":\"".len();
    assert_eq!(&text[at..at + 1], "8");
    let mut flipped = text.clone();
    flipped.replace_range(at..at + 1, "9");
    refused_as_damaged(&flipped);
}

#[test]
fn an_older_state_version_is_refused_naming_both_versions() {
    // What version 1 wrote: runs only, no checksum.
    let v1 = r#"{"version":1,"strategy":"in-place","regions":[{"guest":{"start":0,"len":2097152},"gmem_offset":0,"gmem_size":2097152,"private":[{"first":0,"count":1}]}]}"#;
    let err = serde_json::from_str::<MemoryState>(v1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("version 1") && err.contains(&format!("version {STATE_VERSION}")),
        "{err}"
    );
    if !in_place_or_skip("an_older_state_version_is_refused_naming_both_versions") {
        return;
    }
    let m = common::in_place(2 << 20, PageState::Shared);
    let mut old = m.state();
    old.version = 1;
    old.update_checksum();
    let err = m.restore_state(&old).unwrap_err();
    assert!(
        matches!(
            err,
            Error::StateMismatch(StateError::Version {
                found: 1,
                supported: STATE_VERSION
            })
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("version 1") && text.contains(&format!("version {STATE_VERSION}")),
        "{text}"
    );
}

#[test]
fn a_state_without_a_checksum_is_refused() {
    if !in_place_or_skip("a_state_without_a_checksum_is_refused") {
        return;
    }
    let text = json(&small().state());
    let at = text.find(",\"checksum\"").unwrap();
    let without = format!("{}}}", &text[..at]);
    let err = serde_json::from_str::<MemoryState>(&without).unwrap_err();
    assert!(err.to_string().contains("no checksum"), "{err}");
}

/// Whether two states have the same layout and map (whatever memory and files they were
/// taken of).
fn same_map(a: &MemoryState, b: &MemoryState) -> bool {
    a.strategy == b.strategy
        && a.regions.len() == b.regions.len()
        && a.regions.iter().zip(&b.regions).all(|(x, y)| {
            (x.guest, x.gmem_offset, x.gmem_size) == (y.guest, y.gmem_offset, y.gmem_size)
                && x.private == y.private
        })
}
