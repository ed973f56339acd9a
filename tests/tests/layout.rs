//! Fresh images are laid out exactly as qemu-img lays them out.

mod common;

use img_core::qcow2::{self, CompressionType, Qcow2CreateOptions};
use std::fs;

fn compare_with_qemu(cluster_size: u64, version: u32, refcount_bits: u32, size: u64, extra: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    let compat = if version == 3 { "1.1" } else { "0.10" };
    let zstd = extra.contains("zstd");
    let lazy = extra.contains("lazy");
    qcow2::create(
        &ours,
        &Qcow2CreateOptions {
            size,
            cluster_size,
            version,
            refcount_bits,
            lazy_refcounts: lazy,
            compression_type: if zstd {
                CompressionType::Zstd
            } else {
                CompressionType::Zlib
            },
            ..Default::default()
        },
    )
    .unwrap();
    let mut o =
        format!("cluster_size={cluster_size},compat={compat},refcount_bits={refcount_bits}");
    if zstd {
        o.push_str(",compression_type=zstd");
    }
    if lazy {
        o.push_str(",lazy_refcounts=on");
    }
    common::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &o,
        &theirs.display().to_string(),
        &size.to_string(),
    ]);
    let a = fs::read(&ours).unwrap();
    let b = fs::read(&theirs).unwrap();
    assert_eq!(a.len(), b.len(), "file sizes differ for {o} size {size}");
    if let Some(i) = (0..a.len()).find(|&i| a[i] != b[i]) {
        panic!("{o} size {size}: first difference at byte {i:#x}");
    }
    common::assert_qemu_check_clean(&ours);
}

#[test]
fn same_bytes_as_qemu_img_for_every_cluster_size() {
    for cs in [512u64, 4096, 65536, 2 << 20] {
        for version in [2u32, 3] {
            compare_with_qemu(cs, version, 16, 1 << 30, "");
        }
    }
}

#[test]
fn same_bytes_as_qemu_img_for_every_refcount_width() {
    for bits in [1u32, 2, 4, 8, 16, 32, 64] {
        compare_with_qemu(65536, 3, bits, 10 << 30, "");
        compare_with_qemu(512, 3, bits, 64 << 20, "");
    }
}

#[test]
fn same_bytes_as_qemu_img_for_options_and_odd_sizes() {
    compare_with_qemu(65536, 3, 16, 0, "");
    compare_with_qemu(65536, 3, 16, 12345 * 512, "zstd");
    compare_with_qemu(65536, 3, 16, 1 << 40, "lazy");
    compare_with_qemu(4096, 2, 16, 3 << 30, "");
}
