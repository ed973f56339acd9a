//! Changing the length of an image file, with qemu's preallocation modes and its messages.

use super::Preallocation;
use crate::{Error, Result};
use blockdev::Storage;

/// Bytes of zeros written per request when preallocating with `full`.
const ZERO_CHUNK: u64 = 1 << 20;

/// The OS reason of a storage failure, worded as strerror words it.
fn reason(e: &blockdev::Error) -> String {
    e.io_error()
        .map(blockdev::os_message)
        .unwrap_or_else(|| e.to_string())
}

/// Sets the length of `storage` to exactly `size`, the way qemu's file driver truncates:
/// `off` cuts or extends sparsely, `falloc` reserves the new blocks, `full` writes zeros over
/// them; preallocation never applies to a shrink. Like qemu, an empty file that grows gets
/// its first block written, so that later alignment probing finds data (which may leave a
/// tiny file longer than asked).
pub fn resize_file(storage: &dyn Storage, size: u64, prealloc: Preallocation) -> Result<()> {
    let current = storage.size()?;
    if current > size && prealloc != Preallocation::Off {
        return Err(Error::InvalidArgument(
            "Cannot use preallocation for shrinking files".into(),
        ));
    }
    let resize_failed = |e: blockdev::Error| {
        Error::InvalidArgument(format!("Could not resize file: {}", reason(&e)))
    };
    match prealloc {
        Preallocation::Off => {
            storage.truncate(size).map_err(resize_failed)?;
            if current == 0 && size > 0 {
                write_first_block(storage, size);
            }
        }
        Preallocation::Falloc => {
            if size != current {
                preallocate(storage, current, size - current).map_err(|m| {
                    Error::InvalidArgument(format!("Could not preallocate new data: {m}"))
                })?;
                if current == 0 {
                    write_first_block(storage, size);
                }
            }
        }
        Preallocation::Full => {
            // The final length first: the file system then knows how far the file goes.
            storage.truncate(size).map_err(resize_failed)?;
            let zeros = vec![0u8; ZERO_CHUNK.min(size.saturating_sub(current)) as usize];
            let mut pos = current;
            while pos < size {
                let n = ZERO_CHUNK.min(size - pos);
                storage.write_at(&zeros[..n as usize], pos).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "Could not write zeros for preallocation: {}",
                        reason(&e)
                    ))
                })?;
                pos += n;
            }
            storage.flush().map_err(|e| {
                Error::InvalidArgument(format!("Could not flush file to disk: {}", reason(&e)))
            })?;
        }
        Preallocation::Metadata => {
            return Err(Error::InvalidArgument(
                "Unsupported preallocation mode: metadata".into(),
            ))
        }
    }
    Ok(())
}

/// Reserves `len` bytes at `offset`, growing the file, as posix_fallocate does: fallocate
/// where the file system has it, zeros written where it has not.
fn preallocate(storage: &dyn Storage, offset: u64, len: u64) -> std::result::Result<(), String> {
    use std::os::unix::io::AsRawFd;
    if let Some(file) = storage.as_file() {
        // SAFETY: plain fallocate on a descriptor that `storage` keeps open for the call.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, offset as i64, len as i64) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) {
            return Err(blockdev::os_message(&e));
        }
    }
    storage
        .write_zeroes(offset, len, false)
        .map_err(|e| reason(&e))
}

/// Writes zeros over the first block of a file that was empty (a sector when the new size is
/// below 4 KiB, 4 KiB otherwise), as qemu does. Failures are ignored, as in qemu: the block
/// only helps later probing.
fn write_first_block(storage: &dyn Storage, size: u64) {
    let len = if size < 4096 { 512 } else { 4096 };
    let _ = storage.write_at(&[0u8; 4096][..len], 0);
}
