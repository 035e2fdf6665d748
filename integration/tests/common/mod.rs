// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::sync::Mutex;

use guest_memfd::{Capabilities, PageRange};
use integration::{GuestConfig, PrivateGuest};
use vm_private_memory::MemoryListener;

/// Whether this host can give a guest private memory (mappable guest_memfd, or a VM type
/// with memory attributes); prints a visible SKIPPED line for `test` if not.
pub fn private_memory_or_skip(test: &str) -> bool {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    // An error here (PRIVMEM_STRATEGY misspelt, no VM at all) fails the test: it is
    // not a missing capability.
    let vm = integration::private_memory_vm(&kvm).expect("a VM for private memory");
    let caps = Capabilities::of_vm(&vm);
    let ok = caps.in_place_capable() || caps.dual_capable();
    if !ok {
        println!("SKIPPED {test}: needs guest_memfd with MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244)) or a VM type with memory attributes (KVM_CAP_MEMORY_ATTRIBUTES (233))");
    }
    ok
}

/// Whether this host's KVM has guest_memfd, which the test harness's own VM
/// (`integration::TestVm`) keeps its guest's code in; prints a visible SKIPPED line for
/// `test`, naming the capability as `privmem probe` does, if not.
pub fn guest_memfd_or_skip(test: &str) -> bool {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    let ok = Capabilities::of_vm(&vm).guest_memfd;
    if !ok {
        println!("SKIPPED {test}: needs guest_memfd (KVM_CAP_GUEST_MEMFD (234) is 0)");
    }
    ok
}

/// A guest running `program` with a data region of `data_size` bytes.
pub fn guest(program: &[u8], data_size: u64, vcpus: usize, all_private: bool) -> PrivateGuest {
    PrivateGuest::new(
        program,
        GuestConfig {
            data_size,
            vcpus,
            all_private,
            data_policy: None,
        },
    )
    .unwrap()
}

/// A listener that logs what it hears, in order ("discard [a, b)", "populate [a, b)").
#[derive(Default)]
pub struct Log(pub Mutex<Vec<String>>);

impl MemoryListener for Log {
    fn discard(&self, range: PageRange) {
        self.0.lock().unwrap().push(format!("discard {range}"));
    }
    fn populate(&self, range: PageRange) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.0.lock().unwrap().push(format!("populate {range}"));
        Ok(())
    }
}
