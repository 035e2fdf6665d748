// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! NUMA placement of guest memory (in-place strategy, Linux 6.19+): the pages a guest
//! touches land on the nodes its region's policy names, as the kernel reports them
//! (`get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)` on the region's mapping, not our own
//! bookkeeping), and again after conversions punched them. Needs two NUMA nodes and a
//! kernel that applies a guest_memfd's policy: the nested lab's 7.x L1 has both; our
//! hosts (one node, 6.18) print SKIPPED with what is missing.

use std::os::fd::AsRawFd;

use guest_memfd::{
    numa_policy_support, Capabilities, GuestMemfd, GuestMemfdFlags, Memslot, NodeSet, NumaPolicy,
    NumaSupport, PageRange, PAGE_SIZE,
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
    (0..DATA / PAGE_SIZE)
        .map(|page| {
            guest
                .memory()
                .node_of(DATA_ADDR + page * PAGE_SIZE)
                .unwrap()
                .unwrap_or_else(|| panic!("page {page} is not allocated"))
        })
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
    // Two nodes this process may use (placement_or_skip found them).
    let usable = guest_memfd::usable_nodes().unwrap();
    let (first, second) = (usable[0], usable[1]);
    for node in [second, first] {
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
    let both = NodeSet::new(&[first, second]).unwrap();
    let mut guest = guest_with(NumaPolicy::Interleave(both));
    let nodes = touched_nodes(&mut guest);
    let on_second = nodes.iter().filter(|n| **n == second).count();
    assert_eq!(on_second * 2, pages, "{nodes:?}");
    assert!(
        nodes.iter().all(|n| *n == first || *n == second),
        "{nodes:?}"
    );
    assert!(nodes.windows(2).all(|w| w[0] != w[1]), "{nodes:?}");
}

#[test]
fn a_policy_over_the_usable_nodes_builds_and_the_memory_works() {
    let vm = std::sync::Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    if !guest_memfd::Capabilities::of_vm(&*vm).in_place_capable() {
        println!("SKIPPED a_policy_over_the_usable_nodes_builds_and_the_memory_works: needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
        return;
    }
    // Bound to the last usable node: with two, one the host would not pick by itself.
    let usable = guest_memfd::usable_nodes().unwrap();
    let node = *usable.last().unwrap();
    let honoured = numa_policy_support(&*vm).unwrap() == NumaSupport::Honoured;
    let memory = MemoryBuilder::new(vm)
        .region_at_with_policy(0, DATA, NumaPolicy::Bind(NodeSet::new(&[node]).unwrap()))
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    let view = memory.guest_memory();
    // Nothing allocated yet, and asking allocates nothing.
    assert_eq!(memory.node_of(0x3000).unwrap(), None);
    assert_eq!(memory.node_of(0x3000).unwrap(), None);
    // The host touches first: the page follows the policy all the same.
    view.memory()
        .write_obj(0x5eed_u64, GuestAddress(0x3000))
        .unwrap();
    assert_eq!(
        view.memory().read_obj::<u64>(GuestAddress(0x3000)).unwrap(),
        0x5eed
    );
    let landed = memory.node_of(0x3000).unwrap().expect("written");
    if honoured {
        assert_eq!(landed, node);
    } else {
        assert!(usable.contains(&landed), "{landed} of {usable:?}");
    }
    // A conversion punches the page: it is gone, and asking does not bring it back.
    let page = PageRange::new(0x3000, PAGE_SIZE).unwrap();
    memory.convert(page, PageState::Private).unwrap();
    memory.convert(page, PageState::Shared).unwrap();
    assert_eq!(memory.node_of(0x3000).unwrap(), None);
    assert_eq!(
        view.memory().read_obj::<u64>(GuestAddress(0x3000)).unwrap(),
        0
    );
}

#[test]
fn bad_policies_are_refused_before_anything_is_built() {
    // Real KVM where it has in-place guest_memfd, else the stand-in for it.
    let vm = guest_memfd::stand_in::vm_for_logic_tests();
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
    // Nothing of it was left in the VM: the same range builds without a policy.
    let plain = MemoryBuilder::new(vm.clone())
        .region_at(0, DATA)
        .strategy(Strategy::InPlace)
        .build()
        .expect("the refused build left nothing behind");
    drop(plain);
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

/// What a NUMA policy could cover with the dual strategy, measured: a private-capable
/// VM (`KVM_X86_SW_PROTECTED_VM`) may create a mappable guest_memfd (`MMAP`, never
/// `INIT_SHARED`), and `mbind` on its mapping takes a policy; but a memslot bound to it
/// is "guest_memfd only": KVM takes the slot's *shared* pages from the guest_memfd too,
/// not from `userspace_addr`. A guest writes a shared page and reads its byte back; the
/// byte is not in the shared side the slot names. So a dual region cannot carry its
/// policy this way without losing its shared side, and the builder refuses a policy
/// there ([`UnavailableReason::NumaPolicyNeedsInPlace`]).
#[test]
fn a_mappable_guest_memfd_on_a_private_capable_vm_takes_its_shared_pages_too() {
    let test = "a_mappable_guest_memfd_on_a_private_capable_vm_takes_its_shared_pages_too";
    // The memory the slots name comes first, so that it is unmapped after the VM (and
    // its vCPU, its slots) are gone: locals drop in reverse order.
    // Code in an ordinary slot at 0; the guest_memfd's slot at WINDOW_GPA, its
    // userspace_addr a separate anonymous mapping: the would-be shared side.
    let code = RawMapping::new(CODE_SIZE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
    code.write(CODE_GPA as usize, &WRITE_READ_REPORT);
    let shared_side = RawMapping::new(WINDOW as usize, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1);
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let Ok(vm) = kvm.create_vm_with_type(kvm_bindings::KVM_X86_SW_PROTECTED_VM.into()) else {
        println!("SKIPPED {test}: needs KVM_X86_SW_PROTECTED_VM (the nested lab's L1 has it)");
        return;
    };
    let offered = Capabilities::of_vm(&vm).guest_memfd_flags;
    if !offered.contains(GuestMemfdFlags::MMAP) {
        println!("SKIPPED {test}: this kernel offers no mappable guest_memfd (GUEST_MEMFD_FLAG_MMAP in KVM_CAP_GUEST_MEMFD_FLAGS (244), Linux 6.18+); it offers {offered}");
        return;
    }
    // INIT_SHARED is for VMs without private memory.
    assert!(!offered.contains(GuestMemfdFlags::INIT_SHARED), "{offered}");
    let err = GuestMemfd::create(
        &vm,
        WINDOW,
        GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
    )
    .expect_err("INIT_SHARED on a private-capable VM");
    assert!(
        matches!(err, guest_memfd::Error::UnsupportedFlags { .. }),
        "{err}"
    );

    let gmem = GuestMemfd::create(&vm, WINDOW, GuestMemfdFlags::MMAP).unwrap();
    // Its mapping takes a policy (over a node this process may use), and the
    // guest_memfd keeps it.
    let gmem_map = RawMapping::new(WINDOW as usize, libc::MAP_SHARED, gmem.file().as_raw_fd());
    let node = guest_memfd::usable_nodes().unwrap()[0];
    let mask: u64 = 1 << node;
    // SAFETY: mbind only changes the policy of pages in the range, which is our live
    // mapping of the guest_memfd; it reads 64 node bits from `mask`, a live u64.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            gmem_map.addr,
            WINDOW as libc::c_ulong,
            libc::MPOL_BIND as libc::c_ulong,
            &mask as *const u64,
            65 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    assert_eq!(rc, 0, "mbind: {}", std::io::Error::last_os_error());
    // Read back through a second, fresh mapping, which has no policy of its own: only
    // the file's (guest_memfd's get_policy) can answer.
    let fresh = RawMapping::new(WINDOW as usize, libc::MAP_SHARED, gmem.file().as_raw_fd());
    let (mut mode, mut read_mask): (libc::c_int, u64) = (-1, 0);
    // SAFETY: get_mempolicy writes one int to `mode` and 64 node bits to `read_mask`,
    // both live; with MPOL_F_ADDR alone it reads the mapping's policy and faults nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut libc::c_int,
            &mut read_mask as *mut u64,
            65 as libc::c_ulong,
            fresh.addr,
            MPOL_F_ADDR,
        )
    };
    assert_eq!(rc, 0, "get_mempolicy: {}", std::io::Error::last_os_error());
    assert_eq!(
        (mode, read_mask),
        (libc::MPOL_BIND, mask),
        "the guest_memfd's policy, read back through another mapping"
    );

    let code_slot = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: CODE_SIZE as u64,
        userspace_addr: code.addr as u64,
    };
    // SAFETY: `code` is our anonymous mapping, used for nothing but this VM's memory,
    // and stays mapped until after the VM is closed (declared before it).
    unsafe { vm.set_user_memory_region(code_slot) }.unwrap();
    let window = Memslot::new(1, PageRange::new(WINDOW_GPA, WINDOW).unwrap(), &gmem, 0)
        .unwrap()
        .with_userspace_addr(shared_side.addr as u64)
        .unwrap();
    // SAFETY: as above, for `shared_side`.
    unsafe { window.bind(&vm) }.unwrap();

    let mut vcpu = vm.create_vcpu(0).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    (sregs.cs.base, sregs.cs.selector) = (0, 0);
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_bindings::kvm_regs {
        rip: CODE_GPA,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
    let read_back = match vcpu.run().unwrap() {
        kvm_ioctls::VcpuExit::IoOut(REPORT_PORT, data) => data[0],
        other => panic!("the guest should report on port {REPORT_PORT:#x}, not {other:?}"),
    };
    // The page is shared (no attributes set): the guest read back its own byte...
    assert_eq!(read_back, MARK, "the guest reads what it wrote");
    // ...which is not in the shared side: it went to the guest_memfd.
    assert_eq!(
        shared_side.read(0),
        0,
        "the slot's userspace_addr was bypassed"
    );
    println!("MMAP-ON-PRIVATE-VM flags_offered={offered} policy=bind:{node} guest_read_back={read_back:#x} shared_side_byte={:#x}", shared_side.read(0));
}

/// `get_mempolicy`'s flag: the policy of the mapping at `addr`.
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;

/// Where the code goes, and the window the guest writes through (real mode reaches the
/// first MiB: the window's segment is WINDOW_GPA / 16).
const CODE_GPA: u64 = 0x1000;
const CODE_SIZE: usize = 0x2_0000;
const WINDOW_GPA: u64 = 0x2_0000;
const WINDOW: u64 = 0x1_0000;
const MARK: u8 = 0x5a;
const REPORT_PORT: u16 = 0x10;
/// mov ax, 0x2000; mov ds, ax; mov byte [0], MARK; mov al, [0]; out REPORT_PORT, al; hlt
const WRITE_READ_REPORT: [u8; 16] = [
    0xb8,
    0x00,
    0x20,
    0x8e,
    0xd8,
    0xc6,
    0x06,
    0x00,
    0x00,
    MARK,
    0xa0,
    0x00,
    0x00,
    0xe6,
    REPORT_PORT as u8,
    0xf4,
];

/// A raw mapping, unmapped on drop (the test needs one of a guest_memfd without
/// `INIT_SHARED`, which `GuestMemfd::map` rightly refuses).
struct RawMapping {
    addr: *mut u8,
    len: usize,
}

impl RawMapping {
    fn new(len: usize, flags: i32, fd: i32) -> Self {
        // SAFETY: a fresh mapping chosen by the kernel; nothing else is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        RawMapping {
            addr: addr.cast(),
            len,
        }
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: in bounds of our anonymous mapping, checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.addr.add(offset), bytes.len())
        };
    }

    fn read(&self, offset: usize) -> u8 {
        assert!(offset < self.len);
        // SAFETY: in bounds of our anonymous mapping; volatile, as the guest wrote it.
        unsafe { self.addr.add(offset).read_volatile() }
    }
}

impl Drop for RawMapping {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

/// Hotplug with a policy: a region added with `add_region_with_policy` lands on its
/// node when the host touches it, and the policy belongs to its guest_memfd file: taken
/// out and added again elsewhere without a policy, the file's new pages follow it still.
#[test]
fn a_hotplugged_region_lands_on_its_node_and_its_file_keeps_the_policy() {
    if !placement_or_skip("a_hotplugged_region_lands_on_its_node_and_its_file_keeps_the_policy") {
        return;
    }
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
    let vm = std::sync::Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    let memory = MemoryBuilder::new(vm)
        .region_at(0, DATA)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let node = guest_memfd::usable_nodes().unwrap()[1];
    let added = PageRange::new(DATA, DATA).unwrap();
    let policy = NumaPolicy::Bind(NodeSet::new(&[node]).unwrap());
    memory
        .add_region_with_policy(added, None, policy, PageState::Shared)
        .unwrap();
    let nodes_of = |range: PageRange, pages: std::ops::Range<u64>| -> Vec<u32> {
        let view = memory.guest_memory();
        for page in pages.clone() {
            view.memory()
                .write_obj(0xfeed_u64, GuestAddress(range.start() + page * PAGE_SIZE))
                .unwrap();
        }
        pages
            .map(|page| {
                memory
                    .node_of(range.start() + page * PAGE_SIZE)
                    .unwrap()
                    .expect("written")
            })
            .collect()
    };
    assert_eq!(nodes_of(added, 0..8), vec![node; 8]);
    // The same file, elsewhere, without a policy: its untouched pages still follow it.
    let (_, file, offset) = memory.remove_region(added.start()).unwrap();
    let again = PageRange::new(2 * DATA, DATA).unwrap();
    memory
        .add_region(again, Some((file, offset)), PageState::Shared)
        .unwrap();
    assert_eq!(nodes_of(again, 8..16), vec![node; 8]);
}

#[test]
fn a_hotplug_with_a_bad_policy_is_refused_and_adds_nothing() {
    let vm = std::sync::Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    if !guest_memfd::Capabilities::of_vm(&*vm).in_place_capable() {
        println!("SKIPPED a_hotplug_with_a_bad_policy_is_refused_and_adds_nothing: needs guest_memfd MMAP | INIT_SHARED (KVM_CAP_GUEST_MEMFD_FLAGS (244))");
        return;
    }
    let memory = MemoryBuilder::new(vm)
        .region_at(0, DATA)
        .strategy(Strategy::InPlace)
        .build()
        .unwrap();
    let usable = guest_memfd::usable_nodes().unwrap();
    let missing = (0..guest_memfd::MAX_NODES)
        .find(|n| !usable.contains(n))
        .unwrap();
    let added = PageRange::new(DATA, DATA).unwrap();
    let err = memory
        .add_region_with_policy(
            added,
            None,
            NumaPolicy::Preferred(missing),
            PageState::Shared,
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::File(guest_memfd::Error::NoSuchNode { node, .. }) if node == missing),
        "{err}"
    );
    assert_eq!(memory.regions().len(), 1);
    // Over the usable nodes it is added (and where one node is usable, no policy is set).
    let usable_policy = NumaPolicy::Interleave(NodeSet::new(&usable).unwrap());
    memory
        .add_region_with_policy(added, None, usable_policy, PageState::Shared)
        .expect("the refused addition left nothing behind");
    assert_eq!(memory.regions().len(), 2);
}
