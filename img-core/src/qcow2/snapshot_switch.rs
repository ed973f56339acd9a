//! Snapshot creation and deletion as one switch of the header, so that a crash at any moment
//! leaves either the old image or the new one, each consistent.
//!
//! Why not update in place, as qemu does: two facts about every cluster the active tables
//! reach must agree, its refcount and the OFLAG_COPIED flag of the entry that points at it
//! (set exactly when the refcount is 1). Creating or deleting a snapshot changes both for
//! every cluster it shares, and they live in different clusters: whichever is written first,
//! a crash before the other leaves entries that `qemu-img check` counts as corruptions (a
//! killed `qemu-img snapshot -c` leaves tens of thousands).
//!
//! Instead the new state is written beside the old one, into clusters that neither uses:
//! copies of the active L2 tables whose flags change, a new active L1 table, the new snapshot
//! table, and a complete new refcount structure counting exactly what the new state uses.
//! Then one write of the header's bytes 36..72 (L1 size and offset, refcount table offset and
//! size, snapshot count and offset), all inside the first sector, switches to it. Before that
//! write the new clusters are free space in the old image (not even leaks); after it the old
//! metadata is free space in the new one.
//!
//! The cost: the refcounts of the whole file are held in memory at the image's own width
//! (the size of its refcount blocks, as `qemu-img check` holds them), and the active L2
//! tables whose flags change are rewritten (qemu rewrites them in place).

use super::check::imrt::Imrt;
use super::l2::{table_entry, L2Entry, COPIED, OFFSET_MASK};
use super::refcount::{get_entry, Refcounts};
use super::snapshot::{push_entry, Snapshot};
use super::{cache::MetaCache, header::offsets, Meta, Qcow2};
use crate::{Error, Result};
use std::sync::Arc;

/// An L1 table that gains or loses its references as a whole: where it is and its entries.
pub(super) struct Tree<'a> {
    /// Host offset of the table; 0 when only what the entries reach counts (a table about to
    /// be written anew).
    pub offset: u64,
    /// Its entries.
    pub l1: &'a [u64],
}

/// What a switch changes.
pub(super) struct Switch<'a> {
    /// The L1 table whose references the new state adds (a new snapshot's).
    pub gained: Option<Tree<'a>>,
    /// The L1 table whose references the new state drops (a deleted snapshot's).
    pub lost: Option<Tree<'a>>,
    /// New entries for the active L1 table (a snapshot being applied), whose references are
    /// counted in `gained` and the old ones' in `lost`; `None` keeps the active disk as it is.
    pub active: Option<Vec<u64>>,
    /// The snapshot table after the switch.
    pub snapshots: &'a [Snapshot],
    /// Size in bytes of the snapshot table before it.
    pub old_table_size: u64,
}

/// Clusters free in both the old state and the new one, lowest first: the only clusters the
/// new metadata may be written to before the switch.
struct FreeClusters<'a> {
    old: &'a Imrt,
    next: u64,
}

impl FreeClusters<'_> {
    /// Takes a run of `n` clusters (refcount 1 in `rc` from now on), growing `rc` past the
    /// end of the file when no run inside it is free.
    fn take(&mut self, rc: &mut Imrt, n: u64, name: &str) -> Result<u64> {
        let free = |rc: &Imrt, c: u64| {
            (c >= rc.len() || rc.get(c) == 0) && (c >= self.old.len() || self.old.get(c) == 0)
        };
        let mut start = self.next;
        let mut c = start;
        while c < start + n {
            c += 1;
            if !free(rc, c - 1) {
                start = c;
            }
        }
        if start + n > rc.len() {
            rc.resize(start + n).map_err(|_| out_of_memory(name))?;
        }
        for k in start..start + n {
            rc.set(k, 1);
        }
        if start == self.next {
            self.next = start + n;
        }
        Ok(start)
    }

    /// Gives back a run taken earlier and never written.
    fn give_back(&mut self, rc: &mut Imrt, first: u64, n: u64) {
        for k in first..first + n {
            rc.set(k, 0);
        }
        self.next = self.next.min(first);
    }
}

/// Places a refcount structure for the counts in `rc` (which it changes, as its own clusters
/// count too): a block for every range of clusters with a nonzero count, and a table for the
/// blocks. Placing them changes counts, which may need more blocks or a larger table, so it
/// repeats until nothing more is needed. Returns the block of each range (cluster index, 0
/// for none) and the table's first cluster and length in clusters.
fn place_refcount_structure(
    rc: &mut Imrt,
    free: &mut FreeClusters,
    per_block: u64,
    name: &str,
) -> Result<(Vec<u64>, (u64, u64))> {
    let cs = rc.cluster_size();
    let mut blocks: Vec<u64> = Vec::new();
    let mut table: Option<(u64, u64)> = None;
    loop {
        let mut grew = false;
        let ranges = rc.len().div_ceil(per_block);
        blocks.resize(ranges as usize, 0);
        for r in 0..ranges {
            let start = r * per_block;
            let end = (start + per_block).min(rc.len());
            if blocks[r as usize] == 0 && (start..end).any(|c| rc.get(c) != 0) {
                blocks[r as usize] = free.take(rc, 1, name)?;
                grew = true;
            }
        }
        let needed = (blocks.len() as u64 * 8).div_ceil(cs);
        match table {
            Some((first, n)) if n >= needed && !grew => return Ok((blocks, (first, n))),
            Some((first, n)) if n < needed => {
                free.give_back(rc, first, n);
                table = Some((free.take(rc, needed, name)?, needed));
            }
            Some(_) => {}
            None => table = Some((free.take(rc, needed, name)?, needed)),
        }
    }
}

fn out_of_memory(name: &str) -> Error {
    Error::invalid(
        name,
        "the image's refcounts do not fit in memory for a snapshot operation",
    )
}

impl Qcow2 {
    /// What the refcount blocks `table` names count, for every cluster of the file (counts
    /// past its end are dropped: nothing valid lives there).
    fn file_refcounts(&self, table: &[u64], per_block: u64) -> Result<Imrt> {
        let file = self.file.as_ref();
        let cs = self.cs();
        let order = self.header.refcount_order;
        let file_clusters = file.size()?.div_ceil(cs);
        let mut rc = Imrt::new(order, cs);
        rc.resize(file_clusters)
            .map_err(|_| out_of_memory(self.name()))?;
        let mut block = vec![0u8; cs as usize];
        for (i, &b) in table.iter().enumerate() {
            let first = i as u64 * per_block;
            if b == 0 || first >= file_clusters {
                continue;
            }
            file.read_at(&mut block, b)?;
            for k in 0..per_block.min(file_clusters - first) {
                rc.set(first + k, get_entry(&block, order, k as usize));
            }
        }
        Ok(rc)
    }

    /// Switches the image to the state `change` describes. The active tables move too: the
    /// new active L1 table and any L2 table whose copy flags change are written anew. See the
    /// module docs for the order.
    pub(super) fn switch_snapshots(&mut self, meta: &mut Meta, change: Switch) -> Result<()> {
        let Switch {
            gained,
            lost,
            active,
            snapshots,
            old_table_size,
        } = change;
        self.flush_meta(meta)?;
        let file = Arc::clone(&self.file);
        let file = file.as_ref();
        let name = self.name().to_string();
        let cb = self.cluster_bits;
        let cs = self.cs();
        let order = self.header.refcount_order;

        let per_block = meta.refcounts.per_block();
        let old_blocks: Vec<u64> = meta.refcounts.table().to_vec();
        let mut rc = self.file_refcounts(&old_blocks, per_block)?;
        let old = rc.clone();
        let mut block = vec![0u8; cs as usize];

        // References that move.
        let max = meta.refcounts.max_refcount();
        let add = |rc: &mut Imrt, cluster: u64, delta: i64| -> Result<()> {
            if cluster >= rc.len() {
                return Err(Error::corrupt(
                    &name,
                    cluster << cb,
                    "metadata points past the end of the file",
                ));
            }
            match rc.get(cluster).checked_add_signed(delta) {
                Some(v) if v <= max => {
                    rc.set(cluster, v);
                    Ok(())
                }
                // As qemu-img words a snapshot the refcount width cannot take.
                Some(_) => Err(Error::InvalidArgument("Invalid argument".into())),
                None => Err(Error::corrupt(
                    &name,
                    cluster << cb,
                    "refcount underflow: the metadata references a free cluster",
                )),
            }
        };
        let mut count_tree = |rc: &mut Imrt, tree: &Tree, delta: i64| -> Result<()> {
            let l1_clusters = (tree.l1.len() as u64 * 8).div_ceil(cs);
            if tree.offset != 0 {
                for c in 0..l1_clusters {
                    add(rc, (tree.offset >> cb) + c, delta)?;
                }
            }
            for (i, &e) in tree.l1.iter().enumerate() {
                let l2 = e & OFFSET_MASK;
                if l2 == 0 {
                    continue;
                }
                if !l2.is_multiple_of(cs) {
                    return Err(Error::corrupt(
                        &name,
                        tree.offset + i as u64 * 8,
                        format!("L1 entry {i} points at an unaligned L2 table"),
                    ));
                }
                add(rc, l2 >> cb, delta)?;
                file.read_at(&mut block, l2)?;
                for k in 0..(cs / 8) as usize {
                    let entry = L2Entry::decode(table_entry(&block, k), cb);
                    if let Some((first, n)) = entry.host_clusters(cb) {
                        for c in first..first + n {
                            add(rc, c, delta)?;
                        }
                    }
                }
            }
            Ok(())
        };
        if let Some(tree) = &lost {
            count_tree(&mut rc, tree, -1)?;
        }
        if let Some(tree) = &gained {
            count_tree(&mut rc, tree, 1)?;
        }
        // The active L1 table (unless `lost` counted it already), the snapshot table and the
        // refcount structure are replaced.
        let l1_clusters = (meta.l1.len() as u64 * 8).div_ceil(cs);
        let old_l1 = if active.is_none() { meta.l1_offset } else { 0 };
        let mut replaced: Vec<(u64, u64)> = vec![
            (old_l1, l1_clusters),
            (self.header.snapshots_offset, old_table_size.div_ceil(cs)),
            // The table as it is now: it may have grown since the header was read.
            (
                meta.refcounts.table_offset(),
                (old_blocks.len() as u64 * 8).div_ceil(cs),
            ),
        ];
        replaced.extend(old_blocks.iter().filter(|&&b| b != 0).map(|&b| (b, 1)));
        for (offset, n) in replaced {
            if offset != 0 {
                for c in 0..n {
                    add(&mut rc, (offset >> cb) + c, -1)?;
                }
            }
        }

        // The active tables: an L2 table keeps its place unless its entries' flags change.
        let mut free = FreeClusters { old: &old, next: 0 };
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut new_l1 = active.unwrap_or_else(|| meta.l1.clone());
        for entry in new_l1.iter_mut() {
            let l2 = *entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let mut table = vec![0u8; cs as usize];
            file.read_at(&mut table, l2)?;
            let mut changed = false;
            for k in 0..(cs / 8) as usize {
                let value = table_entry(&table, k);
                let host = match L2Entry::decode(value, cb) {
                    L2Entry::Normal { offset, .. } | L2Entry::ZeroAlloc { offset, .. } => offset,
                    _ => continue,
                };
                let own = rc.get(host >> cb) == 1;
                let want = if own { value | COPIED } else { value & !COPIED };
                if want != value {
                    table[k * 8..k * 8 + 8].copy_from_slice(&want.to_be_bytes());
                    changed = true;
                }
            }
            *entry = if changed {
                let copy = free.take(&mut rc, 1, &name)?;
                add(&mut rc, l2 >> cb, -1)?;
                writes.push((copy << cb, table));
                (copy << cb) | COPIED
            } else if rc.get(l2 >> cb) == 1 {
                l2 | COPIED
            } else {
                l2
            };
        }
        let l1_offset = if new_l1.is_empty() {
            0
        } else {
            let first = free.take(&mut rc, l1_clusters, &name)?;
            let raw: Vec<u8> = new_l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            writes.push((first << cb, raw));
            first << cb
        };
        let mut table = Vec::new();
        for sn in snapshots {
            push_entry(&mut table, &sn.entry());
        }
        let table_offset = if table.is_empty() {
            0
        } else {
            let first = free.take(&mut rc, (table.len() as u64).div_ceil(cs), &name)?;
            writes.push((first << cb, table.clone()));
            first << cb
        };

        let (blocks, (reftable_first, reftable_clusters)) =
            place_refcount_structure(&mut rc, &mut free, per_block, &name)?;
        // The image's refcount blocks each cover per_block clusters; rc's size is a multiple
        // of whole blocks' worth of bytes only at cluster granularity, so pad the last one.
        rc.resize(blocks.len() as u64 * per_block)
            .map_err(|_| out_of_memory(&name))?;
        for (r, &c) in blocks.iter().enumerate() {
            if c != 0 {
                writes.push((c << cb, rc.block(r as u64).to_vec()));
            }
        }
        let mut raw_table = vec![0u8; (reftable_clusters * cs) as usize];
        for (r, &c) in blocks.iter().enumerate() {
            raw_table[r * 8..r * 8 + 8].copy_from_slice(&(c << cb).to_be_bytes());
        }
        writes.push((reftable_first << cb, raw_table));

        // Everything new is durable before the header points at it.
        for (offset, data) in &writes {
            file.write_at(data, *offset)?;
        }
        file.flush()?;
        let mut header = Vec::with_capacity(36);
        header.extend_from_slice(&(new_l1.len() as u32).to_be_bytes());
        header.extend_from_slice(&l1_offset.to_be_bytes());
        header.extend_from_slice(&(reftable_first << cb).to_be_bytes());
        header.extend_from_slice(&(reftable_clusters as u32).to_be_bytes());
        header.extend_from_slice(&(snapshots.len() as u32).to_be_bytes());
        header.extend_from_slice(&table_offset.to_be_bytes());
        file.write_at(&header, offsets::L1_SIZE)?;
        file.flush()?;

        // The image now is the new state; the caches start from it.
        self.header.l1_table_offset = l1_offset;
        self.header.refcount_table_offset = reftable_first << cb;
        self.header.refcount_table_clusters = reftable_clusters as u32;
        self.header.nb_snapshots = snapshots.len() as u32;
        self.header.snapshots_offset = table_offset;
        meta.l1 = new_l1;
        meta.l1_offset = l1_offset;
        meta.l1_dirty.clear();
        meta.l2.clear();
        meta.compressed_cursor = 0;
        let capacity = meta.refcounts.cache_stats().capacity;
        let cache = MetaCache::new(capacity, cs as usize)
            .ok_or_else(|| Error::InvalidArgument("Could not allocate metadata caches".into()))?;
        let mut refcounts = Refcounts::load(
            file,
            cb,
            order,
            reftable_first << cb,
            reftable_clusters as u32,
            cache,
        )?;
        refcounts.set_active_l1(l1_offset, meta.l1.len() as u64 * 8);
        meta.refcounts = refcounts;
        if self.discard_unmap {
            // Old metadata nothing uses any more leaves the file, as qemu discards what it
            // frees.
            let freed: Vec<u64> = (0..old.len())
                .filter(|&c| old.get(c) != 0 && c < rc.len() && rc.get(c) == 0)
                .collect();
            self.punch_holes(&freed)?;
        }
        Ok(())
    }
}
