// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Conversions requested by real `KVM_EXIT_HYPERCALL` exits (the guest's `vmmcall` with
//! KVM_HC_MAP_GPA_RANGE), served by `vm-private-memory`, the answer reaching the guest.
//! Runs where the VM has memory attributes and hypercall exits (the nested lab); on our
//! hosts it prints SKIPPED: their hypercalls never reach userspace (HOST.md), and their
//! emulated CPL0 would spin in `vmmcall`.

use guest_memfd::Capabilities;
use integration::{
    programs, GuestConfig, NoDevice, PrivateGuest, Privilege, StopReason, DATA_ADDR,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{PageState, KVM_EINVAL};

#[test]
fn real_hypercall_exits_convert_memory_and_answer_the_guest() {
    let test = "real_hypercall_exits_convert_memory_and_answer_the_guest";
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = integration::private_memory_vm(&kvm).expect("a VM for private memory");
    let caps = Capabilities::of_vm(&vm);
    if !caps.dual_capable() {
        println!(
            "SKIPPED {test}: needs a VM type with KVM_MEMORY_ATTRIBUTE_PRIVATE and \
             KVM_HC_MAP_GPA_RANGE exits that reach userspace (the nested lab)"
        );
        return;
    }
    drop(vm);
    let mut guest = PrivateGuest::new(
        programs::HYPERCALL,
        GuestConfig {
            data_size: 2 << 20,
            vcpus: 1,
            all_private: true,
            data_policy: None,
        },
    )
    .unwrap();
    assert!(
        guest.enable_map_gpa_range_exits().unwrap(),
        "KVM_CAP_EXIT_HYPERCALL lacks MAP_GPA_RANGE"
    );
    let memory = guest.memory().clone();
    let buffer = DATA_ADDR + (1 << 20);
    guest.start_at(0, Privilege::Kernel, &[buffer, 16]).unwrap();
    assert_eq!(memory.state_of(buffer), Some(PageState::Private));

    let vcpu = guest.vcpu(0);
    let stop = vcpu.run(&mut NoDevice).unwrap();
    assert_eq!(stop.reason, StopReason::Pause);
    assert_eq!(memory.state_of(buffer), Some(PageState::Shared));
    let ram = memory.guest_memory();
    assert_eq!(
        ram.memory().read_obj::<u64>(GuestAddress(buffer)).unwrap(),
        0x5a5a_5a5a_5a5a_5a5a,
        "the guest wrote the shared page, the host reads it"
    );
    let done = vcpu.run_to_done(&mut NoDevice).unwrap();
    assert_eq!(
        done.rax,
        KVM_EINVAL.wrapping_neg(),
        "the malformed request's answer reached the guest"
    );
    assert_eq!(memory.state_of(buffer), Some(PageState::Private));
    assert!(ram.memory().read_obj::<u64>(GuestAddress(buffer)).is_err());
    let served = vcpu.served();
    assert_eq!(served.len(), 3, "{served:?}");
    assert!(served.iter().all(|s| s.exit && s.nr == 12), "{served:?}");
    assert_eq!(served[2].args[2], 0x20);
    assert_eq!(
        served[2].answer,
        KVM_EINVAL.wrapping_neg(),
        "our refusal, not KVM's"
    );
}

/// A real KVM_EXIT_MEMORY_FAULT: the guest touches a private page whose region the host
/// has removed. KVM cannot serve a private access without a guest_memfd slot and exits;
/// the run loop hands the exit to `PrivateMemoryManager::serve_memory_fault`, which refuses it
/// (the range is no longer guest memory). Once the host re-adds the region, backed by
/// the same file, the guest's access completes and reads what it had written.
///
/// (On KVM_X86_SW_PROTECTED_VM the private bit of a fault comes from the attributes
/// themselves, so the implicit conversions of TDX and SNP guests do not occur; this
/// error path is how such exits show up here.)
#[test]
fn a_real_memory_fault_exit_reaches_the_handler() {
    let test = "a_real_memory_fault_exit_reaches_the_handler";
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let dual = integration::private_memory_vm(&kvm)
        .map(|vm| Capabilities::of_vm(&vm).dual_capable())
        .expect("a VM for private memory");
    if !dual {
        println!(
            "SKIPPED {test}: needs a VM type with KVM_MEMORY_ATTRIBUTE_PRIVATE (the nested lab)"
        );
        return;
    }
    let size = 2u64 << 20;
    let mut guest = PrivateGuest::new(
        programs::DRIVER,
        GuestConfig {
            data_size: size,
            vcpus: 1,
            all_private: true,
            data_policy: None,
        },
    )
    .unwrap();
    guest.start(0, &[]).unwrap();
    let memory = guest.memory().clone();
    let dev = &mut NoDevice;
    let mut d = integration::Driver::new(guest.vcpu(0), dev).unwrap();
    d.fill(DATA_ADDR, size, 0x3c, dev).unwrap();

    let (range, gmem, offset) = memory.remove_region(DATA_ADDR).unwrap();
    match d.check(DATA_ADDR, size, 0x3c, dev) {
        Err(integration::Error::Backend(vm_private_memory::Error::OutsideGuestMemory {
            first_outside,
            ..
        })) => assert!(range.contains_addr(first_outside), "{first_outside:#x}"),
        other => panic!("expected the memory fault to reach the handler: {other:?}"),
    }
    memory
        .add_region(range, Some((gmem, offset)), PageState::Private)
        .unwrap();
    d.resume(dev).unwrap();
    d.check(DATA_ADDR, size, 0x3c, dev).unwrap();
}
