// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A Linux guest that behaves like a TDX or SEV-SNP guest: the lab's converting guest
//! (`fixtures/lab/converting-guest-7.3.patch`, booted with `kvm_sw_protected`) boots on
//! all-private memory, shares its swiotlb pool and virtqueue rings with real
//! `KVM_HC_MAP_GPA_RANGE` hypercalls that the VMM serves, and does its disk I/O through
//! those shared bounce buffers: a virtio-blk device on virtio-mmio whose requests reach
//! guest memory through the backend's `Bytes`.
//!
//! Runs in the nested lab, which puts the kernel at `/lab/guest/vmlinuz-converting` (or
//! `$PRIVMEM_CONVERTING_KERNEL`) beside the guest's initramfs: on the dual strategy,
//! and with `PRIVMEM_STRATEGY=in-place` on in-place guest_memfd (7.x's in-place pass).
//! On our hosts it prints SKIPPED: their KVM emulates guest CPL0 code and forwards no
//! hypercall.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use guest_memfd::PAGE_SIZE;
use integration::linux::{
    console_field, disk_cmdline, lab_converting_guest, run_until_line, ConversionStats,
    LinuxConfig, LinuxExit, LinuxRun, LinuxVm, Ram, LAB_CMDLINE,
};
use vm_private_memory::Strategy;

const RAM_SIZE: u64 = 256 << 20;
/// The disk: the host's pattern in its first 4 MiB; the guest copies them to 8 MiB.
const DISK_SIZE: u64 = 16 << 20;
const PATTERN: u64 = 4 << 20;
const COPY_AT: u64 = 8 << 20;

/// The converting kernel and the guest's initramfs, if this host can boot them.
fn lab_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    lab_converting_guest()
        .map_err(|why| println!("SKIPPED {test}: {why}"))
        .ok()
}

/// The disk image: a pattern no two nearby sectors share, then zeros.
fn disk_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let pattern: Vec<u8> = (0..PATTERN)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (i >> 9) as u8)
        .collect();
    let path = dir.join("disk.img");
    let mut file = File::create(&path).unwrap();
    file.write_all(&pattern).unwrap();
    file.set_len(DISK_SIZE).unwrap();
    (path, pattern)
}

/// What the guest's console said of its job.
#[derive(Debug, Default)]
struct Job {
    /// `PRIVMEM-CONVERSIONS when=end`: calls, failed, shared_pages.
    conversions: Option<(u64, u64, u64)>,
    /// The `PRIVMEM-BLK-READ` line: the checksum of what the guest read and what its
    /// `dd` said.
    read_says: Option<String>,
    write_status: Option<i32>,
    write_says: String,
    probe: Option<String>,
    done: bool,
    /// Shared pages of the host's memory when the guest reported its count.
    host_shared_pages: u64,
}

/// The converting guest with `args` on its command line and `image` as its disk, run
/// until its job is done; hung boots (the lab's emulated CPU, one in twenty) are booted
/// again.
fn boot(kernel: &Path, initrd: &Path, image: &Path, args: &str) -> (LinuxVm, LinuxRun, Job) {
    // It reboots (the i8042's reset line): the converting kernel's tiny configuration
    // has ACPI without PCI, and cannot load the tables' PCI region handler to power off.
    let cmdline = format!(
        "{LAB_CMDLINE} {} privmem_job=blk privmem_stop=reboot nokaslr {args}",
        disk_cmdline()
    );
    let config = LinuxConfig {
        kernel,
        initrd,
        cmdline: &cmdline,
        ram_size: RAM_SIZE,
        ram: Ram::Private,
        echo_console: true,
        paravirt: false,
        strategy: None,
    };
    let mut job = Job::default();
    let mut current = 0;
    let lab = run_until_line(
        "CONVERTING-GUEST",
        "PRIVMEM-GUEST-DONE",
        || {
            let mut vm = LinuxVm::new(&config)?;
            let disk = File::options().read(true).write(true).open(image).unwrap();
            vm.attach_disk(disk)?;
            Ok(vm)
        },
        |attempt, line, memory| {
            if attempt != current {
                (current, job) = (attempt, Job::default());
            }
            if line.contains("PRIVMEM-CONVERSIONS when=end") {
                let n = |name| {
                    console_field(line, name)
                        .and_then(|v| v.parse().ok())
                        .unwrap()
                };
                job.conversions = Some((n("calls"), n("failed"), n("shared_pages")));
                job.host_shared_pages = RAM_SIZE / PAGE_SIZE - memory.private_pages();
            } else if line.contains("PRIVMEM-BLK-READ") {
                job.read_says = Some(line.to_owned());
            } else if line.contains("PRIVMEM-BLK-WRITE") {
                job.write_status = console_field(line, "status").and_then(|v| v.parse().ok());
                job.write_says = line.to_owned();
            } else if line.contains("PRIVMEM-PROBE") {
                job.probe = Some(line.to_owned());
            }
        },
    )
    .unwrap_or_else(|e| panic!("the converting guest: {e}"));
    job.done = lab.reached;
    (lab.vm, lab.run, job)
}

fn report(strategy: Strategy, what: &str, run: &LinuxRun, vm: &LinuxVm) {
    let c: &ConversionStats = &run.conversions;
    let disk = vm.disk_stats().unwrap();
    println!(
        "CONVERTING-GUEST {what} strategy={strategy} stop_s={:.2} hypercalls={} refused={} \
         asked_shared={} asked_private={} to_shared={} to_private={} per_s={:.0} \
         longest_lock_hold_us={} longest_request_us={} disk_reads={} disk_writes={} \
         disk_failed={} bytes_read={} bytes_written={} memory_us={} queue_us={} disk_us={} \
         total_us={}",
        run.elapsed.as_secs_f64(),
        c.hypercalls,
        c.hypercalls_refused,
        c.pages_asked_shared,
        c.pages_asked_private,
        c.pages_to_shared,
        c.pages_to_private,
        c.requests_per_second().unwrap_or(0.0),
        c.longest_lock_hold.as_micros(),
        c.longest_request.as_micros(),
        disk.reads,
        disk.writes,
        disk.failed,
        disk.bytes_read,
        disk.bytes_written,
        disk.memory_time.as_micros(),
        disk.queue_time.as_micros(),
        disk.disk_time.as_micros(),
        disk.total_time.as_micros(),
    );
}

/// The converting guest shares what a TDX or SNP guest shares (its swiotlb pool, its
/// virtqueue rings) with hypercalls the VMM serves, and its disk I/O goes through those
/// pages: what it reads is the image's, what it writes lands in the image.
#[test]
fn a_converting_guest_shares_its_bounce_buffers_and_its_disk_io_works() {
    let test = "a_converting_guest_shares_its_bounce_buffers_and_its_disk_io_works";
    let Some((kernel, initrd)) = lab_or_skip(test) else {
        return;
    };
    let dir = tempdir(test);
    let (image, pattern) = disk_image(&dir);
    let (vm, run, job) = boot(&kernel, &initrd, &image, "kvm_sw_protected");
    let strategy = vm.memory().strategy();
    report(strategy, "bounced", &run, &vm);
    assert_eq!(run.exit, LinuxExit::Reset, "job: {job:?}");
    assert!(job.done, "the guest's job did not finish: {job:?}");

    // Its conversions arrived as hypercalls and were all served.
    let c = run.conversions;
    let (calls, failed, guest_shared) = job.conversions.expect("the guest's count");
    assert!(c.hypercalls > 0, "no KVM_HC_MAP_GPA_RANGE reached the VMM");
    assert_eq!((c.hypercalls_refused, failed), (0, 0), "{c:?}");
    assert_eq!(calls, c.hypercalls, "the guest's calls and the VMM's");
    // What the guest believes it shared is what it asked the host for.
    assert_eq!(guest_shared, c.pages_asked_shared - c.pages_asked_private);
    // The swiotlb pool (64 MiB at this size) is among it.
    assert!(
        guest_shared >= (64 << 20) / PAGE_SIZE,
        "{guest_shared} pages"
    );
    // The host's pages agree: the loader's shared pages plus what the requests changed.
    // Pages the guest shares that were already shared (the loader's, which it reuses
    // once it has read them) are asked for but change nothing.
    let loaded = vm.host_written().iter().map(|r| r.len()).sum::<u64>() / PAGE_SIZE;
    let changed = c.pages_to_shared - c.pages_to_private;
    assert_eq!(job.host_shared_pages, loaded + changed);
    assert!(changed <= guest_shared && guest_shared - changed <= loaded);

    // The disk: the guest read the pattern and copied it where the host finds it.
    let read = job.read_says.as_deref().expect("the guest's read line");
    assert!(read.contains("4+0 records in"), "{read}");
    assert_eq!(job.write_status, Some(0), "{}", job.write_says);
    let mut copy = vec![0; PATTERN as usize];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut copy, COPY_AT)
        .unwrap();
    assert!(
        copy == pattern,
        "the copy at 8 MiB differs from the pattern"
    );
    let disk = vm.disk_stats().unwrap();
    assert_eq!(disk.failed, 0);
    assert!(
        disk.bytes_read >= PATTERN && disk.bytes_written >= PATTERN,
        "{disk:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same guest with its bounce buffers off for data (`kvm_sw_protected=nobounce`):
/// its data buffers are private. Each such request gets `VIRTIO_BLK_S_IOERR`, the
/// image is not written, the VMM names the guest range and goes on, and so does the
/// guest.
#[test]
fn a_request_into_private_memory_gets_an_io_error_and_nothing_else() {
    let test = "a_request_into_private_memory_gets_an_io_error_and_nothing_else";
    let Some((kernel, initrd)) = lab_or_skip(test) else {
        return;
    };
    let dir = tempdir(test);
    let (image, _) = disk_image(&dir);
    let (mut vm, run, job) = boot(&kernel, &initrd, &image, "kvm_sw_protected=nobounce");
    report(vm.memory().strategy(), "unbounced", &run, &vm);
    assert_eq!(run.exit, LinuxExit::Reset, "job: {job:?}");
    assert!(job.done, "the guest's job did not finish: {job:?}");
    // Both of its dd runs failed with an I/O error: the read and the copy.
    let read = job.read_says.as_deref().expect("the guest's read line");
    assert!(read.contains("Input/output error"), "{read}");
    assert!(
        matches!(job.write_status, Some(status) if status != 0),
        "{}",
        job.write_says
    );
    let mut copy = vec![0xaa; PATTERN as usize];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut copy, COPY_AT)
        .unwrap();
    assert!(
        copy.iter().all(|&b| b == 0),
        "a refused write reached the image"
    );
    let disk = vm.disk_stats().unwrap();
    assert!(disk.failed > 0, "{disk:?}");
    assert_eq!(disk.bytes_written, 0, "{disk:?}");
    let events = vm.take_disk_events();
    for event in &events {
        println!("CONVERTING-GUEST disk event: {event}");
    }
    assert!(
        events.iter().any(|e| e.contains("guest 0x")),
        "no event names a guest range: {events:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A guest that asks to convert a range outside its RAM gets an error answer, the VMM
/// logs the refusal, and both go on: the guest finishes its job.
#[test]
fn a_conversion_outside_ram_is_refused_and_the_guest_goes_on() {
    let test = "a_conversion_outside_ram_is_refused_and_the_guest_goes_on";
    let Some((kernel, initrd)) = lab_or_skip(test) else {
        return;
    };
    let dir = tempdir(test);
    let (image, _) = disk_image(&dir);
    // 1 TiB: far past the guest's 256 MiB, and past the MMIO hole.
    let (vm, run, job) = boot(
        &kernel,
        &initrd,
        &image,
        "kvm_sw_protected privmem_probe=10000000000,16,0",
    );
    report(vm.memory().strategy(), "probed", &run, &vm);
    let probe = job.probe.clone().expect("the guest's probe line");
    let result: i64 = console_field(&probe, "result")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no result in {probe:?}"));
    assert!(result < 0, "the probe was answered {result}: {probe}");
    assert_eq!(
        run.conversions.hypercalls_refused, 1,
        "{:?}",
        run.conversions
    );
    assert!(job.done, "the guest did not go on: {job:?}");
    assert_eq!(job.write_status, Some(0), "{}", job.write_says);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tempdir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("privmem-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
