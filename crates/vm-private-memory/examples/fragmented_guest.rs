// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the worst guest request costs the host: a 64 GiB guest whose pages alternate
//! private and shared asks for all of it to become shared (8,388,608 changed runs). The
//! request is served the way exits are (`serve_request`: bounded steps), and, as the
//! peer in the same run, as one unbounded `convert` call. Prints the memory each way
//! added to the process's peak (`VmHWM`, reset before each) and how long the conversion
//! lock was held at a stretch.
//!
//! `cargo run --release -p vm-private-memory --example fragmented_guest`
use std::sync::Arc;
use std::time::Instant;

use guest_memfd::{PageRange, PAGE_SIZE};
use vm_private_memory::{
    ConversionRequest, MemoryBuilder, PageState, PrivateMemoryManager, PrivatePages, Strategy,
};

const SIZE: u64 = 64 << 30;

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn reset_peak() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS.
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

/// Makes every other page of `memory` private (one batch restore of a bitmap state).
fn alternate(memory: &PrivateMemoryManager) {
    let mut state = memory.state();
    let pages = SIZE / PAGE_SIZE;
    state.regions[0].private = PrivatePages::Bitmap(vec![0x55; (pages / 8) as usize]);
    state.update_checksum();
    memory.restore_state(&state).unwrap();
    assert_eq!(memory.private_pages(), pages / 2);
}

fn main() {
    let vm = Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap());
    let memory = MemoryBuilder::new(vm)
        .region_at(0, SIZE)
        .strategy(Strategy::InPlace)
        .initial_state(PageState::Shared)
        .build()
        .unwrap();
    let whole = PageRange::new(0, SIZE).unwrap();
    println!("64 GiB guest, every other page private: one request to make it all shared");

    alternate(&memory);
    reset_peak();
    let before = peak_rss_kib();
    let request = ConversionRequest::from_map_gpa_range(0, SIZE / PAGE_SIZE, 0).unwrap();
    let started = Instant::now();
    let report = memory.serve_request(request).unwrap();
    let total = started.elapsed();
    println!(
        "bounded steps (serve_request): {} runs in {} lock holds, longest hold {:.2} ms, total {:.2} s, peak memory +{} KiB",
        report.runs_changed,
        report.lock_holds,
        report.longest_lock_hold.as_secs_f64() * 1e3,
        total.as_secs_f64(),
        peak_rss_kib() - before
    );

    alternate(&memory);
    reset_peak();
    let before = peak_rss_kib();
    let started = Instant::now();
    let report = memory.convert(whole, PageState::Shared).unwrap();
    let total = started.elapsed();
    println!(
        "one unbounded call (convert):  {} runs in 1 lock hold of {:.2} s, peak memory +{} KiB",
        report.runs_changed,
        total.as_secs_f64(),
        peak_rss_kib() - before
    );
}
