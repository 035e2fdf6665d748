// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Running a [`LinuxVm`]: its vCPU's exits, served until the guest stops or its
//! deadline passes.

use std::time::{Duration, Instant};

use kvm_ioctls::VcpuExit;

use super::conversions::{self, ConversionStats, Served};
use super::disk::{disk_read, disk_write};
use super::watchdog::{Progress, Watchdog};
use super::{tail, GuestRam, LinuxVm, PortEffect};
use crate::error::{Error, Result};

/// Why a guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinuxExit {
    /// It asked for a reset through the i8042 or the PCI reset register: Linux's
    /// `reboot` (with `reboot=k` or `reboot=p`), or `panic=-1` after a panic.
    Reset,
    /// It powered off through ACPI (S5): Linux's `poweroff`.
    PowerOff,
    /// `KVM_EXIT_SHUTDOWN`: a triple fault, Linux's last resort when a reset request is
    /// not honoured.
    TripleFault,
    /// `KVM_EXIT_SYSTEM_EVENT` of the given type (`KVM_SYSTEM_EVENT_SHUTDOWN` = 1,
    /// `_RESET` = 2, `_CRASH` = 3).
    SystemEvent(u32),
}

/// How a run went.
#[derive(Clone, Copy, Debug)]
pub struct LinuxRun {
    /// Why the guest stopped.
    pub exit: LinuxExit,
    /// From the first `KVM_RUN` to the stop.
    pub elapsed: Duration,
    /// How many exits the vCPU took.
    pub exits: u64,
    /// The conversions the guest asked for: `KVM_HC_MAP_GPA_RANGE` hypercalls (a
    /// converting guest's) and `KVM_EXIT_MEMORY_FAULT` exits (a guest touching a page
    /// in the other state), served and refused.
    pub conversions: ConversionStats,
}

impl LinuxRun {
    /// Whether the guest asked for any conversion, served or refused.
    pub fn converted(&self) -> bool {
        let c = &self.conversions;
        c.hypercalls + c.hypercalls_refused + c.memory_faults > 0
    }
}

impl<M: GuestRam> LinuxVm<M> {
    /// Runs the vCPU to its next exit and serves it; `Some` when the guest stopped.
    fn step(
        &mut self,
        stats: &mut ConversionStats,
        started: Instant,
        progress: &Progress,
    ) -> Result<Option<LinuxExit>> {
        let mut exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return Ok(None),
            Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
        };
        progress.serving(match &exit {
            VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _) => *addr,
            VcpuExit::IoIn(port, _) | VcpuExit::IoOut(port, _) => u64::from(*port),
            VcpuExit::Hypercall(call) => call.args[0],
            VcpuExit::MemoryFault { gpa, .. } => *gpa,
            _ => 0,
        });
        if let Some(memory) = self.memory.private_memory() {
            match conversions::serve(memory, &mut exit, stats, started) {
                Served::NotConversion => {}
                Served::GoOn => return Ok(None),
                Served::Stop(e) => return Err(e.into()),
            }
        }
        let effect = match exit {
            VcpuExit::IoOut(port, data) => self.devices.write(port, data),
            VcpuExit::IoIn(port, data) => {
                self.devices.read(port, data);
                PortEffect::None
            }
            // The disk's registers, if it has one; elsewhere reads find nothing and
            // writes go nowhere.
            VcpuExit::MmioRead(addr, data) => {
                if !disk_read::<M>(&mut self.disk, addr, data) {
                    data.fill(0xff);
                }
                PortEffect::None
            }
            VcpuExit::MmioWrite(addr, data) => {
                disk_write::<M>(&mut self.disk, &self.vm, addr, data)?;
                PortEffect::None
            }
            VcpuExit::Hlt => PortEffect::None,
            VcpuExit::Shutdown => return Ok(Some(LinuxExit::TripleFault)),
            VcpuExit::SystemEvent(kind, _) => return Ok(Some(LinuxExit::SystemEvent(kind))),
            other => {
                // A conversion request reaches here only on anonymous memory, where
                // nothing asked KVM for hypercall exits and no page is private.
                let exit = format!("{other:?}");
                return Err(self.unexpected_exit(exit));
            }
        };
        Ok(match effect {
            PortEffect::Reset => Some(LinuxExit::Reset),
            PortEffect::PowerOff => Some(LinuxExit::PowerOff),
            PortEffect::None => None,
        })
    }

    fn unexpected_exit(&self, exit: String) -> Error {
        let rip = self.vcpu.get_regs().map_or(0, |regs| regs.rip);
        Error::UnexpectedExit { exit, rip }
    }

    fn timeout(&self, deadline: Duration, exits: u64) -> Error {
        Error::Timeout {
            deadline,
            exits,
            rip: self.vcpu.get_regs().map_or(0, |regs| regs.rip),
            console_tail: tail(&self.console.text(), 2000),
        }
    }

    /// Runs the guest until it stops or `deadline` passes (then [`Error::Timeout`]).
    /// `on_line` sees each complete console line as it arrives, while the vCPU waits:
    /// the moment to look at the guest's memory from the host side.
    ///
    /// On private memory the guest's conversion requests are served as they come
    /// ([`LinuxRun::conversions`]): a refused `KVM_HC_MAP_GPA_RANGE` gets its error
    /// answer and the guest goes on; a memory fault that cannot be served stops the run
    /// with the backend's error, as the same access would only fault again.
    pub fn run(
        &mut self,
        deadline: Duration,
        mut on_line: impl FnMut(&str, &M),
    ) -> Result<LinuxRun> {
        let watchdog = Watchdog::start(deadline)?;
        let start = Instant::now();
        let mut conversions = ConversionStats::default();
        let (mut exits, mut seen) = (0u64, 0usize);
        let exit = loop {
            if watchdog.expired() {
                return Err(self.timeout(deadline, exits));
            }
            exits += 1;
            let step = self.step(&mut conversions, start, watchdog.progress());
            watchdog.progress().back();
            match step {
                Ok(Some(exit)) => break exit,
                Ok(None) => {}
                // Past the deadline the watchdog's signals can interrupt any system
                // call: whatever failed then, the guest's time is up.
                Err(_) if watchdog.expired() => return Err(self.timeout(deadline, exits)),
                Err(e) => return Err(e),
            }
            for line in self.console.lines_since(&mut seen) {
                on_line(&line, &self.memory);
            }
        };
        Ok(LinuxRun {
            exit,
            elapsed: start.elapsed(),
            exits,
            conversions,
        })
    }
}
