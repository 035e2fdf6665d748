// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the tests that run on the real `/dev/kvm`.

#![allow(dead_code)]

use guest_memfd::{supported_flags, GuestMemfdFlags};
use kvm_ioctls::{Kvm, VmFd};

/// A fresh default-type VM on the real `/dev/kvm`.
pub fn vm() -> VmFd {
    let kvm = Kvm::new().expect("these tests need /dev/kvm");
    kvm.create_vm().expect("KVM_CREATE_VM")
}

/// A fresh default-type VM whose KVM has guest_memfd; `None`, after a `SKIPPED` line
/// naming the missing capability as `privmem probe` names it, where it has not. These
/// tests check the kernel's guest_memfd: where the host lacks it, the nested lab runs
/// them (`fixtures/lab/run.sh`, its in-place pass).
pub fn vm_with_guest_memfd_or_skip(test: &str) -> Option<VmFd> {
    let vm = vm();
    if guest_memfd::Capabilities::of_vm(&vm).guest_memfd {
        return Some(vm);
    }
    println!("SKIPPED {test}: needs guest_memfd (KVM_CAP_GUEST_MEMFD (234) is 0)");
    None
}

/// Every combination of flags this VM accepts, as the kernel selftest iterates them.
pub fn flag_sets(vm: &VmFd) -> Vec<GuestMemfdFlags> {
    let supported = supported_flags(vm);
    let mut sets = vec![GuestMemfdFlags::empty()];
    if supported.contains(GuestMemfdFlags::MMAP) {
        sets.push(GuestMemfdFlags::MMAP);
    }
    if supported.contains(GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED) {
        sets.push(GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED);
    }
    sets
}

/// Whether this host offers mappable, shared guest_memfd; prints a visible skip line if not.
pub fn require_mmap(vm: &VmFd, test: &str) -> bool {
    let ok = supported_flags(vm).contains(GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED);
    if !ok {
        println!("SKIPPED {test}: this host lacks GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
    }
    ok
}

/// The errno of the last failed libc call.
pub fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Calls `fallocate` directly, bypassing this crate's checks, and returns the errno (0 on
/// success): used to show that what the crate refuses, the kernel refuses too.
pub fn raw_fallocate(fd: i32, mode: i32, offset: u64, len: u64) -> i32 {
    // SAFETY: fallocate takes only integers; a stale fd at worst gives EBADF.
    let ret = unsafe { libc::fallocate64(fd, mode, offset as i64, len as i64) };
    if ret == 0 {
        0
    } else {
        last_errno()
    }
}

/// Calls `mmap` directly and returns the errno (0 on success, the mapping undone).
pub fn raw_mmap(fd: i32, len: usize, flags: i32) -> i32 {
    // SAFETY: a fresh mapping at a kernel-chosen address touches no existing memory; it
    // is unmapped right away.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        );
        if p == libc::MAP_FAILED {
            return last_errno();
        }
        libc::munmap(p, len);
    }
    0
}
