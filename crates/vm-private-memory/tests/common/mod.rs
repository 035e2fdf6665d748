// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers for the tests of this crate's logic. They run on the real `/dev/kvm` where
//! the host's KVM has in-place guest_memfd, and on `guest_memfd::stand_in::StandInVm`
//! where it has not (each such test prints a `STAND-IN` line); the nested lab runs them
//! on real KVM again (`fixtures/lab/run.sh`, its in-place pass).

#![allow(dead_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use guest_memfd::{PageRange, VmMemoryOps};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_private_memory::{MemoryBuilder, MemoryListener, PageState, Strategy};
use vmm_sys_util::errno;

/// A fresh default-type VM: real where the host's KVM has in-place guest_memfd, the
/// stand-in otherwise (`guest_memfd::stand_in::vm_for_logic_tests`).
pub fn vm() -> Arc<dyn VmMemoryOps> {
    guest_memfd::stand_in::vm_for_logic_tests()
}

/// A fresh default-type VM on the real `/dev/kvm`, for what only the kernel can answer.
pub fn kvm_vm() -> Arc<VmFd> {
    Arc::new(Kvm::new().unwrap().create_vm().unwrap())
}

/// Whether the host can run the in-place strategy; prints a visible skip line if not.
/// With the stand-in ([`vm`]) it always can.
pub fn in_place_or_skip(test: &str) -> bool {
    let caps = guest_memfd::Capabilities::of_vm(&*vm());
    let ok = caps.in_place_capable();
    if !ok {
        println!(
            "SKIPPED {test}: needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))"
        );
    }
    ok
}

/// A real VM with in-place guest_memfd, for what only the kernel can answer (a vCPU, the
/// kernel's own refusals); `None`, after a `SKIPPED` line naming the missing capability as
/// `privmem probe` names it, where the host's KVM lacks it.
pub fn kvm_in_place_or_skip(test: &str) -> Option<Arc<VmFd>> {
    let vm = kvm_vm();
    let caps = guest_memfd::Capabilities::of_vm(&*vm);
    if caps.in_place_capable() {
        return Some(vm);
    }
    if caps.guest_memfd {
        println!(
            "SKIPPED {test}: needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))"
        );
    } else {
        println!("SKIPPED {test}: needs guest_memfd (KVM_CAP_GUEST_MEMFD (234) is 0)");
    }
    None
}

/// A VM that stands in for KVM's memory attributes, so the dual strategy runs on hosts
/// without them: it wraps a real VM and forwards every call to it, except that it reports
/// `KVM_CAP_MEMORY_ATTRIBUTES` = PRIVATE and records `KVM_SET_MEMORY_ATTRIBUTES` calls
/// instead of making them. While `fail` is set, those calls fail with `EIO`; with
/// `fail_after` set to `Some(n)`, every call after the first `n` recorded ones fails.
pub struct RecordingVm {
    pub inner: Arc<dyn VmMemoryOps>,
    pub calls: Mutex<Vec<(PageRange, PageState)>>,
    pub fail: Mutex<bool>,
    pub fail_after: Mutex<Option<usize>>,
    /// The descriptor number of every guest_memfd created through it.
    pub guest_memfds: Mutex<Vec<i32>>,
    /// The flags of every guest_memfd created through it.
    pub guest_memfd_flags: Mutex<Vec<u64>>,
}

impl RecordingVm {
    pub fn new(inner: Arc<dyn VmMemoryOps>) -> Arc<Self> {
        Arc::new(RecordingVm {
            inner,
            calls: Mutex::default(),
            fail: Mutex::default(),
            fail_after: Mutex::default(),
            guest_memfds: Mutex::default(),
            guest_memfd_flags: Mutex::default(),
        })
    }
}

impl VmMemoryOps for RecordingVm {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        if cap == KVM_CAP_MEMORY_ATTRIBUTES {
            return KVM_MEMORY_ATTRIBUTE_PRIVATE as i32;
        }
        VmMemoryOps::check_extension_raw(&*self.inner, cap)
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        let fd = VmMemoryOps::create_guest_memfd(&*self.inner, request)?;
        self.guest_memfds.lock().unwrap().push(fd.as_raw_fd());
        self.guest_memfd_flags.lock().unwrap().push(request.flags);
        Ok(fd)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        // SAFETY: the caller upholds the trait's contract, which is the same for the VM
        // this forwards to.
        unsafe { VmMemoryOps::set_user_memory_region2(&*self.inner, region) }
    }

    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<(), errno::Error> {
        let range = PageRange::new(attributes.address, attributes.size)
            .map_err(|_| errno::Error::new(libc::EINVAL))?;
        let state = if attributes.attributes & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0 {
            PageState::Private
        } else {
            PageState::Shared
        };
        let mut calls = self.calls.lock().unwrap();
        if *self.fail.lock().unwrap()
            || self
                .fail_after
                .lock()
                .unwrap()
                .is_some_and(|n| calls.len() >= n)
        {
            return Err(errno::Error::new(libc::EIO));
        }
        calls.push((range, state));
        Ok(())
    }
}

/// Runs `f` on a thread of its own on which every punch hole
/// (`fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)`) fails with `EIO`, on any file
/// or only on descriptor `only_fd`: a seccomp filter, which only that thread carries,
/// makes the file refuse.
pub fn with_failing_punch<R: Send>(only_fd: Option<i32>, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                fail_punch_hole_on_this_thread(only_fd);
                f()
            })
            .join()
            .unwrap()
    })
}

fn fail_punch_hole_on_this_thread(only_fd: Option<i32>) {
    // Offsets into `struct seccomp_data`; arguments are 64-bit, low word first on x86_64.
    const NR: u32 = 0;
    const ARG0: u32 = 16;
    const ARG1: u32 = 24;
    let punch = (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) as u32;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let load = |offset| op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, offset);
    let mut checks = vec![(NR, libc::SYS_fallocate as u32), (ARG1, punch)];
    if let Some(fd) = only_fd {
        checks.push((ARG0, fd as u32));
    }
    // Each check: load the word, go on if it matches, else jump to the final ALLOW.
    let mut filter = Vec::new();
    let count = checks.len();
    for (i, (offset, value)) in checks.into_iter().enumerate() {
        let to_allow = (2 * (count - i - 1) + 1) as u8;
        filter.push(load(offset));
        filter.push(op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            to_allow,
            value,
        ));
    }
    filter.push(op(
        libc::BPF_RET | libc::BPF_K,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | libc::EIO as u32,
    ));
    filter.push(op(
        libc::BPF_RET | libc::BPF_K,
        0,
        0,
        libc::SECCOMP_RET_ALLOW,
    ));
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    assert_eq!(
        // SAFETY: prctl reads only its integer arguments here.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        0
    );
    // SAFETY: `program` points at a valid filter for the duration of the call; the kernel
    // copies it.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &program as *const libc::sock_fprog,
        )
    };
    assert_eq!(ret, 0, "seccomp: {}", std::io::Error::last_os_error());
}

/// In-place memory of `size` bytes at 0, all pages in `initial`.
pub fn in_place(size: u64, initial: PageState) -> vm_private_memory::PrivateMemoryManager {
    MemoryBuilder::new(vm())
        .region_at(0, size)
        .strategy(Strategy::InPlace)
        .initial_state(initial)
        .build()
        .unwrap()
}

/// Dual memory of `size` bytes at 0, on a VM that stands in for KVM's attributes.
pub fn dual(
    size: u64,
    initial: PageState,
) -> (vm_private_memory::PrivateMemoryManager, Arc<RecordingVm>) {
    let view = RecordingVm::new(vm());
    let memory = MemoryBuilder::new(view.clone())
        .region_at(0, size)
        .strategy(Strategy::Dual)
        .initial_state(initial)
        .build()
        .unwrap();
    (memory, view)
}

/// One event a listener heard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Heard {
    Discard(PageRange),
    Populate(PageRange),
}

/// A listener that records what it hears and refuses populate while `refuse` is set.
#[derive(Default)]
pub struct Recorder {
    pub heard: Mutex<Vec<Heard>>,
    pub refuse: Mutex<bool>,
}

impl MemoryListener for Recorder {
    fn discard(&self, range: PageRange) {
        self.heard.lock().unwrap().push(Heard::Discard(range));
    }

    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.heard.lock().unwrap().push(Heard::Populate(range));
        if *self.refuse.lock().unwrap() {
            return Err("test refuses".into());
        }
        Ok(())
    }
}

pub fn pr(start: u64, len: u64) -> PageRange {
    PageRange::new(start, len).unwrap()
}

/// Whether guest-physical `range` is free in `vm`: a probe slot binds there only then.
pub fn gpa_is_free(vm: &dyn VmMemoryOps, range: PageRange) -> bool {
    let probe =
        guest_memfd::GuestMemfd::create(vm, range.len(), guest_memfd::GuestMemfdFlags::empty())
            .unwrap();
    let slot = guest_memfd::Memslot::new(4000, range, &probe, 0).unwrap();
    // SAFETY: no userspace address is set.
    let free = unsafe { slot.bind(vm) }.is_ok();
    if free {
        slot.unbind(vm).unwrap();
    }
    free
}

/// Bytes the first region's sealed memfd (the dual strategy's shared side) holds.
pub fn shared_side_bytes(memory: &vm_private_memory::PrivateMemoryManager) -> u64 {
    let first = memory.regions()[0].start();
    memory
        .backing(first)
        .unwrap()
        .shared_bytes_held
        .expect("a dual-strategy region")
}
