//! KVM's own view of which pages are private: `KVM_SET_MEMORY_ATTRIBUTES` (dual strategy).

use std::sync::Arc;

use guest_memfd::PageRange;
use kvm_bindings::{kvm_memory_attributes, KVM_MEMORY_ATTRIBUTE_PRIVATE};
use kvm_ioctls::VmFd;

use crate::attributes::PageState;
use crate::error::{Error, GpaRange, Result};

/// Sets KVM's private/shared attribute of guest-physical ranges.
///
/// The real implementation is [`VmAttributes`]. With the `fault-injection` feature a test
/// may supply its own, to exercise the dual strategy on hosts without memory attributes.
pub trait KvmView: Send + Sync {
    /// Marks `range` `state` in KVM.
    fn set(&self, range: PageRange, state: PageState) -> Result<()>;
}

/// `KVM_SET_MEMORY_ATTRIBUTES` on a VM.
pub struct VmAttributes(pub Arc<VmFd>);

impl KvmView for VmAttributes {
    fn set(&self, range: PageRange, state: PageState) -> Result<()> {
        let attributes = match state {
            PageState::Private => u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE),
            PageState::Shared => 0,
        };
        self.0
            .set_memory_attributes(kvm_memory_attributes {
                address: range.start(),
                size: range.len(),
                attributes,
                flags: 0,
            })
            .map_err(|source| Error::SetAttributes {
                range: GpaRange {
                    start: range.start(),
                    len: range.len(),
                },
                state,
                source,
            })
    }
}
