//! The interface every image format implements: mapping and allocation, nothing else.

use crate::Result;
use blockdev::Storage;
use std::sync::Arc;

/// Where the bytes of a guest range live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Stored uncompressed at `offset` in the format's data storage.
    Data {
        /// Host offset of the first guest byte of the extent.
        offset: u64,
        /// Whether the data may be overwritten in place (qcow2: the cluster's refcount is 1).
        writable: bool,
    },
    /// Reads as zeros; nothing underneath is consulted.
    Zero,
    /// Reads as zeros, with a host range still reserved for it at `offset` (a qcow2
    /// "preallocated zero" cluster); qemu reports such ranges with their offset.
    ZeroAllocated {
        /// Host offset of the first guest byte of the extent.
        offset: u64,
    },
    /// Not allocated in this image: the backing image (or zeros without one) holds the data.
    Unallocated,
    /// Stored compressed; the extent lies inside one guest cluster.
    Compressed {
        /// Host offset of the compressed bytes.
        offset: u64,
        /// Number of compressed bytes to read.
        len: u64,
    },
}

impl Mapping {
    /// The mapping of the part of an extent that starts `delta` bytes into it: host offsets
    /// move along; a compressed cluster stays whole (the guest position selects the bytes).
    pub fn advanced(self, delta: u64) -> Mapping {
        match self {
            Mapping::Data { offset, writable } => Mapping::Data {
                offset: offset + delta,
                writable,
            },
            Mapping::ZeroAllocated { offset } => Mapping::ZeroAllocated {
                offset: offset + delta,
            },
            other => other,
        }
    }
}

/// A guest range that maps uniformly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// How the range is stored.
    pub mapping: Mapping,
    /// Length of the range in bytes (never zero for a request of non-zero length).
    pub len: u64,
}

/// Fresh host space reserved for a guest range, invisible to readers until it is committed.
///
/// The generic access path fills the whole range (copying the parts a request does not cover
/// from the old content) and then calls [`Format::commit`]; that ordering is what keeps an
/// L2 entry from ever pointing at unwritten data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// Guest offset of the reserved range (cluster aligned).
    pub guest_offset: u64,
    /// Host offset of the reserved range in the data storage.
    pub host_offset: u64,
    /// Length of the range (a whole number of clusters).
    pub len: u64,
}

/// How a format should make a range read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// Keep the space allocated.
    Keep,
    /// Space may be freed.
    MayUnmap,
}

/// What [`Format::resize`] does with the range a grow adds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResizeOptions {
    /// How much of the new range to allocate now (qemu's `--preallocation`).
    pub prealloc: crate::raw::Preallocation,
    /// Make the whole clusters of the new range read as zeros instead of falling through to a
    /// backing image that is longer than the old size (qemu's zero-write truncate). The
    /// partial cluster at the old end is left to the caller, which writes zeros through the
    /// generic path so that the rest of that cluster is copied up.
    pub zero_new_clusters: bool,
    /// The guest content of the cluster holding the old end, from the cluster's start up to
    /// the old end, read through the backing chain: a format that replaces that cluster when it
    /// preallocates copies it from here (what the image itself stores may be only part of it).
    pub head_data: Option<Vec<u8>>,
}

/// Format-specific facts for `img info`.
#[derive(Clone, Debug, Default)]
pub struct FormatInfo {
    /// Cluster size, where the format has clusters.
    pub cluster_size: Option<u64>,
    /// Key/value facts in the order `img info` prints them ("compat", "lazy refcounts", ...),
    /// with their JSON rendering.
    pub specific: Option<serde_json::Value>,
    /// Whether the image was left dirty (qcow2 dirty bit).
    pub dirty: bool,
    /// Whether the image is marked corrupt.
    pub corrupt: bool,
    /// The backing file the image names, if any.
    pub backing_file: Option<String>,
    /// The backing file's format, if the image records it.
    pub backing_format: Option<String>,
}

/// An image format: a mapping provider over storage.
///
/// All methods take `&self`; formats keep their metadata behind their own lock so that data I/O
/// of several requests can run outside it.
pub trait Format: Send + Sync {
    /// The driver name, as qemu spells it (`raw`, `qcow2`).
    fn driver(&self) -> &'static str;

    /// The image file's name, for messages.
    fn file_name(&self) -> &str;

    /// The virtual disk size in bytes.
    fn virtual_size(&self) -> u64;

    /// The storage that holds the image's metadata (the image file itself).
    fn file(&self) -> &Arc<dyn Storage>;

    /// The storage that [`Mapping::Data`] offsets refer to.
    fn data_file(&self) -> &Arc<dyn Storage>;

    /// The granularity of allocation: writes smaller than this copy the rest of the unit.
    fn cluster_size(&self) -> u64;

    /// Maps the guest range `[offset, offset + len)`: returns how its first part is stored and
    /// how long that part is. `offset + len` never exceeds the virtual size.
    fn map(&self, offset: u64, len: u64) -> Result<Extent>;

    /// Decompresses the compressed cluster whose bytes are `compressed` into `out`, which is
    /// exactly one cluster long.
    fn decompress(&self, compressed: &[u8], out: &mut [u8]) -> Result<()> {
        let _ = (compressed, out);
        Err(crate::Error::unsupported(
            self.file_name(),
            "compressed data is not supported in this format",
        ))
    }

    /// Reserves fresh host space for the clusters covering `[offset, offset + len)`, or a
    /// prefix of them; the returned allocation starts at the cluster containing `offset`.
    fn allocate(&self, offset: u64, len: u64) -> Result<Allocation>;

    /// Makes a filled allocation visible (writes the mapping), releasing what it replaces.
    fn commit(&self, allocation: Allocation) -> Result<()>;

    /// Gives back a reservation from [`allocate`](Self::allocate) whose data could not be
    /// written (the write failed, a full disk): nothing points at it, so its clusters are
    /// free again. The default keeps them, which costs a leak at worst.
    fn abandon(&self, allocation: Allocation) -> Result<()> {
        let _ = allocation;
        Ok(())
    }

    /// Makes whole clusters in `[offset, offset + len)` read as zeros through metadata alone.
    /// Returns the number of bytes from `offset` handled; 0 means the caller must write zeros
    /// itself for the first cluster (it is partial, or the format cannot express zeros).
    fn zero_clusters(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<u64>;

    /// Drops the whole clusters in `[offset, offset + len)`; afterwards they read as zeros
    /// (or from the backing image). Partial clusters are left alone, as in qemu.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Compresses one guest cluster (`data` is the cluster, or the disk's shorter last one).
    /// `None` when the format cannot compress or the data would not shrink; the caller then
    /// writes it normally. Pure computation, so callers run it on many threads at once.
    fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        let _ = data;
        None
    }

    /// Stores `compressed` (from [`Format::compress_cluster`]) as the guest cluster at the
    /// cluster-aligned `offset`, releasing what the cluster held before.
    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        let _ = (offset, compressed);
        Err(crate::Error::unsupported(
            self.file_name(),
            "compressed writes are not supported in this format",
        ))
    }

    /// Changes the virtual size to `size` as qemu's truncate does: a grow maps the new range
    /// as unallocated (or preallocates it, see [`ResizeOptions`]), a shrink drops everything
    /// past the new end. `&mut self`: no request is in flight while the size changes.
    fn resize(&mut self, size: u64, opts: &ResizeOptions) -> Result<()> {
        let _ = (size, opts);
        Err(crate::Error::InvalidArgument(
            "Image format driver does not support resize".into(),
        ))
    }

    /// Writes all cached metadata in the required order and makes everything durable.
    fn flush(&self) -> Result<()>;

    /// Flushes and marks the image clean; called once when the image is closed.
    fn close(&self) -> Result<()> {
        self.flush()
    }

    /// Facts for `img info`.
    fn info(&self) -> FormatInfo;

    /// Records a new backing file name and format in the image's metadata (`None` removes the
    /// backing file). Formats without backing files refuse.
    fn set_backing_file(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        let _ = (name, format);
        Err(crate::Error::unsupported(
            self.file_name(),
            format!("The '{}' format has no backing files", self.driver()),
        ))
    }

    /// Deallocates every cluster, so that the image reads its backing file everywhere (what
    /// `commit` leaves behind). Formats without backing files refuse.
    fn make_empty(&self) -> Result<()> {
        Err(crate::Error::unsupported(
            self.file_name(),
            format!("The '{}' format cannot be emptied", self.driver()),
        ))
    }

    /// The file a [`Mapping::Data`] offset lies in and the offset inside that file, for
    /// `img map` (formats whose data storage gathers several files decode it here).
    fn data_location(&self, offset: u64) -> (String, u64) {
        (self.data_file().name().to_string(), offset)
    }

    /// Bytes of metadata tables held in memory for as long as the image is open, whatever is
    /// read through it (qcow2's L1 and refcount tables, VMDK's grain directories): what a
    /// backing chain's budget counts (`chain::CHAIN_TABLE_BUDGET`).
    fn table_bytes(&self) -> u64 {
        0
    }

    /// Files other than the image file that hold the image's data (VMDK extent files), as
    /// `(child name, file name)`: `img info` shows them as child nodes.
    fn child_files(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Called before every write, zero write and compressed write of the generic path (also
    /// those that overwrite allocated data in place, which never reach the format otherwise):
    /// VMDK gives its image a new content ID on the first write after it is opened, as qemu.
    fn before_write(&self) -> Result<()> {
        Ok(())
    }

    /// Called once the chain is open, with the image's backing image: a format that records
    /// something of its parent (VMDK's parent content ID) notes whether it still matches.
    fn bind_backing(&self, backing: &dyn Format) {
        let _ = backing;
    }

    /// Called before a read falls through to the backing image: VMDK refuses, as qemu does,
    /// when its parent changed after the image was made (the parent's content ID no longer
    /// matches the one recorded).
    fn may_read_backing(&self) -> Result<()> {
        Ok(())
    }

    /// Whether writes are refused.
    fn is_read_only(&self) -> bool;

    /// Whether block status should look under data extents for holes in the file (which read
    /// as zeros). qemu does so for qcow2 images that look preallocated with `metadata`, whose
    /// data clusters are mostly holes.
    fn file_holes_are_zeros(&self) -> bool {
        false
    }

    /// The driver itself, for operations only one format has (`img amend` on qcow2); `None`
    /// for formats that offer none.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}
