// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Driving QEMU's `edu` PCI device through VFIO for the DMA tests, and finding what they
//! need (the device bound to vfio-pci, a VM type with memory attributes).

#![allow(dead_code)]

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
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{MemoryBuilder, PageState, PrivateMemoryManager, Strategy};

pub const MIB: u64 = 1 << 20;

/// QEMU's edu device: PCI 1234:11e8.
pub const EDU_VENDOR: &str = "0x1234";
pub const EDU_DEVICE: &str = "0x11e8";
/// BAR0: the identification register reads 0x010000ed (version 1.0, "ed").
pub const EDU_ID: u64 = 0x00;
pub const EDU_ID_VALUE: u32 = 0x0100_00ed;
/// BAR0: DMA source, destination, count and command registers.
pub const EDU_DMA_SRC: u64 = 0x80;
pub const EDU_DMA_DST: u64 = 0x88;
pub const EDU_DMA_COUNT: u64 = 0x90;
pub const EDU_DMA_CMD: u64 = 0x98;
pub const EDU_DMA_RUN: u32 = 0x1;
/// Direction bit: set, edu's buffer to RAM; clear, RAM to edu's buffer.
pub const EDU_DMA_TO_RAM: u32 = 0x2;
/// edu's internal buffer, as a DMA address on the device side.
pub const EDU_BUFFER: u64 = 0x4_0000;
/// Bytes per transfer. QEMU 7.2's edu aborts the whole machine on a transfer whose end
/// reaches the end of its 4 KiB buffer (its range check wants the end address inside the
/// buffer), so a transfer stays below 4 KiB.
pub const TRANSFER: usize = 2048;
/// edu masks DMA addresses to 28 bits (silently).
pub const EDU_DMA_LIMIT: u64 = 1 << 28;
/// PCI command register: memory space and bus master enable.
pub const PCI_COMMAND: u64 = 0x04;
pub const PCI_COMMAND_MEMORY_MASTER: u16 = 0x6;

/// One test at a time owns the device (the lab runs them with --test-threads=1; this
/// keeps a plain `cargo test` from opening it twice).
pub static DEVICE: Mutex<()> = Mutex::new(());

pub fn pr(start: u64, len: u64) -> PageRange {
    PageRange::new(start, len).unwrap()
}

/// The edu device bound to vfio-pci, as a sysfs path, or why there is none.
pub fn edu_device() -> Result<PathBuf, String> {
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
pub fn vm_with_memory_attributes() -> Option<Arc<VmFd>> {
    let kvm = Kvm::new().ok()?;
    let system = Capabilities::of_system(&kvm);
    (0..64)
        .filter(|&vm_type| system.supports_vm_type(vm_type))
        .filter_map(|vm_type| kvm.create_vm_with_type(vm_type.into()).ok())
        .find(|vm| Capabilities::of_vm(vm).dual_capable())
        .map(Arc::new)
}

/// The edu device's sysfs path, or prints why the test skips and returns `None`.
pub fn edu_and_vm_or_skip(test: &str) -> Option<PathBuf> {
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
pub fn dual_memory(size: u64) -> PrivateMemoryManager {
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

pub fn shared_bytes_held(memory: &PrivateMemoryManager) -> u64 {
    memory
        .backing(0)
        .unwrap()
        .shared_bytes_held
        .expect("a dual-strategy region")
}

/// vfio-ioctls' two IOMMU back ends.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// `VfioContainer`: /dev/vfio/vfio and the device's group, type1v2.
    Container,
    /// `VfioIommufd`: /dev/iommu, an IOAS, and the device's cdev /dev/vfio/devices/vfioN.
    Iommufd,
}

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Container, Backend::Iommufd];

    pub fn name(self) -> &'static str {
        match self {
            Backend::Container => "container",
            Backend::Iommufd => "iommufd",
        }
    }

    /// A fresh IOMMU of this kind and the edu device opened through it.
    pub fn open(self, sysfs: &Path) -> (Arc<dyn VfioOps>, Edu) {
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
pub struct Edu {
    device: VfioDevice,
}

impl Edu {
    pub fn new(device: VfioDevice) -> Self {
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

    pub fn config_read16(&self, offset: u64) -> u16 {
        let mut buf = [0xff; 2];
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut buf, offset);
        u16::from_le_bytes(buf)
    }

    pub fn config_read32(&self, offset: u64) -> u32 {
        let mut buf = [0xff; 4];
        self.device
            .region_read(VFIO_PCI_CONFIG_REGION_INDEX, &mut buf, offset);
        u32::from_le_bytes(buf)
    }

    pub fn read32(&self, offset: u64) -> u32 {
        let mut buf = [0xff; 4];
        self.device
            .region_read(VFIO_PCI_BAR0_REGION_INDEX, &mut buf, offset);
        u32::from_le_bytes(buf)
    }

    /// Writes a register and reads it back (region_write logs failures only).
    pub fn write32(&self, offset: u64, value: u32) {
        self.device
            .region_write(VFIO_PCI_BAR0_REGION_INDEX, &value.to_le_bytes(), offset);
        assert_eq!(self.read32(offset), value, "edu register {offset:#x}");
    }

    /// One transfer of TRANSFER bytes, waited for.
    pub fn dma(&self, src: u64, dst: u64, direction: u32) {
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
    pub fn ram_to_edu(&self, gpa: u64) {
        self.dma(gpa, EDU_BUFFER, 0);
    }

    /// edu's buffer to RAM (IOVA `gpa`).
    pub fn edu_to_ram(&self, gpa: u64) {
        self.dma(EDU_BUFFER, gpa, EDU_DMA_TO_RAM);
    }
}

/// The kernel log from now on (/dev/kmsg), to show the IOMMU's fault records; `None`
/// where it cannot be read.
pub struct KernelLog(Option<fs::File>);

impl KernelLog {
    pub fn from_now() -> Self {
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .and_then(|mut f| f.seek(SeekFrom::End(0)).map(|_| f));
        KernelLog(file.ok())
    }

    /// The records since `from_now` that mention DMAR (the Intel IOMMU).
    pub fn dmar_records(&mut self) -> Option<Vec<String>> {
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

pub fn pattern(seed: u8) -> Vec<u8> {
    (0..TRANSFER)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

pub fn read_page(memory: &PrivateMemoryManager, gpa: u64) -> Vec<u8> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    memory
        .guest_memory()
        .memory()
        .read_slice(&mut page, GuestAddress(gpa))
        .unwrap();
    page
}
