//! Storage engine benchmarks: random 4 KiB reads and writes on a 256 MiB file through
//! `FileStorage`, for the thread and io_uring engines, with the page cache (writeback) and
//! without (none, O_DIRECT), at queue depth 1 and 32. The queue depth is the number of threads
//! issuing requests at once on the one shared `FileStorage`, as the formats' worker threads do.
//!
//! io_uring is measured twice: as set up by default, and with a kernel thread polling the
//! submission queue (SQPOLL).
//!
//! One iteration is one 4 KiB request, so criterion's throughput is bytes per second; divide by
//! 4096 for IOPS.

use blockdev::{Aio, AlignedBuf, CacheMode, EngineOptions, FileOptions, FileStorage, Storage};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::io::Write;
use std::path::Path;
use std::sync::Barrier;
use std::time::{Duration, Instant};

const FILE_SIZE: u64 = 256 << 20;
const BLOCK: usize = 4096;
const BLOCKS: u64 = FILE_SIZE / BLOCK as u64;

/// Writes the whole file with data (not a sparse or fallocated file, whose reads the
/// filesystem would answer without touching the disk) and syncs it.
fn make_file(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
    for _ in 0..FILE_SIZE / chunk.len() as u64 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
}

/// splitmix64, one per thread: cheap enough not to show in the numbers.
struct Rng(u64);

impl Rng {
    fn block_offset(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) % BLOCKS) * BLOCK as u64
    }
}

/// Runs `iters` random 4 KiB requests spread over `depth` threads and returns the time from
/// the moment all threads are ready until all are done.
fn run(s: &FileStorage, write: bool, depth: usize, iters: u64) -> Duration {
    let start = Barrier::new(depth + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..depth)
            .map(|t| {
                let (s, start) = (s, &start);
                let n = iters / depth as u64 + u64::from((t as u64) < iters % depth as u64);
                scope.spawn(move || {
                    let mut rng = Rng(t as u64 * 0x1234_5678 + iters);
                    let mut buf = AlignedBuf::zeroed(BLOCK, BLOCK);
                    buf.fill(t as u8);
                    start.wait();
                    for _ in 0..n {
                        let off = rng.block_offset();
                        if write {
                            s.write_at(&buf, off).unwrap();
                        } else {
                            s.read_at(&mut buf, off).unwrap();
                        }
                    }
                })
            })
            .collect();
        start.wait();
        let t0 = Instant::now();
        for w in workers {
            w.join().unwrap();
        }
        t0.elapsed()
    })
}

fn random_4k(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("bench.raw");
    make_file(&path);
    for write in [false, true] {
        let mut g = c.benchmark_group(if write {
            "storage_random_4k_write"
        } else {
            "storage_random_4k_read"
        });
        g.throughput(Throughput::Bytes(BLOCK as u64));
        g.sample_size(10);
        g.warm_up_time(Duration::from_millis(500));
        g.measurement_time(Duration::from_secs(2));
        for cache in [CacheMode::Writeback, CacheMode::None] {
            for (aio, sqpoll) in [
                (Aio::Threads, false),
                (Aio::IoUring, false),
                (Aio::IoUring, true),
            ] {
                let s = FileStorage::open_with(
                    &path,
                    FileOptions {
                        cache,
                        aio,
                        ..Default::default()
                    },
                    EngineOptions {
                        sqpoll,
                        ..Default::default()
                    },
                )
                .unwrap();
                if s.engine() != aio {
                    eprintln!(
                        "note: {} is not available here; measuring threads",
                        aio.name()
                    );
                }
                let cache_name = if cache == CacheMode::None {
                    "none"
                } else {
                    "writeback"
                };
                for depth in [1usize, 32] {
                    let engine = if sqpoll {
                        "io_uring_sqpoll"
                    } else {
                        aio.name()
                    };
                    let id = format!("{engine}/{cache_name}/qd{depth}");
                    g.bench_function(id, |b| b.iter_custom(|iters| run(&s, write, depth, iters)));
                }
            }
        }
        g.finish();
    }
}

criterion_group!(benches, random_4k);
criterion_main!(benches);
