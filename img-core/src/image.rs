//! The one access path: reads, writes, write-zeroes and discards for every format, and the walk
//! down a backing chain.

use crate::format::{Allocation, Extent, Format, Mapping, ZeroMode};
use crate::{Error, Result};
use std::sync::Mutex;

/// How a guest range is stored, as `img map` and `img convert` see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the queried offset that share this status.
    pub len: u64,
    /// The range reads as zeros.
    pub zero: bool,
    /// The range has data (or is allocated) in some image of the chain.
    pub data: bool,
    /// Index in the chain of the image that holds the range (0 = this image), or `None` when no
    /// image of the chain allocates it.
    pub depth: Option<usize>,
    /// Host offset of uncompressed data, when `data`.
    pub offset: Option<u64>,
    /// The range is stored compressed.
    pub compressed: bool,
}

/// The most recently decompressed cluster, so that sequential small reads of one compressed
/// cluster decompress it once.
struct DecompressedCluster {
    host_offset: u64,
    data: Vec<u8>,
}

/// An opened image: a format, and the image that backs it.
pub struct Image {
    format: Box<dyn Format>,
    backing: Option<Box<Image>>,
    last_decompressed: Mutex<Option<DecompressedCluster>>,
    closed: bool,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("driver", &self.format.driver())
            .field("file", &self.format.file_name())
            .field("backing", &self.backing)
            .finish()
    }
}

impl Image {
    /// Wraps a format (and its backing image, if any) in the generic access path.
    pub fn new(format: Box<dyn Format>, backing: Option<Image>) -> Self {
        Image {
            format,
            backing: backing.map(Box::new),
            last_decompressed: Mutex::new(None),
            closed: false,
        }
    }

    /// The format driver underneath.
    pub fn format(&self) -> &dyn Format {
        self.format.as_ref()
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }

    /// Virtual disk size in bytes.
    pub fn size(&self) -> u64 {
        self.format.virtual_size()
    }

    /// The image's file name.
    pub fn file_name(&self) -> &str {
        self.format.file_name()
    }

    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.format.is_read_only()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::OutOfRange {
                file: self.file_name().to_string(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly {
                file: self.file_name().to_string(),
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` guest bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let extent = self.format.map(pos, (buf.len() - done) as u64)?;
            let n = extent.len as usize;
            let part = &mut buf[done..done + n];
            self.read_extent(extent, pos, part)?;
            done += n;
        }
        Ok(())
    }

    fn read_extent(&self, extent: Extent, pos: u64, part: &mut [u8]) -> Result<()> {
        match extent.mapping {
            Mapping::Data { offset, .. } => self.format.data_file().read_at(part, offset)?,
            Mapping::Zero => part.fill(0),
            Mapping::Unallocated => self.read_backing(part, pos)?,
            Mapping::Compressed { offset, len } => {
                let cs = self.format.cluster_size();
                let in_cluster = (pos % cs) as usize;
                self.with_decompressed(offset, len, |cluster| {
                    part.copy_from_slice(&cluster[in_cluster..in_cluster + part.len()]);
                })?;
            }
        }
        Ok(())
    }

    /// Reads from the backing image; what lies beyond the backing image's end reads as zeros.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let Some(backing) = &self.backing else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = backing.size();
        let avail = bsize.saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            backing.read_at(&mut buf[..avail], offset)?;
        }
        buf[avail..].fill(0);
        Ok(())
    }

    fn with_decompressed(&self, host_offset: u64, len: u64, f: impl FnOnce(&[u8])) -> Result<()> {
        let mut cache = self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.as_ref().filter(|c| c.host_offset == host_offset) {
            f(&c.data);
            return Ok(());
        }
        let mut compressed = vec![0u8; len as usize];
        read_clamped(
            self.format.data_file().as_ref(),
            &mut compressed,
            host_offset,
        )?;
        let mut data = vec![0u8; self.format.cluster_size() as usize];
        self.format.decompress(&compressed, &mut data)?;
        f(&data);
        *cache = Some(DecompressedCluster { host_offset, data });
        Ok(())
    }

    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let rest = &buf[done..];
            let extent = self.format.map(pos, rest.len() as u64)?;
            let n = match extent.mapping {
                Mapping::Data {
                    offset: host,
                    writable: true,
                } => {
                    let n = extent.len as usize;
                    self.format.data_file().write_at(&rest[..n], host)?;
                    n
                }
                _ => self.write_allocating(rest, pos)?,
            };
            done += n;
        }
        self.invalidate_decompressed();
        Ok(())
    }

    /// Writes into fresh clusters: fills the parts of the first and last cluster that `buf`
    /// does not cover from the current content (copy-on-write), writes the data, then commits
    /// the mapping. Returns how many bytes of `buf` were written.
    fn write_allocating(&self, buf: &[u8], pos: u64) -> Result<usize> {
        let alloc = self.format.allocate(pos, buf.len() as u64)?;
        let head = (pos - alloc.guest_offset) as usize;
        let n = buf.len().min(alloc.len as usize - head);
        let tail = alloc.len as usize - head - n;
        let data_file = self.format.data_file();
        if head == 0 && tail == 0 {
            data_file.write_at(&buf[..n], alloc.host_offset)?;
        } else {
            let mut whole = vec![0u8; alloc.len as usize];
            if head > 0 {
                self.read_old(&mut whole[..head], alloc.guest_offset)?;
            }
            if tail > 0 {
                let t = head + n;
                let end = (alloc.guest_offset + alloc.len).min(self.size());
                let in_disk = (end - (alloc.guest_offset + t as u64)) as usize;
                self.read_old(&mut whole[t..t + in_disk], alloc.guest_offset + t as u64)?;
            }
            whole[head..head + n].copy_from_slice(&buf[..n]);
            data_file.write_at(&whole, alloc.host_offset)?;
        }
        self.format.commit(alloc)?;
        Ok(n)
    }

    /// Reads the current content of a range that is about to be remapped; the allocation is not
    /// committed yet, so the old mapping is still what `map` returns.
    fn read_old(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.read_at(buf, offset)
    }

    fn invalidate_decompressed(&self) {
        *self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Makes `[offset, offset + len)` read as zeros: whole clusters through metadata, partial
    /// ones by writing zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let mode = if may_unmap {
            ZeroMode::MayUnmap
        } else {
            ZeroMode::Keep
        };
        let cs = self.format.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let handled = self.format.zero_clusters(pos, end - pos, mode)?;
            if handled > 0 {
                pos += handled;
                continue;
            }
            // Write zeros up to the next cluster boundary (or the end), then try metadata again.
            let next = ((pos / cs) + 1).saturating_mul(cs).min(end);
            let n = (next - pos) as usize;
            if self.already_zero(pos, n as u64)? {
                pos = next;
                continue;
            }
            self.write_at(&vec![0u8; n], pos)?;
            pos = next;
        }
        self.invalidate_decompressed();
        Ok(())
    }

    /// Whether a range already reads as zeros without looking at data bytes.
    fn already_zero(&self, offset: u64, len: u64) -> Result<bool> {
        let st = self.block_status(offset, len)?;
        Ok(st.zero && st.len >= len)
    }

    /// Discards whole clusters in the range; they read as zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.format.discard(offset, len)?;
        self.invalidate_decompressed();
        Ok(())
    }

    /// Writes one whole cluster compressed, falling back to a plain write where the format
    /// cannot compress or the data does not shrink.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        if !self.format.write_compressed(offset, data)? {
            self.write_at(data, offset)?;
        }
        self.invalidate_decompressed();
        Ok(())
    }

    /// How the range starting at `offset` is stored, following the backing chain.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.block_status_at_depth(offset, len, 0)
    }

    fn block_status_at_depth(&self, offset: u64, len: u64, depth: usize) -> Result<BlockStatus> {
        let extent = self.format.map(offset, len)?;
        let status = |zero, data, offset, compressed| BlockStatus {
            len: extent.len,
            zero,
            data,
            depth: Some(depth),
            offset,
            compressed,
        };
        Ok(match extent.mapping {
            Mapping::Data { offset, .. } => status(false, true, Some(offset), false),
            Mapping::Compressed { .. } => status(false, true, None, true),
            Mapping::Zero => status(true, false, None, false),
            Mapping::Unallocated => match &self.backing {
                Some(b) if offset < b.size() => {
                    let blen = extent.len.min(b.size() - offset);
                    b.block_status_at_depth(offset, blen, depth + 1)?
                }
                _ => BlockStatus {
                    len: extent.len,
                    zero: true,
                    data: false,
                    depth: None,
                    offset: None,
                    compressed: false,
                },
            },
        })
    }

    /// Makes every completed write durable, metadata included.
    pub fn flush(&self) -> Result<()> {
        self.format.flush()
    }

    /// Flushes and marks the image clean. Dropping an image closes it too, but only an explicit
    /// close reports errors.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        self.format.close()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed {
            // Errors cannot be reported from drop; `close` is the checked path.
            let _ = self.format.close();
        }
    }
}

/// Reads compressed bytes that may run past the end of the file (qemu rounds the length of
/// the last compressed cluster up to a sector); the missing tail reads as zeros.
fn read_clamped(storage: &dyn blockdev::Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    let size = storage.size()?;
    let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    storage.read_at(&mut buf[..avail], offset)?;
    buf[avail..].fill(0);
    Ok(())
}

/// Exposes an allocation to callers that drive formats directly (tests, repair).
pub fn allocation_end(a: &Allocation) -> u64 {
    a.guest_offset + a.len
}
