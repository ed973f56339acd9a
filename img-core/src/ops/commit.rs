//! Commit: write what the images above a base hold into the base.
//!
//! Every range that some image above the base allocates is copied into the base: data is read
//! through the chain (so the topmost copy wins) and written; ranges that read as zeros become
//! write-zeroes requests, which a qcow2 base stores as zero clusters. Ranges nothing above the
//! base allocates already read from the base and are left alone. The base is flushed before
//! the caller empties the top image, so no data exists only in an image being emptied.

use crate::format::Mapping;
use crate::{Error, Image, Result};

/// Bytes copied per step.
const CHUNK: u64 = 2 << 20;

/// Copies into the image `base_depth` levels below `top` everything the images above it
/// allocate. The base must have been opened writable (see
/// [`crate::BackingPolicy::writable_depth`]) and be at least as large as `top`.
pub fn commit_into_base(
    top: &Image,
    base_depth: usize,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let base = top.at_depth(base_depth).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "'{}' has no image {base_depth} levels down its backing chain",
            top.file_name()
        ))
    })?;
    let size = top.size().min(base.size());
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    progress(0, size);
    while pos < size {
        let len = (size - pos).min(CHUNK);
        let (above, n) = allocated_above(top, base_depth, pos, len)?;
        match above {
            Above::Nothing => {}
            Above::Zeros => base.write_zeroes(pos, n, true)?,
            Above::Data => {
                let part = &mut buf[..n as usize];
                top.read_at(part, pos)?;
                base.write_at(part, pos)?;
            }
        }
        pos += n;
        progress(pos, size);
    }
    base.flush()
}

/// What the images above the base hold in a range.
enum Above {
    /// None of them allocates it: it reads from the base (or below).
    Nothing,
    /// The topmost image that allocates it stores zeros.
    Zeros,
    /// The topmost image that allocates it stores data.
    Data,
}

/// The status of the run at `pos` (at most `len` bytes) in the images above `base_depth`.
fn allocated_above(top: &Image, base_depth: usize, pos: u64, len: u64) -> Result<(Above, u64)> {
    let mut len = len;
    for image in top.chain().take(base_depth) {
        if pos >= image.size() {
            // Past the end of an intermediate image: it reads zeros there, hiding what is
            // below, as its own unallocated range past its backing file's end would.
            return Ok((Above::Zeros, len));
        }
        let extent = image.format().map(pos, len.min(image.size() - pos))?;
        len = extent.len;
        match extent.mapping {
            Mapping::Unallocated => continue,
            Mapping::Zero | Mapping::ZeroAllocated { .. } => return Ok((Above::Zeros, len)),
            Mapping::Data { .. } | Mapping::Compressed { .. } => return Ok((Above::Data, len)),
        }
    }
    Ok((Above::Nothing, len))
}
