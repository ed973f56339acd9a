//! The recount: every table of the image, walked from the header, adds one reference per
//! cluster it uses to the in-memory refcount table. Entries that cannot be right are reported
//! on the way, in qemu-img's words.

use super::imrt::Imrt;
use super::{alt_hex, mask, ol, Checker, Fail, Fix, Res};
use crate::qcow2::l2::{COMPRESSED, COPIED, ZERO};

type R<T> = std::result::Result<T, Fail>;

/// The kinds of L2 entry (without subclusters or an external data file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Unallocated,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Compressed,
}

/// Classifies an L2 entry as qemu does (the zero flag counts in version 2 images too).
pub(super) fn kind(entry: u64) -> Kind {
    if entry & COMPRESSED != 0 {
        Kind::Compressed
    } else if entry & ZERO != 0 {
        if entry & mask::OFFSET != 0 {
            Kind::ZeroAlloc
        } else {
            Kind::ZeroPlain
        }
    } else if entry & mask::OFFSET == 0 {
        Kind::Unallocated
    } else {
        Kind::Normal
    }
}

/// Host bytes of a compressed cluster descriptor: (offset, length through the end of the last
/// 512-byte sector it names).
pub(super) fn compressed_range(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let shift = 62 - (cluster_bits - 8);
    let offset = entry & ((1u64 << shift) - 1);
    let sectors = ((entry >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (offset, sectors * 512 - (offset & 511))
}

impl Checker<'_> {
    /// Adds one reference to every cluster of the host range. A range reaching a whole cluster
    /// or more past the end of the file is an error and is not counted; a last cluster that is
    /// only partly in the file is.
    pub(super) fn inc_refcounts(
        &mut self,
        res: &mut Res,
        imrt: &mut Imrt,
        offset: u64,
        size: u64,
    ) -> R<()> {
        if size == 0 {
            return Ok(());
        }
        let end = offset as u128 + size as u128;
        if end >= self.file_len as u128 + self.cs as u128 {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            res.corruptions += 1;
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (end as u64 - 1) >> self.cluster_bits;
        for k in first..=last {
            if k >= imrt.len() {
                if let Err(e) = imrt.resize(k + 1) {
                    res.check_errors += 1;
                    return Err(e);
                }
            }
            let rc = imrt.get(k);
            if rc == self.refcount_max {
                self.msg(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.cluster_bits
                ));
                self.msg("Use img amend to increase the refcount entry width or img convert to create a clean copy if the image cannot be opened for writing".into());
                res.corruptions += 1;
                continue;
            }
            imrt.set(k, rc + 1);
        }
        Ok(())
    }

    /// Recounts every reference of the image into `imrt` (sized to the file on first use).
    pub(super) fn calculate_refcounts(
        &mut self,
        res: &mut Res,
        fix: Fix,
        rebuild: &mut bool,
        imrt: &mut Imrt,
    ) -> R<()> {
        if imrt.len() == 0 {
            let clusters = self.file_len.div_ceil(self.cs);
            if let Err(e) = imrt.resize(clusters) {
                res.check_errors += 1;
                return Err(e);
            }
        }
        // The header.
        self.inc_refcounts(res, imrt, 0, self.cs)?;
        // The active L1 table and everything below it.
        let (l1_offset, l1_size) = (self.l1_offset, self.l1.len() as u32);
        self.check_l1(res, imrt, l1_offset, l1_size, true, fix)?;
        // Snapshots.
        for i in 0..self.snapshots.len() {
            let sn = self.snapshots[i].clone();
            if sn.l1_offset & (self.cs - 1) != 0 {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_offset={}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, alt_hex(sn.l1_offset)
                ));
                res.corruptions += 1;
                continue;
            }
            if sn.l1_size as u64 > crate::qcow2::header::MAX_L1_BYTES / 8 {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_size={}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, alt_hex(sn.l1_size as u64)
                ));
                res.corruptions += 1;
                continue;
            }
            self.check_l1(res, imrt, sn.l1_offset, sn.l1_size, false, fix)?;
        }
        let (so, ss) = (self.snapshots_offset, self.snapshots_size);
        self.inc_refcounts(res, imrt, so, ss)?;
        // The refcount table.
        let (ro, rs) = (self.reftable_offset, self.reftable.len() as u64 * 8);
        self.inc_refcounts(res, imrt, ro, rs)?;
        // Bitmaps.
        self.check_bitmaps(res, imrt)?;
        // The refcount blocks.
        self.check_refblocks(res, fix, rebuild, imrt)
    }

    /// Counts an L1 table, its L2 tables and their clusters. The active table (`active`) also
    /// feeds the allocation statistics.
    fn check_l1(
        &mut self,
        res: &mut Res,
        imrt: &mut Imrt,
        l1_offset: u64,
        l1_size: u32,
        active: bool,
        fix: Fix,
    ) -> R<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = l1_size as u64 * 8;
        self.inc_refcounts(res, imrt, l1_offset, bytes)?;
        let mut raw = vec![0u8; bytes as usize];
        if self.read(&mut raw, l1_offset).is_err() {
            self.msg("ERROR: I/O error in check_refcounts_l1".into());
            res.check_errors += 1;
            return Err(Fail::EIO);
        }
        for (index, chunk) in raw.chunks_exact(8).enumerate() {
            let e = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
            if e == 0 {
                continue;
            }
            if active
                && fix.errors
                && self.clear_l1_entry_into_metadata(res, l1_offset, index, e)?
            {
                continue;
            }
            if e & mask::L1_RESERVED != 0 {
                self.msg(format!(
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                ));
                res.corruptions += 1;
            }
            let l2_offset = e & mask::OFFSET;
            self.inc_refcounts(res, imrt, l2_offset, self.cs)?;
            if l2_offset & (self.cs - 1) != 0 {
                self.msg(format!(
                    "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                res.corruptions += 1;
            }
            self.check_l2(res, imrt, l2_offset, active, fix)?;
        }
        Ok(())
    }

    /// With `-r all`: an active L1 entry whose "L2 table" is in fact other metadata (the
    /// header, an L1 or refcount table, a refcount block, the snapshot table) can never be
    /// right, and reading it as L2 entries only spreads the damage. qemu leaves such an entry
    /// and fails or stays corrupt; clearing it (the range reads as unallocated again) leaves an
    /// image that checks clean. Returns whether the entry was cleared.
    fn clear_l1_entry_into_metadata(
        &mut self,
        res: &mut Res,
        l1_offset: u64,
        index: usize,
        entry: u64,
    ) -> R<bool> {
        let l2_offset = entry & mask::OFFSET;
        if l2_offset & (self.cs - 1) != 0 {
            return Ok(false);
        }
        let hit = self.overlap(ol::ACTIVE_L2 | ol::INACTIVE_L2, l2_offset, self.cs, false);
        if hit == 0 {
            return Ok(false);
        }
        let name = ol::NAMES[hit.trailing_zeros() as usize];
        self.msg(format!(
            "Repairing l1_index={index}: L2 table at offset {l2_offset:#x} overlaps with {name}; L1 entry cleared"
        ));
        let at = l1_offset + index as u64 * 8;
        let written = self
            .write(&0u64.to_be_bytes(), at)
            .and_then(|_| self.file.flush().map_err(Fail::from));
        if let Err(e) = written {
            self.msg(format!(
                "ERROR: Failed to overwrite L1 table entry: {}",
                e.text()
            ));
            res.check_errors += 1;
            return Ok(false);
        }
        if let Some(e) = self.l1.get_mut(index) {
            *e = 0;
        }
        res.corruptions_fixed += 1;
        Ok(true)
    }

    /// Counts the clusters an L2 table references, checking each entry.
    fn check_l2(
        &mut self,
        res: &mut Res,
        imrt: &mut Imrt,
        l2_offset: u64,
        active: bool,
        fix: Fix,
    ) -> R<()> {
        let mut table = vec![0u8; self.cs as usize];
        if self.read(&mut table, l2_offset).is_err() {
            self.msg("ERROR: I/O error in check_refcounts_l2".into());
            res.check_errors += 1;
            return Err(Fail::EIO);
        }
        let mut next_contiguous = 0u64;
        for i in 0..(self.cs / 8) as usize {
            let mut e = u64::from_be_bytes(table[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
            let k = kind(e);
            if k != Kind::Compressed && e & mask::L2_RESERVED != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {e:x}"
                ));
                res.corruptions += 1;
            }
            match k {
                Kind::Compressed => {
                    if e & COPIED != 0 {
                        let shift = 62 - (self.cluster_bits - 8);
                        self.msg(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            e & ((1u64 << shift) - 1)
                        ));
                        e &= !COPIED;
                        res.corruptions += 1;
                    }
                    let (coffset, csize) = compressed_range(e, self.cluster_bits);
                    self.inc_refcounts(res, imrt, coffset, csize)?;
                    if active {
                        res.allocated_clusters += 1;
                        res.compressed_clusters += 1;
                        // Compressed clusters are fragmented by nature: neighbours share
                        // sectors that have to be read again.
                        res.fragmented_clusters += 1;
                    }
                }
                Kind::ZeroAlloc | Kind::Normal => {
                    let offset = e & mask::OFFSET;
                    if offset & (self.cs - 1) != 0 {
                        res.corruptions += 1;
                        if e & ZERO != 0 {
                            let word = if fix.errors { "Repairing" } else { "ERROR" };
                            self.msg(format!(
                                "{word} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            ));
                            if fix.errors {
                                let fixed = self
                                    .fix_l2_entry_by_zero(res, &mut table, l2_offset, i, active)?;
                                if fixed {
                                    // The entry no longer uses the cluster.
                                    continue;
                                }
                            }
                        } else {
                            self.msg(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            ));
                        }
                    }
                    let entry_at = l2_offset + i as u64 * 8;
                    let own_table = if active {
                        ol::ACTIVE_L2
                    } else {
                        ol::INACTIVE_L2
                    };
                    // Only in a table that is really an L2 table: aligned, and not shared with
                    // other metadata (a table reached through a corrupted L1 entry is left to
                    // the refcount repair, as qemu leaves it).
                    if offset >= self.file_len
                        && offset & (self.cs - 1) == 0
                        && l2_offset & (self.cs - 1) == 0
                        && fix.errors
                        && self.overlap(own_table, entry_at, 8, false) == 0
                    {
                        // qemu reads such a cluster as zeros but leaves the entry broken;
                        // making it a zero cluster keeps what the guest sees and leaves an
                        // image that checks clean. Version 2 has no zero flag, but an
                        // unallocated cluster there reads as zeros too (no backing file is
                        // supported for repair yet).
                        res.corruptions += 1;
                        self.msg(format!(
                            "Repairing offset={offset:x}: Data cluster is beyond the end of the file; L2 entry corrupted."
                        ));
                        let value = if self.version >= 3 { ZERO } else { 0 };
                        if self.replace_l2_entry(res, &mut table, l2_offset, i, active, value)? {
                            continue;
                        }
                    }
                    if active {
                        res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset + self.cs;
                    }
                    self.inc_refcounts(res, imrt, offset, self.cs)?;
                }
                Kind::ZeroPlain | Kind::Unallocated => {}
            }
        }
        Ok(())
    }

    /// Repairs a preallocated zero cluster with an unaligned offset by making it a plain zero
    /// cluster. Returns whether the entry was rewritten; a write that would hit other metadata
    /// aborts the check.
    fn fix_l2_entry_by_zero(
        &mut self,
        res: &mut Res,
        table: &mut [u8],
        l2_offset: u64,
        index: usize,
        active: bool,
    ) -> R<bool> {
        self.replace_l2_entry(res, table, l2_offset, index, active, ZERO)
    }

    /// Rewrites one L2 entry to `value` (in `table` and on disk) and counts the corruption as
    /// fixed.
    fn replace_l2_entry(
        &mut self,
        res: &mut Res,
        table: &mut [u8],
        l2_offset: u64,
        index: usize,
        active: bool,
        value: u64,
    ) -> R<bool> {
        table[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
        let entry_offset = l2_offset + index as u64 * 8;
        let ignore = if active {
            ol::ACTIVE_L2
        } else {
            ol::INACTIVE_L2
        };
        if self
            .pre_write_overlap_check(ignore, entry_offset, 8, false)
            .is_err()
        {
            self.msg("ERROR: Overlap check failed".into());
            res.check_errors += 1;
            return Err(Fail::EIO);
        }
        let written = self
            .write(&value.to_be_bytes(), entry_offset)
            .and_then(|_| self.file.flush().map_err(Fail::from));
        if let Err(e) = written {
            self.msg(format!(
                "ERROR: Failed to overwrite L2 table entry: {}",
                e.text()
            ));
            res.check_errors += 1;
            return Ok(false);
        }
        res.corruptions -= 1;
        res.corruptions_fixed += 1;
        Ok(true)
    }

    /// Counts the bitmap directory, the bitmap tables and the clusters they reference.
    fn check_bitmaps(&mut self, res: &mut Res, imrt: &mut Imrt) -> R<()> {
        let Some((dir_offset, dir_size)) = self.bitmap_dir else {
            return Ok(());
        };
        self.inc_refcounts(res, imrt, dir_offset, dir_size)?;
        let Some(tables) = self.bitmap_tables(dir_offset, dir_size) else {
            res.corruptions += 1;
            return Err(Fail::EINVAL);
        };
        for (table_offset, entries) in tables {
            self.inc_refcounts(res, imrt, table_offset, entries * 8)?;
            // qemu's limit for one bitmap table (1 GiB); it also bounds our memory.
            if entries > 0x800_0000 {
                res.corruptions += 1;
                return Err(Fail::EINVAL);
            }
            if table_offset & (self.cs - 1) != 0
                || table_offset.saturating_add(entries * 8) > self.file_len
            {
                res.corruptions += 1;
                return Err(Fail::EINVAL);
            }
            // Read in pieces: a table may be 1 GiB, and only its entries one by one matter.
            const PIECE: u64 = 64 << 10;
            let mut raw = vec![0u8; (entries * 8).min(PIECE) as usize];
            let mut done = 0;
            while done < entries * 8 {
                let n = (entries * 8 - done).min(PIECE) as usize;
                self.read(&mut raw[..n], table_offset + done)?;
                done += n as u64;
                for chunk in raw[..n].chunks_exact(8) {
                    let e = u64::from_be_bytes(chunk.try_into().expect("8 bytes"));
                    let offset = e & mask::OFFSET;
                    let bad = e & mask::BME_RESERVED != 0
                        || (offset != 0 && (e & 1 != 0 || offset & (self.cs - 1) != 0));
                    if bad {
                        res.corruptions += 1;
                        continue;
                    }
                    if offset != 0 {
                        self.inc_refcounts(res, imrt, offset, self.cs)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The (offset, entries) of each bitmap table listed in the bitmap directory, or None if
    /// the directory is malformed.
    fn bitmap_tables(&self, dir_offset: u64, dir_size: u64) -> Option<Vec<(u64, u64)>> {
        if dir_size > 64 << 20 || dir_offset.checked_add(dir_size)? > self.file_len {
            return None;
        }
        let mut dir = vec![0u8; dir_size as usize];
        self.read(&mut dir, dir_offset).ok()?;
        let mut tables = Vec::new();
        let mut pos = 0usize;
        while pos < dir.len() {
            let head = dir.get(pos..pos + 24)?;
            let offset = u64::from_be_bytes(head[0..8].try_into().ok()?);
            let entries = u32::from_be_bytes(head[8..12].try_into().ok()?) as u64;
            let name_len = u16::from_be_bytes(head[18..20].try_into().ok()?) as usize;
            let extra = u32::from_be_bytes(head[20..24].try_into().ok()?) as usize;
            let len = (24 + extra + name_len).div_ceil(8) * 8;
            if pos + 24 + extra + name_len > dir.len() {
                return None;
            }
            tables.push((offset, entries));
            pos += len;
        }
        Some(tables)
    }

    /// Checks the refcount table's entries and counts the refcount blocks. Entries that cannot
    /// be used make a rebuild necessary; a block past the end of the file is repaired by
    /// growing the file, as qemu does.
    fn check_refblocks(
        &mut self,
        res: &mut Res,
        fix: Fix,
        rebuild: &mut bool,
        imrt: &mut Imrt,
    ) -> R<()> {
        for i in 0..self.reftable.len() {
            let raw = self.reftable[i];
            let offset = raw & mask::REFT_OFFSET;
            let cluster = offset >> self.cluster_bits;
            if raw & mask::REFT_RESERVED != 0 {
                self.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if offset & (self.cs - 1) != 0 {
                self.msg(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                ));
                res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= imrt.len() {
                res.corruptions += 1;
                let word = if fix.errors { "Repairing" } else { "ERROR" };
                self.msg(format!("{word} refcount block {i} is outside image"));
                if fix.errors {
                    match self.grow_file_for_refblock(res, imrt, offset) {
                        Ok(()) => {
                            res.corruptions -= 1;
                            res.corruptions_fixed += 1;
                            self.inc_refcounts(res, imrt, offset, self.cs)?;
                            // The block was just made of zeros past the old end, so this is
                            // its only reference.
                            continue;
                        }
                        Err(GrowError::Fatal(e)) => return Err(e),
                        Err(GrowError::Resize(e)) => {
                            *rebuild = true;
                            self.msg(format!("ERROR could not resize image: {}", e.text()));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc_refcounts(res, imrt, offset, self.cs)?;
                let rc = imrt.get(cluster);
                if rc != 1 {
                    self.msg(format!("ERROR refcount block {i} refcount={rc}"));
                    res.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Grows the file so that a refcount block at `offset` lies inside it.
    fn grow_file_for_refblock(
        &mut self,
        res: &mut Res,
        imrt: &mut Imrt,
        offset: u64,
    ) -> std::result::Result<(), GrowError> {
        let new_len = offset
            .checked_add(self.cs)
            .filter(|&l| l <= i64::MAX as u64)
            .ok_or(GrowError::Resize(Fail::EINVAL))?;
        let clusters = new_len.div_ceil(self.cs);
        // Refuse before touching the file if the recount could not describe the new size.
        if clusters.saturating_mul(1 << self.order) / 8 > super::imrt::MAX_BYTES {
            return Err(GrowError::Resize(Fail::EFBIG));
        }
        if new_len > self.file_len {
            self.file
                .truncate(new_len)
                .map_err(|e| GrowError::Resize(Fail::from(e)))?;
        }
        self.refresh_len().map_err(GrowError::Resize)?;
        let clusters = self.file_len.div_ceil(self.cs);
        if clusters > imrt.len() {
            if let Err(e) = imrt.resize(clusters) {
                res.check_errors += 1;
                return Err(GrowError::Fatal(e));
            }
        }
        if offset >> self.cluster_bits >= imrt.len() {
            return Err(GrowError::Resize(Fail::EINVAL));
        }
        Ok(())
    }
}

/// How growing the file for a refcount block failed.
enum GrowError {
    /// The check cannot go on.
    Fatal(Fail),
    /// The file could not be grown; a rebuild is needed instead.
    Resize(Fail),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_the_flags() {
        assert_eq!(kind(0), Kind::Unallocated);
        assert_eq!(kind(ZERO), Kind::ZeroPlain);
        assert_eq!(kind(ZERO | 0x10000), Kind::ZeroAlloc);
        assert_eq!(kind(COPIED | 0x10000), Kind::Normal);
        assert_eq!(kind(COMPRESSED | 0x10000), Kind::Compressed);
        // Only bits 9..55 hold the offset: low reserved bits alone allocate nothing.
        assert_eq!(kind(0x1fe), Kind::Unallocated);
    }

    #[test]
    fn compressed_ranges() {
        // 64 KiB clusters: 8 size bits above the 54 offset bits.
        let shift = 62 - 8;
        let e = COMPRESSED | (2u64 << shift) | 0x50100;
        assert_eq!(compressed_range(e, 16), (0x50100, 3 * 512 - 0x100));
        let e = COMPRESSED | 0x7fe00;
        assert_eq!(compressed_range(e, 16), (0x7fe00, 512));
    }
}
