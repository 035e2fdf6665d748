// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A stock Linux kernel (Debian's cloud kernel) booted by our harness with linux-loader,
//! its RAM in guest_memfd: private except for the pages the host loads, as a TDX or
//! SEV-SNP guest's is; it powers off through ACPI. And the same guest on all-shared
//! memory, and on plain anonymous memory (an ordinary VM), the peers, which reboot. Each
//! prints a `LINUX-BOOT` line with its times and what the host saw at the guest's marker.
//!
//! Runs in the nested lab, which puts the kernel and a busybox initramfs at
//! `/lab/guest/` (or `$PRIVMEM_LINUX_KERNEL`, `$PRIVMEM_LINUX_INITRD`): on the dual
//! strategy, and with `PRIVMEM_STRATEGY=in-place` on in-place guest_memfd (the lab's 7.x
//! in-place pass). On our hosts it prints SKIPPED: their KVM emulates guest CPL0 code,
//! and has no memory attributes.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use guest_memfd::{Capabilities, PAGE_SIZE};
use integration::linux::{
    console_summary, host_unevictable_bytes, lab_cpu_crash, lab_guest_images, GuestRam, KvmStats,
    LinuxConfig, LinuxExit, LinuxRun, LinuxVm, Ram, GUEST_UP_MARKER, LAB_BOOT_ATTEMPTS as ATTEMPTS,
    LAB_BOOT_CRASHES_ALLOWED, LAB_BOOT_DEADLINE as DEADLINE, LAB_CMDLINE,
};
use integration::Error;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vm_private_memory::{private_page_refusal, PageState, PrivateMemoryManager, Strategy};

const RAM_SIZE: u64 = 256 << 20;

/// The kernel and initramfs, if this host can boot them on private memory.
fn lab_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = integration::private_memory_vm(&kvm).expect("a VM for private memory");
    let caps = Capabilities::of_vm(&vm);
    let dual = caps.dual_capable();
    // In place only where asked: the lab's in-place pass, on a kernel that runs guest
    // kernels natively (our hosts' KVM emulates guest CPL0 code). The harness took the
    // default VM type for it above, and refused any other value of the variable.
    let in_place = std::env::var_os(integration::STRATEGY_VAR).is_some() && caps.in_place_capable();
    if !dual && !in_place {
        println!(
            "SKIPPED {test}: needs a VM type with KVM_MEMORY_ATTRIBUTE_PRIVATE, or \
             PRIVMEM_STRATEGY=in-place on a KVM that runs guest kernels natively; of our \
             machines only the nested lab has either (bash fixtures/lab/run.sh)"
        );
        return None;
    }
    let Some((kernel, initrd)) = lab_guest_images() else {
        println!(
            "SKIPPED {test}: no guest kernel and initramfs at $PRIVMEM_LINUX_KERNEL and \
             $PRIVMEM_LINUX_INITRD or in /lab/guest (the nested lab puts them there)"
        );
        return None;
    };
    Some((kernel, initrd))
}

/// Prints `line` at once, past the test harness's capture (as the guest's console is): a
/// binary killed while hung boots are retried still shows them.
fn report(line: &str) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// What KVM counted over a boot, as `LINUX-BOOT` fields: the page faults it took and
/// fixed (nested ones: the guest's memory is mapped on demand) and the pages it maps
/// with 4 KiB and 2 MiB entries at the stop. A booted kernel has pages mapped.
fn kvm_counts<M: GuestRam>(vm: &LinuxVm<M>) -> String {
    let get = |stats: Option<&KvmStats>, name: &str| {
        stats
            .expect("KVM statistics (Linux 5.14+)")
            .get(name)
            .unwrap()
            .unwrap_or_else(|| panic!("KVM has no statistic {name}"))
    };
    let (taken, fixed) = (
        get(vm.vcpu_stats(), "pf_taken"),
        get(vm.vcpu_stats(), "pf_fixed"),
    );
    let (small, large) = (
        get(vm.vm_stats(), "pages_4k"),
        get(vm.vm_stats(), "pages_2m"),
    );
    let fields = format!("pf_taken={taken} pf_fixed={fixed} pages_4k={small} pages_2m={large}");
    assert!(
        small + large > 0,
        "KVM maps none of a booted kernel's pages: {fields}"
    );
    fields
}

/// The guest's clock source, from its marker line's `clocksource=`.
fn clocksource(line: &str) -> String {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("clocksource="))
        .unwrap_or("unknown")
        .to_owned()
}

/// What the guest's marker line says: `PRIVMEM-GUEST-UP ... used_kib=N`.
fn used_kib(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("used_kib="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no used_kib= in the marker line {line:?}"))
}

/// Bytes the shared side (the dual strategy's sealed memfd) holds; 0 in place, where
/// shared pages live in the guest_memfd.
fn shared_side_bytes(memory: &PrivateMemoryManager) -> u64 {
    let first = memory.regions()[0].start();
    memory
        .backing(first)
        .expect("one region")
        .shared_bytes_held
        .unwrap_or(0)
}

/// What the host saw while the guest waited on its marker line.
#[derive(Debug, Default)]
struct AtMarker {
    seconds: f64,
    used_kib: u64,
    unevictable_growth: u64,
    shared_side: u64,
    private_pages: u64,
    refused_reads: u64,
    readable_pages: u64,
    clocksource: String,
}

/// Boots the guest; a boot that hangs is tried again, up to [`ATTEMPTS`] in all, each
/// hang printed at once as a `LINUX-BOOT-HUNG` line with what its console says; so is
/// one that crashed the way the lab's CPU makes it crash ([`Crash::judge`]).
///
/// In the nested lab about one boot in twenty stops getting timer interrupts early in
/// its boot, on every backing, anonymous memory included: its deferred work never runs
/// (its marker then says `clocksource=tsc-early`, the TSC's refined calibration never
/// having come), and at its first sleep, often the one on its way down, the vCPU sits in
/// the idle loop with nothing left to wake it. That is the lab's TCG-emulated SVM, not
/// the memory under test; any other failure, and a guest that hangs every time, fails
/// the test.
fn boot(
    ram: Ram,
    stop: &str,
    kernel: &PathBuf,
    initrd: &PathBuf,
    paravirt: bool,
) -> (LinuxVm, AtMarker, LinuxExit) {
    let mut crashes = 0;
    for attempt in 1..=ATTEMPTS {
        match boot_once(ram, stop, kernel, initrd, paravirt) {
            Ok(Attempt::Booted(vm, at, exit)) => return (*vm, at, exit),
            Ok(Attempt::NoMarker(crash)) => {
                crash.judge(&format!("{ram:?}"), attempt, &mut crashes);
            }
            Err((
                Error::Timeout {
                    exits,
                    rip,
                    console_tail,
                    ..
                },
                marker,
            )) if attempt < ATTEMPTS => report(&format!(
                "LINUX-BOOT-HUNG ram={ram:?} attempt={attempt} exits={exits} rip={rip:#x} \
                 marker_seen={marker} console_says={:?}",
                console_summary(&console_tail)
            )),
            Err((e, _)) => panic!("boot {attempt} of {ATTEMPTS} on {ram:?} memory: {e}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// How one boot that ran to a stop went.
enum Attempt {
    /// The VM, what the host saw at the marker, how it stopped.
    Booted(Box<LinuxVm>, AtMarker, LinuxExit),
    /// It stopped without printing its marker.
    NoMarker(Crash),
}

/// A boot that stopped without printing its marker.
struct Crash {
    run: LinuxRun,
    console: String,
}

impl Crash {
    /// Reports the crash as a `LINUX-BOOT-CRASHED` line if it may be booted again, and
    /// fails the test if not. It may when it looks like the lab's emulated CPU and
    /// nothing of ours ([`lab_cpu_crash`]), on a boot before the last, and this test has
    /// crashed fewer than [`LAB_BOOT_CRASHES_ALLOWED`] times before.
    fn judge(self, ram: &str, attempt: u32, crashes: &mut u32) {
        let Crash { run, console } = self;
        let fault = lab_cpu_crash(&run, &console);
        assert!(
            fault.is_some() && attempt < ATTEMPTS && *crashes < LAB_BOOT_CRASHES_ALLOWED,
            "boot {attempt} of {ATTEMPTS} on {ram} memory stopped ({:?}, conversions {:?}) \
             without printing {GUEST_UP_MARKER} (crashed boots before it: {crashes}); \
             console:\n{console}",
            run.exit,
            run.conversions
        );
        *crashes += 1;
        report(&format!(
            "LINUX-BOOT-CRASHED ram={ram} attempt={attempt} console_says={:?}",
            fault.unwrap_or_default()
        ));
    }
}

/// One boot; or the error and whether the marker had been seen.
fn boot_once(
    ram: Ram,
    stop: &str,
    kernel: &PathBuf,
    initrd: &PathBuf,
    paravirt: bool,
) -> Result<Attempt, (Error, bool)> {
    // The guest's init stops the way privmem_stop= says (fixtures/lab/guest-init).
    let cmdline = format!("{LAB_CMDLINE} privmem_stop={stop}");
    let config = LinuxConfig {
        kernel,
        initrd,
        cmdline: &cmdline,
        ram_size: RAM_SIZE,
        ram,
        echo_console: true,
        paravirt,
        strategy: None,
    };
    let unevictable_before = host_unevictable_bytes().unwrap();
    let mut vm = LinuxVm::new(&config).unwrap();
    let strategy = vm.memory().strategy();
    let start = Instant::now();
    let mut seen: Option<AtMarker> = None;
    let run = vm
        .run(DEADLINE, |line, memory| {
            if !line.contains(GUEST_UP_MARKER) || seen.is_some() {
                return;
            }
            let mut at = AtMarker {
                seconds: start.elapsed().as_secs_f64(),
                used_kib: used_kib(line),
                clocksource: clocksource(line),
                unevictable_growth: host_unevictable_bytes()
                    .unwrap()
                    .saturating_sub(unevictable_before),
                shared_side: shared_side_bytes(memory),
                private_pages: memory.private_pages(),
                ..AtMarker::default()
            };
            // Every page of guest RAM, read by the host through the backend's Bytes.
            let ram = memory.guest_memory();
            let ram = ram.memory();
            for gpa in (0..RAM_SIZE).step_by(PAGE_SIZE as usize) {
                match ram.read_obj::<u64>(GuestAddress(gpa)) {
                    Ok(_) => at.readable_pages += 1,
                    Err(e) => {
                        assert!(
                            private_page_refusal(&e).is_some(),
                            "page {gpa:#x}: {e} is not a private-page refusal"
                        );
                        assert_eq!(memory.state_of(gpa), Some(PageState::Private));
                        at.refused_reads += 1;
                    }
                }
            }
            seen = Some(at);
        })
        .map_err(|e| (e, seen.is_some()))?;
    let Some(at) = seen else {
        return Ok(Attempt::NoMarker(Crash {
            run,
            console: vm.console().text(),
        }));
    };
    println!(
        "LINUX-BOOT ram={ram:?} marker_s={:.2} stop_s={:.2} exits={} used_kib={} \
         unevictable_growth_kib={} shared_side_kib={} private_pages={} refused_reads={} {} \
         clocksource={} paravirt={} strategy={strategy}",
        at.seconds,
        run.elapsed.as_secs_f64(),
        run.exits,
        at.used_kib,
        at.unevictable_growth >> 10,
        at.shared_side >> 10,
        at.private_pages,
        at.refused_reads,
        kvm_counts(&vm),
        at.clocksource,
        u8::from(paravirt),
    );
    assert!(
        !run.converted(),
        "a stock kernel converts nothing: {:?}",
        run.conversions
    );
    Ok(Attempt::Booted(Box::new(vm), at, run.exit))
}

#[test]
fn a_stock_linux_kernel_boots_on_private_memory() {
    let test = "a_stock_linux_kernel_boots_on_private_memory";
    let Some((kernel, initrd)) = lab_or_skip(test) else {
        return;
    };
    let (vm, at, exit) = boot(Ram::Private, "poweroff", &kernel, &initrd, false);
    assert_eq!(
        exit,
        LinuxExit::PowerOff,
        "the guest's poweroff is a clean stop"
    );
    // Without KVM's paravirtual structures the guest keeps time by the TSC.
    assert_ne!(at.clocksource, "kvm-clock");

    // Only the pages linux-loader wrote are shared; the host reads those, nothing else.
    let host_written: u64 = vm.host_written().iter().map(|r| r.len()).sum();
    assert_eq!(at.readable_pages * PAGE_SIZE, host_written);
    assert_eq!(at.refused_reads, at.private_pages);
    assert_eq!(at.private_pages * PAGE_SIZE + host_written, RAM_SIZE);
    // The shared side holds at most what the host loaded: no page the guest allocated
    // outside the loader's ranges lives there.
    assert!(
        at.shared_side <= host_written,
        "shared side {} bytes, loader wrote {host_written}",
        at.shared_side
    );
    // guest_memfd grew by what the guest touched: at least what it reports in use,
    // less what of that may sit in the loader's (shared) pages it reclaimed.
    let used = at.used_kib << 10;
    assert!(used > 0);
    assert!(
        at.unevictable_growth + host_written >= used,
        "guest_memfd grew {} bytes, the guest uses {used}",
        at.unevictable_growth
    );
    assert!(at.unevictable_growth <= RAM_SIZE + (8 << 20));
}

#[test]
fn the_same_kernel_boots_on_shared_memory_the_peer() {
    let test = "the_same_kernel_boots_on_shared_memory_the_peer";
    let Some((kernel, initrd)) = lab_or_skip(test) else {
        return;
    };
    let (vm, at, exit) = boot(Ram::Shared, "reboot", &kernel, &initrd, false);
    assert_eq!(exit, LinuxExit::Reset, "the guest's reboot is a clean stop");
    assert_eq!(at.private_pages, 0);
    assert_eq!(at.refused_reads, 0);
    match vm.memory().strategy() {
        // Everything the guest touched is in the shared memfd, not in guest_memfd.
        Strategy::Dual => {
            assert!(at.shared_side >= at.used_kib << 10);
            assert!(at.unevictable_growth < at.shared_side / 4);
        }
        // In place, shared pages live in the guest_memfd: it grew by what the guest uses.
        _ => {
            assert_eq!(at.shared_side, 0);
            assert!(at.unevictable_growth >= at.used_kib << 10);
        }
    }
}

/// In place, KVM writes kvmclock and its other paravirtual structures through the
/// guest_memfd's own mapping, so a guest whose RAM is private may keep them: it boots,
/// and runs on kvm-clock.
#[test]
fn a_stock_linux_kernel_boots_with_kvmclock_on_private_in_place_memory() {
    let test = "a_stock_linux_kernel_boots_with_kvmclock_on_private_in_place_memory";
    let Some((kernel, initrd)) = lab_or_skip(test) else {
        return;
    };
    if integration::private_memory_vm(&kvm_ioctls::Kvm::new().unwrap())
        .map(|vm| Capabilities::of_vm(&vm).dual_capable())
        .unwrap()
    {
        println!("SKIPPED {test}: the harness takes the dual strategy here, whose private pages KVM's paravirtual structures cannot reach (the in-place pass runs it)");
        return;
    }
    let (vm, at, exit) = boot(Ram::Private, "poweroff", &kernel, &initrd, true);
    assert_eq!(exit, LinuxExit::PowerOff);
    assert_eq!(vm.memory().strategy(), Strategy::InPlace);
    assert_eq!(
        at.clocksource, "kvm-clock",
        "the guest should run on kvmclock"
    );
    let host_written: u64 = vm.host_written().iter().map(|r| r.len()).sum();
    assert_eq!(at.readable_pages * PAGE_SIZE, host_written);
}

/// With the dual strategy a private page's host mapping is the shared side: KVM's
/// paravirtual structures would land where the guest never reads. Asked for where the
/// harness takes the dual strategy by itself (`strategy: None`), they are refused once
/// the memory says its strategy, before the kernel and initramfs are opened. (With
/// `Some(Strategy::Dual)` they are refused before anything is made: `linux_vmm.rs`.)
#[test]
fn kvmclock_is_refused_on_dual_private_memory() {
    let test = "kvmclock_is_refused_on_dual_private_memory";
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    if !integration::private_memory_vm(&kvm)
        .map(|vm| Capabilities::of_vm(&vm).dual_capable())
        .unwrap()
    {
        println!("SKIPPED {test}: the harness takes the in-place strategy here, where the structures are allowed (needs KVM_X86_SW_PROTECTED_VM with memory attributes: the nested lab's dual pass)");
        return;
    }
    let missing = std::path::Path::new("/nonexistent/privmem/vmlinuz");
    let config = LinuxConfig {
        kernel: missing,
        initrd: missing,
        cmdline: LAB_CMDLINE,
        ram_size: RAM_SIZE,
        ram: Ram::Private,
        echo_console: false,
        paravirt: true,
        strategy: None,
    };
    assert!(matches!(
        LinuxVm::new(&config),
        Err(Error::ParavirtNeedsInPlace)
    ));
}

/// The peer every boot is measured against: the same guest in an ordinary VM on plain
/// anonymous memory (vm-memory's `GuestMemoryMmap`), no guest_memfd anywhere. It
/// reboots, and the host reads every page of its RAM at the marker.
#[test]
fn the_same_kernel_boots_on_anonymous_memory_the_ordinary_vm() {
    let test = "the_same_kernel_boots_on_anonymous_memory_the_ordinary_vm";
    let Some((kernel, initrd)) = lab_or_skip(test) else {
        return;
    };
    let cmdline = format!("{LAB_CMDLINE} privmem_stop=reboot");
    let config = LinuxConfig {
        kernel: &kernel,
        initrd: &initrd,
        cmdline: &cmdline,
        ram_size: RAM_SIZE,
        ram: Ram::Shared,
        echo_console: true,
        paravirt: false,
        strategy: None,
    };
    let mut crashes = 0;
    for attempt in 1..=ATTEMPTS {
        let mut vm = LinuxVm::new_anonymous(&config).unwrap();
        let start = Instant::now();
        let mut seen = None;
        let run = vm.run(DEADLINE, |line, memory: &GuestMemoryMmap| {
            if !line.contains(GUEST_UP_MARKER) || seen.is_some() {
                return;
            }
            let readable = (0..RAM_SIZE)
                .step_by(PAGE_SIZE as usize)
                .filter(|&gpa| memory.read_obj::<u64>(GuestAddress(gpa)).is_ok())
                .count() as u64;
            seen = Some((
                start.elapsed().as_secs_f64(),
                used_kib(line),
                clocksource(line),
                readable,
            ));
        });
        let run = match run {
            Err(Error::Timeout {
                exits,
                rip,
                console_tail,
                ..
            }) if attempt < ATTEMPTS => {
                report(&format!(
                    "LINUX-BOOT-HUNG ram=Anonymous attempt={attempt} exits={exits} rip={rip:#x} \
                     marker_seen={} console_says={:?}",
                    seen.is_some(),
                    console_summary(&console_tail)
                ));
                continue;
            }
            run => run.unwrap_or_else(|e| panic!("boot {attempt} on anonymous memory: {e}")),
        };
        let Some((seconds, used_kib, clocksource, readable)) = seen else {
            let crash = Crash {
                run,
                console: vm.console().text(),
            };
            crash.judge("Anonymous", attempt, &mut crashes);
            continue;
        };
        println!(
            "LINUX-BOOT ram=Anonymous marker_s={seconds:.2} stop_s={:.2} exits={} \
             used_kib={used_kib} readable_pages={readable} {} clocksource={clocksource}",
            run.elapsed.as_secs_f64(),
            run.exits,
            kvm_counts(&vm),
        );
        assert_eq!(
            run.exit,
            LinuxExit::Reset,
            "the guest's reboot is a clean stop"
        );
        assert!(!run.converted(), "{:?}", run.conversions);
        assert!(used_kib > 0);
        assert_eq!(readable * PAGE_SIZE, RAM_SIZE, "every page is the host's");
        assert_ne!(clocksource, "kvm-clock", "paravirt is off");
        return;
    }
    unreachable!("the last attempt returns or panics");
}
