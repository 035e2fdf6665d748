// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Boot time of a stock Linux kernel on private memory against the same kernel on
//! shared memory, on each strategy the kernel has (dual; in place on 7.x, also with
//! kvmclock), and against the ordinary VM on plain anonymous memory (vm-memory's
//! `GuestMemoryMmap`, with and without kvmclock): from `LinuxVm::new` (VM, memory,
//! loading) to the guest's marker line.
//!
//! Runs inside the nested lab (`bash fixtures/lab/run.sh --bench`), the only place our
//! machines boot Linux; elsewhere it prints SKIPPED and measures nothing.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use guest_memfd::Capabilities;
use integration::linux::{
    console_summary, lab_cpu_crash, lab_guest_images, GuestRam, LinuxConfig, LinuxVm, Ram,
    GUEST_UP_MARKER, LAB_BOOT_ATTEMPTS, LAB_BOOT_DEADLINE, LAB_CMDLINE,
};
use integration::Error;
use vm_private_memory::Strategy;

const RAM_SIZE: u64 = 256 << 20;

/// What a case's guest RAM is.
#[derive(Clone, Copy)]
enum Backing {
    /// `vm-private-memory` with this strategy.
    Private(Strategy),
    /// An ordinary VM's anonymous memory (`LinuxVm::new_anonymous`).
    Anonymous,
}
use Backing::{Anonymous, Private};

/// Boots once to the marker; a boot that hangs or stops without its marker (the lab's
/// emulated CPU, now and then, on every backing: [`LAB_BOOT_ATTEMPTS`]) is not timed,
/// reported on stderr with what its console says, and tried again:
/// [`LAB_BOOT_ATTEMPTS`] boots in all, each given [`LAB_BOOT_DEADLINE`].
fn boot_to_marker<M: GuestRam>(
    case: &str,
    config: &LinuxConfig,
    new: fn(&LinuxConfig) -> integration::Result<LinuxVm<M>>,
) -> Duration {
    for attempt in 1..=LAB_BOOT_ATTEMPTS {
        let start = Instant::now();
        let mut vm = new(config).expect("the guest loads");
        let mut marker = None;
        let last = attempt == LAB_BOOT_ATTEMPTS;
        match vm.run(LAB_BOOT_DEADLINE, |line, _| {
            if marker.is_none() && line.contains(GUEST_UP_MARKER) {
                marker = Some(start.elapsed());
            }
        }) {
            Ok(_) if marker.is_some() => return marker.expect("just seen"),
            // Only a crash the lab's CPU makes (the tests allow one per test, too).
            Ok(run) if !last && lab_cpu_crash(&run, &vm.console().text()).is_some() => {
                eprintln!(
                    "LINUX-BOOT-CRASHED ram={case} attempt={attempt} console_says={:?}, not timed",
                    console_summary(&vm.console().text())
                )
            }
            Ok(run) => panic!(
                "no marker (stopped {:?}, conversions {:?}); console:\n{}",
                run.exit,
                run.conversions,
                vm.console().text()
            ),
            Err(Error::Timeout {
                rip, console_tail, ..
            }) if !last => eprintln!(
                "LINUX-BOOT-HUNG ram={case} attempt={attempt} rip={rip:#x} console_says={:?}, \
                 not timed",
                console_summary(&console_tail)
            ),
            Err(e) => panic!("the guest did not run to its stop: {e}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

fn linux_boot(c: &mut Criterion) {
    let kvm = kvm_ioctls::Kvm::new().expect("the benchmarks need /dev/kvm");
    let dual = kvm
        .create_vm_with_type(kvm_bindings::KVM_X86_SW_PROTECTED_VM.into())
        .is_ok_and(|vm| Capabilities::of_vm(&vm).dual_capable());
    let in_place = kvm
        .create_vm()
        .is_ok_and(|vm| Capabilities::of_vm(&vm).in_place_capable());
    let Some((kernel, initrd)) = lab_guest_images().filter(|_| dual || in_place) else {
        println!(
            "SKIPPED linux_boot: needs the nested lab (a KVM that runs guest kernels, and a \
             guest kernel in /lab/guest): bash fixtures/lab/run.sh --bench"
        );
        return;
    };
    // Each strategy the kernel has, private and shared, in one run; in place also with
    // KVM's paravirtual structures (kvmclock), which only in-place memory can keep.
    let mut cases = Vec::new();
    if dual {
        cases.push(("dual/private", Private(Strategy::Dual), Ram::Private, false));
        cases.push(("dual/shared", Private(Strategy::Dual), Ram::Shared, false));
    }
    if in_place {
        cases.push((
            "in-place/private",
            Private(Strategy::InPlace),
            Ram::Private,
            false,
        ));
        cases.push((
            "in-place/shared",
            Private(Strategy::InPlace),
            Ram::Shared,
            false,
        ));
        cases.push((
            "in-place/private-kvmclock",
            Private(Strategy::InPlace),
            Ram::Private,
            true,
        ));
    }
    // The ordinary VM on anonymous memory, without and with kvmclock: the peer of both.
    cases.push(("anonymous", Anonymous, Ram::Shared, false));
    cases.push(("anonymous-kvmclock", Anonymous, Ram::Shared, true));
    let mut group = c.benchmark_group("linux_boot_256MiB");
    group.sampling_mode(SamplingMode::Flat);
    for (name, backing, ram, paravirt) in cases {
        let strategy = match backing {
            Private(strategy) => Some(strategy),
            Anonymous => None,
        };
        let config = LinuxConfig {
            kernel: &kernel,
            initrd: &initrd,
            cmdline: LAB_CMDLINE,
            ram_size: RAM_SIZE,
            ram,
            echo_console: false,
            paravirt,
            strategy,
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| match backing {
                        Private(_) => boot_to_marker(name, &config, LinuxVm::new),
                        Anonymous => boot_to_marker(name, &config, LinuxVm::new_anonymous),
                    })
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // One boot per sample, ten samples a side: each boot takes seconds.
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .configure_from_args();
    targets = linux_boot
}
criterion_main!(benches);
