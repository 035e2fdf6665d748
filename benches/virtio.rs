// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A device's access pattern: a virtio-blk-like device serving write requests from a
//! split virtqueue (rust-vmm's `virtio-queue`) whose rings and buffers are shared pages,
//! on a `PrivateMemoryManager` (in-place strategy, also with private pages beside the
//! shared ones as a confidential guest has them, and dual where the host has memory
//! attributes) against vm-memory's `GuestMemoryMmap` over anonymous memory of the same
//! size and layout, in the same run.
//!
//! Each request is a chain of three descriptors, as a virtio-blk write: a 16-byte
//! request header and a 4 KiB data buffer the device reads, and a status byte it writes.
//! Each iteration, the driver (untimed; a guest's driver writes guest memory directly,
//! not through the VMM's view) posts a batch of 64 chains, whose data buffers walk the
//! 63 MiB after the rings, so the working set is not cache-resident. Then the device
//! (timed) pops every chain with `pop_descriptor_chain`, reads the header with
//! `read_obj`, copies the data out with `read_slice`, checks its tag against the header,
//! writes the status with `write_obj` and returns the chain with `add_used`; then asks
//! `needs_notification`, once per batch. Afterwards (untimed) the driver checks that the
//! used index advanced by the batch, the last used element, and every status byte.
//! Throughput is in requests (chains) per second.
//!
//! This crate's own costs: on a host whose KVM lacks in-place guest_memfd, ours is built
//! on the stand-in for KVM (`benches::memory_vm`, `benches::dual_memory_vm`), and the
//! group's name ends in `_stand-in`. On real KVM the dual strategy needs memory
//! attributes with `PRIVATE`; without them it prints a `NOT MEASURED` line and the group
//! measures the in-place strategy alone. Every page of every memory is touched before
//! any measurement.

use std::hint::black_box;
use std::mem::size_of;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryMmap};
use vm_private_memory::{MemoryBuilder, PageState, Strategy};

/// Guest memory: one region at guest-physical 0.
const SIZE: u64 = 64 << 20;
/// Private pages past `SIZE` in the partly private variant.
const PRIVATE_TAIL: u64 = 2 << 20;
/// The queue's size (descriptors, and entries of each ring).
const QUEUE_SIZE: u16 = 256;
/// Chains posted per batch (three descriptors each: 192 of the 256).
const BATCH: u16 = 64;
/// The descriptor table (256 x 16 bytes).
const DESC_TABLE: u64 = 0x0;
/// The available ring (flags, idx, 256 x u16, used_event).
const AVAIL: u64 = 0x1000;
/// The used ring (flags, idx, 256 x 8 bytes, avail_event).
const USED: u64 = 0x2000;
/// The request headers, one per chain of a batch.
const HEADERS: u64 = 0x4000;
/// The status bytes, one per chain of a batch.
const STATUS: u64 = 0x5000;
/// The data buffers: the rest of the memory.
const DATA: u64 = 1 << 20;
/// The length of each data buffer.
const DATA_LEN: u32 = 4096;
/// How many data buffers the batches walk.
const BUFFERS: u64 = (SIZE - DATA) / DATA_LEN as u64;

/// `VRING_DESC_F_NEXT` (virtio 1.2, 2.7.5): the chain goes on at `next`.
const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`: the device writes this buffer.
const F_WRITE: u16 = 2;
/// `VIRTIO_BLK_T_OUT` (virtio 1.2, 5.2.6): a write request.
const BLK_T_OUT: u32 = 1;
/// `VIRTIO_BLK_S_OK`.
const BLK_S_OK: u8 = 0;
/// `VIRTIO_BLK_S_IOERR`.
const BLK_S_IOERR: u8 = 1;
/// What the driver puts in the status bytes before posting: neither answer.
const STATUS_UNSET: u8 = 0xff;

/// `struct virtio_blk_outhdr` (virtio 1.2, 5.2.6), little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BlkOutHdr {
    request_type: u32,
    ioprio: u32,
    sector: u64,
}

// SAFETY: `BlkOutHdr` is `repr(C)` with plain integer fields and no padding (4 + 4 + 8
// bytes, the u64 at an 8-byte offset), so every byte pattern is a valid value.
unsafe impl ByteValued for BlkOutHdr {}

/// The driver and the device of one queue on one memory.
#[derive(Debug)]
struct Blk {
    /// The device's side of the queue.
    queue: Queue,
    /// The driver's next available index.
    avail_idx: u16,
    /// Batches posted so far: where the next one's data buffers start.
    batches: u64,
    /// The device's buffer, which each request's data is copied into.
    data: Vec<u8>,
}

impl Blk {
    /// Touches every page of `mem` (zeroes), tags each data buffer with its number,
    /// writes the descriptors that never change (headers and status), and sets up the
    /// device's queue on the rings.
    fn new<M: GuestMemory>(mem: &M) -> Self {
        mem.write_slice(&vec![0u8; SIZE as usize], GuestAddress(0))
            .unwrap();
        for slot in 0..BUFFERS {
            mem.write_obj(slot.to_le(), data_addr(slot)).unwrap();
        }
        for i in 0..BATCH {
            let head = 3 * i;
            let header = Descriptor::new(
                HEADERS + u64::from(i) * size_of::<BlkOutHdr>() as u64,
                size_of::<BlkOutHdr>() as u32,
                F_NEXT,
                head + 1,
            );
            let status = Descriptor::new(STATUS + u64::from(i), 1, F_WRITE, 0);
            mem.write_obj(RawDescriptor::from(header), desc_addr(head))
                .unwrap();
            mem.write_obj(RawDescriptor::from(status), desc_addr(head + 2))
                .unwrap();
        }
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(mem), "the queue's rings are in memory");
        Blk {
            queue,
            avail_idx: 0,
            batches: 0,
            data: vec![0u8; DATA_LEN as usize],
        }
    }

    /// The driver: points the next batch's data descriptors at the next buffers, writes
    /// their headers, resets their status bytes, and makes them available.
    fn post<M: GuestMemory>(&mut self, mem: &M) {
        for i in 0..BATCH {
            let head = 3 * i;
            let slot = (self.batches * u64::from(BATCH) + u64::from(i)) % BUFFERS;
            let data = Descriptor::new(data_addr(slot).0, DATA_LEN, F_NEXT, head + 2);
            mem.write_obj(RawDescriptor::from(data), desc_addr(head + 1))
                .unwrap();
            let header = BlkOutHdr {
                request_type: BLK_T_OUT.to_le(),
                ioprio: 0,
                sector: (slot * u64::from(DATA_LEN / 512)).to_le(),
            };
            mem.write_obj(
                header,
                GuestAddress(HEADERS + u64::from(i) * size_of::<BlkOutHdr>() as u64),
            )
            .unwrap();
            let entry = self.avail_idx.wrapping_add(i) % QUEUE_SIZE;
            mem.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + 2 * u64::from(entry)))
                .unwrap();
        }
        mem.write_slice(&[STATUS_UNSET; BATCH as usize], GuestAddress(STATUS))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(BATCH);
        self.batches += 1;
        mem.store(
            self.avail_idx.to_le(),
            GuestAddress(AVAIL + 2),
            Ordering::Release,
        )
        .unwrap();
    }

    /// The device: serves every chain available, and returns how many.
    fn serve<M: GuestMemory>(&mut self, mem: &M) -> u16 {
        let mut served = 0;
        while let Some(mut chain) = self.queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let (Some(header), Some(data), Some(status)) =
                (chain.next(), chain.next(), chain.next())
            else {
                panic!("chain {head} has fewer than three descriptors");
            };
            assert!(
                !header.is_write_only()
                    && header.len() as usize == size_of::<BlkOutHdr>()
                    && !data.is_write_only()
                    && data.len() as usize <= self.data.len()
                    && status.is_write_only()
                    && status.len() == 1,
                "chain {head} is not a virtio-blk write request"
            );
            let request: BlkOutHdr = mem.read_obj(header.addr()).unwrap();
            let data_buf = &mut self.data[..data.len() as usize];
            mem.read_slice(data_buf, data.addr()).unwrap();
            let tag = u64::from_le_bytes(data_buf[..8].try_into().unwrap());
            let ok = u32::from_le(request.request_type) == BLK_T_OUT
                && tag == u64::from_le(request.sector) / u64::from(DATA_LEN / 512);
            mem.write_obj(if ok { BLK_S_OK } else { BLK_S_IOERR }, status.addr())
                .unwrap();
            self.queue.add_used(mem, head, 1).unwrap();
            served += 1;
        }
        black_box(self.queue.needs_notification(mem).unwrap());
        served
    }

    /// The driver again: the batch was served, all of it, and well.
    fn check<M: GuestMemory>(&self, mem: &M, served: u16) {
        assert_eq!(served, BATCH);
        assert_eq!(self.queue.next_used(), self.avail_idx);
        let used_idx = u16::from_le(mem.load(GuestAddress(USED + 2), Ordering::Acquire).unwrap());
        assert_eq!(
            used_idx, self.avail_idx,
            "the used index advanced by the batch"
        );
        let last = used_idx.wrapping_sub(1) % QUEUE_SIZE;
        let elem: VirtqUsedElem = mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(last)))
            .unwrap();
        assert_eq!(
            (elem.id(), elem.len()),
            (u32::from(3 * (BATCH - 1)), 1),
            "the last chain of the batch was used last"
        );
        let mut status = [STATUS_UNSET; BATCH as usize];
        mem.read_slice(&mut status, GuestAddress(STATUS)).unwrap();
        assert!(
            status.iter().all(|&s| s == BLK_S_OK),
            "every request answered OK: {status:?}"
        );
    }

    /// The device's time for `iters` batches, each posted and checked untimed.
    fn timed_batches<M: GuestMemory>(&mut self, mem: &M, iters: u64) -> Duration {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            self.post(mem);
            let start = Instant::now();
            let served = self.serve(mem);
            total += start.elapsed();
            self.check(mem, served);
        }
        total
    }
}

/// Where descriptor `index` is.
fn desc_addr(index: u16) -> GuestAddress {
    GuestAddress(DESC_TABLE + u64::from(index) * size_of::<RawDescriptor>() as u64)
}

/// Where data buffer `slot` is.
fn data_addr(slot: u64) -> GuestAddress {
    GuestAddress(DATA + slot * u64::from(DATA_LEN))
}

fn virtio_blk(c: &mut Criterion) {
    let (vm, backend) = benches::memory_vm("virtio");
    let in_place = MemoryBuilder::new(vm)
        .region_at(0, SIZE)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .expect("in-place memory (Linux 6.18+, or the stand-in)");
    let dual = benches::dual_memory_vm("virtio").map(|(vm, dual_backend)| {
        assert_eq!(dual_backend, backend, "both strategies on the same backend");
        MemoryBuilder::new(vm)
            .region_at(0, SIZE)
            .strategy(Strategy::Dual)
            .initial_state(PageState::Shared)
            .build()
            .expect("dual memory (memory attributes, or the stand-in)")
    });
    let peer = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), SIZE as usize)]).unwrap();

    let mut group = c.benchmark_group(backend.group("virtio_blk_write_4KiB"));
    group.throughput(Throughput::Elements(u64::from(BATCH)));
    let mut blk = Blk::new(&peer);
    group.bench_function("GuestMemoryMmap", |b| {
        b.iter_custom(|iters| blk.timed_batches(&peer, iters))
    });
    let view = in_place.guest_memory();
    let ours = view.memory();
    let mut blk = Blk::new(&*ours);
    group.bench_function(BenchmarkId::new("PrivateMemoryManager", "in-place"), |b| {
        b.iter_custom(|iters| blk.timed_batches(&*ours, iters))
    });
    // As a confidential guest's memory is: the same shared pages, and private ones
    // beside them (2 MiB past the 64 MiB, never touched), so that every access checks
    // its pages' bits rather than the region's count of private pages.
    let partly_private = MemoryBuilder::new(benches::memory_vm("virtio").0)
        .region_at(0, SIZE + PRIVATE_TAIL)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .expect("in-place memory (Linux 6.18+, or the stand-in)");
    partly_private
        .convert(
            guest_memfd::PageRange::new(SIZE, PRIVATE_TAIL).unwrap(),
            PageState::Private,
        )
        .expect("the tail private");
    {
        let view = partly_private.guest_memory();
        let ours = view.memory();
        let mut blk = Blk::new(&*ours);
        group.bench_function(
            BenchmarkId::new("PrivateMemoryManager", "in-place-partly-private"),
            |b| b.iter_custom(|iters| blk.timed_batches(&*ours, iters)),
        );
    }
    if let Some(dual) = &dual {
        let view = dual.guest_memory();
        let ours = view.memory();
        let mut blk = Blk::new(&*ours);
        group.bench_function(BenchmarkId::new("PrivateMemoryManager", "dual"), |b| {
            b.iter_custom(|iters| blk.timed_batches(&*ours, iters))
        });
    }
    group.finish();
}

criterion_group!(benches, virtio_blk);
criterion_main!(benches);
