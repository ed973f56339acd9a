//! Read-only sparse extents of the two older/ESXi layouts qemu reads: VMDK3 "COWD"
//! (`VMFSSPARSE`, or `SPARSE` with the COWD magic) and ESXi `SESPARSE`.
//!
//! Both are a grain directory (L1) held in memory and grain tables (L2) of 4096 entries
//! read on demand; they differ in entry width and encoding. Layouts and checks follow
//! qemu's block/vmdk.c (facts only).

use super::sparse::{Grain, SECTOR};
use crate::{Error, Result};
use blockdev::Storage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The COWD magic, as its first four bytes read big-endian ("COWD").
pub const COWD_MAGIC: u32 = u32::from_be_bytes(*b"COWD");
/// The seSparse constant header magic (little-endian u64 at offset 0).
pub const SESPARSE_MAGIC: u64 = 0xcafe_babe;
/// The seSparse volatile header magic.
pub const SESPARSE_VOLATILE_MAGIC: u64 = 0xcafe_cafe;
/// The one seSparse version qemu reads.
pub const SESPARSE_VERSION: u64 = 0x0000_0002_0000_0001;
/// Entries in every grain table of both layouts.
pub const GT_ENTRIES: u64 = 4096;
/// Largest grain qemu accepts, in sectors.
const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Largest grain directory qemu accepts, in entries.
const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// Grain tables kept in memory before the cache is emptied.
const GT_CACHE_ENTRIES: usize = 64;

/// Which layout an extent has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// VMDK3 "COWD": 32-bit entries in sectors.
    Cowd,
    /// ESXi seSparse: 64-bit tagged entries.
    SeSparse {
        /// Sector where the grain tables start.
        tables_offset: u64,
        /// Sector where the grains start.
        grains_offset: u64,
    },
}

/// An open COWD or seSparse extent.
#[derive(Debug)]
pub struct ForeignSparse {
    /// The extent file.
    pub file: Arc<dyn Storage>,
    /// Its layout.
    pub layout: Layout,
    /// Length of the extent in sectors, as its header says.
    pub sectors: u64,
    /// Grain size in bytes.
    pub grain: u64,
    /// The grain directory.
    gd: Vec<u64>,
    /// Grain tables by their sector in the file.
    tables: Mutex<HashMap<u64, Arc<Vec<u64>>>>,
    /// Where the next grain written goes (COWD only), once known.
    next_free: Mutex<Option<u64>>,
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

/// Reads `len` bytes at `offset`; what lies past the end of the file reads as zeros, as
/// qemu's file driver does.
fn read_padded(file: &dyn Storage, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
    let size = file.size()?;
    let len_usize = usize::try_from(len)
        .map_err(|_| Error::invalid(file.name(), format!("{what} is too large")))?;
    let mut buf = vec![0u8; len_usize];
    if offset < size {
        let n = (size - offset).min(len) as usize;
        file.read_at(&mut buf[..n], offset)?;
    }
    Ok(buf)
}

/// Checks the grain size and directory size as qemu does for every sparse extent.
fn check_sizes(name: &str, grain_sectors: u64, gd_entries: u64) -> Result<()> {
    if grain_sectors > MAX_GRAIN_SECTORS {
        return Err(Error::invalid(
            name,
            "Invalid granularity, image may be corrupt",
        ));
    }
    if gd_entries > MAX_GD_ENTRIES {
        return Err(Error::invalid(name, "L1 size too big"));
    }
    if grain_sectors == 0 {
        // qemu would divide by zero here; refusing is the only sane answer.
        return Err(Error::invalid(
            name,
            "Invalid granularity 0, image is corrupt",
        ));
    }
    Ok(())
}

impl ForeignSparse {
    /// Opens a COWD extent (the file starts with [`COWD_MAGIC`]).
    pub fn open_cowd(file: Arc<dyn Storage>) -> Result<Self> {
        let name = file.name().to_string();
        // The header follows the four magic bytes: version, flags, disk sectors,
        // granularity, directory offset (sectors), directory entries, ... all u32.
        let h = read_padded(file.as_ref(), 4, 40, "header")?;
        let sectors = u64::from(u32_at(&h, 8));
        let granularity = u64::from(u32_at(&h, 12));
        let gd_offset = u64::from(u32_at(&h, 16)) * SECTOR;
        let gd_entries = u64::from(u32_at(&h, 20));
        check_sizes(&name, granularity, gd_entries)?;
        let raw = read_padded(file.as_ref(), gd_offset, gd_entries * 4, "grain directory")?;
        let gd = raw
            .chunks_exact(4)
            .map(|c| u64::from(u32_at(c, 0)))
            .collect();
        Ok(ForeignSparse {
            file,
            layout: Layout::Cowd,
            sectors,
            grain: granularity * SECTOR,
            gd,
            tables: Mutex::new(HashMap::new()),
            next_free: Mutex::new(None),
        })
    }

    /// Opens a seSparse extent, with qemu's strict header checks and its messages.
    pub fn open_sesparse(file: Arc<dyn Storage>) -> Result<Self> {
        let name = file.name().to_string();
        let h = read_padded(file.as_ref(), 0, SECTOR, "const header")?;
        let f = |i: usize| u64_at(&h, i * 8);
        let magic = f(0);
        if magic != SESPARSE_MAGIC {
            return Err(Error::invalid(
                &name,
                format!("Bad const header magic: 0x{magic:016x}"),
            ));
        }
        if f(1) != SESPARSE_VERSION {
            return Err(Error::unsupported(
                &name,
                format!("Unsupported version: 0x{:016x}", f(1)),
            ));
        }
        if f(3) != 8 {
            return Err(Error::unsupported(
                &name,
                format!("Unsupported grain size: {}", f(3)),
            ));
        }
        if f(4) != 64 {
            return Err(Error::unsupported(
                &name,
                format!("Unsupported grain table size: {}", f(4)),
            ));
        }
        if f(5) != 0 {
            return Err(Error::unsupported(
                &name,
                format!("Unsupported flags: 0x{:016x}", f(5)),
            ));
        }
        if (6..10).any(|i| f(i) != 0) {
            return Err(Error::unsupported(
                &name,
                format!(
                    "Unsupported reserved bits: 0x{:016x} 0x{:016x} 0x{:016x} 0x{:016x}",
                    f(6),
                    f(7),
                    f(8),
                    f(9)
                ),
            ));
        }
        if h[208..].iter().any(|&b| b != 0) {
            return Err(Error::unsupported(
                &name,
                "Unsupported non-zero const header padding",
            ));
        }
        let volatile_at = f(10)
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::invalid(&name, "volatile header offset is out of range"))?;
        let v = read_padded(file.as_ref(), volatile_at, SECTOR, "volatile header")?;
        let vmagic = u64_at(&v, 0);
        if vmagic != SESPARSE_VOLATILE_MAGIC {
            return Err(Error::invalid(
                &name,
                format!("Bad volatile header magic: 0x{vmagic:016x}"),
            ));
        }
        if u64_at(&v, 24) != 0 {
            return Err(Error::unsupported(
                &name,
                "Image is dirty, Replaying journal not supported",
            ));
        }
        if v[32..].iter().any(|&b| b != 0) {
            return Err(Error::unsupported(
                &name,
                "Unsupported non-zero volatile header padding",
            ));
        }
        let sectors = f(2);
        let gd_offset = f(16);
        let gd_entries = f(17).saturating_mul(SECTOR / 8);
        check_sizes(&name, 8, gd_entries)?;
        let gd_at = gd_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::invalid(&name, "grain directory offset is out of range"))?;
        let raw = read_padded(file.as_ref(), gd_at, gd_entries * 8, "grain directory")?;
        let gd = raw.chunks_exact(8).map(|c| u64_at(c, 0)).collect();
        Ok(ForeignSparse {
            file,
            layout: Layout::SeSparse {
                tables_offset: f(18),
                grains_offset: f(24),
            },
            sectors,
            grain: 8 * SECTOR,
            gd,
            tables: Mutex::new(HashMap::new()),
            next_free: Mutex::new(None),
        })
    }

    /// Bytes of grain directory this extent holds in memory.
    pub fn directory_bytes(&self) -> u64 {
        self.gd.len() as u64 * 8
    }

    /// Length of the extent in bytes.
    pub fn byte_len(&self) -> u64 {
        self.sectors.saturating_mul(SECTOR)
    }

    fn corrupt(&self, offset: u64, why: String) -> Error {
        Error::corrupt(self.file.name(), offset, why)
    }

    /// The sector of the grain table for directory entry `i`, or `None` when unallocated.
    fn table_sector(&self, i: u64, guest: u64) -> Result<Option<u64>> {
        let Some(&entry) = self.gd.get(i as usize) else {
            return Err(self.corrupt(
                guest,
                format!(
                    "byte {guest:#x} lies past the grain directory ({} entries)",
                    self.gd.len()
                ),
            ));
        };
        if entry == 0 {
            return Ok(None);
        }
        match self.layout {
            Layout::Cowd => Ok(Some(entry)),
            Layout::SeSparse { tables_offset, .. } => {
                if entry & 0xffff_ffff_0000_0000 != 0x1000_0000_0000_0000 {
                    return Err(self.corrupt(
                        guest,
                        format!("invalid grain directory entry {entry:#018x}"),
                    ));
                }
                let sector = (entry & 0xffff_ffff)
                    .checked_mul(GT_ENTRIES * 8 / SECTOR)
                    .and_then(|s| s.checked_add(tables_offset))
                    .filter(|&s| s <= u64::from(u32::MAX))
                    .ok_or_else(|| {
                        self.corrupt(
                            guest,
                            format!("grain table of entry {entry:#018x} is out of range"),
                        )
                    })?;
                Ok(Some(sector))
            }
        }
    }

    fn table(&self, sector: u64) -> Result<Arc<Vec<u64>>> {
        let mut cache = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get(&sector) {
            return Ok(t.clone());
        }
        let width = match self.layout {
            Layout::Cowd => 4,
            Layout::SeSparse { .. } => 8,
        };
        let raw = read_padded(
            self.file.as_ref(),
            sector * SECTOR,
            GT_ENTRIES * width,
            "grain table",
        )?;
        let t: Vec<u64> = if width == 4 {
            raw.chunks_exact(4)
                .map(|c| u64::from(u32_at(c, 0)))
                .collect()
        } else {
            raw.chunks_exact(8).map(|c| u64_at(c, 0)).collect()
        };
        if cache.len() >= GT_CACHE_ENTRIES {
            cache.clear();
        }
        let t = Arc::new(t);
        cache.insert(sector, t.clone());
        Ok(t)
    }

    /// What one grain table entry means, for the grain at guest byte `guest`.
    fn decode(&self, entry: u64, guest: u64) -> Result<Grain> {
        match self.layout {
            Layout::Cowd => Ok(if entry == 0 {
                Grain::Unallocated
            } else {
                Grain::At(entry * SECTOR)
            }),
            Layout::SeSparse { grains_offset, .. } => match entry >> 60 {
                0 if entry == 0 => Ok(Grain::Unallocated),
                // Unmapped and zeroed grains both read as zeros.
                1 | 2 => Ok(Grain::Zero),
                3 => {
                    let index = ((entry & 0x0fff_0000_0000_0000) >> 48)
                        | ((entry & 0x0000_ffff_ffff_ffff) << 12);
                    index
                        .checked_mul(8)
                        .and_then(|s| s.checked_add(grains_offset))
                        .and_then(|s| s.checked_mul(SECTOR))
                        .map(Grain::At)
                        .ok_or_else(|| {
                            self.corrupt(
                                guest,
                                format!("grain entry {entry:#018x} is out of range"),
                            )
                        })
                }
                _ => Err(self.corrupt(guest, format!("invalid grain table entry {entry:#018x}"))),
            },
        }
    }

    /// Maps extent byte `offset` (inside the extent): what the grain holding it is, and for
    /// how many bytes (at most `len`) the same answer holds (host bytes contiguous for data).
    pub fn map(&self, offset: u64, len: u64) -> Result<(Grain, u64)> {
        self.walk(offset, len, true)
    }

    /// As [`ForeignSparse::map`], without refusing grains that start past the end of the
    /// file (for `check`, which reports them).
    pub fn map_unchecked(&self, offset: u64, len: u64) -> Result<(Grain, u64)> {
        self.walk(offset, len, false)
    }

    fn walk(&self, offset: u64, len: u64, check_eof: bool) -> Result<(Grain, u64)> {
        let per_table = GT_ENTRIES * self.grain;
        let mut at = offset;
        let end = offset + len;
        let mut first: Option<Grain> = None;
        while at < end {
            let gd_index = at / per_table;
            let grain_index = (at % per_table) / self.grain;
            let table = self.table_sector(gd_index, at)?;
            let table_missing = table.is_none();
            let grain = match table {
                None => Grain::Unallocated,
                Some(sector) => {
                    let t = self.table(sector)?;
                    let g = self.decode(t[grain_index as usize], at)?;
                    if let (Grain::At(host), true) = (g, check_eof) {
                        let size = self.file.size()?;
                        if host >= size {
                            return Err(self.corrupt(
                                host,
                                format!(
                                    "grain at {host:#x} lies outside the extent file (size {size})"
                                ),
                            ));
                        }
                    }
                    g
                }
            };
            let in_grain = at % self.grain;
            let here = match grain {
                Grain::At(h) => Grain::At(h + in_grain),
                g => g,
            };
            let step = if table_missing {
                // A missing grain table leaves its whole span unallocated.
                (per_table - at % per_table).min(end - at)
            } else {
                (self.grain - in_grain).min(end - at)
            };
            match first {
                None => first = Some(here),
                Some(f) => {
                    let continues = match (f, here) {
                        (Grain::At(a), Grain::At(b)) => b == a + (at - offset),
                        (Grain::Zero, Grain::Zero) => true,
                        (Grain::Unallocated, Grain::Unallocated) => true,
                        _ => false,
                    };
                    if !continues {
                        break;
                    }
                }
            }
            at += step;
        }
        Ok((first.unwrap_or(Grain::Unallocated), at - offset))
    }

    /// Reserves one grain at the end of a COWD extent file (where qemu puts new grains:
    /// after the file rounded up to whole grains) and returns its byte offset.
    pub fn reserve_grain(&self) -> Result<u64> {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let at = match *next {
            Some(at) => at,
            None => {
                self.file
                    .size()?
                    .div_ceil(SECTOR)
                    .div_ceil(self.grain / SECTOR)
                    * self.grain
            }
        };
        if at / SECTOR + self.grain / SECTOR > u64::from(u32::MAX) {
            return Err(Error::unsupported(
                self.file.name(),
                "the extent file is too large for a COWD extent",
            ));
        }
        *next = Some(at + self.grain);
        Ok(at)
    }

    /// Whether grain `grain_index` can get a place: COWD extents only, and only where the
    /// directory has a grain table (qemu does not add tables either).
    pub fn check_writable(&self, grain_index: u64, guest: u64) -> Result<()> {
        if self.layout != Layout::Cowd {
            return Err(Error::unsupported(
                self.file.name(),
                "No write support for seSparse images available",
            ));
        }
        if self
            .table_sector(grain_index / GT_ENTRIES, guest)?
            .is_none()
        {
            return Err(Error::unsupported(
                self.file.name(),
                format!("byte {guest:#x} has no grain table to record a new grain in"),
            ));
        }
        Ok(())
    }

    /// Points COWD grain `grain_index` at byte `host` of the file. The grain's data must be
    /// written: it is made durable before the entry that points to it, as qemu does.
    pub fn set_entry(&self, grain_index: u64, host: u64) -> Result<()> {
        let guest = grain_index * self.grain;
        let Some(sector) = self.table_sector(grain_index / GT_ENTRIES, guest)? else {
            return Err(Error::unsupported(
                self.file.name(),
                format!("byte {guest:#x} has no grain table to record a new grain in"),
            ));
        };
        let value = u32::try_from(host / SECTOR).map_err(|_| {
            Error::unsupported(
                self.file.name(),
                "the extent file is too large for a COWD extent",
            )
        })?;
        self.file.flush()?;
        let index = grain_index % GT_ENTRIES;
        self.file
            .write_at(&value.to_le_bytes(), sector * SECTOR + index * 4)?;
        self.file.flush()?;
        let mut cache = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = cache.get_mut(&sector) {
            let mut entries = t.as_ref().clone();
            entries[index as usize] = u64::from(value);
            *t = Arc::new(entries);
        }
        Ok(())
    }
}
