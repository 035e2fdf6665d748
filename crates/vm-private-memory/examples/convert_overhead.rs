// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Per-call cost of `PrivateMemoryManager::convert` in 4 KiB steps against the raw punch-hole
//! call on a file bound the same way, alternating, on pages that hold no memory (so the
//! system call is cheap and the engine's own cost shows).
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use guest_memfd::{GuestMemfd, GuestMemfdFlags, Memslot, PageRange, PAGE_SIZE};
use vm_private_memory::{MemoryBuilder, Strategy};

fn main() {
    let size = 256u64 << 20;
    let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    let memory = MemoryBuilder::new(vm.clone())
        .region_at(0, size)
        .strategy(Strategy::InPlace)
        .build()
        .unwrap();
    let peer = GuestMemfd::create(
        &vm,
        size,
        GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
    )
    .unwrap();
    // The peer file is bound like ours, so its punches make KVM invalidate too.
    let peer_map = peer.map().unwrap();
    let slot = Memslot::new(100, PageRange::new(1 << 40, size).unwrap(), &peer, 0)
        .unwrap()
        .with_userspace_mapping(&peer_map)
        .unwrap();
    // SAFETY: `peer_map` outlives the VM's use of it: both live until the end of main.
    unsafe { slot.bind(&vm) }.unwrap();
    let n = size / PAGE_SIZE;
    for round in 0..5 {
        let to = memory.state_of(0).unwrap().flipped();
        let t = Instant::now();
        for i in 0..n {
            memory
                .convert(PageRange::new(i * PAGE_SIZE, PAGE_SIZE).unwrap(), to)
                .unwrap();
        }
        let ours = t.elapsed().as_nanos() as f64 / n as f64;
        let t = Instant::now();
        for i in 0..n {
            // SAFETY: fallocate reads only its integer arguments; the fd belongs to `peer`,
            // which lives until the end of main, and the result is checked.
            let r = unsafe {
                libc::fallocate64(
                    peer.as_raw_fd(),
                    3,
                    (i * PAGE_SIZE) as i64,
                    PAGE_SIZE as i64,
                )
            };
            assert_eq!(r, 0);
        }
        let raw = t.elapsed().as_nanos() as f64 / n as f64;
        println!("round {round}: convert {ours:.0} ns, raw punch {raw:.0} ns per 4 KiB");
    }
}
