// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! vm-memory `Bytes` on shared pages of a `PrivateMemoryManager` (in-place strategy), against
//! vm-memory's own `GuestMemoryMmap` over anonymous memory of the same size, in the same
//! run: `read_slice` / `write_slice` of 4 KiB, 64 KiB and 1 MiB, and `read_obj::<u64>`
//! (across the 64 MiB, each access missing the cache, and within one cached page, also
//! with a private page elsewhere in the region);
//! then writes with dirty tracking of host writes, both sides on vm-memory's
//! `AtomicBitmap`.
//!
//! This crate's own costs: on a host whose KVM lacks in-place guest_memfd, ours is built
//! on the stand-in for KVM (`benches::memory_vm`), whose guest_memfd is a memfd; the
//! groups' names then end in `_stand-in`. Every page of both memories is touched before
//! any measurement, so neither side's figures include faults.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vm_private_memory::{MemoryBuilder, PageState, Strategy};

const SIZE: u64 = 64 << 20;

fn bytes(c: &mut Criterion) {
    let (vm, backend) = benches::memory_vm("bytes");
    let private = MemoryBuilder::new(vm)
        .region_at(0, SIZE)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .expect("in-place memory (Linux 6.18+, or the stand-in)");
    let atomic = private.guest_memory();
    let ours = atomic.memory();
    let peer = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), SIZE as usize)]).unwrap();
    // Touch every page of both, so no benchmark pays for first faults.
    let ones = vec![1u8; SIZE as usize];
    ours.write_slice(&ones, GuestAddress(0)).unwrap();
    peer.write_slice(&ones, GuestAddress(0)).unwrap();

    for len in [4usize << 10, 64 << 10, 1 << 20] {
        let mut group = c.benchmark_group(backend.group(&format!("bytes_{}KiB", len >> 10)));
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = vec![0u8; len];
        // Walk the 64 MiB so the working set is not one cache-resident buffer.
        let steps = (SIZE as usize / len) as u64;
        let mut i = 0u64;
        group.bench_function(BenchmarkId::new("read_slice", "GuestMemoryMmap"), |b| {
            b.iter(|| {
                i = (i + 1) % steps;
                peer.read_slice(&mut buf, GuestAddress(i * len as u64))
                    .unwrap();
            })
        });
        group.bench_function(
            BenchmarkId::new("read_slice", "PrivateMemoryManager"),
            |b| {
                b.iter(|| {
                    i = (i + 1) % steps;
                    ours.read_slice(&mut buf, GuestAddress(i * len as u64))
                        .unwrap();
                })
            },
        );
        group.bench_function(BenchmarkId::new("write_slice", "GuestMemoryMmap"), |b| {
            b.iter(|| {
                i = (i + 1) % steps;
                peer.write_slice(&buf, GuestAddress(i * len as u64))
                    .unwrap();
            })
        });
        group.bench_function(
            BenchmarkId::new("write_slice", "PrivateMemoryManager"),
            |b| {
                b.iter(|| {
                    i = (i + 1) % steps;
                    ours.write_slice(&buf, GuestAddress(i * len as u64))
                        .unwrap();
                })
            },
        );
        group.finish();
    }

    let mut group = c.benchmark_group(backend.group("read_obj_u64"));
    let mut addr = 0u64;
    group.bench_function("GuestMemoryMmap", |b| {
        b.iter(|| {
            addr = (addr + 4104) % (SIZE - 8);
            black_box(peer.read_obj::<u64>(GuestAddress(addr)).unwrap())
        })
    });
    group.bench_function("PrivateMemoryManager", |b| {
        b.iter(|| {
            addr = (addr + 4104) % (SIZE - 8);
            black_box(ours.read_obj::<u64>(GuestAddress(addr)).unwrap())
        })
    });
    group.finish();

    // The same within one 4 KiB page, which stays in the cache: a device's ring indexes
    // and descriptors. Above, every access misses the cache, and a longer access path
    // overlaps fewer of those misses.
    cached_read_obj(c, &backend.group("read_obj_u64_cached"), &peer, &*ours);

    // The same again with a private page in the region (its last, never read here), as
    // a confidential guest's memory has: each access checks its page's bits rather
    // than the region's count of private pages.
    private
        .convert(
            guest_memfd::PageRange::new(SIZE - 4096, 4096).unwrap(),
            PageState::Private,
        )
        .expect("the last page private");
    cached_read_obj(
        c,
        &backend.group("read_obj_u64_cached_partly_private"),
        &peer,
        &*ours,
    );
}

/// Group `name`: `read_obj::<u64>` walking one 4 KiB page, on `peer` and on `ours`.
fn cached_read_obj(
    c: &mut Criterion,
    name: &str,
    peer: &impl Bytes<GuestAddress, E = vm_memory::GuestMemoryError>,
    ours: &impl Bytes<GuestAddress, E = vm_memory::GuestMemoryError>,
) {
    let mut group = c.benchmark_group(name);
    let mut addr = 0u64;
    group.bench_function("GuestMemoryMmap", |b| {
        b.iter(|| {
            addr = (addr + 8) % 4096;
            black_box(peer.read_obj::<u64>(GuestAddress(addr)).unwrap())
        })
    });
    group.bench_function("PrivateMemoryManager", |b| {
        b.iter(|| {
            addr = (addr + 8) % 4096;
            black_box(ours.read_obj::<u64>(GuestAddress(addr)).unwrap())
        })
    });
    group.finish();
}

/// Writes with dirty tracking: `write_slice` of 4 KiB and `write_obj::<u64>`, on
/// `PrivateMemoryManager<AtomicBitmap>` against `GuestMemoryMmap<AtomicBitmap>`.
fn tracked_writes(c: &mut Criterion) {
    let (vm, backend) = benches::memory_vm("bytes");
    let private = MemoryBuilder::new(vm)
        .region_at(0, SIZE)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build_with_bitmap::<AtomicBitmap>()
        .expect("in-place memory (Linux 6.18+, or the stand-in)");
    let atomic = private.guest_memory();
    let ours = atomic.memory();
    let peer =
        GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), SIZE as usize)]).unwrap();
    let ones = vec![1u8; SIZE as usize];
    ours.write_slice(&ones, GuestAddress(0)).unwrap();
    peer.write_slice(&ones, GuestAddress(0)).unwrap();

    let len = 4usize << 10;
    let steps = (SIZE as usize / len) as u64;
    let buf = vec![0u8; len];
    let mut group = c.benchmark_group(backend.group("tracked_write_slice_4KiB"));
    group.throughput(Throughput::Bytes(len as u64));
    let mut i = 0u64;
    group.bench_function("GuestMemoryMmap<AtomicBitmap>", |b| {
        b.iter(|| {
            i = (i + 1) % steps;
            peer.write_slice(&buf, GuestAddress(i * len as u64))
                .unwrap();
        })
    });
    group.bench_function("PrivateMemoryManager<AtomicBitmap>", |b| {
        b.iter(|| {
            i = (i + 1) % steps;
            ours.write_slice(&buf, GuestAddress(i * len as u64))
                .unwrap();
        })
    });
    group.finish();

    let mut group = c.benchmark_group(backend.group("tracked_write_obj_u64"));
    let mut addr = 0u64;
    group.bench_function("GuestMemoryMmap<AtomicBitmap>", |b| {
        b.iter(|| {
            addr = (addr + 4104) % (SIZE - 8);
            peer.write_obj(black_box(addr), GuestAddress(addr)).unwrap()
        })
    });
    group.bench_function("PrivateMemoryManager<AtomicBitmap>", |b| {
        b.iter(|| {
            addr = (addr + 4104) % (SIZE - 8);
            ours.write_obj(black_box(addr), GuestAddress(addr)).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bytes, tracked_writes);
criterion_main!(benches);
