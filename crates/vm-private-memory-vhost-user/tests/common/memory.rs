// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory: dual strategy on a real VM, with a stand-in for memory attributes; on a
//! host whose KVM has no in-place guest_memfd, on the stand-in for KVM
//! (`guest_memfd::stand_in`), which prints a `STAND-IN` line.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

use guest_memfd::{Capabilities, PageRange, VmMemoryOps, PAGE_SIZE};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_private_memory::{MemoryBuilder, PageState, PrivateMemoryManager, Strategy};
use vmm_sys_util::errno;

use super::pr;

/// A VM that stands in for KVM's memory attributes where the host has none, so the dual
/// strategy runs there too: it forwards every call to a real VM, except that (unless the
/// VM has real attributes) it reports `KVM_CAP_MEMORY_ATTRIBUTES` = PRIVATE and accepts
/// `KVM_SET_MEMORY_ATTRIBUTES` without making it.
pub struct AttributesStandIn {
    inner: Arc<dyn VmMemoryOps>,
    /// The VM has memory attributes of its own (a `KVM_X86_SW_PROTECTED_VM` in the lab):
    /// forward those calls too.
    real: bool,
    /// (device, inode) of every guest_memfd created through it.
    guest_memfds: Mutex<Vec<(u64, u64)>>,
}

impl VmMemoryOps for AttributesStandIn {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        if cap == KVM_CAP_MEMORY_ATTRIBUTES && !self.real {
            return KVM_MEMORY_ATTRIBUTE_PRIVATE as i32;
        }
        self.inner.check_extension_raw(cap)
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        let fd = self.inner.create_guest_memfd(request)?;
        let meta = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        self.guest_memfds
            .lock()
            .unwrap()
            .push((meta.dev(), meta.ino()));
        Ok(fd)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        // SAFETY: the caller upholds the trait's contract, which is the same for the VM
        // this forwards to.
        unsafe { self.inner.set_user_memory_region2(region) }
    }

    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<(), errno::Error> {
        if self.real {
            return self.inner.set_memory_attributes(attributes);
        }
        Ok(())
    }
}

/// Guest memory size: one region at 0.
pub const MEMORY: u64 = 4 << 20;
/// Where the second region starts, when there is one ([`dual_memory_with`]): its
/// guest addresses are not its offsets in its files.
pub const HIGH: u64 = 1 << 32;
pub const HIGH_SIZE: u64 = 2 << 20;
/// The split virtqueue: descriptor table, available ring, used ring (one page each).
pub const DESC: u64 = 0x1000;
pub const AVAIL: u64 = 0x2000;
pub const USED: u64 = 0x3000;
/// The request's buffers: what the device reads, what it writes, its status byte.
pub const INPUT: u64 = 0x10000;
pub const OUTPUT: u64 = 0x11000;
pub const STATUS: u64 = 0x12000;
pub const QUEUE_SIZE: u16 = 16;

/// A VM of the first type with memory attributes of its own, if the host has one.
fn vm_with_memory_attributes(kvm: &Kvm) -> Option<VmFd> {
    let system = Capabilities::of_system(kvm);
    (0..64)
        .filter(|t| system.supports_vm_type(*t))
        .filter_map(|t| kvm.create_vm_with_type(t.into()).ok())
        .find(|vm| Capabilities::of_vm(vm).dual_capable())
}

/// Dual-strategy memory, all private but for the ring pages and the three buffer pages,
/// and the (device, inode) of its guest_memfd. On a VM type with memory attributes where
/// the host has one (the lab), else on a default VM with the stand-in.
pub fn dual_memory() -> (PrivateMemoryManager, (u64, u64)) {
    dual_memory_with(false)
}

/// As [`dual_memory`]; with `high`, a second region at [`HIGH`] whose first page is
/// shared too.
pub fn dual_memory_with(high: bool) -> (PrivateMemoryManager, (u64, u64)) {
    let kvm = Kvm::new().unwrap();
    let (inner, real): (Arc<dyn VmMemoryOps>, bool) = match vm_with_memory_attributes(&kvm) {
        Some(vm) => (Arc::new(vm), true),
        None => (guest_memfd::stand_in::vm_for_logic_tests(), false),
    };
    println!(
        "dual memory with {} memory attributes",
        if real { "real" } else { "stand-in" }
    );
    let vm = Arc::new(AttributesStandIn {
        inner,
        real,
        guest_memfds: Mutex::default(),
    });
    let mut builder = MemoryBuilder::new(vm.clone()).region_at(0, MEMORY);
    if high {
        builder = builder.region_at(HIGH, HIGH_SIZE);
    }
    let memory = builder
        .strategy(Strategy::Dual)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    if high {
        memory
            .convert(pr(HIGH, PAGE_SIZE), PageState::Shared)
            .unwrap();
    }
    memory
        .convert(pr(DESC, 3 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    memory
        .convert(pr(INPUT, 3 * PAGE_SIZE), PageState::Shared)
        .unwrap();
    let guest_memfd = vm.guest_memfds.lock().unwrap()[0];
    (memory, guest_memfd)
}

/// The pages of `range` that are shared now.
pub fn shared_pages(memory: &PrivateMemoryManager, range: PageRange) -> BTreeSet<u64> {
    let snapshot = memory.shared_pages().snapshot();
    snapshot
        .runs(range)
        .flat_map(|run| pages(run.guest_range()))
        .collect()
}

pub fn pages(range: PageRange) -> impl Iterator<Item = u64> {
    (0..range.page_count()).map(move |p| range.start() + p * PAGE_SIZE)
}

/// The frontend's host address of shared guest page `gpa`.
pub fn host_address(memory: &PrivateMemoryManager, gpa: u64) -> u64 {
    let snapshot = memory.shared_pages().snapshot();
    let run = snapshot.runs(pr(gpa, PAGE_SIZE)).next().unwrap();
    run.host_address() as u64
}

/// Bytes the sealed memfd of shared pages holds.
pub fn shared_bytes_held(memory: &PrivateMemoryManager) -> u64 {
    memory.backing(0).unwrap().shared_bytes_held.unwrap()
}

/// (device, inode) of the sealed memfd of shared pages of the region at 0.
pub fn memfd_id(memory: &PrivateMemoryManager) -> (u64, u64) {
    memfd_of(memory, DESC)
}

/// (device, inode) of the sealed memfd that holds shared page `gpa`.
pub fn memfd_of(memory: &PrivateMemoryManager, gpa: u64) -> (u64, u64) {
    let snapshot = memory.shared_pages().snapshot();
    let run = snapshot.runs(pr(gpa, PAGE_SIZE)).next().unwrap();
    let fd = run.file().unwrap().fd.try_clone_to_owned().unwrap();
    let memfd = std::fs::File::from(fd).metadata().unwrap();
    (memfd.dev(), memfd.ino())
}
