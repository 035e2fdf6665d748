// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! `privmem-disk-load`: the disk workload the lab's Linux guest runs for the throughput
//! benchmark (`benches/disk_throughput.rs`): sequential reads and writes in 1 MiB
//! requests and random 4 KiB reads, all `O_DIRECT` on the guest's virtio-blk disk, timed
//! by the guest's own clock. It runs inside the guest (the lab packs it into the guest's
//! initramfs, `fixtures/lab/guest-init` starts it with `privmem_job=load`), not on the
//! host.
//!
//! ```text
//! privmem-disk-load DEVICE SEQUENTIAL_MIB RANDOM_READS
//! ```
//!
//! It does the work twice, a cold pass and a warm one, and prints one line,
//! `PRIVMEM-DISK-LOAD seq_read_mb_s=... seq_write_mb_s=... rand_read_iops=...` (the
//! warm pass) `cold_seq_read_mb_s=... cold_seq_write_mb_s=... cold_rand_read_iops=...
//! errors=...`, to standard output (the init script copies it to the kernel log), and
//! exits 0 if every request succeeded. The cold pass is the first to touch the pages
//! the guest's bounce buffers were given when it shared them. The sequential reads cover the
//! first SEQUENTIAL_MIB MiB of the disk, the writes the next SEQUENTIAL_MIB MiB (each
//! writes the buffer the reads left, the last MiB read), and the random reads fall
//! anywhere in those 2 * SEQUENTIAL_MIB.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::ExitCode;
use std::time::Instant;

const MIB: u64 = 1 << 20;
const RANDOM_READ: usize = 4096;
/// `O_DIRECT` wants buffers aligned to the device's logical block; a page is enough.
const ALIGN: usize = 4096;

/// A buffer of `len` bytes aligned to [`ALIGN`], carved out of a larger vector (safe
/// code: no allocator call of our own).
struct Aligned {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let storage = vec![0x5a; len + ALIGN];
        let offset = storage.as_ptr().align_offset(ALIGN);
        Aligned {
            storage,
            offset,
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// What the run measured.
#[derive(Debug, Default)]
struct Figures {
    seq_read_mb_s: f64,
    seq_write_mb_s: f64,
    rand_read_iops: f64,
    errors: u64,
    first_error: Option<String>,
}

fn rate(units: f64, since: Instant) -> f64 {
    units / since.elapsed().as_secs_f64().max(1e-9)
}

fn run(disk: &File, sequential_mib: u64, random_reads: u64) -> Figures {
    let mut figures = Figures::default();
    let note = |figures: &mut Figures, what: String| {
        figures.errors += 1;
        figures.first_error.get_or_insert(what);
    };
    let mut buf = Aligned::new(MIB as usize);
    let started = Instant::now();
    for i in 0..sequential_mib {
        if let Err(e) = disk.read_exact_at(buf.bytes(), i * MIB) {
            note(&mut figures, format!("read of 1 MiB at {} MiB: {e}", i));
        }
    }
    figures.seq_read_mb_s = rate((sequential_mib * MIB) as f64 / 1e6, started);
    let started = Instant::now();
    for i in 0..sequential_mib {
        if let Err(e) = disk.write_all_at(buf.bytes(), (sequential_mib + i) * MIB) {
            note(
                &mut figures,
                format!("write of 1 MiB at {} MiB: {e}", sequential_mib + i),
            );
        }
    }
    figures.seq_write_mb_s = rate((sequential_mib * MIB) as f64 / 1e6, started);
    let mut small = Aligned::new(RANDOM_READ);
    let blocks = (2 * sequential_mib * MIB / RANDOM_READ as u64).max(1);
    // xorshift64: the same offsets every run, spread over the whole area.
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let started = Instant::now();
    for _ in 0..random_reads {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let offset = (state % blocks) * RANDOM_READ as u64;
        if let Err(e) = disk.read_exact_at(small.bytes(), offset) {
            note(&mut figures, format!("read of 4 KiB at {offset:#x}: {e}"));
        }
    }
    figures.rand_read_iops = rate(random_reads as f64, started);
    figures
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [device, mib, reads] => mib
            .parse::<u64>()
            .ok()
            .zip(reads.parse::<u64>().ok())
            .map(|(mib, reads)| (device, mib, reads)),
        _ => None,
    };
    let Some((device, sequential_mib, random_reads)) = parsed else {
        eprintln!("usage: privmem-disk-load DEVICE SEQUENTIAL_MIB RANDOM_READS");
        return ExitCode::from(2);
    };
    let disk = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(device)
    {
        Ok(disk) => disk,
        Err(e) => {
            println!("PRIVMEM-DISK-LOAD error=cannot open {device} with O_DIRECT: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The same work twice: the first pass meets every page of the bounce buffers for the
    // first time since the guest shared them, the second runs warm.
    let cold = run(&disk, sequential_mib, random_reads);
    let warm = run(&disk, sequential_mib, random_reads);
    let errors = cold.errors + warm.errors;
    println!(
        "PRIVMEM-DISK-LOAD seq_read_mb_s={:.1} seq_write_mb_s={:.1} rand_read_iops={:.0} \
         cold_seq_read_mb_s={:.1} cold_seq_write_mb_s={:.1} cold_rand_read_iops={:.0} \
         errors={errors} first_error={:?}",
        warm.seq_read_mb_s,
        warm.seq_write_mb_s,
        warm.rand_read_iops,
        cold.seq_read_mb_s,
        cold.seq_write_mb_s,
        cold.rand_read_iops,
        cold.first_error.or(warm.first_error).unwrap_or_default()
    );
    if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_as_long_as_asked() {
        for len in [1, 4096, 1 << 20] {
            let mut buf = Aligned::new(len);
            assert_eq!(buf.bytes().len(), len);
            assert_eq!(buf.bytes().as_ptr() as usize % ALIGN, 0);
        }
    }

    #[test]
    fn the_workload_reads_what_it_wrote_where_it_said() {
        // A plain file stands in for the disk (no O_DIRECT: tmpfs may refuse it).
        let path = std::env::temp_dir().join(format!("privmem-disk-load-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let first: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
        file.write_all_at(&first, 0).unwrap();
        file.set_len(2 * MIB).unwrap();
        let figures = run(&file, 1, 16);
        assert_eq!(figures.errors, 0, "{:?}", figures.first_error);
        let mut copy = vec![0; MIB as usize];
        file.read_exact_at(&mut copy, MIB).unwrap();
        assert!(copy == first, "the write did not copy what was read");
        assert!(figures.seq_read_mb_s > 0.0 && figures.rand_read_iops > 0.0);
        // A disk that refuses writes: the write fails and is counted, the reads not.
        let read_only = File::open(&path).unwrap();
        let figures = run(&read_only, 1, 4);
        assert_eq!(figures.errors, 1, "{figures:?}");
        assert!(figures
            .first_error
            .unwrap()
            .starts_with("write of 1 MiB at 1 MiB"));
        std::fs::remove_file(path).unwrap();
    }
}
