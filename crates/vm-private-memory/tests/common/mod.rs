//! Helpers for the tests that run on the real `/dev/kvm`.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use guest_memfd::PageRange;
use kvm_ioctls::{Kvm, VmFd};
use vm_private_memory::{KvmView, MemoryBuilder, MemoryListener, PageState, Strategy};

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

/// A stand-in for KVM_SET_MEMORY_ATTRIBUTES that records calls and can be told to fail,
/// so the dual strategy's other steps run on hosts without memory attributes.
#[derive(Default)]
pub struct RecordingView {
    pub calls: Mutex<Vec<(PageRange, PageState)>>,
    pub fail: Mutex<bool>,
}

impl KvmView for RecordingView {
    fn set(&self, range: PageRange, state: PageState) -> vm_private_memory::Result<()> {
        if *self.fail.lock().unwrap() {
            return Err(vm_private_memory::Error::SetAttributes {
                range: vm_private_memory::GpaRange {
                    start: range.start(),
                    len: range.len(),
                },
                state,
                source: vmm_sys_util::errno::Error::new(libc::EIO),
            });
        }
        self.calls.lock().unwrap().push((range, state));
        Ok(())
    }
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

/// Dual memory of `size` bytes at 0, with a recording stand-in for KVM's attributes.
pub fn dual(
    size: u64,
    initial: PageState,
) -> (vm_private_memory::PrivateMemory, Arc<RecordingView>) {
    let view = Arc::new(RecordingView::default());
    let memory = MemoryBuilder::new(vm())
        .region_at(0, size)
        .strategy(Strategy::Dual)
        .kvm_view(view.clone())
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
