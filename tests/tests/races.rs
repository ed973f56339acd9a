//! Regression tests for the races other Rust VMMs and block engines shipped: clusters, L2
//! tables and refcount blocks allocated by several queues at once; a discard (or an unmapping
//! write-zeroes) racing the reallocation of the cluster it freed; clusters freed by snapshot
//! deletes and discards while other requests still use the mappings they looked up;
//! copy-on-write from a backing file by several queues into the same cluster; and
//! write-zeroes over a backing file's data next to concurrent writes into the same cluster.
//!
//! Every test runs many rounds on several threads sharing one `Image` (`&self` methods), then
//! checks the image with `qemu-img check` (no errors, no leaks) and its content against an
//! in-memory model, through img-core and through `qemu-img compare` against a raw copy of the
//! model. Results must not depend on the interleaving: threads that write the same bytes are
//! ordered by a range lock in the test (so the model is exact), or the outcome is checked
//! against the set of values the interleavings allow. The image file sits under a
//! [`Jitter`] storage that holds some requests back, which widens the window between a
//! request's lookup of a mapping and its I/O from microseconds to up to 2 ms.
//!
//! The last test drives the same races from outside: four qemu-io clients with many
//! asynchronous requests each, on their own connections to `img nbd` (needs the img binary).
//!
//! Seen failing (img-core broken on purpose, then restored): `Image::flush` not waiting for
//! requests in flight (frees applied and clusters reused under a request's stale mapping)
//! fails the discard and the snapshot tests within seconds; `Image::write_allocating`
//! without its range lock (two requests allocating one cluster) fails the allocation, the
//! copy-up, the write-zeroes and the NBD tests; qcow2 `zero_clusters` leaving an
//! unallocated cluster over a backing file alone fails the write-zeroes test.
//!
//! `IMG_RACES_SCALE=N` multiplies the iteration counts (for longer runs by hand).

mod common;

use img_core::qcow2::{self, Qcow2CreateOptions};
use img_core::{open_image, DiscardMode, Image, OpenOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

/// The multiplier of every iteration count.
fn scale() -> usize {
    std::env::var("IMG_RACES_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

// ---------------------------------------------------------------------------------------------
// Test machinery: a guest range lock, a sparse model, image creation and the final checks.
// ---------------------------------------------------------------------------------------------

/// Orders requests that touch the same guest bytes, so that the model stays exact, while
/// requests to different bytes (of the same clusters too) run at once.
#[derive(Default)]
struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl RangeLock {
    fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock().unwrap();
        while held.iter().any(|&(s, e)| s < end && start < e) {
            held = self.released.wait(held).unwrap();
        }
        held.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().unwrap();
        let i = held.iter().position(|&r| r == self.range).unwrap();
        held.swap_remove(i);
        self.lock.released.notify_all();
    }
}

/// The threads of one run: a barrier, and a count of the threads that finished. When a
/// thread panics, the barrier gives up and the count still grows, so that a failure ends the
/// test instead of leaving the other threads waiting for it forever.
struct Crew {
    size: usize,
    /// (threads waiting, generation)
    state: Mutex<(usize, u64)>,
    all_there: Condvar,
    failed: AtomicBool,
    done: AtomicU64,
}

/// A thread's membership of a crew: counts it finished (and failed, if it panics) on drop.
struct Member<'a>(&'a Crew);

impl Crew {
    fn new(size: usize) -> Self {
        Crew {
            size,
            state: Mutex::new((0, 0)),
            all_there: Condvar::new(),
            failed: AtomicBool::new(false),
            done: AtomicU64::new(0),
        }
    }

    fn join(&self) -> Member<'_> {
        Member(self)
    }

    /// Waits until all `size` threads are here.
    fn wait(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let generation = st.1;
        st.0 += 1;
        if st.0 == self.size {
            *st = (0, generation + 1);
            self.all_there.notify_all();
            return;
        }
        while st.1 == generation {
            assert!(!self.failed(), "another thread of the test failed");
            st = self.all_there.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// How many members finished (or failed).
    fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }
}

impl Drop for Member<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.failed.store(true, Ordering::Release);
            let _st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
            self.0.all_there.notify_all();
        }
        self.0.done.fetch_add(1, Ordering::AcqRel);
    }
}

const PAGE: u64 = 64 << 10;

/// What the guest should read: 64 KiB pages, absent ones zeros (disks of several GiB whose
/// writes cluster around table boundaries stay small).
struct Model {
    size: u64,
    pages: Mutex<HashMap<u64, Vec<u8>>>,
}

impl Model {
    fn new(size: u64) -> Self {
        Model {
            size,
            pages: Mutex::new(HashMap::new()),
        }
    }

    fn from_bytes(bytes: &[u8]) -> Self {
        let m = Model::new(bytes.len() as u64);
        m.write(0, bytes);
        m
    }

    fn write(&self, off: u64, data: &[u8]) {
        let mut pages = self.pages.lock().unwrap();
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let (p, at) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - at).min(data.len() - done);
            let page = pages.entry(p).or_insert_with(|| vec![0u8; PAGE as usize]);
            page[at..at + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
    }

    fn zero(&self, off: u64, len: u64) {
        self.write(off, &vec![0u8; len as usize]);
    }

    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let pages = self.pages.lock().unwrap();
        let mut out = vec![0u8; len as usize];
        let mut done = 0usize;
        while done < out.len() {
            let pos = off + done as u64;
            let (p, at) = (pos / PAGE, (pos % PAGE) as usize);
            let n = (PAGE as usize - at).min(out.len() - done);
            if let Some(page) = pages.get(&p) {
                out[done..done + n].copy_from_slice(&page[at..at + n]);
            }
            done += n;
        }
        out
    }

    fn snapshot(&self) -> Model {
        Model {
            size: self.size,
            pages: Mutex::new(self.pages.lock().unwrap().clone()),
        }
    }

    /// Writes the model as a sparse raw file.
    fn write_raw(&self, path: &Path) {
        use std::os::unix::fs::FileExt;
        let f = common::create_raw_file(path, self.size);
        for (&p, page) in self.pages.lock().unwrap().iter() {
            if page.iter().any(|&b| b != 0) {
                let end = ((p + 1) * PAGE).min(self.size);
                f.write_all_at(&page[..(end - p * PAGE) as usize], p * PAGE)
                    .unwrap();
            }
        }
    }
}

/// Asserts that `img` reads `[off, off + len)` as the model does.
fn assert_reads_as_model(img: &Image, model: &Model, off: u64, len: u64, what: &str) {
    let mut got = vec![0u8; len as usize];
    img.read_at(&mut got, off)
        .unwrap_or_else(|e| panic!("{what}: read {len} at {off}: {e}"));
    let want = model.read(off, len);
    if got != want {
        let i = (0..got.len()).find(|&i| got[i] != want[i]).unwrap();
        panic!(
            "{what}: guest byte {} reads {:#04x}, the model has {:#04x} (request {off}+{len})",
            off + i as u64,
            got[i],
            want[i]
        );
    }
}

/// One qcow2 layout under test.
#[derive(Clone, Copy, Debug)]
struct Layout {
    cluster_size: u64,
    refcount_bits: u32,
    version: u32,
}

const fn layout(cluster_size: u64, refcount_bits: u32, version: u32) -> Layout {
    Layout {
        cluster_size,
        refcount_bits,
        version,
    }
}

fn create(path: &Path, size: u64, l: Layout, backing: Option<(&Path, &str)>) {
    qcow2::create(
        path,
        &Qcow2CreateOptions {
            size,
            cluster_size: l.cluster_size,
            refcount_bits: l.refcount_bits,
            version: l.version,
            backing_file: backing.map(|(p, _)| p.display().to_string()),
            backing_format: backing.map(|(_, f)| f.to_string()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("create {} {l:?}: {e}", path.display()));
}

/// The image file under the qcow2 driver: holds one data request in sixteen back for a
/// fraction of a millisecond (one in 256 for 2 ms) before passing it on, as a busy host
/// queue does. That widens
/// the window between a request's lookup of a mapping and its I/O, where the races of this
/// file live, so that they show within a few thousand requests on two cores.
#[derive(Debug)]
struct Jitter {
    inner: blockdev::FileStorage,
    requests: AtomicU64,
}

impl Jitter {
    fn pause(&self) {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let h = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56;
        let us = match h {
            0 => 2000,
            1..16 => 100 + (n % 5) * 100,
            _ => return,
        };
        std::thread::sleep(std::time::Duration::from_micros(us));
    }
}

impl blockdev::Storage for Jitter {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn size(&self) -> blockdev::Result<u64> {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        self.pause();
        self.inner.read_at(buf, offset)
    }
    fn read_vectored_at(
        &self,
        bufs: &mut [std::io::IoSliceMut<'_>],
        offset: u64,
    ) -> blockdev::Result<()> {
        self.pause();
        self.inner.read_vectored_at(bufs, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        self.pause();
        self.inner.write_at(buf, offset)
    }
    fn write_vectored_at(
        &self,
        bufs: &[std::io::IoSlice<'_>],
        offset: u64,
    ) -> blockdev::Result<()> {
        self.pause();
        self.inner.write_vectored_at(bufs, offset)
    }
    fn flush(&self) -> blockdev::Result<()> {
        // Durability is not under test here (cache=unsafe): without the syncs a flush, which
        // applies the deferred frees, takes less time than a held-back request.
        Ok(())
    }
    fn truncate(&self, size: u64) -> blockdev::Result<()> {
        self.inner.truncate(size)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> blockdev::Result<()> {
        self.inner.write_zeroes(offset, len, may_unmap)
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        self.inner.discard(offset, len)
    }
    fn allocation(&self, offset: u64, len: u64) -> blockdev::Result<(blockdev::Allocation, u64)> {
        self.inner.allocation(offset, len)
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// Opens a qcow2 image read-write with `discard=unmap` (freed clusters are punched in the
/// file and reused) on a [`Jitter`] storage, over `backing` (opened read-only as usual).
fn open_rw(path: &Path, backing: Option<(&Path, &str)>) -> Image {
    let file = blockdev::FileStorage::open_read_write(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let jitter = Jitter {
        inner: file,
        requests: AtomicU64::new(0),
    };
    let driver = qcow2::Qcow2::open(
        std::sync::Arc::new(jitter),
        &qcow2::Qcow2OpenOptions {
            read_only: false,
            discard: DiscardMode::Unmap,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let backing = backing.map(|(p, fmt)| {
        open_image(
            p,
            &OpenOptions {
                format: Some(fmt.into()),
                read_only: true,
                ..Default::default()
            },
        )
        .unwrap()
    });
    let mut img = Image::new(Box::new(driver), backing);
    img.set_request_options(DiscardMode::Unmap, img_core::DetectZeroes::Off);
    img
}

/// The final checks: a clean `qemu-img check` (no corruption, no leaks), img-core reads the
/// whole model back, and `qemu-img compare` finds the image equal to a raw copy of the model.
fn assert_final(path: &Path, model: &Model, dir: &Path) {
    common::assert_qemu_check_clean(path);
    let img = open_image(
        path,
        &OpenOptions {
            format: Some("qcow2".into()),
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let pages: Vec<u64> = model.pages.lock().unwrap().keys().copied().collect();
    for p in pages {
        let end = ((p + 1) * PAGE).min(model.size);
        assert_reads_as_model(&img, model, p * PAGE, end - p * PAGE, "after the run");
    }
    drop(img);
    let raw = dir.join("model.raw");
    model.write_raw(&raw);
    common::assert_qemu_compare_identical(&raw, "raw", path, "qcow2");
}

// ---------------------------------------------------------------------------------------------
// 1. Many queues allocating clusters, L2 tables and refcount blocks at once.
// ---------------------------------------------------------------------------------------------

/// Threads meet at a barrier, then all write into one window around a boundary (an L2
/// table's start most rounds, else a random cluster boundary): thread `t` gets its own
/// slice of the window, whose slices are 1.5 clusters wide, so every write straddles a
/// cluster boundary, neighbours share clusters, and the middle threads straddle the L2
/// boundary; the L2 table (on 512-byte clusters, the refcount block, and now and then the
/// refcount table) past it is allocated by all of them at once. Between rounds each thread
/// also writes or zeroes a random range anywhere (up to 1.5 L2 tables long), ordered
/// against overlapping requests by the range lock. After each request the thread reads its
/// bytes back.
fn allocate_at_boundaries(l: Layout, size: u64, threads: usize, rounds: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    create(&path, size, l, None);
    let img = open_rw(&path, None);
    let model = Model::new(size);
    let locks = RangeLock::default();
    let cs = l.cluster_size;
    let l2_span = cs / 8 * cs;
    let l2_tables = size.div_ceil(l2_span);
    let crew = Crew::new(threads);
    let slot = cs + cs / 2;
    let what = format!("{l:?}");
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (img, model, locks, crew, what) = (&img, &model, &locks, &crew, &what);
            s.spawn(move || {
                let _member = crew.join();
                let mut rng = StdRng::seed_from_u64(seed * 100 + t as u64);
                for round in 0..rounds {
                    // Every thread computes the same boundary for the round.
                    let mut shared = StdRng::seed_from_u64(seed ^ ((round as u64) << 20));
                    let boundary = if round % 3 != 2 {
                        shared.random_range(1..l2_tables.max(2)) * l2_span
                    } else {
                        shared.random_range(1..size / cs) * cs
                    };
                    let window = slot * threads as u64;
                    let base = boundary.saturating_sub(window / 2).min(size - window);
                    let lo = base + t as u64 * slot;
                    let start = lo + rng.random_range(0..slot / 4);
                    let end = lo + slot - rng.random_range(0..slot / 4);
                    crew.wait();
                    let data =
                        common::pattern((round * threads + t) as u8, start, (end - start) as usize);
                    {
                        let _g = locks.lock(start, end);
                        img.write_at(&data, start)
                            .unwrap_or_else(|e| panic!("{what}: write {start}..{end}: {e}"));
                        model.write(start, &data);
                        assert_reads_as_model(img, model, start, end - start, what);
                    }
                    // A random request anywhere.
                    let len = rng.random_range(1..=(l2_span + l2_span / 2).min(256 << 10));
                    let start = if rng.random_bool(0.5) {
                        // Near a table boundary.
                        let b = rng.random_range(1..l2_tables.max(2)) * l2_span;
                        (b + rng.random_range(0..4 * l2_span.min(1 << 20)))
                            .saturating_sub(2 * l2_span.min(1 << 20))
                            .min(size - len)
                    } else {
                        rng.random_range(0..=size - len)
                    };
                    let _g = locks.lock(start, start + len);
                    match rng.random_range(0..10) {
                        0 => {
                            img.write_zeroes(start, len, rng.random_bool(0.5)).unwrap();
                            model.zero(start, len);
                        }
                        _ => {
                            let data = common::pattern(rng.random(), start, len as usize);
                            img.write_at(&data, start).unwrap();
                            model.write(start, &data);
                        }
                    }
                    assert_reads_as_model(img, model, start, len, what);
                    if t == 0 && round % 64 == 63 {
                        img.flush().unwrap();
                    }
                }
            });
        }
    });
    img.close().unwrap();
    assert_final(&path, &model, dir.path());
    eprintln!(
        "{what}: {rounds} rounds x {threads} threads in {:?}",
        t0.elapsed()
    );
}

#[test]
fn queues_allocate_l2_tables_and_refcount_blocks_at_once() {
    let n = scale();
    // 512-byte clusters: an L2 table maps 32 KiB, a refcount block of 64-bit entries covers
    // 32 KiB of file, and the refcount table (one cluster, 64 blocks) must grow after 2 MiB.
    allocate_at_boundaries(layout(512, 64, 3), 16 << 20, 6, 1400 * n, 1);
    allocate_at_boundaries(layout(512, 1, 3), 16 << 20, 6, 1000 * n, 2);
    allocate_at_boundaries(layout(512, 16, 2), 16 << 20, 6, 1000 * n, 3);
    allocate_at_boundaries(layout(4096, 64, 3), 64 << 20, 6, 600 * n, 4);
    // 64 KiB clusters: an L2 table maps 512 MiB; a sparse 3 GiB disk has six boundaries.
    allocate_at_boundaries(layout(65536, 1, 3), 3 << 30, 6, 300 * n, 5);
    allocate_at_boundaries(layout(65536, 16, 2), 3 << 30, 6, 300 * n, 6);
}

// ---------------------------------------------------------------------------------------------
// 2. Discards and unmapping write-zeroes racing the reallocation of the clusters they free.
// ---------------------------------------------------------------------------------------------

/// Most of the disk is written, discarded and zeroed (with `may_unmap`) by two threads whose
/// overlapping requests the range lock orders: the model stays exact. In the last 128
/// clusters ("contested"), two writers each own alternate runs of four clusters and
/// write whole clusters of data that names the guest cluster and a seed, while a third
/// thread discards and unmap-zeroes random runs there with no lock at all, flushing every
/// other request (a flush applies the deferred frees and punches the freed clusters in the
/// file, so they are reused at once, often for another guest offset and often by the exact
/// half). A contested cluster must read as zeros or as one of its owner's writes: a punch
/// or a stale write landing on a reused cluster shows up as zeros in the exact part or as
/// another cluster's data.
fn discards_race_reallocation(l: Layout, size: u64, ops: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    create(&path, size, l, None);
    let img = open_rw(&path, None);
    let cs = l.cluster_size;
    // Few contested clusters, so that the racing discards often hit a write in flight.
    let contested = 128u64;
    let half = size - contested * cs;
    let seeds: Vec<AtomicU64> = (0..contested).map(|_| AtomicU64::new(0)).collect();
    let model = Model::new(size);
    let locks = RangeLock::default();
    let crew = Crew::new(0);
    let what = format!("{l:?}");
    let t0 = std::time::Instant::now();
    // Whether a contested cluster's content is one its owner may have left there.
    let valid = |c: u64, content: &[u8]| -> bool {
        if content.iter().all(|&b| b == 0) {
            return true;
        }
        let bits = seeds[c as usize].load(Ordering::Acquire);
        (1..64u8).any(|sd| {
            bits & (1 << sd) != 0 && content == common::pattern(sd, half + c * cs, cs as usize)
        })
    };
    let discards = AtomicU64::new(0);
    let contested_writes = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (img, model, locks, crew, what) = (&img, &model, &locks, &crew, &what);
            s.spawn(move || {
                let _member = crew.join();
                let mut rng = StdRng::seed_from_u64(seed * 10 + t);
                for _ in 0..ops {
                    let len = rng.random_range(1..=(8 * cs).min(half));
                    let start = rng.random_range(0..=half - len);
                    let _g = locks.lock(start, start + len);
                    match rng.random_range(0..10) {
                        0 | 1 => {
                            img.discard(start, len).unwrap();
                            if let Some((s, n)) = common::discarded_range(start, len, cs, size) {
                                model.zero(s, n);
                            }
                        }
                        2 | 3 => {
                            img.write_zeroes(start, len, true).unwrap();
                            model.zero(start, len);
                        }
                        _ => {
                            let data = common::pattern(rng.random(), start, len as usize);
                            img.write_at(&data, start).unwrap();
                            model.write(start, &data);
                        }
                    }
                    assert_reads_as_model(img, model, start, len, what);
                }
            });
        }
        for t in 0..2u64 {
            let (img, seeds, crew, valid, what, contested_writes) =
                (&img, &seeds, &crew, &valid, &what, &contested_writes);
            s.spawn(move || {
                let _member = crew.join();
                let mut rng = StdRng::seed_from_u64(seed * 10 + 5 + t);
                let blocks = contested / 4;
                let mut back = vec![0u8; cs as usize];
                for _ in 0..ops {
                    let b = rng.random_range(0..blocks / 2) * 2 + t;
                    let first = b * 4 + rng.random_range(0..4);
                    let n = rng.random_range(1..=b * 4 + 4 - first);
                    let sd: u8 = rng.random_range(1..64);
                    for c in first..first + n {
                        seeds[c as usize].fetch_or(1 << sd, Ordering::AcqRel);
                    }
                    let off = half + first * cs;
                    let data = common::pattern(sd, off, (n * cs) as usize);
                    img.write_at(&data, off).unwrap();
                    contested_writes.fetch_add(1, Ordering::AcqRel);
                    for c in first..first + n {
                        img.read_at(&mut back, half + c * cs).unwrap();
                        assert!(
                            valid(c, &back),
                            "{what}: contested guest cluster at {} reads neither zeros nor \
                             a write of its owner",
                            half + c * cs
                        );
                    }
                }
            });
        }
        let (img, crew, discards, contested_writes) = (&img, &crew, &discards, &contested_writes);
        s.spawn(move || {
            let _member = crew.join();
            let mut rng = StdRng::seed_from_u64(seed * 10 + 9);
            let mut i = 0u64;
            while crew.done() < 4 && !crew.failed() {
                // One racing request for every two contested writes, so that the writes
                // are neither all wiped out nor left alone.
                if i * 2 > contested_writes.load(Ordering::Acquire) {
                    std::thread::yield_now();
                    continue;
                }
                let first = rng.random_range(0..contested);
                let n = rng.random_range(1..=(contested - first).min(8));
                let off = half + first * cs;
                match i % 3 {
                    0 => img.discard(off, n * cs).unwrap(),
                    1 => img.write_zeroes(off, n * cs, true).unwrap(),
                    // Unaligned: the partial clusters at both ends stay.
                    _ => img
                        .discard(off + cs / 2, (n * cs).min(size - off - cs / 2))
                        .unwrap(),
                }
                i += 1;
                if i.is_multiple_of(2) {
                    img.flush().unwrap();
                }
            }
            discards.store(i, Ordering::Release);
        });
    });
    img.close().unwrap();
    common::assert_qemu_check_clean(&path);
    // The contested clusters' content is one of the allowed ones; it joins the model, so that
    // the whole disk is compared (through qemu-img too).
    let ro = open_image(
        &path,
        &OpenOptions {
            format: Some("qcow2".into()),
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; cs as usize];
    let mut zeros = 0;
    for c in 0..contested {
        ro.read_at(&mut buf, half + c * cs).unwrap();
        assert!(
            valid(c, &buf),
            "{what}: after the run, contested guest cluster at {} reads neither zeros nor a \
             write of its owner",
            half + c * cs
        );
        zeros += buf.iter().all(|&b| b == 0) as u64;
        model.write(half + c * cs, &buf);
    }
    drop(ro);
    assert_final(&path, &model, dir.path());
    eprintln!(
        "{what}: {ops} requests x 4 writers, {} racing discards, {zeros}/{contested} contested \
         clusters zero at the end, in {:?}",
        discards.load(Ordering::Acquire),
        t0.elapsed()
    );
}

#[test]
fn discards_race_reallocation_of_the_clusters_they_free() {
    let n = scale();
    discards_race_reallocation(layout(512, 16, 3), 2 << 20, 4000 * n, 1);
    discards_race_reallocation(layout(512, 64, 3), 2 << 20, 4000 * n, 2);
    discards_race_reallocation(layout(4096, 1, 3), 8 << 20, 1500 * n, 3);
    discards_race_reallocation(layout(65536, 16, 3), 32 << 20, 300 * n, 4);
    discards_race_reallocation(layout(65536, 16, 2), 32 << 20, 300 * n, 5);
}

// ---------------------------------------------------------------------------------------------
// 3. Clusters and refcount blocks freed (snapshot deletes, discards, copy-on-write) while
//    other requests still use them.
// ---------------------------------------------------------------------------------------------

/// Rounds of: with the image to itself, delete an internal snapshot (freeing what only it
/// held) and/or create one (every cluster gains a second reference, so the next writes
/// copy); then concurrent requests. Three writers make partial writes (copying shared
/// clusters, which drops a reference on the old ones), write-zeroes and discards in half of
/// the disk, ordered by the range lock; a fourth thread discards whole clusters of a
/// "doomed" quarter with no lock, alternately discarding runs of clusters of two of its
/// segments and writing their data of the round's start back, with a flush after every
/// rewrite (applying the deferred frees and punching the freed clusters, which everybody
/// then reuses); two readers read the frozen quarter, which nobody changes in that round
/// (its clusters are shared with the snapshots, their neighbours freed and reused),
/// comparing it with the model, and the two churned segments, where every cluster must
/// read as its data of the round's start or as zeros: a read through a mapping whose
/// cluster was freed and reused would show another cluster's data. The quarters move every
/// round. At the end the active disk and every surviving snapshot (read by
/// qemu-img) must equal their models.
fn snapshots_and_discards_free_clusters_in_use(
    l: Layout,
    size: u64,
    rounds: usize,
    ops: usize,
    seed: u64,
) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.qcow2");
    create(&path, size, l, None);
    let mut img = open_rw(&path, None);
    let cs = l.cluster_size;
    let model = Model::new(size);
    // Data everywhere but in every fifth megabyte, so that snapshots share many clusters.
    for (i, off) in (0..size).step_by(1 << 20).enumerate() {
        if i % 5 != 4 {
            let n = (1 << 20).min(size - off);
            let data = common::pattern(0xa5, off, n as usize);
            img.write_at(&data, off).unwrap();
            model.write(off, &data);
        }
    }
    let seg = (4 * cs).max(64 << 10);
    let segs = size / seg;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut snaps: Vec<(String, Model)> = Vec::new();
    let what = format!("{l:?}");
    let t0 = std::time::Instant::now();
    let mut deleted = 0;
    for round in 0..rounds {
        {
            let q = qcow2::driver_of(&mut img).unwrap();
            // Every other round, so that in the rounds between the doomed quarter holds
            // clusters written since the last snapshot, which discards free.
            let snapshot_round = round % 2 == 0;
            if snapshot_round && (snaps.len() >= 3 || (!snaps.is_empty() && rng.random_bool(0.4))) {
                let (name, _) = snaps.remove(rng.random_range(0..snaps.len()));
                q.delete_snapshot(&name)
                    .unwrap_or_else(|e| panic!("{what}: delete snapshot {name}: {e}"));
                deleted += 1;
            }
            if snapshot_round && snaps.len() < 3 && rng.random_bool(0.8) {
                let name = format!("s{round}");
                q.create_snapshot(&name, (1_700_000_000 + round as u32, 0))
                    .unwrap_or_else(|e| panic!("{what}: create snapshot {name}: {e}"));
                snaps.push((name, model.snapshot()));
            }
        }
        // A quarter of the segments nobody changes this round, a quarter only the unlocked
        // discarder changes (one the writers changed in the round before), the rest the
        // writers.
        let class = move |seg_index: u64| (seg_index + 3 * round as u64) % 4;
        let (frozen, doomed) = (0, 1);
        let before = model.snapshot();
        // The discarder churns two doomed segments, so that the readers often catch a
        // cluster between its discard, its reuse and its rewrite.
        let hot: Vec<u64> = (0..segs)
            .filter(|&sg| class(sg) == doomed)
            .take(2)
            .collect();
        let (before, hot) = (&before, &hot);
        let locks = RangeLock::default();
        let crew = Crew::new(0);
        let img = &img;
        let pick = move |rng: &mut StdRng, want: &dyn Fn(u64) -> bool| loop {
            let sg = rng.random_range(0..segs);
            if want(class(sg)) {
                break sg;
            }
        };
        std::thread::scope(|s| {
            for t in 0..3u64 {
                let (model, locks, crew, what) = (&model, &locks, &crew, &what);
                s.spawn(move || {
                    let _member = crew.join();
                    let mut rng = StdRng::seed_from_u64(seed * 1000 + round as u64 * 10 + t);
                    for _ in 0..ops {
                        let sg = pick(&mut rng, &|c| c > doomed);
                        let len = rng.random_range(1..=seg);
                        let start = sg * seg + rng.random_range(0..=seg - len);
                        let _g = locks.lock(start, start + len);
                        match rng.random_range(0..10) {
                            0 => {
                                img.discard(start, len).unwrap();
                                if let Some((s, n)) = common::discarded_range(start, len, cs, size)
                                {
                                    model.zero(s, n);
                                }
                            }
                            1 => {
                                img.write_zeroes(start, len, rng.random_bool(0.5)).unwrap();
                                model.zero(start, len);
                            }
                            _ => {
                                let data = common::pattern(rng.random(), start, len as usize);
                                img.write_at(&data, start).unwrap();
                                model.write(start, &data);
                            }
                        }
                        assert_reads_as_model(img, model, start, len, what);
                    }
                });
            }
            // The discarder: whole clusters of the hot doomed segments, no lock, and a flush
            // (which frees and punches what the discards and copies released) after every
            // rewrite, while the readers may be reading those clusters.
            let (dmodel, dcrew) = (&model, &crew);
            s.spawn(move || {
                let _member = dcrew.join();
                let mut rng = StdRng::seed_from_u64(seed * 1000 + round as u64 * 10 + 3);
                for i in 0..ops {
                    let sg = hot[rng.random_range(0..hot.len())];
                    let per_seg = seg / cs;
                    let first = rng.random_range(0..per_seg);
                    let n = rng.random_range(1..=(per_seg - first).min(8));
                    let start = sg * seg + first * cs;
                    if i % 2 == 0 {
                        img.discard(start, n * cs).unwrap();
                        dmodel.zero(start, n * cs);
                    } else {
                        // Put the data back (in fresh clusters), for the next discard to free.
                        let data = before.read(start, n * cs);
                        img.write_at(&data, start).unwrap();
                        dmodel.write(start, &data);
                        img.flush().unwrap();
                    }
                }
            });
            for t in 0..2u64 {
                let (model, crew, what) = (&model, &crew, &what);
                s.spawn(move || {
                    let _member = crew.join();
                    let mut rng = StdRng::seed_from_u64(seed * 1000 + round as u64 * 10 + 5 + t);
                    let mut buf = Vec::new();
                    while crew.done() < 4 && !crew.failed() {
                        if rng.random_bool(0.5) {
                            let sg = pick(&mut rng, &|c| c == frozen);
                            let len = rng.random_range(1..=2 * cs);
                            let start = sg * seg + rng.random_range(0..=seg - len);
                            assert_reads_as_model(img, model, start, len, what);
                            continue;
                        }
                        // Clusters being discarded: each reads as before, or as zeros.
                        let sg = hot[rng.random_range(0..hot.len())];
                        let per_seg = seg / cs;
                        let first = rng.random_range(0..per_seg);
                        let n = rng.random_range(1..=(per_seg - first).min(8));
                        let start = sg * seg + first * cs;
                        buf.resize((n * cs) as usize, 0);
                        img.read_at(&mut buf, start).unwrap();
                        for (k, got) in buf.chunks(cs as usize).enumerate() {
                            let at = start + k as u64 * cs;
                            assert!(
                                got.iter().all(|&b| b == 0) || got == before.read(at, cs),
                                "{what}: guest cluster at {at}, being discarded, reads neither \
                                 its data nor zeros"
                            );
                        }
                    }
                });
            }
        });
    }
    img.close().unwrap();
    assert_final(&path, &model, dir.path());
    for (name, snap) in &snaps {
        let out = dir.path().join(format!("{name}.raw"));
        common::qemu_img(&[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "-l",
            &format!("snapshot.name={name}"),
            &path.display().to_string(),
            &out.display().to_string(),
        ]);
        let got = std::fs::read(&out).unwrap();
        let want = snap.read(0, size);
        if got != want {
            let i = (0..got.len()).find(|&i| got[i] != want[i]).unwrap();
            panic!(
                "{what}: snapshot {name}: guest byte {i} is {:#04x}, its model has {:#04x}",
                got[i], want[i]
            );
        }
    }
    eprintln!(
        "{what}: {rounds} rounds of {ops} requests x 3 writers, {deleted} snapshots deleted, {} \
         checked, in {:?}",
        snaps.len(),
        t0.elapsed()
    );
}

#[test]
fn freed_clusters_are_not_reused_while_referenced() {
    let n = scale();
    snapshots_and_discards_free_clusters_in_use(layout(512, 16, 3), 4 << 20, 10, 400 * n, 1);
    snapshots_and_discards_free_clusters_in_use(layout(512, 64, 3), 4 << 20, 10, 400 * n, 2);
    snapshots_and_discards_free_clusters_in_use(layout(4096, 8, 3), 8 << 20, 10, 300 * n, 3);
    snapshots_and_discards_free_clusters_in_use(layout(65536, 16, 2), 16 << 20, 10, 120 * n, 4);
    snapshots_and_discards_free_clusters_in_use(layout(65536, 4, 3), 16 << 20, 10, 120 * n, 5);
}

// ---------------------------------------------------------------------------------------------
// 4 and 5. Several queues writing into the same clusters of an overlay over a backing file.
// ---------------------------------------------------------------------------------------------

/// A backing file of `size` bytes holding `data`, as `fmt` (qcow2 with `cluster_size`, or
/// raw). Returns its path; the raw original is `base.raw` in `dir`.
fn make_backing(dir: &Path, data: &[u8], fmt: &str, cluster_size: u64) -> PathBuf {
    let raw = dir.join("base.raw");
    std::fs::write(&raw, data).unwrap();
    if fmt == "raw" {
        return raw;
    }
    let q = dir.join("base.qcow2");
    common::qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        &format!("cluster_size={cluster_size}"),
        &raw.display().to_string(),
        &q.display().to_string(),
    ]);
    q
}

/// Writes `data` at `off`, as one buffer or (on odd `how`) as a gather list of three, the
/// way a virtio queue hands over a request split over guest pages.
fn write_maybe_vectored(img: &Image, data: &[u8], off: u64, how: u64) -> img_core::Result<()> {
    if how.is_multiple_of(2) || data.len() < 3 {
        return img.write_at(data, off);
    }
    let (a, rest) = data.split_at(data.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    img.write_vectored_at(
        &[
            std::io::IoSlice::new(a),
            std::io::IoSlice::new(b),
            std::io::IoSlice::new(c),
        ],
        off,
    )
}

/// Threads meet at a barrier each round, then each writes its own slice of one window: a
/// cluster, or a cluster's width straddling two clusters, chosen the same by all. The
/// clusters are mostly still unallocated in the overlay, so all threads copy them up from
/// the backing file at once (each request's copy-on-write must not undo another's bytes).
fn cow_from_backing(
    l: Layout,
    backing_fmt: &str,
    backing_cs: u64,
    size: u64,
    threads: usize,
    rounds: usize,
    seed: u64,
) {
    let dir = tempfile::tempdir().unwrap();
    // Backing data with holes: every seventh 64 KiB page and a few odd ranges read zeros.
    let mut base = common::pattern(0x5c, 0, size as usize);
    for (i, page) in base.chunks_mut(64 << 10).enumerate() {
        if i % 7 == 3 {
            page.fill(0);
        }
        if i % 5 == 1 {
            page[1000..3000].fill(0);
        }
    }
    let backing = make_backing(dir.path(), &base, backing_fmt, backing_cs);
    let path = dir.path().join("top.qcow2");
    create(&path, size, l, Some((&backing, backing_fmt)));
    let img = open_rw(&path, Some((&backing, backing_fmt)));
    let model = Model::from_bytes(&base);
    let cs = l.cluster_size;
    let clusters = size / cs;
    let crew = Crew::new(threads);
    let what = format!("{l:?} over {backing_fmt}");
    let t0 = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            let (img, model, crew, what) = (&img, &model, &crew, &what);
            s.spawn(move || {
                let _member = crew.join();
                let mut rng = StdRng::seed_from_u64(seed * 100 + t);
                for round in 0..rounds as u64 {
                    let mut shared = StdRng::seed_from_u64((seed << 32) ^ round);
                    let c = shared.random_range(0..clusters - 1);
                    let window = c * cs + if round % 2 == 1 { cs / 2 } else { 0 };
                    let slot = cs / threads as u64;
                    let lo = window + t * slot;
                    let start = lo + rng.random_range(0..slot / 3);
                    let end = lo + slot - rng.random_range(0..slot / 3);
                    let data = common::pattern(rng.random(), start, (end - start) as usize);
                    crew.wait();
                    write_maybe_vectored(img, &data, start, round + t)
                        .unwrap_or_else(|e| panic!("{what}: write {start}..{end}: {e}"));
                    model.write(start, &data);
                    assert_reads_as_model(img, model, start, end - start, what);
                    if t == 0 && round % 100 == 99 {
                        img.flush().unwrap();
                    }
                }
            });
        }
    });
    img.close().unwrap();
    assert_final(&path, &model, dir.path());
    // The backing file is never written.
    common::assert_qemu_compare_identical(
        &dir.path().join("base.raw"),
        "raw",
        &backing,
        backing_fmt,
    );
    eprintln!(
        "{what}: {rounds} rounds x {threads} threads in {:?}",
        t0.elapsed()
    );
}

#[test]
fn queues_copy_up_the_same_backing_clusters_at_once() {
    let n = scale();
    cow_from_backing(
        layout(65536, 16, 3),
        "qcow2",
        4096,
        64 << 20,
        6,
        8000 * n,
        1,
    );
    cow_from_backing(layout(65536, 16, 2), "raw", 0, 64 << 20, 6, 8000 * n, 2);
    cow_from_backing(
        layout(4096, 64, 3),
        "qcow2",
        65536,
        16 << 20,
        6,
        10000 * n,
        3,
    );
    cow_from_backing(layout(512, 1, 3), "raw", 0, 4 << 20, 4, 12000 * n, 4);
}

/// Each round (threads meet at a barrier) one thread, a different one every round, makes a
/// range of the overlay read as zeros over the backing file's data with `write_zeroes`
/// (`may_unmap` or not), while the others write data next to it: a partial zero range with
/// writes into the rest of the same cluster, a range straddling two clusters, or whole
/// clusters with writes into the half clusters on both sides. The zeroed bytes must read
/// as zeros, never as the backing file's data, through img-core, `qemu-img compare`,
/// `qemu-io read -P 0` and `qemu-img map` (whose zero extents must be zeros in the model
/// and whose extents from the backing file must hold the backing file's data in the model).
fn zeroes_over_backing(l: Layout, backing_fmt: &str, size: u64, threads: usize, rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let base = common::pattern(0x77, 0, size as usize);
    let backing = make_backing(dir.path(), &base, backing_fmt, 65536);
    let path = dir.path().join("top.qcow2");
    create(&path, size, l, Some((&backing, backing_fmt)));
    let img = open_rw(&path, Some((&backing, backing_fmt)));
    let model = Model::from_bytes(&base);
    let cs = l.cluster_size;
    let clusters = size / cs;
    let crew = Crew::new(threads);
    let zeroed: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());
    let what = format!("{l:?} over {backing_fmt}");
    let t0 = std::time::Instant::now();
    // The round's plan, the same for every thread: disjoint ranges, one per thread; the
    // first one is zeroed.
    let plan = |round: u64| -> (Vec<(u64, u64)>, bool) {
        let mut r = StdRng::seed_from_u64(round ^ 0x5eed);
        let c = r.random_range(1..clusters - 3);
        let unmap = r.random_bool(0.5);
        let trim = |r: &mut StdRng, s: u64, e: u64| {
            let q = (e - s) / 4;
            (s + r.random_range(0..=q), e - r.random_range(0..=q))
        };
        let mut ranges = Vec::new();
        match round % 3 {
            // Partial: slices of one cluster (or a cluster's width over two clusters).
            0 | 1 => {
                let w = c * cs + if round % 3 == 1 { cs / 2 } else { 0 };
                let slot = cs / threads as u64;
                for t in 0..threads as u64 {
                    ranges.push(trim(&mut r, w + t * slot, w + (t + 1) * slot));
                }
                // The zeroed slice is a random one.
                let z = r.random_range(0..threads);
                ranges.swap(0, z);
            }
            // Whole clusters, with writes into the half clusters on both sides.
            _ => {
                let k = r.random_range(1..=2);
                ranges.push((c * cs, (c + k) * cs));
                let writers = threads as u64 - 1;
                let before = writers.div_ceil(2);
                let slot = (cs / 2) / before;
                for i in 0..before {
                    let s = c * cs - cs / 2 + i * slot;
                    ranges.push(trim(&mut r, s, s + slot));
                }
                let after = writers - before;
                if let Some(slot) = (cs / 2).checked_div(after) {
                    for i in 0..after {
                        let s = (c + k) * cs + i * slot;
                        ranges.push(trim(&mut r, s, s + slot));
                    }
                }
            }
        }
        (ranges, unmap)
    };
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            let (img, model, crew, zeroed, what, plan) =
                (&img, &model, &crew, &zeroed, &what, &plan);
            s.spawn(move || {
                let _member = crew.join();
                for round in 0..rounds as u64 {
                    let (ranges, unmap) = plan(round);
                    // Thread (round % threads) zeroes; the others take the other ranges.
                    let me =
                        ((t + threads as u64 - round % threads as u64) % threads as u64) as usize;
                    let (start, end) = ranges[me];
                    crew.wait();
                    if me == 0 {
                        img.write_zeroes(start, end - start, unmap)
                            .unwrap_or_else(|e| panic!("{what}: write_zeroes {start}..{end}: {e}"));
                        model.zero(start, end - start);
                        zeroed.lock().unwrap().push((start, end - start));
                    } else {
                        let data = common::pattern(round as u8, start, (end - start) as usize);
                        img.write_at(&data, start)
                            .unwrap_or_else(|e| panic!("{what}: write {start}..{end}: {e}"));
                        model.write(start, &data);
                    }
                    assert_reads_as_model(img, model, start, end - start, what);
                }
            });
        }
    });
    img.close().unwrap();
    assert_final(&path, &model, dir.path());
    // qemu-io reads the zeroed ranges that nothing overwrote afterwards as zeros.
    let cmds: Vec<String> = zeroed
        .lock()
        .unwrap()
        .iter()
        .filter(|&&(off, len)| model.read(off, len).iter().all(|&b| b == 0))
        .take(400)
        .map(|&(off, len)| format!("read -q -P 0 {off} {len}"))
        .collect();
    assert!(!cmds.is_empty());
    common::qemu_io_many("qcow2", &path, &cmds);
    // qemu-img map agrees with the model.
    let map = common::qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qcow2",
        &path.display().to_string(),
    ]);
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut zero_extents = 0;
    for e in map.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let got = model.read(start, len);
        if e["zero"].as_bool().unwrap() {
            zero_extents += 1;
            assert!(
                got.iter().all(|&b| b == 0),
                "{what}: qemu-img map reports {start}+{len} as zeros, the model has data there"
            );
        } else if e["depth"].as_u64().unwrap() > 0 {
            assert!(
                got == base[start as usize..(start + len) as usize],
                "{what}: qemu-img map reports {start}+{len} from the backing file, the model \
                 differs from the backing file's data there"
            );
        }
    }
    eprintln!(
        "{what}: {rounds} rounds x {threads} threads, {} ranges read back by qemu-io, \
         {zero_extents} zero extents in qemu-img map, in {:?}",
        cmds.len(),
        t0.elapsed()
    );
}

#[test]
fn write_zeroes_hides_backing_data_next_to_concurrent_writes() {
    let n = scale();
    zeroes_over_backing(layout(65536, 16, 3), "qcow2", 32 << 20, 4, 6000 * n);
    zeroes_over_backing(layout(65536, 16, 3), "raw", 32 << 20, 4, 6000 * n);
    zeroes_over_backing(layout(4096, 16, 3), "raw", 8 << 20, 4, 8000 * n);
    zeroes_over_backing(layout(512, 64, 3), "qcow2", 2 << 20, 4, 8000 * n);
    // Version 2 has no zero flag: zeros are written as data.
    zeroes_over_backing(layout(65536, 16, 2), "qcow2", 32 << 20, 4, 4000 * n);
}

// ---------------------------------------------------------------------------------------------
// Several queues from outside: qemu-io clients writing through `img nbd` at once.
// ---------------------------------------------------------------------------------------------

/// `img nbd --fork` serving one image; stopped (SIGTERM, then waited for) on drop.
struct NbdServer {
    pid: i32,
    sock: PathBuf,
}

impl NbdServer {
    fn start(dir: &Path, args: &[&str]) -> NbdServer {
        let sock = dir.join("nbd.sock");
        let pid_file = dir.join("nbd.pid");
        let out = std::process::Command::new(common::img_bin())
            .arg("nbd")
            .args(["--fork", "--pid-file"])
            .arg(&pid_file)
            .arg("-k")
            .arg(&sock)
            .args(args)
            .output()
            .expect("cannot run img nbd");
        assert!(
            out.status.success(),
            "img nbd {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        NbdServer { pid, sock }
    }

    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        // SAFETY: kill only sends signals to the server we started (signal 0 probes it).
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        for _ in 0..1500 {
            // SAFETY: as above.
            if unsafe { libc::kill(self.pid, 0) } != 0 {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("img nbd (pid {}) did not exit", self.pid);
    }
}

/// Four qemu-io clients, each on its own NBD connection with many asynchronous requests in
/// flight, write interleaved 3 KiB stripes of an overlay over a raw backing file with data
/// (each stripe straddles clusters, so neighbouring stripes of different clients copy the
/// same cluster up at once); every fifth stripe is a write-zeroes (with unmap on every other
/// one) over the backing file's data. The image must check clean and equal the backing
/// data overlaid with the stripes.
#[test]
fn nbd_clients_copy_up_and_zero_the_same_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let base = common::pattern(0x3c, 0, size as usize);
    let backing = make_backing(dir.path(), &base, "raw", 0);
    let path = dir.path().join("top.qcow2");
    create(&path, size, layout(4096, 16, 3), Some((&backing, "raw")));
    let stripe = 3072u64;
    let clients = 4u64;
    let mut model = base.clone();
    let mut scripts: Vec<Vec<String>> = vec![Vec::new(); clients as usize];
    for (k, off) in (0..size).step_by(stripe as usize).enumerate() {
        let k = k as u64;
        let c = k % clients;
        let len = stripe.min(size - off);
        let r = &mut model[off as usize..(off + len) as usize];
        let cmd = if (k / clients) % 5 == 4 {
            r.fill(0);
            let u = if k.is_multiple_of(2) { " -u" } else { "" };
            format!("aio_write -q -z{u} {off} {len}")
        } else {
            let b = 0x40 + c as u8 + (k % 3) as u8 * 16;
            r.fill(b);
            format!("aio_write -q -P {b} {off} {len}")
        };
        scripts[c as usize].push(cmd);
    }
    let raw_model = dir.path().join("model.raw");
    std::fs::write(&raw_model, &model).unwrap();
    let srv = NbdServer::start(
        dir.path(),
        &[
            "-t",
            "-e",
            "4",
            "--discard=unmap",
            "-f",
            "qcow2",
            &path.display().to_string(),
        ],
    );
    let url = srv.url();
    std::thread::scope(|s| {
        for script in &scripts {
            let url = url.clone();
            s.spawn(move || {
                // Batches of 64 requests in flight, each batch drained by aio_flush.
                let mut cmds = Vec::new();
                for batch in script.chunks(64) {
                    cmds.extend(batch.iter().cloned());
                    cmds.push("aio_flush".to_string());
                }
                common::qemu_io_many("raw", Path::new(&url), &cmds);
            });
        }
    });
    drop(srv);
    common::assert_qemu_check_clean(&path);
    common::assert_qemu_compare_identical(&raw_model, "raw", &path, "qcow2");
}
