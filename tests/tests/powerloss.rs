//! Power loss under a qcow2 image: the engine writes through `blockdev::fault::FaultStorage`,
//! which keeps a durable copy of the file that only flushes reach. At a chosen moment the
//! "power fails": the durable copy keeps what was flushed (and, in the harder mode, any subset
//! of the unflushed writes, in any order). `qemu-img check` must then find no corruption
//! (leaks are allowed), and everything that was flushed must read back.
//!
//! And failing disks: the Nth write or flush fails with EIO or ENOSPC; the error must reach the
//! caller, and the image on disk must still be free of corruption.

mod common;

use blockdev::fault::{Crash, Fault, FaultStorage, Target};
use blockdev::{FileStorage, Storage};
use common::{pattern, qemu_check, qemu_img};
use img_core::open::open_storage;
use img_core::{Image, OpenOptions};
use std::path::Path;
use std::sync::Arc;

const SIZE: u64 = 64 << 20;
const CLUSTER: u64 = 64 << 10;

/// A fresh qcow2 image (made by qemu-img) and a copy of it as the durable disk.
fn fresh(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let live = dir.join("live.qcow2");
    let durable = dir.join("durable.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        live.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    std::fs::copy(&live, &durable).unwrap();
    (live, durable)
}

fn open_faulty(live: &Path, durable: &Path, fault: Option<Fault>) -> (Image, Arc<FaultStorage>) {
    let inner: Arc<dyn Storage> = Arc::new(FileStorage::open_read_write(live).unwrap());
    let disk: Arc<dyn Storage> = Arc::new(FileStorage::open_read_write(durable).unwrap());
    let faulty = Arc::new(FaultStorage::new(inner, disk, fault));
    let image = open_storage(
        faulty.clone(),
        &OpenOptions {
            format: Some("qcow2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    (image, faulty)
}

/// A small deterministic generator, so that a seed names one workload.
fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// One request of the workload.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write { offset: u64, len: u64, seed: u8 },
    Zeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Flush,
}

fn workload(seed: u64, n: usize) -> Vec<Op> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            let r = rng(&mut s);
            // Requests land in a 16 MiB window so that they overwrite each other and share
            // L2 tables; lengths from 512 B to 320 KiB, sector-aligned.
            let offset = (rng(&mut s) % (16 << 20)) / 512 * 512;
            let len = (1 + rng(&mut s) % 640) * 512;
            match r % 10 {
                0 | 1 => Op::Flush,
                2 => Op::Zeroes { offset, len },
                3 => Op::Discard {
                    offset: offset / CLUSTER * CLUSTER,
                    len: len.div_ceil(CLUSTER) * CLUSTER,
                },
                _ => Op::Write {
                    offset,
                    len,
                    seed: (i % 250) as u8 + 1,
                },
            }
        })
        .collect()
}

/// Runs `ops` on the image and on a model of the guest's disk; returns, per byte, whether it
/// was last changed before the last flush (then the durable copy must hold the model's value).
fn run(image: &Image, ops: &[Op], model: &mut [u8], stable: &mut [bool]) {
    for op in ops {
        match *op {
            Op::Write { offset, len, seed } => {
                let data = pattern(seed, offset, len as usize);
                image.write_at(&data, offset).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                stable[offset as usize..(offset + len) as usize].fill(false);
            }
            Op::Zeroes { offset, len } => {
                image.write_zeroes(offset, len, false).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
                stable[offset as usize..(offset + len) as usize].fill(false);
            }
            Op::Discard { offset, len } => {
                // A discard may leave the old data or zeros: the range is stable no more.
                image.discard(offset, len).unwrap();
                stable[offset as usize..(offset + len) as usize].fill(false);
                // What it reads now is what the model keeps.
                let mut now = vec![0u8; len as usize];
                image.read_at(&mut now, offset).unwrap();
                model[offset as usize..(offset + len) as usize].copy_from_slice(&now);
            }
            Op::Flush => {
                image.flush().unwrap();
                stable.fill(true);
            }
        }
    }
}

/// `qemu-img check` of the durable copy: no corruption (leaks allowed).
fn assert_not_corrupt(path: &Path, what: &str) {
    let (code, out) = qemu_check(path);
    assert!(
        matches!(code, Some(0) | Some(3)) && !out.contains("ERROR"),
        "{what}: qemu-img check found corruption (exit {code:?}):\n{out}"
    );
}

/// Opens a qcow2 image read-only through img, or the snapshot named `snapshot` of it.
fn open_qcow2_read_only(path: &Path, snapshot: Option<&str>) -> Image {
    img_core::open_image(
        path,
        &OpenOptions {
            format: Some("qcow2".into()),
            read_only: true,
            snapshot: snapshot.map(|n| img_core::qcow2::SnapshotSelector::IdOrName(n.into())),
            ..Default::default()
        },
    )
    .unwrap()
}

/// The durable copy reads back what was flushed.
fn assert_flushed_data_survived(path: &Path, model: &[u8], stable: &[bool], what: &str) {
    let image = open_qcow2_read_only(path, None);
    let window = 16usize << 20;
    let mut back = vec![0u8; window + (1 << 20)];
    image.read_at(&mut back, 0).unwrap();
    for (i, (&b, &m)) in back.iter().zip(model).enumerate() {
        if stable[i] && b != m {
            panic!("{what}: byte {i:#x} was flushed as {m:#x} but reads {b:#x} after the crash");
        }
    }
}

fn crash_case(seed: u64, crash: Crash) {
    let dir = tempfile::tempdir().unwrap();
    let (live, durable) = fresh(dir.path());
    let (image, faulty) = open_faulty(&live, &durable, None);
    let ops = workload(seed, 60);
    let mut model = vec![0u8; (17 << 20) as usize];
    let mut stable = vec![true; model.len()];
    run(&image, &ops, &mut model, &mut stable);
    faulty.crash(crash).unwrap();
    // The process dies with the power: nothing else reaches the disk.
    drop(image);
    let what = format!("seed {seed}, {crash:?}");
    assert_not_corrupt(&durable, &what);
    assert_flushed_data_survived(&durable, &model, &stable, &what);
}

#[test]
fn power_loss_keeps_only_flushed_writes() {
    for seed in 1..=40 {
        crash_case(seed, Crash::DropUnflushed);
    }
}

#[test]
fn power_loss_keeps_any_subset_of_unflushed_writes() {
    for seed in 1..=40 {
        crash_case(seed, Crash::Subset(seed * 7919));
    }
}

/// A write or a flush fails with EIO or ENOSPC at request N: the caller gets the error, and
/// after it the file on disk (what was written up to then) has no corruption.
#[test]
fn failed_requests_reach_the_caller_and_leave_no_corruption() {
    let mut failures = 0;
    for (nth, target, errno) in [
        (1, Target::Write, libc::EIO),
        (3, Target::Write, libc::ENOSPC),
        (7, Target::Write, libc::EIO),
        (15, Target::Write, libc::ENOSPC),
        (40, Target::Write, libc::EIO),
        (1, Target::Flush, libc::EIO),
        (2, Target::Flush, libc::ENOSPC),
        (4, Target::Flush, libc::EIO),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (live, durable) = fresh(dir.path());
        let fault = Fault {
            target,
            nth,
            errno,
            sticky: true,
        };
        let (image, _faulty) = open_faulty(&live, &durable, Some(fault));
        let mut failed = None;
        for op in workload(nth * 31 + errno as u64, 80) {
            let r = match op {
                Op::Write { offset, len, seed } => {
                    image.write_at(&pattern(seed, offset, len as usize), offset)
                }
                Op::Zeroes { offset, len } => image.write_zeroes(offset, len, false),
                Op::Discard { offset, len } => image.discard(offset, len),
                Op::Flush => image.flush(),
            };
            if let Err(e) = r {
                failed = Some(e.to_string());
                break;
            }
        }
        let what = format!("{target:?} #{nth} failing with errno {errno}");
        let msg = failed.unwrap_or_else(|| panic!("{what}: no request reported the error"));
        let expect = std::io::Error::from_raw_os_error(errno).to_string();
        let expect = expect.split(" (os error").next().unwrap();
        assert!(msg.contains(expect), "{what}: the error was {msg}");
        failures += 1;
        drop(image);
        // The live file is what the disk holds after the failure (every write that succeeded).
        assert_not_corrupt(&live, &what);
    }
    assert_eq!(failures, 8);
}

/// The guest data and snapshots an image holds, read through img.
fn contents(path: &Path) -> (Vec<u8>, Vec<String>) {
    let mut image = open_qcow2_read_only(path, None);
    let mut data = vec![0u8; 17 << 20];
    image.read_at(&mut data, 0).unwrap();
    let names = img_core::qcow2::driver_of(&mut image)
        .unwrap()
        .snapshots()
        .unwrap()
        .iter()
        .map(|s| String::from_utf8_lossy(&s.name).into_owned())
        .collect();
    (data, names)
}

/// Power fails before each write or flush of `img snapshot -c`, `-d` and `-a` in turn (every
/// one when there are few, else moments spread over all of them), keeping nothing unflushed
/// or a random subset of it. Each time the durable copy has no corruption, its disk reads
/// either as before or (for `-a`) as the snapshot, and a snapshot is either whole (its data
/// reads back) or not there at all.
#[test]
fn power_loss_at_every_request_of_snapshot_create_delete_and_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (live, durable) = fresh(dir.path());
    // A disk with data, zeroes and discards, and one snapshot already (so that creation
    // shares clusters that are already shared, and deletion has one to delete).
    {
        let (image, _) = open_faulty(&live, &durable, None);
        let mut model = vec![0u8; 17 << 20];
        let mut stable = vec![true; model.len()];
        run(&image, &workload(5, 80), &mut model, &mut stable);
        image.flush().unwrap();
    }
    img_core::qcow2::driver_of(&mut open_faulty(&live, &durable, None).0)
        .unwrap()
        .create_snapshot("old", (1, 0))
        .unwrap();
    let (before, names) = contents(&live);
    assert_eq!(names, ["old"]);
    // The disk then moves on from the snapshot, so that applying it changes the disk.
    {
        let (image, _) = open_faulty(&live, &durable, None);
        let mut model = before.clone();
        let mut stable = vec![true; model.len()];
        run(&image, &workload(6, 40), &mut model, &mut stable);
        image.flush().unwrap();
    }
    let (moved, _) = contents(&live);
    assert!(moved != before, "the second workload changed nothing");
    let base = dir.path().join("base.qcow2");
    std::fs::copy(&live, &base).unwrap();

    let mut cases = 0;
    for op in ["create", "delete", "apply"] {
        let act = |image: &mut Image| {
            let q = img_core::qcow2::driver_of(image).unwrap();
            match op {
                "create" => q.create_snapshot("new", (2, 0)),
                "delete" => q.delete_snapshot("old"),
                _ => q.apply_snapshot("old"),
            }
            .unwrap()
        };
        // How many writes and flushes the operation makes.
        std::fs::copy(&base, &live).unwrap();
        std::fs::copy(&base, &durable).unwrap();
        let (mut image, faulty) = open_faulty(&live, &durable, None);
        let start = faulty.changes();
        act(&mut image);
        let total = faulty.changes() - start;
        drop(image);
        assert!(total >= 4, "{op}: only {total} requests");
        let moments: Vec<u64> = if total <= 40 {
            (1..=total + 1).collect()
        } else {
            (0..=40).map(|i| 1 + i * total / 40).collect()
        };
        for &n in &moments {
            for crash in [Crash::DropUnflushed, Crash::Subset(n * 31 + 7)] {
                std::fs::copy(&base, &live).unwrap();
                std::fs::copy(&base, &durable).unwrap();
                let (mut image, faulty) = open_faulty(&live, &durable, None);
                faulty.crash_before(n, crash);
                act(&mut image);
                drop(image);
                let what =
                    format!("snapshot {op}, power lost before request {n}/{total}, {crash:?}");
                assert_not_corrupt(&durable, &what);
                let (data, names) = contents(&durable);
                assert!(
                    data == moved || (op == "apply" && data == before),
                    "{what}: the disk reads neither as before nor as the snapshot"
                );
                let expect_new = if op == "create" { "new" } else { "old" };
                for name in &names {
                    assert!(
                        name == "old" || name == expect_new,
                        "{what}: unexpected snapshot {name}"
                    );
                }
                // A snapshot that survived is whole: it reads the disk as it was when taken.
                for name in names {
                    let taken = if name == "old" { &before } else { &moved };
                    let sn = open_qcow2_read_only(&durable, Some(&name));
                    let mut back = vec![0u8; before.len()];
                    sn.read_at(&mut back, 0).unwrap();
                    assert!(back == *taken, "{what}: snapshot {name} lost data");
                }
                cases += 1;
            }
        }
    }
    eprintln!("{cases} power-loss moments in snapshot create, delete and apply");
}

/// A filesystem that is really full (an 8 MiB tmpfs): `img convert` and `img bench -w` onto
/// it exit 1 with the system's words ("No space left on device"), as qemu-img does, and the
/// image left behind is clean, as qemu-img leaves it: no corruption and no leak (the request
/// that met the full disk gave its clusters back; metadata space is reserved when allocated,
/// so the metadata of what was written still fits). Data the image held before the disk
/// filled up reads back.
#[test]
fn a_full_filesystem_fails_the_command_and_corrupts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("full");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(&mnt);
    let src = dir.path().join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", src.to_str().unwrap(), "32M"]);
    common::qemu_io("raw", &src, &["write -P 7 0 32M".to_string()]);

    let out_path = mnt.join("c.qcow2");
    let out = common::img(&[
        "convert",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        out_path.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "convert onto a full disk: {err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    common::assert_qemu_check_clean(&out_path);
    std::fs::remove_file(&out_path).unwrap();

    // An image with 1 MiB of data, then a write benchmark that fills the disk.
    let bench = mnt.join("b.qcow2");
    let b = bench.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", b, "64M"]);
    common::qemu_io("qcow2", &bench, &["write -P 0x5a 0 1M".to_string()]);
    let out = common::img(&["bench", "-w", "-c", "4000", "-s", "64k", "-o", "1M", b]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "bench onto a full disk: {err}");
    assert!(err.contains("No space left on device"), "{err}");
    common::assert_qemu_check_clean(&bench);
    // qemu-io fails the test on a pattern mismatch.
    common::qemu_io("qcow2", &bench, &["read -P 0x5a 0 1M".to_string()]);
}

/// Power lost before every write or flush of creating a qcow2 image (every cluster size
/// class and refcount width): what the disk keeps is either not a qcow2 image yet (no magic)
/// or one `qemu-img check` finds no corruption in.
#[test]
fn power_loss_at_every_request_of_create() {
    let mut moments = 0;
    for (cluster_size, refcount_bits) in [(65536, 16), (512, 1), (2 << 20, 64)] {
        let opts = img_core::qcow2::Qcow2CreateOptions {
            size: 1 << 30,
            cluster_size,
            refcount_bits,
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.qcow2");
        let durable = dir.path().join("durable.qcow2");
        let fresh = || {
            std::fs::write(&live, b"").unwrap();
            std::fs::write(&durable, b"").unwrap();
            let inner: Arc<dyn Storage> = Arc::new(FileStorage::open_read_write(&live).unwrap());
            let disk: Arc<dyn Storage> = Arc::new(FileStorage::open_read_write(&durable).unwrap());
            Arc::new(FaultStorage::new(inner, disk, None))
        };
        let faulty = fresh();
        img_core::qcow2::create::create_on(faulty.clone(), &opts).unwrap();
        let total = faulty.changes();
        for n in 1..=total + 1 {
            let subsets = (0..6).map(|k| Crash::Subset(n * 131 + k * 7919 + 5));
            for crash in std::iter::once(Crash::DropUnflushed).chain(subsets) {
                let faulty = fresh();
                faulty.crash_before(n, crash);
                img_core::qcow2::create::create_on(faulty.clone(), &opts).unwrap();
                drop(faulty);
                let head = std::fs::read(&durable).unwrap();
                if head.len() >= 4 && head[..4] == *b"QFI\xfb" {
                    let what = format!(
                        "create ({cluster_size} B clusters, {refcount_bits}-bit refcounts), \
                         power lost before request {n}/{total}, {crash:?}"
                    );
                    assert_not_corrupt(&durable, &what);
                }
                moments += 1;
            }
        }
    }
    eprintln!("{moments} power-loss moments in create");
}
