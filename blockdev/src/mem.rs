//! Storage held in memory, for fuzzing and tests.
//!
//! A fuzz target hands the formats an image that exists only as bytes; [`MemStorage`] serves
//! them without a file, so a run is fast, leaves nothing behind, and cannot touch the disk.
//! Its size is capped: an image that asks the format to grow its file past the cap gets
//! ENOSPC, so a hostile image cannot make a test allocate memory without bound through writes.

use std::io;
use std::sync::RwLock;

use crate::{Allocation, Error, Result, Storage};

/// Bytes in memory behind the [`Storage`] trait. Reads past the end are errors, as on a file;
/// writes grow it up to `max_size`.
#[derive(Debug)]
pub struct MemStorage {
    name: String,
    data: RwLock<Vec<u8>>,
    read_only: bool,
    max_size: u64,
}

impl MemStorage {
    /// Storage named `name` (for messages) holding `data`, growing to at most `max_size` bytes.
    pub fn new(name: &str, data: Vec<u8>, read_only: bool, max_size: u64) -> MemStorage {
        MemStorage {
            name: name.to_string(),
            data: RwLock::new(data),
            read_only,
            max_size,
        }
    }

    /// A copy of the bytes held now.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn io_error(&self, op: &'static str, offset: u64, errno: i32) -> Error {
        Error::Io {
            op,
            name: self.name.clone(),
            offset,
            source: io::Error::from_raw_os_error(errno),
        }
    }

    /// Checks a change of `len` bytes at `offset` and returns the end it needs.
    fn writable_end(&self, op: &'static str, offset: u64, len: u64) -> Result<usize> {
        if self.read_only {
            return Err(Error::ReadOnly {
                name: self.name.clone(),
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.max_size => Ok(end as usize),
            _ => Err(self.io_error(op, offset, libc::ENOSPC)),
        }
    }

    /// Runs `f` on the bytes `offset..offset+len`, growing the storage to hold them.
    fn change(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut [u8]),
    ) -> Result<()> {
        let end = self.writable_end(op, offset, len)?;
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        if data.len() < end {
            data.resize(end, 0);
        }
        f(&mut data[offset as usize..end]);
        Ok(())
    }
}

impl Storage for MemStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> Result<u64> {
        Ok(self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        let size = data.len() as u64;
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= size => {
                buf.copy_from_slice(&data[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(Error::PastEnd {
                name: self.name.clone(),
                offset,
                len: buf.len() as u64,
                size,
            }),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.change("write", offset, buf.len() as u64, |d| {
            d.copy_from_slice(buf)
        })
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.writable_end("truncate", size, 0)?;
        self.data
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .resize(size as usize, 0);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> Result<()> {
        self.change("write zeroes", offset, len, |d| d.fill(0))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Discarded bytes read as zeros, as on a file with holes; the size does not change.
        let size = self.size()?;
        let end = offset.saturating_add(len).min(size);
        if offset < end {
            self.change("discard", offset, end - offset, |d| d.fill(0))?;
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        let _ = offset;
        Ok((Allocation::Data, len))
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_and_refuses_past_the_cap() {
        let m = MemStorage::new("m", vec![1, 2, 3], false, 8);
        let mut b = [0u8; 3];
        m.read_at(&mut b, 0).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert!(m.read_at(&mut b, 1).is_err(), "a read past the end fails");
        m.write_at(&[9, 9], 5).unwrap();
        assert_eq!(m.contents(), vec![1, 2, 3, 0, 0, 9, 9]);
        let e = m.write_at(&[1, 1], 7).unwrap_err();
        assert!(e.to_string().contains("No space left"), "{e}");
        assert!(m.truncate(9).is_err());
        m.discard(1, 100).unwrap();
        assert_eq!(m.contents(), vec![1, 0, 0, 0, 0, 0, 0]);
        let ro = MemStorage::new("r", vec![0; 4], true, 8);
        assert!(matches!(ro.write_at(&[1], 0), Err(Error::ReadOnly { .. })));
    }
}
