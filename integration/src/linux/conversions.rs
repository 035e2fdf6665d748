// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The guest's conversion requests as the VMM serves them: `KVM_HC_MAP_GPA_RANGE`
//! hypercalls (how a TDX or SEV-SNP guest, or the lab's converting guest, shares and
//! unshares its pages) and `KVM_EXIT_MEMORY_FAULT` exits, counted and timed.
//!
//! A refused request is the guest's problem, not the VMM's: a hypercall gets its error
//! answer in `rax` and the guest goes on; the refusal is logged with its range.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;
use vm_private_memory::{ConversionReport, PrivateMemoryManager};

/// What the guest asked of its memory during a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConversionStats {
    /// `KVM_HC_MAP_GPA_RANGE` hypercalls served (answered 0).
    pub hypercalls: u64,
    /// `KVM_HC_MAP_GPA_RANGE` hypercalls refused (answered with an error code).
    pub hypercalls_refused: u64,
    /// `KVM_EXIT_MEMORY_FAULT` exits served.
    pub memory_faults: u64,
    /// Pages the served hypercalls asked to make shared, whatever their state was: what
    /// the guest believes it shared.
    pub pages_asked_shared: u64,
    /// Pages the served hypercalls asked to make private.
    pub pages_asked_private: u64,
    /// Pages made shared by the requests served (pages already shared not counted).
    pub pages_to_shared: u64,
    /// Pages made private by the requests served.
    pub pages_to_private: u64,
    /// The longest time the memory's conversion lock was held for one step of a
    /// request ([`ConversionReport::longest_lock_hold`]).
    pub longest_lock_hold: Duration,
    /// The longest time one request took to serve, lock and all.
    pub longest_request: Duration,
    /// The time spent serving requests, in all.
    pub serving: Duration,
    /// From the start of the run to the first request and to the last one served:
    /// the window in which a booting guest converts.
    pub first_request: Option<Duration>,
    /// See [`ConversionStats::first_request`].
    pub last_request: Option<Duration>,
}

impl ConversionStats {
    /// Requests served per second between the first and the last one (`None` for
    /// fewer than two, or no time between them).
    pub fn requests_per_second(&self) -> Option<f64> {
        let served = self.hypercalls + self.memory_faults;
        let window = self.last_request?.checked_sub(self.first_request?)?;
        (served >= 2 && !window.is_zero()).then(|| (served - 1) as f64 / window.as_secs_f64())
    }

    fn record(
        &mut self,
        report: &ConversionReport,
        (to_shared, asked): (bool, u64),
        took: Duration,
        at: Duration,
    ) {
        if to_shared {
            self.pages_asked_shared += asked;
            self.pages_to_shared += report.pages_changed;
        } else {
            self.pages_asked_private += asked;
            self.pages_to_private += report.pages_changed;
        }
        self.longest_lock_hold = self.longest_lock_hold.max(report.longest_lock_hold);
        self.longest_request = self.longest_request.max(took);
        self.serving += took;
        self.first_request.get_or_insert(at);
        self.last_request = Some(at);
    }
}

/// What serving one exit came to.
pub(super) enum Served {
    /// Not a conversion request: the caller's to handle.
    NotConversion,
    /// Served, or refused with the guest answered: the vCPU goes on.
    GoOn,
    /// A memory fault that could not be served: the same access would fault again.
    Stop(vm_private_memory::Error),
}

/// Serves `exit` if it is a conversion request for `memory`, counting it in `stats`;
/// `started` is when the run began. A refused hypercall is logged with its range and
/// the guest gets its error answer.
pub(super) fn serve(
    memory: &PrivateMemoryManager,
    exit: &mut VcpuExit<'_>,
    stats: &mut ConversionStats,
    started: Instant,
) -> Served {
    // KVM_MAP_GPA_RANGE_ENCRYPTED is bit 4 of the attributes; a memory fault's
    // KVM_MEMORY_EXIT_FLAG_PRIVATE is bit 3 of its flags.
    // A memory fault asks for no count of pages: 0 asked.
    let (hypercall, to_shared, asked) = match exit {
        VcpuExit::Hypercall(call) => (true, call.args[2] & (1 << 4) == 0, call.args[1]),
        VcpuExit::MemoryFault { flags, .. } => (false, *flags & (1 << 3) == 0, 0),
        _ => return Served::NotConversion,
    };
    // Copied, not formatted: a served request costs no allocation.
    let request = Request::of(exit);
    let begun = Instant::now();
    let served = memory.serve_vcpu_exit(exit);
    let took = begun.elapsed();
    match served {
        None => Served::NotConversion,
        Some(Ok(report)) => {
            if hypercall {
                stats.hypercalls += 1;
            } else {
                stats.memory_faults += 1;
            }
            stats.record(&report, (to_shared, asked), took, begun - started);
            Served::GoOn
        }
        Some(Err(e)) if hypercall => {
            stats.hypercalls_refused += 1;
            // A guest may ask for bad ranges in a loop: the log stays bounded, the
            // count does not.
            if stats.hypercalls_refused <= REFUSALS_LOGGED {
                let more = if stats.hypercalls_refused == REFUSALS_LOGGED {
                    " (further refusals are counted, not logged)"
                } else {
                    ""
                };
                eprintln!("vmm: refused the guest's {request}: {e}{more}");
            }
            Served::GoOn
        }
        Some(Err(e)) => Served::Stop(e),
    }
}

/// How many refused hypercalls of one run are logged; the rest are only counted.
const REFUSALS_LOGGED: u64 = 16;

/// A conversion request's arguments, kept to name it in the log if it is refused.
#[derive(Clone, Copy)]
enum Request {
    MapGpaRange {
        gpa: u64,
        pages: u64,
        attributes: u64,
    },
    MemoryFault {
        gpa: u64,
        size: u64,
        flags: u64,
    },
    Other,
}

impl Request {
    fn of(exit: &VcpuExit<'_>) -> Self {
        match exit {
            VcpuExit::Hypercall(call) => Request::MapGpaRange {
                gpa: call.args[0],
                pages: call.args[1],
                attributes: call.args[2],
            },
            VcpuExit::MemoryFault { flags, gpa, size } => Request::MemoryFault {
                gpa: *gpa,
                size: *size,
                flags: *flags,
            },
            _ => Request::Other,
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Request::MapGpaRange {
                gpa,
                pages,
                attributes,
            } => write!(
                f,
                "KVM_HC_MAP_GPA_RANGE of {pages} pages at guest {gpa:#x} (attributes {attributes:#x})"
            ),
            Request::MemoryFault { gpa, size, flags } => {
                write!(f, "memory fault at guest {gpa:#x}, {size:#x} bytes (flags {flags:#x})")
            }
            Request::Other => f.write_str("request"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_second_needs_two_requests_and_time_between() {
        let mut stats = ConversionStats::default();
        assert_eq!(stats.requests_per_second(), None);
        stats.hypercalls = 1;
        stats.first_request = Some(Duration::from_millis(10));
        stats.last_request = Some(Duration::from_millis(10));
        assert_eq!(stats.requests_per_second(), None);
        stats.hypercalls = 5;
        stats.last_request = Some(Duration::from_millis(210));
        assert_eq!(stats.requests_per_second(), Some(20.0));
    }

    #[test]
    fn a_report_counts_its_pages_in_its_direction_and_keeps_the_longest_times() {
        let mut stats = ConversionStats::default();
        let report = |pages, hold| {
            let mut report = ConversionReport::default();
            report.pages_changed = pages;
            report.longest_lock_hold = Duration::from_micros(hold);
            report
        };
        let ms = Duration::from_millis;
        stats.record(&report(512, 30), (true, 512), ms(2), ms(100));
        stats.record(&report(4, 90), (false, 8), ms(1), ms(150));
        stats.record(&report(1, 10), (true, 2), ms(5), ms(400));
        assert_eq!((stats.pages_to_shared, stats.pages_to_private), (513, 4));
        assert_eq!(
            (stats.pages_asked_shared, stats.pages_asked_private),
            (514, 8)
        );
        assert_eq!(stats.longest_lock_hold, Duration::from_micros(90));
        assert_eq!(stats.longest_request, ms(5));
        assert_eq!(stats.serving, ms(8));
        assert_eq!(
            (stats.first_request, stats.last_request),
            (Some(ms(100)), Some(ms(400)))
        );
    }
}
