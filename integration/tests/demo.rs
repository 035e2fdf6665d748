// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `privmem-demo` on the real `/dev/kvm`: it runs, every check in it holds, and it tells
//! the story the README promises.

use std::process::Command;

#[test]
fn demo_runs_and_every_check_holds() {
    // The nested lab runs this test with a demo built for it (PRIVMEM_DEMO_BIN).
    let demo = std::env::var_os("PRIVMEM_DEMO_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_privmem-demo").into());
    let out = Command::new(demo).output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = integration::private_memory_vm(&kvm).expect("a VM for private memory");
    let caps = guest_memfd::Capabilities::of_vm(&vm);
    let usable = caps.in_place_capable() || caps.dual_capable();
    if !usable {
        println!("SKIPPED demo_runs_and_every_check_holds: needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
        // Exit 77 ("skipped"), two lines: what is missing, and the lab's command.
        assert_eq!(out.status.code(), Some(77), "{stderr}");
        assert!(stderr.contains("KVM_CAP_"), "{stderr}");
        assert!(stderr.contains(integration::LAB_DEMO), "{stderr}");
        assert!(stderr.lines().count() <= 2, "{stderr}");
        return;
    }
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let mut expected = vec!["1. An all-private guest"];
    if !stdout.contains("(dual strategy)") {
        // With the dual strategy the demo says why it skips the all-private guest.
        expected.extend([
            "as the host computed",
            "host reads its code at 0x100000: refused",
            "host reads its data at 0x100000000: refused",
        ]);
    }
    for line in expected.into_iter().chain([
        "2. A TDX-style bounce buffer",
        "512 pages, shared) -> 0",
        "512 pages, private) -> 0",
        "the guest checked it: correct",
        "0 of its quadwords are non-zero",
        "host reads the buffer at 0x100200000 now: refused",
        "Every check held",
    ]) {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    assert!(!stdout.contains("CHECK FAILED"), "{stdout}");
}
