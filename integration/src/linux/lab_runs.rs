// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Linux guests in the nested lab: runs that must reach a line of their console (a run
//! that hangs or stops before it, the lab's emulated CPU now and then, on every backing:
//! [`super::LAB_BOOT_ATTEMPTS`], is reported and booted again), the converting guest's
//! images, and the fields of the guest's report lines.

use std::path::PathBuf;

use guest_memfd::Capabilities;

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

/// The lab's converting guest (`fixtures/lab/converting-guest-7.3.patch`): its kernel
/// (`$PRIVMEM_CONVERTING_KERNEL`, by default `/lab/guest/vmlinuz-converting`) and the
/// guest's initramfs ([`super::lab_guest_images`]), if this host can run it; otherwise
/// what it lacks, for a SKIPPED line.
///
/// It needs a VM for private memory that runs guest kernels natively (the dual strategy,
/// or in place where `PRIVMEM_STRATEGY=in-place` asks: our hosts emulate guest CPL0 code)
/// and forwards `KVM_HC_MAP_GPA_RANGE` to the VMM: the nested lab has both.
pub fn lab_converting_guest() -> std::result::Result<(PathBuf, PathBuf), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("no /dev/kvm: {e}"))?;
    let vm = crate::private_memory_vm(&kvm).map_err(|e| e.to_string())?;
    let caps = Capabilities::of_vm(&vm);
    let in_place = std::env::var_os(crate::STRATEGY_VAR).is_some() && caps.in_place_capable();
    if !caps.dual_capable() && !in_place {
        return Err("needs a VM type with KVM_MEMORY_ATTRIBUTE_PRIVATE, or \
                    PRIVMEM_STRATEGY=in-place on a KVM that runs guest kernels natively; of \
                    our machines only the nested lab has either (bash fixtures/lab/run.sh)"
            .into());
    }
    if !caps.map_gpa_range_exit() {
        return Err(
            "KVM does not forward KVM_HC_MAP_GPA_RANGE (KVM_CAP_EXIT_HYPERCALL (201) \
                    lacks bit 12): the guest's conversions would never reach the VMM"
                .into(),
        );
    }
    let kernel = PathBuf::from(
        std::env::var_os("PRIVMEM_CONVERTING_KERNEL")
            .unwrap_or_else(|| "/lab/guest/vmlinuz-converting".into()),
    );
    match super::lab_guest_images() {
        Some((_, initrd)) if kernel.exists() => Ok((kernel, initrd)),
        _ => Err(format!(
            "no converting guest kernel at {} or no guest initramfs in /lab/guest (the \
             nested lab builds and puts them there)",
            kernel.display()
        )),
    }
}

/// The value of `name=` in a line the guest printed (`PRIVMEM-... name=value ...`).
pub fn console_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_is_found_by_its_whole_name() {
        let line = "PRIVMEM-X calls=3 failed_calls=1 status=0 empty= tail";
        assert_eq!(console_field(line, "calls"), Some("3"));
        assert_eq!(console_field(line, "failed_calls"), Some("1"));
        assert_eq!(console_field(line, "empty"), Some(""));
        assert_eq!(console_field(line, "call"), None);
        assert_eq!(console_field(line, "tail"), None);
    }
}
