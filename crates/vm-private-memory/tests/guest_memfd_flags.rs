// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Extra guest_memfd creation flags a VMM asks for (`MemoryBuilder::guest_memfd_flags`):
//! every guest_memfd the memory creates carries them, and flags the host does not offer
//! are refused before any file is created. Real `/dev/kvm`; KVM's attribute call stood
//! in for the dual strategy.

mod common;

use common::{gpa_is_free, pr, vm, RecordingVm};
use guest_memfd::GuestMemfdFlags;
use vm_private_memory::{Error, MemoryBuilder, PageState, Strategy};

const MIB2: u64 = 2 << 20;

#[test]
fn extra_flags_reach_every_guest_memfd_the_memory_creates() {
    let recording = RecordingVm::new(vm());
    let memory = MemoryBuilder::new(recording.clone())
        .region_at(0, MIB2)
        .region_at(4 * MIB2, MIB2)
        .strategy(Strategy::Dual)
        .guest_memfd_flags(GuestMemfdFlags::MMAP)
        .build()
        .unwrap();
    memory
        .add_region(pr(8 * MIB2, MIB2), None, PageState::Private)
        .unwrap();
    let mmap = GuestMemfdFlags::MMAP.bits();
    assert_eq!(recording.guest_memfd_flags.lock().unwrap()[..], [mmap; 3]);

    // Without extra flags, the dual strategy asks for none.
    let recording = RecordingVm::new(vm());
    let _memory = MemoryBuilder::new(recording.clone())
        .region_at(0, MIB2)
        .strategy(Strategy::Dual)
        .build()
        .unwrap();
    assert_eq!(recording.guest_memfd_flags.lock().unwrap()[..], [0]);
}

#[test]
fn flags_the_host_does_not_offer_are_refused_before_any_file() {
    let vm = vm();
    let unknown = GuestMemfdFlags::from_bits_retain(1 << 40);
    let err = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .guest_memfd_flags(unknown)
        .build()
        .unwrap_err();
    match &err {
        Error::File(guest_memfd::Error::UnsupportedFlags { unsupported, .. }) => {
            assert_eq!(*unsupported, unknown)
        }
        other => panic!("{other}"),
    }
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
}
