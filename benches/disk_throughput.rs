// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Disk throughput of a Linux guest (the lab's converting guest kernel, with a virtio-blk
//! disk on virtio-mmio) on this project's memory against an ordinary VM, the same guest
//! work in every case: sequential reads and writes in 1 MiB `O_DIRECT` requests and
//! random 4 KiB `O_DIRECT` reads (`privmem-disk-load` inside the guest, timed by the
//! guest's clock), for
//!
//! - `anonymous`: an ordinary VM on anonymous memory (`LinuxVm::new_anonymous`), the
//!   guest not bouncing;
//! - `anonymous_swiotlb`: the same with `swiotlb=force`, the peer every other case is
//!   reported against: the same bounce copies, so the ratio isolates this project's cost;
//! - `shared_swiotlb`: our memory all shared (no private page, no conversion), with
//!   `swiotlb=force`;
//! - `converting`: our memory all private, the guest converting (`kvm_sw_protected`):
//!   its swiotlb pool and rings shared by `KVM_HC_MAP_GPA_RANGE`, its I/O bounced;
//! - `converting_on_shared`: the same guest on our memory all shared (its conversions
//!   change nothing), which tells the guest's confidential mode from private memory.
//!
//! on the strategy the harness picks (dual in the lab's first pass, in place with
//! `PRIVMEM_STRATEGY=in-place`). The cases take turns, [`ROUNDS`] rounds; each line
//! printed is one boot, and the summary gives each case's median and the median of its
//! per-round ratios to `anonymous_swiotlb` (of the warm pass: the guest does the work
//! twice, and the first pass also pays the first touch of the pages its bounce buffers
//! were given when shared; its ratios are printed as `cold`), with the conversions per
//! second during boot,
//! the longest hold of the conversion lock and the device's share of time in `Bytes`
//! calls on guest memory.
//!
//! Not criterion: one sample is a guest boot (about ten seconds under the lab's TCG) that
//! yields three figures, and criterion wants ten samples per figure. Runs inside the
//! nested lab (`bash fixtures/lab/run.sh --bench`); elsewhere it prints SKIPPED.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use guest_memfd::Capabilities;
use integration::linux::{
    console_field, disk_cmdline, lab_converting_guest, run_until_line, GuestRam, LabRun,
    LinuxConfig, LinuxVm, Ram, LAB_CMDLINE,
};
use vm_memory::GuestMemoryMmap;

const RAM_SIZE: u64 = 256 << 20;
/// The workload: this many MiB read, then written, then random reads over both.
const SEQUENTIAL_MIB: u64 = 32;
const RANDOM_READS: u64 = 1000;
/// Rounds of the four cases.
const ROUNDS: usize = 3;

/// One case's figures from one boot.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    seq_read_mb_s: f64,
    seq_write_mb_s: f64,
    rand_read_iops: f64,
    /// The first pass's, before the bounce buffers' pages were touched.
    cold_seq_read_mb_s: f64,
    cold_seq_write_mb_s: f64,
    cold_rand_read_iops: f64,
    conversions_per_s: f64,
    longest_lock_hold_us: f64,
    bytes_share: f64,
    /// KVM's mappings of the guest's pages at the stop: 2 MiB and 4 KiB entries.
    pages_2m: u64,
    pages_4k: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Anonymous,
    AnonymousSwiotlb,
    SharedSwiotlb,
    Converting,
    ConvertingOnShared,
}

impl Case {
    const ALL: [Case; 5] = [
        Case::Anonymous,
        Case::AnonymousSwiotlb,
        Case::SharedSwiotlb,
        Case::Converting,
        Case::ConvertingOnShared,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Anonymous => "anonymous",
            Case::AnonymousSwiotlb => "anonymous_swiotlb",
            Case::SharedSwiotlb => "shared_swiotlb",
            Case::Converting => "converting",
            Case::ConvertingOnShared => "converting_on_shared",
        }
    }

    fn guest_args(self) -> &'static str {
        match self {
            Case::Anonymous => "",
            Case::AnonymousSwiotlb | Case::SharedSwiotlb => "swiotlb=force",
            Case::Converting | Case::ConvertingOnShared => "kvm_sw_protected",
        }
    }
}

/// The figures of the guest's `PRIVMEM-DISK-LOAD` line, if it printed one without
/// errors: the warm pass's, then the cold pass's.
fn parse_load(line: &str) -> Option<[f64; 6]> {
    if console_field(line, "errors")? != "0" {
        return None;
    }
    let number = |name| console_field(line, name)?.parse().ok();
    Some([
        number("seq_read_mb_s")?,
        number("seq_write_mb_s")?,
        number("rand_read_iops")?,
        number("cold_seq_read_mb_s")?,
        number("cold_seq_write_mb_s")?,
        number("cold_rand_read_iops")?,
    ])
}

/// Runs one case once; panics with the guest's console if its workload failed.
fn run_case(case: Case, kernel: &Path, initrd: &Path, image: &Path) -> Figures {
    let cmdline = format!(
        "{LAB_CMDLINE} {} privmem_job=load privmem_load={SEQUENTIAL_MIB},{RANDOM_READS} \
         privmem_stop=reboot nokaslr {}",
        disk_cmdline(),
        case.guest_args()
    );
    let config = LinuxConfig {
        kernel,
        initrd,
        cmdline: &cmdline,
        ram_size: RAM_SIZE,
        ram: if case == Case::Converting {
            Ram::Private
        } else {
            Ram::Shared
        },
        // The guest prints little (quiet): its boot and its workload line, worth seeing.
        echo_console: true,
        paravirt: false,
        strategy: None,
    };
    let disk = || File::options().read(true).write(true).open(image);
    match case {
        Case::Anonymous | Case::AnonymousSwiotlb => {
            let new = || {
                let mut vm = LinuxVm::<GuestMemoryMmap>::new_anonymous(&config)?;
                vm.attach_disk(disk().expect("the disk image"))?;
                Ok(vm)
            };
            figures(
                case,
                run_until_line("DISK-THROUGHPUT", "PRIVMEM-DISK-LOAD", new, |_, _, _| {}),
            )
        }
        Case::SharedSwiotlb | Case::Converting | Case::ConvertingOnShared => {
            let new = || {
                let mut vm = LinuxVm::new(&config)?;
                vm.attach_disk(disk().expect("the disk image"))?;
                Ok(vm)
            };
            figures(
                case,
                run_until_line("DISK-THROUGHPUT", "PRIVMEM-DISK-LOAD", new, |_, _, _| {}),
            )
        }
    }
}

fn figures<M: GuestRam>(case: Case, lab: integration::Result<LabRun<M>>) -> Figures {
    let lab = lab.unwrap_or_else(|e| panic!("{}: {e}", case.name()));
    let console = lab.vm.console().text();
    let load = console
        .lines()
        .find(|l| l.contains("PRIVMEM-DISK-LOAD"))
        .and_then(parse_load)
        .unwrap_or_else(|| {
            panic!(
                "{}: no clean workload line; console:\n{console}",
                case.name()
            )
        });
    let disk = lab.vm.disk_stats().expect("a disk");
    let conversions = lab.run.conversions;
    if case != Case::Anonymous && case != Case::AnonymousSwiotlb && case != Case::SharedSwiotlb {
        assert!(
            conversions.hypercalls > 0,
            "the converting guest converted nothing"
        );
    }
    let device = disk.total_time.as_secs_f64();
    let stat = |name| {
        lab.vm
            .vm_stats()
            .and_then(|stats| stats.get(name).ok().flatten())
            .unwrap_or(0)
    };
    Figures {
        seq_read_mb_s: load[0],
        seq_write_mb_s: load[1],
        rand_read_iops: load[2],
        cold_seq_read_mb_s: load[3],
        cold_seq_write_mb_s: load[4],
        cold_rand_read_iops: load[5],
        conversions_per_s: conversions.requests_per_second().unwrap_or(0.0),
        longest_lock_hold_us: conversions.longest_lock_hold.as_secs_f64() * 1e6,
        pages_2m: stat("pages_2m"),
        pages_4k: stat("pages_4k"),
        bytes_share: if device > 0.0 {
            (disk.memory_time + disk.queue_time).as_secs_f64() / device
        } else {
            0.0
        },
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The kernel and initramfs, if this host can run the benchmark.
fn lab_or_skip() -> Option<(PathBuf, PathBuf)> {
    lab_converting_guest()
        .map_err(|why| {
            println!("SKIPPED disk_throughput: {why} (bash fixtures/lab/run.sh --bench)")
        })
        .ok()
}

fn main() {
    // `cargo bench` passes --bench (and the lab --noplot); a case's name runs only the
    // cases whose names contain it (`anonymous_swiotlb` always runs: the ratios need it).
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    if let Some(f) = &filter {
        let names: Vec<_> = Case::ALL.iter().map(|c| c.name()).collect();
        assert!(
            names.iter().any(|n| n.contains(f.as_str())),
            "disk_throughput: {f:?} names no case (cases: {names:?}); it takes no other argument"
        );
    }
    let Some((kernel, initrd)) = lab_or_skip() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("privmem-disk-throughput-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Written through, not sparse: every case reads and overwrites allocated blocks.
    let image = dir.join("disk.img");
    let block: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut file = File::create(&image).unwrap();
    for _ in 0..2 * SEQUENTIAL_MIB {
        file.write_all(&block).unwrap();
    }
    drop(file);
    let strategy = {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = integration::private_memory_vm(&kvm).unwrap();
        if Capabilities::of_vm(&vm).dual_capable() {
            "dual"
        } else {
            "in-place"
        }
    };
    let mut results: Vec<Vec<Figures>> = vec![Vec::new(); Case::ALL.len()];
    for round in 1..=ROUNDS {
        for (i, case) in Case::ALL.into_iter().enumerate() {
            let wanted = filter.as_deref().is_none_or(|f| case.name().contains(f));
            if !wanted && case != Case::AnonymousSwiotlb {
                continue;
            }
            println!(
                "DISK-THROUGHPUT-BOOT strategy={strategy} case={} round={round}",
                case.name()
            );
            let f = run_case(case, &kernel, &initrd, &image);
            println!(
                "DISK-THROUGHPUT strategy={strategy} case={} round={round} seq_read_mb_s={:.1} \
                 seq_write_mb_s={:.1} rand_read_iops={:.0} cold_seq_read_mb_s={:.1} \
                 cold_seq_write_mb_s={:.1} cold_rand_read_iops={:.0} conversions_per_s={:.0} \
                 longest_lock_hold_us={:.0} bytes_share={:.3} pages_2m={} pages_4k={}",
                case.name(),
                f.seq_read_mb_s,
                f.seq_write_mb_s,
                f.rand_read_iops,
                f.cold_seq_read_mb_s,
                f.cold_seq_write_mb_s,
                f.cold_rand_read_iops,
                f.conversions_per_s,
                f.longest_lock_hold_us,
                f.bytes_share,
                f.pages_2m,
                f.pages_4k
            );
            results[i].push(f);
        }
    }
    let peer = Case::ALL
        .iter()
        .position(|&c| c == Case::AnonymousSwiotlb)
        .expect("the peer is a case");
    println!("DISK-THROUGHPUT-SUMMARY strategy={strategy} rounds={ROUNDS} (medians; ratios are medians of per-round ratios to anonymous_swiotlb)");
    for (i, case) in Case::ALL.into_iter().enumerate() {
        if results[i].is_empty() {
            continue;
        }
        let metric = |get: fn(&Figures) -> f64| {
            let value = median(results[i].iter().map(get).collect());
            let ratio = median(
                results[i]
                    .iter()
                    .zip(&results[peer])
                    .map(|(ours, theirs)| get(ours) / get(theirs))
                    .collect(),
            );
            (value, ratio)
        };
        let (read, read_ratio) = metric(|f| f.seq_read_mb_s);
        let (write, write_ratio) = metric(|f| f.seq_write_mb_s);
        let (iops, iops_ratio) = metric(|f| f.rand_read_iops);
        let (_, cold_read_ratio) = metric(|f| f.cold_seq_read_mb_s);
        let (_, cold_write_ratio) = metric(|f| f.cold_seq_write_mb_s);
        let (_, cold_iops_ratio) = metric(|f| f.cold_rand_read_iops);
        let plain = |get: fn(&Figures) -> f64| median(results[i].iter().map(get).collect());
        let conv = plain(|f| f.conversions_per_s);
        let hold = plain(|f| f.longest_lock_hold_us);
        let share = plain(|f| f.bytes_share);
        println!(
            "DISK-THROUGHPUT-SUMMARY strategy={strategy} case={} seq_read_mb_s={read:.1} ({read_ratio:.3}x) \
             seq_write_mb_s={write:.1} ({write_ratio:.3}x) rand_read_iops={iops:.0} ({iops_ratio:.3}x) \
             cold ratios {cold_read_ratio:.3}x {cold_write_ratio:.3}x {cold_iops_ratio:.3}x \
             conversions_per_s={conv:.0} longest_lock_hold_us={hold:.0} bytes_share={share:.3}",
            case.name()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
