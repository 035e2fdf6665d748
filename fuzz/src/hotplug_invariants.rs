// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `hotplug_and_launch` target's invariants: what a refused call must leave as it
//! was (`Snapshot`), and what holds after every operation ([`Subject::check`]).

use guest_memfd::{PageRange, PAGE_SIZE};
use kvm_bindings::kvm_userspace_memory_region2;
use vm_private_memory::{Error, PageState, GUEST_PHYS_LIMIT, X86_MMIO_HOLE};

use crate::hotplug_subject::{whole_space, Subject, MAX_RANGE_PAGES};
use crate::{check_state_of, page_map, pages_of, shared_set, state_map};

/// Everything a refused call must leave as it was (`state()` holds each region's file
/// identity, offset and size, which `backing()` reads again after every operation).
#[derive(Debug, PartialEq)]
pub(crate) struct Snapshot {
    pub(crate) regions: Vec<PageRange>,
    pub(crate) state: vm_private_memory::MemoryState,
    pub(crate) memslots: Option<Vec<kvm_userspace_memory_region2>>,
    pub(crate) pages: Vec<(u64, Option<PageState>)>,
}

impl Subject {
    /// Everything a refused call must leave as it was. The page map holds every page of
    /// every region (from `state()`), then, by `state_of`, every page of `probe` (the
    /// range an operation asked for, in memory or not; its ends and the pages either
    /// side if it is longer than `MAX_RANGE_PAGES`) and the page either side of it.
    pub(crate) fn snapshot(&self, probe: Option<PageRange>) -> Snapshot {
        let regions = self.memory.regions();
        let state = self.memory.state();
        let mut pages = state_map(&state);
        if let Some(r) = probe {
            let mut probed: Vec<u64> = if r.page_count() <= MAX_RANGE_PAGES {
                pages_of(&[r]).collect()
            } else {
                vec![r.start(), r.end() - PAGE_SIZE]
            };
            probed.extend(r.start().checked_sub(PAGE_SIZE));
            probed.extend((r.end() <= u64::MAX - PAGE_SIZE).then_some(r.end()));
            pages.extend(page_map(&self.memory, probed));
        }
        Snapshot {
            regions,
            state,
            memslots: self.config.vmm_binds.then(|| {
                self.memory
                    .memslots()
                    .expect("memslots() of VMM-bound memory")
            }),
            pages,
        }
    }

    pub(crate) fn check_unchanged(&self, what: &str, before: &Snapshot, probe: Option<PageRange>) {
        let after = self.snapshot(probe);
        assert_eq!(after.regions, before.regions, "{what}: regions changed");
        assert_eq!(after.memslots, before.memslots, "{what}: memslots changed");
        assert_eq!(after.pages, before.pages, "{what}: page states changed");
        assert_eq!(after.state, before.state, "{what}: state() changed");
    }

    /// The invariants that hold after every operation.
    pub fn check(&self, what: &str) {
        let Snapshot {
            regions,
            memslots,
            pages,
            state,
        } = self.snapshot(None);
        check_state_of(what, &self.memory, &state);
        let guests: Vec<PageRange> = self.known.iter().map(|k| k.guest).collect();
        assert_eq!(regions, guests, "{what}: regions");
        let hole = PageRange::new(X86_MMIO_HOLE.0, X86_MMIO_HOLE.1).unwrap();
        for pair in regions.windows(2) {
            assert!(pair[0].end() <= pair[1].start(), "{what}: regions {pair:?}");
        }
        for (k, r) in self.known.iter().zip(&regions) {
            assert!(r.end() <= GUEST_PHYS_LIMIT, "{what}: {r} past the limit");
            assert!(
                !(self.config.hole && hole.intersection(r).is_some()),
                "{what}: {r} in the MMIO hole"
            );
            let b = self.memory.backing(r.start()).expect("backing of a region");
            assert_eq!(
                (b.guest, b.gmem_inode, b.gmem_offset, b.gmem_size),
                (k.guest, k.inode, k.offset, k.size),
                "{what}: backing of {r}"
            );
            assert!(
                b.gmem_offset
                    .checked_add(r.len())
                    .is_some_and(|e| e <= b.gmem_size),
                "{what}: {r} reaches past its file"
            );
        }
        for (i, a) in self.known.iter().enumerate() {
            for b in &self.known[i + 1..] {
                let overlap = a.inode == b.inode
                    && a.offset < b.offset + b.guest.len()
                    && b.offset < a.offset + a.guest.len();
                assert!(
                    !overlap,
                    "{what}: {} and {} share file bytes",
                    a.guest, b.guest
                );
            }
        }
        let memslots = match memslots {
            Some(slots) => Ok(slots),
            None => self.memory.memslots(),
        };
        match (self.config.vmm_binds, memslots) {
            (true, Ok(slots)) => {
                assert_eq!(slots.len(), regions.len(), "{what}: memslots {slots:?}");
                for (slot, k) in slots.iter().zip(&self.known) {
                    assert_eq!(
                        (
                            slot.guest_phys_addr,
                            slot.memory_size,
                            slot.guest_memfd_offset
                        ),
                        (k.guest.start(), k.guest.len(), k.offset),
                        "{what}: memslot {slot:?}"
                    );
                    let last = self.config.slots.map_or(u32::MAX, |n| n - 1);
                    assert!(slot.slot <= last, "{what}: slot number {}", slot.slot);
                }
                let mut numbers: Vec<u32> = slots.iter().map(|s| s.slot).collect();
                numbers.sort_unstable();
                numbers.dedup();
                assert_eq!(numbers.len(), slots.len(), "{what}: slot numbers {slots:?}");
            }
            (false, Err(Error::MemoryBindsMemslots)) => {}
            (_, other) => panic!("{what}: memslots() gave {other:?}"),
        }
        let shared = shared_set(&self.memory);
        for l in &self.listeners {
            l.check(what, &shared, whole_space(), self.exact);
        }
        if let Some(record) = &self.record {
            let gpas: Vec<u64> = pages.iter().map(|&(gpa, _)| gpa).collect();
            for ((gpa, state), private) in pages.into_iter().zip(record.are_private(&gpas)) {
                if let Some(private) = private {
                    assert_eq!(
                        private,
                        state == Some(PageState::Private),
                        "{what}: KVM's view of {gpa:#x} ({state:?})"
                    );
                }
            }
        }
    }
}
