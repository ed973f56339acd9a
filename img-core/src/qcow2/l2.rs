//! L1 and L2 table entries.

/// Bits 9..55 of an L1 or standard L2 entry: the host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The entry's cluster has refcount 1 and may be written in place.
pub const COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeros (version 3).
pub const ZERO: u64 = 1;

/// A decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L2Entry {
    /// Nothing allocated: read from the backing file.
    Unallocated,
    /// Reads as zeros, no host cluster.
    ZeroPlain,
    /// Reads as zeros, with a preallocated host cluster.
    ZeroAlloc {
        /// Host offset of the preallocated cluster.
        offset: u64,
        /// Refcount is 1.
        copied: bool,
    },
    /// Uncompressed data.
    Normal {
        /// Host offset of the cluster.
        offset: u64,
        /// Refcount is 1.
        copied: bool,
    },
    /// Compressed data.
    Compressed {
        /// Host offset of the first compressed byte.
        offset: u64,
        /// Bytes to read: through the end of the last 512-byte sector used.
        len: u64,
    },
}

impl L2Entry {
    /// Decodes a raw (host-endian) L2 entry of an image with `cluster_bits`.
    pub fn decode(raw: u64, cluster_bits: u32) -> L2Entry {
        if raw & COMPRESSED != 0 {
            let x = 62 - (cluster_bits - 8);
            let offset = raw & ((1u64 << x) - 1);
            let sectors = ((raw >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
            return L2Entry::Compressed {
                offset,
                len: sectors * 512 - (offset & 511),
            };
        }
        let offset = raw & OFFSET_MASK;
        let copied = raw & COPIED != 0;
        if raw & ZERO != 0 {
            if offset == 0 {
                L2Entry::ZeroPlain
            } else {
                L2Entry::ZeroAlloc { offset, copied }
            }
        } else if offset == 0 {
            L2Entry::Unallocated
        } else {
            L2Entry::Normal { offset, copied }
        }
    }

    /// Encodes a compressed-cluster descriptor for `len` bytes at host `offset`.
    pub fn compressed(offset: u64, len: u64, cluster_bits: u32) -> u64 {
        let x = 62 - (cluster_bits - 8);
        let extra_sectors = ((offset + len - 1) >> 9) - (offset >> 9);
        COMPRESSED | (extra_sectors << x) | offset
    }

    /// Host clusters this entry holds a reference to (first cluster index, count).
    pub fn host_clusters(self, cluster_bits: u32) -> Option<(u64, u64)> {
        match self {
            L2Entry::Normal { offset, .. } | L2Entry::ZeroAlloc { offset, .. } => {
                Some((offset >> cluster_bits, 1))
            }
            L2Entry::Compressed { offset, len } => {
                let first = offset >> cluster_bits;
                let last = (offset + len - 1) >> cluster_bits;
                Some((first, last - first + 1))
            }
            L2Entry::Unallocated | L2Entry::ZeroPlain => None,
        }
    }
}

/// Reads entry `index` of a table held as big-endian bytes.
pub fn table_entry(table: &[u8], index: usize) -> u64 {
    u64::from_be_bytes(table[index * 8..index * 8 + 8].try_into().expect("8 bytes"))
}

/// Writes entry `index` of a table held as big-endian bytes.
pub fn set_table_entry(table: &mut [u8], index: usize, value: u64) {
    table[index * 8..index * 8 + 8].copy_from_slice(&value.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_descriptor_round_trip() {
        for cluster_bits in [9u32, 12, 16, 21] {
            let cs = 1u64 << cluster_bits;
            for (off, len) in [(0x10000u64, 100u64), (0x10123, cs - 1), (0x20000 - 3, 3)] {
                let e = L2Entry::compressed(off, len, cluster_bits);
                let L2Entry::Compressed { offset, len: l } = L2Entry::decode(e, cluster_bits)
                else {
                    panic!("not compressed");
                };
                assert_eq!(offset, off);
                assert!(l >= len && (off + l) % 512 == 0);
            }
        }
    }

    #[test]
    fn kinds() {
        assert_eq!(L2Entry::decode(0, 16), L2Entry::Unallocated);
        assert_eq!(L2Entry::decode(1, 16), L2Entry::ZeroPlain);
        assert_eq!(
            L2Entry::decode(COPIED | 0x50000, 16),
            L2Entry::Normal {
                offset: 0x50000,
                copied: true
            }
        );
    }
}
