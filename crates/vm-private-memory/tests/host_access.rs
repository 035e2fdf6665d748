// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Every host access path of the vm-memory view refuses private pages, on the real
//! `/dev/kvm`: each path is tried on a private page, a shared page and a range that
//! straddles both.

mod common;

use std::sync::atomic::Ordering;

use common::{in_place, in_place_or_skip, pr};
use guest_memfd::PAGE_SIZE;
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryBackend, GuestMemoryError,
    GuestMemoryRegion, MemoryRegionAddress, Permissions,
};
use vm_private_memory::{private_page_refusal, PageState, PrivateMemoryManager};

const SIZE: u64 = 4 << 20;
/// Page 0 shared, page 1 private, pages 2.. shared up to 2 MiB, the rest private.
fn memory() -> PrivateMemoryManager {
    let m = in_place(SIZE, PageState::Private);
    m.convert(pr(0, 2 << 20), PageState::Shared).unwrap();
    m.convert(pr(PAGE_SIZE, PAGE_SIZE), PageState::Private)
        .unwrap();
    m
}

const SHARED: u64 = 0;
const PRIVATE: u64 = PAGE_SIZE;
/// 8 bytes starting 4 bytes before the end of the shared page 0, ending in private page 1.
const STRADDLE: u64 = PAGE_SIZE - 4;

fn assert_refused<T: std::fmt::Debug>(result: Result<T, GuestMemoryError>, page: u64, what: &str) {
    match result {
        Err(e) => {
            let (_, first_private) =
                private_page_refusal(&e).unwrap_or_else(|| panic!("{what}: not a refusal: {e}"));
            assert_eq!(first_private, page, "{what}");
        }
        Ok(v) => panic!("{what}: private memory was accessible: {v:?}"),
    }
}

#[test]
fn bytes_methods_refuse_private_pages_and_serve_shared_ones() {
    if !in_place_or_skip("bytes_methods_refuse_private_pages_and_serve_shared_ones") {
        return;
    }
    let m = memory();
    let mem = m.guest_memory().memory();
    let mut buf = [0u8; 8];
    for (addr, ok) in [(SHARED, true), (PRIVATE, false), (STRADDLE, false)] {
        let a = GuestAddress(addr);
        let check = |r: Result<(), GuestMemoryError>, what: &str| {
            if ok {
                r.unwrap_or_else(|e| panic!("{what} at {addr:#x}: {e}"));
            } else {
                assert_refused(r, PRIVATE, &format!("{what} at {addr:#x}"));
            }
        };
        check(mem.write_slice(&[1; 8], a), "write_slice");
        check(mem.read_slice(&mut buf, a), "read_slice");
        check(mem.write(&[1; 8], a).map(|_| ()), "write");
        check(mem.read(&mut buf, a).map(|_| ()), "read");
        check(mem.write_obj(7u64, a), "write_obj");
        check(mem.read_obj::<u64>(a).map(|_| ()), "read_obj");
        check(mem.store(9u64, a, Ordering::SeqCst), "store");
        check(mem.load::<u64>(a, Ordering::SeqCst).map(|_| ()), "load");
        let mut sink = Vec::new();
        check(
            mem.write_volatile_to(a, &mut sink, 8).map(|_| ()),
            "write_volatile_to",
        );
        check(
            mem.write_all_volatile_to(a, &mut sink, 8),
            "write_all_volatile_to",
        );
        let mut src: &[u8] = &[3; 8];
        check(
            mem.read_volatile_from(a, &mut src, 8).map(|_| ()),
            "read_volatile_from",
        );
        let mut src: &[u8] = &[3; 8];
        check(
            mem.read_exact_volatile_from(a, &mut src, 8),
            "read_exact_volatile_from",
        );
    }
}

#[test]
fn a_refused_write_changes_nothing() {
    if !in_place_or_skip("a_refused_write_changes_nothing") {
        return;
    }
    let m = memory();
    let mem = m.guest_memory().memory();
    mem.write_slice(&[0x11; 4], GuestAddress(STRADDLE)).unwrap();
    // The straddling write is refused as a whole: its shared half is not written either.
    assert!(mem.write_slice(&[0xee; 8], GuestAddress(STRADDLE)).is_err());
    let mut back = [0u8; 4];
    mem.read_slice(&mut back, GuestAddress(STRADDLE)).unwrap();
    assert_eq!(back, [0x11; 4]);
}

#[test]
fn slices_and_host_addresses_are_refused_for_private_pages() {
    if !in_place_or_skip("slices_and_host_addresses_are_refused_for_private_pages") {
        return;
    }
    let m = memory();
    let mem = m.guest_memory().memory();
    assert!(mem.get_slice(GuestAddress(SHARED), 8).is_ok());
    assert_refused(
        mem.get_slice(GuestAddress(PRIVATE), 8).map(|_| ()),
        PRIVATE,
        "get_slice",
    );
    assert_refused(
        mem.get_slice(GuestAddress(STRADDLE), 8).map(|_| ()),
        PRIVATE,
        "get_slice straddle",
    );
    // A host address is a licence to the whole region: refused while any page is
    // private, even for a shared page.
    for addr in [SHARED, PRIVATE] {
        assert_refused(
            mem.get_host_address(GuestAddress(addr)),
            PRIVATE,
            "get_host_address",
        );
    }

    let region = mem.find_region(GuestAddress(0)).unwrap();
    assert!(region.get_slice(MemoryRegionAddress(0), 16).is_ok());
    assert_refused(
        region
            .get_slice(MemoryRegionAddress(PRIVATE), 1)
            .map(|_| ()),
        PRIVATE,
        "region get_slice",
    );
    // The whole-region slice touches private pages.
    assert!(region.as_volatile_slice().is_err());
    assert_refused(
        region.get_host_address(MemoryRegionAddress(PRIVATE + 5)),
        PRIVATE,
        "region host address",
    );
    // Region-level Bytes checks exactly the bytes it touches.
    region.write_obj(5u32, MemoryRegionAddress(8)).unwrap();
    assert_refused(
        region.read_obj::<u32>(MemoryRegionAddress(PRIVATE)),
        PRIVATE,
        "region read_obj",
    );
    // Regions do not hand out the guest_memfd for others to map.
    assert!(region.file_offset().is_none());
}

#[test]
fn get_slices_refuses_for_every_permission() {
    if !in_place_or_skip("get_slices_refuses_for_every_permission") {
        return;
    }
    let m = memory();
    let mem = m.guest_memory().memory();
    for access in [
        Permissions::No,
        Permissions::Read,
        Permissions::Write,
        Permissions::ReadWrite,
    ] {
        let ok: Vec<_> = GuestMemory::get_slices(&*mem, GuestAddress(SHARED), 64, access)
            .unwrap()
            .collect();
        assert!(ok.iter().all(Result::is_ok), "{access:?}");
        let refused = GuestMemory::get_slices(&*mem, GuestAddress(STRADDLE), 8, access)
            .unwrap()
            .stop_on_error();
        assert!(refused.is_err(), "{access:?}");
        // check_range answers whether the whole range could be accessed.
        assert!(GuestMemory::check_range(
            &*mem,
            GuestAddress(0),
            PAGE_SIZE as usize,
            access
        ));
        assert!(!GuestMemory::check_range(
            &*mem,
            GuestAddress(0),
            SIZE as usize,
            access
        ));
    }
}

#[test]
fn accesses_spanning_two_regions_are_checked_in_each() {
    if !in_place_or_skip("accesses_spanning_two_regions_are_checked_in_each") {
        return;
    }
    let m = vm_private_memory::MemoryBuilder::new(common::vm())
        .region_at(0, 2 << 20)
        .region_at(2 << 20, 2 << 20)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let mem = m.guest_memory().memory();
    let boundary = GuestAddress((2 << 20) - 4);
    mem.write_obj(0x1122_3344_5566_7788u64, boundary).unwrap();
    assert_eq!(
        mem.read_obj::<u64>(boundary).unwrap(),
        0x1122_3344_5566_7788
    );
    m.convert(pr(2 << 20, PAGE_SIZE), PageState::Private)
        .unwrap();
    // vm-memory walks such an access region by region (`get_slices`), and its
    // `stop_on_error` only looks at the first slice: the refusal in the second region
    // surfaces as a short access. The private page is never touched.
    let err = mem.read_obj::<u64>(boundary).unwrap_err();
    assert!(
        matches!(
            err,
            GuestMemoryError::PartialBuffer {
                expected: 8,
                completed: 4
            }
        ),
        "{err}"
    );
    assert_refused(
        mem.read_obj::<u32>(GuestAddress(2 << 20)),
        2 << 20,
        "second region",
    );
    assert_refused(
        mem.get_slice(GuestAddress(2 << 20), 4).map(|_| ()),
        2 << 20,
        "get_slice",
    );
}

#[test]
fn guest_memory_atomic_sees_conversions_without_reloading() {
    if !in_place_or_skip("guest_memory_atomic_sees_conversions_without_reloading") {
        return;
    }
    let m = in_place(2 << 20, PageState::Shared);
    let atomic = m.guest_memory();
    let guard = atomic.memory();
    guard.write_obj(1u8, GuestAddress(0)).unwrap();
    m.convert(pr(0, PAGE_SIZE), PageState::Private).unwrap();
    // The same snapshot refuses at once: the bits are shared, not copied.
    assert!(guard.read_obj::<u8>(GuestAddress(0)).is_err());
    assert!(atomic.memory().read_obj::<u8>(GuestAddress(0)).is_err());
}

#[test]
fn linux_loader_writes_the_command_line_and_boot_params_into_shared_pages_only() {
    use linux_loader::cmdline::Cmdline;
    use linux_loader::configurator::linux::LinuxBootConfigurator;
    use linux_loader::configurator::{BootConfigurator, BootParams};
    use linux_loader::loader::bootparam::boot_params;
    use linux_loader::loader::load_cmdline;

    if !in_place_or_skip(
        "linux_loader_writes_the_command_line_and_boot_params_into_shared_pages_only",
    ) {
        return;
    }
    let m = memory();
    let mem = m.guest_memory().memory();
    let mut cmdline = Cmdline::new(256).unwrap();
    cmdline.insert_str("console=ttyS0 quiet").unwrap();
    load_cmdline(&*mem, GuestAddress(0x2000), &cmdline).unwrap();
    let mut back = [0u8; 19];
    mem.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
    assert_eq!(&back, b"console=ttyS0 quiet");
    assert!(load_cmdline(&*mem, GuestAddress(PRIVATE), &cmdline).is_err());

    let params = BootParams::new(&boot_params::default(), GuestAddress(0x7000));
    LinuxBootConfigurator::write_bootparams(&params, &*mem).unwrap();
    let private_params = BootParams::new(&boot_params::default(), GuestAddress(PRIVATE));
    assert!(LinuxBootConfigurator::write_bootparams(&private_params, &*mem).is_err());
}

/// The owner learns where a page lives without a raw address (`node_of`): nothing for a
/// page never touched, a node once written; an address outside guest memory is named.
#[test]
fn node_of_tells_placement_without_a_raw_address() {
    let memory = common::in_place(2 << 20, PageState::Shared);
    match memory.node_of(0x3000) {
        Ok(node) => assert_eq!(node, None, "never touched"),
        // A kernel without NUMA.
        Err(e) => {
            assert_eq!(e.errno(), Some(libc::ENOSYS), "{e}");
            return;
        }
    }
    memory
        .guest_memory()
        .memory()
        .write_obj(1u64, GuestAddress(0x3000))
        .unwrap();
    assert!(memory.node_of(0x3008).unwrap().is_some(), "written");
    // In place, a private page is reported too (nothing read, nothing allocated).
    memory
        .convert_with(
            pr(0x3000, PAGE_SIZE),
            PageState::Private,
            vm_private_memory::ContentMode::Preserve,
        )
        .unwrap();
    assert!(
        memory.node_of(0x3000).unwrap().is_some(),
        "private, resident"
    );
    memory
        .convert(pr(0x5000, PAGE_SIZE), PageState::Private)
        .unwrap();
    assert_eq!(
        memory.node_of(0x5000).unwrap(),
        None,
        "private, never touched"
    );
    assert!(matches!(
        memory.node_of(4 << 20),
        Err(vm_private_memory::Error::OutsideGuestMemory { first_outside, .. }) if first_outside == 4 << 20
    ));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// An access is served exactly when every page it touches is shared, whatever the
    /// region holds: no private page (the count answers), an access within one 64-page
    /// word of the map (checked inline) or across words (checked out of line).
    #[test]
    fn an_access_is_served_exactly_when_all_its_pages_are_shared(
        private in proptest::collection::vec((0u64..256, 1u64..80), 0..4),
        accesses in proptest::collection::vec((0u64..(256 * PAGE_SIZE), 1usize..(3 * PAGE_SIZE as usize)), 1..24),
    ) {
        let m = in_place(256 * PAGE_SIZE, PageState::Shared);
        let mut model = [false; 256];
        for (first, count) in private {
            let count = count.min(256 - first);
            m.convert(pr(first * PAGE_SIZE, count * PAGE_SIZE), PageState::Private).unwrap();
            model[first as usize..(first + count) as usize].fill(true);
        }
        let view = m.guest_memory();
        let mem = view.memory();
        for (start, len) in accesses {
            let len = len.min((256 * PAGE_SIZE - start) as usize);
            let pages = start / PAGE_SIZE..=(start + len as u64 - 1) / PAGE_SIZE;
            let first_private = pages.clone().find(|&p| model[p as usize]);
            let mut buf = vec![0u8; len];
            let read = mem.read_slice(&mut buf, GuestAddress(start));
            let write = mem.write_slice(&buf, GuestAddress(start));
            match first_private {
                None => {
                    proptest::prop_assert!(read.is_ok(), "read {start:#x}+{len:#x}: {read:?}");
                    proptest::prop_assert!(write.is_ok(), "write {start:#x}+{len:#x}: {write:?}");
                }
                Some(page) => {
                    for result in [read, write] {
                        let refused = result.as_ref().err().and_then(private_page_refusal);
                        proptest::prop_assert_eq!(refused.map(|r| r.1), Some(page * PAGE_SIZE));
                    }
                }
            }
        }
    }
}
