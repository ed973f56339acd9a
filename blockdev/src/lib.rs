//! The storage and I/O layer.
//!
//! Everything an image format needs from the bytes underneath it is behind the [`Storage`] trait:
//! positioned reads and writes, flush, size and truncate, write-zeroes and discard, allocation
//! status, and the alignment a backend demands. Formats never see a file descriptor, so a
//! network backend (NBD, iSCSI, RBD) slots in as another `Storage` implementation without
//! touching any format.
//!
//! [`FileStorage`] issues its I/O through the engine chosen by [`Aio`]: blocking calls from the
//! calling threads, or one io_uring shared by them (see the `file` module). It takes QEMU's
//! image locks ([`Permissions`], [`Locking`]), so that img and QEMU never write an image at once.

mod aio;
mod aligned;
mod cache_mode;
mod error;
pub mod fault;
mod file;
pub mod iscsi;
pub mod mem;
pub mod nbd;
pub mod network;
pub mod rbd;

pub use aio::Aio;
pub use aligned::AlignedBuf;
pub use cache_mode::CacheMode;
pub use error::{os_message, Error, Result};
pub use file::lock::{ofd_locks_available, Locking, Perm, Permissions, PERM_BASE, SHARED_BASE};
pub use file::{EngineOptions, FileOptions, FileStorage, DEFAULT_QUEUE_DEPTH, NATIVE_NEEDS_DIRECT};

use std::fmt::Debug;

/// Alignment facts of a storage backend.
///
/// A caller that honours them never needs a bounce buffer: `memory` applies to buffer addresses,
/// `request` to offsets and lengths. Buffered files report 1 for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alignment {
    /// Required alignment of buffer addresses in memory.
    pub memory: usize,
    /// Required alignment of request offsets and lengths.
    pub request: usize,
}

impl Default for Alignment {
    fn default() -> Self {
        Alignment {
            memory: 1,
            request: 1,
        }
    }
}

/// Whether a byte range of the storage holds data or is a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// The range is allocated (it may still contain zeros).
    Data,
    /// The range is a hole and reads as zeros.
    Hole,
}

/// A byte-addressed store: a file, a block device, a network disk.
///
/// All methods take `&self` so that a storage can be shared by several requests in flight;
/// implementations synchronise internally where they must.
pub trait Storage: Send + Sync + Debug {
    /// A name for error messages: the file name or URL.
    fn name(&self) -> &str;

    /// Current size in bytes.
    fn size(&self) -> Result<u64>;

    /// Reads exactly `buf.len()` bytes at `offset`; a read that crosses the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Reads exactly the total length of `bufs` at `offset`, filling them in order (a
    /// scatter read: a guest's buffers are filled without a copy through one of ours). The
    /// default reads each buffer in turn; a file does it with one vectored request.
    fn read_vectored_at(&self, bufs: &mut [std::io::IoSliceMut<'_>], offset: u64) -> Result<()> {
        read_each(self, bufs, offset)
    }

    /// Writes all of `buf` at `offset`, growing the storage if it is a file.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;

    /// Writes `bufs`, one after the other, at `offset` (a gather write: a guest's buffers go
    /// out without a copy into one of ours). The default writes each buffer in turn; a file
    /// does it with one vectored request.
    fn write_vectored_at(&self, bufs: &[std::io::IoSlice<'_>], offset: u64) -> Result<()> {
        write_each(self, bufs, offset)
    }

    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Sets the size, cutting or extending (with zeros) the end.
    fn truncate(&self, size: u64) -> Result<()>;

    /// Makes `len` bytes at `offset` read as zeros. With `may_unmap` the backend may deallocate
    /// them; without it the range stays allocated.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()>;

    /// Tells the backend that `len` bytes at `offset` are no longer needed. Afterwards they read
    /// as zeros on a file; a backend that cannot discard does nothing.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Allocation status of the range starting at `offset`: the status of the first byte, and
    /// how many bytes from `offset` (at most `len`) share it.
    fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)>;

    /// The alignment this backend demands of requests.
    fn alignment(&self) -> Alignment {
        Alignment::default()
    }

    /// Whether the storage was opened read-only.
    fn is_read_only(&self) -> bool;

    /// The unit the backend allocates in, when qemu reports it as the node's cluster size
    /// (an RBD object). Files have none.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// The local file underneath, for copies that stay in the kernel ([`copy_file_range`]).
    fn as_file(&self) -> Option<&std::fs::File> {
        None
    }
}

/// Reads each of `bufs` in turn with [`Storage::read_at`], from `offset` on: the vectored
/// read of a storage that has no better way.
pub fn read_each<S: Storage + ?Sized>(
    storage: &S,
    bufs: &mut [std::io::IoSliceMut<'_>],
    offset: u64,
) -> Result<()> {
    let mut at = offset;
    for buf in bufs.iter_mut() {
        storage.read_at(buf, at)?;
        at += buf.len() as u64;
    }
    Ok(())
}

/// Writes each of `bufs` in turn with [`Storage::write_at`], from `offset` on: the vectored
/// write of a storage that has no better way.
pub fn write_each<S: Storage + ?Sized>(
    storage: &S,
    bufs: &[std::io::IoSlice<'_>],
    offset: u64,
) -> Result<()> {
    let mut at = offset;
    for buf in bufs {
        storage.write_at(buf, at)?;
        at += buf.len() as u64;
    }
    Ok(())
}

/// Copies `len` bytes from `src` at `src_offset` to `dst` at `dst_offset` inside the kernel
/// (copy_file_range: no trip through user space, and a reflink that shares the extents on
/// filesystems that can, such as Btrfs and XFS). Returns the bytes copied, which is less than
/// `len` only when the source ends.
pub fn copy_file_range(
    src: &std::fs::File,
    src_offset: u64,
    dst: &std::fs::File,
    dst_offset: u64,
    len: u64,
) -> std::io::Result<u64> {
    use std::os::unix::io::AsRawFd;
    let mut done = 0u64;
    while done < len {
        let mut off_in = (src_offset + done) as libc::loff_t;
        let mut off_out = (dst_offset + done) as libc::loff_t;
        let chunk = (len - done).min(1 << 30) as usize;
        // SAFETY: both descriptors are open for the duration of the call (borrowed Files),
        // and the offset pointers point at live locals the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        match n {
            0 => break,
            n if n > 0 => done += n as u64,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(done)
}
