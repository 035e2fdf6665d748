// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Constants of the KVM userspace ABI that kvm-bindings 0.14 does not carry yet.
//!
//! Each value is copied from the Linux uapi header named beside it (Linux 6.18). They are
//! defined here once; every other module and crate of this workspace uses these.

/// `GUEST_MEMFD_FLAG_MMAP` (`include/uapi/linux/kvm.h`): the guest_memfd may be mapped
/// into host userspace with `mmap(MAP_SHARED)`.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;

/// `GUEST_MEMFD_FLAG_INIT_SHARED` (`include/uapi/linux/kvm.h`): the guest_memfd's pages
/// start out shared, so the host may fault them in through a mapping.
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

/// `KVM_CAP_GUEST_MEMFD_FLAGS` (`include/uapi/linux/kvm.h`): `KVM_CHECK_EXTENSION`
/// answers with the mask of guest_memfd creation flags the VM (or host) accepts.
pub const KVM_CAP_GUEST_MEMFD_FLAGS: u32 = 244;

/// `KVM_HC_MAP_GPA_RANGE` (`include/uapi/linux/kvm_para.h`): the hypercall number a
/// guest uses to ask for a guest-physical range to be made private or shared.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
