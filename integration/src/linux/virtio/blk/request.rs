// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! One virtio-blk request: its descriptor chain checked, executed on the image, its
//! status written.
//!
//! The framing taken is the one drivers use (virtio 1.2 section 5.2.6): the 16-byte
//! header alone in the first descriptor, device-readable; the data in the descriptors
//! between; the status in the last byte of the last descriptor, device-writable (the
//! bytes before it in that descriptor count as device-writable data, so a read may end
//! its buffer with the status). A request framed otherwise is answered
//! `VIRTIO_BLK_S_IOERR`, not guessed at; a chain with no status byte the device can
//! find and write is not answered at all ([`Completion::Untold`]).

use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Seek, SeekFrom};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::{BitmapSlice, BS};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError, Permissions, ReadVolatile,
    VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::{
    id_bytes, timed, BlockDevice, Descriptor, EventLog, HEADER_SIZE, MAX_REQUEST_BYTES, QUEUE_SIZE,
    SECTOR_SIZE, SEG_MAX,
};

/// The most descriptors a request may have: header, [`SEG_MAX`] data, status.
pub(super) const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// How far a chain is followed looking for its status: a chain in the ring has at most
/// [`QUEUE_SIZE`] descriptors (virtio-queue stops it there), so only an indirect table,
/// which the device never offers, can be longer.
const WALK_LIMIT: usize = QUEUE_SIZE as usize;

/// How a request ended, for the used ring.
pub(super) enum Completion {
    /// The status was written: return the chain with this used length (the bytes written
    /// to its device-writable descriptors, status included).
    Answered {
        /// The used length.
        used_len: u32,
    },
    /// No status could be written: the chain has no byte a status could go to (no
    /// descriptor, a last descriptor that is device-readable or empty, a chain cut
    /// short, looping or too long to follow), or guest memory refused the device's
    /// write (the byte lies in private memory, or outside guest memory). Returning the
    /// chain would let the driver read a status the device never wrote: Linux ignores
    /// the used length and takes the stale byte, usually 0, `VIRTIO_BLK_S_OK`, so a
    /// request that never ran would complete as a success. It is not returned: the
    /// queue stops and the device asks for a reset.
    Untold,
}

/// The one outcome a request counts in ([`super::BlkStats`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A read carried out and answered `VIRTIO_BLK_S_OK`, of this many bytes.
    Read {
        /// The bytes read from the image.
        bytes: u64,
    },
    /// A write carried out and answered `VIRTIO_BLK_S_OK`, of this many bytes.
    Write {
        /// The bytes written to the image.
        bytes: u64,
    },
    /// A flush carried out and answered `VIRTIO_BLK_S_OK`.
    Flush,
    /// A get-id carried out and answered `VIRTIO_BLK_S_OK`.
    GetId,
    /// Answered `VIRTIO_BLK_S_UNSUPP`.
    Unsupported,
    /// Answered `VIRTIO_BLK_S_IOERR`, or not answered at all.
    Failed,
}

/// A piece of a data buffer in guest memory: the buffer (for the log) and the slice of
/// it the data moves through.
type Piece<'a, Mem> = (
    Segment,
    VolatileSlice<'a, BS<'a, <Mem as GuestMemory>::Bitmap>>,
);

/// A guest buffer as the log names it: `0x1000 bytes at guest 0x12345000`. Formatted
/// only when a message is, so the requests that succeed allocate nothing for it.
#[derive(Clone, Copy)]
struct GuestRange {
    addr: GuestAddress,
    len: u32,
}

impl GuestRange {
    fn new(addr: GuestAddress, len: u32) -> Self {
        GuestRange { addr, len }
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x} bytes at guest {:#x}", self.len, self.addr.0)
    }
}

/// A piece of a request's data in guest memory.
#[derive(Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
    device_writable: bool,
}

impl Segment {
    fn range(&self) -> GuestRange {
        GuestRange::new(self.addr, self.len)
    }
}

/// Why a request failed: its status and what to log.
struct Failure {
    status: u8,
    why: Option<String>,
}

impl Failure {
    fn ioerr(why: String) -> Self {
        Failure {
            status: VIRTIO_BLK_S_IOERR as u8,
            why: Some(why),
        }
    }
}

/// The image from its current position on, as the source or destination of a
/// zero-copy transfer, timing the system calls made inside it.
///
/// A seek before the transfer and plain reads and writes rather than `pread`/`pwrite`:
/// vm-memory implements `ReadVolatile`/`WriteVolatile` for `&File` with its own safe
/// wrappers, while a positioned call on a `VolatileSlice` would need `unsafe` here. The
/// device owns the file and serves one request at a time, so the shared position is
/// safe to use; it costs one `lseek` per request.
struct DiskCursor<'a> {
    disk: &'a File,
    io_time: Duration,
}

impl ReadVolatile for DiskCursor<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut disk = self.disk;
        timed(&mut self.io_time, || disk.read_volatile(buf))
    }
}

impl WriteVolatile for DiskCursor<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let mut disk = self.disk;
        timed(&mut self.io_time, || disk.write_volatile(buf))
    }
}

impl BlockDevice {
    /// Serves one chain.
    pub(super) fn serve<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        chain: DescriptorChain<&Mem>,
        log: &mut EventLog,
    ) -> Completion {
        let head = chain.head_index();
        // Taken, not borrowed, so the device's other fields stay free; put back below.
        let mut descriptors = std::mem::take(&mut self.descriptors);
        descriptors.clear();
        let walked = timed(&mut self.stats.queue_time, || walk(chain, &mut descriptors));
        let completion = match walked {
            Ok((count, last)) => self.answer(memory, &descriptors, count, last, log),
            Err(why) => {
                log.push(format!("virtio-blk: request at descriptor {head}: {why}"));
                self.stats.count(Outcome::Failed);
                Completion::Untold
            }
        };
        self.descriptors = descriptors;
        completion
    }

    /// Executes a request whose chain has `count` descriptors (the first
    /// [`MAX_DESCRIPTORS`] in `descriptors`) and ends with `last`, writes its status,
    /// and counts it in its one outcome.
    fn answer<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        descriptors: &[Descriptor],
        count: usize,
        last: Descriptor,
        log: &mut EventLog,
    ) -> Completion {
        // `walk` checked that `last` is device-writable and not empty.
        let Some(status_addr) = last
            .addr()
            .checked_add(u64::from(last.len().saturating_sub(1)))
        else {
            log.push(format!(
                "virtio-blk: status byte past the end of the guest's address space ({})",
                GuestRange::new(last.addr(), last.len())
            ));
            self.stats.count(Outcome::Failed);
            return Completion::Untold;
        };
        // Tried first, as an error: a request whose outcome cannot be told is not
        // carried out at all (a write would change the image behind the driver's back).
        if !self.write_status(memory, status_addr, VIRTIO_BLK_S_IOERR as u8, log) {
            self.stats.count(Outcome::Failed);
            return Completion::Untold;
        }
        let (status, written, outcome) = match self.execute(memory, descriptors, count, last) {
            Ok((outcome, written)) => (VIRTIO_BLK_S_OK as u8, written, outcome),
            Err((failure, written)) => {
                if let Some(why) = failure.why {
                    log.push(format!("virtio-blk: {why}"));
                }
                let outcome = if failure.status == VIRTIO_BLK_S_UNSUPP as u8 {
                    Outcome::Unsupported
                } else {
                    Outcome::Failed
                };
                (failure.status, written, outcome)
            }
        };
        if !self.write_status(memory, status_addr, status, log) {
            // Writable a moment ago: the page turned private meanwhile. The request ran,
            // but the driver cannot be told how: a failure, whatever it was.
            self.stats.count(Outcome::Failed);
            return Completion::Untold;
        }
        self.stats.count(outcome);
        Completion::Answered {
            used_len: written.saturating_add(1),
        }
    }

    fn write_status<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        at: GuestAddress,
        status: u8,
        log: &mut EventLog,
    ) -> bool {
        let written = timed(&mut self.stats.memory_time, || memory.write_obj(status, at));
        if let Err(e) = &written {
            log.push(format!(
                "virtio-blk: status byte at guest {:#x} cannot be written: {e}",
                at.0
            ));
        }
        written.is_ok()
    }

    /// Runs the request: its outcome and the bytes written to guest memory, or the
    /// failure and the bytes written before it.
    fn execute<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        descriptors: &[Descriptor],
        count: usize,
        last: Descriptor,
    ) -> Result<(Outcome, u32), (Failure, u32)> {
        let (request_type, sector) = self
            .header(memory, descriptors, count)
            .map_err(|f| (f, 0))?;
        // `header` made sure of the header and the status: at least two descriptors.
        let data_descriptors = count.saturating_sub(2);
        if data_descriptors > SEG_MAX as usize {
            let why = format!("{data_descriptors} data descriptors, more than seg_max {SEG_MAX}");
            return Err((Failure::ioerr(why), 0));
        }
        let middle = descriptors.get(1..count.saturating_sub(1)).unwrap_or(&[]);
        // The bytes before the status in the last descriptor are data the device writes.
        let tail = Segment {
            addr: last.addr(),
            len: last.len().saturating_sub(1),
            device_writable: true,
        };
        let segments = middle
            .iter()
            .map(|d| Segment {
                addr: d.addr(),
                len: d.len(),
                device_writable: d.is_write_only(),
            })
            .chain((tail.len > 0).then_some(tail));
        match request_type {
            VIRTIO_BLK_T_IN => self.transfer(memory, segments, sector, Direction::Read),
            // Refused before anything is looked at (virtio 1.2 section 5.2.6.2).
            VIRTIO_BLK_T_OUT if self.read_only => Err((
                Failure::ioerr("write request: the disk is read-only".into()),
                0,
            )),
            VIRTIO_BLK_T_OUT => self.transfer(memory, segments, sector, Direction::Write),
            VIRTIO_BLK_T_FLUSH => {
                let flushed = timed(&mut self.stats.disk_time, || self.disk.sync_data());
                flushed.map_err(|e| (Failure::ioerr(format!("flush: {e}")), 0))?;
                Ok((Outcome::Flush, 0))
            }
            VIRTIO_BLK_T_GET_ID => self.get_id(memory, segments),
            _ => Err((
                Failure {
                    status: VIRTIO_BLK_S_UNSUPP as u8,
                    why: None,
                },
                0,
            )),
        }
    }

    /// The request's type and sector, from a header descriptor that must be the first
    /// of at least two, device-readable, of exactly [`HEADER_SIZE`] bytes.
    fn header<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        descriptors: &[Descriptor],
        count: usize,
    ) -> Result<(u32, u64), Failure> {
        let header = match descriptors.first() {
            Some(header) if count >= 2 => header,
            _ => return Err(Failure::ioerr("request without a header".into())),
        };
        let range = GuestRange::new(header.addr(), header.len());
        if header.is_write_only() {
            return Err(Failure::ioerr(format!(
                "request header ({range}) is device-writable"
            )));
        }
        if header.len() != HEADER_SIZE {
            return Err(Failure::ioerr(format!(
                "request header ({range}) is not {HEADER_SIZE} bytes"
            )));
        }
        let bytes = timed(&mut self.stats.memory_time, || {
            memory.read_obj::<[u8; HEADER_SIZE as usize]>(header.addr())
        })
        .map_err(|e| Failure::ioerr(format!("request header ({range}): {e}")))?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = bytes;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        Ok((request_type, sector))
    }

    /// Moves a read's or a write's data between the image from `sector` on and the
    /// segments, in order: its outcome and the bytes written to guest memory.
    fn transfer<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        segments: impl Iterator<Item = Segment> + Clone,
        sector: u64,
        direction: Direction,
    ) -> Result<(Outcome, u32), (Failure, u32)> {
        let op = direction.name();
        let mut total = 0u64;
        let mut buffers = 0usize;
        for segment in segments.clone() {
            if segment.device_writable != (direction == Direction::Read) {
                let why = format!(
                    "{op} request: data descriptor of {} is device-{}",
                    segment.range(),
                    if segment.device_writable {
                        "writable"
                    } else {
                        "readable"
                    }
                );
                return Err((Failure::ioerr(why), 0));
            }
            total += u64::from(segment.len);
            buffers += 1;
        }
        let fail = |why: String| Err((Failure::ioerr(format!("{op} request: {why}")), 0));
        if total % SECTOR_SIZE != 0 {
            return fail(format!("{total:#x} bytes, not whole sectors"));
        }
        if total > MAX_REQUEST_BYTES {
            return fail(format!(
                "{total:#x} bytes, more than {MAX_REQUEST_BYTES:#x}"
            ));
        }
        let start = sector.checked_mul(SECTOR_SIZE);
        let end = start.and_then(|start| start.checked_add(total));
        let (Some(start), Some(end)) = (start, end) else {
            return fail(format!("sector {sector:#x} + {total:#x} bytes overflows"));
        };
        if end > self.capacity * SECTOR_SIZE {
            return fail(format!(
                "sector {sector:#x} + {total:#x} bytes is past the disk's {:#x} sectors",
                self.capacity
            ));
        }
        // Every segment's slices taken before anything moves (outside guest memory, or
        // with a private page, refused): a request refused there leaves the image and
        // guest memory as they were. The data then moves through these slices, not a
        // second lookup, and they hold their pages until it has (see the module's doc).
        let access = match direction {
            Direction::Read => Permissions::Write,
            Direction::Write => Permissions::Read,
        };
        let mut pieces: Vec<Piece<'_, Mem>> = Vec::with_capacity(buffers);
        for segment in segments {
            let taken = timed(&mut self.stats.memory_time, || {
                take_slices(memory, segment, access, &mut pieces)
            });
            if let Err(e) = taken {
                return fail(format!("{}: {e}", segment.range()));
            }
        }
        let seek = timed(&mut self.stats.disk_time, || {
            (&self.disk).seek(SeekFrom::Start(start))
        });
        seek.map_err(|e| (Failure::ioerr(format!("{op} request: seek: {e}")), 0))?;
        let mut written = 0u32;
        for (segment, slice) in &pieces {
            self.transfer_slice(slice, direction).map_err(|why| {
                let why = format!("{op} request, {}: {why}", segment.range());
                (Failure::ioerr(why), written)
            })?;
            if direction == Direction::Read {
                // At most a descriptor's length, a u32.
                written = written.saturating_add(u32::try_from(slice.len()).unwrap_or(u32::MAX));
            }
        }
        let outcome = match direction {
            Direction::Read => Outcome::Read { bytes: total },
            Direction::Write => Outcome::Write { bytes: total },
        };
        Ok((outcome, written))
    }

    /// One slice's data, between guest memory and the image at its current position,
    /// whole or failed.
    fn transfer_slice<B: BitmapSlice>(
        &mut self,
        slice: &VolatileSlice<'_, B>,
        direction: Direction,
    ) -> Result<(), String> {
        let mut cursor = DiskCursor {
            disk: &self.disk,
            io_time: Duration::ZERO,
        };
        let started = Instant::now();
        // Bytes from the image straight into guest memory, or back: no buffer.
        let moved = match direction {
            Direction::Read => slice.read_exact_volatile_from(0, &mut cursor, slice.len()),
            Direction::Write => slice.write_all_volatile_to(0, &mut cursor, slice.len()),
        };
        let io_time = cursor.io_time;
        self.stats.memory_time += started.elapsed().saturating_sub(io_time);
        self.stats.disk_time += io_time;
        moved.map_err(|e| match e {
            VolatileMemoryError::IOError(e) if e.kind() == ErrorKind::UnexpectedEof => {
                "the image ended early".to_string()
            }
            e => e.to_string(),
        })
    }

    /// Writes the ID into the segments, as much of its 20 bytes as they hold.
    fn get_id<Mem: GuestMemory>(
        &mut self,
        memory: &Mem,
        segments: impl Iterator<Item = Segment> + Clone,
    ) -> Result<(Outcome, u32), (Failure, u32)> {
        if let Some(readable) = segments.clone().find(|s| !s.device_writable) {
            let why = format!(
                "get-id request: data descriptor of {} is device-readable",
                readable.range()
            );
            return Err((Failure::ioerr(why), 0));
        }
        let id = id_bytes();
        let mut written = 0u32;
        for segment in segments {
            let Some(rest) = id.get(written as usize..).filter(|rest| !rest.is_empty()) else {
                break;
            };
            let part = rest.get(..segment.len as usize).unwrap_or(rest);
            let copied = timed(&mut self.stats.memory_time, || {
                memory.write_slice(part, segment.addr)
            });
            copied.map_err(|e| {
                let range = GuestRange::new(segment.addr, part.len() as u32);
                let why = format!("get-id request, {range}: {e}");
                (Failure::ioerr(why), written)
            })?;
            written += part.len() as u32;
        }
        Ok((Outcome::GetId, written))
    }
}

/// Appends the slices that cover `segment` for `access` to `pieces`; the memory's
/// error if it refuses any part of it.
fn take_slices<'a, Mem: GuestMemory>(
    memory: &'a Mem,
    segment: Segment,
    access: Permissions,
    pieces: &mut Vec<Piece<'a, Mem>>,
) -> Result<(), GuestMemoryError> {
    for slice in memory.get_slices(segment.addr, segment.len as usize, access)? {
        pieces.push((segment, slice?));
    }
    Ok(())
}

/// Which way a request's data goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// `VIRTIO_BLK_T_IN`: from the image to guest memory.
    Read,
    /// `VIRTIO_BLK_T_OUT`: from guest memory to the image.
    Write,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Read => "read",
            Direction::Write => "write",
        }
    }
}

/// Follows a chain to its end, keeping its first [`MAX_DESCRIPTORS`] descriptors in
/// `descriptors`: how many it has and its last one, which must be able to hold the status.
fn walk<M>(
    chain: DescriptorChain<M>,
    descriptors: &mut Vec<Descriptor>,
) -> Result<(usize, Descriptor), String>
where
    M: std::ops::Deref,
    M::Target: GuestMemory,
{
    let mut count = 0usize;
    let mut last = None;
    for descriptor in chain {
        count += 1;
        if count > WALK_LIMIT {
            return Err(format!("chain longer than {WALK_LIMIT} descriptors"));
        }
        if descriptors.len() < MAX_DESCRIPTORS {
            descriptors.push(descriptor);
        }
        last = Some(descriptor);
    }
    let Some(last) = last else {
        return Err("empty chain (its head is not in the descriptor table)".into());
    };
    let range = GuestRange::new(last.addr(), last.len());
    if last.has_next() {
        // virtio-queue ended the chain early: a descriptor it could not read, a loop, an
        // index past the table, or more than 4 GiB in all. What it yielded last is not
        // the status descriptor, and writing there could corrupt the guest's data.
        Err(format!(
            "chain cut short after {count} descriptors ({range})"
        ))
    } else if !last.is_write_only() {
        Err(format!(
            "last descriptor ({range}) is device-readable: no status byte"
        ))
    } else if last.len() == 0 {
        Err(format!(
            "last descriptor ({range}) is empty: no status byte"
        ))
    } else {
        Ok((count, last))
    }
}
