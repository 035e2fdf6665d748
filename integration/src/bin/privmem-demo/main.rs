// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `privmem-demo`: small guests on private memory, told as a story.
//!
//! ```text
//! cargo run --release -p integration --bin privmem-demo
//! ```
//!
//! It lives in the workspace's test harness (it boots the harness's guest programs); the
//! installable `privmem probe` says what a host offers.

#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod demo;

use std::io;
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().len() > 1 {
        eprintln!("privmem-demo takes no arguments: it runs the whole story");
        return ExitCode::FAILURE;
    }
    let mut out = io::stdout().lock();
    match demo::run(&mut out) {
        Ok(outcome) if outcome.ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!(
                "privmem-demo: {e}\n(the demo needs read-write /dev/kvm and guest_memfd with MMAP | INIT_SHARED: run `privmem probe`)"
            );
            ExitCode::FAILURE
        }
    }
}
