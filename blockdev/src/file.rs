//! A local file (or block device) as storage, with positioned synchronous I/O.

use crate::{AlignedBuf, Alignment, Allocation, CacheMode, Error, Result, Storage};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// How to open a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOptions {
    /// Open without write access.
    pub read_only: bool,
    /// How the host page cache is used. With O_DIRECT modes, requests that do not honour the
    /// probed alignment go through an aligned bounce buffer.
    pub cache: CacheMode,
    /// The I/O engine.
    pub aio: crate::Aio,
    /// Create the file if it does not exist, and truncate it if it does.
    pub create: bool,
}

/// A file opened for positioned I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    name: String,
    read_only: bool,
    cache: CacheMode,
    alignment: Alignment,
}

impl FileStorage {
    /// Opens `path` as described by `opts`.
    pub fn open(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.create {
            oo.create(true).truncate(true);
        }
        let mut flags = 0;
        if opts.cache.direct() {
            flags |= libc::O_DIRECT;
        }
        if opts.cache.sync_writes() {
            flags |= libc::O_DSYNC;
        }
        oo.custom_flags(flags);
        let file = oo.open(path).map_err(|source| Error::Open {
            name: name.clone(),
            source,
        })?;
        let alignment = if opts.cache.direct() {
            probe_direct_alignment(&file)
        } else {
            Alignment::default()
        };
        Ok(FileStorage {
            file,
            name,
            read_only: opts.read_only,
            cache: opts.cache,
            alignment,
        })
    }

    /// Opens `path` read-only with the page cache.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Self> {
        Self::open(
            path,
            FileOptions {
                read_only: true,
                ..Default::default()
            },
        )
    }

    /// Opens `path` for reading and writing with the page cache.
    pub fn open_read_write(path: impl AsRef<Path>) -> Result<Self> {
        Self::open(path, FileOptions::default())
    }

    /// Creates (or truncates) `path` and opens it for reading and writing.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        Self::open(
            path,
            FileOptions {
                create: true,
                ..Default::default()
            },
        )
    }

    /// The underlying file, for operations outside the `Storage` interface (preallocation).
    pub fn file(&self) -> &File {
        &self.file
    }

    fn io_err(&self, op: &'static str, offset: u64, source: io::Error) -> Error {
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

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
        // `self.file` and stays open for the duration of the call.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn is_aligned(&self, addr: usize, offset: u64, len: usize) -> bool {
        let a = self.alignment;
        addr.is_multiple_of(a.memory)
            && offset.is_multiple_of(a.request as u64)
            && len.is_multiple_of(a.request)
    }

    /// Reads the aligned range around `[offset, offset + len)` into a bounce buffer; bytes past
    /// the end of the file read as zeros. Returns the buffer and the offset of `offset` in it.
    fn read_bounced(&self, offset: u64, len: usize) -> Result<(AlignedBuf, usize)> {
        let req = self.alignment.request as u64;
        let start = offset / req * req;
        let end = (offset + len as u64).div_ceil(req) * req;
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, self.alignment.memory);
        let mut done = 0usize;
        while done < bounce.len() {
            match self.file.read_at(&mut bounce[done..], start + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_err("read", start + done as u64, e)),
            }
        }
        Ok((bounce, (offset - start) as usize))
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = CHUNK.min(end - offset) as usize;
            self.write_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let Ok(off) = i64::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on a descriptor we own; SEEK_DATA/SEEK_HOLE do not touch memory. The
        // shared file position is never used by this type (all I/O is positioned), so moving it
        // is harmless even with concurrent callers.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r >= 0 {
            Ok(Some(r as u64))
        } else {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

impl Storage for FileStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.io_err("stat", 0, e))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        if self.cache.direct() && !self.is_aligned(buf.as_ptr() as usize, offset, buf.len()) {
            let size = self.size()?;
            if offset + buf.len() as u64 > size {
                return Err(Error::PastEnd {
                    name: self.name.clone(),
                    offset,
                    len: buf.len() as u64,
                    size,
                });
            }
            let (bounce, at) = self.read_bounced(offset, buf.len())?;
            buf.copy_from_slice(&bounce[at..at + buf.len()]);
            return Ok(());
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::PastEnd {
                    name: self.name.clone(),
                    offset,
                    len: buf.len() as u64,
                    size: self.size().unwrap_or(0),
                }
            } else {
                self.io_err("read", offset, e)
            }
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        if self.cache.direct() && !self.is_aligned(buf.as_ptr() as usize, offset, buf.len()) {
            // Read-modify-write of the surrounding aligned blocks. Callers that share blocks
            // between concurrent requests must serialise them; the formats never do.
            let size = self.size()?;
            let (mut bounce, at) = self.read_bounced(offset, buf.len())?;
            bounce[at..at + buf.len()].copy_from_slice(buf);
            let start = offset - at as u64;
            self.file
                .write_all_at(&bounce, start)
                .map_err(|e| self.io_err("write", start, e))?;
            // Keep the file size what a buffered write would have made it.
            let end = offset + buf.len() as u64;
            if start + bounce.len() as u64 > size.max(end) {
                self.truncate(size.max(end))?;
            }
            return Ok(());
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("write", offset, e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || self.cache.ignores_flush() {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| self.io_err("flush", 0, e))
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        self.file
            .set_len(size)
            .map_err(|e| self.io_err("truncate", size, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let size = self.size()?;
        if may_unmap {
            // A hole punched past the end does not move the end, so grow first: the new tail is
            // sparse and reads as zeros already.
            if end > size {
                self.truncate(end)?;
            }
            let start = offset.min(size);
            if start >= end || offset >= size {
                return Ok(());
            }
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            if self.fallocate(mode, offset, end.min(size) - offset).is_ok() {
                return Ok(());
            }
        } else if self
            .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
            .is_ok()
        {
            return Ok(());
        }
        self.write_zero_buffers(offset, len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let size = self.size()?;
        if offset >= size || len == 0 {
            return Ok(());
        }
        let len = len.min(size - offset);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            // Discard is advisory: a filesystem that cannot punch holes keeps the data.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.io_err("discard", offset, e)),
        }
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let size = self.size()?;
        if offset >= size {
            return Ok((Allocation::Hole, len));
        }
        let end = offset.saturating_add(len).min(size);
        let data = self
            .seek(offset, libc::SEEK_DATA)
            .map_err(|e| self.io_err("SEEK_DATA", offset, e))?;
        match data {
            None => Ok((Allocation::Hole, len)),
            Some(d) if d > offset => Ok((Allocation::Hole, (d - offset).min(len))),
            Some(_) => {
                let hole = self
                    .seek(offset, libc::SEEK_HOLE)
                    .map_err(|e| self.io_err("SEEK_HOLE", offset, e))?
                    .unwrap_or(size);
                Ok((Allocation::Data, hole.min(end).max(offset + 1) - offset))
            }
        }
    }

    fn alignment(&self) -> Alignment {
        self.alignment
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Finds the smallest request alignment O_DIRECT accepts on this file, as qemu does: try reads
/// of growing sizes from an aligned buffer until one succeeds.
fn probe_direct_alignment(file: &File) -> Alignment {
    const MAX: usize = 4096;
    let layout = std::alloc::Layout::from_size_align(MAX, MAX).expect("valid layout");
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
    if ptr.is_null() {
        return Alignment {
            memory: MAX,
            request: MAX,
        };
    }
    // SAFETY: `ptr` points to MAX initialised (zeroed) bytes that we own until dealloc below.
    let buf = unsafe { std::slice::from_raw_parts_mut(ptr, MAX) };
    let mut request = MAX;
    for size in [512usize, 1024, 2048, 4096] {
        match file.read_at(&mut buf[..size], 0) {
            Ok(_) => {
                request = size;
                break;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(_) => break,
        }
    }
    // SAFETY: allocated above with the same layout and not freed before.
    unsafe { std::alloc::dealloc(ptr, layout) };
    Alignment {
        memory: request,
        request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroes_discard_and_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStorage::create(dir.path().join("f")).unwrap();
        s.write_at(&[0xaa; 8192], 0).unwrap();
        s.write_zeroes(4096, 4096, true).unwrap();
        let mut b = [1u8; 8192];
        s.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0xaa));
        assert!(b[4096..].iter().all(|&x| x == 0));
        // Growing write-zeroes past the end extends the file.
        s.write_zeroes(8192, 1 << 20, true).unwrap();
        assert_eq!(s.size().unwrap(), 8192 + (1 << 20));
        let (a, n) = s.allocation(0, 4096).unwrap();
        assert_eq!((a, n), (Allocation::Data, 4096));
        let (a, _) = s.allocation(1 << 19, 4096).unwrap();
        assert_eq!(a, Allocation::Hole);
        assert!(matches!(
            s.read_at(&mut b, s.size().unwrap() - 10),
            Err(Error::PastEnd { .. })
        ));
    }

    #[test]
    fn direct_io_bounces_unaligned_requests() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let s = FileStorage::open(
            &p,
            FileOptions {
                create: true,
                cache: CacheMode::None,
                ..Default::default()
            },
        )
        .unwrap();
        s.write_at(&[7u8; 100], 3).unwrap();
        assert_eq!(s.size().unwrap(), 103);
        s.write_at(&[9u8; 10], 1000).unwrap();
        assert_eq!(s.size().unwrap(), 1010);
        let mut b = vec![0u8; 1010];
        s.read_at(&mut b, 0).unwrap();
        assert!(b[3..103].iter().all(|&x| x == 7) && b[..3] == [0, 0, 0]);
        assert!(b[1000..].iter().all(|&x| x == 9) && b[103..1000].iter().all(|&x| x == 0));
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        FileStorage::create(&p).unwrap();
        let s = FileStorage::open_read_only(&p).unwrap();
        assert!(matches!(s.write_at(&[1], 0), Err(Error::ReadOnly { .. })));
    }
}
