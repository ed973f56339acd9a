//! Helpers shared by the blockdev integration tests.
#![allow(dead_code)]

use blockdev::{Aio, CacheMode, EngineOptions, FileOptions, FileStorage};
use std::path::{Path, PathBuf};

/// Every cache mode.
pub const CACHES: [CacheMode; 5] = [
    CacheMode::Writeback,
    CacheMode::None,
    CacheMode::Writethrough,
    CacheMode::Directsync,
    CacheMode::Unsafe,
];

/// Every engine.
pub const ENGINES: [Aio; 3] = [Aio::Threads, Aio::IoUring, Aio::Native];

/// A temporary directory on the build's disk (O_DIRECT does not work on every tmpfs).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Opens (creating) `path` with `aio` and `cache`, and an optional queue depth.
pub fn open(path: &Path, aio: Aio, cache: CacheMode, depth: Option<u32>) -> FileStorage {
    let engine = EngineOptions {
        queue_depth: depth.unwrap_or(blockdev::DEFAULT_QUEUE_DEPTH),
        sqpoll: false,
    };
    open_engine(path, aio, cache, engine)
}

/// Opens (creating) `path` with `aio`, `cache` and engine tuning.
pub fn open_engine(path: &Path, aio: Aio, cache: CacheMode, engine: EngineOptions) -> FileStorage {
    let opts = FileOptions {
        read_only: false,
        cache,
        aio,
        create: !path.exists(),
        ..Default::default()
    };
    let s = FileStorage::open_with(path, opts, engine).unwrap();
    // Fallback from io_uring to threads is allowed by design, but say so: the run then tests
    // the thread engine twice.
    if s.engine() != aio {
        eprintln!("note: {aio:?} fell back to {:?} on this kernel", s.engine());
    }
    s
}

/// A file path in `dir`.
pub fn file(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

/// splitmix64: a small deterministic generator, so that failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The number of threads of this process.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// The number of open descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}
