// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The cases of the kernel's `tools/testing/selftests/kvm/guest_memfd_test.c` that need no
//! guest, ported to this crate's types and run on the real `/dev/kvm`. For every input this
//! crate refuses, the test checks that *our* error comes back (no ioctl made), and where
//! useful that the kernel would refuse it as well.

mod common;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use common::{flag_sets, raw_fallocate, raw_mmap, require_mmap, vm};
use guest_memfd::{Error, GuestMemfd, GuestMemfdFlags, PageRange, PAGE_SIZE};
use kvm_bindings::kvm_create_guest_memfd;

const TOTAL: u64 = 4 * PAGE_SIZE;
const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH: i32 = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;

#[test]
fn every_flag_bit_is_accepted_exactly_when_the_host_lists_it() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip(
        "every_flag_bit_is_accepted_exactly_when_the_host_lists_it",
    ) else {
        return;
    };
    let supported = guest_memfd::supported_flags(&vm);
    for bit in 0..64 {
        let flag = GuestMemfdFlags::from_bits_retain(1 << bit);
        let result = GuestMemfd::create(&vm, PAGE_SIZE, flag);
        if supported.contains(flag) {
            let gmem = result.unwrap_or_else(|e| panic!("bit {bit}: {e}"));
            assert_eq!(gmem.flags(), flag);
        } else {
            match result {
                Err(Error::UnsupportedFlags {
                    requested,
                    unsupported,
                    supported: s,
                }) => {
                    assert_eq!(requested, flag);
                    assert_eq!(unsupported, flag);
                    assert_eq!(s, supported);
                }
                other => panic!("bit {bit}: expected UnsupportedFlags, got {other:?}"),
            }
            // The kernel agrees.
            let raw = vm.create_guest_memfd(kvm_create_guest_memfd {
                size: PAGE_SIZE,
                flags: 1 << bit,
                ..Default::default()
            });
            assert_eq!(
                raw.err().map(|e| e.errno()),
                Some(libc::EINVAL),
                "bit {bit}"
            );
        }
    }
}

#[test]
fn the_unsupported_flags_error_lists_both_sets() {
    let Some(vm) =
        common::vm_with_guest_memfd_or_skip("the_unsupported_flags_error_lists_both_sets")
    else {
        return;
    };
    let err =
        GuestMemfd::create(&vm, PAGE_SIZE, GuestMemfdFlags::from_bits_retain(1 << 40)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("0x10000000000"), "{text}");
    assert!(
        text.contains(&guest_memfd::supported_flags(&vm).to_string()),
        "{text}"
    );
}

#[test]
fn several_files_per_vm_have_their_own_size_and_inode() {
    let Some(vm) =
        common::vm_with_guest_memfd_or_skip("several_files_per_vm_have_their_own_size_and_inode")
    else {
        return;
    };
    let one = GuestMemfd::create(&vm, PAGE_SIZE, GuestMemfdFlags::empty()).unwrap();
    let two = GuestMemfd::create(&vm, 2 * PAGE_SIZE, GuestMemfdFlags::empty()).unwrap();
    let (m1, m2) = (
        one.file().metadata().unwrap(),
        two.file().metadata().unwrap(),
    );
    assert_eq!(m1.len(), PAGE_SIZE);
    assert_eq!(m2.len(), 2 * PAGE_SIZE);
    assert_ne!(m1.ino(), m2.ino());
    assert_eq!(one.size(), PAGE_SIZE);
    assert_eq!(two.size(), 2 * PAGE_SIZE);
}

#[test]
fn invalid_sizes_are_refused_before_the_ioctl() {
    let Some(vm) =
        common::vm_with_guest_memfd_or_skip("invalid_sizes_are_refused_before_the_ioctl")
    else {
        return;
    };
    for flags in flag_sets(&vm) {
        let sizes = (0..PAGE_SIZE).chain(PAGE_SIZE + 1..2 * PAGE_SIZE);
        for size in sizes {
            match GuestMemfd::create(&vm, size, flags) {
                Err(Error::InvalidSize { size: s }) => assert_eq!(s, size),
                other => panic!("size {size:#x}, flags {flags}: {other:?}"),
            }
        }
        // The kernel agrees, for a sample.
        for size in [0, 1, PAGE_SIZE - 1, PAGE_SIZE + 1] {
            let raw = vm.create_guest_memfd(kvm_create_guest_memfd {
                size,
                flags: flags.bits(),
                ..Default::default()
            });
            assert_eq!(
                raw.err().map(|e| e.errno()),
                Some(libc::EINVAL),
                "size {size}"
            );
        }
    }
}

#[test]
fn read_write_pread_and_pwrite_are_refused() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip("read_write_pread_and_pwrite_are_refused")
    else {
        return;
    };
    for flags in flag_sets(&vm) {
        let gmem = GuestMemfd::create(&vm, TOTAL, flags).unwrap();
        let mut file = gmem.file();
        let mut buf = [0u8; 64];
        assert!(file.read(&mut buf).is_err(), "read, flags {flags}");
        assert!(file.write(&buf).is_err(), "write, flags {flags}");
        assert!(
            gmem.file().read_at(&mut buf, 0).is_err(),
            "pread, flags {flags}"
        );
        assert!(
            gmem.file().write_at(&buf, 0).is_err(),
            "pwrite, flags {flags}"
        );
    }
}

#[test]
fn file_size_and_block_size() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip("file_size_and_block_size") else {
        return;
    };
    for flags in flag_sets(&vm) {
        let gmem = GuestMemfd::create(&vm, TOTAL, flags).unwrap();
        let meta = gmem.file().metadata().unwrap();
        assert_eq!(meta.len(), TOTAL);
        assert_eq!(meta.blksize(), PAGE_SIZE);
        assert_eq!(gmem.whole(), PageRange::new(0, TOTAL).unwrap());
    }
}

#[test]
fn a_file_without_mmap_cannot_be_mapped() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip("a_file_without_mmap_cannot_be_mapped")
    else {
        return;
    };
    let gmem = GuestMemfd::create(&vm, TOTAL, GuestMemfdFlags::empty()).unwrap();
    assert!(matches!(gmem.map(), Err(Error::NotMappable { .. })));
    // The kernel refuses too, for one page and for the whole file.
    let fd = gmem.as_raw_fd();
    assert_eq!(
        raw_mmap(fd, PAGE_SIZE as usize, libc::MAP_SHARED),
        libc::ENODEV
    );
    assert_eq!(raw_mmap(fd, TOTAL as usize, libc::MAP_SHARED), libc::ENODEV);
}

#[test]
fn a_file_with_mmap_but_private_pages_is_not_mapped() {
    let vm = vm();
    if !require_mmap(&vm, "a_file_with_mmap_but_private_pages_is_not_mapped") {
        return;
    }
    // The kernel maps it, but every access raises SIGBUS (the selftest's fault_private):
    // this crate refuses to hand out such a mapping.
    let gmem = GuestMemfd::create(&vm, TOTAL, GuestMemfdFlags::MMAP).unwrap();
    assert!(matches!(gmem.map(), Err(Error::NotShared { .. })));
    assert_eq!(
        raw_mmap(gmem.as_raw_fd(), TOTAL as usize, libc::MAP_SHARED),
        0
    );
}

#[test]
fn a_shared_mapping_reads_writes_and_sees_punched_pages_as_zero() {
    let vm = vm();
    if !require_mmap(
        &vm,
        "a_shared_mapping_reads_writes_and_sees_punched_pages_as_zero",
    ) {
        return;
    }
    let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let gmem = GuestMemfd::create(&vm, TOTAL, flags).unwrap();
    let map = gmem.map().unwrap();
    assert_eq!(map.size() as u64, TOTAL);
    // SAFETY: `map` is a live read-write mapping of TOTAL bytes owned by this test.
    let mem = unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), TOTAL as usize) };
    mem.fill(0xaa);
    assert!(mem.iter().all(|&b| b == 0xaa));
    gmem.discard(PageRange::new(0, PAGE_SIZE).unwrap()).unwrap();
    let (first, rest) = mem.split_at(PAGE_SIZE as usize);
    assert!(first.iter().all(|&b| b == 0));
    assert!(rest.iter().all(|&b| b == 0xaa));
    mem[..PAGE_SIZE as usize].fill(0xaa);
    assert!(mem.iter().all(|&b| b == 0xaa));
}

#[test]
fn map_private_is_never_offered_and_the_kernel_refuses_it() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip(
        "map_private_is_never_offered_and_the_kernel_refuses_it",
    ) else {
        return;
    };
    for flags in flag_sets(&vm) {
        let gmem = GuestMemfd::create(&vm, TOTAL, flags).unwrap();
        let errno = raw_mmap(gmem.as_raw_fd(), TOTAL as usize, libc::MAP_PRIVATE);
        assert_ne!(errno, 0, "MAP_PRIVATE must fail, flags {flags}");
    }
}

#[test]
fn a_mapping_past_the_end_of_the_file_is_refused() {
    let vm = vm();
    if !require_mmap(&vm, "a_mapping_past_the_end_of_the_file_is_refused") {
        return;
    }
    let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let gmem = GuestMemfd::create(&vm, TOTAL, flags).unwrap();
    // The selftest's fault_overflow maps 4x the file and expects SIGBUS past the end; this
    // crate does not create such a mapping.
    let too_big = PageRange::new(0, 4 * TOTAL).unwrap();
    match gmem.map_range(too_big) {
        Err(Error::OutOfBounds { range, file_size }) => {
            assert_eq!(range, too_big);
            assert_eq!(file_size, TOTAL);
        }
        other => panic!("{other:?}"),
    }
    let tail = PageRange::new(TOTAL - PAGE_SIZE, PAGE_SIZE).unwrap();
    assert_eq!(gmem.map_range(tail).unwrap().size() as u64, PAGE_SIZE);
}

#[test]
fn fallocate_alignment_and_bounds() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip("fallocate_alignment_and_bounds") else {
        return;
    };
    for flags in flag_sets(&vm) {
        let gmem = GuestMemfd::create(&vm, TOTAL, flags).unwrap();
        let fd = gmem.as_raw_fd();
        gmem.allocate(gmem.whole()).unwrap();

        // Unaligned offset or size: not expressible; the kernel refuses them too.
        assert!(PageRange::new(PAGE_SIZE - 1, PAGE_SIZE).is_err());
        assert_eq!(
            raw_fallocate(fd, PUNCH, PAGE_SIZE - 1, PAGE_SIZE),
            libc::EINVAL
        );
        assert!(PageRange::new(PAGE_SIZE, PAGE_SIZE - 1).is_err());
        assert_eq!(
            raw_fallocate(fd, PUNCH, PAGE_SIZE, PAGE_SIZE - 1),
            libc::EINVAL
        );

        // Allocation at or after the end of the file: our error, and the kernel's EINVAL.
        for start in [TOTAL, TOTAL + PAGE_SIZE] {
            let range = PageRange::new(start, PAGE_SIZE).unwrap();
            assert!(matches!(
                gmem.allocate(range),
                Err(Error::OutOfBounds { .. })
            ));
            assert_eq!(raw_fallocate(fd, KEEP_SIZE, start, PAGE_SIZE), libc::EINVAL);
            // Punching there is a no-op for the kernel; for us it is a caller's mistake.
            assert!(matches!(
                gmem.discard(range),
                Err(Error::OutOfBounds { .. })
            ));
            assert_eq!(raw_fallocate(fd, PUNCH, start, PAGE_SIZE), 0);
        }
        // A range that starts inside and ends outside.
        let straddle = PageRange::new(TOTAL - PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        assert!(matches!(
            gmem.allocate(straddle),
            Err(Error::OutOfBounds { .. })
        ));

        let second = PageRange::new(PAGE_SIZE, PAGE_SIZE).unwrap();
        gmem.discard(second).unwrap();
        gmem.allocate(second).unwrap();
    }
}

#[test]
fn every_invalid_punch_hole_of_the_selftest_is_refused() {
    let Some(vm) =
        common::vm_with_guest_memfd_or_skip("every_invalid_punch_hole_of_the_selftest_is_refused")
    else {
        return;
    };
    let p = PAGE_SIZE;
    let cases = [
        (0, 1),
        (0, p - 1),
        (0, p + 1),
        (1, 1),
        (1, p - 1),
        (1, p),
        (1, p + 1),
        (p, 1),
        (p, p - 1),
        (p, p + 1),
    ];
    for flags in flag_sets(&vm) {
        let gmem = GuestMemfd::create(&vm, TOTAL, flags).unwrap();
        for (offset, len) in cases {
            assert!(
                matches!(
                    PageRange::new(offset, len),
                    Err(Error::UnalignedRange { .. })
                ),
                "({offset:#x}, {len:#x})"
            );
            assert_eq!(
                raw_fallocate(gmem.as_raw_fd(), PUNCH, offset, len),
                libc::EINVAL,
                "kernel, ({offset:#x}, {len:#x})"
            );
        }
    }
}

#[test]
fn out_of_bounds_errors_name_the_range_and_the_file_size() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip(
        "out_of_bounds_errors_name_the_range_and_the_file_size",
    ) else {
        return;
    };
    let gmem = GuestMemfd::create(&vm, TOTAL, GuestMemfdFlags::empty()).unwrap();
    let err = gmem
        .allocate(PageRange::new(TOTAL, PAGE_SIZE).unwrap())
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("[0x4000, 0x5000)"), "{text}");
    assert!(text.contains("0x4000 bytes"), "{text}");
    assert_eq!(err.errno(), None, "refused before any system call");
}

#[test]
fn a_created_guest_memfd_is_close_on_exec_where_the_kernel_makes_it_inheritable() {
    let Some(vm) = common::vm_with_guest_memfd_or_skip(
        "a_created_guest_memfd_is_close_on_exec_where_the_kernel_makes_it_inheritable",
    ) else {
        return;
    };
    let raw = kvm_create_guest_memfd {
        size: PAGE_SIZE,
        ..Default::default()
    };
    // KVM itself hands out an inheritable descriptor ...
    let kernels = guest_memfd::VmMemoryOps::create_guest_memfd(&vm, raw).unwrap();
    // SAFETY: F_GETFD takes no argument; the descriptor is open.
    let kernel_flags = unsafe { libc::fcntl(kernels.as_raw_fd(), libc::F_GETFD) };
    assert_eq!(kernel_flags & libc::FD_CLOEXEC, 0);
    // ... which a process the VMM starts would inherit; the crate's is close-on-exec.
    let gmem = GuestMemfd::create(&vm, PAGE_SIZE, GuestMemfdFlags::empty()).unwrap();
    // SAFETY: as above.
    let flags = unsafe { libc::fcntl(gmem.as_raw_fd(), libc::F_GETFD) };
    assert_ne!(flags & libc::FD_CLOEXEC, 0);
}

/// `node_of_page` says where a resident page is and never makes one resident: a hole, a
/// page reserved with `fallocate` and not touched yet, and a discarded page are `None`,
/// and stay absent after being asked about.
#[test]
fn node_of_page_sees_resident_pages_only_and_allocates_none() {
    let vm = vm();
    let test = "node_of_page_sees_resident_pages_only_and_allocates_none";
    if !require_mmap(&vm, test) {
        return;
    }
    let flags = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    let gmem = GuestMemfd::create(&vm, 4 * PAGE_SIZE, flags).unwrap();
    let map = gmem.map().unwrap();
    let page = |i: u64| map.as_ptr() as usize + (i * PAGE_SIZE) as usize;
    let node = |i: u64| match guest_memfd::node_of_page(page(i)) {
        Err(e) if e.errno() == Some(libc::ENOSYS) => None,
        other => other.unwrap(),
    };
    let numa = guest_memfd::node_of_page(page(0))
        .map_or_else(|e| e.errno() != Some(libc::ENOSYS), |_| true);
    // A hole, asked twice: still a hole.
    assert_eq!(node(0), None);
    assert_eq!(node(0), None);
    // Reserved but never touched: held, not yet resident.
    gmem.allocate(PageRange::new(PAGE_SIZE, PAGE_SIZE).unwrap())
        .unwrap();
    assert_eq!(node(1), None);
    // Written: resident, on a node this process may use.
    // SAFETY: page 2 lies inside `map`, a live read-write mapping owned by this test.
    unsafe { (page(2) as *mut u8).write_volatile(1) };
    if numa {
        let usable = guest_memfd::usable_nodes().unwrap();
        assert!(usable.contains(&node(2).expect("written")));
    }
    // Discarded: gone, and asking leaves it gone (asked twice, as the hole).
    gmem.discard(PageRange::new(2 * PAGE_SIZE, PAGE_SIZE).unwrap())
        .unwrap();
    assert_eq!(node(2), None);
    assert_eq!(node(2), None);
    // An address nothing maps is an error, not a page.
    let err = guest_memfd::node_of_page(8).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOMEM), "{err}");
}
