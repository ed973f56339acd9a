//! Backing chains and the commands around them, side by side with qemu-img.
//!
//! Each case builds the same chain twice (with qemu-img and qemu-io), runs qemu-img on one
//! copy and img on the other with the same arguments in the same kind of directory (names are
//! relative, so outputs can be compared as text), and compares exit codes, output, and the
//! resulting images (content by `qemu-img compare`, allocation by `qemu-img map` without host
//! offsets, backing file by `qemu-img info`, and `qemu-img check`).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `prog` with `args` in `dir`.
fn run_in(dir: &Path, prog: &Path, args: &[&str]) -> Output {
    Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", prog.display()))
}

fn qemu_in(dir: &Path, prog: &str, args: &[&str]) -> String {
    let out = run_in(dir, Path::new(prog), args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn io(dir: &Path, image: &str, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    let out = qemu_in(dir, "qemu-io", &args);
    assert!(!out.contains("error") && !out.contains("failed"), "{out}");
}

/// Exit code, stdout and stderr, with the program name made neutral.
fn outcome(out: &Output) -> (Option<i32>, String, String) {
    let clean = |b: &[u8]| String::from_utf8_lossy(b).replace("qemu-img", "img");
    (out.status.code(), clean(&out.stdout), clean(&out.stderr))
}

/// A chain of three images: a raw base, a qcow2 middle image over it (relative name, in a
/// sub-directory) and a qcow2 top image, with data, zeros and compressed clusters at every
/// level, written in pieces smaller than a cluster.
fn three_level_chain(dir: &Path) {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    qemu_in(
        dir,
        "qemu-img",
        &["create", "-q", "-f", "raw", "sub/base.raw", "4M"],
    );
    let out = qemu_in(
        dir,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 3M",
            "-c",
            "write -P 9 3500k 12k",
            "sub/base.raw",
        ],
    );
    assert!(!out.contains("error"));
    qemu_in(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "sub/mid.qcow2",
            "6M",
        ],
    );
    io(
        dir,
        "sub/mid.qcow2",
        &[
            "write -P 2 60k 8k",
            "write -z 256k 128k",
            "write -c -P 3 1M 64k",
            "write -P 4 4M 100k",
        ],
    );
    qemu_in(
        dir,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    io(
        dir,
        "top.qcow2",
        &[
            "write -P 5 1000 3000",
            "write -z 1050k 8k",
            "write -P 6 5M 5000",
            "discard 0 4k",
        ],
    );
}

/// Two copies of a scene: one for qemu-img, one for img.
struct Scene {
    _tmp: tempfile::TempDir,
    q: PathBuf,
    i: PathBuf,
}

impl Scene {
    fn new(build: fn(&Path)) -> Scene {
        let tmp = tempfile::tempdir().unwrap();
        let (q, i) = (tmp.path().join("q"), tmp.path().join("i"));
        for d in [&q, &i] {
            std::fs::create_dir_all(d).unwrap();
            build(d);
        }
        // Disk sizes (allocated blocks) are stable only once written back.
        // SAFETY: sync has no preconditions.
        unsafe { libc::sync() };
        Scene { _tmp: tmp, q, i }
    }

    /// Runs the command with qemu-img in one copy and img in the other; asserts the same exit
    /// code and output, and returns them.
    fn both(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let q = outcome(&run_in(&self.q, Path::new("qemu-img"), args));
        let i = outcome(&run_in(&self.i, &img_bin(), args));
        assert_eq!(q, i, "qemu-img vs img for {args:?}");
        q
    }

    /// Runs a read-only command with both tools on the same files (qemu-img's copy), so that
    /// facts of the files themselves (allocated blocks) are the same for both.
    fn both_on_same_files(&self, args: &[&str]) {
        let q = outcome(&run_in(&self.q, Path::new("qemu-img"), args));
        let i = outcome(&run_in(&self.q, &img_bin(), args));
        assert_eq!(q, i, "qemu-img vs img for {args:?}");
    }

    /// Asserts that `name` has the same content, allocation, backing file and clean check in
    /// both copies.
    fn same_image(&self, name: &str) {
        let (q, i) = (self.q.join(name), self.i.join(name));
        assert_qemu_check_clean(&i);
        let cmp = run(
            "qemu-img",
            &[
                "compare",
                &q.display().to_string(),
                &i.display().to_string(),
            ],
        );
        assert!(
            cmp.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&cmp.stdout)
        );
        let map = |d: &Path| {
            // Which image holds each byte (`depth`, `present`): host offsets and whether a
            // range is stored as zeros or as zeroed data may differ (content is compared above).
            let out = qemu_in(d, "qemu-img", &["map", "--output=json", name]);
            let entries: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
            let mut runs: Vec<(u64, u64, u64, bool)> = Vec::new();
            for e in entries {
                let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
                let (depth, present) = (
                    e["depth"].as_u64().unwrap(),
                    e["present"].as_bool().unwrap(),
                );
                match runs.last_mut() {
                    Some(r) if r.2 == depth && r.3 == present && r.0 + r.1 == start => r.1 += len,
                    _ => runs.push((start, len, depth, present)),
                }
            }
            runs
        };
        assert_eq!(map(&self.q), map(&self.i), "allocation of {name}");
        let backing = |d: &Path| {
            qemu_in(d, "qemu-img", &["info", name])
                .lines()
                .filter(|l| l.starts_with("backing file"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        assert_eq!(backing(&self.q), backing(&self.i), "backing file of {name}");
    }
}

#[test]
fn chains_made_by_qemu_read_the_same_through_img() {
    let s = Scene::new(three_level_chain);
    for (name, fmt) in [("top.qcow2", "qcow2"), ("sub/mid.qcow2", "qcow2")] {
        let ours = s.i.join("ours.raw");
        let theirs = s.q.join("theirs.raw");
        img_ok(&[
            "convert",
            "-O",
            "raw",
            &s.i.join(name).display().to_string(),
            &ours.display().to_string(),
        ]);
        qemu_img(&[
            "convert",
            "-O",
            "raw",
            &s.q.join(name).display().to_string(),
            &theirs.display().to_string(),
        ]);
        assert_eq!(
            std::fs::read(&ours).unwrap(),
            std::fs::read(&theirs).unwrap(),
            "{name} {fmt}"
        );
    }
    s.both(&["compare", "top.qcow2", "sub/mid.qcow2"]);
    s.both(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        "sub/mid.qcow2",
        "sub/base.raw",
    ]);
}

#[test]
fn info_and_map_match_qemu_img() {
    let s = Scene::new(three_level_chain);
    for args in [
        &["info", "top.qcow2"][..],
        &["info", "--backing-chain", "top.qcow2"],
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
        &["info", "--output=json", "sub/mid.qcow2"],
        &["map", "top.qcow2"],
        &["map", "sub/mid.qcow2"],
        &["map", "--output=json", "top.qcow2"],
        &["map", "--output=json", "sub/mid.qcow2"],
        &[
            "map",
            "--output=json",
            "--start-offset=1000k",
            "--max-length=3M",
            "top.qcow2",
        ],
        &["map", "--output=json", "--start-offset=7M", "top.qcow2"],
        &["map", "--output=json", "-f", "raw", "sub/base.raw"],
        &["map", "--start-offset=-1", "top.qcow2"],
        &["map", "--max-length=x", "top.qcow2"],
        &["map", "--output=yaml", "top.qcow2"],
    ] {
        s.both_on_same_files(args);
    }
}

#[test]
fn create_with_backing_files_matches_qemu_img() {
    let s = Scene::new(three_level_chain);
    let ok = [
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "a.qcow2",
        ][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "sub/base.raw",
            "-F",
            "raw",
            "b.qcow2",
            "8M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "sub/c.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "nope.qcow2",
            "-F",
            "qcow2",
            "d.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=top.qcow2,backing_fmt=qcow2",
            "e.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=512",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "f.qcow2",
        ],
    ];
    for args in ok {
        let (code, ..) = s.both(args);
        assert_eq!(code, Some(0), "{args:?}");
        let name = args.iter().rev().find(|a| a.ends_with(".qcow2")).unwrap();
        // Byte for byte as qemu-img lays it out.
        assert_eq!(
            std::fs::read(s.q.join(name)).unwrap(),
            std::fs::read(s.i.join(name)).unwrap(),
            "{args:?}"
        );
    }
    let refused = [
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "nope.qcow2",
            "-F",
            "qcow2",
            "x.qcow2",
        ][..],
        &["create", "-f", "qcow2", "-b", "top.qcow2", "x.qcow2"],
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "top.qcow2",
            "x.qcow2",
            "1M",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "foo",
            "x.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "sub/base.raw",
            "-F",
            "qcow2",
            "x.qcow2",
        ],
        &[
            "create", "-f", "qcow2", "-u", "-b", "nope", "-F", "qcow2", "x.qcow2",
        ],
        &["create", "-f", "qcow2", "-F", "qcow2", "x.qcow2", "1M"],
        &[
            "create", "-f", "qcow2", "-b", "", "-F", "qcow2", "x.qcow2", "1M",
        ],
        &[
            "create",
            "-f",
            "raw",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            "x.raw",
        ],
    ];
    for args in refused {
        let (code, ..) = s.both(args);
        assert_eq!(code, Some(1), "{args:?}");
    }
}

#[test]
fn rebase_matches_qemu_img() {
    for args in [
        &["rebase", "-b", "sub/base.raw", "-F", "raw", "top.qcow2"][..],
        &["rebase", "-b", "", "top.qcow2"],
        &["rebase", "-b", "", "sub/mid.qcow2"],
        &[
            "rebase",
            "-u",
            "-b",
            "sub/base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
        &["rebase", "-u", "top.qcow2"],
        &[
            "rebase",
            "-c",
            "-b",
            "sub/base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
        &["rebase", "-b", "sub/base.raw", "top.qcow2"],
        &["rebase", "-b", "nope", "-F", "qcow2", "top.qcow2"],
        &["rebase", "top.qcow2"],
        &[
            "rebase",
            "-f",
            "raw",
            "-b",
            "x",
            "-F",
            "raw",
            "sub/base.raw",
        ],
    ] {
        let s = Scene::new(three_level_chain);
        let (code, ..) = s.both(args);
        s.same_image("top.qcow2");
        s.same_image("sub/mid.qcow2");
        if code == Some(0) && !args.contains(&"-u") {
            // What the image reads is what it read before the rebase.
            let before = s.q.join("before.raw");
            let after = s.i.join("after.raw");
            let fresh = Scene::new(three_level_chain);
            let name = args.last().unwrap();
            qemu_img(&[
                "convert",
                "-O",
                "raw",
                &fresh.q.join(name).display().to_string(),
                &before.display().to_string(),
            ]);
            qemu_img(&[
                "convert",
                "-O",
                "raw",
                &s.i.join(name).display().to_string(),
                &after.display().to_string(),
            ]);
            assert_eq!(
                std::fs::read(&before).unwrap(),
                std::fs::read(&after).unwrap()
            );
        }
    }
}

#[test]
fn commit_matches_qemu_img() {
    for args in [
        &["commit", "top.qcow2"][..],
        &["commit", "-d", "top.qcow2"],
        &["commit", "-b", "sub/mid.qcow2", "top.qcow2"],
        &["commit", "-q", "sub/mid.qcow2"],
        &["commit", "-b", "nope", "top.qcow2"],
        &["commit", "-f", "raw", "sub/base.raw"],
        &["commit", "-r", "x", "top.qcow2"],
    ] {
        let s = Scene::new(three_level_chain);
        s.both(args);
        for name in ["top.qcow2", "sub/mid.qcow2"] {
            s.same_image(name);
        }
        let base = |d: &Path| std::fs::read(d.join("sub/base.raw")).unwrap();
        assert_eq!(base(&s.q), base(&s.i), "{args:?}: the raw base");
    }
}

#[test]
fn convert_with_a_backing_file_writes_only_the_differences() {
    for args in [
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "o.qcow2",
        ][..],
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-B",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=sub/mid.qcow2,backing_fmt=qcow2",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "sub/mid.qcow2",
            "top.qcow2",
            "o.qcow2",
        ],
        &[
            "convert",
            "-O",
            "raw",
            "-B",
            "sub/mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "o.raw",
        ],
    ] {
        let s = Scene::new(three_level_chain);
        let (code, ..) = s.both(args);
        if code == Some(0) {
            s.same_image("o.qcow2");
            assert_qemu_compare_identical(
                &s.i.join("o.qcow2"),
                "qcow2",
                &s.q.join("top.qcow2"),
                "qcow2",
            );
        }
    }
}

#[test]
fn img_writes_copy_on_write_from_the_chain_and_qemu_reads_them() {
    let s = Scene::new(three_level_chain);
    // Writes through img's library: partial clusters over data, zeros and compressed
    // clusters of the chain below, and past the middle image's backing file's end.
    let top = s.i.join("top.qcow2");
    let image = img_core::open_image(&top, &img_core::OpenOptions::default()).unwrap();
    let writes: &[(u64, usize, u8)] = &[
        (100, 300, 11),
        (61 * 1024, 2000, 12),
        (1024 * 1024 + 777, 1000, 13),
        (300 * 1024, 5000, 14),
        (4 * 1024 * 1024 + 4000, 3000, 15),
        (5 * 1024 * 1024 + 512, 10, 16),
    ];
    let twin = s.q.join("top.qcow2");
    for &(off, len, seed) in writes {
        // qemu-io writes a constant byte; img writes the same bytes.
        image.write_at(&vec![seed; len], off).unwrap();
        qemu_io("qcow2", &twin, &[format!("write -P {seed} {off} {len}")]);
    }
    image.close().unwrap();
    assert_qemu_check_clean(&top);
    assert_qemu_compare_identical(&top, "qcow2", &twin, "qcow2");
}

#[test]
fn loops_missing_files_and_probing_are_refused_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    qemu_in(
        d,
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
    );
    qemu_in(
        d,
        "qemu-img",
        &[
            "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
        ],
    );
    // a <- b <- a: qemu-img itself hangs on such a chain, so only img is run.
    qemu_in(
        d,
        "qemu-img",
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    );
    for args in [
        &["convert", "-O", "raw", "b.qcow2", "x.raw"][..],
        &["info", "--backing-chain", "b.qcow2"],
    ] {
        let out = run_in(d, &img_bin(), args);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("creates an infinite loop"), "{args:?}: {err}");
    }
    // A missing backing file: qemu-img's message.
    qemu_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "c.qcow2",
            "1M",
        ],
    );
    for args in [
        &["convert", "-O", "raw", "c.qcow2", "x.raw"][..],
        &["check", "c.qcow2"],
        &["info", "--backing-chain", "c.qcow2"],
    ] {
        let q = outcome(&run_in(d, Path::new("qemu-img"), args));
        let i = outcome(&run_in(d, &img_bin(), args));
        assert_eq!(q, i, "{args:?}");
    }
    // A raw backing file holding a qcow2 header is read as raw when the image says raw: the
    // qcow2 header is data, and the file it would name is never opened.
    qemu_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/passwd",
            "-F",
            "raw",
            "evil.raw",
        ],
    );
    // (evil.raw ends mid-sector: qemu counts the padding as a hole of the raw file.)
    qemu_in(
        d,
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "evil.raw",
            "-F",
            "raw",
            "victim.qcow2",
            "1M",
        ],
    );
    let out = run_in(d, &img_bin(), &["map", "--output=json", "victim.qcow2"]);
    let q = run_in(
        d,
        Path::new("qemu-img"),
        &["map", "--output=json", "victim.qcow2"],
    );
    assert_eq!(outcome(&out), outcome(&q));
    let ours = run_in(
        d,
        &img_bin(),
        &["convert", "-O", "raw", "victim.qcow2", "v.raw"],
    );
    assert!(ours.status.success());
    let v = std::fs::read(d.join("v.raw")).unwrap();
    assert_eq!(
        &v[..4],
        b"QFI\xfb",
        "the raw backing file's bytes, header and all"
    );
}

/// Data clusters over holes of their file: qemu reports them as zeros only for images it takes
/// for preallocated with `metadata` (a heuristic over allocated blocks and refcounts).
#[test]
fn map_of_partly_written_and_preallocated_images_matches_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let make = |name: &str, create: &[&str], writes: &[&str]| {
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(create);
        args.push(name);
        args.push("6M");
        qemu_in(d, "qemu-img", &args);
        io(d, name, writes);
    };
    make("a.qcow2", &[], &["write 512 512"]);
    make("b.qcow2", &[], &["write -P 4 4M 100k"]);
    make(
        "c.qcow2",
        &[],
        &[
            "write -P 2 60k 8k",
            "write -z 256k 128k",
            "write -c -P 3 1M 64k",
            "write -P 4 4M 100k",
        ],
    );
    make(
        "p.qcow2",
        &["-o", "preallocation=metadata"],
        &["write -P 5 1M 4k"],
    );
    make(
        "s.qcow2",
        &["-o", "cluster_size=512"],
        &["write -P 6 1000 100", "write 1M 30k"],
    );
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    for name in ["a.qcow2", "b.qcow2", "c.qcow2", "p.qcow2", "s.qcow2"] {
        for args in [&["map", "--output=json", name][..], &["map", name]] {
            let q = outcome(&run_in(d, Path::new("qemu-img"), args));
            let i = outcome(&run_in(d, &img_bin(), args));
            assert_eq!(q, i, "{args:?}");
        }
    }
}
