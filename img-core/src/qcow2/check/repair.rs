//! Comparing the recount with the stored refcounts, and the repairs: single refcounts, a new
//! refcount structure, and the OFLAG_COPIED flags.

use super::imrt::Imrt;
use super::walk::{kind, Kind};
use super::{mask, ol, Checker, Fail, Fix, Res};
use crate::qcow2::header::offsets;
use crate::qcow2::l2::COPIED;

type R<T> = std::result::Result<T, Fail>;

/// Which counter a repair in [`Checker::compare`] counts towards.
#[derive(Clone, Copy)]
enum Fixed {
    Leak,
    Corruption,
}

impl Checker<'_> {
    /// The whole refcount check: recount, compare, repair, OFLAG_COPIED.
    pub(super) fn check_refcounts(&mut self, res: &mut Res, fix: Fix) -> R<()> {
        let clusters = self.file_len.div_ceil(self.cs);
        if clusters > i32::MAX as u64 {
            res.check_errors += 1;
            return Err(Fail::EFBIG);
        }
        res.total_clusters = (self.virtual_size.div_ceil(512) * 512).div_ceil(self.cs);

        let mut imrt = Imrt::new(self.order, self.cs);
        let mut rebuild = false;
        self.calculate_refcounts(res, fix, &mut rebuild, &mut imrt)?;

        // Without a rebuild, a repair compares again from this state.
        let pre_compare = *res;
        let mut highest = 0u64;
        self.compare(res, Fix::NONE, &mut rebuild, &mut highest, &imrt);

        if rebuild && fix.errors {
            let old = *res;
            let mut fresh_leaks = 0;
            self.msg("Rebuilding refcount structure".into());
            self.rebuild(res, &mut imrt)?;
            res.corruptions = 0;
            res.leaks = 0;
            // The new structure is recounted from scratch; the old one is now leaked.
            rebuild = false;
            imrt.clear();
            self.calculate_refcounts(res, Fix::NONE, &mut rebuild, &mut imrt)?;
            if fix.leaks {
                let saved = *res;
                *res = Res::default();
                self.compare(res, Fix::LEAKS, &mut rebuild, &mut highest, &imrt);
                if rebuild {
                    self.msg("ERROR rebuilt refcount structure is still broken".into());
                }
                // Leaks left now were made by the rebuild itself.
                fresh_leaks = res.leaks;
                *res = saved;
            }
            if res.corruptions < old.corruptions {
                res.corruptions_fixed += old.corruptions - res.corruptions;
            }
            if res.leaks < old.leaks {
                res.leaks_fixed += old.leaks - res.leaks;
            }
            res.leaks += fresh_leaks;
        } else if fix.any() {
            if rebuild {
                self.msg("ERROR need to rebuild refcount structures".into());
                res.check_errors += 1;
                return Err(Fail::EIO);
            }
            if res.leaks != 0 || res.corruptions != 0 {
                *res = pre_compare;
                self.compare(res, fix, &mut rebuild, &mut highest, &imrt);
            }
        }

        self.check_oflag_copied(res, fix)?;
        res.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    /// Compares every cluster's stored refcount with the recount, reporting (and as `fix`
    /// allows, repairing) differences. A cluster that is used but has refcount 0 cannot be
    /// repaired in place (its refcount block may not exist): that needs a rebuild.
    fn compare(
        &mut self,
        res: &mut Res,
        fix: Fix,
        rebuild: &mut bool,
        highest: &mut u64,
        imrt: &Imrt,
    ) {
        *highest = 0;
        for i in 0..imrt.len() {
            let stored = match self.get_refcount(i) {
                Ok(v) => v,
                Err(e) => {
                    self.msg(format!("Can't get refcount for cluster {i}: {}", e.text()));
                    res.check_errors += 1;
                    continue;
                }
            };
            let counted = imrt.get(i);
            if stored > 0 || counted > 0 {
                *highest = i;
            }
            if stored == counted {
                continue;
            }
            let mut fixing = None;
            if stored == 0 {
                *rebuild = true;
            } else if stored > counted && fix.leaks {
                fixing = Some(Fixed::Leak);
            } else if stored < counted && fix.errors {
                fixing = Some(Fixed::Corruption);
            }
            let word = if fixing.is_some() {
                "Repairing"
            } else if stored < counted {
                "ERROR"
            } else {
                "Leaked"
            };
            self.msg(format!(
                "{word} cluster {i} refcount={stored} reference={counted}"
            ));
            if let Some(which) = fixing {
                if self.set_refcount(i, counted).is_ok() {
                    if counted == 0 {
                        self.discard_cluster(i);
                    }
                    match which {
                        Fixed::Leak => res.leaks_fixed += 1,
                        Fixed::Corruption => res.corruptions_fixed += 1,
                    }
                    continue;
                }
            }
            if stored < counted {
                res.corruptions += 1;
            } else {
                res.leaks += 1;
            }
        }
    }

    /// Gives a cluster that nothing uses any more back to the file system, as qemu does for
    /// freed clusters (it then reads as zeros).
    fn discard_cluster(&mut self, cluster: u64) {
        let offset = cluster << self.cluster_bits;
        if offset < self.file_len {
            let len = self.cs.min(self.file_len - offset);
            // Only an optimisation: a failed discard leaves the cluster's old bytes behind.
            let _ = self.file.discard(offset, len);
        }
    }

    /// Finds `count` contiguous clusters that nothing references (from `*first_free` on,
    /// growing the image past its end if needed), marks them used and returns the offset of
    /// the first. `*first_free` becomes the first free cluster seen.
    fn alloc_clusters_imrt(&mut self, count: u64, imrt: &mut Imrt, first_free: &mut u64) -> R<u64> {
        let mut cluster = *first_free;
        let mut first_gap = true;
        let mut contiguous = 0u64;
        while cluster < imrt.len() && contiguous < count {
            if imrt.get(cluster) == 0 {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            imrt.resize(cluster + count - contiguous)?;
        }
        cluster -= contiguous;
        for i in 0..count {
            imrt.set(cluster + i, 1);
        }
        Ok(cluster << self.cluster_bits)
    }

    /// Writes a refcount block for every block-sized range of clusters in
    /// `first..end` that holds a used cluster, allocating blocks (and growing `table`, the new
    /// refcount table, a cluster at a time) as needed. Returns whether `table` grew.
    fn write_refblocks(
        &mut self,
        imrt: &mut Imrt,
        first: u64,
        end: u64,
        table: &mut Vec<u64>,
    ) -> R<bool> {
        let per_block = 1u64 << self.rb_bits;
        let entries_per_cluster = (self.cs / 8) as usize;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut end = end;
        let mut cluster = first;
        while cluster < end {
            if cluster >= imrt.len() || imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> self.rb_bits;
            let block_start = index << self.rb_bits;
            let block_offset = match table.get(index as usize) {
                Some(&off) if off != 0 => off,
                _ => {
                    // Never put a block into a range whose block is already written.
                    first_free = first_free.max(block_start);
                    let off = self
                        .alloc_clusters_imrt(1, imrt, &mut first_free)
                        .inspect_err(|e| {
                            self.msg(format!("img: ERROR allocating refblock: {}", e.text()))
                        })?;
                    let block_cluster = off >> self.cluster_bits;
                    if block_cluster >= end {
                        // The block that counts this new block must be written too.
                        end = block_cluster + 1;
                    }
                    if table.len() <= index as usize {
                        let n = (index as usize + 1).div_ceil(entries_per_cluster)
                            * entries_per_cluster;
                        table.resize(n, 0);
                        grown = true;
                    }
                    table[index as usize] = off;
                    off
                }
            };
            let written = self
                .pre_write_overlap_check(0, block_offset, self.cs, true)
                .and_then(|_| {
                    let data = imrt.block(index).to_vec();
                    self.write(&data, block_offset)
                });
            if let Err(e) = written {
                self.msg(format!("img: ERROR writing refblock: {}", e.text()));
                return Err(e);
            }
            cluster = block_start + per_block;
        }
        Ok(grown)
    }

    /// Replaces the refcount structure by one written from the recount: refcount blocks and a
    /// table in clusters nothing references, then, after a flush, the header switched to the
    /// new table in a single write. The old structure is left behind as leaked clusters.
    fn rebuild(&mut self, res: &mut Res, imrt: &mut Imrt) -> R<()> {
        self.flush_refblocks()?;
        self.rb_cache.clear();
        let mut table = Vec::new();
        let total = imrt.len();
        let fail = |res: &mut Res, e: Fail| {
            res.check_errors += 1;
            e
        };
        self.write_refblocks(imrt, 0, total, &mut table)
            .map_err(|e| fail(res, e))?;
        // Placing the table changes the counts of the clusters it takes, whose block then has
        // to be written again, which may need a larger table: repeat until the table fits.
        let (table_offset, table_clusters) = loop {
            let clusters = (table.len() as u64 * 8).div_ceil(self.cs);
            let mut first_free = 0;
            let offset = match self.alloc_clusters_imrt(clusters, imrt, &mut first_free) {
                Ok(o) => o,
                Err(e) => {
                    self.msg(format!("img: ERROR allocating reftable: {}", e.text()));
                    return Err(fail(res, e));
                }
            };
            let start = offset >> self.cluster_bits;
            let grown = self
                .write_refblocks(imrt, start, start + clusters, &mut table)
                .map_err(|e| fail(res, e))?;
            if !grown {
                break (offset, clusters);
            }
        };

        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        let written = self
            .pre_write_overlap_check(0, table_offset, raw.len() as u64, true)
            .and_then(|_| self.write(&raw, table_offset))
            .and_then(|_| self.file.flush().map_err(Fail::from));
        if let Err(e) = written {
            self.msg(format!("img: ERROR writing reftable: {}", e.text()));
            return Err(e);
        }
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&(table_clusters as u32).to_be_bytes());
        let switched = self
            .write(&hdr, offsets::REFCOUNT_TABLE)
            .and_then(|_| self.file.flush().map_err(Fail::from));
        if let Err(e) = switched {
            self.msg(format!("img: ERROR setting reftable: {}", e.text()));
            return Err(e);
        }
        self.reftable = table;
        self.reftable_offset = table_offset;
        Ok(())
    }

    /// Checks that OFLAG_COPIED is set exactly on the L1 and L2 entries whose cluster has
    /// refcount 1, repairing with `-r all` (or with `-r leaks` when the refcounts are known to
    /// be right by now).
    fn check_oflag_copied(&mut self, res: &mut Res, fix: Fix) -> R<()> {
        let repair = if fix.errors {
            true
        } else if fix.leaks {
            res.check_errors == 0 && res.corruptions == 0 && res.leaks == 0
        } else {
            false
        };
        let word = if repair { "Repairing" } else { "ERROR" };
        for i in 0..self.l1.len() {
            let l1e = self.l1[i];
            let l2_offset = l1e & mask::OFFSET;
            if l2_offset == 0 {
                continue;
            }
            let Ok(rc) = self.get_refcount(l2_offset >> self.cluster_bits) else {
                // Already reported by the comparison.
                continue;
            };
            if (rc == 1) != (l1e & COPIED != 0) {
                res.corruptions += 1;
                self.msg(format!(
                    "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                ));
                if repair {
                    let new = if rc == 1 { l1e | COPIED } else { l1e & !COPIED };
                    self.l1[i] = new;
                    let at = self.l1_offset + i as u64 * 8;
                    let written = self
                        .pre_write_overlap_check(ol::ACTIVE_L1, at, 8, false)
                        .and_then(|_| self.write(&new.to_be_bytes(), at))
                        .and_then(|_| self.file.flush().map_err(Fail::from));
                    if let Err(e) = written {
                        res.check_errors += 1;
                        return Err(e);
                    }
                    res.corruptions -= 1;
                    res.corruptions_fixed += 1;
                }
            }

            let mut table = vec![0u8; self.cs as usize];
            if let Err(e) = self.read(&mut table, l2_offset) {
                self.msg(format!("ERROR: Could not read L2 table: {}", e.text()));
                res.check_errors += 1;
                return Err(e);
            }
            let mut dirty = 0i64;
            for j in 0..(self.cs / 8) as usize {
                let e = u64::from_be_bytes(table[j * 8..j * 8 + 8].try_into().expect("8 bytes"));
                if !matches!(kind(e), Kind::Normal | Kind::ZeroAlloc) {
                    continue;
                }
                let Ok(rc) = self.get_refcount((e & mask::OFFSET) >> self.cluster_bits) else {
                    continue;
                };
                if (rc == 1) != (e & COPIED != 0) {
                    res.corruptions += 1;
                    self.msg(format!(
                        "{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                    ));
                    if repair {
                        let new = if rc == 1 { e | COPIED } else { e & !COPIED };
                        table[j * 8..j * 8 + 8].copy_from_slice(&new.to_be_bytes());
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if let Err(e) =
                    self.pre_write_overlap_check(ol::ACTIVE_L2, l2_offset, self.cs, false)
                {
                    self.msg(format!(
                        "ERROR: Could not write L2 table; metadata overlap check failed: {}",
                        e.text()
                    ));
                    res.check_errors += 1;
                    return Err(e);
                }
                if let Err(e) = self.write(&table, l2_offset) {
                    self.msg(format!("ERROR: Could not write L2 table: {}", e.text()));
                    res.check_errors += 1;
                    return Err(e);
                }
                res.corruptions -= dirty;
                res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }
}
