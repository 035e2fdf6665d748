// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Capability probing: what this host's KVM can do for guest private memory, and what
//! each missing piece means for a VMM.

use kvm_bindings::{
    KVM_CAP_EXIT_HYPERCALL, KVM_CAP_GUEST_MEMFD, KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_MEMORY_FAULT_INFO, KVM_CAP_NR_MEMSLOTS, KVM_CAP_PRE_FAULT_MEMORY, KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES, KVM_MEMORY_ATTRIBUTE_PRIVATE,
};
use kvm_ioctls::Kvm;
use serde::{Deserialize, Serialize};

use crate::flags::GuestMemfdFlags;
use crate::uapi::{KVM_CAP_GUEST_MEMFD_FLAGS, KVM_HC_MAP_GPA_RANGE};
use crate::vm_ops::VmMemoryOps;

/// The answers of `KVM_CHECK_EXTENSION` that matter for guest private memory, from the
/// system fd (`/dev/kvm`) or from one VM fd (which may answer differently per VM type).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// `KVM_CAP_USER_MEMORY2` (231): `KVM_SET_USER_MEMORY_REGION2` exists.
    pub user_memory2: bool,
    /// `KVM_CAP_MEMORY_FAULT_INFO` (232): `KVM_EXIT_MEMORY_FAULT` carries gpa, size, flags.
    pub memory_fault_info: bool,
    /// `KVM_CAP_GUEST_MEMFD` (234): `KVM_CREATE_GUEST_MEMFD` exists.
    pub guest_memfd: bool,
    /// `KVM_CAP_GUEST_MEMFD_FLAGS` (244): the creation flags accepted.
    pub guest_memfd_flags: GuestMemfdFlags,
    /// `KVM_CAP_MEMORY_ATTRIBUTES` (233): the attributes `KVM_SET_MEMORY_ATTRIBUTES` takes.
    pub memory_attributes: u64,
    /// `KVM_CAP_VM_TYPES` (235): bit N set when VM type N can be created.
    pub vm_types: u64,
    /// `KVM_CAP_EXIT_HYPERCALL` (201): hypercalls that may exit to userspace, by number.
    pub exit_hypercall: u64,
    /// `KVM_CAP_PRE_FAULT_MEMORY` (236): `KVM_PRE_FAULT_MEMORY` exists.
    pub pre_fault_memory: bool,
    /// `KVM_CAP_NR_MEMSLOTS`: memslots per address space.
    pub nr_memslots: u32,
}

impl Capabilities {
    /// Probes the system fd.
    pub fn of_system(kvm: &Kvm) -> Self {
        Self::from_checker(|cap| i64::from(kvm.check_extension_raw(cap.into())))
    }

    /// Probes a VM (a kvm-ioctls `VmFd`, or any other [`VmMemoryOps`]); VM-specific answers
    /// (memory attributes, guest_memfd flags) depend on the VM's type.
    pub fn of_vm(vm: &(impl VmMemoryOps + ?Sized)) -> Self {
        Self::from_checker(|cap| i64::from(vm.check_extension_raw(cap)))
    }

    /// Builds the answers from any `KVM_CHECK_EXTENSION` implementation: `check` takes a
    /// capability number and returns the kernel's answer (negative on error).
    pub fn from_checker(check: impl Fn(u32) -> i64) -> Self {
        let mask = |cap| u64::try_from(check(cap)).unwrap_or(0);
        Capabilities {
            user_memory2: check(KVM_CAP_USER_MEMORY2) > 0,
            memory_fault_info: check(KVM_CAP_MEMORY_FAULT_INFO) > 0,
            guest_memfd: check(KVM_CAP_GUEST_MEMFD) > 0,
            guest_memfd_flags: GuestMemfdFlags::from_bits_retain(mask(KVM_CAP_GUEST_MEMFD_FLAGS)),
            memory_attributes: mask(KVM_CAP_MEMORY_ATTRIBUTES),
            vm_types: mask(KVM_CAP_VM_TYPES),
            exit_hypercall: mask(KVM_CAP_EXIT_HYPERCALL),
            pre_fault_memory: check(KVM_CAP_PRE_FAULT_MEMORY) > 0,
            nr_memslots: u32::try_from(check(KVM_CAP_NR_MEMSLOTS)).unwrap_or(0),
        }
    }

    /// Whether a guest_memfd can be created mappable and shared, which the in-place
    /// strategy needs.
    pub fn in_place_capable(&self) -> bool {
        self.guest_memfd
            && self.user_memory2
            && self
                .guest_memfd_flags
                .contains(GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED)
    }

    /// Whether pages can be marked private with `KVM_SET_MEMORY_ATTRIBUTES`, which the
    /// dual strategy (TDX, SEV-SNP style) needs.
    pub fn dual_capable(&self) -> bool {
        self.guest_memfd
            && self.user_memory2
            && self.memory_attributes & u64::from(KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0
    }

    /// Whether VM type `vm_type` can be created (type 0 always can).
    pub fn supports_vm_type(&self, vm_type: u32) -> bool {
        vm_type == 0 || (vm_type < 64 && self.vm_types & (1 << vm_type) != 0)
    }

    /// Whether `KVM_HC_MAP_GPA_RANGE` hypercalls can be made to exit to userspace.
    pub fn map_gpa_range_exit(&self) -> bool {
        self.exit_hypercall & (1 << KVM_HC_MAP_GPA_RANGE) != 0
    }
}

/// The x86 VM types KVM defines, by number.
pub const VM_TYPE_NAMES: [(u32, &str); 6] = [
    (0, "DEFAULT"),
    (1, "SW_PROTECTED"),
    (2, "SEV"),
    (3, "SEV_ES"),
    (4, "SEV_SNP"),
    (5, "TDX"),
];

/// The name of VM type `vm_type`.
pub fn vm_type_name(vm_type: u32) -> &'static str {
    VM_TYPE_NAMES
        .iter()
        .find(|(n, _)| *n == vm_type)
        .map_or("UNKNOWN", |(_, name)| name)
}

/// What one VM type offers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmTypeReport {
    /// The type's number.
    pub vm_type: u32,
    /// Its name.
    pub name: String,
    /// The VM fd's answers, or why no VM of this type could be created.
    pub capabilities: Result<Capabilities, String>,
}

/// One line of a report: a feature, whether the host has it, and what that means.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// The feature, in a VMM author's words.
    pub feature: String,
    /// The capability asked (name and number).
    pub capability: String,
    /// The host's answer, readable.
    pub value: String,
    /// Whether the feature is available.
    pub available: bool,
    /// What the answer means for a user of this crate.
    pub meaning: String,
}

/// Everything this host offers for guest private memory, with a reading of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Report {
    /// The running kernel's release.
    pub kernel: String,
    /// The system fd's answers.
    pub system: Capabilities,
    /// Each VM type the host lists, probed on a VM of that type.
    pub vm_types: Vec<VmTypeReport>,
    /// Whether the in-place strategy (guest_memfd MMAP | INIT_SHARED) is available.
    pub in_place_strategy: bool,
    /// Whether the dual strategy (memory attributes) is available, on some VM type.
    pub dual_strategy: bool,
    /// The reading, feature by feature.
    pub findings: Vec<Finding>,
    /// Whether guest_memfd places memory by a NUMA policy set through its mapping,
    /// found by behaviour on a default VM ([`crate::numa_policy_support`]), or why the
    /// probe failed; `None` if not probed (a report built with [`Report::from_parts`]).
    #[serde(default)]
    pub numa_policy: Option<std::result::Result<crate::NumaSupport, String>>,
}

impl Report {
    /// Probes the host: the system fd, then one VM of every type it lists.
    pub fn probe(kvm: &Kvm) -> Self {
        let system = Capabilities::of_system(kvm);
        let vm_types = (0..64u32)
            .filter(|t| system.supports_vm_type(*t))
            .map(|vm_type| VmTypeReport {
                vm_type,
                name: vm_type_name(vm_type).to_owned(),
                capabilities: kvm
                    .create_vm_with_type(vm_type.into())
                    .map(|vm| Capabilities::of_vm(&vm))
                    .map_err(|e| format!("creating a VM of this type failed: {e}")),
            })
            .collect();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let mut report = Self::from_parts(kernel, system, vm_types);
        report.numa_policy = Some(
            kvm.create_vm()
                .map_err(|e| format!("creating a VM failed: {e}"))
                .and_then(|vm| crate::numa_policy_support(&vm).map_err(|e| e.to_string())),
        );
        report
    }

    /// Reads the answers already gathered (`probe` without the ioctls).
    pub fn from_parts(kernel: String, system: Capabilities, vm_types: Vec<VmTypeReport>) -> Self {
        let vms: Vec<(&str, &Capabilities)> = vm_types
            .iter()
            .filter_map(|r| r.capabilities.as_ref().ok().map(|c| (r.name.as_str(), c)))
            .collect();
        // What the host offers on its best VM type for each capability.
        let best = vms
            .iter()
            .map(|(_, c)| (*c).clone())
            .reduce(|a, b| Capabilities {
                user_memory2: a.user_memory2 || b.user_memory2,
                memory_fault_info: a.memory_fault_info || b.memory_fault_info,
                guest_memfd: a.guest_memfd || b.guest_memfd,
                guest_memfd_flags: a.guest_memfd_flags | b.guest_memfd_flags,
                memory_attributes: a.memory_attributes | b.memory_attributes,
                vm_types: a.vm_types | b.vm_types,
                exit_hypercall: a.exit_hypercall | b.exit_hypercall,
                pre_fault_memory: a.pre_fault_memory || b.pre_fault_memory,
                nr_memslots: a.nr_memslots.max(b.nr_memslots),
            })
            .unwrap_or_else(|| system.clone());
        let default_vm = &best;
        let in_place = vms.iter().any(|(_, c)| c.in_place_capable());
        let dual_on: Vec<String> = vms
            .iter()
            .filter(|(_, c)| c.dual_capable())
            .map(|(n, _)| (*n).to_owned())
            .collect();
        let findings = findings(&system, default_vm, &vm_types, in_place, &dual_on);
        let dual_strategy = !dual_on.is_empty();
        Report {
            kernel,
            system,
            vm_types,
            in_place_strategy: in_place,
            dual_strategy,
            findings,
            numa_policy: None,
        }
    }

    /// The finding for `capability` name prefix, if present.
    pub fn finding(&self, feature: &str) -> Option<&Finding> {
        self.findings.iter().find(|f| f.feature == feature)
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_owned()
}

fn finding(
    feature: &str,
    capability: &str,
    value: String,
    available: bool,
    meaning: &str,
) -> Finding {
    Finding {
        feature: feature.to_owned(),
        capability: capability.to_owned(),
        value,
        available,
        meaning: meaning.to_owned(),
    }
}

fn findings(
    system: &Capabilities,
    vm: &Capabilities,
    vm_types: &[VmTypeReport],
    in_place: bool,
    dual_on: &[String],
) -> Vec<Finding> {
    let types: Vec<&str> = vm_types.iter().map(|r| r.name.as_str()).collect();
    let confidential = vm_types.iter().any(|r| r.vm_type != 0);
    let attributes = dual_on.join(", ");
    vec![
        finding(
            "guest_memfd",
            "KVM_CAP_GUEST_MEMFD (234)",
            yes_no(vm.guest_memfd),
            vm.guest_memfd,
            if vm.guest_memfd {
                "guest RAM can live in guest_memfd files that the host cannot read through read(2), write(2) or a private mapping"
            } else {
                "no guest private memory on this host: Linux 6.8 or later with CONFIG_KVM_GUEST_MEMFD is needed"
            },
        ),
        finding(
            "guest_memfd flags",
            "KVM_CAP_GUEST_MEMFD_FLAGS (244)",
            vm.guest_memfd_flags.to_string(),
            in_place,
            if in_place {
                "MMAP | INIT_SHARED: the in-place strategy works (one guest_memfd, mapped by the host, private pages guarded by this crate)"
            } else {
                "no MMAP | INIT_SHARED: the in-place strategy is unavailable (Linux 6.18 or later is needed)"
            },
        ),
        finding(
            "memory attributes",
            "KVM_CAP_MEMORY_ATTRIBUTES (233)",
            if dual_on.is_empty() {
                format!("{:#x} (no VM type has PRIVATE)", system.memory_attributes)
            } else {
                format!("PRIVATE on {attributes}")
            },
            !dual_on.is_empty(),
            if dual_on.is_empty() {
                "no KVM_SET_MEMORY_ATTRIBUTES: TDX/SNP-style conversion (the dual strategy, with KVM's own private/shared view) is not available here; private pages are enforced only by this crate's host access policy"
            } else {
                "KVM_SET_MEMORY_ATTRIBUTES marks pages private: the dual strategy (TDX/SNP-style conversion) is available on those VM types"
            },
        ),
        finding(
            "VM types",
            "KVM_CAP_VM_TYPES (235)",
            types.join(", "),
            confidential,
            if confidential {
                "confidential or protected VM types can be created"
            } else {
                "only the default VM type: no SW_PROTECTED, SEV-SNP or TDX guests on this host"
            },
        ),
        finding(
            "memslots with guest_memfd",
            "KVM_CAP_USER_MEMORY2 (231)",
            yes_no(vm.user_memory2),
            vm.user_memory2,
            if vm.user_memory2 {
                "KVM_SET_USER_MEMORY_REGION2 binds guest_memfd files to guest-physical memory"
            } else {
                "guest_memfd files cannot be bound to guest memory: no private memory"
            },
        ),
        finding(
            "memory fault exits",
            "KVM_CAP_MEMORY_FAULT_INFO (232)",
            yes_no(vm.memory_fault_info),
            vm.memory_fault_info,
            if vm.memory_fault_info {
                "KVM_EXIT_MEMORY_FAULT reports gpa, size and private/shared, so implicit conversions can be served"
            } else {
                "KVM_EXIT_MEMORY_FAULT carries no details: implicit conversions cannot be served"
            },
        ),
        finding(
            "MAP_GPA_RANGE hypercall exits",
            "KVM_CAP_EXIT_HYPERCALL (201)",
            format!("{:#x}", vm.exit_hypercall),
            vm.map_gpa_range_exit(),
            if vm.map_gpa_range_exit() {
                "the guest's KVM_HC_MAP_GPA_RANGE hypercall can exit to the VMM (TDX MapGPA / SNP page-state changes arrive this way)"
            } else {
                "KVM_HC_MAP_GPA_RANGE cannot exit to the VMM: guests must request conversions another way"
            },
        ),
        finding(
            "pre-fault",
            "KVM_CAP_PRE_FAULT_MEMORY (236)",
            yes_no(vm.pre_fault_memory),
            vm.pre_fault_memory,
            if vm.pre_fault_memory {
                "KVM_PRE_FAULT_MEMORY can map guest memory before the guest touches it"
            } else {
                "no KVM_PRE_FAULT_MEMORY: guest memory is mapped on first access, not ahead of time"
            },
        ),
        finding(
            "memslots",
            "KVM_CAP_NR_MEMSLOTS (10)",
            vm.nr_memslots.to_string(),
            vm.nr_memslots > 0,
            "the most memslots one address space can hold",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(flags: u64, attrs: u64, types: u64) -> Capabilities {
        Capabilities::from_checker(|cap| match cap {
            KVM_CAP_USER_MEMORY2 | KVM_CAP_GUEST_MEMFD | KVM_CAP_MEMORY_FAULT_INFO => 1,
            KVM_CAP_GUEST_MEMFD_FLAGS => flags as i64,
            KVM_CAP_MEMORY_ATTRIBUTES => attrs as i64,
            KVM_CAP_VM_TYPES => types as i64,
            KVM_CAP_NR_MEMSLOTS => 32764,
            _ => -1,
        })
    }

    #[test]
    fn negative_answers_read_as_absent() {
        let c = caps(3, 0, 1);
        assert_eq!(c.exit_hypercall, 0);
        assert!(!c.pre_fault_memory);
        assert!(c.in_place_capable());
        assert!(!c.dual_capable());
        assert!(c.supports_vm_type(0));
        assert!(!c.supports_vm_type(1));
        assert!(!c.supports_vm_type(200));
    }

    #[test]
    fn guest_memfd_counts_on_any_vm_type() {
        // Linux 6.12: the default VM type has no guest_memfd, SW_PROTECTED has.
        let none = Capabilities::from_checker(|_| 0);
        let report = Report::from_parts(
            "6.12".into(),
            none.clone(),
            vec![
                VmTypeReport {
                    vm_type: 0,
                    name: "DEFAULT".into(),
                    capabilities: Ok(none),
                },
                VmTypeReport {
                    vm_type: 1,
                    name: "SW_PROTECTED".into(),
                    capabilities: Ok(caps(0, 8, 0b11)),
                },
            ],
        );
        assert!(report.finding("guest_memfd").unwrap().available);
        assert!(
            report
                .finding("memslots with guest_memfd")
                .unwrap()
                .available
        );
        assert!(report.dual_strategy);
    }

    #[test]
    fn dual_strategy_is_read_from_any_vm_type() {
        let system = caps(0, 0, 0b11);
        let report = Report::from_parts(
            "test".into(),
            system.clone(),
            vec![
                VmTypeReport {
                    vm_type: 0,
                    name: "DEFAULT".into(),
                    capabilities: Ok(caps(0, 0, 0b11)),
                },
                VmTypeReport {
                    vm_type: 1,
                    name: "SW_PROTECTED".into(),
                    capabilities: Ok(caps(0, 8, 0b11)),
                },
            ],
        );
        assert!(report.dual_strategy);
        assert!(!report.in_place_strategy);
        let attrs = report.finding("memory attributes").unwrap();
        assert!(attrs.available);
        assert!(attrs.value.contains("SW_PROTECTED"), "{}", attrs.value);
        assert!(report.finding("VM types").unwrap().available);
    }
}
