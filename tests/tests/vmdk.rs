//! VMDK: images made by qemu-img in every subformat are read by img as qemu reads them
//! (byte for byte, and `info`/`map` output alike); images img writes pass `qemu-img check`
//! and compare equal with their source under qemu-img.

mod common;

use common::{img, img_ok, qemu_img, run};
use std::path::Path;

const SUBFORMATS: &[&str] = &[
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
];

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs qemu-io on a vmdk image and asserts success.
fn qemu_io(image: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    common::qemu_io("vmdk", image, &cmds);
}

/// qemu-io writes that leave partial grains, zeroed ranges (whole and partial grains) and
/// untouched grains between them.
const WRITES: &[&str] = &[
    "write -P 0x11 0 100k",
    "write -P 0x22 200k 3k",
    "write -z 1M 128k",
    "write -P 0x33 1100k 10k",
    "write -z 1104k 2k",
    "write -P 0x44 3M 64k",
    "write -P 0x55 5242368 512",
];

/// A raw file with the same content as [`WRITES`] leave, for subformats qemu-io cannot
/// write at random places (streamOptimized).
fn raw_source(dir: &Path, size: u64) -> std::path::PathBuf {
    let raw = dir.join("src.raw");
    qemu_img(&["create", "-q", "-f", "raw", &s(&raw), &size.to_string()]);
    let cmds: Vec<String> = WRITES.iter().map(|c| c.to_string()).collect();
    common::qemu_io("raw", &raw, &cmds);
    raw
}

/// Asserts img reads `image` exactly as qemu-img does: both convert it to raw and the
/// files are compared byte for byte.
fn assert_reads_like_qemu(image: &Path) {
    let dir = image.parent().unwrap();
    let by_qemu = dir.join("by-qemu.raw");
    let by_img = dir.join("by-img.raw");
    qemu_img(&["convert", "-O", "raw", &s(image), &s(&by_qemu)]);
    img_ok(&["convert", "-O", "raw", &s(image), &s(&by_img)]);
    let a = std::fs::read(&by_qemu).unwrap();
    let b = std::fs::read(&by_img).unwrap();
    assert_eq!(a.len(), b.len(), "{}: sizes differ", image.display());
    assert!(a == b, "{}: content differs from qemu's", image.display());
    // The content is not trivially empty (a reader returning zeros would pass otherwise).
    assert!(a.iter().any(|&x| x != 0));
    // img compare agrees, reading the vmdk against qemu's raw copy.
    img_ok(&["compare", "-F", "raw", &s(image), &s(&by_qemu)]);
}

/// Asserts `img ARGS` prints what `qemu-img ARGS` prints (stdout, exit code).
fn assert_same_output(args: &[&str]) {
    let q = run("qemu-img", args);
    let i = img(args);
    assert_eq!(
        String::from_utf8_lossy(&i.stdout),
        String::from_utf8_lossy(&q.stdout),
        "img {args:?} differs from qemu-img"
    );
    assert_eq!(i.status.code(), q.status.code(), "exit code of {args:?}");
}

fn assert_info_and_map_like_qemu(image: &Path) {
    let p = s(image);
    for out in ["human", "json"] {
        assert_same_output(&["info", &format!("--output={out}"), &p]);
        assert_same_output(&["map", &format!("--output={out}"), &p]);
    }
}

/// Makes an image of `subformat` holding [`WRITES`], the way qemu makes it.
fn qemu_image(dir: &Path, subformat: &str, extra: &str) -> std::path::PathBuf {
    let size = 5u64 << 20;
    let image = dir.join(format!("{subformat}.vmdk"));
    let opts = format!("subformat={subformat}{extra}");
    if subformat == "streamOptimized" {
        let raw = raw_source(dir, size);
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-o",
            &opts,
            &s(&raw),
            &s(&image),
        ]);
    } else {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &opts,
            &s(&image),
            &size.to_string(),
        ]);
        qemu_io(&image, WRITES);
    }
    image
}

#[test]
fn every_subformat_made_by_qemu_reads_as_qemu_reads_it() {
    for sub in SUBFORMATS {
        let dir = tempfile::tempdir().unwrap();
        let image = qemu_image(dir.path(), sub, "");
        assert_reads_like_qemu(&image);
        assert_info_and_map_like_qemu(&image);
    }
}

#[test]
fn zeroed_grains_read_as_zeros() {
    for sub in ["monolithicSparse", "twoGbMaxExtentSparse"] {
        let dir = tempfile::tempdir().unwrap();
        let image = qemu_image(dir.path(), sub, ",zeroed_grain=on");
        // Zero a range that held data: with zeroed grains qemu marks whole grains zeroed.
        qemu_io(&image, &["write -z 0 128k", "write -z 3M 64k"]);
        assert_reads_like_qemu(&image);
        assert_info_and_map_like_qemu(&image);
        let map = img_ok(&["map", "--output=json", &s(&image)]);
        assert!(
            map.contains("\"start\": 0, \"length\": 131072, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"),
            "{map}"
        );
    }
}

#[test]
fn split_images_span_several_extent_files() {
    // Larger than 2 GiB, so that qemu splits the disk into several extent files; data is
    // written across the boundaries between them.
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("split.vmdk");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            &s(&image),
            "5G",
        ]);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(
            files >= 4,
            "{sub}: expected several extent files, got {files}"
        );
        let edge = (2u64 << 30) - (1 << 16);
        let far = (9u64 << 29) + 777;
        qemu_io(
            &image,
            &[
                &format!("write -P 0x61 {} 256k", edge - 100_000),
                &format!("write -P 0x62 {far} 100k"),
                "write -P 0x63 0 64k",
            ],
        );
        // Through a qcow2 copy made by img, compared by qemu with the vmdk it reads itself.
        let copy = dir.path().join("copy.qcow2");
        img_ok(&["convert", "-O", "qcow2", &s(&image), &s(&copy)]);
        common::assert_qemu_compare_identical(&copy, "qcow2", &image, "vmdk");
        // A read at the edge through img agrees with qemu-io's pattern check.
        let piece = dir.path().join("piece.qcow2");
        img_ok(&["convert", "-O", "qcow2", &s(&image), &s(&piece)]);
        common::qemu_io(
            "qcow2",
            &piece,
            &[
                format!("read -P 0x61 {} 256k", edge - 100_000),
                format!("read -P 0x62 {far} 100k"),
            ],
        );
        assert_info_and_map_like_qemu(&image);
    }
}

#[test]
fn descriptor_with_zero_extent_and_offsets() {
    // A hand-written descriptor: a flat extent that starts inside its file, a ZERO extent
    // and a second flat extent; the ZERO extent reads as zeros (VMware's meaning).
    let dir = tempfile::tempdir().unwrap();
    let flat = dir.path().join("data.bin");
    let mut bytes = vec![0u8; 4 << 20];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i / 512 % 251) as u8 + 1;
    }
    std::fs::write(&flat, &bytes).unwrap();
    let desc = dir.path().join("d.vmdk");
    std::fs::write(
        &desc,
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\n# Extent description\n\
         RW 2048 FLAT \"data.bin\" 1024\nRW 2048 ZERO\nRW 1024 FLAT \"data.bin\" 0\n",
    )
    .unwrap();
    let out = dir.path().join("out.raw");
    img_ok(&["convert", "-O", "raw", &s(&desc), &s(&out)]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(got.len(), 5 << 19);
    assert!(got[..1 << 20] == bytes[512 << 10..(512 << 10) + (1 << 20)]);
    assert!(got[1 << 20..2 << 20].iter().all(|&b| b == 0));
    assert!(got[2 << 20..] == bytes[..512 << 10]);
    let info = img_ok(&["info", "--output=json", &s(&desc)]);
    assert!(info.contains("\"cid\": 305419896"), "{info}");
    assert!(info.contains("\"format\": \"ZERO\""), "{info}");
}

#[test]
fn probing_finds_vmdk_and_files_are_opened_read_only_for_reading() {
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_image(dir.path(), "monolithicFlat", "");
    let flat = dir.path().join("monolithicFlat-flat.vmdk");
    let mut perm = std::fs::metadata(&flat).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&flat, perm).unwrap();
    // Reading needs no write access to the extent file (root ignores the mode, so this
    // only proves the open path when run unprivileged; the read must work either way).
    let info = img_ok(&["info", &s(&image)]);
    assert!(info.contains("file format: vmdk"), "{info}");
    assert_reads_like_qemu(&image);
}
