// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The mapper against a real IOMMU and a real DMA engine: QEMU's `edu` PCI device behind
//! the nested lab's emulated Intel IOMMU, bound to vfio-pci, opened through both of
//! vfio-ioctls' IOMMU back ends (the VFIO container with type1v2, and iommufd with the
//! VFIO device cdev), on dual-strategy memory with KVM's memory attributes.
//!
//! edu copies between its 4 KiB internal buffer (at device address 0x40000) and an IOVA.
//! It reports no error for a DMA to an IOVA the IOMMU does not map (the IOMMU drops the
//! write and logs a DMAR fault), so these tests judge by where the bytes went.
//!
//! Where the host has no edu device bound to vfio-pci, or no VM type with memory
//! attributes, each test prints a SKIPPED line naming what is missing and returns; the
//! lab (`fixtures/lab/run.sh`) has both. The measurement test prints `DMA-PIN` and
//! `DMA-COST` lines: figures, not assertions, except that what our mapper pins stays
//! within what the shared side holds.

mod edu;

use edu::*;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use guest_memfd::{PageRange, PAGE_SIZE};
use vfio_ioctls::VfioContainer;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vm_private_memory::{Error, ListenerRefusal, PageState, PrivateMemoryManager};
use vm_private_memory_vfio::{DmaMapper, Error as MapperError};

/// The whole check on one back end (see `edu_dma_follows_conversions_on_both_iommu_back_ends`).
fn dma_follows_conversions(backend: Backend, sysfs: &Path) {
    let name = backend.name();
    let size = 8 * MIB;
    let memory = dual_memory(size);
    let (iommu, edu) = backend.open(sysfs);

    let mapper = DmaMapper::new(iommu.clone())
        .attach(&memory, pr(0, size))
        .unwrap();
    assert_eq!(mapper.mapped_pages(), 0, "all private: nothing mapped");

    let window = pr(MIB, MIB);
    memory.convert(window, PageState::Shared).unwrap();
    assert_eq!(mapper.mapped_pages(), 256);
    let source = window.start() + 3 * PAGE_SIZE;
    let target = window.start() + 128 * PAGE_SIZE;
    assert!(mapper.is_mapped(source) && mapper.is_mapped(target));

    // RAM -> edu from one shared page, edu -> RAM into another.
    let view = memory.guest_memory();
    let first = pattern(0x11);
    view.memory()
        .write_slice(&first, GuestAddress(source))
        .unwrap();
    edu.ram_to_edu(source);
    edu.edu_to_ram(target);
    let page = read_page(&memory, target);
    assert_eq!(
        &page[..TRANSFER],
        &first[..],
        "{name}: the DMA reached the page"
    );
    assert!(page[TRANSFER..].iter().all(|&b| b == 0));
    println!(
        "EDU {name}: {TRANSFER} bytes RAM {source:#x} -> edu -> RAM {target:#x} through the mapper"
    );

    // The target turns private: unmapped before `convert` returns.
    let target_page = pr(target, PAGE_SIZE);
    memory.convert(target_page, PageState::Private).unwrap();
    assert!(!mapper.is_mapped(target), "{name}: unmapped once private");
    assert_eq!(mapper.mapped_pages(), 255);
    // The IOMMU itself holds no mapping there any more: unmapping it again is refused
    // (type1: nothing unmapped; iommufd: ENOENT).
    assert!(
        iommu.vfio_dma_unmap(target, PAGE_SIZE as usize).is_err(),
        "{name}: the IOMMU no longer maps the private page"
    );

    // A DMA into it lands nowhere: not in the shared side, not in another page.
    let second = pattern(0x5c);
    view.memory()
        .write_slice(&second, GuestAddress(source))
        .unwrap();
    edu.ram_to_edu(source);
    let held = shared_bytes_held(&memory);
    let mut log = KernelLog::from_now();
    edu.edu_to_ram(target);
    assert_eq!(
        shared_bytes_held(&memory),
        held,
        "{name}: the DMA into a private page did not grow the shared side"
    );
    for page in (0..window.page_count()).map(|p| window.start() + p * PAGE_SIZE) {
        if page != target && page != source {
            assert_ne!(
                &read_page(&memory, page)[..TRANSFER],
                &second[..],
                "{name}: the DMA into the private page landed at {page:#x}"
            );
        }
    }
    // The IOMMU's fault record, if the kernel logged one by now (informational).
    std::thread::sleep(Duration::from_millis(50));
    match log.dmar_records() {
        Some(records) if !records.is_empty() => {
            println!("EDU {name}: kernel log after the DMA into the private page: {records:?}")
        }
        Some(_) => println!("EDU {name}: no DMAR record in the kernel log yet"),
        None => println!("EDU {name}: /dev/kmsg unreadable"),
    }

    // Back to shared: it arrives empty, not with the pattern, and is mapped again.
    memory.convert(target_page, PageState::Shared).unwrap();
    assert!(mapper.is_mapped(target));
    assert!(
        read_page(&memory, target).iter().all(|&b| b == 0),
        "{name}: the page turned shared arrives with zeros, not the DMA's bytes"
    );
    edu.edu_to_ram(target);
    assert_eq!(
        &read_page(&memory, target)[..TRANSFER],
        &second[..],
        "{name}: DMA into the page works again"
    );
    println!(
        "EDU {name}: a DMA into the page while private landed nowhere; shared again, it works"
    );

    // A mapper with a small budget: attaching maps the window (replayed, on the real
    // IOMMU); a conversion past its budget is refused and rolled back, nothing mapped.
    drop(mapper);
    let small = DmaMapper::new(iommu.clone())
        .with_budget(260)
        .attach(&memory, pr(0, size))
        .unwrap();
    assert_eq!(small.mapped_pages(), 256);
    view.memory()
        .write_slice(&[0u8; TRANSFER], GuestAddress(target))
        .unwrap();
    edu.edu_to_ram(target);
    assert_eq!(
        &read_page(&memory, target)[..TRANSFER],
        &second[..],
        "{name}: the replayed mapping reaches the page"
    );
    let beyond = pr(4 * MIB, 8 * PAGE_SIZE);
    let err = memory.convert(beyond, PageState::Shared).unwrap_err();
    let Error::ListenerRefused {
        reason: ListenerRefusal::Refused(reason),
        ..
    } = &err
    else {
        panic!("{name}: {err}");
    };
    assert!(
        matches!(
            reason.downcast_ref::<MapperError>(),
            Some(MapperError::OverBudget {
                needed: 8,
                held: 256,
                budget: 260,
                ..
            })
        ),
        "{name}: {reason}"
    );
    for page in (0..beyond.page_count()).map(|p| beyond.start() + p * PAGE_SIZE) {
        assert_eq!(memory.state_of(page), Some(PageState::Private));
        assert!(!small.is_mapped(page));
    }
    assert_eq!(small.mapped_pages(), 256);
    println!("EDU {name}: a conversion past the mapping budget was refused and rolled back");

    drop(small);
    drop(edu);
    drop(iommu);
    drop(memory);
}

/// Every back end: DMA reaches shared pages through the mapper, a page turned private
/// is unmapped before `convert` returns and a DMA into it lands nowhere, and a mapper
/// over its budget refuses a conversion, which rolls back.
#[test]
fn edu_dma_follows_conversions_on_both_iommu_back_ends() {
    let Some(sysfs) = edu_and_vm_or_skip("edu_dma_follows_conversions_on_both_iommu_back_ends")
    else {
        return;
    };
    let _device = DEVICE.lock().unwrap_or_else(|p| p.into_inner());
    for backend in Backend::ALL {
        dma_follows_conversions(backend, &sysfs);
    }
}

/// VmPin and VmLck of this process, in KiB.
fn pinned_kib() -> (u64, u64) {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/self/status"))
    };
    (field("VmPin:"), field("VmLck:"))
}

/// One `DMA-PIN` line; returns the pinned KiB above `base` (type1 accounts pinned pages
/// in VmLck, iommufd in VmPin).
fn report_pins(memory: &PrivateMemoryManager, base: (u64, u64), what: &str) -> u64 {
    let (pin, lck) = pinned_kib();
    let held = shared_bytes_held(memory);
    let pinned = pin.saturating_sub(base.0).max(lck.saturating_sub(base.1));
    println!(
        "DMA-PIN {what} VmPin={pin}kB VmLck={lck}kB pinned={pinned}kB shared_bytes_held={}kB",
        held / 1024
    );
    pinned
}

fn median_us(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}

/// Converts `range` to shared and back `reps` times; one `DMA-COST` line.
fn time_conversions(memory: &PrivateMemoryManager, range: PageRange, reps: usize, what: &str) {
    let mut to_shared = Vec::with_capacity(reps);
    let mut to_private = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        memory.convert(range, PageState::Shared).unwrap();
        to_shared.push(t.elapsed());
        let t = Instant::now();
        memory.convert(range, PageState::Private).unwrap();
        to_private.push(t.elapsed());
    }
    let size = if range.len() >= MIB {
        format!("{}MiB", range.len() / MIB)
    } else {
        format!("{}KiB", range.len() / 1024)
    };
    println!(
        "DMA-COST {what} size={size} reps={reps} to_shared_median_us={:.1} to_private_median_us={:.1}",
        median_us(to_shared),
        median_us(to_private)
    );
}

const GUEST: u64 = 1 << 30;
const REPS: usize = 300;

fn measure(backend: Backend, sysfs: &Path) {
    let name = backend.name();
    let (iommu, edu) = backend.open(sysfs);
    let window = pr(2 * MIB, 2 * MIB);
    let small = pr(256 * MIB, PAGE_SIZE);
    let large = pr(512 * MIB, 2 * MIB);

    // (a) Our mapper: the pages shared now, page by page.
    let memory = dual_memory(GUEST);
    let base = pinned_kib();
    report_pins(
        &memory,
        base,
        &format!("backend={name} guest=1GiB way=none (device open, nothing mapped)"),
    );
    time_conversions(&memory, small, REPS, &format!("backend={name} mapper=none"));
    time_conversions(&memory, large, REPS, &format!("backend={name} mapper=none"));
    let mapper = DmaMapper::new(iommu.clone())
        .attach(&memory, pr(0, GUEST))
        .unwrap();
    memory.convert(window, PageState::Shared).unwrap();
    assert_eq!(mapper.mapped_pages(), 512);
    let pinned = report_pins(
        &memory,
        base,
        &format!("backend={name} guest=1GiB window=2MiB way=DmaMapper mappings=512"),
    );
    let held_kib = shared_bytes_held(&memory) / 1024;
    assert!(
        pinned <= held_kib + held_kib / 100,
        "{name}: our mapper pins {pinned} KiB, more than the {held_kib} KiB the shared side holds"
    );
    time_conversions(
        &memory,
        small,
        REPS,
        &format!("backend={name} mapper=DmaMapper"),
    );
    time_conversions(
        &memory,
        large,
        REPS,
        &format!("backend={name} mapper=DmaMapper"),
    );
    drop(mapper);
    drop(memory);

    // (b) The old idiom: all of RAM mapped once, from the region's host address and
    // length (vfio-ioctls' `vfio_map_guest_memory`). Our regions refuse a host address
    // while any page is private, so the idiom works only at a moment when all of memory
    // is shared; after it the guest turns all but the window private again.
    let memory = dual_memory(GUEST);
    let view = memory.guest_memory();
    let refused = view
        .memory()
        .iter()
        .next()
        .unwrap()
        .get_host_address(MemoryRegionAddress(0))
        .unwrap_err();
    println!(
        "DMA-PIN backend={name} guest=1GiB way=map-all-RAM moment=all-private refused: {refused}"
    );
    let container = iommu.as_any().downcast_ref::<VfioContainer>();
    if let Some(container) = container {
        // SAFETY: the call fails before mapping anything (asserted): the region refuses
        // its host address while a page is private.
        let refused = unsafe { container.vfio_map_guest_memory(&*view.memory()) };
        assert!(
            refused.is_err(),
            "vfio_map_guest_memory mapped an all-private region"
        );
    }
    memory.convert(pr(0, GUEST), PageState::Shared).unwrap();
    let base = pinned_kib();
    match container {
        // SAFETY: the region's mapping lives until `memory` is dropped, and is unmapped
        // from the IOMMU below before that; guest memory is only accessed volatile
        // (vm-memory), never through Rust references, and the device is idle.
        Some(container) => unsafe { container.vfio_map_guest_memory(&*view.memory()) }.unwrap(),
        None => {
            for region in view.memory().iter() {
                let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
                // SAFETY: as for `vfio_map_guest_memory` above: the mapping outlives the
                // IOMMU mapping, which is taken back below; accesses are volatile only.
                unsafe { iommu.vfio_dma_map(region.start_addr().0, region.len() as usize, host) }
                    .unwrap();
            }
        }
    }
    let how = if container.is_some() {
        "vfio_map_guest_memory"
    } else {
        "get_host_address(0)+len, one IOAS map"
    };
    report_pins(
        &memory,
        base,
        &format!("backend={name} guest=1GiB way=map-all-RAM ({how}) moment=all-shared"),
    );
    memory
        .convert(pr(0, window.start()), PageState::Private)
        .unwrap();
    memory
        .convert(pr(window.end(), GUEST - window.end()), PageState::Private)
        .unwrap();
    report_pins(
        &memory,
        base,
        &format!(
            "backend={name} guest=1GiB window=2MiB way=map-all-RAM ({how}) moment=all-but-window-private"
        ),
    );
    iommu.vfio_dma_unmap(0, GUEST as usize).unwrap();
    drop(view);
    drop(memory);
    drop(edu);
    drop(iommu);
}

/// Pinned memory and conversion cost, our mapper against mapping all of RAM: `DMA-PIN`
/// and `DMA-COST` lines for the lab's console.
#[test]
fn edu_dma_pinned_memory_and_conversion_cost() {
    let Some(sysfs) = edu_and_vm_or_skip("edu_dma_pinned_memory_and_conversion_cost") else {
        return;
    };
    let _device = DEVICE.lock().unwrap_or_else(|p| p.into_inner());
    for backend in Backend::ALL {
        measure(backend, &sysfs);
    }
}
