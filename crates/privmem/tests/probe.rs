// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `privmem probe` on the real `/dev/kvm`: what it prints must match what KVM answers.

use std::process::Command;

use kvm_ioctls::{Cap, Kvm};

fn privmem(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_privmem"))
        .args(args)
        .output()
        .expect("run privmem");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn json_report_agrees_with_kvm() {
    let (ok, stdout, stderr) = privmem(&["probe", "--json"]);
    assert!(ok, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();

    let findings = report["findings"].as_array().unwrap();
    let available = |feature: &str| {
        findings
            .iter()
            .find(|f| f["feature"] == feature)
            .unwrap_or_else(|| panic!("no finding {feature}"))["available"]
            .as_bool()
            .unwrap()
    };
    assert_eq!(
        available("guest_memfd"),
        vm.check_extension(Cap::GuestMemfd)
    );
    assert_eq!(
        available("memslots with guest_memfd"),
        vm.check_extension(Cap::UserMemory2)
    );
    let flags = vm.check_extension_raw(244);
    assert_eq!(available("guest_memfd flags"), flags & 3 == 3);
    assert_eq!(report["in_place_strategy"], flags & 3 == 3);
    let types = kvm.check_extension_raw(kvm_bindings::KVM_CAP_VM_TYPES.into());
    assert_eq!(available("VM types"), types & !1 != 0);
    assert_eq!(
        report["vm_types"].as_array().unwrap().len() as u32,
        (types.max(1) as u32).count_ones()
    );
    // NUMA support, as the library finds it on a VM of the same kind.
    let numa = guest_memfd::numa_policy_support(&vm).unwrap();
    assert_eq!(
        report["numa_policy"],
        serde_json::json!({ "Ok": serde_json::to_value(numa).unwrap() })
    );
    let attrs = vm.check_extension_raw(kvm_bindings::KVM_CAP_MEMORY_ATTRIBUTES.into());
    if types & !1 == 0 {
        // Only the default VM: the dual strategy exists exactly when it has attributes.
        assert_eq!(available("memory attributes"), attrs & 8 != 0);
        assert_eq!(report["dual_strategy"], attrs & 8 != 0);
    }
}

#[test]
fn table_report_names_every_feature_and_both_strategies() {
    let (ok, stdout, stderr) = privmem(&["probe"]);
    assert!(ok, "{stderr}");
    for feature in [
        "guest_memfd ",
        "guest_memfd flags",
        "memory attributes",
        "VM types",
        "memslots with guest_memfd",
        "memory fault exits",
        "MAP_GPA_RANGE hypercall exits",
        "pre-fault",
        "in-place (guest_memfd MMAP | INIT_SHARED): ",
        "dual (guest_memfd + sealed memfd, KVM_SET_MEMORY_ATTRIBUTES): ",
        "DEFAULT (0)",
        "NUMA policy of guest_memfd (mbind on its mapping): ",
    ] {
        assert!(stdout.contains(feature), "missing {feature:?} in\n{stdout}");
    }
}

#[test]
fn bad_arguments_are_refused_with_usage() {
    let (ok, _, stderr) = privmem(&["probe", "--jsn"]);
    assert!(!ok);
    assert!(stderr.contains("--json"), "{stderr}");
    let (ok, _, _) = privmem(&[]);
    assert!(!ok);
}
