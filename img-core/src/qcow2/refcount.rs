//! Reference counts: the refcount table, refcount blocks of any width, and cluster allocation.
//!
//! Increments happen at once (in the cache); decrements are queued until the driver's next
//! flush has made durable the L2 and L1 entries that dropped the references. Until then a freed
//! cluster cannot be handed out again, so a crash can never leave an old L2 entry pointing at
//! a cluster that was meanwhile reused for other data: the worst case is a leak.

use super::cache::{CacheStats, MetaCache};
use super::header::{offsets, MAX_HOST_OFFSET};
use crate::{Error, Result};
use blockdev::Storage;
use std::collections::BTreeSet;

/// Low bits of a refcount table entry that are reserved.
const REFTABLE_OFFSET_MASK: u64 = !0x1ff;

/// The refcount structure of an open image.
pub struct Refcounts {
    file_name: String,
    cluster_bits: u32,
    order: u32,
    table_offset: u64,
    table: Vec<u64>,
    table_dirty: BTreeSet<usize>,
    cache: MetaCache,
    free_hint: u64,
    pending_frees: Vec<u64>,
    /// Clusters of the active L1 table (first, count), which the allocator must never hand out.
    active_l1: (u64, u64),
}

/// Reads entry `index` of a refcount block of width `1 << order` bits.
pub fn get_entry(block: &[u8], order: u32, index: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = index * bits;
            ((block[bit / 8] >> (bit % 8)) & ((1u8 << bits) - 1)) as u64
        }
        3 => block[index] as u64,
        4 => u16::from_be_bytes([block[index * 2], block[index * 2 + 1]]) as u64,
        5 => u32::from_be_bytes(block[index * 4..index * 4 + 4].try_into().expect("4")) as u64,
        _ => u64::from_be_bytes(block[index * 8..index * 8 + 8].try_into().expect("8")),
    }
}

/// Writes entry `index` of a refcount block; `value` must fit the width.
pub fn set_entry(block: &mut [u8], order: u32, index: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = index * bits;
            let mask = ((1u8 << bits) - 1) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        3 => block[index] = value as u8,
        4 => block[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

/// Clusters of refcount blocks and refcount table needed so that `clusters` data clusters and
/// the refcount structure itself are all counted (the fixed point qemu computes). With
/// `generous`, the table leaves room to grow. Returns (refcount blocks, table clusters).
pub fn refcount_metadata_clusters(
    clusters: u64,
    cluster_bits: u32,
    order: u32,
    mut generous: bool,
) -> (u64, u64) {
    let per_table_cluster = 1u64 << (cluster_bits - 3);
    let per_block = 1u64 << (cluster_bits + 3 - order);
    let mut clusters = clusters;
    let (mut blocks, mut table, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            if generous {
                clusters += table.div_ceil(2);
                n = 0;
                generous = false;
                continue;
            }
            return (blocks, table);
        }
    }
}

fn read_table(
    file: &dyn Storage,
    cluster_bits: u32,
    table_offset: u64,
    table_clusters: u32,
) -> Result<Vec<u64>> {
    let entries = ((table_clusters as usize) << cluster_bits) / 8;
    let mut table = super::read_be64_table(file, table_offset, entries)?;
    for e in &mut table {
        *e &= REFTABLE_OFFSET_MASK;
    }
    Ok(table)
}

impl Refcounts {
    /// Loads the refcount table described by the header; refcount blocks are cached in
    /// `cache`, whose entries must be one cluster.
    pub fn load(
        file: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
        cache: MetaCache,
    ) -> Result<Self> {
        debug_assert_eq!(cache.entry_size(), 1 << cluster_bits);
        Ok(Refcounts {
            file_name: file.name().to_string(),
            cluster_bits,
            order,
            table_offset,
            table: read_table(file, cluster_bits, table_offset, table_clusters)?,
            table_dirty: BTreeSet::new(),
            cache,
            free_hint: 0,
            pending_frees: Vec::new(),
            active_l1: (0, 0),
        })
    }

    /// The block cache's counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Frees cached blocks unused since the previous call (see [`MetaCache::clean_unused`]).
    pub fn clean_unused(&mut self) -> usize {
        self.cache.clean_unused()
    }

    /// Refcount width in bits.
    pub fn bits(&self) -> u32 {
        1 << self.order
    }

    /// The largest refcount the width can hold.
    pub fn max_refcount(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << self.bits()) - 1
        }
    }

    /// Clusters described by one refcount block.
    pub fn per_block(&self) -> u64 {
        1u64 << (self.cluster_bits + 3 - self.order)
    }

    /// Tells the allocator where the active L1 table lives (`bytes` long at `offset`), so that
    /// corrupt refcounts calling it free are reported instead of handing it out.
    pub fn set_active_l1(&mut self, offset: u64, bytes: u64) {
        self.active_l1 = (
            offset >> self.cluster_bits,
            bytes.div_ceil(self.cluster_size()),
        );
    }

    /// Host offset of the refcount table.
    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    /// The refcount table entries (block offsets, 0 where no block exists).
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Whether the cache holds more dirty blocks than it should.
    pub fn over_capacity(&self) -> bool {
        self.cache.over_capacity()
    }

    /// Whether decrements are waiting for the next flush.
    pub fn has_pending_frees(&self) -> bool {
        !self.pending_frees.is_empty()
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn block_offset(&self, block_index: usize) -> Result<Option<u64>> {
        let Some(&off) = self.table.get(block_index) else {
            return Ok(None);
        };
        if off == 0 {
            return Ok(None);
        }
        if off % self.cluster_size() != 0 || off > MAX_HOST_OFFSET {
            return Err(Error::corrupt(
                &self.file_name,
                off,
                format!("refcount block {block_index} is not cluster aligned"),
            ));
        }
        Ok(Some(off))
    }

    /// A copy of refcount block `index` as it is now (changes still in the cache included), or
    /// `None` where the table has no block: for walks over every refcount.
    pub fn block_copy(&mut self, file: &dyn Storage, index: usize) -> Result<Option<Vec<u8>>> {
        let Some(off) = self.block_offset(index)? else {
            return Ok(None);
        };
        Ok(Some(self.cache.get(file, off)?.to_vec()))
    }

    /// The refcount of cluster `cluster` (0 where no block describes it).
    pub fn get(&mut self, file: &dyn Storage, cluster: u64) -> Result<u64> {
        let per_block = self.per_block();
        let Some(block) = self.block_offset((cluster / per_block) as usize)? else {
            return Ok(0);
        };
        let order = self.order;
        let data = self.cache.get(file, block)?;
        Ok(get_entry(data, order, (cluster % per_block) as usize))
    }

    /// Adds `delta` (which may be negative) to the refcount of `cluster`, creating refcount
    /// blocks (and growing the table) as needed.
    fn update(&mut self, file: &dyn Storage, cluster: u64, delta: i64) -> Result<u64> {
        let per_block = self.per_block();
        let index = (cluster / per_block) as usize;
        let block = match self.block_offset(index)? {
            Some(b) => b,
            None if delta < 0 => {
                return Err(Error::corrupt(
                    &self.file_name,
                    cluster << self.cluster_bits,
                    "freeing a cluster whose refcount block does not exist",
                ))
            }
            None => self.create_block(file, index, cluster)?,
        };
        let (order, max) = (self.order, self.max_refcount());
        let data = self.cache.get_mut(file, block)?;
        let i = (cluster % per_block) as usize;
        let old = get_entry(data, order, i);
        let new = old
            .checked_add_signed(delta)
            .filter(|&v| v <= max)
            .ok_or_else(|| {
                Error::corrupt(
                    &self.file_name,
                    cluster << self.cluster_bits,
                    format!(
                        "refcount of cluster {cluster} would leave its range ({old} {delta:+})"
                    ),
                )
            })?;
        set_entry(data, order, i, new);
        if new == 0 && cluster < self.free_hint {
            self.free_hint = cluster;
        }
        Ok(new)
    }

    /// Sets the refcount of `cluster` to `value` (repair).
    pub fn set(&mut self, file: &dyn Storage, cluster: u64, value: u64) -> Result<()> {
        let old = self.get(file, cluster)?;
        if old != value {
            self.update(file, cluster, value as i64 - old as i64)?;
        }
        Ok(())
    }

    /// Adds one reference to `cluster`.
    pub fn increment(&mut self, file: &dyn Storage, cluster: u64) -> Result<()> {
        self.update(file, cluster, 1).map(|_| ())
    }

    /// Queues the release of one reference to `cluster` until the next flush.
    pub fn free_later(&mut self, cluster: u64) {
        self.pending_frees.push(cluster);
    }

    /// Finds `n` contiguous clusters with refcount 0, starting the search at the hint. Each
    /// refcount block is looked up once and scanned in place.
    fn find_free(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let per_block = self.per_block();
        let order = self.order;
        let mut start = self.free_hint.max(1);
        let mut c = start;
        while c - start < n {
            let block_index = c / per_block;
            let block_end = (block_index + 1) * per_block;
            let Some(block) = self.block_offset(block_index as usize)? else {
                // No block describes this range yet, so every cluster in it is free. A block
                // created for it later lands past the run (the hint moves first), as in qemu.
                c = block_end.min(start + n);
                continue;
            };
            let data = self.cache.get(file, block)?;
            let base = block_index * per_block;
            let end = block_end.min(start + n);
            let mut i = (c - base) as usize;
            // Stop at the block's end or once the run is long enough; a used cluster restarts
            // the run after it (and so pushes the end further).
            let mut stop = (end - base) as usize;
            while i < stop {
                if get_entry(data, order, i) != 0 {
                    start = base + i as u64 + 1;
                    stop = (block_end.min(start + n) - base) as usize;
                }
                i += 1;
            }
            c = base + i as u64;
        }
        if (start + n) << self.cluster_bits > MAX_HOST_OFFSET {
            return Err(Error::corrupt(
                &self.file_name,
                start << self.cluster_bits,
                "image file would grow past the largest offset qcow2 can address",
            ));
        }
        // Refcounts that call the refcount table or the L1 table free are corrupt (for
        // instance a refcount table entry pointing at the table itself); handing those clusters
        // out would overwrite the tables.
        let table_first = self.table_offset >> self.cluster_bits;
        let table_len = (self.table.len() as u64 * 8).div_ceil(self.cluster_size());
        for (what, first, len) in [
            ("refcount table", table_first, table_len),
            ("L1 table", self.active_l1.0, self.active_l1.1),
        ] {
            if start < first + len && first < start + n {
                return Err(Error::corrupt(
                    &self.file_name,
                    first << self.cluster_bits,
                    format!(
                        "the refcounts say clusters {first}..{} of the {what} are free",
                        first + len
                    ),
                ));
            }
        }
        Ok(start)
    }

    /// Allocates `n` contiguous clusters (each with refcount 1) and returns the first index.
    pub fn alloc(&mut self, file: &dyn Storage, n: u64) -> Result<u64> {
        let start = self.find_free(file, n)?;
        self.free_hint = start + n;
        let per_block = self.per_block();
        let mut c = start;
        while c < start + n {
            // The first cluster of each block goes through `update`, which creates the block
            // if needed; the rest of the block's share is set in place.
            self.update(file, c, 1)?;
            let block_index = c / per_block;
            let block = self
                .block_offset(block_index as usize)?
                .expect("update created the block");
            let run_end = ((block_index + 1) * per_block).min(start + n);
            if run_end > c + 1 {
                let order = self.order;
                let base = block_index * per_block;
                let data = self.cache.get_mut(file, block)?;
                for x in c + 1..run_end {
                    // find_free saw these at zero, and nothing allocated since.
                    set_entry(data, order, (x - base) as usize, 1);
                }
            }
            c = run_end;
        }
        Ok(start)
    }

    /// Allocates exactly cluster `cluster` if it is free; returns whether it was.
    pub fn try_alloc_at(&mut self, file: &dyn Storage, cluster: u64) -> Result<bool> {
        if (cluster + 1) << self.cluster_bits > MAX_HOST_OFFSET || self.get(file, cluster)? != 0 {
            return Ok(false);
        }
        self.update(file, cluster, 1)?;
        self.free_hint = self.free_hint.max(cluster + 1);
        Ok(true)
    }

    /// Creates the refcount block for range `index`, placing it in the first free cluster
    /// (describing itself when that cluster lies in its own range). `counting` is the cluster
    /// whose refcount is being updated.
    fn create_block(&mut self, file: &dyn Storage, index: usize, counting: u64) -> Result<u64> {
        if index >= self.table.len() {
            self.grow_table(file, index, counting)?;
            if let Some(b) = self.block_offset(index)? {
                return Ok(b);
            }
        }
        let per_block = self.per_block();
        let c = self.find_free(file, 1)?;
        self.free_hint = self.free_hint.max(c + 1);
        let off = c << self.cluster_bits;
        let self_describing = c / per_block == index as u64;
        let order = self.order;
        let data = self.cache.insert_new(off);
        data.fill(0);
        if self_describing {
            set_entry(data, order, (c % per_block) as usize, 1);
        }
        self.table[index] = off;
        self.table_dirty.insert(index);
        if !self_describing {
            self.update(file, c, 1)?;
        }
        Ok(off)
    }

    /// Replaces the refcount table by a larger one. The new table and the refcount blocks that
    /// describe it go into a fresh area past everything counted so far, so they describe
    /// themselves and the switch is a single header write.
    fn grow_table(&mut self, file: &dyn Storage, needed: usize, counting: u64) -> Result<()> {
        // New blocks in the cache must reach the disk before a table that points at them.
        self.flush(file)?;
        let per_block = self.per_block();
        let cs = self.cluster_size();
        let per_table_cluster = cs / 8;
        let start = (counting + 1).max(self.free_hint).div_ceil(per_block) * per_block;
        let area_index = (start / per_block) as usize;
        let (total_blocks, _) =
            refcount_metadata_clusters(start, self.cluster_bits, self.order, true);
        let mut entries = (total_blocks + total_blocks.div_ceil(2))
            .max(needed as u64 + 1)
            .max(area_index as u64 + 1);
        let mut new_blocks = 1u64;
        let (table_clusters, end) = loop {
            entries = entries.max(area_index as u64 + new_blocks);
            let table_clusters = entries.div_ceil(per_table_cluster);
            let end = start + new_blocks + table_clusters;
            let need = end.div_ceil(per_block) - area_index as u64;
            if need <= new_blocks {
                break (table_clusters, end);
            }
            new_blocks = need;
        };
        let table_bytes = table_clusters * cs;
        if table_bytes > super::header::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported(
                &self.file_name,
                "an image this large for its cluster size (a refcount table over 8 MiB) is not supported",
            ));
        }
        let mut table = self.table.clone();
        table.resize((table_bytes / 8) as usize, 0);
        for i in 0..new_blocks {
            let index = area_index + i as usize;
            let block_off = (start + i) << self.cluster_bits;
            let first = index as u64 * per_block;
            let mut data = vec![0u8; cs as usize];
            for c in start.max(first)..end.min(first + per_block) {
                set_entry(&mut data, self.order, (c - first) as usize, 1);
            }
            file.write_at(&data, block_off)?;
            table[index] = block_off;
        }
        let table_off = (start + new_blocks) << self.cluster_bits;
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_at(&raw, table_off)?;
        file.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        file.write_at(&hdr, offsets::REFCOUNT_TABLE)?;
        file.flush()?;

        let old_off = self.table_offset;
        let old_clusters = (self.table.len() as u64 * 8).div_ceil(cs);
        self.table = table;
        self.table_offset = table_off;
        for c in 0..old_clusters {
            self.free_later((old_off >> self.cluster_bits) + c);
        }
        Ok(())
    }

    /// Writes dirty refcount blocks, then (after a flush) the table entries that point at new
    /// blocks. Returns whether anything was written.
    pub fn flush(&mut self, file: &dyn Storage) -> Result<bool> {
        let wrote = self.cache.write_dirty(file)? > 0;
        if self.table_dirty.is_empty() {
            return Ok(wrote);
        }
        file.flush()?;
        for &i in &self.table_dirty {
            file.write_at(
                &self.table[i].to_be_bytes(),
                self.table_offset + i as u64 * 8,
            )?;
        }
        self.table_dirty.clear();
        Ok(true)
    }

    /// Applies the queued decrements; called by the driver once the entries that dropped the
    /// references are durable. Returns the clusters whose refcount reached zero.
    pub fn apply_pending_frees(&mut self, file: &dyn Storage) -> Result<Vec<u64>> {
        let frees = std::mem::take(&mut self.pending_frees);
        let mut zeroed = Vec::new();
        for c in frees {
            if self.update(file, c, -1)? == 0 {
                zeroed.push(c);
            }
        }
        Ok(zeroed)
    }

    /// Drops all cached blocks and reloads the table (after a repair rewrote them).
    pub fn reload(
        &mut self,
        file: &dyn Storage,
        table_offset: u64,
        table_clusters: u32,
    ) -> Result<()> {
        self.table = read_table(file, self.cluster_bits, table_offset, table_clusters)?;
        self.table_offset = table_offset;
        self.table_dirty.clear();
        self.cache.clear();
        self.free_hint = 0;
        self.pending_frees.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_of_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_entry(&mut block, order, i, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, order, i),
                    (i as u64 * 7) & max,
                    "order {order}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_entries_are_lsb_first() {
        let mut block = vec![0u8; 1];
        set_entry(&mut block, 0, 0, 1);
        assert_eq!(block[0], 1);
        set_entry(&mut block, 2, 1, 0xf);
        assert_eq!(block[0], 0xf1);
    }

    #[test]
    fn metadata_fixed_point() {
        // 64 KiB clusters, 16-bit refcounts: one block covers 32768 clusters.
        assert_eq!(refcount_metadata_clusters(3, 16, 4, false), (1, 1));
        let (b, t) = refcount_metadata_clusters(40000, 16, 4, false);
        assert_eq!((b, t), (2, 1));
    }
}
