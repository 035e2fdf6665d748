// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Conversion requests that arrive from the guest: `KVM_EXIT_MEMORY_FAULT` and the
//! `KVM_HC_MAP_GPA_RANGE` hypercall (TDX MapGPA and SEV-SNP page-state changes reach
//! userspace this way). Guest input is untrusted: every field is checked, and a bad
//! request gets the error code KVM's ABI defines, never a panic.

use guest_memfd::{PageRange, PAGE_SIZE};
use kvm_bindings::KVM_MEMORY_EXIT_FLAG_PRIVATE;

use crate::attributes::PageState;
use crate::changed_pages::ChangedPages;
use crate::convert::{without, ContentMode, ConversionReport, StepLimit, Undone};
use crate::error::{Error, Result};
use crate::guard::DirtyBitmap;
use crate::memory::{gpa, PrivateMemoryManager};

/// `KVM_MAP_GPA_RANGE_PAGE_SZ_2M` (`include/uapi/linux/kvm_para.h`).
pub const MAP_GPA_RANGE_PAGE_SZ_2M: u64 = 1 << 0;
/// `KVM_MAP_GPA_RANGE_PAGE_SZ_1G` (`include/uapi/linux/kvm_para.h`).
pub const MAP_GPA_RANGE_PAGE_SZ_1G: u64 = 1 << 1;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED` (`include/uapi/linux/kvm_para.h`): make the range private.
pub const MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// Every attribute bit the ABI defines.
pub const MAP_GPA_RANGE_KNOWN: u64 =
    MAP_GPA_RANGE_PAGE_SZ_2M | MAP_GPA_RANGE_PAGE_SZ_1G | MAP_GPA_RANGE_ENCRYPTED;

/// `KVM_EINVAL` (`include/uapi/linux/kvm_para.h`): the hypercall's arguments are invalid.
pub const KVM_EINVAL: u64 = libc::EINVAL as u64;
/// `KVM_EFAULT` (`include/uapi/linux/kvm_para.h`): the hypercall could not be carried out.
pub const KVM_EFAULT: u64 = libc::EFAULT as u64;
/// `KVM_ENOSYS` (`include/uapi/linux/kvm_para.h`): no such hypercall.
pub const KVM_ENOSYS: u64 = 1000;
/// `EAGAIN`: the conversion could not be done now and was rolled back; the guest may
/// retry. `kvm_para.h` defines no retry code; this is the errno, as KVM's own hypercall
/// answers are. What a vendor path makes of it (TDX's MapGPA has
/// `TDG.VP.VMCALL_RETRY`) depends on the kernel's completion of the exit: check yours.
pub const KVM_EAGAIN: u64 = libc::EAGAIN as u64;

/// Why a guest's request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The address is not page-aligned.
    #[error("gpa {0:#x} is not page-aligned")]
    Unaligned(u64),
    /// Zero pages (or a zero-size fault).
    #[error("the request covers no page")]
    Empty,
    /// The range wraps around the address space.
    #[error("gpa {gpa:#x} plus {pages:#x} pages overflows")]
    Overflow {
        /// The address.
        gpa: u64,
        /// The page count.
        pages: u64,
    },
    /// Attribute bits the ABI does not define, or both page-size bits.
    #[error("attributes {0:#x} are not defined by KVM_HC_MAP_GPA_RANGE")]
    BadAttributes(u64),
    /// Memory-fault flags other than `KVM_MEMORY_EXIT_FLAG_PRIVATE`.
    #[error("memory-fault flags {0:#x} are unknown")]
    BadFlags(u64),
    /// A hypercall other than `KVM_HC_MAP_GPA_RANGE`: not a conversion request.
    #[error("hypercall {0} is not KVM_HC_MAP_GPA_RANGE")]
    UnknownHypercall(u64),
}

impl RequestError {
    /// The error code a guest's hypercall returns for this (a negative errno in `rax`,
    /// as KVM itself answers): `-KVM_ENOSYS` for an unknown hypercall, `-KVM_EINVAL`
    /// otherwise.
    pub fn hypercall_code(&self) -> u64 {
        match self {
            RequestError::UnknownHypercall(_) => KVM_ENOSYS.wrapping_neg(),
            _ => KVM_EINVAL.wrapping_neg(),
        }
    }
}

impl Error {
    /// What a guest's `KVM_HC_MAP_GPA_RANGE` returns in `rax` when serving it failed with
    /// this error: `-KVM_EINVAL` for a malformed request or one outside guest memory,
    /// `-KVM_EAGAIN` if a host access still held the pages, or the kernel lacked memory
    /// for the barrier that waits for them (rolled back; the guest may retry),
    /// `-KVM_ENOSYS` for another hypercall, `-KVM_EFAULT` for anything else (the
    /// conversion failed; it was rolled back, except what a [`Error::RollbackFailed`]
    /// names).
    pub fn hypercall_code(&self) -> u64 {
        match self {
            Error::BadRequest(e) => e.hypercall_code(),
            Error::OutsideGuestMemory { .. } | Error::Reentrant { .. } => KVM_EINVAL.wrapping_neg(),
            Error::HostAccessInFlight { .. } => KVM_EAGAIN.wrapping_neg(),
            Error::HostAccessBarrier { source, .. }
                if source.raw_os_error() == Some(libc::ENOMEM) =>
            {
                KVM_EAGAIN.wrapping_neg()
            }
            _ => KVM_EFAULT.wrapping_neg(),
        }
    }
}

/// A checked request: make `range` `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConversionRequest {
    /// The guest-physical range.
    pub range: PageRange,
    /// The state asked for.
    pub to: PageState,
}

fn range_of(
    gpa: u64,
    bytes_or_pages: u64,
    pages: bool,
) -> std::result::Result<PageRange, RequestError> {
    if gpa % PAGE_SIZE != 0 {
        return Err(RequestError::Unaligned(gpa));
    }
    if bytes_or_pages == 0 {
        return Err(RequestError::Empty);
    }
    let overflow = RequestError::Overflow {
        gpa,
        pages: bytes_or_pages,
    };
    let len = if pages {
        bytes_or_pages.checked_mul(PAGE_SIZE).ok_or(overflow)?
    } else {
        // A fault's size is a page (or a huge page): round up to whole pages.
        bytes_or_pages
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(overflow)?
    };
    PageRange::new(gpa, len).map_err(|_| overflow)
}

impl ConversionRequest {
    /// From a `KVM_EXIT_MEMORY_FAULT` exit (`VcpuExit::MemoryFault { flags, gpa, size }`):
    /// the guest accessed `[gpa, gpa + size)` as private (flag set) or shared (clear),
    /// and KVM's view disagreed, so the range should become what the guest used.
    ///
    /// # Errors
    ///
    /// [`RequestError::BadFlags`] for flags other than `KVM_MEMORY_EXIT_FLAG_PRIVATE`;
    /// [`RequestError::Unaligned`], [`RequestError::Empty`] or [`RequestError::Overflow`]
    /// for a range KVM's ABI does not allow.
    pub fn from_memory_fault(
        flags: u64,
        gpa: u64,
        size: u64,
    ) -> std::result::Result<Self, RequestError> {
        let private = u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE);
        if flags & !private != 0 {
            return Err(RequestError::BadFlags(flags));
        }
        Ok(ConversionRequest {
            range: range_of(gpa, size, false)?,
            to: if flags & private != 0 {
                PageState::Private
            } else {
                PageState::Shared
            },
        })
    }

    /// From `KVM_HC_MAP_GPA_RANGE` arguments: `gpa` (rbx), `pages` (rcx, 4 KiB pages
    /// whatever the page-size hint), `attributes` (rdx: bit 4 encrypted, bits 0-1 the
    /// page-size hint, which is checked but not needed).
    ///
    /// # Errors
    ///
    /// [`RequestError::BadAttributes`] for attribute bits the hypercall does not define,
    /// or both page-size hints at once; [`RequestError::Unaligned`],
    /// [`RequestError::Empty`] or [`RequestError::Overflow`] for a range the ABI does
    /// not allow.
    pub fn from_map_gpa_range(
        gpa: u64,
        pages: u64,
        attributes: u64,
    ) -> std::result::Result<Self, RequestError> {
        let both_sizes = MAP_GPA_RANGE_PAGE_SZ_2M | MAP_GPA_RANGE_PAGE_SZ_1G;
        if attributes & !MAP_GPA_RANGE_KNOWN != 0 || attributes & both_sizes == both_sizes {
            return Err(RequestError::BadAttributes(attributes));
        }
        Ok(ConversionRequest {
            range: range_of(gpa, pages, true)?,
            to: if attributes & MAP_GPA_RANGE_ENCRYPTED != 0 {
                PageState::Private
            } else {
                PageState::Shared
            },
        })
    }
}

/// Changed runs one step of a guest's request may convert under one hold of the
/// conversion lock: each costs a punch (and, dual, a `KVM_SET_MEMORY_ATTRIBUTES`), a few
/// microseconds, so without listeners a step holds the lock for milliseconds at most.
/// Listeners add their own time per changed run: each is called once per run that
/// changes (`discard` or `populate`), so a device mapper that waits on a device or
/// another process (an IOMMU unmap, a vhost-user backend's acknowledgement, up to its
/// reply timeout) holds the lock for up to that many times its own wait.
pub const GUEST_RUNS_PER_STEP: u64 = 1024;
/// Changed bytes one step of a guest's request may convert: punching memory the guest
/// touched costs time per byte (about 75 ms per GiB here).
pub const GUEST_BYTES_PER_STEP: u64 = 256 << 20;

/// Whether one step surely serves `range` whole: it has no more pages (so no more
/// changed runs, and fewer bytes) than a step may take.
fn fits_one_step(range: PageRange) -> bool {
    range.page_count() <= GUEST_RUNS_PER_STEP
}

impl<B: DirtyBitmap> PrivateMemoryManager<B> {
    /// Serves a checked guest request: converts its range in steps of at most
    /// [`GUEST_RUNS_PER_STEP`] changed runs and [`GUEST_BYTES_PER_STEP`] changed bytes,
    /// each under one hold of the conversion lock, so that a guest that fragments its
    /// memory cannot hold the lock (and other vCPUs' conversions) for long, and the host
    /// memory a step costs stays bounded whatever the request's size. The whole range is
    /// checked to lie in guest memory before any step.
    ///
    /// The request is all or nothing, as one `KVM_HC_MAP_GPA_RANGE` exit is to every
    /// path of KVM that makes one: the generic hypercall hands the guest nothing but
    /// `rax`; TDX's MapGPA gives the guest the start of the failed exit's range (each exit
    /// at most 2 MiB) and SEV-SNP's page-state change the first entry of the failed
    /// exit's batch, with the exits before counted as done. So if a step fails, the
    /// steps before it are undone: the pages they changed go back to their old state
    /// (empty, as any conversion leaves them). Served in one step (every exit up to
    /// 4 MiB) nothing needs undoing; a longer request records the pages its steps change,
    /// one bit per page in chunks of 128 MiB allocated where a step changed any: at most
    /// 1/32768 of the range it spans. Other conversions (another vCPU's requests, the
    /// VMM's) may run between its steps; the undo puts back what this request changed,
    /// also where another changed it again in between (a guest converting one page
    /// from two vCPUs at once gets one of the outcomes, here the undo's).
    ///
    /// # Errors
    ///
    /// As [`PrivateMemoryManager::convert`], the request undone. If undoing a step
    /// fails too, [`Error::RollbackFailed`] names the pages left in the state asked for:
    /// `kept_shared` (a request for shared pages) or `kept_private`.
    pub fn serve_request(&self, request: ConversionRequest) -> Result<ConversionReport> {
        self.check_inside(request.range)?;
        let mut report = ConversionReport::default();
        // A request one step serves is undone by that step's own rollback.
        let recording = !fits_one_step(request.range);
        let mut changed = ChangedPages::new(request.range.start());
        let mut step_runs = Vec::new();
        let served = Self::in_steps(request.range, |rest| {
            let started = std::time::Instant::now();
            let (step, next) = self.convert_step(
                rest,
                request.to,
                ContentMode::Discard,
                StepLimit::GUEST,
                recording.then_some(&mut step_runs),
            )?;
            report.absorb(&step, started.elapsed());
            step_runs.drain(..).for_each(|run| changed.mark(run));
            Ok(next)
        });
        match served {
            Ok(()) => Ok(report),
            Err(e) if changed.is_empty() => Err(e),
            Err(e) => Err(self.undo_request(&changed, request.to, e)),
        }
    }

    /// Puts the pages `changed` records, which the done steps of a request for `to`
    /// changed, back to the other state, and returns the request's error with what could
    /// not be put back.
    #[cold]
    fn undo_request(&self, changed: &ChangedPages, to: PageState, cause: Error) -> Error {
        let back = to.flipped();
        // The failing step's own rollback may have left pages too: they join the lists
        // at the top, with the step's cause.
        let (cause, mut undone) = match cause {
            Error::RollbackFailed {
                cause,
                unknown,
                listeners_refused,
                kept_shared,
                kept_private,
            } => (
                *cause,
                Undone {
                    unknown: unknown.into_vec(),
                    listeners_refused: listeners_refused.into_vec(),
                    kept_shared: kept_shared.into_vec(),
                    kept_private: kept_private.into_vec(),
                },
            ),
            other => (other, Undone::default()),
        };
        for run in changed.runs() {
            let result = Self::in_steps(run, |rest| {
                self.convert_step(rest, back, ContentMode::Discard, StepLimit::GUEST, None)
                    .map(|(_, next)| next)
            });
            let Err(e) = result else { continue };
            if let Error::RollbackFailed {
                unknown,
                listeners_refused,
                ..
            } = e
            {
                undone.unknown.extend(unknown.iter());
                undone.listeners_refused.extend(listeners_refused.iter());
            }
            let shared: Vec<PageRange> = crate::shared_runs::shared_runs(&*self.listed(), run)
                .map(|r| r.guest_range())
                .collect();
            match to {
                PageState::Shared => undone.kept_shared.extend(shared.into_iter().map(gpa)),
                PageState::Private => undone
                    .kept_private
                    .extend(without(&[run], &shared).into_iter().map(gpa)),
            }
        }
        undone.into_error(cause)
    }

    /// Serves a `KVM_EXIT_MEMORY_FAULT`: converts the faulting range to what the guest
    /// used. Then re-enter the vCPU.
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] for flags or a range KVM's ABI does not allow; otherwise as
    /// [`PrivateMemoryManager::serve_request`].
    pub fn serve_memory_fault(&self, flags: u64, gpa: u64, size: u64) -> Result<ConversionReport> {
        let request = ConversionRequest::from_memory_fault(flags, gpa, size)?;
        self.serve_request(request)
    }

    /// The old name of [`PrivateMemoryManager::serve_memory_fault`].
    ///
    /// # Errors
    ///
    /// As [`PrivateMemoryManager::serve_memory_fault`].
    #[deprecated(
        note = "renamed serve_memory_fault: serve_* returns a Result, handle_* the guest's rax"
    )]
    pub fn handle_memory_fault(&self, flags: u64, gpa: u64, size: u64) -> Result<ConversionReport> {
        self.serve_memory_fault(flags, gpa, size)
    }

    /// Serves a hypercall by the KVM register ABI: `nr` (rax) and its first three
    /// arguments (rbx, rcx, rdx). Returns the value for the guest's rax:
    /// `KVM_HC_MAP_GPA_RANGE` is served by [`PrivateMemoryManager::handle_map_gpa_range`], any
    /// other number answers `-KVM_ENOSYS`.
    ///
    /// This is the one entry point for conversion requests however they arrive: a
    /// `KVM_EXIT_HYPERCALL` exit (`nr` and `args` of `VcpuExit::Hypercall`, the answer
    /// into its `ret`), or the same registers carried over another transport (port I/O
    /// on hosts whose hypercall exits do not reach userspace).
    ///
    /// [`PrivateMemoryManager::serve_hypercall`] does the same and says why it refused.
    ///
    /// Over port I/O the registers are not in the exit: read them once the `out` exits,
    /// serve, write the answer into `rax`, then re-enter (KVM has already stepped past the
    /// instruction):
    ///
    /// ```no_run
    /// use kvm_ioctls::{VcpuExit, VcpuFd};
    /// use vm_private_memory::PrivateMemoryManager;
    ///
    /// /// The port this VMM's guests write to instead of `vmcall`.
    /// const HYPERCALL_PORT: u16 = 0x5fe;
    ///
    /// fn run(memory: &PrivateMemoryManager, vcpu: &mut VcpuFd) {
    ///     loop {
    ///         let port = match vcpu.run().unwrap() {
    ///             VcpuExit::IoOut(port, _) => port,
    ///             _ => continue, // MMIO, other exits...
    ///         };
    ///         if port == HYPERCALL_PORT {
    ///             let mut regs = vcpu.get_regs().unwrap();
    ///             regs.rax = memory.handle_hypercall(regs.rax, [regs.rbx, regs.rcx, regs.rdx]);
    ///             vcpu.set_regs(&regs).unwrap();
    ///         }
    ///     }
    /// }
    /// ```
    pub fn handle_hypercall(&self, nr: u64, args: [u64; 3]) -> u64 {
        self.serve_hypercall(nr, args)
            .map_or_else(|e| e.hypercall_code(), |_| 0)
    }

    /// Serves a hypercall as [`PrivateMemoryManager::handle_hypercall`] does, and returns what
    /// it did, or why it refused; the guest's `rax` for either is `0` or
    /// [`Error::hypercall_code`].
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] with [`RequestError::UnknownHypercall`] for another
    /// hypercall (nothing done); otherwise as [`PrivateMemoryManager::serve_map_gpa_range`].
    pub fn serve_hypercall(&self, nr: u64, args: [u64; 3]) -> Result<ConversionReport> {
        if nr != guest_memfd::uapi::KVM_HC_MAP_GPA_RANGE {
            return Err(RequestError::UnknownHypercall(nr).into());
        }
        self.serve_map_gpa_range(args[0], args[1], args[2])
    }

    /// Serves a `KVM_HC_MAP_GPA_RANGE` hypercall's arguments and returns what it did.
    ///
    /// # Errors
    ///
    /// [`Error::BadRequest`] for arguments the ABI does not allow (nothing done);
    /// otherwise as [`PrivateMemoryManager::serve_request`].
    pub fn serve_map_gpa_range(
        &self,
        gpa: u64,
        pages: u64,
        attributes: u64,
    ) -> Result<ConversionReport> {
        let request = ConversionRequest::from_map_gpa_range(gpa, pages, attributes)?;
        self.serve_request(request)
    }

    /// Serves a `KVM_HC_MAP_GPA_RANGE` hypercall and returns the value for the guest's
    /// `rax` (`KVM_EXIT_HYPERCALL`'s `ret`): 0 on success, `-KVM_EINVAL` for a malformed
    /// or out-of-memory request, `-KVM_EAGAIN` if a host access still held the pages, or
    /// the barrier that waits for them was short of memory (the conversion was rolled
    /// back; the guest may retry), `-KVM_EFAULT` if the conversion
    /// itself failed (it was rolled back, except what a [`Error::RollbackFailed`] names:
    /// [`PrivateMemoryManager::serve_map_gpa_range`] says why).
    pub fn handle_map_gpa_range(&self, gpa: u64, pages: u64, attributes: u64) -> u64 {
        self.serve_map_gpa_range(gpa, pages, attributes)
            .map_or_else(|e| e.hypercall_code(), |_| 0)
    }
}
