//! Minimal ACPI tables: RSDP -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! Why ACPI rather than no firmware interface at all: a Linux guest without ACPI has no way to
//! power off (it halts forever), and the CPUs beyond the first are found only through ACPI's MADT
//! or an MP table. With these tables:
//! - the FADT points at PM1a event/control blocks and a PM timer in port I/O (`power.rs`), and at
//!   the reset register 0xcf9; its SMI command port is 0, so the OS is in ACPI mode from the start;
//! - the DSDT holds `Name (_S5_, Package () {5, 5, 0, 0})`, so `poweroff` writes
//!   `SLP_TYP=5|SLP_EN` to PM1a_CNT, which the VMM turns into a clean exit;
//! - the MADT lists one local APIC per vCPU and the in-kernel IOAPIC, and overrides IRQ 9 (the
//!   SCI) as level-triggered, active high;
//! - the FADT leaves PWR_BUTTON clear, so the OS uses the fixed-feature power button in PM1;
//! - the DSDT also declares each virtio-mmio device (`_HID LNRO0005`) under `\_SB` (a PCI host
//!   bridge would go there too).

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::memory::{ACPI_START, HIGH_MEMORY, IOAPIC_BASE, LAPIC_BASE};
use super::power::{
    PM1A_CNT_LEN, PM1A_CNT_PORT, PM1A_EVT_LEN, PM1A_EVT_PORT, PM_TMR_LEN, PM_TMR_PORT, RESET_PORT,
    RESET_VALUE, S5_SLP_TYP,
};
use super::{Error, Result};

/// The SCI's ISA interrupt (the conventional one, QEMU's too). It is level-triggered and
/// active high, which the MADT says with an interrupt source override; the power button
/// (`power::Pm1Event`) raises it.
pub const SCI_IRQ: u16 = 9;

/// MPS INTI flags of the SCI's override: active high (bits 0-1 = 01), level-triggered (bits
/// 2-3 = 11). Without an override an OS assumes the ACPI default for the SCI, active low,
/// and would see our line as permanently asserted.
const SCI_INTI_FLAGS: u16 = 0x000d;

const OEM_ID: &[u8; 6] = b"IMGVMM";
const OEM_TABLE_ID: &[u8; 8] = b"IMGVMM  ";

/// Bytes summing (mod 256) to zero once `cksum` is set.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A System Description Table: the 36-byte header, then `body`; length and checksum filled in.
fn sdt(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(36 + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((36 + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(b"IMGV"); // creator id
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// A Generic Address Structure in system I/O space.
fn gas_io(port: u64, bits: u8, access_size: u8) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bits;
    g[3] = access_size; // 1 byte, 2 word, 3 dword
    g[4..].copy_from_slice(&port.to_le_bytes());
    g
}

/// A virtio-mmio device the DSDT declares: its register window and its interrupt (a GSI of
/// the IOAPIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest-physical base of the register window.
    pub base: u32,
    /// Length of the window.
    pub len: u32,
    /// The GSI (IOAPIC pin) the device interrupts on, edge-triggered, active high.
    pub gsi: u32,
}

/// An AML PkgLength for `body` bytes that follow it (the encoding counts its own bytes).
fn pkg_length(body: usize) -> Vec<u8> {
    // One byte holds up to 63; two bytes hold 12 bits; three bytes 20 bits.
    for n in 1..=3usize {
        let total = body + n;
        let limit = if n == 1 {
            1 << 6
        } else {
            1 << (4 + 8 * (n - 1))
        };
        if total < limit {
            if n == 1 {
                return vec![total as u8];
            }
            let mut v = vec![((n as u8 - 1) << 6) | (total & 0xf) as u8];
            for i in 1..n {
                v.push((total >> (4 + 8 * (i - 1))) as u8);
            }
            return v;
        }
    }
    unreachable!("AML objects here are far below 1 MiB")
}

/// `Device (VRnn) { Name (_HID, "LNRO0005") Name (_UID, n) Name (_CRS, ResourceTemplate () {
/// Memory32Fixed (ReadWrite, base, len) Interrupt (ResourceConsumer, Edge, ActiveHigh,
/// Exclusive) { gsi } }) }`: what Linux's virtio_mmio driver binds to through ACPI.
fn virtio_mmio_aml(index: u8, d: &MmioDevice) -> Vec<u8> {
    let mut crs = vec![0x86, 0x09, 0x00, 0x01]; // Memory32Fixed, length 9, read-write
    crs.extend_from_slice(&d.base.to_le_bytes());
    crs.extend_from_slice(&d.len.to_le_bytes());
    // Extended Interrupt: length 6; flags: consumer (0), edge (1), active high, exclusive.
    crs.extend_from_slice(&[0x89, 0x06, 0x00, 0x03, 0x01]);
    crs.extend_from_slice(&d.gsi.to_le_bytes());
    crs.extend_from_slice(&[0x79, 0x00]); // End tag (checksum 0: not checked)
    let mut buffer = vec![0x0a, crs.len() as u8]; // BufferSize as a ByteConst
    buffer.extend_from_slice(&crs);

    let mut body = format!("VR{:02X}", index).into_bytes();
    body.extend_from_slice(&[0x08, b'_', b'H', b'I', b'D', 0x0d]);
    body.extend_from_slice(b"LNRO0005\0");
    body.extend_from_slice(&[0x08, b'_', b'U', b'I', b'D', 0x0a, index]);
    body.extend_from_slice(&[0x08, b'_', b'C', b'R', b'S', 0x11]);
    body.extend_from_slice(&pkg_length(buffer.len()));
    body.extend_from_slice(&buffer);

    let mut dev = vec![0x5b, 0x82]; // DeviceOp
    dev.extend_from_slice(&pkg_length(body.len()));
    dev.extend_from_slice(&body);
    dev
}

/// The DSDT's AML: `Name (_S5_, Package (0x04) { 5, 5, 0, 0 })`, and `Scope (_SB) { ... }` with
/// the virtio-mmio devices.
fn dsdt_aml(devices: &[MmioDevice]) -> Vec<u8> {
    let s5 = S5_SLP_TYP as u8;
    // NameOp, NameSeg, PackageOp, PkgLength (covers itself and what follows: 8 bytes),
    // NumElements, BytePrefix 5, BytePrefix 5, ZeroOp, ZeroOp.
    let mut aml = vec![
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, s5, 0x0a, s5, 0x00, 0x00,
    ];
    if !devices.is_empty() {
        let mut body = b"_SB_".to_vec();
        for (i, d) in devices.iter().enumerate() {
            body.extend_from_slice(&virtio_mmio_aml(i as u8, d));
        }
        aml.push(0x10); // ScopeOp
        aml.extend_from_slice(&pkg_length(body.len()));
        aml.extend_from_slice(&body);
    }
    aml
}

fn fadt_body(dsdt: u64) -> Vec<u8> {
    let mut f = vec![0u8; 276 - 36];
    let mut put = |off: usize, b: &[u8]| f[off - 36..off - 36 + b.len()].copy_from_slice(b);
    put(40, &(dsdt as u32).to_le_bytes());
    put(46, &SCI_IRQ.to_le_bytes());
    // SMI_CMD (48) = 0: no SMM, the OS owns ACPI from boot.
    put(56, &(PM1A_EVT_PORT as u32).to_le_bytes());
    put(64, &(PM1A_CNT_PORT as u32).to_le_bytes());
    put(76, &(PM_TMR_PORT as u32).to_le_bytes());
    put(
        88,
        &[PM1A_EVT_LEN as u8, PM1A_CNT_LEN as u8, 0, PM_TMR_LEN as u8],
    );
    // IAPC_BOOT_ARCH: no VGA (bit 2); no 8042 advertised, so Linux does not probe a keyboard we
    // do not have (its reboot path still writes the i8042 command port directly).
    put(109, &(1u16 << 2).to_le_bytes());
    // Flags: WBINVD (0), SLP_BUTTON (5: a sleep button would be a control-method device, so
    // there is none), RESET_REG_SUP (10). PWR_BUTTON (4) stays clear: the power button is the
    // fixed-feature one in PM1 (Linux then creates its LNXPWRBN device).
    let flags: u32 = 1 | (1 << 5) | (1 << 10);
    put(112, &flags.to_le_bytes());
    put(116, &gas_io(RESET_PORT, 8, 1));
    put(128, &[RESET_VALUE]);
    put(131, &[5]); // FADT minor version (ACPI 6.5)
    put(140, &dsdt.to_le_bytes());
    put(148, &gas_io(PM1A_EVT_PORT, (PM1A_EVT_LEN * 8) as u8, 2));
    put(172, &gas_io(PM1A_CNT_PORT, (PM1A_CNT_LEN * 8) as u8, 2));
    put(208, &gas_io(PM_TMR_PORT, (PM_TMR_LEN * 8) as u8, 3));
    f
}

fn madt_body(vcpus: u8) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    m.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259 PICs too
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, UID, APIC id, flags (enabled).
        m.extend_from_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0. Its id follows the CPUs'.
    m.extend_from_slice(&[1, 12, vcpus, 0]);
    m.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt Source Override: type 2, length 10, bus 0 (ISA), source IRQ 9 -> GSI 9, with
    // the SCI's polarity and trigger mode.
    m.extend_from_slice(&[2, 10, 0, SCI_IRQ as u8]);
    m.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    m.extend_from_slice(&SCI_INTI_FLAGS.to_le_bytes());
    m
}

/// All tables, laid out from `base`: returns the bytes to write there and the RSDP's address
/// (which is `base`).
pub fn build_tables(base: u64, vcpus: u8, devices: &[MmioDevice]) -> Vec<u8> {
    let align = |v: usize| (v + 15) & !15;
    let rsdp_len = 36;
    let dsdt_off = align(rsdp_len);
    let dsdt = sdt(b"DSDT", 2, &dsdt_aml(devices));
    let fadt_off = align(dsdt_off + dsdt.len());
    let fadt = sdt(b"FACP", 6, &fadt_body(base + dsdt_off as u64));
    let madt_off = align(fadt_off + fadt.len());
    let madt = sdt(b"APIC", 5, &madt_body(vcpus));
    let xsdt_off = align(madt_off + madt.len());
    let mut xsdt_body = Vec::new();
    for off in [fadt_off, madt_off] {
        xsdt_body.extend_from_slice(&(base + off as u64).to_le_bytes());
    }
    let xsdt = sdt(b"XSDT", 1, &xsdt_body);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+ (has the XSDT)
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&(base + xsdt_off as u64).to_le_bytes());
    rsdp.extend_from_slice(&[0, 0, 0, 0]); // extended checksum, reserved
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    let mut out = vec![0u8; xsdt_off + xsdt.len()];
    for (off, t) in [
        (0, &rsdp),
        (dsdt_off, &dsdt),
        (fadt_off, &fadt),
        (madt_off, &madt),
        (xsdt_off, &xsdt),
    ] {
        out[off..off + t.len()].copy_from_slice(t);
    }
    out
}

/// Writes the tables for `vcpus` CPUs into guest memory; returns the RSDP's guest address.
pub fn write_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[MmioDevice],
) -> Result<GuestAddress> {
    let tables = build_tables(ACPI_START, vcpus, devices);
    if ACPI_START + tables.len() as u64 > HIGH_MEMORY {
        return Err(Error::Config(format!(
            "too many vCPUs for the ACPI tables: {vcpus}"
        )));
    }
    mem.write_slice(&tables, GuestAddress(ACPI_START))
        .map_err(|e| Error::Memory(format!("writing ACPI tables: {e}")))?;
    Ok(GuestAddress(ACPI_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, v| a.wrapping_add(*v))
    }
    /// The table at guest address `addr`, checked for a valid length and checksum.
    fn table(all: &[u8], base: u64, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let off = (addr - base) as usize;
        assert_eq!(&all[off..off + 4], sig);
        let len = u32_at(all, off + 4) as usize;
        let t = all[off..off + len].to_vec();
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    #[test]
    fn tables_chain_from_the_rsdp_with_valid_checksums() {
        let base = 0xe0000;
        let all = build_tables(base, 3, &[]);
        assert_eq!(&all[..8], b"RSD PTR ");
        assert_eq!(sum(&all[..20]), 0);
        assert_eq!(sum(&all[..36]), 0);
        let xsdt = table(&all, base, u64_at(&all, 24), b"XSDT");
        assert_eq!(xsdt.len(), 36 + 16);
        let fadt = table(&all, base, u64_at(&xsdt, 36), b"FACP");
        let madt = table(&all, base, u64_at(&xsdt, 44), b"APIC");
        assert_eq!(fadt.len(), 276);
        assert_eq!(u32_at(&fadt, 64) as u64, PM1A_CNT_PORT);
        assert_eq!(
            u32_at(&fadt, 48),
            0,
            "no SMI command port: always in ACPI mode"
        );
        assert_eq!(u64_at(&fadt, 172 + 4), PM1A_CNT_PORT);
        assert_eq!(u64_at(&fadt, 116 + 4), RESET_PORT);
        assert_eq!(fadt[128], RESET_VALUE);
        assert_ne!(u32_at(&fadt, 112) & (1 << 10), 0);
        assert_eq!(
            u32_at(&fadt, 112) & (1 << 4),
            0,
            "PWR_BUTTON clear: the fixed-feature power button"
        );
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), SCI_IRQ);
        let dsdt = table(&all, base, u64_at(&fadt, 140), b"DSDT");
        assert_eq!(u32_at(&fadt, 40) as u64, u64_at(&fadt, 140));
        let aml = &dsdt[36..];
        let at = aml
            .windows(4)
            .position(|w| w == b"_S5_")
            .expect("_S5_ in the DSDT");
        assert_eq!(aml[at + 4], 0x12, "a package");
        assert_eq!(aml[at + 7..at + 9], [0x0a, S5_SLP_TYP as u8]);
        // Three local APICs (ids 0..3) and one IOAPIC.
        let entries = &madt[44..];
        let lapics: Vec<u8> = entries
            .chunks(8)
            .take(3)
            .map(|e| {
                assert_eq!(e[..2], [0, 8]);
                e[3]
            })
            .collect();
        assert_eq!(lapics, vec![0, 1, 2]);
        assert_eq!(entries[24..26], [1, 12]);
        assert_eq!(u32_at(entries, 28) as u64, IOAPIC_BASE);
        // The SCI's override: ISA IRQ 9 to GSI 9, level-triggered, active high.
        let iso = &entries[36..];
        assert_eq!(iso.len(), 10);
        assert_eq!(iso[..4], [2, 10, 0, 9]);
        assert_eq!(u32_at(iso, 4), 9);
        assert_eq!(u16::from_le_bytes([iso[8], iso[9]]), 0x000d);
    }

    /// Decodes an AML PkgLength at `b[0]`: (value, bytes used).
    fn decode_pkg_length(b: &[u8]) -> (usize, usize) {
        let n = usize::from(b[0] >> 6) + 1;
        if n == 1 {
            return (usize::from(b[0] & 0x3f), 1);
        }
        let mut v = usize::from(b[0] & 0xf);
        for (i, byte) in b[1..n].iter().enumerate() {
            v |= usize::from(*byte) << (4 + 8 * i);
        }
        (v, n)
    }

    #[test]
    fn pkg_lengths_count_themselves_in_every_width() {
        for body in [0, 1, 62, 63, 64, 100, 4000, 4093, 4094, 70_000] {
            let enc = pkg_length(body);
            let (v, n) = decode_pkg_length(&enc);
            assert_eq!(n, enc.len());
            assert_eq!(v, body + n, "body {body}");
        }
        assert_eq!(pkg_length(62), vec![63]);
        assert_eq!(pkg_length(63).len(), 2);
    }

    #[test]
    fn dsdt_declares_each_virtio_mmio_device_under_sb() {
        let devices = [
            MmioDevice {
                base: 0xd000_0000,
                len: 0x200,
                gsi: 16,
            },
            MmioDevice {
                base: 0xd000_1000,
                len: 0x200,
                gsi: 17,
            },
        ];
        let base = 0xe0000;
        let all = build_tables(base, 1, &devices);
        let xsdt = table(&all, base, u64_at(&all, 24), b"XSDT");
        let fadt = table(&all, base, u64_at(&xsdt, 36), b"FACP");
        let dsdt = table(&all, base, u64_at(&fadt, 140), b"DSDT");
        let aml = &dsdt[36..];
        // The scope follows _S5_ and its length covers the rest of the table exactly.
        let scope = aml.iter().position(|&b| b == 0x10).unwrap();
        let (len, n) = decode_pkg_length(&aml[scope + 1..]);
        assert_eq!(scope + 1 + len, aml.len());
        assert_eq!(&aml[scope + 1 + n..scope + 5 + n], b"_SB_");
        let mut at = scope + 5 + n;
        for (i, d) in devices.iter().enumerate() {
            assert_eq!(aml[at..at + 2], [0x5b, 0x82], "DeviceOp");
            let (len, n) = decode_pkg_length(&aml[at + 2..]);
            let dev = &aml[at + 2 + n..at + 2 + len];
            assert_eq!(&dev[..4], format!("VR{i:02X}").as_bytes());
            let hid = dev.windows(9).position(|w| w == b"LNRO0005\0").unwrap();
            assert_eq!(&dev[hid - 5..hid], b"_HID\x0d");
            let crs = dev.windows(4).position(|w| w == b"_CRS").unwrap();
            // NameOp _CRS BufferOp PkgLength BytePrefix size, then the resources.
            let res = &dev[crs + 4..];
            assert_eq!(res[0], 0x11);
            let (_, n) = decode_pkg_length(&res[1..]);
            let size = usize::from(res[1 + n + 1]);
            let r = &res[1 + n + 2..1 + n + 2 + size];
            assert_eq!(r[0], 0x86, "Memory32Fixed");
            assert_eq!(u32_at(r, 4), d.base);
            assert_eq!(u32_at(r, 8), d.len);
            assert_eq!(r[12], 0x89, "extended interrupt");
            assert_eq!(r[15] & 0x3, 0x3, "consumer, edge-triggered");
            assert_eq!(u32_at(r, 17), d.gsi);
            assert_eq!(r[21..23], [0x79, 0]);
            at += 2 + len;
        }
        assert_eq!(at, aml.len());
    }

    #[test]
    fn tables_fit_in_the_bios_area() {
        let (mem, _ram) = super::super::memory::create_guest_memory(16 << 20).unwrap();
        assert_eq!(
            write_tables(&mem, 64, &[]).unwrap(),
            GuestAddress(ACPI_START)
        );
    }
}
