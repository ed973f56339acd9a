//! Crash consistency: every state a crash can leave behind is at worst leaky, never corrupt.
//!
//! The image is written through a storage that records every write and flush. A crash image
//! is built from the log: everything before some flush is durable, and of the writes after it
//! (until the next flush) an arbitrary subset of 512-byte sectors made it to the disk. Each
//! such image must pass `qemu-img check` with no corruptions (leaks are allowed), and open in
//! img; data that was flushed before the crash must read back.

use blockdev::{Allocation, Storage};
use img_core::open::open_storage;
use img_core::qcow2::{create::create_on, Qcow2CreateOptions};
use img_core::OpenOptions;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Truncate(u64),
    Flush,
}

/// An in-memory disk that logs what reaches it.
#[derive(Debug, Default)]
struct RecordingStorage {
    state: Mutex<(Vec<u8>, Vec<Op>)>,
}

impl Storage for RecordingStorage {
    fn name(&self) -> &str {
        "recorded.qcow2"
    }
    fn size(&self) -> blockdev::Result<u64> {
        Ok(self.state.lock().unwrap().0.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockdev::Result<()> {
        let s = self.state.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > s.0.len() {
            return Err(blockdev::Error::PastEnd {
                name: self.name().into(),
                offset,
                len: buf.len() as u64,
                size: s.0.len() as u64,
            });
        }
        buf.copy_from_slice(&s.0[offset as usize..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockdev::Result<()> {
        let mut s = self.state.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > s.0.len() {
            s.0.resize(end, 0);
        }
        s.0[offset as usize..end].copy_from_slice(buf);
        s.1.push(Op::Write(offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> blockdev::Result<()> {
        self.state.lock().unwrap().1.push(Op::Flush);
        Ok(())
    }
    fn truncate(&self, size: u64) -> blockdev::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.0.resize(size as usize, 0);
        s.1.push(Op::Truncate(size));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> blockdev::Result<()> {
        self.write_at(&vec![0u8; len as usize], offset)
    }
    fn discard(&self, offset: u64, len: u64) -> blockdev::Result<()> {
        let size = self.size()?;
        if offset < size {
            self.write_zeroes(offset, len.min(size - offset), true)?;
        }
        Ok(())
    }
    fn allocation(&self, _offset: u64, len: u64) -> blockdev::Result<(Allocation, u64)> {
        Ok((Allocation::Data, len))
    }
    fn is_read_only(&self) -> bool {
        false
    }
}

/// The disk content after a crash: all ops of the first `epochs` flush epochs, then the
/// sectors of the next epoch's writes that `keep` selects.
fn crash_image(log: &[Op], epochs: usize, keep: &mut dyn FnMut() -> bool) -> Vec<u8> {
    let mut disk = Vec::new();
    let mut epoch = 0;
    for op in log {
        match op {
            Op::Flush => {
                epoch += 1;
                if epoch > epochs {
                    break;
                }
            }
            Op::Truncate(size) => {
                if epoch < epochs || keep() {
                    disk.resize(*size as usize, 0);
                }
            }
            Op::Write(off, data) => {
                let end = *off as usize + data.len();
                if epoch < epochs {
                    if end > disk.len() {
                        disk.resize(end, 0);
                    }
                    disk[*off as usize..end].copy_from_slice(data);
                    continue;
                }
                // Sector by sector: a disk may persist any of them.
                let mut pos = *off as usize;
                while pos < end {
                    let next = ((pos / 512) + 1) * 512;
                    let next = next.min(end);
                    if keep() {
                        if next > disk.len() {
                            disk.resize(next, 0);
                        }
                        disk[pos..next]
                            .copy_from_slice(&data[pos - *off as usize..next - *off as usize]);
                    }
                    pos = next;
                }
            }
        }
    }
    disk
}

/// Checks a crash image; returns a hash of the guest content as img reads it.
fn check_crash_image(bytes: &[u8], what: &str) -> u64 {
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
    let corruptions = v["corruptions"].as_u64().unwrap_or(0);
    let errors = v["check-errors"].as_u64().unwrap_or(0);
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
    log: Vec<Op>,
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
        s.1.iter().filter(|o| matches!(o, Op::Flush)).count()
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
    let epochs = log.iter().filter(|o| matches!(o, Op::Flush)).count();
    let mut rng = StdRng::seed_from_u64(7);
    // Every epoch boundary with nothing of the next epoch, all of it, and random halves.
    // The first epochs belong to create, which is not crash-safe (nor is qemu's).
    let first = log
        .iter()
        .position(|o| matches!(o, Op::Write(off, _) if *off >= 3 * cluster_size))
        .map(|p| log[..p].iter().filter(|o| matches!(o, Op::Flush)).count() + 2)
        .unwrap_or(0);
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
