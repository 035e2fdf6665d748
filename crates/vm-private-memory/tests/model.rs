// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Model-based property test: random conversion sequences on real memory (two adjacent
//! regions and a hole after them), checked against a plain `Vec<bool>` after every step.

mod common;

use guest_memfd::{PageRange, PAGE_SIZE};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{MemoryBuilder, PageState, Strategy as Backing};

const A_PAGES: u64 = 96;
const B_PAGES: u64 = 64;
const PAGES: u64 = A_PAGES + B_PAGES;

#[derive(Clone, Debug)]
enum Op {
    Convert {
        first: u64,
        count: u64,
        private: bool,
    },
    Discard {
        first: u64,
        count: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Ranges may run past the end of memory (into the hole) to exercise refusals.
    let range = (0..PAGES + 8, 1..40u64);
    prop_oneof![
        4 => (range.clone(), any::<bool>()).prop_map(|((first, count), private)| Op::Convert { first, count, private }),
        1 => range.prop_map(|(first, count)| Op::Discard { first, count }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn conversions_match_a_simple_model(ops in proptest::collection::vec(op(), 1..24), dual in any::<bool>()) {
        if !common::in_place_or_skip("conversions_match_a_simple_model") {
            return Ok(());
        }
        // Dual runs on a VM that stands in for KVM's memory attributes.
        let vm: std::sync::Arc<dyn vm_private_memory::VmMemoryOps> = if dual {
            common::RecordingVm::new(common::vm())
        } else {
            common::vm()
        };
        let mut builder = MemoryBuilder::new(vm)
            .region_at(0, A_PAGES * PAGE_SIZE)
            .region_at(A_PAGES * PAGE_SIZE, B_PAGES * PAGE_SIZE)
            .initial_state(PageState::Private);
        builder = if dual {
            builder.strategy(Backing::Dual)
        } else {
            builder.strategy(Backing::InPlace)
        };
        let memory = builder.build().unwrap();
        let view = memory.guest_memory();
        let mut model = vec![true; PAGES as usize]; // true = private

        for op in ops {
            match op {
                Op::Convert { first, count, private } => {
                    let range = PageRange::from_pages(first, count).unwrap();
                    let to = if private { PageState::Private } else { PageState::Shared };
                    let result = memory.convert(range, to);
                    if first + count > PAGES {
                        prop_assert!(result.is_err(), "{range} is outside memory");
                    } else {
                        let report = result.unwrap();
                        let expected = (first..first + count)
                            .filter(|p| model[*p as usize] != private)
                            .count() as u64;
                        prop_assert_eq!(report.pages_changed, expected);
                        for p in first..first + count {
                            model[p as usize] = private;
                        }
                    }
                }
                Op::Discard { first, count } => {
                    let range = PageRange::from_pages(first, count).unwrap();
                    let result = memory.discard(range);
                    prop_assert_eq!(result.is_err(), first + count > PAGES);
                }
            }
            let mem = view.memory();
            for p in 0..PAGES {
                let state = memory.state_of(p * PAGE_SIZE).unwrap();
                prop_assert_eq!(state == PageState::Private, model[p as usize], "page {}", p);
                let readable = mem.read_obj::<u8>(GuestAddress(p * PAGE_SIZE + 7)).is_ok();
                prop_assert_eq!(readable, !model[p as usize], "host access to page {}", p);
            }
            prop_assert_eq!(memory.private_pages(), model.iter().filter(|b| **b).count() as u64);
        }
    }
}
