//! `img check` against `qemu-img check`: clean images of many shapes must give byte-identical
//! output; deliberately corrupted images must give the same exit code, counters and messages,
//! and `img check -r` must leave images that qemu-img calls clean, with the guest data that was
//! not corrupted intact.

mod common;

use common::{assert_qemu_check_clean, assert_qemu_compare_identical, img, qemu_img, qemu_io, run};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;

const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;

/// The parts of a qcow2 image's layout the tests corrupt, parsed from the file.
struct Layout {
    path: PathBuf,
    cluster_bits: u32,
    refcount_order: u32,
    l1_offset: u64,
    l1_size: u32,
    reftable_offset: u64,
}

impl Layout {
    fn read(path: &Path) -> Layout {
        let b = fs::read(path).unwrap();
        let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
        let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
        Layout {
            path: path.to_path_buf(),
            cluster_bits: be32(20),
            refcount_order: if be32(4) >= 3 { be32(96) } else { 4 },
            l1_offset: be64(40),
            l1_size: be32(36),
            reftable_offset: be64(48),
        }
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    fn file_len(&self) -> u64 {
        fs::metadata(&self.path).unwrap().len()
    }

    fn read64(&self, off: u64) -> u64 {
        let b = fs::read(&self.path).unwrap();
        let mut v = [0u8; 8];
        let end = (off as usize + 8).min(b.len());
        if (off as usize) < end {
            v[..end - off as usize].copy_from_slice(&b[off as usize..end]);
        }
        u64::from_be_bytes(v)
    }

    fn write_bytes(&self, off: u64, data: &[u8]) {
        let mut b = fs::read(&self.path).unwrap();
        let end = off as usize + data.len();
        if b.len() < end {
            b.resize(end, 0);
        }
        b[off as usize..end].copy_from_slice(data);
        fs::write(&self.path, b).unwrap();
    }

    fn write64(&self, off: u64, v: u64) {
        self.write_bytes(off, &v.to_be_bytes());
    }

    fn l1_entry(&self, i: u32) -> u64 {
        self.read64(self.l1_offset + i as u64 * 8)
    }

    fn set_l1_entry(&self, i: u32, v: u64) {
        self.write64(self.l1_offset + i as u64 * 8, v);
    }

    /// (L1 index, L2 table offset) of every allocated L2 table.
    fn l2_tables(&self) -> Vec<(u32, u64)> {
        (0..self.l1_size)
            .map(|i| (i, self.l1_entry(i) & OFFSET_MASK))
            .filter(|&(_, o)| o != 0)
            .collect()
    }

    /// (entry offset in the file, entry) of every standard L2 entry with a data cluster.
    fn data_entries(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (_, l2) in self.l2_tables() {
            for j in 0..self.cs() / 8 {
                let at = l2 + j * 8;
                let e = self.read64(at);
                if e & (1 << 62) == 0 && e & OFFSET_MASK != 0 {
                    out.push((at, e));
                }
            }
        }
        out
    }

    fn refblock(&self, index: u64) -> u64 {
        self.read64(self.reftable_offset + index * 8)
    }

    /// Where the refcount of `cluster` lives: (byte offset, bit shift, width in bits).
    fn refcount_slot(&self, cluster: u64) -> (u64, u32, u32) {
        let bits = 1u32 << self.refcount_order;
        let per_block = self.cs() * 8 / bits as u64;
        let block = self.refblock(cluster / per_block);
        assert_ne!(block, 0, "no refcount block for cluster {cluster}");
        let bit = (cluster % per_block) * bits as u64;
        (block + bit / 8, (bit % 8) as u32, bits)
    }

    fn refcount(&self, cluster: u64) -> u64 {
        let (at, shift, bits) = self.refcount_slot(cluster);
        let b = fs::read(&self.path).unwrap();
        if bits >= 8 {
            let n = bits as usize / 8;
            b[at as usize..at as usize + n]
                .iter()
                .fold(0u64, |acc, &x| (acc << 8) | x as u64)
        } else {
            ((b[at as usize] >> shift) & ((1u8 << bits) - 1)) as u64
        }
    }

    fn set_refcount(&self, cluster: u64, v: u64) {
        let (at, shift, bits) = self.refcount_slot(cluster);
        if bits >= 8 {
            let n = bits as usize / 8;
            self.write_bytes(at, &v.to_be_bytes()[8 - n..]);
        } else {
            let b = fs::read(&self.path).unwrap();
            let mask = ((1u8 << bits) - 1) << shift;
            let byte = (b[at as usize] & !mask) | (((v as u8) << shift) & mask);
            self.write_bytes(at, &[byte]);
        }
    }
}

/// A qcow2 image made with qemu-img and written with qemu-io.
fn make_image(dir: &Path, name: &str, opts: &str, size: &str, writes: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    let ps = p.display().to_string();
    args.extend([ps.as_str(), size]);
    qemu_img(&args);
    let cmds: Vec<String> = writes.iter().map(|s| s.to_string()).collect();
    if !cmds.is_empty() {
        qemu_io("qcow2", &p, &cmds);
    }
    p
}

/// The default test image: 2 GiB, 64 KiB clusters, data in two L2 tables.
fn base_image(dir: &Path) -> PathBuf {
    make_image(
        dir,
        "base.qcow2",
        "",
        "2G",
        &[
            "write -P 1 0 200k",
            "write -P 2 10M 64k",
            "write -P 3 1G 64k",
        ],
    )
}

fn copy(src: &Path, dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    fs::copy(src, &p).unwrap();
    p
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// What one check printed, with the image name and program name normalised.
#[derive(Debug, PartialEq)]
struct Seen {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn seen(out: Output, image: &Path) -> Seen {
    let name = image.display().to_string();
    Seen {
        code: out.status.code(),
        stdout: text(&out.stdout).replace(&name, "IMAGE"),
        // Messages name the program (prefix, hints): ours is `img`.
        stderr: text(&out.stderr)
            .replace(&name, "IMAGE")
            .replace("qemu-img", "img"),
    }
}

/// Runs `qemu-img check` and `img check` with `args` on two copies of `image` and asserts
/// they print the same and exit alike. Returns both copies (qemu's, ours) for further checks.
fn compare_check(image: &Path, args: &[&str]) -> (PathBuf, PathBuf) {
    let dir = image.parent().unwrap();
    let stem = image.file_stem().unwrap().to_string_lossy().into_owned();
    let tag = args.join("").replace(['-', '='], "");
    let theirs = copy(image, dir, &format!("{stem}.q{tag}.qcow2"));
    let ours = copy(image, dir, &format!("{stem}.i{tag}.qcow2"));
    let q = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = vec!["check".into()];
        v.extend(args.iter().map(|s| s.to_string()));
        v.push(p.display().to_string());
        v
    };
    let qa = q(&theirs);
    let ia = q(&ours);
    let qout = run(
        "qemu-img",
        &qa.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
    );
    let iout = img(&ia.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let (qs, is) = (seen(qout, &theirs), seen(iout, &ours));
    assert_eq!(
        qs,
        is,
        "qemu-img check {args:?} (left) and img check (right) differ on {}",
        image.display()
    );
    (theirs, ours)
}

/// The JSON report of `img check`, parsed.
fn json_of(tool_out: &Output) -> serde_json::Value {
    serde_json::from_slice(&tool_out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            text(&tool_out.stdout),
            text(&tool_out.stderr)
        )
    })
}

/// Compares the JSON reports of both tools field by field (the file name aside) and returns
/// qemu's.
fn compare_json(image: &Path) -> serde_json::Value {
    let q = run(
        "qemu-img",
        &["check", "--output=json", &image.display().to_string()],
    );
    let i = img(&["check", "--output=json", &image.display().to_string()]);
    assert_eq!(q.status.code(), i.status.code(), "exit codes differ");
    let (mut qj, mut ij) = (json_of(&q), json_of(&i));
    for j in [&mut qj, &mut ij] {
        j.as_object_mut().unwrap().remove("filename");
    }
    for (k, v) in qj.as_object().unwrap() {
        assert_eq!(ij.get(k), Some(v), "JSON field {k} differs");
    }
    assert_eq!(
        qj.as_object().unwrap().len(),
        ij.as_object().unwrap().len(),
        "JSON fields differ: {qj} vs {ij}"
    );
    qj
}

/// The counters of a JSON report.
fn counter(j: &serde_json::Value, key: &str) -> u64 {
    j.get(key).and_then(|v| v.as_u64()).unwrap_or(0)
}

/// The full comparison for a corrupted image: report only, JSON, `-r leaks`, `-r all`; then
/// returns our `-r all` result for the caller's own assertions.
fn compare_all_modes(image: &Path) -> PathBuf {
    compare_check(image, &[]);
    compare_json(image);
    compare_check(image, &["-r", "leaks"]);
    let (_, ours) = compare_check(image, &["-r", "all"]);
    ours
}

/// Compares every mode that does not repair errors (report, JSON, -r leaks) with qemu-img.
fn compare_report_modes(image: &Path) {
    compare_check(image, &[]);
    compare_json(image);
    compare_check(image, &["-r", "leaks"]);
}

/// Runs `img check -r all` on a copy and asserts it repaired everything (exit 0, a message
/// containing `says`) and that qemu-img check agrees the result is clean.
fn repair_all_to_clean(image: &Path, says: &str) -> PathBuf {
    let fixed = image.with_extension("repaired.qcow2");
    std::fs::copy(image, &fixed).unwrap();
    let out = img(&["check", "-r", "all", &fixed.display().to_string()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stderr).contains(says), "{}", text(&out.stderr));
    assert_qemu_check_clean(&fixed);
    fixed
}

/// Reads guest data with qemu-io and asserts it is the expected pattern.
fn assert_reads(image: &Path, reads: &[&str]) {
    let cmds: Vec<String> = reads.iter().map(|s| s.to_string()).collect();
    qemu_io("qcow2", image, &cmds);
}

// ---- clean images: byte-identical output -------------------------------------------------

#[test]
fn clean_images_print_exactly_what_qemu_prints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut images = vec![
        make_image(d, "empty.qcow2", "", "1M", &[]),
        base_image(d),
        make_image(
            d,
            "c512r1.qcow2",
            "cluster_size=512,refcount_bits=1",
            "16M",
            &["write -P 1 0 20k", "write -P 2 5M 4k"],
        ),
        make_image(
            d,
            "c4kr64.qcow2",
            "cluster_size=4k,refcount_bits=64",
            "64M",
            &["write -P 1 0 40k", "write -P 2 33M 8k"],
        ),
        make_image(
            d,
            "c2mr8.qcow2",
            "cluster_size=2M,refcount_bits=8",
            "3G",
            &["write -P 1 0 3M", "write -P 2 2G 64k"],
        ),
        make_image(
            d,
            "r2.qcow2",
            "refcount_bits=2",
            "128M",
            &["write -P 1 0 200k", "write -z 1M 128k", "write -P 5 2M 64k"],
        ),
        make_image(
            d,
            "r4c8k.qcow2",
            "refcount_bits=4,cluster_size=8k",
            "100M",
            &["write -P 1 0 100k", "write -P 2 99M 16k"],
        ),
        make_image(
            d,
            "r32.qcow2",
            "refcount_bits=32",
            "10M",
            &["write -P 1 1M 300k"],
        ),
        make_image(
            d,
            "v2.qcow2",
            "compat=0.10",
            "64M",
            &["write -P 1 0 200k", "write -P 2 60M 64k"],
        ),
        make_image(
            d,
            "lazy.qcow2",
            "lazy_refcounts=on",
            "64M",
            &["write -P 1 0 64k"],
        ),
    ];
    // Compressed images, zlib and zstd.
    let base = images[1].clone();
    for (name, opts) in [
        ("comp.qcow2", "cluster_size=65536"),
        ("compz.qcow2", "compression_type=zstd,cluster_size=8k"),
    ] {
        let p = d.join(name);
        qemu_img(&[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            opts,
            &base.display().to_string(),
            &p.display().to_string(),
        ]);
        images.push(p);
    }
    // Internal snapshots, v3 and v2.
    let sn = copy(&base, d, "snap.qcow2");
    qemu_img(&["snapshot", "-c", "s1", &sn.display().to_string()]);
    qemu_io("qcow2", &sn, &["write -P 7 0 64k".into()]);
    qemu_img(&["snapshot", "-c", "s2", &sn.display().to_string()]);
    images.push(sn);
    let sn2 = copy(&images[8], d, "snapv2.qcow2");
    qemu_img(&["snapshot", "-c", "s1", &sn2.display().to_string()]);
    images.push(sn2);
    // Persistent bitmaps.
    let bm = copy(&base, d, "bitmaps.qcow2");
    qemu_img(&["bitmap", "--add", &bm.display().to_string(), "b0"]);
    images.push(bm);

    for image in &images {
        compare_check(image, &[]);
        compare_check(image, &["--output=json"]);
        compare_check(image, &["-q"]);
        let j = compare_json(image);
        assert_eq!(counter(&j, "corruptions") + counter(&j, "leaks"), 0);
    }
}

#[test]
fn raw_images_have_no_check() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "raw",
        &raw.display().to_string(),
        "1M",
    ]);
    compare_check(&raw, &[]);
    compare_check(&raw, &["-f", "raw", "--output=json"]);
    let out = img(&["check", &raw.display().to_string()]);
    assert_eq!(out.status.code(), Some(63));
    assert!(text(&out.stderr).contains("This image format does not support checks"));
}

#[test]
fn usage_errors_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), "u.qcow2", "", "1M", &[]);
    for args in [
        vec!["-r", "some"],
        vec!["--output=xml"],
        vec!["-f", "nosuchformat"],
        vec!["-T", "bogus"],
        vec!["-U", "-r", "all"],
    ] {
        compare_check(&image, &args);
    }
    let missing = dir.path().join("missing.qcow2");
    let q = run("qemu-img", &["check", &missing.display().to_string()]);
    let i = img(&["check", &missing.display().to_string()]);
    assert_eq!(q.status.code(), i.status.code());
    assert_eq!(text(&q.stderr).replace("qemu-img", "img"), text(&i.stderr));
}

// ---- corrupted images ----------------------------------------------------------------------

/// The data the base image holds, read back after a repair.
const BASE_READS: [&str; 3] = ["read -P 1 0 200k", "read -P 2 10M 64k", "read -P 3 1G 64k"];

#[test]
fn refcount_too_high_is_a_leak() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    let image = copy(&base, dir.path(), "high.qcow2");
    let l = Layout::read(&image);
    let (_, e) = l.data_entries()[0];
    let cluster = (e & OFFSET_MASK) >> l.cluster_bits;
    l.set_refcount(cluster, l.refcount(cluster) + 1);

    let j = compare_json(&image);
    assert_eq!(counter(&j, "leaks"), 1);
    // The raised refcount also makes the entry's OFLAG_COPIED wrong.
    assert_eq!(counter(&j, "corruptions"), 1);

    compare_all_modes(&image);
    for mode in ["leaks", "all"] {
        let fixed = copy(&image, dir.path(), &format!("high-{mode}.qcow2"));
        let out = img(&["check", "-r", mode, &fixed.display().to_string()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_qemu_check_clean(&fixed);
        assert_qemu_compare_identical(&base, "qcow2", &fixed, "qcow2");
    }
}

#[test]
fn refcount_too_low_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    // Two guest clusters sharing one host cluster that has refcount 1.
    let image = copy(&base, dir.path(), "low.qcow2");
    let l = Layout::read(&image);
    let entries = l.data_entries();
    let (at1, _) = entries[1];
    let (_, e0) = entries[0];
    l.write64(at1, e0);

    let j = compare_json(&image);
    assert!(counter(&j, "corruptions") >= 1);
    assert_eq!(counter(&j, "leaks"), 1, "the cluster no longer referenced");

    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    // Everything but the re-pointed cluster (64k..128k) reads as before.
    assert_reads(
        &fixed,
        &[
            "read -P 1 0 64k",
            "read -P 1 128k 72k",
            "read -P 2 10M 64k",
            "read -P 3 1G 64k",
        ],
    );

    // A data cluster whose refcount is 0 needs a new refcount structure.
    let image = copy(&base, dir.path(), "zero.qcow2");
    let l = Layout::read(&image);
    let (_, e) = l.data_entries()[2];
    l.set_refcount((e & OFFSET_MASK) >> l.cluster_bits, 0);
    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    assert_qemu_compare_identical(&base, "qcow2", &fixed, "qcow2");
    assert_reads(&fixed, &BASE_READS);
}

#[test]
fn leaked_cluster_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    let image = copy(&base, dir.path(), "leak.qcow2");
    let l = Layout::read(&image);
    let end = l.file_len().div_ceil(l.cs());
    l.write_bytes((end + 1) * l.cs() - 1, &[0]);
    l.set_refcount(end, 1);

    let j = compare_json(&image);
    assert_eq!(counter(&j, "leaks"), 1);
    assert_eq!(counter(&j, "corruptions"), 0);
    let out = img(&["check", &image.display().to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stderr).contains(&format!("Leaked cluster {end} refcount=1 reference=0")));

    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    let leaks = compare_check(&image, &["-r", "leaks"]).1;
    assert_qemu_check_clean(&leaks);
    assert_qemu_compare_identical(&base, "qcow2", &leaks, "qcow2");
}

#[test]
fn l2_entry_past_the_end_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    let image = copy(&base, dir.path(), "eof.qcow2");
    let l = Layout::read(&image);
    let (at, e) = l.data_entries()[1];
    let past = (l.file_len().div_ceil(l.cs()) + 16) * l.cs();
    l.write64(at, (e & !OFFSET_MASK) | past);

    let out = img(&["check", &image.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains(&format!(
        "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {past:#x} size {:#x}",
        l.cs()
    )));
    let j = compare_json(&image);
    assert!(counter(&j, "corruptions") >= 2);

    // Reporting (and -r leaks) is exactly qemu's. For -r all qemu 10 frees the cluster and
    // fixes the flag but keeps the broken entry, so an error remains; img turns the entry into
    // a zero cluster (qemu reads it as zeros anyway), so the image checks clean afterwards.
    compare_check(&image, &[]);
    compare_check(&image, &["-r", "leaks"]);
    let fixed = copy(&image, dir.path(), "eof-fixed.qcow2");
    let out = img(&["check", "-r", "all", &fixed.display().to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains(&format!(
        "Repairing offset={past:x}: Data cluster is beyond the end of the file; L2 entry corrupted."
    )));
    assert_qemu_check_clean(&fixed);
    assert_reads(
        &fixed,
        &[
            "read -P 1 0 64k",
            "read -P 1 128k 72k",
            "read -P 2 10M 64k",
            "read -P 3 1G 64k",
        ],
    );
    // What the guest sees did not change: qemu read zeros there before, img reads zeros now.
    let before = run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            &image.display().to_string(),
            &dir.path().join("before.raw").display().to_string(),
        ],
    );
    assert!(before.status.success());
    assert_qemu_compare_identical(&dir.path().join("before.raw"), "raw", &fixed, "qcow2");
}

#[test]
fn overlapping_tables() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());

    // An L1 entry pointing at the refcount block.
    let image = copy(&base, dir.path(), "l1rb.qcow2");
    let l = Layout::read(&image);
    assert_eq!(l.l1_entry(1), 0);
    l.set_l1_entry(1, COPIED | l.refblock(0));
    let out = img(&["check", &image.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("ERROR refcount block 0 refcount=2"));
    // Reports are qemu's; qemu's -r all leaves these two broken (or fails), img clears the L1
    // entry that points into other metadata and the image checks clean.
    compare_report_modes(&image);
    let fixed = repair_all_to_clean(&image, "overlaps with refcount block");
    assert_reads(
        &fixed,
        &["read -P 1 0 64k", "read -P 2 10M 64k", "read -P 3 1G 64k"],
    );

    // An L1 entry pointing at the L1 table itself.
    let image = copy(&base, dir.path(), "l1l1.qcow2");
    let l = Layout::read(&image);
    l.set_l1_entry(1, COPIED | l.l1_offset);
    compare_report_modes(&image);
    let fixed = repair_all_to_clean(&image, "overlaps with active L1 table");
    assert_reads(
        &fixed,
        &["read -P 1 0 64k", "read -P 2 10M 64k", "read -P 3 1G 64k"],
    );

    // An L2 entry pointing at the refcount table.
    let image = copy(&base, dir.path(), "l2rt.qcow2");
    let l = Layout::read(&image);
    let (at, _) = l.data_entries()[1];
    l.write64(at, COPIED | l.reftable_offset);
    let j = compare_json(&image);
    assert!(counter(&j, "corruptions") >= 1);
    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    assert_reads(
        &fixed,
        &["read -P 1 0 64k", "read -P 2 10M 64k", "read -P 3 1G 64k"],
    );
}

#[test]
fn unaligned_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());

    // An unaligned L2 table offset.
    let image = copy(&base, dir.path(), "l2un.qcow2");
    let l = Layout::read(&image);
    let (i, l2) = l.l2_tables()[0];
    l.set_l1_entry(i, l.l1_entry(i) + 0x200);
    let out = img(&["check", &image.display().to_string()]);
    assert!(text(&out.stderr).contains(&format!(
        "ERROR l2_offset={:x}: Table is not cluster aligned; L1 entry corrupted",
        l2 + 0x200
    )));
    compare_all_modes(&image);

    // An unaligned data cluster, and an unaligned preallocated zero cluster (which -r all
    // turns into a plain zero cluster).
    let image = copy(&base, dir.path(), "dataun.qcow2");
    let l = Layout::read(&image);
    let (at, e) = l.data_entries()[1];
    l.write64(at, e + 0x200);
    let out = img(&["check", &image.display().to_string()]);
    assert!(text(&out.stderr).contains("Data cluster is not properly aligned; L2 entry corrupted."));
    compare_all_modes(&image);

    let image = copy(&base, dir.path(), "zeroun.qcow2");
    let l = Layout::read(&image);
    let (at, e) = l.data_entries()[1];
    l.write64(at, (e | 1) + 0x200);
    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    assert_reads(
        &fixed,
        &[
            "read -P 1 0 64k",
            "read -P 0 64k 64k",
            "read -P 1 128k 72k",
            "read -P 2 10M 64k",
        ],
    );
}

#[test]
fn broken_refcount_table_entries() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());

    // A refcount block past the end of the file: qemu grows the file and rebuilds.
    let image = copy(&base, dir.path(), "rbeof.qcow2");
    let l = Layout::read(&image);
    l.write64(
        l.reftable_offset,
        (l.file_len().div_ceil(l.cs()) + 20) * l.cs(),
    );
    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    assert_qemu_compare_identical(&base, "qcow2", &fixed, "qcow2");

    // A whole refcount block of zeros.
    let image = copy(&base, dir.path(), "rbzero.qcow2");
    let l = Layout::read(&image);
    l.write_bytes(l.refblock(0), &vec![0u8; l.cs() as usize]);
    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    assert_qemu_compare_identical(&base, "qcow2", &fixed, "qcow2");

    // An unaligned refcount block offset, and one with reserved bits set. Without repair we
    // report exactly as qemu-img; with -r all, qemu-img 10 gives up ("ERROR writing
    // refblock": its overlap check still counts the broken block), while we rebuild the
    // refcount structure and leave a clean image.
    for (name, delta) in [("rbun.qcow2", 0x200u64), ("rbres.qcow2", 1)] {
        let image = copy(&base, dir.path(), name);
        let l = Layout::read(&image);
        l.write64(l.reftable_offset, l.refblock(0) + delta);
        compare_check(&image, &[]);
        compare_json(&image);
        compare_check(&image, &["-r", "leaks"]);
        let fixed = copy(&image, dir.path(), &format!("fixed-{name}"));
        let out = img(&["check", "-r", "all", &fixed.display().to_string()]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("Rebuilding refcount structure"));
        assert_qemu_check_clean(&fixed);
        assert_qemu_compare_identical(&base, "qcow2", &fixed, "qcow2");
    }
}

#[test]
fn oflag_copied_and_reserved_bits() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    type Corruption = Box<dyn Fn(&Layout)>;
    let cases: Vec<(&str, Corruption)> = vec![
        (
            "l2copied.qcow2",
            Box::new(|l: &Layout| {
                let (at, e) = l.data_entries()[0];
                l.write64(at, e & !COPIED);
            }),
        ),
        (
            "l1copied.qcow2",
            Box::new(|l: &Layout| {
                let (i, _) = l.l2_tables()[0];
                l.set_l1_entry(i, l.l1_entry(i) & !COPIED);
            }),
        ),
        (
            "l1res.qcow2",
            Box::new(|l: &Layout| {
                let (i, _) = l.l2_tables()[0];
                l.set_l1_entry(i, l.l1_entry(i) | 2);
            }),
        ),
        (
            "l2res.qcow2",
            Box::new(|l: &Layout| {
                let (at, e) = l.data_entries()[0];
                l.write64(at, e | 2);
            }),
        ),
    ];
    for (name, corrupt) in cases {
        let image = copy(&base, dir.path(), name);
        corrupt(&Layout::read(&image));
        let j = compare_json(&image);
        assert!(counter(&j, "corruptions") >= 1, "{name}");
        compare_all_modes(&image);
    }
}

#[test]
fn compressed_and_snapshot_images() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = base_image(d);
    let comp = d.join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        &base.display().to_string(),
        &comp.display().to_string(),
    ]);
    // The copied flag must never be set on compressed clusters.
    let image = copy(&comp, d, "compcopied.qcow2");
    let l = Layout::read(&image);
    let (_, l2) = l.l2_tables()[0];
    let e = l.read64(l2);
    assert_ne!(e & (1 << 62), 0, "first cluster is compressed");
    l.write64(l2, e | COPIED);
    compare_all_modes(&image);
    // A leaked refcount on a cluster holding compressed data.
    let image = copy(&comp, d, "compleak.qcow2");
    let l = Layout::read(&image);
    let c = (e & ((1u64 << (62 - (l.cluster_bits - 8))) - 1)) >> l.cluster_bits;
    l.set_refcount(c, l.refcount(c) + 1);
    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    assert_qemu_compare_identical(&comp, "qcow2", &fixed, "qcow2");

    // Snapshots: their tables count, and broken snapshot entries are reported and repaired.
    let sn = copy(&base, d, "snap.qcow2");
    qemu_img(&["snapshot", "-c", "s1", &sn.display().to_string()]);
    qemu_io("qcow2", &sn, &["write -P 7 0 64k".into()]);
    let b = fs::read(&sn).unwrap();
    let table = u64::from_be_bytes(b[64..72].try_into().unwrap());
    // A snapshot's data cluster with a refcount too low (it is shared with the snapshot).
    let image = copy(&sn, d, "snaplow.qcow2");
    let l = Layout::read(&image);
    let (_, e) = l.data_entries()[1];
    l.set_refcount((e & OFFSET_MASK) >> l.cluster_bits, 1);
    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    // An incomplete entry (no extra data in a version 3 image).
    let image = copy(&sn, d, "snapinc.qcow2");
    Layout::read(&image).write_bytes(table + 36, &0u32.to_be_bytes());
    let fixed = compare_all_modes(&image);
    assert_qemu_check_clean(&fixed);
    // An unaligned snapshot L1 table.
    let image = copy(&sn, d, "snapl1.qcow2");
    let l = Layout::read(&image);
    l.write64(table, l.read64(table) + 0x200);
    compare_all_modes(&image);
}

#[test]
fn dirty_images_are_repaired_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(
        dir.path(),
        "dirty.qcow2",
        "lazy_refcounts=on",
        "64M",
        &["write -P 1 0 200k"],
    );
    // A crash with lazy refcounts: the dirty bit set, refcounts stale.
    let l = Layout::read(&image);
    let (_, e) = l.data_entries()[0];
    let c = (e & OFFSET_MASK) >> l.cluster_bits;
    l.set_refcount(c, 2);
    let incompat = l.read64(72);
    l.write64(72, incompat | 1);
    let out = img(&["check", &image.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));

    let opened = img_core::open_image(
        &image,
        &img_core::OpenOptions {
            format: Some("qcow2".into()),
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    opened.close().unwrap();
    assert_eq!(Layout::read(&image).read64(72) & 1, 0, "dirty bit cleared");
    assert_qemu_check_clean(&image);
    assert_reads(&image, &["read -P 1 0 200k"]);
}
