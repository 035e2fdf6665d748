// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The test's two sides: a vhost-user backend device that runs in another process (this
//! test binary, started again with [`BACKEND_ENV`] set), and a frontend that drives its
//! one virtio queue as a guest driver would, on dual-strategy guest memory of a real VM
//! whose memory attributes a stand-in records (so it runs on hosts without them).

#![allow(dead_code)]

mod backend;
mod harness;
mod memory;
mod relay;

pub use backend::*;
pub use harness::*;
pub use memory::*;
pub use relay::{Removals, CONTROL_OFFSET};

use guest_memfd::PageRange;

pub fn pr(start: u64, len: u64) -> PageRange {
    PageRange::new(start, len).unwrap()
}
