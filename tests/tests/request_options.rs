//! qemu's `detect-zeroes=` and `discard=` request options.

mod common;

use img_core::qcow2::{self, Qcow2CreateOptions};
use img_core::{open_image, DetectZeroes, DiscardMode, OpenOptions};
use std::path::Path;

fn map(image: &Path) -> serde_json::Value {
    serde_json::from_str(&common::qemu_img(&[
        "map",
        "--output=json",
        image.to_str().unwrap(),
    ]))
    .unwrap()
}

/// (data, zero) of the extent that holds `offset`.
fn status_at(image: &Path, offset: u64) -> (bool, bool) {
    for e in map(image).as_array().unwrap() {
        let (s, l) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        if (s..s + l).contains(&offset) {
            return (e["data"].as_bool().unwrap(), e["zero"].as_bool().unwrap());
        }
    }
    panic!("offset {offset} not in the map");
}

fn new_image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("r.qcow2");
    qcow2::create(
        &p,
        &Qcow2CreateOptions {
            size: 8 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    p
}

#[test]
fn detect_zeroes_turns_zero_writes_into_zero_clusters() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, expect_data) in [
        (DetectZeroes::Off, true),
        (DetectZeroes::On, false),
        (DetectZeroes::Unmap, false),
    ] {
        let p = new_image(dir.path());
        let img = open_image(
            &p,
            &OpenOptions {
                detect_zeroes: mode,
                ..Default::default()
            },
        )
        .unwrap();
        img.write_at(&[5u8; 65536], 0).unwrap();
        img.write_at(&vec![0u8; 65536], 65536).unwrap();
        // Zeros over allocated data: with detection the cluster becomes a zero cluster.
        img.write_at(&vec![0u8; 65536], 0).unwrap();
        img.close().unwrap();
        common::assert_qemu_check_clean(&p);
        assert_eq!(
            status_at(&p, 65536).0,
            expect_data,
            "{mode:?}: fresh zero write"
        );
        assert_eq!(status_at(&p, 0).0, expect_data, "{mode:?}: zeros over data");
        let raw = dir.path().join("zero.raw");
        std::fs::write(&raw, vec![0u8; 8 << 20]).unwrap();
        common::assert_qemu_compare_identical(&raw, "raw", &p, "qcow2");
    }
}

#[test]
fn discard_ignore_keeps_data_and_unmap_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, kept) in [(DiscardMode::Ignore, true), (DiscardMode::Unmap, false)] {
        let p = new_image(dir.path());
        let img = open_image(
            &p,
            &OpenOptions {
                discard: mode,
                ..Default::default()
            },
        )
        .unwrap();
        img.write_at(&[9u8; 4 << 20], 0).unwrap();
        img.discard(0, 2 << 20).unwrap();
        let mut b = vec![0u8; 65536];
        img.read_at(&mut b, 0).unwrap();
        assert_eq!(b.iter().all(|&x| x == 9), kept, "{mode:?}");
        img.close().unwrap();
        common::assert_qemu_check_clean(&p);
        assert_eq!(status_at(&p, 0).0, kept, "{mode:?}");
    }
}
