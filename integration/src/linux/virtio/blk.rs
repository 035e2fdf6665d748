// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio-blk device (virtio 1.2 section 5.2) on a disk image file: one request queue,
//! reads, writes, flushes and the device ID; everything else answered "unsupported".
//!
//! Guest memory is reached only through vm-memory's `Bytes` calls: `read_obj` for the
//! request header, `write_obj` for the status, `write_slice` for the ID, and for the
//! data `read_volatile_from` / `write_volatile_to` with the image, so the image's bytes
//! go straight between the file and guest memory (no intermediate buffer). Before any
//! data moves, every data buffer of the request is checked (`GuestMemory::get_slices`,
//! the same check a `Bytes` call makes): a request whose buffer is outside guest memory
//! or, on private memory, has a page the guest did not share fails whole with
//! `VIRTIO_BLK_S_IOERR`, the image and guest memory as they were, and the log names the
//! buffer's guest range and the memory's reason. (Private memory refuses each `Bytes`
//! call whole, before a byte moves, too; the check makes a request all or nothing.)
//!
//! What a hostile guest can make the device do is bounded: a request has at most
//! [`SEG_MAX`] data descriptors and [`MAX_REQUEST_BYTES`] of data, within the image;
//! virtio-queue ends chains that loop or outgrow the queue. No guest input panics.

mod request;

use std::fs::File;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::{EventLog, QueueOutcome, VirtioDevice, VirtioError};
use request::Completion;

/// The unit of the device's capacity and of a request's `sector`.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the request queue the device offers.
pub const QUEUE_SIZE: u16 = 256;
/// The most data descriptors a request may have (`seg_max` in the configuration space).
pub const SEG_MAX: u32 = 128;
/// The largest data descriptor the driver may use (`size_max`).
pub const SIZE_MAX: u32 = 64 << 10;
/// The most data one request may carry: [`SEG_MAX`] descriptors of [`SIZE_MAX`] bytes,
/// 8 MiB, more than Linux sends (1280 KiB by default).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// What `VIRTIO_BLK_T_GET_ID` answers (Linux shows it as `/sys/block/vda/serial`).
pub const BLOCK_ID: &str = "privmem-blk";

/// The header's size: type (le32), reserved (le32), sector (le64).
const HEADER_SIZE: u32 = 16;

const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// `ACCESS_PLATFORM` always: a confidential guest must be allowed to give the device
/// only what its DMA API shares (bounce buffers), and it refuses a device without it.
const FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_F_ACCESS_PLATFORM)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_BLK_F_SIZE_MAX)
    | feature(VIRTIO_BLK_F_SEG_MAX)
    | feature(VIRTIO_BLK_F_FLUSH);

/// What the device did, for the VMM and its benchmarks.
///
/// The times answer "how much of the device's time went to `Bytes` calls on guest
/// memory": [`BlkStats::memory_time`], [`BlkStats::queue_time`] and
/// [`BlkStats::disk_time`] are disjoint parts of [`BlkStats::total_time`]; the rest is
/// the device's own logic and the clock reads around each call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Queue notifications served.
    pub notifications: u64,
    /// `VIRTIO_BLK_T_IN` requests served.
    pub reads: u64,
    /// `VIRTIO_BLK_T_OUT` requests served.
    pub writes: u64,
    /// `VIRTIO_BLK_T_FLUSH` requests served.
    pub flushes: u64,
    /// `VIRTIO_BLK_T_GET_ID` requests served.
    pub get_ids: u64,
    /// Requests of a type the device does not serve (answered `VIRTIO_BLK_S_UNSUPP`).
    pub unsupported: u64,
    /// Requests that failed: answered `VIRTIO_BLK_S_IOERR`, or not answered at all.
    pub failed: u64,
    /// Bytes read from the image into guest memory by the reads served.
    pub bytes_read: u64,
    /// Bytes written from guest memory to the image by the writes served.
    pub bytes_written: u64,
    /// Inside the device's own calls on guest memory: `Bytes` calls (header, status, ID,
    /// data) and the checks of the data buffers before anything moves; the image's
    /// system calls made inside the zero-copy data transfers excluded.
    pub memory_time: Duration,
    /// Inside virtio-queue's calls, which reach the rings and the descriptor table
    /// through `Bytes` calls on guest memory too.
    pub queue_time: Duration,
    /// Inside the image's system calls: seeks, reads, writes, flushes.
    pub disk_time: Duration,
    /// Serving queue notifications, from start to end.
    pub total_time: Duration,
}

/// Runs `f`, adding the time it took to `slot`.
fn timed<T>(slot: &mut Duration, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let result = f();
    *slot += started.elapsed();
    result
}

/// A virtio-blk device serving a disk image.
#[derive(Debug)]
pub struct BlockDevice {
    disk: File,
    /// In sectors: the image's size rounded down.
    capacity: u64,
    acked_features: u64,
    queue_max_sizes: [u16; 1],
    stats: BlkStats,
    /// A request's descriptors, kept between requests so serving one allocates nothing.
    descriptors: Vec<Descriptor>,
}

impl BlockDevice {
    /// A device on `disk` (opened for reading and writing; opened read-only, writes fail
    /// with `VIRTIO_BLK_S_IOERR`), of its size rounded down to whole sectors.
    ///
    /// # Errors
    ///
    /// [`VirtioError::Disk`] if the image's size cannot be read.
    pub fn new(disk: File) -> Result<Self, VirtioError> {
        let size = disk.metadata().map_err(VirtioError::Disk)?.len();
        Ok(BlockDevice {
            disk,
            capacity: size / SECTOR_SIZE,
            acked_features: 0,
            queue_max_sizes: [QUEUE_SIZE],
            stats: BlkStats::default(),
            descriptors: Vec::with_capacity(request::MAX_DESCRIPTORS),
        })
    }

    /// The disk's size in sectors of [`SECTOR_SIZE`] bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// What the device did so far.
    pub fn stats(&self) -> BlkStats {
        self.stats
    }

    /// Starts the counters again from zero (between a benchmark's phases).
    pub fn clear_stats(&mut self) {
        self.stats = BlkStats::default();
    }

    /// The features the driver accepted at its last activation (0 after a reset).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// `struct virtio_blk_config` up to `seg_max`: the fields the offered features give
    /// meaning to. The rest of the configuration space reads as zero.
    fn config(&self) -> [u8; 16] {
        let mut config = [0u8; 16];
        let fields = self
            .capacity
            .to_le_bytes()
            .into_iter()
            .chain(SIZE_MAX.to_le_bytes())
            .chain(SEG_MAX.to_le_bytes());
        for (byte, value) in config.iter_mut().zip(fields) {
            *byte = value;
        }
        config
    }

    /// Serves every chain the driver made available, returning each to the used ring.
    fn drain<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        index: u16,
        queue: &mut Queue,
        log: &mut EventLog,
    ) -> QueueOutcome {
        let mut returned = false;
        // Whether the last pass found nothing though notifications said more was there.
        let mut rearmed = false;
        let needs_reset = loop {
            let next = timed(&mut self.stats.queue_time, || {
                queue.iter(memory).map(|mut chains| chains.next())
            });
            match next {
                Ok(Some(chain)) => {
                    rearmed = false;
                    let head = chain.head_index();
                    let used_len = match self.serve(memory, chain, log) {
                        Completion::Answered { used_len } => used_len,
                        Completion::Unanswerable => 0,
                        // Not returned: the driver resets the device, which discards it.
                        Completion::StatusUnwritable => break true,
                    };
                    let used = timed(&mut self.stats.queue_time, || {
                        queue.add_used(memory, head, used_len)
                    });
                    if let Err(e) = used {
                        log.push(format!(
                            "virtio-blk: queue {index}: returning descriptor {head}: {e}"
                        ));
                        break true;
                    }
                    returned = true;
                }
                Ok(None) if !queue.event_idx_enabled() => break false,
                // The available index says a chain is there, but virtio-queue cannot
                // read its entry of the ring (the ring's page turned private, say): it
                // would say so again forever. Nothing more can be served.
                Ok(None) if rearmed => {
                    log.push(format!(
                        "virtio-blk: queue {index}: the available ring announces a chain \
                         at index {} that cannot be read",
                        queue.next_avail()
                    ));
                    break true;
                }
                Ok(None) => {
                    rearmed = true;
                    // With EVENT_IDX the driver notifies only when the available index
                    // passes `avail_event`: set it, then serve what arrived meanwhile.
                    match timed(&mut self.stats.queue_time, || {
                        queue.enable_notification(memory)
                    }) {
                        Ok(true) => continue,
                        Ok(false) => break false,
                        Err(e) => {
                            log.push(format!("virtio-blk: queue {index}: {e}"));
                            break true;
                        }
                    }
                }
                Err(e) => {
                    log.push(format!("virtio-blk: queue {index}: {e}"));
                    break true;
                }
            }
        };
        let interrupt = returned
            && timed(&mut self.stats.queue_time, || {
                queue.needs_notification(memory)
            })
            // A spurious interrupt costs the driver a look; a missing one hangs it.
            .unwrap_or(true);
        QueueOutcome {
            interrupt,
            needs_reset,
        }
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (at, byte) in data.iter_mut().enumerate() {
            let field = offset
                .checked_add(at as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| config.get(at));
            *byte = field.copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field offered is read-only (`writeback` needs VIRTIO_BLK_F_CONFIG_WCE).
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn process_queue<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        index: u16,
        queue: &mut Queue,
        log: &mut EventLog,
    ) -> QueueOutcome {
        let started = Instant::now();
        self.stats.notifications += 1;
        let outcome = self.drain(memory, index, queue, log);
        self.stats.total_time += started.elapsed();
        outcome
    }
}

/// The ID as `VIRTIO_BLK_T_GET_ID` writes it: NUL-padded to 20 bytes.
fn id_bytes() -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    for (byte, value) in id.iter_mut().zip(BLOCK_ID.bytes()) {
        *byte = value;
    }
    id
}

#[cfg(test)]
mod private_memory_tests;
#[cfg(test)]
mod test_rig;
#[cfg(test)]
mod tests;
