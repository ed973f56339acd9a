//! Hosted sparse extents ("KDMV"): the header, the grain directory (GD) and its redundant
//! copy, grain tables (GT) and grain allocation.

use crate::{Error, Result};
use blockdev::Storage;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The magic number, as it reads little-endian from the first four bytes ("KDMV").
pub const MAGIC: u32 = 0x564d_444b;
/// The header is one sector.
pub const SECTOR: u64 = 512;
/// `flags`: the newline detection characters are valid.
pub const FLAG_NL_DETECT: u32 = 1 << 0;
/// `flags`: a redundant grain directory is kept.
pub const FLAG_RGD: u32 = 1 << 1;
/// `flags`: grain table entry 1 means "zeroed grain".
pub const FLAG_ZERO_GRAIN: u32 = 1 << 2;
/// `flags`: grains are compressed.
pub const FLAG_COMPRESSED: u32 = 1 << 16;
/// `flags`: grains and tables are preceded by markers.
pub const FLAG_MARKER: u32 = 1 << 17;
/// `compressAlgorithm`: deflate.
pub const COMPRESSION_DEFLATE: u16 = 1;
/// `gdOffset` of a stream whose directory is found through the footer.
pub const GD_AT_END: u64 = u64::MAX;
/// The grain table entry of a zeroed grain.
pub const GTE_ZEROED: u32 = 1;
/// Largest number of entries per grain table qemu accepts.
pub const MAX_GTES: u32 = 512;
/// Largest grain qemu accepts, in sectors.
pub const MAX_GRAIN_SECTORS: u64 = 0x20_0000;
/// Largest grain directory qemu accepts, in entries.
pub const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// Grain tables kept in memory per extent before the cache is emptied.
const GT_CACHE_ENTRIES: usize = 4096;

/// The sparse extent header (the part after the magic number), little-endian on disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Format version (1..3).
    pub version: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Extent length in sectors.
    pub capacity: u64,
    /// Grain size in sectors.
    pub granularity: u64,
    /// Embedded descriptor offset in sectors (0: none).
    pub desc_offset: u64,
    /// Embedded descriptor size in sectors.
    pub desc_size: u64,
    /// Entries per grain table.
    pub num_gtes_per_gt: u32,
    /// Redundant grain directory offset in sectors.
    pub rgd_offset: u64,
    /// Grain directory offset in sectors ([`GD_AT_END`] for streams).
    pub gd_offset: u64,
    /// First sector of grain data (end of metadata).
    pub grain_offset: u64,
    /// `COMPRESSION_*`.
    pub compress_algorithm: u16,
}

impl Header {
    /// Parses the 512-byte header sector (including the magic number).
    pub fn parse(b: &[u8]) -> Header {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        Header {
            version: u32_at(4),
            flags: u32_at(8),
            capacity: u64_at(12),
            granularity: u64_at(20),
            desc_offset: u64_at(28),
            desc_size: u64_at(36),
            num_gtes_per_gt: u32_at(44),
            rgd_offset: u64_at(48),
            gd_offset: u64_at(56),
            grain_offset: u64_at(64),
            compress_algorithm: u16::from_le_bytes([b[77], b[78]]),
        }
    }

    /// The 512-byte header sector, with the magic number and the newline check bytes.
    pub fn serialize(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&self.version.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..20].copy_from_slice(&self.capacity.to_le_bytes());
        b[20..28].copy_from_slice(&self.granularity.to_le_bytes());
        b[28..36].copy_from_slice(&self.desc_offset.to_le_bytes());
        b[36..44].copy_from_slice(&self.desc_size.to_le_bytes());
        b[44..48].copy_from_slice(&self.num_gtes_per_gt.to_le_bytes());
        b[48..56].copy_from_slice(&self.rgd_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.gd_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.grain_offset.to_le_bytes());
        b[72] = 0;
        b[73..77].copy_from_slice(b"\n \r\n");
        b[77..79].copy_from_slice(&self.compress_algorithm.to_le_bytes());
        b
    }

    /// Checks the fields qemu checks, with its messages; returns the number of GD entries.
    pub fn validate(&self, file_len: u64, writable: bool) -> std::result::Result<u64, String> {
        let compressed = self.compress_algorithm == COMPRESSION_DEFLATE;
        if self.version > 3 {
            return Err(format!("Unsupported VMDK version {}", self.version));
        }
        if self.version == 3 && writable && !compressed {
            return Err("VMDK version 3 must be read only".into());
        }
        if self.num_gtes_per_gt > MAX_GTES {
            return Err("L2 table size too big".into());
        }
        let entry_sectors = u64::from(self.num_gtes_per_gt).saturating_mul(self.granularity);
        if entry_sectors == 0 {
            return Err("L1 entry size is invalid".into());
        }
        let gd_entries = self.capacity.div_ceil(entry_sectors);
        if file_len.div_ceil(SECTOR) < self.grain_offset {
            return Err(format!(
                "File truncated, expecting at least {} bytes",
                self.grain_offset.saturating_mul(SECTOR)
            ));
        }
        if self.granularity > MAX_GRAIN_SECTORS {
            return Err("Invalid granularity, image may be corrupt".into());
        }
        if gd_entries > MAX_GD_ENTRIES {
            return Err("L1 size too big".into());
        }
        if self.capacity > crate::image::MAX_LENGTH / SECTOR {
            return Err(format!(
                "Extent capacity {} sectors is larger than a disk can be",
                self.capacity
            ));
        }
        Ok(gd_entries)
    }
}

/// What a grain table entry says about a grain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grain {
    /// Not allocated (reads from the backing image or as zeros).
    Unallocated,
    /// A zeroed grain.
    Zero,
    /// Stored at this byte offset of the extent file.
    At(u64),
}

/// A grain table read from disk, and where it lives.
#[derive(Debug)]
struct Table {
    entries: Vec<u32>,
}

/// Grain tables in memory. Entries written by [`SparseExtent::set_entry`] stay here (dirty)
/// until [`SparseExtent::flush_tables`] has made the grains they point to durable and then
/// written the tables: a crash can never leave an entry pointing at data that did not reach
/// the disk.
#[derive(Debug, Default)]
struct GtCache {
    tables: HashMap<u32, Arc<Table>>,
    /// Dirty tables: sector of the table and of its redundant copy.
    dirty: std::collections::BTreeMap<u32, Option<u32>>,
}

/// Dirty grain tables that make a writer flush them at once (each maps 32 MiB with the
/// default geometry, so this is a flush per some 32 GiB of new data).
const MAX_DIRTY_TABLES: usize = 1024;

/// A hosted sparse extent.
#[derive(Debug)]
pub struct SparseExtent {
    /// The extent file.
    pub file: Arc<dyn Storage>,
    /// The header (from the footer for streams).
    pub header: Header,
    /// Grain size in bytes.
    pub grain: u64,
    /// The grain directory: sector offsets of the grain tables (0: none yet).
    gd: Mutex<Vec<u32>>,
    /// The redundant grain directory, when the header names one.
    rgd: Mutex<Option<Vec<u32>>>,
    /// Number of GD entries the header implies.
    gd_entries: u64,
    /// Grain tables by their sector offset, and the ones with entries not yet on disk.
    gts: Mutex<GtCache>,
    /// Held while dirty tables are written, so that two flushes never write older copies
    /// of a table over newer ones.
    flushing: Mutex<()>,
    /// Next free byte of the extent file, for allocation.
    next_free: Mutex<u64>,
}

/// Reads up to `count` little-endian u32s at `offset`; what lies past the end of the file
/// reads as zeros (as qemu's block layer pads short reads), so a truncated table costs no
/// more memory than the file holds.
fn read_u32s(file: &dyn Storage, offset: u64, count: u64, file_len: u64) -> Result<Vec<u32>> {
    // Read in pieces: the table costs its own memory, not twice that for a byte buffer too.
    const PIECE: u64 = 64 << 10;
    let avail = file_len.saturating_sub(offset).min(count * 4) / 4 * 4;
    let mut v: Vec<u32> = Vec::with_capacity(if count <= 1 << 20 {
        count as usize
    } else {
        (avail / 4) as usize
    });
    let mut buf = vec![0u8; PIECE.min(avail) as usize];
    let mut done = 0;
    while done < avail {
        let n = (avail - done).min(PIECE);
        let piece = &mut buf[..n as usize];
        file.read_at(piece, offset + done)?;
        v.extend(
            piece
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap())),
        );
        done += n;
    }
    // Entries past the end read as zeros; they are kept implicit only for huge tables.
    if count <= 1 << 20 {
        v.resize(count as usize, 0);
    }
    Ok(v)
}

impl SparseExtent {
    /// Opens the sparse extent in `file`, whose header is `header` (already validated:
    /// `gd_entries` is what [`Header::validate`] returned).
    pub fn open(file: Arc<dyn Storage>, header: Header, gd_entries: u64) -> Result<Self> {
        let len = file.size()?;
        let name = file.name().to_string();
        let gd = read_u32s(
            file.as_ref(),
            header.gd_offset.saturating_mul(SECTOR),
            gd_entries,
            len,
        )
        .map_err(|e| {
            Error::invalid(
                &name,
                format!("Could not read l1 table from extent '{name}': {e}"),
            )
        })?;
        let rgd = if header.flags & FLAG_RGD != 0 && header.rgd_offset != 0 {
            Some(
                read_u32s(
                    file.as_ref(),
                    header.rgd_offset.saturating_mul(SECTOR),
                    gd_entries,
                    len,
                )
                .map_err(|e| {
                    Error::invalid(
                        &name,
                        format!("Could not read l1 backup table from extent '{name}': {e}"),
                    )
                })?,
            )
        } else {
            None
        };
        let grain = header.granularity * SECTOR;
        Ok(SparseExtent {
            file,
            header,
            grain,
            gd: Mutex::new(gd),
            rgd: Mutex::new(rgd),
            gd_entries,
            gts: Mutex::new(GtCache::default()),
            flushing: Mutex::new(()),
            // Grains go after the end of the file: whole grains for plain extents (as qemu
            // allocates them), sectors for compressed ones.
            next_free: Mutex::new(if header.compress_algorithm == COMPRESSION_DEFLATE {
                len.div_ceil(SECTOR) * SECTOR
            } else {
                len.div_ceil(grain) * grain
            }),
        })
    }

    /// Whether grains are compressed.
    pub fn compressed(&self) -> bool {
        self.header.compress_algorithm == COMPRESSION_DEFLATE
    }

    /// Whether compressed grains start with a marker.
    pub fn has_marker(&self) -> bool {
        self.header.flags & FLAG_MARKER != 0
    }

    /// Bytes of grain directory (and redundant copy) this extent holds in memory.
    pub fn directory_bytes(&self) -> u64 {
        let gd = self.gd.lock().unwrap_or_else(|e| e.into_inner()).len();
        let rgd = self
            .rgd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0, |r| r.len());
        (gd + rgd) as u64 * 4
    }

    /// Extent length in bytes.
    pub fn byte_len(&self) -> u64 {
        self.header.capacity * SECTOR
    }

    fn gtes(&self) -> u64 {
        u64::from(self.header.num_gtes_per_gt)
    }

    /// The grain table of GD entry `gd_index` (`None`: no table).
    fn table(&self, gd_index: u64) -> Result<Option<Arc<Table>>> {
        let sector = {
            let gd = self.gd.lock().unwrap_or_else(|e| e.into_inner());
            gd.get(gd_index as usize).copied().unwrap_or(0)
        };
        if sector == 0 {
            return Ok(None);
        }
        // The table is read from disk under the cache lock: a writer updates disk and cache
        // under it too, so no reader can cache a table older than an entry written meanwhile.
        let mut gts = self.gts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = gts.tables.get(&sector) {
            return Ok(Some(t.clone()));
        }
        let offset = u64::from(sector) * SECTOR;
        let bytes = self.gtes() * 4;
        let len = self.file.size()?;
        if offset + bytes > len {
            return Err(Error::corrupt(
                self.file.name(),
                offset,
                format!("grain table {gd_index} lies outside the extent file (size {len})"),
            ));
        }
        let entries = read_u32s(self.file.as_ref(), offset, self.gtes(), len)?;
        let t = Arc::new(Table { entries });
        if gts.tables.len() >= GT_CACHE_ENTRIES {
            // Dirty tables stay: they are the only up-to-date copy.
            let GtCache { tables, dirty } = &mut *gts;
            tables.retain(|s, _| dirty.contains_key(s));
        }
        gts.tables.insert(sector, t.clone());
        Ok(Some(t))
    }

    fn decode(&self, gte: u32) -> Grain {
        match gte {
            0 => Grain::Unallocated,
            GTE_ZEROED if self.header.flags & FLAG_ZERO_GRAIN != 0 => Grain::Zero,
            s => Grain::At(u64::from(s) * SECTOR),
        }
    }

    /// How the extent range at `offset` (bytes into the extent) is stored, and for how many
    /// bytes (at most `len`) it continues so: runs of grains that are all unallocated, all
    /// zero, or allocated contiguously are reported at once.
    pub fn map(&self, offset: u64, len: u64) -> Result<(Grain, u64)> {
        let grain_index = offset / self.grain;
        let in_grain = offset % self.grain;
        let gd_index = grain_index / self.gtes();
        let gt_index = (grain_index % self.gtes()) as usize;
        // The rest of the range this grain table covers.
        let table_end = (gd_index + 1) * self.gtes() * self.grain;
        let max = len.min(table_end - offset);
        let Some(table) = self.table(gd_index)? else {
            return Ok((Grain::Unallocated, max));
        };
        let first = self.decode(table.entries[gt_index]);
        let mut n = (self.grain - in_grain).min(max);
        // Compressed grains are one extent each: each is decompressed on its own.
        if !self.compressed() {
            let mut i = gt_index + 1;
            let mut k = 1;
            while n < max && i < table.entries.len() {
                let next = self.decode(table.entries[i]);
                let same = match (first, next) {
                    (Grain::At(a), Grain::At(b)) => b == a + k * self.grain,
                    (a, b) => a == b,
                };
                k += 1;
                if !same {
                    break;
                }
                n = (n + self.grain).min(max);
                i += 1;
            }
        }
        let first = match first {
            Grain::At(o) => Grain::At(o + in_grain),
            g => g,
        };
        Ok((first, n))
    }

    /// Reserves `bytes` (rounded up to whole sectors) at the end of the extent file, for a
    /// compressed grain or a stream's end marker.
    pub fn reserve_bytes(&self, bytes: u64) -> u64 {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let at = *next;
        *next += bytes.div_ceil(SECTOR) * SECTOR;
        at
    }

    /// Reserves space for one grain at the end of the extent file.
    pub fn reserve_grain(&self) -> u64 {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let at = *next;
        *next += self.grain;
        at
    }

    /// Points the grain `grain_index` (of the extent) at byte `host` (or marks it zeroed with
    /// `GTE_ZEROED`, or unallocated with 0) in the cached grain table, allocating the table
    /// and its redundant copy first if the directory has none. The grain's data must already
    /// be written; the entry reaches the disk (in both tables) with [`Self::flush_tables`].
    pub fn set_entry(&self, grain_index: u64, value: u32) -> Result<()> {
        let gd_index = grain_index / self.gtes();
        let gt_index = grain_index % self.gtes();
        if gd_index >= self.gd_entries {
            return Err(Error::corrupt(
                self.file.name(),
                0,
                format!("grain {grain_index} is past the grain directory"),
            ));
        }
        let (sector, rsector) = self.tables_for(gd_index)?;
        // Load the table, then change it in memory only; it reaches the disk with the
        // next flush, after the data it points to.
        let mut tries = 0;
        let dirty = loop {
            self.table(gd_index)?;
            let mut gts = self.gts.lock().unwrap_or_else(|e| e.into_inner());
            let Some(t) = gts.tables.get_mut(&sector) else {
                // Evicted by another reader in between (it was clean): load it again.
                tries += 1;
                if tries > 8 {
                    return Err(Error::corrupt(
                        self.file.name(),
                        u64::from(sector) * SECTOR,
                        "grain table cannot be kept in the cache",
                    ));
                }
                continue;
            };
            let mut entries = t.entries.clone();
            entries[gt_index as usize] = value;
            *t = Arc::new(Table { entries });
            gts.dirty.insert(sector, rsector);
            break gts.dirty.len();
        };
        if dirty >= MAX_DIRTY_TABLES {
            self.flush_tables()?;
        }
        Ok(())
    }

    /// Makes the grains written so far durable, then writes the grain tables whose entries
    /// point to them (the redundant copy first), and makes those durable too.
    pub fn flush_tables(&self) -> Result<()> {
        let _one = self.flushing.lock().unwrap_or_else(|e| e.into_inner());
        let dirty: Vec<(u32, Option<u32>, Arc<Table>)> = {
            let mut gts = self.gts.lock().unwrap_or_else(|e| e.into_inner());
            let dirty = std::mem::take(&mut gts.dirty);
            dirty
                .into_iter()
                .filter_map(|(s, r)| gts.tables.get(&s).map(|t| (s, r, t.clone())))
                .collect()
        };
        if dirty.is_empty() {
            return Ok(());
        }
        // Every entry in these copies was set after its grain was written: one flush makes
        // all of those grains durable before any entry can be.
        self.file.flush()?;
        let result = (|| -> Result<()> {
            for (sector, rsector, table) in &dirty {
                let bytes: Vec<u8> = table.entries.iter().flat_map(|e| e.to_le_bytes()).collect();
                if let Some(r) = rsector {
                    self.file.write_at(&bytes, u64::from(*r) * SECTOR)?;
                }
                self.file.write_at(&bytes, u64::from(*sector) * SECTOR)?;
            }
            self.file.flush()?;
            Ok(())
        })();
        if result.is_err() {
            // Keep them dirty for another try.
            let mut gts = self.gts.lock().unwrap_or_else(|e| e.into_inner());
            for (s, r, _) in dirty {
                gts.dirty.insert(s, r);
            }
        }
        result
    }

    /// The sector offsets of the grain table (and redundant table) of GD entry `gd_index`,
    /// allocated (zeroed, then linked from both directories) if missing.
    fn tables_for(&self, gd_index: u64) -> Result<(u32, Option<u32>)> {
        let mut gd = self.gd.lock().unwrap_or_else(|e| e.into_inner());
        let mut rgd = self.rgd.lock().unwrap_or_else(|e| e.into_inner());
        if gd.len() <= gd_index as usize {
            gd.resize(gd_index as usize + 1, 0);
        }
        let existing = gd[gd_index as usize];
        let rexisting = rgd
            .as_ref()
            .map(|r| r.get(gd_index as usize).copied().unwrap_or(0));
        if existing != 0 && rexisting.is_none_or(|r| r != 0) {
            return Ok((existing, rexisting));
        }
        // Directories must lie inside the file before anything is written to them.
        let flen = self.file.size()?;
        let mut dirs = vec![self.header.gd_offset];
        if rgd.is_some() {
            dirs.push(self.header.rgd_offset);
        }
        for dir in dirs {
            let end = dir
                .saturating_mul(SECTOR)
                .saturating_add(self.gd_entries * 4);
            if end > flen {
                return Err(Error::corrupt(
                    self.file.name(),
                    dir.saturating_mul(SECTOR),
                    format!("the grain directory lies outside the extent file (size {flen})"),
                ));
            }
        }
        let table_bytes = (self.gtes() * 4).div_ceil(SECTOR) * SECTOR;
        let alloc = |next: &mut u64| -> Result<u32> {
            let at = *next;
            *next += table_bytes.div_ceil(self.grain) * self.grain;
            self.file.write_zeroes(at, table_bytes, false)?;
            u32::try_from(at / SECTOR).map_err(|_| {
                Error::unsupported(self.file.name(), "the extent file is too large for VMDK")
            })
        };
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let new = if existing == 0 {
            alloc(&mut next)?
        } else {
            existing
        };
        let rnew = match rexisting {
            Some(0) => Some(alloc(&mut next)?),
            other => other,
        };
        drop(next);
        self.file.flush()?;
        if let (Some(r), Some(rgd)) = (rnew, rgd.as_mut()) {
            if rgd.len() <= gd_index as usize {
                rgd.resize(gd_index as usize + 1, 0);
            }
            rgd[gd_index as usize] = r;
            self.file.write_at(
                &r.to_le_bytes(),
                self.header.rgd_offset * SECTOR + gd_index * 4,
            )?;
        }
        gd[gd_index as usize] = new;
        self.file.write_at(
            &new.to_le_bytes(),
            self.header.gd_offset * SECTOR + gd_index * 4,
        )?;
        Ok((new, rnew))
    }

    /// Grain table entries of the whole extent, in order (for `check`): `(grain index,
    /// entry)` of every non-zero entry.
    pub fn entries(&self) -> Result<Vec<(u64, u32)>> {
        let mut out = Vec::new();
        for gd_index in 0..self.gd_entries {
            if let Some(t) = self.table(gd_index)? {
                for (i, &e) in t.entries.iter().enumerate() {
                    if e != 0 {
                        out.push((gd_index * self.gtes() + i as u64, e));
                    }
                }
            }
        }
        Ok(out)
    }
}
