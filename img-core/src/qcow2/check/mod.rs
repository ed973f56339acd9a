//! `img check` for qcow2: walks every table, recounts references, reports and repairs.
//!
//! The check works on the image file alone, never on an open driver's state. It follows the
//! order and accounting of qemu-img 10 exactly, because its messages, counters and exit codes
//! are an interface that scripts rely on:
//!
//! 1. recount: the header cluster, the active L1 table and its L2 tables and data clusters,
//!    every snapshot's L1 and L2 tables and data clusters, the snapshot table, the refcount
//!    table, the bitmap directory and bitmap tables, and the refcount blocks, into an
//!    in-memory table bounded by the file size ([`imrt`]);
//! 2. compare with the stored refcounts ([`repair::compare`]), reporting leaks and errors;
//! 3. repair as asked: fix single refcounts in place, or, if the refcount structure itself is
//!    broken, write a new one and switch the header to it in one write ([`repair::rebuild`]);
//! 4. check (and repair) the OFLAG_COPIED flags against the refcounts.
//!
//! Every repair writes new data before the pointer that makes it live, with a flush between.

pub(in crate::qcow2) mod imrt;
mod repair;
mod snapshots;
mod walk;

use super::header::{autoclear, ext, incompat, offsets, Header};
use crate::{Error, Result};
use blockdev::Storage;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Which problems a check repairs (`-r leaks`, `-r all`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fix {
    /// Free leaked clusters.
    pub leaks: bool,
    /// Repair errors (refcounts too low, broken refcount structure).
    pub errors: bool,
}

impl Fix {
    /// Report only.
    pub const NONE: Fix = Fix {
        leaks: false,
        errors: false,
    };
    /// `-r leaks`.
    pub const LEAKS: Fix = Fix {
        leaks: true,
        errors: false,
    };
    /// `-r all`.
    pub const ALL: Fix = Fix {
        leaks: true,
        errors: true,
    };

    fn any(self) -> bool {
        self.leaks || self.errors
    }
}

/// What a check found (and fixed), with qemu-img's counters.
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Lines qemu-img prints to stderr while checking ("Leaked cluster 5 refcount=1 reference=0").
    pub messages: Vec<String>,
    /// Corruptions remaining.
    pub corruptions: u64,
    /// Leaked clusters remaining.
    pub leaks: u64,
    /// Errors that kept the check from completing.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Offset of the end of the last used cluster.
    pub image_end_offset: u64,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Allocated guest clusters.
    pub allocated_clusters: u64,
    /// Fragmented guest clusters.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// Set when the check itself failed (qemu-img then prints `Check failed: <reason>`, no
    /// summary, and exits with 1): the reason, as the C library words the errno.
    pub failed: Option<String>,
}

/// Why a step of the check could not go on: an errno, worded as the C library words it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Fail(Cow<'static, str>);

impl Fail {
    const EIO: Fail = Fail(Cow::Borrowed("Input/output error"));
    const ENOMEM: Fail = Fail(Cow::Borrowed("Cannot allocate memory"));
    const EFBIG: Fail = Fail(Cow::Borrowed("File too large"));
    const EINVAL: Fail = Fail(Cow::Borrowed("Invalid argument"));

    fn text(&self) -> &str {
        &self.0
    }
}

impl From<blockdev::Error> for Fail {
    fn from(e: blockdev::Error) -> Fail {
        match e.io_error() {
            Some(io) => Fail(Cow::Owned(blockdev::os_message(io))),
            None => Fail::EIO,
        }
    }
}

/// A number as C's `%#x` prints it: with `0x`, except for zero.
fn alt_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// qemu's check counters (signed: repairs decrement them).
#[derive(Clone, Copy, Debug, Default)]
struct Res {
    corruptions: i64,
    leaks: i64,
    check_errors: i64,
    corruptions_fixed: i64,
    leaks_fixed: i64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
}

impl Res {
    /// Adds another part's counters; with `allocation`, takes its allocation figures too.
    fn add(&mut self, o: &Res, allocation: bool) {
        self.corruptions += o.corruptions;
        self.leaks += o.leaks;
        self.check_errors += o.check_errors;
        self.corruptions_fixed += o.corruptions_fixed;
        self.leaks_fixed += o.leaks_fixed;
        if allocation {
            self.image_end_offset = o.image_end_offset;
            self.total_clusters = o.total_clusters;
            self.allocated_clusters = o.allocated_clusters;
            self.fragmented_clusters = o.fragmented_clusters;
            self.compressed_clusters = o.compressed_clusters;
        }
    }
}

/// An internal snapshot table entry (docs/interop/qcow2.rst, "Snapshots"), kept whole so
/// that a repair can write the table again.
#[derive(Clone, Debug, Default)]
struct Snapshot {
    id: String,
    name: String,
    l1_offset: u64,
    l1_size: u32,
    vm_state_size: u64,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    extra_data_size: u32,
    disk_size: u64,
    icount: u64,
    /// Extra data past the fields this version knows.
    unknown_extra: Vec<u8>,
}

/// Table entry masks (docs/interop/qcow2.rst).
mod mask {
    /// Host offset bits of L1 and standard L2 entries.
    pub const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
    /// Reserved bits of an L1 entry.
    pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
    /// Reserved bits of a standard L2 entry.
    pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
    /// Offset bits of a refcount table entry.
    pub const REFT_OFFSET: u64 = 0xffff_ffff_ffff_fe00;
    /// Reserved bits of a refcount table entry.
    pub const REFT_RESERVED: u64 = 0x1ff;
    /// Reserved bits of a bitmap table entry.
    pub const BME_RESERVED: u64 = 0xff00_0000_0000_01fe;
}

/// Metadata overlap classes, in qemu's bit order (the names appear in messages).
mod ol {
    pub const MAIN_HEADER: u32 = 1 << 0;
    pub const ACTIVE_L1: u32 = 1 << 1;
    pub const ACTIVE_L2: u32 = 1 << 2;
    pub const REFCOUNT_TABLE: u32 = 1 << 3;
    pub const REFCOUNT_BLOCK: u32 = 1 << 4;
    pub const SNAPSHOT_TABLE: u32 = 1 << 5;
    pub const INACTIVE_L1: u32 = 1 << 6;
    pub const INACTIVE_L2: u32 = 1 << 7;
    pub const BITMAP_DIRECTORY: u32 = 1 << 8;
    /// What qemu checks by default (overlap-check=cached): everything but inactive L2 tables.
    pub const CACHED: u32 = MAIN_HEADER
        | ACTIVE_L1
        | ACTIVE_L2
        | REFCOUNT_TABLE
        | REFCOUNT_BLOCK
        | SNAPSHOT_TABLE
        | INACTIVE_L1
        | BITMAP_DIRECTORY;
    pub const NAMES: [&str; 9] = [
        "qcow2_header",
        "active L1 table",
        "active L2 table",
        "refcount table",
        "refcount block",
        "snapshot table",
        "inactive L1 table",
        "inactive L2 table",
        "bitmap directory",
    ];
}

/// The state of one check run: what qemu keeps in its driver state, loaded from the file.
struct Checker<'a> {
    file: &'a dyn Storage,
    writable: bool,
    version: u32,
    cluster_bits: u32,
    cs: u64,
    order: u32,
    /// log2 of the entries of one refcount block.
    rb_bits: u32,
    refcount_max: u64,
    virtual_size: u64,
    /// Incompatible feature bits as they are on disk.
    incompatible: u64,
    file_len: u64,
    l1_offset: u64,
    l1: Vec<u64>,
    reftable_offset: u64,
    /// Raw refcount table entries (with any reserved bits).
    reftable: Vec<u64>,
    snapshots: Vec<Snapshot>,
    /// Snapshot count in the header.
    sn_count: u32,
    snapshots_offset: u64,
    snapshots_size: u64,
    /// Bitmap directory (offset, size), when the image has valid bitmaps.
    bitmap_dir: Option<(u64, u64)>,
    /// Refcount blocks read (and changed) through the stored refcount structure.
    rb_cache: BTreeMap<u64, Vec<u8>>,
    rb_dirty: BTreeSet<u64>,
    /// A corruption was signalled (later ones are not repeated).
    signaled: bool,
    /// A fatal corruption was signalled: qemu then stops using the image, so a check that
    /// fails afterwards leaves its unwritten changes unwritten.
    fatal_signaled: bool,
    msgs: Vec<String>,
}

/// Checks (and with `fix`, repairs) the qcow2 image in `file`.
///
/// Messages qemu-img would print while checking are returned in the report, in order. An
/// `Err` means the image could not be opened as qcow2 at all; a check that started but could
/// not complete sets [`CheckReport::failed`]. With a fix, the dirty bit is cleared (as qemu-img
/// does when it closes the image), and the corrupt bit too once nothing is left to repair.
pub fn check(file: &Arc<dyn Storage>, fix: Fix) -> Result<CheckReport> {
    let mut report = check_once(file, fix)?;
    // A repair can expose problems that only the repaired structure shows: once a refcount
    // block that an L1 entry wrongly pointed at has been moved away, that cluster is a plain
    // (garbage) L2 table whose entries can now be repaired. qemu stops after one round and
    // leaves such images broken; one more round (at most two) leaves them clean.
    for _ in 0..2 {
        let progressed = report.corruptions_fixed > 0;
        if !fix.errors || report.corruptions == 0 || report.failed.is_some() || !progressed {
            break;
        }
        let next = check_once(file, fix)?;
        if next.corruptions_fixed == 0 {
            break;
        }
        let mut messages = std::mem::take(&mut report.messages);
        messages.extend(next.messages.iter().cloned());
        let fixed = report.corruptions_fixed + next.corruptions_fixed;
        let leaks_fixed = report.leaks_fixed + next.leaks_fixed;
        report = CheckReport {
            messages,
            corruptions_fixed: fixed,
            leaks_fixed,
            ..next
        };
    }
    Ok(report)
}

/// One round of checking (and repairing).
fn check_once(file: &Arc<dyn Storage>, fix: Fix) -> Result<CheckReport> {
    let mut ck = Checker::load(file.as_ref())?;
    let mut res = Res::default();
    let outcome = ck.check_locked(&mut res, fix);
    let mut failed = outcome.err().map(|f| f.text().to_string());
    if failed.is_none() || !ck.fatal_signaled {
        if let Err(f) = ck.finish(fix, &res) {
            failed.get_or_insert_with(|| f.text().to_string());
        }
    }
    let clamp = |v: i64| v.max(0) as u64;
    Ok(CheckReport {
        messages: ck.msgs,
        corruptions: clamp(res.corruptions),
        leaks: clamp(res.leaks),
        check_errors: clamp(res.check_errors),
        corruptions_fixed: clamp(res.corruptions_fixed),
        leaks_fixed: clamp(res.leaks_fixed),
        image_end_offset: res.image_end_offset,
        total_clusters: res.total_clusters,
        allocated_clusters: res.allocated_clusters,
        fragmented_clusters: res.fragmented_clusters,
        compressed_clusters: res.compressed_clusters,
        failed,
    })
}

/// Reads `buf.len()` bytes at `offset`; what lies past the end of the file reads as zeros, as
/// qemu's file driver returns it.
fn read_zf(file: &dyn Storage, buf: &mut [u8], offset: u64, file_len: u64) -> blockdev::Result<()> {
    let avail = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
    if avail > 0 {
        file.read_at(&mut buf[..avail], offset)?;
    }
    buf[avail..].fill(0);
    Ok(())
}

fn be64s(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

impl<'a> Checker<'a> {
    /// Parses the header and loads the tables qemu keeps in memory while an image is open.
    fn load(file: &'a dyn Storage) -> Result<Self> {
        let name = file.name().to_string();
        let file_len = file.size()?;
        let mut first = vec![0u8; file_len.min(105) as usize];
        file.read_at(&mut first, 0)?;
        let cluster_bits = if first.len() >= 24 {
            u32::from_be_bytes(first[20..24].try_into().expect("4 bytes"))
        } else {
            0
        };
        if (9..=21).contains(&cluster_bits) {
            first.resize(file_len.min(1 << cluster_bits) as usize, 0);
            file.read_at(&mut first, 0)?;
        }
        // As qemu in check mode, leave the snapshot table to the check itself (which reports
        // and repairs it) instead of refusing to open the image over it.
        let sn_count = u32::from_be_bytes(
            first
                .get(60..64)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 4]),
        );
        let sn_offset = u64::from_be_bytes(
            first
                .get(64..72)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 8]),
        );
        if first.len() >= 72 {
            first[60..72].fill(0);
        }
        let h = Header::parse(&name, &first, file_len)?;
        let cs = h.cluster_size();
        let order = h.refcount_order;

        // Each byte buffer goes as soon as it is decoded (a shadowed one would live on).
        let l1 = {
            let mut raw = vec![0u8; h.l1_size as usize * 8];
            read_zf(file, &mut raw, h.l1_table_offset, file_len)?;
            be64s(&raw)
        };
        let reftable = {
            let mut raw = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
            read_zf(file, &mut raw, h.refcount_table_offset, file_len)?;
            be64s(&raw)
        };

        let mut ck = Checker {
            file,
            writable: !file.is_read_only(),
            version: h.version,
            cluster_bits: h.cluster_bits,
            cs,
            order,
            rb_bits: h.cluster_bits + 3 - order,
            refcount_max: if order == 6 {
                u64::MAX
            } else {
                (1u64 << (1 << order)) - 1
            },
            virtual_size: h.size,
            incompatible: h.incompatible_features,
            file_len,
            l1_offset: h.l1_table_offset,
            l1,
            reftable_offset: h.refcount_table_offset,
            reftable,
            snapshots: Vec::new(),
            sn_count,
            snapshots_offset: sn_offset,
            snapshots_size: 0,
            bitmap_dir: None,
            rb_cache: BTreeMap::new(),
            rb_dirty: BTreeSet::new(),
            signaled: false,
            fatal_signaled: false,
            msgs: Vec::new(),
        };
        ck.load_bitmaps_ext(&name, &h)?;
        Ok(ck)
    }

    /// Finds the bitmaps extension; qemu only trusts it while the autoclear bit is set.
    fn load_bitmaps_ext(&mut self, name: &str, h: &Header) -> Result<()> {
        if h.autoclear_features & autoclear::BITMAPS == 0 {
            return Ok(());
        }
        let Some(e) = h.unknown_extensions.iter().find(|e| e.kind == ext::BITMAPS) else {
            return Ok(());
        };
        if e.data.len() < 24 {
            return Err(Error::invalid(
                name,
                "bitmaps_ext: Invalid extension length",
            ));
        }
        let nb = u32::from_be_bytes(e.data[0..4].try_into().expect("4"));
        let size = u64::from_be_bytes(e.data[8..16].try_into().expect("8"));
        let offset = u64::from_be_bytes(e.data[16..24].try_into().expect("8"));
        if nb > 0 {
            self.bitmap_dir = Some((offset, size));
        }
        Ok(())
    }

    fn msg(&mut self, m: String) {
        self.msgs.push(m);
    }

    /// Re-reads the file length after the file may have grown.
    fn refresh_len(&mut self) -> std::result::Result<(), Fail> {
        self.file_len = self.file.size()?;
        Ok(())
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), Fail> {
        read_zf(self.file, buf, offset, self.file_len).map_err(Fail::from)
    }

    fn write(&mut self, buf: &[u8], offset: u64) -> std::result::Result<(), Fail> {
        self.file.write_at(buf, offset)?;
        if offset + buf.len() as u64 > self.file_len {
            self.refresh_len()?;
        }
        Ok(())
    }

    /// Reports metadata found corrupt, once, as qemu does; a fatal report on a writable image
    /// sets the corrupt bit so that nothing else writes to it until it is repaired.
    fn signal_corruption(&mut self, fatal: bool, what: String) {
        let fatal = fatal && self.writable;
        if self.signaled && (!fatal || self.incompatible & incompat::CORRUPT != 0) {
            return;
        }
        if fatal {
            self.msg(format!(
                "qcow2: Marking image as corrupt: {what}; further corruption events will be suppressed"
            ));
            self.fatal_signaled = true;
            self.incompatible |= incompat::CORRUPT;
            if self.version >= 3 {
                // Best effort, as in qemu: the message has been given either way.
                let _ = self
                    .file
                    .write_at(&self.incompatible.to_be_bytes(), offsets::INCOMPATIBLE)
                    .and_then(|_| self.file.flush());
            }
        } else {
            self.msg(format!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed"
            ));
        }
        self.signaled = true;
    }

    /// The refcount block describing `cluster` through the stored refcount table: its offset,
    /// None where no block exists, or EIO for an unaligned block offset.
    fn refblock_of(&mut self, cluster: u64) -> std::result::Result<Option<u64>, Fail> {
        let index = cluster >> self.rb_bits;
        let Some(&raw) = self.reftable.get(index as usize) else {
            return Ok(None);
        };
        let off = raw & mask::REFT_OFFSET;
        if off == 0 {
            return Ok(None);
        }
        if off & (self.cs - 1) != 0 {
            self.signal_corruption(
                true,
                format!(
                    "Refblock offset {} unaligned (reftable index: {})",
                    alt_hex(off),
                    alt_hex(index)
                ),
            );
            return Err(Fail::EIO);
        }
        if !self.rb_cache.contains_key(&off) {
            let mut block = vec![0u8; self.cs as usize];
            self.read(&mut block, off)?;
            self.rb_cache.insert(off, block);
        }
        Ok(Some(off))
    }

    /// The stored refcount of `cluster`.
    fn get_refcount(&mut self, cluster: u64) -> std::result::Result<u64, Fail> {
        let Some(off) = self.refblock_of(cluster)? else {
            return Ok(0);
        };
        let i = (cluster & ((1 << self.rb_bits) - 1)) as usize;
        Ok(super::refcount::get_entry(
            &self.rb_cache[&off],
            self.order,
            i,
        ))
    }

    /// Sets the stored refcount of `cluster`, whose refcount block must exist.
    fn set_refcount(&mut self, cluster: u64, value: u64) -> std::result::Result<(), Fail> {
        let Some(off) = self.refblock_of(cluster)? else {
            return Err(Fail::EIO);
        };
        let i = (cluster & ((1 << self.rb_bits) - 1)) as usize;
        let order = self.order;
        let block = self.rb_cache.get_mut(&off).expect("cached above");
        super::refcount::set_entry(block, order, i, value);
        self.rb_dirty.insert(off);
        Ok(())
    }

    /// Writes changed refcount blocks.
    fn flush_refblocks(&mut self) -> std::result::Result<(), Fail> {
        for off in std::mem::take(&mut self.rb_dirty) {
            let block = self.rb_cache[&off].clone();
            self.write(&block, off)?;
        }
        Ok(())
    }

    /// Which metadata (by qemu's overlap classes, minus `ignore`) the host range overlaps.
    /// `skip_refblocks` leaves out the stored refcount blocks, which a rebuild replaces.
    fn overlap(&self, ignore: u32, offset: u64, size: u64, skip_refblocks: bool) -> u32 {
        let chk = ol::CACHED & !ignore;
        if size == 0 {
            return 0;
        }
        if chk & ol::MAIN_HEADER != 0 && offset < self.cs {
            return ol::MAIN_HEADER;
        }
        let start = offset & !(self.cs - 1);
        let len = ((offset - start) + size).div_ceil(self.cs) * self.cs;
        let hits =
            |o: u64, l: u64| l > 0 && start <= o.saturating_add(l - 1) && o <= start + (len - 1);
        if chk & ol::ACTIVE_L1 != 0 && hits(self.l1_offset, self.l1.len() as u64 * 8) {
            return ol::ACTIVE_L1;
        }
        if chk & ol::REFCOUNT_TABLE != 0
            && hits(self.reftable_offset, self.reftable.len() as u64 * 8)
        {
            return ol::REFCOUNT_TABLE;
        }
        if chk & ol::SNAPSHOT_TABLE != 0 && hits(self.snapshots_offset, self.snapshots_size) {
            return ol::SNAPSHOT_TABLE;
        }
        if chk & ol::INACTIVE_L1 != 0
            && self
                .snapshots
                .iter()
                .any(|s| hits(s.l1_offset, s.l1_size as u64 * 8))
        {
            return ol::INACTIVE_L1;
        }
        if chk & ol::ACTIVE_L2 != 0
            && self.l1.iter().any(|&e| {
                let o = e & mask::OFFSET;
                o != 0 && hits(o, self.cs)
            })
        {
            return ol::ACTIVE_L2;
        }
        if chk & ol::REFCOUNT_BLOCK != 0
            && !skip_refblocks
            && self.reftable.iter().any(|&e| {
                let o = e & mask::REFT_OFFSET;
                o != 0 && hits(o, self.cs)
            })
        {
            return ol::REFCOUNT_BLOCK;
        }
        if chk & ol::BITMAP_DIRECTORY != 0 {
            if let Some((o, l)) = self.bitmap_dir {
                if hits(o, l) {
                    return ol::BITMAP_DIRECTORY;
                }
            }
        }
        0
    }

    /// qemu's check before writing metadata: refuses (and signals) writes onto other metadata.
    fn pre_write_overlap_check(
        &mut self,
        ignore: u32,
        offset: u64,
        size: u64,
        skip_refblocks: bool,
    ) -> std::result::Result<(), Fail> {
        let hit = self.overlap(ignore, offset, size, skip_refblocks);
        if hit == 0 {
            return Ok(());
        }
        let name = ol::NAMES[hit.trailing_zeros() as usize];
        self.signal_corruption(
            true,
            format!("Preventing invalid write on metadata (overlaps with {name})"),
        );
        Err(Fail::EIO)
    }

    /// qcow2's check: the snapshot table, then the refcounts (with the OFLAG_COPIED check),
    /// then the snapshot table's repair, which needs sound refcounts to allocate.
    fn check_locked(&mut self, res: &mut Res, fix: Fix) -> std::result::Result<(), Fail> {
        let mut sres = Res::default();
        if let Err(e) = self.read_snapshot_table(&mut sres, fix) {
            res.add(&sres, false);
            return Err(e);
        }
        let mut rres = Res::default();
        let r = self.check_refcounts(&mut rres, fix);
        res.add(&rres, true);
        if let Err(e) = r {
            res.add(&sres, false);
            if !self.fatal_signaled {
                let _ = self.flush_refblocks();
            }
            return Err(e);
        }
        let r = self.fix_snapshot_table(&mut sres, fix);
        res.add(&sres, false);
        if r.is_err() && self.fatal_signaled {
            return r;
        }
        let flushed = self.flush_refblocks();
        r?;
        flushed
    }

    /// After a repair: make everything durable, then clear the dirty bit (qemu-img clears it
    /// when it closes the image) and, once nothing is left to repair, the corrupt bit.
    fn finish(&mut self, fix: Fix, res: &Res) -> std::result::Result<(), Fail> {
        if !fix.any() || !self.writable {
            return Ok(());
        }
        self.flush_refblocks()?;
        self.file.flush()?;
        if self.version < 3 {
            return Ok(());
        }
        let mut bits = self.incompatible & !incompat::DIRTY;
        if res.check_errors == 0 && res.corruptions == 0 {
            bits &= !incompat::CORRUPT;
        }
        if bits != self.incompatible {
            self.file
                .write_at(&bits.to_be_bytes(), offsets::INCOMPATIBLE)?;
            self.file.flush()?;
            self.incompatible = bits;
        }
        Ok(())
    }
}
