// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The legacy devices a Linux guest talks to over port I/O: the 16550 console and the
//! i8042's reset line (both vm-superio), the CMOS clock, ACPI's PM1 registers and the
//! PCI reset register.
//!
//! Every other port reads as all ones (no device there) and ignores writes, the way an
//! empty ISA bus behaves, so the guest's probes find nothing and move on.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::acpi::{Pm1, SleepRequest};
use super::cmos::Cmos;

/// The first COM port.
pub const COM1: u16 = 0x3f8;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;
/// The i8042's data port; its command port is 0x64, where `0xfe` pulses the CPU reset
/// line (`reboot=k`).
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
/// The CMOS index and data ports.
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;
/// The PCI reset control register (`reboot=p`): bit 2 asks for a reset.
const RESET_CONTROL: u16 = 0xcf9;
const RESET_CONTROL_RESET: u8 = 1 << 2;

/// What a port write asks of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    /// Nothing beyond the device itself.
    None,
    /// The guest asked for a reset (reboot).
    Reset,
    /// The guest asked to be powered off (ACPI S5).
    PowerOff,
}

/// Raises COM1's interrupt through an irqfd of the in-kernel irqchip.
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Remembers that the i8042 asked for a reset, for the run loop to act on.
#[derive(Clone, Debug, Default)]
pub struct ResetLatch(Arc<AtomicBool>);

impl Trigger for ResetLatch {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

impl ResetLatch {
    fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

/// What the guest wrote to its console, shared with whoever watches the boot.
#[derive(Clone, Debug, Default)]
pub struct ConsoleLog {
    bytes: Arc<Mutex<Vec<u8>>>,
    echo: bool,
}

impl ConsoleLog {
    /// A log that also copies the guest's console to our standard output if `echo`.
    pub fn new(echo: bool) -> Self {
        ConsoleLog {
            bytes: Arc::default(),
            echo,
        }
    }

    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The complete lines written since byte `*from` (each decoded on its own, lossily,
    /// without its line ending); moves `*from` past the last one.
    pub fn lines_since(&self, from: &mut usize) -> Vec<String> {
        let bytes = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(new) = bytes.get(*from..) else {
            return Vec::new();
        };
        let Some(last) = new.iter().rposition(|&b| b == b'\n') else {
            return Vec::new();
        };
        let lines = new[..last]
            .split(|&b| b == b'\n')
            .map(|line| String::from_utf8_lossy(line).trim_end().to_owned())
            .collect();
        *from += last + 1;
        lines
    }

    /// How many bytes were written so far.
    pub fn len(&self) -> usize {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        if self.echo {
            // The console copy is best effort; the log above is what tests read.
            let _ = io::stdout().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The guest's port-I/O devices.
#[derive(Debug)]
pub struct LegacyDevices {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleLog>,
    i8042: I8042Device<ResetLatch>,
    reset: ResetLatch,
    cmos: Cmos,
    pm1: Pm1,
}

impl LegacyDevices {
    /// COM1 writing to `console`, interrupting through `irq` (an irqfd for
    /// [`COM1_IRQ`]), the i8042 and the CMOS clock.
    pub fn new(irq: EventFd, console: ConsoleLog) -> Self {
        let reset = ResetLatch::default();
        LegacyDevices {
            serial: Serial::new(IrqTrigger(irq), console),
            i8042: I8042Device::new(reset.clone()),
            reset,
            cmos: Cmos::default(),
            pm1: Pm1::default(),
        }
    }

    /// A port read of `data.len()` bytes.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if Pm1::serves(port) {
            return self.pm1.read(port, data);
        }
        if data.len() != 1 {
            return;
        }
        match port {
            COM1..=0x3ff => data[0] = self.serial.read((port - COM1) as u8),
            // Reads 0: output and input buffers empty, so a kernel waiting to send the
            // reset command does not spin.
            I8042_DATA..=I8042_COMMAND => data[0] = self.i8042.read((port - I8042_DATA) as u8),
            CMOS_INDEX..=CMOS_DATA => data[0] = self.cmos.read((port - CMOS_INDEX) as u8),
            _ => {}
        }
    }

    /// A port write; returns what it asks of the machine.
    pub fn write(&mut self, port: u16, data: &[u8]) -> PortEffect {
        let Some(&value) = data.first() else {
            return PortEffect::None;
        };
        if Pm1::serves(port) {
            return match self.pm1.write(port, data) {
                SleepRequest::PowerOff => PortEffect::PowerOff,
                SleepRequest::None => PortEffect::None,
            };
        }
        match port {
            COM1..=0x3ff if data.len() == 1 => {
                // A serial write can fail only to raise the interrupt; the guest's driver
                // times out and polls then, so the console still works.
                let _ = self.serial.write((port - COM1) as u8, value);
            }
            I8042_DATA..=I8042_COMMAND => {
                // The reset trigger is a latch: it cannot fail.
                let _ = self.i8042.write((port - I8042_DATA) as u8, value);
                if self.reset.take() {
                    return PortEffect::Reset;
                }
            }
            CMOS_INDEX..=CMOS_DATA => self.cmos.write((port - CMOS_INDEX) as u8, value),
            RESET_CONTROL if value & RESET_CONTROL_RESET != 0 => return PortEffect::Reset,
            _ => {}
        }
        PortEffect::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (LegacyDevices, ConsoleLog, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let console = ConsoleLog::new(false);
        let devices = LegacyDevices::new(irq.try_clone().unwrap(), console.clone());
        (devices, console, irq)
    }

    #[test]
    fn the_console_keeps_what_the_guest_writes() {
        let (mut devices, console, _irq) = devices();
        for byte in b"hi\n" {
            assert_eq!(devices.write(COM1, &[*byte]), PortEffect::None);
        }
        assert_eq!(console.text(), "hi\n");
    }

    #[test]
    fn lines_come_whole_even_when_a_character_arrives_byte_by_byte() {
        let (mut devices, console, _irq) = devices();
        let mut from = 0;
        let mut lines = Vec::new();
        for byte in "ab\u{e9}\r\nMARK x\npartial".bytes() {
            devices.write(COM1, &[byte]);
            lines.extend(console.lines_since(&mut from));
        }
        assert_eq!(lines, ["ab\u{e9}", "MARK x"]);
        assert_eq!(from, "ab\u{e9}\r\nMARK x\n".len());
        devices.write(COM1, b"\n");
        assert_eq!(console.lines_since(&mut from), ["partial"]);
        assert!(console.lines_since(&mut from).is_empty());
    }

    #[test]
    fn an_enabled_transmit_interrupt_reaches_the_irqfd() {
        let (mut devices, _console, irq) = devices();
        // IER: transmitter-holding-register-empty interrupt on.
        devices.write(COM1 + 1, &[0x02]);
        devices.write(COM1, b"x");
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn reset_requests_are_recognised_and_nothing_else_is() {
        let (mut devices, _console, _irq) = devices();
        assert_eq!(devices.write(I8042_COMMAND, &[0xfe]), PortEffect::Reset);
        assert_eq!(devices.write(I8042_COMMAND, &[0xaa]), PortEffect::None);
        assert_eq!(devices.write(RESET_CONTROL, &[0x06]), PortEffect::Reset);
        assert_eq!(devices.write(RESET_CONTROL, &[0x02]), PortEffect::None);
        assert_eq!(devices.write(0x80, &[0xfe]), PortEffect::None);
        assert_eq!(devices.write(I8042_COMMAND, &[]), PortEffect::None);
    }

    #[test]
    fn empty_ports_read_as_all_ones_and_the_i8042_as_idle() {
        let (mut devices, _console, _irq) = devices();
        let mut data = [0u8; 4];
        devices.read(0xcf8, &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut status = [0xffu8];
        devices.read(I8042_COMMAND, &mut status);
        assert_eq!(status, [0]);
        // The CMOS clock answers: status A without "update in progress".
        devices.write(CMOS_INDEX, &[0x0a]);
        let mut status_a = [0xffu8];
        devices.read(CMOS_DATA, &mut status_a);
        assert_eq!(status_a[0] & 0x80, 0);
        // A 16550's line status register says "transmitter empty".
        let mut lsr = [0u8];
        devices.read(COM1 + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
