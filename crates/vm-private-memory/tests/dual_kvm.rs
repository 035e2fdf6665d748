// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The dual strategy against the real `KVM_SET_MEMORY_ATTRIBUTES`. It needs a VM type
//! with memory attributes (KVM_X86_SW_PROTECTED_VM, SEV-SNP, TDX); where the host has
//! none, each test prints a SKIPPED line naming the missing capability and returns.

mod common;

use std::sync::Arc;

use guest_memfd::{Capabilities, PageRange, PAGE_SIZE};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{MemoryBuilder, PageState, Strategy};

/// A VM of the first type whose VM fd offers KVM_MEMORY_ATTRIBUTE_PRIVATE, if any.
fn vm_with_memory_attributes(test: &str) -> Option<Arc<VmFd>> {
    let kvm = Kvm::new().unwrap();
    let system = Capabilities::of_system(&kvm);
    for vm_type in 0..64 {
        if !system.supports_vm_type(vm_type) {
            continue;
        }
        if let Ok(vm) = kvm.create_vm_with_type(vm_type.into()) {
            if Capabilities::of_vm(&vm).dual_capable() {
                return Some(Arc::new(vm));
            }
        }
    }
    println!(
        "SKIPPED {test}: no VM type on this host has KVM_MEMORY_ATTRIBUTE_PRIVATE \
         (KVM_CAP_MEMORY_ATTRIBUTES); this test runs in the nested lab"
    );
    None
}

/// Memory of `size` bytes at 0 on `vm`, every page in `initial`.
fn memory_on(
    vm: Arc<VmFd>,
    size: u64,
    initial: PageState,
) -> vm_private_memory::PrivateMemoryManager {
    MemoryBuilder::new(vm)
        .region_at(0, size)
        .initial_state(initial)
        .build()
        .unwrap()
}

#[test]
fn dual_strategy_converts_with_real_memory_attributes() {
    let Some(vm) = vm_with_memory_attributes("dual_strategy_converts_with_real_memory_attributes")
    else {
        return;
    };
    let memory = memory_on(vm, 2 << 20, PageState::Private);
    assert_eq!(memory.strategy(), Strategy::Dual);
    let range = PageRange::new(0, 16 * PAGE_SIZE).unwrap();
    let report = memory.convert(range, PageState::Shared).unwrap();
    assert_eq!(report.pages_changed, 16);
    let view = memory.guest_memory();
    view.memory().write_obj(5u64, GuestAddress(0)).unwrap();
    memory.convert(range, PageState::Private).unwrap();
    assert!(view.memory().read_obj::<u64>(GuestAddress(0)).is_err());
    // Back to shared: the shared side was freed when the page went private.
    memory.convert(range, PageState::Shared).unwrap();
    assert_eq!(view.memory().read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
}

/// Memory is never held twice: pages written through the shared side are freed from the
/// sealed memfd when they go private, with the real KVM attributes flipped.
#[test]
fn dual_strategy_frees_the_shared_side_with_real_memory_attributes() {
    let Some(vm) = vm_with_memory_attributes(
        "dual_strategy_frees_the_shared_side_with_real_memory_attributes",
    ) else {
        return;
    };
    let size = 2u64 << 20;
    let memory = memory_on(vm, size, PageState::Shared);
    let view = memory.guest_memory();
    view.memory()
        .write_slice(&vec![0x5a; size as usize], GuestAddress(0))
        .unwrap();
    assert_eq!(common::shared_side_bytes(&memory), size);
    let half = PageRange::new(0, size / 2).unwrap();
    let report = memory.convert(half, PageState::Private).unwrap();
    assert_eq!(report.bytes_discarded, size / 2);
    assert_eq!(
        common::shared_side_bytes(&memory),
        size / 2,
        "the private half left the shared file"
    );
    memory.convert(half, PageState::Shared).unwrap();
    assert_eq!(view.memory().read_obj::<u64>(GuestAddress(0)).unwrap(), 0);
}

#[test]
fn memory_fault_requests_convert_with_real_memory_attributes() {
    let Some(vm) =
        vm_with_memory_attributes("memory_fault_requests_convert_with_real_memory_attributes")
    else {
        return;
    };
    let memory = memory_on(vm, 2 << 20, PageState::Shared);
    let private = u64::from(kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE);
    memory
        .serve_memory_fault(private, 0x3000, PAGE_SIZE)
        .unwrap();
    assert_eq!(memory.state_of(0x3000), Some(PageState::Private));
    assert_eq!(memory.handle_map_gpa_range(0x3000, 1, 0), 0);
    assert_eq!(memory.state_of(0x3000), Some(PageState::Shared));
}

/// Bytes that reached the shared side of a private page (through the VMM's shared file,
/// which other processes may map) are gone once the page turns shared.
#[test]
fn dual_strategy_a_page_turned_shared_arrives_empty_with_real_memory_attributes() {
    use std::os::unix::fs::FileExt;

    let Some(vm) = vm_with_memory_attributes(
        "dual_strategy_a_page_turned_shared_arrives_empty_with_real_memory_attributes",
    ) else {
        return;
    };
    // The shared side in the VMM's own file, where something else may write.
    let zone = guest_memfd::SealedMemfd::create("vmm-zone", 2 << 20).unwrap();
    let file = zone.file().try_clone().unwrap();
    let memory = MemoryBuilder::new(vm)
        .region_at_with_shared(0, 2 << 20, guest_memfd::SharedBacking::from(zone), 0)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    let view = memory.guest_memory();
    let page = 3 * PAGE_SIZE;
    file.write_all_at(&[0xee; 64], page).unwrap();
    memory
        .convert(PageRange::new(page, PAGE_SIZE).unwrap(), PageState::Shared)
        .unwrap();
    assert_eq!(
        view.memory().read_obj::<u64>(GuestAddress(page)).unwrap(),
        0
    );
}

/// A conversion to shared that one listener refuses and another cannot take back: real
/// KVM takes the partial undo (everything but the held pages goes back to private), and
/// the held pages stay shared and usable.
#[test]
fn a_range_a_listener_cannot_let_go_of_stays_shared_with_real_memory_attributes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_private_memory::{Error, MemoryListener};
    let Some(vm) = vm_with_memory_attributes(
        "a_range_a_listener_cannot_let_go_of_stays_shared_with_real_memory_attributes",
    ) else {
        return;
    };
    struct Holder(AtomicBool);
    impl MemoryListener for Holder {
        fn discard(&self, range: PageRange) {
            if self.0.load(Ordering::SeqCst) {
                std::panic::resume_unwind(Box::new(format!("cannot let go of {range}")));
            }
        }
        fn populate(&self, _: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
            Ok(())
        }
    }
    let memory = memory_on(vm, 2 << 20, PageState::Private);
    let holder = Arc::new(Holder(AtomicBool::new(true)));
    let refuser = Arc::new(common::Recorder::default());
    *refuser.refuse.lock().unwrap() = true;
    let held = PageRange::new(4 * PAGE_SIZE, 4 * PAGE_SIZE).unwrap();
    let _a = memory.subscribe(held, holder.clone());
    let _b = memory.subscribe(PageRange::new(0, 2 << 20).unwrap(), refuser.clone());
    match memory.convert(
        PageRange::new(0, 16 * PAGE_SIZE).unwrap(),
        PageState::Shared,
    ) {
        Err(Error::RollbackFailed {
            unknown,
            kept_shared,
            ..
        }) => {
            assert!(
                unknown.is_empty(),
                "KVM refused the partial undo: {unknown:?}"
            );
            assert_eq!(kept_shared.len(), 1);
            assert_eq!(
                (kept_shared[0].start, kept_shared[0].len),
                (held.start(), held.len())
            );
        }
        other => panic!("{other:?}"),
    }
    let view = memory.guest_memory();
    view.memory()
        .write_obj(3u64, GuestAddress(held.start()))
        .unwrap();
    assert!(view.memory().read_obj::<u64>(GuestAddress(0)).is_err());
    assert_eq!(memory.state_of(8 * PAGE_SIZE), Some(PageState::Private));
    holder.0.store(false, Ordering::SeqCst);
    *refuser.refuse.lock().unwrap() = false;
    memory.convert(held, PageState::Private).unwrap();
}
