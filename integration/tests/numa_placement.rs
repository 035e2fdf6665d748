// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! NUMA placement of guest memory (in-place strategy, Linux 6.19+): the pages a guest
//! touches land on the nodes its region's policy names, as the kernel reports them
//! (`get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)` on the region's mapping, not our own
//! bookkeeping), and again after conversions punched them. Needs two NUMA nodes and a
//! kernel that applies a guest_memfd's policy: the nested lab's 7.x L1 has both; our
//! hosts (one node, 6.18) print SKIPPED with what is missing.

use guest_memfd::{
    node_of_page, numa_policy_support, NodeSet, NumaPolicy, NumaSupport, PageRange, PAGE_SIZE,
};
use integration::{programs, GuestConfig, NoDevice, PrivateGuest, DATA_ADDR};
use vm_private_memory::{Error, MemoryBuilder, PageState, Strategy, UnavailableReason};

const DATA: u64 = 2 << 20;

/// Whether this host can show placement; prints a SKIPPED line naming what it lacks.
fn placement_or_skip(test: &str) -> bool {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let support = numa_policy_support(&vm).unwrap();
    let harness = integration::private_memory_vm(&kvm).unwrap();
    if guest_memfd::Capabilities::of_vm(&harness).dual_capable() {
        println!("SKIPPED {test}: the harness takes the dual strategy here, which has no policy; run it with {}=in-place", integration::STRATEGY_VAR);
        return false;
    }
    if support != NumaSupport::Honoured {
        println!("SKIPPED {test}: needs two NUMA nodes and a guest_memfd that applies its memory policy (Linux 6.19+); here: {support}");
        return false;
    }
    true
}

/// A guest whose data region has `policy`, all private, after it touched every page
/// of the data region; the nodes of those pages, as the kernel says.
fn touched_nodes(guest: &mut PrivateGuest) -> Vec<u32> {
    guest.start(0, &[DATA_ADDR, DATA]).unwrap();
    let done = guest.vcpu(0).run_to_done(&mut NoDevice).unwrap();
    assert_eq!(done.rax, DATA / PAGE_SIZE, "the guest touched every page");
    let slot = guest
        .memory()
        .memslots()
        .unwrap()
        .into_iter()
        .find(|s| s.guest_phys_addr == DATA_ADDR)
        .unwrap();
    (0..DATA / PAGE_SIZE)
        .map(|page| node_of_page((slot.userspace_addr + page * PAGE_SIZE) as usize).unwrap())
        .collect()
}

fn guest_with(policy: NumaPolicy) -> PrivateGuest {
    PrivateGuest::new(
        programs::TOUCH,
        GuestConfig {
            data_size: DATA,
            vcpus: 1,
            all_private: true,
            data_policy: Some(policy),
        },
    )
    .unwrap()
}

#[test]
fn pages_the_guest_touches_land_on_the_nodes_the_policy_names_and_stay_there() {
    if !placement_or_skip(
        "pages_the_guest_touches_land_on_the_nodes_the_policy_names_and_stay_there",
    ) {
        return;
    }
    let pages = (DATA / PAGE_SIZE) as usize;
    for node in [1, 0] {
        for policy in [
            NumaPolicy::Bind(NodeSet::new(&[node]).unwrap()),
            NumaPolicy::Preferred(node),
        ] {
            let mut guest = guest_with(policy);
            assert_eq!(touched_nodes(&mut guest), vec![node; pages], "{policy:?}");
            // Through conversions that punch the pages, both ways: the pages allocated
            // again follow the policy too.
            let data = PageRange::new(DATA_ADDR, DATA).unwrap();
            guest.memory().convert(data, PageState::Shared).unwrap();
            guest.memory().convert(data, PageState::Private).unwrap();
            assert_eq!(
                touched_nodes(&mut guest),
                vec![node; pages],
                "{policy:?} after conversions"
            );
        }
    }
    // Interleaved: page by page over both nodes, half on each.
    let mut guest = guest_with(NumaPolicy::Interleave(NodeSet::new(&[0, 1]).unwrap()));
    let nodes = touched_nodes(&mut guest);
    let on_1 = nodes.iter().filter(|n| **n == 1).count();
    assert_eq!(on_1 * 2, pages, "{nodes:?}");
    assert!(nodes.windows(2).all(|w| w[0] != w[1]), "{nodes:?}");
}

#[test]
fn a_policy_over_the_usable_nodes_builds_and_the_memory_works() {
    let vm = std::sync::Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    if !guest_memfd::Capabilities::of_vm(&*vm).in_place_capable() {
        println!("SKIPPED a_policy_over_the_usable_nodes_builds_and_the_memory_works: needs guest_memfd MMAP | INIT_SHARED");
        return;
    }
    let usable = guest_memfd::usable_nodes().unwrap();
    let memory = MemoryBuilder::new(vm)
        .region_at_with_policy(
            0,
            DATA,
            NumaPolicy::Interleave(NodeSet::new(&usable).unwrap()),
        )
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    let view = memory.memory();
    view.memory()
        .write_obj(0x5eed_u64, GuestAddress(0x3000))
        .unwrap();
    assert_eq!(
        view.memory().read_obj::<u64>(GuestAddress(0x3000)).unwrap(),
        0x5eed
    );
    let host = memory.memslots().unwrap()[0].userspace_addr + 0x3000;
    assert!(usable.contains(&node_of_page(host as usize).unwrap()));
}

#[test]
fn bad_policies_are_refused_before_anything_is_built() {
    let vm = std::sync::Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    let usable = guest_memfd::usable_nodes().unwrap();
    let missing = (0..guest_memfd::MAX_NODES)
        .find(|n| !usable.contains(n))
        .unwrap();
    // A node the host lacks.
    let err = MemoryBuilder::new(vm.clone())
        .region_at_with_policy(0, DATA, NumaPolicy::Preferred(missing))
        .strategy(Strategy::InPlace)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, Error::File(guest_memfd::Error::NoSuchNode { node, .. }) if node == missing),
        "{err}"
    );
    // Empty sets cannot be made.
    assert!(matches!(
        NodeSet::new(&[]),
        Err(guest_memfd::Error::EmptyNodeSet)
    ));
    // The dual strategy has no mapping of its guest_memfd to carry a policy.
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let sw_protected = kvm_bindings::KVM_X86_SW_PROTECTED_VM;
    if let Ok(dual) = kvm.create_vm_with_type(sw_protected.into()) {
        let dual = std::sync::Arc::new(dual);
        if guest_memfd::Capabilities::of_vm(&*dual).dual_capable() {
            let err = MemoryBuilder::new(dual)
                .region_at_with_policy(0, DATA, NumaPolicy::Preferred(0))
                .strategy(Strategy::Dual)
                .build()
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::StrategyUnavailable {
                        reason: UnavailableReason::NumaPolicyNeedsInPlace,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
    // A kernel that ignores the policy is refused by behaviour.
    if let NumaSupport::Ignored { .. } = numa_policy_support(&*vm).unwrap() {
        let err = MemoryBuilder::new(vm)
            .region_at_with_policy(0, DATA, NumaPolicy::Bind(NodeSet::new(&[0]).unwrap()))
            .strategy(Strategy::InPlace)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::NumaPolicyIgnored { .. }), "{err}");
    }
}
