// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What `add_region` accepts: a guest_memfd range no other region uses (whoever binds
//! the memslots), a guest_memfd whose flags fit the strategy, and a place inside the
//! builder's layout (its reserved holes and address limit). Each refusal changes
//! nothing. Real `/dev/kvm` where it has in-place guest_memfd, else the stand-in for it;
//! KVM's attribute call stood in for the dual strategy.

mod common;

use std::sync::Arc;

use common::{pr, vm, RecordingVm};
use guest_memfd::{GuestMemfd, GuestMemfdFlags, VmMemoryOps};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{
    Error, LayoutError, MemoryBuilder, PageState, PrivateMemoryManager, Strategy,
    UnavailableReason, GUEST_PHYS_LIMIT, X86_MMIO_HOLE,
};

const MIB2: u64 = 2 << 20;
const SECRET: &[u8] = b"guest secret";

fn in_place(vm: &Arc<dyn VmMemoryOps>, vmm_binds: bool) -> PrivateMemoryManager {
    let builder = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .x86_mmio_hole()
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .slots(100, 120);
    let builder = if vmm_binds {
        builder.vmm_binds_memslots()
    } else {
        builder
    };
    builder.build().unwrap()
}

/// A region at 16 MiB over the first half of `file`, holding `SECRET` in a private page.
fn region_with_a_secret(memory: &PrivateMemoryManager, file: &GuestMemfd) {
    let first = pr(16 << 20, MIB2);
    memory
        .add_region(first, Some((file.clone(), 0)), PageState::Shared)
        .unwrap();
    memory
        .guest_memory()
        .memory()
        .write_slice(SECRET, GuestAddress(first.start()))
        .unwrap();
    memory
        .convert_with(
            pr(first.start(), 4096),
            PageState::Private,
            vm_private_memory::ContentMode::Preserve,
        )
        .unwrap();
}

fn a_second_region_cannot_reuse_a_file_range_in_use(vmm_binds: bool) {
    let vm = vm();
    let memory = in_place(&vm, vmm_binds);
    let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let file = GuestMemfd::create(&*vm, 2 * MIB2, flags).unwrap();
    region_with_a_secret(&memory, &file);
    let before = memory.regions();

    // The same bytes, and bytes that overlap them in part, at another guest address.
    for offset in [0, MIB2 / 2] {
        let second = pr(64 << 20, MIB2);
        let err = memory
            .add_region(second, Some((file.clone(), offset)), PageState::Shared)
            .expect_err("a file range already backing a region is refused");
        assert!(
            matches!(
                &err,
                Error::Layout {
                    reason: LayoutError::BackingInUse { file_range, claimed },
                    ..
                } if *file_range == pr(offset, MIB2) && *claimed == pr(0, MIB2)
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("[0x4000000, 0x4200000)"), "{text}");
        assert!(text.contains(&format!("{}", pr(offset, MIB2))), "{text}");
        assert_eq!(memory.regions(), before);
        assert_eq!(memory.state_of(second.start()), None);
    }
    // The secret stays out of reach.
    let mut read = [0u8; 12];
    assert!(memory
        .guest_memory()
        .memory()
        .read_slice(&mut read, GuestAddress(16 << 20))
        .is_err());
    // The file's other half is free to use.
    let second = pr(64 << 20, MIB2);
    memory
        .add_region(second, Some((file, MIB2)), PageState::Shared)
        .unwrap();
    memory
        .guest_memory()
        .memory()
        .read_slice(&mut read, GuestAddress(second.start()))
        .unwrap();
    assert_eq!(read, [0u8; 12]);
}

#[test]
fn a_file_range_in_use_is_refused_when_the_vmm_binds_the_memslots() {
    a_second_region_cannot_reuse_a_file_range_in_use(true);
}

#[test]
fn a_file_range_in_use_is_refused_when_the_memory_binds_the_memslots() {
    a_second_region_cannot_reuse_a_file_range_in_use(false);
}

#[test]
fn dual_hotplug_refuses_a_mappable_guest_memfd() {
    let view = RecordingVm::new(vm());
    let memory = MemoryBuilder::new(view.clone())
        .region_at(0, MIB2)
        .strategy(Strategy::Dual)
        .build()
        .unwrap();
    for flags in [
        GuestMemfdFlags::MMAP,
        GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
    ] {
        let file = GuestMemfd::create(&*view, MIB2, flags).unwrap();
        let err = memory
            .add_region(pr(16 << 20, MIB2), Some((file, 0)), PageState::Private)
            .expect_err("KVM would take shared pages from a mappable guest_memfd");
        assert!(
            matches!(
                &err,
                Error::StrategyUnavailable {
                    strategy: Strategy::Dual,
                    reason: UnavailableReason::FlagsOwnedByStrategy { flags: refused },
                } if *refused == flags
            ),
            "{err}"
        );
        assert_eq!(memory.regions(), [pr(0, MIB2)]);
    }
    // A guest_memfd without those flags is taken.
    let file = GuestMemfd::create(&*view, MIB2, GuestMemfdFlags::empty()).unwrap();
    memory
        .add_region(pr(16 << 20, MIB2), Some((file, 0)), PageState::Private)
        .unwrap();
}

#[test]
fn in_place_hotplug_refuses_a_guest_memfd_it_cannot_map() {
    let vm = vm();
    let memory = in_place(&vm, false);
    for (flags, missing) in [
        (
            GuestMemfdFlags::empty(),
            GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
        ),
        (GuestMemfdFlags::MMAP, GuestMemfdFlags::INIT_SHARED),
    ] {
        let file = GuestMemfd::create(&*vm, MIB2, flags).unwrap();
        let err = memory
            .add_region(pr(16 << 20, MIB2), Some((file, 0)), PageState::Shared)
            .expect_err("in place, the host maps the guest_memfd");
        assert!(
            matches!(
                &err,
                Error::StrategyUnavailable {
                    strategy: Strategy::InPlace,
                    reason: UnavailableReason::BackingLacksFlags { flags: lacking },
                } if *lacking == missing
            ),
            "{err}"
        );
        assert_eq!(memory.regions(), [pr(0, MIB2)]);
    }
}

#[test]
fn hotplug_keeps_the_reserved_holes_free() {
    let vm = vm();
    let memory = in_place(&vm, false);
    let hole = pr(X86_MMIO_HOLE.0, X86_MMIO_HOLE.1);
    // Inside the hole, and straddling its start.
    for guest in [
        pr(X86_MMIO_HOLE.0, MIB2),
        pr(X86_MMIO_HOLE.0 - MIB2, 2 * MIB2),
    ] {
        let err = memory
            .add_region(guest, None, PageState::Shared)
            .expect_err("RAM in the MMIO hole");
        assert!(
            matches!(
                &err,
                Error::Layout { reason: LayoutError::OverlapsReserved(r), .. } if *r == hole
            ),
            "{err}"
        );
        assert_eq!(memory.regions(), [pr(0, MIB2)]);
    }
    // Right below it is fine.
    memory
        .add_region(pr(X86_MMIO_HOLE.0 - MIB2, MIB2), None, PageState::Shared)
        .unwrap();
}

#[test]
fn hotplug_stays_inside_the_guest_physical_limit() {
    let vm = vm();
    let memory = in_place(&vm, true);
    for guest in [
        pr(GUEST_PHYS_LIMIT, MIB2),
        pr(GUEST_PHYS_LIMIT - MIB2, 2 * MIB2),
    ] {
        let err = memory
            .add_region(guest, None, PageState::Shared)
            .expect_err("past the limit");
        assert!(
            matches!(
                &err,
                Error::Layout { reason: LayoutError::PastLimit { limit }, .. }
                    if *limit == GUEST_PHYS_LIMIT
            ),
            "{err}"
        );
        assert!(err.to_string().contains("0x1000000000000"), "{err}");
        assert_eq!(memory.regions(), [pr(0, MIB2)]);
    }
}

/// A second memory on the same VM (its memslots bound by the VMM) cannot take a file
/// range the first memory's region holds: the claim lives with the file, not the memory.
/// Once the first memory lets the range go (the region removed), it can.
#[test]
fn a_file_range_held_by_another_memory_is_refused() {
    let vm = vm();
    let first = in_place(&vm, false);
    let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let file = GuestMemfd::create(&*vm, 2 * MIB2, flags).unwrap();
    region_with_a_secret(&first, &file);
    let second = MemoryBuilder::new(vm.clone())
        .region_at(0, MIB2)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .slots(200, 220)
        .vmm_binds_memslots()
        .build()
        .unwrap();
    let err = second
        .add_region(
            pr(64 << 20, MIB2),
            Some((file.clone(), 0)),
            PageState::Shared,
        )
        .expect_err("the first memory's region holds those bytes");
    assert!(
        matches!(
            &err,
            Error::Layout { reason: LayoutError::BackingInUse { claimed, .. }, .. }
                if *claimed == pr(0, MIB2)
        ),
        "{err}"
    );
    assert_eq!(second.regions(), [pr(0, MIB2)]);
    // Removed from the first memory, the range is free (and locked out of old views).
    first.remove_region(16 << 20).unwrap();
    second
        .add_region(pr(64 << 20, MIB2), Some((file, 0)), PageState::Private)
        .unwrap();
}

/// A dropped memory's file ranges stay held while an old view of it keeps a region (it
/// may still read that region's shared pages): another memory takes the range once the
/// view is gone.
#[test]
fn a_dropped_memory_s_file_range_stays_held_while_an_old_view_keeps_it() {
    let vm = vm();
    let first = in_place(&vm, false);
    let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let file = GuestMemfd::create(&*vm, MIB2, flags).unwrap();
    first
        .add_region(
            pr(16 << 20, MIB2),
            Some((file.clone(), 0)),
            PageState::Shared,
        )
        .unwrap();
    let old_view = first.guest_memory().memory();
    drop(first);
    let second = in_place(&vm, false);
    let err = second
        .add_region(
            pr(16 << 20, MIB2),
            Some((file.clone(), 0)),
            PageState::Private,
        )
        .expect_err("an old view still reads the range");
    assert!(
        matches!(
            &err,
            Error::Layout {
                reason: LayoutError::BackingInUse { .. },
                ..
            }
        ),
        "{err}"
    );
    drop(old_view);
    second
        .add_region(pr(16 << 20, MIB2), Some((file, 0)), PageState::Private)
        .unwrap();
}
