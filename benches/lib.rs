// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the benchmarks of this workspace.
//!
//! The kernel-bound benchmarks (`discard`, `bytes`, `convert`, `build_1tib`, `guest`:
//! real guest_memfd, in place for all but `discard`) probe the host first
//! ([`kernel_has`]): on a host without what they need they print a `SKIPPED` line that
//! names the missing capability and measure nothing; `bash fixtures/lab/run.sh --bench`
//! runs them inside the nested lab's L1 Linux 7.x, whose figures are for ratios only.
//! `linux_boot` runs only in the lab.

#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::Criterion;
pub use integration::Need;
use integration::{host_lacks, LAB_BENCH};

/// Criterion settings for benchmarks whose every iteration is a large, slow operation
/// (hundreds of milliseconds): few samples, short warm-up.
pub fn slow_criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(12))
        .configure_from_args()
}

/// A fresh VM on `/dev/kvm`.
pub fn vm() -> kvm_ioctls::VmFd {
    kvm_ioctls::Kvm::new()
        .and_then(|kvm| kvm.create_vm())
        .expect("the benchmarks need /dev/kvm")
}

/// Whether this host's KVM has what the kernel-bound benchmark `bench` needs, probed
/// before it runs. If not, prints (once per process) a `SKIPPED` line naming the missing
/// capability as `privmem probe` names it, and the nested lab's command that runs the
/// same benchmark inside L1 Linux 7.x (ratios only), and returns `false`: the caller
/// measures nothing.
pub fn kernel_has(bench: &str, need: Need) -> bool {
    match host_lacks(need) {
        None => true,
        Some(lacks) => {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                println!("{}", skipped_line(bench, &lacks));
            }
            false
        }
    }
}

/// The line a kernel-bound benchmark prints where the host lacks `lacks`.
fn skipped_line(bench: &str, lacks: &str) -> String {
    format!(
        "SKIPPED {bench}: this host lacks what it needs: {lacks}. \
         `{LAB_BENCH}` runs it inside the nested lab's L1 Linux 7.x (ratios only)"
    )
}

#[cfg(test)]
mod tests {
    use guest_memfd::{Capabilities, GuestMemfdFlags};
    use integration::lacking;

    use super::*;

    #[test]
    fn the_skip_names_the_capability_and_the_lab() {
        let caps = Capabilities {
            user_memory2: true,
            memory_fault_info: true,
            guest_memfd: false,
            guest_memfd_flags: GuestMemfdFlags::empty(),
            memory_attributes: 0,
            vm_types: 1,
            exit_hypercall: 0,
            pre_fault_memory: false,
            nr_memslots: 32764,
        };
        let line = skipped_line("convert", &lacking(&caps, Need::InPlace).unwrap());
        assert!(line.starts_with("SKIPPED convert: "), "{line}");
        assert!(line.contains("KVM_CAP_GUEST_MEMFD (234) is 0"), "{line}");
        assert!(line.contains("bash fixtures/lab/run.sh --bench"), "{line}");
    }
}
