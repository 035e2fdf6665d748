// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A file a VMM supplies for the shared half of guest memory, instead of a
//! [`SealedMemfd`](crate::SealedMemfd): its own memory zone (a memfd it set a NUMA policy
//! on, a tmpfs or shared file), as Cloud Hypervisor backs guest RAM.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Mutex;

use vm_memory::mmap::MmapRegion;
use vmm_sys_util::errno;
use vmm_sys_util::seek_hole::SeekHole;

use crate::error::{Error, Result, SpaceOp};
use crate::file::MemoryFile;
use crate::range::{is_page_aligned, PageRange};
use crate::sealed::SealedMemfd;

/// A file of fixed, page-aligned size whose pages can be mapped `MAP_SHARED` and
/// punched in 4 KiB units: the shared side of a dual-strategy region. Either a
/// [`SealedMemfd`] (what the workspace creates by default) or a file the VMM opened.
///
/// The VMM must not change the file's size while a region uses it, nor write its pages
/// through another mapping while they are private (this crate punches them when they
/// turn shared again, so nothing written then reaches the guest, but it costs memory).
#[derive(Clone, Debug)]
pub struct SharedBacking {
    file: MemoryFile,
}

impl SharedBacking {
    /// Takes `file`, a memfd, and seals its size (`F_SEAL_SHRINK | F_SEAL_GROW`, unless
    /// it has them already): the file's descriptor goes to device code (a vhost-user
    /// backend maps it), and a file that shrank under a mapping would turn the VMM's
    /// own accesses into `SIGBUS`. Its size must be a non-zero multiple of the page size.
    /// Whether it can be punched in 4 KiB units is found at the first punch; a memory
    /// builder punches the pages of a region that starts private at once, so that shows
    /// at build time.
    ///
    /// # Errors
    ///
    /// [`Error::Stat`] if `fstat` fails; [`Error::InvalidSize`] for an empty file or a
    /// size that is not page-aligned; [`Error::NotSealable`] with the kernel's errno if
    /// the file cannot be sealed (`EINVAL`: not a memfd; `EPERM`: a memfd made without
    /// `MFD_ALLOW_SEALING`, or sealed against new seals): use
    /// [`SharedBacking::from_file_unsealed`] for such a file, knowingly.
    pub fn from_file(file: File) -> Result<Self> {
        let wanted = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        let fd = file.as_raw_fd();
        // SAFETY: F_GET_SEALS reads only the descriptor, which `file` owns.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(Error::NotSealable {
                source: errno::Error::last(),
            });
        }
        if seals & wanted != wanted {
            // SAFETY: F_ADD_SEALS reads only its integer argument on the descriptor
            // `file` owns; the result is checked.
            if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, wanted) } < 0 {
                return Err(Error::NotSealable {
                    source: errno::Error::last(),
                });
            }
        }
        Self::from_file_unsealed(file)
    }

    /// Takes `file` as it is, without sealing its size: a tmpfs or disk file. The VMM
    /// must then keep anything from shrinking it while it backs a region, the device
    /// processes given its descriptor included (an access past the new end is a
    /// `SIGBUS` in the VMM), and a disk-backed file can `SIGBUS` when its file system is
    /// full. No private page's content is ever in it either way.
    ///
    /// # Errors
    ///
    /// [`Error::Stat`] if `fstat` fails; [`Error::InvalidSize`] for an empty file or a
    /// size that is not page-aligned.
    pub fn from_file_unsealed(file: File) -> Result<Self> {
        let size = file.metadata().map_err(Error::Stat)?.len();
        if size == 0 || !is_page_aligned(size) {
            return Err(Error::InvalidSize { size });
        }
        Ok(SharedBacking {
            file: MemoryFile::new(file, size),
        })
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// The file.
    pub fn file(&self) -> &File {
        self.file.file()
    }

    /// Checks that `range` lies inside the file.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if it does not.
    pub fn check_range(&self, range: PageRange) -> Result<()> {
        self.file.check_range(range)
    }

    /// Punches `range` (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): its pages read as zeros
    /// and hold no memory.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if `range` reaches past the end of the file (nothing is
    /// called); [`Error::FileSpace`] with the kernel's errno if `fallocate` fails
    /// (`EOPNOTSUPP` for a file system without punching). On hugetlbfs a punch of
    /// part of a huge page zeroes it without freeing memory.
    pub fn discard(&self, range: PageRange) -> Result<()> {
        self.file.fallocate(SpaceOp::Discard, range)
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

    /// The bytes of `range` the file holds memory for (`SEEK_DATA`/`SEEK_HOLE`, through
    /// vmm-sys-util's `SeekHole`).
    ///
    /// Seeking moves a file offset, and every duplicate of a descriptor (the VMM's own
    /// ones too) shares its open file's. So the seeks go to a new open file of their own,
    /// reopened read-only through `/proc/self/fd`. Where that cannot be opened (no
    /// `/proc` in a jail, a file without read permission), they go to the shared one,
    /// and its offset is put back before this returns, with calls from this process
    /// serialized; a thread doing `read`/`write` (rather than `pread`/`pwrite` or a
    /// mapping) on that file at the same time may then see its offset move.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if `range` reaches past the end of the file;
    /// [`Error::Seek`] with the system's error if duplicating the descriptor or `lseek`
    /// fails.
    pub fn allocated_bytes(&self, range: PageRange) -> Result<u64> {
        self.check_range(range)?;
        let fd = self.file.file().as_raw_fd();
        if let Ok(mut own) = File::open(format!("/proc/self/fd/{fd}")) {
            return count_data(&mut own, range);
        }
        /// Serializes the save-seek-restore of shared offsets in this process.
        static SHARED_OFFSETS: Mutex<()> = Mutex::new(());
        let _serial = SHARED_OFFSETS.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = self.file.file().try_clone().map_err(Error::Seek)?;
        let saved = file.stream_position().map_err(Error::Seek)?;
        let counted = count_data(&mut file, range);
        let restored = file.seek(SeekFrom::Start(saved)).map_err(Error::Seek);
        let held = counted?;
        restored?;
        Ok(held)
    }
}

/// The bytes of `range` that hold data in `file`, by `SEEK_DATA`/`SEEK_HOLE` (which move
/// its offset).
fn count_data(file: &mut File, range: PageRange) -> Result<u64> {
    let mut held = 0;
    let mut at = range.start();
    while at < range.end() {
        let Some(data) = file.seek_data(at).map_err(Error::Seek)? else {
            break;
        };
        if data >= range.end() {
            break;
        }
        let hole = file.seek_hole(data).map_err(Error::Seek)?;
        let end = hole.unwrap_or(range.end()).min(range.end());
        if end <= at {
            break;
        }
        held += end - data;
        at = end;
    }
    Ok(held)
}

impl From<SealedMemfd> for SharedBacking {
    fn from(memfd: SealedMemfd) -> Self {
        SharedBacking {
            file: memfd.into_file(),
        }
    }
}

impl AsFd for SharedBacking {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.file().as_fd()
    }
}
