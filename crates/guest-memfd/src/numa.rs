// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! NUMA placement of a guest_memfd's memory.
//!
//! Since Linux 6.19 a guest_memfd keeps a memory policy per file range, set through a
//! shared mapping of it with `mbind(2)` (its mapping's `set_policy` operation, as for
//! shmem), and applies it to every page it allocates there, whoever faults it: the guest
//! through KVM or the host through the mapping. No KVM capability announces it, and on
//! an older kernel `mbind` on the mapping succeeds and changes nothing, so support is
//! found by behaviour ([`numa_policy_support`]): a page allocated under a policy, and
//! where the kernel says it landed.
//!
//! `mbind`, `get_mempolicy` and `set_mempolicy` are called through `libc::syscall`: libc
//! has no wrappers for them (they live in libnuma, a C library), and no maintained crate
//! offers them without it.

use std::fmt;

use vm_memory::mmap::MmapRegion;
use vmm_sys_util::errno;

use crate::error::{Error, Result};
use crate::flags::GuestMemfdFlags;
use crate::memfd::GuestMemfd;
use crate::range::{PageRange, PAGE_SIZE};
use crate::vm_ops::VmMemoryOps;

/// `MPOL_F_NODE` (`include/uapi/linux/mempolicy.h`): `get_mempolicy` returns a node.
const MPOL_F_NODE: libc::c_ulong = 1 << 0;
/// `MPOL_F_ADDR` (`include/uapi/linux/mempolicy.h`): `get_mempolicy` looks at an address.
const MPOL_F_ADDR: libc::c_ulong = 1 << 1;
/// `MPOL_F_MEMS_ALLOWED` (`include/uapi/linux/mempolicy.h`): `get_mempolicy` returns the
/// nodes the calling task may allocate on (its cpuset's).
const MPOL_F_MEMS_ALLOWED: libc::c_ulong = 1 << 2;

/// The highest node number a [`NodeSet`] holds, plus one.
pub const MAX_NODES: u32 = 64;

/// A non-empty set of NUMA node numbers below [`MAX_NODES`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "Vec<u32>", into = "Vec<u32>")]
pub struct NodeSet(u64);

impl NodeSet {
    /// The set of `nodes`.
    ///
    /// # Errors
    ///
    /// [`Error::EmptyNodeSet`] for no node; [`Error::NodeOutOfRange`] for a node number
    /// of [`MAX_NODES`] or more.
    pub fn new(nodes: &[u32]) -> Result<Self> {
        let mut mask = 0u64;
        for &node in nodes {
            if node >= MAX_NODES {
                return Err(Error::NodeOutOfRange { node });
            }
            mask |= 1 << node;
        }
        if mask == 0 {
            return Err(Error::EmptyNodeSet);
        }
        Ok(NodeSet(mask))
    }

    /// The nodes, in increasing order.
    pub fn nodes(&self) -> impl Iterator<Item = u32> + '_ {
        (0..MAX_NODES).filter(|n| self.0 & (1 << n) != 0)
    }

    /// Whether `node` is in the set.
    pub fn contains(&self, node: u32) -> bool {
        node < MAX_NODES && self.0 & (1 << node) != 0
    }
}

impl TryFrom<Vec<u32>> for NodeSet {
    type Error = Error;

    fn try_from(nodes: Vec<u32>) -> Result<Self> {
        NodeSet::new(&nodes)
    }
}

impl From<NodeSet> for Vec<u32> {
    fn from(set: NodeSet) -> Self {
        set.nodes().collect()
    }
}

impl fmt::Debug for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.nodes()).finish()
    }
}

impl fmt::Display for NodeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes: Vec<String> = self.nodes().map(|n| n.to_string()).collect();
        write!(f, "{{{}}}", nodes.join(","))
    }
}

/// Where a guest_memfd's pages are allocated: the policies of `mbind(2)` that make
/// sense for guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum NumaPolicy {
    /// Only on these nodes (`MPOL_BIND`): an allocation fails rather than go elsewhere.
    Bind(NodeSet),
    /// On this node while it has memory, else anywhere (`MPOL_PREFERRED`).
    Preferred(u32),
    /// Page by page over these nodes in turn (`MPOL_INTERLEAVE`).
    Interleave(NodeSet),
}

impl NumaPolicy {
    /// The nodes it names.
    ///
    /// # Errors
    ///
    /// [`Error::NodeOutOfRange`] for a preferred node of [`MAX_NODES`] or more.
    pub fn nodes(&self) -> Result<NodeSet> {
        match *self {
            NumaPolicy::Bind(set) | NumaPolicy::Interleave(set) => Ok(set),
            NumaPolicy::Preferred(node) => NodeSet::new(&[node]),
        }
    }

    /// Checks that every node it names has memory this process may allocate on
    /// ([`usable_nodes`]): a node that is offline, has no memory, or lies outside the
    /// process's cpuset would make `mbind` fail, or (interleaved with usable ones) be
    /// skipped without a word.
    ///
    /// # Errors
    ///
    /// [`Error::NodeOutOfRange`] for a preferred node of [`MAX_NODES`] or more;
    /// [`Error::NoSuchNode`] for a node that is not usable here; [`Error::Numa`] if the
    /// usable nodes cannot be read.
    pub fn check(&self) -> Result<()> {
        let nodes = self.nodes()?;
        let usable = usable_nodes()?;
        let missing = nodes.nodes().find(|n| !usable.contains(n));
        match missing {
            Some(node) => Err(Error::NoSuchNode { node, usable }),
            None => Ok(()),
        }
    }

    /// Sets the policy on the pages of `mapping` (a shared mapping of a guest_memfd, or
    /// of any file whose mapping keeps policies, as shmem's does): pages allocated there
    /// from now on follow it. Pages already allocated stay where they are.
    ///
    /// # Errors
    ///
    /// [`Error::Numa`] with the kernel's errno if `mbind` fails (`EINVAL` for a node
    /// outside the allowed ones, `EFAULT`/`ENOMEM` for a mapping that is gone).
    pub fn apply(&self, mapping: &MmapRegion) -> Result<()> {
        let (mode, mask) = match *self {
            NumaPolicy::Bind(set) => (libc::MPOL_BIND, set.0),
            NumaPolicy::Preferred(_) => (libc::MPOL_PREFERRED, self.nodes()?.0),
            NumaPolicy::Interleave(set) => (libc::MPOL_INTERLEAVE, set.0),
        };
        // SAFETY: mbind reads `MAX_NODES` bits from `mask`, a live u64, and changes only
        // the memory policy of the range, which is `mapping`'s own (live while borrowed);
        // no memory is read or written.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_mbind,
                mapping.as_ptr(),
                mapping.size(),
                mode as libc::c_ulong,
                &mask as *const u64,
                libc::c_ulong::from(MAX_NODES) + 1,
                0 as libc::c_ulong,
            )
        };
        if ret != 0 {
            return Err(Error::Numa {
                op: "mbind",
                source: errno::Error::last(),
            });
        }
        Ok(())
    }
}

/// The node whose memory holds the page at host address `addr` of this process, as the
/// kernel says. It reads no content, and tells only what the host kernel knows of any
/// page, a guest's private pages included (whether it is resident, and where): for a
/// TDX or SEV-SNP guest the host sees that much too, so it is a diagnostic, not a way
/// into private memory. It is safe to call with any address.
///
/// `None` if the page is not resident: a hole in a guest_memfd or memfd (never touched,
/// or discarded), a page reserved with `fallocate` ([`GuestMemfd::allocate`])
/// that nothing has touched yet (the kernel zeroes it at first use, and counts it only
/// then), or a shared-memory page swapped out. It never allocates a page that is absent
/// when it is called: it asks `mincore` first, which sees the file's pages (those KVM
/// allocated for the guest included) whether or not the host has them mapped, and only then
/// `get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`, which maps the page for reading (its
/// content is not read). A page discarded by another thread between the two is
/// allocated again: do not race it with discards. For a file mapping, `mincore` looks
/// at the file only if this process may write the file or owns it (it always may for
/// the files this crate opens read-write); otherwise the kernel reports every page
/// present, and an absent one is allocated.
///
/// # Errors
///
/// [`Error::Numa`] with the kernel's errno: `ENOMEM` from `mincore` for an address not
/// mapped, `EFAULT` from `get_mempolicy` for a page that cannot be mapped (private to
/// the guest), `ENOSYS` on a kernel without NUMA.
///
/// ```
/// use guest_memfd::node_of_page;
///
/// let page = vec![1u8; 2 * 4096];
/// let addr = (page.as_ptr() as usize).next_multiple_of(4096);
/// match node_of_page(addr) {
///     Ok(node) => assert!(node.is_some(), "a page just written is allocated"),
///     // A kernel built without NUMA.
///     Err(e) => assert_eq!(e.errno(), Some(libc::ENOSYS), "{e}"),
/// }
/// ```
pub fn node_of_page(addr: usize) -> Result<Option<u32>> {
    let page = addr & !(PAGE_SIZE as usize - 1);
    let mut resident = 0u8;
    // SAFETY: mincore writes one byte per page of the range, here one page, to
    // `resident`, which lives; it only looks the page up, never faults it in, and fails
    // with ENOMEM if the range is not mapped.
    let ret =
        unsafe { libc::mincore(page as *mut libc::c_void, PAGE_SIZE as usize, &mut resident) };
    if ret != 0 {
        return Err(Error::Numa {
            op: "mincore",
            source: errno::Error::last(),
        });
    }
    if resident & 1 == 0 {
        return Ok(None);
    }
    locate_page(page).map(Some)
}

/// `get_mempolicy(MPOL_F_NODE | MPOL_F_ADDR)`: maps the page at `addr` for reading,
/// which allocates it under its policy if it is absent, and says where it is.
fn locate_page(addr: usize) -> Result<u32> {
    let mut node: libc::c_int = -1;
    // SAFETY: get_mempolicy writes one int to `node`, which lives; with a null mask and
    // a maxnode of 0 it writes nothing else. `addr` is only looked up by the kernel,
    // which fails with EFAULT if it is not mapped; no memory is read or written there.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr,
            MPOL_F_NODE | MPOL_F_ADDR,
        )
    };
    if ret != 0 {
        return Err(Error::Numa {
            op: "get_mempolicy",
            source: errno::Error::last(),
        });
    }
    u32::try_from(node).map_err(|_| Error::Numa {
        op: "get_mempolicy",
        source: errno::Error::new(libc::EINVAL),
    })
}

/// The NUMA nodes online on this host (`/sys/devices/system/node/online`; a kernel
/// without NUMA has one, node 0).
///
/// # Errors
///
/// [`Error::Numa`] if the file exists but cannot be read or parsed.
fn online_nodes() -> Result<Vec<u32>> {
    let text = match std::fs::read_to_string("/sys/devices/system/node/online") {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![0]),
        Err(e) => {
            return Err(Error::Numa {
                op: "read /sys/devices/system/node/online",
                source: errno::Error::new(e.raw_os_error().unwrap_or(libc::EIO)),
            })
        }
    };
    parse_node_list(text.trim()).ok_or(Error::Numa {
        op: "parse /sys/devices/system/node/online",
        source: errno::Error::new(libc::EINVAL),
    })
}

/// Parses a kernel node list ("0", "0-1", "0,2-3").
fn parse_node_list(text: &str) -> Option<Vec<u32>> {
    let mut nodes = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi): (u32, u32) = (lo.parse().ok()?, hi.parse().ok()?);
                if hi < lo || hi - lo > 1 << 16 {
                    return None;
                }
                nodes.extend(lo..=hi);
            }
            None => nodes.push(part.parse().ok()?),
        }
    }
    Some(nodes)
}

/// The nodes this process may place memory on: those with memory
/// (`/sys/devices/system/node/has_memory`, or `online` on kernels without it) that its
/// cpuset allows (`get_mempolicy(MPOL_F_MEMS_ALLOWED)`). On a kernel without NUMA, node 0.
///
/// # Errors
///
/// [`Error::Numa`] if the nodes cannot be read.
pub fn usable_nodes() -> Result<Vec<u32>> {
    let with_memory = match std::fs::read_to_string("/sys/devices/system/node/has_memory") {
        Ok(text) => parse_node_list(text.trim()).ok_or(Error::Numa {
            op: "parse /sys/devices/system/node/has_memory",
            source: errno::Error::new(libc::EINVAL),
        })?,
        Err(_) => online_nodes()?,
    };
    let mut allowed = [0u64; 16];
    // SAFETY: with MPOL_F_MEMS_ALLOWED, get_mempolicy writes the allowed nodes into
    // `allowed` (1,024 bits, its whole length, as maxnode says) and nothing else; the
    // mode pointer and the address are null.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            std::ptr::null_mut::<libc::c_int>(),
            allowed.as_mut_ptr(),
            (allowed.len() * 64) as libc::c_ulong,
            std::ptr::null::<u8>(),
            MPOL_F_MEMS_ALLOWED,
        )
    };
    if ret != 0 {
        let e = errno::Error::last();
        // A kernel without NUMA: one node.
        if e.errno() == libc::ENOSYS {
            return Ok(vec![0]);
        }
        return Err(Error::Numa {
            op: "get_mempolicy(MPOL_F_MEMS_ALLOWED)",
            source: e,
        });
    }
    let is_allowed = |n: u32| {
        let n = n as usize;
        n < allowed.len() * 64 && allowed[n / 64] & (1 << (n % 64)) != 0
    };
    Ok(with_memory.into_iter().filter(|n| is_allowed(*n)).collect())
}

/// Sets the calling thread's own memory policy to `MPOL_BIND` on `node`
/// (`set_mempolicy(2)`).
fn bind_thread_to(node: u32) -> Result<()> {
    let mask = NodeSet::new(&[node])?.0;
    // SAFETY: set_mempolicy reads `MAX_NODES` bits from `mask`, a live u64, and changes
    // only the calling thread's policy.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            libc::MPOL_BIND as libc::c_ulong,
            &mask as *const u64,
            libc::c_ulong::from(MAX_NODES) + 1,
        )
    };
    if ret != 0 {
        return Err(Error::Numa {
            op: "set_mempolicy",
            source: errno::Error::last(),
        });
    }
    Ok(())
}

/// Whether this host's guest_memfd follows a memory policy set through its mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum NumaSupport {
    /// A page allocated under a policy landed on the node it named (Linux 6.19+).
    Honoured,
    /// `mbind` succeeded but the page landed elsewhere: the kernel ignores the policy.
    Ignored {
        /// The node the probe asked for.
        asked: u32,
        /// The node the page landed on.
        landed: u32,
    },
    /// This process may place memory on a single NUMA node ([`usable_nodes`]): every
    /// page lands on it whatever the policy, so support cannot be told (and does not
    /// matter; a policy is then not set at all).
    SingleNode,
    /// The VM cannot make a mappable guest_memfd (`MMAP | INIT_SHARED`), so no policy can
    /// be set through a mapping.
    NoMapping,
}

impl fmt::Display for NumaSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NumaSupport::Honoured => f.write_str("honoured (a page landed on the node its policy named)"),
            NumaSupport::Ignored { asked, landed } => write!(f, "ignored (a page bound to node {asked} landed on node {landed}; Linux 6.19+ applies it)"),
            NumaSupport::SingleNode => f.write_str("cannot tell: this process may use one NUMA node only"),
            NumaSupport::NoMapping => f.write_str("no mappable guest_memfd (MMAP | INIT_SHARED) on this VM to set it through"),
        }
    }
}

/// Finds out by behaviour whether `vm`'s guest_memfd follows a memory policy: a page of
/// a new one-page guest_memfd is bound through its mapping to one usable node and faulted
/// in by a thread whose own policy binds it to another, then looked up
/// (`get_mempolicy`, as [`node_of_page`]). Only a kernel that applies the mapping's policy puts the page on
/// the first; one that ignores it follows the thread's.
///
/// # Errors
///
/// The file layer's error if the probe's guest_memfd cannot be created or mapped, and
/// [`Error::Numa`] if a NUMA call fails.
pub fn numa_policy_support(vm: &(impl VmMemoryOps + ?Sized)) -> Result<NumaSupport> {
    let usable = usable_nodes()?;
    let (Some(&asked), Some(&other)) = (usable.first(), usable.get(1)) else {
        return Ok(NumaSupport::SingleNode);
    };
    let wanted = GuestMemfdFlags::MMAP | GuestMemfdFlags::INIT_SHARED;
    if !crate::memfd::supported_flags(vm).contains(wanted) {
        return Ok(NumaSupport::NoMapping);
    }
    let probe = GuestMemfd::create(vm, PAGE_SIZE, wanted)?;
    let mapping = probe.map_range(PageRange::new(0, PAGE_SIZE)?)?;
    NumaPolicy::Bind(NodeSet::new(&[asked])?).apply(&mapping)?;
    let addr = mapping.as_ptr() as usize;
    // The fault happens on a thread of its own, so the caller's policy stays as it was.
    let landed = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                bind_thread_to(other)?;
                locate_page(addr)
            })
            .join()
            .unwrap_or(Err(Error::Numa {
                op: "the probe thread",
                source: errno::Error::new(libc::EIO),
            }))
    })?;
    Ok(if landed == asked {
        NumaSupport::Honoured
    } else {
        NumaSupport::Ignored { asked, landed }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_node_list("0"), Some(vec![0]));
        assert_eq!(parse_node_list("0-1"), Some(vec![0, 1]));
        assert_eq!(parse_node_list("0,2-3"), Some(vec![0, 2, 3]));
        assert_eq!(parse_node_list(""), Some(vec![]));
        assert_eq!(parse_node_list("64"), Some(vec![64]));
        for bad in ["x", "1-0", "-1", "0-", "0-99999999"] {
            assert_eq!(parse_node_list(bad), None, "{bad}");
        }
    }

    #[test]
    fn node_sets_are_non_empty_and_bounded() {
        assert!(matches!(NodeSet::new(&[]), Err(Error::EmptyNodeSet)));
        assert!(matches!(
            NodeSet::new(&[0, 64]),
            Err(Error::NodeOutOfRange { node: 64 })
        ));
        let set = NodeSet::new(&[3, 1, 3]).unwrap();
        assert_eq!(set.nodes().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(set.to_string(), "{1,3}");
        let json = serde_json::to_string(&NumaPolicy::Interleave(set)).unwrap();
        assert_eq!(
            serde_json::from_str::<NumaPolicy>(&json).unwrap(),
            NumaPolicy::Interleave(set)
        );
        assert!(serde_json::from_str::<NodeSet>("[]").is_err());
    }

    #[test]
    fn a_policy_naming_a_node_the_host_lacks_is_refused() {
        let online = usable_nodes().unwrap();
        let missing = (0..MAX_NODES).find(|n| !online.contains(n)).unwrap();
        let err = NumaPolicy::Bind(NodeSet::new(&[0, missing]).unwrap())
            .check()
            .unwrap_err();
        assert!(
            matches!(err, Error::NoSuchNode { node, .. } if node == missing),
            "{err}"
        );
        assert!(matches!(
            NumaPolicy::Preferred(MAX_NODES).check(),
            Err(Error::NodeOutOfRange { .. })
        ));
        NumaPolicy::Preferred(online[0]).check().unwrap();
        assert!(matches!(
            NumaPolicy::Preferred(100).nodes(),
            Err(Error::NodeOutOfRange { node: 100 })
        ));
    }
}
