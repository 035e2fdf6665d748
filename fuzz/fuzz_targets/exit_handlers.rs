// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The exit handlers (`handle_map_gpa_range`, `serve_memory_fault`, `handle_hypercall`)
//! on real in-place memory on `/dev/kvm`, fed sequences of guest requests and host writes.
//!
//! Layout (one VM and one memory per process, built on the first input; every input
//! starts from all pages private and zero): region A = pages 0..64, region B = pages
//! 64..96 (adjacent, so requests cross regions), a hole at pages 96..128, region C =
//! pages 128..160.
//!
//! Invariants, after every call:
//! - the answer is what the oracle's decode implies: `-KVM_EINVAL` for a malformed
//!   request or one that leaves guest memory, `-KVM_ENOSYS` for another hypercall
//!   number, 0 (or `Ok` with `pages_changed` = pages that were in the other state)
//!   otherwise;
//! - on success every page of the range is in the state asked for, on failure no page
//!   changed;
//! - for every touched page (the range clipped to the layout, plus a page either side),
//!   the host can read it through vm-memory's `Bytes` exactly when `state_of` says
//!   shared;
//! - a page that changed from private to shared reads as zeros (`ContentMode::Discard`),
//!   whatever the host wrote there while it was shared before.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use guest_memfd::{PageRange, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{Error, PageState, PrivateMemoryManager, KVM_EINVAL, KVM_ENOSYS};
use vm_private_memory_fuzz::oracle::{self, Verdict};
use vm_private_memory_fuzz::{check_page, in_place_memory, vm, Num};

/// `(first page, pages)` of each region.
const REGIONS: [(u64, u64); 3] = [(0, 64), (64, 32), (128, 32)];
/// Pages past the last region that checks still look at.
const WINDOW_PAGES: u64 = 168;
const EINVAL: u64 = KVM_EINVAL.wrapping_neg();
const ENOSYS: u64 = KVM_ENOSYS.wrapping_neg();

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

/// Whether `[start, start + len)` lies inside the layout (regions A and B touch).
fn inside(start: u64, len: u64) -> bool {
    let (first, end) = (start / PAGE_SIZE, (start + len).div_ceil(PAGE_SIZE));
    (first < 96 && end <= 96) || (first >= 128 && end <= 160)
}

#[derive(Arbitrary, Debug)]
enum Call {
    MapGpaRange {
        gpa: Num,
        pages: Num,
        attributes: Num,
    },
    MemoryFault {
        flags: Num,
        gpa: Num,
        size: Num,
    },
    Hypercall {
        nr: Num,
        args: [Num; 3],
    },
    /// A host write of `byte` to the whole page (fails unless shared).
    HostWrite {
        page: u8,
        byte: u8,
    },
}

/// The states of every page of the window (`None`: outside memory).
fn states(memory: &PrivateMemoryManager) -> Vec<Option<PageState>> {
    (0..WINDOW_PAGES)
        .map(|p| memory.state_of(p * PAGE_SIZE))
        .collect()
}

/// Runs a guest request, checks its answer and the pages it touched.
fn request(verdict: Result<Verdict, Vec<oracle::Rule>>, run: impl FnOnce() -> Result<u64, ()>) {
    let memory = memory();
    let before = states(memory);
    let expected_ok = verdict.as_ref().is_ok_and(|v| inside(v.start, v.len));
    let result = run();
    let after = states(memory);
    let what = format!("request {verdict:?}");
    match (&verdict, result) {
        (Ok(v), Ok(pages_changed)) if expected_ok => {
            let to = if v.private {
                PageState::Private
            } else {
                PageState::Shared
            };
            let range = v.start / PAGE_SIZE..(v.start + v.len) / PAGE_SIZE;
            let mut changed = 0;
            for page in 0..WINDOW_PAGES as usize {
                if range.contains(&(page as u64)) {
                    changed += u64::from(before[page] != Some(to));
                    assert_eq!(after[page], Some(to), "{what}: page {page}");
                } else {
                    assert_eq!(after[page], before[page], "{what}: page {page} outside");
                }
            }
            if pages_changed != u64::MAX {
                assert_eq!(pages_changed, changed, "{what}: pages changed");
            }
        }
        (_, Err(())) if !expected_ok => {
            assert_eq!(after, before, "{what}: refused, yet pages changed");
        }
        (_, result) => panic!("{what}: expected success {expected_ok}, got {result:?}"),
    }
    check_touched(memory, &verdict, &before, &after);
}

/// Readability of the pages a request touched, and zeros where a page became shared.
fn check_touched(
    memory: &PrivateMemoryManager,
    verdict: &Result<Verdict, Vec<oracle::Rule>>,
    before: &[Option<PageState>],
    after: &[Option<PageState>],
) {
    let (first, end) = match verdict {
        Ok(v) => (
            (v.start / PAGE_SIZE).min(WINDOW_PAGES),
            v.start
                .saturating_add(v.len)
                .div_ceil(PAGE_SIZE)
                .min(WINDOW_PAGES),
        ),
        Err(_) => (0, 0),
    };
    let view = memory.guest_memory();
    let view = view.memory();
    for page in first.saturating_sub(1)..(end + 1).min(WINDOW_PAGES) {
        let state = check_page(memory, &view, page * PAGE_SIZE);
        let p = page as usize;
        if before[p] == Some(PageState::Private) && after[p] == Some(PageState::Shared) {
            let mut buf = vec![0xa5u8; PAGE_SIZE as usize];
            view.read_slice(&mut buf, GuestAddress(page * PAGE_SIZE))
                .expect("a shared page is readable");
            assert!(
                buf.iter().all(|&b| b == 0),
                "page {page} became shared ({state:?}) but is not empty"
            );
        }
    }
}

fn reset(memory: &PrivateMemoryManager) {
    for (first, pages) in REGIONS {
        let range = PageRange::from_pages(first, pages).unwrap();
        memory.convert(range, PageState::Private).unwrap();
        memory.discard(range).unwrap();
    }
}

fuzz_target!(|calls: Vec<Call>| {
    let memory = memory();
    reset(memory);
    for call in calls.into_iter().take(64) {
        match call {
            Call::MapGpaRange {
                gpa,
                pages,
                attributes,
            } => {
                let (gpa, pages, attributes) = (gpa.get(), pages.get(), attributes.get());
                request(
                    oracle::map_gpa_range(gpa, pages, attributes),
                    || match memory.handle_map_gpa_range(gpa, pages, attributes) {
                        0 => Ok(u64::MAX),
                        EINVAL => Err(()),
                        other => panic!("MAP_GPA_RANGE answered {other:#x}"),
                    },
                );
            }
            Call::Hypercall { nr, args } => {
                let nr = nr.get();
                let args = args.map(Num::get);
                if nr == oracle::HC_MAP_GPA_RANGE {
                    request(
                        oracle::map_gpa_range(args[0], args[1], args[2]),
                        || match memory.handle_hypercall(nr, args) {
                            0 => Ok(u64::MAX),
                            EINVAL => Err(()),
                            other => panic!("hypercall {nr} answered {other:#x}"),
                        },
                    );
                } else {
                    let before = states(memory);
                    assert_eq!(memory.handle_hypercall(nr, args), ENOSYS, "hypercall {nr}");
                    assert_eq!(states(memory), before, "hypercall {nr} changed pages");
                }
            }
            Call::MemoryFault { flags, gpa, size } => {
                let (flags, gpa, size) = (flags.get(), gpa.get(), size.get());
                let verdict = oracle::memory_fault(flags, gpa, size);
                let malformed = verdict.is_err();
                request(verdict, || {
                    match memory.serve_memory_fault(flags, gpa, size) {
                        Ok(report) => Ok(report.pages_changed),
                        Err(Error::BadRequest(_)) if malformed => Err(()),
                        Err(Error::OutsideGuestMemory { .. }) if !malformed => Err(()),
                        Err(e) => panic!("memory fault ({flags:#x}, {gpa:#x}, {size:#x}): {e}"),
                    }
                });
            }
            Call::HostWrite { page, byte } => {
                let gpa = u64::from(page) % WINDOW_PAGES * PAGE_SIZE;
                let view = memory.guest_memory();
                let written = view
                    .memory()
                    .write_slice(&[byte; PAGE_SIZE as usize], GuestAddress(gpa));
                assert_eq!(
                    written.is_ok(),
                    memory.state_of(gpa) == Some(PageState::Shared),
                    "host write to {gpa:#x}: {written:?}"
                );
            }
        }
    }
});
