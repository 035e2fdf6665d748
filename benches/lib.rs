// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Helpers shared by the benchmarks of this workspace.
//!
//! Two kinds of benchmark live here:
//!
//! - **This crate's own costs** (`bytes`, `virtio`, and `convert`'s `convert_1GiB`
//!   group): the userspace work of `vm-private-memory` against its peer (vm-memory's
//!   `GuestMemoryMmap`, or the raw system calls). They run on every host: on this host's
//!   KVM where it has in-place guest_memfd, else on the tests' stand-in for KVM,
//!   `guest_memfd::stand_in::StandInVm`, whose guest_memfd files are memfds
//!   ([`memory_vm`], [`dual_memory_vm`]). On the stand-in they print a `STAND-IN` line
//!   once, and every benchmark id of theirs carries the label `stand-in` (the criterion
//!   group's name ends in `_stand-in`, [`Backend::group`]): those figures leave out what
//!   the kernel's guest_memfd costs (its punch, its faults, KVM's invalidation of a bound
//!   file), and say nothing about them.
//! - **Kernel-bound** benchmarks (`discard`, `build_1tib`, `guest`, `convert`'s
//!   device-thread group, `linux_boot`): real guest_memfd, in place for all but
//!   `discard`. They probe the host first ([`kernel_has`]): on a host without what they
//!   need they print a `SKIPPED` line that names the missing capability and measure
//!   nothing; `bash fixtures/lab/run.sh --bench` runs them inside the nested lab's L1
//!   Linux 7.x, whose figures are for ratios only. `linux_boot` runs only in the lab.

#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::Criterion;
use guest_memfd::stand_in::StandInVm;
use guest_memfd::{Capabilities, VmMemoryOps};
pub use integration::Need;
use integration::{host_lacks, private_memory_vm, LAB_BENCH};

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

/// Where a benchmark of this crate's own costs runs: see [`memory_vm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// This host's KVM, which has what the benchmark needs: the figures include the
    /// kernel's part of each operation.
    Kvm,
    /// `guest_memfd::stand_in::StandInVm`, the tests' stand-in for KVM (memfd-backed):
    /// the figures are this crate's own costs only.
    StandIn,
}

impl Backend {
    /// The short label the benchmark ids of this backend carry: `""` on KVM,
    /// `"stand-in"` on the stand-in.
    pub fn label(self) -> &'static str {
        match self {
            Backend::Kvm => "",
            Backend::StandIn => "stand-in",
        }
    }

    /// The criterion group name `name`, labelled: `name` on KVM, `name_stand-in` on the
    /// stand-in, so that every benchmark id of the group (and the figure copied from it)
    /// says where it was measured.
    pub fn group(self, name: &str) -> String {
        match self.label() {
            "" => name.to_owned(),
            label => format!("{name}_{label}"),
        }
    }
}

/// The VM a benchmark of this crate's own costs (in-place strategy) builds its memory
/// on: a fresh default-type VM on `/dev/kvm` where this host's KVM has in-place
/// guest_memfd (`MMAP | INIT_SHARED`), else a [`StandInVm`]. On the stand-in, prints
/// once per process a `STAND-IN` line naming what the host lacks and what the figures
/// leave out. Every benchmark id measured on it must carry [`Backend::label`] (use
/// [`Backend::group`] for the group names).
pub fn memory_vm(bench: &str) -> (Arc<dyn VmMemoryOps>, Backend) {
    match host_lacks(Need::InPlace) {
        None => (Arc::new(vm()), Backend::Kvm),
        Some(lacks) => {
            say_stand_in(bench, &lacks);
            (Arc::new(StandInVm::new()), Backend::StandIn)
        }
    }
}

/// The VM for the dual strategy (memory attributes with `PRIVATE`), chosen as
/// [`memory_vm`] chooses: on a host whose KVM has in-place guest_memfd, the VM
/// `integration::private_memory_vm` creates (`KVM_X86_SW_PROTECTED_VM` where offered),
/// or `None` after a `NOT MEASURED` line (once per process) naming the capability it
/// lacks: the benchmark then measures the in-place strategy alone, which is all such a
/// host runs (not a `SKIPPED` benchmark: the lab's in-place pass, whose KVM is of this
/// kind, counts those as failures); elsewhere [`StandInVm::with_memory_attributes`],
/// after the `STAND-IN` line.
pub fn dual_memory_vm(bench: &str) -> Option<(Arc<dyn VmMemoryOps>, Backend)> {
    if let Some(lacks) = host_lacks(Need::InPlace) {
        say_stand_in(bench, &lacks);
        return Some((
            Arc::new(StandInVm::with_memory_attributes()),
            Backend::StandIn,
        ));
    }
    let kvm = kvm_ioctls::Kvm::new().expect("the benchmarks need /dev/kvm");
    let vm = private_memory_vm(&kvm).unwrap_or_else(|e| panic!("a private-memory VM: {e}"));
    match dual_lacks(&Capabilities::of_vm(&vm)) {
        None => Some((Arc::new(vm), Backend::Kvm)),
        Some(lacks) => {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                println!("{}", dual_not_measured_line(bench, &lacks));
            }
            None
        }
    }
}

/// What `caps` (the answers of the VM `integration::private_memory_vm` creates) lacks
/// for the dual strategy, named as `privmem probe` names it, or `None`.
fn dual_lacks(caps: &Capabilities) -> Option<String> {
    (!caps.dual_capable()).then(|| {
        format!(
            "KVM_CAP_MEMORY_ATTRIBUTES (233) is {:#x} (no PRIVATE, which the dual strategy needs) \
             on the VM integration::private_memory_vm creates",
            caps.memory_attributes
        )
    })
}

/// Prints, once per process, the line that says a benchmark runs on the stand-in.
fn say_stand_in(bench: &str, lacks: &str) {
    static SAID: AtomicBool = AtomicBool::new(false);
    if !SAID.swap(true, Ordering::Relaxed) {
        println!("{}", stand_in_line(bench, lacks));
    }
}

/// The line a benchmark of this crate's own costs prints where it runs on the stand-in
/// because the host lacks `lacks`.
fn stand_in_line(bench: &str, lacks: &str) -> String {
    format!(
        "STAND-IN {bench}: this host lacks what it needs: {lacks}; figures of this \
         crate's own costs are measured on the stand-in for KVM (memfd-backed), their \
         benchmark ids labelled `stand-in`: kernel-bound costs (punch, fault) are not in \
         them"
    )
}

/// The line a benchmark prints where the host runs the in-place strategy but lacks
/// `lacks` for the dual one.
fn dual_not_measured_line(bench: &str, lacks: &str) -> String {
    format!(
        "NOT MEASURED {bench} (dual strategy): this host lacks what it needs: {lacks}; \
         the in-place strategy is measured alone"
    )
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

    #[test]
    fn the_stand_in_line_names_what_is_lacking_and_what_is_left_out() {
        let line = stand_in_line("bytes", "KVM_CAP_GUEST_MEMFD (234) is 0 (no guest_memfd)");
        assert!(
            line.starts_with(
                "STAND-IN bytes: this host lacks what it needs: KVM_CAP_GUEST_MEMFD (234) is 0"
            ),
            "{line}"
        );
        assert!(line.contains("stand-in for KVM (memfd-backed)"), "{line}");
        assert!(
            line.contains("kernel-bound costs (punch, fault) are not in them"),
            "{line}"
        );
    }

    #[test]
    fn stand_in_groups_are_labelled_and_kvm_groups_are_not() {
        assert_eq!(Backend::Kvm.group("bytes_4KiB"), "bytes_4KiB");
        assert_eq!(Backend::StandIn.group("bytes_4KiB"), "bytes_4KiB_stand-in");
        assert_eq!(Backend::Kvm.label(), "");
        assert_eq!(Backend::StandIn.label(), "stand-in");
    }

    #[test]
    fn the_dual_skip_names_memory_attributes() {
        let in_place_only = Capabilities {
            user_memory2: true,
            memory_fault_info: true,
            guest_memfd: true,
            guest_memfd_flags: GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
            memory_attributes: 0,
            vm_types: 1,
            exit_hypercall: 0,
            pre_fault_memory: false,
            nr_memslots: 32764,
        };
        let lacks = dual_lacks(&in_place_only).unwrap();
        assert!(
            lacks.starts_with("KVM_CAP_MEMORY_ATTRIBUTES (233) is 0x0"),
            "{lacks}"
        );
        let dual = Capabilities {
            memory_attributes: u64::from(kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE),
            ..in_place_only
        };
        assert_eq!(dual_lacks(&dual), None);
        let line = dual_not_measured_line("virtio", &lacks);
        assert!(
            line.starts_with("NOT MEASURED virtio (dual strategy): this host lacks"),
            "{line}"
        );
        assert!(!line.contains("SKIPPED"), "{line}");
    }
}
