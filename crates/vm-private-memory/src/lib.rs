//! A vm-memory backend for KVM guest private memory.
//!
//! (Crate documentation is completed below.)

#![deny(missing_docs)]

mod attributes;
mod builder;
mod convert;
mod error;
mod exits;
mod kvm_view;
mod listener;
mod memory;
mod region;
mod state;
mod strategy;

pub use attributes::{PageAttributes, PageState, Run, Runs};
pub use builder::{MemoryBuilder, GUEST_PHYS_LIMIT, REGION_ALIGNMENT, X86_MMIO_HOLE};
pub use convert::{ContentMode, ConversionReport, Step};
pub use error::{Error, GpaRange, Result};
pub use exits::{
    ConversionRequest, RequestError, KVM_EFAULT, KVM_EINVAL, MAP_GPA_RANGE_ENCRYPTED,
    MAP_GPA_RANGE_KNOWN, MAP_GPA_RANGE_PAGE_SZ_1G, MAP_GPA_RANGE_PAGE_SZ_2M,
};
pub use kvm_view::{KvmView, VmAttributes};
pub use listener::{MemoryListener, Subscription};
pub use memory::{GuestMemoryPrivate, PrivateMemory};
pub use region::{private_page_refusal, PrivateRegion};
pub use state::{MemoryState, PageRun, RegionState, STATE_VERSION};
pub use strategy::Strategy;
