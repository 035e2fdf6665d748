// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the benchmarks of this workspace.

#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::time::Duration;

use criterion::Criterion;

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
