// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! guest_memfd creation flags.

use std::fmt;

use bitflags::bitflags;
use serde::{Deserialize, Serialize};

use crate::uapi::{GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP};

bitflags! {
    /// The `flags` of `KVM_CREATE_GUEST_MEMFD`.
    ///
    /// Unknown bits are kept (`from_bits_retain`), so that a host's mask of supported
    /// flags can be reported faithfully even when it names flags this crate predates.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(transparent)]
    pub struct GuestMemfdFlags: u64 {
        /// The file can be mapped into host userspace (`mmap(MAP_SHARED)`).
        const MMAP = GUEST_MEMFD_FLAG_MMAP;
        /// The file's pages start out shared, so the host mapping can fault them in.
        /// Useful only together with [`GuestMemfdFlags::MMAP`].
        const INIT_SHARED = GUEST_MEMFD_FLAG_INIT_SHARED;
    }
}

impl fmt::Display for GuestMemfdFlags {
    /// Names the flags, `MMAP | INIT_SHARED`, with unknown bits in hex; `none` for none.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        bitflags::parser::to_writer(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_known_and_unknown_bits() {
        assert_eq!(GuestMemfdFlags::empty().to_string(), "none");
        assert_eq!(
            (GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED).to_string(),
            "MMAP | INIT_SHARED"
        );
        assert_eq!(
            GuestMemfdFlags::from_bits_retain(0b101).to_string(),
            "MMAP | 0x4"
        );
    }
}
