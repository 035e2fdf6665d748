// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The CMOS real-time clock at ports 0x70 (index) and 0x71 (data): enough for Linux to
//! read the wall-clock time at boot instead of timing out on an empty bus.
//!
//! Hand-written: vm-superio offers an RTC for Arm (PL031) only. The clock reports the
//! host's UTC time in binary, 24-hour mode, never "update in progress"; the other 114
//! bytes are plain CMOS RAM.

use std::time::{SystemTime, UNIX_EPOCH};

const INDEX_MASK: u8 = 0x7f;
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;
/// Status A: 32.768 kHz time base, 1024 Hz rate, no update in progress.
const STATUS_A_VALUE: u8 = 0x26;
/// Status B: 24-hour mode, binary (not BCD) values.
const STATUS_B_VALUE: u8 = 0x02 | 0x04;
/// Status D: the battery is good.
const STATUS_D_VALUE: u8 = 0x80;

/// The CMOS clock and RAM.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        Cmos {
            index: 0,
            ram: [0; 128],
        }
    }
}

/// A UTC calendar time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Civil {
    year: u64,
    month: u8,
    day: u8,
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Seconds since the epoch as a UTC calendar time (days to civil date after Howard
/// Hinnant's algorithm); weekday 1 is Sunday, as the RTC counts.
fn civil(unix_seconds: u64) -> Civil {
    let days = unix_seconds / 86_400;
    let secs = unix_seconds % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + u64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        // 1970-01-01 was a Thursday (RTC weekday 5).
        weekday: ((days + 4) % 7 + 1) as u8,
        hour: (secs / 3600) as u8,
        minute: (secs / 60 % 60) as u8,
        second: (secs % 60) as u8,
    }
}

impl Cmos {
    /// A read at `offset` (0: the index port, 1: the data port).
    pub fn read(&mut self, offset: u8) -> u8 {
        if offset == 0 {
            return self.index;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let time = civil(now);
        match self.index {
            SECONDS => time.second,
            MINUTES => time.minute,
            HOURS => time.hour,
            WEEKDAY => time.weekday,
            DAY => time.day,
            MONTH => time.month,
            YEAR => (time.year % 100) as u8,
            CENTURY => (time.year / 100) as u8,
            STATUS_A => STATUS_A_VALUE,
            STATUS_B => STATUS_B_VALUE,
            STATUS_C => 0,
            STATUS_D => STATUS_D_VALUE,
            index => self.ram[usize::from(index)],
        }
    }

    /// A write at `offset`: the index port selects a register (bit 7, the NMI mask, is
    /// ignored); the data port writes CMOS RAM (the clock's registers stay read-only).
    pub fn write(&mut self, offset: u8, value: u8) {
        if offset == 0 {
            self.index = value & INDEX_MASK;
        } else {
            self.ram[usize::from(self.index)] = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_dates_come_out_right() {
        let epoch = civil(0);
        assert_eq!(
            (epoch.year, epoch.month, epoch.day, epoch.weekday),
            (1970, 1, 1, 5)
        );
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        let leap = civil(951_827_696);
        assert_eq!(
            leap,
            Civil {
                year: 2000,
                month: 2,
                day: 29,
                weekday: 3,
                hour: 12,
                minute: 34,
                second: 56
            }
        );
        // 2026-12-31 23:59:59 UTC, a Thursday.
        let end = civil(1_798_761_599);
        assert_eq!(
            (end.year, end.month, end.day, end.weekday),
            (2026, 12, 31, 5)
        );
        assert_eq!((end.hour, end.minute, end.second), (23, 59, 59));
    }

    #[test]
    fn the_clock_reads_as_binary_24_hour_and_never_updating() {
        let mut cmos = Cmos::default();
        let mut read = |index: u8| {
            cmos.write(0, index | 0x80);
            cmos.read(1)
        };
        assert_eq!(read(STATUS_A) & 0x80, 0, "no update in progress");
        assert_eq!(read(STATUS_B), 0x06);
        assert!(read(HOURS) < 24 && read(MINUTES) < 60 && read(SECONDS) < 60);
        assert!((1..=12).contains(&read(MONTH)) && (1..=31).contains(&read(DAY)));
        assert!(read(CENTURY) >= 20);
    }

    #[test]
    fn cmos_ram_keeps_what_is_written_and_the_clock_is_read_only() {
        let mut cmos = Cmos::default();
        cmos.write(0, 0x40);
        cmos.write(1, 0x5a);
        cmos.write(0, 0x41);
        assert_eq!(cmos.read(1), 0);
        cmos.write(0, 0x40);
        assert_eq!(cmos.read(1), 0x5a);
        assert_eq!(cmos.read(0), 0x40);
        cmos.write(0, STATUS_A);
        cmos.write(1, 0xff);
        assert_eq!(cmos.read(1), STATUS_A_VALUE);
    }
}
