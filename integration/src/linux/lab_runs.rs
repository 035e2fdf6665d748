// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Runs of a Linux guest in the nested lab that must reach a line of their console: a
//! run that hangs or stops before it (the lab's emulated CPU, now and then, on every
//! backing: [`super::LAB_BOOT_ATTEMPTS`]) is reported and booted again.

use super::{console_summary, GuestRam, LinuxRun, LinuxVm, LAB_BOOT_ATTEMPTS, LAB_BOOT_DEADLINE};
use crate::error::{Error, Result};

/// A finished run: the VM (its console, memory and disk to look at), how it went, and
/// whether the guest printed the line asked for.
#[derive(Debug)]
pub struct LabRun<M: GuestRam> {
    /// The VM after the run.
    pub vm: LinuxVm<M>,
    /// How the run went.
    pub run: LinuxRun,
    /// Whether the guest printed the line; only the last attempt can lack it.
    pub reached: bool,
    /// The attempts before this one that hung or stopped short.
    pub retried: u32,
}

/// Makes a VM with `new` and runs it until it stops, up to [`LAB_BOOT_ATTEMPTS`] times,
/// until a run's console has a line containing `done`. `on_line` sees every console line
/// of every attempt, with the attempt's number. Each retried attempt is printed as a
/// `{label}-HUNG` or `{label}-STOPPED-SHORT` line with the vCPU's place and what the
/// console says. The last attempt is returned whatever it printed.
///
/// # Errors
///
/// `new`'s errors, and the last attempt's run error (a timeout included); an error
/// other than a timeout stops at once.
pub fn run_until_line<M: GuestRam>(
    label: &str,
    done: &str,
    mut new: impl FnMut() -> Result<LinuxVm<M>>,
    mut on_line: impl FnMut(u32, &str, &M),
) -> Result<LabRun<M>> {
    for attempt in 1..=LAB_BOOT_ATTEMPTS {
        let last = attempt == LAB_BOOT_ATTEMPTS;
        let mut vm = new()?;
        let mut reached = false;
        let run = vm.run(LAB_BOOT_DEADLINE, |line, memory| {
            reached |= line.contains(done);
            on_line(attempt, line, memory);
        });
        match run {
            Ok(run) if reached || last => {
                return Ok(LabRun {
                    vm,
                    run,
                    reached,
                    retried: attempt - 1,
                })
            }
            Ok(run) => println!(
                "{label}-STOPPED-SHORT attempt={attempt} exit={:?} console_says={:?}",
                run.exit,
                console_summary(&vm.console().text())
            ),
            Err(Error::Timeout {
                exits,
                rip,
                console_tail,
                ..
            }) if !last => println!(
                "{label}-HUNG attempt={attempt} exits={exits} rip={rip:#x} console_says={:?}",
                console_summary(&console_tail)
            ),
            Err(e) => return Err(e),
        }
    }
    unreachable!("the last attempt returns")
}
