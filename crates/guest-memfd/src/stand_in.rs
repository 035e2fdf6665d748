// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A stand-in for KVM, for tests of code built on this crate: [`StandInVm`].
//!
//! Behind the `test-utils` cargo feature. It implements [`VmMemoryOps`] in userspace, without
//! `/dev/kvm`, so that the userspace logic above this crate (planning, rollback,
//! listeners, state, bounds, device mappers) can be tested on any host, also on one whose
//! KVM has no guest_memfd. It checks what KVM checks, with KVM's errnos, and records
//! what KVM would hold:
//!
//! - its "guest_memfd" files are sealed memfds of the size asked for (`mmap`,
//!   `fallocate` and punch hole behave as they do on a guest_memfd created with
//!   `MMAP | INIT_SHARED`); creation refuses what KVM refuses (flags outside
//!   `MMAP | INIT_SHARED`, a size of zero or not page-aligned);
//! - a memslot table with KVM's rules: a guest-physical range another slot covers is
//!   `EEXIST`; a foreign file, a range past the file, a file range another slot is bound
//!   to, unaligned values, unknown flags and changes to a guest_memfd slot are `EINVAL`;
//!   deleting a slot that does not exist is `EINVAL`;
//! - memory attributes, when created with [`StandInVm::with_memory_attributes`], kept
//!   per page and readable with [`StandInVm::is_private`];
//! - the hypercalls enabled to exit ([`StandInVm::hypercall_exits`]).
//!
//! What it cannot stand in for: a guest. No vCPU runs on it, so nothing checks that a
//! guest sees what the host wrote, that a punched page is gone from the guest's view, or
//! what the kernel's guest_memfd refuses beyond the checks above. Its files are memfds,
//! so unlike a guest_memfd they take `read`, `write`, `pread`, `pwrite`, `MAP_PRIVATE`
//! mappings, a mapping of a file created without `MMAP`, and `fallocate` without
//! `KEEP_SIZE`; past the end of the file they answer `EPERM` where guest_memfd answers
//! `EINVAL`; and anyone may read their "private" pages through `/proc/self/fd`. Tests of
//! those run on real KVM (the `guest-memfd` crate's own tests, and the nested lab).
//!
//! It is for tests only: it protects nothing, and a VMM that hands it to
//! `vm-private-memory` gets memory no guest can run on. Enable the feature in
//! `[dev-dependencies]`, never in `[dependencies]`.
//!
//! ```
//! use std::sync::Arc;
//! use guest_memfd::stand_in::StandInVm;
//! use guest_memfd::{Capabilities, GuestMemfd, GuestMemfdFlags, Memslot, PageRange};
//!
//! let vm = Arc::new(StandInVm::new());
//! assert!(Capabilities::of_vm(&*vm).in_place_capable());
//! let gmem = GuestMemfd::create(&*vm, 2 << 20, GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED)
//!     .unwrap();
//! let slot = Memslot::new(0, PageRange::new(0, 2 << 20).unwrap(), &gmem, 0).unwrap();
//! // SAFETY: no userspace address is set, so nothing must stay mapped.
//! unsafe { slot.bind(&*vm) }.unwrap();
//! // A second slot over the same guest-physical range: EEXIST, as KVM answers.
//! let again = Memslot::new(1, PageRange::new(0, 2 << 20).unwrap(), &gmem, 0).unwrap();
//! // SAFETY: as above.
//! assert!(unsafe { again.bind(&*vm) }.is_err());
//! assert_eq!(vm.memslots().len(), 1);
//! ```

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
    KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO, KVM_CAP_NR_MEMSLOTS, KVM_CAP_USER_MEMORY2, KVM_CAP_VM_TYPES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEM_GUEST_MEMFD, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
};
use vmm_sys_util::errno;

use crate::caps::Capabilities;
use crate::range::{is_page_aligned, PAGE_SIZE};
use crate::uapi::{
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_CAP_GUEST_MEMFD_FLAGS,
    KVM_HC_MAP_GPA_RANGE,
};
use crate::vm_ops::VmMemoryOps;

/// Memslots per address space, as our hosts' KVM answers `KVM_CAP_NR_MEMSLOTS`.
pub const STAND_IN_MEMSLOTS: u32 = 32764;
/// Address spaces (x86 KVM has two: the second is System Management Mode's).
const STAND_IN_ADDRESS_SPACES: u32 = 2;
/// x86 KVM's `KVM_MEM_MAX_NR_PAGES`: the most pages one memslot may have.
const MAX_PAGES_PER_SLOT: u64 = (1 << 31) - 1;
/// The guest-physical address width [`StandInVm::new`] assumes: the narrowest CPU this
/// project's tests meet (the nested lab's emulated one), so that a layout the stand-in
/// takes fits the machines the same test runs on.
pub const STAND_IN_ADDRESS_BITS: u32 = 40;

/// A userspace stand-in for a KVM VM: see the [module docs](self).
#[derive(Debug)]
pub struct StandInVm {
    memory_attributes: bool,
    address_bits: u32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The files created, by (device, inode): their size.
    files: BTreeMap<(u64, u64), u64>,
    /// The slots bound, by slot number (address space in the high 16 bits), each with
    /// the (device, inode) of its guest_memfd, taken when it was bound.
    slots: BTreeMap<u32, (kvm_userspace_memory_region2, Option<(u64, u64)>)>,
    /// Private guest-physical ranges, start -> end, disjoint and not adjacent.
    private: BTreeMap<u64, u64>,
    hypercall_exits: u64,
}

fn einval() -> errno::Error {
    errno::Error::new(libc::EINVAL)
}

impl Default for StandInVm {
    fn default() -> Self {
        StandInVm::new()
    }
}

impl StandInVm {
    /// A stand-in for a default-type VM on Linux 6.18 or later: guest_memfd with
    /// `MMAP | INIT_SHARED`, no memory attributes (the in-place strategy's host).
    pub fn new() -> Self {
        StandInVm {
            memory_attributes: false,
            address_bits: STAND_IN_ADDRESS_BITS,
            state: Mutex::default(),
        }
    }

    /// A stand-in for a VM with memory attributes (`KVM_MEMORY_ATTRIBUTE_PRIVATE`), as
    /// `KVM_X86_SW_PROTECTED_VM` has: the dual strategy runs on it. As on x86 KVM, such
    /// a VM offers guest_memfd `MMAP` but not `INIT_SHARED` (its pages start private),
    /// so the in-place strategy does not.
    pub fn with_memory_attributes() -> Self {
        StandInVm {
            memory_attributes: true,
            ..StandInVm::new()
        }
    }

    /// The same stand-in with a guest-physical address width of `bits` (KVM refuses a
    /// memslot whose last page lies past it, with `EINVAL`).
    pub fn with_address_bits(self, bits: u32) -> Self {
        StandInVm {
            address_bits: bits.min(63),
            ..self
        }
    }

    fn guest_memfd_flags(&self) -> u64 {
        if self.memory_attributes {
            GUEST_MEMFD_FLAG_MMAP
        } else {
            GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the table was held leaves it as consistent as any call left it.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The memslots bound now, by slot number.
    pub fn memslots(&self) -> Vec<kvm_userspace_memory_region2> {
        self.state().slots.values().map(|(slot, _)| *slot).collect()
    }

    /// Whether the page at guest-physical `gpa` has the private attribute.
    pub fn is_private(&self, gpa: u64) -> bool {
        let state = self.state();
        state
            .private
            .range(..=gpa)
            .next_back()
            .is_some_and(|(_, &end)| gpa < end)
    }

    /// The private guest-physical ranges, as `(start, end)` pairs in address order.
    pub fn private_ranges(&self) -> Vec<(u64, u64)> {
        self.state().private.iter().map(|(&s, &e)| (s, e)).collect()
    }

    /// The hypercalls enabled to exit to userspace (bit `n` for hypercall `n`).
    pub fn hypercall_exits(&self) -> u64 {
        self.state().hypercall_exits
    }

    /// The (device, inode) of open descriptor `fd`: how a file is recognised even
    /// when its descriptor number is another one's.
    fn identity(fd: RawFd) -> Result<(u64, u64), errno::Error> {
        let mut stat = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstat writes at most one `struct stat` into `stat`, which is that
        // large; an fd that is not open makes it fail with EBADF and write nothing, and
        // a number since reused by another file only reads that file's metadata (which
        // then matches no file of this VM).
        if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
            return Err(errno::Error::last());
        }
        // SAFETY: fstat succeeded, so it filled the struct (and it was zeroed before).
        let stat = unsafe { stat.assume_init() };
        Ok((stat.st_dev, stat.st_ino))
    }
}

impl VmMemoryOps for StandInVm {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        match cap {
            KVM_CAP_USER_MEMORY2 | KVM_CAP_MEMORY_FAULT_INFO | KVM_CAP_GUEST_MEMFD => 1,
            KVM_CAP_GUEST_MEMFD_FLAGS => self.guest_memfd_flags() as i32,
            KVM_CAP_MEMORY_ATTRIBUTES if self.memory_attributes => {
                KVM_MEMORY_ATTRIBUTE_PRIVATE as i32
            }
            // DEFAULT, and SW_PROTECTED where the VM has attributes.
            KVM_CAP_VM_TYPES => 1 | i32::from(self.memory_attributes) << 1,
            KVM_CAP_EXIT_HYPERCALL => 1 << KVM_HC_MAP_GPA_RANGE,
            KVM_CAP_NR_MEMSLOTS => STAND_IN_MEMSLOTS as i32,
            _ => 0,
        }
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        if request.flags & !self.guest_memfd_flags() != 0
            || request.size == 0
            || !is_page_aligned(request.size)
        {
            return Err(einval());
        }
        let size = libc::off_t::try_from(request.size).map_err(|_| einval())?;
        let name: &CStr = c"stand-in guest_memfd";
        // SAFETY: `name` is a valid C string; memfd_create reads it and returns a new
        // descriptor or -1. memfd_create has no wrapper in std or vmm-sys-util.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(errno::Error::last());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate and fcntl(F_ADD_SEALS) take integer arguments on a
        // descriptor we own.
        let sized = unsafe { libc::ftruncate(fd.as_raw_fd(), size) } == 0
            // SAFETY: as above.
            && unsafe {
                libc::fcntl(
                    fd.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
                )
            } == 0;
        if !sized {
            return Err(errno::Error::last());
        }
        let id = Self::identity(fd.as_raw_fd())?;
        self.state().files.insert(id, request.size);
        Ok(fd)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        // The checks of Linux 6.18's `kvm_set_memory_region`, in its order.
        let known = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD;
        let gmem = region.flags & KVM_MEM_GUEST_MEMFD != 0;
        let (address_space, id) = (region.slot >> 16, region.slot & 0xffff);
        let end = region.guest_phys_addr.checked_add(region.memory_size);
        if region.flags & !known != 0
            || (gmem && region.flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) != 0)
            || !is_page_aligned(region.memory_size)
            || !is_page_aligned(region.guest_phys_addr)
            || !is_page_aligned(region.userspace_addr)
            || (gmem && !is_page_aligned(region.guest_memfd_offset))
            || (gmem
                && region
                    .guest_memfd_offset
                    .checked_add(region.memory_size)
                    .is_none())
            || address_space >= STAND_IN_ADDRESS_SPACES
            || id >= STAND_IN_MEMSLOTS
            || end.is_none()
            || region.memory_size / PAGE_SIZE > MAX_PAGES_PER_SLOT
        {
            return Err(einval());
        }
        let end = end.unwrap_or(u64::MAX);
        let mut state = self.state();
        let old = state.slots.get(&region.slot).map(|(old, _)| *old);
        if region.memory_size == 0 {
            return match state.slots.remove(&region.slot) {
                Some(_) => Ok(()),
                None => Err(einval()),
            };
        }
        if let Some(old) = old {
            // Guest_memfd slots are immutable (they can only be deleted); another may
            // move or change its dirty logging, but not its size, address or
            // read-only flag.
            if gmem
                || old.flags & KVM_MEM_GUEST_MEMFD != 0
                || old.userspace_addr != region.userspace_addr
                || old.memory_size != region.memory_size
                || (old.flags ^ region.flags) & KVM_MEM_READONLY != 0
            {
                return Err(einval());
            }
            if old.guest_phys_addr == region.guest_phys_addr {
                if old.flags != region.flags {
                    state.slots.insert(region.slot, (region, None));
                }
                return Ok(());
            }
        }
        let overlaps = state.slots.iter().any(|(&slot, (other, _))| {
            slot != region.slot
                && slot >> 16 == address_space
                && region.guest_phys_addr < other.guest_phys_addr + other.memory_size
                && other.guest_phys_addr < end
        });
        if overlaps {
            return Err(errno::Error::new(libc::EEXIST));
        }
        let mut bound = None;
        if gmem {
            // `kvm_gmem_bind`: an open descriptor, a file of this VM, the range inside
            // it and bound to no other slot.
            let id = i32::try_from(region.guest_memfd)
                .map_err(|_| errno::Error::new(libc::EBADF))
                .and_then(Self::identity)?;
            let size = *state.files.get(&id).ok_or_else(einval)?;
            let file_end = region.guest_memfd_offset + region.memory_size;
            if file_end > size {
                return Err(einval());
            }
            let taken = state.slots.values().any(|(other, other_id)| {
                *other_id == Some(id)
                    && region.guest_memfd_offset < other.guest_memfd_offset + other.memory_size
                    && other.guest_memfd_offset < file_end
            });
            if taken {
                return Err(einval());
            }
            bound = Some(id);
        }
        // Then x86's's `kvm_arch_prepare_memory_region`: the last page within the CPU's
        // guest-physical address width.
        if (end - 1) >> self.address_bits != 0 {
            return Err(einval());
        }
        state.slots.insert(region.slot, (region, bound));
        Ok(())
    }

    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<(), errno::Error> {
        if !self.memory_attributes {
            return Err(errno::Error::new(libc::ENOTTY));
        }
        let private = u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE);
        let start = attributes.address;
        let end = start.checked_add(attributes.size).ok_or_else(einval)?;
        if attributes.flags != 0
            || attributes.attributes & !private != 0
            || attributes.size == 0
            || !is_page_aligned(start)
            || !is_page_aligned(attributes.size)
        {
            return Err(einval());
        }
        let mut state = self.state();
        let map = &mut state.private;
        // Cut [start, end) out of every range it touches, then add it back if private.
        let touching: Vec<(u64, u64)> = map
            .range(..end.saturating_add(PAGE_SIZE))
            .filter(|(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        let (mut new_start, mut new_end) = (start, end);
        for (s, e) in touching {
            map.remove(&s);
            if attributes.attributes & private != 0 {
                new_start = new_start.min(s);
                new_end = new_end.max(e);
            } else {
                if s < start {
                    map.insert(s, start);
                }
                if e > end {
                    map.insert(end, e);
                }
            }
        }
        if attributes.attributes & private != 0 {
            map.insert(new_start, new_end);
        }
        Ok(())
    }

    fn enable_hypercall_exits(&self, hypercalls: u64) -> Result<(), errno::Error> {
        if hypercalls & !(1 << KVM_HC_MAP_GPA_RANGE) != 0 {
            return Err(einval());
        }
        self.state().hypercall_exits = hypercalls;
        Ok(())
    }
}

thread_local! {
    static SAID_STAND_IN: Cell<bool> = const { Cell::new(false) };
}

/// The VM a test of userspace logic runs on: a real default-type VM where this host's
/// KVM has in-place guest_memfd (`MMAP | INIT_SHARED`), so that the logic meets the
/// kernel; otherwise a [`StandInVm`], and the test prints, once per thread, a line
/// `STAND-IN <test>: <what this host lacks>` (the test is the thread's name, which is
/// the test's name under libtest), so that a run's output tells which tests met the
/// kernel.
///
/// # Panics
///
/// If `/dev/kvm` can be opened but no VM can be created on it: that is a broken host,
/// not a missing capability.
pub fn vm_for_logic_tests() -> Arc<dyn VmMemoryOps> {
    match kvm_ioctls::Kvm::new() {
        Ok(kvm) => {
            let vm = kvm.create_vm().expect("KVM_CREATE_VM of a default-type VM");
            let caps = Capabilities::of_vm(&vm);
            if caps.in_place_capable() {
                return Arc::new(vm);
            }
            say_stand_in(if caps.guest_memfd {
                "a default-type VM here has guest_memfd without MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))"
            } else {
                "a default-type VM here has no guest_memfd (KVM_CAP_GUEST_MEMFD (234) is 0)"
            });
        }
        Err(e) => say_stand_in(&format!("/dev/kvm cannot be opened here ({e})")),
    }
    Arc::new(StandInVm::new())
}

fn say_stand_in(why: &str) {
    if !SAID_STAND_IN.with(|said| said.replace(true)) {
        let thread = std::thread::current();
        // Under libtest the thread is named after the test; elsewhere, the program.
        let program = std::env::args().next().unwrap_or_default();
        let program = program.rsplit('/').next().unwrap_or("this program");
        let test = thread
            .name()
            .filter(|name| *name != "main")
            .unwrap_or(program);
        println!("STAND-IN {test}: {why}; its logic runs on guest_memfd::stand_in::StandInVm, the kernel's part in the nested lab");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(address: u64, size: u64, private: bool) -> kvm_memory_attributes {
        kvm_memory_attributes {
            address,
            size,
            attributes: if private {
                u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE)
            } else {
                0
            },
            flags: 0,
        }
    }

    #[test]
    fn attributes_are_kept_per_page_and_merge() {
        let vm = StandInVm::with_memory_attributes();
        vm.set_memory_attributes(attrs(0, 4 * PAGE_SIZE, true))
            .unwrap();
        vm.set_memory_attributes(attrs(PAGE_SIZE, PAGE_SIZE, false))
            .unwrap();
        assert_eq!(
            vm.private_ranges(),
            vec![(0, PAGE_SIZE), (2 * PAGE_SIZE, 4 * PAGE_SIZE)]
        );
        assert!(!vm.is_private(PAGE_SIZE));
        assert!(vm.is_private(3 * PAGE_SIZE));
        vm.set_memory_attributes(attrs(PAGE_SIZE, PAGE_SIZE, true))
            .unwrap();
        assert_eq!(vm.private_ranges(), vec![(0, 4 * PAGE_SIZE)]);
        vm.set_memory_attributes(attrs(4 * PAGE_SIZE, PAGE_SIZE, true))
            .unwrap();
        assert_eq!(vm.private_ranges(), vec![(0, 5 * PAGE_SIZE)]);
        assert_eq!(
            vm.set_memory_attributes(attrs(1, PAGE_SIZE, true))
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
        assert_eq!(
            vm.set_memory_attributes(attrs(!0xfff, PAGE_SIZE, true))
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn without_attributes_the_ioctl_is_missing() {
        let vm = StandInVm::new();
        assert_eq!(vm.check_extension_raw(KVM_CAP_MEMORY_ATTRIBUTES), 0);
        assert_eq!(
            vm.set_memory_attributes(attrs(0, PAGE_SIZE, true))
                .unwrap_err()
                .errno(),
            libc::ENOTTY
        );
    }

    fn gmem(vm: &StandInVm, size: u64) -> OwnedFd {
        vm.create_guest_memfd(kvm_create_guest_memfd {
            size,
            flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            ..Default::default()
        })
        .unwrap()
    }

    fn slot(
        slot: u32,
        gpa: u64,
        size: u64,
        fd: &OwnedFd,
        offset: u64,
    ) -> kvm_userspace_memory_region2 {
        kvm_userspace_memory_region2 {
            slot,
            flags: KVM_MEM_GUEST_MEMFD,
            guest_phys_addr: gpa,
            memory_size: size,
            guest_memfd: fd.as_raw_fd() as u32,
            guest_memfd_offset: offset,
            ..Default::default()
        }
    }

    #[test]
    fn memslots_follow_kvms_rules() {
        let vm = StandInVm::new();
        let file = gmem(&vm, 4 * PAGE_SIZE);
        let bind = |r| {
            // SAFETY: no userspace address is set.
            unsafe { vm.set_user_memory_region2(r) }.map_err(|e| e.errno())
        };
        assert_eq!(bind(slot(0, 0, 2 * PAGE_SIZE, &file, 0)), Ok(()));
        // A guest_memfd slot is immutable: the same again, or moved, is refused.
        assert_eq!(bind(slot(0, 0, 2 * PAGE_SIZE, &file, 0)), Err(libc::EINVAL));
        assert_eq!(
            bind(slot(0, PAGE_SIZE << 8, 2 * PAGE_SIZE, &file, 0)),
            Err(libc::EINVAL)
        );
        // Guest-physical overlap, file overlap, past the file, unaligned offset.
        assert_eq!(
            bind(slot(1, PAGE_SIZE, PAGE_SIZE, &file, 2 * PAGE_SIZE)),
            Err(libc::EEXIST)
        );
        assert_eq!(
            bind(slot(1, 1 << 30, PAGE_SIZE, &file, PAGE_SIZE)),
            Err(libc::EINVAL)
        );
        assert_eq!(
            bind(slot(1, 1 << 30, 4 * PAGE_SIZE, &file, 2 * PAGE_SIZE)),
            Err(libc::EINVAL)
        );
        assert_eq!(
            bind(slot(1, 1 << 30, PAGE_SIZE, &file, 1)),
            Err(libc::EINVAL)
        );
        assert_eq!(
            bind(slot(1, 1 << 30, 2 * PAGE_SIZE, &file, 2 * PAGE_SIZE)),
            Ok(())
        );
        // The same guest-physical range in the other address space (SMM's) is free.
        assert_eq!(
            bind(slot(1 << 16 | 7, 0, PAGE_SIZE, &file, 3 * PAGE_SIZE)),
            Err(libc::EINVAL)
        );
        let other_file = gmem(&vm, PAGE_SIZE);
        assert_eq!(
            bind(slot(1 << 16 | 7, 0, PAGE_SIZE, &other_file, 0)),
            Ok(())
        );
        assert_eq!(
            bind(slot(2 << 16 | 7, 1 << 31, PAGE_SIZE, &other_file, 0)),
            Err(libc::EINVAL)
        );
        // A file another VM created, and a descriptor that is not open.
        let foreign = gmem(&StandInVm::new(), PAGE_SIZE);
        assert_eq!(
            bind(slot(2, 1 << 31, PAGE_SIZE, &foreign, 0)),
            Err(libc::EINVAL)
        );
        let mut closed = slot(2, 1 << 31, PAGE_SIZE, &foreign, 0);
        closed.guest_memfd = 100_000;
        assert_eq!(bind(closed), Err(libc::EBADF));
        // Past the guest-physical address width (40 bits by default).
        let wide = gmem(&vm, 2 * PAGE_SIZE);
        assert_eq!(
            bind(slot(3, (1 << 40) - PAGE_SIZE, 2 * PAGE_SIZE, &wide, 0)),
            Err(libc::EINVAL)
        );
        assert_eq!(
            bind(slot(3, (1 << 40) - 2 * PAGE_SIZE, 2 * PAGE_SIZE, &wide, 0)),
            Ok(())
        );
        // Delete, and delete again.
        assert_eq!(bind(slot(0, 0, 0, &file, 0)), Ok(()));
        assert_eq!(bind(slot(0, 0, 0, &file, 0)), Err(libc::EINVAL));
        assert_eq!(vm.memslots().len(), 3);
    }

    #[test]
    fn a_slot_without_guest_memfd_may_move_and_change_its_logging_only() {
        let vm = StandInVm::new();
        let plain = |slot, gpa, flags| kvm_userspace_memory_region2 {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: 2 * PAGE_SIZE,
            userspace_addr: 1 << 30,
            ..Default::default()
        };
        let bind = |r| {
            // SAFETY: the stand-in never touches `userspace_addr`.
            unsafe { vm.set_user_memory_region2(r) }.map_err(|e| e.errno())
        };
        assert_eq!(bind(plain(0, 0, 0)), Ok(()));
        assert_eq!(bind(plain(0, 0, 0)), Ok(()));
        assert_eq!(bind(plain(0, 0, KVM_MEM_LOG_DIRTY_PAGES)), Ok(()));
        assert_eq!(bind(plain(0, 0, KVM_MEM_READONLY)), Err(libc::EINVAL));
        assert_eq!(bind(plain(1, 1 << 20, 0)), Ok(()));
        assert_eq!(bind(plain(0, 1 << 20, 0)), Err(libc::EEXIST));
        assert_eq!(bind(plain(0, 1 << 21, 0)), Ok(()));
        assert_eq!(vm.memslots()[0].guest_phys_addr, 1 << 21);
    }

    #[test]
    fn guest_memfd_creation_refuses_what_kvm_refuses() {
        let vm = StandInVm::new();
        let create = |size, flags| {
            vm.create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags,
                ..Default::default()
            })
            .map(|_| ())
            .map_err(|e| e.errno())
        };
        assert_eq!(create(0, 0), Err(libc::EINVAL));
        assert_eq!(create(PAGE_SIZE + 1, 0), Err(libc::EINVAL));
        assert_eq!(create(PAGE_SIZE, 1 << 2), Err(libc::EINVAL));
        assert_eq!(create(PAGE_SIZE, 3), Ok(()));
        // A VM with memory attributes offers MMAP, not INIT_SHARED, as x86 KVM does.
        let dual = StandInVm::with_memory_attributes();
        assert_eq!(dual.check_extension_raw(KVM_CAP_GUEST_MEMFD_FLAGS), 1);
        assert_eq!(
            dual.create_guest_memfd(kvm_create_guest_memfd {
                size: PAGE_SIZE,
                flags: GUEST_MEMFD_FLAG_INIT_SHARED,
                ..Default::default()
            })
            .unwrap_err()
            .errno(),
            libc::EINVAL
        );
        assert_eq!(
            vm.enable_hypercall_exits(1).unwrap_err().errno(),
            libc::EINVAL
        );
        vm.enable_hypercall_exits(1 << KVM_HC_MAP_GPA_RANGE)
            .unwrap();
        assert_eq!(vm.hypercall_exits(), 1 << KVM_HC_MAP_GPA_RANGE);
    }
}
