// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `SharedBacking::allocated_bytes`: the data a VMM's file holds over a range, counted
//! without disturbing the file offset the VMM's own descriptors share.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use guest_memfd::{PageRange, SharedBacking, PAGE_SIZE};

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create reads the NUL-terminated name; the descriptor it returns is
    // checked and then owned by the `File` alone.
    let fd = unsafe { libc::memfd_create(c"zone".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

#[test]
fn allocated_bytes_counts_the_data_inside_the_range_only() {
    let file = memfd(64 * PAGE_SIZE);
    for page in [1u64, 2, 3, 10, 40] {
        file.write_all_at(&[1], page * PAGE_SIZE).unwrap();
    }
    let backing = SharedBacking::from_file_unsealed(file).unwrap();
    let range = |first: u64, pages: u64| PageRange::from_pages(first, pages).unwrap();
    assert_eq!(
        backing.allocated_bytes(range(0, 64)).unwrap(),
        5 * PAGE_SIZE
    );
    // Cut through a run of data at both ends.
    assert_eq!(backing.allocated_bytes(range(2, 9)).unwrap(), 3 * PAGE_SIZE);
    assert_eq!(backing.allocated_bytes(range(11, 29)).unwrap(), 0);
    assert!(
        backing.allocated_bytes(range(60, 5)).is_err(),
        "past the end"
    );
}

#[test]
fn allocated_bytes_leaves_the_shared_file_offset_where_it_was() {
    let file = memfd(16 * PAGE_SIZE);
    file.write_all_at(&[1], 5 * PAGE_SIZE).unwrap();
    // The VMM keeps a duplicate: it shares the open file, and so its offset.
    let mut mine = file.try_clone().unwrap();
    mine.seek(SeekFrom::Start(100)).unwrap();
    let backing = SharedBacking::from_file_unsealed(file).unwrap();
    let whole = PageRange::from_pages(0, 16).unwrap();
    assert_eq!(backing.allocated_bytes(whole).unwrap(), PAGE_SIZE);
    assert_eq!(mine.stream_position().unwrap(), 100);
    // Calls racing each other leave it there too.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..200 {
                    assert_eq!(backing.allocated_bytes(whole).unwrap(), PAGE_SIZE);
                }
            });
        }
    });
    assert_eq!(mine.stream_position().unwrap(), 100);
}
