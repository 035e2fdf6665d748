// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `privmem-demo`: a guest on private memory, told as a story a VMM author reads in ten
//! seconds. It runs the integration harness's scenarios 1 (an all-private guest) and 2 (a
//! TDX-style bounce buffer) and says what the host could and could not see.

use std::io::{self, Write};
use std::time::{Duration, Instant};

use guest_memfd::PAGE_SIZE;
use integration::{
    layout, programs, resident_guest_memfd_bytes, GuestConfig, NoDevice, PrivateGuest, SumDevice,
    DATA_ADDR,
};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vm_private_memory::{
    private_page_refusal, GuestMemoryPrivate, Strategy, MAP_GPA_RANGE_ENCRYPTED,
};

const MIB: u64 = 1 << 20;

/// What the demo found; every field is checked, and a failed check is an error.
pub struct Outcome {
    /// Whether every check held.
    pub ok: bool,
}

fn kib(bytes: u64) -> String {
    format!("{} KiB", bytes / 1024)
}

fn micros(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

/// Tries to read 8 bytes at `gpa` through the backend: whether the backend refused it
/// as private, and what happened.
fn host_read(ram: &GuestMemoryPrivate, gpa: u64) -> (bool, String) {
    match ram.read_obj::<u64>(GuestAddress(gpa)) {
        Ok(v) => (false, format!("read {v:#x}")),
        Err(e) => match private_page_refusal(&e) {
            Some((_, page)) => (true, format!("refused: page {page:#x} is private")),
            None => (false, format!("failed: {e}")),
        },
    }
}

fn check(out: &mut impl Write, ok: &mut bool, held: bool, what: &str) -> io::Result<()> {
    if !held {
        *ok = false;
        writeln!(out, "   CHECK FAILED: {what}")?;
    }
    Ok(())
}

/// Runs the demo, writing the story to `out`.
pub fn run(out: &mut impl Write) -> Result<Outcome, Box<dyn std::error::Error>> {
    let mut ok = true;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    writeln!(
        out,
        "privmem-demo: guests whose RAM is KVM guest_memfd, on Linux {kernel}\n"
    )?;
    all_private_story(out, &mut ok)?;
    bounce_story(out, &mut ok)?;
    writeln!(
        out,
        "\n{}",
        if ok {
            "Every check held: private pages stayed out of the host's reach, shared pages carried the I/O."
        } else {
            "SOME CHECKS FAILED (see above)."
        }
    )?;
    writeln!(
        out,
        "\nThe same, with a whole Linux guest: the nested lab's converting guest (Linux 7.3 with \
         kvm_sw_protected) boots all-private, shares its swiotlb pool and virtqueue rings with \
         KVM_HC_MAP_GPA_RANGE hypercalls this memory serves, and does its virtio-blk I/O through \
         those bounce buffers: `bash fixtures/lab/run.sh` runs it (integration's converting_guest \
         test), `bash fixtures/lab/run.sh --bench` measures its disk throughput."
    )?;
    Ok(Outcome { ok })
}

/// Scenario 1: code, tables, stack and data private; the guest computes, the host reads
/// nothing.
fn all_private_story(
    out: &mut impl Write,
    ok: &mut bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let data = 4 * MIB;
    let t = Instant::now();
    let mut guest = PrivateGuest::new(
        programs::CHECKSUM,
        GuestConfig {
            data_size: data,
            vcpus: 1,
            all_private: true,
            data_policy: None,
        },
    )?;
    let built = t.elapsed();
    let memory = guest.memory().clone();
    writeln!(
        out,
        "1. An all-private guest ({} strategy)",
        memory.strategy()
    )?;
    if memory.strategy() == Strategy::Dual {
        writeln!(
            out,
            "   skipped: with the dual strategy the host cannot load the guest's code into private pages (a TDX or SNP launch does that)"
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "   memory: 2 MiB boot region (page tables, code, stack) + {} MiB data at {DATA_ADDR:#x}; built in {}",
        data / MIB,
        micros(built)
    )?;
    let total = (layout::BOOT_SIZE + data) / PAGE_SIZE;
    writeln!(
        out,
        "   private pages: {} of {total} -- the guest's code, tables, stack and data",
        memory.private_pages()
    )?;
    check(
        out,
        ok,
        memory.private_pages() == total,
        "every page private",
    )?;
    guest.start(0, &[DATA_ADDR, data])?;
    let t = Instant::now();
    let done = guest.vcpu(0).run_to_done(&mut NoDevice)?;
    let ran = t.elapsed();
    let words = data / 8;
    let expected = (0..words)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .fold(0u64, u64::wrapping_add)
        ^ words;
    let verdict = if done.rax == expected {
        "as the host computed"
    } else {
        "WRONG"
    };
    writeln!(
        out,
        "   the guest (CPL3) wrote and summed {} MiB in {}: checksum {:#018x} ({verdict})",
        data / MIB,
        micros(ran),
        done.rax
    )?;
    check(out, ok, done.rax == expected, "checksum")?;
    let ram = memory.guest_memory();
    for (what, gpa) in [
        ("its code", layout::CODE_ADDR),
        ("its page tables", layout::PML4_ADDR),
        ("its stack", layout::STACK_TOP - 8),
        ("its data", DATA_ADDR),
    ] {
        let (refused, said) = host_read(&ram.memory(), gpa);
        writeln!(out, "   host reads {what} at {gpa:#x}: {said}")?;
        check(out, ok, refused, "the host must be refused private memory")?;
    }
    Ok(())
}

/// Scenario 2: a bounce buffer shared, used by a device, taken back.
fn bounce_story(out: &mut impl Write, ok: &mut bool) -> Result<(), Box<dyn std::error::Error>> {
    writeln!(out, "\n2. A TDX-style bounce buffer (SWIOTLB)")?;
    let mut guest = PrivateGuest::new(
        programs::BOUNCE,
        GuestConfig {
            data_size: 4 * MIB,
            vcpus: 1,
            all_private: true,
            data_policy: None,
        },
    )?;
    let memory = guest.memory().clone();
    let buffer = DATA_ADDR + 2 * MIB;
    let resident_before = resident_guest_memfd_bytes()?;
    guest.start(0, &[buffer, 2 * MIB])?;
    let mut device = SumDevice::default();
    let done = guest.vcpu(0).run_to_done(&mut device)?;
    for call in guest.vcpu(0).served() {
        let [gpa, pages, attrs] = call.args;
        let to = if attrs & MAP_GPA_RANGE_ENCRYPTED != 0 {
            "private"
        } else {
            "shared"
        };
        writeln!(
            out,
            "   guest: KVM_HC_MAP_GPA_RANGE({gpa:#x}, {pages} pages, {to}) -> {} in {}",
            call.answer as i64,
            micros(call.elapsed)
        )?;
        check(out, ok, call.answer == 0, "conversion answered 0")?;
    }
    let expected: u64 = (0..4096u64).map(|i| (i * 7 + 3) & 0xff).sum();
    let verdict = if done.rax == expected {
        "correct"
    } else {
        "WRONG"
    };
    writeln!(
        out,
        "   device: read the guest's 4096-byte request through shared memory, answered {expected:#x}; the guest checked it: {verdict}"
    )?;
    check(
        out,
        ok,
        done.rax == expected && device.served == 1,
        "device answer",
    )?;
    writeln!(
        out,
        "   guest: after taking the buffer back, {} of its quadwords are non-zero (a fresh private page reads zero)",
        done.rbx
    )?;
    check(out, ok, done.rbx == 0, "fresh buffer")?;
    let (refused, said) = host_read(&memory.guest_memory().memory(), buffer);
    writeln!(out, "   host reads the buffer at {buffer:#x} now: {said}")?;
    check(
        out,
        ok,
        refused,
        "the host must be refused the buffer once private",
    )?;
    let resident_after = resident_guest_memfd_bytes()?;
    writeln!(
        out,
        "   guest_memfd memory held by this process: {} before the guest ran, {} after it finished",
        kib(resident_before),
        kib(resident_after)
    )?;
    Ok(())
}
