//! Saving and restoring the layout and the private/shared map.

mod common;

use common::{in_place_or_skip, pr, vm};
use guest_memfd::PAGE_SIZE;
use proptest::prelude::*;
use vm_private_memory::{Error, MemoryBuilder, MemoryState, PageRun, PageState, PrivateMemory};

const MIB2: u64 = 2 << 20;

fn source() -> PrivateMemory {
    let m = MemoryBuilder::new(vm())
        .region_at(0, MIB2)
        .region_at(4 << 30, MIB2)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    m.convert(pr(PAGE_SIZE, 3 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    m.convert(pr(4 << 30, MIB2), PageState::Shared).unwrap();
    m.convert(pr((4 << 30) + 8 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    m
}

fn states(m: &PrivateMemory) -> Vec<PageState> {
    m.regions()
        .iter()
        .flat_map(|r| (0..r.page_count()).map(move |p| r.start() + p * PAGE_SIZE))
        .map(|a| m.state_of(a).unwrap())
        .collect()
}

#[test]
fn state_round_trips_through_json_into_fresh_memory() {
    if !in_place_or_skip("state_round_trips_through_json_into_fresh_memory") {
        return;
    }
    let m = source();
    let state = m.state();
    assert_eq!(
        state.regions[0].private,
        vec![
            PageRun { first: 0, count: 1 },
            PageRun {
                first: 4,
                count: 508
            }
        ]
    );
    assert_eq!(
        state.regions[1].private,
        vec![PageRun { first: 8, count: 1 }]
    );
    let json = serde_json::to_string(&state).unwrap();
    let back: MemoryState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);

    let fresh = back.builder(vm()).build().unwrap();
    assert_ne!(states(&fresh), states(&m));
    fresh.restore_state(&back).unwrap();
    assert_eq!(states(&fresh), states(&m));
    assert_eq!(fresh.state(), state);
}

#[test]
fn corrupted_or_mismatched_states_are_errors() {
    if !in_place_or_skip("corrupted_or_mismatched_states_are_errors") {
        return;
    }
    let m = source();
    let good = m.state();
    let before = states(&m);
    let mut cases: Vec<(MemoryState, &str)> = Vec::new();
    let mut s = good.clone();
    s.version = 99;
    cases.push((s, "version"));
    let mut s = good.clone();
    s.strategy = match s.strategy {
        vm_private_memory::Strategy::InPlace => vm_private_memory::Strategy::Dual,
        vm_private_memory::Strategy::Dual => vm_private_memory::Strategy::InPlace,
    };
    cases.push((s, "strategy"));
    let mut s = good.clone();
    s.regions.pop();
    cases.push((s, "regions"));
    let mut s = good.clone();
    s.regions[1].gmem_size *= 2;
    cases.push((s, "does not match"));
    let mut s = good.clone();
    s.regions[1].guest = pr(8 << 30, MIB2);
    cases.push((s, "does not match"));
    let mut s = good.clone();
    s.regions[0].private = vec![
        PageRun { first: 4, count: 2 },
        PageRun { first: 5, count: 1 },
    ];
    cases.push((s, "overlapping"));
    let mut s = good.clone();
    s.regions[0].private = vec![PageRun {
        first: 500,
        count: 100,
    }];
    cases.push((s, "past the region"));
    let mut s = good.clone();
    s.regions[0].private = vec![PageRun {
        first: u64::MAX,
        count: 2,
    }];
    cases.push((s, "past the region"));
    let mut s = good.clone();
    s.regions[0].private = vec![PageRun { first: 3, count: 0 }];
    cases.push((s, "empty"));
    for (state, needle) in cases {
        match m.restore_state(&state) {
            Err(Error::StateMismatch(why)) => assert!(why.contains(needle), "{needle}: {why}"),
            other => panic!("{needle}: {other:?}"),
        }
        assert_eq!(states(&m), before, "{needle}: nothing changed");
    }
    // Malformed documents do not even deserialize.
    let json = serde_json::to_string(&good).unwrap();
    for bad in [
        json.replacen("\"start\":0", "\"start\":1", 1),
        json.replacen("\"len\":2097152", "\"len\":0", 1),
        json.replacen("in-place", "sideways", 1),
        "{}".to_string(),
        "[1,2,3]".to_string(),
    ] {
        assert!(serde_json::from_str::<MemoryState>(&bad).is_err(), "{bad}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Arbitrary runs never panic: they restore exactly, or are refused and change nothing.
    #[test]
    fn arbitrary_runs_restore_or_are_refused(runs in proptest::collection::vec((0u64..600, 0u64..80), 0..6)) {
        if !in_place_or_skip("arbitrary_runs_restore_or_are_refused") {
            return Ok(());
        }
        let m = MemoryBuilder::new(vm()).region_at(0, MIB2).build().unwrap();
        let mut state = m.state();
        state.regions[0].private = runs.iter().map(|&(first, count)| PageRun { first, count }).collect();
        let before = states(&m);
        match m.restore_state(&state) {
            Ok(()) => {
                let expected: Vec<PageState> = (0..512u64)
                    .map(|p| {
                        if runs.iter().any(|&(first, count)| p >= first && p < first + count) {
                            PageState::Private
                        } else {
                            PageState::Shared
                        }
                    })
                    .collect();
                prop_assert_eq!(states(&m), expected);
            }
            Err(_) => prop_assert_eq!(states(&m), before),
        }
    }
}
