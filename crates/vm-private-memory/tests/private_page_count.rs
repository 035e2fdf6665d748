// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A region's count of private pages follows its bits through every kind of
//! conversion and rollback: host accesses to a region whose count is zero skip the
//! bits, so a count that reached zero with a private page left would serve it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{pr, vm};
use guest_memfd::{PageRange, PAGE_SIZE};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vm_private_memory::{MemoryBuilder, MemoryListener, PageState, Strategy};

/// Refuses to take pages back (`populate`) while told to: conversions to shared roll
/// back.
struct Refuser {
    refuse: AtomicBool,
}

impl MemoryListener for Refuser {
    fn discard(&self, _: PageRange) {}

    fn populate(&self, _: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if self.refuse.load(Ordering::Relaxed) {
            Err("refused".into())
        } else {
            Ok(())
        }
    }
}

const REGION: u64 = 4 << 20;
const PAGES: u64 = REGION / PAGE_SIZE;
/// The second region's start, right after the first.
const SECOND: u64 = REGION;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Conversions both ways, of one run (the direct path) or several regions (the
    /// plan), rolled back by a listener that refuses or by a slice held across a
    /// conversion to private: after each, every region's count is zero exactly when its
    /// bits hold no private page, and a read is served exactly where the page is shared.
    #[test]
    fn the_private_page_count_follows_the_bits_through_conversions_and_rollbacks(
        ops in proptest::collection::vec((0u64..3, 0u64..PAGES, 1u64..300, any::<bool>(), 0u8..4), 1..20),
    ) {
        let memory = MemoryBuilder::new(vm())
            .region_at(0, REGION)
            .region_at(SECOND, REGION)
            .strategy(Strategy::InPlace)
            .initial_state(PageState::Shared)
            .access_patience(Duration::from_millis(1))
            .build()
            .unwrap();
        let refuser = Arc::new(Refuser { refuse: AtomicBool::new(false) });
        let _subscription = memory.subscribe(pr(0, SECOND + REGION), refuser.clone());
        let view = memory.guest_memory();
        let mem = view.memory();
        for (which, first, count, private, twist) in ops {
            let count = count.min(PAGES - first);
            // Region 0, region 1, or a range across both.
            let range = match which {
                0 => pr(first * PAGE_SIZE, count * PAGE_SIZE),
                1 => pr(SECOND + first * PAGE_SIZE, count * PAGE_SIZE),
                _ => pr(REGION - (first % 64 + 1) * PAGE_SIZE, (first % 64 + 1 + count % 64) * PAGE_SIZE),
            };
            let to = if private { PageState::Private } else { PageState::Shared };
            refuser.refuse.store(twist == 1, Ordering::Relaxed);
            let held = (twist == 2)
                .then(|| mem.get_slice(GuestAddress(range.start()), 8).ok())
                .flatten();
            let _ = memory.convert(range, to);
            drop(held);
            refuser.refuse.store(false, Ordering::Relaxed);
            if twist == 3 {
                let _ = memory.convert(pr(range.start(), PAGE_SIZE), to.flipped());
            }
            for region in mem.iter() {
                prop_assert_eq!(region.all_shared(), region.attributes().count_private() == 0);
            }
            for gpa in (0..REGION).chain(SECOND..SECOND + REGION).step_by(7 * PAGE_SIZE as usize) {
                prop_assert_eq!(
                    mem.read_obj::<u64>(GuestAddress(gpa)).is_ok(),
                    memory.state_of(gpa) == Some(PageState::Shared),
                    "gpa {:#x}", gpa
                );
            }
        }
    }
}
