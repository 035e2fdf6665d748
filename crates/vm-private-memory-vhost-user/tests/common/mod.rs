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
mod supervisor;

pub use backend::*;
pub use harness::*;
pub use memory::*;
pub use relay::{Answer, Of, CONTROL_OFFSET};
pub use supervisor::*;

use guest_memfd::PageRange;

pub fn pr(start: u64, len: u64) -> PageRange {
    PageRange::new(start, len).unwrap()
}

/// Runs `f`, and ends the test process if it has not returned within `limit`: a test
/// that would hang fails instead.
pub fn within<T>(limit: std::time::Duration, what: &str, f: impl FnOnce() -> T) -> T {
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let what = what.to_owned();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(limit) {
            eprintln!("{what} did not return within {limit:?}");
            std::process::exit(101);
        }
    });
    let out = f();
    drop(done);
    watchdog.join().unwrap();
    out
}
