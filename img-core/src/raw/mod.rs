//! raw: the guest disk is the file, byte for byte.

mod create;
mod resize;

pub use create::{create, Preallocation, RawCreateOptions};
pub use resize::resize_file;

use crate::format::{Allocation, Extent, Format, FormatInfo, Mapping, ResizeOptions, ZeroMode};
use crate::{Error, Result};
use blockdev::Storage;
use std::sync::Arc;

/// A raw image over some storage.
pub struct Raw {
    storage: Arc<dyn Storage>,
    size: u64,
}

impl Raw {
    /// Opens `storage` as a raw image; its size is the virtual disk size.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self> {
        let size = storage.size()?;
        Ok(Raw { storage, size })
    }
}

impl Format for Raw {
    fn driver(&self) -> &'static str {
        "raw"
    }

    fn file_name(&self) -> &str {
        self.storage.name()
    }

    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn file(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn data_file(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    fn cluster_size(&self) -> u64 {
        // Raw never allocates; the number only bounds zero-write chunks.
        1 << 16
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        // Holes in the file read as zeros: reporting them lets convert and map skip them.
        let (alloc, n) = self.storage.allocation(offset, len)?;
        let mapping = match alloc {
            blockdev::Allocation::Data => Mapping::Data {
                offset,
                writable: !self.storage.is_read_only(),
            },
            blockdev::Allocation::Hole => Mapping::Zero,
        };
        Ok(Extent {
            mapping,
            len: n.clamp(1, len),
        })
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<Allocation> {
        // A hole is written in place: the "fresh" space is the range itself.
        Ok(Allocation {
            guest_offset: offset,
            host_offset: offset,
            len,
        })
    }

    fn commit(&self, _allocation: Allocation) -> Result<()> {
        Ok(())
    }

    fn zero_clusters(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<u64> {
        self.storage
            .write_zeroes(offset, len, mode == ZeroMode::MayUnmap)?;
        Ok(len)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.storage.discard(offset, len)?;
        Ok(())
    }

    fn resize(&mut self, size: u64, opts: &ResizeOptions) -> Result<()> {
        if self.storage.is_read_only() {
            return Err(Error::ReadOnly {
                file: self.file_name().to_string(),
            });
        }
        resize_file(self.storage.as_ref(), size, opts.prealloc)?;
        // The file may end up longer than asked (qemu writes a whole first block into an empty
        // file); the disk is the file.
        self.size = self.storage.size()?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(self.storage.flush()?)
    }

    fn info(&self) -> FormatInfo {
        FormatInfo::default()
    }

    fn is_read_only(&self) -> bool {
        self.storage.is_read_only()
    }
}
