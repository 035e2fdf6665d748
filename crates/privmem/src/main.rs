// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `privmem`: what this host offers for KVM guest private memory.
//!
//! ```text
//! privmem probe          # a readable report
//! privmem probe --json   # the same, as JSON
//! ```
//!
//! It depends on the `guest-memfd` crate alone, so it installs on its own:
//! `cargo install --path crates/privmem` from the workspace (nothing is published on
//! crates.io). The workspace's demo (small guests on private memory, as a story) is
//! `cargo run --release -p integration --bin privmem-demo`.

#![deny(missing_debug_implementations)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guest_memfd::Report;

/// KVM guest private memory for rust-vmm VMMs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Report what this host's KVM supports for guest private memory, and what each
    /// missing capability means.
    Probe {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Probe { json } => probe(json),
    }
}

fn probe(json: bool) -> ExitCode {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!(
                "privmem: cannot open /dev/kvm: {e}. Load the kvm module and run as a user \
                 with access to /dev/kvm (root, or the kvm group)."
            );
            return ExitCode::FAILURE;
        }
    };
    let report = Report::probe(&kvm);
    let mut out = io::stdout().lock();
    let written = if json {
        serde_json::to_writer_pretty(&mut out, &report)
            .map_err(io::Error::other)
            .and_then(|()| writeln!(out))
    } else {
        write_table(&mut out, &report)
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("privmem: writing the report failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write_table(out: &mut impl Write, report: &Report) -> io::Result<()> {
    writeln!(
        out,
        "KVM guest private memory on this host (Linux {})",
        report.kernel
    )?;
    writeln!(out)?;
    let feature_width = report
        .findings
        .iter()
        .map(|f| f.feature.len())
        .max()
        .unwrap_or(0);
    let cap_width = report
        .findings
        .iter()
        .map(|f| f.capability.len())
        .max()
        .unwrap_or(0);
    for f in &report.findings {
        writeln!(
            out,
            "  {mark} {feature:<fw$}  {cap:<cw$}  {value}",
            mark = if f.available { "[yes]" } else { "[no] " },
            feature = f.feature,
            cap = f.capability,
            value = f.value,
            fw = feature_width,
            cw = cap_width,
        )?;
        writeln!(out, "        {}", f.meaning)?;
    }
    writeln!(out)?;
    writeln!(out, "VM types:")?;
    for t in &report.vm_types {
        match &t.capabilities {
            Ok(c) => writeln!(
                out,
                "  {} ({}): guest_memfd flags {}, memory attributes {:#x}",
                t.name, t.vm_type, c.guest_memfd_flags, c.memory_attributes
            )?,
            Err(e) => writeln!(out, "  {} ({}): {e}", t.name, t.vm_type)?,
        }
    }
    writeln!(out)?;
    writeln!(out, "Backing strategies:")?;
    writeln!(
        out,
        "  in-place (guest_memfd MMAP | INIT_SHARED): {}",
        if report.in_place_strategy {
            "available"
        } else {
            "not available"
        }
    )?;
    writeln!(
        out,
        "  dual (guest_memfd + sealed memfd, KVM_SET_MEMORY_ATTRIBUTES): {}",
        if report.dual_strategy {
            "available"
        } else {
            "not available"
        }
    )?;
    writeln!(out)?;
    match &report.numa_policy {
        Some(Ok(support)) => writeln!(
            out,
            "NUMA policy of guest_memfd (mbind on its mapping): {support}"
        )?,
        Some(Err(e)) => writeln!(out, "NUMA policy of guest_memfd: the probe failed: {e}")?,
        None => writeln!(out, "NUMA policy of guest_memfd: not probed")?,
    }
    Ok(())
}
