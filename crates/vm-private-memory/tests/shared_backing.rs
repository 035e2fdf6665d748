// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A region whose shared pages live in the VMM's own file (`region_at_with_shared`):
//! reads, writes, punches and device code's file all land at the region's offset in it,
//! and bad backings are refused before anything is bound. Real memslots and files on
//! `/dev/kvm`; KVM's attribute call stood in for the dual strategy.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

use common::{gpa_is_free, pr, vm, RecordingVm};
use guest_memfd::{SealedMemfd, SharedBacking, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{Error, MemoryBuilder, PageState, Strategy, UnavailableReason};

const MIB2: u64 = 2 << 20;

/// The VMM's memory zone: a memfd of `size` bytes (a file the VMM made itself).
fn vmm_zone(size: u64) -> File {
    SealedMemfd::create("vmm-zone", size)
        .unwrap()
        .file()
        .try_clone()
        .unwrap()
}

fn backing(file: &File) -> SharedBacking {
    SharedBacking::from_file(file.try_clone().unwrap()).unwrap()
}

#[test]
fn a_region_s_shared_pages_live_in_the_vmm_s_file_at_its_offset() {
    let zone = vmm_zone(4 * MIB2);
    // Bytes of the file outside the region's range are the VMM's, and stay.
    zone.write_all_at(b"vmm data", 0).unwrap();
    zone.write_all_at(b"old bytes", MIB2 + PAGE_SIZE).unwrap();
    let m = MemoryBuilder::new(RecordingVm::new(vm()))
        .region_at_with_shared(0, MIB2, backing(&zone), MIB2)
        .strategy(Strategy::Dual)
        .initial_state(PageState::Private)
        .build()
        .unwrap();
    let mut buf = [0u8; 9];
    zone.read_exact_at(&mut buf, MIB2 + PAGE_SIZE).unwrap();
    assert_eq!(
        buf, [0; 9],
        "the private pages' shared side was punched at build"
    );

    m.convert(pr(0, 4 * PAGE_SIZE), PageState::Shared).unwrap();
    m.guest_memory()
        .memory()
        .write_slice(b"guest bytes", GuestAddress(PAGE_SIZE))
        .unwrap();
    let mut buf = [0u8; 11];
    zone.read_exact_at(&mut buf, MIB2 + PAGE_SIZE).unwrap();
    assert_eq!(&buf, b"guest bytes");
    assert_eq!(m.backing(0).unwrap().shared_bytes_held, Some(PAGE_SIZE));

    // Device code gets the VMM's file, at the run's offset in it.
    let pages = m.shared_pages();
    let snapshot = pages.snapshot();
    let run = snapshot.runs(pr(0, MIB2)).next().unwrap();
    let file = run.file().unwrap();
    let given = File::from(file.fd.try_clone_to_owned().unwrap());
    assert_eq!(
        given.metadata().unwrap().ino(),
        zone.metadata().unwrap().ino()
    );
    assert_eq!(file.offset, MIB2);

    // Going private punches the file there, and only there.
    m.convert(pr(0, 4 * PAGE_SIZE), PageState::Private).unwrap();
    zone.read_exact_at(&mut buf, MIB2 + PAGE_SIZE).unwrap();
    assert_eq!(buf, [0; 11]);
    assert_eq!(m.backing(0).unwrap().shared_bytes_held, Some(0));
    let mut mine = [0u8; 8];
    zone.read_exact_at(&mut mine, 0).unwrap();
    assert_eq!(&mine, b"vmm data");
}

#[test]
fn two_regions_share_a_file_at_ranges_that_do_not_overlap() {
    let zone = vmm_zone(4 * MIB2);
    let m = MemoryBuilder::new(RecordingVm::new(vm()))
        .region_at_with_shared(0, MIB2, backing(&zone), 0)
        .region_at_with_shared(4 * MIB2, MIB2, backing(&zone), MIB2)
        .strategy(Strategy::Dual)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let view = m.guest_memory();
    view.memory().write_obj(1u64, GuestAddress(0)).unwrap();
    view.memory()
        .write_obj(2u64, GuestAddress(4 * MIB2))
        .unwrap();
    let mut word = [0u8; 8];
    zone.read_exact_at(&mut word, MIB2).unwrap();
    assert_eq!(u64::from_ne_bytes(word), 2);
    zone.read_exact_at(&mut word, 0).unwrap();
    assert_eq!(u64::from_ne_bytes(word), 1);
}

#[test]
fn bad_shared_backings_are_refused_before_anything_is_bound() {
    let zone = vmm_zone(2 * MIB2);
    let vm = vm();
    let dual = || MemoryBuilder::new(RecordingVm::new(vm.clone())).strategy(Strategy::Dual);

    // Past the file's end.
    let err = dual()
        .region_at_with_shared(0, MIB2, backing(&zone), 2 * MIB2 - PAGE_SIZE)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, Error::File(guest_memfd::Error::OutOfBounds { .. })),
        "{err}"
    );
    // Two regions over the same pages of one file.
    let err = dual()
        .region_at_with_shared(0, MIB2, backing(&zone), 0)
        .region_at_with_shared(4 * MIB2, MIB2, backing(&zone), MIB2 - PAGE_SIZE)
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::SharedBackingOverlap { .. }), "{err}");
    // An unaligned offset.
    assert!(dual()
        .region_at_with_shared(0, MIB2, backing(&zone), 100)
        .build()
        .is_err());
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
    assert!(gpa_is_free(&vm, pr(4 * MIB2, MIB2)));

    // The in-place strategy has no shared side.
    if common::in_place_or_skip("bad_shared_backings_in_place") {
        let err = MemoryBuilder::new(vm.clone())
            .region_at_with_shared(0, MIB2, backing(&zone), 0)
            .strategy(Strategy::InPlace)
            .build()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::StrategyUnavailable {
                    reason: UnavailableReason::SharedBackingNeedsDual,
                    ..
                }
            ),
            "{err}"
        );
    }
    // A file whose size is not whole pages cannot be a backing.
    assert!(matches!(
        SharedBacking::from_file_unsealed(memfd_of_size(PAGE_SIZE + 1, false)),
        Err(guest_memfd::Error::InvalidSize { .. })
    ));
}

#[test]
fn a_shared_backing_is_sealed_against_changing_size_or_taken_unsealed_knowingly() {
    // A memfd that allows sealing is sealed: device code given it cannot shrink it.
    let file = memfd_of_size(MIB2, true);
    let backing = SharedBacking::from_file(file.try_clone().unwrap()).unwrap();
    assert_eq!(backing.size(), MIB2);
    assert!(file.set_len(PAGE_SIZE).is_err(), "the size is sealed");
    // One that does not, and a file that is no memfd, are refused by `from_file`...
    let err = SharedBacking::from_file(memfd_of_size(MIB2, false)).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
    let path = std::env::temp_dir().join(format!("shared-backing-{}", std::process::id()));
    let plain = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    plain.set_len(MIB2).unwrap();
    let err = SharedBacking::from_file(plain.try_clone().unwrap()).unwrap_err();
    assert!(
        matches!(err, guest_memfd::Error::NotSealable { .. }),
        "{err}"
    );
    // ... and taken as they are by `from_file_unsealed`.
    assert_eq!(
        SharedBacking::from_file_unsealed(plain).unwrap().size(),
        MIB2
    );
}

#[test]
fn a_region_hotplugged_into_the_vmm_s_file_lands_there_and_bad_ones_are_refused() {
    let zone = vmm_zone(4 * MIB2);
    let vm = vm();
    let m = MemoryBuilder::new(RecordingVm::new(vm.clone()))
        .region_at_with_shared(0, MIB2, backing(&zone), 0)
        .strategy(Strategy::Dual)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let added = pr(8 * MIB2, MIB2);

    // Over the bytes the first region uses, and past the file's end: refused, nothing
    // bound.
    let err = m
        .add_region_with_shared(
            added,
            None,
            backing(&zone),
            MIB2 - PAGE_SIZE,
            PageState::Shared,
        )
        .unwrap_err();
    assert!(matches!(err, Error::SharedBackingOverlap { .. }), "{err}");
    let err = m
        .add_region_with_shared(
            added,
            None,
            backing(&zone),
            3 * MIB2 + PAGE_SIZE,
            PageState::Shared,
        )
        .unwrap_err();
    assert!(
        matches!(err, Error::File(guest_memfd::Error::OutOfBounds { .. })),
        "{err}"
    );
    assert!(gpa_is_free(&vm, added));
    assert_eq!(m.regions().len(), 1);

    // Into the zone at 2 MiB: the host's writes land there, conversions punch there.
    zone.write_all_at(b"zone bytes", 2 * MIB2 + PAGE_SIZE)
        .unwrap();
    m.add_region_with_shared(added, None, backing(&zone), 2 * MIB2, PageState::Shared)
        .unwrap();
    assert!(!gpa_is_free(&vm, added));
    let view = m.guest_memory();
    let mut buf = [0u8; 10];
    view.memory()
        .read_slice(&mut buf, GuestAddress(added.start() + PAGE_SIZE))
        .unwrap();
    assert_eq!(
        &buf, b"zone bytes",
        "added shared, the file's content is kept"
    );
    view.memory()
        .write_slice(b"hotplugged", GuestAddress(added.start()))
        .unwrap();
    zone.read_exact_at(&mut buf, 2 * MIB2).unwrap();
    assert_eq!(&buf, b"hotplugged");
    m.convert(pr(added.start(), 2 * PAGE_SIZE), PageState::Private)
        .unwrap();
    zone.read_exact_at(&mut buf, 2 * MIB2 + PAGE_SIZE).unwrap();
    assert_eq!(buf, [0; 10], "going private punches the VMM's file");

    // Added private, the range is punched at once.
    zone.write_all_at(b"stale", 3 * MIB2).unwrap();
    m.add_region_with_shared(
        pr(12 * MIB2, MIB2),
        None,
        backing(&zone),
        3 * MIB2,
        PageState::Private,
    )
    .unwrap();
    let mut stale = [0u8; 5];
    zone.read_exact_at(&mut stale, 3 * MIB2).unwrap();
    assert_eq!(stale, [0; 5]);

    // In-place memory has no shared side to put there.
    if common::in_place_or_skip("hotplug_into_a_shared_backing_in_place") {
        let in_place = common::in_place(MIB2, PageState::Shared);
        let err = in_place
            .add_region_with_shared(added, None, backing(&zone), 0, PageState::Shared)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::StrategyUnavailable {
                    reason: UnavailableReason::SharedBackingNeedsDual,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(in_place.regions().len(), 1);
    }
}

/// A memfd of `size` bytes, which allows sealing if `sealable`.
fn memfd_of_size(size: u64, sealable: bool) -> File {
    let flags = libc::MFD_CLOEXEC | if sealable { libc::MFD_ALLOW_SEALING } else { 0 };
    // SAFETY: memfd_create reads the NUL-terminated name; the descriptor it returns is
    // new and owned by the `File` alone.
    let fd = unsafe { libc::memfd_create(c"zone".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

/// `err` is the dual strategy's refusal of a NUMA policy.
fn assert_numa_refusal(err: &Error) {
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

#[test]
fn a_numa_policy_is_refused_by_the_dual_strategy_before_anything_is_bound() {
    // The dual strategy's guest_memfd has no mapping to carry a policy (on the attribute
    // stand-in, as the other dual tests here).
    let vm = vm();
    let policy = guest_memfd::NumaPolicy::Preferred(0);
    let err = MemoryBuilder::new(RecordingVm::new(vm.clone()))
        .region_at_with_policy(0, MIB2, policy)
        .strategy(Strategy::Dual)
        .build()
        .unwrap_err();
    assert_numa_refusal(&err);
    assert!(gpa_is_free(&vm, pr(0, MIB2)));
}

#[test]
fn a_hotplugged_region_with_a_policy_is_refused_by_the_dual_strategy_and_nothing_is_added() {
    let vm = vm();
    let memory = MemoryBuilder::new(RecordingVm::new(vm.clone()))
        .region_at(0, MIB2)
        .strategy(Strategy::Dual)
        .build()
        .unwrap();
    let added = pr(MIB2, MIB2);
    let err = memory
        .add_region_with_policy(
            added,
            None,
            guest_memfd::NumaPolicy::Preferred(0),
            PageState::Shared,
        )
        .unwrap_err();
    assert_numa_refusal(&err);
    assert_eq!(memory.regions(), [pr(0, MIB2)]);
    assert!(gpa_is_free(&vm, added));
}

/// The vm-memory view reaches no file, with the dual strategy either: vm-memory's safe
/// `MmapRegion::from_file` would map a region's `file_offset()` with no access guard.
/// Device code the owner trusts with files gets the shared runs' files from
/// `shared_pages()`.
#[test]
fn the_dual_strategy_s_vm_memory_view_reaches_no_file() {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let zone = vmm_zone(2 * MIB2);
    let memory = MemoryBuilder::new(RecordingVm::new(vm()))
        .region_at_with_shared(0, MIB2, backing(&zone), 0)
        .region_at(4 * MIB2, MIB2)
        .strategy(Strategy::Dual)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let view = memory.guest_memory();
    let mem = view.memory();
    for region in mem.iter() {
        assert!(region.file_offset().is_none(), "{:?}", region.start_addr());
    }
    // The owner's path to the files is still there, for shared runs.
    let pages = memory.shared_pages().snapshot();
    let runs: Vec<_> = pages.runs(pr(0, 8 * MIB2)).collect();
    assert_eq!(runs.len(), 2);
    assert!(runs.iter().all(|run| run.file().is_some()));
}
