// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A sealed memfd: the shared half of guest memory in the dual backing strategy.
//!
//! Its size is fixed by seals (`F_SEAL_SHRINK | F_SEAL_GROW`), and the seal set itself is
//! sealed (`F_SEAL_SEAL`), so nobody holding the fd can shrink it under a mapping (which
//! would turn accesses into SIGBUS) or grow it.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};

use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use crate::error::{Error, Result, SpaceOp};
use crate::file::MemoryFile;
use crate::range::{is_page_aligned, PageRange};

/// The seals a [`SealedMemfd`] carries.
pub const SHARED_MEMORY_SEALS: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// A memfd of fixed size, sealed against shrinking, growing and further sealing.
///
/// ```
/// use guest_memfd::{PageRange, SealedMemfd, PAGE_SIZE, SHARED_MEMORY_SEALS};
///
/// let shared = SealedMemfd::create("guest-shared", 16 * PAGE_SIZE).unwrap();
/// assert_eq!(shared.seals().unwrap(), SHARED_MEMORY_SEALS);
/// let mapping = shared.map().unwrap();
/// assert_eq!(mapping.size(), 16 * 4096);
/// shared.discard(PageRange::new(0, PAGE_SIZE).unwrap()).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct SealedMemfd {
    file: MemoryFile,
}

impl SealedMemfd {
    /// Creates a memfd named `name` of `size` bytes and seals it.
    ///
    /// `memfd_create` is called through libc: neither std nor vmm-sys-util wraps it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSize`] if `size` is zero or not a multiple of [`crate::PAGE_SIZE`] and
    /// [`Error::InvalidName`] if `name` contains a NUL byte (both before any system
    /// call); [`Error::SealedMemfd`] naming the step (`memfd_create`, `ftruncate`,
    /// `F_ADD_SEALS`) and the system's error if one fails.
    pub fn create(name: &str, size: u64) -> Result<Self> {
        if size == 0 || !is_page_aligned(size) {
            return Err(Error::InvalidSize { size });
        }
        let c_name = CString::new(name).map_err(|_| Error::InvalidName {
            name: name.to_owned(),
        })?;
        let fail = |step: &'static str, source: io::Error| Error::SealedMemfd {
            step,
            name: name.to_owned(),
            size,
            source,
        };
        // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call, the
        // flags are valid, and the return value is checked.
        let fd = unsafe {
            libc::memfd_create(c_name.as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC)
        };
        if fd < 0 {
            return Err(fail("memfd_create", io::Error::last_os_error()));
        }
        // SAFETY: memfd_create returned a new fd that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(|e| fail("ftruncate", e))?;
        // SAFETY: F_ADD_SEALS takes an integer argument; the fd is owned by `file`.
        let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, SHARED_MEMORY_SEALS) };
        if ret < 0 {
            return Err(fail("F_ADD_SEALS", io::Error::last_os_error()));
        }
        Ok(SealedMemfd {
            file: MemoryFile::new(file, size),
        })
    }

    /// The seals now on the file (`F_GET_SEALS`).
    ///
    /// # Errors
    ///
    /// [`Error::Stat`] with the system's error if `fcntl(F_GET_SEALS)` fails.
    pub fn seals(&self) -> Result<i32> {
        // SAFETY: F_GET_SEALS takes no argument; the fd is owned by `self.file`.
        let seals = unsafe { libc::fcntl(self.file.file().as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(Error::Stat(io::Error::last_os_error()));
        }
        Ok(seals)
    }

    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// The whole file as a range.
    pub fn whole(&self) -> PageRange {
        self.file.whole()
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        self.file.file()
    }

    /// A vm-memory [`FileOffset`] for this file at `start`.
    pub fn file_offset(&self, start: u64) -> FileOffset {
        self.file.file_offset(start)
    }

    /// Frees `range`: the pages read as zeros afterwards, in every mapping.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if `range` reaches past the end of the file (nothing is
    /// called); [`Error::FileSpace`] with the kernel's errno if `fallocate` fails.
    pub fn discard(&self, range: PageRange) -> Result<()> {
        self.file.fallocate(SpaceOp::Discard, range)
    }

    /// Maps the whole file, shared and read-write.
    ///
    /// # Errors
    ///
    /// As [`SealedMemfd::map_range`].
    pub fn map(&self) -> Result<MmapRegion> {
        self.map_range(self.whole())
    }

    /// Maps `range` of the file, shared and read-write.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if `range` reaches past the end of the file (nothing is
    /// called); [`Error::Map`] with the kernel's errno if `mmap` fails.
    pub fn map_range(&self, range: PageRange) -> Result<MmapRegion> {
        self.file.map_shared(range)
    }

    pub(crate) fn into_file(self) -> MemoryFile {
        self.file
    }
}

impl AsRawFd for SealedMemfd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.file().as_raw_fd()
    }
}

impl AsFd for SealedMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.file().as_fd()
    }
}
