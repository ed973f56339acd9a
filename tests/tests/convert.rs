//! `img convert` against qemu-img: content, allocation (sparseness) and compression.

mod common;

use common::{assert_qemu_check_clean, img, img_ok, qemu_img, qemu_io, run};
use std::path::{Path, PathBuf};

/// A raw source with data, explicit zero runs of several lengths, and holes.
fn make_source(dir: &Path) -> PathBuf {
    let src = dir.join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", src.to_str().unwrap(), "16M"]);
    let cmds: Vec<String> = vec![
        "write -P 0x11 0 64k".into(),
        "write -P 0x22 80k 3k".into(), // unaligned, inside a 64k cluster
        "write -P 0x33 1M 1M".into(),
        "write -P 0 1200k 8k".into(), // explicit zeros inside data
        "write -P 0x44 3000001 5000".into(), // unaligned start and length
        "write -P 0x55 8M 4k".into(),
        "write -P 0 8196k 12k".into(), // explicit zeros after data
        "write -P 0x66 8208k 512".into(),
        "write -P 0x77 16380k 4k".into(), // the very end
    ];
    qemu_io("raw", &src, &cmds);
    src
}

/// The allocation map without host offsets: (start, length, data, zero) per extent, with
/// neighbours of the same kind merged (where the clusters landed in the file is not the
/// question, only which guest ranges are allocated).
fn allocation(image: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = qemu_img(&["map", "--output=json", image.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut merged: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v.as_array().unwrap() {
        let x = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
            e["zero"].as_bool().unwrap(),
        );
        match merged.last_mut() {
            Some(l) if l.0 + l.1 == x.0 && (l.2, l.3) == (x.2, x.3) => l.1 += x.1,
            _ => merged.push(x),
        }
    }
    merged
}

fn compare(a: &Path, b: &Path) {
    common::assert_qemu_compare_identical(a, detect(a), b, detect(b));
}

fn detect(p: &Path) -> &'static str {
    if p.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    }
}

#[test]
fn raw_to_qcow2_to_raw_with_every_layout() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    for o in [
        "cluster_size=65536",
        "cluster_size=512",
        "cluster_size=4096,refcount_bits=1",
        "cluster_size=2M,refcount_bits=64",
        "compat=0.10",
        "lazy_refcounts=on",
    ] {
        let q = dir.path().join("out.qcow2");
        let _ = std::fs::remove_file(&q);
        img_ok(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            o,
            src.to_str().unwrap(),
            q.to_str().unwrap(),
        ]);
        assert_qemu_check_clean(&q);
        compare(&src, &q);
        let back = dir.path().join("back.raw");
        img_ok(&[
            "convert",
            "-O",
            "raw",
            q.to_str().unwrap(),
            back.to_str().unwrap(),
        ]);
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(&back).unwrap(),
            "{o}"
        );
        // qcow2 -> qcow2 with another layout.
        let q2 = dir.path().join("out2.qcow2");
        let _ = std::fs::remove_file(&q2);
        img_ok(&[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k",
            q.to_str().unwrap(),
            q2.to_str().unwrap(),
        ]);
        assert_qemu_check_clean(&q2);
        compare(&src, &q2);
    }
}

#[test]
fn sparseness_matches_qemu_img_for_every_s_value() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    for (fmt, o) in [
        ("qcow2", "cluster_size=4096"),
        ("qcow2", "cluster_size=65536"),
        ("raw", ""),
    ] {
        for s in [None, Some("512"), Some("8k"), Some("64k"), Some("0")] {
            let ours = dir.path().join(format!("ours.{fmt}"));
            let theirs = dir.path().join(format!("theirs.{fmt}"));
            for p in [&ours, &theirs] {
                let _ = std::fs::remove_file(p);
            }
            let mut args = vec!["convert", "-O", fmt];
            if !o.is_empty() {
                args.extend(["-o", o]);
            }
            if let Some(s) = s {
                args.extend(["-S", s]);
            }
            let mut a = args.clone();
            a.extend([src.to_str().unwrap(), ours.to_str().unwrap()]);
            img_ok(&a);
            let mut b = args.clone();
            b.extend([src.to_str().unwrap(), theirs.to_str().unwrap()]);
            qemu_img(&b);
            compare(&src, &ours);
            if fmt == "qcow2" {
                assert_qemu_check_clean(&ours);
            }
            assert_eq!(
                allocation(&ours),
                allocation(&theirs),
                "allocation differs from qemu-img for -O {fmt} {o} -S {s:?}"
            );
        }
    }
}

#[test]
fn compressed_output_zlib_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    for ctype in ["zlib", "zstd"] {
        for cs in ["4k", "64k", "2M"] {
            let q = dir.path().join("c.qcow2");
            let _ = std::fs::remove_file(&q);
            let o = format!("compression_type={ctype},cluster_size={cs}");
            img_ok(&[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &o,
                src.to_str().unwrap(),
                q.to_str().unwrap(),
            ]);
            assert_qemu_check_clean(&q);
            compare(&src, &q);
            let map = qemu_img(&["map", "--output=json", q.to_str().unwrap()]);
            assert!(
                map.contains("\"compressed\": true"),
                "{o}: no compressed clusters:\n{map}"
            );
            // And back through img's own decompression.
            let back = dir.path().join("back.raw");
            img_ok(&[
                "convert",
                "-O",
                "raw",
                q.to_str().unwrap(),
                back.to_str().unwrap(),
            ]);
            assert_eq!(
                std::fs::read(&src).unwrap(),
                std::fs::read(&back).unwrap(),
                "{o}"
            );
        }
    }
}

#[test]
fn qemu_made_images_convert_to_identical_raw() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    for args in [
        vec!["-O", "qcow2", "-o", "compat=0.10"],
        vec!["-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64"],
        vec!["-c", "-O", "qcow2"],
        vec![
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd,cluster_size=16k",
        ],
    ] {
        let q = dir.path().join("q.qcow2");
        let _ = std::fs::remove_file(&q);
        let mut a = vec!["convert"];
        a.extend(&args);
        a.extend([src.to_str().unwrap(), q.to_str().unwrap()]);
        qemu_img(&a);
        let back = dir.path().join("back.raw");
        img_ok(&[
            "convert",
            "-O",
            "raw",
            q.to_str().unwrap(),
            back.to_str().unwrap(),
        ]);
        assert_eq!(
            std::fs::read(&src).unwrap(),
            std::fs::read(&back).unwrap(),
            "{args:?}"
        );
    }
}

#[test]
fn into_existing_image_with_n_overwrites_old_data() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let q = dir.path().join("existing.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", q.to_str().unwrap(), "16M"]);
    // Old content everywhere the source has holes or zeros.
    qemu_io("qcow2", &q, &["write -P 0xee 0 16M".to_string()]);
    img_ok(&[
        "convert",
        "-n",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    assert_qemu_check_clean(&q);
    compare(&src, &q);
}

#[test]
fn several_sources_are_concatenated() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_source(dir.path());
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "1M"]);
    qemu_io("qcow2", &b, &["write -P 0x99 4k 100k".to_string()]);
    let ours = dir.path().join("cat.qcow2");
    let theirs = dir.path().join("cat.raw");
    img_ok(&[
        "convert",
        "-O",
        "qcow2",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        ours.to_str().unwrap(),
    ]);
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        theirs.to_str().unwrap(),
    ]);
    assert_qemu_check_clean(&ours);
    compare(&theirs, &ours);
}

#[test]
fn errors_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let out = dir.path().join("o.qcow2");
    let (s, o) = (src.to_str().unwrap(), out.to_str().unwrap());
    let missing = dir.path().join("missing");
    let m = missing.to_str().unwrap();
    for args in [
        vec!["convert", "-O", "qcow2", m, o],
        vec!["convert", "-m", "17", "-O", "qcow2", s, o],
        vec!["convert", "-O", "qcow2", s],
    ] {
        let ours = img(&args);
        let theirs = run("qemu-img", &args);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "exit code of {args:?}"
        );
        let e = String::from_utf8_lossy(&ours.stderr);
        assert!(e.starts_with("img: "), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{args:?}: {e}");
    }
    let ours = img(&["convert", "-O", "qcow2", m, o]);
    assert!(String::from_utf8_lossy(&ours.stderr).contains("No such file or directory"));
}

#[test]
fn parallel_and_out_of_order_conversions_are_identical() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    for args in [
        vec!["-m", "1"],
        vec!["-m", "16"],
        vec!["-m", "16", "-W"],
        vec!["-W", "-o", "cluster_size=512"],
        vec!["-c", "-m", "4"],
        vec!["-c", "-W", "-o", "compression_type=zstd,cluster_size=4k"],
    ] {
        let q = dir.path().join("p.qcow2");
        let _ = std::fs::remove_file(&q);
        let mut a = vec!["convert", "-O", "qcow2"];
        a.extend(&args);
        a.extend([src.to_str().unwrap(), q.to_str().unwrap()]);
        img_ok(&a);
        assert_qemu_check_clean(&q);
        compare(&src, &q);
    }
    // In-order writes give the same layout whatever the number of workers.
    let one = dir.path().join("one.qcow2");
    let many = dir.path().join("many.qcow2");
    img_ok(&[
        "convert",
        "-m",
        "1",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        one.to_str().unwrap(),
    ]);
    img_ok(&[
        "convert",
        "-m",
        "16",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        many.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&one).unwrap() == std::fs::read(&many).unwrap());
}

#[test]
fn copy_offload_between_raw_files_keeps_content_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src = make_source(dir.path());
    let out = dir.path().join("out.raw");
    img_ok(&[
        "convert",
        "-C",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&out).unwrap());
    // The source's holes are holes in the copy too (allocated blocks about the same).
    let blocks = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks()
    };
    assert!(
        blocks(&out) <= blocks(&src) + 16,
        "{} vs {}",
        blocks(&out),
        blocks(&src)
    );
    // -C into qcow2 falls back to the ordinary path.
    let q = dir.path().join("out.qcow2");
    img_ok(&[
        "convert",
        "-C",
        "-O",
        "qcow2",
        src.to_str().unwrap(),
        q.to_str().unwrap(),
    ]);
    assert_qemu_check_clean(&q);
    compare(&src, &q);
}
