//! Copying the content of one or more images into another (`img convert`).
//!
//! The target is cut into chunks. Several workers (`-m`) take chunks in turn: each asks the
//! sources for block status (ranges that read as zeros are never read), reads the rest, scans
//! it for zero runs of at least `min_sparse` bytes (skipped, as qemu-img does with `-S`), and
//! compresses clusters when asked to (so compression runs on all workers at once). Writes
//! then happen in chunk order, or as soon as each chunk is ready with `-W`.

use crate::{Image, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

/// Bytes of a source whose block status one question covers at most (see `zero_status`).
const STATUS_SPAN: u64 = 1 << 30;

/// How to convert.
#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions {
    /// `-S`: zero runs of at least this many bytes are not written; 0 writes everything
    /// (a fully allocated target).
    pub min_sparse: u64,
    /// `-c`: write whole target clusters compressed.
    pub compress: bool,
    /// The target reads as zeros already (freshly created), so zero ranges need no write.
    pub target_is_zero: bool,
    /// Bytes per chunk (rounded up to the target's cluster size).
    pub chunk: usize,
    /// `-m`: chunks in flight at once.
    pub parallel: usize,
    /// `-W`: chunks may be written out of order.
    pub out_of_order: bool,
    /// `-C`: copy raw data extents between raw files inside the kernel (copy_file_range,
    /// reflinks where the filesystem shares extents). Holes still stay holes; zeros inside
    /// data extents are not looked for, since the data is never read.
    pub copy_offload: bool,
    /// `-B`: the target has a backing file that already holds what the sources' backing
    /// chains hold, so only what the sources' own (top) images allocate is written; the rest
    /// is left unallocated in the target.
    pub target_has_backing: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            min_sparse: 4096,
            compress: false,
            target_is_zero: true,
            chunk: 2 << 20,
            parallel: 8,
            out_of_order: false,
            copy_offload: false,
            target_has_backing: false,
        }
    }
}

/// One write a chunk needs.
enum Op {
    /// Bytes `range` of the chunk buffer go to the target at the chunk offset plus `range.start`.
    Data(std::ops::Range<usize>),
    /// The range reads as zeros.
    Zero(std::ops::Range<usize>),
    /// One cluster, compressed when that shrinks it.
    Cluster(std::ops::Range<usize>, Option<Vec<u8>>),
    /// Copied in the kernel from source `src` at `from`.
    Copy {
        src: usize,
        from: u64,
        range: std::ops::Range<usize>,
    },
}

/// A chunk ready to be written.
struct Plan {
    offset: u64,
    buf: Vec<u8>,
    ops: Vec<Op>,
}

/// Copies the concatenation of `sources` into `target`, calling `progress(done, total)` as
/// chunks are written.
pub fn convert(
    sources: &[&Image],
    target: &Image,
    opts: &ConvertOptions,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<()> {
    let total: u64 = sources.iter().map(|s| s.size()).sum();
    let cs = target.format().cluster_size();
    let chunk = (opts.chunk as u64).div_ceil(cs).max(1) * cs;
    let chunks = total.div_ceil(chunk);
    let job = Job {
        sources,
        target,
        opts,
        total,
        chunk,
        next_chunk: AtomicU64::new(0),
        written: Mutex::new(Written {
            next: 0,
            ready: std::collections::BTreeMap::new(),
            writing: false,
            bytes: 0,
            progress,
        }),
        turn: Condvar::new(),
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        spare_buffers: Mutex::new(Vec::new()),
        status: sources.iter().map(|_| Mutex::new((0, 0, false))).collect(),
        live: Mutex::new(0),
        slot_free: Condvar::new(),
    };
    {
        let mut w = job.written.lock().unwrap_or_else(|e| e.into_inner());
        (w.progress)(0, total);
    }
    let workers = opts.parallel.clamp(1, 64).min(chunks.max(1) as usize);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| job.work(chunks));
        }
    });
    if let Some(e) = job.error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        // What was written still gets its metadata (as qemu-img leaves it): the clusters
        // written so far are then referenced rather than leaked. A flush that fails too (the
        // disk is full) leaves them leaked, which `check -r leaks` repairs.
        let _ = target.flush();
        return Err(e);
    }
    target.flush()
}

/// Progress of the writes, under one lock: the next chunk allowed to write (in order mode)
/// and the bytes done.
struct Written<'p> {
    /// The next chunk to write, in order mode.
    next: u64,
    /// Planned chunks waiting for their turn (order mode).
    ready: std::collections::BTreeMap<u64, Plan>,
    /// Whether some worker is writing the ready chunks in order.
    writing: bool,
    bytes: u64,
    progress: &'p mut (dyn FnMut(u64, u64) + Send),
}

struct Job<'a, 'p> {
    sources: &'a [&'a Image],
    target: &'a Image,
    opts: &'a ConvertOptions,
    /// Bytes of all sources together.
    total: u64,
    chunk: u64,
    next_chunk: AtomicU64,
    written: Mutex<Written<'p>>,
    turn: Condvar,
    failed: AtomicBool,
    error: Mutex<Option<crate::Error>>,
    /// Chunk buffers written out and free for the next chunks: a fresh zeroed buffer per
    /// chunk costs a memset of the whole chunk (or page faults), which showed as a tenth of a
    /// convert's time.
    spare_buffers: Mutex<Vec<Vec<u8>>>,
    /// Per source, the last block status asked: `(start, end, zero)`. See `zero_status`.
    status: Vec<Mutex<(u64, u64, bool)>>,
    /// Chunks taken and not yet written (each holds a buffer), at most `max_live()`.
    live: Mutex<usize>,
    /// Signalled when a chunk is written (or the convert failed).
    slot_free: Condvar,
}

impl Job<'_, '_> {
    fn work(&self, chunks: u64) {
        loop {
            // The slot is taken before the chunk: a worker that holds a chunk index always
            // holds a slot, so the chunk next in order can always be read and written, and
            // the chunks waiting for it can never hold every slot.
            if !self.acquire_slot() {
                self.turn.notify_all();
                return;
            }
            let index = self.next_chunk.fetch_add(1, Ordering::Relaxed);
            if index >= chunks || self.failed.load(Ordering::Relaxed) {
                self.release_slot();
                // Let anyone waiting for this chunk's turn go on (and find the failure).
                self.turn.notify_all();
                return;
            }
            let offset = index * self.chunk;
            let len = self.chunk.min(self.total - offset);
            let result = self
                .plan(offset, len as usize)
                .map_err(|e| convert_io("reading", offset, e))
                .and_then(|plan| self.write_in_turn(index, plan));
            if let Err(e) = result {
                self.failed.store(true, Ordering::Relaxed);
                self.error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e);
                self.turn.notify_all();
                self.slot_free.notify_all();
                return;
            }
        }
    }

    /// How many chunks may be read and not yet written at once: each holds a chunk buffer,
    /// and every buffer ever allocated is first touched (page faults, a kernel zeroing each
    /// page) by the read into it. Without a bound the workers ran up to three times
    /// `parallel` chunks ahead, and the faults on that many buffers cost more than a fifth
    /// of a raw-to-raw convert's CPU time.
    fn max_live(&self) -> usize {
        self.opts.parallel.max(1) + 2
    }

    /// Waits for a free slot (see `max_live`); false when the convert failed meanwhile.
    fn acquire_slot(&self) -> bool {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        while *live >= self.max_live() && !self.failed.load(Ordering::Relaxed) {
            live = self.slot_free.wait(live).unwrap_or_else(|e| e.into_inner());
        }
        if self.failed.load(Ordering::Relaxed) {
            return false;
        }
        *live += 1;
        true
    }

    fn release_slot(&self) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        *live -= 1;
        drop(live);
        self.slot_free.notify_one();
    }

    /// Reads the chunk at target offset `offset` from the sources and decides its writes.
    fn plan(&self, offset: u64, len: usize) -> Result<Plan> {
        if self.offloading() {
            return self.plan_offloaded(offset, len);
        }
        // Every byte of a reused buffer that is used is overwritten below: read, or zeroed
        // (skips, the tail past the sources, holes when compressing).
        let mut buf = self.take_buffer(len);
        // Ranges of the chunk known to read as zeros without reading them.
        let mut holes: Vec<std::ops::Range<usize>> = Vec::new();
        // Ranges left to the target's backing file (with `target_has_backing`).
        let mut skips: Vec<std::ops::Range<usize>> = Vec::new();
        let mut base = 0u64;
        for (i, src) in self.sources.iter().enumerate() {
            let (start, end) = (base, base + src.size());
            base = end;
            let (from, to) = (offset.max(start), (offset + len as u64).min(end));
            if from >= to {
                continue;
            }
            let mut pos = from;
            while pos < to {
                if self.opts.target_has_backing {
                    // What the source leaves to its backing chain, the target leaves to its.
                    let own = src.format().map(pos - start, to - pos)?;
                    if own.mapping == crate::format::Mapping::Unallocated {
                        let n = own.len.min(to - pos);
                        let at = (pos - offset) as usize..(pos - offset + n) as usize;
                        buf[at.clone()].fill(0);
                        skips.push(at);
                        pos += n;
                        continue;
                    }
                }
                let (zero, n) = self.zero_status(i, pos - start, to - pos)?;
                let at = (pos - offset) as usize..(pos - offset + n) as usize;
                if zero && self.opts.min_sparse != 0 {
                    // Only compression looks at a hole's bytes (a cluster that is partly
                    // hole is compressed whole); otherwise holes become Zero ops and their
                    // bytes are never read, so zeroing them would only cost a memset (and
                    // page faults on a fresh buffer).
                    if self.opts.compress {
                        buf[at.clone()].fill(0);
                    }
                    holes.push(at);
                } else {
                    src.read_at(&mut buf[at], pos - start)?;
                }
                pos += n;
            }
        }
        let covered = base.saturating_sub(offset).min(len as u64) as usize;
        buf[covered..].fill(0);
        if self.opts.compress && !skips.is_empty() {
            // A compressed cluster is written whole: the parts of a cluster the source leaves
            // to its backing file are read through the chain, unless the whole cluster is
            // left to it.
            skips = self.fill_partial_clusters(offset, &mut buf, skips)?;
        }
        let ops = if self.opts.compress {
            self.compressed_ops(offset, &buf, &holes)
        } else if self.opts.min_sparse == 0 {
            vec![Op::Data(0..len)]
        } else {
            self.sparse_ops(offset, &buf, &holes)
        };
        let ops = without(ops, &skips);
        Ok(Plan { offset, buf, ops })
    }

    /// Whether source `i` reads as zeros at `pos`, and for how many bytes (at most `max`).
    /// The status is asked for up to [`STATUS_SPAN`] bytes at once and remembered, so that a
    /// source is asked once per extent rather than once per chunk: a raw file's
    /// SEEK_DATA/SEEK_HOLE pair costs up to hundreds of microseconds, a network disk's a round
    /// trip. The lock is held while asking, so that workers planning neighbouring chunks wait
    /// for one answer instead of all asking the same question.
    fn zero_status(&self, i: usize, pos: u64, max: u64) -> Result<(bool, u64)> {
        let mut cached = self.status[i].lock().unwrap_or_else(|e| e.into_inner());
        let (start, end, zero) = *cached;
        if !(start <= pos && pos < end) {
            let src = self.sources[i];
            let span = (src.size() - pos).min(STATUS_SPAN).max(max);
            let status = src.block_status(pos, span)?;
            *cached = (pos, pos + status.len, status.zero);
            return Ok((status.zero, status.len.min(max)));
        }
        Ok((zero, (end - pos).min(max)))
    }

    /// Reads into `buf` the skipped ranges of target clusters that are only partly skipped;
    /// returns the ranges still skipped (whole clusters).
    fn fill_partial_clusters(
        &self,
        offset: u64,
        buf: &mut [u8],
        skips: Vec<std::ops::Range<usize>>,
    ) -> Result<Vec<std::ops::Range<usize>>> {
        let cs = self.target.format().cluster_size();
        // Pieces of skips that do not cross cluster boundaries.
        let mut pieces = Vec::new();
        for r in skips {
            let mut at = r.start;
            while at < r.end {
                let next_boundary = ((offset + at as u64) / cs + 1) * cs - offset;
                let end = (next_boundary as usize).min(r.end);
                pieces.push(at..end);
                at = end;
            }
        }
        let cluster_of = |i: usize| (offset + i as u64) / cs;
        let mut kept = Vec::new();
        for p in &pieces {
            let c = cluster_of(p.start);
            let c_start = (c * cs).saturating_sub(offset) as usize;
            let c_end = (((c + 1) * cs - offset) as usize).min(buf.len());
            let skipped: usize = pieces
                .iter()
                .filter(|q| cluster_of(q.start) == c)
                .map(|q| q.len())
                .sum();
            if skipped == c_end - c_start {
                kept.push(p.clone());
            } else {
                self.read_sources(&mut buf[p.clone()], offset + p.start as u64)?;
            }
        }
        Ok(kept)
    }

    /// Reads the concatenated sources at target offset `offset`.
    fn read_sources(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut base = 0u64;
        for src in self.sources {
            let (start, end) = (base, base + src.size());
            base = end;
            let (from, to) = (offset.max(start), (offset + buf.len() as u64).min(end));
            if from < to {
                let at = (from - offset) as usize..(to - offset) as usize;
                src.read_at(&mut buf[at], from - start)?;
            }
        }
        Ok(())
    }

    /// Whether data moves file to file in the kernel: asked for, and every image is a raw file.
    fn offloading(&self) -> bool {
        let raw_file =
            |i: &Image| i.format().driver() == "raw" && i.format().data_file().as_file().is_some();
        self.opts.copy_offload
            && !self.opts.compress
            && raw_file(self.target)
            && self.sources.iter().all(|s| raw_file(s))
    }

    /// A chunk as kernel copies of its data extents and zero ranges for its holes.
    fn plan_offloaded(&self, offset: u64, len: usize) -> Result<Plan> {
        let mut ops = Vec::new();
        let mut base = 0u64;
        for (i, src) in self.sources.iter().enumerate() {
            let (start, end) = (base, base + src.size());
            base = end;
            let (from, to) = (offset.max(start), (offset + len as u64).min(end));
            let mut pos = from;
            while pos < to {
                let (zero, n) = self.zero_status(i, pos - start, to - pos)?;
                let range = (pos - offset) as usize..(pos - offset + n) as usize;
                if zero {
                    ops.push(Op::Zero(range));
                } else {
                    ops.push(Op::Copy {
                        src: i,
                        from: pos - start,
                        range,
                    });
                }
                pos += n;
            }
        }
        Ok(Plan {
            offset,
            buf: Vec::new(),
            ops,
        })
    }

    /// Splits the chunk into data and zero runs; zero runs shorter than `min_sparse` (in
    /// units aligned to absolute offsets, so chunking does not change the result) are data.
    fn sparse_ops(&self, offset: u64, buf: &[u8], holes: &[std::ops::Range<usize>]) -> Vec<Op> {
        let unit = self.opts.min_sparse;
        let len = buf.len();
        let in_hole = |i: usize| holes.iter().any(|h| h.contains(&i));
        let unit_end = |i: usize| {
            let abs = offset + i as u64;
            let mut e = (((abs / unit) + 1) * unit - offset).min(len as u64) as usize;
            // Never let a unit straddle a hole edge: holes are exact.
            for h in holes {
                if h.start > i && h.start < e {
                    e = h.start;
                }
                if h.end > i && h.end < e {
                    e = h.end;
                }
            }
            e
        };
        let mut ops: Vec<Op> = Vec::new();
        let mut i = 0;
        while i < len {
            let e = unit_end(i);
            let zero = in_hole(i) || (e - i == unit as usize && is_zero(&buf[i..e]));
            // Whole units (or hole pieces) of zeros are skipped; merge with the previous op
            // when it is of the same kind.
            match (ops.last_mut(), zero) {
                (Some(Op::Zero(r)), true) | (Some(Op::Data(r)), false) if r.end == i => r.end = e,
                (_, true) => ops.push(Op::Zero(i..e)),
                (_, false) => ops.push(Op::Data(i..e)),
            }
            i = e;
        }
        ops
    }

    /// One op per target cluster: zero clusters are skipped, the others compressed here, on
    /// this worker's thread.
    fn compressed_ops(&self, offset: u64, buf: &[u8], holes: &[std::ops::Range<usize>]) -> Vec<Op> {
        let cs = self.target.format().cluster_size() as usize;
        let mut ops = Vec::new();
        let mut i = 0;
        while i < buf.len() {
            let e = (i + cs).min(buf.len());
            let hole = holes.iter().any(|h| h.start <= i && e <= h.end);
            if hole || is_zero(&buf[i..e]) {
                ops.push(Op::Zero(i..e));
            } else {
                let c = self.target.compress_cluster(offset + i as u64, &buf[i..e]);
                ops.push(Op::Cluster(i..e, c));
            }
            i = e;
        }
        ops
    }

    /// Writes a planned chunk, waiting for its turn unless writes may be out of order.
    /// Writes a planned chunk: at once with `-W`; otherwise it joins the chunks waiting for
    /// their turn, and whichever worker finds no writer at work writes every chunk that is
    /// next in order while the others go on reading and planning. Planning runs at most
    /// `2 * parallel` chunks ahead of the writes, which bounds memory.
    fn write_in_turn(&self, index: u64, plan: Plan) -> Result<()> {
        if self.opts.out_of_order || self.order_is_free() {
            let bytes: u64 = plan.ops.iter().map(Op::len).sum();
            let result = self.write(plan.offset, &plan.buf, plan.ops);
            self.give_back(plan.buf);
            self.account(bytes);
            return result;
        }
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        w.ready.insert(index, plan);
        if w.writing {
            // Hold back while too far ahead of the writer.
            let window = 2 * self.opts.parallel.max(1) as u64;
            while index >= w.next + window && !self.failed.load(Ordering::Relaxed) {
                w = self.turn.wait(w).unwrap_or_else(|e| e.into_inner());
            }
            return Ok(());
        }
        w.writing = true;
        loop {
            let next = w.next;
            let Some(plan) = w.ready.remove(&next) else {
                w.writing = false;
                return Ok(());
            };
            drop(w);
            let bytes: u64 = plan.ops.iter().map(Op::len).sum();
            let result = self.write(plan.offset, &plan.buf, plan.ops);
            self.give_back(plan.buf);
            w = self.written.lock().unwrap_or_else(|e| e.into_inner());
            w.next += 1;
            w.bytes += bytes;
            let (done, total) = (w.bytes, self.total);
            (w.progress)(done, total);
            self.turn.notify_all();
            if let Err(e) = result {
                w.writing = false;
                return Err(e);
            }
            if self.failed.load(Ordering::Relaxed) {
                w.writing = false;
                return Ok(());
            }
        }
    }

    /// Whether writing chunks in any order gives the same target as writing them in order,
    /// at no cost: a raw target on a network block device (an iSCSI LUN, an RBD image), where
    /// nothing is allocated in write order (no image format, no local filesystem laying out
    /// a file). Writing each chunk as soon as it is read keeps several writes in flight
    /// (qemu-img does the same with `-W`, which its manual recommends for such targets);
    /// strictly in order, one write at a time is all a single writer can have.
    fn order_is_free(&self) -> bool {
        let f = self.target.format();
        !self.opts.compress && f.driver() == "raw" && f.data_file().as_file().is_none()
    }

    /// A buffer of `len` bytes (at most a chunk) whose contents are undefined.
    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let spare = self
            .spare_buffers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        // A fresh buffer comes zeroed from the allocator (untouched pages, faulted in only
        // where data is read into them), not memset by `resize`.
        let mut buf = spare.unwrap_or_else(|| vec![0u8; len]);
        buf.resize(len, 0);
        buf
    }

    /// Keeps a written chunk's buffer for a later chunk (as many as can be live at once,
    /// so that no buffer is freed and allocated, and faulted in, again), and frees its slot.
    fn give_back(&self, buf: Vec<u8>) {
        let mut spare = self.spare_buffers.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < self.max_live() {
            spare.push(buf);
        }
        drop(spare);
        self.release_slot();
    }

    /// Counts written bytes and reports progress.
    fn account(&self, bytes: u64) {
        let mut w = self.written.lock().unwrap_or_else(|e| e.into_inner());
        w.next += 1;
        w.bytes += bytes;
        let (done, total) = (w.bytes, self.total);
        (w.progress)(done, total);
        drop(w);
        self.turn.notify_all();
    }

    fn write(&self, offset: u64, buf: &[u8], ops: Vec<Op>) -> Result<()> {
        self.write_ops(offset, buf, ops)
            .map_err(|e| convert_io("writing", offset, e))
    }

    fn write_ops(&self, offset: u64, buf: &[u8], ops: Vec<Op>) -> Result<()> {
        let t = self.target;
        for op in ops {
            match op {
                Op::Data(r) => t.write_at(&buf[r.clone()], offset + r.start as u64)?,
                Op::Zero(r) => {
                    if !self.opts.target_is_zero {
                        t.write_zeroes(offset + r.start as u64, r.len() as u64, true)?;
                    }
                }
                Op::Cluster(r, c) => {
                    t.write_precompressed(offset + r.start as u64, &buf[r.clone()], c)?
                }
                Op::Copy { src, from, range } => self.copy(
                    self.sources[src],
                    from,
                    offset + range.start as u64,
                    range.len(),
                )?,
            }
        }
        Ok(())
    }
}

impl Op {
    /// Bytes of the chunk the op covers.
    fn len(&self) -> u64 {
        match self {
            Op::Data(r) | Op::Zero(r) | Op::Cluster(r, _) | Op::Copy { range: r, .. } => {
                r.len() as u64
            }
        }
    }
}

/// A read or write failure of a convert, with where it happened (once: an error that already
/// says so is kept).
fn convert_io(op: &'static str, offset: u64, e: crate::Error) -> crate::Error {
    match e {
        e @ crate::Error::ConvertIo { .. } => e,
        e => crate::Error::ConvertIo {
            op,
            offset,
            source: Box::new(e),
        },
    }
}

/// The ops with the ranges `skips` (sorted, disjoint) cut out of them: those bytes are not
/// written at all. A compressed cluster that loses part of itself is written plainly.
fn without(ops: Vec<Op>, skips: &[std::ops::Range<usize>]) -> Vec<Op> {
    if skips.is_empty() {
        return ops;
    }
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        let range = match &op {
            Op::Data(r) | Op::Zero(r) | Op::Cluster(r, _) | Op::Copy { range: r, .. } => r.clone(),
        };
        if !skips
            .iter()
            .any(|s| s.start < range.end && range.start < s.end)
        {
            out.push(op);
            continue;
        }
        // The parts of the range outside every skip.
        let mut at = range.start;
        let mut parts = Vec::new();
        for s in skips
            .iter()
            .filter(|s| s.start < range.end && range.start < s.end)
        {
            if s.start > at {
                parts.push(at..s.start);
            }
            at = at.max(s.end);
        }
        if at < range.end {
            parts.push(at..range.end);
        }
        for p in parts {
            out.push(match &op {
                Op::Zero(_) => Op::Zero(p),
                Op::Copy { src, from, range } => Op::Copy {
                    src: *src,
                    from: from + (p.start - range.start) as u64,
                    range: p,
                },
                Op::Data(_) | Op::Cluster(..) => Op::Data(p),
            });
        }
    }
    out
}

impl Job<'_, '_> {
    /// Copies `len` bytes of raw source `src` at `from` to the raw target at `to` in the
    /// kernel; through memory where the kernel cannot (files on different filesystems on old
    /// kernels).
    fn copy(&self, src: &Image, from: u64, to: u64, len: usize) -> Result<()> {
        let (Some(sf), Some(tf)) = (
            src.format().data_file().as_file(),
            self.target.format().data_file().as_file(),
        ) else {
            return Err(crate::Error::InvalidArgument(
                "copy offloading needs raw files on both sides".into(),
            ));
        };
        let done = match blockdev::copy_file_range(sf, from, tf, to, len as u64) {
            Ok(n) => n as usize,
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV)
                        | Some(libc::EOPNOTSUPP)
                        | Some(libc::EINVAL)
                        | Some(libc::ENOSYS)
                ) =>
            {
                0
            }
            Err(e) => {
                return Err(blockdev::Error::Io {
                    op: "copy_file_range",
                    name: self.target.file_name().to_string(),
                    offset: to,
                    source: e,
                }
                .into())
            }
        };
        if done < len {
            let mut buf = vec![0u8; len - done];
            src.read_at(&mut buf, from + done as u64)?;
            self.target.write_at(&buf, to + done as u64)?;
        }
        Ok(())
    }
}

/// Whether every byte is zero. Words are OR-ed together 64 bytes at a time, which the
/// compiler turns into vector instructions, with one branch per 64 bytes.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns, so viewing aligned bytes as words is sound.
        unsafe { buf.align_to::<u64>() }
    };
    if !head.iter().all(|&b| b == 0) || !tail.iter().all(|&b| b == 0) {
        return false;
    }
    let mut blocks = words.chunks_exact(8);
    for block in &mut blocks {
        if block.iter().fold(0, |acc, &w| acc | w) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&w| w == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn zero_detection() {
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        assert!(is_zero(&b[1..4098]));
        // A set byte anywhere, in every position of a 64-byte block and of the tail.
        for i in 0..200 {
            let mut b = vec![0u8; 200];
            b[i] = 0x80;
            assert!(!is_zero(&b), "byte {i}");
            assert!(!is_zero(&b[1..]) || i == 0, "byte {i}, unaligned");
        }
    }
}
