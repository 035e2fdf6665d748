// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Times the phases of building a sparse 1 TiB guest (files, mapping, bits, memslot).
use std::sync::Arc;
use std::time::Instant;

use guest_memfd::{GuestMemfd, GuestMemfdFlags, Memslot, PageRange};
use vm_private_memory::{MemoryBuilder, PageAttributes, PageState};

fn main() {
    let tib = 1u64 << 40;
    let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    let t = Instant::now();
    let gmem = GuestMemfd::create(
        &vm,
        tib,
        GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED,
    )
    .unwrap();
    println!("create guest_memfd: {:?}", t.elapsed());
    let t = Instant::now();
    let map = gmem.map().unwrap();
    println!("map: {:?}", t.elapsed());
    let t = Instant::now();
    let bits = PageAttributes::new(tib / 4096, PageState::Private);
    println!("bits: {:?} ({} bytes)", t.elapsed(), bits.metadata_bytes());
    let t = Instant::now();
    let slot = Memslot::new(0, PageRange::new(4 << 30, tib).unwrap(), &gmem, 0)
        .unwrap()
        .with_userspace_mapping(&map)
        .unwrap();
    // SAFETY: `map` outlives the slot, which is unbound below.
    unsafe { slot.bind(&vm) }.unwrap();
    println!("bind: {:?}", t.elapsed());
    let t = Instant::now();
    slot.unbind(&vm).unwrap();
    println!("unbind: {:?}", t.elapsed());
    drop((map, gmem));
    let t = Instant::now();
    let m = MemoryBuilder::new(vm)
        .region_at(4 << 30, tib)
        .build()
        .unwrap();
    println!("MemoryBuilder::build: {:?}", t.elapsed());
    let t = Instant::now();
    drop(m);
    println!("drop: {:?}", t.elapsed());
}
