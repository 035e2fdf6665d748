// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Discarding (punching) 1 GiB of guest_memfd through `GuestMemfd::discard`, against the
//! raw `fallocate(PUNCH_HOLE | KEEP_SIZE)` calls on the same file, in 4 KiB steps, 2 MiB
//! steps and one call. Before every timed pass the whole file is allocated again
//! (untimed), so each pass frees real memory.

use std::num::NonZeroU64;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use benches::{slow_criterion, vm, Need};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use guest_memfd::{GuestMemfd, GuestMemfdFlags, PAGE_SIZE};

const GIB: u64 = 1 << 30;

fn raw_punch(fd: i32, offset: u64, len: u64) {
    // SAFETY: fallocate takes only integers; the fd belongs to a live GuestMemfd.
    let ret = unsafe {
        libc::fallocate64(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    assert_eq!(ret, 0, "fallocate: {}", std::io::Error::last_os_error());
}

fn timed_passes(gmem: &GuestMemfd, iters: u64, mut pass: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        gmem.allocate(gmem.whole()).expect("allocate 1 GiB");
        let start = Instant::now();
        pass();
        total += start.elapsed();
    }
    total
}

fn discard_1gib(c: &mut Criterion) {
    if !benches::kernel_has("discard", Need::GuestMemfd) {
        return;
    }
    let vm = vm();
    let gmem = GuestMemfd::create(&vm, GIB, GuestMemfdFlags::empty()).unwrap();
    let fd = gmem.as_raw_fd();
    let whole = gmem.whole();

    let mut group = c.benchmark_group("discard_1GiB");
    group.throughput(Throughput::Bytes(GIB));
    for (name, step_pages) in [
        ("4KiB_steps", 1),
        ("2MiB_steps", 512),
        ("one_call", GIB / PAGE_SIZE),
    ] {
        let step = NonZeroU64::new(step_pages).unwrap();
        group.bench_function(BenchmarkId::new("raw_fallocate", name), |b| {
            b.iter_custom(|iters| {
                timed_passes(&gmem, iters, || {
                    for piece in whole.chunks(step) {
                        raw_punch(fd, piece.start(), piece.len());
                    }
                })
            })
        });
        group.bench_function(BenchmarkId::new("GuestMemfd::discard", name), |b| {
            b.iter_custom(|iters| {
                timed_passes(&gmem, iters, || {
                    for piece in whole.chunks(step) {
                        gmem.discard(piece).unwrap();
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = slow_criterion();
    targets = discard_1gib
}
criterion_main!(benches);
