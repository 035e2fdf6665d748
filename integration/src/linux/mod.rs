// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A stock Linux kernel booted on private memory: the VMM side of what a TDX or SEV-SNP
//! launch does with guest RAM, minus the attestation.
//!
//! [`LinuxVm::new`] builds one region of guest RAM at guest-physical 0 in
//! `vm-private-memory`, makes shared only the pages the host writes (boot and page
//! tables, zero page, command line, ACPI tables, kernel, initramfs) and leaves every
//! other page private (with [`Ram::Private`]), so whatever the running kernel allocates
//! is served from guest_memfd. The machine is the smallest a Linux guest boots and
//! powers off on: one vCPU, the in-kernel irqchip and PIT, a 16550 console and the i8042
//! reset line (vm-superio), a CMOS clock, ACPI tables (acpi_tables) with just enough for
//! S5, and an e820 map of the memory's layout. CPUID hides XSAVE and KVM's paravirtual
//! structures ([`guest_cpuid`]); the TSC's frequency goes on the command line.
//! [`LinuxVm::run`] runs the guest until it resets or powers off, or a deadline passes.
//! [`LinuxVm::new_anonymous`] builds the same machine as an ordinary VM on plain
//! anonymous memory (vm-memory's `GuestMemoryMmap`), the peer boots are measured against.
//!
//! ```no_run
//! use std::path::Path;
//! use integration::linux::{
//!     LinuxConfig, LinuxExit, LinuxVm, Ram, LAB_BOOT_DEADLINE, LAB_CMDLINE,
//! };
//!
//! let config = LinuxConfig {
//!     kernel: Path::new("/lab/guest/vmlinuz"),
//!     initrd: Path::new("/lab/guest/initrd.cpio.gz"),
//!     cmdline: LAB_CMDLINE,
//!     ram_size: 256 << 20,
//!     ram: Ram::Private,
//!     echo_console: true,
//!     paravirt: false,
//!     strategy: None,
//! };
//! let mut vm = LinuxVm::new(&config)?;
//! let run = vm.run(LAB_BOOT_DEADLINE, |line, memory| {
//!     // Each console line, while the vCPU waits: look at the guest's memory here.
//!     println!("{line} ({} private pages)", memory.private_pages());
//! })?;
//! assert!(matches!(run.exit, LinuxExit::PowerOff | LinuxExit::Reset));
//! # Ok::<(), integration::Error>(())
//! ```
//!
//! Guest CPL0 code is emulated on our hosts, so a kernel boots only in the nested lab
//! (`fixtures/lab`), on `KVM_X86_SW_PROTECTED_VM`; the host's tests use a stand-in.

mod acpi;
mod boot;
mod cmos;
mod conversions;
mod devices;
mod disk;
mod kvm_stats;
mod lab_runs;
mod run;
mod vcpu;
pub mod virtio;
mod watchdog;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use guest_memfd::PageRange;
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vm_private_memory::{
    GuestMemoryPrivate, MemoryBuilder, PageState, PrivateMemoryManager, Strategy,
};
use vmm_sys_util::eventfd::EventFd;

pub use acpi::{ACPI_TABLES_ADDR, PM1A_CNT_BLK, PM1A_EVT_BLK, S5_SLEEP_TYPE};
pub use boot::{
    e820_map, BOOT_STACK, CMDLINE_ADDR, CMDLINE_MAX, HIGH_MEMORY, IDENTITY_MAPPED, ZERO_PAGE_ADDR,
};
pub use conversions::ConversionStats;
pub use devices::{ConsoleLog, LegacyDevices, PortEffect, ResetLatch, COM1, COM1_IRQ};
pub use disk::{disk_cmdline, DISK_IRQ, DISK_MMIO_BASE};
pub use kvm_stats::KvmStats;
pub use lab_runs::{console_field, lab_converting_guest, run_until_line, LabRun};
pub use run::{LinuxExit, LinuxRun};
pub use vcpu::guest_cpuid;

use crate::error::{Error, Result};
use crate::guest::private_memory_vm;

/// What the lab's guest init (`fixtures/lab/guest-init`) prints once it runs, followed
/// by `kernel=`, `total_kib=` and `used_kib=` (MemTotal - MemFree); then it reboots.
pub const GUEST_UP_MARKER: &str = "PRIVMEM-GUEST-UP";

/// The command line of the lab's guest: the console on COM1, `reboot` through the
/// i8042's reset line, no PCI, one UART, the TSC trusted (there is no other clocksource
/// for the watchdog to compare it with but jiffies, which a nested guest's timer
/// interrupts make drift), quiet (every console byte is an exit).
pub const LAB_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule \
                               8250.nr_uarts=1 tsc=reliable quiet";

/// How long a boot of the lab's guest may take before it counts as hung: it reaches its
/// stop in 4-15 s in the lab.
pub const LAB_BOOT_DEADLINE: Duration = Duration::from_secs(45);

/// How many boots in all the lab's guest gets when they hang or crash. In the lab about
/// one boot in twenty stops getting timer interrupts early on (its deferred work never
/// runs; it hangs in the idle loop at the first sleep, often only on its way down), and
/// rarely the guest kernel takes a fault the emulated CPU made (seen once: a general
/// protection fault on `iretq` in `text_poke_early`, with corrupt flags) and restarts
/// without its marker: that is the lab's TCG-emulated SVM, on every backing, anonymous
/// memory included. Only a crash that printed a kernel fault, restarted, and converted
/// nothing is booted again, at most [`LAB_BOOT_CRASHES_ALLOWED`] per test; a guest that
/// fails every boot fails the test.
pub const LAB_BOOT_ATTEMPTS: u32 = 5;
const _: () = assert!(LAB_BOOT_ATTEMPTS >= 1, "a test must boot at least once");

/// How many boots of one test may crash (stop without their marker after a kernel
/// fault, [`LAB_BOOT_ATTEMPTS`]) before the test fails: the lab's emulated CPU did it
/// once in about 300 boots, so a second crash in one test is the memory's doing until
/// shown otherwise.
pub const LAB_BOOT_CRASHES_ALLOWED: u32 = 1;

/// The first line of a kernel fault in a guest's console (an Oops, a BUG, a general
/// protection fault, a panic), if it printed one.
fn console_fault(console: &str) -> Option<&str> {
    let fault = ["Oops", "BUG:", "Kernel panic", "general protection fault"];
    console
        .lines()
        .map(str::trim)
        .find(|l| fault.iter().any(|f| l.contains(f)))
}

/// The line of a guest's console that best says why it stopped: its first kernel fault
/// (an Oops, a BUG, a general protection fault, a panic), otherwise its last non-empty line.
pub fn console_summary(console: &str) -> &str {
    console_fault(console)
        .or_else(|| console.lines().map(str::trim).rfind(|l| !l.is_empty()))
        .unwrap_or("")
}

/// For a run that stopped without the guest's marker, the kernel fault its console shows
/// if the crash looks like the lab's emulated CPU and nothing of ours: the kernel printed
/// a fault and restarted (`panic=-1`), and nothing was converted (a stock kernel never
/// converts). The tests boot such a guest again ([`LAB_BOOT_CRASHES_ALLOWED`]); any
/// other stop without the marker is a failure.
pub fn lab_cpu_crash<'a>(run: &LinuxRun, console: &'a str) -> Option<&'a str> {
    if run.exit == LinuxExit::Reset && !run.converted() {
        console_fault(console)
    } else {
        None
    }
}

/// The lab guest's kernel and initramfs, if present: `$PRIVMEM_LINUX_KERNEL` and
/// `$PRIVMEM_LINUX_INITRD`, by default `/lab/guest/vmlinuz` and
/// `/lab/guest/initrd.cpio.gz`, where `fixtures/lab/run.sh` puts them inside L1.
pub fn lab_guest_images() -> Option<(PathBuf, PathBuf)> {
    let path = |var: &str, default: &str| {
        PathBuf::from(std::env::var_os(var).unwrap_or_else(|| default.into()))
    };
    let kernel = path("PRIVMEM_LINUX_KERNEL", "/lab/guest/vmlinuz");
    let initrd = path("PRIVMEM_LINUX_INITRD", "/lab/guest/initrd.cpio.gz");
    (kernel.exists() && initrd.exists()).then_some((kernel, initrd))
}

/// Where KVM may put the TSS it needs for real-mode emulation: three pages at the top of
/// the MMIO hole, above the IOAPIC and local APIC, below the BIOS ROM.
const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// How the guest's RAM starts out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ram {
    /// Every page private except what the host loads: the confidential guest.
    Private,
    /// Every page shared, still in the strategy's memory (guest_memfd in place, the
    /// sealed memfd with dual): the peer that isolates the cost of private pages.
    Shared,
}

/// What to boot.
#[derive(Clone, Copy, Debug)]
pub struct LinuxConfig<'a> {
    /// A bzImage.
    pub kernel: &'a Path,
    /// An initramfs (a compressed cpio archive).
    pub initrd: &'a Path,
    /// The kernel command line.
    pub cmdline: &'a str,
    /// Guest RAM in bytes, whole pages, at most 3 GiB (the MMIO hole starts there).
    pub ram_size: u64,
    /// Private or shared RAM.
    pub ram: Ram,
    /// Whether to copy the guest's console to our standard output as it comes.
    pub echo_console: bool,
    /// Whether the guest sees KVM's paravirtual structures (kvmclock, steal time, PV
    /// EOI, async page faults; [`guest_cpuid`]): only sound in place, where KVM writes
    /// them through the guest_memfd's own mapping. [`LinuxVm::new`] refuses it with the
    /// dual strategy's private RAM.
    pub paravirt: bool,
    /// The strategy of the guest's RAM: `None` for the harness's choice
    /// ([`crate::private_memory_vm`]: dual where the host has memory attributes, unless
    /// `PRIVMEM_STRATEGY=in-place`); `Some` for that one (a VM of the type it needs).
    pub strategy: Option<Strategy>,
}

/// The RAM a [`LinuxVm`] runs on: `vm-private-memory`'s [`PrivateMemoryManager`], or
/// vm-memory's plain [`GuestMemoryMmap`] on anonymous memory (the ordinary VM, the peer
/// to compare with). Sealed: these two only.
pub trait GuestRam: sealed::Sealed + std::fmt::Debug {
    /// How devices reach the RAM: vm-memory's address space over it.
    type AddressSpace: GuestAddressSpace;

    /// The private memory, which serves `KVM_EXIT_MEMORY_FAULT`; `None` for anonymous
    /// memory, where such an exit is unexpected.
    fn private_memory(&self) -> Option<&PrivateMemoryManager>;

    /// The address space a device reaches the RAM through.
    fn address_space(&self) -> Self::AddressSpace;
}

impl GuestRam for Arc<PrivateMemoryManager> {
    type AddressSpace = GuestMemoryAtomic<GuestMemoryPrivate>;

    fn private_memory(&self) -> Option<&PrivateMemoryManager> {
        Some(self)
    }

    fn address_space(&self) -> Self::AddressSpace {
        self.guest_memory()
    }
}

impl GuestRam for GuestMemoryMmap {
    type AddressSpace = GuestMemoryAtomic<GuestMemoryMmap>;

    fn private_memory(&self) -> Option<&PrivateMemoryManager> {
        None
    }

    fn address_space(&self) -> Self::AddressSpace {
        // The regions are shared, not copied: the device sees the guest's own RAM.
        GuestMemoryAtomic::new(self.clone())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for std::sync::Arc<vm_private_memory::PrivateMemoryManager> {}
    impl Sealed for vm_memory::GuestMemoryMmap {}
}

/// A one-vCPU Linux guest, loaded and ready to run, on private memory
/// ([`LinuxVm::new`]) or on plain anonymous memory ([`LinuxVm::new_anonymous`]).
#[derive(Debug)]
pub struct LinuxVm<M: GuestRam = Arc<PrivateMemoryManager>> {
    // The vCPU goes before the memory its slot maps, and the disk before the memory
    // its device holds.
    vcpu: VcpuFd,
    disk: Option<disk::Disk<M>>,
    vm: Arc<VmFd>,
    memory: M,
    devices: LegacyDevices,
    console: ConsoleLog,
    host_written: Vec<PageRange>,
    /// `None` where the kernel has no statistics (before Linux 5.14) or they are
    /// malformed: a diagnostic, never a reason for a guest not to run.
    vm_stats: Option<KvmStats>,
    vcpu_stats: Option<KvmStats>,
}

/// A VM with its irqchip, PIT and boot vCPU, before it has memory.
struct Machine {
    kvm: Kvm,
    vm: Arc<VmFd>,
    vcpu: VcpuFd,
    boot_args: Vec<String>,
}

impl Machine {
    fn new(kvm: Kvm, vm: VmFd, cmdline: &str) -> Result<Self> {
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
        vm.create_irq_chip()
            .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
        // The vCPU comes first: its TSC frequency goes on the command line.
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        let boot_args = tsc_khz_arg(cmdline, &vcpu)?;
        Ok(Machine {
            kvm,
            vm: Arc::new(vm),
            vcpu,
            boot_args,
        })
    }

    /// Loads the guest into `ram` (whose layout `regions` gives), wires the console's
    /// interrupt and puts the vCPU at the kernel's entry point.
    fn boot<M: GuestRam>(
        self,
        config: &LinuxConfig,
        images: boot::BootImages,
        ram: &impl GuestMemoryBackend,
        regions: &[PageRange],
        memory: M,
        host_written: Vec<PageRange>,
    ) -> Result<LinuxVm<M>> {
        let e820 = e820_map(regions);
        let entry = images.load(ram, config.cmdline, &self.boot_args, &e820)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Io("eventfd", e))?;
        self.vm
            .register_irqfd(&irq, COM1_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let console = ConsoleLog::new(config.echo_console);
        let devices = LegacyDevices::new(irq, console.clone());
        vcpu::enter_linux(&self.kvm, &self.vcpu, entry, BOOT_STACK, config.paravirt)?;
        Ok(LinuxVm {
            vm_stats: KvmStats::of_vm(&self.vm).ok(),
            vcpu_stats: KvmStats::of_vcpu(&self.vcpu).ok(),
            vcpu: self.vcpu,
            disk: None,
            vm: self.vm,
            memory,
            devices,
            console,
            host_written,
        })
    }
}

impl LinuxVm {
    /// Creates the VM (of the type `config.strategy` needs, or for the harness's choice:
    /// `KVM_X86_SW_PROTECTED_VM` where the host has memory attributes, unless
    /// `PRIVMEM_STRATEGY=in-place`), its RAM, devices and vCPU, and loads the kernel.
    ///
    /// # Errors
    ///
    /// [`Error::ParavirtNeedsInPlace`] for `paravirt` on the dual strategy's private RAM:
    /// with `strategy: Some(Strategy::Dual)` before anything is made; where the harness
    /// chooses dual, once the RAM is built, before the kernel is opened. The backend's,
    /// the loader's and KVM's errors.
    pub fn new(config: &LinuxConfig) -> Result<Self> {
        let paravirt_on_dual_private =
            |strategy| config.paravirt && strategy == Strategy::Dual && config.ram == Ram::Private;
        if config.strategy.is_some_and(paravirt_on_dual_private) {
            return Err(Error::ParavirtNeedsInPlace);
        }
        let kvm = Kvm::new().map_err(|e| Error::Kvm("open /dev/kvm", e))?;
        let vm = match config.strategy {
            None => private_memory_vm(&kvm)?,
            Some(Strategy::Dual) => kvm
                .create_vm_with_type(kvm_bindings::KVM_X86_SW_PROTECTED_VM.into())
                .map_err(|e| Error::Kvm("KVM_CREATE_VM(KVM_X86_SW_PROTECTED_VM)", e))?,
            // In place, and any strategy added later: the default type, on which the
            // builder says whether the strategy can be had.
            Some(_) => kvm
                .create_vm()
                .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?,
        };
        let machine = Machine::new(kvm, vm, config.cmdline)?;

        let state = match config.ram {
            Ram::Private => PageState::Private,
            Ram::Shared => PageState::Shared,
        };
        let builder = MemoryBuilder::new(machine.vm.clone())
            .x86_mmio_hole()
            .region_at(0, config.ram_size)
            .initial_state(state);
        let memory = match config.strategy {
            Some(strategy) => builder.strategy(strategy),
            None => builder,
        }
        .build()?;
        if paravirt_on_dual_private(memory.strategy()) {
            return Err(Error::ParavirtNeedsInPlace);
        }
        // A converting guest's KVM_HC_MAP_GPA_RANGE comes to us; where the host cannot
        // forward it, KVM answers the guest -KVM_ENOSYS itself (a stock guest never asks).
        memory.enable_map_gpa_range_exits()?;
        let images = boot::BootImages::open(config.kernel, config.initrd, config.ram_size)?;
        let host_written = images.host_written()?;
        if config.ram == Ram::Private {
            for range in &host_written {
                memory.convert(*range, PageState::Shared)?;
            }
        }
        // linux-loader reports a refused write as its own error without the range: check
        // the ranges first, so a page left private is named.
        for range in &host_written {
            memory.check_host_access(range.start(), range.len())?;
        }
        let regions = memory.regions();
        let ram = memory.guest_memory();
        machine.boot(
            config,
            images,
            &*ram.memory(),
            &regions,
            Arc::new(memory),
            host_written,
        )
    }
}

impl LinuxVm<GuestMemoryMmap> {
    /// The same machine as [`LinuxVm::new`]'s on plain anonymous memory: an ordinary VM
    /// (`KVM_CREATE_VM` of the default type), its RAM one vm-memory [`GuestMemoryMmap`]
    /// region in one memslot, with no guest_memfd. `config.paravirt` applies as with
    /// private memory.
    ///
    /// The peer a boot on private memory is measured against (`benches/linux_boot.rs`).
    ///
    /// # Errors
    /// [`Error::NotAnonymous`] if `config.ram` is [`Ram::Private`] or `config.strategy` is
    /// given (private memory is [`LinuxVm::new`]'s), before anything is made;
    /// [`Error::RamSize`] for a size the machine cannot have; the kernel's and initramfs's
    /// errors as with [`LinuxVm::new`].
    pub fn new_anonymous(config: &LinuxConfig) -> Result<Self> {
        if config.ram != Ram::Shared || config.strategy.is_some() {
            return Err(Error::NotAnonymous {
                ram: config.ram,
                strategy: config.strategy,
            });
        }
        let region = anonymous_ram(config.ram_size)?;
        let kvm = Kvm::new().map_err(|e| Error::Kvm("open /dev/kvm", e))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
        let machine = Machine::new(kvm, vm, config.cmdline)?;
        let images = boot::BootImages::open(config.kernel, config.initrd, config.ram_size)?;
        let host_written = images.host_written()?;
        let memory =
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), config.ram_size as usize)])
                .map_err(|e| Error::Io("mmap guest RAM", std::io::Error::other(e)))?;
        let host = memory
            .get_host_address(GuestAddress(0))
            .map_err(|e| Error::Io("guest RAM's host address", std::io::Error::other(e)))?;
        let slot = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: config.ram_size,
            userspace_addr: host as u64,
        };
        // SAFETY: `host` is the start of a live anonymous mapping of `ram_size` bytes that
        // `memory` owns; the returned LinuxVm holds `memory` and drops its vCPU first, and
        // the guest's accesses go through the host's page tables (KVM follows unmaps), so
        // no access reaches memory Rust code owns for anything else.
        unsafe { machine.vm.set_user_memory_region(slot) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        machine.boot(
            config,
            images,
            &memory,
            &[region],
            memory.clone(),
            host_written,
        )
    }
}

impl<M: GuestRam> LinuxVm<M> {
    /// The guest's memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// The pages the host wrote while loading (made shared first with [`Ram::Private`]).
    pub fn host_written(&self) -> &[PageRange] {
        &self.host_written
    }

    /// The guest's console so far.
    pub fn console(&self) -> &ConsoleLog {
        &self.console
    }

    /// KVM's statistics of the VM, such as how many of the guest's pages KVM maps with
    /// 4 KiB and 2 MiB entries (`pages_4k`, `pages_2m`); `None` where the kernel has none
    /// (before Linux 5.14).
    pub fn vm_stats(&self) -> Option<&KvmStats> {
        self.vm_stats.as_ref()
    }

    /// KVM's statistics of the vCPU, such as the (nested) page faults KVM took and fixed
    /// (`pf_taken`, `pf_fixed`) and every exit, those KVM handled itself included
    /// (`exits`); `None` where the kernel has none.
    pub fn vcpu_stats(&self) -> Option<&KvmStats> {
        self.vcpu_stats.as_ref()
    }
}

/// `[0, size)` as guest RAM without a guest_memfd: whole pages, some, and below the x86
/// MMIO hole (which [`LinuxVm::new`]'s builder reserves).
fn anonymous_ram(size: u64) -> Result<PageRange> {
    let why = if size == 0 {
        "no RAM"
    } else if size % guest_memfd::PAGE_SIZE != 0 {
        "not a whole number of 4 KiB pages"
    } else if size > vm_private_memory::X86_MMIO_HOLE.0 {
        "more than the 3 GiB below the x86 MMIO hole"
    } else {
        return Ok(PageRange::new(0, size)?);
    };
    Err(Error::RamSize { size, why })
}

/// `tsc_early_khz=` with the vCPU's TSC frequency, unless `cmdline` sets it.
///
/// The guest gets no kvmclock (see [`guest_cpuid`]); calibrating the TSC against the PIT
/// fails often in a nested guest, and a guest without a TSC frequency can hang. A TDX
/// guest learns the frequency from CPUID leaf 0x15; a VMM for a plain guest says it here.
fn tsc_khz_arg(cmdline: &str, vcpu: &VcpuFd) -> Result<Vec<String>> {
    let boot_args = cmdline.split(" -- ").next().unwrap_or("");
    if boot_args
        .split_whitespace()
        .any(|w| w.starts_with("tsc_early_khz="))
    {
        return Ok(Vec::new());
    }
    let khz = vcpu
        .get_tsc_khz()
        .map_err(|e| Error::Kvm("KVM_GET_TSC_KHZ", e))?;
    Ok(vec![format!("tsc_early_khz={khz}")])
}

fn tail(text: &str, max: usize) -> String {
    let mut from = text.len().saturating_sub(max);
    while !text.is_char_boundary(from) {
        from += 1;
    }
    text[from..].to_owned()
}

/// The host's `Unevictable` memory (`/proc/meminfo`), in bytes.
///
/// guest_memfd pages are unevictable, and with the dual strategy (no mapping of the
/// guest_memfd, so no `/proc/self/smaps` entry) the growth of this system-wide count
/// while a guest runs is how the host side sees its private memory being allocated.
pub fn host_unevictable_bytes() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("Unevictable:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib << 10)
        .ok_or_else(|| std::io::Error::other("no Unevictable line in /proc/meminfo"))
}
