//! qcow2 metadata cache benchmarks: random 4 KiB reads and writes with L2 caches that map
//! all, half or an eighth of the disk, whole-table against 4 KiB cache entries at the same
//! budget, and cluster allocation (sequential first writes).
//!
//! Images live in a temporary directory in /dev/shm when there is one (else the system's
//! temporary directory) and are written with cache=unsafe, so the numbers measure the driver
//! rather than the disk: on a disk file system a random 4 KiB write to a clean page costs
//! tens of microseconds in the kernel whatever the driver does.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use img_core::qcow2::{self, CacheOptions, Qcow2CreateOptions};
use img_core::{open_image, Image, OpenOptions};
use std::path::Path;
use std::time::Duration;

const K: u64 = 1024;
const M: u64 = 1024 * K;
const G: u64 = 1024 * M;

fn opts(l2: Option<u64>, entry: Option<u64>, read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        cache: blockdev::CacheMode::Unsafe,
        qcow2_cache: CacheOptions {
            l2_cache_size: l2,
            l2_cache_entry_size: entry,
            // No cleaning during a run.
            cache_clean_interval: Some(0),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn create(path: &Path, size: u64, cluster_size: u64) {
    qcow2::create(
        path,
        &Qcow2CreateOptions {
            size,
            cluster_size,
            ..Default::default()
        },
    )
    .unwrap();
}

/// A 1 GiB image with 64 KiB clusters, every cluster written.
fn full_image(path: &Path) {
    create(path, G, 64 * K);
    let img = open_image(path, &opts(None, None, false)).unwrap();
    let data: Vec<u8> = (0..4 * M).map(|i| (i % 251) as u8).collect();
    for off in (0..G).step_by(data.len()) {
        img.write_at(&data, off).unwrap();
    }
    img.close().unwrap();
}

/// An image of `size` with 64 KiB clusters, every cluster mapped but none written: the file
/// is sparse, so reads cost a lookup and a read of a hole.
fn mapped_sparse_image(path: &Path, size: u64) {
    create(path, size, 64 * K);
    let img = open_image(path, &opts(None, None, false)).unwrap();
    let f = img.format();
    let mut off = 0;
    while off < size {
        let a = f.allocate(off, size - off).unwrap();
        off = a.guest_offset + a.len;
        f.commit(a).unwrap();
    }
    img.flush().unwrap();
    // Host offsets stay below the virtual size plus the metadata.
    let file = f.file().clone();
    file.truncate(size + 64 * M).unwrap();
    img.close().unwrap();
}

/// A temporary directory, in memory where possible.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::tempdir_in(shm) {
            return d;
        }
    }
    tempfile::tempdir().unwrap()
}

/// Pseudo-random 4 KiB aligned offsets inside `size` (xorshift, fixed seed).
fn offsets(size: u64, n: usize) -> Vec<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (size / 4096)) * 4096
        })
        .collect()
}

fn random_io(
    c: &mut Criterion,
    group: &str,
    path: &Path,
    size: u64,
    configs: &[(&str, Option<u64>, Option<u64>)],
    write: bool,
) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(4096));
    g.sample_size(20);
    g.warm_up_time(Duration::from_millis(500));
    g.measurement_time(Duration::from_secs(2));
    let offs = offsets(size, 1 << 16);
    for &(name, l2, entry) in configs {
        let img: Image = open_image(path, &opts(l2, entry, !write)).unwrap();
        let mut buf = vec![0x5au8; 4096];
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter(|| {
                let off = offs[i % offs.len()];
                i += 1;
                if write {
                    img.write_at(&buf, off).unwrap();
                } else {
                    img.read_at(&mut buf, off).unwrap();
                }
            })
        });
        img.close().unwrap();
    }
    g.finish();
}

fn random_4k(c: &mut Criterion) {
    let dir = scratch();
    let full = dir.path().join("full.qcow2");
    full_image(&full);
    // 1 GiB at 64 KiB clusters needs 128 KiB of L2 tables (two tables). Caches smaller than
    // that use 4 KiB entries unless told otherwise, as in qemu.
    let configs = [
        ("l2_all_default", None, None),
        ("l2_half_64k_budget", Some(64 * K), None),
        ("l2_eighth_16k_budget", Some(16 * K), None),
        ("l2_eighth_16k_budget_512b_entries", Some(16 * K), Some(512)),
    ];
    random_io(c, "qcow2_1GiB_random_4k_read", &full, G, &configs, false);
    random_io(c, "qcow2_1GiB_random_4k_write", &full, G, &configs, true);

    // Whole-table entries need a disk of more than two tables: 8 GiB, mapped and sparse.
    // At an eighth (two tables' worth), 64 KiB entries against 4 KiB slices.
    let sparse = dir.path().join("sparse.qcow2");
    mapped_sparse_image(&sparse, 8 * G);
    let configs = [
        ("l2_all_default", None, None),
        ("l2_eighth_64k_entries", Some(128 * K), Some(64 * K)),
        ("l2_eighth_4k_entries", Some(128 * K), Some(4 * K)),
    ];
    random_io(
        c,
        "qcow2_8GiB_mapped_random_4k_read",
        &sparse,
        8 * G,
        &configs,
        false,
    );
}

fn allocation(c: &mut Criterion) {
    let mut g = c.benchmark_group("qcow2_allocating_sequential_writes_64MiB");
    let size = 64 * M;
    g.throughput(Throughput::Bytes(size));
    g.sample_size(10);
    let dir = scratch();
    let path = dir.path().join("a.qcow2");
    for (cs, chunk) in [(64 * K, 64 * K), (4 * K, 4 * K), (64 * K, M)] {
        let data = vec![0xa5u8; chunk as usize];
        g.bench_function(format!("cluster_{cs}_write_{chunk}"), |b| {
            b.iter_batched(
                || create(&path, size, cs),
                |_| {
                    let img = open_image(&path, &opts(None, None, false)).unwrap();
                    for off in (0..size).step_by(chunk as usize) {
                        img.write_at(&data, off).unwrap();
                    }
                    img.close().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, random_4k, allocation);
criterion_main!(benches);
