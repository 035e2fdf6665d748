// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! KVM's own view of which pages are private: `KVM_SET_MEMORY_ATTRIBUTES` (dual strategy).

use guest_memfd::{PageRange, VmMemoryOps};
use kvm_bindings::{kvm_memory_attributes, KVM_MEMORY_ATTRIBUTE_PRIVATE};

use crate::attributes::PageState;
use crate::error::{ByteRange, Error, Result};

/// Marks guest-physical `range` `state` in KVM, through the VM's [`VmMemoryOps`].
pub(crate) fn set_kvm_view(vm: &dyn VmMemoryOps, range: PageRange, state: PageState) -> Result<()> {
    let attributes = match state {
        PageState::Private => u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
        PageState::Shared => 0,
    };
    vm.set_memory_attributes(kvm_memory_attributes {
        address: range.start(),
        size: range.len(),
        attributes,
        flags: 0,
    })
    .map_err(|source| Error::SetAttributes {
        range: ByteRange {
            start: range.start(),
            len: range.len(),
        },
        state,
        source,
    })
}
