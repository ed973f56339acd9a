//! `img measure`: how large a new image would be, for a given size or to hold an existing
//! image's content, computed as qemu-img computes it.

use super::status::{qemu_length, qemu_status, ALLOCATED, DATA, OFFSET_VALID, ZERO};
use crate::qcow2::measure::{self, Layout, SourceBitmap};
use crate::raw::Preallocation;
use crate::{Error, Image, Result};

/// What `img measure` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// Bytes the new image needs for the content (and the metadata of a full image).
    pub required: u64,
    /// Bytes the new image takes with every cluster allocated.
    pub fully_allocated: u64,
    /// Bytes the source's persistent bitmaps would take, when both images can have them.
    pub bitmaps: Option<u64>,
}

/// A raw target: the disk, byte for byte (rounded up to whole sectors).
pub fn measure_raw(source: Option<&Image>, size: u64) -> Measurement {
    let required = match source {
        Some(image) => qemu_length(image),
        None => size.div_ceil(512).saturating_mul(512),
    };
    Measurement {
        required,
        fully_allocated: required,
        bitmaps: None,
    }
}

/// The options of a qcow2 target that change its size.
#[derive(Clone, Copy, Debug)]
pub struct Qcow2Target {
    /// Cluster size, refcount width and L2 entry size.
    pub layout: Layout,
    /// Compatibility level (2 or 3); bitmaps need 3.
    pub version: u32,
    /// `preallocation`: `falloc` and `full` need the whole disk.
    pub prealloc: Preallocation,
    /// `backing_file` was given: qemu then counts every cluster of the source as needed.
    pub has_backing_file: bool,
    /// The `size` option (0 when not given). It is what the L1 limit is checked against.
    pub size: u64,
}

/// Where the content to measure comes from: an image (opened as one of its internal
/// snapshots saw it, for `-l`).
pub struct Source<'a> {
    /// The image.
    pub image: &'a Image,
}

/// A qcow2 target, for `target.size` bytes or to hold `source`.
pub fn measure_qcow2(target: &Qcow2Target, source: Option<Source<'_>>) -> Result<Measurement> {
    let layout = &target.layout;
    let cs = layout.cluster_size;
    if !layout.size_fits(target.size) {
        return Err(Error::InvalidArgument(
            "The image size is too large (try using a larger cluster size)".into(),
        ));
    }
    let mut virtual_size = target.size.div_ceil(cs) * cs;
    let mut required = 0;
    let mut bitmaps = None;
    if let Some(source) = source {
        let image = source.image;
        // A snapshot is measured with the length the image has now, as qemu does.
        let length = qemu_length(image);
        virtual_size = length.div_ceil(cs) * cs;
        required = if target.has_backing_file {
            // The new image's backing file may share nothing with the source.
            virtual_size
        } else {
            data_clusters_bytes(image, cs)?
        };
        if target.version >= 3 {
            if let Some(list) = source_bitmaps(image)? {
                bitmaps = Some(measure::bitmaps_size(&list, length, cs));
            }
        }
    }
    if matches!(target.prealloc, Preallocation::Falloc | Preallocation::Full) {
        required = virtual_size;
    }
    let fully_allocated = layout.fully_allocated_size(virtual_size);
    Ok(Measurement {
        // Metadata is counted as for a full image: an overestimate, as in qemu.
        required: fully_allocated - virtual_size + required,
        fully_allocated,
        bitmaps,
    })
}

/// The persistent bitmaps of a qcow2 version 3 source (`None` for sources that cannot have
/// any).
fn source_bitmaps(image: &Image) -> Result<Option<Vec<SourceBitmap>>> {
    let format = image.format();
    if format.driver() != "qcow2" {
        return Ok(None);
    }
    measure::persistent_bitmaps(format.file().as_ref())
}

/// One extent of a source, as the counting sees it.
struct Status {
    len: u64,
    /// Reads as zeros: needs no cluster.
    zero: bool,
    /// Holds data allocated somewhere in the chain: needs clusters.
    data: bool,
    /// Host offset of uncompressed data in the top image's file.
    host: Option<u64>,
}

/// Adds up the clusters of `cluster_size` bytes that data extents touch, over `total` bytes
/// whose extents `status` reports. With `file`, holes in that file under data count as zeros
/// (qemu's view of a metadata-preallocated qcow2 image).
fn count_clusters(
    total: u64,
    cs: u64,
    file: Option<&dyn blockdev::Storage>,
    mut status: impl FnMut(u64, u64) -> Result<Status>,
) -> Result<u64> {
    let mut required = 0u64;
    let mut offset = 0u64;
    while offset < total {
        let st = status(offset, total - offset)?;
        let mut len = st.len.clamp(1, total - offset);
        let mut zero = st.zero;
        if let (Some(file), Some(host), false) = (file, st.host, zero) {
            let file_len = file.size()?;
            if host >= file_len {
                // Past the end of the file reads as zeros.
                zero = true;
            } else {
                let (alloc, n) = file.allocation(host, len.min(file_len - host))?;
                zero = alloc == blockdev::Allocation::Hole;
                len = n.clamp(1, len);
            }
        }
        if !zero && st.data {
            // Through the end of the cluster: the next extent starts on a cluster boundary.
            let end = (offset + len).div_ceil(cs) * cs;
            len = end - offset;
            required += offset % cs + len;
        }
        offset += len;
    }
    Ok(required)
}

/// The file to look for holes in under data clusters, when the image is qcow2 and looks
/// preallocated with `metadata`.
fn recursion_file(image: &Image) -> Result<Option<&dyn blockdev::Storage>> {
    let format = image.format();
    let file = format.file().as_ref();
    Ok((format.driver() == "qcow2" && measure::looks_metadata_preallocated(file)?).then_some(file))
}

/// Bytes of the clusters of a new image with clusters of `cluster_size` that would hold data
/// of `image`: every cluster that any data extent touches. Ranges that read as zeros need
/// none. For a qcow2 image that looks preallocated with `metadata`, holes in the file under
/// data clusters count as zeros, as qemu's block status reports them.
pub fn data_clusters_bytes(image: &Image, cluster_size: u64) -> Result<u64> {
    let file = recursion_file(image)?;
    count_clusters(qemu_length(image), cluster_size, file, |offset, len| {
        let (flags, len) = qemu_status(image, offset, len)?;
        let data = flags & (DATA | ALLOCATED) == DATA | ALLOCATED;
        // Block status also calls data over a hole of the file zeros; qemu's measuring looks
        // at the file only for an image it takes for metadata-preallocated (`file`).
        let over_file = data && flags & OFFSET_VALID != 0;
        let host = if file.is_some() && data && flags & OFFSET_VALID != 0 {
            let st = image.block_status(offset, len)?;
            // Only data of the top image lies in its file.
            st.offset.filter(|_| st.depth == 0 && st.present)
        } else {
            None
        };
        Ok(Status {
            len,
            zero: flags & ZERO != 0 && !over_file,
            data,
            host,
        })
    })
}
