// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! How private and shared pages are backed, and which way this host allows.

use guest_memfd::{Capabilities, GuestMemfdFlags};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A backing strategy (see the crate documentation).
///
/// Not exhaustive: a platform with another way of backing private pages may add one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
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

/// Why a strategy cannot do what was asked ([`Error::StrategyUnavailable`]): a
/// capability the VM lacks, or an operation the strategy cannot perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnavailableReason {
    /// The VM has no guest_memfd.
    #[error("the VM has no guest_memfd (KVM_CAP_GUEST_MEMFD is 0)")]
    NoGuestMemfd,
    /// The VM has no `KVM_SET_USER_MEMORY_REGION2`.
    #[error("the VM has no KVM_SET_USER_MEMORY_REGION2 (KVM_CAP_USER_MEMORY2 is 0)")]
    NoUserMemory2,
    /// In-place: guest_memfd does not accept `MMAP | INIT_SHARED` on this VM.
    #[error("guest_memfd accepts flags {flags} on this VM, and in-place needs MMAP | INIT_SHARED (Linux 6.18+)")]
    NotMappable {
        /// The flags guest_memfd accepts on this VM (`KVM_CAP_GUEST_MEMFD_FLAGS`).
        flags: GuestMemfdFlags,
    },
    /// Dual: the VM has no `PRIVATE` memory attribute.
    #[error("KVM_CAP_MEMORY_ATTRIBUTES is {attributes:#x} on this VM, without PRIVATE (0x8): use a VM type with memory attributes (KVM_X86_SW_PROTECTED_VM, SEV-SNP, TDX)")]
    NoPrivateAttribute {
        /// The memory attributes the VM supports (`KVM_CAP_MEMORY_ATTRIBUTES`).
        attributes: u64,
    },
    /// A content-preserving conversion ([`crate::ContentMode::Preserve`],
    /// [`crate::SharedContent::Keep`]) was asked of the dual strategy.
    #[error("content-preserving conversion needs the in-place strategy: the dual strategy keeps private and shared pages in different files")]
    PreserveNeedsInPlace,
    /// Loading bytes into private pages ([`crate::PrivateMemoryManager::load_private`]) was
    /// asked of the dual strategy.
    #[error("load_private writes private pages through the host's mapping, which only in-place memory has (dual private pages live in a guest_memfd no host process maps): with the dual strategy, write the image into shared pages and make them private with launch_private")]
    LoadNeedsInPlace,
    /// A vendor launch ([`crate::PrivateMemoryManager::launch_private`]) was asked of the
    /// in-place strategy, which has no shared side to populate from.
    #[error("launch population copies from the shared side into private memory, which needs the dual strategy; in-place memory keeps content across conversions (load_private)")]
    LaunchNeedsDual,
    /// A NUMA policy ([`crate::MemoryBuilder::region_at_with_policy`]) was given to the
    /// dual strategy, whose guest_memfd has no mapping to carry it.
    #[error("a NUMA policy is set through a guest_memfd's mapping, and the dual strategy's guest_memfd has none (a mappable one would make KVM take shared pages from it too, Linux 7.x): put the shared side in a memfd of your own with its policy (region_at_with_shared), and private pages follow the policy of the thread that allocates them (set_mempolicy on the vCPU threads that fault them, or on the thread that preallocates); or build in place (.strategy(Strategy::InPlace) on a default-type VM)")]
    NumaPolicyNeedsInPlace,
    /// A shared backing of the VMM's own
    /// ([`crate::MemoryBuilder::region_at_with_shared`]) was given to the in-place
    /// strategy, which has no separate shared side.
    #[error("a shared backing file is for the dual strategy: in place, shared and private pages live in the one guest_memfd")]
    SharedBackingNeedsDual,
    /// The dual strategy was given guest_memfd flags that decide where shared pages
    /// live (`MMAP`, `INIT_SHARED`): its shared pages are in the shared side.
    #[error("the dual strategy's guest_memfd must not have {flags}: with them KVM would take shared pages from the guest_memfd, while devices use the shared side")]
    FlagsOwnedByStrategy {
        /// The flags refused.
        flags: GuestMemfdFlags,
    },
    /// A guest_memfd given for an in-place region lacks flags the strategy needs
    /// (`MMAP | INIT_SHARED`): the host maps the region through it.
    #[error("the in-place strategy maps its guest_memfd, and the file given lacks {flags}: create it with MMAP | INIT_SHARED")]
    BackingLacksFlags {
        /// The flags missing.
        flags: GuestMemfdFlags,
    },
}

impl UnavailableReason {
    /// Whether the VM lacks something the strategy needs to run at all (rather than the
    /// strategy being unable to do one operation).
    pub fn is_capability(&self) -> bool {
        matches!(
            self,
            UnavailableReason::NoGuestMemfd
                | UnavailableReason::NoUserMemory2
                | UnavailableReason::NotMappable { .. }
                | UnavailableReason::NoPrivateAttribute { .. }
        )
    }
}

impl Strategy {
    /// Why this strategy cannot run with `caps`, or `None` if it can.
    pub fn unavailable_because(self, caps: &Capabilities) -> Option<UnavailableReason> {
        if !caps.guest_memfd {
            return Some(UnavailableReason::NoGuestMemfd);
        }
        if !caps.user_memory2 {
            return Some(UnavailableReason::NoUserMemory2);
        }
        match self {
            Strategy::InPlace if !caps.in_place_capable() => Some(UnavailableReason::NotMappable {
                flags: caps.guest_memfd_flags,
            }),
            Strategy::Dual if !caps.dual_capable() => Some(UnavailableReason::NoPrivateAttribute {
                attributes: caps.memory_attributes,
            }),
            _ => None,
        }
    }

    /// Picks a strategy: `wanted` if given and possible, else the first of dual and
    /// in-place that the VM supports (dual gives KVM its own private view, so it wins).
    ///
    /// # Errors
    ///
    /// [`Error::StrategyUnavailable`] if `wanted` is given and the VM cannot run it
    /// (with the reason); [`Error::NoStrategy`] if it is not and the VM can run neither
    /// (with both reasons).
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
        let reason = |strategy: Strategy| {
            strategy
                .unavailable_because(caps)
                .unwrap_or(UnavailableReason::NoGuestMemfd)
        };
        Err(Error::NoStrategy {
            in_place: reason(Strategy::InPlace),
            dual: reason(Strategy::Dual),
        })
    }
}
