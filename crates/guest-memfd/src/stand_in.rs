// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A stand-in for KVM, for tests of code built on this crate: [`StandInVm`].
//!
//! Behind the `test-utils` cargo feature. It implements [`VmOps`] in userspace, without
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
//! what the kernel's guest_memfd refuses beyond the checks above (an `mmap` of a file
//! created without `MMAP` succeeds here). Tests of those run on real KVM.
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
use crate::vm_ops::VmOps;

/// Memslots per address space, as our hosts' KVM answers `KVM_CAP_NR_MEMSLOTS`.
pub const STAND_IN_MEMSLOTS: u32 = 32764;

/// A userspace stand-in for a KVM VM: see the [module docs](self).
#[derive(Debug)]
pub struct StandInVm {
    memory_attributes: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The files created, by (device, inode): their size.
    files: BTreeMap<(u64, u64), u64>,
    slots: BTreeMap<u32, kvm_userspace_memory_region2>,
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
            state: Mutex::default(),
        }
    }

    /// A stand-in for a VM with memory attributes (`KVM_MEMORY_ATTRIBUTE_PRIVATE`), as
    /// `KVM_X86_SW_PROTECTED_VM` has: both strategies can run on it.
    pub fn with_memory_attributes() -> Self {
        StandInVm {
            memory_attributes: true,
            state: Mutex::default(),
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
        self.state().slots.values().copied().collect()
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
        // large; an fd that is not open makes it fail with EBADF and write nothing.
        if unsafe { libc::fstat(fd, stat.as_mut_ptr()) } != 0 {
            return Err(errno::Error::last());
        }
        // SAFETY: fstat succeeded, so it filled the struct (and it was zeroed before).
        let stat = unsafe { stat.assume_init() };
        Ok((stat.st_dev, stat.st_ino))
    }
}

impl VmOps for StandInVm {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        match cap {
            KVM_CAP_USER_MEMORY2 | KVM_CAP_MEMORY_FAULT_INFO | KVM_CAP_GUEST_MEMFD => 1,
            KVM_CAP_GUEST_MEMFD_FLAGS => {
                (GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED) as i32
            }
            KVM_CAP_MEMORY_ATTRIBUTES if self.memory_attributes => {
                KVM_MEMORY_ATTRIBUTE_PRIVATE as i32
            }
            KVM_CAP_VM_TYPES => 1,
            KVM_CAP_EXIT_HYPERCALL => 1 << KVM_HC_MAP_GPA_RANGE,
            KVM_CAP_NR_MEMSLOTS => STAND_IN_MEMSLOTS as i32,
            _ => 0,
        }
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        let known = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED;
        if request.flags & !known != 0
            || request.size == 0
            || !is_page_aligned(request.size)
            || request.reserved.iter().any(|&r| r != 0)
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
        let known = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD;
        let gmem = region.flags & KVM_MEM_GUEST_MEMFD != 0;
        if region.slot >= STAND_IN_MEMSLOTS
            || region.flags & !known != 0
            || (gmem && region.flags & (KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY) != 0)
            || !is_page_aligned(region.memory_size)
            || !is_page_aligned(region.guest_phys_addr)
            || !is_page_aligned(region.userspace_addr)
            || (gmem && !is_page_aligned(region.guest_memfd_offset))
            || region
                .guest_phys_addr
                .checked_add(region.memory_size)
                .is_none()
        {
            return Err(einval());
        }
        let mut state = self.state();
        if region.memory_size == 0 {
            return match state.slots.remove(&region.slot) {
                Some(_) => Ok(()),
                None => Err(einval()),
            };
        }
        if let Some(old) = state.slots.get(&region.slot) {
            // KVM takes the same slot again as a no-op, and refuses any change to a
            // guest_memfd slot (a move, a resize, new flags or a new address).
            let same = old.flags == region.flags
                && old.guest_phys_addr == region.guest_phys_addr
                && old.memory_size == region.memory_size
                && old.userspace_addr == region.userspace_addr
                && (!gmem
                    || (old.guest_memfd == region.guest_memfd
                        && old.guest_memfd_offset == region.guest_memfd_offset));
            return if same { Ok(()) } else { Err(einval()) };
        }
        let end = region.guest_phys_addr + region.memory_size;
        if state.slots.values().any(|other| {
            region.guest_phys_addr < other.guest_phys_addr + other.memory_size
                && other.guest_phys_addr < end
        }) {
            return Err(errno::Error::new(libc::EEXIST));
        }
        if gmem {
            let file = i32::try_from(region.guest_memfd).map_err(|_| einval())?;
            let id = Self::identity(file).map_err(|_| einval())?;
            let size = *state.files.get(&id).ok_or_else(einval)?;
            let file_end = region
                .guest_memfd_offset
                .checked_add(region.memory_size)
                .ok_or_else(einval)?;
            if file_end > size {
                return Err(einval());
            }
            // A file range another slot is bound to (EINVAL up to Linux 6.18).
            for other in state.slots.values() {
                if other.flags & KVM_MEM_GUEST_MEMFD == 0 {
                    continue;
                }
                let other_id = i32::try_from(other.guest_memfd)
                    .ok()
                    .and_then(|fd| Self::identity(fd).ok());
                if other_id == Some(id)
                    && region.guest_memfd_offset < other.guest_memfd_offset + other.memory_size
                    && other.guest_memfd_offset < file_end
                {
                    return Err(einval());
                }
            }
        }
        state.slots.insert(region.slot, region);
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
pub fn vm_for_logic_tests() -> Arc<dyn VmOps> {
    if let Ok(kvm) = kvm_ioctls::Kvm::new() {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM of a default-type VM");
        let caps = Capabilities::of_vm(&vm);
        if caps.in_place_capable() {
            return Arc::new(vm);
        }
        say_stand_in(if caps.guest_memfd {
            "a default-type VM here has guest_memfd without MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS)"
        } else {
            "a default-type VM here has no guest_memfd (KVM_CAP_GUEST_MEMFD 0)"
        });
    } else {
        say_stand_in("this host has no /dev/kvm");
    }
    Arc::new(StandInVm::new())
}

fn say_stand_in(why: &str) {
    if !SAID_STAND_IN.with(|said| said.replace(true)) {
        let thread = std::thread::current();
        let test = thread.name().unwrap_or("this test");
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
        // The same again is a no-op; a move of a guest_memfd slot is refused.
        assert_eq!(bind(slot(0, 0, 2 * PAGE_SIZE, &file, 0)), Ok(()));
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
        // A file this VM did not create, and one that is not open.
        let other = gmem(&StandInVm::new(), PAGE_SIZE);
        assert_eq!(
            bind(slot(2, 1 << 31, PAGE_SIZE, &other, 0)),
            Err(libc::EINVAL)
        );
        let mut closed = slot(2, 1 << 31, PAGE_SIZE, &other, 0);
        closed.guest_memfd = 100_000;
        assert_eq!(bind(closed), Err(libc::EINVAL));
        // Delete, and delete again.
        assert_eq!(bind(slot(0, 0, 0, &file, 0)), Ok(()));
        assert_eq!(bind(slot(0, 0, 0, &file, 0)), Err(libc::EINVAL));
        assert_eq!(vm.memslots().len(), 1);
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
        assert_eq!(
            vm.enable_hypercall_exits(1).unwrap_err().errno(),
            libc::EINVAL
        );
        vm.enable_hypercall_exits(1 << KVM_HC_MAP_GPA_RANGE)
            .unwrap();
        assert_eq!(vm.hypercall_exits(), 1 << KVM_HC_MAP_GPA_RANGE);
    }
}
