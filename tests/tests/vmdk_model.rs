//! A property test of VMDK writes: random writes, zero writes and flushes through img's
//! generic access path on the sparse subformats (and a flat one), mixed with writes by
//! qemu-io between sessions, against a model of the disk. After each session the image must
//! pass `qemu-img check`, read back as the model through img, and compare identical to the
//! model by `qemu-img compare`.

mod common;

use common::{assert_qemu_compare_identical, img_ok, run};
use proptest::prelude::*;
use std::path::Path;

const SIZE: u64 = 8 << 20;

#[derive(Clone, Debug)]
enum Op {
    /// Written by img: a pattern seeded by the byte.
    Write(u64, u64, u8),
    /// Zeros written by img (zero detection may turn them into zeroed grains).
    Zeros(u64, u64),
    /// A flush by img.
    Flush,
    /// Written by qemu-io, in a session of its own.
    Qemu(u64, u64, u8),
}

fn op() -> impl Strategy<Value = Op> {
    let span = (0..SIZE - 1).prop_flat_map(|off| (Just(off), 1..(SIZE - off).min(300_000)));
    prop_oneof![
        5 => (span.clone(), 1u8..250).prop_map(|((o, l), s)| Op::Write(o, l, s)),
        2 => span.clone().prop_map(|(o, l)| Op::Zeros(o, l)),
        1 => Just(Op::Flush),
        2 => (span, 1u8..250).prop_map(|((o, l), s)| Op::Qemu(o, l, s)),
    ]
}

fn check_clean(image: &Path) {
    let out = run(
        "qemu-img",
        &["check", "-f", "vmdk", image.to_str().unwrap()],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "{text}"
    );
}

fn run_model(subformat: &str, extra: &str, ops: &[Op]) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("m.vmdk");
    let mut opts = format!("subformat={subformat}");
    if !extra.is_empty() {
        opts.push(',');
        opts.push_str(extra);
    }
    img_ok(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        &opts,
        image.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    let mut model = vec![0u8; SIZE as usize];
    let mut session: Option<img_core::Image> = None;
    for op in ops {
        match *op {
            Op::Qemu(off, len, seed) => {
                if let Some(img) = session.take() {
                    img.close().unwrap();
                }
                common::qemu_io("vmdk", &image, &[format!("write -P {seed} {off} {len}")]);
                model[off as usize..(off + len) as usize].fill(seed);
            }
            _ => {
                let img = session.get_or_insert_with(|| common::open(&image, "vmdk", false));
                match *op {
                    Op::Write(off, len, seed) => {
                        let data = common::pattern(seed, off, len as usize);
                        img.write_at(&data, off).unwrap();
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    }
                    Op::Zeros(off, len) => {
                        img.write_zeroes(off, len, true).unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    Op::Flush => img.flush().unwrap(),
                    Op::Qemu(..) => unreachable!(),
                }
            }
        }
    }
    if let Some(img) = session.take() {
        img.close().unwrap();
    }
    check_clean(&image);
    let reference = dir.path().join("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_qemu_compare_identical(&image, "vmdk", &reference, "raw");
    let img = common::open(&image, "vmdk", true);
    common::assert_image_matches_raw(&img, &reference);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10, .. ProptestConfig::default() })]

    #[test]
    fn monolithic_sparse_follows_the_model(ops in prop::collection::vec(op(), 1..24)) {
        run_model("monolithicSparse", "", &ops);
    }

    #[test]
    fn sparse_with_zeroed_grains_follows_the_model(ops in prop::collection::vec(op(), 1..24)) {
        run_model("monolithicSparse", "zeroed_grain=on", &ops);
    }

    #[test]
    fn split_sparse_follows_the_model(ops in prop::collection::vec(op(), 1..24)) {
        run_model("twoGbMaxExtentSparse", "", &ops);
    }

    #[test]
    fn flat_follows_the_model(ops in prop::collection::vec(op(), 1..16)) {
        run_model("monolithicFlat", "", &ops);
    }
}

/// A VMDK child whose parent was written after it was made (the parent's CID no longer
/// matches the child's parentCID) is refused for reads that reach the parent, as qemu
/// refuses them; info and map still work, as in qemu.
#[test]
fn a_child_of_a_changed_parent_is_refused_as_qemu_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    let top = dir.path().join("top.vmdk");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    common::qemu_img(&["create", "-q", "-f", "vmdk", b, "1M"]);
    common::qemu_img(&["create", "-q", "-f", "vmdk", "-b", b, "-F", "vmdk", t]);
    let out = dir.path().join("o.raw");
    let o = out.to_str().unwrap();
    // Before the parent changes, both read the chain.
    assert!(run("qemu-img", &["convert", "-O", "raw", t, o])
        .status
        .success());
    assert!(common::img(&["convert", "-O", "raw", t, o])
        .status
        .success());
    common::qemu_io("vmdk", &base, &["write -P 1 0 64k".to_string()]);
    let q = run("qemu-img", &["convert", "-O", "raw", t, o]);
    let i = common::img(&["convert", "-O", "raw", t, o]);
    assert_eq!(q.status.code(), Some(1), "qemu-img refuses");
    assert_eq!(i.status.code(), Some(1), "img refuses");
    // The same words up to the reason, which img states more fully.
    let prefix = "error while reading at byte 0: Invalid argument";
    assert!(String::from_utf8_lossy(&q.stderr).starts_with(&format!("qemu-img: {prefix}")));
    assert!(
        String::from_utf8_lossy(&i.stderr).starts_with(&format!("img: {prefix}")),
        "{}",
        String::from_utf8_lossy(&i.stderr)
    );
    for args in [&["info", t][..], &["map", "--output=json", t]] {
        let q = run("qemu-img", args);
        let i = common::img(args);
        assert_eq!(q.status.code(), i.status.code(), "{args:?}");
        assert_eq!(q.stdout, i.stdout, "{args:?}");
    }
}

/// Conversions between vmdk and qcow2 in both directions (every vmdk subformat), compared
/// by qemu-img with the source and checked.
#[test]
fn vmdk_and_qcow2_convert_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("src.qcow2");
    let qs = q.to_str().unwrap();
    common::qemu_img(&["create", "-q", "-f", "qcow2", qs, "5M"]);
    common::qemu_io(
        "qcow2",
        &q,
        &[
            "write -P 3 0 100k".to_string(),
            "write -c -P 4 1M 64k".to_string(),
            "write -z 2M 64k".to_string(),
            "write -P 5 4095k 1k".to_string(),
        ],
    );
    for sub in [
        "monolithicSparse",
        "monolithicFlat",
        "twoGbMaxExtentSparse",
        "twoGbMaxExtentFlat",
        "streamOptimized",
    ] {
        let v = dir.path().join(format!("{sub}.vmdk"));
        let vs = v.to_str().unwrap();
        let opt = format!("subformat={sub}");
        img_ok(&["convert", "-f", "qcow2", "-O", "vmdk", "-o", &opt, qs, vs]);
        check_clean(&v);
        assert_qemu_compare_identical(&v, "vmdk", &q, "qcow2");
        let back = dir.path().join(format!("{sub}.qcow2"));
        let bs = back.to_str().unwrap();
        img_ok(&["convert", "-f", "vmdk", "-O", "qcow2", vs, bs]);
        common::assert_qemu_check_clean(&back);
        assert_qemu_compare_identical(&back, "qcow2", &q, "qcow2");
        // And what qemu-img makes of img's vmdk is the same.
        let theirs = dir.path().join(format!("{sub}-q.qcow2"));
        common::qemu_img(&["convert", "-O", "qcow2", vs, theirs.to_str().unwrap()]);
        assert_qemu_compare_identical(&theirs, "qcow2", &q, "qcow2");
    }
}
