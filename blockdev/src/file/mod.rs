//! A local file (or block device) as storage, with a choice of I/O engine.
//!
//! Reads, writes and flushes go through the engine chosen by [`FileOptions::aio`]:
//!
//! - [`Aio::Threads`]: blocking `pread`/`pwrite`/`fdatasync` from the calling thread.
//! - [`Aio::IoUring`]: one io_uring per file, shared by every calling thread (see `uring.rs`).
//!   If the ring cannot be set up (an old kernel, seccomp, `kernel.io_uring_disabled`) the file
//!   silently uses the thread engine instead; qemu fails the open there, but a working
//!   conversion is worth more than the choice of syscall. [`FileStorage::engine`] tells which
//!   engine is in use.
//! - [`Aio::Native`]: qemu's Linux AIO, which only works with O_DIRECT. Opening with it and a
//!   cache mode that is not direct fails with qemu's message; otherwise it runs on the io_uring
//!   engine (io_uring does everything `io_submit` does for O_DIRECT files, and more).
//!
//! Size, truncate, write-zeroes, discard and SEEK_DATA/SEEK_HOLE are synchronous system calls
//! with every engine.
//!
//! With O_DIRECT cache modes, requests that are not aligned go through aligned bounce buffers,
//! with either engine. An unaligned write is a read-modify-write of its first and last blocks;
//! such writes hold a lock striped by block index, so concurrent unaligned writes to different
//! bytes of one block do not undo each other.

pub(crate) mod lock;
mod threads;
mod uring;

use lock::{Flavour, Locks};

use crate::{
    Aio, AlignedBuf, Alignment, Allocation, CacheMode, Error, Locking, Permissions, Result, Storage,
};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, RwLock};

/// qemu's refusal of `aio=native` without O_DIRECT.
pub const NATIVE_NEEDS_DIRECT: &str =
    "aio=native was specified, but it requires cache.direct=on, which was not specified.";

/// How to open a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct FileOptions {
    /// Open without write access.
    pub read_only: bool,
    /// How the host page cache is used. With O_DIRECT modes, requests that do not honour the
    /// probed alignment go through an aligned bounce buffer.
    pub cache: CacheMode,
    /// The I/O engine.
    pub aio: Aio,
    /// Create the file if it does not exist, and truncate it if it does. The file is
    /// truncated only once the lock bytes show that nobody else is using it, and holds at
    /// least [`Permissions::CREATE`] until it is closed or given other permissions.
    pub create: bool,
    /// QEMU's image locking (`file.locking`).
    pub locking: Locking,
    /// The permissions to announce through the lock bytes, checked against every other
    /// process's at open (the default takes no lock). See [`FileStorage::set_permissions`].
    pub permissions: Permissions,
}

/// Tuning of the I/O engine, beyond what qemu's options name.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// For io_uring (and native): the ring size, which bounds the requests in flight at once.
    /// Further requests wait for a free entry. Clamped to 1..=4096.
    pub queue_depth: u32,
    /// For io_uring (and native): let a kernel thread poll the submission queue
    /// (IORING_SETUP_SQPOLL), so that requesters never enter the kernel to submit. It costs a
    /// CPU that spins while requests come in (and for a moment after).
    pub sqpoll: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            queue_depth: DEFAULT_QUEUE_DEPTH,
            sqpoll: false,
        }
    }
}

/// The default ring size: the queue depth qemu uses for its Linux AIO and io_uring contexts.
pub const DEFAULT_QUEUE_DEPTH: u32 = 128;

/// The engine a file actually uses.
#[derive(Debug)]
enum Engine {
    Threads,
    Uring(Box<uring::Ring>),
}

impl Engine {
    /// Sets up the engine `aio` asks for on `file`, falling back to threads if io_uring is not
    /// available. `depth` is not clamped here, so tests can make the setup fail.
    fn new(aio: Aio, file: &File, depth: u32, sqpoll: bool) -> Engine {
        if aio == Aio::Threads {
            return Engine::Threads;
        }
        let fd = file.as_raw_fd();
        // SQPOLL needs privileges on older kernels; a plain ring is the next best thing.
        let ring = uring::Ring::new(fd, depth, sqpoll).or_else(|e| {
            if sqpoll {
                uring::Ring::new(fd, depth, false)
            } else {
                Err(e)
            }
        });
        match ring {
            Ok(ring) => Engine::Uring(Box::new(ring)),
            Err(_) => Engine::Threads,
        }
    }
}

/// Number of stripes of the read-modify-write lock table. Unaligned writes to blocks whose
/// indexes are equal modulo this share a lock, which only costs parallelism.
const RMW_STRIPES: usize = 64;

/// A file opened for positioned I/O.
pub struct FileStorage {
    // Declared before `file` so that the ring is torn down before the descriptor is closed.
    engine: Engine,
    /// The engine as requested, for [`FileStorage::engine`].
    aio: Aio,
    file: File,
    name: String,
    read_only: bool,
    cache: CacheMode,
    alignment: Alignment,
    /// O_DIRECT only. Held shared by every write (and write-zeroes), exclusively by truncate and
    /// by an unaligned write whose padding reaches past the end of the file: that write grows
    /// the file to a block boundary and then cuts it back, and no other write may grow the file
    /// in between.
    resize: RwLock<()>,
    /// O_DIRECT only. An unaligned write holds the stripes of its first and last blocks while
    /// it reads, patches and writes them back.
    stripes: Box<[Mutex<()>]>,
    /// The QEMU lock bytes this descriptor holds; they go with the descriptor when it closes.
    locks: Locks,
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        self.locks.release(self.file.as_raw_fd());
    }
}

impl std::fmt::Debug for FileStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStorage")
            .field("name", &self.name)
            .field("read_only", &self.read_only)
            .field("cache", &self.cache)
            .field("engine", &self.engine)
            .field("alignment", &self.alignment)
            .finish_non_exhaustive()
    }
}

impl FileStorage {
    /// Opens `path` as described by `opts`, with the default engine tuning.
    pub fn open(path: impl AsRef<Path>, opts: FileOptions) -> Result<Self> {
        Self::open_with(path, opts, EngineOptions::default())
    }

    /// Opens `path` as described by `opts`, with an engine tuned by `engine`.
    pub fn open_with(
        path: impl AsRef<Path>,
        opts: FileOptions,
        engine: EngineOptions,
    ) -> Result<Self> {
        let engine = EngineOptions {
            queue_depth: engine.queue_depth.clamp(1, 4096),
            ..engine
        };
        Self::open_inner(path.as_ref(), opts, engine)
    }

    fn open_inner(path: &Path, opts: FileOptions, engine: EngineOptions) -> Result<Self> {
        let name = path.display().to_string();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.create {
            // Truncated below, once the locks show that nobody is using the file.
            oo.create(true);
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
        // As qemu: the file is opened first, so a missing file is reported as such.
        if opts.aio == Aio::Native && !opts.cache.direct() {
            return Err(Error::InvalidOptions {
                message: NATIVE_NEEDS_DIRECT.into(),
            });
        }
        let alignment = if opts.cache.direct() {
            probe_direct_alignment(&file)
        } else {
            Alignment::default()
        };
        let locks = Locks::new(Flavour::for_mode(opts.locking));
        let permissions = if opts.create {
            Permissions {
                perm: opts.permissions.perm | Permissions::CREATE.perm,
                shared: opts.permissions.shared & Permissions::CREATE.shared,
            }
        } else {
            opts.permissions
        };
        locks
            .set(file.as_raw_fd(), permissions)
            .map_err(|f| f.into_error(&name))?;
        if opts.create {
            file.set_len(0).map_err(|source| Error::Io {
                op: "truncate",
                name: name.clone(),
                offset: 0,
                source,
            })?;
        }
        let engine = Engine::new(opts.aio, &file, engine.queue_depth, engine.sqpoll);
        Ok(FileStorage {
            engine,
            aio: opts.aio,
            file,
            name,
            read_only: opts.read_only,
            cache: opts.cache,
            alignment,
            resize: RwLock::new(()),
            stripes: (0..if opts.cache.direct() { RMW_STRIPES } else { 0 })
                .map(|_| Mutex::new(()))
                .collect(),
            locks,
        })
    }

    /// Announces `p` through QEMU's lock bytes instead of the permissions held so far, after
    /// checking that no other process holds a permission `p` does not share, nor refuses to
    /// share one `p` holds. On a conflict ([`Error::Locked`]) the previous permissions stay.
    /// Without locking (`locking=off`, or `auto` on a kernel without OFD locks) this only
    /// records `p`.
    pub fn set_permissions(&self, p: Permissions) -> Result<()> {
        self.locks
            .set(self.file.as_raw_fd(), p)
            .map_err(|f| f.into_error(&self.name))
    }

    /// The permissions announced (or, without locking, recorded).
    pub fn permissions(&self) -> Permissions {
        self.locks.current()
    }

    /// Whether this file uses QEMU's lock bytes.
    pub fn locking(&self) -> bool {
        self.locks.active()
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

    /// The engine in use: the one requested, except [`Aio::Threads`] when io_uring could not
    /// be set up.
    pub fn engine(&self) -> Aio {
        match self.engine {
            Engine::Threads => Aio::Threads,
            Engine::Uring(_) => self.aio,
        }
    }

    /// The number of requests the engine keeps in flight at once: the ring size for io_uring,
    /// `None` for threads (as many as there are calling threads).
    pub fn queue_depth(&self) -> Option<u32> {
        match &self.engine {
            Engine::Threads => None,
            Engine::Uring(ring) => Some(ring.depth()),
        }
    }

    fn io_err(&self, op: &'static str, offset: u64, source: io::Error) -> Error {
        Error::Io {
            op,
            name: self.name.clone(),
            offset,
            source,
        }
    }

    fn past_end(&self, offset: u64, len: usize) -> Error {
        Error::PastEnd {
            name: self.name.clone(),
            offset,
            len: len as u64,
            size: self.size().unwrap_or(0),
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

    /// The ring, for requests that benefit from it: O_DIRECT ones. Buffered requests through
    /// io_uring only cost more here: ext4 hands buffered ring writes to kernel worker threads,
    /// and a buffered read that hits the page cache is a memcpy that a positioned syscall does
    /// with one kernel entry and no wake-up (measured in benches/benches/storage.rs).
    fn ring(&self) -> Option<&uring::Ring> {
        match &self.engine {
            Engine::Uring(ring) if self.cache.direct() => Some(ring),
            _ => None,
        }
    }

    /// One read through the engine; may be short, 0 at the end of the file.
    fn read_once(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self.ring() {
            None => threads::read_once(&self.file, buf, offset),
            // SAFETY: `buf` is exclusively borrowed for the whole call, and execute does not
            // return before the kernel is done writing to it.
            Some(ring) => unsafe {
                ring.execute(uring::Op::Read {
                    buf: buf.as_mut_ptr(),
                    len: buf.len().min(uring::MAX_SQE_LEN),
                    offset,
                })
            },
        }
    }

    /// One vectored read through the engine; may be short, 0 at the end of the file.
    fn readv_once(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> io::Result<usize> {
        match self.ring() {
            None => threads::readv_once(&self.file, bufs, offset),
            // SAFETY: the buffers (IoSliceMut is ABI-compatible with iovec) are exclusively
            // borrowed for the whole call, and execute does not return before the kernel is
            // done writing to them.
            Some(ring) => unsafe {
                ring.execute(uring::Op::Readv {
                    iov: bufs.as_ptr().cast::<libc::iovec>(),
                    count: bufs.len().min(IOV_MAX) as u32,
                    offset,
                })
            },
        }
    }

    /// One vectored write through the engine; may be short.
    fn writev_once(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<usize> {
        match self.ring() {
            None => threads::writev_once(&self.file, bufs, offset),
            // SAFETY: the buffers (IoSlice is ABI-compatible with iovec) are borrowed for the
            // whole call, and execute does not return before the kernel is done reading them.
            Some(ring) => unsafe {
                ring.execute(uring::Op::Writev {
                    iov: bufs.as_ptr().cast::<libc::iovec>(),
                    count: bufs.len().min(IOV_MAX) as u32,
                    offset,
                })
            },
        }
    }

    /// One write through the engine; may be short.
    fn write_once(&self, buf: &[u8], offset: u64) -> io::Result<usize> {
        match self.ring() {
            None => threads::write_once(&self.file, buf, offset),
            // SAFETY: `buf` is borrowed for the whole call, and execute does not return before
            // the kernel is done reading it.
            Some(ring) => unsafe {
                ring.execute(uring::Op::Write {
                    buf: buf.as_ptr(),
                    len: buf.len().min(uring::MAX_SQE_LEN),
                    offset,
                })
            },
        }
    }

    /// Reads until `buf` is full or the file ends; returns the bytes read.
    fn read_full(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0usize;
        let mut retries = 0u32;
        let mut partial_end = None;
        while done < buf.len() {
            let at = offset + done as u64;
            match self.read_once(&mut buf[done..], at) {
                Ok(0) => break,
                Ok(n) => {
                    done += n;
                    retries = 0;
                    let req = self.alignment.request;
                    if self.cache.direct() && !done.is_multiple_of(req) {
                        // O_DIRECT reads end mid-block only at the end of the file, and may
                        // only continue from a block boundary: if the file has grown since,
                        // an unaligned continuation fails with EINVAL. Read the last block
                        // again; if it still ends at the same place, that is the end.
                        if partial_end == Some(done) {
                            break;
                        }
                        partial_end = Some(done);
                        done = done / req * req;
                    }
                }
                Err(e) if retryable(&e, &mut retries) => {}
                Err(e) => return Err(self.io_err("read", at, e)),
            }
        }
        Ok(done)
    }

    /// Writes all of `buf`.
    fn write_all(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        let mut retries = 0u32;
        while done < buf.len() {
            let at = offset + done as u64;
            match self.write_once(&buf[done..], at) {
                Ok(0) => {
                    return Err(self.io_err("write", at, io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => {
                    done += n;
                    retries = 0;
                }
                Err(e) if retryable(&e, &mut retries) => {}
                Err(e) => return Err(self.io_err("write", at, e)),
            }
        }
        Ok(())
    }

    fn datasync(&self) -> io::Result<()> {
        let mut retries = 0u32;
        loop {
            let r = match &self.engine {
                Engine::Threads => threads::datasync(&self.file),
                // SAFETY: fsync names no buffer.
                Engine::Uring(ring) => unsafe { ring.execute(uring::Op::DataSync) }.map(|_| ()),
            };
            match r {
                Err(e) if retryable(&e, &mut retries) => {}
                r => return r,
            }
        }
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

    /// Whether buffers `(address, length)`, one after the other from `offset`, can go in one
    /// vectored request: always with the page cache; with O_DIRECT when each is aligned.
    fn vectored_ok(&self, mut parts: impl Iterator<Item = (usize, usize)>, offset: u64) -> bool {
        let mut at = offset;
        !self.cache.direct()
            || parts.all(|(addr, len)| {
                let ok = self.is_aligned(addr, at, len);
                at += len as u64;
                ok
            })
    }

    fn is_aligned(&self, addr: usize, offset: u64, len: usize) -> bool {
        let a = self.alignment;
        addr.is_multiple_of(a.memory)
            && offset.is_multiple_of(a.request as u64)
            && len.is_multiple_of(a.request)
    }

    /// The aligned range `[start, end)` around `[offset, offset + len)`.
    fn padded(&self, offset: u64, len: usize) -> (u64, u64) {
        let req = self.alignment.request as u64;
        (
            offset / req * req,
            (offset + len as u64).div_ceil(req) * req,
        )
    }

    /// Reads `buf.len()` bytes at the aligned `offset` into the aligned `buf`; bytes past the
    /// end of the file are left as they are.
    fn read_block_aligned(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_full(buf, offset).map(|_| ())
    }

    /// An unaligned O_DIRECT read: the aligned range around it through a bounce buffer.
    fn read_bounced(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size()?;
        if offset + buf.len() as u64 > size {
            return Err(Error::PastEnd {
                name: self.name.clone(),
                offset,
                len: buf.len() as u64,
                size,
            });
        }
        let (start, end) = self.padded(offset, buf.len());
        let mut bounce = AlignedBuf::zeroed((end - start) as usize, self.alignment.memory);
        let n = self.read_full(&mut bounce, start)?;
        let at = (offset - start) as usize;
        if n < at + buf.len() {
            // The file shrank under us.
            return Err(self.past_end(offset, buf.len()));
        }
        buf.copy_from_slice(&bounce[at..at + buf.len()]);
        Ok(())
    }

    /// An unaligned O_DIRECT write: read-modify-write of the aligned range around it. Only the
    /// partial first and last blocks are read; the blocks in between are overwritten whole.
    fn write_bounced(&self, buf: &[u8], offset: u64) -> Result<()> {
        let req = self.alignment.request as u64;
        let (start, end) = self.padded(offset, buf.len());
        let shared = self.resize.read().unwrap_or_else(|e| e.into_inner());
        let size = self.size()?;
        if end > size {
            // The padding reaches past the end of the file: the bounce write grows the file to
            // `end` and we cut it back below. No other write may run meanwhile, or it could
            // grow the file and then lose its data to our cut.
            drop(shared);
            let _excl = self.resize.write().unwrap_or_else(|e| e.into_inner());
            let size = self.size()?;
            self.patch_blocks(buf, offset, start, end)?;
            let logical = size.max(offset + buf.len() as u64);
            if end > logical {
                self.set_len(logical)?;
            }
            return Ok(());
        }
        // Lock the stripes of the partial first and last blocks, in index order so that two
        // writes never wait for each other's second lock.
        let first = (start / req) as usize % self.stripes.len();
        let last = ((end - 1) / req) as usize % self.stripes.len();
        let (a, b) = (first.min(last), first.max(last));
        let _la = lock(&self.stripes[a]);
        let _lb = (a != b).then(|| lock(&self.stripes[b]));
        let r = self.patch_blocks(buf, offset, start, end);
        drop(shared);
        r
    }

    /// Builds the aligned image of `[start, end)` with `buf` at `offset` in it and writes it.
    fn patch_blocks(&self, buf: &[u8], offset: u64, start: u64, end: u64) -> Result<()> {
        let req = self.alignment.request;
        let len = (end - start) as usize;
        let mut bounce = AlignedBuf::zeroed(len, self.alignment.memory);
        let at = (offset - start) as usize;
        let tail = at + buf.len();
        if at != 0 {
            self.read_block_aligned(&mut bounce[..req], start)?;
        }
        if tail != len && (at == 0 || len > req) {
            self.read_block_aligned(&mut bounce[len - req..], end - req as u64)?;
        }
        bounce[at..tail].copy_from_slice(buf);
        self.write_all(&bounce, start)
    }

    fn set_len(&self, size: u64) -> Result<()> {
        self.file
            .set_len(size)
            .map_err(|e| self.io_err("truncate", size, e))
    }

    fn write_zero_buffers(&self, mut offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        // Aligned, so that O_DIRECT files need no bounce for the aligned part.
        let zeros = AlignedBuf::zeroed(CHUNK.min(len) as usize, 4096);
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

/// Whether a failed request should simply be issued again: EINTR always, EAGAIN and ECANCELED
/// (io_uring cancels requests whose submitting thread exited) a bounded number of times.
fn retryable(e: &io::Error, retries: &mut u32) -> bool {
    match e.raw_os_error() {
        Some(libc::EINTR) => true,
        Some(libc::EAGAIN) | Some(libc::ECANCELED) if *retries < 1000 => {
            *retries += 1;
            if *retries > 10 {
                std::thread::yield_now();
            }
            true
        }
        _ => false,
    }
}

/// Most buffers one vectored request takes (Linux's `IOV_MAX`); a longer list is read in
/// several requests.
const IOV_MAX: usize = 1024;

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        if buf.is_empty() {
            return Ok(());
        }
        if self.cache.direct() && !self.is_aligned(buf.as_ptr() as usize, offset, buf.len()) {
            return self.read_bounced(buf, offset);
        }
        let n = self.read_full(buf, offset)?;
        if n < buf.len() {
            return Err(self.past_end(offset, buf.len()));
        }
        Ok(())
    }

    fn read_vectored_at(&self, bufs: &mut [io::IoSliceMut<'_>], offset: u64) -> Result<()> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // O_DIRECT needs every buffer aligned; otherwise each goes its own way (and bounces).
        let parts = bufs.iter().map(|b| (b.as_ptr() as usize, b.len()));
        if total == 0 || !self.vectored_ok(parts, offset) {
            return crate::read_each(self, bufs, offset);
        }
        let mut rest: &mut [io::IoSliceMut<'_>] = bufs;
        let mut done = 0usize;
        let mut retries = 0u32;
        while done < total {
            let at = offset + done as u64;
            match self.readv_once(rest, at) {
                Ok(0) => return Err(self.past_end(offset, total)),
                Ok(n) => {
                    done += n;
                    retries = 0;
                    io::IoSliceMut::advance_slices(&mut rest, n);
                    let next = at + n as u64;
                    if done < total
                        && self.cache.direct()
                        && !next.is_multiple_of(self.alignment.request as u64)
                    {
                        // A short O_DIRECT read that ends mid-block ends at the end of the
                        // file; read_at knows how to tell that from a file that grew.
                        return crate::read_each(self, rest, next);
                    }
                }
                Err(e) if retryable(&e, &mut retries) => {}
                Err(e) => return Err(self.io_err("read", at, e)),
            }
        }
        Ok(())
    }

    fn write_vectored_at(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> Result<()> {
        self.check_writable()?;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let parts = bufs.iter().map(|b| (b.as_ptr() as usize, b.len()));
        if total == 0 || !self.vectored_ok(parts, offset) {
            return crate::write_each(self, bufs, offset);
        }
        // As in write_at: an unaligned write that grows and cuts back the file must not cut
        // this one's data.
        let _shared = self
            .cache
            .direct()
            .then(|| self.resize.read().unwrap_or_else(|e| e.into_inner()));
        let mut storage: Vec<io::IoSlice<'_>> = bufs.to_vec();
        let mut rest: &mut [io::IoSlice<'_>] = &mut storage;
        let mut done = 0usize;
        let mut retries = 0u32;
        while done < total {
            let at = offset + done as u64;
            match self.writev_once(rest, at) {
                Ok(0) => {
                    return Err(self.io_err("write", at, io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => {
                    done += n;
                    retries = 0;
                    io::IoSlice::advance_slices(&mut rest, n);
                }
                Err(e) if retryable(&e, &mut retries) => {}
                Err(e) => return Err(self.io_err("write", at, e)),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        if buf.is_empty() {
            return Ok(());
        }
        if !self.cache.direct() {
            return self.write_all(buf, offset);
        }
        if !self.is_aligned(buf.as_ptr() as usize, offset, buf.len()) {
            return self.write_bounced(buf, offset);
        }
        // Held shared so that an unaligned write that grows and cuts back the file cannot cut
        // this one's data.
        let _shared = self.resize.read().unwrap_or_else(|e| e.into_inner());
        self.write_all(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || self.cache.ignores_flush() {
            return Ok(());
        }
        self.datasync().map_err(|e| self.io_err("flush", 0, e))
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.check_writable()?;
        // Exclusive, like an unaligned write that grows the file: neither may undo the other's
        // size.
        let _excl = self
            .cache
            .direct()
            .then(|| self.resize.write().unwrap_or_else(|e| e.into_inner()));
        self.set_len(size)
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
        } else {
            // ZERO_RANGE grows the file like a write does, so it holds the lock as writes do.
            let _shared = self
                .cache
                .direct()
                .then(|| self.resize.read().unwrap_or_else(|e| e.into_inner()));
            if self
                .fallocate(libc::FALLOC_FL_ZERO_RANGE, offset, len)
                .is_ok()
            {
                return Ok(());
            }
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
        // No stat: SEEK_DATA at or past the end of the file fails with ENXIO (a hole), and
        // SEEK_HOLE never answers past the end, so the two seeks bound the run themselves.
        let end = offset.saturating_add(len);
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
                    // Only a file cut short since the first seek has no hole here.
                    .unwrap_or(end);
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

    fn as_file(&self) -> Option<&File> {
        Some(&self.file)
    }
}

/// Finds the smallest request alignment O_DIRECT accepts on this file, as qemu does: try reads
/// of growing sizes from an aligned buffer until one succeeds.
fn probe_direct_alignment(file: &File) -> Alignment {
    const MAX: usize = 4096;
    let mut buf = AlignedBuf::zeroed(MAX, MAX);
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

    /// Whether this kernel lets us set up an io_uring at all.
    fn kernel_has_io_uring() -> bool {
        io_uring::IoUring::new(4).is_ok()
    }

    #[test]
    fn io_uring_is_used_where_the_kernel_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        for aio in [Aio::IoUring, Aio::Threads] {
            let s = FileStorage::open(
                &p,
                FileOptions {
                    create: true,
                    aio,
                    ..Default::default()
                },
            )
            .unwrap();
            let expect = if aio == Aio::IoUring && kernel_has_io_uring() {
                Aio::IoUring
            } else {
                Aio::Threads
            };
            assert_eq!(s.engine(), expect);
            assert_eq!(
                s.queue_depth(),
                (expect == Aio::IoUring).then_some(DEFAULT_QUEUE_DEPTH)
            );
        }
    }

    #[test]
    fn failed_ring_setup_falls_back_to_threads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        // A ring of 0 entries is refused by every kernel (EINVAL); the public entry points
        // clamp the depth, the internal one does not.
        let s = FileStorage::open_inner(
            &p,
            FileOptions {
                create: true,
                aio: Aio::IoUring,
                ..Default::default()
            },
            EngineOptions {
                queue_depth: 0,
                sqpoll: false,
            },
        )
        .unwrap();
        assert_eq!(s.engine(), Aio::Threads);
        s.write_at(b"still works", 5).unwrap();
        let mut b = [0u8; 11];
        s.read_at(&mut b, 5).unwrap();
        assert_eq!(&b, b"still works");
    }

    #[test]
    fn queue_depth_is_clamped() {
        if !kernel_has_io_uring() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        for (asked, got) in [(0, 1), (3, 3), (100_000, 4096)] {
            let s = FileStorage::open_with(
                &p,
                FileOptions {
                    create: true,
                    aio: Aio::IoUring,
                    ..Default::default()
                },
                EngineOptions {
                    queue_depth: asked,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(s.queue_depth(), Some(got));
        }
    }

    /// A qcow2 writer's permissions, as QEMU takes them.
    fn qemu_writer() -> Permissions {
        use crate::Perm;
        Permissions {
            perm: Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            shared: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        }
    }

    #[test]
    fn create_leaves_a_file_in_use_alone() {
        if !crate::ofd_locks_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [7u8; 4096]).unwrap();
        let holder = FileStorage::open(
            &p,
            FileOptions {
                permissions: qemu_writer(),
                ..Default::default()
            },
        )
        .unwrap();
        let err = FileStorage::create(&p).unwrap_err();
        assert!(
            matches!(err, Error::Locked { shared: false, .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "Failed to get \"write\" lock\nIs another process using the image [{}]?",
                p.display()
            )
        );
        assert_eq!(std::fs::read(&p).unwrap(), [7u8; 4096], "not truncated");
        drop(holder);
        let s = FileStorage::create(&p).unwrap();
        assert_eq!(s.size().unwrap(), 0);
        assert_eq!(s.permissions(), Permissions::CREATE);
    }

    #[test]
    fn locks_end_with_the_storage_whatever_the_engine() {
        if !crate::ofd_locks_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        for aio in [Aio::IoUring, Aio::Threads] {
            let opts = FileOptions {
                aio,
                permissions: qemu_writer(),
                ..Default::default()
            };
            let a = FileStorage::open(&p, opts).unwrap();
            assert!(a.locking());
            // A second writer is refused while the first is open...
            assert!(matches!(
                FileStorage::open(&p, opts),
                Err(Error::Locked { .. })
            ));
            // ...and admitted as soon as it is dropped, even when an io_uring kept the file.
            drop(a);
            FileStorage::open(&p, opts).unwrap();
        }
        // Without locking nothing is checked.
        let a = FileStorage::open(
            &p,
            FileOptions {
                permissions: qemu_writer(),
                ..Default::default()
            },
        )
        .unwrap();
        let b = FileStorage::open(
            &p,
            FileOptions {
                permissions: qemu_writer(),
                locking: crate::Locking::Off,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(!b.locking());
        // Relaxing is always possible, and then the other may come in.
        a.set_permissions(Permissions::default()).unwrap();
        b.set_permissions(Permissions::default()).unwrap();
    }
}
