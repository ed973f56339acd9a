//! `img measure` side by side with `qemu-img measure`: the same arguments must print the same
//! sizes (human and JSON), the same errors (with `img` for `qemu-img`) and exit with the same
//! code, for new images of a given size and for sources of every kind qemu-img measures.

mod common;

use common::{qemu_img, qemu_io, run_in, Run};
use std::path::{Path, PathBuf};

/// Runs `measure` with `args` in `dir` with both tools and asserts the same result.
fn same(dir: &Path, args: &[&str]) -> Run {
    let mut full = vec!["measure"];
    full.extend_from_slice(args);
    let q = run_in(Path::new("qemu-img"), dir, &full);
    let i = run_in(&common::img_bin(), dir, &full);
    assert_eq!(i, q, "img {full:?} differs from qemu-img");
    i
}

/// The number printed after `label: ` in human output.
fn figure(out: &str, label: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(label)?.strip_prefix(": ")?.parse().ok())
        .unwrap_or_else(|| panic!("no {label} in {out}"))
}

/// Target options that change the result, with both output formats.
const TARGETS: &[&[&str]] = &[
    &[],
    &["-O", "raw"],
    &["-O", "qcow2"],
    &["-O", "qcow2", "-o", "cluster_size=512"],
    &["-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=1"],
    &["-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64"],
    &["-O", "qcow2", "-o", "compat=0.10"],
    &["-O", "qcow2", "-o", "extended_l2=on"],
    &["-O", "qcow2", "-o", "preallocation=metadata"],
    &["-O", "qcow2", "-o", "preallocation=falloc"],
    &["-O", "qcow2", "-o", "preallocation=full"],
    &["-O", "qcow2", "-o", "backing_file=base.qcow2"],
    &["-O", "qcow2", "-o", "size=4P"],
    &[
        "-O",
        "qcow2",
        "-o",
        "cluster_size=4k",
        "-o",
        "cluster_size=64k",
    ],
];

fn each_target(dir: &Path, source: &[&str]) {
    for target in TARGETS {
        for output in [&[][..], &["--output=json"], &["--output", "human"]] {
            let mut args: Vec<&str> = output.to_vec();
            args.extend_from_slice(target);
            args.extend_from_slice(source);
            let r = same(dir, &args);
            // qemu checks the L1 limit against the size option even with a source, so only
            // an oversized -o size fails.
            let oversized = target.contains(&"size=4P");
            assert_eq!(
                r.code,
                Some(u8::from(oversized) as i32),
                "{args:?}: {}",
                r.stderr
            );
        }
    }
}

#[test]
fn new_images_of_a_size() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [
        "0",
        "1",
        "511",
        "512",
        "1000",
        "65536",
        "65537",
        "1G",
        "1.5G",
        "0x10",
        "1T",
        "100T",
        "1P",
        "9223372036854775296",
        "9223372036854775807",
    ];
    for size in sizes {
        for target in TARGETS.iter().filter(|t| !t.contains(&"size=4P")) {
            for output in [&[][..], &["--output=json"]] {
                let mut args: Vec<&str> = output.to_vec();
                args.extend_from_slice(target);
                args.extend(["--size", size]);
                same(dir.path(), &args);
            }
        }
    }
    // The L1 limit: too large for the cluster size.
    for args in [
        &["--size", "4P", "-O", "qcow2"][..],
        &["--size", "1T", "-O", "qcow2", "-o", "cluster_size=512"],
        &[
            "--size",
            "9223372036854775807",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M",
        ],
    ] {
        let r = same(dir.path(), args);
        assert_eq!(r.code, Some(1), "{args:?}");
    }
    // --size replaces a size given with -o.
    let r = same(
        dir.path(),
        &["--size", "1G", "-O", "qcow2", "-o", "size=4P"],
    );
    assert_eq!(r.code, Some(0));
}

/// Source images, made by qemu-img and qemu-io.
fn qcow2(dir: &Path, name: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let ps = p.display().to_string();
    args.extend([ps.as_str(), size]);
    qemu_img(&args);
    if !cmds.is_empty() {
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        qemu_io("qcow2", &p, &cmds);
    }
    p
}

#[test]
fn qcow2_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qcow2(dir, "empty.qcow2", "", "0", &[]);
    qcow2(
        dir,
        "data.qcow2",
        "",
        "1G",
        &[
            "write 512 512",
            "write 64k 64k",
            "write 128M 63k",
            "write -z 300M 1M",
        ],
    );
    qcow2(dir, "full.qcow2", "", "8M", &["write -P 1 0 8M"]);
    qcow2(
        dir,
        "c4k.qcow2",
        "cluster_size=4k",
        "16M",
        &["write -P 1 3k 9k"],
    );
    qcow2(dir, "v2.qcow2", "compat=0.10", "64M", &["write -P 1 1M 1M"]);
    qcow2(
        dir,
        "zeros.qcow2",
        "",
        "64M",
        &["write -P 1 0 16M", "write -z 1M 4M", "write -z -u 8M 4M"],
    );
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        &dir.join("zeros.qcow2").display().to_string(),
        &dir.join("comp.qcow2").display().to_string(),
    ]);
    // Preallocated images: with `metadata` qemu finds the image preallocated and asks the
    // file which data clusters are holes; with `full` every cluster is data.
    qcow2(
        dir,
        "meta.qcow2",
        "preallocation=metadata",
        "64M",
        &["write -P 5 1M 64k"],
    );
    qcow2(dir, "prealloc.qcow2", "preallocation=full", "16M", &[]);
    for name in [
        "empty.qcow2",
        "data.qcow2",
        "full.qcow2",
        "c4k.qcow2",
        "v2.qcow2",
        "zeros.qcow2",
        "comp.qcow2",
        "meta.qcow2",
        "prealloc.qcow2",
    ] {
        each_target(dir, &[name]);
        same(dir, &["-O", "qcow2", "-f", "qcow2", name]);
        same(dir, &["-O", "qcow2", "-f", "raw", name]);
        same(dir, &["-O", "qcow2", "-U", name]);
        let opts = format!("driver=qcow2,file.filename={name}");
        same(dir, &["-O", "qcow2", "--image-opts", &opts]);
    }
    // The v2 source has no bitmaps line; a v3 source always has one for a v3 target.
    let r = same(dir, &["-O", "qcow2", "v2.qcow2"]);
    assert!(!r.stdout.contains("bitmaps"));
    let r = same(dir, &["-O", "qcow2", "data.qcow2"]);
    assert_eq!(figure(&r.stdout, "bitmaps size"), 0);
}

#[test]
fn overlays() {
    // The data of the whole backing chain counts, as qemu's block status above no base
    // reports it.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qcow2(dir, "base.qcow2", "", "10M", &["write -P 0x11 0 4M"]);
    qcow2(
        dir,
        "ov.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "3000k",
        &["write -P 0x22 1M 64k", "write -z 2M 64k"],
    );
    qcow2(
        dir,
        "big.qcow2",
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "30M",
        &["write -P 0x22 20M 64k"],
    );
    for name in ["ov.qcow2", "big.qcow2"] {
        each_target(dir, &[name]);
    }
}

#[test]
fn bitmaps_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = qcow2(dir, "bm.qcow2", "", "100M", &["write -P 1 1M 3M"]);
    let ps = p.display().to_string();
    qemu_img(&["bitmap", "--add", &ps, "b0"]);
    qemu_img(&[
        "bitmap",
        "--add",
        "-g",
        "512",
        &ps,
        "a-much-longer-bitmap-name",
    ]);
    qemu_img(&["bitmap", "--add", "--disable", "-g", "1M", &ps, "x"]);
    each_target(dir, &["bm.qcow2"]);
    let r = same(dir, &["-O", "qcow2", "bm.qcow2"]);
    assert!(figure(&r.stdout, "bitmaps size") > 0);
    let r = same(dir, &["--output=json", "-O", "qcow2", "bm.qcow2"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["bitmaps"].as_u64().unwrap() > 0);
    // Twenty bitmaps with one-letter names: their directory entries take 640 bytes once each
    // is padded to 8 bytes, more than one 512-byte cluster.
    let p = qcow2(dir, "many.qcow2", "", "8M", &[]);
    let ps = p.display().to_string();
    for name in "abcdefghijklmnopqrst".chars() {
        qemu_img(&["bitmap", "--add", &ps, &name.to_string()]);
    }
    each_target(dir, &["many.qcow2"]);
}

#[test]
fn snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let p = qcow2(
        dir,
        "s.qcow2",
        "",
        "16M",
        &["write -P 1 0 1M", "write -P 0 4M 1M", "write -z 8M 1M"],
    );
    let ps = p.display().to_string();
    qemu_img(&["snapshot", "-c", "first", &ps]);
    qemu_io("qcow2", &p, &["write -P 2 1M 2M".to_string()]);
    qemu_img(&["snapshot", "-c", "second", &ps]);
    qemu_io("qcow2", &p, &["write -P 3 12M 1M".to_string()]);
    let mut required = std::collections::BTreeMap::new();
    for l in [
        "first",
        "second",
        "1",
        "2",
        "snapshot.id=1",
        "snapshot.name=second",
        "snapshot.id=2,snapshot.name=second",
        "snapshot.id=1,snapshot.name=second",
        "nonexistent",
        "snapshot.id=1,foo=2",
    ] {
        for target in [
            &["-O", "qcow2"][..],
            &["-O", "qcow2", "-o", "cluster_size=4k"],
            &[],
        ] {
            let mut args = vec!["-l", l];
            args.extend_from_slice(target);
            args.push("s.qcow2");
            let r = same(dir, &args);
            if target.len() == 2 && r.code == Some(0) {
                required.insert(l, figure(&r.stdout, "required size"));
            }
        }
    }
    // The snapshots and the current disk hold different amounts of data; an ID and a name
    // find the same snapshot.
    let now = figure(
        &same(dir, &["-O", "qcow2", "s.qcow2"]).stdout,
        "required size",
    );
    assert!(required["first"] < required["second"] && required["second"] < now);
    assert_eq!(required["1"], required["first"]);
    assert_eq!(required["snapshot.name=second"], required["second"]);
    assert!(!required.contains_key("nonexistent"));
    // Raw sources cannot load snapshots.
    std::fs::write(dir.join("r.raw"), vec![1u8; 4096]).unwrap();
    let r = same(dir, &["-l", "x", "r.raw"]);
    assert_eq!(r.code, Some(1));
}

#[test]
fn raw_sources() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Data in two places of a sparse file, a file whose size is not whole sectors, an empty
    // one, and one with data all through.
    let sparse = std::fs::File::create(dir.join("sparse.raw")).unwrap();
    sparse.set_len(20 << 20).unwrap();
    sparse.write_all_at(&[7u8; 1024], 70 << 10).unwrap();
    sparse.write_all_at(&[9u8; 10 << 10], 5000 << 10).unwrap();
    std::fs::write(dir.join("odd.raw"), vec![3u8; 1000]).unwrap();
    std::fs::write(dir.join("empty.raw"), b"").unwrap();
    std::fs::write(dir.join("full.raw"), vec![5u8; 3 << 20]).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        &dir.join("created.raw").display().to_string(),
        "1G",
    ]);
    for name in [
        "sparse.raw",
        "odd.raw",
        "empty.raw",
        "full.raw",
        "created.raw",
    ] {
        each_target(dir, &[name]);
        same(dir, &["-f", "raw", "-O", "qcow2", name]);
        let opts = format!("driver=raw,file.filename={name}");
        same(dir, &["--image-opts", "-O", "qcow2", &opts]);
    }
}

#[test]
fn required_size_holds_a_conversion() {
    // What `measure` calls required is enough for `convert` to that format and options.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qcow2(
        dir,
        "data.qcow2",
        "",
        "256M",
        &[
            "write -P 1 0 3M",
            "write -P 2 100M 1M",
            "write -P 3 255M 64k",
        ],
    );
    for opts in ["cluster_size=65536", "cluster_size=4096", "cluster_size=2M"] {
        let r = same(dir, &["-O", "qcow2", "-o", opts, "data.qcow2"]);
        let required = figure(&r.stdout, "required size");
        let out = dir.join("converted.qcow2");
        common::img_ok(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            opts,
            &dir.join("data.qcow2").display().to_string(),
            &out.display().to_string(),
        ]);
        let actual = std::fs::metadata(&out).unwrap().len();
        assert!(actual <= required, "{opts}: {actual} > {required}");
        assert!(
            required <= figure(&r.stdout, "fully allocated size"),
            "{opts}: required above fully allocated"
        );
    }
}

#[test]
fn command_line_like_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qcow2(dir, "a.qcow2", "", "64M", &["write -P 1 0 1M"]);
    let cases: &[&[&str]] = &[
        &[],
        &["--size", "2G", "a.qcow2"],
        &["a.qcow2", "b"],
        &["--object", "secret,id=sec0,data=MTIzNDU2,format=base64"],
        &["--image-opts"],
        &["-f", "qcow2"],
        &["-l", "snap1"],
        &["-o", ","],
        &["-o", "cluster_size=4k,", "--size", "1G"],
        &["-l", "snapshot.foo=bar"],
        &["--output", "foo"],
        &["--size", "-1"],
        &["--size", "abc"],
        &["--size", ""],
        &["--size", "-1M"],
        &["--size", "8E"],
        &["-s", "1G"],
        &["-q", "--size", "1G"],
        &["--quiet", "--size", "1G"],
        &["--siz", "1G"],
        &["--size", "1G", "--size", "2G"],
        &["-h"],
        &["--help"],
        &["-O", "foo", "a.qcow2"],
        &["-O", "nonsense", "nonexistent"],
        &["nonexistent"],
        &["."],
        &["-f", "foo", "a.qcow2"],
        &["--image-opts", "-f", "qcow2", "a.qcow2"],
        &["--target-format", "qcow2", "--size", "1G"],
        &["--format", "qcow2", "a.qcow2"],
        &[
            "--options",
            "cluster_size=4k",
            "-O",
            "qcow2",
            "--size",
            "1G",
        ],
        &["--force-share", "a.qcow2"],
        &["--snapshot", "x", "a.qcow2"],
        &["a.qcow2", "--output=json", "--output=human"],
        &["-O", "qcow2", "-O", "raw", "--size", "1G"],
        &["--size", "1G", "-o", "help"],
        &["--size", "1G", "-O", "qcow2", "-o", "help"],
        &["--size", "1G", "-O", "qcow2", "-o", "foo=bar"],
        &["--size", "1G", "-O", "raw", "-o", "cluster_size=4k"],
        &["--size", "1G", "-O", "raw", "-o", "preallocation=foo"],
        &["--size", "1G", "-O", "raw", "-o", "size=abc"],
        &[
            "--size",
            "1G",
            "-O",
            "raw",
            "-o",
            "nocow=on,extent_size_hint=1M",
        ],
    ];
    for args in cases {
        same(dir, args);
    }
    let qcow2_options = [
        "cluster_size=3000",
        "cluster_size=0",
        "cluster_size=abc",
        "cluster_size=1k,cluster_size=4k",
        "compat=0.9",
        "compat=v3",
        "compat=1.1",
        "refcount_bits=3",
        "refcount_bits=0",
        "refcount_bits=-1",
        "refcount_bits=abc",
        "refcount_bits=128",
        "compat=0.10,refcount_bits=8",
        "preallocation=foo",
        "lazy_refcounts=maybe",
        "lazy_refcounts=on,compat=0.10",
        "extended_l2=on,cluster_size=4k",
        "extended_l2=on,compat=0.10",
        "encrypt.format=luks",
        "encrypt.format=aes",
        "encryption=on",
        "nocow=on,compression_type=zstd",
        "compression_type=foo",
        "backing_fmt=foo",
        "data_file=x",
        "size=5",
        "size=abc",
    ];
    for o in qcow2_options {
        for output in [&[][..], &["--output=json"]] {
            let mut args: Vec<&str> = output.to_vec();
            args.extend(["--size", "1G", "-O", "qcow2", "-o", o]);
            same(dir, &args);
            let mut args: Vec<&str> = output.to_vec();
            args.extend(["-O", "qcow2", "-o", o, "a.qcow2"]);
            same(dir, &args);
        }
    }
    for target in [
        "vmdk", "vdi", "qed", "qcow", "file", "bochs", "dmg", "luks", "raw", "qcow2",
    ] {
        same(dir, &["--size", "1G", "-O", target]);
        same(dir, &["-O", target, "a.qcow2"]);
    }
}
