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

/// One `pwrite`; may be short.
pub(super) fn write_once(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    file.write_at(buf, offset)
}

/// `fdatasync`.
pub(super) fn datasync(file: &File) -> io::Result<()> {
    file.sync_data()
}
