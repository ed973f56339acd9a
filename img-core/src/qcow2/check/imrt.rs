//! The in-memory refcount table: one entry per host cluster, of the image's own refcount
//! width, so that a slice of it is exactly a refcount block and can be written as one when the
//! refcount structure is rebuilt.

use super::Fail;
use crate::qcow2::refcount::{get_entry, set_entry};

/// Upper bound for the table's memory. The table grows only with the file (one entry per
/// cluster of the file), but a repair may be asked to grow the file to where a corrupted
/// refcount table entry points; past this bound such a repair fails instead.
pub(super) const MAX_BYTES: u64 = 2 << 30;

/// Reference counts recounted from the metadata.
#[derive(Clone, Debug)]
pub(in crate::qcow2) struct Imrt {
    order: u32,
    cluster_size: u64,
    data: Vec<u8>,
    entries: u64,
}

impl Imrt {
    /// An empty table for refcounts of `1 << order` bits and clusters of `cluster_size` bytes.
    pub(in crate::qcow2) fn new(order: u32, cluster_size: u64) -> Self {
        Imrt {
            order,
            cluster_size,
            data: Vec::new(),
            entries: 0,
        }
    }

    /// Bytes needed for `entries` entries, rounded up to whole clusters (so that every
    /// refcount block's slice is complete), or None if that exceeds [`MAX_BYTES`].
    fn byte_size(&self, entries: u64) -> Option<u64> {
        let bits = entries.checked_mul(1 << self.order)?;
        let bytes = bits.div_ceil(8).div_ceil(self.cluster_size) * self.cluster_size;
        (bytes <= MAX_BYTES).then_some(bytes)
    }

    /// The cluster size the table was made for.
    pub(in crate::qcow2) fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Number of clusters the table describes.
    pub(in crate::qcow2) fn len(&self) -> u64 {
        self.entries
    }

    /// Resizes the table to describe `entries` clusters; new entries are zero.
    pub(in crate::qcow2) fn resize(&mut self, entries: u64) -> Result<(), Fail> {
        let bytes = self.byte_size(entries).ok_or(Fail::ENOMEM)? as usize;
        if bytes > self.data.len() {
            self.data
                .try_reserve_exact(bytes - self.data.len())
                .map_err(|_| Fail::ENOMEM)?;
        }
        self.data.resize(bytes, 0);
        self.entries = entries;
        Ok(())
    }

    /// The count of cluster `k` (which must be below [`len`](Self::len)).
    pub(in crate::qcow2) fn get(&self, k: u64) -> u64 {
        get_entry(&self.data, self.order, k as usize)
    }

    /// Sets the count of cluster `k` (below [`len`](Self::len)); `v` must fit the width.
    pub(in crate::qcow2) fn set(&mut self, k: u64, v: u64) {
        set_entry(&mut self.data, self.order, k as usize, v);
    }

    /// Zeroes every entry, keeping the size.
    pub(in crate::qcow2) fn clear(&mut self) {
        self.data.fill(0);
    }

    /// The bytes of refcount block `index`: the entries of the clusters it describes.
    pub(in crate::qcow2) fn block(&self, index: u64) -> &[u8] {
        let start = (index * self.cluster_size) as usize;
        &self.data[start..start + self.cluster_size as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_to_clusters_and_keep_values() {
        let mut t = Imrt::new(4, 512);
        t.resize(3).unwrap();
        assert_eq!(t.data.len(), 512);
        t.set(2, 7);
        t.resize(300).unwrap();
        assert_eq!(t.data.len(), 1024);
        assert_eq!(t.get(2), 7);
        assert_eq!(t.len(), 300);
        assert_eq!(t.block(0).len(), 512);
        t.clear();
        assert_eq!(t.get(2), 0);
    }

    #[test]
    fn huge_sizes_fail_cleanly() {
        let mut t = Imrt::new(6, 512);
        assert!(t.resize(u64::MAX / 2).is_err());
        assert!(t.resize(MAX_BYTES).is_err());
    }

    #[test]
    fn one_bit_entries() {
        let mut t = Imrt::new(0, 512);
        t.resize(4096).unwrap();
        t.set(4095, 1);
        t.set(9, 1);
        assert_eq!(t.get(4095), 1);
        assert_eq!(t.get(9), 1);
        assert_eq!(t.get(8), 0);
        assert_eq!(t.block(0)[1], 0b10);
    }
}
