//! [`IscsiStorage`]: a LUN as a [`Storage`]. Byte requests become block commands; requests that
//! do not start or end on a block boundary read the edge blocks, patch them and write them back
//! (like the file layer's O_DIRECT path), under a lock that every such read-modify-write takes,
//! so that two unaligned writes into one block cannot lose each other's bytes.
//!
//! # Several commands in flight
//!
//! A LUN is served by a small pool of sessions (up to [`SESSIONS`] logins to the same LUN, made
//! on demand: a caller that finds every session busy logs in another), each behind its own
//! mutex, and each request is cut into commands of at most [`PIECE`] bytes of which up to
//! [`DEPTH`] are in flight at once on the caller's session (libiscsi's task API driven by our
//! own poll loop, see [`Context::run_batch`]). So one large request keeps the target busy (a
//! WRITE's data flows in bursts the target asks for one at a time; several commands overlap
//! those round trips), and requests from several threads (convert's workers) run side by side.
//!
//! Why sessions rather than one session with an event-loop thread: each session keeps the
//! synchronous shape of the first version (a request owns its session from start to end, no
//! thread hand-off per request, no cross-thread wake-ups), libiscsi's own reconnection works per
//! session exactly as before (each session logs in again by itself and retries its commands;
//! the UNIT ATTENTION each new login reports is retried per command), and a caller that uses one
//! thread (`info`, a single reader) never opens more than one session.
//!
//! Ordering and flushing across sessions: a request returns only when all its commands have
//! completed, so a write that returned is in the LUN whatever session carried it. SYNCHRONIZE
//! CACHE acts on the logical unit's cache, not on one session's (SBC: the cache belongs to the
//! logical unit), so a flush on any session covers every write completed before it, on every
//! session. Concurrent overlapping writes have no defined order (as for any disk).

use super::context::{Capacity, Context, Io, Limits};
use super::{IscsiError, IscsiUrl};
use crate::{Alignment, Allocation, Error, Result, Storage};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// Largest data transfer of one READ/WRITE, when the target gives no smaller limit.
const MAX_TRANSFER: u64 = 1 << 20;

/// Bytes per READ/WRITE command of a request (less when the target's limit is lower). Small
/// enough that a convert chunk (2 MiB) becomes several commands in flight; large enough that
/// per-command costs stay small.
pub const PIECE: u64 = 256 << 10;

/// READ/WRITE commands in flight at once on one session.
pub const DEPTH: usize = 8;

/// Sessions (logins) per LUN at most.
pub const SESSIONS: usize = 4;

/// How to open a LUN.
#[derive(Clone, Debug, Default)]
pub struct IscsiOptions {
    /// Refuse writes.
    pub read_only: bool,
}

/// An iSCSI LUN reached through libiscsi, over a pool of sessions with several commands in
/// flight on each (see the module documentation).
pub struct IscsiStorage {
    /// The URL without the password, for messages.
    name: String,
    /// The URL, to log in more sessions.
    url: IscsiUrl,
    read_only: bool,
    capacity: Capacity,
    limits: Limits,
    /// Bytes per READ/WRITE command: a multiple of the block size.
    max_io: u64,
    /// The sessions; the first `open` are logged in, the rest `None`.
    sessions: Vec<Mutex<Option<Context>>>,
    /// How many sessions are logged in.
    open: AtomicUsize,
    /// Held while logging in another session (one at a time).
    grow: Mutex<()>,
    /// Set when logging in another session failed: the target may limit sessions, so we make
    /// do with those we have.
    no_more_sessions: AtomicBool,
    /// Spreads callers that wait for a busy session over the sessions.
    next: AtomicUsize,
    /// Held across each read-modify-write of a partial block.
    edge: Mutex<()>,
    /// Cleared when the target refuses GET LBA STATUS.
    lba_status: AtomicBool,
    /// Flushes are skipped (cache mode `unsafe`, see [`IscsiStorage::ignoring_flush`]).
    ignore_flush: bool,
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

/// A session taken for one request.
struct Session<'a>(MutexGuard<'a, Option<Context>>);

impl std::ops::Deref for Session<'_> {
    type Target = Context;
    fn deref(&self) -> &Context {
        self.0.as_ref().expect("sessions handed out are logged in")
    }
}

impl std::ops::DerefMut for Session<'_> {
    fn deref_mut(&mut self) -> &mut Context {
        self.0.as_mut().expect("sessions handed out are logged in")
    }
}

/// Whether the operation is a read or a write, for [`IscsiStorage::transfer`].
enum Dir<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
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
        .min(PIECE)
        .max(bs)
            / bs
            * bs;
        let mut sessions = vec![Mutex::new(Some(ctx))];
        sessions.extend((1..SESSIONS).map(|_| Mutex::new(None)));
        Ok(IscsiStorage {
            name: shown,
            url,
            read_only: options.read_only,
            capacity,
            limits,
            max_io,
            sessions,
            open: AtomicUsize::new(1),
            grow: Mutex::new(()),
            no_more_sessions: AtomicBool::new(false),
            next: AtomicUsize::new(0),
            edge: Mutex::new(()),
            lba_status: AtomicBool::new(capacity.lbpme),
            ignore_flush: false,
        })
    }

    /// The storage with flushes skipped when `ignore` (cache mode `unsafe`: qemu-img's default
    /// for a convert target), as a file opened with that cache mode skips them. SYNCHRONIZE
    /// CACHE is not free: tgtd answers it by syncing its backing file, which after a convert
    /// costs as much as a third of the whole copy.
    pub fn ignoring_flush(mut self, ignore: bool) -> IscsiStorage {
        self.ignore_flush = ignore;
        self
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

    /// How many sessions are logged in to the LUN now (at most [`SESSIONS`]).
    pub fn sessions(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    fn bs(&self) -> u64 {
        u64::from(self.capacity.block_size)
    }

    /// A session for one request: a free one if there is, else a newly logged-in one while
    /// fewer than [`SESSIONS`] exist, else the next busy one in turn (waiting for it). A panic
    /// in another thread mid-command leaves nothing half-done that we rely on (each command is
    /// complete or failed), so a poisoned lock is taken over.
    fn session(&self) -> Session<'_> {
        let open = self.open.load(Ordering::Acquire);
        for s in &self.sessions[..open] {
            match s.try_lock() {
                Ok(g) => return Session(g),
                Err(TryLockError::Poisoned(p)) => return Session(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        if open < SESSIONS && !self.no_more_sessions.load(Ordering::Relaxed) {
            if let Ok(_grow) = self.grow.try_lock() {
                let open = self.open.load(Ordering::Acquire);
                if open < SESSIONS {
                    // Slots at or past `open` are used by nobody but the one holding `grow`.
                    let mut slot = lock(&self.sessions[open]);
                    match Context::connect(&self.url) {
                        Ok(ctx) => {
                            *slot = Some(ctx);
                            self.open.store(open + 1, Ordering::Release);
                            return Session(slot);
                        }
                        Err(_) => self.no_more_sessions.store(true, Ordering::Relaxed),
                    }
                }
            }
        }
        let open = self.open.load(Ordering::Acquire);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % open;
        Session(lock(&self.sessions[i]))
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

    /// Reads or writes the block-aligned buffer at block-aligned `offset` on one session, as
    /// commands of at most `max_io` bytes with up to [`DEPTH`] in flight.
    fn transfer(&self, ctx: &mut Context, dir: Dir<'_>, offset: u64) -> Result<()> {
        let bs = self.bs();
        let step = self.max_io as usize;
        let (op, mut ios): (&'static str, Vec<Io<'_>>) = match dir {
            Dir::Read(buf) => (
                "read",
                buf.chunks_mut(step)
                    .enumerate()
                    .map(|(i, b)| Io::Read {
                        lba: (offset + (i * step) as u64) / bs,
                        buf: b,
                    })
                    .collect(),
            ),
            Dir::Write(buf) => (
                "write",
                buf.chunks(step)
                    .enumerate()
                    .map(|(i, b)| Io::Write {
                        lba: (offset + (i * step) as u64) / bs,
                        buf: b,
                    })
                    .collect(),
            ),
        };
        ctx.run_batch(&mut ios, self.capacity.block_size, DEPTH)
            .map_err(|(i, e)| self.io_error(op, offset + (i * step) as u64, e))
    }

    /// Reads block-aligned `buf` at block-aligned `offset`.
    fn read_blocks(&self, ctx: &mut Context, buf: &mut [u8], offset: u64) -> Result<()> {
        self.transfer(ctx, Dir::Read(buf), offset)
    }

    /// Writes block-aligned `buf` at block-aligned `offset`.
    fn write_blocks(&self, ctx: &mut Context, buf: &[u8], offset: u64) -> Result<()> {
        self.transfer(ctx, Dir::Write(buf), offset)
    }

    /// Writes `buf` into the block at block-aligned `block_at`, starting `skip` bytes in: read,
    /// patch, write back, holding the edge lock throughout.
    fn patch_block(&self, block_at: u64, skip: usize, buf: &[u8]) -> Result<()> {
        let _edge = lock(&self.edge);
        let mut ctx = self.session();
        let mut block = vec![0u8; self.bs() as usize];
        self.read_blocks(&mut ctx, &mut block, block_at)?;
        block[skip..skip + buf.len()].copy_from_slice(buf);
        self.write_blocks(&mut ctx, &block, block_at)
    }

    /// Block-aligned writes of zeros over the block-aligned range, for targets (or callers)
    /// without WRITE SAME.
    fn write_zero_blocks(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        // One buffer of zeros, named by every command of a batch.
        let span = (self.max_io * DEPTH as u64).min(len);
        let zeros = vec![0u8; self.max_io.min(len) as usize];
        let mut ctx = self.session();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(span);
            let mut ios: Vec<Io<'_>> = (0..n.div_ceil(self.max_io))
                .map(|i| {
                    let at = done + i * self.max_io;
                    let k = (n - i * self.max_io).min(self.max_io) as usize;
                    Io::Write {
                        lba: (offset + at) / self.bs(),
                        buf: &zeros[..k],
                    }
                })
                .collect();
            ctx.run_batch(&mut ios, self.capacity.block_size, DEPTH)
                .map_err(|(i, e)| {
                    self.io_error("write zeroes", offset + done + i as u64 * self.max_io, e)
                })?;
            done += n;
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

/// Locks a mutex whose data stays consistent across a panic (see [`IscsiStorage::session`]).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        let mut ctx = self.session();
        if offset.is_multiple_of(bs) && (buf.len() as u64).is_multiple_of(bs) {
            return self.read_blocks(&mut ctx, buf, offset);
        }
        // Unaligned: read the covering blocks and copy out.
        let start = offset / bs * bs;
        let end = (offset + buf.len() as u64).div_ceil(bs) * bs;
        let mut bounce = vec![0u8; (end - start) as usize];
        self.read_blocks(&mut ctx, &mut bounce, start)?;
        let from = (offset - start) as usize;
        buf.copy_from_slice(&bounce[from..from + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range("write", offset, buf.len() as u64)?;
        let bs = self.bs();
        let (head, middle, tail) = split(offset, buf.len() as u64, bs);
        if head > 0 {
            self.patch_block(
                offset / bs * bs,
                (offset % bs) as usize,
                &buf[..head as usize],
            )?;
        }
        let mid_at = offset + head;
        if middle > 0 {
            let mut ctx = self.session();
            self.write_blocks(
                &mut ctx,
                &buf[head as usize..(head + middle) as usize],
                mid_at,
            )?;
        }
        if tail > 0 {
            self.patch_block(mid_at + middle, 0, &buf[(head + middle) as usize..])?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if self.read_only || self.ignore_flush {
            return Ok(());
        }
        // Any session: the cache is the logical unit's (see the module documentation).
        self.session()
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
        if head > 0 {
            let zeros = vec![0u8; head as usize];
            self.patch_block(offset / bs * bs, (offset % bs) as usize, &zeros)?;
        }
        if tail > 0 {
            let zeros = vec![0u8; tail as usize];
            self.patch_block(mid_at + middle, 0, &zeros)?;
        }
        // Without leave to unmap, or without WRITE SAME with UNMAP, plain writes of zeros:
        // WRITE SAME without UNMAP may still deallocate on some targets.
        if !(may_unmap && self.capacity.lbpme && self.limits.write_same_unmap) {
            return self.write_zero_blocks(mid_at, middle);
        }
        let step = self.write_same_step() * bs;
        let mut done = 0;
        while done < middle {
            let at = mid_at + done;
            let mut n = (middle - done).min(step);
            // Blocks the target reports deallocated already read as zeros (with LBPRZ): asking
            // costs one round trip where WRITE SAME over them costs the target real work
            // (tgtd punches a hole in its file each time), and convert -n zeroes every hole
            // of the source this way.
            if self.capacity.lbprz {
                match self.allocation(at, n)? {
                    (Allocation::Hole, run) => {
                        done += run;
                        continue;
                    }
                    (Allocation::Data, run) => n = run.max(bs) / bs * bs,
                }
            }
            // A session per command: a large zeroing does not hold one for long.
            self.session()
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
            self.session()
                .unmap(at / bs, n as u32)
                .map_err(|e| self.io_error("discard", at, e))?;
            at += n * bs;
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        // GET LBA STATUS on a thin LUN; a deallocated run is a hole only when the target says
        // deallocated blocks read as zeros (LBPRZ). Without the command (or with an answer we
        // do not understand) everything is data: always correct, only slower to copy.
        if !self.lba_status.load(Ordering::Relaxed) || len == 0 {
            return Ok((Allocation::Data, len));
        }
        self.check_range("block status", offset, len)?;
        let bs = self.bs();
        let lba = offset / bs;
        let (mapped, blocks) = match self.session().lba_status(lba) {
            Ok(r) => r,
            Err(e) if e.is_illegal_request() => {
                self.lba_status.store(false, Ordering::Relaxed);
                return Ok((Allocation::Data, len));
            }
            Err(e) => return Err(self.io_error("block status", offset, e)),
        };
        if blocks == 0 {
            return Ok((Allocation::Data, len));
        }
        let run = ((lba + blocks) * bs - offset).min(len);
        if !mapped && self.capacity.lbprz {
            Ok((Allocation::Hole, run))
        } else {
            Ok((Allocation::Data, run))
        }
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
