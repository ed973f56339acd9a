//! `img amend`, side by side with `qemu-img amend` on identical copies of images that qemu-img
//! made and qemu-io filled (data, zero clusters of both kinds, compressed clusters, snapshots):
//! the same exit codes and messages, results that pass `qemu-img check` without errors or
//! leaks, the same guest content before and after (and as qemu's result), the new options in
//! `qemu-img info`, and byte-identical files wherever qemu's result is deterministic.

mod common;

use common::recording::{crash_image, epochs, RecordingStorage};
use common::{assert_qemu_check_clean, assert_qemu_compare_identical, img_bin, qemu_img, qemu_io};
use img_core::open::open_storage;
use img_core::qcow2::amend::{amend_image, AmendOptions};
use img_core::qcow2::{create::create_on, Qcow2CreateOptions};
use img_core::OpenOptions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What one tool's `amend` did.
#[derive(Debug)]
struct Outcome {
    path: PathBuf,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

static RUN: AtomicUsize = AtomicUsize::new(0);

fn run_tool(tool: &Path, args: &[&str], image: &Path) -> Outcome {
    let mut cmd = Command::new(tool);
    cmd.arg("amend").args(args);
    if !image.as_os_str().is_empty() {
        cmd.arg(image);
    }
    let out = cmd.output().expect("cannot run");
    Outcome {
        path: image.to_path_buf(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Copies `base` twice and amends one copy with qemu-img, the other with img.
fn amend_both(base: &Path, args: &[&str]) -> (Outcome, Outcome) {
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    let dir = base.parent().unwrap();
    let stem = base.file_stem().unwrap().to_str().unwrap();
    let q = dir.join(format!("{stem}-{n}-qemu.qcow2"));
    let m = dir.join(format!("{stem}-{n}-img.qcow2"));
    std::fs::copy(base, &q).unwrap();
    std::fs::copy(base, &m).unwrap();
    (
        run_tool(Path::new("qemu-img"), args, &q),
        run_tool(&img_bin(), args, &m),
    )
}

/// qemu-img's messages with our program name.
fn as_img(qemu_text: &str) -> String {
    qemu_text.replace("qemu-img", "img")
}

/// Same exit code, same messages, same progress output.
fn assert_same_outcome(q: &Outcome, m: &Outcome, what: &str) {
    assert_eq!(
        q.code, m.code,
        "{what}: exit codes differ\nqemu: {q:?}\nimg: {m:?}"
    );
    assert_eq!(as_img(&q.stderr), m.stderr, "{what}: messages differ");
    assert_eq!(q.stdout, m.stdout, "{what}: output differs");
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn assert_same_bytes(a: &Path, b: &Path, what: &str) {
    assert!(
        same_bytes(a, b),
        "{what}: {} and {} differ",
        a.display(),
        b.display()
    );
}

/// `qemu-img info`'s format-specific data.
fn specific(image: &Path) -> serde_json::Value {
    let out = qemu_img(&[
        "info",
        "--output=json",
        "-f",
        "qcow2",
        image.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["format-specific"]["data"].clone()
}

fn qemu_io_ok(image: &Path, cmds: &[String]) {
    qemu_io("qcow2", image, cmds);
}

/// A qcow2 image made by qemu-img and filled by qemu-io with data, zero clusters that were
/// never allocated, zeroed data clusters (kept allocated), zeroed-and-unmapped clusters,
/// partial clusters and compressed clusters. Returns the image and the qemu-io reads that
/// verify its content.
fn data_image(dir: &Path, name: &str, cluster: u64, opts: &str) -> (PathBuf, Vec<String>) {
    let p = dir.join(name);
    let c = cluster;
    let mut o = format!("cluster_size={c}");
    if !opts.is_empty() {
        o.push(',');
        o.push_str(opts);
    }
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        p.to_str().unwrap(),
        &(40 * c).to_string(),
    ]);
    let writes = vec![
        format!("write -P 0x11 0 {}", 6 * c),
        format!("write -P 0x22 {} {}", 8 * c + 512, 3 * c),
        format!("write -z {} {}", 16 * c, 4 * c),
        format!("write -z {} {}", c, 2 * c),
        format!("write -z -u {} {}", 4 * c, c),
        format!("write -c -P 0x33 {} {}", 24 * c, 4 * c),
        format!("write -P 0x44 {} {}", 30 * c, c),
    ];
    qemu_io_ok(&p, &writes);
    let reads = vec![
        format!("read -P 0x11 0 {c}"),
        format!("read -P 0 {c} {}", 2 * c),
        format!("read -P 0x11 {} {c}", 3 * c),
        format!("read -P 0 {} {c}", 4 * c),
        format!("read -P 0x11 {} {c}", 5 * c),
        format!("read -P 0x22 {} {}", 8 * c + 512, 3 * c),
        format!("read -P 0 {} {}", 12 * c, 12 * c),
        format!("read -P 0x33 {} {}", 24 * c, 4 * c),
        format!("read -P 0x44 {} {c}", 30 * c),
    ];
    (p, reads)
}

/// Runs amend both ways and checks everything a successful change must satisfy; returns
/// img's result.
fn amend_ok(base: &Path, args: &[&str], identical: bool) -> PathBuf {
    let what = format!("{} {args:?}", base.display());
    let (q, m) = amend_both(base, args);
    assert_same_outcome(&q, &m, &what);
    assert_eq!(m.code, Some(0), "{what}: {m:?}");
    assert_qemu_check_clean(&m.path);
    assert_qemu_compare_identical(base, "qcow2", &m.path, "qcow2");
    assert_qemu_compare_identical(&q.path, "qcow2", &m.path, "qcow2");
    if identical {
        assert_same_bytes(&q.path, &m.path, &what);
    }
    m.path
}

/// Runs amend both ways where both must refuse; img's copy must be left as it was.
fn amend_refused(base: &Path, args: &[&str], says: &str) {
    let what = format!("{} {args:?}", base.display());
    let (q, m) = amend_both(base, args);
    assert_same_outcome(&q, &m, &what);
    assert_eq!(m.code, Some(1), "{what}");
    assert!(m.stderr.contains(says), "{what}: {}", m.stderr);
    assert_qemu_compare_identical(base, "qcow2", &m.path, "qcow2");
    assert_qemu_check_clean(&m.path);
}

#[test]
fn compat_both_directions_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [512u64, 4096, 65536, 2 << 20] {
        let (v3, reads) = data_image(dir.path(), &format!("v3-{cluster}.qcow2"), cluster, "");
        // Down: zero clusters become unallocated (no backing file), zeroed data clusters
        // stay allocated and are zeroed, compressed clusters stay.
        let v2 = amend_ok(&v3, &["-o", "compat=0.10"], true);
        let info = specific(&v2);
        assert_eq!(info["compat"], "0.10", "{info}");
        assert!(info.get("lazy-refcounts").is_none(), "{info}");
        // A version 2 header is 72 bytes and carries no feature table.
        let bytes = std::fs::read(&v2).unwrap();
        assert_eq!(&bytes[4..8], &2u32.to_be_bytes());
        assert_eq!(&bytes[72..80], &[0u8; 8], "no extensions after a v2 header");
        // qemu-io opens the result and reads what was written.
        qemu_io_ok(&v2, &reads);
        // And back up: the header grows back and gets the feature table.
        let back = amend_ok(&v2, &["-o", "compat=1.1"], true);
        assert_eq!(specific(&back)["compat"], "1.1");
        qemu_io_ok(&back, &reads);
        // Images made as version 2 upgrade like qemu's too.
        let (made_v2, reads) = data_image(
            dir.path(),
            &format!("v2-{cluster}.qcow2"),
            cluster,
            "compat=0.10",
        );
        let up = amend_ok(&made_v2, &["-o", "compat=v3"], true);
        assert_eq!(specific(&up)["compat"], "1.1");
        qemu_io_ok(&up, &reads);
    }
}

#[test]
fn progress_output_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (v3, _) = data_image(dir.path(), "p.qcow2", 65536, "");
    for args in [
        vec!["-p", "-o", "compat=0.10"],
        vec!["-p", "-o", "refcount_bits=8"],
        vec!["-p", "-o", "refcount_bits=8,lazy_refcounts=on"],
        vec!["-p", "-q", "-o", "refcount_bits=64"],
    ] {
        let (q, m) = amend_both(&v3, &args);
        assert_same_outcome(&q, &m, &format!("{args:?}"));
        if !args.contains(&"-q") {
            assert!(
                m.stdout.contains("(100.00/100%)"),
                "{args:?}: {:?}",
                m.stdout
            );
        }
    }
    let (v2, _) = data_image(dir.path(), "p2.qcow2", 4096, "compat=0.10");
    let (q, m) = amend_both(&v2, &["-p", "-o", "compat=1.1,refcount_bits=2"]);
    assert_same_outcome(&q, &m, "upgrade and width");
    assert!(m.stdout.contains("(50.00/100%)") || m.stdout.contains("(25.00/100%)"));
}

#[test]
fn refcount_widths_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in [512u64, 4096, 65536] {
        let (base, reads) = data_image(dir.path(), &format!("w-{cluster}.qcow2"), cluster, "");
        for bits in [1u32, 2, 4, 8, 32, 64] {
            let args = format!("refcount_bits={bits}");
            let (q, m) = amend_both(&base, &["-o", &args]);
            let what = format!("{cluster} {args}");
            assert_same_outcome(&q, &m, &what);
            assert_same_bytes(&q.path, &m.path, &what);
            assert_qemu_check_clean(&m.path);
            assert_qemu_compare_identical(&base, "qcow2", &m.path, "qcow2");
            if m.code == Some(0) {
                assert_eq!(specific(&m.path)["refcount-bits"], bits, "{what}");
                qemu_io_ok(&m.path, &reads);
            } else {
                // Compressed clusters share host clusters: too many references for the
                // narrowest widths, which both refuse.
                assert!(bits <= 4, "{what}: {m:?}");
                assert!(
                    m.stderr
                        .starts_with("img: Cannot decrease refcount entry width to"),
                    "{what}: {}",
                    m.stderr
                );
                assert_eq!(specific(&m.path)["refcount-bits"], 16);
            }
        }
    }
    // Without compressed clusters every width works, there and back again.
    let p = dir.path().join("plain.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p.to_str().unwrap(),
        "8M",
    ]);
    qemu_io_ok(
        &p,
        &[
            "write -P 0x55 0 1M".to_string(),
            "write -z 2M 512k".into(),
            "write -P 0x66 3M 64k".into(),
            "write -z 3M 16k".into(),
        ],
    );
    let mut cur = p.clone();
    for bits in [1u32, 64, 2, 8, 16] {
        cur = amend_ok(&cur, &["-o", &format!("refcount_bits={bits}")], true);
        assert_eq!(specific(&cur)["refcount-bits"], bits);
        assert_qemu_compare_identical(&p, "qcow2", &cur, "qcow2");
    }
}

/// 2 MiB clusters: qemu walks every refcount its table could describe (hours for these
/// widths), so img's result is checked on its own.
#[test]
fn refcount_widths_with_2m_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let (base, reads) = data_image(dir.path(), "w2m.qcow2", 2 << 20, "");
    let mut cur = base.clone();
    for bits in [64u32, 8, 32, 16] {
        let next = dir.path().join(format!("w2m-{bits}.qcow2"));
        std::fs::copy(&cur, &next).unwrap();
        let m = run_tool(&img_bin(), &["-o", &format!("refcount_bits={bits}")], &next);
        assert_eq!(m.code, Some(0), "{bits}: {m:?}");
        assert_eq!(specific(&next)["refcount-bits"], bits);
        assert_qemu_check_clean(&next);
        assert_qemu_compare_identical(&base, "qcow2", &next, "qcow2");
        qemu_io_ok(&next, &reads);
        cur = next;
    }
}

/// The refcount table's length in clusters, from the header.
fn reftable_clusters(image: &Path) -> u32 {
    let b = std::fs::read(image).unwrap();
    u32::from_be_bytes(b[56..60].try_into().unwrap())
}

#[test]
fn refcount_structures_grow_and_shrink() {
    let dir = tempfile::tempdir().unwrap();
    // 512-byte clusters: one table cluster of 16-bit refcounts covers 8 MiB, of 64-bit ones
    // 2 MiB. Nearly 8 MiB of data needs a table of several clusters at 64 bits.
    let p = dir.path().join("grow.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p.to_str().unwrap(),
        "64M",
    ]);
    qemu_io_ok(&p, &["write -P 0x77 0 7800k".to_string()]);
    assert_eq!(reftable_clusters(&p), 1);
    let wide = amend_ok(&p, &["-o", "refcount_bits=64"], true);
    assert!(
        reftable_clusters(&wide) >= 4,
        "{}",
        reftable_clusters(&wide)
    );
    // And back down to the narrowest width: the table shrinks to one cluster again.
    let narrow = amend_ok(&wide, &["-o", "refcount_bits=1"], true);
    assert_eq!(reftable_clusters(&narrow), 1);
    assert_eq!(specific(&narrow)["refcount-bits"], 1);
    qemu_io_ok(&narrow, &["read -P 0x77 0 7800k".to_string()]);

    // So close to the end of what the old table covers that allocating the new blocks grows
    // the old structure first: the layout may differ from qemu's by where that growth went,
    // the content and the consistency may not.
    let q = dir.path().join("edge.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        q.to_str().unwrap(),
        "64M",
    ]);
    qemu_io_ok(&q, &["write -P 0x78 0 7990k".to_string()]);
    assert_eq!(reftable_clusters(&q), 1);
    let wide = amend_ok(&q, &["-o", "refcount_bits=64"], false);
    assert!(reftable_clusters(&wide) >= 4);
    qemu_io_ok(&wide, &["read -P 0x78 0 7990k".to_string()]);
}

#[test]
fn lazy_refcounts_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (v3, _) = data_image(dir.path(), "lazy.qcow2", 65536, "");
    let on = amend_ok(&v3, &["-o", "lazy_refcounts=on"], true);
    assert_eq!(specific(&on)["lazy-refcounts"], true);
    let off = amend_ok(&on, &["-o", "lazy_refcounts=off"], true);
    assert_eq!(specific(&off)["lazy-refcounts"], false);
    // Lazy refcounts survive other changes, and go with a downgrade.
    let eight = amend_ok(&on, &["-o", "refcount_bits=8"], true);
    assert_eq!(specific(&eight)["lazy-refcounts"], true);
    let v2 = amend_ok(&on, &["-o", "compat=0.10"], true);
    assert_eq!(specific(&v2)["compat"], "0.10");

    // Version 2 has no lazy refcounts.
    let (made_v2, _) = data_image(dir.path(), "lazy2.qcow2", 65536, "compat=0.10");
    amend_refused(
        &made_v2,
        &["-o", "lazy_refcounts=on"],
        "Lazy refcounts only supported with compatibility level 1.1",
    );
    amend_refused(
        &v3,
        &["-o", "compat=0.10,lazy_refcounts=on"],
        "Lazy refcounts only supported with compatibility level 1.1",
    );
    amend_ok(&made_v2, &["-o", "compat=1.1,lazy_refcounts=on"], true);
}

#[test]
fn dirty_image_is_made_consistent_first() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dirty.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        p.to_str().unwrap(),
        "64M",
    ]);
    // qemu-io aborts without cleaning up: the dirty bit stays set, refcounts are stale.
    let out = common::run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x2a 0 128k",
            "-c",
            "flush",
            "-c",
            "abort",
            p.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let header = std::fs::read(&p).unwrap();
    assert_eq!(header[79] & 1, 1, "the dirty bit is set");
    for args in [["-o", "compat=0.10"], ["-o", "lazy_refcounts=off"]] {
        let (q, m) = amend_both(&p, &args);
        // qemu reports the repair it runs when it opens a dirty image; img repairs silently.
        assert_eq!(q.code, m.code, "{args:?}");
        assert_eq!(m.code, Some(0), "{m:?}");
        assert_eq!(m.stderr, "", "{args:?}");
        assert_same_bytes(&q.path, &m.path, &format!("{args:?}"));
        assert_qemu_check_clean(&m.path);
        qemu_io_ok(&m.path, &["read -P 0x2a 0 128k".to_string()]);
        let b = std::fs::read(&m.path).unwrap();
        if args[1] == "lazy_refcounts=off" {
            assert_eq!(b[79] & 1, 0, "dirty bit cleared");
            assert_eq!(specific(&m.path)["lazy-refcounts"], false);
        } else {
            assert_eq!(&b[4..8], &2u32.to_be_bytes());
        }
    }
}

#[test]
fn downgrade_refusals_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // Other refcount widths than 16 bits.
    let (eight, _) = data_image(dir.path(), "eight.qcow2", 65536, "refcount_bits=8");
    amend_refused(
        &eight,
        &["-o", "compat=0.10"],
        "compat=0.10 requires refcount_bits=16",
    );
    // ... unless the width changes back in the same call.
    let v2 = amend_ok(&eight, &["-o", "compat=0.10,refcount_bits=16"], true);
    assert_eq!(specific(&v2)["refcount-bits"], 16);
    assert_eq!(specific(&v2)["compat"], "0.10");

    // zstd: fine without compressed clusters, refused with them.
    let z = dir.path().join("zstd.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compression_type=zstd",
        z.to_str().unwrap(),
        "4M",
    ]);
    qemu_io_ok(
        &z,
        &["write -P 1 0 64k".to_string(), "write -z 1M 64k".into()],
    );
    let v2 = amend_ok(&z, &["-o", "compat=0.10"], true);
    assert_eq!(specific(&v2)["compression-type"], "zlib");
    qemu_io_ok(&z, &["write -c -P 3 2M 128k".to_string()]);
    let (q, m) = amend_both(&z, &["-o", "compat=0.10"]);
    assert_same_outcome(&q, &m, "zstd");
    assert_eq!(m.code, Some(1));
    assert!(m.stderr.contains(
        "Cannot downgrade an image with zstd compression type and existing compressed clusters"
    ));
    // qemu has already turned zero clusters into unallocated ones when it refuses; img
    // refuses first and leaves the file as it was.
    assert_same_bytes(&z, &m.path, "zstd refusal leaves the image alone");
    assert_qemu_compare_identical(&q.path, "qcow2", &m.path, "qcow2");
    assert_eq!(specific(&m.path)["compat"], "1.1");

    // A snapshot of another disk size cannot be described in version 2.
    let s = dir.path().join("snap.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s.to_str().unwrap(), "4M"]);
    qemu_io_ok(&s, &["write -P 9 0 1M".to_string()]);
    qemu_img(&["snapshot", "-c", "one", s.to_str().unwrap()]);
    amend_ok(&s, &["-o", "compat=0.10"], true);
    qemu_img(&["resize", "-q", s.to_str().unwrap(), "8M"]);
    amend_refused(
        &s,
        &["-o", "compat=0.10"],
        "Internal snapshots prevent downgrade of image",
    );
    // Refcounts of 2 (the snapshot shares clusters) do not fit in 1 bit.
    amend_refused(
        &s,
        &["-p", "-o", "refcount_bits=1"],
        "Cannot decrease refcount entry width to 1 bits: Cluster at offset",
    );
    amend_ok(&s, &["-o", "refcount_bits=2"], true);
}

#[test]
fn snapshots_zero_clusters_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    // Zero clusters only a snapshot still sees (the active layer overwrote them).
    let a = dir.path().join("inactive.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", a.to_str().unwrap(), "64M"]);
    qemu_io_ok(&a, &["write -z 0 128k".to_string()]);
    qemu_img(&["snapshot", "-c", "foo", a.to_str().unwrap()]);
    qemu_io_ok(&a, &["write -P 0x2a 0 128k".to_string()]);
    let v2 = amend_ok(&a, &["-o", "compat=0.10"], true);
    qemu_io_ok(&v2, &["read -P 0x2a 0 128k".to_string()]);
    qemu_img(&["snapshot", "-a", "foo", v2.to_str().unwrap()]);
    assert_qemu_check_clean(&v2);
    qemu_io_ok(&v2, &["read -P 0 0 128k".to_string()]);

    // Zero clusters in an L2 table the snapshot shares.
    let b = dir.path().join("shared.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "64M"]);
    qemu_io_ok(
        &b,
        &[
            "write -z 0 128k".to_string(),
            "write -P 5 1M 64k".into(),
            "write -z 1M 64k".into(),
        ],
    );
    qemu_img(&["snapshot", "-c", "foo", b.to_str().unwrap()]);
    let v2 = amend_ok(&b, &["-o", "compat=0.10"], true);
    qemu_img(&["snapshot", "-a", "foo", v2.to_str().unwrap()]);
    assert_qemu_check_clean(&v2);
    qemu_io_ok(
        &v2,
        &["read -P 0 0 128k".to_string(), "read -P 0 1M 64k".into()],
    );
}

/// qemu zeroes a preallocated zero cluster in place even when a snapshot still reads its
/// data, and marks it as unshared: the snapshot's data is lost and `check` reports an error.
/// img leaves the cluster to the snapshot.
#[test]
fn shared_preallocated_zero_cluster_keeps_snapshot_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1M"]);
    qemu_io_ok(&p, &["write -P 1 0 128k".to_string()]);
    qemu_img(&["snapshot", "-c", "s1", p.to_str().unwrap()]);
    qemu_io_ok(&p, &["write -z 0 64k".to_string()]);
    let (q, m) = amend_both(&p, &["-o", "compat=0.10"]);
    assert_same_outcome(&q, &m, "shared zero cluster");
    assert_qemu_check_clean(&m.path);
    assert_qemu_compare_identical(&p, "qcow2", &m.path, "qcow2");
    qemu_img(&["snapshot", "-a", "s1", m.path.to_str().unwrap()]);
    assert_qemu_check_clean(&m.path);
    qemu_io_ok(&m.path, &["read -P 1 0 128k".to_string()]);
}

/// Rewrites a snapshot table so that its entries have no extra data, as old qemu versions
/// wrote version 2 images.
fn strip_snapshot_extra_data(image: &Path) {
    let mut d = std::fs::read(image).unwrap();
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]) as usize;
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let n = be32(&d, 60);
    let start = u64::from_be_bytes(d[64..72].try_into().unwrap()) as usize;
    let mut pos = start;
    let mut out = Vec::new();
    for _ in 0..n {
        pos = pos.div_ceil(8) * 8;
        let h = d[pos..pos + 40].to_vec();
        let strings = be16(&h, 12) + be16(&h, 14);
        let extra = be32(&h, 36) as usize;
        let body = d[pos + 40 + extra..pos + 40 + extra + strings].to_vec();
        out.resize(out.len().div_ceil(8) * 8, 0);
        out.extend_from_slice(&h[..36]);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&body);
        pos += 40 + extra + strings;
    }
    d[start..start + out.len()].copy_from_slice(&out);
    std::fs::write(image, d).unwrap();
}

#[test]
fn old_v2_snapshot_table_is_rewritten_on_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (p, reads) = data_image(dir.path(), "old.qcow2", 65536, "compat=0.10");
    qemu_img(&["snapshot", "-c", "first", p.to_str().unwrap()]);
    qemu_io_ok(&p, &["write -P 0x99 0 64k".to_string()]);
    qemu_img(&["snapshot", "-c", "second", p.to_str().unwrap()]);
    strip_snapshot_extra_data(&p);
    assert_qemu_check_clean(&p);
    let v3 = amend_ok(&p, &["-p", "-o", "compat=1.1"], true);
    let list = qemu_img(&["snapshot", "-l", v3.to_str().unwrap()]);
    assert!(list.contains("first") && list.contains("second"), "{list}");
    qemu_img(&["snapshot", "-a", "first", v3.to_str().unwrap()]);
    qemu_io_ok(&v3, &reads);
    assert_qemu_check_clean(&v3);
}

#[test]
fn bitmaps_are_dropped_on_downgrade() {
    let dir = tempfile::tempdir().unwrap();
    let (p, reads) = data_image(dir.path(), "bm.qcow2", 65536, "");
    qemu_img(&["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    let (q, m) = amend_both(&p, &["-o", "compat=0.10"]);
    assert_same_outcome(&q, &m, "bitmaps");
    // qemu keeps the bitmaps extension in the version 2 header, where nothing can say it is
    // valid, and leaves its clusters leaked; img drops it and frees them.
    assert_qemu_check_clean(&m.path);
    let out = common::run("qemu-img", &["info", m.path.to_str().unwrap()]);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_qemu_compare_identical(&q.path, "qcow2", &m.path, "qcow2");
    qemu_io_ok(&m.path, &reads);
}

#[test]
fn refusals_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let (v3, _) = data_image(dir.path(), "r3.qcow2", 65536, "");
    let (v2, _) = data_image(dir.path(), "r2.qcow2", 65536, "compat=0.10");
    let lists = [
        "cluster_size=4096",
        "encryption=on",
        "preallocation=full",
        "extended_l2=on",
        "compression_type=zstd",
        "encrypt.format=luks",
        "cluster_size=4k,foo=bar",
        "foo=bar",
        "nocow=on",
        "compat=0.9",
        "compat=",
        "refcount_bits=3",
        "refcount_bits=0",
        "refcount_bits=128",
        "refcount_bits=-1",
        "refcount_bits=abc",
        "lazy_refcounts=maybe",
        "size=abc",
        "size=-1",
        "encrypt.new-secret=x",
        "encrypt.keyslot=abc",
        "data_file=x",
        "data_file=",
        "data_file_raw=on",
        "data_file_raw=on,data_file=x",
        "backing_file=x",
        "backing_file=",
        "backing_fmt=raw",
        "refcount_bits=3,compat=0.9",
        "refcount_bits=3,encrypt.new-secret=x",
        "compat=0.10,refcount_bits=8",
        "compat=0.10,lazy_refcounts=on",
    ];
    for base in [&v3, &v2] {
        for list in lists {
            let (q, m) = amend_both(base, &["-o", list]);
            let what = format!("{} -o {list}", base.display());
            assert_same_outcome(&q, &m, &what);
            assert_eq!(m.code, Some(1), "{what}");
            assert_same_bytes(&q.path, &m.path, &what);
        }
    }
    // A refusal after an upgrade leaves the upgrade done, as in qemu.
    let (q, m) = amend_both(&v2, &["-o", "compat=1.1,backing_file=x"]);
    assert_same_outcome(&q, &m, "upgrade then backing file");
    assert_same_bytes(&q.path, &m.path, "upgrade then backing file");
    assert_eq!(specific(&m.path)["compat"], "1.1");
    // Accepted no-ops and spellings.
    for list in [
        "compat=0.10,compat=1.1",
        "refcount_bits=16",
        "size=0",
        "data_file_raw=off",
        "nolazy_refcounts",
        "lazy_refcounts",
        "refcount_bits=4294967304",
    ] {
        let (q, m) = amend_both(&v3, &["-o", list]);
        assert_same_outcome(&q, &m, list);
        assert_eq!(m.code, Some(0), "{list}: {m:?}");
        assert_same_bytes(&q.path, &m.path, list);
    }
}

#[test]
fn command_line_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    let (v3, _) = data_image(dir.path(), "c.qcow2", 65536, "");
    let v3s = v3.to_str().unwrap().to_string();
    let raw = d("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", &raw, "1M"]);
    let missing = d("missing.qcow2");
    let opts = format!("driver=qcow2,file.filename={v3s}");
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec![&v3s],
        vec!["-o", "help"],
        vec!["-o", "?"],
        vec!["-o", "", &v3s],
        vec!["-o", ",a", &v3s],
        vec!["-o"],
        vec!["-x", "-o", "compat=1.1", &v3s],
        vec!["-f", "qcow2", "-o", "help"],
        vec!["-f", "qcow2", "-o", "compat=1.1,help"],
        vec!["-o", "help", &v3s],
        vec!["-f", "raw", "-o", "help"],
        vec!["-f", "foo", "-o", "help"],
        vec!["-f", "vmdk", "-o", "help"],
        vec!["-f", "raw", "-o", "compat=1.1", &raw],
        vec!["-o", "compat=1.1", &raw],
        vec!["-o", "help", &raw],
        vec!["-f", "qcow2", "-o", "compat=1.1", &raw],
        vec!["-o", "compat=1.1", &v3s, &raw],
        vec!["-o", "compat=1.1", &missing],
        vec!["-p", "-o", "compat=1.1", &missing],
        vec!["-t", "bogus", "-o", "compat=1.1", &v3s],
        vec!["-t", "none", "-o", "compat=1.1", &v3s],
        vec!["--image-opts", "-f", "qcow2", "-o", "compat=1.1", &v3s],
        vec!["--image-opts", "-o", "compat=1.1", &opts],
        vec!["--progres", "-o", "compat=1.1", &v3s],
        vec!["-q", "-p", "-o", "compat=1.1", &v3s],
        vec!["--force", "-o", "compat=1.1", &v3s],
        vec!["-o", "compat=1.1", "-o", "lazy_refcounts=on", &v3s],
    ];
    for args in cases {
        let q = run_tool(Path::new("qemu-img"), &args, Path::new(""));
        let m = run_tool(&img_bin(), &args, Path::new(""));
        assert_same_outcome(&q, &m, &format!("{args:?}"));
    }
    assert_eq!(specific(&v3)["lazy-refcounts"], true);
}

/// `size=` resizes as qemu-img amend does: growing and shrinking give the same result.
#[test]
fn size_resizes_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    for size in ["200M", "4M", "1M"] {
        let (ours, _) = data_image(dir.path(), "ours.qcow2", 65536, "");
        let (theirs, _) = data_image(dir.path(), "theirs.qcow2", 65536, "");
        let arg = format!("size={size}");
        let m = run_tool(&img_bin(), &["-o", &arg], &ours);
        let q = run_tool(Path::new("qemu-img"), &["-o", &arg], &theirs);
        assert_eq!(m.code, q.code, "{size}: {} / {}", m.stderr, q.stderr);
        assert_eq!(
            m.stderr.replace("img:", ""),
            q.stderr.replace("qemu-img:", ""),
            "{size}"
        );
        assert_qemu_check_clean(&ours);
        assert_qemu_compare_identical(&ours, "qcow2", &theirs, "qcow2");
    }
}

/// Reads the whole guest disk of an image file through img-core.
fn guest_content(bytes: &[u8], what: &str) -> Vec<u8> {
    let storage = Arc::new(RecordingStorage::default());
    storage.state.lock().unwrap().0 = bytes.to_vec();
    let img = open_storage(
        storage,
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{what}: img cannot open the crash image: {e}"));
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0)
        .unwrap_or_else(|e| panic!("{what}: read failed: {e}"));
    buf
}

/// `qemu-img check` of a crash image: no corruptions (leaks are allowed).
fn assert_no_corruption(bytes: &[u8], what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("crash.qcow2");
    std::fs::write(&p, bytes).unwrap();
    let out = common::run(
        "qemu-img",
        &["check", "--output=json", "-f", "qcow2", p.to_str().unwrap()],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{what}: {text}{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["corruptions"].as_u64().unwrap_or(0), 0, "{what}: {text}");
    assert_eq!(v["check-errors"].as_u64().unwrap_or(0), 0, "{what}: {text}");
}

/// A crash at any point of an amend leaves an image that is consistent (at worst leaky) and
/// reads the same as before: the new refcount structure is complete and durable before the
/// header points at it, expanded zero clusters are durable before the header drops version 3.
#[test]
fn crash_during_amend_is_safe() {
    let cases: Vec<(u64, AmendOptions)> = vec![
        (
            4096,
            AmendOptions {
                refcount_bits: Some(64),
                ..Default::default()
            },
        ),
        (
            512,
            AmendOptions {
                refcount_bits: Some(2),
                ..Default::default()
            },
        ),
        (
            65536,
            AmendOptions {
                compat: Some("0.10".into()),
                ..Default::default()
            },
        ),
        (
            4096,
            AmendOptions {
                compat: Some("0.10".into()),
                refcount_bits: Some(16),
                lazy_refcounts: Some(false),
                ..Default::default()
            },
        ),
    ];
    for (i, (cluster, opts)) in cases.into_iter().enumerate() {
        let storage = Arc::new(RecordingStorage::default());
        let size = 4u64 << 20;
        create_on(
            storage.clone(),
            &Qcow2CreateOptions {
                size,
                cluster_size: cluster,
                refcount_bits: if i == 3 { 8 } else { 16 },
                lazy_refcounts: i == 3,
                ..Default::default()
            },
        )
        .unwrap();
        let mut img = open_storage(storage.clone(), &OpenOptions::default()).unwrap();
        let mut rng = StdRng::seed_from_u64(i as u64);
        for _ in 0..40 {
            let off = rng.random_range(0..size / cluster) * cluster;
            let len = (rng.random_range(1..4) * cluster).min(size - off);
            match rng.random_range(0..3) {
                0 => img.write_zeroes(off, len, rng.random_bool(0.5)).unwrap(),
                _ => img
                    .write_at(&vec![rng.random_range(1..255u8); len as usize], off)
                    .unwrap(),
            }
        }
        img.flush().unwrap();
        let before = storage.state.lock().unwrap().0.clone();
        let expected = guest_content(&before, "before");
        let start = epochs(&storage.log());
        amend_image(&mut img, &opts, &mut |_| {}).unwrap();
        img.close().unwrap();
        let log = storage.log();
        let end = epochs(&log);
        assert!(
            end > start + 2,
            "case {i}: the amend flushed {}",
            end - start
        );
        let after = storage.state.lock().unwrap().0.clone();
        assert_eq!(guest_content(&after, "after"), expected, "case {i}");
        for epoch in start..=end {
            for round in 0..3 {
                let what = format!("case {i}, crash in epoch {epoch}, round {round}");
                let bytes = crash_image(&log, epoch, &mut || rng.random_bool(0.5));
                assert_no_corruption(&bytes, &what);
                assert_eq!(guest_content(&bytes, &what), expected, "{what}");
            }
        }
    }
}
