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

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_memfd::{Capabilities, PageRange, PAGE_SIZE};
use iommufd_ioctls::IommuFd;
use kvm_ioctls::{Kvm, VmFd};
use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioIommufd, VfioOps};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vm_private_memory::{
    Error, ListenerRefusal, MemoryBuilder, PageState, PrivateMemory, Strategy,
};
use vm_private_memory_vfio::{DmaMapper, Error as MapperError};

const MIB: u64 = 1 << 20;

/// QEMU's edu device: PCI 1234:11e8.
const EDU_VENDOR: &str = "0x1234";
const EDU_DEVICE: &str = "0x11e8";
/// BAR0: the identification register reads 0x010000ed (version 1.0, "ed").
const EDU_ID: u64 = 0x00;
const EDU_ID_VALUE: u32 = 0x0100_00ed;
/// BAR0: DMA source, destination, count and command registers.
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_COUNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;
const EDU_DMA_RUN: u32 = 0x1;
/// Direction bit: set, edu's buffer to RAM; clear, RAM to edu's buffer.
const EDU_DMA_TO_RAM: u32 = 0x2;
/// edu's internal buffer, as a DMA address on the device side.
const EDU_BUFFER: u64 = 0x4_0000;
/// Bytes per transfer. QEMU 7.2's edu aborts the whole machine on a transfer whose end
/// reaches the end of its 4 KiB buffer (its range check wants the end address inside the
/// buffer), so a transfer stays below 4 KiB.
const TRANSFER: usize = 2048;
/// edu masks DMA addresses to 28 bits (silently).
const EDU_DMA_LIMIT: u64 = 1 << 28;
/// PCI command register: memory space and bus master enable.
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY_MASTER: u16 = 0x6;

/// One test at a time owns the device (the lab runs them with --test-threads=1; this
/// keeps a plain `cargo test` from opening it twice).
static DEVICE: Mutex<()> = Mutex::new(());

fn pr(start: u64, len: u64) -> PageRange {
    PageRange::new(start, len).unwrap()
}

/// The edu device bound to vfio-pci, as a sysfs path, or why there is none.
fn edu_device() -> Result<PathBuf, String> {
    let entries = fs::read_dir("/sys/bus/pci/devices")
        .map_err(|e| format!("no /sys/bus/pci/devices ({e})"))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let read = |name: &str| fs::read_to_string(path.join(name)).unwrap_or_default();
        if read("vendor").trim() != EDU_VENDOR || read("device").trim() != EDU_DEVICE {
            continue;
        }
        let driver = fs::read_link(path.join("driver"))
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()));
        return match driver.as_deref() {
            Some("vfio-pci") => Ok(path),
            other => Err(format!(
                "edu device {} is bound to {}, not vfio-pci",
                path.display(),
                other.unwrap_or("no driver")
            )),
        };
    }
    Err(format!(
        "no PCI device {EDU_VENDOR}:{EDU_DEVICE} (QEMU's edu) bound to vfio-pci in /sys/bus/pci/devices"
    ))
}

/// A VM of the first type whose VM fd offers KVM_MEMORY_ATTRIBUTE_PRIVATE, if any.
fn vm_with_memory_attributes() -> Option<Arc<VmFd>> {
    let kvm = Kvm::new().ok()?;
    let system = Capabilities::of_system(&kvm);
    (0..64)
        .filter(|&vm_type| system.supports_vm_type(vm_type))
        .filter_map(|vm_type| kvm.create_vm_with_type(vm_type.into()).ok())
        .find(|vm| Capabilities::of_vm(vm).dual_capable())
        .map(Arc::new)
}

/// The edu device's sysfs path, or prints why the test skips and returns `None`.
fn edu_and_vm_or_skip(test: &str) -> Option<PathBuf> {
    let mut missing = Vec::new();
    let edu = edu_device().map_err(|e| missing.push(e)).ok();
    if vm_with_memory_attributes().is_none() {
        missing.push(
            "no VM type on this host has KVM_MEMORY_ATTRIBUTE_PRIVATE (KVM_CAP_MEMORY_ATTRIBUTES)"
                .to_string(),
        );
    }
    if !missing.is_empty() {
        println!(
            "SKIPPED {test}: {}; this test runs in the nested lab",
            missing.join("; ")
        );
        return None;
    }
    edu
}

/// Dual-strategy memory of `size` bytes at 0, every page private, on a VM of its own.
fn dual_memory(size: u64) -> PrivateMemory {
    let vm = vm_with_memory_attributes().expect("a VM type with memory attributes");
    let memory = MemoryBuilder::new(vm)
        .region_at(0, size)
        .strategy(Strategy::Dual)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    assert_eq!(memory.strategy(), Strategy::Dual);
    memory
}

fn shared_bytes_held(memory: &PrivateMemory) -> u64 {
    memory
        .backing(0)
        .unwrap()
        .shared_bytes_held
        .expect("a dual-strategy region")
}

/// vfio-ioctls' two IOMMU back ends.
#[derive(Clone, Copy, Debug)]
enum Backend {
    /// `VfioContainer`: /dev/vfio/vfio and the device's group, type1v2.
    Container,
    /// `VfioIommufd`: /dev/iommu, an IOAS, and the device's cdev /dev/vfio/devices/vfioN.
    Iommufd,
}

impl Backend {
    const ALL: [Backend; 2] = [Backend::Container, Backend::Iommufd];

    fn name(self) -> &'static str {
        match self {
            Backend::Container => "container",
            Backend::Iommufd => "iommufd",
        }
    }

    /// A fresh IOMMU of this kind and the edu device opened through it.
    fn open(self, sysfs: &Path) -> (Arc<dyn VfioOps>, Edu) {
        let iommu: Arc<dyn VfioOps> = match self {
            Backend::Container => Arc::new(VfioContainer::new(None).expect("VfioContainer::new")),
            Backend::Iommufd => {
                let iommufd = Arc::new(IommuFd::new().expect("IommuFd::new (/dev/iommu)"));
                Arc::new(VfioIommufd::new(iommufd, None, None).expect("VfioIommufd::new"))
            }
        };
        // The container attaches the group when the device is opened; iommufd binds the
        // cdev and attaches it to the IOAS (attach_ioas).
        let attach_ioas = matches!(self, Backend::Iommufd);
        let device = VfioDevice::new(sysfs, iommu.clone(), attach_ioas)
            .unwrap_or_else(|e| panic!("opening {} through {}: {e}", sysfs.display(), self.name()));
        (iommu, Edu::new(device))
    }
}

/// The edu device through VFIO: BAR0 and config space, 32-bit accesses only (edu takes
/// 4-byte accesses to every register this uses, and 32-bit values hold every address).
struct Edu {
    device: VfioDevice,
}

impl Edu {
    fn new(device: VfioDevice) -> Self {
        let edu = Edu { device };
        // Config space first: its IDs show that region 7 is what it should be.
        let ids = edu.config_read32(0);
        assert_eq!(
            ids, 0x11e8_1234,
            "edu's vendor and device IDs in config space"
        );
        let command = edu.config_read16(PCI_COMMAND) | PCI_COMMAND_MEMORY_MASTER;
        edu.device.region_write(
            VFIO_PCI_CONFIG_REGION_INDEX,
            &command.to_le_bytes(),
            PCI_COMMAND,
        );
        assert_eq!(
            edu.config_read16(PCI_COMMAND) & PCI_COMMAND_MEMORY_MASTER,
            PCI_COMMAND_MEMORY_MASTER,
            "bus mastering enabled"
        );
        assert_eq!(edu.read32(EDU_ID), EDU_ID_VALUE, "edu's identification");
        edu
    }

    fn config_read16(&self, offset: u64) -> u16 {
        let mut buf = [0xff; 2];
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut buf, offset);
        u16::from_le_bytes(buf)
    }

    fn config_read32(&self, offset: u64) -> u32 {
        let mut buf = [0xff; 4];
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut buf, offset);
        u32::from_le_bytes(buf)
    }

    fn read32(&self, offset: u64) -> u32 {
        let mut buf = [0xff; 4];
        self.device
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, &mut buf, offset);
        u32::from_le_bytes(buf)
    }

    /// Writes a register and reads it back (region_write logs failures only).
    fn write32(&self, offset: u64, value: u32) {
        self.device
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, &value.to_le_bytes(), offset);
        assert_eq!(self.read32(offset), value, "edu register {offset:#x}");
    }

    /// One transfer of TRANSFER bytes, waited for.
    fn dma(&self, src: u64, dst: u64, direction: u32) {
        for address in [src, dst] {
            assert!(address + TRANSFER as u64 <= EDU_DMA_LIMIT);
        }
        self.write32(EDU_DMA_SRC, src as u32);
        self.write32(EDU_DMA_DST, dst as u32);
        self.write32(EDU_DMA_COUNT, TRANSFER as u32);
        self.device.region_write(
            VFIO_PCI_BAR0_REGION_INDEX,
            &(EDU_DMA_RUN | direction).to_le_bytes(),
            EDU_DMA_CMD,
        );
        // edu runs a transfer 100 ms (virtual time) after it is started.
        let started = Instant::now();
        while self.read32(EDU_DMA_CMD) & EDU_DMA_RUN != 0 {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "edu's DMA did not finish"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// RAM (IOVA `gpa`) to edu's buffer.
    fn ram_to_edu(&self, gpa: u64) {
        self.dma(gpa, EDU_BUFFER, 0);
    }

    /// edu's buffer to RAM (IOVA `gpa`).
    fn edu_to_ram(&self, gpa: u64) {
        self.dma(EDU_BUFFER, gpa, EDU_DMA_TO_RAM);
    }
}

/// The kernel log from now on (/dev/kmsg), to show the IOMMU's fault records; `None`
/// where it cannot be read.
struct KernelLog(Option<fs::File>);

impl KernelLog {
    fn from_now() -> Self {
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(SeekFrom::End(0)).map(|_| f));
        KernelLog(file.ok())
    }

    /// The records since `from_now` that mention DMAR (the Intel IOMMU).
    fn dmar_records(&mut self) -> Option<Vec<String>> {
        let file = self.0.as_mut()?;
        let mut records = Vec::new();
        let mut buf = vec![0u8; 8192];
        // One record per read; EAGAIN at the end (EPIPE if records were overwritten).
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            let record = String::from_utf8_lossy(&buf[..n]);
            let text = record.split_once(';').map_or(&*record, |(_, t)| t).trim();
            if text.contains("DMAR") {
                records.push(text.to_string());
            }
        }
        Some(records)
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..TRANSFER)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn read_page(memory: &PrivateMemory, gpa: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    memory
        .memory()
        .memory()
        .read_slice(&mut page, GuestAddress(gpa))
        .unwrap();
    page
}

/// The whole check on one back end (see `edu_dma_follows_conversions_on_both_iommu_back_ends`).
fn dma_follows_conversions(backend: Backend, sysfs: &Path) {
    let name = backend.name();
    let size = 8 * MIB;
    let memory = dual_memory(size);
    let (iommu, edu) = backend.open(sysfs);

    let mapper = Arc::new(DmaMapper::new(iommu.clone(), memory.memory()));
    let subscription = mapper.attach(&memory, pr(0, size)).unwrap();
    assert_eq!(mapper.mapped_pages(), 0, "all private: nothing mapped");

    let window = pr(MIB, MIB);
    memory.convert(window, PageState::Shared).unwrap();
    assert_eq!(mapper.mapped_pages(), 256);
    let source = window.start() + 3 * PAGE_SIZE;
    let target = window.start() + 128 * PAGE_SIZE;
    assert!(mapper.is_mapped(source) && mapper.is_mapped(target));

    // RAM -> edu from one shared page, edu -> RAM into another.
    let view = memory.memory();
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
    drop(subscription);
    drop(mapper);
    let small = Arc::new(DmaMapper::new(iommu.clone(), memory.memory()).with_budget(260));
    let subscription = small.attach(&memory, pr(0, size)).unwrap();
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

    drop(subscription);
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
fn report_pins(memory: &PrivateMemory, base: (u64, u64), what: &str) -> u64 {
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
fn time_conversions(memory: &PrivateMemory, range: PageRange, reps: usize, what: &str) {
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
    let mapper = Arc::new(DmaMapper::new(iommu.clone(), memory.memory()));
    let subscription = mapper.attach(&memory, pr(0, GUEST)).unwrap();
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
    drop(subscription);
    drop(mapper);
    drop(memory);

    // (b) The old idiom: all of RAM mapped once, from the region's host address and
    // length (vfio-ioctls' `vfio_map_guest_memory`). Our regions refuse a host address
    // while any page is private, so the idiom works only at a moment when all of memory
    // is shared; after it the guest turns all but the window private again.
    let memory = dual_memory(GUEST);
    let view = memory.memory();
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
