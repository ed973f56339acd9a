//! The arithmetic of `img measure` for qcow2 targets: the size of a fully allocated image,
//! the room persistent bitmaps take, and the facts about a qcow2 source that qemu's measuring
//! depends on.

use super::cache::MetaCache;
use super::header::{autoclear, ext, Header};
use super::refcount::{refcount_metadata_clusters, Refcounts};
use crate::Result;
use blockdev::Storage;

/// Largest L1 table qemu creates, in bytes.
const MAX_L1_BYTES: u64 = 32 << 20;
/// Size of a bitmap directory entry before its extra data and name.
const BITMAP_ENTRY_HEADER: u64 = 24;
/// Largest bitmap directory qemu reads.
const MAX_BITMAP_DIRECTORY: u64 = 64 << 20;

/// The layout choices of a new qcow2 image that decide how much metadata it needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Cluster size in bytes (a power of two, 512 to 2 MiB).
    pub cluster_size: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Extended L2 entries (16 bytes per entry instead of 8).
    pub extended_l2: bool,
}

impl Layout {
    fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Whether the L1 table of an image of `size` bytes stays within qemu's limit.
    pub fn size_fits(&self, size: u64) -> bool {
        let cs = self.cluster_size;
        let clusters = size.div_ceil(cs);
        let l2_tables = clusters.div_ceil(cs / self.l2_entry_size());
        l2_tables.saturating_mul(8) <= MAX_L1_BYTES
    }

    /// Bytes of an image of `size` bytes with every cluster allocated, metadata included
    /// (header, L2 and L1 tables, refcount blocks and table), as qemu computes it.
    pub fn fully_allocated_size(&self, size: u64) -> u64 {
        let cs = self.cluster_size;
        let data = size.div_ceil(cs) * cs;
        let mut meta = cs;
        let per_l2 = cs / self.l2_entry_size();
        let l2_entries = (data / cs).div_ceil(per_l2) * per_l2;
        meta += l2_entries * self.l2_entry_size();
        let per_l1_cluster = cs / 8;
        let l1_entries =
            (l2_entries * self.l2_entry_size() / cs).div_ceil(per_l1_cluster) * per_l1_cluster;
        meta += l1_entries * 8;
        let (blocks, table) = refcount_metadata_clusters(
            (meta + data) / cs,
            cs.trailing_zeros(),
            self.refcount_order,
            false,
        );
        meta += (blocks + table) * cs;
        meta + data
    }
}

/// A persistent bitmap of a source image, as far as measuring needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceBitmap {
    /// Length of the bitmap's name in bytes.
    pub name_len: u64,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
}

/// Bytes that `bitmaps` of a disk of `disk_size` bytes take in a qcow2 image with clusters of
/// `cluster_size`: every bitmap fully allocated, its bitmap table, and the directory.
pub fn bitmaps_size(bitmaps: &[SourceBitmap], disk_size: u64, cluster_size: u64) -> u64 {
    let cs = cluster_size;
    let mut total = 0u64;
    let mut directory = 0u64;
    for b in bitmaps {
        let bytes = disk_size.div_ceil(b.granularity.max(1)).div_ceil(8);
        let clusters = bytes.div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).div_ceil(cs) * cs;
        directory += (BITMAP_ENTRY_HEADER + b.name_len).div_ceil(8) * 8;
    }
    total + directory.div_ceil(cs) * cs
}

/// Reads the header of the qcow2 image in `file`.
fn read_header(file: &dyn Storage) -> Result<Header> {
    let file_size = file.size()?;
    let mut head = vec![0u8; file_size.min(24) as usize];
    file.read_at(&mut head, 0)?;
    let cluster_bits = if head.len() >= 24 {
        u32::from_be_bytes(head[20..24].try_into().expect("4 bytes")).clamp(9, 21)
    } else {
        9
    };
    let mut first = vec![0u8; file_size.min(1 << cluster_bits) as usize];
    file.read_at(&mut first, 0)?;
    Header::parse(file.name(), &first, file_size)
}

/// The persistent bitmaps of the qcow2 image in `file`, or `None` when the image cannot have
/// any (version 2). Bitmaps declared stale, or a directory that cannot be read, count as none,
/// as qemu then loads none.
pub fn persistent_bitmaps(file: &dyn Storage) -> Result<Option<Vec<SourceBitmap>>> {
    let header = read_header(file)?;
    if header.version < 3 {
        return Ok(None);
    }
    Ok(Some(
        read_bitmap_directory(file, &header).unwrap_or_default(),
    ))
}

fn read_bitmap_directory(file: &dyn Storage, header: &Header) -> Option<Vec<SourceBitmap>> {
    if header.autoclear_features & autoclear::BITMAPS == 0 {
        return None;
    }
    let extension = header
        .unknown_extensions
        .iter()
        .find(|e| e.kind == ext::BITMAPS)?;
    let d = &extension.data;
    if d.len() < 24 {
        return None;
    }
    let count = u32::from_be_bytes(d[0..4].try_into().ok()?) as usize;
    let dir_size = u64::from_be_bytes(d[8..16].try_into().ok()?);
    let dir_offset = u64::from_be_bytes(d[16..24].try_into().ok()?);
    if dir_size > MAX_BITMAP_DIRECTORY || dir_offset.checked_add(dir_size)? > file.size().ok()? {
        return None;
    }
    let mut dir = vec![0u8; dir_size as usize];
    file.read_at(&mut dir, dir_offset).ok()?;
    let mut list = Vec::with_capacity(count);
    let mut pos = 0usize;
    for _ in 0..count {
        let entry = dir.get(pos..pos + BITMAP_ENTRY_HEADER as usize)?;
        let granularity_bits = entry[17] as u32;
        let name_len = u16::from_be_bytes([entry[18], entry[19]]) as usize;
        let extra = u32::from_be_bytes(entry[20..24].try_into().ok()?) as usize;
        if granularity_bits > 63 {
            return None;
        }
        let end = (pos + BITMAP_ENTRY_HEADER as usize)
            .checked_add(extra)?
            .checked_add(name_len)?;
        if end > dir.len() {
            return None;
        }
        list.push(SourceBitmap {
            name_len: name_len as u64,
            granularity: 1 << granularity_bits,
        });
        pos = end.div_ceil(8) * 8;
    }
    Some(list)
}

/// qemu's guess that the qcow2 image in `file` was preallocated with `metadata`: more clusters
/// have a refcount than the file has blocks on disk (by a margin). qemu then asks the file
/// which parts of data clusters are holes, and measuring counts those as zeros.
pub fn looks_metadata_preallocated(file: &dyn Storage) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let Some(host) = file.as_file() else {
        return Ok(false);
    };
    let allocated = host
        .metadata()
        .map_err(|source| blockdev::Error::Io {
            op: "stat",
            name: file.name().to_string(),
            offset: 0,
            source,
        })?
        .blocks()
        * 512;
    let header = read_header(file)?;
    let cs = header.cluster_size();
    let real_clusters = allocated / cs;
    let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
    let Some(cache) = MetaCache::new(4, cs as usize) else {
        return Ok(false);
    };
    let mut refcounts = Refcounts::load(
        file,
        header.cluster_bits,
        header.refcount_order,
        header.refcount_table_offset,
        header.refcount_table_clusters,
        cache,
    )?;
    let end = file.size()?.div_ceil(cs);
    let mut counted = 0u64;
    let mut c = 0u64;
    while c < end && counted < threshold {
        counted += u64::from(refcounts.get(file, c)? != 0);
        c += 1;
    }
    Ok(counted >= threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(cluster_size: u64, refcount_bits: u32) -> Layout {
        Layout {
            cluster_size,
            refcount_order: refcount_bits.trailing_zeros(),
            extended_l2: false,
        }
    }

    #[test]
    fn fully_allocated_sizes_of_qemu() {
        // Figures printed by qemu-img measure.
        assert_eq!(layout(65536, 16).fully_allocated_size(0), 196608);
        assert_eq!(layout(65536, 16).fully_allocated_size(1 << 30), 1074135040);
        assert_eq!(
            layout(65536, 16).fully_allocated_size(1 << 40),
            1099679662080
        );
        assert_eq!(layout(512, 1).fully_allocated_size(1 << 30), 1091053056);
        assert_eq!(
            layout(2 << 20, 64).fully_allocated_size(1 << 30),
            1084227584
        );
        let ext = Layout {
            extended_l2: true,
            ..layout(65536, 16)
        };
        assert_eq!(ext.fully_allocated_size(1 << 30), 1074266112);
    }

    #[test]
    fn l1_limit() {
        assert!(layout(65536, 16).size_fits(1 << 50));
        assert!(!layout(65536, 16).size_fits(4 << 50));
        assert!(!layout(512, 16).size_fits(1 << 40));
    }

    #[test]
    fn bitmap_room() {
        let one = [SourceBitmap {
            name_len: 2,
            granularity: 65536,
        }];
        assert_eq!(bitmaps_size(&one, 1 << 30, 65536), 196608);
        assert_eq!(bitmaps_size(&one, 1 << 30, 4096), 12288);
        assert_eq!(bitmaps_size(&[], 1 << 30, 65536), 0);
    }
}
