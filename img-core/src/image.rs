//! The one access path: reads, writes, write-zeroes and discards for every format, and the walk
//! down a backing chain.

use crate::format::{Allocation, Extent, Format, Mapping, ZeroMode};
use crate::open::{DetectZeroes, DiscardMode};
use crate::{Error, Result};
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock, RwLockReadGuard};

/// The largest image length qemu's block layer accepts (`BDRV_MAX_LENGTH`): `i64::MAX`
/// rounded down to a multiple of its largest request alignment.
pub const MAX_LENGTH: u64 = 9_223_372_035_781_033_984;

/// How a guest range is stored, as `img map` and `img convert` see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes from the queried offset that share this status.
    pub len: u64,
    /// The range reads as zeros.
    pub zero: bool,
    /// The range has data (or is allocated) in some image of the chain.
    pub data: bool,
    /// Index in the chain (0 = this image) of the image that holds the range; when no image
    /// holds it, of the image where the search ended (the bottom of the chain, or the image
    /// whose backing file ends before the range).
    pub depth: usize,
    /// Some image of the chain allocates the range (qemu's "present"); when not, it reads as
    /// zeros.
    pub present: bool,
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

/// Guest ranges whose mapping a request is changing (allocation with copy-on-write, zeroing,
/// discarding). A second request that needs to change a mapping in an overlapping range waits,
/// so two writers never allocate the same cluster, a copy-on-write never copies data another
/// request is replacing, and no L2 entry is committed over another request's fresh data.
/// Reads and in-place writes of allocated clusters never take it.
#[derive(Default)]
struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// A held range; released on drop.
struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.push((start, end));
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        self.locks.released.notify_all();
    }
}

/// An opened image: a format, and the image that backs it.
///
/// `Image` is `Sync`: many requests may run against it at once from several threads.
pub struct Image {
    format: Box<dyn Format>,
    backing: Option<Box<Image>>,
    last_decompressed: Mutex<Option<DecompressedCluster>>,
    /// Bumped by every write, so a decompression that raced with one is not cached.
    generation: AtomicU64,
    remapping: RangeLocks,
    /// Held shared by every request while it does I/O, exclusively by flush. A flush is
    /// where freed clusters become reusable; waiting for requests that mapped a cluster before
    /// it was freed keeps their I/O from landing in a cluster already handed to other data.
    io_barrier: RwLock<()>,
    discard: DiscardMode,
    detect_zeroes: DetectZeroes,
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
            generation: AtomicU64::new(0),
            remapping: RangeLocks::default(),
            io_barrier: RwLock::new(()),
            discard: DiscardMode::default(),
            detect_zeroes: DetectZeroes::default(),
            closed: false,
        }
    }

    /// Sets what discards do and whether zero writes are detected (qemu's `discard=` and
    /// `detect-zeroes=`).
    pub fn set_request_options(&mut self, discard: DiscardMode, detect_zeroes: DetectZeroes) {
        self.discard = discard;
        self.detect_zeroes = detect_zeroes;
    }

    /// The cluster-aligned range around `[offset, offset + len)`.
    fn cluster_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let cs = self.format.cluster_size();
        (offset / cs * cs, (offset + len).div_ceil(cs) * cs)
    }

    /// The format driver underneath.
    pub fn format(&self) -> &dyn Format {
        self.format.as_ref()
    }

    /// The format driver underneath, for format-specific operations that change it
    /// (`img amend`).
    pub fn format_mut(&mut self) -> &mut dyn Format {
        self.format.as_mut()
    }

    /// The backing image, if any.
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }

    /// Records a new backing file (name and format) in the image. Writes made so far are
    /// made durable first. The backing image opened beneath this one is not changed: the
    /// new name takes effect when the image is next opened.
    pub fn set_backing_file(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        self.check_writable()?;
        self.flush()?;
        self.format.set_backing_file(name, format)
    }

    /// Deallocates everything the image holds, leaving it reading its backing file.
    pub fn make_empty(&self) -> Result<()> {
        self.check_writable()?;
        let _quiesced = self.io_barrier.write().unwrap_or_else(|e| e.into_inner());
        self.format.make_empty()?;
        self.invalidate_decompressed();
        self.format.flush()
    }

    /// The image `depth` levels down the chain (0 is this one), to change it (a commit grows
    /// its base).
    pub fn at_depth_mut(&mut self, depth: usize) -> Option<&mut Image> {
        let mut image = self;
        for _ in 0..depth {
            image = image.backing.as_deref_mut()?;
        }
        Some(image)
    }

    /// The image `depth` levels down the chain (0 is this one).
    pub fn at_depth(&self, depth: usize) -> Option<&Image> {
        self.chain().nth(depth)
    }

    /// The length block status covers: qemu counts a raw image in whole sectors, so the
    /// padding after a raw backing file's partial last sector is part of it (a hole).
    fn status_size(&self) -> u64 {
        let size = self.size();
        if self.format.driver() == "raw" {
            size.div_ceil(512).saturating_mul(512)
        } else {
            size
        }
    }

    /// The images of the chain, this one first.
    pub fn chain(&self) -> impl Iterator<Item = &Image> {
        std::iter::successors(Some(self), |i| i.backing())
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
        let _io = self.io_shared();
        self.read_inner(buf, offset)
    }

    /// Writes `bufs`, one after the other, at guest `offset` (a gather write: a VMM writes
    /// straight from a guest's buffers). Ranges already allocated and writable in place go
    /// out in one vectored request each; from the first range that needs allocation (or when
    /// zero writes are detected) the rest is gathered and written as [`Image::write_at`] does.
    pub fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if self.detect_zeroes != DetectZeroes::Off {
            return self.write_at(&gather(bufs, 0, total), offset);
        }
        self.check_writable()?;
        self.check_range(offset, total)?;
        self.format.before_write()?;
        let _io = self.io_shared();
        let mut done = 0u64;
        while done < total {
            let pos = offset + done;
            let extent = self.format.map(pos, total - done)?;
            match extent.mapping {
                Mapping::Data {
                    offset: host,
                    writable: true,
                } => {
                    let parts: Vec<IoSlice<'_>> = slices(bufs, done, extent.len).collect();
                    self.format.data_file().write_vectored_at(&parts, host)?;
                    done += extent.len;
                }
                _ => {
                    // Allocation copies around the data anyway: take the ordinary path.
                    let rest = gather(bufs, done, total - done);
                    return self.write_data(&rest, pos);
                }
            }
        }
        self.invalidate_decompressed();
        Ok(())
    }

    /// Reads guest bytes at `offset` into `bufs`, filled in order (a scatter read: a VMM reads
    /// straight into a guest's buffers). Data stored as is in one run of the image's file
    /// goes in one vectored request; zeros, compressed clusters and backing data are filled
    /// piece by piece as [`Image::read_at`] fills them.
    pub fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let _io = self.io_shared();
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_range(offset, total)?;
        let mut done = 0u64;
        while done < total {
            let pos = offset + done;
            let (image, extent) = self.owner_of(pos, total - done)?;
            let mut pieces = pieces(bufs, done, extent.len);
            match (image, extent.mapping) {
                (Some(image), Mapping::Data { offset: host, .. }) => image
                    .format
                    .data_file()
                    .read_vectored_at(&mut pieces, host)?,
                (Some(image), _) => {
                    let mut at = 0u64;
                    for piece in pieces.iter_mut() {
                        let part = Extent {
                            mapping: extent.mapping.advanced(at),
                            len: piece.len() as u64,
                        };
                        image.read_extent(part, pos + at, piece)?;
                        at += piece.len() as u64;
                    }
                }
                (None, _) => pieces.iter_mut().for_each(|p| p.fill(0)),
            }
            done += extent.len;
        }
        Ok(())
    }

    fn io_shared(&self) -> RwLockReadGuard<'_, ()> {
        self.io_barrier.read().unwrap_or_else(|e| e.into_inner())
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (image, extent) = self.owner_of(pos, (buf.len() - done) as u64)?;
            let n = extent.len as usize;
            let part = &mut buf[done..done + n];
            match image {
                Some(image) => image.read_extent(extent, pos, part)?,
                // Nothing in the chain holds it, or it lies past a backing image's end.
                None => part.fill(0),
            }
            done += n;
        }
        Ok(())
    }

    /// Walks down the chain to the image that holds `pos`: returns it and its extent, or `None`
    /// and the length of the run no image holds. A loop rather than recursion, so that the
    /// depth of a chain costs no stack.
    fn owner_of(&self, pos: u64, len: u64) -> Result<(Option<&Image>, Extent)> {
        let mut image = self;
        let mut len = len;
        loop {
            let extent = image.format.map(pos, len)?;
            if extent.mapping != Mapping::Unallocated {
                return Ok((Some(image), extent));
            }
            match image.backing.as_deref() {
                Some(below) if pos < below.size() => {
                    image.format.may_read_backing()?;
                    len = extent.len.min(below.size() - pos);
                    image = below;
                }
                _ => return Ok((None, extent)),
            }
        }
    }

    /// Reads one extent that `self` maps (never an unallocated one: [`Image::owner_of`]
    /// resolves those).
    fn read_extent(&self, extent: Extent, pos: u64, part: &mut [u8]) -> Result<()> {
        match extent.mapping {
            Mapping::Data { offset, .. } => self.format.data_file().read_at(part, offset)?,
            Mapping::Zero | Mapping::ZeroAllocated { .. } | Mapping::Unallocated => part.fill(0),
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

    fn with_decompressed(&self, host_offset: u64, len: u64, f: impl FnOnce(&[u8])) -> Result<()> {
        let generation = self.generation.load(Ordering::Acquire);
        {
            let cache = self
                .last_decompressed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(c) = cache.as_ref().filter(|c| c.host_offset == host_offset) {
                f(&c.data);
                return Ok(());
            }
        }
        // Decompress outside the lock, so that readers of different clusters run in parallel.
        let mut compressed = vec![0u8; len as usize];
        read_clamped(
            self.format.data_file().as_ref(),
            &mut compressed,
            host_offset,
        )?;
        let mut data = vec![0u8; self.format.cluster_size() as usize];
        self.format.decompress(&compressed, &mut data)?;
        f(&data);
        let mut cache = self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) == generation {
            *cache = Some(DecompressedCluster { host_offset, data });
        }
        Ok(())
    }

    /// Writes `buf` at guest offset `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.format.before_write()?;
        let _io = self.io_shared();
        if self.detect_zeroes != DetectZeroes::Off && crate::convert::is_zero(buf) {
            let unmap =
                self.detect_zeroes == DetectZeroes::Unmap && self.discard == DiscardMode::Unmap;
            return self.write_zeroes_inner(offset, buf.len() as u64, unmap);
        }
        self.write_data(buf, offset)
    }

    fn write_data(&self, buf: &[u8], offset: u64) -> Result<()> {
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
        let (start, end) = self.cluster_range(pos, buf.len() as u64);
        let _remapping = self.remapping.lock(start, end);
        // Another request may have allocated the cluster while we waited.
        let extent = self.format.map(pos, buf.len() as u64)?;
        if let Mapping::Data {
            offset: host,
            writable: true,
        } = extent.mapping
        {
            let n = extent.len as usize;
            self.format.data_file().write_at(&buf[..n], host)?;
            return Ok(n);
        }
        let alloc = self.format.allocate(pos, buf.len() as u64)?;
        let head = (pos - alloc.guest_offset) as usize;
        let n = buf.len().min(alloc.len as usize - head);
        if let Err(e) = self.fill_allocation(&alloc, &buf[..n], head) {
            // Nothing points at the reservation yet: give it back rather than leak it.
            let _ = self.format.abandon(alloc);
            return Err(e);
        }
        self.format.commit(alloc)?;
        Ok(n)
    }

    /// Writes `data` at byte `head` of a fresh allocation, and what the allocation's other
    /// bytes must read (zeros, or the old content for copy-on-write).
    fn fill_allocation(&self, alloc: &Allocation, data: &[u8], head: usize) -> Result<()> {
        let n = data.len();
        let tail = alloc.len as usize - head - n;
        let data_file = self.format.data_file();
        if head == 0 && tail == 0 {
            data_file.write_at(data, alloc.host_offset)?;
        } else if self.cow_is_free(alloc, head, n)? {
            // The rest of the cluster reads as zeros and the cluster lies past the end of the
            // file: extend the file over the whole allocation with zeros the filesystem does
            // not write (fallocate), then write just the data, which no longer extends the
            // file (extending O_DIRECT writes are serialised by filesystems).
            data_file.write_zeroes(alloc.host_offset, alloc.len, false)?;
            data_file.write_at(data, alloc.host_offset + head as u64)?;
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
            whole[head..head + n].copy_from_slice(data);
            data_file.write_at(&whole, alloc.host_offset)?;
        }
        Ok(())
    }

    /// Whether the parts of a fresh allocation that a write does not cover can be left
    /// unwritten: they must read as zeros now, and the host range must lie past the end of
    /// the file (so it holds no stale data of a freed cluster).
    fn cow_is_free(&self, alloc: &Allocation, head: usize, n: usize) -> Result<bool> {
        if alloc.host_offset < self.format.data_file().size()? {
            return Ok(false);
        }
        let zero = |from: u64, len: u64| -> Result<bool> {
            if len == 0 {
                return Ok(true);
            }
            let st = self.block_status(from, len)?;
            Ok(st.zero && !st.data && st.len >= len)
        };
        let tail_start = alloc.guest_offset + (head + n) as u64;
        let tail_len = (alloc.guest_offset + alloc.len)
            .min(self.size())
            .saturating_sub(tail_start);
        Ok(zero(alloc.guest_offset, head as u64)? && zero(tail_start, tail_len)?)
    }

    /// Reads the current content of a range that is about to be remapped; the allocation is not
    /// committed yet, so the old mapping is still what `map` returns.
    fn read_old(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.read_inner(buf, offset)
    }

    fn invalidate_decompressed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
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
        self.format.before_write()?;
        let _io = self.io_shared();
        self.write_zeroes_inner(offset, len, may_unmap)
    }

    fn write_zeroes_inner(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        let mode = if may_unmap {
            ZeroMode::MayUnmap
        } else {
            ZeroMode::Keep
        };
        let cs = self.format.cluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            // Metadata changes under the range lock; partial clusters are written as data,
            // which takes the lock itself when it allocates.
            let handled = {
                let (s, e) = self.cluster_range(pos, end - pos);
                let _remapping = self.remapping.lock(s, e);
                self.format.zero_clusters(pos, end - pos, mode)?
            };
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
            self.write_data(&vec![0u8; n], pos)?;
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

    /// Discards whole clusters in the range; they read as zeros afterwards. With
    /// `discard=ignore` the request does nothing, as in qemu.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        if self.discard == DiscardMode::Ignore {
            return Ok(());
        }
        let _io = self.io_shared();
        let (s, e) = self.cluster_range(offset, len);
        let _remapping = self.remapping.lock(s, e);
        self.format.discard(offset, len)?;
        self.invalidate_decompressed();
        Ok(())
    }

    /// Writes one whole cluster compressed, falling back to a plain write where the format
    /// cannot compress or the data does not shrink.
    pub fn write_compressed(&self, offset: u64, data: &[u8]) -> Result<()> {
        let compressed = self.compress_cluster(offset, data);
        self.write_precompressed(offset, data, compressed)
    }

    /// Compresses the guest cluster at `offset` for [`Image::write_precompressed`]; `None`
    /// when it is not a whole cluster (or the disk's last one), the format cannot compress,
    /// or the data would not shrink.
    pub fn compress_cluster(&self, offset: u64, data: &[u8]) -> Option<Vec<u8>> {
        let cs = self.format.cluster_size();
        let whole = data.len() as u64 == cs || offset + data.len() as u64 == self.size();
        if !offset.is_multiple_of(cs) || !whole || data.len() as u64 > cs {
            return None;
        }
        self.format.compress_cluster(data)
    }

    /// Writes a cluster whose compression was done beforehand (perhaps on another thread):
    /// compressed when `compressed` is given, else `data` as it is.
    pub fn write_precompressed(
        &self,
        offset: u64,
        data: &[u8],
        compressed: Option<Vec<u8>>,
    ) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        self.format.before_write()?;
        let _io = self.io_shared();
        match compressed {
            Some(c) => {
                let (s, e) = self.cluster_range(offset, data.len() as u64);
                let _remapping = self.remapping.lock(s, e);
                self.format.write_compressed(offset, &c)?;
            }
            None => self.write_data(data, offset)?,
        }
        self.invalidate_decompressed();
        Ok(())
    }

    /// How the range starting at `offset` is stored, following the backing chain.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        let mut image = self;
        let mut len = len;
        let mut depth = 0;
        loop {
            let extent = image.format.map(offset, len)?;
            let status = |zero, data, host, compressed| BlockStatus {
                len: extent.len,
                zero,
                data,
                depth,
                present: true,
                offset: host,
                compressed,
            };
            return Ok(match extent.mapping {
                Mapping::Data { offset: host, .. } if image.format.file_holes_are_zeros() => {
                    // As qemu, for an image preallocated with `metadata`: a data cluster over
                    // a hole of its file reads as zeros, which lets convert and map treat it
                    // so.
                    let file = image.format.data_file();
                    let (alloc, n) = file.allocation(host, extent.len)?;
                    let zero = alloc == blockdev::Allocation::Hole;
                    BlockStatus {
                        len: n.clamp(1, extent.len),
                        ..status(zero, true, Some(host), false)
                    }
                }
                Mapping::Data { offset: host, .. } => status(false, true, Some(host), false),
                Mapping::Compressed { .. } => status(false, true, None, true),
                Mapping::Zero => status(true, false, None, false),
                Mapping::ZeroAllocated { offset } => status(true, false, Some(offset), false),
                Mapping::Unallocated => match image.backing.as_deref() {
                    Some(below) if offset < below.status_size() => {
                        len = extent.len.min(below.status_size() - offset);
                        image = below;
                        depth += 1;
                        continue;
                    }
                    _ => BlockStatus {
                        len: extent.len,
                        zero: true,
                        data: false,
                        depth,
                        present: false,
                        offset: None,
                        compressed: false,
                    },
                },
            });
        }
    }

    /// Changes the virtual size to `size`, preallocating a grown range as `prealloc` asks
    /// (see [`Format::resize`]). As in qemu, when a backing image is longer than the old size
    /// the new range reads as zeros rather than showing the backing image's data.
    pub fn resize(&mut self, size: u64, prealloc: crate::raw::Preallocation) -> Result<()> {
        self.check_writable()?;
        if size > MAX_LENGTH {
            return Err(Error::InvalidArgument(format!(
                "offset({size}) exceeds maximum({MAX_LENGTH})"
            )));
        }
        let old = self.size();
        let zero_new = size > old && self.backing.as_ref().is_some_and(|b| b.size() > old);
        let cs = self.format.cluster_size();
        let head_start = old / cs * cs;
        // Preallocating may replace the cluster holding the old end; its content up to there
        // may come from the backing chain, which only this layer can read.
        let head_data = if size > old && old > head_start && prealloc != Default::default() {
            let mut buf = vec![0u8; (old - head_start) as usize];
            self.read_at(&mut buf, head_start)?;
            Some(buf)
        } else {
            None
        };
        self.format.resize(
            size,
            &crate::format::ResizeOptions {
                prealloc,
                zero_new_clusters: zero_new,
                head_data,
            },
        )?;
        self.invalidate_decompressed();
        if zero_new {
            // The format zeroed the whole clusters; the rest of the cluster at the old end is
            // written as data, which copies its head up from the backing image.
            let head_end = old.div_ceil(cs).saturating_mul(cs).min(size);
            if head_end > old {
                self.write_at(&vec![0u8; (head_end - old) as usize], old)?;
            }
        }
        Ok(())
    }

    /// Makes every completed write durable, metadata included.
    pub fn flush(&self) -> Result<()> {
        let _quiesced = self.io_barrier.write().unwrap_or_else(|e| e.into_inner());
        self.format.flush()
    }

    /// Flushes and marks the image clean, with every image of its chain. Dropping an image
    /// closes it too, but only an explicit close reports errors.
    pub fn close(mut self) -> Result<()> {
        self.closed = true;
        let mut result = self.format.close();
        let mut below = self.backing.take();
        while let Some(mut image) = below {
            image.closed = true;
            let r = image.format.close();
            result = result.and(r);
            below = image.backing.take();
        }
        result
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if !self.closed {
            // Errors cannot be reported from drop; `close` is the checked path.
            let _ = self.format.close();
        }
        // Unlink the chain one image at a time: dropping it as nested boxes would recurse once
        // per image.
        let mut below = self.backing.take();
        while let Some(mut image) = below {
            below = image.backing.take();
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

/// Where the `len` bytes starting `start` bytes into a list of buffers of `lens` lie: the
/// `(buffer index, from, to)` of each part.
fn spans(lens: impl Iterator<Item = usize>, start: u64, len: u64) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let (mut skip, mut left) = (start, len);
    for (i, n) in lens.enumerate() {
        if left == 0 {
            break;
        }
        let n = n as u64;
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(left);
        out.push((i, skip as usize, (skip + take) as usize));
        left -= take;
        skip = 0;
    }
    out
}

/// The parts of `bufs` that hold the `len` bytes starting `start` bytes into them.
fn pieces<'a>(bufs: &'a mut [IoSliceMut<'_>], start: u64, len: u64) -> Vec<IoSliceMut<'a>> {
    let spans = spans(bufs.iter().map(|b| b.len()), start, len);
    let mut out = Vec::with_capacity(spans.len());
    let mut rest: &mut [IoSliceMut<'_>] = bufs;
    let mut base = 0;
    for (i, from, to) in spans {
        // Hand out each buffer once, in order, so that the borrows stay disjoint.
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
        let (buf, tail) = tail.split_first_mut().expect("span within the buffers");
        out.push(IoSliceMut::new(&mut buf[from..to]));
        rest = tail;
        base = i + 1;
    }
    out
}

/// The parts of `bufs` that hold the `len` bytes starting `start` bytes into them.
fn slices<'a>(bufs: &'a [IoSlice<'_>], start: u64, len: u64) -> impl Iterator<Item = IoSlice<'a>> {
    spans(bufs.iter().map(|b| b.len()), start, len)
        .into_iter()
        .map(|(i, from, to)| IoSlice::new(&bufs[i][from..to]))
}

/// The `len` bytes starting `start` bytes into `bufs`, copied into one buffer.
fn gather(bufs: &[IoSlice<'_>], start: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    for part in slices(bufs, start, len) {
        out.extend_from_slice(&part);
    }
    out
}
