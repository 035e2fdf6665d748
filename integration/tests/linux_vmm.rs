// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The Linux-guest VMM (`integration::linux`) on our hosts' real KVM, with a tiny
//! stand-in for a kernel: a bzImage header and a few instructions at the 64-bit entry
//! point. A stock kernel cannot boot here (guest CPL0 code is emulated, HOST.md); the
//! lab's `linux_boot` boots one. These tests cover what the host can show: the loader,
//! the boot parameters, which pages are shared, the vCPU's entry state, the console,
//! reset, the deadline, and refusals of bad input.

mod common;

use std::io::Write;
use std::time::Duration;

use guest_memfd::PAGE_SIZE;
use integration::linux::{
    console_summary, lab_cpu_crash, ConversionStats, LinuxConfig, LinuxExit, LinuxRun, LinuxVm,
    Ram, ACPI_TABLES_ADDR, CMDLINE_ADDR, CMDLINE_MAX, HIGH_MEMORY, PM1A_CNT_BLK, S5_SLEEP_TYPE,
    ZERO_PAGE_ADDR,
};
use integration::Error;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap};
use vm_private_memory::{private_page_refusal, PageState, Strategy};
use vmm_sys_util::tempfile::TempFile;

const RAM_SIZE: u64 = 64 << 20;
const CMDLINE: &str = "console=ttyS0 reboot=k";
/// The stand-in's header: a 64-bit entry point, Linux's command-line limit, and where
/// it would decompress itself (16 MiB, 1 MiB of it).
const XLF_KERNEL_64: u16 = 1;
const KERNEL_CMDLINE_SIZE: usize = 2047;
const PREF_ADDRESS: u64 = 16 << 20;
const INIT_SIZE: u32 = 1 << 20;
/// `setup_sects` of the stand-in: one sector of setup after the boot sector.
const SETUP_SIZE: usize = 2 * 512;

/// A bzImage with a valid setup header whose protected-mode part runs `code` at its
/// 64-bit entry point (offset 0x200).
fn bzimage(code: &[u8]) -> Vec<u8> {
    let mut image = vec![0u8; SETUP_SIZE + 0x1000];
    image[0x1f1] = (SETUP_SIZE / 512 - 1) as u8;
    image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    image[0x211] = 1; // LOADED_HIGH
    image[0x214..0x218].copy_from_slice(&(HIGH_MEMORY as u32).to_le_bytes());
    image[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
    image[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
    image[0x238..0x23c].copy_from_slice(&(KERNEL_CMDLINE_SIZE as u32).to_le_bytes());
    image[0x258..0x260].copy_from_slice(&PREF_ADDRESS.to_le_bytes());
    image[0x260..0x264].copy_from_slice(&INIT_SIZE.to_le_bytes());
    let entry = SETUP_SIZE + 0x200;
    image[entry..entry + code.len()].copy_from_slice(code);
    image
}

/// Writes `text` to COM1, then `tail`.
fn print_then(text: &[u8], tail: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &byte in text {
        code.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, byte; out dx, al
    }
    code.extend_from_slice(tail);
    code
}

/// mov al, 0xfe; out 0x64, al: the i8042's reset command, as Linux's `reboot=k`.
const RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];
/// jmp $
const SPIN: [u8; 2] = [0xeb, 0xfe];

fn file(bytes: &[u8]) -> TempFile {
    let file = TempFile::new().unwrap();
    file.as_file().write_all(bytes).unwrap();
    file
}

struct Images {
    kernel: TempFile,
    initrd: TempFile,
}

fn images(code: &[u8], initrd_len: usize) -> Images {
    Images {
        kernel: file(&bzimage(code)),
        initrd: file(&vec![0x5a; initrd_len]),
    }
}

fn config<'a>(images: &'a Images, ram: Ram, cmdline: &'a str) -> LinuxConfig<'a> {
    LinuxConfig {
        kernel: images.kernel.as_path(),
        initrd: images.initrd.as_path(),
        cmdline,
        ram_size: RAM_SIZE,
        ram,
        echo_console: false,
        paravirt: false,
        strategy: None,
    }
}

#[test]
fn the_guest_prints_on_its_console_and_its_reset_stops_the_vm() {
    if !common::private_memory_or_skip("the_guest_prints_on_its_console_and_its_reset_stops_the_vm")
    {
        return;
    }
    let images = images(&print_then(b"hello\nworld\n", &RESET), 4096);
    let mut vm = LinuxVm::new(&config(&images, Ram::Private, CMDLINE)).unwrap();
    let mut lines = Vec::new();
    let run = vm
        .run(Duration::from_secs(60), |line, memory| {
            // The vCPU waits while we look: its memory is the VM's.
            assert_eq!(memory.regions().len(), 1);
            lines.push(line.to_owned());
        })
        .unwrap();
    assert_eq!(run.exit, LinuxExit::Reset);
    assert_eq!(lines, ["hello", "world"]);
    assert_eq!(vm.console().text(), "hello\nworld\n");
    assert!(!run.converted(), "{:?}", run.conversions);
    assert!(run.exits >= 12, "one exit per console byte at least");
}

/// KVM's own counts of a run, read from its statistics: every exit the VMM served is
/// among the vCPU's `exits` (which also count those KVM handled itself), the counts of
/// the pages KVM maps are there, and a statistic this kernel does not have is `None`.
/// On private memory and on the ordinary VM's anonymous memory.
#[test]
fn kvm_statistics_count_the_exits_and_the_pages_kvm_maps() {
    if !common::private_memory_or_skip("kvm_statistics_count_the_exits_and_the_pages_kvm_maps") {
        return;
    }
    let images = images(&print_then(b"counted\n", &RESET), 4096);
    let private = LinuxVm::new(&config(&images, Ram::Private, CMDLINE)).unwrap();
    let anonymous = LinuxVm::new_anonymous(&config(&images, Ram::Shared, CMDLINE)).unwrap();
    fn check<M: integration::linux::GuestRam>(mut vm: LinuxVm<M>) {
        let stat = |vm: &LinuxVm<M>, name| vm.vcpu_stats().expect("5.14+").get(name).unwrap();
        let before = stat(&vm, "exits").expect("x86 KVM counts exits");
        let run = vm.run(Duration::from_secs(60), |_, _| {}).unwrap();
        assert_eq!(run.exit, LinuxExit::Reset);
        let after = stat(&vm, "exits").unwrap();
        assert!(
            after - before >= run.exits,
            "KVM counted {} exits, the VMM served {}",
            after - before,
            run.exits
        );
        // Where KVM emulates the stand-in's instructions (our hosts' KVM does) it maps
        // none of its pages (the lab's linux_boot asserts it maps a booted kernel's); the
        // counts are there, and read.
        let vm_stats = vm.vm_stats().expect("5.14+");
        for name in ["pages_4k", "pages_2m"] {
            assert!(vm_stats.get(name).unwrap().is_some(), "{name}");
        }
        let vcpu_stats = vm.vcpu_stats().unwrap();
        assert!(vcpu_stats.names().any(|name| name == "pf_taken"));
        // A histogram is not a single value.
        if vcpu_stats
            .names()
            .any(|name| name == "halt_poll_success_hist")
        {
            assert_eq!(vcpu_stats.get("halt_poll_success_hist").unwrap(), None);
        }
        assert_eq!(stat(&vm, "no_such_statistic"), None);
    }
    check(private);
    check(anonymous);
}

/// What a failed boot's report quotes from its console: the first line of a kernel
/// fault if there is one, otherwise the last line that is not blank; and which stops
/// without a marker look like the lab's emulated CPU.
#[test]
fn a_consoles_summary_and_what_counts_as_the_lab_cpus_crash() {
    let crashed = "[ 0.1] booting\n[ 2.4] Oops: general protection fault, maybe for address 0x10\n\
                   [ 2.4] RIP: 0010:text_poke_early+0x68/0xa0\n[ 2.5] Kernel panic - not syncing\n";
    assert_eq!(
        console_summary(crashed),
        "[ 2.4] Oops: general protection fault, maybe for address 0x10"
    );
    assert_eq!(
        console_summary("[ 3.0] PRIVMEM-GUEST-UP used_kib=1\n\n  \n"),
        "[ 3.0] PRIVMEM-GUEST-UP used_kib=1"
    );
    assert_eq!(console_summary(""), "");
    assert_eq!(console_summary("\n \n"), "");

    // Only a fault printed, a restart and nothing converted look like the lab's CPU.
    let run = |exit, memory_faults| LinuxRun {
        exit,
        elapsed: Duration::ZERO,
        exits: 1,
        conversions: ConversionStats {
            memory_faults,
            ..Default::default()
        },
    };
    let oops = "[ 2.4] Oops: general protection fault, maybe for address 0x10";
    assert_eq!(
        lab_cpu_crash(&run(LinuxExit::Reset, 0), crashed),
        Some(oops)
    );
    assert_eq!(lab_cpu_crash(&run(LinuxExit::Reset, 1), crashed), None);
    assert_eq!(lab_cpu_crash(&run(LinuxExit::PowerOff, 0), crashed), None);
    assert_eq!(
        lab_cpu_crash(&run(LinuxExit::Reset, 0), "[ 3.0] reboot\n"),
        None
    );
}

/// mov dx, PM1A_CNT_BLK; mov ax, S5 | SLP_EN; out dx, ax: ACPI's power-off, as Linux's.
fn acpi_power_off() -> Vec<u8> {
    let value = (S5_SLEEP_TYPE << 10) | (1 << 13);
    let mut code = vec![0x66, 0xba];
    code.extend_from_slice(&PM1A_CNT_BLK.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xb8]);
    code.extend_from_slice(&value.to_le_bytes());
    code.extend_from_slice(&[0x66, 0xef]);
    code
}

#[test]
fn the_guests_acpi_power_off_stops_the_vm_as_a_power_off() {
    if !common::private_memory_or_skip("the_guests_acpi_power_off_stops_the_vm_as_a_power_off") {
        return;
    }
    let images = images(&print_then(b"bye\n", &acpi_power_off()), 4096);
    let mut vm = LinuxVm::new(&config(&images, Ram::Private, CMDLINE)).unwrap();
    let run = vm.run(Duration::from_secs(60), |_, _| {}).unwrap();
    assert_eq!(run.exit, LinuxExit::PowerOff);
    assert_eq!(vm.console().text(), "bye\n");
}

#[test]
fn a_guest_that_never_stops_ends_at_the_deadline_with_its_console() {
    if !common::private_memory_or_skip(
        "a_guest_that_never_stops_ends_at_the_deadline_with_its_console",
    ) {
        return;
    }
    let images = images(&print_then(b"still here\n", &SPIN), 4096);
    let mut vm = LinuxVm::new(&config(&images, Ram::Shared, CMDLINE)).unwrap();
    let err = vm.run(Duration::from_secs(2), |_, _| {}).unwrap_err();
    match err {
        Error::Timeout {
            deadline,
            console_tail,
            exits,
            rip,
        } => {
            assert!(exits >= 11, "{exits} exits: one per console byte at least");
            assert_eq!(deadline, Duration::from_secs(2));
            assert!(console_tail.contains("still here"), "{console_tail:?}");
            // Where it spins: the `jmp $` right after the output, in the kernel's span.
            assert!(
                (HIGH_MEMORY..HIGH_MEMORY + 0x2000).contains(&rip),
                "{rip:#x}"
            );
        }
        other => panic!("expected a timeout, got {other}"),
    }
    // The VM can run again afterwards, and meets its next deadline the same way.
    let again = vm.run(Duration::from_millis(200), |_, _| {});
    assert!(matches!(again, Err(Error::Timeout { .. })), "{again:?}");
}

#[test]
fn only_what_the_loader_writes_is_shared_and_the_boot_parameters_describe_it() {
    if !common::private_memory_or_skip(
        "only_what_the_loader_writes_is_shared_and_the_boot_parameters_describe_it",
    ) {
        return;
    }
    let images = images(&RESET, 3 * 4096 + 17);
    let vm = LinuxVm::new(&config(&images, Ram::Private, CMDLINE)).unwrap();
    let memory = vm.memory();
    let written = vm.host_written();
    assert_eq!(
        written.len(),
        4,
        "boot pages, ACPI tables, kernel, initramfs"
    );
    let mut shared = 0;
    for gpa in (0..RAM_SIZE).step_by(PAGE_SIZE as usize) {
        let expected = if written.iter().any(|r| r.contains_addr(gpa)) {
            shared += 1;
            PageState::Shared
        } else {
            PageState::Private
        };
        assert_eq!(memory.state_of(gpa), Some(expected), "page {gpa:#x}");
    }
    assert_eq!(memory.private_pages(), RAM_SIZE / PAGE_SIZE - shared);

    let ram = memory.guest_memory();
    let ram = ram.memory();
    let params: boot_params = ram.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    let hdr = params.hdr;
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_ADDR);
    // The kernel's limit stays what the image says; the line fits it, NUL-terminated.
    assert_eq!({ hdr.cmdline_size } as usize, KERNEL_CMDLINE_SIZE);
    let mut line = vec![0u8; KERNEL_CMDLINE_SIZE + 1];
    ram.read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
        .unwrap();
    line.truncate(line.iter().position(|&b| b == 0).expect("NUL-terminated"));
    let line = String::from_utf8(line).unwrap();
    // Ours, then the TSC frequency the VMM adds (the guest has no kvmclock).
    let khz = line
        .strip_prefix(CMDLINE)
        .and_then(|rest| rest.strip_prefix(" tsc_early_khz="))
        .and_then(|khz| khz.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("unexpected command line {line:?}"));
    assert!(khz > 100_000, "a TSC of {khz} kHz");
    let initrd = written[3];
    assert_eq!({ hdr.ramdisk_image } as u64, initrd.start());
    assert_eq!({ hdr.ramdisk_size }, 3 * 4096 + 17);
    assert_eq!(
        initrd.end(),
        RAM_SIZE,
        "the initramfs sits at the top of RAM"
    );
    let ramdisk_byte: u8 = ram.read_obj(GuestAddress(initrd.start() + 4096)).unwrap();
    assert_eq!(ramdisk_byte, 0x5a);

    // The ACPI tables: the RSDP where the kernel scans for it, and in the zero page.
    assert_eq!({ params.acpi_rsdp_addr }, ACPI_TABLES_ADDR);
    let mut signature = [0u8; 8];
    ram.read_slice(&mut signature, GuestAddress(ACPI_TABLES_ADDR))
        .unwrap();
    assert_eq!(&signature, b"RSD PTR ");

    // RAM, the legacy BIOS hole, RAM: nothing else, nothing past the end.
    let e820: Vec<_> = params.e820_table[..params.e820_entries as usize]
        .iter()
        .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
        .collect();
    assert_eq!(
        e820,
        [
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x10_0000 - 0x9_fc00, 2),
            (0x10_0000, RAM_SIZE - 0x10_0000, 1)
        ]
    );
    // A page nobody loaded is private: the host cannot read it.
    let err = ram.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap_err();
    assert!(private_page_refusal(&err).is_some(), "{err}");
}

#[test]
fn a_tsc_frequency_on_the_command_line_is_kept() {
    if !common::private_memory_or_skip("a_tsc_frequency_on_the_command_line_is_kept") {
        return;
    }
    let images = images(&RESET, 4096);
    let cmdline = format!("{CMDLINE} tsc_early_khz=1234567");
    let vm = LinuxVm::new(&config(&images, Ram::Shared, &cmdline)).unwrap();
    let ram = vm.memory().guest_memory();
    let mut line = vec![0u8; cmdline.len() + 1];
    ram.memory()
        .read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
        .unwrap();
    assert_eq!(&line[..cmdline.len()], cmdline.as_bytes());
    assert_eq!(line[cmdline.len()], 0);
}

#[test]
fn the_tsc_frequency_goes_before_the_init_arguments() {
    if !common::private_memory_or_skip("the_tsc_frequency_goes_before_the_init_arguments") {
        return;
    }
    let images = images(&RESET, 4096);
    let cmdline = format!("{CMDLINE} -- init-arg");
    let vm = LinuxVm::new(&config(&images, Ram::Shared, &cmdline)).unwrap();
    let ram = vm.memory().guest_memory();
    let mut line = vec![0u8; 200];
    ram.memory()
        .read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
        .unwrap();
    let end = line.iter().position(|&b| b == 0).unwrap();
    let line = String::from_utf8_lossy(&line[..end]).into_owned();
    let (boot, init) = line.split_once(" -- ").expect("init arguments kept");
    assert!(
        boot.starts_with(CMDLINE) && boot.contains(" tsc_early_khz="),
        "{line}"
    );
    assert_eq!(init, "init-arg");
}

#[test]
fn with_shared_ram_nothing_is_private() {
    if !common::private_memory_or_skip("with_shared_ram_nothing_is_private") {
        return;
    }
    let images = images(&RESET, 4096);
    let vm = LinuxVm::new(&config(&images, Ram::Shared, CMDLINE)).unwrap();
    assert_eq!(vm.memory().private_pages(), 0);
}

#[test]
fn bad_inputs_are_errors_that_say_what_is_wrong() {
    if !common::private_memory_or_skip("bad_inputs_are_errors_that_say_what_is_wrong") {
        return;
    }
    let good = images(&RESET, 4096);

    let missing = std::path::Path::new("/nonexistent/privmem/vmlinuz");
    let err = LinuxVm::new(&LinuxConfig {
        kernel: missing,
        ..config(&good, Ram::Private, CMDLINE)
    })
    .expect_err("a missing kernel is an error");
    assert!(matches!(err, Error::BootFile { .. }));
    assert!(
        err.to_string().contains("/nonexistent/privmem/vmlinuz"),
        "{err}"
    );

    // KVM's paravirtual structures on the dual strategy's private RAM: refused before
    // any file is opened or VM created.
    let err = LinuxVm::new(&LinuxConfig {
        kernel: missing,
        paravirt: true,
        strategy: Some(vm_private_memory::Strategy::Dual),
        ..config(&good, Ram::Private, CMDLINE)
    })
    .expect_err("kvmclock on dual private RAM");
    assert!(matches!(err, Error::ParavirtNeedsInPlace), "{err}");

    let not_a_kernel = file(&[0x11; 8192]);
    let err = LinuxVm::new(&LinuxConfig {
        kernel: not_a_kernel.as_path(),
        ..config(&good, Ram::Private, CMDLINE)
    })
    .expect_err("a file without a setup header is refused");
    assert!(matches!(err, Error::KernelLoad(_)), "{err}");

    let huge = images(&RESET, RAM_SIZE as usize);
    let err = LinuxVm::new(&config(&huge, Ram::Private, CMDLINE))
        .expect_err("an initramfs as large as RAM does not fit");
    assert!(matches!(err, Error::DoesNotFit(..)), "{err}");

    // The kernel's limit (2047 bytes), with the VMM's own tsc_early_khz= counted.
    let long = "x".repeat(KERNEL_CMDLINE_SIZE - 10);
    let err = LinuxVm::new(&config(&good, Ram::Private, &long))
        .expect_err("a command line over the kernel's limit is refused");
    assert!(matches!(err, Error::Cmdline(_)), "{err}");
    let long = "x".repeat(CMDLINE_MAX + 1);
    let err = LinuxVm::new(&config(&good, Ram::Private, &long))
        .expect_err("an overlong command line is refused");
    assert!(matches!(err, Error::Cmdline(_)), "{err}");

    // A 32-bit-only kernel (no XLF_KERNEL_64) has no entry point for us.
    let mut old_kernel = bzimage(&RESET);
    old_kernel[0x236] = 0;
    let old_kernel = file(&old_kernel);
    let err = LinuxVm::new(&LinuxConfig {
        kernel: old_kernel.as_path(),
        ..config(&good, Ram::Private, CMDLINE)
    })
    .expect_err("a kernel without a 64-bit entry point is refused");
    assert!(matches!(err, Error::NotA64BitKernel { .. }), "{err}");

    // An initramfs that would reach down into where the kernel decompresses itself.
    let low = images(&RESET, (RAM_SIZE - (16 << 20)) as usize);
    let err = LinuxVm::new(&config(&low, Ram::Private, CMDLINE))
        .expect_err("an initramfs over the decompression area does not fit");
    assert!(matches!(err, Error::DoesNotFit(..)), "{err}");

    let empty = images(&RESET, 0);
    let err = LinuxVm::new(&config(&empty, Ram::Private, CMDLINE))
        .expect_err("an empty initramfs is refused");
    assert!(matches!(err, Error::EmptyInitramfs(_)), "{err}");

    let err = LinuxVm::new(&config(&good, Ram::Private, "quiet\u{1}"))
        .expect_err("a control character in the command line is refused");
    assert!(matches!(err, Error::Cmdline(_)), "{err}");

    let err = LinuxVm::new(&LinuxConfig {
        ram_size: RAM_SIZE + 100,
        ..config(&good, Ram::Private, CMDLINE)
    })
    .expect_err("RAM that is not a whole number of pages is refused");
    assert!(matches!(err, Error::Backend(_)), "{err}");

    let err = LinuxVm::new(&LinuxConfig {
        ram_size: 0,
        ..config(&good, Ram::Private, CMDLINE)
    })
    .expect_err("no RAM is refused");
    assert!(matches!(err, Error::Backend(_)), "{err}");
}

/// The ordinary VM, the peer of private memory: the same machine on vm-memory's plain
/// anonymous memory. The stand-in runs to its reset, and the host reads every page,
/// loaded or not (on private RAM a page nobody loaded is refused, above).
#[test]
fn the_same_machine_runs_on_anonymous_memory() {
    let images = images(&print_then(b"plain\n", &RESET), 4096);
    let mut vm = LinuxVm::new_anonymous(&config(&images, Ram::Shared, CMDLINE)).unwrap();
    let mut lines = Vec::new();
    let run = vm
        .run(Duration::from_secs(60), |line, memory: &GuestMemoryMmap| {
            assert_eq!(memory.num_regions(), 1);
            lines.push(line.to_owned());
        })
        .unwrap();
    assert_eq!(run.exit, LinuxExit::Reset);
    assert_eq!(lines, ["plain"]);
    assert!(!run.converted(), "{:?}", run.conversions);
    let ram = vm.memory();
    for gpa in (0..RAM_SIZE).step_by(PAGE_SIZE as usize) {
        ram.read_obj::<u64>(GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("page {gpa:#x}: {e}"));
    }
    // The loader wrote the same boot parameters it writes into private memory.
    let params: boot_params = ram.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
    assert_eq!(vm.host_written().len(), 4);
}

/// Anonymous RAM cannot be private: a config that asks for private RAM or a strategy is
/// refused before anything is made (the missing kernel is never opened), not quietly
/// booted on all-shared memory.
#[test]
fn anonymous_ram_refuses_a_config_for_private_memory() {
    let missing = std::path::Path::new("/nonexistent/privmem/vmlinuz");
    let good = images(&RESET, 4096);
    for (ram, strategy) in [
        (Ram::Private, None),
        (Ram::Shared, Some(Strategy::InPlace)),
        (Ram::Shared, Some(Strategy::Dual)),
        (Ram::Private, Some(Strategy::InPlace)),
    ] {
        let err = LinuxVm::new_anonymous(&LinuxConfig {
            kernel: missing,
            strategy,
            ..config(&good, ram, CMDLINE)
        })
        .expect_err("refused");
        assert!(
            matches!(err, Error::NotAnonymous { ram: r, strategy: s } if r == ram && s == strategy),
            "{ram:?} {strategy:?}: {err}"
        );
        assert!(err.to_string().contains("LinuxVm::new"), "{err}");
    }
}

#[test]
fn anonymous_ram_of_a_size_the_machine_cannot_have_is_refused() {
    let good = images(&RESET, 4096);
    for (size, what) in [
        (0, "no RAM"),
        (RAM_SIZE + 100, "whole number"),
        ((3 << 30) + PAGE_SIZE, "MMIO hole"),
        (u64::MAX - (PAGE_SIZE - 1), "MMIO hole"),
    ] {
        let err = LinuxVm::new_anonymous(&LinuxConfig {
            ram_size: size,
            ..config(&good, Ram::Shared, CMDLINE)
        })
        .expect_err("refused");
        assert!(
            matches!(err, Error::RamSize { size: s, .. } if s == size),
            "{size:#x}: {err}"
        );
        assert!(err.to_string().contains(what), "{err}");
    }
    let missing = std::path::Path::new("/nonexistent/privmem/vmlinuz");
    let err = LinuxVm::new_anonymous(&LinuxConfig {
        kernel: missing,
        ..config(&good, Ram::Shared, CMDLINE)
    })
    .expect_err("a missing kernel is an error");
    assert!(matches!(err, Error::BootFile { .. }), "{err}");
}
