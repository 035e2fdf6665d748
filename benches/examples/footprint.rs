// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Metadata per GiB, and the memory held after converting 1 GiB back and forth, for the
//! in-place strategy: the host fills 1 GiB of shared memory, converts it to private
//! (content discarded), back to shared, writes 64 MiB of it, and reports how much of
//! the guest_memfd is allocated at each point (from /proc/self/smaps of its mapping,
//! which counts the file's resident pages) and the bits' size.
use std::sync::Arc;

use guest_memfd::PageRange;
use integration::resident_guest_memfd_bytes;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{MemoryBuilder, PageState, Strategy};

const GIB: u64 = 1 << 30;

fn gmem_resident_kib() -> u64 {
    resident_guest_memfd_bytes().unwrap() / 1024
}

fn main() {
    let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    let memory = MemoryBuilder::new(vm)
        .region_at(0, GIB)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    println!(
        "metadata: {} bytes for 1 GiB ({} bytes per GiB)",
        memory.metadata_bytes(),
        memory.metadata_bytes()
    );
    let ram = memory.guest_memory();
    let whole = PageRange::new(0, GIB).unwrap();
    println!(
        "fresh:                          {:>8} KiB resident",
        gmem_resident_kib()
    );
    let chunk = vec![0x5au8; 1 << 20];
    for mib in 0..1024u64 {
        ram.memory()
            .write_slice(&chunk, GuestAddress(mib << 20))
            .unwrap();
    }
    println!(
        "host wrote 1 GiB:               {:>8} KiB resident",
        gmem_resident_kib()
    );
    let r = memory.convert(whole, PageState::Private).unwrap();
    println!(
        "converted to private:           {:>8} KiB resident ({} bytes discarded)",
        gmem_resident_kib(),
        r.bytes_discarded
    );
    let r = memory.convert(whole, PageState::Shared).unwrap();
    println!(
        "converted back to shared:       {:>8} KiB resident ({} bytes discarded)",
        gmem_resident_kib(),
        r.bytes_discarded
    );
    for mib in 0..64u64 {
        ram.memory()
            .write_slice(&chunk, GuestAddress(mib << 20))
            .unwrap();
    }
    println!(
        "host wrote 64 MiB again:        {:>8} KiB resident",
        gmem_resident_kib()
    );
}
