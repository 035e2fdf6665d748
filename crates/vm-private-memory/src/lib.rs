//! A vm-memory backend for KVM guest private memory.
//!
//! (Crate documentation is completed below.)

#![deny(missing_docs)]

mod attributes;
mod builder;
mod convert;
mod error;
mod kvm_view;
mod listener;
mod memory;
mod region;
mod strategy;

pub use attributes::{PageAttributes, PageState, Run};
pub use builder::{MemoryBuilder, GUEST_PHYS_LIMIT, REGION_ALIGNMENT, X86_MMIO_HOLE};
pub use convert::{ContentMode, ConversionReport, Step};
pub use error::{Error, GpaRange, Result};
pub use kvm_view::{KvmView, VmAttributes};
pub use listener::{MemoryListener, Subscription};
pub use memory::{GuestMemoryPrivate, PrivateMemory};
pub use region::{private_page_refusal, PrivateRegion};
pub use strategy::Strategy;
