//! [`IscsiStorage`]: a LUN as a [`Storage`]. Byte requests become block commands; requests that
//! do not start or end on a block boundary read the edge blocks, patch them and write them back
//! (like the file layer's O_DIRECT path), under the same lock as the rest of the request so that
//! two unaligned writes into one block cannot lose each other's bytes.

use super::context::{Capacity, Context, Limits};
use super::{IscsiError, IscsiUrl};
use crate::{Alignment, Allocation, Error, Result, Storage};
use std::sync::{Mutex, MutexGuard};

/// Largest data transfer of one READ/WRITE, when the target gives no smaller limit.
const MAX_TRANSFER: u64 = 1 << 20;

/// How to open a LUN.
#[derive(Clone, Debug, Default)]
pub struct IscsiOptions {
    /// Refuse writes.
    pub read_only: bool,
}

/// An iSCSI LUN reached through libiscsi.
///
/// One session per storage, behind a mutex: commands from several threads are serialised (a
/// first version; several commands in flight need libiscsi's asynchronous API).
pub struct IscsiStorage {
    /// The URL without the password, for messages.
    name: String,
    read_only: bool,
    capacity: Capacity,
    limits: Limits,
    /// Bytes per READ/WRITE command: a multiple of the block size.
    max_io: u64,
    ctx: Mutex<Context>,
}

impl std::fmt::Debug for IscsiStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiStorage")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl IscsiStorage {
    /// Logs in to the LUN named by the `iscsi://` URL `name` and reads its capacity and limits.
    pub fn open(name: &str, options: &IscsiOptions) -> Result<IscsiStorage> {
        let url = IscsiUrl::parse(name).map_err(|e| open_error(name, e))?;
        let shown = url.to_string();
        let mut ctx = Context::connect(&url).map_err(|e| open_error(&shown, e))?;
        let capacity = ctx.read_capacity().map_err(|e| open_error(&shown, e))?;
        let limits = ctx.limits();
        let bs = u64::from(capacity.block_size);
        let target_max = u64::from(limits.max_xfer_blocks) * bs;
        let max_io = match target_max {
            0 => MAX_TRANSFER,
            t => t.min(MAX_TRANSFER),
        }
        .max(bs)
            / bs
            * bs;
        Ok(IscsiStorage {
            name: shown,
            read_only: options.read_only,
            capacity,
            limits,
            max_io,
            ctx: Mutex::new(ctx),
        })
    }

    /// The logical block size.
    pub fn block_size(&self) -> u32 {
        self.capacity.block_size
    }

    /// Whether the target says unmapped blocks read as zeros (LBPRZ).
    pub fn unmapped_reads_zero(&self) -> bool {
        self.capacity.lbprz
    }

    /// Whether discard sends UNMAP (the LUN is thin and the target supports UNMAP).
    pub fn can_unmap(&self) -> bool {
        self.capacity.lbpme && self.limits.unmap
    }

    fn bs(&self) -> u64 {
        u64::from(self.capacity.block_size)
    }

    /// The session; a panic in another thread mid-command leaves nothing half-done that we
    /// rely on (each command is complete or failed), so a poisoned lock is taken over.
    fn lock(&self) -> MutexGuard<'_, Context> {
        self.ctx.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io_error(&self, op: &'static str, offset: u64, e: IscsiError) -> Error {
        Error::Io {
            op,
            name: self.name.clone(),
            offset,
            source: e.into_io(),
        }
    }

    fn check_range(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let size = self.capacity.blocks * self.bs();
        if offset.checked_add(len).is_some_and(|end| end <= size) {
            return Ok(());
        }
        if op == "read" {
            return Err(Error::PastEnd {
                name: self.name.clone(),
                offset,
                len,
                size,
            });
        }
        Err(self.io_error(
            op,
            offset,
            IscsiError::Protocol(format!(
                "{len} bytes go past the end of the LUN (size {size})"
            )),
        ))
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                name: self.name.clone(),
            });
        }
        Ok(())
    }

    /// Reads block-aligned `buf` at block-aligned `offset`, in commands of at most `max_io`.
    fn read_blocks(&self, ctx: &mut Context, buf: &mut [u8], offset: u64) -> Result<()> {
        let bs = self.capacity.block_size;
        for (i, chunk) in buf.chunks_mut(self.max_io as usize).enumerate() {
            let at = offset + i as u64 * self.max_io;
            ctx.read16(at / self.bs(), chunk, bs)
                .map_err(|e| self.io_error("read", at, e))?;
        }
        Ok(())
    }

    /// Writes block-aligned `buf` at block-aligned `offset`, in commands of at most `max_io`.
    fn write_blocks(&self, ctx: &mut Context, buf: &[u8], offset: u64) -> Result<()> {
        let bs = self.capacity.block_size;
        for (i, chunk) in buf.chunks(self.max_io as usize).enumerate() {
            let at = offset + i as u64 * self.max_io;
            ctx.write16(at / self.bs(), chunk, bs)
                .map_err(|e| self.io_error("write", at, e))?;
        }
        Ok(())
    }

    /// Writes `buf` into the block at block-aligned `block_at`, starting `skip` bytes in: read,
    /// patch, write back.
    fn patch_block(&self, ctx: &mut Context, block_at: u64, skip: usize, buf: &[u8]) -> Result<()> {
        let mut block = vec![0u8; self.bs() as usize];
        self.read_blocks(ctx, &mut block, block_at)?;
        block[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_blocks(ctx, &block, block_at)
    }

    /// Block-aligned writes of zeros over the block-aligned range, for targets (or callers)
    /// without WRITE SAME.
    fn write_zero_blocks(&self, ctx: &mut Context, offset: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; self.max_io.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_blocks(ctx, &zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// The largest run of blocks one WRITE SAME may cover here.
    fn write_same_step(&self) -> u64 {
        match self.limits.max_write_same_blocks {
            0 => 1 << 16,
            m => m.min(u64::from(u32::MAX)),
        }
    }
}

fn open_error(name: &str, e: IscsiError) -> Error {
    Error::Open {
        name: name.to_string(),
        source: e.into_io(),
    }
}

/// Splits `[offset, offset + len)` at block boundaries: the unaligned head (bytes in the first
/// block), the aligned middle, and the unaligned tail (bytes in the last block).
fn split(offset: u64, len: u64, bs: u64) -> (u64, u64, u64) {
    let into = offset % bs;
    let head = if into == 0 { 0 } else { (bs - into).min(len) };
    let rest = len - head;
    let middle = rest / bs * bs;
    (head, middle, rest - middle)
}

impl Storage for IscsiStorage {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> Result<u64> {
        Ok(self.capacity.blocks * self.bs())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range("read", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.bs();
        let mut ctx = self.lock();
        if offset.is_multiple_of(bs) && (buf.len() as u64).is_multiple_of(bs) {
            return self.read_blocks(&mut ctx, buf, offset);
        }
        // Unaligned: read the covering blocks, in pieces of at most `max_io`, and copy out.
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let start = at / bs * bs;
            let end = (offset + buf.len() as u64).min(start + self.max_io);
            let aligned_end = end.div_ceil(bs) * bs;
            let mut bounce = vec![0u8; (aligned_end - start) as usize];
            self.read_blocks(&mut ctx, &mut bounce, start)?;
            let n = (end - at) as usize;
            let from = (at - start) as usize;
            buf[done..done + n].copy_from_slice(&bounce[from..from + n]);
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range("write", offset, buf.len() as u64)?;
        let bs = self.bs();
        let (head, middle, tail) = split(offset, buf.len() as u64, bs);
        let mut ctx = self.lock();
        if head > 0 {
            self.patch_block(
                &mut ctx,
                offset / bs * bs,
                (offset % bs) as usize,
                &buf[..head as usize],
            )?;
        }
        let mid_at = offset + head;
        if middle > 0 {
            self.write_blocks(
                &mut ctx,
                &buf[head as usize..(head + middle) as usize],
                mid_at,
            )?;
        }
        if tail > 0 {
            self.patch_block(
                &mut ctx,
                mid_at + middle,
                0,
                &buf[(head + middle) as usize..],
            )?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.lock()
            .synchronize_cache()
            .map_err(|e| self.io_error("flush", 0, e))
    }

    fn truncate(&self, size: u64) -> Result<()> {
        crate::network::truncate_within(size, self.size()?, "iSCSI devices")
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range("write zeroes", offset, len)?;
        let bs = self.bs();
        let (head, middle, tail) = split(offset, len, bs);
        let mid_at = offset + head;
        {
            let mut ctx = self.lock();
            if head > 0 {
                let zeros = vec![0u8; head as usize];
                self.patch_block(&mut ctx, offset / bs * bs, (offset % bs) as usize, &zeros)?;
            }
            if tail > 0 {
                let zeros = vec![0u8; tail as usize];
                self.patch_block(&mut ctx, mid_at + middle, 0, &zeros)?;
            }
            // Without leave to unmap, or without WRITE SAME with UNMAP, plain writes of zeros:
            // WRITE SAME without UNMAP may still deallocate on some targets.
            if !(may_unmap && self.capacity.lbpme && self.limits.write_same_unmap) {
                return self.write_zero_blocks(&mut ctx, mid_at, middle);
            }
        }
        let step = self.write_same_step() * bs;
        let mut done = 0;
        while done < middle {
            let n = (middle - done).min(step);
            let at = mid_at + done;
            // Lock per command: a large zeroing does not hold off other requests for long.
            self.lock()
                .write_same_zeroes(at / bs, (n / bs) as u32, bs as u32, true)
                .map_err(|e| self.io_error("write zeroes", at, e))?;
            done += n;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range("discard", offset, len)?;
        if !self.can_unmap() {
            return Ok(());
        }
        // Discard is advisory: only whole blocks inside the range are unmapped.
        let bs = self.bs();
        let start = offset.div_ceil(bs) * bs;
        let end = (offset + len) / bs * bs;
        if end <= start {
            return Ok(());
        }
        let step_blocks = match self.limits.max_unmap_blocks {
            0 | u32::MAX => 1 << 22,
            m => u64::from(m),
        };
        let mut at = start;
        while at < end {
            let n = ((end - at) / bs).min(step_blocks);
            self.lock()
                .unmap(at / bs, n as u32)
                .map_err(|e| self.io_error("discard", at, e))?;
            at += n * bs;
        }
        Ok(())
    }

    fn allocation(&self, _offset: u64, len: u64) -> Result<(Allocation, u64)> {
        // GET LBA STATUS is not asked yet: everything counts as data (always correct, never
        // lets a caller skip zeros it could have skipped).
        Ok((Allocation::Data, len))
    }

    fn alignment(&self) -> Alignment {
        // Requests of whole blocks need no read-modify-write; memory has no constraint because
        // libiscsi copies through its own buffers.
        Alignment {
            memory: 1,
            request: self.capacity.block_size as usize,
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn split_at_block_boundaries() {
        assert_eq!(split(0, 1024, 512), (0, 1024, 0));
        assert_eq!(split(100, 10, 512), (10, 0, 0));
        assert_eq!(split(500, 100, 512), (12, 0, 88));
        assert_eq!(split(500, 1200, 512), (12, 1024, 164));
        assert_eq!(split(512, 700, 512), (0, 512, 188));
    }
}
