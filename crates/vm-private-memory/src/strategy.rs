//! How private and shared pages are backed, and which way this host allows.

use guest_memfd::Capabilities;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A backing strategy (see the crate documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// One guest_memfd created `MMAP | INIT_SHARED`, bound as a gmem-only slot and mapped
    /// by the host. KVM sees every page as shared; "private" is enforced by this crate's
    /// host access policy. Linux 6.18+, default VM type.
    InPlace,
    /// A guest_memfd without `MMAP` for private pages and a sealed memfd for shared pages,
    /// switched per page by `KVM_SET_MEMORY_ATTRIBUTES` (TDX, SEV-SNP,
    /// `KVM_X86_SW_PROTECTED_VM`).
    Dual,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::InPlace => "in-place",
            Strategy::Dual => "dual",
        })
    }
}

impl Strategy {
    /// Why this strategy cannot run with `caps`, or `None` if it can.
    pub fn unavailable_because(self, caps: &Capabilities) -> Option<String> {
        if !caps.guest_memfd {
            return Some("the VM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)".into());
        }
        if !caps.user_memory2 {
            return Some(
                "the VM has no KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2 is 0)".into(),
            );
        }
        match self {
            Strategy::InPlace if !caps.in_place_capable() => Some(format!(
                "guest_memfd accepts flags {} on this VM, and in-place needs MMAP | INIT_SHARED (Linux 6.18+)",
                caps.guest_memfd_flags
            )),
            Strategy::Dual if !caps.dual_capable() => Some(format!(
                "KVM_CAP_MEMORY_ATTRIBUTES is {:#x} on this VM, without PRIVATE (0x8): use a VM type with memory attributes (KVM_X86_SW_PROTECTED_VM, SEV-SNP, TDX)",
                caps.memory_attributes
            )),
            _ => None,
        }
    }

    /// Picks a strategy: `wanted` if given and possible, else the first of dual and
    /// in-place that the VM supports (dual gives KVM its own private view, so it wins).
    pub fn choose(wanted: Option<Strategy>, caps: &Capabilities) -> Result<Strategy> {
        if let Some(strategy) = wanted {
            return match strategy.unavailable_because(caps) {
                None => Ok(strategy),
                Some(reason) => Err(Error::StrategyUnavailable { strategy, reason }),
            };
        }
        for strategy in [Strategy::Dual, Strategy::InPlace] {
            if strategy.unavailable_because(caps).is_none() {
                return Ok(strategy);
            }
        }
        Err(Error::StrategyUnavailable {
            strategy: Strategy::InPlace,
            reason: Strategy::InPlace
                .unavailable_because(caps)
                .unwrap_or_default(),
        })
    }
}
