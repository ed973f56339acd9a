//! Crash consistency: every state a crash can leave behind is at worst leaky, never corrupt.
//!
//! The image is written through a storage that records every write and flush. A crash image
//! is built from the log: everything before some flush is durable, and of the writes after it
//! (until the next flush) an arbitrary subset of 512-byte sectors made it to the disk. Each
//! such image must pass `qemu-img check` with no corruptions (leaks are allowed), and open in
//! img; data that was flushed before the crash must read back.

mod common;

use blockdev::Storage;
use common::recording::{crash_image, epochs, first_epoch_after_create, LogOp, RecordingStorage};
use img_core::open::open_storage;
use img_core::qcow2::{create::create_on, Qcow2CreateOptions};
use img_core::OpenOptions;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Checks a crash image; returns a hash of the guest content as img reads it.
fn check_crash_image(bytes: &[u8], what: &str) -> u64 {
    check_crash_image_with(bytes, what, false)
}

/// `qemu-img check` counts a copy flag missing on a cluster with one reference as a
/// corruption, though it is harmless (a write copies the cluster instead of writing in
/// place) and `check -r all` restores it. No order of writes can take an image with data
/// to one with a snapshot without passing through it (the flags and the refcounts are in
/// different clusters), and qemu passes through it too. With `missing_copy_flags_allowed`,
/// those errors are accepted and only they; a flag present on a shared cluster, which would
/// let a write land in a snapshot's data, never is.
fn check_crash_image_with(bytes: &[u8], what: &str, missing_copy_flags_allowed: bool) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("crash.qcow2");
    std::fs::write(&p, bytes).unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2", p.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!(
            "{what}: qemu-img check failed to run: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let mut corruptions = v["corruptions"].as_u64().unwrap_or(0);
    let errors = v["check-errors"].as_u64().unwrap_or(0);
    if missing_copy_flags_allowed {
        let human = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2", p.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&human.stderr);
        let harmless = text
            .lines()
            .filter(|l| l.starts_with("ERROR OFLAG_COPIED") && l.ends_with("refcount=1"))
            // The entry as printed has the flag (bit 63) clear.
            .filter(|l| {
                l.split("_entry=")
                    .nth(1)
                    .and_then(|v| v.split(' ').next())
                    .and_then(|v| u64::from_str_radix(v, 16).ok())
                    .is_some_and(|entry| entry >> 63 == 0)
            })
            .count() as u64;
        corruptions = corruptions.saturating_sub(harmless);
    }
    assert!(
        corruptions == 0 && errors == 0,
        "{what}: crash image is corrupt: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // img opens it too (read-only) and reads the whole disk without an error.
    let storage: Arc<dyn Storage> = Arc::new(blockdev::FileStorage::open_read_only(&p).unwrap());
    let img = open_storage(
        storage,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: img cannot open the crash image: {e}"));
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    while off < img.size() {
        let n = (buf.len() as u64).min(img.size() - off) as usize;
        img.read_at(&mut buf[..n], off)
            .unwrap_or_else(|e| panic!("{what}: read at {off} failed: {e}"));
        buf[..n].hash(&mut hasher);
        off += n as u64;
    }
    hasher.finish()
}

fn content_hash(disk: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for chunk in disk.chunks(1 << 20) {
        chunk.hash(&mut hasher);
    }
    hasher.finish()
}

/// What a workload left: the storage log, and for each completed `flush` of the image the
/// number of storage flushes by then and the hash of the guest content at that moment.
struct Recorded {
    log: Vec<LogOp>,
    durable: Vec<(usize, u64)>,
}

/// A workload that allocates data and L2 tables, overwrites compressed clusters, zeroes and
/// discards (so clusters are freed and reused), and grows the refcount structure.
fn workload(cluster_size: u64, refcount_bits: u32, seed: u64) -> Recorded {
    let storage = Arc::new(RecordingStorage::default());
    let size = 8u64 << 20;
    create_on(
        storage.clone(),
        &Qcow2CreateOptions {
            size,
            cluster_size,
            refcount_bits,
            ..Default::default()
        },
    )
    .unwrap();
    let img = open_storage(storage.clone(), &OpenOptions::default()).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; size as usize];
    let mut durable = Vec::new();
    let flushes = |storage: &RecordingStorage| {
        let s = storage.state.lock().unwrap();
        s.1.iter().filter(|o| matches!(o, LogOp::Flush)).count()
    };
    for i in 0..120 {
        let off = rng.random_range(0..size - 1);
        let len = rng.random_range(1..(size - off).min(3 * cluster_size + 1000));
        match rng.random_range(0..10) {
            0..=4 => {
                let mut data = vec![0u8; len as usize];
                rng.fill_bytes(&mut data);
                img.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            5 => {
                img.write_zeroes(off, len, rng.random_bool(0.5)).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            6 => {
                img.discard(off, len).unwrap();
                // Whole clusters read as zeros afterwards; partial ones are untouched.
                let start = off.div_ceil(cluster_size) * cluster_size;
                let end = if off + len == size {
                    size
                } else {
                    (off + len) / cluster_size * cluster_size
                };
                if start < end {
                    model[start as usize..end as usize].fill(0);
                }
            }
            7 => {
                let c = off / cluster_size * cluster_size;
                let n = cluster_size.min(size - c) as usize;
                let data = vec![(i % 250) as u8 + 1; n];
                img.write_compressed(c, &data).unwrap();
                model[c as usize..c as usize + n].copy_from_slice(&data);
            }
            _ => {
                img.flush().unwrap();
                durable.push((flushes(&storage), content_hash(&model)));
            }
        }
    }
    img.close().unwrap();
    durable.push((flushes(&storage), content_hash(&model)));
    let log = storage.state.lock().unwrap().1.clone();
    Recorded { log, durable }
}

fn crash_everywhere(cluster_size: u64, refcount_bits: u32, seed: u64) {
    let Recorded { log, durable } = workload(cluster_size, refcount_bits, seed);
    let epochs = epochs(&log);
    let mut rng = StdRng::seed_from_u64(7);
    // Every epoch boundary with nothing of the next epoch, all of it, and random halves.
    let first = first_epoch_after_create(&log, cluster_size);
    let step = ((epochs - first) / 40).max(1);
    for e in (first..=epochs).step_by(step) {
        for mode in 0..3 {
            let what = format!("cluster {cluster_size}, refcount_bits {refcount_bits}, seed {seed}, epoch {e}/{epochs}, mode {mode}");
            let img = crash_image(&log, e, &mut || match mode {
                0 => false,
                1 => true,
                _ => rng.random_bool(0.5),
            });
            if img.len() < 512 {
                continue;
            }
            check_crash_image(&img, &what);
        }
    }
    // A crash right after a completed flush loses nothing.
    for (e, hash) in durable {
        let img = crash_image(&log, e, &mut || false);
        let what =
            format!("cluster {cluster_size}, seed {seed}, crash right after flush (epoch {e})");
        assert_eq!(
            check_crash_image(&img, &what),
            hash,
            "{what}: flushed data was lost"
        );
    }
}

#[test]
fn crashes_leave_no_corruption_64k() {
    crash_everywhere(65536, 16, 1);
    crash_everywhere(65536, 16, 4);
}

#[test]
fn crashes_leave_no_corruption_small_clusters_growing_refcounts() {
    crash_everywhere(512, 64, 2);
    crash_everywhere(4096, 1, 3);
}

/// Emptying an image (what `commit` does to the image it committed) frees every data cluster
/// and L2 table: a crash at any point of it leaves a consistent image (leaks allowed), and a
/// crash right after it reads as empty.
#[test]
fn emptying_an_image_crashes_safely() {
    for cluster_size in [4096u64, 65536] {
        let storage = Arc::new(RecordingStorage::default());
        let size = 16u64 << 20;
        create_on(
            storage.clone(),
            &Qcow2CreateOptions {
                size,
                cluster_size,
                ..Default::default()
            },
        )
        .unwrap();
        let img = open_storage(storage.clone(), &OpenOptions::default()).unwrap();
        let mut rng = StdRng::seed_from_u64(cluster_size);
        for i in 0..60u64 {
            let off = rng.random_range(0..size - 70000);
            let mut data = vec![0u8; rng.random_range(1..70000)];
            rng.fill_bytes(&mut data);
            if i % 7 == 0 {
                let c = off / cluster_size * cluster_size;
                img.write_compressed(c, &vec![i as u8 + 1; cluster_size as usize])
                    .unwrap();
            } else {
                img.write_at(&data, off).unwrap();
            }
        }
        img.flush().unwrap();
        let before_empty = storage.flushes();
        img.make_empty().unwrap();
        img.close().unwrap();
        let log = storage.log();
        let epochs = epochs(&log);
        let mut rng = StdRng::seed_from_u64(9);
        for e in before_empty..=epochs {
            for mode in 0..3 {
                let what =
                    format!("cluster {cluster_size}, emptying, epoch {e}/{epochs}, mode {mode}");
                let image = crash_image(&log, e, &mut || match mode {
                    0 => false,
                    1 => true,
                    _ => rng.random_bool(0.5),
                });
                check_crash_image(&image, &what);
            }
        }
        let done = crash_image(&log, epochs, &mut || false);
        assert_eq!(
            check_crash_image(&done, "emptied"),
            content_hash(&vec![0u8; size as usize]),
            "an emptied image reads as zeros without a backing file"
        );
    }
}

fn qcow2(img: &mut img_core::Image) -> &mut img_core::qcow2::Qcow2 {
    img_core::qcow2::driver_of(img).expect("a qcow2 image")
}

/// Snapshot create, apply and delete: a crash at any point leaves an image without
/// corruption (leaks allowed).
#[test]
fn snapshot_operations_crash_safely() {
    let storage = Arc::new(RecordingStorage::default());
    let size = 4u64 << 20;
    let cluster_size = 4096;
    create_on(
        storage.clone(),
        &Qcow2CreateOptions {
            size,
            cluster_size,
            ..Default::default()
        },
    )
    .unwrap();
    let mut img = open_storage(storage.clone(), &OpenOptions::default()).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let scribble = |img: &img_core::Image, rng: &mut StdRng| {
        for _ in 0..12 {
            let off = rng.random_range(0..size - 20000);
            let mut data = vec![0u8; rng.random_range(1..20000)];
            rng.fill_bytes(&mut data);
            img.write_at(&data, off).unwrap();
        }
        img.flush().unwrap();
    };
    scribble(&img, &mut rng);
    let start = storage.flushes();
    qcow2(&mut img).create_snapshot("a", (1, 0)).unwrap();
    scribble(&img, &mut rng);
    qcow2(&mut img).create_snapshot("b", (2, 0)).unwrap();
    scribble(&img, &mut rng);
    qcow2(&mut img).apply_snapshot("a").unwrap();
    scribble(&img, &mut rng);
    qcow2(&mut img).delete_snapshot("b").unwrap();
    img.close().unwrap();
    let log = storage.log();
    let epochs = epochs(&log);
    let mut rng = StdRng::seed_from_u64(12);
    for e in start..=epochs {
        for mode in 0..3 {
            let what = format!("snapshots, epoch {e}/{epochs}, mode {mode}");
            let image = crash_image(&log, e, &mut || match mode {
                0 => false,
                1 => true,
                _ => rng.random_bool(0.5),
            });
            check_crash_image_with(&image, &what, true);
        }
    }
}
