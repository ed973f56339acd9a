//! The partition table of a disk image: MBR (primary partitions, logical partitions through
//! the chain of extended boot records) and GPT (primary header and entry array checked by
//! CRC32, with the backup at the end of the disk when the primary is damaged).
//!
//! Everything is read through [`Image`], so any format and backing chain works. Tables are
//! untrusted input: every offset is checked against the disk size, the EBR chain is bounded
//! and checked for loops, and the GPT entry array is bounded in size before it is read.

use crate::Image;
use serde::Serialize;

/// Sector size assumed for MBR and GPT (images of 4 KiB-sector disks with GPT are detected
/// by their header's position).
pub const SECTOR: u64 = 512;

/// Most logical partitions followed in an extended partition (Linux stops at 256 minors per
/// disk; real tables have far fewer).
pub const MAX_LOGICAL: usize = 256;

/// Largest GPT entry array read (the usual one is 16 KiB: 128 entries of 128 bytes).
pub const MAX_GPT_ARRAY: u64 = 4 << 20;

/// Most GPT entries accepted.
pub const MAX_GPT_ENTRIES: u32 = 65536;

/// Why a partition table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Reading the image failed.
    #[error(transparent)]
    Io(#[from] crate::Error),
    /// The disk has neither an MBR boot signature nor a GPT header.
    #[error("'{file}': no partition table found (no MBR boot signature, no GPT header)")]
    NoTable {
        /// The image.
        file: String,
    },
    /// A partition (or an EBR, or the GPT entry array) lies outside the disk.
    #[error(
        "'{file}': {what} (bytes {start}..{end}) extends past the end of the disk ({size} bytes)"
    )]
    PastEnd {
        /// The image.
        file: String,
        /// What lies outside ("partition 5", "EBR", ...).
        what: String,
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
        /// Disk size.
        size: u64,
    },
    /// The chain of extended boot records is malformed.
    #[error("'{file}': bad extended partition chain at offset {offset}: {reason}")]
    BadEbr {
        /// The image.
        file: String,
        /// Offset of the EBR.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// Neither GPT header (with its entry array) is valid.
    #[error("'{file}': invalid GPT: primary: {primary}; backup: {backup}")]
    BadGpt {
        /// The image.
        file: String,
        /// Why the primary header or its entries were refused.
        primary: String,
        /// Why the backup header or its entries were refused.
        backup: String,
    },
    /// A GPT entry is malformed.
    #[error("'{file}': GPT entry {index}: {reason}")]
    BadGptEntry {
        /// The image.
        file: String,
        /// Entry index (partition number).
        index: u32,
        /// What is wrong.
        reason: String,
    },
}

/// Result of reading a partition table.
pub type Result<T> = std::result::Result<T, PartitionError>;

/// The kind of partition table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    /// MBR ("dos" in sfdisk).
    Dos,
    /// GUID partition table.
    Gpt,
}

/// The place of a partition in an MBR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A primary MBR partition (or any GPT partition).
    Primary,
    /// The MBR container of logical partitions.
    Extended,
    /// A partition inside the extended one.
    Logical,
}

/// One partition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Partition {
    /// Number as Linux and sfdisk give it (MBR: 1-4 primary, 5 on logical; GPT: entry
    /// index + 1).
    pub number: u32,
    /// Byte offset of the first byte (the `offset=` of `mount -o loop`).
    pub start: u64,
    /// Byte offset of the last byte.
    pub end: u64,
    /// Length in bytes.
    pub size: u64,
    /// The type: MBR type byte as two hex digits (`83`), or the GPT type GUID.
    #[serde(rename = "type")]
    pub type_id: String,
    /// The type's common name, when known.
    #[serde(rename = "type-name", skip_serializing_if = "Option::is_none")]
    pub type_name: Option<&'static str>,
    /// Primary, extended or logical.
    pub role: Role,
    /// MBR boot flag.
    pub bootable: bool,
    /// GPT partition name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// GPT unique partition GUID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// GPT attributes as sfdisk names them (`RequiredPartition LegacyBIOSBootable GUID:60`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<String>,
}

/// A disk's partition table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionTable {
    /// MBR or GPT.
    pub label: TableKind,
    /// MBR disk signature (`0x1234abcd`) or GPT disk GUID.
    pub id: String,
    /// Logical sector size the table uses.
    #[serde(rename = "sector-size")]
    pub sector_size: u64,
    /// Partitions in table order (logical ones after the primaries).
    pub partitions: Vec<Partition>,
    /// Problems that did not stop the table from being read (a damaged primary GPT, ...).
    pub warnings: Vec<String>,
}

/// Reads the partition table of `image`.
pub fn read_partitions(image: &Image) -> Result<PartitionTable> {
    let d = Disk {
        image,
        size: image.size(),
        file: image.file_name().to_string(),
    };
    let mbr = if d.size >= SECTOR {
        Some(d.read(0, SECTOR as usize, "MBR")?)
    } else {
        None
    };
    let signed = mbr
        .as_ref()
        .is_some_and(|m| m[510] == 0x55 && m[511] == 0xaa);
    let entries: Vec<MbrEntry> = match &mbr {
        Some(m) if signed => (0..4)
            .map(|i| MbrEntry::parse(&m[446 + 16 * i..]))
            .collect(),
        _ => Vec::new(),
    };
    let protective = entries.iter().any(|e| e.kind == 0xee);
    if protective || !signed {
        // A GPT needs a protective MBR, but reading it without one helps with damaged disks;
        // a disk with neither is "no table".
        return match read_gpt(&d, protective) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(PartitionError::NoTable { file: d.file }),
            Err(e) => Err(e),
        };
    }
    let mbr = mbr.unwrap_or_default();
    read_mbr(&d, &mbr, &entries)
}

/// Warnings for partitions sharing bytes (the extended container aside, which holds the
/// logical ones by design).
fn overlap_warnings(partitions: &[Partition]) -> Vec<String> {
    let mut sorted: Vec<&Partition> = partitions
        .iter()
        .filter(|p| p.role != Role::Extended)
        .collect();
    sorted.sort_by_key(|p| (p.start, p.end));
    let mut out = Vec::new();
    // The partition reaching furthest so far, so nested overlaps are found too.
    let mut reach: Option<&Partition> = None;
    for p in sorted {
        if let Some(r) = reach {
            if p.start <= r.end {
                out.push(format!("partitions {} and {} overlap", r.number, p.number));
            }
            if p.end > r.end {
                reach = Some(p);
            }
        } else {
            reach = Some(p);
        }
    }
    out
}

/// The disk being read, with bounds-checked reads.
struct Disk<'a> {
    image: &'a Image,
    size: u64,
    file: String,
}

impl Disk<'_> {
    fn past_end(&self, what: impl Into<String>, start: u64, end: u64) -> PartitionError {
        PartitionError::PastEnd {
            file: self.file.clone(),
            what: what.into(),
            start,
            end,
            size: self.size,
        }
    }

    fn read(&self, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
        let end = offset.saturating_add(len as u64);
        if end > self.size {
            return Err(self.past_end(what, offset, end));
        }
        let mut buf = vec![0u8; len];
        self.image.read_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// A 16-byte MBR or EBR entry.
#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    boot: u8,
    kind: u8,
    lba: u32,
    sectors: u32,
}

impl MbrEntry {
    fn parse(b: &[u8]) -> Self {
        MbrEntry {
            boot: b[0],
            kind: b[4],
            lba: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            sectors: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    fn used(&self) -> bool {
        self.kind != 0 && self.sectors != 0
    }
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn mbr_partition(d: &Disk, number: u32, e: &MbrEntry, base: u64, role: Role) -> Result<Partition> {
    let start = (base + u64::from(e.lba)) * SECTOR;
    let size = u64::from(e.sectors) * SECTOR;
    let end = start + size;
    if end > d.size {
        return Err(d.past_end(format!("partition {number}"), start, end));
    }
    Ok(Partition {
        number,
        start,
        end: end - 1,
        size,
        type_id: format!("{:02x}", e.kind),
        type_name: mbr_type_name(e.kind),
        role,
        bootable: e.boot & 0x80 != 0,
        name: None,
        uuid: None,
        attributes: None,
    })
}

fn read_mbr(d: &Disk, mbr: &[u8], entries: &[MbrEntry]) -> Result<PartitionTable> {
    let mut partitions = Vec::new();
    let mut extended = None;
    for (i, e) in entries.iter().enumerate() {
        if !e.used() {
            continue;
        }
        let number = i as u32 + 1;
        if is_extended(e.kind) {
            let p = mbr_partition(d, number, e, 0, Role::Extended)?;
            if extended.is_some() {
                return Err(PartitionError::BadEbr {
                    file: d.file.clone(),
                    offset: 0,
                    reason: "more than one extended partition".into(),
                });
            }
            extended = Some((p.start, p.size));
            partitions.push(p);
        } else {
            partitions.push(mbr_partition(d, number, e, 0, Role::Primary)?);
        }
    }
    if let Some((ext_start, ext_size)) = extended {
        read_logicals(d, ext_start, ext_size, &mut partitions)?;
    }
    let warnings = overlap_warnings(&partitions);
    Ok(PartitionTable {
        label: TableKind::Dos,
        id: format!(
            "0x{:08x}",
            u32::from_le_bytes([mbr[440], mbr[441], mbr[442], mbr[443]])
        ),
        sector_size: SECTOR,
        partitions,
        warnings,
    })
}

/// Follows the EBR chain of the extended partition at `ext_start` (bytes).
fn read_logicals(d: &Disk, ext_start: u64, ext_size: u64, out: &mut Vec<Partition>) -> Result<()> {
    let ext_lba = ext_start / SECTOR;
    let ext_end = ext_start + ext_size;
    let mut ebr = ext_start;
    let mut seen = std::collections::HashSet::new();
    let mut number = 5u32;
    let bad = |offset: u64, reason: String| PartitionError::BadEbr {
        file: d.file.clone(),
        offset,
        reason,
    };
    loop {
        if !seen.insert(ebr) {
            return Err(bad(
                ebr,
                "the chain loops back to an EBR already read".into(),
            ));
        }
        if seen.len() > MAX_LOGICAL {
            return Err(bad(
                ebr,
                format!("more than {MAX_LOGICAL} logical partitions"),
            ));
        }
        if ebr < ext_start || ebr + SECTOR > ext_end {
            return Err(bad(
                ebr,
                format!(
                    "the EBR lies outside the extended partition (bytes {ext_start}..{ext_end})"
                ),
            ));
        }
        let sector = d.read(ebr, SECTOR as usize, "EBR")?;
        if sector[510] != 0x55 || sector[511] != 0xaa {
            return Err(bad(ebr, "no boot signature".into()));
        }
        let first = MbrEntry::parse(&sector[446..]);
        let next = MbrEntry::parse(&sector[462..]);
        if first.used() {
            let p = mbr_partition(d, number, &first, ebr / SECTOR, Role::Logical)?;
            if p.start < ext_start || p.end >= ext_end {
                return Err(bad(
                    ebr,
                    format!(
                        "logical partition {number} (bytes {}..{}) lies outside the extended partition",
                        p.start,
                        p.end + 1
                    ),
                ));
            }
            out.push(p);
            number += 1;
        }
        if !next.used() {
            return Ok(());
        }
        // The link is relative to the start of the extended partition.
        ebr = (ext_lba + u64::from(next.lba)) * SECTOR;
    }
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Formats a GUID stored in GPT's mixed-endian layout.
pub fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// A GPT header that passed its checks.
struct GptHeader {
    disk_guid: String,
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
    entries_crc: u32,
    first_usable: u64,
    last_usable: u64,
}

/// Why a GPT header was refused.
enum GptFail {
    /// There is no header at all (no signature, or the disk is too small for one).
    Missing(String),
    /// A header is there but damaged.
    Bad(String),
}

impl GptFail {
    fn into_reason(self) -> String {
        match self {
            GptFail::Missing(s) | GptFail::Bad(s) => s,
        }
    }
}

/// Reads and checks the header at `lba` (and its entry array); `Err` says why it is refused.
fn gpt_at(d: &Disk, lba: u64, sector: u64) -> std::result::Result<(GptHeader, Vec<u8>), GptFail> {
    let at = lba * sector;
    let h = d
        .read(at, sector as usize, "GPT header")
        .map_err(|e| GptFail::Missing(e.to_string()))?;
    if &h[0..8] != b"EFI PART" {
        return Err(GptFail::Missing(format!("no GPT signature at offset {at}")));
    }
    check_gpt(d, &h, lba, sector).map_err(GptFail::Bad)
}

/// The checks of a header that has the GPT signature, and the read of its entry array.
fn check_gpt(
    d: &Disk,
    h: &[u8],
    lba: u64,
    sector: u64,
) -> std::result::Result<(GptHeader, Vec<u8>), String> {
    let e = |e: PartitionError| e.to_string();
    let header_size = le32(h, 12);
    if !(92..=sector as u32).contains(&header_size) {
        return Err(format!("header size {header_size} is out of range"));
    }
    let mut copy = h[..header_size as usize].to_vec();
    copy[16..20].fill(0);
    let stored = le32(h, 16);
    let computed = crc32(&copy);
    if stored != computed {
        return Err(format!(
            "header CRC32 mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let my_lba = le64(h, 24);
    if my_lba != lba {
        return Err(format!("header at LBA {lba} says it is at LBA {my_lba}"));
    }
    let num_entries = le32(h, 80);
    let entry_size = le32(h, 84);
    if entry_size < 128 || !entry_size.is_power_of_two() {
        return Err(format!(
            "entry size {entry_size} is not a power of two of at least 128"
        ));
    }
    if num_entries > MAX_GPT_ENTRIES {
        return Err(format!(
            "{num_entries} entries (at most {MAX_GPT_ENTRIES} are accepted)"
        ));
    }
    let array_len = u64::from(num_entries) * u64::from(entry_size);
    if array_len > MAX_GPT_ARRAY {
        return Err(format!(
            "entry array of {array_len} bytes (at most {MAX_GPT_ARRAY} are accepted)"
        ));
    }
    let header = GptHeader {
        first_usable: le64(h, 40),
        last_usable: le64(h, 48),
        disk_guid: guid(&h[56..72]),
        entries_lba: le64(h, 72),
        num_entries,
        entry_size,
        entries_crc: le32(h, 88),
    };
    let array_at = header
        .entries_lba
        .checked_mul(sector)
        .ok_or_else(|| format!("entry array LBA {} is out of range", header.entries_lba))?;
    let array = d
        .read(array_at, array_len as usize, "GPT entry array")
        .map_err(e)?;
    let crc = crc32(&array);
    if crc != header.entries_crc {
        return Err(format!(
            "entry array CRC32 mismatch (stored {:#010x}, computed {crc:#010x})",
            header.entries_crc
        ));
    }
    Ok((header, array))
}

/// Reads a GPT; `Ok(None)` when there is no GPT signature at all (and no protective MBR).
fn read_gpt(d: &Disk, protective: bool) -> Result<Option<PartitionTable>> {
    let mut warnings = Vec::new();
    // 512-byte sectors first; a disk image of a 4 KiB-sector disk has its header at 4096.
    let sector = [SECTOR, 4096]
        .into_iter()
        .find(|&s| {
            d.read(s, 8, "GPT header")
                .is_ok_and(|sig| sig == b"EFI PART")
        })
        .unwrap_or(SECTOR);
    let last_lba = (d.size / sector).checked_sub(1);
    let primary = gpt_at(d, 1, sector);
    let (header, array) = match primary {
        Ok(found) => {
            if let Some(last) = last_lba {
                if let Err(why) = gpt_at(d, last, sector) {
                    warnings.push(format!(
                        "the backup GPT header is invalid: {}",
                        why.into_reason()
                    ));
                }
            }
            found
        }
        Err(primary_why) => {
            let backup = match last_lba {
                Some(last) if last > 1 => gpt_at(d, last, sector),
                _ => Err(GptFail::Missing("the disk is too small".to_string())),
            };
            match backup {
                Ok(found) => {
                    warnings.push(format!(
                        "the primary GPT is invalid ({}); using the backup GPT header at \
                         offset {}",
                        primary_why.into_reason(),
                        last_lba.unwrap_or(0) * sector
                    ));
                    found
                }
                Err(backup_why) => {
                    let missing = matches!(primary_why, GptFail::Missing(_))
                        && matches!(backup_why, GptFail::Missing(_));
                    if !protective && missing {
                        return Ok(None);
                    }
                    return Err(PartitionError::BadGpt {
                        file: d.file.clone(),
                        primary: primary_why.into_reason(),
                        backup: backup_why.into_reason(),
                    });
                }
            }
        }
    };
    if !protective {
        warnings.push("the disk has a GPT but no protective MBR".into());
    }
    let mut partitions = Vec::new();
    for i in 0..header.num_entries {
        let at = i as usize * header.entry_size as usize;
        let ent = &array[at..at + header.entry_size as usize];
        if ent[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let number = i + 1;
        let first = le64(ent, 32);
        let last = le64(ent, 40);
        if last < first {
            return Err(PartitionError::BadGptEntry {
                file: d.file.clone(),
                index: number,
                reason: format!("last LBA {last} is before first LBA {first}"),
            });
        }
        let start = first.checked_mul(sector);
        let end = last.checked_add(1).and_then(|l| l.checked_mul(sector));
        let (Some(start), Some(end)) = (start, end) else {
            return Err(d.past_end(format!("partition {number}"), u64::MAX, u64::MAX));
        };
        if end > d.size {
            return Err(d.past_end(format!("partition {number}"), start, end));
        }
        if first < header.first_usable || last > header.last_usable {
            warnings.push(format!(
                "partition {number} lies outside the usable LBAs {}..={}",
                header.first_usable, header.last_usable
            ));
        }
        let units: Vec<u16> = ent[56..128]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&units);
        let type_id = guid(&ent[0..16]);
        partitions.push(Partition {
            number,
            start,
            end: end - 1,
            size: end - start,
            type_name: gpt_type_name(&type_id),
            type_id,
            role: Role::Primary,
            bootable: false,
            name: Some(name),
            uuid: Some(guid(&ent[16..32])),
            attributes: gpt_attributes(le64(ent, 48)),
        });
    }
    warnings.extend(overlap_warnings(&partitions));
    Ok(Some(PartitionTable {
        label: TableKind::Gpt,
        id: header.disk_guid,
        sector_size: sector,
        partitions,
        warnings,
    }))
}

/// GPT attribute bits as sfdisk names them; `None` when none is set.
fn gpt_attributes(bits: u64) -> Option<String> {
    let mut names = Vec::new();
    for bit in 0..64 {
        if bits & (1u64 << bit) == 0 {
            continue;
        }
        names.push(match bit {
            0 => "RequiredPartition".to_string(),
            1 => "NoBlockIOProtocol".to_string(),
            2 => "LegacyBIOSBootable".to_string(),
            b => format!("GUID:{b}"),
        });
    }
    (!names.is_empty()).then(|| names.join(" "))
}

/// Names of common MBR partition types, as fdisk shows them.
pub fn mbr_type_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        0x01 => "FAT12",
        0x04 => "FAT16 <32M",
        0x05 => "Extended",
        0x06 => "FAT16",
        0x07 => "HPFS/NTFS/exFAT",
        0x0b => "W95 FAT32",
        0x0c => "W95 FAT32 (LBA)",
        0x0e => "W95 FAT16 (LBA)",
        0x0f => "W95 Ext'd (LBA)",
        0x82 => "Linux swap / Solaris",
        0x83 => "Linux",
        0x85 => "Linux extended",
        0x8e => "Linux LVM",
        0xa5 => "FreeBSD",
        0xa6 => "OpenBSD",
        0xa9 => "NetBSD",
        0xee => "GPT",
        0xef => "EFI (FAT-12/16/32)",
        0xfd => "Linux raid autodetect",
        _ => return None,
    })
}

/// Names of common GPT partition type GUIDs, as fdisk shows them.
pub fn gpt_type_name(guid: &str) -> Option<&'static str> {
    const NAMES: &[(&str, &str)] = &[
        ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EFI System"),
        ("21686148-6449-6E6F-744E-656564454649", "BIOS boot"),
        (
            "024DEE41-33E7-11D3-9D69-0008C781F39F",
            "MBR partition scheme",
        ),
        ("0FC63DAF-8483-4772-8E79-3D69D8477DE4", "Linux filesystem"),
        ("0657FD6D-A4AB-43C4-84E5-0933C84B4F4F", "Linux swap"),
        ("E6D6D379-F507-44C2-A23C-238F2A3DF928", "Linux LVM"),
        ("A19D880F-05FC-4D3B-A006-743F0F84911E", "Linux RAID"),
        (
            "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
            "Linux root (x86-64)",
        ),
        ("44479540-F297-41B2-9AF7-D131D5F0458A", "Linux root (x86)"),
        (
            "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
            "Linux root (ARM-64)",
        ),
        ("933AC7E1-2EB4-4F13-B844-0E14E2AEF915", "Linux home"),
        ("3B8F8425-20E0-4F3B-907F-1A25A76F98E8", "Linux server data"),
        (
            "BC13C2FF-59E6-4262-A352-B275FD6F7172",
            "Linux extended boot",
        ),
        ("8DA63339-0007-60C0-C436-083AC8230908", "Linux reserved"),
        (
            "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
            "Microsoft basic data",
        ),
        ("E3C9E316-0B5C-4DB8-817D-F92DF00215AE", "Microsoft reserved"),
        (
            "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC",
            "Windows recovery environment",
        ),
        (
            "5808C8AA-7E8F-42E0-85D2-E1E90434CFB3",
            "Microsoft LDM metadata",
        ),
        ("AF9B60A0-1431-4F62-BC68-3311714A69AD", "Microsoft LDM data"),
        ("48465300-0000-11AA-AA11-00306543ECAC", "Apple HFS/HFS+"),
        ("7C3457EF-0000-11AA-AA11-00306543ECAC", "Apple APFS"),
        ("516E7CB4-6ECF-11D6-8FF8-00022D09712B", "FreeBSD data"),
        ("516E7CB6-6ECF-11D6-8FF8-00022D09712B", "FreeBSD UFS"),
        ("516E7CBA-6ECF-11D6-8FF8-00022D09712B", "FreeBSD ZFS"),
        ("83BD6B9D-7F41-11DC-BE0B-001560B84F0F", "FreeBSD boot"),
        (
            "6A898CC3-1DD2-11B2-99A6-080020736631",
            "Solaris /usr & Apple ZFS",
        ),
    ];
    NAMES.iter().find(|(g, _)| *g == guid).map(|&(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn guid_is_mixed_endian() {
        // The EFI System type as stored on disk.
        let raw = [
            0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
            0xc9, 0x3b,
        ];
        assert_eq!(guid(&raw), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(gpt_type_name(&guid(&raw)), Some("EFI System"));
    }

    fn part(number: u32, start: u64, end: u64, role: Role) -> Partition {
        Partition {
            number,
            start,
            end,
            size: end + 1 - start,
            type_id: "83".into(),
            type_name: None,
            role,
            bootable: false,
            name: None,
            uuid: None,
            attributes: None,
        }
    }

    #[test]
    fn overlaps_are_found_but_not_the_extended_container() {
        let ok = [
            part(1, 0, 99, Role::Primary),
            part(2, 100, 999, Role::Extended),
            part(5, 200, 299, Role::Logical),
            part(6, 300, 399, Role::Logical),
        ];
        assert!(overlap_warnings(&ok).is_empty());
        let bad = [
            part(1, 0, 1000, Role::Primary),
            part(2, 10, 20, Role::Primary),
            part(3, 500, 600, Role::Primary),
            part(4, 1000, 1100, Role::Primary),
        ];
        assert_eq!(
            overlap_warnings(&bad),
            [
                "partitions 1 and 2 overlap",
                "partitions 1 and 3 overlap",
                "partitions 1 and 4 overlap"
            ]
        );
    }

    #[test]
    fn attributes_are_named_like_sfdisk() {
        assert_eq!(gpt_attributes(0), None);
        assert_eq!(
            gpt_attributes(1 | 4 | (1 << 60)).as_deref(),
            Some("RequiredPartition LegacyBIOSBootable GUID:60")
        );
    }
}
