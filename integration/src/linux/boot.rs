// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Loads a Linux bzImage for the 64-bit boot protocol: where everything goes in
//! guest-physical memory, the pages the host writes, the e820 map, the boot parameters.
//!
//! linux-loader does the loading (`BzImage`, `load_cmdline`, `LinuxBootConfigurator`);
//! this module decides the layout and builds the descriptor and page tables, which no
//! rust-vmm crate provides. Everything is written through the backend's `Bytes`, so only
//! the pages made shared first can receive it: the rest of RAM stays private, as a TDX
//! or SEV-SNP guest's does.

use std::fs::File;
use std::path::Path;

use guest_memfd::{PageRange, PAGE_SIZE};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::acpi::{self, ACPI_TABLES_ADDR};
use crate::error::{Error, Result};

/// The GDT the vCPU starts with: null, null, 64-bit code (0x10), flat data (0x18), the
/// selectors the boot protocol names `__BOOT_CS` and `__BOOT_DS`.
pub const GDT_ADDR: u64 = 0x1000;
/// The boot page tables: PML4, PDPT, one page directory of 2 MiB pages.
pub const PML4_ADDR: u64 = 0x2000;
const PDPT_ADDR: u64 = 0x3000;
const PD_ADDR: u64 = 0x4000;
/// The zero page (`struct boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x8000;
/// The most command-line bytes, terminator included, the layout leaves room for.
pub const CMDLINE_MAX: usize = 4096;
/// The initial stack (the kernel sets up its own before it uses one).
pub const BOOT_STACK: u64 = 0x8_0000;
/// Where real-mode memory ends: `[EBDA_START, HIGH_MEMORY)` is the legacy BIOS area.
const EBDA_START: u64 = 0x9_fc00;
/// Where the bzImage's protected-mode kernel goes (its `code32_start`).
pub const HIGH_MEMORY: u64 = 0x10_0000;
/// The boot page tables map this much, identity, with 2 MiB pages.
pub const IDENTITY_MAPPED: u64 = 1 << 30;
/// The 64-bit entry point is this far into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;

/// The page tables, descriptor tables, zero page and command line: `[0x1000, 0x9000)`.
pub fn boot_pages() -> PageRange {
    PageRange::new(GDT_ADDR, CMDLINE_ADDR + CMDLINE_MAX as u64 - GDT_ADDR)
        .expect("a constant, page-aligned range")
}

/// What the host is about to write into guest memory, and where.
#[derive(Debug)]
pub struct BootImages {
    kernel: File,
    kernel_len: u64,
    header: setup_header,
    initrd: File,
    initrd_path: std::path::PathBuf,
    initrd_len: u64,
    /// Where the initramfs goes.
    pub initrd_addr: u64,
}

/// The boot protocol version that brought `xloadflags` (2.12).
const PROTOCOL_XLOADFLAGS: u16 = 0x020c;
/// `xloadflags`: the kernel has the 64-bit entry point at 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Where the setup header starts in a bzImage.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;

/// The bzImage's setup header, checked for what this loader needs: the `HdrS` magic and
/// a 64-bit entry point (boot protocol 2.12 or later with `XLF_KERNEL_64`).
fn read_header(file: &mut File, path: &Path) -> Result<setup_header> {
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::ByteValued;
    let mut header = setup_header::default();
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .and_then(|_| file.read_exact(header.as_mut_slice()))
        .map_err(|source| Error::BootFile {
            path: path.to_owned(),
            source,
        })?;
    if header.header != KERNEL_HDR_MAGIC {
        return Err(Error::KernelLoad(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        )));
    }
    if header.version < PROTOCOL_XLOADFLAGS || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::NotA64BitKernel {
            path: path.to_owned(),
            version: header.version,
            xloadflags: header.xloadflags,
        });
    }
    Ok(header)
}

fn open(path: &Path) -> Result<(File, u64)> {
    let failed = |source| Error::BootFile {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(failed)?;
    let len = file.metadata().map_err(failed)?.len();
    Ok((file, len))
}

fn page_span(what: &'static str, start: u64, len: u64) -> Result<PageRange> {
    let end = start
        .checked_add(len)
        .and_then(|end| end.checked_next_multiple_of(PAGE_SIZE))
        .ok_or(Error::DoesNotFit(what, len))?;
    PageRange::new(start, end - start).map_err(|_| Error::DoesNotFit(what, len))
}

impl BootImages {
    /// Opens the bzImage (checking its header) and the initramfs, and places the
    /// initramfs at the top of the first `ram_end` bytes (and of the identity-mapped GiB,
    /// and of the kernel's `initrd_addr_max`), page-aligned, above both the bzImage and
    /// the area the kernel decompresses itself into (`init_size` bytes at its preferred
    /// address).
    pub fn open(kernel_path: &Path, initrd_path: &Path, ram_end: u64) -> Result<Self> {
        let (mut kernel, kernel_len) = open(kernel_path)?;
        let header = read_header(&mut kernel, kernel_path)?;
        let (initrd, initrd_len) = open(initrd_path)?;
        if initrd_len == 0 {
            return Err(Error::EmptyInitramfs(initrd_path.to_owned()));
        }
        let addr_max = match u64::from(header.initrd_addr_max) {
            0 => u64::MAX,
            max => max + 1,
        };
        let top = ram_end.min(IDENTITY_MAPPED).min(addr_max) & !(PAGE_SIZE - 1);
        let kernel_end = HIGH_MEMORY + kernel_len.next_multiple_of(PAGE_SIZE);
        let decompressed_end = header.pref_address.max(HIGH_MEMORY) + u64::from(header.init_size);
        let lowest = kernel_end.max(decompressed_end);
        let initrd_addr = top
            .checked_sub(initrd_len.next_multiple_of(PAGE_SIZE))
            .filter(|&addr| addr >= lowest)
            .ok_or(Error::DoesNotFit(
                "the initramfs, above the kernel and its decompression area,",
                initrd_len,
            ))?;
        Ok(BootImages {
            kernel,
            kernel_len,
            header,
            initrd,
            initrd_path: initrd_path.to_owned(),
            initrd_len,
            initrd_addr,
        })
    }

    /// The pages the host will write: make these shared before [`BootImages::load`]. In
    /// order: boot pages, ACPI tables, kernel, initramfs. The
    /// kernel's span covers the whole bzImage, a little more than its protected-mode part.
    pub fn host_written(&self) -> Result<Vec<PageRange>> {
        Ok(vec![
            boot_pages(),
            PageRange::new(ACPI_TABLES_ADDR, PAGE_SIZE)?,
            page_span("the kernel", HIGH_MEMORY, self.kernel_len)?,
            page_span("the initramfs", self.initrd_addr, self.initrd_len)?,
        ])
    }

    /// Loads kernel, initramfs, command line (`cmdline`, with `boot_args` added before
    /// any `--` and the init arguments after it), boot parameters with `e820`,
    /// descriptor and page tables into `memory`; returns the 64-bit entry point.
    pub fn load<M: GuestMemoryBackend>(
        mut self,
        memory: &M,
        cmdline: &str,
        boot_args: &[String],
        e820: &[boot_e820_entry],
    ) -> Result<u64> {
        let kernel = BzImage::load(
            memory,
            None,
            &mut self.kernel,
            Some(GuestAddress(HIGH_MEMORY)),
        )
        .map_err(Error::KernelLoad)?;
        let header =
            kernel
                .setup_header
                .ok_or(Error::KernelLoad(linux_loader::loader::Error::Bzimage(
                    linux_loader::loader::bzimage::Error::InvalidBzImage,
                )))?;
        memory
            .read_exact_volatile_from(
                GuestAddress(self.initrd_addr),
                &mut self.initrd,
                self.initrd_len as usize,
            )
            .map_err(|source| Error::LoadInto {
                what: self.initrd_path.clone(),
                start: self.initrd_addr,
                len: self.initrd_len,
                source,
            })?;

        // The kernel's own limit, terminator included (2048 on x86-64 Linux), within
        // the room the layout leaves.
        let limit = match self.header.cmdline_size as usize {
            0 => 256,
            size => (size + 1).min(CMDLINE_MAX),
        };
        let (boot, init) = match cmdline.split_once(" -- ") {
            Some((boot, init)) => (boot, Some(init)),
            None => (cmdline, None),
        };
        let mut line = Cmdline::new(limit).map_err(Error::Cmdline)?;
        for arg in std::iter::once(boot).chain(boot_args.iter().map(String::as_str)) {
            line.insert_str(arg).map_err(Error::Cmdline)?;
        }
        if let Some(init) = init {
            line.insert_init_args(init).map_err(Error::Cmdline)?;
        }
        load_cmdline(memory, GuestAddress(CMDLINE_ADDR), &line).map_err(Error::KernelLoad)?;

        let params = boot_params_for(header, &self, e820)?;
        LinuxBootConfigurator::write_bootparams(
            &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
            memory,
        )
        .map_err(Error::BootParams)?;
        write_tables(memory)?;
        acpi::write_tables(memory)?;
        Ok(kernel.kernel_load.0 + STARTUP_64_OFFSET)
    }
}

fn boot_params_for(
    mut header: setup_header,
    images: &BootImages,
    e820: &[boot_e820_entry],
) -> Result<boot_params> {
    let mut params = boot_params::default();
    if e820.len() > params.e820_table.len() {
        return Err(Error::DoesNotFit("the e820 map", e820.len() as u64));
    }
    header.type_of_loader = KERNEL_LOADER_OTHER;
    header.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    header.header = KERNEL_HDR_MAGIC;
    header.cmd_line_ptr = CMDLINE_ADDR as u32;
    // Below 1 GiB (BootImages::open), so both fit the 32-bit fields.
    header.ramdisk_image = images.initrd_addr as u32;
    header.ramdisk_size = images.initrd_len as u32;
    params.hdr = header;
    params.acpi_rsdp_addr = ACPI_TABLES_ADDR;
    params.e820_table[..e820.len()].copy_from_slice(e820);
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// The e820 map of guest RAM `regions`: each is RAM, except that a region covering the
/// legacy BIOS area `[0x9fc00, 1 MiB)` has that area reported reserved.
pub fn e820_map(regions: &[PageRange]) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, kind: u32| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: kind,
    };
    let mut map = Vec::new();
    for region in regions {
        let (start, end) = (region.start(), region.end());
        if start < EBDA_START && end > HIGH_MEMORY {
            map.push(entry(start, EBDA_START, E820_RAM));
            map.push(entry(EBDA_START, HIGH_MEMORY, E820_RESERVED));
            map.push(entry(HIGH_MEMORY, end, E820_RAM));
        } else {
            map.push(entry(start, end, E820_RAM));
        }
    }
    map
}

/// The GDT descriptors: null, null, `__BOOT_CS` (64-bit code), `__BOOT_DS` (data).
pub const GDT: [u64; 4] = [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

fn write_tables<M: GuestMemoryBackend>(memory: &M) -> Result<()> {
    let write = |value: u64, addr: u64| {
        memory
            .write_obj(value, GuestAddress(addr))
            .map_err(Error::Load)
    };
    for (i, descriptor) in GDT.iter().enumerate() {
        write(*descriptor, GDT_ADDR + 8 * i as u64)?;
    }
    const PRESENT_WRITABLE: u64 = 0b11;
    const HUGE: u64 = 1 << 7;
    write(PDPT_ADDR | PRESENT_WRITABLE, PML4_ADDR)?;
    write(PD_ADDR | PRESENT_WRITABLE, PDPT_ADDR)?;
    for i in 0..IDENTITY_MAPPED / (2 << 20) {
        write((i << 21) | PRESENT_WRITABLE | HUGE, PD_ADDR + 8 * i)?;
    }
    Ok(())
}
