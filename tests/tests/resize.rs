//! `img resize` side by side with `qemu-img resize`: each case copies one source image into two
//! directories under the same name, runs `qemu-img resize` in one and `img resize` in the other
//! with the same arguments, and asserts the same stdout, stderr (with `img` for `qemu-img`) and
//! exit code, and images that qemu-img finds identical in content. Where qemu's layout is
//! deterministic the files must match too: same length, same header (sizes and table offsets),
//! same `qemu-img map` (host offsets), same allocated blocks for raw files; and qemu-img check
//! must find the image clean. Data written before a resize is read back with qemu-io.

mod common;

use common::{
    assert_qemu_check_clean, assert_qemu_compare_identical, qemu_img, qemu_io, run, run_in, Run,
};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Two working directories holding copies of the same image under the same name: one for
/// qemu-img, one for img.
struct Pair {
    _tmp: tempfile::TempDir,
    qdir: PathBuf,
    idir: PathBuf,
    name: String,
}

impl Pair {
    fn new(src: &Path, name: &str) -> Pair {
        let tmp = tempfile::tempdir().unwrap();
        let qdir = tmp.path().join("q");
        let idir = tmp.path().join("i");
        fs::create_dir(&qdir).unwrap();
        fs::create_dir(&idir).unwrap();
        copy_sparse(src, &qdir.join(name));
        copy_sparse(src, &idir.join(name));
        Pair {
            _tmp: tmp,
            qdir,
            idir,
            name: name.to_string(),
        }
    }

    /// Puts a copy of `src` named `name` next to both images (a backing file).
    fn with_file(self, src: &Path, name: &str) -> Pair {
        copy_sparse(src, &self.qdir.join(name));
        copy_sparse(src, &self.idir.join(name));
        self
    }

    fn q(&self) -> PathBuf {
        self.qdir.join(&self.name)
    }

    fn i(&self) -> PathBuf {
        self.idir.join(&self.name)
    }

    /// Runs `resize` with `args` (`@` stands for the image) in both directories and asserts
    /// the same output and exit code.
    fn resize(&self, args: &[&str]) -> Run {
        let mut full = vec!["resize"];
        full.extend(
            args.iter()
                .map(|&a| if a == "@" { self.name.as_str() } else { a }),
        );
        let q = run_in(Path::new("qemu-img"), &self.qdir, &full);
        let i = run_in(&common::img_bin(), &self.idir, &full);
        assert_eq!(i, q, "img {full:?} differs from qemu-img");
        i
    }
}

/// Copies a file keeping its holes (so that allocation comparisons start equal).
fn copy_sparse(src: &Path, dst: &Path) {
    let out = run(
        "cp",
        &[
            "--sparse=always",
            &src.display().to_string(),
            &dst.display().to_string(),
        ],
    );
    assert!(out.status.success(), "cp failed");
}

fn info_json(path: &Path, fmt: &str) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        "-f",
        fmt,
        &path.display().to_string(),
    ]))
    .unwrap()
}

/// The data ranges of a file (`SEEK_DATA`/`SEEK_HOLE`): which parts hold blocks.
fn data_ranges(path: &Path) -> Vec<(u64, u64)> {
    use std::os::unix::io::AsRawFd;
    let f = fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut pos = 0i64;
    while pos < len {
        // SAFETY: lseek on a descriptor `f` keeps open; it has no memory arguments.
        let data = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    out
}

/// Where `qemu-img map` says the guest ranges are in the file, without the flags that depend
/// on what the file holds (extents that continue each other are merged).
fn map_offsets(path: &Path) -> Vec<(u64, u64, Option<u64>)> {
    let v: serde_json::Value = serde_json::from_str(&map_json(path)).unwrap();
    let mut out: Vec<(u64, u64, Option<u64>)> = Vec::new();
    for e in v.as_array().unwrap() {
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let offset = e["offset"].as_u64();
        if let Some(last) = out.last_mut() {
            let continues = match (last.2, offset) {
                (Some(a), Some(b)) => a + last.1 == b,
                (None, None) => true,
                _ => false,
            };
            if continues && last.0 + last.1 == start {
                last.1 += len;
                continue;
            }
        }
        out.push((start, len, offset));
    }
    out
}

fn map_json(path: &Path) -> String {
    qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qcow2",
        &path.display().to_string(),
    ])
}

/// The qcow2 header fields that describe the layout: size, L1 table, refcount table,
/// snapshots, features.
fn header(path: &Path) -> Vec<u8> {
    let mut h = fs::read(path).unwrap();
    h.truncate(104);
    h
}

/// What must match after qemu-img and img resized copies of a qcow2 image.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Content, check, file length, header, map, and which parts of the file hold blocks.
    Layout,
    /// As `Layout`, except which parts of the file hold blocks: qemu's shrink allocates and
    /// frees empty L2 tables for ranges without one, leaving blocks behind that img does not.
    LayoutNotBlocks,
    /// File length, header and a clean check (the content may legitimately differ).
    Consistent,
}

fn assert_qcow2_results(p: &Pair, what: &str, expect: Expect) {
    let (q, i) = (p.q(), p.i());
    if expect != Expect::Consistent {
        assert_qemu_compare_identical(&q, "qcow2", &i, "qcow2");
    }
    assert_qemu_check_clean(&i);
    assert_eq!(
        fs::metadata(&i).unwrap().len(),
        fs::metadata(&q).unwrap().len(),
        "{what}: file length"
    );
    assert_eq!(header(&i), header(&q), "{what}: header");
    if expect == Expect::Consistent {
        assert_eq!(map_offsets(&i), map_offsets(&q), "{what}: map offsets");
    } else {
        assert_eq!(map_json(&i), map_json(&q), "{what}: map");
    }
    if expect == Expect::Layout {
        assert_eq!(data_ranges(&i), data_ranges(&q), "{what}: data ranges");
    }
}

/// Source images, made by qemu-img and qemu-io.
struct Sources {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Sources {
    fn new() -> Sources {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        Sources { _tmp: tmp, dir }
    }

    /// A qcow2 image made with `opts` and `size`, then written with qemu-io `cmds`.
    fn qcow2(&self, name: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
        let p = self.dir.join(name);
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
}

const GROWS: &[&str] = &["+512", "+100k", "+5M", "+70M"];
const SHRINKS: &[&str] = &["70144", "1M", "9M"];
const PREALLOC: &[&str] = &["off", "metadata", "falloc", "full"];

/// How a source image is resized in [`grow_and_shrink_like_qemu`].
#[derive(Clone, Copy, Default)]
struct Variant {
    /// Leave out metadata preallocation (see `metadata_preallocation_never_exposes_old_bytes`).
    skip_metadata: bool,
    /// What grows must match.
    grow: Option<Expect>,
    /// What shrinks must match.
    shrink: Option<Expect>,
}

/// Every grow (in every preallocation mode) and shrink of `src`, compared with qemu-img.
fn grow_and_shrink_like_qemu(src: &Path, v: Variant) {
    let skip_metadata = v.skip_metadata;
    for size in GROWS {
        for mode in PREALLOC {
            if skip_metadata && *mode == "metadata" {
                continue;
            }
            let p = Pair::new(src, "disk.qcow2");
            let arg = format!("--preallocation={mode}");
            let what = format!("{} {arg} {size}", src.display());
            let r = p.resize(&[&arg, "@", size]);
            assert_eq!(r.code, Some(0), "{what}: {}", r.stderr);
            assert_eq!(r.stdout, "Image resized.\n");
            assert_qcow2_results(&p, &what, v.grow.unwrap_or(Expect::Layout));
        }
    }
    for size in SHRINKS {
        let p = Pair::new(src, "disk.qcow2");
        let what = format!("{} --shrink {size}", src.display());
        p.resize(&["--shrink", "@", size]);
        assert_qcow2_results(&p, &what, v.shrink.unwrap_or(Expect::Layout));
    }
}

#[test]
fn qcow2_default_clusters_like_qemu() {
    let s = Sources::new();
    let data = s.qcow2(
        "data.qcow2",
        "",
        "1G",
        &[
            "write -P 1 0 1M",
            "write -P 2 700M 3M",
            "write -P 3 1023M 1M",
        ],
    );
    grow_and_shrink_like_qemu(&data, Variant::default());
    let empty = s.qcow2("empty.qcow2", "", "0", &[]);
    grow_and_shrink_like_qemu(&empty, Variant::default());
    // A size that is not a whole number of clusters, full of data: the cluster at the old end
    // is shared between the old disk and the new range.
    let odd = s.qcow2("odd.qcow2", "", "100352", &["write -P 7 0 100352"]);
    grow_and_shrink_like_qemu(&odd, Variant::default());
}

#[test]
fn qcow2_other_layouts_like_qemu() {
    let s = Sources::new();
    let big = s.qcow2(
        "c2m.qcow2",
        "cluster_size=2M,refcount_bits=1",
        "100M",
        &["write -P 7 5M 3M"],
    );
    grow_and_shrink_like_qemu(&big, Variant::default());
    let r64 = s.qcow2(
        "r64.qcow2",
        "refcount_bits=64,cluster_size=4k",
        "64M",
        &["write -P 9 50M 3M"],
    );
    grow_and_shrink_like_qemu(&r64, Variant::default());
    let v2 = s.qcow2(
        "v2.qcow2",
        "compat=0.10",
        "100M",
        &["write -P 9 50M 3M", "write -z 10M 1M"],
    );
    grow_and_shrink_like_qemu(&v2, Variant::default());
    let lazy = s.qcow2(
        "lazy.qcow2",
        "lazy_refcounts=on",
        "64M",
        &["write -P 1 0 10M"],
    );
    // Closing marks a lazy-refcounts image clean; qemu then rewrites its whole header
    // cluster, img only the feature bits, so the file blocks differ in that cluster.
    grow_and_shrink_like_qemu(
        &lazy,
        Variant {
            grow: Some(Expect::LayoutNotBlocks),
            ..Variant::default()
        },
    );
}

#[test]
fn qcow2_small_clusters_zero_and_compressed_like_qemu() {
    let s = Sources::new();
    // Preallocating metadata here hands out clusters freed when the L1 table moved, which qemu
    // links without clearing (its guest then reads the old table); see
    // `metadata_preallocation_never_exposes_old_bytes`.
    let c512 = s.qcow2(
        "c512.qcow2",
        "cluster_size=512",
        "10M",
        &["write -P 7 1M 3M"],
    );
    grow_and_shrink_like_qemu(
        &c512,
        Variant {
            skip_metadata: true,
            shrink: Some(Expect::LayoutNotBlocks),
            ..Variant::default()
        },
    );
    let zeros = s.qcow2(
        "zero.qcow2",
        "",
        "64M",
        &["write -P 1 0 16M", "write -z 1M 4M", "write -z -u 8M 4M"],
    );
    grow_and_shrink_like_qemu(&zeros, Variant::default());
    let compressed = s.dir.join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        &zeros.display().to_string(),
        &compressed.display().to_string(),
    ]);
    grow_and_shrink_like_qemu(&compressed, Variant::default());
}

#[test]
fn qcow2_with_internal_snapshots_like_qemu() {
    let s = Sources::new();
    let v3 = s.qcow2(
        "snap.qcow2",
        "",
        "1G",
        &["write -P 1 0 1M", "write -P 2 900M 1M"],
    );
    qemu_img(&["snapshot", "-c", "first", &v3.display().to_string()]);
    qemu_io("qcow2", &v3, &["write -P 3 512k 1M".to_string()]);
    grow_and_shrink_like_qemu(&v3, Variant::default());
    // The snapshot's own disk is untouched by a shrink of the active one: applied again, it
    // has its size and its data.
    let p = Pair::new(&v3, "disk.qcow2");
    p.resize(&["--shrink", "@", "1M"]);
    for path in [p.q(), p.i()] {
        qemu_img(&["snapshot", "-a", "first", &path.display().to_string()]);
        assert_eq!(info_json(&path, "qcow2")["virtual-size"], 1u64 << 30);
        qemu_io(
            "qcow2",
            &path,
            &[
                "read -P 1 0 1M".to_string(),
                "read -P 2 900M 1M".to_string(),
            ],
        );
        assert_qemu_check_clean(&path);
    }
    // Version 2 images with snapshots are refused, as qemu refuses them.
    let v2 = s.qcow2("snap2.qcow2", "compat=0.10", "1G", &["write -P 1 0 1M"]);
    qemu_img(&["snapshot", "-c", "first", &v2.display().to_string()]);
    for args in [&["@", "2G"][..], &["--shrink", "@", "512M"][..]] {
        let p = Pair::new(&v2, "disk.qcow2");
        let r = p.resize(args);
        assert_eq!(r.code, Some(1));
        assert_eq!(
            r.stderr,
            "img: Can't resize a v2 image which has snapshots\n"
        );
        assert_eq!(fs::read(p.i()).unwrap(), fs::read(&v2).unwrap());
    }
}

/// A chain of resizes applied to both copies, compared after every step.
fn sequence_like_qemu(src: &Path, steps: &[&[&str]], expect: Expect) {
    let p = Pair::new(src, "disk.qcow2");
    for (n, step) in steps.iter().enumerate() {
        let r = p.resize(step);
        assert_eq!(r.code, Some(0), "step {n} {step:?}: {}", r.stderr);
        let what = format!("{} after step {n} {step:?}", src.display());
        assert_qcow2_results(&p, &what, expect);
    }
}

#[test]
fn overlays_like_qemu() {
    // Growing an image whose backing file is longer than it makes the new range read as
    // zeros, not as the backing file's data (whole clusters get the zero flag, the rest of
    // the cluster at the old end is written); version 2 cannot mark zeros, and fails as qemu
    // fails. The cluster at the old end is copied up from the backing file when preallocation
    // replaces it.
    let s = Sources::new();
    let base = s.qcow2("base.qcow2", "", "10M", &["write -P 0x11 0 10M"]);
    let raw_base = s.dir.join("base.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        &base.display().to_string(),
        &raw_base.display().to_string(),
    ]);
    for (name, opts, backing, fmt) in [
        ("ov.qcow2", "", "base.qcow2", "qcow2"),
        ("ov2.qcow2", "compat=0.10", "base.qcow2", "qcow2"),
        ("ovr.qcow2", "", "base.raw", "raw"),
    ] {
        let p = s.dir.join(name);
        let o = if opts.is_empty() {
            format!("backing_file={backing},backing_fmt={fmt}")
        } else {
            format!("{opts},backing_file={backing},backing_fmt={fmt}")
        };
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &o,
            &p.display().to_string(),
            "3000k",
        ]);
        qemu_io("qcow2", &p, &["write -P 0x22 1M 64k".to_string()]);
        let base_file = if fmt == "raw" { &raw_base } else { &base };
        for args in [
            &["@", "+1M"][..],
            &["@", "+8k"],
            &["@", "20M"],
            &["--preallocation=metadata", "@", "+2M"],
            &["--preallocation=falloc", "@", "+2M"],
            &["--preallocation=full", "@", "20M"],
            &["--shrink", "@", "1M"],
        ] {
            let p = Pair::new(&p, "disk.qcow2").with_file(base_file, backing);
            let r = p.resize(args);
            let what = format!("{name} {args:?}");
            assert_qcow2_results(&p, &what, Expect::Layout);
            if r.code == Some(0) && args[args.len() - 1] != "1M" {
                // Old data (the overlay's and the backing file's) stays; the new range is zeros.
                qemu_io(
                    "qcow2",
                    &p.i(),
                    &[
                        "read -P 0x11 0 1M".to_string(),
                        "read -P 0x22 1M 64k".to_string(),
                        "read -P 0x11 1088k 1912k".to_string(),
                        "read -P 0 3000k 8k".to_string(),
                    ],
                );
            }
        }
    }
}

#[test]
fn sequences_like_qemu() {
    let s = Sources::new();
    let data = s.qcow2(
        "data.qcow2",
        "",
        "1G",
        &["write -P 1 0 1M", "write -P 2 700M 3M"],
    );
    sequence_like_qemu(
        &data,
        &[
            &["--shrink", "@", "100M"],
            &["--preallocation=metadata", "@", "1G"],
            &["--shrink", "@", "700M"],
            &["--preallocation=full", "@", "+1G"],
            &["--shrink", "@", "4M"],
            &["@", "5T"],
        ],
        Expect::Layout,
    );
    let c512 = s.qcow2(
        "c512.qcow2",
        "cluster_size=512",
        "10M",
        &["write -P 7 1M 3M"],
    );
    // The refcount structures grow past one table cluster here; the refcount area built by
    // a full preallocation replaces the table.
    sequence_like_qemu(
        &c512,
        &[
            &["--preallocation=full", "@", "+3M"],
            &["--shrink", "@", "1M"],
            &["@", "+5M"],
            &["--preallocation=falloc", "@", "+1M"],
            &["--shrink", "@", "10M"],
        ],
        Expect::LayoutNotBlocks,
    );
    let odd = s.qcow2("odd.qcow2", "", "100352", &["write -P 7 0 100352"]);
    // Here the metadata preallocation hands out a cluster the shrink freed; qemu leaves the
    // old data in it for its guest to read, img clears it. Only the layout is compared, and
    // img's image must read as the resizes say.
    sequence_like_qemu(
        &odd,
        &[
            &["--preallocation=full", "@", "+512"],
            &["--shrink", "@", "512"],
            &["--preallocation=metadata", "@", "+1M"],
            &["--shrink", "@", "99840"],
        ],
        Expect::Consistent,
    );
    let p = Pair::new(&odd, "disk.qcow2");
    for step in [
        &["--preallocation=full", "@", "+512"][..],
        &["--shrink", "@", "512"],
        &["--preallocation=metadata", "@", "+1M"],
    ] {
        p.resize(step);
    }
    // The cluster at the old end keeps its tail when shrunk (qemu's too), so growing shows it
    // again; the cluster handed out after it reads as zeros.
    qemu_io(
        "qcow2",
        &p.i(),
        &[
            "read -P 7 0 64k".to_string(),
            "read -P 0 64k 960k".to_string(),
            "read -P 0 1M 512".to_string(),
        ],
    );
}

#[test]
fn shrink_into_a_table_that_is_not_there() {
    // qemu's discard of the part of the last kept L2 table allocates that table when the
    // image has none (an empty one stays in the file); the layouts must still match.
    let s = Sources::new();
    for (opts, size, new) in [("", "2G", "1280M"), ("cluster_size=4k", "64M", "3000k")] {
        let src = s.qcow2("sparse.qcow2", opts, size, &["write -P 1 0 4k"]);
        let p = Pair::new(&src, "disk.qcow2");
        p.resize(&["--shrink", "@", new]);
        assert_qcow2_results(&p, &format!("{opts} {size} -> {new}"), Expect::Layout);
        assert!(fs::metadata(p.i()).unwrap().len() > fs::metadata(&src).unwrap().len());
    }
}

#[test]
fn metadata_preallocation_never_exposes_old_bytes() {
    // Growing moves the L1 table and frees its old cluster; metadata preallocation then hands
    // that cluster out as data. qemu links it as it is, so its guest reads the old L1 table;
    // img clears what is not zero. The layout is qemu's either way.
    let s = Sources::new();
    let c512 = s.qcow2(
        "c512.qcow2",
        "cluster_size=512",
        "10M",
        &["write -P 7 1M 3M"],
    );
    let p = Pair::new(&c512, "disk.qcow2");
    p.resize(&["--preallocation=metadata", "@", "+512"]);
    assert_qemu_check_clean(&p.i());
    assert_eq!(header(&p.i()), header(&p.q()));
    let offsets = |path: &Path| -> Vec<(u64, u64)> {
        let v: serde_json::Value = serde_json::from_str(&map_json(path)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["offset"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    assert_eq!(offsets(&p.i()), offsets(&p.q()));
    qemu_io(
        "qcow2",
        &p.i(),
        &[
            "read -P 7 1M 3M".to_string(),
            "read -P 0 10M 512".to_string(),
        ],
    );
}

#[test]
fn data_survives_and_new_space_reads_zeros() {
    let s = Sources::new();
    let src = s.qcow2(
        "data.qcow2",
        "",
        "3M",
        &[
            "write -P 0x11 0 64k",
            "write -P 0x22 1M 100k",
            "write -P 0x33 3000k 72k",
        ],
    );
    for mode in PREALLOC {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        copy_sparse(&src, &p);
        common::img_ok(&[
            "resize",
            &format!("--preallocation={mode}"),
            &p.display().to_string(),
            "+5M",
        ]);
        qemu_io(
            "qcow2",
            &p,
            &[
                "read -P 0x11 0 64k".to_string(),
                "read -P 0x22 1M 100k".to_string(),
                "read -P 0x33 3000k 72k".to_string(),
                "read -P 0 3M 5M".to_string(),
            ],
        );
        assert_qemu_check_clean(&p);
        // Written again by qemu after img resized it, and read back through img.
        qemu_io("qcow2", &p, &["write -P 0x44 7M 1M".to_string()]);
        let raw = dir.path().join("d.raw");
        common::img_ok(&[
            "convert",
            "-O",
            "raw",
            &p.display().to_string(),
            &raw.display().to_string(),
        ]);
        let bytes = fs::read(&raw).unwrap();
        assert_eq!(bytes.len(), 8 << 20);
        assert!(bytes[7 << 20..].iter().all(|&b| b == 0x44), "{mode}");
        assert!(bytes[3 << 20..7 << 20].iter().all(|&b| b == 0), "{mode}");
        // Shrinking keeps the data before the new end, and qemu reads it.
        common::img_ok(&["resize", "--shrink", &p.display().to_string(), "1050k"]);
        qemu_io(
            "qcow2",
            &p,
            &[
                "read -P 0x11 0 64k".to_string(),
                "read -P 0x22 1M 26k".to_string(),
            ],
        );
        assert_qemu_check_clean(&p);
        assert_eq!(info_json(&p, "qcow2")["virtual-size"], 1050 * 1024);
    }
}

#[test]
fn shrink_cuts_the_file_and_drops_refcount_blocks() {
    // 4 KiB clusters with 64-bit refcounts: one refcount block covers 2 MiB of file, so
    // shrinking a 40 MiB disk leaves blocks that count nothing, which are dropped before the
    // file is cut.
    let s = Sources::new();
    let src = s.qcow2(
        "r.qcow2",
        "cluster_size=4k,refcount_bits=64",
        "64M",
        &["write -P 3 0 40M"],
    );
    let p = Pair::new(&src, "disk.qcow2");
    p.resize(&["--shrink", "@", "1M"]);
    assert_qcow2_results(&p, "shrink to 1M", Expect::Layout);
    let before = fs::metadata(&src).unwrap().len();
    let after = fs::metadata(p.i()).unwrap().len();
    assert!(after < before / 10, "file not cut: {before} -> {after}");
    qemu_io("qcow2", &p.i(), &["read -P 3 0 1M".to_string()]);
}

/// A raw file of `len` bytes: data at its start and in its middle, a hole elsewhere.
fn raw_source(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    let f = fs::File::create(&p).unwrap();
    f.set_len(len).unwrap();
    use std::os::unix::fs::FileExt;
    if len > 0 {
        f.write_all_at(&vec![0xa5; len.min(1000) as usize], 0)
            .unwrap();
        f.write_all_at(&[0x5a; 512], len / 2).unwrap();
    }
    p
}

#[test]
fn raw_like_qemu() {
    let s = Sources::new();
    let sources = [
        raw_source(&s.dir, "plain.raw", 1 << 20),
        raw_source(&s.dir, "odd.raw", 1000),
        raw_source(&s.dir, "empty.raw", 0),
    ];
    let sizes = ["+0", "+1", "+511", "100", "1000", "+1M", "2M"];
    for src in &sources {
        for fmt in [&[][..], &["-f", "raw"][..]] {
            for mode in ["", "--preallocation=off", "--preallocation=metadata"]
                .iter()
                .chain(&["--preallocation=falloc", "--preallocation=full"])
            {
                for size in sizes.iter().chain(&["--shrink"]) {
                    let p = Pair::new(src, "disk.img");
                    let mut args: Vec<&str> = fmt.to_vec();
                    if !mode.is_empty() {
                        args.push(mode);
                    }
                    let size = if *size == "--shrink" {
                        args.push("--shrink");
                        "512"
                    } else {
                        size
                    };
                    args.extend(["@", size]);
                    p.resize(&args);
                    let what = format!("{} {args:?}", src.display());
                    let (q, i) = (fs::metadata(p.q()).unwrap(), fs::metadata(p.i()).unwrap());
                    assert_eq!(i.len(), q.len(), "{what}: length");
                    assert_eq!(i.blocks(), q.blocks(), "{what}: allocated blocks");
                    assert_eq!(fs::read(p.i()).unwrap(), fs::read(p.q()).unwrap(), "{what}");
                }
            }
        }
    }
}

#[test]
fn command_line_like_qemu() {
    let s = Sources::new();
    let qcow2 = s.qcow2("a.qcow2", "", "1G", &["write -P 1 0 1M"]);
    let raw = raw_source(&s.dir, "r.img", 1 << 20);
    let cases: &[&[&str]] = &[
        &[],
        &["@"],
        &["1G"],
        &["-f"],
        &["-q", "1G"],
        &["@", "b.qcow2", "1G"],
        &["@", "1G", "--", "x"],
        &["@", "--", "5M", "--shrink"],
        &["--", "@", "-1G"],
        &["-x", "@", "1G"],
        &["--foo", "@", "1G"],
        &["-U", "@", "1G"],
        &["-h"],
        &["--help"],
        &["@", "0"],
        &["@", "-1G"],
        &["--shrink", "@", "-1G"],
        &["@", "--", "-2G"],
        &["@", "abc"],
        &["@", "+abc"],
        &["@", "+-1M"],
        &["@", "1.5"],
        &["@", "8E"],
        &["@", "+8E"],
        &["@", "16E"],
        &["@", "--", "-16E"],
        &["@", "--", "+9223372036854775807"],
        &["@", "9223372035781033984"],
        &["@", "5P"],
        &["--preallocation=foo", "@", "2G"],
        &["--preallocation", "@", "1G"],
        &["--preallocation=full", "@", "+0"],
        &["--shrink", "--preallocation=full", "@", "512M"],
        &["@", "512M"],
        &["@", "+1000"],
        &["@", "1G"],
        &["-q", "@", "+1G"],
        &["@", "-q", "+1M"],
        &["--quiet", "@", "+1M"],
        &["--format", "qcow2", "@", "+1M"],
        &["--shr", "@", "1G"],
        &["--image-opts", "-f", "qcow2", "@", "1G"],
        &[
            "--image-opts",
            "driver=qcow2,file.filename=disk,read-only=on",
            "2G",
        ],
        &["--image-opts", "driver=qcow2,file.filename=disk", "+1M"],
        &["--object", "secret,id=s0,data=x", "@", "+1M"],
        &["nonexistent", "1G"],
        &["-f", "foo", "@", "+1G"],
        &[".", "1G"],
    ];
    for args in cases {
        let p = Pair::new(&qcow2, "disk");
        p.resize(args);
    }
    let raw_cases: &[&[&str]] = &[
        &["@", "512k"],
        &["@", "2M"],
        &["-q", "@", "+1M"],
        &["-f", "qcow2", "@", "+1G"],
        &["-f", "raw", "@", "9223372036854775807"],
        &["-f", "raw", "@", "9223372035781033984"],
        &["-f", "raw", "@", "9223372035781033985"],
        &["--image-opts", "file.filename=disk", "2M"],
        &["--image-opts", "driver=raw,file.filename=disk", "2M"],
        &["--image-opts", "driver=file,filename=disk", "2M"],
    ];
    for args in raw_cases {
        let p = Pair::new(&raw, "disk");
        p.resize(args);
        assert_eq!(
            fs::read(p.i()).unwrap(),
            fs::read(p.q()).unwrap(),
            "{args:?}"
        );
    }
}

#[test]
fn refused_shrink_leaves_the_image_alone() {
    let s = Sources::new();
    let src = s.qcow2("a.qcow2", "", "1G", &["write -P 1 0 1M"]);
    let p = Pair::new(&src, "disk.qcow2");
    let r = p.resize(&["@", "512M"]);
    assert_eq!(r.code, Some(1));
    assert_eq!(
        r.stderr,
        "img: Use the --shrink option to perform a shrink operation.\n\
         img: warning: Shrinking an image will delete all data beyond the shrunken image's end. \
         Before performing such an operation, make sure there is no important data there.\n"
    );
    assert_eq!(fs::read(p.i()).unwrap(), fs::read(&src).unwrap());
}

#[test]
fn persistent_bitmaps_are_refused_and_kept() {
    let s = Sources::new();
    let src = s.qcow2("bm.qcow2", "", "100M", &["write -P 1 1M 3M"]);
    qemu_img(&["bitmap", "--add", &src.display().to_string(), "b0"]);
    let before = fs::read(&src).unwrap();
    let out = common::img(&["resize", &src.display().to_string(), "+1M"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("persistent dirty bitmaps"));
    assert_eq!(fs::read(&src).unwrap(), before, "the image was modified");
    let info = info_json(&src, "qcow2");
    assert_eq!(
        info["format-specific"]["data"]["bitmaps"][0]["name"], "b0",
        "{info}"
    );
}

// ---------------------------------------------------------------------------------------------
// Crash consistency
// ---------------------------------------------------------------------------------------------

mod crash {
    use super::common::pattern;
    use super::common::recording::{crash_image, epochs, LogOp, RecordingStorage};
    use blockdev::Storage;
    use img_core::open::open_storage;
    use img_core::qcow2::{create::create_on, Qcow2CreateOptions};
    use img_core::raw::Preallocation;
    use img_core::OpenOptions;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;

    /// Opens a crash image in qemu-img check (no corruption allowed, leaks are) and in img;
    /// returns its virtual size and the first `len` guest bytes.
    fn inspect(bytes: &[u8], len: u64, what: &str) -> (u64, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crash.qcow2");
        std::fs::write(&p, bytes).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", "--output=json", "-f", "qcow2", p.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{what}: qemu-img check: {text}"));
        assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{what}: {text}");
        assert_eq!(v["check-errors"].as_u64().unwrap_or(0), 0, "{what}: {text}");
        let storage: Arc<dyn Storage> =
            Arc::new(blockdev::FileStorage::open_read_only(&p).unwrap());
        let opts = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let img = open_storage(storage, &opts)
            .unwrap_or_else(|e| panic!("{what}: img cannot open the crash image: {e}"));
        let size = img.size();
        let mut buf = vec![0u8; len.min(size) as usize];
        img.read_at(&mut buf, 0)
            .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
        (size, buf)
    }

    /// Writes data into a new image, then resizes it to `new` with `prealloc`; every state a
    /// crash during the resize can leave must be consistent, have the old or the new size, and
    /// keep the data both sizes share (and read zeros past the old end when it grew).
    fn resize_crashes(cluster_size: u64, old: u64, new: u64, prealloc: Preallocation) {
        let storage = Arc::new(RecordingStorage::default());
        create_on(
            storage.clone(),
            &Qcow2CreateOptions {
                size: old,
                cluster_size,
                ..Default::default()
            },
        )
        .unwrap();
        let mut img = open_storage(storage.clone(), &OpenOptions::default()).unwrap();
        let mut model = vec![0u8; old as usize];
        let mut rng = StdRng::seed_from_u64(cluster_size ^ new);
        for _ in 0..12 {
            let off = rng.random_range(0..old - 1);
            let len = rng.random_range(1..(old - off).min(3 * cluster_size));
            let data = pattern(rng.random(), off, len as usize);
            img.write_at(&data, off).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        img.flush().unwrap();
        let start = epochs(&storage.log());
        img.resize(new, prealloc).unwrap();
        img.close().unwrap();
        let log: Vec<LogOp> = storage.log();
        let end = epochs(&log);
        let shared = old.min(new);
        let mut rng = StdRng::seed_from_u64(9);
        // Every epoch when there are few, an even spread of them otherwise.
        let step = ((end - start) / 24).max(1);
        for e in (start..=end).step_by(step).chain([end]) {
            // Nothing of the epoch, all of it, and random subsets of its sectors.
            for mode in 0..8 {
                let what = format!(
                    "cluster {cluster_size}, {old} -> {new} {prealloc:?}, epoch {e}/{end}, mode {mode}"
                );
                let bytes = crash_image(&log, e, &mut || match mode {
                    0 => false,
                    1 => true,
                    _ => rng.random_bool(0.5),
                });
                let (size, data) = inspect(&bytes, new.max(old), &what);
                assert!(size == old || size == new, "{what}: size {size}");
                assert!(
                    data[..shared as usize] == model[..shared as usize],
                    "{what}: data before the end changed"
                );
                if size == new && new > old {
                    assert!(
                        data[old as usize..].iter().all(|&b| b == 0),
                        "{what}: the new range does not read as zeros"
                    );
                }
            }
        }
        assert!(end > start + 1, "the resize flushed nothing");
    }

    #[test]
    fn grows_are_crash_safe() {
        for prealloc in [
            Preallocation::Off,
            Preallocation::Metadata,
            Preallocation::Falloc,
            Preallocation::Full,
        ] {
            // From an old end inside a cluster.
            resize_crashes(65536, (1 << 20) + 512, 3 << 20, prealloc);
            // Past the L1 table's reach: a new table.
            resize_crashes(4096, (2 << 20) + 512, (8 << 20) + 512, prealloc);
            // Small clusters: new refcount blocks and a new refcount table on the way.
            resize_crashes(512, 1 << 20, (3 << 20) + 512, prealloc);
        }
    }

    #[test]
    fn shrinks_are_crash_safe() {
        resize_crashes(65536, 8 << 20, (1 << 20) + 512, Preallocation::Off);
        resize_crashes(512, 8 << 20, 100 << 10, Preallocation::Off);
        resize_crashes(4096, 8 << 20, 5000 << 10, Preallocation::Off);
    }
}

/// Opens `path` in qemu-io (read-write), which holds qemu's locks on it until dropped.
struct QemuIoHolder(std::process::Child);

impl QemuIoHolder {
    fn new(path: &Path) -> QemuIoHolder {
        use std::io::{BufRead, Write};
        let mut child = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(path)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot run qemu-io");
        // Ready once it has answered a read: the image is open and locked.
        writeln!(child.stdin.as_mut().unwrap(), "read 0 512").unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("read 512/512 bytes at offset 0") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "qemu-io did not open"
            );
        }
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        QemuIoHolder(child)
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[test]
fn locked_images_like_qemu() {
    // While qemu-io has the image open for writing, resize cannot take the write lock and
    // measure cannot share it, unless told to (-U), in the words qemu-img uses.
    let s = Sources::new();
    let src = s.qcow2("a.qcow2", "", "64M", &["write -P 1 0 1M"]);
    let p = Pair::new(&src, "disk.qcow2");
    let _q = QemuIoHolder::new(&p.q());
    let _i = QemuIoHolder::new(&p.i());
    let r = p.resize(&["@", "+1M"]);
    assert!(
        r.stderr.contains("Failed to get \"write\" lock"),
        "{}",
        r.stderr
    );
    for args in [
        &["measure", "@"][..],
        &["measure", "-U", "-O", "qcow2", "@"],
        &["measure", "--force-share", "--output=json", "@"],
    ] {
        let full: Vec<&str> = args
            .iter()
            .map(|&a| if a == "@" { "disk.qcow2" } else { a })
            .collect();
        let q = run_in(Path::new("qemu-img"), &p.qdir, &full);
        let i = run_in(&common::img_bin(), &p.idir, &full);
        assert_eq!(i, q, "{full:?}");
    }
    assert_eq!(fs::read(p.i()).unwrap(), fs::read(&src).unwrap());
}
