//! qcow2: versions 2 and 3, every cluster size and refcount width.
//!
//! The driver maps guest offsets through the L1 and L2 tables and allocates clusters; the
//! generic [`Image`](crate::Image) path does the I/O. Metadata lives under one lock and data
//! I/O runs outside it.
//!
//! Ordering (what a crash may and may not leave behind):
//! - cluster data is written before the L2 entry that points to it: entries change only in the
//!   cache, and a flush writes them after an fdatasync;
//! - refcount increments reach the disk (and an fdatasync) before any L2 or L1 entry that
//!   relies on them;
//! - decrements are applied only after the entries that dropped the references are durable,
//!   so a crash leaks clusters at worst and never points two users at one cluster.
//!
//! Caches ([`cache`], sized by qemu's options in [`cache_options`]): L2 tables are cached
//! whole or in slices (`l2-cache-entry-size`), refcount blocks whole. A cache whose entries
//! are all dirty grows past its size for the rest of one request and is then written back in
//! the order above (L2 slices early, once the data and refcounts they point at are synced; L1
//! only in a full flush). With `cache-clean-interval` (600 s by default, as qemu on Linux) a
//! background thread frees the clean entries left unused for a whole interval and gives their
//! memory back, so an idle image holds no cached metadata. With `discard=unmap`, clusters
//! whose refcount drops to zero have holes punched under them when the decrement is applied.

pub mod amend;
pub mod cache;
pub mod cache_options;
pub mod check;
pub mod compress;
pub mod create;
mod empty;
pub mod header;
pub mod l2;
pub mod measure;
pub mod refcount;
mod resize;
pub mod snapshot;
pub mod snapshot_load;
mod snapshot_switch;

pub use cache::CacheStats;
pub use cache_options::CacheOptions;
pub use create::{create, Qcow2CreateOptions};
pub use header::{CompressionType, Header};
pub use snapshot_load::SnapshotSelector;

use crate::format::{Allocation, Extent, Format, FormatInfo, Mapping, ResizeOptions, ZeroMode};
use crate::{Error, Result};
use blockdev::Storage;
use cache::MetaCache;
use header::{incompat, offsets};
use l2::{set_table_entry, table_entry, L2Entry, COPIED, OFFSET_MASK, ZERO};
use refcount::Refcounts;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Reads a table of `entries` big-endian u64s at `offset` (an L1 or refcount table) in
/// pieces, so that loading it costs the table's own memory and not twice that for a byte
/// buffer of the same size as well.
pub(crate) fn read_be64_table(file: &dyn Storage, offset: u64, entries: usize) -> Result<Vec<u64>> {
    const PIECE: usize = 64 << 10;
    let mut table = Vec::with_capacity(entries);
    let mut raw = vec![0u8; PIECE.min(entries * 8)];
    while table.len() < entries {
        let n = (entries - table.len()).min(PIECE / 8);
        let buf = &mut raw[..n * 8];
        file.read_at(buf, offset + table.len() as u64 * 8)?;
        table.extend(
            buf.chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().expect("8"))),
        );
    }
    Ok(table)
}

/// Options for opening a qcow2 image.
#[derive(Clone, Debug, Default)]
pub struct Qcow2OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Metadata cache options.
    pub cache: CacheOptions,
    /// Whether freed clusters are punched out of the file.
    pub discard: crate::open::DiscardMode,
}

/// Metadata state, all under one lock.
struct Meta {
    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: BTreeSet<usize>,
    /// Slices of L2 tables (whole tables when the entry size is the cluster size).
    l2: MetaCache,
    /// Metadata written since the last sync that the L1 table must not point at before
    /// it is durable (new L2 tables, L2 slices written back early).
    tables_unsynced: bool,
    refcounts: Refcounts,
    /// Next free byte in the host cluster that takes compressed clusters, or 0.
    compressed_cursor: u64,
    /// Incompatible feature bits as they are on disk.
    incompatible: u64,
}

/// An open qcow2 image.
pub struct Qcow2 {
    file: Arc<dyn Storage>,
    header: Header,
    read_only: bool,
    cluster_bits: u32,
    /// log2 of the L2 cache entry size.
    slice_bits: u32,
    /// Shared with the cache cleaner, which holds it weakly.
    meta: Arc<Mutex<Meta>>,
    /// Set once corruption was found (and the corrupt bit written): no more writes.
    marked_corrupt: AtomicBool,
    /// Punch holes under clusters whose refcount drops to zero.
    discard_unmap: bool,
    /// Stops the cache cleaner when the image is dropped.
    _cleaner: Option<Cleaner>,
    /// Whether the image looks preallocated with `metadata` (qemu's detection, made once, on
    /// the first block status that needs it).
    metadata_preallocated: std::sync::OnceLock<bool>,
}

/// This image's registration with the cache cleaner: the one background thread of the
/// process that frees cache entries left unused for `cache-clean-interval`. One thread serves
/// every open image, so a chain of a thousand images costs no thousand threads. The
/// registration holds the metadata weakly and is removed when the image is dropped.
struct Cleaner {
    id: u64,
}

/// An image the cleaner visits.
struct CleanerJob {
    id: u64,
    meta: Weak<Mutex<Meta>>,
    interval: Duration,
    due: std::time::Instant,
}

/// The cleaner thread's list of images, and the condition it sleeps on.
#[derive(Default)]
struct CleanerShared {
    jobs: Mutex<(u64, Vec<CleanerJob>)>,
    changed: std::sync::Condvar,
}

impl Cleaner {
    /// The shared list; the thread starts with the first registration.
    fn shared() -> Option<&'static CleanerShared> {
        static SHARED: std::sync::OnceLock<Option<&'static CleanerShared>> =
            std::sync::OnceLock::new();
        *SHARED.get_or_init(|| {
            let shared: &'static CleanerShared = Box::leak(Box::default());
            std::thread::Builder::new()
                .name("qcow2-cache-clean".into())
                .spawn(move || Self::run(shared))
                // Without a thread the caches are simply never cleaned, as with interval 0.
                .ok()?;
            Some(shared)
        })
    }

    fn register(meta: Weak<Mutex<Meta>>, interval: Duration) -> Option<Cleaner> {
        let shared = Self::shared()?;
        let mut jobs = shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.0 += 1;
        let id = jobs.0;
        let due = std::time::Instant::now() + interval;
        jobs.1.push(CleanerJob {
            id,
            meta,
            interval,
            due,
        });
        shared.changed.notify_all();
        Some(Cleaner { id })
    }

    fn run(shared: &'static CleanerShared) {
        let mut jobs = shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = std::time::Instant::now();
            for job in jobs.1.iter_mut().filter(|j| j.due <= now) {
                job.due = now + job.interval;
                if let Some(meta) = job.meta.upgrade() {
                    meta.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clean_unused_caches();
                }
            }
            jobs = match jobs.1.iter().map(|j| j.due).min() {
                Some(next) => {
                    let wait = next.saturating_duration_since(std::time::Instant::now());
                    shared
                        .changed
                        .wait_timeout(jobs, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => shared.changed.wait(jobs).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

impl Drop for Cleaner {
    fn drop(&mut self) {
        if let Some(shared) = Self::shared() {
            let mut jobs = shared.jobs.lock().unwrap_or_else(|e| e.into_inner());
            jobs.1.retain(|j| j.id != self.id);
            shared.changed.notify_all();
        }
    }
}

impl Meta {
    fn clean_unused_caches(&mut self) -> usize {
        self.l2.clean_unused() + self.refcounts.clean_unused()
    }
}

/// Both metadata caches' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qcow2CacheStats {
    /// The L2 table cache.
    pub l2: CacheStats,
    /// The refcount block cache.
    pub refcount: CacheStats,
}

/// A handle on an open image's caches that outlives moving the image into an
/// [`Image`](crate::Image): for tests and benchmarks.
#[doc(hidden)]
#[derive(Clone)]
pub struct CacheProbe {
    meta: Weak<Mutex<Meta>>,
}

impl CacheProbe {
    /// The caches' counters, or `None` once the image is gone.
    pub fn stats(&self) -> Option<Qcow2CacheStats> {
        let meta = self.meta.upgrade()?;
        let m = meta.lock().unwrap_or_else(|e| e.into_inner());
        Some(Qcow2CacheStats {
            l2: m.l2.stats(),
            refcount: m.refcounts.cache_stats(),
        })
    }

    /// Runs one round of the cache cleaner now; returns how many entries it freed.
    pub fn clean_now(&self) -> usize {
        self.meta.upgrade().map_or(0, |meta| {
            meta.lock()
                .unwrap_or_else(|e| e.into_inner())
                .clean_unused_caches()
        })
    }
}

/// The qcow2 driver of `image`, for qcow2-specific operations (snapshots, amend), or `None`
/// when the image is of another format.
pub fn driver_of(image: &mut crate::Image) -> Option<&mut Qcow2> {
    image
        .format_mut()
        .as_any_mut()
        .and_then(|a| a.downcast_mut::<Qcow2>())
}

impl Qcow2 {
    /// Opens a qcow2 image on `file`.
    pub fn open(file: Arc<dyn Storage>, opts: &Qcow2OpenOptions) -> Result<Self> {
        let name = file.name().to_string();
        let file_size = file.size()?;
        let mut first = vec![0u8; file_size.min(105) as usize];
        file.read_at(&mut first, 0)?;
        // The cluster size decides how much of the file holds header extensions.
        let cluster_bits = if first.len() >= 24 {
            u32::from_be_bytes(first[20..24].try_into().expect("4"))
        } else {
            0
        };
        if (9..=21).contains(&cluster_bits) {
            first.resize(file_size.min(1 << cluster_bits) as usize, 0);
            file.read_at(&mut first, 0)?;
        }
        let header = Header::parse(&name, &first, file_size)?;
        let read_only = opts.read_only || file.is_read_only();
        if header.is_corrupt() && !read_only {
            return Err(Error::invalid(
                &name,
                "qcow2: Image is corrupt; cannot be opened read/write",
            ));
        }
        // Cache options are validated before the dirty repair, as qemu does.
        let config = opts
            .cache
            .resolve(header.cluster_size(), header.size)
            .map_err(Error::InvalidArgument)?;
        let no_memory = || Error::InvalidArgument("Could not allocate metadata caches".into());
        let l2_cache = MetaCache::new(config.l2_entries as usize, config.l2_entry_size as usize)
            .ok_or_else(no_memory)?;
        let refblock_cache = MetaCache::new(
            config.refcount_entries as usize,
            header.cluster_size() as usize,
        )
        .ok_or_else(no_memory)?;
        let clean_interval = opts
            .cache
            .clean_interval()
            .map_err(Error::InvalidArgument)?;
        if header.is_dirty() && !read_only {
            // As qemu: an image left dirty (lazy refcounts, or a crash) has its refcounts
            // rebuilt before anything is written.
            let report = check::check(&file, check::Fix::ALL)?;
            if report.failed.is_some() || report.check_errors > 0 {
                let why = report.failed.as_deref().unwrap_or("Input/output error");
                return Err(Error::invalid(
                    &name,
                    format!("Could not repair dirty image: {why}"),
                ));
            }
        }
        // Re-read the header: a repair may have moved the refcount table.
        let header = if header.is_dirty() && !read_only {
            file.read_at(&mut first, 0)?;
            Header::parse(&name, &first, file.size()?)?
        } else {
            header
        };
        let l1 = read_be64_table(
            file.as_ref(),
            header.l1_table_offset,
            header.l1_size as usize,
        )?;

        let mut refcounts = Refcounts::load(
            file.as_ref(),
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            refblock_cache,
        )?;
        refcounts.set_active_l1(header.l1_table_offset, header.l1_size as u64 * 8);
        let meta = Meta {
            l1,
            l1_offset: header.l1_table_offset,
            l1_dirty: BTreeSet::new(),
            l2: l2_cache,
            tables_unsynced: false,
            refcounts,
            compressed_cursor: 0,
            incompatible: header.incompatible_features,
        };
        let meta = Arc::new(Mutex::new(meta));
        let cleaner = (clean_interval > 0)
            .then(|| Cleaner::register(Arc::downgrade(&meta), Duration::from_secs(clean_interval)))
            .flatten();
        let q = Qcow2 {
            cluster_bits: header.cluster_bits,
            slice_bits: config.l2_entry_size.trailing_zeros(),
            file,
            header,
            read_only,
            meta,
            marked_corrupt: AtomicBool::new(false),
            discard_unmap: opts.discard == crate::open::DiscardMode::Unmap,
            _cleaner: cleaner,
            metadata_preallocated: std::sync::OnceLock::new(),
        };
        if !read_only {
            q.clear_unknown_autoclear()?;
        }
        Ok(q)
    }

    /// The header as it was when the image was opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Counters of the metadata caches.
    #[doc(hidden)]
    pub fn cache_stats(&self) -> Qcow2CacheStats {
        let m = self.lock();
        Qcow2CacheStats {
            l2: m.l2.stats(),
            refcount: m.refcounts.cache_stats(),
        }
    }

    /// A handle on the caches that stays usable after the image is moved into an `Image`.
    #[doc(hidden)]
    pub fn cache_probe(&self) -> CacheProbe {
        CacheProbe {
            meta: Arc::downgrade(&self.meta),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn l2_entries(&self) -> u64 {
        self.cs() / 8
    }

    fn name(&self) -> &str {
        self.file.name()
    }

    /// We keep no bitmaps, so a bitmaps extension must be declared stale before we write, as
    /// the spec requires of implementations that do not understand autoclear bits.
    /// Reads and parses the header as it is on disk now (fields such as the L1 table's place
    /// change while the image is open; `self.header` keeps what was read at open).
    fn header_on_disk(&self) -> Result<Header> {
        let cs = 1usize << self.cluster_bits;
        let mut first = vec![0u8; cs.min(self.file.size()? as usize)];
        self.file.read_at(&mut first, 0)?;
        Header::parse(self.file.name(), &first, self.file.size()?)
    }

    /// Records a new backing file name and format (qemu's "change backing file"): the header
    /// and its extensions are rewritten in the first cluster. Everything written before is
    /// made durable first, so the new name never describes data that is not on disk yet.
    pub fn set_backing_file(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                file: self.file.name().to_string(),
            });
        }
        let file_name = self.file.name().to_string();
        if name.is_some_and(|n| n.len() > 1023) {
            return Err(Error::invalid(&file_name, "Backing file name too long"));
        }
        {
            let mut meta = self.lock();
            self.flush_meta(&mut meta)?;
        }
        let mut h = self.header_on_disk()?;
        h.backing_file = name.map(str::to_string);
        h.backing_format = name.and(format).map(str::to_string);
        let cs = 1usize << self.cluster_bits;
        let mut first = h.serialize(cs).map_err(|_| {
            Error::invalid(
                &file_name,
                "Cannot change the backing file: the header would not fit in the first cluster",
            )
        })?;
        // Clear what the old header and name left behind after the new end.
        let old_len = self.header_length_used()?;
        if first.len() < old_len {
            first.resize(old_len, 0);
        }
        self.file.write_at(&first, 0)?;
        self.file.flush()?;
        self.header.backing_file = h.backing_file;
        self.header.backing_format = h.backing_format;
        Ok(())
    }

    /// How many bytes of the first cluster the current header, its extensions and the
    /// backing file name occupy.
    fn header_length_used(&self) -> Result<usize> {
        let h = self.header_on_disk()?;
        let serialized = h.serialize(1usize << self.cluster_bits)?.len();
        let name_end = (h.backing_file_offset + h.backing_file_size as u64) as usize;
        Ok(serialized.max(name_end))
    }

    fn clear_unknown_autoclear(&self) -> Result<()> {
        if self.header.version >= 3 && self.header.autoclear_features != 0 {
            self.file
                .write_at(&0u64.to_be_bytes(), offsets::AUTOCLEAR)?;
            self.file.flush()?;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly {
                file: self.name().to_string(),
            });
        }
        if self.marked_corrupt.load(Ordering::Relaxed) {
            return Err(Error::invalid(
                self.name(),
                "the image was marked corrupt; run 'img check -r all' before writing to it",
            ));
        }
        Ok(())
    }

    /// Builds the error for metadata found corrupt and, on a writable image, sets the corrupt
    /// bit as qemu does, so that nothing (here or in qemu) writes through broken metadata.
    fn corrupt(&self, meta: &Meta, offset: u64, reason: String) -> Error {
        if !self.read_only && !self.marked_corrupt.swap(true, Ordering::Relaxed) {
            let bits = meta.incompatible | incompat::CORRUPT;
            // Best effort: the error below is what matters to the caller.
            if self.header.version >= 3
                && self
                    .file
                    .write_at(&bits.to_be_bytes(), offsets::INCOMPATIBLE)
                    .is_ok()
            {
                let _ = self.file.flush();
            }
        }
        Error::corrupt(self.name(), offset, reason)
    }

    /// With lazy refcounts, qemu marks the image dirty before the first metadata change; we
    /// keep refcounts exact regardless, so the bit only tells a crashed image to be checked.
    fn mark_dirty(&self, meta: &mut Meta) -> Result<()> {
        if self.header.lazy_refcounts() && meta.incompatible & incompat::DIRTY == 0 {
            meta.incompatible |= incompat::DIRTY;
            self.file
                .write_at(&meta.incompatible.to_be_bytes(), offsets::INCOMPATIBLE)?;
            self.file.flush()?;
        }
        Ok(())
    }

    /// The L2 table offset for guest L1 index `l1i`, validated; 0 when unallocated.
    fn l2_offset(&self, meta: &Meta, l1i: usize) -> Result<u64> {
        let Some(&e) = meta.l1.get(l1i) else {
            return Ok(0);
        };
        let off = e & OFFSET_MASK;
        if !off.is_multiple_of(self.cs()) {
            return Err(self.corrupt(
                meta,
                meta.l1_offset + l1i as u64 * 8,
                format!("L2 table offset {off:#x} is not cluster aligned (L1 index {l1i})"),
            ));
        }
        Ok(off)
    }

    /// L2 entries per cache entry (slice).
    fn slice_entries(&self) -> u64 {
        1 << (self.slice_bits - 3)
    }

    /// The host offset of the L2 slice that holds entry `l2i` of the table at `l2_off`, and the
    /// entry's index inside the slice.
    fn slice_of(&self, l2_off: u64, l2i: usize) -> (u64, usize) {
        let per = self.slice_entries() as usize;
        (l2_off + ((l2i / per) << self.slice_bits) as u64, l2i % per)
    }

    /// Guest clusters from `gc` to the end of its L2 slice.
    fn clusters_left_in_slice(&self, gc: u64) -> u64 {
        self.slice_entries() - gc % self.slice_entries()
    }

    /// The host offset of a data cluster entry that is not cluster aligned.
    fn misaligned(&self, e: L2Entry) -> Option<u64> {
        match e {
            L2Entry::Normal { offset, .. } | L2Entry::ZeroAlloc { offset, .. }
                if offset % self.cs() != 0 =>
            {
                Some(offset)
            }
            _ => None,
        }
    }

    fn misaligned_error(&self, meta: &Meta, l2_off: u64, l2i: usize, offset: u64) -> Error {
        self.corrupt(
            meta,
            l2_off + l2i as u64 * 8,
            format!("data cluster offset {offset:#x} is not cluster aligned"),
        )
    }

    fn entry_at(&self, meta: &mut Meta, l2_off: u64, l2i: usize) -> Result<L2Entry> {
        let (slice, i) = self.slice_of(l2_off, l2i);
        let raw = table_entry(meta.l2.get(self.file.as_ref(), slice)?, i);
        let e = L2Entry::decode(raw, self.cluster_bits);
        if let Some(offset) = self.misaligned(e) {
            return Err(self.misaligned_error(meta, l2_off, l2i, offset));
        }
        Ok(e)
    }

    /// Stores raw L2 entry `value` at index `l2i` of the (writable) table at `l2_off`.
    fn write_entry(&self, meta: &mut Meta, l2_off: u64, l2i: usize, value: u64) -> Result<()> {
        let (slice, i) = self.slice_of(l2_off, l2i);
        set_table_entry(meta.l2.get_mut(self.file.as_ref(), slice)?, i, value);
        Ok(())
    }

    /// The L2 table for `l1i`, ready to be modified: allocated if missing, copied if shared.
    fn l2_for_write(&self, meta: &mut Meta, l1i: usize) -> Result<u64> {
        let entry = meta.l1[l1i];
        let old = self.l2_offset(meta, l1i)?;
        if old != 0 && entry & COPIED != 0 {
            return Ok(old);
        }
        let file = self.file.as_ref();
        let cs = self.cs() as usize;
        let new = meta.refcounts.alloc(file, 1)? << self.cluster_bits;
        if self.slice_bits == self.cluster_bits {
            // One cache entry per table: the new table lives in the cache until written back.
            // Its space is reserved in the file now, so that a disk that fills up fails the
            // request that allocates the table, not the later writeback of entries that point
            // at data already written (which would leak that data).
            file.write_zeroes(new, cs as u64, false)?;
            let copy = if old != 0 {
                Some(meta.l2.get(file, old)?.to_vec())
            } else {
                None
            };
            let table = meta.l2.insert_new(new);
            match copy {
                Some(d) => table.copy_from_slice(&d),
                None => table.fill(0),
            }
        } else {
            // Slices are loaded from the file on demand, so the new table goes to the file
            // whole now (zeros, or the old table with any cached slices of it). The L1 entry
            // that points at it is written only after a sync.
            let es = 1usize << self.slice_bits;
            let mut table = vec![0u8; cs];
            if old != 0 {
                file.read_at(&mut table, old)?;
                for (i, chunk) in table.chunks_mut(es).enumerate() {
                    if let Some(cached) = meta.l2.peek(old + (i * es) as u64) {
                        chunk.copy_from_slice(cached);
                    }
                }
            }
            file.write_at(&table, new)?;
            meta.tables_unsynced = true;
        }
        if old != 0 {
            meta.refcounts.free_later(old >> self.cluster_bits);
        }
        meta.l1[l1i] = new | COPIED;
        meta.l1_dirty.insert(l1i);
        Ok(new)
    }

    /// Queues the release of the host clusters an old L2 entry referenced.
    fn release(&self, meta: &mut Meta, old: L2Entry) {
        if let Some((first, n)) = old.host_clusters(self.cluster_bits) {
            for c in first..first + n {
                meta.refcounts.free_later(c);
            }
        }
    }

    /// Replaces L2 entry `gc` (guest cluster index) and releases what the old entry held.
    fn set_entry(&self, meta: &mut Meta, gc: u64, value: u64) -> Result<()> {
        let (l1i, l2i) = self.split(gc);
        let l2_off = self.l2_for_write(meta, l1i)?;
        let old = self.entry_at(meta, l2_off, l2i)?;
        self.write_entry(meta, l2_off, l2i, value)?;
        self.release(meta, old);
        Ok(())
    }

    fn split(&self, guest_cluster: u64) -> (usize, usize) {
        let n = self.l2_entries();
        ((guest_cluster / n) as usize, (guest_cluster % n) as usize)
    }

    /// Guest clusters from `gc` to the end of its L2 table.
    fn clusters_left_in_table(&self, gc: u64) -> u64 {
        self.l2_entries() - gc % self.l2_entries()
    }

    /// The current entry of guest cluster `gc` (Unallocated where no L2 table exists).
    fn lookup(&self, meta: &mut Meta, gc: u64) -> Result<L2Entry> {
        let (l1i, l2i) = self.split(gc);
        let l2_off = self.l2_offset(meta, l1i)?;
        if l2_off == 0 {
            return Ok(L2Entry::Unallocated);
        }
        self.entry_at(meta, l2_off, l2i)
    }

    /// Writes dirty entries back early when a cache has overgrown its capacity (every entry
    /// dirty), in dependency order, so that it can shrink.
    fn flush_if_over_capacity(&self, meta: &mut Meta) -> Result<()> {
        let file = self.file.as_ref();
        if meta.l2.over_capacity() {
            // L2 slices may go out once the data and refcounts they point at are durable. The
            // L1 table and the pending decrements wait for a full flush.
            meta.refcounts.flush(file)?;
            file.flush()?;
            meta.l2.write_dirty(file)?;
            meta.tables_unsynced = true;
        } else if meta.refcounts.over_capacity() {
            // Outside `flush_meta` dirty refcount blocks hold only increments, and an
            // increment that reaches the disk early leaks a cluster at worst.
            meta.refcounts.flush(file)?;
        }
        Ok(())
    }

    /// The ordered flush: refcounts, sync, L2 tables, sync, L1, sync, then the decrements that
    /// became safe (and, with `discard=unmap`, holes under the clusters they freed), and a
    /// final sync.
    fn flush_meta(&self, meta: &mut Meta) -> Result<()> {
        let file = self.file.as_ref();
        let l1_dirty = !meta.l1_dirty.is_empty();
        meta.refcounts.flush(file)?;
        if meta.l2.has_dirty() || l1_dirty {
            // Data and refcount increments (possibly written back earlier, unsynced) must be
            // durable before the entries that point at them.
            file.flush()?;
            meta.tables_unsynced = false;
        }
        if meta.l2.write_dirty(file)? > 0 {
            meta.tables_unsynced = true;
        }
        if l1_dirty {
            if meta.tables_unsynced {
                file.flush()?;
                meta.tables_unsynced = false;
            }
            for &i in &meta.l1_dirty {
                file.write_at(&meta.l1[i].to_be_bytes(), meta.l1_offset + i as u64 * 8)?;
            }
            meta.l1_dirty.clear();
        }
        if meta.refcounts.has_pending_frees() {
            file.flush()?;
            let mut freed = meta.refcounts.apply_pending_frees(file)?;
            freed.sort_unstable();
            freed.dedup();
            // A freed L2 table must not be served from the cache if its cluster is reused.
            meta.l2.forget_clusters(&freed, self.cluster_bits);
            if freed
                .binary_search(&(meta.compressed_cursor >> self.cluster_bits))
                .is_ok()
            {
                meta.compressed_cursor = 0;
            }
            if self.discard_unmap {
                self.punch_holes(&freed)?;
            }
            meta.refcounts.flush(file)?;
        }
        file.flush()?;
        meta.tables_unsynced = false;
        Ok(())
    }

    /// Discards the host clusters `clusters` (sorted), one request per contiguous run. Nothing
    /// references them any more (their refcount is zero and the entries that dropped the
    /// references are durable), so at worst a crash leaks them, now reading as zeros.
    fn punch_holes(&self, clusters: &[u64]) -> Result<()> {
        let mut i = 0;
        while i < clusters.len() {
            let first = clusters[i];
            let mut n = 1;
            while i + (n as usize) < clusters.len() && clusters[i + n as usize] == first + n {
                n += 1;
            }
            self.file
                .discard(first << self.cluster_bits, n << self.cluster_bits)?;
            i += n as usize;
        }
        Ok(())
    }

    /// Reserves `size` bytes for compressed data, packing compressed clusters back to back as
    /// qemu does: a compressed cluster may continue into the next host cluster when that one
    /// is free. Each compressed cluster holds one reference on every host cluster it touches.
    fn alloc_compressed_bytes(&self, meta: &mut Meta, size: u64) -> Result<u64> {
        let cs = self.cs();
        let file = self.file.as_ref();
        let cur = meta.compressed_cursor;
        let cur_cluster = cur >> self.cluster_bits;
        // A shared host cluster takes one more reference; with narrow refcounts (1 bit) it
        // may already be full, and then a fresh cluster is started, as qemu does.
        let in_cursor_cluster = cur != 0
            && !cur.is_multiple_of(cs)
            && meta.refcounts.get(file, cur_cluster)? < meta.refcounts.max_refcount();
        let fits = cur % cs + size <= cs;
        // Either the bytes fit behind the cursor, or they may spill into the next cluster if
        // that one is free; both start at the cursor and reference its cluster once more.
        let off =
            if in_cursor_cluster && (fits || meta.refcounts.try_alloc_at(file, cur_cluster + 1)?) {
                meta.refcounts.increment(file, cur_cluster)?;
                cur
            } else {
                meta.refcounts.alloc(file, 1)? << self.cluster_bits
            };
        meta.compressed_cursor = if (off + size).is_multiple_of(cs) {
            0
        } else {
            off + size
        };
        Ok(off)
    }

    /// Whether `next`, `n` clusters after `first`, continues `first`'s extent.
    fn continues(first: L2Entry, next: L2Entry, n: u64, cs: u64) -> bool {
        match (first, next) {
            (
                L2Entry::Normal {
                    offset: a,
                    copied: ca,
                },
                L2Entry::Normal {
                    offset: b,
                    copied: cb,
                },
            ) => b == a + n * cs && ca == cb,
            (L2Entry::Unallocated, L2Entry::Unallocated) => true,
            (L2Entry::ZeroPlain, L2Entry::ZeroPlain) => true,
            (L2Entry::ZeroAlloc { offset: a, .. }, L2Entry::ZeroAlloc { offset: b, .. }) => {
                b == a + n * cs
            }
            _ => false,
        }
    }

    /// Grows the active L1 table to `entries` entries (used by create and resize).
    pub fn grow_l1(&self, entries: u64) -> Result<()> {
        self.check_writable()?;
        let mut meta = self.lock();
        if entries <= meta.l1.len() as u64 {
            return Ok(());
        }
        if entries * 8 > header::MAX_L1_BYTES {
            return Err(Error::InvalidArgument(format!(
                "'{}': an L1 table of {entries} entries is too large",
                self.name()
            )));
        }
        self.flush_meta(&mut meta)?;
        let file = self.file.as_ref();
        let bytes = entries * 8;
        let clusters = bytes.div_ceil(self.cs());
        let new = meta.refcounts.alloc(file, clusters)? << self.cluster_bits;
        let mut table = meta.l1.clone();
        table.resize(entries as usize, 0);
        let raw: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_at(&raw, new)?;
        // The new table and its refcounts must be durable before the header points at them.
        meta.refcounts.flush(file)?;
        file.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(entries as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&new.to_be_bytes());
        file.write_at(&hdr, offsets::L1_SIZE)?;
        file.flush()?;
        let old_off = meta.l1_offset;
        let old_clusters = (meta.l1.len() as u64 * 8).div_ceil(self.cs());
        if old_off != 0 {
            for c in 0..old_clusters {
                meta.refcounts
                    .free_later((old_off >> self.cluster_bits) + c);
            }
        }
        meta.l1 = table;
        meta.l1_offset = new;
        meta.refcounts.set_active_l1(new, bytes);
        self.flush_meta(&mut meta)
    }
}

impl Format for Qcow2 {
    fn driver(&self) -> &'static str {
        "qcow2"
    }

    fn table_bytes(&self) -> u64 {
        let meta = self.lock();
        (meta.l1.len() + meta.refcounts.table().len()) as u64 * 8
    }

    fn file_name(&self) -> &str {
        self.name()
    }

    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    fn data_file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    fn cluster_size(&self) -> u64 {
        self.cs()
    }

    fn map(&self, offset: u64, len: u64) -> Result<Extent> {
        let cs = self.cs();
        let gc = offset >> self.cluster_bits;
        let in_cluster = offset & (cs - 1);
        let mut meta = self.lock();
        let (l1i, l2i) = self.split(gc);
        let l2_off = self.l2_offset(&meta, l1i)?;
        if l2_off == 0 {
            return Ok(Extent {
                mapping: Mapping::Unallocated,
                len: len.min(self.clusters_left_in_table(gc) * cs - in_cluster),
            });
        }
        // One extent never leaves the L2 slice: a single cache lookup serves it.
        let len = len.min(self.clusters_left_in_slice(gc) * cs - in_cluster);
        let wanted = (in_cluster + len).div_ceil(cs) as usize;
        let (slice_off, i0) = self.slice_of(l2_off, l2i);
        let (first, n, bad) = {
            let slice = meta.l2.get(self.file.as_ref(), slice_off)?;
            let decode = |k: usize| L2Entry::decode(table_entry(slice, i0 + k), self.cluster_bits);
            let first = decode(0);
            let mut n = 1usize;
            let mut bad = self.misaligned(first).map(|o| (0, o));
            while bad.is_none() && n < wanted {
                let next = decode(n);
                if let Some(o) = self.misaligned(next) {
                    bad = Some((n, o));
                    break;
                }
                if !Self::continues(first, next, n as u64, cs) {
                    break;
                }
                n += 1;
            }
            (first, n as u64, bad)
        };
        if let Some((k, offset)) = bad {
            return Err(self.misaligned_error(&meta, l2_off, l2i + k, offset));
        }
        if meta.l2.over_capacity() && !self.read_only {
            // A lookup found every entry dirty and took one more: write back now, rather than
            // at the next modification, so that the cache does not stay overgrown.
            self.flush_if_over_capacity(&mut meta)?;
        }
        let ext_len = (n * cs - in_cluster).min(len);
        let mapping = match first {
            L2Entry::Normal { offset, copied } => Mapping::Data {
                offset: offset + in_cluster,
                writable: copied && !self.read_only,
            },
            L2Entry::Unallocated => Mapping::Unallocated,
            L2Entry::ZeroPlain => Mapping::Zero,
            L2Entry::ZeroAlloc { offset, .. } => Mapping::ZeroAllocated {
                offset: offset + in_cluster,
            },
            L2Entry::Compressed { offset, len } => Mapping::Compressed { offset, len },
        };
        Ok(Extent {
            mapping,
            len: ext_len,
        })
    }

    fn decompress(&self, compressed: &[u8], out: &mut [u8]) -> Result<()> {
        compress::decompress(self.header.compression_type, compressed, out)
            .map_err(|reason| Error::corrupt(self.name(), 0, reason))
    }

    fn allocate(&self, offset: u64, len: u64) -> Result<Allocation> {
        self.check_writable()?;
        let cs = self.cs();
        let first = offset >> self.cluster_bits;
        let last = (offset + len.max(1) - 1) >> self.cluster_bits;
        // One allocation stays inside one L2 slice, so that it touches one cache entry.
        let limit = (last - first + 1).min(self.clusters_left_in_slice(first));
        let mut meta = self.lock();
        self.mark_dirty(&mut meta)?;
        let mut n = 1;
        while n < limit {
            match self.lookup(&mut meta, first + n)? {
                L2Entry::Normal { copied: true, .. } => break,
                _ => n += 1,
            }
        }
        // The L2 table before the data, as qemu orders it, so layouts match qemu's.
        let (l1i, _) = self.split(first);
        self.l2_for_write(&mut meta, l1i)?;
        let host = meta.refcounts.alloc(self.file.as_ref(), n)? << self.cluster_bits;
        Ok(Allocation {
            guest_offset: first * cs,
            host_offset: host,
            len: n * cs,
        })
    }

    fn commit(&self, a: Allocation) -> Result<()> {
        let mut meta = self.lock();
        let first = a.guest_offset >> self.cluster_bits;
        for i in 0..a.len >> self.cluster_bits {
            let host = a.host_offset + (i << self.cluster_bits);
            self.set_entry(&mut meta, first + i, host | COPIED)?;
        }
        self.flush_if_over_capacity(&mut meta)
    }

    fn abandon(&self, a: Allocation) -> Result<()> {
        let mut meta = self.lock();
        let first = a.host_offset >> self.cluster_bits;
        for c in first..first + (a.len >> self.cluster_bits) {
            self.release_now(&mut meta, c)?;
        }
        Ok(())
    }

    fn zero_clusters(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<u64> {
        self.check_writable()?;
        let cs = self.cs();
        if !offset.is_multiple_of(cs) {
            return Ok(0);
        }
        let end = offset + len;
        // The last cluster of a disk whose size is not cluster aligned counts as whole.
        let whole_end = if end == self.header.size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        if whole_end <= offset {
            return Ok(0);
        }
        let gc = offset >> self.cluster_bits;
        let whole = (whole_end - offset) >> self.cluster_bits;
        let n = whole.min(self.clusters_left_in_slice(gc));
        let mut meta = self.lock();
        let v3 = self.header.version >= 3;
        let backing = self.header.backing_file.is_some();
        if !v3 && backing {
            // Only a zero flag could hide the backing file's data; version 2 has none.
            return Ok(0);
        }
        let (l1i, _) = self.split(gc);
        if self.l2_offset(&meta, l1i)? == 0 && !backing {
            // No L2 table: everything here is unallocated and reads as zeros already.
            return Ok(whole.min(self.clusters_left_in_table(gc)) * cs);
        }
        self.mark_dirty(&mut meta)?;
        for i in 0..n {
            let old = self.lookup(&mut meta, gc + i)?;
            let new = match (old, mode) {
                (L2Entry::Unallocated, _) if backing => ZERO,
                (L2Entry::Unallocated | L2Entry::ZeroPlain, _) => continue,
                (
                    L2Entry::Normal {
                        offset,
                        copied: true,
                    },
                    ZeroMode::Keep,
                )
                | (
                    L2Entry::ZeroAlloc {
                        offset,
                        copied: true,
                    },
                    ZeroMode::Keep,
                ) => {
                    if !v3 {
                        // Version 2 has no zero flag: the caller writes zeros in place.
                        return Ok(i * cs);
                    }
                    // Keep the cluster, mark it zero (a "zero-allocated" cluster).
                    let (l1i, l2i) = self.split(gc + i);
                    let l2_off = self.l2_for_write(&mut meta, l1i)?;
                    self.write_entry(&mut meta, l2_off, l2i, offset | COPIED | ZERO)?;
                    continue;
                }
                _ if v3 => ZERO,
                _ => 0,
            };
            self.set_entry(&mut meta, gc + i, new)?;
        }
        self.flush_if_over_capacity(&mut meta)?;
        Ok(n * cs)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        let cs = self.cs();
        let end = offset + len;
        let start = offset.div_ceil(cs) * cs;
        let end = if end == self.header.size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        if end <= start {
            return Ok(());
        }
        let new = if self.header.version >= 3 { ZERO } else { 0 };
        let backing = self.header.backing_file.is_some();
        let mut meta = self.lock();
        self.mark_dirty(&mut meta)?;
        let mut gc = start >> self.cluster_bits;
        let end_gc = end >> self.cluster_bits;
        while gc < end_gc {
            let (l1i, _) = self.split(gc);
            if self.l2_offset(&meta, l1i)? == 0 && !backing {
                gc += self.clusters_left_in_table(gc);
                continue;
            }
            match self.lookup(&mut meta, gc)? {
                L2Entry::Unallocated if backing && new == ZERO => {
                    self.set_entry(&mut meta, gc, new)?
                }
                L2Entry::Unallocated | L2Entry::ZeroPlain => {}
                _ => self.set_entry(&mut meta, gc, new)?,
            }
            gc += 1;
        }
        self.flush_if_over_capacity(&mut meta)
    }

    fn compress_cluster(&self, data: &[u8]) -> Option<Vec<u8>> {
        let cs = self.cs() as usize;
        if data.len() > cs {
            return None;
        }
        let padded;
        let input = if data.len() < cs {
            // The last cluster of the disk may be short; compress it zero-padded, as qemu.
            padded = [data, &vec![0u8; cs - data.len()]].concat();
            &padded[..]
        } else {
            data
        };
        compress::compress(self.header.compression_type, input, cs)
    }

    fn write_compressed(&self, offset: u64, compressed: &[u8]) -> Result<()> {
        self.check_writable()?;
        let len = compressed.len() as u64;
        let host = {
            let mut meta = self.lock();
            self.mark_dirty(&mut meta)?;
            // The L2 table first, as qemu, so compressed data packs at the end of the file.
            let (l1i, _) = self.split(offset >> self.cluster_bits);
            self.l2_for_write(&mut meta, l1i)?;
            self.alloc_compressed_bytes(&mut meta, len)?
        };
        // The data goes out without the metadata lock; the entry points at it only after.
        self.file.write_at(compressed, host)?;
        let mut meta = self.lock();
        let entry = L2Entry::compressed(host, len, self.cluster_bits);
        self.set_entry(&mut meta, offset >> self.cluster_bits, entry)?;
        self.flush_if_over_capacity(&mut meta)
    }

    fn resize(&mut self, size: u64, opts: &ResizeOptions) -> Result<()> {
        self.resize_to(size, opts)
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = self.lock();
        self.flush_meta(&mut meta)
    }

    fn close(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut meta = self.lock();
        self.flush_meta(&mut meta)?;
        if meta.incompatible & incompat::DIRTY != 0 {
            meta.incompatible &= !incompat::DIRTY;
            self.file
                .write_at(&meta.incompatible.to_be_bytes(), offsets::INCOMPATIBLE)?;
            self.file.flush()?;
        }
        Ok(())
    }

    fn set_backing_file(&mut self, name: Option<&str>, format: Option<&str>) -> Result<()> {
        Qcow2::set_backing_file(self, name, format)
    }

    fn file_holes_are_zeros(&self) -> bool {
        *self.metadata_preallocated.get_or_init(|| {
            // An image whose refcounts cannot be read is simply not taken for preallocated.
            measure::looks_metadata_preallocated(self.file.as_ref()).unwrap_or(false)
        })
    }

    fn make_empty(&self) -> Result<()> {
        self.deallocate_all()
    }

    fn info(&self) -> FormatInfo {
        let h = &self.header;
        let mut data = serde_json::Map::new();
        data.insert(
            "compat".into(),
            (if h.version >= 3 { "1.1" } else { "0.10" }).into(),
        );
        data.insert("compression-type".into(), h.compression_type.name().into());
        data.insert("refcount-bits".into(), h.refcount_bits().into());
        if h.version >= 3 {
            // qemu reports lazy refcounts only for version 3, where the feature exists.
            data.insert("lazy-refcounts".into(), h.lazy_refcounts().into());
            data.insert("corrupt".into(), h.is_corrupt().into());
            data.insert("extended-l2".into(), false.into());
        }
        FormatInfo {
            cluster_size: Some(h.cluster_size()),
            specific: Some(serde_json::Value::Object(data)),
            dirty: self.lock().incompatible & incompat::DIRTY != 0,
            corrupt: h.is_corrupt(),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}
