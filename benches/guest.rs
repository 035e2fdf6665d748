// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest-visible costs, on real KVM, each against its peer in the same run:
//! - first touch (CPL3) of 256 MiB of private memory (`PrivateGuest`, in-place) against
//!   the same guest program on anonymous memory;
//! - a conversion round trip (request by KVM_HC_MAP_GPA_RANGE, conversion, resume) of
//!   4 KiB and 2 MiB against a bare port-I/O exit round trip, and against the same
//!   hypercall register traffic for a number the host does not serve;
//! - sustained conversions per second with two vCPUs converting their own 4 KiB pages.

use std::time::{Duration, Instant};

use benches::{slow_criterion, Need};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use guest_memfd::{PageRange, PAGE_SIZE};
use integration::{programs, GuestConfig, NoDevice, PrivateGuest, TestVm, DATA_ADDR};

const TOUCH: u64 = 256 << 20;

fn private_guest(program: &[u8], data_size: u64, vcpus: usize, all_private: bool) -> PrivateGuest {
    PrivateGuest::new(
        program,
        GuestConfig {
            data_size,
            vcpus,
            all_private,
            data_policy: None,
        },
    )
    .expect("in-place memory (Linux 6.18+)")
}

fn first_touch(c: &mut Criterion) {
    if !benches::kernel_has("guest", Need::InPlace) {
        return;
    }
    let mut group = c.benchmark_group("first_touch_256MiB");
    group.throughput(Throughput::Bytes(TOUCH));
    group.bench_function("anonymous", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut vm = TestVm::new(programs::TOUCH, &[DATA_ADDR, TOUCH]).unwrap();
                vm.add_anonymous_memory(1, PageRange::new(DATA_ADDR, TOUCH).unwrap())
                    .unwrap();
                let start = Instant::now();
                let done = vm.run_to_done().unwrap();
                total += start.elapsed();
                assert_eq!(done.rax, TOUCH / PAGE_SIZE);
            }
            total
        })
    });
    group.bench_function("private", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut guest = private_guest(programs::TOUCH, TOUCH, 1, true);
                guest.start(0, &[DATA_ADDR, TOUCH]).unwrap();
                let start = Instant::now();
                let done = guest.vcpu(0).run_to_done(&mut NoDevice).unwrap();
                total += start.elapsed();
                assert_eq!(done.rax, TOUCH / PAGE_SIZE);
            }
            total
        })
    });
    group.finish();
}

/// Runs `exit_loop.S` for `trips` round trips of `mode` over `pages` pages; returns the
/// time of the run.
fn exit_loop(pages: u64, trips: u64, mode: u64) -> Duration {
    let mut guest = private_guest(programs::EXIT_LOOP, 2 << 20, 1, false);
    guest.start(0, &[DATA_ADDR, pages, trips, mode]).unwrap();
    let start = Instant::now();
    let done = guest.vcpu(0).run_to_done(&mut NoDevice).unwrap();
    let elapsed = start.elapsed();
    assert_eq!(done.rax, trips);
    elapsed
}

fn round_trips(c: &mut Criterion) {
    if !benches::kernel_has("guest", Need::InPlace) {
        return;
    }
    let mut group = c.benchmark_group("round_trip");
    group.bench_function(BenchmarkId::new("bare_port_exit", "-"), |b| {
        b.iter_custom(|iters| exit_loop(1, iters, 0))
    });
    group.bench_function(BenchmarkId::new("unserved_hypercall", "-"), |b| {
        b.iter_custom(|iters| exit_loop(1, iters, 2))
    });
    for (name, pages) in [("4KiB", 1), ("2MiB", 512)] {
        group.bench_function(BenchmarkId::new("conversion", name), |b| {
            b.iter_custom(|iters| exit_loop(pages, iters, 1))
        });
    }
    group.finish();
}

fn sustained(c: &mut Criterion) {
    if !benches::kernel_has("guest", Need::InPlace) {
        return;
    }
    const PER_VCPU: u64 = 20_000;
    let mut group = c.benchmark_group("sustained_conversions");
    group.throughput(Throughput::Elements(2 * PER_VCPU));
    group.bench_function("two_vcpus_4KiB", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut guest = private_guest(programs::EXIT_LOOP, 2 << 20, 2, false);
                for i in 0..2u64 {
                    guest
                        .start(i as usize, &[DATA_ADDR + i * PAGE_SIZE, 1, PER_VCPU, 1])
                        .unwrap();
                }
                let vcpus = guest.take_vcpus();
                let start = Instant::now();
                let threads: Vec<_> = vcpus
                    .into_iter()
                    .map(|mut vcpu| {
                        std::thread::spawn(move || vcpu.run_to_done(&mut NoDevice).unwrap().rax)
                    })
                    .collect();
                for t in threads {
                    assert_eq!(t.join().unwrap(), PER_VCPU);
                }
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = slow_criterion();
    targets = first_touch, round_trips, sustained
}
criterion_main!(benches);
