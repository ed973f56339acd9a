//! Resizing a qcow2 image, with the layout and the messages of qemu's qcow2 truncate.
//!
//! Growing makes the L1 table large enough for the new size (a new table is written and synced
//! before the header points at it; the old one is freed after), then optionally preallocates
//! the new range:
//! - `metadata`: L2 tables and host clusters are allocated and linked, data is not written;
//! - `falloc`/`full`: as qemu, a fresh refcount area (refcount blocks and a new refcount
//!   table) is built past the last used cluster, covering the data area that follows it; the
//!   data area is allocated in the file (fallocate, or zeros written) and linked cluster by
//!   cluster, the L2 tables taking the first free clusters.
//!
//! Shrinking drops every cluster past the new end (rounded up to a cluster): entries of the L2
//! table that keeps part of the disk are cleared, L1 entries past the new L1 size are cleared
//! (the table keeps its size) and their L2 tables freed with everything they point to; refcount
//! blocks that no longer count anything are dropped from the refcount table, and the file is
//! cut after the last cluster still in use.
//!
//! The header's size field is written last, once everything it exposes is durable.

use super::create::size_to_l1;
use super::header::{autoclear, offsets, MAX_L1_BYTES, MAX_REFTABLE_BYTES};
use super::l2::{L2Entry, COPIED};
use super::refcount::{self, refcount_metadata_clusters};
use super::{Meta, Qcow2};
use crate::format::{Format, ResizeOptions, ZeroMode};
use crate::raw::{resize_file, Preallocation};
use crate::{Error, Result};
use blockdev::Storage;

/// The most bytes one of qemu's allocation requests covers (`INT_MAX`).
const REQUEST_MAX: u64 = i32::MAX as u64;

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidArgument(message.into())
}

/// Reads `buf.len()` bytes at `offset`, the part past the end of the file reading as zeros
/// (qemu lets clusters reach past the end of the file).
fn read_clamped(file: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    let avail = file.size()?.saturating_sub(offset).min(buf.len() as u64) as usize;
    file.read_at(&mut buf[..avail], offset)?;
    buf[avail..].fill(0);
    Ok(())
}

impl Qcow2 {
    /// [`Format::resize`] for qcow2.
    pub(super) fn resize_to(&mut self, size: u64, opts: &ResizeOptions) -> Result<()> {
        self.check_writable()?;
        if !size.is_multiple_of(512) {
            return Err(invalid("The new size must be a multiple of 512"));
        }
        let h = &self.header;
        if h.nb_snapshots > 0 && h.version < 3 {
            // Version 2 snapshots need not record their size, so they could not be told apart
            // from the resized disk.
            return Err(invalid("Can't resize a v2 image which has snapshots"));
        }
        if h.version >= 3 && h.autoclear_features & autoclear::BITMAPS != 0 {
            return Err(Error::unsupported(
                self.name(),
                "resizing an image with persistent dirty bitmaps is not supported yet",
            ));
        }
        // qemu counts the disk in whole sectors.
        let old = h.size / 512 * 512;
        let new_l1 = size_to_l1(size, self.cluster_bits);
        if size < old {
            if opts.prealloc != Preallocation::Off {
                return Err(invalid(
                    "Preallocation can't be used for shrinking an image",
                ));
            }
            self.shrink(old, size, new_l1)?;
        } else {
            if new_l1.saturating_mul(8) > MAX_L1_BYTES {
                return Err(invalid("Failed to grow the L1 table: File too large"));
            }
            self.grow_l1(new_l1)?;
            match opts.prealloc {
                Preallocation::Off => {}
                Preallocation::Metadata => {
                    self.preallocate_metadata(old, size, opts.head_data.as_deref())?
                }
                mode => self.preallocate_data(old, size, mode, opts.head_data.as_deref())?,
            }
        }
        // With falloc and full the new range is linked to fresh clusters of the file, which
        // read as zeros already: qemu then leaves them data clusters.
        let zero_new = opts.zero_new_clusters
            && !matches!(opts.prealloc, Preallocation::Falloc | Preallocation::Full);
        let previous = self.header.size;
        // In memory first: zeroing the new clusters treats the new end as the disk's end.
        self.header.size = size;
        let done = self.finish_resize(old, size, zero_new);
        if done.is_err() {
            self.header.size = previous;
        }
        done
    }

    /// Zeroes the new clusters if asked, makes all metadata durable, then writes the new size.
    fn finish_resize(&self, old: u64, size: u64, zero_new: bool) -> Result<()> {
        let cs = self.cs();
        if zero_new && size > old.div_ceil(cs) * cs {
            if self.header.version < 3 {
                // Only version 3 can mark clusters as zeros over a backing file. As in qemu,
                // what was done so far stays, and the size does not change.
                return Err(invalid(
                    "Failed to zero out new clusters: Operation not supported",
                ));
            }
            let mut pos = old.div_ceil(cs) * cs;
            while pos < size {
                let n = Format::zero_clusters(self, pos, size - pos, ZeroMode::Keep)?;
                if n == 0 {
                    break;
                }
                pos += n;
            }
        }
        {
            let mut meta = self.lock();
            self.flush_meta(&mut meta)?;
        }
        self.file.write_at(&size.to_be_bytes(), offsets::SIZE)?;
        self.file.flush()?;
        Ok(())
    }

    /// Drops everything past `size` (see the module documentation).
    ///
    /// As qemu's shrink discards with its "always" policy, the clusters it frees (data, L2
    /// tables, refcount blocks) are punched out of the file whatever the image's discard
    /// setting; what else gets freed on the way follows that setting.
    fn shrink(&self, old: u64, size: u64, new_l1: u64) -> Result<()> {
        let cs = self.cs();
        let cb = self.cluster_bits;
        let mut meta = self.lock();
        self.mark_dirty(&mut meta)?;
        // Host clusters whose references the shrink drops: those the L2 entries held, and the
        // L2 tables dropped whole.
        let mut released = Vec::new();
        let mut dropped_tables = Vec::new();
        let note = |released: &mut Vec<u64>, entry: L2Entry| {
            if let Some((first, n)) = entry.host_clusters(cb) {
                released.extend(first..first + n);
            }
        };
        // The cluster holding the new end keeps its data, as in qemu.
        let start = size.div_ceil(cs) * cs;
        if start < old {
            let first = start >> cb;
            let end = old.div_ceil(cs);
            let (l1i, _) = self.split(first);
            if (l1i as u64) < new_l1 && l1i < meta.l1.len() {
                // qemu's discard makes the table writable before looking at it (allocating an
                // empty one if there is none); doing the same keeps the layouts equal.
                self.l2_for_write(&mut meta, l1i)?;
                let table_end = (l1i as u64 + 1) * self.l2_entries();
                for gc in first..end.min(table_end) {
                    let entry = self.lookup(&mut meta, gc)?;
                    if entry != L2Entry::Unallocated {
                        note(&mut released, entry);
                        self.set_entry(&mut meta, gc, 0)?;
                    }
                }
                self.flush_if_over_capacity(&mut meta)?;
            }
        }
        // Whole L2 tables past the new L1 size: the table's reference and every reference its
        // entries hold are dropped (what a snapshot still shares keeps its other references).
        for l1i in (new_l1 as usize)..meta.l1.len() {
            let l2 = self.l2_offset(&meta, l1i)?;
            if l2 != 0 {
                for l2i in 0..self.l2_entries() as usize {
                    let entry = self.entry_at(&mut meta, l2, l2i)?;
                    note(&mut released, entry);
                    self.release(&mut meta, entry);
                }
                meta.refcounts.free_later(l2 >> cb);
                dropped_tables.push(l2 >> cb);
                self.flush_if_over_capacity(&mut meta)?;
            }
            if meta.l1[l1i] != 0 {
                meta.l1[l1i] = 0;
                meta.l1_dirty.insert(l1i);
            }
        }
        // Entries first, synced; the references they held are released after.
        self.flush_meta(&mut meta)?;
        // qemu discards in the same batches (a batch is punched as merged runs, so which file
        // blocks get freed depends on them): the data first, then each L2 table on its own,
        // from the last one down.
        self.punch_if_free(&mut meta, released)?;
        for &table in dropped_tables.iter().rev() {
            self.punch_if_free(&mut meta, vec![table])?;
        }
        self.shrink_reftable(&mut meta)?;
        self.cut_file_tail(&mut meta)
    }

    /// Punches out of the file those of `clusters` that nothing references any more.
    fn punch_if_free(&self, meta: &mut Meta, mut clusters: Vec<u64>) -> Result<()> {
        clusters.sort_unstable();
        clusters.dedup();
        let mut free = Vec::with_capacity(clusters.len());
        for c in clusters {
            if meta.refcounts.get(self.file.as_ref(), c)? == 0 {
                free.push(c);
            }
        }
        self.punch_holes(&free)
    }

    /// Drops refcount blocks that count nothing but (maybe) themselves: the refcount table
    /// without them is written and synced first, then the blocks are released.
    fn shrink_reftable(&self, meta: &mut Meta) -> Result<()> {
        let file = self.file.as_ref();
        let cs = self.cs();
        let cb = self.cluster_bits;
        let per_block = meta.refcounts.per_block();
        let order = self.header.refcount_order;
        let table = meta.refcounts.table().to_vec();
        let mut new_table = table.clone();
        // (cluster of the dropped block, whether it counted itself)
        let mut dropped = Vec::new();
        let mut block = vec![0u8; cs as usize];
        for (i, &off) in table.iter().enumerate() {
            if off == 0 {
                continue;
            }
            if !off.is_multiple_of(cs) {
                return Err(self.corrupt(
                    meta,
                    meta.refcounts.table_offset() + i as u64 * 8,
                    format!("refcount block {i} at {off:#x} is not cluster aligned"),
                ));
            }
            // Every dirty block was written by the flush before this.
            file.read_at(&mut block, off)?;
            let own = off >> cb;
            let counts_itself = own / per_block == i as u64;
            if counts_itself {
                refcount::set_entry(&mut block, order, (own % per_block) as usize, 0);
            }
            if block.iter().all(|&b| b == 0) {
                new_table[i] = 0;
                dropped.push((own, counts_itself));
            }
        }
        // Written whole even when nothing changes, as qemu does (the file then holds the same
        // allocated blocks).
        let table_offset = meta.refcounts.table_offset();
        let raw: Vec<u8> = new_table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_at(&raw, table_offset)?;
        file.flush()?;
        if dropped.is_empty() {
            return Ok(());
        }
        let clusters = (table.len() as u64 * 8).div_ceil(cs) as u32;
        meta.refcounts.reload(file, table_offset, clusters)?;
        for &(cluster, counts_itself) in &dropped {
            // A block that counted itself took its count with it.
            if !counts_itself {
                meta.refcounts.free_later(cluster);
            }
        }
        self.flush_meta(meta)?;
        let mut blocks: Vec<u64> = dropped.iter().map(|&(c, _)| c).collect();
        blocks.sort_unstable();
        self.punch_holes(&blocks)
    }

    /// The last cluster of the first `clusters` with a non-zero refcount.
    fn last_used_cluster(&self, meta: &mut Meta, clusters: u64) -> Result<Option<u64>> {
        let file = self.file.as_ref();
        let per_block = meta.refcounts.per_block();
        let mut block = clusters.div_ceil(per_block);
        while block > 0 {
            block -= 1;
            let described = meta
                .refcounts
                .table()
                .get(block as usize)
                .is_some_and(|&b| b != 0);
            if !described {
                continue;
            }
            let first = block * per_block;
            for c in (first..((block + 1) * per_block).min(clusters)).rev() {
                if meta.refcounts.get(file, c)? > 0 {
                    return Ok(Some(c));
                }
            }
        }
        Ok(None)
    }

    /// Cuts the file after the last cluster in use.
    fn cut_file_tail(&self, meta: &mut Meta) -> Result<()> {
        let cs = self.cs();
        let len = self.file.size()?;
        let Some(last) = self.last_used_cluster(meta, len.div_ceil(cs))? else {
            return Err(self.corrupt(
                meta,
                meta.refcounts.table_offset(),
                "There are no references in the refcount table.".into(),
            ));
        };
        let end = (last + 1) * cs;
        if end < len {
            // As in qemu a failure here only leaves unused space at the end of the file.
            let _ = self.file.truncate(end);
        }
        Ok(())
    }

    /// The guest content of cluster `gc` when it holds data (`None` when it reads as zeros or
    /// falls through to a backing image).
    fn cluster_data(&self, meta: &mut Meta, gc: u64) -> Result<Option<Vec<u8>>> {
        let file = self.file.as_ref();
        let cs = self.cs() as usize;
        Ok(match self.lookup(meta, gc)? {
            L2Entry::Normal { offset, .. } => {
                let mut data = vec![0u8; cs];
                read_clamped(file, &mut data, offset)?;
                Some(data)
            }
            L2Entry::Compressed { offset, len } => {
                let mut compressed = vec![0u8; len as usize];
                read_clamped(file, &mut compressed, offset)?;
                let mut data = vec![0u8; cs];
                self.decompress(&compressed, &mut data)?;
                Some(data)
            }
            _ => None,
        })
    }

    /// The first `len` guest bytes of cluster `gc`, which preallocation copies into the
    /// cluster that replaces it: `head_data` when the caller read them (through the backing
    /// chain), else what this image stores (zeros where it stores nothing).
    fn head_bytes(
        &self,
        meta: &mut Meta,
        gc: u64,
        len: u64,
        head_data: Option<&[u8]>,
    ) -> Result<Vec<u8>> {
        let len = len as usize;
        if let Some(d) = head_data.filter(|d| d.len() >= len) {
            return Ok(d[..len].to_vec());
        }
        Ok(match self.cluster_data(meta, gc)? {
            Some(mut d) => {
                d.truncate(len);
                d
            }
            None => vec![0u8; len],
        })
    }

    /// Makes host bytes that lie inside the file read as zeros (bytes past its end already
    /// do): clusters handed out again may still hold what they held before, which qemu would
    /// let show through. Only ranges that are not zeros already are rewritten, so the file
    /// keeps the same allocated and sparse ranges as qemu's.
    fn zero_host(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let eof = self.file.size()?;
        let end = (offset + len).min(eof);
        let mut pos = offset;
        let mut buf = Vec::new();
        while pos < end {
            let n = CHUNK.min(end - pos);
            buf.resize(n as usize, 0);
            self.file.read_at(&mut buf, pos)?;
            if buf.iter().any(|&b| b != 0) {
                buf.fill(0);
                self.file.write_at(&buf, pos)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// `preallocation=metadata`: every cluster of `[from, to)` gets a host cluster and an L2
    /// entry; the data is not written.
    ///
    /// The clusters are handed out as qemu's allocation requests hand them out, so that the
    /// layout is qemu's: within one request (which ends where its chunk ends, or where the next
    /// cluster cannot continue the host range) fresh clusters continue right after the
    /// previous cluster's host offset when that space is free; a new request takes the first
    /// free run. A new L2 table is allocated before the data it maps.
    fn preallocate_metadata(&self, from: u64, to: u64, head_data: Option<&[u8]>) -> Result<()> {
        let cs = self.cs();
        let cb = self.cluster_bits;
        let file = self.file.as_ref();
        let mut meta = self.lock();
        self.mark_dirty(&mut meta)?;
        let end = to.div_ceil(cs);
        // The file must reach the last byte mapped (qemu extends it to there).
        let mut mapped_end = 0u64;
        let mut note_end = |host: u64, gc: u64| {
            let bytes = cs.min(to - (gc << cb));
            mapped_end = mapped_end.max(host + bytes);
        };
        let mut gc = from >> cb;
        while gc < end {
            // One request: qemu asks for at most INT_MAX bytes (whole clusters) at a time.
            let request_start = (gc << cb).max(from);
            let request_end_byte = to.min(request_start + REQUEST_MAX / cs * cs);
            let request_end = request_end_byte.div_ceil(cs);
            let mut next_host: Option<u64> = None;
            while gc < request_end {
                let entry = self.lookup(&mut meta, gc)?;
                if let L2Entry::Normal {
                    offset,
                    copied: true,
                }
                | L2Entry::ZeroAlloc {
                    offset,
                    copied: true,
                } = entry
                {
                    if next_host.is_some_and(|h| h != offset) {
                        break;
                    }
                    if let L2Entry::ZeroAlloc { .. } = entry {
                        // Kept, and made a data cluster; its bytes are zeroed so that the
                        // range still reads as zeros.
                        self.zero_host(offset, cs)?;
                        let (l1i, l2i) = self.split(gc);
                        let l2 = self.l2_for_write(&mut meta, l1i)?;
                        self.write_entry(&mut meta, l2, l2i, offset | COPIED)?;
                    }
                    // A cluster of its own already: kept as it is.
                    note_end(offset, gc);
                    next_host = Some(offset + cs);
                    gc += 1;
                    continue;
                }
                // A run of clusters needing fresh space, inside one L2 slice.
                let limit = (request_end - gc).min(self.clusters_left_in_slice(gc));
                let mut n = 1;
                while n < limit {
                    match self.lookup(&mut meta, gc + n)? {
                        L2Entry::Normal { copied: true, .. }
                        | L2Entry::ZeroAlloc { copied: true, .. } => break,
                        _ => n += 1,
                    }
                }
                // The L2 table before the data.
                let (l1i, _) = self.split(gc);
                self.l2_for_write(&mut meta, l1i)?;
                let host = match next_host {
                    None => meta.refcounts.alloc(file, n)? << cb,
                    Some(h) => {
                        let k = self.alloc_at(&mut meta, h >> cb, n)?;
                        if k == 0 {
                            break;
                        }
                        n = k;
                        h
                    }
                };
                self.fill_edges(&mut meta, (gc, n, host), from, to, head_data)?;
                for i in 0..n {
                    let h = host + (i << cb);
                    self.set_entry(&mut meta, gc + i, h | COPIED)?;
                    note_end(h, gc + i);
                }
                next_host = Some(host + (n << cb));
                gc += n;
                self.flush_if_over_capacity(&mut meta)?;
            }
            if gc == request_end && !request_end_byte.is_multiple_of(cs) && request_end_byte < to {
                // The next request starts inside the cluster this one ended in.
                gc -= 1;
            }
        }
        if mapped_end > file.size()? {
            file.truncate(mapped_end)?;
        }
        Ok(())
    }

    /// Allocates up to `n` free clusters starting exactly at `cluster`; returns how many.
    fn alloc_at(&self, meta: &mut Meta, cluster: u64, n: u64) -> Result<u64> {
        let file = self.file.as_ref();
        let mut k = 0;
        while k < n
            && ((cluster + k + 1) << self.cluster_bits) <= super::header::MAX_HOST_OFFSET
            && meta.refcounts.get(file, cluster + k)? == 0
        {
            k += 1;
        }
        for c in cluster..cluster + k {
            meta.refcounts.increment(file, c)?;
        }
        Ok(k)
    }

    /// Writes what qemu's copy-on-write around a preallocated range writes into the fresh
    /// clusters `[gc, gc + n)` at `host`: the part of the first cluster that belongs to the
    /// old disk (before `from`) with its content, the part of the last cluster past the new
    /// end `to` with zeros. Fresh clusters that the file already covers are zeroed first, so
    /// that nothing they held before shows through.
    fn fill_edges(
        &self,
        meta: &mut Meta,
        (gc, n, host): (u64, u64, u64),
        from: u64,
        to: u64,
        head_data: Option<&[u8]>,
    ) -> Result<()> {
        let cs = self.cs();
        let cb = self.cluster_bits;
        let file = self.file.as_ref();
        self.zero_host(host, n << cb)?;
        let head = from.saturating_sub(gc << cb);
        if head > 0 {
            let bytes = self.head_bytes(meta, gc, head, head_data)?;
            file.write_at(&bytes, host)?;
        }
        let last = gc + n - 1;
        let tail = to.saturating_sub(last << cb);
        if tail < cs {
            let start = tail.max(from.saturating_sub(last << cb));
            let at = host + ((n - 1) << cb) + start;
            file.write_at(&vec![0u8; (cs - start) as usize], at)?;
        }
        Ok(())
    }

    /// `preallocation=falloc` and `full`: the data area is placed right after a new refcount
    /// area past the last used cluster, allocated in the file, then linked.
    fn preallocate_data(
        &self,
        old: u64,
        size: u64,
        mode: Preallocation,
        head_data: Option<&[u8]>,
    ) -> Result<()> {
        let cs = self.cs();
        let cb = self.cluster_bits;
        let file = self.file.as_ref();
        let mut meta = self.lock();
        self.mark_dirty(&mut meta)?;
        self.flush_meta(&mut meta)?;
        let file_len = file.size()?;
        let used_end = match self.last_used_cluster(&mut meta, file_len.div_ceil(cs))? {
            Some(last) => last + 1,
            None => file_len.div_ceil(cs),
        };
        // The cluster holding the old end is replaced too: its head is copied over.
        let head_gc = old >> cb;
        let data_clusters = size.div_ceil(cs) - head_gc;
        // Room in the refcount area for the L2 tables, wherever they land (one more for a
        // range that does not start on a table boundary).
        let l2_tables = data_clusters.div_ceil(self.l2_entries()) + 1;
        let data_start = self.refcount_area(
            &mut meta,
            used_end,
            data_clusters + l2_tables,
            data_clusters,
        )?;
        let new_len = (data_start + data_clusters) << cb;
        resize_file(file, new_len, mode).map_err(|e| {
            let reason = match e {
                Error::InvalidArgument(m) => m,
                other => other.to_string(),
            };
            invalid(format!("Failed to resize underlying file: {reason}"))
        })?;
        let head = old - (head_gc << cb);
        if head > 0 {
            let bytes = self.head_bytes(&mut meta, head_gc, head, head_data)?;
            file.write_at(&bytes, data_start << cb)?;
        }
        for i in 0..data_clusters {
            let host = (data_start + i) << cb;
            self.set_entry(&mut meta, head_gc + i, host | COPIED)?;
            if (head_gc + i + 1).is_multiple_of(self.slice_entries()) {
                self.flush_if_over_capacity(&mut meta)?;
            }
        }
        Ok(())
    }

    /// Builds refcount blocks and a new refcount table at cluster `start` (which, like all that
    /// follows it, must be free), covering `additional` more clusters after `start`, and
    /// allocates the `data` clusters that follow the new structures. Returns the first data
    /// cluster. The blocks and the table are written and synced before the header points at
    /// the table; the old table is freed after.
    fn refcount_area(
        &self,
        meta: &mut Meta,
        start: u64,
        additional: u64,
        data: u64,
    ) -> Result<u64> {
        let file = self.file.as_ref();
        let cs = self.cs();
        let cb = self.cluster_bits;
        let order = self.header.refcount_order;
        let per_block = meta.refcounts.per_block();
        let per_table_cluster = cs / 8;
        let too_large = || invalid("Failed to resize refcount structures: File too large");
        let (total_blocks, _) = refcount_metadata_clusters(start + additional, cb, order, false);
        // qemu compares the number of blocks with the table's byte limit.
        if total_blocks > MAX_REFTABLE_BYTES {
            return Err(too_large());
        }
        let table_size = total_blocks.div_ceil(per_table_cluster) * per_table_cluster;
        let table_clusters = table_size / per_table_cluster;
        if table_size > MAX_REFTABLE_BYTES {
            return Err(too_large());
        }
        let old_table = meta.refcounts.table().to_vec();
        let last_index = old_table.iter().rposition(|&e| e != 0).unwrap_or(0) as u64;
        let mut table = vec![0u64; table_size as usize];
        let keep = (if table_size > last_index {
            last_index + 1
        } else {
            table_size
        })
        .min(old_table.len() as u64) as usize;
        table[..keep].copy_from_slice(&old_table[..keep]);
        let area_index = start / per_block;
        let new_blocks = (area_index..total_blocks)
            .filter(|&i| table[i as usize] == 0)
            .count() as u64;
        let table_start = start + new_blocks;
        let data_start = table_start + table_clusters;
        let data_end = data_start + data;
        let mut next_block = start;
        let mut block = vec![0u8; cs as usize];
        for i in area_index..total_blocks {
            let off = match table[i as usize] {
                0 => {
                    block.fill(0);
                    let off = next_block << cb;
                    next_block += 1;
                    table[i as usize] = off;
                    off
                }
                off => {
                    file.read_at(&mut block, off)?;
                    off
                }
            };
            // The new blocks, the table and the data area after them get refcount 1.
            let first = i * per_block;
            for c in start.max(first)..data_end.min(first + per_block) {
                let j = (c - first) as usize;
                if refcount::get_entry(&block, order, j) != 0 {
                    return Err(self.corrupt(
                        meta,
                        c << cb,
                        format!("cluster {c} past the last used cluster has a refcount"),
                    ));
                }
                refcount::set_entry(&mut block, order, j, 1);
            }
            file.write_at(&block, off)?;
        }
        file.flush()?;
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_at(&raw, table_start << cb)?;
        file.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&(table_start << cb).to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file.write_at(&hdr, offsets::REFCOUNT_TABLE)?;
        file.flush()?;
        let old_offset = meta.refcounts.table_offset();
        let old_clusters = (old_table.len() as u64 * 8).div_ceil(cs);
        meta.refcounts
            .reload(file, table_start << cb, table_clusters as u32)?;
        for c in 0..old_clusters {
            meta.refcounts.free_later((old_offset >> cb) + c);
        }
        self.flush_meta(meta)?;
        Ok(data_start)
    }
}
