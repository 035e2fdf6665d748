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

use kvm_bindings::{kvm_stats_desc, kvm_stats_header};
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::{errno, ioctl_io_nr};

use crate::error::{Error, Result};

ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// At most this many statistics are read: x86 KVM has about 50 per vCPU.
const MAX_STATS: u32 = 4096;
/// The longest name KVM gives a statistic, with its NUL (`KVM_STATS_NAME_SIZE`).
const MAX_NAME: u32 = 48;

/// One VM's or vCPU's statistics: their names, read once, and where each value is.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    /// (name, offset of its first value in the file).
    stats: Vec<(String, u64)>,
}

impl KvmStats {
    /// Opens the statistics of `fd`, a VM's or a vCPU's file descriptor.
    ///
    /// # Errors
    /// [`Error::Kvm`] if KVM refuses `KVM_GET_STATS_FD` (before Linux 5.14);
    /// [`Error::Io`] if the statistics cannot be read or are malformed.
    pub fn of(fd: &impl AsRawFd) -> Result<Self> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new file
        // descriptor; `fd` is a live KVM file descriptor the caller holds.
        let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(Error::Kvm("KVM_GET_STATS_FD", errno::Error::last()));
        }
        // SAFETY: `raw` is a new file descriptor that nothing else owns.
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
        let (name_size, count) = (word(&header, 4), word(&header, 8));
        let (desc_offset, data_offset) = (word(&header, 16), word(&header, 20));
        if name_size == 0 || name_size > MAX_NAME || count > MAX_STATS {
            return Err(malformed("a header out of range"));
        }
        // Each descriptor: struct kvm_stats_desc (flags, exponent, size, offset,
        // bucket_size), then its name of `name_size` bytes.
        let fixed = std::mem::size_of::<kvm_stats_desc>();
        let desc_len = fixed + name_size as usize;
        let mut descs = vec![0u8; desc_len * count as usize];
        read(&mut descs, u64::from(desc_offset))?;
        let stats = descs
            .chunks_exact(desc_len)
            .map(|desc| {
                let offset = word(desc, 8);
                let name = &desc[fixed..];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                let name = std::str::from_utf8(&name[..end])
                    .map_err(|_| malformed("a name that is not UTF-8"))?;
                Ok((name.to_owned(), u64::from(data_offset) + u64::from(offset)))
            })
            .collect::<Result<_>>()?;
        Ok(KvmStats { file, stats })
    }

    /// The names of the statistics, in KVM's order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.stats.iter().map(|(name, _)| name.as_str())
    }

    /// The current value of statistic `name` (its first bucket for a histogram), or
    /// `None` if this kernel has no such statistic.
    ///
    /// # Errors
    /// [`Error::Io`] if the value cannot be read.
    pub fn get(&self, name: &str) -> Result<Option<u64>> {
        let Some(&(_, at)) = self.stats.iter().find(|(n, _)| n == name) else {
            return Ok(None);
        };
        let mut value = [0u8; 8];
        self.file
            .read_exact_at(&mut value, at)
            .map_err(|e| Error::Io("reading KVM's statistics", e))?;
        Ok(Some(u64::from_ne_bytes(value)))
    }
}
