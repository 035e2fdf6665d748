// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A virtio-blk device (virtio 1.2 section 5.2) on a disk image file: one request queue,
//! reads, writes, flushes and the device ID; everything else answered "unsupported".
//! An image the device cannot write is offered read-only (`VIRTIO_BLK_F_RO`).
//!
//! Guest memory is reached only through vm-memory: `Bytes` calls (`read_obj` for the
//! request header, `write_obj` for the status, `write_slice` for the ID) and, for a
//! read's or a write's data, the `VolatileSlice`s of `GuestMemory::get_slices`, which
//! the image fills or drains (`read_exact_volatile_from` / `write_all_volatile_to`), so
//! the image's bytes go straight between the file and guest memory (no intermediate
//! buffer).
//!
//! A read or a write takes the slices of every data buffer before any data moves, and
//! moves the data through those same slices, looked up once. A request whose buffer is
//! outside guest memory or, on private memory, has a page the guest did not share fails
//! whole with `VIRTIO_BLK_S_IOERR`, the image and guest memory as they were, and the
//! log names the buffer's guest range and the memory's reason.
//!
//! On private memory (vm-private-memory) each slice carries an `AccessGuard` that
//! holds its pages for as long as it lives: a conversion of one of them to private
//! waits for the request to end (and fails, rolled back, past the memory's patience,
//! 20 ms by default), so no page can turn private between the check and the transfer.
//! The request's slices are dropped before its status is written. The backend tracks
//! a thread's first eight held slices exactly and the rest as one range spanning them
//! all, so while a request of more than eight buffers runs, a conversion of a page
//! lying between those buffers waits too. What the check does not cover is the image:
//! a system call that fails halfway (an I/O error, an image that shrank) leaves the
//! request part done, answered `VIRTIO_BLK_S_IOERR`, as any disk's failed request may
//! be.
//!
//! What a hostile guest can make the device do is bounded: a request has at most
//! [`SEG_MAX`] data descriptors and [`MAX_REQUEST_BYTES`] of data, within the image;
//! virtio-queue ends chains that loop or outgrow the queue. No guest input panics.
//! A request the device has no truthful answer for (a chain it cannot follow, no status
//! byte, a status byte it cannot write) is not returned: the queue stops and the device
//! asks for a reset ([`QueueOutcome::needs_reset`], which says what a Linux guest makes
//! of that).

mod request;

use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use super::{EventLog, QueueOutcome, VirtioDevice, VirtioError};
use request::{Completion, Outcome};

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
/// `VIRTIO_BLK_F_RO` too, on a read-only device.
const FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_F_ACCESS_PLATFORM)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_BLK_F_SIZE_MAX)
    | feature(VIRTIO_BLK_F_SEG_MAX)
    | feature(VIRTIO_BLK_F_FLUSH);

/// What the device did, for the VMM and its benchmarks.
///
/// Every request the device takes from the queue counts once, in exactly one outcome:
/// [`BlkStats::reads`], [`BlkStats::writes`], [`BlkStats::flushes`] or
/// [`BlkStats::get_ids`] if it was carried out and answered `VIRTIO_BLK_S_OK`,
/// [`BlkStats::unsupported`] if answered `VIRTIO_BLK_S_UNSUPP`, [`BlkStats::failed`]
/// otherwise, whatever happened before: a request carried out whose status could not
/// be written is a failure and nothing else. So the six add up to the requests taken.
///
/// The times answer "how much of the device's time went to `Bytes` calls on guest
/// memory": [`BlkStats::memory_time`], [`BlkStats::queue_time`] and
/// [`BlkStats::disk_time`] are disjoint parts of [`BlkStats::total_time`]; the rest is
/// the device's own logic and the clock reads around each call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Queue notifications served.
    pub notifications: u64,
    /// `VIRTIO_BLK_T_IN` requests carried out and answered `VIRTIO_BLK_S_OK`.
    pub reads: u64,
    /// `VIRTIO_BLK_T_OUT` requests carried out and answered `VIRTIO_BLK_S_OK`.
    pub writes: u64,
    /// `VIRTIO_BLK_T_FLUSH` requests carried out and answered `VIRTIO_BLK_S_OK`.
    pub flushes: u64,
    /// `VIRTIO_BLK_T_GET_ID` requests carried out and answered `VIRTIO_BLK_S_OK`.
    pub get_ids: u64,
    /// Requests of a type the device does not serve, answered `VIRTIO_BLK_S_UNSUPP`.
    pub unsupported: u64,
    /// Every other request: answered `VIRTIO_BLK_S_IOERR`, or not answered at all (not
    /// returned, the queue stopped).
    pub failed: u64,
    /// Bytes read from the image into guest memory by the requests counted in
    /// [`BlkStats::reads`].
    pub bytes_read: u64,
    /// Bytes written from guest memory to the image by the requests counted in
    /// [`BlkStats::writes`].
    pub bytes_written: u64,
    /// Inside the device's own calls on guest memory: `Bytes` calls (header, status, ID),
    /// the lookups of the data buffers' slices and the data moved through them; the
    /// image's system calls made inside the zero-copy data transfers excluded.
    pub memory_time: Duration,
    /// Inside virtio-queue's calls, which reach the rings and the descriptor table
    /// through `Bytes` calls on guest memory too.
    pub queue_time: Duration,
    /// Inside the image's system calls: seeks, reads, writes, flushes.
    pub disk_time: Duration,
    /// Serving queue notifications, from start to end.
    pub total_time: Duration,
}

impl BlkStats {
    /// Counts one request in its one outcome.
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Read { bytes } => {
                self.reads += 1;
                self.bytes_read += bytes;
            }
            Outcome::Write { bytes } => {
                self.writes += 1;
                self.bytes_written += bytes;
            }
            Outcome::Flush => self.flushes += 1,
            Outcome::GetId => self.get_ids += 1,
            Outcome::Unsupported => self.unsupported += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
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
    /// Writes are refused and `VIRTIO_BLK_F_RO` offered.
    read_only: bool,
    acked_features: u64,
    queue_max_sizes: [u16; 1],
    stats: BlkStats,
    /// A request's descriptors, kept between requests so serving one does not allocate
    /// them (a read or a write allocates only the list of its buffers' slices).
    descriptors: Vec<Descriptor>,
}

impl BlockDevice {
    /// A device on `disk`, of its size rounded down to whole sectors. A file opened for
    /// reading and writing gives a writable disk; one opened read-only, a read-only disk
    /// (as [`BlockDevice::read_only`]).
    ///
    /// # Errors
    ///
    /// [`VirtioError::Disk`] if the image's size cannot be read.
    pub fn new(disk: File) -> Result<Self, VirtioError> {
        let read_only = !opened_for_writing(&disk);
        BlockDevice::with_mode(disk, read_only)
    }

    /// A read-only device on `disk`, whether or not the file could be written: it offers
    /// `VIRTIO_BLK_F_RO`, and answers writes `VIRTIO_BLK_S_IOERR` without touching the
    /// image.
    ///
    /// # Errors
    ///
    /// [`VirtioError::Disk`] if the image's size cannot be read.
    pub fn read_only(disk: File) -> Result<Self, VirtioError> {
        BlockDevice::with_mode(disk, true)
    }

    fn with_mode(disk: File, read_only: bool) -> Result<Self, VirtioError> {
        let size = disk.metadata().map_err(VirtioError::Disk)?.len();
        Ok(BlockDevice {
            disk,
            capacity: size / SECTOR_SIZE,
            read_only,
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

    /// Whether the disk is read-only (`VIRTIO_BLK_F_RO` offered, writes refused).
    pub fn is_read_only(&self) -> bool {
        self.read_only
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
        // With EVENT_IDX: whether `avail_event` was set since the last chain served.
        let mut rearmed = false;
        // Whether the last pass found no chain though the available index announced one.
        let mut unreadable = false;
        let needs_reset = loop {
            let next = timed(&mut self.stats.queue_time, || {
                queue.iter(memory).map(|mut chains| chains.next())
            });
            match next {
                Ok(Some(chain)) => {
                    rearmed = false;
                    unreadable = false;
                    let head = chain.head_index();
                    let used_len = match self.serve(memory, chain, log) {
                        Completion::Answered { used_len } => used_len,
                        // Not returned: the driver resets the device, which discards it.
                        Completion::Untold => {
                            log.push(format!(
                                "virtio-blk: queue {index}: request at descriptor {head} \
                                 has no answer to give: not returned, the queue stops"
                            ));
                            break true;
                        }
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
                Ok(None) => {
                    let announced = timed(&mut self.stats.queue_time, || {
                        queue.avail_idx(memory, Ordering::Acquire)
                    });
                    let announced = match announced {
                        Ok(announced) => announced.0,
                        Err(e) => {
                            log.push(format!("virtio-blk: queue {index}: {e}"));
                            break true;
                        }
                    };
                    if announced != queue.next_avail() {
                        // A chain is announced but the pass found none: either the driver
                        // published it after the pass read the index (the next pass
                        // serves it), or virtio-queue cannot read its entry of the ring
                        // (the ring's page turned private, say), which it would fail to
                        // do again forever. Twice in a row, it is the ring: nothing more
                        // can be served.
                        if unreadable {
                            log.push(format!(
                                "virtio-blk: queue {index}: the available ring announces a \
                                 chain at index {} that cannot be read (available index \
                                 {announced})",
                                queue.next_avail()
                            ));
                            break true;
                        }
                        unreadable = true;
                        continue;
                    }
                    unreadable = false;
                    if !queue.event_idx_enabled() || rearmed {
                        break false;
                    }
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
        if self.read_only {
            FEATURES | feature(VIRTIO_BLK_F_RO)
        } else {
            FEATURES
        }
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

/// Whether `disk` was opened for writing. A write of no bytes tells, changing nothing:
/// Linux's `write(2)` checks that the file was opened for writing before anything else
/// (`vfs_write`) and fails with `EBADF` if not; otherwise a write of nothing to an image
/// (a regular file or a block device) returns 0 without touching it. (`fcntl(F_GETFL)`
/// would tell too, but through `unsafe`.) Any other failure also makes the disk
/// read-only, the safe side to err on.
fn opened_for_writing(disk: &File) -> bool {
    let mut disk = disk;
    disk.write(&[]).is_ok()
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
mod chain_tests;
#[cfg(test)]
mod flaky_memory;
#[cfg(test)]
mod outcome_tests;
#[cfg(test)]
mod private_memory_tests;
#[cfg(test)]
mod test_rig;
#[cfg(test)]
mod tests;
