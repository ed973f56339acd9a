//! `RbdStorage`: an RBD image behind the [`Storage`] trait.

use std::io::{self, IoSlice, IoSliceMut};
use std::sync::Mutex;

use super::image::Image;
use super::name::RbdName;
use crate::{Allocation, Error, Result, Storage};

/// An RBD image opened through librbd, named `rbd:pool[/namespace]/image[@snap][:key=value...]`.
pub struct RbdStorage {
    /// The name as given, for messages.
    name: String,
    image: Image,
    read_only: bool,
    /// Held while growing the image for a write past its end, so that two such writes never
    /// resize it below each other's end.
    grow: Mutex<()>,
    /// Flushes are skipped (cache mode `unsafe`, see [`RbdStorage::ignoring_flush`]).
    ignore_flush: bool,
}

impl std::fmt::Debug for RbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdStorage")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// Writes larger than this are cut into pieces of this size, all in flight at once: librbd
/// sends one OSD operation per object extent, so a 2 MiB write inside one 4 MiB object would
/// otherwise be a single operation, and a caller that writes one request at a time (convert
/// writing in order) would leave the OSD idle while the data crosses.
const PIECE: u64 = 1 << 20;

fn open_error(name: &str, source: io::Error) -> Error {
    Error::Open {
        name: name.to_string(),
        source,
    }
}

impl RbdStorage {
    /// Opens the image a `rbd:` name designates. A snapshot is always opened read-only.
    pub fn open(name: &str, read_only: bool) -> Result<RbdStorage> {
        let parsed = RbdName::parse(name)?;
        let read_only = read_only || parsed.snapshot.is_some();
        let image = Image::open(&parsed, read_only).map_err(|e| open_error(name, e))?;
        Ok(RbdStorage {
            name: name.to_string(),
            image,
            read_only,
            grow: Mutex::new(()),
            ignore_flush: false,
        })
    }

    /// The storage with flushes skipped when `ignore` (cache mode `unsafe`: qemu-img's default
    /// for a convert target), as a file opened with that cache mode skips them.
    pub fn ignoring_flush(mut self, ignore: bool) -> RbdStorage {
        self.ignore_flush = ignore;
        self
    }

    /// Creates the image a `rbd:` name designates, `size` bytes long, and opens it read-write.
    pub fn create(name: &str, size: u64) -> Result<RbdStorage> {
        let parsed = RbdName::parse(name)?;
        if parsed.snapshot.is_some() {
            return Err(Error::InvalidOptions {
                message: format!("Can't use snapshot name for image creation: '{name}'"),
            });
        }
        Image::create(&parsed, size).map_err(|e| Error::Backend {
            // A pool that cannot be opened says so itself; librbd's own refusal is worded
            // as qemu words it.
            message: match e.get_ref() {
                Some(_) => e.to_string(),
                None => format!("error rbd create: {}", crate::os_message(&e)),
            },
        })?;
        RbdStorage::open(name, false)
    }

    fn io_error(&self, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io {
            op,
            name: self.name.clone(),
            offset,
            source,
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// How many of `len` bytes from `offset` lie inside the image.
    fn inside(&self, offset: u64, len: u64) -> Result<usize> {
        offset.checked_add(len).ok_or_else(|| Error::PastEnd {
            name: self.name.clone(),
            offset,
            len,
            size: u64::MAX,
        })?;
        Ok(self.size()?.saturating_sub(offset).min(len) as usize)
    }

    /// Grows the image so that a write of `len` bytes at `offset` fits. Files grow when
    /// written past their end and formats rely on it (qcow2 allocates clusters there); librbd
    /// refuses such writes, so the image is resized first, as QEMU's rbd driver does.
    fn grow_for_write(&self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).ok_or_else(|| Error::PastEnd {
            name: self.name.clone(),
            offset,
            len,
            size: u64::MAX,
        })?;
        if end <= self.size()? {
            return Ok(());
        }
        let _guard = self.grow.lock().unwrap_or_else(|e| e.into_inner());
        if end > self.size()? {
            self.image
                .resize(end)
                .map_err(|e| self.io_error("write", offset, e))?;
        }
        Ok(())
    }

    /// A short read from librbd: it should never happen inside the image, so it is an
    /// error rather than a silent partial result.
    fn short(&self, op: &'static str, offset: u64, want: usize, got: u64) -> Result<()> {
        if got == want as u64 {
            return Ok(());
        }
        Err(self.io_error(
            op,
            offset,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("librbd transferred {got} of {want} bytes"),
            ),
        ))
    }
}

impl Storage for RbdStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> Result<u64> {
        self.image.size().map_err(|e| self.io_error("stat", 0, e))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Past the end reads as zeros, as a file does: a format whose last write ended inside
        // a cluster (a qcow2 snapshot table, say) reads that whole cluster back.
        let inside = self.inside(offset, buf.len() as u64)?;
        let (buf, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if buf.is_empty() {
            return Ok(());
        }
        // Reads are not cut into pieces as writes are: readers run in parallel already (convert's
        // workers), and measured on a 512 MiB RBD -> file convert, pieces made no difference.
        let len = buf.len();
        let n = self
            .image
            .read(buf, offset)
            .map_err(|e| self.io_error("read", offset, e))?;
        self.short("read", offset, len, n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.grow_for_write(offset, buf.len() as u64)?;
        if buf.len() as u64 > PIECE {
            let pieces: Vec<(&[u8], u64)> = buf
                .chunks(PIECE as usize)
                .enumerate()
                .map(|(i, b)| (b, offset + i as u64 * PIECE))
                .collect();
            return self
                .image
                .write_many(&pieces)
                .map_err(|e| self.io_error("write", offset, e));
        }
        self.image
            .write(buf, offset)
            .map_err(|e| self.io_error("write", offset, e))
    }

    fn read_vectored_at(&self, bufs: &mut [IoSliceMut<'_>], offset: u64) -> Result<()> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if self.inside(offset, len as u64)? < len {
            // Rare (only a format's last cluster): the plain path zero-fills past the end.
            return crate::read_each(self, bufs, offset);
        }
        let n = self
            .image
            .read_vectored(bufs, offset)
            .map_err(|e| self.io_error("read", offset, e))?;
        self.short("read", offset, len, n)
    }

    fn write_vectored_at(&self, bufs: &[IoSlice<'_>], offset: u64) -> Result<()> {
        self.check_writable()?;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        self.grow_for_write(offset, len as u64)?;
        self.image
            .write_vectored(bufs, offset)
            .map_err(|e| self.io_error("write", offset, e))
    }

    fn cluster_size(&self) -> Option<u64> {
        self.image.object_size().ok()
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || self.ignore_flush {
            return Ok(());
        }
        self.image.flush().map_err(|e| self.io_error("flush", 0, e))
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.image
            .resize(size)
            .map_err(|e| self.io_error("truncate", size, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        // librbd decides itself whether zeroed objects are deallocated; either way the range
        // reads back as zeros, which is all the trait promises.
        self.check_writable()?;
        // Zeroes past the end grow the image, as they grow a file.
        self.grow_for_write(offset, len)?;
        self.image
            .write_zeroes(offset, len)
            .map_err(|e| self.io_error("write zeroes", offset, e))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        // What lies past the end is discarded already (a format frees its last cluster,
        // which may end beyond the image's last write).
        let len = self.inside(offset, len)? as u64;
        if len == 0 {
            return Ok(());
        }
        self.image
            .discard(offset, len)
            .map_err(|e| self.io_error("discard", offset, e))
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let size = self.size()?;
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok((Allocation::Data, 0));
        }
        let (data, n) = self
            .image
            .allocation(offset, len)
            .map_err(|e| self.io_error("block status", offset, e))?;
        Ok((
            if data {
                Allocation::Data
            } else {
                Allocation::Hole
            },
            n,
        ))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
