//! Running requests against the engine.

use super::config::{BlockConfig, DeviceOptions};
use super::request::{Request, RequestKind, SgList, SEGMENT_LEN};
use super::{SECTOR_SIZE, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use crate::bounce::with_bounce;
pub use crate::stats::BlockStats;
use img_core::Image;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use vm_memory::GuestMemory;

/// The outcome of one request, for the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The chain's head descriptor.
    pub head: u16,
    /// The status written to the request's status byte.
    pub status: u8,
    /// Bytes written into the chain's device-writable buffers, status byte included.
    pub used_len: u32,
}

/// A virtio-blk disk backed by an image.
#[derive(Debug)]
pub struct BlockDevice {
    /// `None` once closed. Requests hold the read side while they run, so closing (the write
    /// side) waits until every request in flight has finished.
    image: RwLock<Option<Image>>,
    name: String,
    config: BlockConfig,
    stats: BlockStats,
    /// The driver did not accept FLUSH: it cannot ask for durability, so every write is made
    /// durable before it completes (the spec's write-through fallback).
    write_through: AtomicBool,
}

enum Fail {
    Io,
    Unsupported,
}

type Outcome = Result<u32, Fail>;

impl BlockDevice {
    /// A device serving `image`. A read-only image makes a read-only device.
    pub fn new(image: Image, mut options: DeviceOptions) -> Self {
        options.read_only |= image.is_read_only();
        options.num_queues = options.num_queues.max(1);
        BlockDevice {
            name: image.file_name().to_string(),
            config: BlockConfig::new(image.size(), options),
            image: RwLock::new(Some(image)),
            stats: BlockStats::default(),
            write_through: AtomicBool::new(false),
        }
    }

    /// Takes note of the features the driver accepted.
    pub fn set_acked_features(&self, acked: u64) {
        let flush = acked & 1 << super::features::FLUSH != 0;
        self.write_through.store(!flush, Ordering::Release);
    }

    /// Whether writes are made durable before they complete (FLUSH not negotiated).
    pub fn is_write_through(&self) -> bool {
        self.write_through.load(Ordering::Acquire)
    }

    /// Features and configuration space.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The image's name, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the device has done so far.
    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }

    /// Runs `f` on the image with every request quiesced (the write side of the image's
    /// lock), e.g. to take an internal snapshot; `None` once closed.
    pub fn with_image_mut<T>(&self, f: impl FnOnce(&mut Image) -> T) -> Option<T> {
        self.image
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(f)
    }

    /// Whether the device refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.config.options.read_only
    }

    /// The image's format driver name and backing depth, when open.
    pub fn describe(&self) -> Option<(String, usize, u64)> {
        let guard = self.image.read().unwrap_or_else(|e| e.into_inner());
        guard.as_ref().map(|i| {
            (
                i.format().driver().to_string(),
                i.chain().count() - 1,
                i.size(),
            )
        })
    }

    /// Makes every completed write durable.
    pub fn flush(&self) -> img_core::Result<()> {
        match self
            .image
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(image) => image.flush(),
            None => Ok(()),
        }
    }

    /// Waits for the requests in flight, then flushes and closes the image. Later requests
    /// fail with an I/O error. Closing twice is harmless.
    pub fn close(&self) -> img_core::Result<()> {
        let image = self.image.write().unwrap_or_else(|e| e.into_inner()).take();
        match image {
            Some(image) => image.close(),
            None => Ok(()),
        }
    }

    /// Runs `req`, writes its status byte into guest memory, and says what to put in the used
    /// ring. Never panics on what the driver sent: a bad request ends with IOERR or UNSUPP.
    pub fn execute<M: GuestMemory + ?Sized>(&self, req: &Request, mem: &M) -> Completion {
        let guard = self.image.read().unwrap_or_else(|e| e.into_inner());
        let outcome = match guard.as_ref() {
            None => Err(Fail::Io),
            Some(image) => self.run(image, req, mem),
        };
        drop(guard);
        let (status, data_len) = match outcome {
            Ok(n) => (VIRTIO_BLK_S_OK, n),
            Err(Fail::Io) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(Fail::Unsupported) => (VIRTIO_BLK_S_UNSUPP, 0),
        };
        // A status byte the driver placed outside its memory cannot be written; the request
        // still completes so that the driver's queue does not stall.
        let status_written = req.status.write_from(mem, 0, &[status]).is_ok();
        Completion {
            head: req.head,
            status,
            used_len: data_len + u32::from(status_written),
        }
    }

    fn run<M: GuestMemory + ?Sized>(&self, image: &Image, req: &Request, mem: &M) -> Outcome {
        match req.kind {
            RequestKind::In => self.read(image, req, mem),
            RequestKind::Out => self.write(image, req, mem),
            RequestKind::Flush => {
                image.flush().map_err(|e| self.log(e, "flush", 0))?;
                self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            RequestKind::GetId => {
                let n = (req.writable.len() as usize).min(self.config.serial.len());
                req.writable
                    .write_from(mem, 0, &self.config.serial[..n])
                    .map_err(|_| Fail::Io)?;
                Ok(n as u32)
            }
            RequestKind::Discard | RequestKind::WriteZeroes => self.ranges(image, req, mem),
            RequestKind::Unsupported(_) => Err(Fail::Unsupported),
        }
    }

    /// The byte range of an IN or OUT request of `len` bytes, if the disk holds it and it is
    /// made of whole logical blocks.
    fn data_range(&self, req: &Request, len: u64) -> Result<u64, Fail> {
        let block = u64::from(self.config.options.logical_block_size);
        let offset = req.offset().ok_or(Fail::Io)?;
        let end = offset.checked_add(len).ok_or(Fail::Io)?;
        if len % block != 0 || offset % block != 0 || end > self.config.capacity * SECTOR_SIZE {
            return Err(Fail::Io);
        }
        Ok(offset)
    }

    fn read<M: GuestMemory + ?Sized>(&self, image: &Image, req: &Request, mem: &M) -> Outcome {
        let len = req.writable.len();
        let offset = self.data_range(req, len)?;
        let len32 = u32::try_from(len).map_err(|_| Fail::Io)?;
        // Straight into the guest's buffers (one vectored read for data stored as is); through
        // the bounce buffer only when they cannot be handed out safely.
        let direct = req
            .writable
            .with_guest_slices(mem, 0, len, |bufs| image.read_vectored_at(bufs, offset));
        if let Some(r) = direct {
            r.map_err(|e| self.log(e, "read", offset))?;
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.stats.read_bytes.fetch_add(len, Ordering::Relaxed);
            return Ok(len32);
        }
        with_bounce(len, |buf| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                image
                    .read_at(&mut buf[..n], offset + done)
                    .map_err(|e| self.log(e, "read", offset + done))?;
                req.writable
                    .write_from(mem, done, &buf[..n])
                    .map_err(|_| Fail::Io)?;
                done += n as u64;
            }
            Ok(())
        })?;
        self.stats.reads.fetch_add(1, Ordering::Relaxed);
        self.stats.read_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(len32)
    }

    fn write<M: GuestMemory + ?Sized>(&self, image: &Image, req: &Request, mem: &M) -> Outcome {
        if self.config.options.read_only {
            return Err(Fail::Io);
        }
        let len = req.readable.len();
        let offset = self.data_range(req, len)?;
        // Straight from the guest's buffers when they can be handed out safely.
        let direct = req
            .readable
            .with_guest_buffers(mem, 0, len, |bufs| image.write_vectored_at(bufs, offset));
        match direct {
            Some(r) => r.map_err(|e| self.log(e, "write", offset))?,
            None => self.write_bounced(image, req, mem, offset, len)?,
        }
        if self.is_write_through() {
            image.flush().map_err(|e| self.log(e, "flush", offset))?;
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(0)
    }

    /// A write through the bounce buffer, a piece at a time.
    fn write_bounced<M: GuestMemory + ?Sized>(
        &self,
        image: &Image,
        req: &Request,
        mem: &M,
        offset: u64,
        len: u64,
    ) -> Result<(), Fail> {
        with_bounce(len, |buf| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                req.readable
                    .read_into(mem, done, &mut buf[..n])
                    .map_err(|_| Fail::Io)?;
                image
                    .write_at(&buf[..n], offset + done)
                    .map_err(|e| self.log(e, "write", offset + done))?;
                done += n as u64;
            }
            Ok(())
        })
    }

    /// DISCARD and WRITE_ZEROES: every range is checked before any is carried out.
    fn ranges<M: GuestMemory + ?Sized>(&self, image: &Image, req: &Request, mem: &M) -> Outcome {
        if self.config.options.read_only {
            return Err(Fail::Io);
        }
        let ranges = parse_ranges(&req.readable, mem, self.config.max_ranges())?;
        let discard = req.kind == RequestKind::Discard;
        let block_sectors = u64::from(self.config.options.logical_block_size) / SECTOR_SIZE;
        for r in &ranges {
            // The unmap flag means nothing for a discard, and no other flag exists.
            if r.flags & !1 != 0 || (discard && r.flags != 0) {
                return Err(Fail::Unsupported);
            }
            let end = r.sector.checked_add(u64::from(r.sectors)).ok_or(Fail::Io)?;
            if end > self.config.capacity
                || r.sectors > self.config.max_range_sectors()
                || r.sector % block_sectors != 0
                || u64::from(r.sectors) % block_sectors != 0
            {
                return Err(Fail::Io);
            }
        }
        for r in &ranges {
            let (offset, len) = (r.sector * SECTOR_SIZE, u64::from(r.sectors) * SECTOR_SIZE);
            if discard {
                image
                    .discard(offset, len)
                    .map_err(|e| self.log(e, "discard", offset))?;
                self.stats.discards.fetch_add(1, Ordering::Relaxed);
            } else {
                image
                    .write_zeroes(offset, len, r.flags & 1 != 0)
                    .map_err(|e| self.log(e, "write zeroes", offset))?;
                self.stats.writes.fetch_add(1, Ordering::Relaxed);
            }
        }
        if self.is_write_through() {
            image.flush().map_err(|e| self.log(e, "flush", 0))?;
        }
        Ok(0)
    }

    fn log(&self, e: img_core::Error, what: &str, offset: u64) -> Fail {
        eprintln!(
            "img: {}: guest {what} at byte {offset} failed: {e}",
            self.name
        );
        Fail::Io
    }
}

/// One discard or write-zeroes range.
struct Range {
    sector: u64,
    sectors: u32,
    flags: u32,
}

fn parse_ranges<M: GuestMemory + ?Sized>(
    list: &SgList,
    mem: &M,
    max: u32,
) -> Result<Vec<Range>, Fail> {
    let len = list.len();
    if len == 0 || len % SEGMENT_LEN != 0 {
        return Err(Fail::Io);
    }
    if len / SEGMENT_LEN > u64::from(max) {
        return Err(Fail::Unsupported);
    }
    let mut raw = vec![0u8; len as usize];
    list.read_into(mem, 0, &mut raw).map_err(|_| Fail::Io)?;
    Ok(raw
        .chunks_exact(SEGMENT_LEN as usize)
        .map(|s| Range {
            sector: u64::from_le_bytes(s[0..8].try_into().unwrap()),
            sectors: u32::from_le_bytes(s[8..12].try_into().unwrap()),
            flags: u32::from_le_bytes(s[12..16].try_into().unwrap()),
        })
        .collect())
}
