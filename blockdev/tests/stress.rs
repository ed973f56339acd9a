//! Concurrency stress of every engine in every cache mode: threads write random, often
//! unaligned, ranges of their own regions, read them back, flush, and at the end the whole file
//! must equal the model.
//!
//! The regions are not multiples of the O_DIRECT block size, so neighbouring threads share
//! blocks and their unaligned writes race for the same read-modify-write blocks; the file
//! starts empty, so writes past the end race with each other for the file size.

mod common;

use blockdev::{Aio, AlignedBuf, CacheMode, EngineOptions, Storage};
use common::{Rng, CACHES, ENGINES};
use std::sync::Barrier;

const THREADS: usize = 16;
/// Bytes per thread: not a multiple of 512 or 4096.
const REGION: u64 = 40_000;

struct Region {
    data: Vec<u8>,
    /// End (file offset) of the furthest byte this thread wrote.
    max_end: u64,
}

fn stress(aio: Aio, cache: CacheMode, sqpoll: bool, ops: usize, seed: u64) {
    let dir = common::tempdir();
    let path = common::file(&dir, "stress.img");
    let engine = EngineOptions {
        sqpoll,
        ..Default::default()
    };
    let s = common::open_engine(&path, aio, cache, engine);
    let barrier = Barrier::new(THREADS);
    let regions: Vec<Region> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let s = &s;
                let barrier = &barrier;
                scope.spawn(move || {
                    let mut rng = Rng::new(seed ^ (t as u64) << 32);
                    let base = t as u64 * REGION;
                    let mut model = Region {
                        data: vec![0; REGION as usize],
                        max_end: 0,
                    };
                    barrier.wait();
                    for _ in 0..ops {
                        match rng.below(10) {
                            0..=5 => write(s, &mut rng, base, &mut model),
                            6..=8 => read_back(s, &mut rng, base, &model, aio, cache),
                            _ => s.flush().unwrap(),
                        }
                    }
                    model
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    s.flush().unwrap();
    let size = regions.iter().map(|r| r.max_end).max().unwrap();
    assert_eq!(s.size().unwrap(), size, "{aio:?}/{cache:?}: file size");
    let mut expect = Vec::with_capacity(size as usize);
    for r in &regions {
        expect.extend_from_slice(&r.data);
    }
    expect.truncate(size as usize);
    // Through the engine under test, and independently through std.
    let mut got = vec![0u8; size as usize];
    s.read_at(&mut got, 0).unwrap();
    assert!(
        got == expect,
        "{aio:?}/{cache:?}: content differs from the model"
    );
    drop(s);
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk == expect, "{aio:?}/{cache:?}: file on disk differs");
}

fn write(s: &dyn Storage, rng: &mut Rng, base: u64, model: &mut Region) {
    let (off, len, aligned) = if rng.below(4) == 0 {
        // Block-aligned in offset, length and memory: the O_DIRECT fast path.
        let lo = base.div_ceil(4096) * 4096;
        let hi = (base + REGION) / 4096 * 4096;
        let n = 1 + rng.below(2);
        let b = rng.below((hi - lo) / 4096 - n + 1);
        (lo + b * 4096 - base, (n * 4096) as usize, true)
    } else {
        let len = 1 + rng.below(9000) as usize;
        let off = rng.below(REGION - len as u64);
        (off, len, false)
    };
    let at = base + off;
    let mut buf = AlignedBuf::zeroed(len + 1, 4096);
    rng.fill(&mut buf);
    // Unaligned requests also get an unaligned buffer now and then.
    let data: &[u8] = if !aligned && rng.below(2) == 0 {
        &buf[1..len + 1]
    } else {
        &buf[..len]
    };
    s.write_at(data, at).unwrap();
    model.data[off as usize..off as usize + len].copy_from_slice(data);
    model.max_end = model.max_end.max(at + len as u64);
}

fn read_back(s: &dyn Storage, rng: &mut Rng, base: u64, model: &Region, aio: Aio, c: CacheMode) {
    // Only what lies below this thread's own furthest write is surely inside the file.
    if model.max_end <= base {
        return;
    }
    let avail = model.max_end - base;
    let off = rng.below(avail);
    let len = 1 + rng.below((avail - off).min(12_000)) as usize;
    let mut buf = vec![0u8; len];
    s.read_at(&mut buf, base + off).unwrap();
    assert!(
        buf == model.data[off as usize..off as usize + len],
        "{aio:?}/{c:?}: read of {len} at {} differs from the model",
        base + off
    );
}

/// Operations per thread: fewer where every write is synchronous to the disk.
fn ops(cache: CacheMode) -> usize {
    if cache.sync_writes() {
        40
    } else {
        200
    }
}

fn run_engine(aio: Aio, sqpoll: bool) {
    for (i, cache) in CACHES.into_iter().enumerate() {
        if aio == Aio::Native && !cache.direct() {
            continue;
        }
        stress(aio, cache, sqpoll, ops(cache), 0x5eed_0000 + i as u64);
    }
}

#[test]
fn threads_engine_every_cache_mode() {
    run_engine(Aio::Threads, false);
}

#[test]
fn io_uring_engine_every_cache_mode() {
    run_engine(Aio::IoUring, false);
}

#[test]
fn io_uring_sqpoll_every_cache_mode() {
    run_engine(Aio::IoUring, true);
}

#[test]
fn native_engine_direct_cache_modes() {
    run_engine(Aio::Native, false);
}

#[test]
fn engines_list_is_complete() {
    // A new engine must be added to the stress runs above.
    assert_eq!(ENGINES.len(), 3);
}
