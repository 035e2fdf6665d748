// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Building a sparse 1 TiB guest with `MemoryBuilder` (file, mapping, page bits, memslot),
//! against the raw steps it must take (KVM_CREATE_GUEST_MEMFD, mmap, and
//! KVM_SET_USER_MEMORY_REGION2) in the same run. Each iteration uses a fresh VM.

use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::{slow_criterion, vm, Need};
use criterion::{criterion_group, criterion_main, Criterion};
use guest_memfd::{GuestMemfd, GuestMemfdFlags, Memslot, PageRange};
use vm_private_memory::{MemoryBuilder, PageState, Strategy};

const TIB: u64 = 1 << 40;
/// Where the guest's RAM starts: at 0, so that the 1 TiB ends within 40 bits of
/// guest-physical address space, all the lab's L1 (QEMU TCG) has; KVM refuses a memslot
/// past its host's physical address width.
const BASE: u64 = 0;

fn build_1tib(c: &mut Criterion) {
    if !benches::kernel_has("build_1tib", Need::InPlace) {
        return;
    }
    let mut group = c.benchmark_group("build_1TiB");
    group.bench_function("raw_steps", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let vm = vm();
                let start = Instant::now();
                let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
                let gmem = GuestMemfd::create(&vm, TIB, flags).unwrap();
                let map = gmem.map().unwrap();
                let slot = Memslot::new(0, PageRange::new(BASE, TIB).unwrap(), &gmem, 0)
                    .unwrap()
                    .with_userspace_mapping(&map)
                    .unwrap();
                // SAFETY: `map` outlives the slot: the VM is closed before it is dropped.
                unsafe { slot.bind(&vm) }.unwrap();
                total += start.elapsed();
                drop(vm);
            }
            total
        })
    });
    group.bench_function("MemoryBuilder::build", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let vm = Arc::new(vm());
                let start = Instant::now();
                let memory = MemoryBuilder::new(vm)
                    .region_at(BASE, TIB)
                    .strategy(Strategy::InPlace)
                    .initial_state(PageState::Private)
                    .build()
                    .unwrap();
                total += start.elapsed();
                drop(memory);
            }
            total
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = slow_criterion();
    targets = build_1tib
}
criterion_main!(benches);
