//! Images made by qemu-img 10 and committed under `fixtures/` read back as qemu wrote them.

use img_core::{open_image, OpenOptions};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("fixtures")
        .join(name)
}

/// Reads the whole image and checks it against `(offset, len, byte)` runs; the rest is zero.
fn assert_content(name: &str, runs: &[(u64, u64, u8)]) {
    let img = open_image(
        &fixture(name),
        &OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut disk = vec![0u8; img.size() as usize];
    // Odd-sized reads cross cluster boundaries and compressed clusters.
    for (i, chunk) in disk.chunks_mut(3001).enumerate() {
        img.read_at(chunk, i as u64 * 3001).unwrap();
    }
    let mut expected = vec![0u8; disk.len()];
    for &(off, len, b) in runs {
        expected[off as usize..(off + len) as usize].fill(b);
    }
    assert!(
        disk == expected,
        "{name}: content differs from what qemu-io wrote"
    );
}

#[test]
fn qemu_written_fixtures_read_back() {
    assert_content(
        "v2-512.qcow2",
        &[(0, 2048, 0xa5), (2560, 1536, 0xa5), (300 << 10, 1024, 0x5a)],
    );
    let runs = [(0, 64 << 10, 0x11), (512 << 10, 100 << 10, 0x22)];
    assert_content("zstd-4k.qcow2", &runs);
    assert_content("zlib-64k.qcow2", &runs);
}
