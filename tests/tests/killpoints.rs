//! img killed with SIGKILL in the middle of its work: convert, a write benchmark, commit,
//! rebase and snapshot creation and deletion, each killed at many random moments. After every kill
//! `qemu-img check` may find leaks but never corruption, `img check -r leaks` leaves the image
//! clean, and data the image held (flushed) before the command started reads back unchanged.

mod common;

use common::{assert_qemu_compare_identical, img_bin, img_ok, qemu_check, qemu_img, qemu_io};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Starts `img ARGS`, kills it with SIGKILL after `delay` (if still running) and says whether
/// the kill landed before it finished.
fn kill_after(args: &[&str], delay: Duration) -> bool {
    let mut child = Command::new(img_bin())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let landed = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    landed
}

/// Waits until no dead process's lock remains on `image`: a killed process's image lock goes
/// with its last reference to the file, which an io_uring instance torn down after the
/// process may hold a little longer.
fn wait_unlocked(image: &Path) {
    let start = Instant::now();
    loop {
        let out = Command::new("qemu-img")
            .args(["info", &p(image)])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !text.contains("lock") {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} is still locked 30 s after the kill: {text}",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// No corruption by qemu-img check (leaks allowed); after `img check -r leaks`, clean.
fn assert_recoverable(image: &Path, what: &str) {
    wait_unlocked(image);
    let (code, out) = qemu_check(image);
    assert!(
        matches!(code, Some(0) | Some(3)) && !out.contains("ERROR"),
        "{what}: corruption after the kill (exit {code:?}):\n{out}"
    );
    let out = Command::new(img_bin())
        .args(["check", "-r", "leaks", &p(image)])
        .output()
        .unwrap();
    assert!(
        matches!(out.status.code(), Some(0) | Some(3)),
        "{what}: img check -r leaks: {out:?}"
    );
    let (code, text) = qemu_check(image);
    assert_eq!(
        code,
        Some(0),
        "{what}: still not clean after repair:\n{text}"
    );
}

/// How long `img ARGS` takes when left alone.
fn run_time(args: &[&str]) -> Duration {
    let start = Instant::now();
    let out = Command::new(img_bin()).args(args).output().unwrap();
    assert!(out.status.success(), "img {args:?}: {out:?}");
    start.elapsed()
}

/// `n` random moments spread over a run that takes `span`: one drawn uniformly from each
/// of `n` equal slices of it, so that every part of the run is hit and repeated runs hit
/// different points. The seed is `KILL_SEED` or the clock's, and is printed so that a failing
/// run can be repeated.
fn delays(span: Duration, n: u32) -> Vec<Duration> {
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("kill moments: KILL_SEED={seed}, {n} over {span:?}");
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let within = (state % 1000) as u32;
            span * (i * 1000 + within) / (n * 1000)
        })
        .collect()
}

/// A 96 MiB raw source with data and holes.
fn source(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", &p(&src), "96M"]);
    let cmds: Vec<String> = (0..12)
        .map(|i| format!("write -P {} {}M 5M", i + 1, i * 8))
        .collect();
    qemu_io("raw", &src, &cmds);
    src
}

#[test]
fn convert_killed_at_any_moment() {
    let dir = tempfile::tempdir().unwrap();
    let src = p(&source(dir.path()));
    let out = dir.path().join("out.qcow2");
    let target = p(&out);
    let args = ["convert", "-O", "qcow2", src.as_str(), target.as_str()];
    let span = run_time(&args);
    let mut landed = 0;
    for (i, d) in delays(span, 16).into_iter().enumerate() {
        let _ = std::fs::remove_file(&out);
        if kill_after(&args, d) {
            landed += 1;
        }
        // A target killed before its header was written is not an image yet.
        let head = std::fs::read(&out).unwrap_or_default();
        if head.len() >= 4 && head[..4] == *b"QFI\xfb" {
            assert_recoverable(&out, &format!("convert killed at kill {i}"));
        }
    }
    assert!(landed >= 3, "only {landed} kills landed while convert ran");
}

/// A write benchmark (sequential 4 KiB writes from 16 MiB on, a new cluster every 16, a flush
/// every 64) killed at many points: the data written before it started is intact.
#[test]
fn write_bench_killed_at_any_moment() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.qcow2");
    let path = p(&image);
    let keep = dir.path().join("keep.raw");
    let fresh = || {
        qemu_img(&["create", "-q", "-f", "qcow2", &path, "256M"]);
        qemu_io("qcow2", &image, &["write -P 0x5a 0 8M".to_string()]);
    };
    let args = [
        "bench",
        "-w",
        "-c",
        "40000",
        "-s",
        "4k",
        "-o",
        "16M",
        "-d",
        "16",
        "--flush-interval",
        "64",
        "-f",
        "qcow2",
        path.as_str(),
    ];
    fresh();
    qemu_img(&["convert", "-O", "raw", &path, &p(&keep)]);
    let span = run_time(&args);
    let mut landed = 0;
    for (i, d) in delays(span, 12).into_iter().enumerate() {
        fresh();
        if kill_after(&args, d) {
            landed += 1;
        }
        let what = format!("bench -w killed at kill {i}");
        assert_recoverable(&image, &what);
        let head = dir.path().join("head.raw");
        qemu_img(&["convert", "-O", "raw", &path, &p(&head)]);
        let a = std::fs::read(&head).unwrap();
        let b = std::fs::read(&keep).unwrap();
        assert!(
            a[..8 << 20] == b[..8 << 20],
            "{what}: data written before it changed"
        );
    }
    assert!(
        landed >= 3,
        "only {landed} kills landed while the benchmark ran"
    );
}

/// commit and rebase killed at many points: the images they write into stay recoverable, and
/// the overlay still reads as it did (commit writes the same data into the base; a safe rebase
/// copies the base's data into the overlay before dropping it).
#[test]
fn commit_and_rebase_killed_at_any_moment() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let expect = dir.path().join("expect.raw");
    let (b, t) = (p(&base), p(&top));
    let setup = || {
        qemu_img(&["create", "-q", "-f", "qcow2", &b, "128M"]);
        qemu_io("qcow2", &base, &["write -P 0x11 0 64M".to_string()]);
        qemu_img(&["create", "-q", "-f", "qcow2", "-b", &b, "-F", "qcow2", &t]);
        qemu_io("qcow2", &top, &["write -P 0x22 8M 48M".to_string()]);
    };
    let commit = ["commit", "-d", t.as_str()];
    let rebase = ["rebase", "-b", "", t.as_str()];
    setup();
    qemu_img(&["convert", "-O", "raw", &t, &p(&expect)]);
    let commit_span = run_time(&commit);
    setup();
    let rebase_span = run_time(&rebase);
    let mut landed = 0;
    for (cmd, args, span) in [
        ("commit", &commit[..], commit_span),
        ("rebase", &rebase[..], rebase_span),
    ] {
        for (i, d) in delays(span, 6).into_iter().enumerate() {
            setup();
            if kill_after(args, d) {
                landed += 1;
            }
            let what = format!("{cmd} killed at kill {i}");
            assert_recoverable(&base, &what);
            assert_recoverable(&top, &what);
            assert_qemu_compare_identical(&top, "qcow2", &expect, "raw");
        }
    }
    assert!(
        landed >= 3,
        "only {landed} kills landed while commit/rebase ran"
    );
}

/// Snapshot creation and deletion on a fully allocated image, killed at many points.
#[test]
fn snapshots_killed_at_any_moment() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.qcow2");
    let path = p(&image);
    let expect = dir.path().join("expect.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "preallocation=metadata",
        &path,
        "8G",
    ]);
    qemu_io("qcow2", &image, &["write -P 0x33 0 4M".to_string()]);
    qemu_img(&["convert", "-O", "raw", &path, &p(&expect)]);
    let span = run_time(&["snapshot", "-c", "timing", &path]);
    img_ok(&["snapshot", "-d", "timing", &path]);
    let mut landed = 0;
    for (i, d) in delays(span, 12).into_iter().enumerate() {
        let name = format!("s{i}");
        if kill_after(&["snapshot", "-c", &name, &path], d) {
            landed += 1;
        }
        assert_recoverable(&image, &format!("snapshot -c killed at kill {i}"));
        let list = img_ok(&["snapshot", "-l", &path]);
        if list.contains(&name) && i % 2 == 1 {
            if kill_after(&["snapshot", "-d", &name, &path], d) {
                landed += 1;
            }
            assert_recoverable(&image, &format!("snapshot -d killed at kill {i}"));
        }
        assert_qemu_compare_identical(&image, "qcow2", &expect, "raw");
    }
    assert!(
        landed >= 3,
        "only {landed} kills landed while snapshots were made"
    );
}
