// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The mapper's bookkeeping on real in-place guest memory (`/dev/kvm`), against an IOMMU
//! stand-in that records every call, checks them as the type1 IOMMU would, and fails on
//! request. The lab runs the same mapper against a real IOMMU and device.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use guest_memfd::{PageRange, PAGE_SIZE};
use vfio_ioctls::{VfioError, VfioOps};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vm_private_memory::{
    Error, GuestMemoryPrivate, ListenerRefusal, MemoryBuilder, PageState, PrivateMemoryManager,
    Strategy,
};
use vm_private_memory_vfio::{DmaMapper, Error as MapperError};
use vmm_sys_util::errno;

/// How many times the panic hook ran on this thread (a counting hook in front of the
/// default one, installed on first use).
fn panic_hooks_run_on_this_thread() -> usize {
    use std::cell::Cell;
    thread_local! {
        static RUN: Cell<usize> = const { Cell::new(0) };
    }
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            RUN.with(|r| r.set(r.get() + 1));
            default(info);
        }));
    });
    RUN.with(Cell::get)
}

fn pr(start: u64, len: u64) -> PageRange {
    PageRange::new(start, len).unwrap()
}

const MIB2: u64 = 2 << 20;

/// An IOMMU that records mappings like type1v2: a map may not overlap one held, an unmap
/// must name a whole mapping. Each unmap also records the page's state in the memory at
/// that moment, to show that it came before the bits changed.
#[derive(Default)]
struct RecordingIommu {
    /// IOVA -> (size, host address).
    mappings: Mutex<BTreeMap<u64, (usize, usize)>>,
    maps: Mutex<usize>,
    /// Fail the map of this IOVA.
    fail_map: Mutex<Option<u64>>,
    /// Fail every unmap.
    fail_unmap: Mutex<bool>,
    view: Mutex<Option<GuestMemoryAtomic<GuestMemoryPrivate>>>,
    states_at_unmap: Mutex<Vec<(u64, Option<PageState>)>>,
}

impl VfioOps for RecordingIommu {
    unsafe fn vfio_dma_map(
        &self,
        iova: u64,
        size: usize,
        user_addr: *mut u8,
    ) -> vfio_ioctls::Result<()> {
        if *self.fail_map.lock().unwrap() == Some(iova) {
            return Err(VfioError::IommuDmaMap(errno::Error::new(libc::ENOMEM)));
        }
        let mut mappings = self.mappings.lock().unwrap();
        let overlaps = mappings
            .range(..iova + size as u64)
            .next_back()
            .is_some_and(|(start, (len, _))| start + *len as u64 > iova);
        assert!(!overlaps, "map of {iova:#x} overlaps a mapping");
        mappings.insert(iova, (size, user_addr as usize));
        *self.maps.lock().unwrap() += 1;
        Ok(())
    }

    fn vfio_dma_unmap(&self, iova: u64, size: usize) -> vfio_ioctls::Result<()> {
        if *self.fail_unmap.lock().unwrap() {
            return Err(VfioError::IommuDmaUnmap(errno::Error::new(libc::EIO)));
        }
        if let Some(view) = &*self.view.lock().unwrap() {
            let mem = view.memory();
            let state = mem
                .iter()
                .find(|r| r.guest_range().start() <= iova && iova < r.guest_range().end())
                .and_then(|r| r.state_at(iova - r.guest_range().start()));
            self.states_at_unmap.lock().unwrap().push((iova, state));
        }
        let mut mappings = self.mappings.lock().unwrap();
        match mappings.get(&iova) {
            // As type1: nothing mapped there unmaps 0 bytes, which vfio-ioctls reports.
            None => return Err(VfioError::InvalidDmaUnmapSize),
            Some((len, _)) => assert_eq!(*len, size, "unmap of {iova:#x} cuts a mapping"),
        }
        mappings.remove(&iova);
        Ok(())
    }
}

impl RecordingIommu {
    fn mapped(&self) -> Vec<u64> {
        self.mappings.lock().unwrap().keys().copied().collect()
    }
}

/// In-place memory, on real KVM where the host has it, else on the stand-in for KVM
/// (`guest_memfd::stand_in`): the mapper's logic is the same on both.
fn in_place_or_skip(test: &str) -> Option<PrivateMemoryManager> {
    let vm = guest_memfd::stand_in::vm_for_logic_tests();
    if !guest_memfd::Capabilities::of_vm(&*vm).in_place_capable() {
        println!(
            "SKIPPED {test}: needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))"
        );
        return None;
    }
    Some(
        MemoryBuilder::new(vm)
            .region_at(0, MIB2)
            .region_at(4 * MIB2, MIB2)
            .strategy(Strategy::InPlace)
            .initial_state(PageState::Private)
            .build()
            .unwrap(),
    )
}

fn pages(range: PageRange) -> impl Iterator<Item = u64> {
    (0..range.page_count()).map(move |p| range.start() + p * PAGE_SIZE)
}

/// The pages of `memory` that are shared now.
fn shared_pages(memory: &PrivateMemoryManager) -> Vec<u64> {
    let snapshot = memory.shared_pages().snapshot();
    snapshot
        .runs(pr(0, 5 * MIB2))
        .flat_map(|run| pages(run.guest_range()))
        .collect()
}

/// A recording IOMMU watching `memory`, and a mapper for it.
fn setup(memory: &PrivateMemoryManager) -> (Arc<RecordingIommu>, DmaMapper) {
    let iommu = Arc::new(RecordingIommu::default());
    *iommu.view.lock().unwrap() = Some(memory.guest_memory());
    let mapper = DmaMapper::new(iommu.clone());
    (iommu, mapper)
}

#[test]
fn attaching_maps_exactly_the_pages_shared_now_each_at_its_guest_address() {
    let Some(m) =
        in_place_or_skip("attaching_maps_exactly_the_pages_shared_now_each_at_its_guest_address")
    else {
        return;
    };
    m.convert(pr(3 * PAGE_SIZE, 3 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    m.convert(pr(4 * MIB2, PAGE_SIZE), PageState::Shared)
        .unwrap();
    let (iommu, mapper) = setup(&m);
    let _dma = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    assert_eq!(iommu.mapped(), shared_pages(&m));
    assert_eq!(iommu.mapped(), [0x3000, 0x4000, 0x5000, 4 * MIB2]);
    // Each page at its own host address in the region's mapping.
    let snapshot = m.shared_pages().snapshot();
    let run = snapshot.runs(pr(0, MIB2)).next().unwrap();
    let host = run.host_address() as usize;
    let mappings = iommu.mappings.lock().unwrap();
    assert_eq!(
        mappings[&0x4000],
        (PAGE_SIZE as usize, host + PAGE_SIZE as usize)
    );
}

#[test]
fn conversions_are_followed_and_pages_are_unmapped_before_they_turn_private() {
    let Some(m) = in_place_or_skip(
        "conversions_are_followed_and_pages_are_unmapped_before_they_turn_private",
    ) else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let mapper = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    assert!(iommu.mapped().is_empty());
    let window = pr(16 * PAGE_SIZE, 8 * PAGE_SIZE);
    m.convert(window, PageState::Shared).unwrap();
    assert_eq!(iommu.mapped(), pages(window).collect::<Vec<_>>());
    // Part of the window goes private: exactly its pages are unmapped, while they were
    // still shared; the rest stays mapped throughout (never unmapped).
    let part = pr(18 * PAGE_SIZE, 2 * PAGE_SIZE);
    m.convert(part, PageState::Private).unwrap();
    assert_eq!(
        *iommu.states_at_unmap.lock().unwrap(),
        pages(part)
            .map(|p| (p, Some(PageState::Shared)))
            .collect::<Vec<_>>()
    );
    assert_eq!(iommu.mapped(), shared_pages(&m));
    assert!(!mapper.is_mapped(part.start()) && mapper.is_mapped(window.start()));
    // Freeing pages (discard) unmaps them too; they stay shared and are mapped again
    // only when offered again.
    m.discard(pr(16 * PAGE_SIZE, PAGE_SIZE)).unwrap();
    assert!(!mapper.is_mapped(16 * PAGE_SIZE));
}

#[test]
fn a_mapping_the_iommu_refuses_rolls_the_conversion_back_with_nothing_left_mapped() {
    let Some(m) = in_place_or_skip(
        "a_mapping_the_iommu_refuses_rolls_the_conversion_back_with_nothing_left_mapped",
    ) else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let mapper = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap();
    *iommu.fail_map.lock().unwrap() = Some(12 * PAGE_SIZE);
    let err = m
        .convert(pr(8 * PAGE_SIZE, 8 * PAGE_SIZE), PageState::Shared)
        .unwrap_err();
    let Error::ListenerRefused {
        reason: ListenerRefusal::Refused(reason),
        ..
    } = &err
    else {
        panic!("{err}");
    };
    let reason = reason
        .downcast_ref::<MapperError>()
        .expect("the mapper's error");
    assert!(
        matches!(reason, MapperError::Map { iova: 0xc000, .. }),
        "{reason}"
    );
    assert!(err.to_string().contains("0xc000"), "{err}");
    // Rolled back: the pages are private again and none of them is mapped.
    assert_eq!(m.state_of(8 * PAGE_SIZE), Some(PageState::Private));
    assert_eq!(iommu.mapped(), [0]);
    assert_eq!(mapper.mapped_pages(), 1);
    *iommu.fail_map.lock().unwrap() = None;
    m.convert(pr(8 * PAGE_SIZE, 8 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(iommu.mapped(), shared_pages(&m));
}

#[test]
fn a_conversion_past_the_mapping_budget_is_refused_whole() {
    let Some(m) = in_place_or_skip("a_conversion_past_the_mapping_budget_is_refused_whole") else {
        return;
    };
    let iommu = Arc::new(RecordingIommu::default());
    let mapper = DmaMapper::new(iommu.clone())
        .with_budget(10)
        .attach(&m, pr(0, 5 * MIB2))
        .unwrap();
    m.convert(pr(0, 6 * PAGE_SIZE), PageState::Shared).unwrap();
    let maps_before = *iommu.maps.lock().unwrap();
    let err = m
        .convert(pr(MIB2 - 5 * PAGE_SIZE, 5 * PAGE_SIZE), PageState::Shared)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("needs 5 more IOMMU mappings, but 6 of a budget of 10"),
        "{err}"
    );
    assert_eq!(
        *iommu.maps.lock().unwrap(),
        maps_before,
        "nothing was tried"
    );
    assert_eq!(m.state_of(MIB2 - PAGE_SIZE), Some(PageState::Private));
    // Exactly up to the budget is fine.
    m.convert(pr(MIB2 - 4 * PAGE_SIZE, 4 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(mapper.mapped_pages(), 10);
    // Attaching where more is shared than the budget allows fails and maps nothing.
    let other = Arc::new(RecordingIommu::default());
    let err = DmaMapper::new(other.clone())
        .with_budget(3)
        .attach(&m, pr(0, 5 * MIB2))
        .unwrap_err();
    assert!(matches!(err, Error::ListenerRefused { .. }), "{err}");
    assert_eq!(*other.maps.lock().unwrap(), 0);
    assert_eq!(m.listener_count(), 1, "only the first mapper is subscribed");
}

#[test]
fn an_unmap_the_iommu_refuses_stops_the_conversion_and_the_page_stays_shared() {
    let Some(m) = in_place_or_skip(
        "an_unmap_the_iommu_refuses_stops_the_conversion_and_the_page_stays_shared",
    ) else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let _dma = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    m.convert(pr(0, 2 * PAGE_SIZE), PageState::Shared).unwrap();
    *iommu.fail_unmap.lock().unwrap() = true;
    let hooks_before = panic_hooks_run_on_this_thread();
    let err = m
        .convert(pr(0, 2 * PAGE_SIZE), PageState::Private)
        .unwrap_err();
    // Refused without a panic report: a guest converting the page again and again must
    // not fill the log.
    assert_eq!(panic_hooks_run_on_this_thread(), hooks_before);
    assert!(
        matches!(
            err,
            Error::ListenerRefused {
                reason: ListenerRefusal::Panicked { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("refused to unmap guest page 0x0"),
        "{err}"
    );
    // Never a private page left mapped: the pages are shared and mapped, as before.
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    assert_eq!(iommu.mapped(), [0, PAGE_SIZE]);
    *iommu.fail_unmap.lock().unwrap() = false;
    m.convert(pr(0, 2 * PAGE_SIZE), PageState::Private).unwrap();
    assert!(iommu.mapped().is_empty());
}

#[test]
fn removing_a_region_or_dropping_the_attachment_unmaps_its_pages() {
    let Some(m) = in_place_or_skip("removing_a_region_or_dropping_the_attachment_unmaps_its_pages")
    else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let dma = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    m.convert(pr(0, 2 * PAGE_SIZE), PageState::Shared).unwrap();
    m.convert(pr(4 * MIB2, 2 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    m.remove_region(4 * MIB2).unwrap();
    assert_eq!(iommu.mapped(), [0, PAGE_SIZE]);
    // Dropping the attachment unmaps everything, then stops following: later
    // conversions map nothing.
    drop(dma);
    assert!(iommu.mapped().is_empty());
    assert_eq!(m.listener_count(), 0);
    m.convert(pr(8 * PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert!(iommu.mapped().is_empty());
}

#[test]
fn a_region_added_shared_is_mapped_as_it_is_added() {
    let Some(m) = in_place_or_skip("a_region_added_shared_is_mapped_as_it_is_added") else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let dma = mapper.attach(&m, pr(0, 16 * MIB2)).unwrap();
    let added = pr(8 * MIB2, 4 * PAGE_SIZE);
    m.add_region(added, None, PageState::Shared).unwrap();
    assert_eq!(iommu.mapped(), pages(added).collect::<Vec<_>>());
    // Over the budget, the addition fails and nothing of it stays mapped.
    let (iommu, mapper) = setup(&m);
    drop(dma);
    let _dma = mapper.with_budget(6).attach(&m, pr(0, 16 * MIB2)).unwrap();
    assert_eq!(iommu.mapped().len(), 4);
    assert!(m
        .add_region(pr(12 * MIB2, 4 * PAGE_SIZE), None, PageState::Shared)
        .is_err());
    assert_eq!(m.state_of(12 * MIB2), None);
    assert_eq!(iommu.mapped(), pages(added).collect::<Vec<_>>());
}

/// A random walk of conversions and discards: after every step the IOMMU maps exactly
/// the shared pages.
#[test]
fn the_iommu_maps_exactly_the_shared_pages_after_any_sequence() {
    let Some(m) = in_place_or_skip("the_iommu_maps_exactly_the_shared_pages_after_any_sequence")
    else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let _dma = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    // The model: a page is mapped from the conversion that makes it shared until one
    // makes it private or frees it (a freed page stays shared, but is mapped again only
    // when offered again).
    let mut model = std::collections::BTreeSet::new();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..2000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let base = if seed & 1 == 0 { 0 } else { 4 * MIB2 };
        let first = (seed >> 8) % 48;
        let count = 1 + (seed >> 16) % 8;
        let range = pr(base + first * PAGE_SIZE, count * PAGE_SIZE);
        match (seed >> 24) % 3 {
            0 => {
                for page in pages(range) {
                    if m.state_of(page) == Some(PageState::Private) {
                        model.insert(page);
                    }
                }
                m.convert(range, PageState::Shared).unwrap();
            }
            1 => {
                m.convert(range, PageState::Private).unwrap();
                pages(range).for_each(|p| {
                    model.remove(&p);
                });
            }
            _ => {
                m.discard(range).unwrap();
                pages(range).for_each(|p| {
                    model.remove(&p);
                });
            }
        }
        assert_eq!(iommu.mapped(), model.iter().copied().collect::<Vec<_>>());
        for page in iommu.mapped() {
            assert_eq!(
                m.state_of(page),
                Some(PageState::Shared),
                "{page:#x} mapped while private"
            );
        }
    }
}

#[test]
fn a_page_the_iommu_no_longer_maps_can_still_go_private() {
    let Some(m) = in_place_or_skip("a_page_the_iommu_no_longer_maps_can_still_go_private") else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let dma = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    m.convert(pr(0, 2 * PAGE_SIZE), PageState::Shared).unwrap();
    // The VMM (or the device leaving its container) unmapped page 0 behind the mapper.
    iommu.vfio_dma_unmap(0, PAGE_SIZE as usize).unwrap();
    m.convert(pr(0, 2 * PAGE_SIZE), PageState::Private).unwrap();
    assert!(iommu.mapped().is_empty());
    assert_eq!(dma.mapped_pages(), 0);
}

/// A map fails part way and taking back what was mapped fails too: the pages must not
/// turn private while mapped, so the conversion is accepted with the pages it could not
/// map left unmapped (shared, out of the device's reach).
#[test]
fn a_take_back_the_iommu_refuses_leaves_the_pages_shared_not_private_and_mapped() {
    let Some(m) = in_place_or_skip(
        "a_take_back_the_iommu_refuses_leaves_the_pages_shared_not_private_and_mapped",
    ) else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let dma = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    *iommu.fail_map.lock().unwrap() = Some(3 * PAGE_SIZE);
    *iommu.fail_unmap.lock().unwrap() = true;
    m.convert(pr(0, 6 * PAGE_SIZE), PageState::Shared).unwrap();
    for page in iommu.mapped() {
        assert_eq!(m.state_of(page), Some(PageState::Shared), "{page:#x}");
    }
    assert!(dma.is_mapped(0) && !dma.is_mapped(3 * PAGE_SIZE));
}

#[test]
fn a_detach_the_iommu_refuses_keeps_following_so_the_page_cannot_go_private() {
    let Some(m) = in_place_or_skip(
        "a_detach_the_iommu_refuses_keeps_following_so_the_page_cannot_go_private",
    ) else {
        return;
    };
    let (iommu, mapper) = setup(&m);
    let dma = mapper.attach(&m, pr(0, 5 * MIB2)).unwrap();
    m.convert(pr(0, PAGE_SIZE), PageState::Shared).unwrap();
    *iommu.fail_unmap.lock().unwrap() = true;
    let err = dma.detach().unwrap_err();
    assert!(
        err.to_string().contains("refused to unmap guest page 0x0"),
        "{err}"
    );
    // Still subscribed: the page still mapped cannot turn private.
    assert_eq!(m.listener_count(), 1);
    assert!(m.convert(pr(0, PAGE_SIZE), PageState::Private).is_err());
    assert_eq!(m.state_of(0), Some(PageState::Shared));
    // A mapper that let go maps nothing more.
    *iommu.fail_unmap.lock().unwrap() = false;
    m.convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(iommu.mapped(), [0]);
}

#[test]
fn a_mapper_follows_memory_that_tracks_host_writes() {
    let vm = guest_memfd::stand_in::vm_for_logic_tests();
    let m = MemoryBuilder::new(vm)
        .region_at(0, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build_with_bitmap::<vm_memory::bitmap::AtomicBitmap>()
        .unwrap();
    m.convert(pr(2 * PAGE_SIZE, 2 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    let iommu = Arc::new(RecordingIommu::default());
    let _dma = DmaMapper::new(iommu.clone())
        .attach(&m, pr(0, MIB2))
        .unwrap();
    assert_eq!(iommu.mapped(), [0x2000, 0x3000]);
    m.convert(pr(3 * PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    m.convert(pr(8 * PAGE_SIZE, PAGE_SIZE), PageState::Shared)
        .unwrap();
    assert_eq!(iommu.mapped(), [0x2000, 0x8000]);
}
