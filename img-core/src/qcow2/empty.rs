//! Emptying an image: every cluster deallocated, so that it reads its backing file again
//! (what `commit` leaves in the image it committed).
//!
//! The L1 entries are cleared and the L2 tables and data clusters they led to are freed in
//! the usual order: the cleared L1 table is durable before any of those clusters is free, so a
//! crash leaks at worst. The file is then cut after its last used cluster.

use super::l2::{table_entry, L2Entry};
use super::Qcow2;
use crate::Result;

impl Qcow2 {
    /// Deallocates every guest cluster and every L2 table, then truncates the file after the
    /// last cluster still in use.
    pub(super) fn deallocate_all(&self) -> Result<()> {
        self.check_writable()?;
        let file = self.file.as_ref();
        let cs = self.cs();
        let slice_bytes = 1usize << self.slice_bits;
        let mut meta = self.lock();
        self.mark_dirty(&mut meta)?;
        for l1i in 0..meta.l1.len() {
            let l2_off = self.l2_offset(&meta, l1i)?;
            if l2_off == 0 {
                continue;
            }
            // Release what the table maps, a slice at a time (slices may not all be cached).
            for slice in (0..cs).step_by(slice_bytes) {
                let raw = meta.l2.get(file, l2_off + slice)?.to_vec();
                for i in 0..slice_bytes / 8 {
                    let e = L2Entry::decode(table_entry(&raw, i), self.cluster_bits);
                    self.release(&mut meta, e);
                }
            }
            // The table's cached copy must never be written back into a freed cluster.
            meta.l2
                .forget_clusters(&[l2_off >> self.cluster_bits], self.cluster_bits);
            meta.l1[l1i] = 0;
            meta.l1_dirty.insert(l1i);
            meta.refcounts.free_later(l2_off >> self.cluster_bits);
        }
        self.flush_meta(&mut meta)?;
        // Cut the file after its last used cluster.
        let clusters = file.size()?.div_ceil(cs);
        let mut last_used = 0;
        for c in (0..clusters).rev() {
            if meta.refcounts.get(file, c)? != 0 {
                last_used = c + 1;
                break;
            }
        }
        if last_used < clusters {
            file.truncate(last_used * cs)?;
            file.flush()?;
        }
        Ok(())
    }
}
