//! `img amend` for qcow2: changing the compatibility level, the refcount width and lazy
//! refcounts of an existing image in place.
//!
//! The steps run in qemu-img's order, because the order decides what a command line that
//! asks for several changes (or for an impossible one) leaves behind: the options are checked,
//! then an upgrade to version 3 runs first (other changes may need it), then the refcount width
//! changes, the header is rewritten, lazy refcounts are switched, the size changes, and a
//! downgrade to version 2 runs last (after the features version 2 cannot express are gone).
//!
//! Crash safety:
//! - a new refcount structure is written completely and synced, together with the old one
//!   that counts its clusters, before the header points at it; the old structure is freed
//!   only afterwards, so a crash leaks clusters at worst;
//! - zero clusters turned into data clusters get their zeros (and the refcounts of newly
//!   allocated clusters) durable before the L2 entry that points at them;
//! - a rewritten snapshot table is synced before the header points at it.
//!
//! Where qemu's own amend is wrong this one differs: a preallocated zero cluster whose host
//! cluster a snapshot shares is not zeroed in place on a downgrade (qemu overwrites the
//! snapshot's data); zstd-compressed clusters in snapshots also refuse a downgrade; and a
//! downgrade drops the bitmaps extension (version 2 cannot mark bitmaps consistent) and frees
//! its clusters instead of leaving them leaked.

use super::cache::MetaCache;
use super::header::{
    self, compat, ext, incompat, offsets, CompressionType, Header, MAX_REFTABLE_BYTES,
};
use super::l2::{set_table_entry, table_entry, L2Entry, COPIED, OFFSET_MASK};
use super::refcount::{get_entry, set_entry, Refcounts};
use super::{check, Meta, Qcow2};
use crate::{Error, Image, Result};
use std::collections::HashSet;
use std::sync::Arc;

/// The options of `img amend -o` for qcow2, as given (after the command line's type checks).
///
/// Every field is `None` (or `false`) when the option was not given; only given options are
/// changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// Some `encrypt.*` option was given.
    pub encrypt: bool,
    /// `size`: the new virtual size (0 leaves it unchanged, as in qemu).
    pub size: Option<u64>,
    /// `compat`: `0.10`/`v2` or `1.1`/`v3`.
    pub compat: Option<String>,
    /// `backing_file`.
    pub backing_file: Option<String>,
    /// `backing_fmt`.
    pub backing_fmt: Option<String>,
    /// `data_file`.
    pub data_file: Option<String>,
    /// `data_file_raw`.
    pub data_file_raw: Option<bool>,
    /// `lazy_refcounts`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits`, as the number given (qemu keeps its low 32 bits as a signed int).
    pub refcount_bits: Option<u64>,
}

/// Amends the qcow2 image `image` (opened read-write). `progress` receives the percentage
/// done, with qemu-img's arithmetic, whenever a step reports progress.
pub fn amend_image(
    image: &mut Image,
    opts: &AmendOptions,
    progress: &mut dyn FnMut(f32),
) -> Result<()> {
    let driver = image.format().driver();
    let name = image.file_name().to_string();
    let qcow2 = super::driver_of(image).ok_or_else(|| {
        Error::unsupported(
            &name,
            format!("Format driver '{driver}' does not support option amendment"),
        )
    })?;
    qcow2.amend(opts, progress)
}

/// An option error, printed as qemu prints it.
fn refuse(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// The steps that report progress (qemu counts them to share out the percentage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation {
    Upgrading,
    ChangingRefcountOrder,
    Downgrading,
}

/// qemu's weighting of several operations' progress into one percentage: each operation
/// reports (done, total) of its own work; operations not started yet are projected to be as
/// large as the average of those seen so far.
struct Progress<'a> {
    report: &'a mut dyn FnMut(f32),
    total_operations: i64,
    current: Option<Operation>,
    last: Option<Operation>,
    offset_completed: i64,
    operations_completed: i64,
    last_work_size: i64,
}

impl<'a> Progress<'a> {
    fn new(report: &'a mut dyn FnMut(f32), total_operations: i64) -> Self {
        Progress {
            report,
            total_operations,
            current: None,
            last: None,
            offset_completed: 0,
            operations_completed: 0,
            last_work_size: 0,
        }
    }

    fn start(&mut self, op: Operation) {
        self.current = Some(op);
    }

    /// The current operation has done `offset` of `total`.
    fn status(&mut self, offset: u64, total: u64) {
        if self.current != self.last {
            if self.last.is_some() {
                self.offset_completed += self.last_work_size;
                self.operations_completed += 1;
            }
            self.last = self.current;
        }
        if self.operations_completed >= self.total_operations {
            return;
        }
        self.last_work_size = total as i64;
        let current_work = self.offset_completed + total as i64;
        let projected = current_work * (self.total_operations - self.operations_completed - 1)
            / (self.operations_completed + 1);
        let done = (self.offset_completed + offset as i64) as f32;
        let all = (current_work + projected) as f32;
        if all > 0.0 {
            (self.report)(100.0f32 * done / all);
        }
    }
}

use super::snapshot::{Snapshot, REQUIRED_EXTRA_V3 as SNAPSHOT_EXTRA_V3};
/// The length of a version 3 header as this version writes it.
const V3_HEADER_LENGTH: u32 = 112;
/// The length of a version 2 header.
const V2_HEADER_LENGTH: u32 = 72;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// C's `%#x`: `0x` before non-zero values only.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

impl Qcow2 {
    /// Changes the options in `opts` (see [`AmendOptions`]), with qemu's checks, order and
    /// messages. `report` receives progress percentages.
    pub fn amend(&mut self, opts: &AmendOptions, report: &mut dyn FnMut(f32)) -> Result<()> {
        self.check_writable()?;
        let old_version = self.header.version;
        let old_bits = self.header.refcount_bits();
        let mut new_version = old_version;
        let mut lazy = self.header.lazy_refcounts();
        let mut refcount_bits = old_bits;

        // The options are checked in the order qemu lists them, before anything changes.
        if opts.encrypt {
            return Err(refuse(
                "Can't amend encryption options - encryption not present",
            ));
        }
        if let Some(c) = &opts.compat {
            new_version = match c.as_str() {
                "0.10" | "v2" => 2,
                "1.1" | "v3" => 3,
                _ => return Err(refuse(format!("Unknown compatibility level {c}"))),
            };
        }
        if opts.data_file.is_some() {
            return Err(refuse(
                "data-file can only be set for images that use an external data file",
            ));
        }
        if opts.data_file_raw == Some(true) {
            return Err(refuse("data-file-raw cannot be set on existing images"));
        }
        if let Some(l) = opts.lazy_refcounts {
            lazy = l;
        }
        if let Some(raw) = opts.refcount_bits {
            // qemu stores the number in an int.
            let bits = raw as i32;
            if bits <= 0 || bits > 64 || !(bits as u32).is_power_of_two() {
                return Err(refuse(
                    "Refcount width must be a power of two and may not exceed 64 bits",
                ));
            }
            refcount_bits = bits as u32;
        }

        let operations =
            i64::from(new_version != old_version) + i64::from(refcount_bits != old_bits);
        let mut progress = Progress::new(report, operations);
        let meta_arc = Arc::clone(&self.meta);
        let mut guard = meta_arc.lock().unwrap_or_else(|e| e.into_inner());
        let meta = &mut *guard;

        // Upgrade first: the other changes may need version 3.
        if new_version > old_version {
            progress.start(Operation::Upgrading);
            self.upgrade(meta, &mut progress)?;
        }
        if refcount_bits != old_bits {
            if new_version < 3 && refcount_bits != 16 {
                return Err(refuse(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)",
                ));
            }
            progress.start(Operation::ChangingRefcountOrder);
            self.change_refcount_order(meta, refcount_bits.trailing_zeros(), &mut progress)?;
        }
        // qemu rewrites the header whatever changed (it may gain the feature table).
        self.write_header(meta)?;
        self.amend_backing(opts.backing_file.as_deref(), opts.backing_fmt.as_deref())?;
        if lazy != self.header.lazy_refcounts() {
            if lazy {
                if new_version < 3 {
                    return Err(refuse(
                        "Lazy refcounts only supported with compatibility level 1.1 and above \
                         (use compat=1.1 or greater)",
                    ));
                }
                self.header.compatible_features |= compat::LAZY_REFCOUNTS;
            } else {
                // Refcounts must be consistent (the dirty bit clear) once nothing allows
                // them not to be.
                self.mark_clean(meta)?;
                self.header.compatible_features &= !compat::LAZY_REFCOUNTS;
            }
            self.write_header(meta)?;
        }
        if let Some(size) = opts.size.filter(|&s| s != 0) {
            // Resizing takes the metadata lock itself.
            self.flush_meta(meta)?;
            drop(guard);
            self.amend_size(size)?;
            guard = meta_arc.lock().unwrap_or_else(|e| e.into_inner());
        }
        let meta = &mut *guard;
        // Downgrade last, once nothing version 2 cannot express is left.
        if new_version < old_version {
            progress.start(Operation::Downgrading);
            self.downgrade(meta, &mut progress)?;
        }
        self.flush_meta(meta)
    }

    /// The `backing_file` and `backing_fmt` options. qemu 10 no longer changes the backing
    /// file through amend (that is `rebase`'s job): giving them is accepted only when both
    /// name exactly what the image already records.
    fn amend_backing(&self, file: Option<&str>, fmt: Option<&str>) -> Result<()> {
        if file.is_none() && fmt.is_none() {
            return Ok(());
        }
        if file != self.header.backing_file.as_deref()
            || fmt != self.header.backing_format.as_deref()
        {
            return Err(refuse(
                "Cannot amend the backing file\nYou can use 'img rebase' instead.",
            ));
        }
        Ok(())
    }

    /// The `size` option (non-zero): resizing the image exactly as `img resize` does (qemu
    /// truncates with `exact=true`, no preallocation), with resize's own refusals (a version 2
    /// image with snapshots, sizes not a multiple of 512, ...). Called without the metadata
    /// lock held, after the header rewrite and lazy refcounts and before a downgrade.
    fn amend_size(&mut self, new_size: u64) -> Result<()> {
        self.resize_to(
            new_size,
            &crate::format::ResizeOptions {
                prealloc: crate::raw::Preallocation::Off,
                zero_new_clusters: false,
                head_data: None,
            },
        )
    }

    /// The header as it should be on disk now: the fields the driver keeps up to date in
    /// `meta` (tables may have moved) over the parsed header.
    fn current_header(&self, meta: &Meta) -> Header {
        let mut h = self.header.clone();
        h.l1_size = meta.l1.len() as u32;
        h.l1_table_offset = meta.l1_offset;
        h.refcount_table_offset = meta.refcounts.table_offset();
        h.refcount_table_clusters =
            ((meta.refcounts.table().len() as u64 * 8) >> self.cluster_bits) as u32;
        // Opening cleared the autoclear bits (no bitmap support here).
        h.autoclear_features = 0;
        if h.version >= 3 {
            h.incompatible_features = meta.incompatible;
            h.header_length = h.header_length.max(V3_HEADER_LENGTH);
            // qemu writes its own feature table into every header it writes.
            h.feature_names = header::standard_feature_names();
        } else {
            h.incompatible_features = 0;
            h.compatible_features = 0;
            h.header_length = V2_HEADER_LENGTH;
            h.feature_names.clear();
        }
        h
    }

    /// Rewrites the first cluster (header, extensions, backing file name) from the current
    /// state, as qemu does whenever it updates the header, and syncs it.
    fn write_header(&mut self, meta: &mut Meta) -> Result<()> {
        let h = self.current_header(meta);
        let cs = self.cs() as usize;
        let mut buf = h.serialize(cs)?;
        // Header fields past the ones known here are kept, as qemu keeps them.
        if h.version >= 3 && h.header_length > V3_HEADER_LENGTH && self.header.version >= 3 {
            let start = V3_HEADER_LENGTH as usize;
            let end = (h.header_length.min(self.header.header_length)) as usize;
            if end > start {
                let mut unknown = vec![0u8; end - start];
                self.file.read_at(&mut unknown, start as u64)?;
                buf[start..end].copy_from_slice(&unknown);
            }
        }
        buf.resize(cs, 0);
        let written = self.file.write_at(&buf, 0).and_then(|_| self.file.flush());
        if let Err(e) = written {
            return Err(refuse(format!("Failed to update the image header: {e}")));
        }
        self.header = h;
        Ok(())
    }

    /// Makes refcounts consistent and clears the dirty bit (they always are exact here; the
    /// bit only says a crash may have left them stale).
    fn mark_clean(&mut self, meta: &mut Meta) -> Result<()> {
        self.flush_meta(meta)?;
        if meta.incompatible & incompat::DIRTY != 0 {
            meta.incompatible &= !incompat::DIRTY;
            self.write_header(meta)?;
        }
        Ok(())
    }

    /// Version 2 to 3: snapshots without the extra data version 3 requires get a rewritten
    /// table, then the header grows to version 3's.
    fn upgrade(&mut self, meta: &mut Meta, p: &mut Progress) -> Result<()> {
        p.status(0, 2);
        let (snapshots, table_size) = self.read_snapshots()?;
        if snapshots
            .iter()
            .any(|s| s.extra_data_size < SNAPSHOT_EXTRA_V3)
        {
            self.write_snapshots(meta, &snapshots, table_size)
                .map_err(|e| refuse(format!("Failed to update the snapshot table: {e}")))?;
        }
        p.status(1, 2);
        self.header.version = 3;
        self.header.header_length = V3_HEADER_LENGTH;
        if let Err(e) = self.write_header(meta) {
            self.header.version = 2;
            self.header.header_length = V2_HEADER_LENGTH;
            return Err(e);
        }
        p.status(2, 2);
        Ok(())
    }

    /// Version 3 to 2, with qemu's refusals: other refcount widths, external data files,
    /// snapshots version 2 cannot describe, incompatible features, and zstd-compressed data.
    /// Zero clusters become unallocated (without a backing file) or zeroed data clusters.
    fn downgrade(&mut self, meta: &mut Meta, p: &mut Progress) -> Result<()> {
        if self.header.refcount_order != 4 {
            return Err(refuse("compat=0.10 requires refcount_bits=16"));
        }
        if meta.incompatible & incompat::DATA_FILE != 0 {
            return Err(refuse("Cannot downgrade an image with a data file"));
        }
        let (snapshots, _) = self.read_snapshots()?;
        let disk_size = self.header.size / 512 * 512;
        if snapshots
            .iter()
            .any(|s| s.vm_state_size != 0 || s.disk_size != disk_size)
        {
            return Err(refuse("Internal snapshots prevent downgrade of image"));
        }
        if meta.incompatible & incompat::DIRTY != 0 {
            self.mark_clean(meta)?;
        }
        let other = meta.incompatible & !incompat::COMPRESSION;
        if other != 0 {
            return Err(refuse(format!(
                "Cannot downgrade an image with incompatible features 0x{other:x} set"
            )));
        }
        // Checked before anything changes (qemu checks after expanding zero clusters, and
        // only the active tables).
        if self.header.compression_type != CompressionType::Zlib
            && self.has_compressed_clusters(meta, &snapshots)?
        {
            return Err(refuse(
                "Cannot downgrade an image with zstd compression type and existing compressed \
                 clusters",
            ));
        }
        self.header.compatible_features = 0;
        self.header.autoclear_features = 0;
        self.expand_zero_clusters(meta, &snapshots, p)
            .map_err(|e| refuse(format!("Failed to turn zero into data clusters: {e}")))?;
        meta.incompatible &= !incompat::COMPRESSION;
        self.header.compression_type = CompressionType::Zlib;
        // Version 2 cannot mark bitmaps consistent: they are dropped.
        let before = self.header.unknown_extensions.len();
        self.header
            .unknown_extensions
            .retain(|e| e.kind != ext::BITMAPS);
        let dropped_bitmaps = self.header.unknown_extensions.len() != before;
        // The expanded clusters are durable before the header stops flagging zeros.
        self.flush_meta(meta)?;
        self.header.version = 2;
        if let Err(e) = self.write_header(meta) {
            self.header.version = 3;
            return Err(e);
        }
        if dropped_bitmaps {
            self.free_leaked_clusters(meta)?;
        }
        Ok(())
    }

    /// Frees clusters nothing references any more (the dropped bitmaps' directory, tables and
    /// data), through a leak repair of the file, then reloads the refcounts.
    fn free_leaked_clusters(&mut self, meta: &mut Meta) -> Result<()> {
        self.flush_meta(meta)?;
        check::check(&self.file, check::Fix::LEAKS)?;
        let mut hdr = [0u8; 12];
        self.file.read_at(&mut hdr, offsets::REFCOUNT_TABLE)?;
        let table_offset = be64(&hdr, 0);
        let table_clusters = be32(&hdr, 8);
        meta.refcounts
            .reload(self.file.as_ref(), table_offset, table_clusters)?;
        meta.l2.clear();
        Ok(())
    }

    /// Every L1 table: the active one, then each snapshot's.
    fn all_l1_tables(&self, meta: &Meta, snapshots: &[Snapshot]) -> Result<Vec<(u64, Vec<u64>)>> {
        let mut out = vec![(meta.l1_offset, meta.l1.clone())];
        for sn in snapshots {
            out.push((sn.l1_offset, self.read_l1(sn.l1_offset, sn.l1_size)?));
        }
        Ok(out)
    }

    /// The L2 table offset of L1 entry `entry` (index `i` of the table at `l1_offset`),
    /// checked; 0 when none.
    fn checked_l2(&self, entry: u64, l1_offset: u64, i: usize) -> Result<u64> {
        let off = entry & OFFSET_MASK;
        if !off.is_multiple_of(self.cs()) {
            return Err(Error::corrupt(
                self.name(),
                l1_offset + i as u64 * 8,
                format!("L2 table offset {off:#x} unaligned (L1 index: {i:#x})"),
            ));
        }
        Ok(off)
    }

    /// Whether any L2 table (active or of a snapshot) holds a compressed cluster.
    fn has_compressed_clusters(&self, meta: &mut Meta, snapshots: &[Snapshot]) -> Result<bool> {
        let file = self.file.as_ref();
        let mut seen = HashSet::new();
        let slices = 1u64 << (self.cluster_bits - self.slice_bits);
        let per = self.slice_entries() as usize;
        for (l1_offset, l1) in self.all_l1_tables(meta, snapshots)? {
            for (i, &e) in l1.iter().enumerate() {
                let l2 = self.checked_l2(e, l1_offset, i)?;
                if l2 == 0 || !seen.insert(l2) {
                    continue;
                }
                for s in 0..slices {
                    let slice = meta.l2.get(file, l2 + (s << self.slice_bits))?;
                    if (0..per).any(|j| {
                        matches!(
                            L2Entry::decode(table_entry(slice, j), self.cluster_bits),
                            L2Entry::Compressed { .. }
                        )
                    }) {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Turns every zero cluster, in the active L2 tables and in the snapshots', into what
    /// version 2 can express: unallocated when nothing backs the image (they read as zeros
    /// then), else a data cluster of zeros. Preallocated zero clusters are zeroed in place.
    fn expand_zero_clusters(
        &self,
        meta: &mut Meta,
        snapshots: &[Snapshot],
        p: &mut Progress,
    ) -> Result<()> {
        let total = meta.l1.len() as u64 + snapshots.iter().map(|s| s.l1_size as u64).sum::<u64>();
        let mut visited = 0u64;
        let mut done = HashSet::new();
        let active = meta.l1.clone();
        let active_offset = meta.l1_offset;
        self.expand_in_l1(
            meta,
            &active,
            active_offset,
            &mut done,
            &mut visited,
            total,
            p,
        )?;
        self.flush_meta(meta)?;
        for sn in snapshots {
            let l1 = self.read_l1(sn.l1_offset, sn.l1_size)?;
            self.expand_in_l1(meta, &l1, sn.l1_offset, &mut done, &mut visited, total, p)?;
        }
        self.flush_meta(meta)
    }

    #[allow(clippy::too_many_arguments)]
    fn expand_in_l1(
        &self,
        meta: &mut Meta,
        l1: &[u64],
        l1_offset: u64,
        done: &mut HashSet<u64>,
        visited: &mut u64,
        total: u64,
        p: &mut Progress,
    ) -> Result<()> {
        let file = self.file.as_ref();
        let cs = self.cs();
        let cb = self.cluster_bits;
        let backing = self.header.backing_file.is_some();
        let slices = 1u64 << (cb - self.slice_bits);
        let per = self.slice_entries() as usize;
        for (i, &e) in l1.iter().enumerate() {
            let l2 = self.checked_l2(e, l1_offset, i)?;
            // A table shared by several L1 tables is expanded once.
            if l2 != 0 && done.insert(l2) {
                // Every L1 table that shares this L2 table holds one reference to each
                // cluster it points at.
                let l2_refs = meta.refcounts.get(file, l2 >> cb)?;
                if l2_refs == 0 {
                    return Err(Error::corrupt(
                        self.name(),
                        l2,
                        "L2 table in use has refcount 0".to_string(),
                    ));
                }
                for s in 0..slices {
                    let slice_off = l2 + (s << self.slice_bits);
                    for j in 0..per {
                        let raw = table_entry(meta.l2.get(file, slice_off)?, j);
                        let entry = L2Entry::decode(raw, cb);
                        let index = s as usize * per + j;
                        let new = match entry {
                            L2Entry::ZeroPlain if !backing => 0,
                            L2Entry::ZeroPlain => self.zeroed_cluster(meta, l2_refs)?,
                            L2Entry::ZeroAlloc { offset, .. } => {
                                if !offset.is_multiple_of(cs) {
                                    return Err(Error::corrupt(
                                        self.name(),
                                        slice_off + j as u64 * 8,
                                        format!(
                                            "Cluster allocation offset {offset:#x} unaligned \
                                             (L2 offset: {l2:#x}, L2 index: {index:#x})"
                                        ),
                                    ));
                                }
                                let refs = meta.refcounts.get(file, offset >> cb)?;
                                if refs == l2_refs {
                                    // Only this entry uses the cluster: zero it in place.
                                    file.write_zeroes(offset, cs, false)?;
                                    if l2_refs == 1 {
                                        offset | COPIED
                                    } else {
                                        offset
                                    }
                                } else if refs > l2_refs {
                                    // Other tables (a snapshot's) read this cluster's data:
                                    // leave it to them.
                                    let new = if backing {
                                        self.zeroed_cluster(meta, l2_refs)?
                                    } else {
                                        0
                                    };
                                    for _ in 0..l2_refs {
                                        meta.refcounts.free_later(offset >> cb);
                                    }
                                    new
                                } else {
                                    return Err(Error::corrupt(
                                        self.name(),
                                        offset,
                                        format!(
                                            "refcount {refs} of cluster {:#x} is below its {l2_refs} references",
                                            offset >> cb
                                        ),
                                    ));
                                }
                            }
                            _ => continue,
                        };
                        set_table_entry(meta.l2.get_mut(file, slice_off)?, j, new);
                    }
                    self.flush_if_over_capacity(meta)?;
                }
            }
            *visited += 1;
            p.status(*visited, total);
        }
        Ok(())
    }

    /// A newly allocated cluster of zeros with `refs` references; returns its L2 entry.
    fn zeroed_cluster(&self, meta: &mut Meta, refs: u64) -> Result<u64> {
        let file = self.file.as_ref();
        let c = meta.refcounts.alloc(file, 1)?;
        if refs > 1 {
            meta.refcounts.set(file, c, refs)?;
        }
        let offset = c << self.cluster_bits;
        file.write_zeroes(offset, self.cs(), false)?;
        Ok(if refs == 1 { offset | COPIED } else { offset })
    }

    /// Rebuilds the refcount structure with entries of `1 << new_order` bits.
    ///
    /// The new refcount blocks and table are allocated through the old structure (so it
    /// counts them), in walks over every refcount until a walk allocates nothing more; a
    /// last walk writes the new blocks. Then the header switches to the new table and the old
    /// blocks and table are freed in the new structure, which counted them.
    fn change_refcount_order(
        &mut self,
        meta: &mut Meta,
        new_order: u32,
        p: &mut Progress,
    ) -> Result<()> {
        let file_arc = Arc::clone(&self.file);
        let file = file_arc.as_ref();
        let cb = self.cluster_bits;
        let cs = self.cs();
        let per_table_cluster = cs / 8;
        self.flush_meta(meta)?;

        let mut table: Vec<u64> = Vec::new();
        let mut table_alloc: Option<(u64, u64)> = None;
        let mut walk = 0u64;
        loop {
            let total_walks = (walk + 2).max(3);
            let walked =
                self.walk_refcounts(meta, new_order, &mut table, None, walk, total_walks, p);
            let allocated = match walked {
                Ok(a) => a,
                Err(e) => {
                    // Nothing points at what was allocated so far: give it back.
                    for &b in table.iter().filter(|&&b| b != 0) {
                        self.release_now(meta, b >> cb)?;
                    }
                    if let Some((first, n)) = table_alloc {
                        for c in first..first + n {
                            self.release_now(meta, c)?;
                        }
                    }
                    return Err(e);
                }
            };
            walk += 1;
            if !allocated {
                break;
            }
            // The table must cover the blocks just allocated: allocate it anew.
            if let Some((first, n)) = table_alloc.take() {
                for c in first..first + n {
                    self.release_now(meta, c)?;
                }
            }
            let n = table.len() as u64 / per_table_cluster;
            let first = meta.refcounts.alloc(file, n)?;
            table_alloc = Some((first, n));
        }
        let Some((table_first, table_clusters)) = table_alloc else {
            return Err(Error::corrupt(
                self.name(),
                0,
                "the image has no cluster in use, not even its header",
            ));
        };
        // Anything the old structure queued (a grown table frees its predecessor) is applied
        // before the last walk copies the counts.
        self.flush_meta(meta)?;
        let mut block = vec![0u8; cs as usize];
        self.walk_refcounts(
            meta,
            new_order,
            &mut table,
            Some(&mut block),
            walk,
            walk + 1,
            p,
        )?;
        let table_offset = table_first << cb;
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_at(&raw, table_offset)?;
        // The old structure (which counts the new one) and the new one are durable before the
        // header points at the new one.
        meta.refcounts.flush(file)?;
        file.flush()?;

        let old_table: Vec<u64> = meta.refcounts.table().to_vec();
        let old_offset = meta.refcounts.table_offset();
        let old_clusters = (old_table.len() as u64 * 8).div_ceil(cs);
        let capacity = meta.refcounts.cache_stats().capacity;
        let cache = MetaCache::new(capacity, cs as usize)
            .ok_or_else(|| Error::InvalidArgument("Could not allocate metadata caches".into()))?;
        let mut new = Refcounts::load(
            file,
            cb,
            new_order,
            table_offset,
            table_clusters as u32,
            cache,
        )?;
        new.set_active_l1(meta.l1_offset, meta.l1.len() as u64 * 8);
        let old = std::mem::replace(&mut meta.refcounts, new);
        let old_order = self.header.refcount_order;
        self.header.refcount_order = new_order;
        if let Err(e) = self.write_header(meta) {
            meta.refcounts = old;
            self.header.refcount_order = old_order;
            return Err(refuse(format!("Failed to update the qcow2 header: {e}")));
        }
        drop(old);
        // The header points at the new structure: the old one is garbage it still counts.
        for &b in old_table.iter().filter(|&&b| b != 0) {
            self.release_now(meta, b >> cb)?;
        }
        for c in 0..old_clusters {
            self.release_now(meta, (old_offset >> cb) + c)?;
        }
        meta.refcounts.flush(file)?;
        file.flush()?;
        Ok(())
    }

    /// One walk over every refcount of the old structure, in cluster order, gathering them
    /// into blocks of the new width. Without `block`, a complete new block that is not empty
    /// gets a cluster (and the new table room for it); returns whether anything was
    /// allocated. With `block`, each new block that has a cluster is written there.
    /// A refcount too large for the new width fails the walk with qemu's message.
    /// Progress is reported per old table entry, as qemu does.
    #[allow(clippy::too_many_arguments)]
    fn walk_refcounts(
        &self,
        meta: &mut Meta,
        new_order: u32,
        table: &mut Vec<u64>,
        mut block: Option<&mut [u8]>,
        walk: u64,
        total_walks: u64,
        p: &mut Progress,
    ) -> Result<bool> {
        let file = self.file.as_ref();
        let cb = self.cluster_bits;
        let new_per_block = 1u64 << (cb + 3 - new_order);
        let old_per_block = meta.refcounts.per_block();
        let old_order = meta.refcounts.bits().trailing_zeros();
        let per_table_cluster = self.cs() / 8;
        let mut allocated = false;
        // Position in the new block being gathered, its index, and whether it is empty.
        let mut pos = 0u64;
        let mut index = 0usize;
        let mut empty = true;

        let mut complete = |meta: &mut Meta,
                            block: &mut Option<&mut [u8]>,
                            index: usize,
                            empty: bool|
         -> Result<bool> {
            match block {
                None => {
                    if !empty && index >= table.len() {
                        let entries =
                            (index as u64 + 1).div_ceil(per_table_cluster) * per_table_cluster;
                        if entries * 8 > MAX_REFTABLE_BYTES {
                            return Err(refuse(
                                "This operation would make the refcount table grow beyond the \
                                 maximum size supported by QEMU, aborting",
                            ));
                        }
                        table.resize(entries as usize, 0);
                    }
                    if !empty && table[index] == 0 {
                        table[index] = meta.refcounts.alloc(file, 1)? << cb;
                        return Ok(true);
                    }
                }
                Some(data) => match table.get(index) {
                    Some(&off) if off != 0 => file.write_at(data, off)?,
                    _ if empty => {}
                    _ => {
                        return Err(Error::corrupt(
                            self.name(),
                            0,
                            format!("new refcount block {index} was not allocated"),
                        ))
                    }
                },
            }
            Ok(false)
        };

        let mut ti = 0usize;
        while ti < meta.refcounts.table().len() {
            let size = meta.refcounts.table().len() as u64;
            p.status(walk * size + ti as u64, total_walks * size);
            let base = ti as u64 * old_per_block;
            // The old block as it is now; an allocation may change it, and is seen at once.
            let mut old_block = meta.refcounts.block_copy(file, ti)?;
            let mut k = 0u64;
            while k < old_per_block {
                if pos == new_per_block {
                    if complete(meta, &mut block, index, empty)? {
                        allocated = true;
                        if old_block.is_some() {
                            old_block = meta.refcounts.block_copy(file, ti)?;
                        }
                    }
                    // An empty block left the buffer all zeros: no need to clear it.
                    if let (Some(b), false) = (block.as_deref_mut(), empty) {
                        b.fill(0);
                    }
                    index += 1;
                    pos = 0;
                    empty = true;
                }
                let Some(old) = old_block.as_deref() else {
                    // No block: all zeros, which the new block already holds.
                    let n = (old_per_block - k).min(new_per_block - pos);
                    k += n;
                    pos += n;
                    continue;
                };
                let rc = get_entry(old, old_order, k as usize);
                if new_order < 6 && rc >> (1u32 << new_order) != 0 {
                    return Err(refuse(format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset {} \
                         has a refcount of {rc}",
                        1u32 << new_order,
                        c_hex((base + k) << cb)
                    )));
                }
                if let Some(b) = block.as_deref_mut() {
                    set_entry(b, new_order, pos as usize, rc);
                }
                empty &= rc == 0;
                pos += 1;
                k += 1;
            }
            ti += 1;
        }
        if pos > 0 {
            // The rest of a partly gathered last block is zeros (the buffer is zeroed).
            allocated |= complete(meta, &mut block, index, empty)?;
        }
        let size = meta.refcounts.table().len() as u64;
        p.status((walk + 1) * size, total_walks * size);
        Ok(allocated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::open::open_storage;
    use crate::qcow2::{create, Qcow2CreateOptions};
    use crate::OpenOptions;
    use blockdev::{FileStorage, Storage};

    fn driver(image: &mut Image) -> &mut Qcow2 {
        crate::qcow2::driver_of(image).unwrap()
    }

    fn entry(file: &dyn Storage, at: u64) -> u64 {
        let mut b = [0u8; 8];
        file.read_at(&mut b, at).unwrap();
        u64::from_be_bytes(b)
    }

    /// Behind a backing file, zero clusters hide the backing file's data; version 2 has no
    /// zero flag, so they become data clusters of zeros, counted and flagged as unshared.
    /// (Images with backing files cannot be opened yet: the flag is set on the open driver.)
    #[test]
    fn zero_clusters_over_a_backing_file_become_zeroed_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let cs = 65536u64;
        create(
            &p,
            &Qcow2CreateOptions {
                size: 4 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let file: Arc<dyn Storage> = Arc::new(FileStorage::open_read_write(&p).unwrap());
        let mut image = open_storage(file.clone(), &OpenOptions::default()).unwrap();
        driver(&mut image).header.backing_file = Some("base.qcow2".into());
        image.write_at(&vec![7u8; cs as usize], 0).unwrap();
        image.write_zeroes(cs, 2 * cs, false).unwrap();
        image.write_at(&vec![8u8; cs as usize], 3 * cs).unwrap();
        image.write_zeroes(3 * cs, cs, false).unwrap();
        image.flush().unwrap();
        let l1 = entry(file.as_ref(), 40);
        let l2 = entry(file.as_ref(), l1) & OFFSET_MASK;
        assert_eq!(entry(file.as_ref(), l2 + 8), 1, "a plain zero cluster");
        let prealloc = entry(file.as_ref(), l2 + 24);
        assert_eq!(prealloc & 1, 1, "a preallocated zero cluster");
        let opts = AmendOptions {
            compat: Some("0.10".into()),
            ..Default::default()
        };
        amend_image(&mut image, &opts, &mut |_| {}).unwrap();
        image.close().unwrap();

        let mut head = [0u8; 8];
        file.read_at(&mut head, 0).unwrap();
        assert_eq!(&head[4..8], &2u32.to_be_bytes());
        let report = check::check(&file, check::Fix::NONE).unwrap();
        assert_eq!(
            (report.corruptions, report.leaks, report.check_errors),
            (0, 0, 0),
            "{:?}",
            report.messages
        );
        for i in 1..4u64 {
            let e = entry(file.as_ref(), l2 + i * 8);
            assert_eq!(e & 1, 0, "cluster {i}: no zero flag in version 2");
            assert_ne!(e & COPIED, 0, "cluster {i}: unshared");
            let host = e & OFFSET_MASK;
            assert_ne!(host, 0, "cluster {i}: allocated, to hide the backing file");
            let mut data = vec![1u8; cs as usize];
            file.read_at(&mut data, host).unwrap();
            assert!(data.iter().all(|&b| b == 0), "cluster {i} reads zeros");
        }
        // The preallocated cluster was zeroed where it was.
        assert_eq!(
            entry(file.as_ref(), l2 + 24) & OFFSET_MASK,
            prealloc & OFFSET_MASK
        );
    }
}
