// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The smallest ACPI a Linux guest powers off with: RSDP, XSDT, FADT, FACS and a DSDT
//! that holds only `\_S5_`, built with rust-vmm's acpi_tables, plus the PM1 event and
//! control registers the FADT points at.
//!
//! The FADT describes a legacy (not hardware-reduced) platform, so the guest keeps the
//! PIC and PIT it boots with; no MADT, so it keeps finding no I/O APIC. Its power-off
//! writes `SLP_TYP = 5 | SLP_EN` to PM1a control, which [`Pm1::write`] turns into
//! [`super::PortEffect::PowerOff`].

use acpi_tables::aml::{Name, Package, Path};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::error::{Error, Result};

/// Where the tables go: the BIOS area the kernel scans for the RSDP, which the e820 map
/// reports reserved. One page, shared (the host writes it).
pub const ACPI_TABLES_ADDR: u64 = 0xe_0000;
const XSDT_ADDR: u64 = ACPI_TABLES_ADDR + 0x40;
const FADT_ADDR: u64 = ACPI_TABLES_ADDR + 0x100;
const FACS_ADDR: u64 = ACPI_TABLES_ADDR + 0x240;
const DSDT_ADDR: u64 = ACPI_TABLES_ADDR + 0x280;
const TABLES_END: u64 = ACPI_TABLES_ADDR + 0x1000;

/// The PM1a event block (status, enable: 16 bits each) and control block (16 bits).
pub const PM1A_EVT_BLK: u16 = 0x600;
/// See [`PM1A_EVT_BLK`].
pub const PM1A_CNT_BLK: u16 = 0x604;
const PM1_EVT_LEN: u8 = 4;
const PM1_CNT_LEN: u8 = 2;
/// The interrupt ACPI's SCI would use (no event ever raises it).
const SCI_IRQ: u16 = 9;
/// `\_S5_`'s sleep type, which the guest writes to PM1a control to power off.
pub const S5_SLEEP_TYPE: u16 = 5;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;
/// PM1 control: SCI_EN, the platform is in ACPI mode (no SMI command to switch).
const SCI_EN: u16 = 1;
/// IA-PC boot architecture flags: legacy devices, no VGA. The 8042 bit (1) stays clear:
/// the machine's i8042 is a reset line only, so Linux's i8042 driver need not probe it
/// (`reboot=k` writes the reset command all the same).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_NO_VGA: u16 = 1 << 2;

const OEM_ID: [u8; 6] = *b"PRVMEM";
const OEM_TABLE_ID: [u8; 8] = *b"PRVMEMVM";
const OEM_REVISION: u32 = 1;

fn table_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The tables, each with the address it goes to.
pub fn tables() -> Vec<(u64, Vec<u8>)> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5_type = S5_SLEEP_TYPE as u8;
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&s5_type, &s5_type, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(DSDT_ADDR)
        .firmware_ctrl_64(FACS_ADDR)
        // No power or sleep button; the firmware would say so with these bits.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sci_int = SCI_IRQ.into();
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_BLK).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_BLK).into();
    fadt.pm1_evt_len = PM1_EVT_LEN;
    fadt.pm1_cnt_len = PM1_CNT_LEN;
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_NO_VGA).into();
    let fadt = fadt.finalize();

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(FADT_ADDR);

    vec![
        (ACPI_TABLES_ADDR, table_bytes(&Rsdp::new(OEM_ID, XSDT_ADDR))),
        (XSDT_ADDR, table_bytes(&xsdt)),
        (FADT_ADDR, table_bytes(&fadt)),
        (FACS_ADDR, table_bytes(&FACS::new())),
        (DSDT_ADDR, dsdt.as_slice().to_vec()),
    ]
}

/// Writes the tables at [`ACPI_TABLES_ADDR`].
pub fn write_tables<M: GuestMemoryBackend>(memory: &M) -> Result<()> {
    let tables = tables();
    for (i, (addr, bytes)) in tables.iter().enumerate() {
        let limit = tables.get(i + 1).map_or(TABLES_END, |next| next.0);
        if addr + bytes.len() as u64 > limit {
            return Err(Error::DoesNotFit("an ACPI table", bytes.len() as u64));
        }
        memory
            .write_slice(bytes, GuestAddress(*addr))
            .map_err(Error::Load)?;
    }
    Ok(())
}

/// The PM1a registers: status reads 0 (no event is ever pending), enable and control
/// keep what is written, control always reads SCI_EN.
#[derive(Debug, Default)]
pub struct Pm1 {
    enable: u16,
    control: u16,
}

/// What a PM1 write asks of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SleepRequest {
    /// Nothing.
    None,
    /// S5: power off.
    PowerOff,
}

impl Pm1 {
    /// Whether `port` is one of the PM1a registers.
    pub fn serves(port: u16) -> bool {
        (PM1A_EVT_BLK..PM1A_EVT_BLK + u16::from(PM1_EVT_LEN)).contains(&port)
            || (PM1A_CNT_BLK..PM1A_CNT_BLK + u16::from(PM1_CNT_LEN)).contains(&port)
    }

    /// The 16-bit register holding byte `port`, if any.
    fn register(&mut self, port: u16) -> Option<&mut u16> {
        if !Pm1::serves(port) {
            return None;
        }
        match port & !1 {
            p if p == PM1A_EVT_BLK => None, // status: always 0, writes clear nothing
            p if p == PM1A_EVT_BLK + 2 => Some(&mut self.enable),
            _ => Some(&mut self.control),
        }
    }

    /// A read of `data.len()` bytes at `port`, little-endian across registers; bytes
    /// outside the PM1a registers read as all ones.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = port.wrapping_add(i as u16);
            let value = match self.register(at) {
                Some(control) if at & !1 == PM1A_CNT_BLK => *control | SCI_EN,
                Some(register) => *register,
                None if Pm1::serves(at) => 0,
                None => 0xffff,
            };
            *byte = value.to_le_bytes()[usize::from(at & 1)];
        }
    }

    /// A write of `data` at `port`; a write that reaches PM1a control with SLP_EN and
    /// `\_S5_`'s sleep type is a power-off request.
    pub fn write(&mut self, port: u16, data: &[u8]) -> SleepRequest {
        let mut wrote_control = false;
        for (i, &byte) in data.iter().enumerate() {
            let at = port.wrapping_add(i as u16);
            wrote_control |= at & !1 == PM1A_CNT_BLK;
            if let Some(register) = self.register(at) {
                let mut bytes = register.to_le_bytes();
                bytes[usize::from(at & 1)] = byte;
                *register = u16::from_le_bytes(bytes);
            }
        }
        if !wrote_control {
            return SleepRequest::None;
        }
        let sleep_type = (self.control & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        let request = if self.control & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
            SleepRequest::PowerOff
        } else {
            SleepRequest::None
        };
        // SLP_EN is write-only: it never reads back.
        self.control &= !SLP_EN;
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(bytes: &[u8]) -> bool {
        bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) == 0
    }

    #[test]
    fn the_tables_fit_their_page_and_their_checksums_hold() {
        let tables = tables();
        let signatures: Vec<_> = tables.iter().map(|(_, b)| &b[..4]).collect();
        assert_eq!(
            signatures,
            [&b"RSD "[..], b"XSDT", b"FACP", b"FACS", b"DSDT"]
        );
        let (_, rsdp) = &tables[0];
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        for (_, table) in &tables[1..] {
            if &table[..4] != b"FACS" {
                assert!(checksum_ok(table), "{:?}", &table[..4]);
                let length = u32::from_le_bytes(table[4..8].try_into().unwrap());
                assert_eq!(length as usize, table.len());
            }
        }
        for pair in tables.windows(2) {
            assert!(pair[0].0 + pair[0].1.len() as u64 <= pair[1].0);
        }
        let (last, bytes) = tables.last().unwrap();
        assert!(last + bytes.len() as u64 <= TABLES_END);
        // The DSDT names \_S5_.
        assert!(bytes.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn only_slp_en_with_the_s5_type_powers_off() {
        let mut pm1 = Pm1::default();
        let s5 = S5_SLEEP_TYPE << SLP_TYP_SHIFT;
        // Linux writes the type first, then the type with SLP_EN.
        assert_eq!(
            pm1.write(PM1A_CNT_BLK, &s5.to_le_bytes()),
            SleepRequest::None
        );
        let mut control = [0u8; 2];
        pm1.read(PM1A_CNT_BLK, &mut control);
        assert_eq!(u16::from_le_bytes(control), s5 | SCI_EN);
        assert_eq!(
            pm1.write(PM1A_CNT_BLK, &(s5 | SLP_EN).to_le_bytes()),
            SleepRequest::PowerOff
        );
        // Another sleep type (S3) is not a power-off; nor is a write elsewhere.
        let s3 = 3 << SLP_TYP_SHIFT;
        assert_eq!(
            pm1.write(PM1A_CNT_BLK, &(s3 | SLP_EN).to_le_bytes()),
            SleepRequest::None
        );
        assert_eq!(
            pm1.write(PM1A_EVT_BLK, &(s5 | SLP_EN).to_le_bytes()),
            SleepRequest::None
        );
        // A 4-byte write from the enable register reaches control too.
        let value = u32::from(s5 | SLP_EN) << 16;
        assert_eq!(
            pm1.write(PM1A_EVT_BLK + 2, &value.to_le_bytes()),
            SleepRequest::PowerOff
        );
        // Byte-wide writes assemble the register.
        pm1.write(PM1A_CNT_BLK, &[0]);
        assert_eq!(
            pm1.write(PM1A_CNT_BLK + 1, &[((s5 | SLP_EN) >> 8) as u8]),
            SleepRequest::PowerOff
        );
    }

    #[test]
    fn status_reads_zero_and_enable_keeps_its_value() {
        let mut pm1 = Pm1::default();
        pm1.write(PM1A_EVT_BLK, &[0xff, 0xff, 0x20, 0x01]);
        let mut evt = [0xffu8; 4];
        pm1.read(PM1A_EVT_BLK, &mut evt);
        assert_eq!(evt, [0, 0, 0x20, 0x01]);
        assert!(Pm1::serves(PM1A_EVT_BLK + 3) && Pm1::serves(PM1A_CNT_BLK + 1));
        assert!(!Pm1::serves(PM1A_CNT_BLK + 2) && !Pm1::serves(PM1A_EVT_BLK - 1));
        // A 4-byte read from control runs past the block: those bytes are all ones.
        let mut wide = [0u8; 4];
        pm1.read(PM1A_CNT_BLK, &mut wide);
        assert_eq!(wide, [SCI_EN as u8, 0, 0xff, 0xff]);
    }
}
