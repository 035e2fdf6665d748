// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What this host's KVM lacks for a program of this workspace (the demo, a benchmark),
//! decided by probing capabilities before anything runs, each missing capability named
//! as `privmem probe` names it; and the nested lab's commands that run such a program
//! where the host cannot.

use guest_memfd::Capabilities;
use kvm_ioctls::Kvm;

use crate::private_memory_vm;

/// The command that shows `privmem-demo` on a host that cannot run it: the nested lab
/// boots L1 Linux 7.x (in-place guest_memfd) under QEMU TCG and runs the demo there.
pub const LAB_DEMO: &str = "bash fixtures/lab/run.sh --demo";

/// The command that runs the kernel-bound benchmarks inside the nested lab's L1 (their
/// figures there are for ratios only: TCG sets the absolute pace).
pub const LAB_BENCH: &str = "bash fixtures/lab/run.sh --bench";

/// Capability names as `privmem probe` prints them (`guest_memfd::Report`'s findings;
/// a unit test keeps the two equal).
const GUEST_MEMFD: &str = "KVM_CAP_GUEST_MEMFD (234)";
const USER_MEMORY2: &str = "KVM_CAP_USER_MEMORY2 (231)";
const GUEST_MEMFD_FLAGS: &str = "KVM_CAP_GUEST_MEMFD_FLAGS (244)";
const MEMORY_ATTRIBUTES: &str = "KVM_CAP_MEMORY_ATTRIBUTES (233)";

/// What a program needs of the VM it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// guest_memfd files, any flags (on the default VM type).
    GuestMemfd,
    /// The in-place strategy on the default VM type: guest_memfd with
    /// `MMAP | INIT_SHARED`, bound with `KVM_SET_USER_MEMORY_REGION2`.
    InPlace,
    /// Private memory on either strategy, on the VM [`private_memory_vm`] creates: in
    /// place, or dual (memory attributes with `PRIVATE`).
    PrivateMemory,
}

/// What `caps` (one VM's answers) lacks for `need`, or `None` if nothing: each missing
/// capability as `privmem probe` names it, with its answer here, joined by "and"
/// (e.g. `KVM_CAP_GUEST_MEMFD (234) is 0 (no guest_memfd)`).
pub fn lacking(caps: &Capabilities, need: Need) -> Option<String> {
    let mut missing = Vec::new();
    if !caps.guest_memfd {
        missing.push(format!("{GUEST_MEMFD} is 0 (no guest_memfd)"));
    } else if !caps.user_memory2 && need != Need::GuestMemfd {
        missing.push(format!(
            "{USER_MEMORY2} is 0 (guest_memfd cannot be bound to guest memory)"
        ));
    } else {
        let no_in_place = || {
            format!(
                "{GUEST_MEMFD_FLAGS} is {} (no MMAP | INIT_SHARED, which the in-place strategy needs)",
                caps.guest_memfd_flags
            )
        };
        match need {
            Need::GuestMemfd => {}
            Need::InPlace if !caps.in_place_capable() => missing.push(no_in_place()),
            Need::PrivateMemory if !caps.in_place_capable() && !caps.dual_capable() => {
                missing.push(no_in_place());
                missing.push(format!(
                    "{MEMORY_ATTRIBUTES} is {:#x} (no PRIVATE, which the dual strategy needs)",
                    caps.memory_attributes
                ));
            }
            Need::InPlace | Need::PrivateMemory => {}
        }
    }
    (!missing.is_empty()).then(|| missing.join(" and "))
}

/// Probes this host for `need`, before anything runs: what it lacks, or `None` if it
/// has everything. `/dev/kvm` that cannot be opened is reported as such; a VM that
/// cannot be created is not (the program then fails on it and says why).
pub fn host_lacks(need: Need) -> Option<String> {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => return Some(format!("a usable /dev/kvm (opening it: {e})")),
    };
    let caps = match need {
        Need::PrivateMemory => Capabilities::of_vm(&private_memory_vm(&kvm).ok()?),
        Need::GuestMemfd | Need::InPlace => Capabilities::of_vm(&kvm.create_vm().ok()?),
    };
    lacking(&caps, need)
}

#[cfg(test)]
mod tests {
    use guest_memfd::{GuestMemfdFlags, Report, VmTypeReport};

    use super::*;

    /// Capabilities of a host with guest_memfd `flags` and memory `attributes`.
    fn caps(guest_memfd: bool, flags: GuestMemfdFlags, attributes: u64) -> Capabilities {
        Capabilities {
            user_memory2: true,
            memory_fault_info: true,
            guest_memfd,
            guest_memfd_flags: flags,
            memory_attributes: attributes,
            vm_types: 1,
            exit_hypercall: 0,
            pre_fault_memory: false,
            nr_memslots: 32764,
        }
    }

    const IN_PLACE: GuestMemfdFlags = GuestMemfdFlags::MMAP.union(GuestMemfdFlags::INIT_SHARED);
    const PRIVATE: u64 = kvm_bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE as u64;

    #[test]
    fn names_are_those_of_privmem_probe() {
        let c = caps(false, GuestMemfdFlags::empty(), 0);
        let report = Report::from_parts(
            String::new(),
            c.clone(),
            vec![VmTypeReport {
                vm_type: 0,
                name: "DEFAULT".into(),
                capabilities: Ok(c),
            }],
        );
        for (feature, name) in [
            ("guest_memfd", GUEST_MEMFD),
            ("memslots with guest_memfd", USER_MEMORY2),
            ("guest_memfd flags", GUEST_MEMFD_FLAGS),
            ("memory attributes", MEMORY_ATTRIBUTES),
        ] {
            assert_eq!(report.finding(feature).unwrap().capability, name);
        }
    }

    #[test]
    fn no_guest_memfd_is_named_for_every_need() {
        // The kind of host with KVM_CAP_GUEST_MEMFD 0 (HOST.md).
        let c = caps(false, GuestMemfdFlags::empty(), 0);
        for need in [Need::GuestMemfd, Need::InPlace, Need::PrivateMemory] {
            assert_eq!(
                lacking(&c, need).as_deref(),
                Some("KVM_CAP_GUEST_MEMFD (234) is 0 (no guest_memfd)")
            );
        }
    }

    #[test]
    fn guest_memfd_without_mmap_or_attributes_lacks_both() {
        // Linux 6.8 to 6.17 on the default VM type.
        let c = caps(true, GuestMemfdFlags::empty(), 0);
        assert_eq!(lacking(&c, Need::GuestMemfd), None);
        let in_place = lacking(&c, Need::InPlace).unwrap();
        assert!(in_place.starts_with("KVM_CAP_GUEST_MEMFD_FLAGS (244) is none"));
        assert!(!in_place.contains("233"), "{in_place}");
        let any = lacking(&c, Need::PrivateMemory).unwrap();
        assert!(
            any.contains("KVM_CAP_GUEST_MEMFD_FLAGS (244) is none")
                && any.contains(" and KVM_CAP_MEMORY_ATTRIBUTES (233) is 0x0"),
            "{any}"
        );
        // MMAP without INIT_SHARED does not do either.
        assert!(lacking(&caps(true, GuestMemfdFlags::MMAP, 0), Need::InPlace).is_some());
    }

    #[test]
    fn in_place_or_attributes_suffice() {
        let in_place = caps(true, IN_PLACE, 0);
        for need in [Need::GuestMemfd, Need::InPlace, Need::PrivateMemory] {
            assert_eq!(lacking(&in_place, need), None, "{need:?}");
        }
        let dual = caps(true, GuestMemfdFlags::empty(), PRIVATE);
        assert_eq!(lacking(&dual, Need::PrivateMemory), None);
        assert!(lacking(&dual, Need::InPlace).is_some());
    }

    #[test]
    fn memslots_without_user_memory2_are_named() {
        let c = Capabilities {
            user_memory2: false,
            ..caps(true, IN_PLACE, 0)
        };
        assert_eq!(lacking(&c, Need::GuestMemfd), None);
        assert!(lacking(&c, Need::InPlace)
            .unwrap()
            .starts_with("KVM_CAP_USER_MEMORY2 (231) is 0"));
    }
}
