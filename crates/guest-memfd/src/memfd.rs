// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest_memfd file: creation, file space and the host mapping.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use kvm_bindings::kvm_create_guest_memfd;
use kvm_bindings::KVM_CAP_GUEST_MEMFD;
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;

use crate::claim::{Claims, RangeClaim};
use crate::error::{Error, Result, SpaceOp};
use crate::file::MemoryFile;
use crate::flags::GuestMemfdFlags;
use crate::range::{is_page_aligned, PageRange};
use crate::uapi::KVM_CAP_GUEST_MEMFD_FLAGS;
use crate::vm_ops::VmMemoryOps;
use vmm_sys_util::errno;

/// A KVM guest_memfd: a file of guest memory that belongs to one VM.
///
/// The value owns the file descriptor and closes it when the last clone is dropped.
/// Keep one alive for as long as a memslot is bound to the file: a memslot does not keep
/// the file open, and once it is closed KVM unbinds it, so the guest's next access to
/// that memory makes `KVM_RUN` fail with `EFAULT`.
///
/// ```no_run
/// use guest_memfd::{GuestMemfd, GuestMemfdFlags, PageRange, PAGE_SIZE};
///
/// // Needs /dev/kvm: without it, the example says so and stops.
/// let Ok(kvm) = kvm_ioctls::Kvm::new() else {
///     println!("SKIPPED: this example needs /dev/kvm");
///     return;
/// };
/// let vm = kvm.create_vm().unwrap();
/// let gmem = GuestMemfd::create(&vm, 2 << 20, GuestMemfdFlags::empty()).unwrap();
/// let first_page = PageRange::new(0, PAGE_SIZE).unwrap();
/// gmem.allocate(first_page).unwrap();
/// gmem.discard(first_page).unwrap();
/// ```
#[derive(Clone, Debug)]
pub struct GuestMemfd {
    file: MemoryFile,
    flags: GuestMemfdFlags,
    /// The ranges users hold ([`GuestMemfd::claim`]), shared by every clone.
    claims: Claims,
    /// How many times users changed its pages' state ([`GuestMemfd::note_conversion`]).
    conversions: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The guest_memfd flags `vm` accepts (`KVM_CAP_GUEST_MEMFD_FLAGS`; none on hosts that
/// predate the capability).
pub fn supported_flags(vm: &(impl VmMemoryOps + ?Sized)) -> GuestMemfdFlags {
    let mask = vm.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS);
    GuestMemfdFlags::from_bits_retain(u64::try_from(mask).unwrap_or(0))
}

impl GuestMemfd {
    /// Creates a guest_memfd of `size` bytes on `vm` (a kvm-ioctls `VmFd`, or any other
    /// [`VmMemoryOps`]).
    ///
    /// Checks, before asking the kernel, that the VM supports guest_memfd, that `size` is a
    /// non-zero multiple of the page size and that `flags` are among those the VM accepts.
    ///
    /// # Errors
    ///
    /// [`Error::GuestMemfdUnsupported`], [`Error::InvalidSize`] and
    /// [`Error::UnsupportedFlags`] before any system call; [`Error::Create`] with the
    /// kernel's errno if `KVM_CREATE_GUEST_MEMFD` fails, or if marking the descriptor
    /// close-on-exec does.
    ///
    /// The descriptor is close-on-exec, as Rust's own files are: KVM creates it without
    /// `FD_CLOEXEC`, and a process the VMM starts (a vhost-user backend, a helper) must
    /// not inherit the file of the guest's private pages. A `fork` and `exec` on another
    /// thread between the ioctl and the `fcntl` that sets the flag can still inherit it.
    pub fn create(
        vm: &(impl VmMemoryOps + ?Sized),
        size: u64,
        flags: GuestMemfdFlags,
    ) -> Result<Self> {
        if vm.check_extension_raw(KVM_CAP_GUEST_MEMFD) <= 0 {
            return Err(Error::GuestMemfdUnsupported);
        }
        if size == 0 || !is_page_aligned(size) {
            return Err(Error::InvalidSize { size });
        }
        let supported = supported_flags(vm);
        if !supported.contains(flags) {
            return Err(Error::UnsupportedFlags {
                requested: flags,
                supported,
                unsupported: flags.difference(supported),
            });
        }
        let request = kvm_create_guest_memfd {
            size,
            flags: flags.bits(),
            ..Default::default()
        };
        let fd = vm
            .create_guest_memfd(request)
            .map_err(|source| Error::Create {
                size,
                flags,
                source,
            })?;
        // SAFETY: F_SETFD takes an integer argument; `fd` is an open descriptor we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } < 0 {
            return Err(Error::Create {
                size,
                flags,
                source: errno::Error::last(),
            });
        }
        Ok(GuestMemfd {
            file: MemoryFile::new(File::from(fd), size),
            flags,
            claims: Claims::default(),
            conversions: Default::default(),
        })
    }

    /// Claims `range` of the file for one user (a region of guest memory), shared by
    /// every clone of this value: it fails while another claim overlaps it. The claim
    /// holds the range until it is released or dropped.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if `range` reaches past the file; [`Error::RangeClaimed`]
    /// naming the claim it overlaps.
    pub fn claim(&self, range: PageRange) -> Result<RangeClaim> {
        self.check_range(range)?;
        RangeClaim::take(&self.claims, range)
    }

    /// Counts one change of state (private or shared) of some of the file's pages, made
    /// by a user of the file; shared by every clone. A saved map records
    /// [`GuestMemfd::conversions`], so that a restore can tell whether the pages changed
    /// since.
    pub fn note_conversion(&self) {
        self.conversions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many changes of state [`GuestMemfd::note_conversion`] counted, by every clone.
    pub fn conversions(&self) -> u64 {
        self.conversions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The file's size in bytes (fixed at creation: guest_memfd cannot be resized).
    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// The flags the file was created with.
    pub fn flags(&self) -> GuestMemfdFlags {
        self.flags
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

    /// Checks that `range` lies inside the file.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if `range` reaches past the end of the file.
    pub fn check_range(&self, range: PageRange) -> Result<()> {
        self.file.check_range(range)
    }

    /// Backs `range` with memory (`fallocate(FALLOC_FL_KEEP_SIZE)`). The pages are held,
    /// on the nodes of the file's policy, but not zeroed until first touched; until then
    /// [`crate::node_of_page`] reports them not resident.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if `range` reaches past the end of the file (nothing is
    /// called); [`Error::FileSpace`] with the kernel's errno if `fallocate` fails (for
    /// example `ENOMEM` or `ENOSPC` when the memory is not there).
    pub fn allocate(&self, range: PageRange) -> Result<()> {
        self.file.fallocate(SpaceOp::Allocate, range)
    }

    /// Frees `range` (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`).
    ///
    /// KVM first invalidates every guest mapping of these pages; a later guest access
    /// faults in a fresh, zeroed page. This is the seed's `invalidate_page_range`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if `range` reaches past the end of the file (nothing is
    /// called); [`Error::FileSpace`] with the kernel's errno if `fallocate` fails.
    pub fn discard(&self, range: PageRange) -> Result<()> {
        self.file.fallocate(SpaceOp::Discard, range)
    }

    /// Maps the whole file into the host, shared and read-write.
    ///
    /// # Errors
    ///
    /// As [`GuestMemfd::map_range`].
    pub fn map(&self) -> Result<MmapRegion> {
        self.map_range(self.whole())
    }

    /// Maps `range` of the file into the host, shared and read-write (`MAP_PRIVATE` is never
    /// used: guest_memfd refuses copy-on-write). Unmapped when the region is dropped.
    ///
    /// Needs a file created with `MMAP | INIT_SHARED`: without `MMAP` the kernel refuses
    /// the mapping, and without `INIT_SHARED` every access through it raises SIGBUS.
    ///
    /// # Errors
    ///
    /// [`Error::NotMappable`] for a file created without `MMAP`, [`Error::NotShared`]
    /// for one created without `INIT_SHARED`, [`Error::OutOfBounds`] if `range` reaches
    /// past the end of the file (all before any system call); [`Error::Map`] with the
    /// kernel's errno if `mmap` fails.
    pub fn map_range(&self, range: PageRange) -> Result<MmapRegion> {
        if !self.flags.contains(GuestMemfdFlags::MMAP) {
            return Err(Error::NotMappable { flags: self.flags });
        }
        if !self.flags.contains(GuestMemfdFlags::INIT_SHARED) {
            return Err(Error::NotShared { flags: self.flags });
        }
        self.file.map_shared(range)
    }
}

impl AsRawFd for GuestMemfd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.file().as_raw_fd()
    }
}

impl AsFd for GuestMemfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.file().as_fd()
    }
}
