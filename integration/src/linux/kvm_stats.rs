// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! KVM's binary statistics of a VM or a vCPU (`KVM_GET_STATS_FD`, Linux 5.14+): what
//! KVM counted inside the kernel, where the VMM sees nothing, such as the nested page
//! faults it fixed (`pf_fixed`) or how many of the guest's pages it maps with 4 KiB and
//! 2 MiB entries (`pages_4k`, `pages_2m`).
//!
//! Hand-written: kvm-ioctls 0.25 does not wrap `KVM_GET_STATS_FD`, and no maintained
//! crate reads the format (Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD").

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{
    kvm_stats_desc, kvm_stats_header, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_INSTANT,
    KVM_STATS_TYPE_MASK, KVM_STATS_TYPE_PEAK,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::{errno, ioctl_io_nr};

use crate::error::{Error, Result};

ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// At most this many bytes of descriptors are read (x86 KVM has about 50 statistics per
/// vCPU, each 16 bytes and a name of 48): a bound on what a header makes us allocate.
const MAX_DESCRIPTOR_BYTES: usize = 1 << 20;

/// One statistic: where its value is, and whether it is a single number.
#[derive(Debug)]
struct Stat {
    name: String,
    /// Offset of its first value in the file.
    at: u64,
    /// Cumulative, instant or peak, with at least one value (not a histogram).
    single: bool,
}

/// One VM's or vCPU's statistics: their names, read once, and where each value is.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    stats: Vec<Stat>,
}

impl KvmStats {
    /// Opens the statistics of a VM.
    ///
    /// # Errors
    /// [`Error::Kvm`] if KVM refuses `KVM_GET_STATS_FD` (before Linux 5.14);
    /// [`Error::Io`] if the statistics cannot be read or are malformed.
    pub fn of_vm(vm: &VmFd) -> Result<Self> {
        Self::of(vm)
    }

    /// Opens the statistics of a vCPU; errors as [`KvmStats::of_vm`].
    pub fn of_vcpu(vcpu: &VcpuFd) -> Result<Self> {
        Self::of(vcpu)
    }

    /// `fd` is a VM's or a vCPU's, which the typed constructors above guarantee: an
    /// ioctl number another driver might answer would not be one for KVM.
    fn of(fd: &impl AsRawFd) -> Result<Self> {
        // SAFETY: `fd` is a live KVM VM or vCPU file descriptor (the callers take a
        // `VmFd` or `VcpuFd`); KVM_GET_STATS_FD takes no argument and only returns a
        // new file descriptor.
        let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(Error::Kvm("KVM_GET_STATS_FD", errno::Error::last()));
        }
        // SAFETY: KVM answered with a new file descriptor, which nothing else owns.
        let file = unsafe { File::from_raw_fd(raw) };
        let malformed = |what: &str| {
            Error::Io(
                "reading KVM's statistics",
                std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned()),
            )
        };
        let read = |buf: &mut [u8], at: u64| {
            file.read_exact_at(buf, at)
                .map_err(|e| Error::Io("reading KVM's statistics", e))
        };
        let mut header = [0u8; std::mem::size_of::<kvm_stats_header>()];
        read(&mut header, 0)?;
        let word = |bytes: &[u8], at: usize| {
            u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("four bytes"))
        };
        // struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset,
        // data_offset, each a u32.
        let (name_size, count) = (word(&header, 4) as usize, word(&header, 8) as usize);
        let (desc_offset, data_offset) = (word(&header, 16), word(&header, 20));
        // Each descriptor: struct kvm_stats_desc (flags, exponent, size, offset,
        // bucket_size), then its name of `name_size` bytes.
        let fixed = std::mem::size_of::<kvm_stats_desc>();
        let desc_len = fixed + name_size;
        let total = desc_len
            .checked_mul(count)
            .filter(|&total| name_size > 0 && total <= MAX_DESCRIPTOR_BYTES)
            .ok_or_else(|| malformed("a header whose descriptors are out of bounds"))?;
        let mut descs = vec![0u8; total];
        read(&mut descs, u64::from(desc_offset))?;
        let stats = descs
            .chunks_exact(desc_len)
            .map(|desc| {
                let kind = word(desc, 0) & KVM_STATS_TYPE_MASK;
                let values = u16::from_ne_bytes([desc[6], desc[7]]);
                let name = &desc[fixed..];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                let name = std::str::from_utf8(&name[..end])
                    .map_err(|_| malformed("a name that is not UTF-8"))?;
                Ok(Stat {
                    name: name.to_owned(),
                    at: u64::from(data_offset) + u64::from(word(desc, 8)),
                    single: values >= 1
                        && [
                            KVM_STATS_TYPE_CUMULATIVE,
                            KVM_STATS_TYPE_INSTANT,
                            KVM_STATS_TYPE_PEAK,
                        ]
                        .contains(&kind),
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvmStats { file, stats })
    }

    /// The names of the statistics, in KVM's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.stats.iter().map(|stat| stat.name.as_str())
    }

    /// The current value of statistic `name`, raw, in the unit KVM counts it in (a
    /// count, or for the `_ns` ones nanoseconds); `None` if this kernel has no such
    /// statistic or it is a histogram.
    ///
    /// # Errors
    /// [`Error::Io`] if the value cannot be read.
    pub fn get(&self, name: &str) -> Result<Option<u64>> {
        let Some(stat) = self.stats.iter().find(|s| s.name == name && s.single) else {
            return Ok(None);
        };
        let mut value = [0u8; 8];
        self.file
            .read_exact_at(&mut value, stat.at)
            .map_err(|e| Error::Io("reading KVM's statistics", e))?;
        Ok(Some(u64::from_ne_bytes(value)))
    }
}
