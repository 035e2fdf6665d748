// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What guest_memfd and the sealed memfd have in common: a file of fixed, page-aligned
//! size whose page ranges can be allocated, discarded and mapped.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::mmap::{MmapRegion, MmapRegionBuilder, MmapRegionError};
use vm_memory::FileOffset;
use vmm_sys_util::errno;

use crate::error::{Error, Result, SpaceOp};
use crate::range::PageRange;

/// A shared file of fixed size, a multiple of the page size.
#[derive(Clone, Debug)]
pub(crate) struct MemoryFile {
    file: Arc<File>,
    size: u64,
}

impl MemoryFile {
    /// Wraps `file`; `size` must be a non-zero multiple of the page size.
    pub(crate) fn new(file: File, size: u64) -> Self {
        debug_assert!(PageRange::new(0, size).is_ok());
        MemoryFile {
            file: Arc::new(file),
            size,
        }
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn whole(&self) -> PageRange {
        PageRange::new(0, self.size).expect("the size is checked at creation")
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn file_offset(&self, start: u64) -> FileOffset {
        FileOffset::from_arc(Arc::clone(&self.file), start)
    }

    pub(crate) fn check_range(&self, range: PageRange) -> Result<()> {
        if range.end() > self.size {
            return Err(Error::OutOfBounds {
                range,
                file_size: self.size,
            });
        }
        Ok(())
    }

    /// Runs one `fallocate` over `range`, after checking it lies inside the file.
    ///
    /// Hand-written over libc: vmm-sys-util's `fallocate` offers only punch-hole and
    /// zero-range modes (guest_memfd refuses zero-range and needs plain `KEEP_SIZE`
    /// allocation), so one call site serves both operations.
    pub(crate) fn fallocate(&self, op: SpaceOp, range: PageRange) -> Result<()> {
        self.check_range(range)?;
        let mode = match op {
            SpaceOp::Allocate => libc::FALLOC_FL_KEEP_SIZE,
            SpaceOp::Discard => libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE,
        };
        let fail = |source| Error::FileSpace { op, range, source };
        // Ranges inside a file fit in off_t: the kernel caps file sizes below i64::MAX.
        let (Ok(offset), Ok(len)) = (i64::try_from(range.start()), i64::try_from(range.len()))
        else {
            return Err(fail(errno::Error::new(libc::EFBIG)));
        };
        // SAFETY: fallocate reads only its integer arguments; the fd is owned by
        // `self.file`, which outlives the call, and the return value is checked.
        let ret = unsafe { libc::fallocate64(self.file.as_raw_fd(), mode, offset, len) };
        if ret < 0 {
            return Err(fail(errno::Error::last()));
        }
        Ok(())
    }

    /// Maps `range` with `MAP_SHARED`, read-write, through vm-memory, after checking it
    /// lies inside the file.
    pub(crate) fn map_shared(&self, range: PageRange) -> Result<MmapRegion> {
        self.check_range(range)?;
        let map_err = |source| Error::Map { range, source };
        let len = usize::try_from(range.len())
            .map_err(|_| map_err(MmapRegionError::InvalidOffsetLength))?;
        MmapRegionBuilder::new(len)
            .with_file_offset(self.file_offset(range.start()))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(map_err)
    }
}
