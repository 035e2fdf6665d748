// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Converting 1 GiB between private and shared (in-place strategy, content discarded),
//! in one call and in 4 KiB steps, against the raw system calls the conversion must make
//! (one punch-hole `fallocate` per changed range) on a guest_memfd of the same size and
//! flags, bound to a memslot of the same VM as ours is (a punch in a bound file makes KVM
//! invalidate its mappings; the peer must pay for that too).
//! Before each timed pass the file is fully allocated again (untimed), so each pass frees
//! real memory, like the conversion of pages a guest had touched.
//!
//! `convert_1GiB` measures this crate's conversion bookkeeping against the raw punches,
//! so it runs on every host: on a host whose KVM lacks in-place guest_memfd, both sides
//! run on the stand-in for KVM (`benches::memory_vm`), the group is named
//! `convert_1GiB_stand-in`, and both punch the stand-in's memfds (shmem), whose memslot
//! binding is only recorded: no KVM invalidation is in either side's figure.
//! `convert_1GiB_to_private_device_thread_running` measures a kernel cost (the
//! `membarrier(2)` a conversion to private adds while a device thread accesses guest
//! memory, on real guest_memfd): it runs on real KVM only, and prints a `SKIPPED` line
//! elsewhere.

use std::hint::black_box;
use std::num::NonZeroU64;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::{slow_criterion, Need};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use guest_memfd::{GuestMemfd, GuestMemfdFlags, Memslot, PageRange, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{MemoryBuilder, PageState, Strategy};

const GIB: u64 = 1 << 30;

fn raw_punch(fd: i32, range: PageRange) {
    // SAFETY: fallocate takes only integers; the fd belongs to a live GuestMemfd.
    let ret = unsafe {
        libc::fallocate64(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            range.start() as i64,
            range.len() as i64,
        )
    };
    assert_eq!(ret, 0, "{}", std::io::Error::last_os_error());
}

fn convert_1gib(c: &mut Criterion) {
    let (vm, backend) = benches::memory_vm("convert");
    let memory = MemoryBuilder::new(vm.clone())
        .region_at(0, GIB)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Private)
        .build()
        .expect("in-place memory (Linux 6.18+, or the stand-in)");
    // The owner's way to the region's file: take the region out and put it back on the
    // same file, keeping a handle to allocate it again before each pass.
    let (range, gmem, offset) = memory.remove_region(0).unwrap();
    memory
        .add_region(range, Some((gmem.clone(), offset)), PageState::Private)
        .unwrap();
    let peer = GuestMemfd::create(
        &*vm,
        GIB,
        GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
    )
    .unwrap();
    let peer_map = peer.map().unwrap();
    // Guest-physical addresses stay below 1 TiB: the lab's L1 (QEMU TCG, 40 physical
    // address bits) refuses memslots past it.
    let peer_slot = Memslot::new(100, PageRange::new(4 * GIB, GIB).unwrap(), &peer, 0)
        .unwrap()
        .with_userspace_mapping(&peer_map)
        .unwrap();
    // SAFETY: `peer_map` lives until the end of this function, after the slot is unbound.
    unsafe { peer_slot.bind(&*vm) }.unwrap();
    let whole = PageRange::new(0, GIB).unwrap();

    let mut group = c.benchmark_group(backend.group("convert_1GiB"));
    group.throughput(Throughput::Bytes(GIB));
    for (name, step_pages) in [("one_call", GIB / PAGE_SIZE), ("4KiB_steps", 1)] {
        let step = NonZeroU64::new(step_pages).unwrap();
        group.bench_function(BenchmarkId::new("raw_fallocate", name), |b| {
            b.iter_custom(|iters| {
                timed_passes(
                    iters,
                    || {
                        peer.allocate(whole).unwrap();
                    },
                    || {
                        for piece in whole.chunks(step) {
                            raw_punch(peer.as_raw_fd(), piece);
                        }
                    },
                )
            })
        });
        group.bench_function(
            BenchmarkId::new("PrivateMemoryManager::convert", name),
            |b| {
                b.iter_custom(|iters| {
                    // Each pass turns every page the other way, so every pass changes every
                    // page.
                    let to = std::cell::Cell::new(PageState::Private);
                    timed_passes(
                        iters,
                        || {
                            gmem.allocate(whole).unwrap();
                            to.set(
                                memory
                                    .state_of(0)
                                    .expect("page 0 is guest memory")
                                    .flipped(),
                            );
                        },
                        || {
                            for piece in whole.chunks(step) {
                                memory.convert(piece, to.get()).unwrap();
                            }
                        },
                    )
                })
            },
        );
    }
    group.finish();

    if !benches::kernel_has(
        "convert_1GiB_to_private_device_thread_running",
        Need::InPlace,
    ) {
        peer_slot.unbind(&*vm).unwrap();
        return;
    }
    // Conversions to private wait out host accesses in flight; while another thread of
    // the process has accessed guest memory, that costs one membarrier(2) per
    // conversion. Here a device thread keeps reading a page of another memory; the peer
    // makes the same punches plus the same membarrier call, with the same thread running.
    let device_memory = MemoryBuilder::new(Arc::new(benches::vm()))
        .region_at(8 * GIB, 2 << 20)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let device = {
        let (view, stop) = (device_memory.guest_memory(), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                black_box(
                    view.memory()
                        .read_obj::<u64>(GuestAddress(8 * GIB))
                        .unwrap(),
                );
            }
        })
    };
    let mut group = c.benchmark_group("convert_1GiB_to_private_device_thread_running");
    group.throughput(Throughput::Bytes(GIB));
    let step = NonZeroU64::new(1).unwrap();
    group.bench_function(
        BenchmarkId::new("raw_fallocate_and_membarrier", "4KiB_steps"),
        |b| {
            b.iter_custom(|iters| {
                timed_passes(
                    iters,
                    || {
                        peer.allocate(whole).unwrap();
                    },
                    || {
                        for piece in whole.chunks(step) {
                            raw_punch(peer.as_raw_fd(), piece);
                            raw_membarrier();
                        }
                    },
                )
            })
        },
    );
    group.bench_function(
        BenchmarkId::new("PrivateMemoryManager::convert", "4KiB_steps"),
        |b| {
            b.iter_custom(|iters| {
                timed_passes(
                    iters,
                    || {
                        memory.convert(whole, PageState::Shared).unwrap();
                        gmem.allocate(whole).unwrap();
                    },
                    || {
                        for piece in whole.chunks(step) {
                            memory.convert(piece, PageState::Private).unwrap();
                        }
                    },
                )
            })
        },
    );
    group.finish();
    stop.store(true, Ordering::Relaxed);
    device.join().unwrap();
    peer_slot.unbind(&*vm).unwrap();
}

/// The time of `iters` passes of `pass`, each after an untimed `setup`.
fn timed_passes(iters: u64, mut setup: impl FnMut(), mut pass: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        setup();
        let start = Instant::now();
        pass();
        total += start.elapsed();
    }
    total
}

/// `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, the call a conversion to private adds
/// while other threads access guest memory (the process registered for it when the
/// device thread made its first access). On a kernel without `membarrier` (`ENOSYS`) or
/// without its expedited command (`EINVAL`), a full fence instead, as the crate makes
/// where its registration failed, said once; any other failure is a broken benchmark.
fn raw_membarrier() {
    static SAID: std::sync::Once = std::sync::Once::new();
    // SAFETY: integers only.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            libc::MEMBARRIER_CMD_PRIVATE_EXPEDITED,
            0,
            0,
        )
    };
    if ret != 0 {
        let err = std::io::Error::last_os_error();
        assert!(
            matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)),
            "membarrier: {err}"
        );
        SAID.call_once(|| println!("membarrier is not here ({err}): the peer fences instead"));
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

criterion_group! {
    name = benches;
    config = slow_criterion();
    targets = convert_1gib
}
criterion_main!(benches);
