// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Alternates `GuestMemfd::discard` and the raw call on empty pages, 4 KiB at a time,
//! to isolate the per-call overhead from the cost of freeing memory.
use std::os::fd::AsRawFd;
use std::time::Instant;

use guest_memfd::{GuestMemfd, GuestMemfdFlags, PageRange, PAGE_SIZE};

fn main() {
    let vm = benches::vm();
    let gmem = GuestMemfd::create(&vm, 1 << 30, GuestMemfdFlags::empty()).unwrap();
    let fd = gmem.as_raw_fd();
    let n = 262_144u64;
    for round in 0..5 {
        let t = Instant::now();
        for i in 0..n {
            gmem.discard(PageRange::new(i * PAGE_SIZE, PAGE_SIZE).unwrap())
                .unwrap();
        }
        let ours = t.elapsed();
        let t = Instant::now();
        for i in 0..n {
            // SAFETY: fallocate reads only its integer arguments; `fd` belongs to `gmem`,
            // which lives until the end of main, and the result is checked.
            let r = unsafe { libc::fallocate64(fd, 3, (i * PAGE_SIZE) as i64, PAGE_SIZE as i64) };
            assert_eq!(r, 0);
        }
        let raw = t.elapsed();
        println!(
            "round {round}: ours {:?} raw {:?} per call ours {:.0} ns raw {:.0} ns",
            ours,
            raw,
            ours.as_nanos() as f64 / n as f64,
            raw.as_nanos() as f64 / n as f64
        );
    }
}
