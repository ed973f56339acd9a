//! `img create`, `img info` and `img compare` against qemu-img itself: the same arguments
//! must give the same stdout, stderr (with `img` for `qemu-img`) and exit code, and
//! `img create` must leave the same files behind.

mod common;

use common::Run;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn qemu_in(dir: &Path, args: &[&str]) -> Run {
    Run::from(
        Command::new("qemu-img")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("cannot run qemu-img"),
    )
}

fn img_in(dir: &Path, args: &[&str]) -> Run {
    Run::from(
        Command::new(common::img_bin())
            .args(args)
            .current_dir(dir)
            .output()
            .expect("cannot run img"),
    )
}

/// Runs both tools in `dir` (commands that only read) and asserts the same result.
fn assert_same_in(dir: &Path, args: &[&str]) -> Run {
    let q = qemu_in(dir, args);
    let i = img_in(dir, args);
    assert_eq!(i, q, "img {args:?} differs from qemu-img");
    i
}

/// The files of a directory: name to content.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

/// `qemu-img info --output=json` of a file, without the allocation figures (they depend on
/// how the file system placed the blocks, not on the image).
fn info_fields(dir: &Path, name: &str) -> serde_json::Value {
    let out = qemu_in(dir, &["info", "--output=json", name]);
    assert_eq!(out.code, Some(0), "qemu-img info {name}: {}", out.stderr);
    let mut v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    strip_actual_size(&mut v);
    v
}

fn strip_actual_size(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.remove("actual-size");
            o.values_mut().for_each(strip_actual_size);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_actual_size),
        _ => {}
    }
}

/// Runs `img create ARGS` and `qemu-img create ARGS` in two fresh directories (optionally
/// prepared by `setup`) and asserts the same output, exit code and resulting files; images
/// that img created must pass `qemu-img check` and look the same to `qemu-img info`.
fn check_create(args: &[&str], setup: Option<&dyn Fn(&Path)>) {
    let qd = tempfile::tempdir().unwrap();
    let id = tempfile::tempdir().unwrap();
    if let Some(s) = setup {
        s(qd.path());
        s(id.path());
    }
    let mut full = vec!["create"];
    full.extend_from_slice(args);
    let q = qemu_in(qd.path(), &full);
    let i = img_in(id.path(), &full);
    assert_eq!(i, q, "img {full:?} differs from qemu-img");
    let qf = files(qd.path());
    let imf = files(id.path());
    assert_eq!(
        imf.keys().collect::<Vec<_>>(),
        qf.keys().collect::<Vec<_>>(),
        "{full:?}: different files left behind"
    );
    for (name, content) in &qf {
        assert!(
            imf[name] == *content,
            "{full:?}: {name} differs from qemu-img's ({} vs {} bytes)",
            imf[name].len(),
            content.len()
        );
        if q.code == Some(0) && content.starts_with(b"QFI\xfb") {
            common::assert_qemu_check_clean(&id.path().join(name));
        }
        if q.code == Some(0) {
            assert_eq!(
                info_fields(id.path(), name),
                info_fields(qd.path(), name),
                "{full:?}: qemu-img info of {name} differs"
            );
        }
    }
}

#[test]
fn create_qcow2_options_match_qemu() {
    let opts = [
        "",
        "compat=0.10",
        "compat=v2",
        "compat=1.1",
        "compat=v3",
        "refcount_bits=1",
        "refcount_bits=8",
        "refcount_bits=64",
        "lazy_refcounts=on",
        "lazy_refcounts",
        "lazy_refcounts=yes",
        "nolazy_refcounts",
        "compression_type=zstd",
        "compression_type=zlib",
        "cluster_size=512,compat=0.10",
        "cluster_size=4k",
        "cluster_size=2M",
        "cluster_size=2M,refcount_bits=1,lazy_refcounts=on,compression_type=zstd",
        "preallocation=off",
        "extended_l2=off",
        "nocow=on",
        "extent_size_hint=1M",
        "refcount_bits=0x10",
        "size=2G",
    ];
    for o in opts {
        if o.is_empty() {
            check_create(&["-f", "qcow2", "a.qcow2", "1G"], None);
        } else {
            check_create(&["-f", "qcow2", "-o", o, "a.qcow2", "1G"], None);
        }
    }
}

#[test]
fn create_qcow2_invalid_options_match_qemu() {
    let opts = [
        "cluster_size=3000",
        "cluster_size=256",
        "cluster_size=4M",
        "cluster_size=abc",
        "cluster_size=",
        "cluster_size=0",
        "cluster_size=1.5k",
        "refcount_bits=3",
        "refcount_bits=128",
        "refcount_bits=0",
        "refcount_bits=x",
        "refcount_bits=-1",
        "refcount_bits=99999999999999999999",
        "compat=0.10,refcount_bits=8",
        "compat=0.10,lazy_refcounts=on",
        "compat=0.10,compression_type=zstd",
        "compat=0.10,extended_l2=on",
        "compat=0.9",
        "compat=",
        "compat=0.9,compression_type=lz4",
        "compression_type=lz4",
        "lazy_refcounts=maybe",
        "foo=bar",
        "=5",
        "help=on",
        "preallocation=bogus",
        "backing_fmt=raw",
        "backing_fmt=foo",
        "extended_l2=on,cluster_size=4k",
        "data_file_raw=on",
        "backing_file=",
        "backing_file=a.qcow2",
        "size=1M",
    ];
    for o in opts {
        check_create(&["-f", "qcow2", "-o", o, "a.qcow2", "1G"], None);
    }
    // A failed creation removes (or keeps) an existing file exactly as qemu-img does.
    let existing = |d: &Path| fs::write(d.join("x.qcow2"), b"hello\n").unwrap();
    for o in [
        "cluster_size=3000",
        "foo=bar",
        "compat=0.9",
        "lazy_refcounts=maybe",
    ] {
        check_create(&["-f", "qcow2", "-o", o, "x.qcow2", "1G"], Some(&existing));
    }
    check_create(&["-f", "qcow2", "x.qcow2", "1E"], Some(&existing));
    check_create(&["-f", "qcow2", "x.qcow2", "1M"], Some(&existing));
}

#[test]
fn create_raw_matches_qemu() {
    for o in [
        "preallocation=off",
        "preallocation=falloc",
        "preallocation=full",
        "preallocation=metadata",
        "preallocation=bogus",
        "cluster_size=4k",
        "nocow=on",
        "extent_size_hint=1M,preallocation=off,nocow=on",
        "size=1M",
    ] {
        check_create(&["-f", "raw", "-o", o, "a.raw", "1M"], None);
    }
    let existing = |d: &Path| fs::write(d.join("x.raw"), b"hello\n").unwrap();
    check_create(
        &["-f", "raw", "-o", "preallocation=metadata", "x.raw", "1M"],
        Some(&existing),
    );
    check_create(&["x.raw", "3M"], Some(&existing));
}

#[test]
fn create_sizes_match_qemu() {
    let sizes = [
        "",
        "abc",
        "1.5",
        "1.5k",
        "0x10",
        " 5",
        "5 ",
        "1K",
        "0",
        "+5",
        ".5k",
        "5.",
        "1M5",
        "k",
        "100",
        "1000",
        "4095",
        "4097",
        "0.5k",
        "1.5e",
        "010",
        "1kB",
        "9223372036854775808",
        "8192P",
        "1E",
    ];
    for s in sizes {
        check_create(&["-f", "raw", "a.raw", s], None);
        check_create(&["-f", "qcow2", "a.qcow2", s], None);
    }
    for s in ["-5", "0xffffffffffffffff", "16E", "15.9999E", "1k"] {
        check_create(
            &["-f", "qcow2", "-o", &format!("size={s}"), "a.qcow2"],
            None,
        );
    }
    check_create(
        &["-f", "qcow2", "-o", "cluster_size=512", "a.qcow2", "1T"],
        None,
    );
}

#[test]
fn create_command_lines_match_qemu() {
    let lines: &[&[&str]] = &[
        &[],
        &["-f", "qcow2"],
        &["-f", "qcow2", "a.qcow2", "1G", "extra"],
        &["-f", "qcow2", "a.qcow2"],
        &["-f", "foo", "a.qcow2", "1G"],
        &["-x"],
        &["-f"],
        &["--bogus"],
        &["-q", "-f", "qcow2", "a.qcow2", "1G"],
        &[
            "--quiet",
            "--format=qcow2",
            "--options=compat=0.10",
            "a.qcow2",
            "1M",
        ],
        &["a.img", "1M"],
        &["-f", "raw", "-b", "base.qcow2", "a.raw", "1G"],
        &["-f", "raw", "-F", "raw", "a.raw", "1G"],
        &["-f", "qcow2", "-b", "", "a.qcow2", "1G"],
        &["-f", "qcow2", "-F", "raw", "a.qcow2", "1G"],
        &["-f", "qcow2", "-o", "", "a.qcow2", "1M"],
        &["-f", "qcow2", "-o", "a,", "a.qcow2", "1M"],
        &["-f", "qcow2", "-o", ",a", "a.qcow2", "1M"],
        &["-f", "qcow2", "-o", "cluster_size=4k,,", "a.qcow2", "1M"],
        &[
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-o",
            "cluster_size=8k",
            "a.qcow2",
            "1M",
        ],
        &["-f", "qcow2", "-o", "size=1M,size=2M", "a.qcow2"],
        &["-f", "qcow2", "-o", "size=1M", "a.qcow2", "1M"],
        &["-f", "qcow2", "nodir/a.qcow2", "1M"],
        &["-f", "raw", "nodir/a.raw", "1M"],
        &["-f", "qcow2", "-o", "compat=0.9", "nodir/a.qcow2", "1M"],
        &["-f", "qcow2", ".", "1M"],
        &["-f", "raw", "a.raw", "9223372036854775807"],
    ];
    for args in lines {
        check_create(args, None);
    }
}

#[test]
fn create_option_help_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["create", "-f", "qcow2", "-o", "help"][..],
        &["create", "-f", "raw", "-o", "help"],
        &["create", "-o", "help"],
        &["create", "-f", "qcow2", "-o", "?"],
        &["create", "-f", "qcow2", "-o", "help", "x.qcow2"],
        &["create", "-f", "raw", "-o", "help", "x.raw"],
        &[
            "create",
            "-o",
            "lazy_refcounts,help",
            "-f",
            "qcow2",
            "x.qcow2",
            "1G",
        ],
        &["create", "-f", "foo", "-o", "help", "x"],
    ] {
        let r = assert_same_in(dir.path(), args);
        if args.contains(&"qcow2") && !args.contains(&"foo") {
            assert!(r.stdout.contains("refcount_bits=<num>"), "{}", r.stdout);
        }
    }
    assert!(
        files(dir.path()).is_empty(),
        "-o help must not create files"
    );
}

/// Images made by qemu-img (and written by qemu-io), shared by the info and compare tests.
struct Images {
    dir: tempfile::TempDir,
}

impl Images {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn qemu_img_ok(dir: &Path, args: &[&str]) {
    let r = qemu_in(dir, args);
    assert_eq!(r.code, Some(0), "qemu-img {args:?}: {}", r.stderr);
}

fn qemu_io_write(images: &Images, fmt: &str, name: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    common::qemu_io(fmt, &images.file(name), &cmds);
}

fn info_images() -> Images {
    let images = Images {
        dir: tempfile::tempdir().unwrap(),
    };
    let d = images.path();
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "1G"]);
    qemu_img_ok(d, &["create", "-q", "-f", "raw", "b.raw", "10M"]);
    qemu_img_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4k",
            "v2.qcow2",
            "10M",
        ],
    );
    for cs in ["512", "4096", "65536", "2097152"] {
        qemu_img_ok(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                &format!("c{cs}.qcow2"),
                "5G",
            ],
        );
    }
    qemu_img_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compression_type=zstd,lazy_refcounts=on,refcount_bits=1,cluster_size=2M",
            "z.qcow2",
            "3G",
        ],
    );
    qemu_io_write(
        &images,
        "qcow2",
        "z.qcow2",
        &["write -P 1 0 3M", "write -c -P 2 4M 2M"],
    );
    qemu_img_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "lazy.qcow2",
            "64M",
        ],
    );
    qemu_io_write(&images, "qcow2", "lazy.qcow2", &["write -P 7 1M 128k"]);
    fs::write(images.file("odd.raw"), vec![0x55u8; 1000]).unwrap();
    fs::write(images.file("empty"), b"").unwrap();
    // The corrupt bit (incompatible feature bit 1) set by hand.
    let mut corrupt = fs::read(images.file("a.qcow2")).unwrap();
    corrupt[79] |= 2;
    fs::write(images.file("corrupt.qcow2"), corrupt).unwrap();
    // Persistent dirty bitmaps, which info lists.
    fs::copy(images.file("a.qcow2"), images.file("bitmaps.qcow2")).unwrap();
    qemu_img_ok(d, &["bitmap", "--add", "bitmaps.qcow2", "b0"]);
    qemu_img_ok(
        d,
        &["bitmap", "--add", "-g", "1M", "bitmaps.qcow2", "second"],
    );
    qemu_img_ok(
        d,
        &["bitmap", "--add", "--disable", "bitmaps.qcow2", "third"],
    );
    images
}

#[test]
fn info_matches_qemu_for_qemu_made_images() {
    let images = info_images();
    let d = images.path();
    for name in [
        "a.qcow2",
        "b.raw",
        "v2.qcow2",
        "c512.qcow2",
        "c4096.qcow2",
        "c65536.qcow2",
        "c2097152.qcow2",
        "z.qcow2",
        "lazy.qcow2",
        "odd.raw",
        "empty",
        "corrupt.qcow2",
        "bitmaps.qcow2",
    ] {
        let human = assert_same_in(d, &["info", name]);
        assert!(human.stdout.starts_with(&format!("image: {name}\n")));
        let json = assert_same_in(d, &["info", "--output=json", name]);
        let v: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
        assert_eq!(v["filename"], name);
        assert_same_in(
            d,
            &["info", "--output", "json", "-U", "--backing-chain", name],
        );
        assert_same_in(d, &["info", "-b", name]);
    }
}

#[test]
fn info_options_and_errors_match_qemu() {
    let images = info_images();
    let d = images.path();
    let lines: &[&[&str]] = &[
        &["info", "-f", "raw", "a.qcow2"],
        &["info", "-f", "qcow2", "b.raw"],
        &["info", "-f", "foo", "b.raw"],
        &["info", "nonexist.qcow2"],
        &["info", "-f", "qcow2", "nonexist.qcow2"],
        &["info", "--output=xml", "a.qcow2"],
        &["info", "--output"],
        &["info", "a.qcow2", "b.raw"],
        &["info"],
        &["info", "-x", "a.qcow2"],
        &["info", "--f", "a.qcow2"],
        &["info", "--out=json", "a.qcow2"],
        &["info", "--format=qcow2", "a.qcow2"],
        &["info", "--image-opts", "driver=qcow2,file.filename=a.qcow2"],
        &["info", "--image-opts", "file.filename=a.qcow2"],
        &[
            "info",
            "--image-opts",
            "driver=raw,file.driver=file,file.filename=a.qcow2",
        ],
        &["info", "--image-opts", "driver=file,filename=a.qcow2"],
        &[
            "info",
            "--output=json",
            "--image-opts",
            "driver=file,filename=a.qcow2",
        ],
        &["info", "--image-opts", "a.qcow2"],
        &["info", "--image-opts", "-f", "qcow2", "a.qcow2"],
        &["info", "--image-opts", "driver=qcow2"],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2,foo=bar",
        ],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=nonexist",
        ],
        &["info", "."],
    ];
    for args in lines {
        assert_same_in(d, args);
    }
}

#[test]
fn info_of_images_made_by_img_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, args) in [
        ("a.qcow2", vec!["-f", "qcow2"]),
        ("v2.qcow2", vec!["-f", "qcow2", "-o", "compat=0.10"]),
        (
            "z.qcow2",
            vec![
                "-f",
                "qcow2",
                "-o",
                "compression_type=zstd,lazy_refcounts=on",
            ],
        ),
        ("r.raw", vec!["-f", "raw"]),
    ] {
        let mut full = vec!["create", "-q"];
        full.extend(args);
        full.extend([name, "100M"]);
        let r = img_in(d, &full);
        assert_eq!(r.code, Some(0), "img {full:?}: {}", r.stderr);
        assert_same_in(d, &["info", name]);
        assert_same_in(d, &["info", "--output=json", name]);
    }
}

fn compare_images() -> Images {
    let images = Images {
        dir: tempfile::tempdir().unwrap(),
    };
    let d = images.path();
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "a.qcow2", "10M"]);
    qemu_img_ok(d, &["create", "-q", "-f", "raw", "b.raw", "10M"]);
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "c.qcow2", "12M"]);
    qemu_img_ok(d, &["create", "-q", "-f", "raw", "d.raw", "12M"]);
    qemu_io_write(&images, "qcow2", "a.qcow2", &["write -P 0x11 1M 64k"]);
    qemu_io_write(&images, "raw", "b.raw", &["write -P 0x11 1M 64k"]);
    fs::copy(images.file("b.raw"), images.file("b2.raw")).unwrap();
    // One byte off inside a sector: qemu reports the sector.
    qemu_io_write(&images, "raw", "b2.raw", &["write -P 0x12 1100101 1"]);
    qemu_io_write(&images, "raw", "d.raw", &["write -P 0x11 1M 64k"]);
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "c2.qcow2", "12M"]);
    qemu_io_write(
        &images,
        "qcow2",
        "c2.qcow2",
        &["write -P 0x11 1M 64k", "write -P 0 11M 64k"],
    );
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "c3.qcow2", "12M"]);
    qemu_io_write(
        &images,
        "qcow2",
        "c3.qcow2",
        &["write -P 0x11 1M 64k", "write -P 0x22 11000101 1"],
    );
    let odd: Vec<u8> = common::pattern(3, 0, 1000);
    fs::write(images.file("odd.raw"), &odd).unwrap();
    fs::write(images.file("odd2.raw"), &odd).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(images.file("odd2.raw"))
        .unwrap()
        .set_len(1024)
        .unwrap();
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "z.qcow2", "10M"]);
    qemu_io_write(&images, "qcow2", "z.qcow2", &["write -c -P 0x11 1M 64k"]);
    qemu_img_ok(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "e.qcow2",
            "10M",
        ],
    );
    qemu_io_write(
        &images,
        "qcow2",
        "e.qcow2",
        &[
            "write -P 0x11 1M 64k",
            "write -z 3M 1M",
            "write -P 0 5M 64k",
        ],
    );
    // Zeros over allocated data keep the clusters (preallocated zero clusters), which strict
    // mode tells apart from plain zero clusters.
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "za.qcow2", "10M"]);
    qemu_io_write(
        &images,
        "qcow2",
        "za.qcow2",
        &[
            "write -P 0x11 1M 64k",
            "write -P 0x55 4M 1M",
            "write -z 4M 1M",
        ],
    );
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "zp.qcow2", "10M"]);
    qemu_io_write(
        &images,
        "qcow2",
        "zp.qcow2",
        &["write -P 0x11 1M 64k", "write -z 4M 1M"],
    );
    qemu_img_ok(
        d,
        &["convert", "-O", "raw", "-S", "0", "a.qcow2", "full.raw"],
    );
    qemu_img_ok(d, &["convert", "-O", "qcow2", "b.raw", "conv.qcow2"]);
    // Several megabytes of data, so that comparisons take more than one read.
    qemu_img_ok(d, &["create", "-q", "-f", "qcow2", "big.qcow2", "20M"]);
    qemu_io_write(
        &images,
        "qcow2",
        "big.qcow2",
        &["write -P 0x33 0 9M", "write -P 0x44 12M 3M"],
    );
    qemu_img_ok(d, &["convert", "-O", "raw", "big.qcow2", "big.raw"]);
    fs::copy(images.file("big.raw"), images.file("big2.raw")).unwrap();
    qemu_io_write(&images, "raw", "big2.raw", &["write -P 0x45 14M 512"]);
    images
}

#[test]
fn compare_matches_qemu_for_every_pair() {
    let images = compare_images();
    let d = images.path();
    let names = [
        "a.qcow2",
        "b.raw",
        "c.qcow2",
        "d.raw",
        "b2.raw",
        "c2.qcow2",
        "c3.qcow2",
        "odd.raw",
        "odd2.raw",
        "z.qcow2",
        "e.qcow2",
        "za.qcow2",
        "zp.qcow2",
        "full.raw",
        "conv.qcow2",
        "big.qcow2",
        "big.raw",
        "big2.raw",
    ];
    let mut outcomes = BTreeMap::new();
    for x in names {
        for y in names {
            let r = assert_same_in(d, &["compare", x, y]);
            *outcomes.entry(r.code).or_insert(0) += 1;
            assert_same_in(d, &["compare", "-s", x, y]);
            assert_same_in(d, &["compare", "-p", x, y]);
        }
    }
    // The set exercises both identical and different pairs.
    assert!(
        outcomes.get(&Some(0)).copied().unwrap_or(0) > 10,
        "{outcomes:?}"
    );
    assert!(
        outcomes.get(&Some(1)).copied().unwrap_or(0) > 10,
        "{outcomes:?}"
    );
}

#[test]
fn compare_messages_and_exit_codes_match_qemu() {
    let images = compare_images();
    let d = images.path();
    let expect = |args: &[&str], code: i32, text: &str| {
        let r = assert_same_in(d, args);
        assert_eq!(r.code, Some(code), "{args:?}");
        assert!(
            r.stdout.contains(text) || r.stderr.contains(text),
            "{args:?}: {r:?}"
        );
    };
    expect(&["compare", "a.qcow2", "b.raw"], 0, "Images are identical.");
    expect(
        &["compare", "a.qcow2", "b2.raw"],
        1,
        "Content mismatch at offset 1099776!",
    );
    expect(
        &["compare", "a.qcow2", "d.raw"],
        0,
        "Warning: Image size mismatch!",
    );
    expect(
        &["compare", "a.qcow2", "c3.qcow2"],
        1,
        "Content mismatch at offset 10999808!",
    );
    expect(
        &["compare", "-s", "a.qcow2", "c.qcow2"],
        1,
        "Strict mode: Image size mismatch!",
    );
    expect(
        &["compare", "-s", "a.qcow2", "b.raw"],
        1,
        "Strict mode: Offset 0 block status mismatch!",
    );
    expect(
        &["compare", "big.raw", "big2.raw"],
        1,
        "Content mismatch at offset 14680064!",
    );
    expect(
        &["compare", "a.qcow2", "nonexist"],
        2,
        "No such file or directory",
    );
    expect(
        &["compare", "nonexist", "a.qcow2"],
        2,
        "Could not open 'nonexist'",
    );
    expect(
        &["compare", "-T", "foo", "a.qcow2", "b.raw"],
        2,
        "Invalid source cache option: foo",
    );
    expect(&["compare", "a.qcow2"], 1, "Expecting two image file names");
    let lines: &[&[&str]] = &[
        &["compare", "-q", "a.qcow2", "c.qcow2"],
        &["compare", "-q", "a.qcow2", "b2.raw"],
        &["compare", "-p", "a.qcow2", "nonexist"],
        &["compare", "-p", "-T", "foo", "a.qcow2", "b.raw"],
        &["compare", "-T", "none", "a.qcow2", "b2.raw"],
        &["compare", "-T", "directsync", "-p", "a.qcow2", "d.raw"],
        &["compare", "-T", "unsafe", "big.qcow2", "big.raw"],
        &["compare", "-f", "raw", "a.qcow2", "b.raw"],
        &["compare", "-F", "qcow2", "a.qcow2", "b.raw"],
        &["compare"],
        &["compare", "a", "b", "c"],
        &["compare", "-x", "a", "b"],
        &["compare", "-pq", "a.qcow2", "d.raw"],
        &["compare", "-U", "a.qcow2", "b.raw"],
        &["compare", ".", "a.qcow2"],
        &[
            "compare",
            "--strict",
            "--progress",
            "--a-format=qcow2",
            "--b-format",
            "raw",
            "a.qcow2",
            "b.raw",
        ],
        &[
            "compare",
            "--image-opts",
            "driver=qcow2,file.filename=a.qcow2",
            "file.filename=b2.raw",
        ],
        &["compare", "--image-opts", "-f", "qcow2", "a", "b"],
        &["compare", "--image-opts", "a.qcow2", "b.raw"],
    ];
    for args in lines {
        assert_same_in(d, args);
    }
}
