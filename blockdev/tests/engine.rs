//! Engine behaviour: ring saturation, the read-modify-write race of O_DIRECT, aio=native's
//! requirement, drop and reuse.

mod common;

use blockdev::{Aio, CacheMode, Error, FileOptions, FileStorage, Storage, NATIVE_NEEDS_DIRECT};
use common::Rng;
use std::sync::Barrier;

/// More threads than ring entries, each with several requests in flight over its life: the
/// ring is full most of the time and requesters wait for free entries.
#[test]
fn ring_saturation() {
    for (cache, sqpoll) in [
        (CacheMode::Writeback, false),
        (CacheMode::None, false),
        (CacheMode::None, true),
    ] {
        let dir = common::tempdir();
        let path = common::file(&dir, "sat.img");
        let engine = blockdev::EngineOptions {
            queue_depth: 2,
            sqpoll,
        };
        let s = common::open_engine(&path, Aio::IoUring, cache, engine);
        if s.engine() == Aio::IoUring {
            assert_eq!(s.queue_depth(), Some(2));
        }
        const THREADS: u64 = 32;
        const CHUNK: u64 = 4096;
        s.truncate(THREADS * 8 * CHUNK).unwrap();
        let barrier = Barrier::new(THREADS as usize);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (s, barrier) = (&s, &barrier);
                scope.spawn(move || {
                    let mut rng = Rng::new(t);
                    let mut buf = blockdev::AlignedBuf::zeroed(CHUNK as usize, 4096);
                    barrier.wait();
                    for round in 0..40u64 {
                        let slot = (t * 8 + round % 8) * CHUNK;
                        rng.fill(&mut buf);
                        let want = buf.to_vec();
                        s.write_at(&buf, slot).unwrap();
                        buf.fill(0);
                        s.read_at(&mut buf, slot).unwrap();
                        assert!(*buf == want[..], "thread {t} round {round}");
                        if round % 16 == 0 {
                            s.flush().unwrap();
                        }
                    }
                });
            }
        });
    }
}

/// Sixteen threads write single bytes and short runs into one O_DIRECT block, each its own
/// 32 bytes. Every unaligned write is a read-modify-write of the whole block, so without the
/// block lock they would undo each other's bytes.
#[test]
fn direct_unaligned_writes_sharing_a_block() {
    for aio in [Aio::Threads, Aio::IoUring] {
        let dir = common::tempdir();
        let path = common::file(&dir, "rmw.img");
        let s = common::open(&path, aio, CacheMode::None, None);
        // Both blocks: the second straddles the end of the file at first.
        s.write_at(&[0u8; 1000], 0).unwrap();
        const THREADS: usize = 16;
        const SPAN: usize = 64;
        let barrier = Barrier::new(THREADS);
        let models: Vec<Vec<u8>> = std::thread::scope(|scope| {
            let hs: Vec<_> = (0..THREADS)
                .map(|t| {
                    let (s, barrier) = (&s, &barrier);
                    scope.spawn(move || {
                        let mut rng = Rng::new(100 + t as u64);
                        let mut model = vec![0u8; SPAN];
                        let base = (t * SPAN) as u64;
                        barrier.wait();
                        for _ in 0..150 {
                            let off = rng.below(SPAN as u64) as usize;
                            let len = 1 + rng.below((SPAN - off) as u64) as usize;
                            let mut data = vec![0u8; len];
                            rng.fill(&mut data);
                            s.write_at(&data, base + off as u64).unwrap();
                            model[off..off + len].copy_from_slice(&data);
                        }
                        model
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expect: Vec<u8> = models.concat();
        assert_eq!(s.size().unwrap(), expect.len() as u64);
        let mut got = vec![0u8; expect.len()];
        s.read_at(&mut got, 0).unwrap();
        let lost = got.iter().zip(&expect).filter(|(a, b)| a != b).count();
        assert_eq!(
            lost, 0,
            "{aio:?}: {lost} bytes lost to racing read-modify-writes"
        );
    }
}

/// Writes past the end race for the file size: piece k is block k, written either whole and
/// aligned (which just grows the file) or as an unaligned run inside it (a read-modify-write that
/// pads to the block boundary and cuts the file back). The cut must never take away a later
/// block that another thread has written meanwhile.
#[test]
fn direct_unaligned_appends_race_for_the_size() {
    for aio in [Aio::Threads, Aio::IoUring] {
        let dir = common::tempdir();
        let path = common::file(&dir, "grow.img");
        let s = common::open(&path, aio, CacheMode::None, None);
        const THREADS: u64 = 8;
        const PIECES: u64 = 30 * THREADS;
        const BLOCK: u64 = 4096;
        // The unaligned pieces leave HEAD bytes before and TAIL bytes after them untouched.
        const HEAD: u64 = 3;
        const TAIL: u64 = 4;
        let unaligned = |piece: u64| !piece.is_multiple_of(3);
        let barrier = Barrier::new(THREADS as usize);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let (s, barrier) = (&s, &barrier);
                scope.spawn(move || {
                    let mut buf = blockdev::AlignedBuf::zeroed(BLOCK as usize, 4096);
                    barrier.wait();
                    for k in 0..PIECES / THREADS {
                        let piece = k * THREADS + t;
                        buf.fill((piece % 251) as u8 + 1);
                        if unaligned(piece) {
                            let run = &buf[..(BLOCK - HEAD - TAIL) as usize];
                            s.write_at(run, piece * BLOCK + HEAD).unwrap();
                        } else {
                            s.write_at(&buf, piece * BLOCK).unwrap();
                        }
                    }
                });
            }
        });
        let last = PIECES - 1;
        let size = last * BLOCK + if unaligned(last) { BLOCK - TAIL } else { BLOCK };
        assert_eq!(s.size().unwrap(), size, "{aio:?}");
        let data = std::fs::read(&path).unwrap();
        for piece in 0..PIECES {
            let byte = (piece % 251) as u8 + 1;
            let block = &data[(piece * BLOCK) as usize..((piece + 1) * BLOCK).min(size) as usize];
            let ok = if unaligned(piece) {
                let (h, rest) = block.split_at(HEAD as usize);
                let body = &rest[..(BLOCK - HEAD - TAIL) as usize];
                let t = &rest[body.len()..];
                h.iter().chain(t).all(|&b| b == 0) && body.iter().all(|&b| b == byte)
            } else {
                block.iter().all(|&b| b == byte)
            };
            assert!(ok, "{aio:?}: block {piece} damaged");
        }
    }
}

#[test]
fn native_requires_direct() {
    let dir = common::tempdir();
    let path = common::file(&dir, "n.img");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    for cache in [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Unsafe,
    ] {
        for read_only in [false, true] {
            let opts = FileOptions {
                read_only,
                cache,
                aio: Aio::Native,
                create: false,
                ..Default::default()
            };
            let err = FileStorage::open(&path, opts).unwrap_err();
            assert!(matches!(err, Error::InvalidOptions { .. }), "{err:?}");
            assert_eq!(
                err.to_string(),
                "aio=native was specified, but it requires cache.direct=on, which was not specified."
            );
            assert_eq!(err.to_string(), NATIVE_NEEDS_DIRECT);
        }
    }
    // A missing file is reported as missing first, as qemu does.
    let err = FileStorage::open(
        common::file(&dir, "missing"),
        FileOptions {
            aio: Aio::Native,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Open { .. }), "{err:?}");
    for cache in [CacheMode::None, CacheMode::Directsync] {
        let s = common::open(&path, Aio::Native, cache, None);
        let mut b = [1u8; 10];
        s.read_at(&mut b, 5).unwrap();
        assert_eq!(b, [0; 10]);
    }
}

/// Reads that cross the end fail with PastEnd with every engine, aligned or not.
#[test]
fn reads_past_the_end() {
    for aio in [Aio::Threads, Aio::IoUring] {
        for cache in [CacheMode::Writeback, CacheMode::None] {
            let dir = common::tempdir();
            let path = common::file(&dir, "end.img");
            let s = common::open(&path, aio, cache, None);
            s.write_at(&[5u8; 6000], 0).unwrap();
            let mut b = blockdev::AlignedBuf::zeroed(4096, 4096);
            assert!(matches!(
                s.read_at(&mut b, 4096),
                Err(Error::PastEnd { size: 6000, .. })
            ));
            assert!(matches!(
                s.read_at(&mut b[..100], 5950),
                Err(Error::PastEnd { .. })
            ));
            s.read_at(&mut b[..100], 5900).unwrap();
            assert!(b[..100].iter().all(|&x| x == 5));
            s.read_at(&mut [], 1 << 40).unwrap();
        }
    }
}

#[test]
fn drop_while_idle_and_reopen() {
    let dir = common::tempdir();
    let path = common::file(&dir, "idle.img");
    for cache in [CacheMode::Writeback, CacheMode::None] {
        // Never used.
        drop(common::open(&path, Aio::IoUring, cache, None));
        // Used from other threads, then dropped from this one.
        let s = common::open(&path, Aio::IoUring, cache, None);
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let s = &s;
                scope.spawn(move || s.write_at(&[t as u8 + 1; 512], t * 512).unwrap());
            }
        });
        drop(s);
        let s = common::open(&path, Aio::IoUring, cache, None);
        let mut b = vec![0u8; 2048];
        s.read_at(&mut b, 0).unwrap();
        for t in 0..4 {
            assert!(b[t * 512..(t + 1) * 512].iter().all(|&x| x == t as u8 + 1));
        }
    }
}

/// A request larger than one SQE can carry is split into several.
#[test]
fn large_requests() {
    for aio in [Aio::Threads, Aio::IoUring] {
        let dir = common::tempdir();
        let path = common::file(&dir, "big.img");
        let s = common::open(&path, aio, CacheMode::Writeback, None);
        let mut data = vec![0u8; 8 << 20];
        Rng::new(7).fill(&mut data);
        s.write_at(&data, 12345).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_at(&mut back, 12345).unwrap();
        assert!(back == data);
    }
}
