//! Helpers for the tests that run on the real `/dev/kvm`.

#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use guest_memfd::{PageRange, VmOps};
use kvm_bindings::{
    kvm_create_guest_memfd, kvm_memory_attributes, kvm_userspace_memory_region2,
    KVM_CAP_MEMORY_ATTRIBUTES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_private_memory::{MemoryBuilder, MemoryListener, PageState, Strategy};
use vmm_sys_util::errno;

/// A fresh default-type VM.
pub fn vm() -> Arc<VmFd> {
    Arc::new(Kvm::new().unwrap().create_vm().unwrap())
}

/// Whether the host can run the in-place strategy; prints a visible skip line if not.
pub fn in_place_or_skip(test: &str) -> bool {
    let caps = guest_memfd::Capabilities::of_vm(&vm());
    let ok = caps.in_place_capable();
    if !ok {
        println!(
            "SKIPPED {test}: needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS)"
        );
    }
    ok
}

/// A VM that stands in for KVM's memory attributes, so the dual strategy runs on hosts
/// without them: it wraps a real VM and forwards every call to it, except that it reports
/// `KVM_CAP_MEMORY_ATTRIBUTES` = PRIVATE and records `KVM_SET_MEMORY_ATTRIBUTES` calls
/// instead of making them. While `fail` is set, those calls fail with `EIO`.
pub struct RecordingVm {
    pub inner: Arc<VmFd>,
    pub calls: Mutex<Vec<(PageRange, PageState)>>,
    pub fail: Mutex<bool>,
}

impl RecordingVm {
    pub fn new(inner: Arc<VmFd>) -> Arc<Self> {
        Arc::new(RecordingVm {
            inner,
            calls: Mutex::default(),
            fail: Mutex::default(),
        })
    }
}

impl VmOps for RecordingVm {
    fn check_extension_raw(&self, cap: u32) -> i32 {
        if cap == KVM_CAP_MEMORY_ATTRIBUTES {
            return KVM_MEMORY_ATTRIBUTE_PRIVATE as i32;
        }
        VmOps::check_extension_raw(&*self.inner, cap)
    }

    fn create_guest_memfd(&self, request: kvm_create_guest_memfd) -> Result<OwnedFd, errno::Error> {
        VmOps::create_guest_memfd(&*self.inner, request)
    }

    unsafe fn set_user_memory_region2(
        &self,
        region: kvm_userspace_memory_region2,
    ) -> Result<(), errno::Error> {
        // SAFETY: the caller upholds the trait's contract, which is the same for the VM
        // this forwards to.
        unsafe { VmOps::set_user_memory_region2(&*self.inner, region) }
    }

    fn set_memory_attributes(&self, attributes: kvm_memory_attributes) -> Result<(), errno::Error> {
        let range = PageRange::new(attributes.address, attributes.size)
            .map_err(|_| errno::Error::new(libc::EINVAL))?;
        let state = if attributes.attributes & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0 {
            PageState::Private
        } else {
            PageState::Shared
        };
        if *self.fail.lock().unwrap() {
            return Err(errno::Error::new(libc::EIO));
        }
        self.calls.lock().unwrap().push((range, state));
        Ok(())
    }
}

/// Runs `f` on a thread of its own on which every punch hole
/// (`fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)`) fails with `EIO`: a seccomp
/// filter, which only that thread carries, makes the file refuse.
pub fn with_failing_punch<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                fail_punch_hole_on_this_thread();
                f()
            })
            .join()
            .unwrap()
    })
}

fn fail_punch_hole_on_this_thread() {
    const SECCOMP_DATA_NR: u32 = 0;
    const SECCOMP_DATA_ARG1: u32 = 24; // args[1] (the mode), low word on x86_64
    let punch = (libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE) as u32;
    let op = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let mut filter = [
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            0,
            0,
            SECCOMP_DATA_NR,
        ),
        op(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            3,
            libc::SYS_fallocate as u32,
        ),
        op(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            0,
            0,
            SECCOMP_DATA_ARG1,
        ),
        op(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K, 0, 1, punch),
        op(
            libc::BPF_RET | libc::BPF_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EIO as u32,
        ),
        op(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let program = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: prctl reads only its integer arguments here.
    assert_eq!(
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
pub fn in_place(size: u64, initial: PageState) -> vm_private_memory::PrivateMemory {
    MemoryBuilder::new(vm())
        .region_at(0, size)
        .strategy(Strategy::InPlace)
        .initial_state(initial)
        .build()
        .unwrap()
}

/// Dual memory of `size` bytes at 0, on a VM that stands in for KVM's attributes.
pub fn dual(size: u64, initial: PageState) -> (vm_private_memory::PrivateMemory, Arc<RecordingVm>) {
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

    fn populate(&self, range: PageRange) -> Result<(), String> {
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
pub fn gpa_is_free(vm: &kvm_ioctls::VmFd, range: PageRange) -> bool {
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
pub fn shared_side_bytes(memory: &vm_private_memory::PrivateMemory) -> u64 {
    let first = memory.regions()[0].start();
    memory
        .backing(first)
        .unwrap()
        .shared_bytes_held
        .expect("a dual-strategy region")
}
