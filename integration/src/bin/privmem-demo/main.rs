// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `privmem-demo`: small guests on private memory, told as a story.
//!
//! ```text
//! cargo run --release -p integration --bin privmem-demo
//! ```
//!
//! It lives in the workspace's test harness (it boots the harness's guest programs); the
//! installable `privmem probe` says what a host offers. On a host whose KVM lacks what
//! the demo needs it says what is missing and how to see the demo anyway
//! (`bash fixtures/lab/run.sh --demo`), and exits with status 77. See `--help`.

#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod demo;

use std::io;
use std::process::ExitCode;

use integration::{host_lacks, Need, LAB_DEMO};

/// The exit status when this host's KVM lacks what the demo needs and nothing was shown:
/// 77, which automake, meson and similar harnesses read as "skipped", distinct from 1
/// (the demo ran and failed) and 2 (bad usage).
const EXIT_HOST_LACKS: u8 = 77;

/// The exit status for arguments the demo does not take.
const EXIT_USAGE: u8 = 2;

const HELP: &str = "\
privmem-demo: guests whose RAM is KVM guest_memfd, told as a story

Usage: privmem-demo [--help]

It runs two small guests on private memory (an all-private guest, and a TDX-style
bounce buffer) and says what the host could and could not see. It needs read-write
/dev/kvm and guest_memfd with MMAP | INIT_SHARED (the in-place strategy, Linux 6.18)
or memory attributes (the dual strategy). Where the host lacks them, it says which
capability is missing (as `privmem probe` names it) and that
`bash fixtures/lab/run.sh --demo` shows the demo in the nested lab (QEMU, L1 Linux 7.x).

Exit status:
  0   the story ran and every check in it held
  1   the story ran and a check failed, or an error stopped it
  2   bad usage (it takes no arguments but --help)
  77  this host's KVM lacks what the demo needs: nothing was shown
";

/// What the demo prints where the host lacks `lacks` (as [`integration::lacking`] words
/// it): what is missing, and the command that shows the demo anyway.
fn not_here(lacks: &str) -> String {
    format!(
        "privmem-demo: nothing shown: this host lacks what the demo needs: {lacks}; `privmem probe` tells the rest.\n\
         To see the demo anyway, in the nested lab (QEMU TCG, L1 Linux 7.x with in-place guest_memfd): {LAB_DEMO}"
    )
}

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [] => {}
        [arg] if arg == "--help" || arg == "-h" => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("privmem-demo takes no arguments: it runs the whole story (see --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    // Capabilities first: a host without them is told so, not shown an error.
    if let Some(lacks) = host_lacks(Need::PrivateMemory) {
        eprintln!("{}", not_here(&lacks));
        return ExitCode::from(EXIT_HOST_LACKS);
    }
    let mut out = io::stdout().lock();
    match demo::run(&mut out) {
        Ok(outcome) if outcome.ok => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!(
                "privmem-demo: {e}\n(the demo needs read-write /dev/kvm and guest_memfd with MMAP | INIT_SHARED or memory attributes: run `privmem probe`)"
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use guest_memfd::{Capabilities, GuestMemfdFlags};
    use integration::lacking;

    use super::*;

    /// This project's hosts of both kinds (HOST.md): `guest_memfd` says which.
    fn host(guest_memfd: bool) -> Capabilities {
        Capabilities {
            user_memory2: true,
            memory_fault_info: true,
            guest_memfd,
            guest_memfd_flags: if guest_memfd {
                GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED
            } else {
                GuestMemfdFlags::empty()
            },
            memory_attributes: 0,
            vm_types: 1,
            exit_hypercall: 0x1000,
            pre_fault_memory: false,
            nr_memslots: 32764,
        }
    }

    /// The message for a host with `caps`, as `main` prints it, or `None` if the demo
    /// runs there.
    fn message(caps: &Capabilities) -> Option<String> {
        lacking(caps, Need::PrivateMemory).map(|lacks| not_here(&lacks))
    }

    #[test]
    fn a_host_without_guest_memfd_is_told_what_it_lacks_and_the_lab_command() {
        let message = message(&host(false)).expect("the demo cannot run there");
        assert!(
            message.contains("this host lacks what the demo needs: KVM_CAP_GUEST_MEMFD (234) is 0"),
            "{message}"
        );
        assert!(message.contains("privmem probe"), "{message}");
        assert!(
            message.ends_with("bash fixtures/lab/run.sh --demo"),
            "{message}"
        );
        assert!(message.lines().count() <= 2, "{message}");
    }

    #[test]
    fn a_host_with_in_place_guest_memfd_runs_the_demo() {
        assert_eq!(message(&host(true)), None);
    }

    #[test]
    fn guest_memfd_without_mmap_or_attributes_names_both() {
        let caps = Capabilities {
            guest_memfd_flags: GuestMemfdFlags::empty(),
            ..host(true)
        };
        let message = message(&caps).expect("neither strategy runs there");
        assert!(
            message.contains("KVM_CAP_GUEST_MEMFD_FLAGS (244) is none")
                && message.contains("KVM_CAP_MEMORY_ATTRIBUTES (233) is 0x0"),
            "{message}"
        );
    }

    #[test]
    fn the_exit_statuses_are_distinct_and_in_the_help() {
        assert!(HELP.contains("77  this host's KVM lacks"));
        assert!(HELP.contains("2   bad usage"));
        assert_ne!(EXIT_HOST_LACKS, EXIT_USAGE);
        assert!(![0, 1].contains(&EXIT_HOST_LACKS));
    }
}
