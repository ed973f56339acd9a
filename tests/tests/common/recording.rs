//! An in-memory disk that records every write and flush, and the disks a crash can leave
//! behind: everything before some flush, plus any subset of the 512-byte sectors written
//! after it.
#![allow(dead_code)]

use blockdev::{Allocation, Storage};
use std::sync::Mutex;

/// What reached the disk, in order.
#[derive(Clone, Debug)]
pub enum LogOp {
    /// Bytes written at an offset.
    Write(u64, Vec<u8>),
    /// The size set.
    Truncate(u64),
    /// A flush: everything before it is durable.
    Flush,
}

/// An in-memory disk that logs what reaches it.
#[derive(Debug, Default)]
pub struct RecordingStorage {
    /// The disk as it is now, and the log of what reached it.
    pub state: Mutex<(Vec<u8>, Vec<LogOp>)>,
}

impl Storage for RecordingStorage {
    fn name(&self) -> &str {
        "recorded.qcow2"
    }
    fn size(&self) -> blockdev::Result<u64> {
        Ok(self.state.lock().unwrap().0.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        let s = self.state.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > s.0.len() {
            return Err(blockdev::Error::PastEnd {
                name: self.name().into(),
                offset,
                len: buf.len() as u64,
                size: s.0.len() as u64,
            });
        }
        buf.copy_from_slice(&s.0[offset as usize..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        let mut s = self.state.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > s.0.len() {
            s.0.resize(end, 0);
        }
        s.0[offset as usize..end].copy_from_slice(buf);
        s.1.push(LogOp::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.state.lock().unwrap().1.push(LogOp::Flush);
        Ok(())
    }
    fn truncate(&self, size: u64) -> blockdev::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.0.resize(size as usize, 0);
        s.1.push(LogOp::Truncate(size));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> blockdev::Result<()> {
        self.write_at(&vec![0u8; len as usize], offset)
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        let size = self.size()?;
        if offset < size {
            self.write_zeroes(offset, len.min(size - offset), true)?;
        }
        Ok(())
    }
    fn allocation(&self, _offset: u64, len: u64) -> blockdev::Result<(Allocation, u64)> {
        Ok((Allocation::Data, len))
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// The disk content after a crash: all ops of the first `epochs` flush epochs, then the
/// sectors of the next epoch's writes that `keep` selects.
pub fn crash_image(log: &[LogOp], epochs: usize, keep: &mut dyn FnMut() -> bool) -> Vec<u8> {
    let mut disk = Vec::new();
    let mut epoch = 0;
    for op in log {
        match op {
            LogOp::Flush => {
                epoch += 1;
                if epoch > epochs {
                    break;
                }
            }
            LogOp::Truncate(size) => {
                if epoch < epochs || keep() {
                    disk.resize(*size as usize, 0);
                }
            }
            LogOp::Write(off, data) => {
                let end = *off as usize + data.len();
                if epoch < epochs {
                    if end > disk.len() {
                        disk.resize(end, 0);
                    }
                    disk[*off as usize..end].copy_from_slice(data);
                    continue;
                }
                // Sector by sector: a disk may persist any of them.
                let mut pos = *off as usize;
                while pos < end {
                    let next = ((pos / 512) + 1) * 512;
                    let next = next.min(end);
                    if keep() {
                        if next > disk.len() {
                            disk.resize(next, 0);
                        }
                        disk[pos..next]
                            .copy_from_slice(&data[pos - *off as usize..next - *off as usize]);
                    }
                    pos = next;
                }
            }
        }
    }
    disk
}

impl RecordingStorage {
    /// The log so far.
    pub fn log(&self) -> Vec<LogOp> {
        self.state.lock().unwrap().1.clone()
    }

    /// Flushes so far.
    pub fn flushes(&self) -> usize {
        self.state
            .lock()
            .unwrap()
            .1
            .iter()
            .filter(|o| matches!(o, LogOp::Flush))
            .count()
    }
}

/// Flushes in `log`.
pub fn epochs(log: &[LogOp]) -> usize {
    log.iter().filter(|o| matches!(o, LogOp::Flush)).count()
}

/// The first epoch worth crashing in: past image creation (which is not crash-safe, nor is
/// qemu's), recognised as the first write beyond the three clusters create writes.
pub fn first_epoch_after_create(log: &[LogOp], cluster_size: u64) -> usize {
    log.iter()
        .position(|o| matches!(o, LogOp::Write(off, _) if *off >= 3 * cluster_size))
        .map(|p| epochs(&log[..p]) + 2)
        .unwrap_or(0)
}
