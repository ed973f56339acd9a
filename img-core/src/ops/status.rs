//! Block status in qemu's terms.
//!
//! Tools that must behave exactly like qemu-img (compare's strict mode, its choice of which
//! ranges to read) need qemu's view of a range: a set of flags and a length. This module
//! derives both from [`Image::block_status`], including qemu's habits of counting image sizes
//! in whole 512-byte sectors and of flagging the range that reaches the end of the image.

use crate::{Image, Result};

/// The range holds data.
pub const DATA: u32 = 0x01;
/// The range reads as zeros.
pub const ZERO: u32 = 0x02;
/// The range has a host offset.
pub const OFFSET_VALID: u32 = 0x04;
/// The range is allocated in some image (it is not left to a backing file or to zeros).
pub const ALLOCATED: u32 = 0x10;
/// The range reaches the end of the image.
pub const EOF: u32 = 0x20;
/// The range is stored compressed.
pub const COMPRESSED: u32 = 0x80;

/// Sector size that qemu counts image lengths in.
pub const SECTOR: u64 = 512;

/// The length qemu gives an image: raw images are rounded up to whole sectors (the tail reads
/// as zeros), other formats down (their header size is in sectors).
pub fn qemu_length(image: &Image) -> u64 {
    let size = image.size();
    if image.format().driver() == "raw" {
        size.div_ceil(SECTOR).saturating_mul(SECTOR)
    } else {
        size / SECTOR * SECTOR
    }
}

/// qemu's block status of the range at `offset` (at most `bytes` long): its flags and how many
/// bytes share them. `offset` must be below [`qemu_length`].
pub fn qemu_status(image: &Image, offset: u64, bytes: u64) -> Result<(u32, u64)> {
    let total = qemu_length(image);
    let bytes = bytes.min(total - offset);
    let raw = image.format().driver() == "raw";
    let size = image.size();
    let (flags, len) = if offset >= size {
        // The sector padding after the end of a raw file: a hole in qemu's file driver.
        (ZERO | OFFSET_VALID | ALLOCATED, bytes)
    } else {
        let st = image.block_status(offset, bytes.min(size - offset))?;
        let flags = if !st.present {
            // Allocated nowhere, and there is nothing underneath: reads as zeros.
            ZERO
        } else if st.compressed {
            DATA | COMPRESSED | ALLOCATED
        } else if st.data && st.zero {
            DATA | ZERO | OFFSET_VALID | ALLOCATED
        } else if st.data {
            DATA | OFFSET_VALID | ALLOCATED
        } else if raw || st.offset.is_some() {
            // A hole in a raw file, or a preallocated zero cluster, still has a place in the
            // file.
            ZERO | OFFSET_VALID | ALLOCATED
        } else {
            ZERO | ALLOCATED
        };
        (flags, st.len)
    };
    let eof = if offset + len == total { EOF } else { 0 };
    Ok((flags | eof, len))
}

/// Reads guest bytes at `offset` into `buf`, with the sector padding after the end of the
/// image (see [`qemu_length`]) reading as zeros.
pub fn read_padded(image: &Image, buf: &mut [u8], offset: u64) -> Result<()> {
    let avail = image.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    if avail > 0 {
        image.read_at(&mut buf[..avail], offset)?;
    }
    buf[avail..].fill(0);
    Ok(())
}
