// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `PRIVMEM_STRATEGY` takes only what the harness knows: a misspelt value is an error,
//! not a silent run of the other strategy's pass. A binary of its own, since it sets the
//! process's environment.

use integration::{private_memory_vm, Error, STRATEGY_VAR};

#[test]
fn an_unknown_strategy_in_the_environment_is_refused() {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    for bad in ["inplace", "dual", ""] {
        // This binary's only test: no other thread reads the environment.
        std::env::set_var(STRATEGY_VAR, bad);
        let err = private_memory_vm(&kvm).unwrap_err();
        assert!(
            matches!(&err, Error::BadStrategyVar(v) if v == bad),
            "{err}"
        );
        assert!(err.to_string().contains("in-place"), "{err}");
    }
    std::env::set_var(STRATEGY_VAR, "in-place");
    let vm = private_memory_vm(&kvm).unwrap();
    assert!(
        !guest_memfd::Capabilities::of_vm(&vm).dual_capable(),
        "in place: the default VM type"
    );
    std::env::remove_var(STRATEGY_VAR);
    private_memory_vm(&kvm).unwrap();
}
