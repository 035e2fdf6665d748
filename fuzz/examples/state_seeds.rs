// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Writes `state()` outputs of memory laid out like the `state_restore` target's into a
//! corpus folder, as seeds: `cargo run --example state_seeds [-- DIR]` (from `fuzz/`;
//! default `corpus/state_restore`). Run it again when `MemoryState`'s encoding changes.

use std::path::PathBuf;

use guest_memfd::{PageRange, PAGE_SIZE};
use vm_private_memory::PageState;
use vm_private_memory_fuzz::{in_place_memory, vm};

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "corpus/state_restore".into()),
    );
    std::fs::create_dir_all(&dir).expect("the corpus folder");
    // The target's layout: 32 pages at 0 and 32 pages at 64 pages.
    let memory = in_place_memory(
        vm(),
        &[(0, 32 * PAGE_SIZE), (64 * PAGE_SIZE, 32 * PAGE_SIZE)],
        PageState::Private,
    );
    let pages = |first: u64, count: u64| PageRange::from_pages(first, count).unwrap();
    // Maps reached by a few conversions each: all private, the baseline, all shared,
    // alternating pages, the edges of each region.
    let steps: [&[(u64, u64, PageState)]; 6] = [
        &[],
        &[(4, 4, PageState::Shared), (64, 16, PageState::Shared)],
        &[(0, 32, PageState::Shared), (64, 32, PageState::Shared)],
        &[(0, 32, PageState::Shared), (64, 32, PageState::Shared)],
        &[
            (0, 1, PageState::Shared),
            (31, 1, PageState::Shared),
            (95, 1, PageState::Shared),
        ],
        &[(0, 32, PageState::Shared), (64, 1, PageState::Shared)],
    ];
    for (i, step) in steps.iter().enumerate() {
        memory.convert(pages(0, 32), PageState::Private).unwrap();
        memory.convert(pages(64, 32), PageState::Private).unwrap();
        for &(first, count, to) in step.iter() {
            memory.convert(pages(first, count), to).unwrap();
        }
        if i == 3 {
            for p in (0..32).step_by(2).chain((64..96).step_by(2)) {
                memory.convert(pages(p, 1), PageState::Private).unwrap();
            }
        }
        let json = serde_json::to_vec(&memory.state()).unwrap();
        std::fs::write(dir.join(format!("state-{i}.json")), json).unwrap();
    }
    println!("wrote {} seeds into {}", steps.len(), dir.display());
}
