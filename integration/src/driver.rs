// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Driving `fixtures/guest/driver.S`: the host tells a running guest what to touch and
//! what to convert, one command at a time.

use crate::error::{Error, Result};
use crate::guest::{Device, GuestVcpu};
use crate::vm::StopReason;

const FILL: u64 = 1;
const CHECK: u64 = 2;
const MAP: u64 = 3;
const DONE: u64 = 4;

/// A vCPU running the driver program, stopped at its command point.
#[derive(Debug)]
pub struct Driver<'a> {
    vcpu: &'a mut GuestVcpu,
}

impl<'a> Driver<'a> {
    /// Runs `vcpu` (which must have been started on `programs::DRIVER`) to its first
    /// command point.
    pub fn new(vcpu: &'a mut GuestVcpu, device: &mut dyn Device) -> Result<Self> {
        let stop = vcpu.run(device)?;
        if stop.reason != StopReason::Pause {
            return Err(Error::UnexpectedExit {
                exit: "the driver finished before its first command".into(),
                rip: stop.regs.rip,
            });
        }
        Ok(Driver { vcpu })
    }

    fn command(
        &mut self,
        op: u64,
        addr: u64,
        len: u64,
        arg: u64,
        device: &mut dyn Device,
    ) -> Result<u64> {
        self.vcpu.update_regs(|r| {
            r.r8 = op;
            r.r9 = addr;
            r.r10 = len;
            r.r11 = arg;
        })?;
        let stop = self.vcpu.run(device)?;
        match stop.reason {
            StopReason::Pause => Ok(stop.regs.r12),
            StopReason::Done => Err(Error::UnexpectedExit {
                exit: "the driver finished while commands were pending".into(),
                rip: stop.regs.rip,
            }),
        }
    }

    /// Resumes a command that stopped with an error (for example an exit the harness
    /// could not serve) after the host has fixed its cause; returns like the command.
    pub fn resume(&mut self, device: &mut dyn Device) -> Result<u64> {
        let stop = self.vcpu.run(device)?;
        match stop.reason {
            StopReason::Pause => Ok(stop.regs.r12),
            StopReason::Done => Err(Error::UnexpectedExit {
                exit: "the driver finished while commands were pending".into(),
                rip: stop.regs.rip,
            }),
        }
    }

    /// The guest writes `byte` over `[addr, addr + len)`.
    pub fn fill(&mut self, addr: u64, len: u64, byte: u8, device: &mut dyn Device) -> Result<()> {
        self.command(FILL, addr, len, byte.into(), device).map(drop)
    }

    /// The guest checks that `[addr, addr + len)` holds `byte`; a mismatch is
    /// `Error::GuestFailed` with the address and the byte found.
    pub fn check(&mut self, addr: u64, len: u64, byte: u8, device: &mut dyn Device) -> Result<()> {
        self.command(CHECK, addr, len, byte.into(), device)
            .map(drop)
    }

    /// The guest asks, by KVM_HC_MAP_GPA_RANGE, for `[addr, addr + len)` to get
    /// `attributes`; returns the answer the guest received in rax.
    pub fn map(
        &mut self,
        addr: u64,
        len: u64,
        attributes: u64,
        device: &mut dyn Device,
    ) -> Result<u64> {
        self.command(MAP, addr, len, attributes, device)
    }

    /// The guest finishes.
    pub fn done(self, device: &mut dyn Device) -> Result<()> {
        self.vcpu.update_regs(|r| r.r8 = DONE)?;
        let stop = self.vcpu.run(device)?;
        match stop.reason {
            StopReason::Done => Ok(()),
            StopReason::Pause => Err(Error::UnexpectedExit {
                exit: "the driver paused after DONE".into(),
                rip: stop.regs.rip,
            }),
        }
    }
}
