//! Comparing the guest-visible content of two images, as `qemu-img compare` does.
//!
//! The walk is driven by block status, so ranges that read as zeros in both images are never
//! read, and data is read in chunks of at most [`IO_BUF_SIZE`]. Where one image allocates a
//! range and the other does not, only the allocated side is read and checked for zeros. The
//! steps, chunk boundaries and reported offsets are qemu's, so `img compare` reports the same
//! offsets (and progress) as qemu-img.

use super::status::{qemu_length, qemu_status, read_padded, ALLOCATED, SECTOR, ZERO};
use crate::{Error, Image};

/// Largest read of one step.
pub const IO_BUF_SIZE: u64 = 2 << 20;

/// One of the two images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The first image.
    First,
    /// The second image.
    Second,
}

/// A failure while comparing.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The allocation status of a range could not be determined.
    #[error("block status of {side:?} image failed: {source}")]
    BlockStatus {
        /// Which image.
        side: Side,
        /// The cause.
        #[source]
        source: Error,
    },
    /// A read failed.
    #[error("read of {side:?} image at offset {offset} failed: {source}")]
    Read {
        /// Which image.
        side: Side,
        /// Guest offset of the read.
        offset: u64,
        /// The cause.
        #[source]
        source: Error,
    },
}

/// How a comparison ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The images have the same content (beyond the end of the smaller one, the larger reads
    /// as zeros).
    Identical,
    /// The content differs at this offset (qemu reports the 512-byte sector where it starts).
    ContentMismatch(u64),
    /// Strict mode: the sizes differ.
    SizeMismatch,
    /// Strict mode: the allocation status differs at this offset.
    StatusMismatch(u64),
}

/// Something worth telling the user while comparing, in the order it happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `bytes` more of the larger image's length have been compared.
    Progress {
        /// Bytes covered by this step.
        bytes: u64,
        /// The larger image's length (100%).
        total: u64,
    },
    /// The common part is identical and the sizes differ; the rest of the larger image is
    /// checked for zeros next.
    SizeMismatch,
}

/// Compares `a` and `b`. With `strict`, different sizes or a different allocation status of
/// some range count as a difference too.
pub fn compare(
    a: &Image,
    b: &Image,
    strict: bool,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome, CompareError> {
    let total1 = qemu_length(a);
    let total2 = qemu_length(b);
    let total = total1.min(total2);
    let progress_base = total1.max(total2);
    if strict && total1 != total2 {
        return Ok(Outcome::SizeMismatch);
    }
    let status = |img: &Image, side: Side, offset: u64, total: u64| {
        qemu_status(img, offset, total - offset)
            .map_err(|source| CompareError::BlockStatus { side, source })
    };
    let mut buf1 = Vec::new();
    let mut buf2 = Vec::new();
    let mut offset = 0u64;
    while offset < total {
        let (s1, p1) = status(a, Side::First, offset, total1)?;
        let (s2, p2) = status(b, Side::Second, offset, total2)?;
        let mut chunk = p1.min(p2);
        if strict && s1 != s2 {
            return Ok(Outcome::StatusMismatch(offset));
        }
        let alloc1 = s1 & ALLOCATED != 0;
        let alloc2 = s2 & ALLOCATED != 0;
        if s1 & ZERO != 0 && s2 & ZERO != 0 {
            // Zeros on both sides: nothing to read.
        } else if alloc1 == alloc2 {
            if alloc1 {
                chunk = chunk.min(IO_BUF_SIZE);
                read(a, Side::First, &mut buf1, offset, chunk)?;
                read(b, Side::Second, &mut buf2, offset, chunk)?;
                if let Some(at) = first_different_sector(&buf1, &buf2) {
                    return Ok(Outcome::ContentMismatch(offset + at));
                }
            }
        } else {
            chunk = chunk.min(IO_BUF_SIZE);
            let (img, side) = if alloc1 {
                (a, Side::First)
            } else {
                (b, Side::Second)
            };
            read(img, side, &mut buf1, offset, chunk)?;
            if let Some(at) = first_nonzero_sector(&buf1) {
                return Ok(Outcome::ContentMismatch(offset + at));
            }
        }
        offset += chunk;
        events(Event::Progress {
            bytes: chunk,
            total: progress_base,
        });
    }

    if total1 != total2 {
        events(Event::SizeMismatch);
        let (over, side, over_total) = if total1 > total2 {
            (a, Side::First, total1)
        } else {
            (b, Side::Second, total2)
        };
        while offset < progress_base {
            let (s, mut chunk) = status(over, side, offset, over_total)?;
            if s & ALLOCATED != 0 && s & ZERO == 0 {
                chunk = chunk.min(IO_BUF_SIZE);
                read(over, side, &mut buf1, offset, chunk)?;
                if let Some(at) = first_nonzero_sector(&buf1) {
                    return Ok(Outcome::ContentMismatch(offset + at));
                }
            }
            offset += chunk;
            events(Event::Progress {
                bytes: chunk,
                total: progress_base,
            });
        }
    }
    Ok(Outcome::Identical)
}

fn read(
    img: &Image,
    side: Side,
    buf: &mut Vec<u8>,
    offset: u64,
    len: u64,
) -> Result<(), CompareError> {
    buf.resize(len as usize, 0);
    read_padded(img, buf, offset).map_err(|source| CompareError::Read {
        side,
        offset,
        source,
    })
}

/// Offset (a multiple of 512 from the start of the buffers) of the first sector where the
/// buffers differ.
fn first_different_sector(a: &[u8], b: &[u8]) -> Option<u64> {
    if a == b {
        return None;
    }
    let s = SECTOR as usize;
    a.chunks(s)
        .zip(b.chunks(s))
        .position(|(x, y)| x != y)
        .map(|i| (i * s) as u64)
}

/// Offset (a multiple of 512 from the start of the buffer) of the first sector that is not
/// all zeros.
fn first_nonzero_sector(buf: &[u8]) -> Option<u64> {
    buf.iter()
        .position(|&b| b != 0)
        .map(|i| i as u64 / SECTOR * SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_offsets() {
        let a = vec![0u8; 2048];
        let mut b = a.clone();
        assert_eq!(first_different_sector(&a, &b), None);
        b[1100] = 1;
        assert_eq!(first_different_sector(&a, &b), Some(1024));
        assert_eq!(first_nonzero_sector(&b), Some(1024));
        assert_eq!(first_nonzero_sector(&a), None);
    }
}
