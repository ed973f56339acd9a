//! The thread engine: blocking positioned system calls from whichever thread makes the request.
//!
//! `pread`/`pwrite`/`fdatasync` on one descriptor are safe to issue from many threads at once
//! and never touch the shared file position, so this engine needs no locking of its own: its
//! concurrency is the number of caller threads.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// One `pread`; may be short.
pub(super) fn read_once(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    file.read_at(buf, offset)
}

/// One `preadv` of at most `IOV_MAX` buffers; may be short.
pub(super) fn readv_once(
    file: &File,
    bufs: &mut [io::IoSliceMut<'_>],
    offset: u64,
) -> io::Result<usize> {
    let iov = bufs.as_mut_ptr().cast::<libc::iovec>();
    // SAFETY: IoSliceMut is ABI-compatible with iovec; the buffers are exclusively borrowed
    // for the call and the descriptor stays open.
    vectored(file, bufs.len(), offset, |fd, n, off| unsafe {
        libc::preadv(fd, iov, n, off)
    })
}

/// One `pwritev` of at most `IOV_MAX` buffers; may be short.
pub(super) fn writev_once(file: &File, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<usize> {
    let iov = bufs.as_ptr().cast::<libc::iovec>();
    // SAFETY: IoSlice is ABI-compatible with iovec; the buffers are borrowed for the call and
    // the descriptor stays open.
    vectored(file, bufs.len(), offset, |fd, n, off| unsafe {
        libc::pwritev(fd, iov, n, off)
    })
}

/// Runs a positioned vectored call on at most `IOV_MAX` of `count` buffers.
fn vectored(
    file: &File,
    count: usize,
    offset: u64,
    call: impl FnOnce(libc::c_int, libc::c_int, libc::off_t) -> isize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let n = call(
        file.as_raw_fd(),
        count.min(super::IOV_MAX) as libc::c_int,
        off,
    );
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One `pwrite`; may be short.
pub(super) fn write_once(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    file.write_at(buf, offset)
}

/// `fdatasync`.
pub(super) fn datasync(file: &File) -> io::Result<()> {
    file.sync_data()
}
