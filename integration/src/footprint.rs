// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! How much guest memory this process holds through guest_memfd mappings.

use std::io;

/// The resident bytes of every guest_memfd mapping of this process (`kvm-gmem` entries of
/// `/proc/self/smaps`): with the in-place strategy, the memory a guest holds.
///
/// # Errors
///
/// The system's error if `/proc/self/smaps` cannot be read.
pub fn resident_guest_memfd_bytes() -> io::Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut in_gmem = false;
    let mut kib = 0u64;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_gmem = line.contains("kvm-gmem");
        } else if in_gmem && line.starts_with("Rss:") {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(kib * 1024)
}
