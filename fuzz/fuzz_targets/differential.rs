// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Random sequences of convert / discard / add_region / remove_region / `Bytes` writes
//! and reads, run on both strategies (in-place at gpa 0, dual at 1 GiB, one VM
//! each per process), each checked against a simple model.
//!
//! The model, per memory: which region slots are present; each page's state (private,
//! shared, or outside memory); each page's content as the host would see it. A shared
//! page reads what the host last wrote there, unless it was converted or discarded
//! since (then zeros); a private page is refused. Content-preserving conversion
//! (in-place only) keeps content; a region re-added on the file of a removed one keeps
//! that file's content in-place, and starts empty in the dual strategy (its shared side
//! is a new file). An access crossing regions is done region by region and stops at the
//! first piece that is outside memory or touches a private page (vm-memory's semantics).
//!
//! Invariants, after every operation: its result (success, pages changed, bytes
//! discarded, bytes read) is the model's; every page's `state_of` is the model's; the
//! host can read a page exactly when it is shared; dual: what the memory told KVM (via
//! the attribute stand-in) is the page's state. At the end of each input, every shared
//! page's content is the model's.
//!
//! Slots (in pages from the memory's base): 0 = 0..8, 1 = 8..16, 2 = 24..32, and
//! 3 = 4..12, which overlaps 0 and 1. Small, so that random operations meet often. Each input starts with slots 0 and 1, private and
//! zero.

#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use arbitrary::Arbitrary;
use guest_memfd::{GuestMemfd, PageRange, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{ContentMode, PageState, PrivateMemoryManager, Strategy};
use vm_private_memory_fuzz::{check_page, dual_memory, in_place_memory, vm, AttributesRecord};

const SLOTS: [(u64, u64); 4] = [(0, 8), (8, 8), (24, 8), (4, 8)];
const BASELINE: [usize; 2] = [0, 1];
const WINDOW_PAGES: u64 = 32;
const WINDOW: usize = (WINDOW_PAGES * PAGE_SIZE) as usize;
const PAGE: usize = PAGE_SIZE as usize;
const DUAL_BASE: u64 = 1 << 30;

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Convert {
        first: u8,
        count: u8,
        private: bool,
        preserve: bool,
    },
    Discard {
        first: u8,
        count: u8,
    },
    Add {
        slot: u8,
        shared: bool,
        reuse: bool,
    },
    Remove {
        slot: u8,
        off_by_a_page: bool,
    },
    Write {
        at: u32,
        len: u16,
        byte: u8,
    },
    Read {
        at: u32,
        len: u16,
    },
}

/// One memory under test and its model.
struct Subject {
    memory: PrivateMemoryManager,
    base: u64,
    kvm: Option<Arc<AttributesRecord>>,
    /// Per page of the window: `None` outside memory, `Some(true)` private.
    private: Vec<Option<bool>>,
    /// What the host would read, per byte of the window (for private pages: what the
    /// file holds, visible once shared with content kept).
    content: Vec<u8>,
    present: [bool; 4],
    /// Files of removed regions, with their content, newest last.
    removed: Vec<(GuestMemfd, u64, Vec<u8>)>,
}

fn subjects() -> &'static Mutex<[Subject; 2]> {
    static SUBJECTS: OnceLock<Mutex<[Subject; 2]>> = OnceLock::new();
    SUBJECTS.get_or_init(|| {
        let regions = |base: u64| -> Vec<(u64, u64)> {
            BASELINE
                .iter()
                .map(|&s| (base + SLOTS[s].0 * PAGE_SIZE, SLOTS[s].1 * PAGE_SIZE))
                .collect()
        };
        let in_place = in_place_memory(vm(), &regions(0), PageState::Private);
        // A VM of its own: both memories number their memslots from 0.
        let (dual, record) = dual_memory(
            vm(),
            &regions(DUAL_BASE),
            PageState::Private,
            DUAL_BASE,
            WINDOW_PAGES as usize,
        );
        Mutex::new([
            Subject::new(in_place, 0, None),
            Subject::new(dual, DUAL_BASE, Some(record)),
        ])
    })
}

fn range(first: u64, count: u64) -> std::ops::Range<u64> {
    first..first + count
}

impl Subject {
    fn new(memory: PrivateMemoryManager, base: u64, kvm: Option<Arc<AttributesRecord>>) -> Self {
        let mut s = Subject {
            memory,
            base,
            kvm,
            private: Vec::new(),
            content: Vec::new(),
            present: [false; 4],
            removed: Vec::new(),
        };
        for slot in BASELINE {
            s.present[slot] = true;
        }
        s
    }

    fn slot_range(&self, slot: usize) -> PageRange {
        let (first, pages) = SLOTS[slot];
        PageRange::from_pages(first, pages)
            .and_then(|r| r.checked_add(self.base))
            .unwrap()
    }

    /// Back to slots 0 and 1, private and zero, on the memory and in the model.
    fn reset(&mut self) {
        for slot in 0..SLOTS.len() {
            if self.present[slot] && !BASELINE.contains(&slot) {
                self.memory
                    .remove_region(self.slot_range(slot).start())
                    .unwrap();
                self.present[slot] = false;
            }
        }
        for slot in BASELINE {
            let range = self.slot_range(slot);
            if !self.present[slot] {
                self.memory
                    .add_region(range, None, PageState::Private)
                    .unwrap();
                self.present[slot] = true;
            }
            self.memory.convert(range, PageState::Private).unwrap();
            self.memory.discard(range).unwrap();
        }
        self.private = vec![None; WINDOW_PAGES as usize];
        for slot in BASELINE {
            let (first, pages) = SLOTS[slot];
            for p in range(first, pages) {
                self.private[p as usize] = Some(true);
            }
        }
        self.content = vec![0; WINDOW];
        self.removed.clear();
    }

    fn state(&self, page: u64) -> Option<bool> {
        self.private.get(page as usize).copied().flatten()
    }

    fn all_in_memory(&self, first: u64, count: u64) -> bool {
        range(first, count).all(|p| self.state(p).is_some())
    }

    fn zero(&mut self, first: u64, count: u64) {
        let start = (first * PAGE_SIZE) as usize;
        let end = ((first + count) * PAGE_SIZE) as usize;
        self.content[start..end.min(WINDOW)].fill(0);
    }

    /// The pieces an access of `len` bytes at window offset `at` is done in, up to the
    /// first that fails: `(offset, len)` each, and whether all of it can be done.
    fn pieces(&self, at: u64, len: u64) -> (Vec<(u64, u64)>, bool) {
        let mut pieces = Vec::new();
        let end = at + len;
        let mut cur = at;
        while cur < end {
            let Some(slot) = (0..SLOTS.len()).find(|&s| {
                self.present[s] && range(SLOTS[s].0, SLOTS[s].1).contains(&(cur / PAGE_SIZE))
            }) else {
                return (pieces, false);
            };
            let region_end = (SLOTS[slot].0 + SLOTS[slot].1) * PAGE_SIZE;
            let piece_end = end.min(region_end);
            let private = range(
                cur / PAGE_SIZE,
                (piece_end - 1) / PAGE_SIZE - cur / PAGE_SIZE + 1,
            )
            .any(|p| self.state(p) == Some(true));
            if private {
                return (pieces, false);
            }
            pieces.push((cur, piece_end - cur));
            cur = piece_end;
        }
        (pieces, true)
    }

    fn apply(&mut self, op: Op) {
        let what = format!("{} strategy, {op:?}", self.memory.strategy());
        match op {
            Op::Convert {
                first,
                count,
                private,
                preserve,
            } => {
                let (first, count) = (
                    u64::from(first) % (WINDOW_PAGES + 4),
                    u64::from(count) % 12 + 1,
                );
                let to = if private {
                    PageState::Private
                } else {
                    PageState::Shared
                };
                let mode = if preserve {
                    ContentMode::Preserve
                } else {
                    ContentMode::Discard
                };
                let gpa = PageRange::from_pages(first, count)
                    .and_then(|r| r.checked_add(self.base))
                    .unwrap();
                let result = self.memory.convert_with(gpa, to, mode);
                let allowed = !(preserve && self.memory.strategy() == Strategy::Dual);
                if allowed && self.all_in_memory(first, count) {
                    let report = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    let changed: Vec<u64> = range(first, count)
                        .filter(|&p| self.state(p) != Some(private))
                        .collect();
                    assert_eq!(report.pages_changed, changed.len() as u64, "{what}");
                    for p in changed {
                        self.private[p as usize] = Some(private);
                        if !preserve {
                            self.zero(p, 1);
                        }
                    }
                } else {
                    assert!(result.is_err(), "{what}: should be refused, got {result:?}");
                }
            }
            Op::Discard { first, count } => {
                let (first, count) = (
                    u64::from(first) % (WINDOW_PAGES + 4),
                    u64::from(count) % 12 + 1,
                );
                let gpa = PageRange::from_pages(first, count)
                    .and_then(|r| r.checked_add(self.base))
                    .unwrap();
                let result = self.memory.discard(gpa);
                if self.all_in_memory(first, count) {
                    let bytes = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(bytes, count * PAGE_SIZE, "{what}: bytes discarded");
                    self.zero(first, count);
                } else {
                    assert!(result.is_err(), "{what}: should be refused, got {result:?}");
                }
            }
            Op::Add {
                slot,
                shared,
                reuse,
            } => {
                let slot = usize::from(slot) % SLOTS.len();
                let (first, pages) = SLOTS[slot];
                let initial = if shared {
                    PageState::Shared
                } else {
                    PageState::Private
                };
                let backing = if reuse { self.removed.pop() } else { None };
                let (file, saved) = match backing {
                    Some((gmem, offset, saved)) => (Some((gmem, offset)), Some(saved)),
                    None => (None, None),
                };
                let result = self.memory.add_region(self.slot_range(slot), file, initial);
                if range(first, pages).all(|p| self.state(p).is_none()) {
                    result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    self.present[slot] = true;
                    let start = (first * PAGE_SIZE) as usize;
                    let bytes = &mut self.content[start..start + (pages * PAGE_SIZE) as usize];
                    match (saved, self.memory.strategy()) {
                        (Some(saved), Strategy::InPlace) => bytes.copy_from_slice(&saved),
                        _ => bytes.fill(0),
                    }
                    for p in range(first, pages) {
                        self.private[p as usize] = Some(!shared);
                    }
                } else {
                    assert!(result.is_err(), "{what}: should be refused, got {result:?}");
                }
            }
            Op::Remove {
                slot,
                off_by_a_page,
            } => {
                let slot = usize::from(slot) % SLOTS.len();
                let start = self.slot_range(slot).start() + u64::from(off_by_a_page) * PAGE_SIZE;
                let result = self.memory.remove_region(start);
                if self.present[slot] && !off_by_a_page {
                    let (guest, gmem, offset) = result.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(guest, self.slot_range(slot), "{what}");
                    self.present[slot] = false;
                    let (first, pages) = SLOTS[slot];
                    let start = (first * PAGE_SIZE) as usize;
                    let saved = self.content[start..start + (pages * PAGE_SIZE) as usize].to_vec();
                    self.removed.push((gmem, offset, saved));
                    if self.removed.len() > 2 {
                        self.removed.remove(0);
                    }
                    for p in range(first, pages) {
                        self.private[p as usize] = None;
                    }
                } else {
                    assert!(result.is_err(), "{what}: should be refused, got {result:?}");
                }
            }
            Op::Write { at, len, byte } => {
                let (at, len) = (
                    u64::from(at) % WINDOW as u64,
                    u64::from(len) % (3 * PAGE_SIZE) + 1,
                );
                let view = self.memory.guest_memory();
                let data = vec![byte; len as usize];
                let result = view
                    .memory()
                    .write_slice(&data, GuestAddress(self.base + at));
                let (pieces, all) = self.pieces(at, len);
                assert_eq!(result.is_ok(), all, "{what}: {result:?}");
                for (offset, n) in pieces {
                    self.content[offset as usize..(offset + n) as usize].fill(byte);
                }
            }
            Op::Read { at, len } => {
                let (at, len) = (
                    u64::from(at) % WINDOW as u64,
                    u64::from(len) % (3 * PAGE_SIZE) + 1,
                );
                let view = self.memory.guest_memory();
                let mut buf = vec![0u8; len as usize];
                let result = view
                    .memory()
                    .read_slice(&mut buf, GuestAddress(self.base + at));
                let (_, all) = self.pieces(at, len);
                assert_eq!(result.is_ok(), all, "{what}: {result:?}");
                if all {
                    assert!(
                        buf == self.content[at as usize..(at + len) as usize],
                        "{what}: read content differs from the model"
                    );
                }
            }
        }
        self.check_states(&what);
    }

    /// Every page's state, readability and (dual) KVM's view against the model.
    fn check_states(&self, what: &str) {
        let view = self.memory.guest_memory();
        let view = view.memory();
        for page in 0..WINDOW_PAGES {
            let gpa = self.base + page * PAGE_SIZE;
            let state = check_page(&self.memory, &view, gpa);
            let expected = self.state(page).map(|private| {
                if private {
                    PageState::Private
                } else {
                    PageState::Shared
                }
            });
            assert_eq!(state, expected, "{what}: page {page}");
            if let (Some(kvm), Some(private)) = (&self.kvm, self.state(page)) {
                assert_eq!(
                    kvm.is_private(gpa),
                    Some(private),
                    "{what}: KVM's view of page {page}"
                );
            }
        }
    }

    /// Every shared page's content against the model.
    fn check_content(&self) {
        let view = self.memory.guest_memory();
        let view = view.memory();
        let mut buf = vec![0u8; PAGE];
        for page in 0..WINDOW_PAGES {
            if self.state(page) == Some(false) {
                view.read_slice(&mut buf, GuestAddress(self.base + page * PAGE_SIZE))
                    .expect("a shared page is readable");
                let start = page as usize * PAGE;
                assert!(
                    buf == self.content[start..start + PAGE],
                    "{} strategy: content of page {page} differs from the model",
                    self.memory.strategy()
                );
            }
        }
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut subjects = subjects().lock().unwrap_or_else(|p| p.into_inner());
    for subject in subjects.iter_mut() {
        subject.reset();
        for &op in ops.iter().take(32) {
            subject.apply(op);
        }
        subject.check_content();
    }
});
