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

/// `qemu-img check -f vmdk` passes.
fn assert_qemu_check_clean_vmdk(image: &Path) {
    let out = run("qemu-img", &["check", "-f", "vmdk", &s(image)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        image.display()
    );
}

/// All files of an image (descriptor and extents) with the CID lines blanked, in name order.
fn files_without_cid(dir: &Path, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    for n in names {
        let path = dir.join(&n);
        let len = std::fs::metadata(&path).unwrap().len();
        // Flat extents are compared by length only (they are empty).
        let mut bytes = if len > 16 << 20 {
            Vec::new()
        } else {
            std::fs::read(&path).unwrap()
        };
        // The descriptor text, wherever it is: compared as text without its CID line,
        // the bytes around it (with the text zeroed) exactly.
        let mut text = String::new();
        if let Some(at) = bytes
            .windows(21)
            .position(|w| w == b"# Disk DescriptorFile")
        {
            let end = at
                + bytes[at..]
                    .iter()
                    .position(|&b| b == 0)
                    .unwrap_or(bytes.len() - at);
            text = String::from_utf8_lossy(&bytes[at..end])
                .lines()
                .filter(|l| !l.starts_with("CID="))
                .collect::<Vec<_>>()
                .join("\n");
            bytes[at..end].fill(0);
        }
        if text.is_empty() {
            // The length of a large (flat) file is all that is compared of it.
            bytes.extend_from_slice(&len.to_le_bytes());
        } else if bytes.iter().all(|&b| b == 0) {
            // A descriptor file: its text is all there is (its length follows the CID).
            bytes.clear();
            bytes.extend_from_slice(text.as_bytes());
        } else {
            bytes.extend_from_slice(text.as_bytes());
        }
        out.push((n[prefix.len()..].to_string(), bytes));
    }
    out
}

#[test]
fn create_lays_out_images_as_qemu_img() {
    let cases: &[&[&str]] = &[
        &["-o", "subformat=monolithicSparse"],
        &["-o", "subformat=monolithicFlat"],
        &["-o", "subformat=twoGbMaxExtentSparse"],
        &["-o", "subformat=twoGbMaxExtentFlat"],
        &["-o", "subformat=streamOptimized"],
        &[
            "-o",
            "zeroed_grain=on,compat6=on,adapter_type=lsilogic,toolsversion=123",
        ],
        &["-o", "hwversion=8,adapter_type=legacyESX"],
    ];
    for size in ["1000", "100M", "5G"] {
        for opts in cases {
            // Same names in two directories: extent names inside must match byte for byte.
            let (qdir, idir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let q = qdir.path().join("a.vmdk");
            let i = idir.path().join("a.vmdk");
            let (qs, is) = (s(&q), s(&i));
            let mut qa = vec!["create", "-q", "-f", "vmdk"];
            qa.extend_from_slice(opts);
            let mut ia = qa.clone();
            qa.extend_from_slice(&[&qs, size]);
            ia.extend_from_slice(&[&is, size]);
            qemu_img(&qa);
            img_ok(&ia);
            let a = files_without_cid(qdir.path(), "a");
            let b = files_without_cid(idir.path(), "a");
            assert_eq!(a.len(), b.len(), "{opts:?} {size}: file count");
            for ((na, ba), (nb, bb)) in a.iter().zip(&b) {
                assert_eq!(na, nb, "{opts:?} {size}");
                assert!(
                    ba == bb,
                    "{opts:?} {size}: {na} differs from qemu-img's:\n{}\n{}",
                    String::from_utf8_lossy(ba).replace('\0', ""),
                    String::from_utf8_lossy(bb).replace('\0', "")
                );
            }
            assert_qemu_check_clean_vmdk(&i);
        }
    }
}

#[test]
fn create_options_and_errors_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| s(&dir.path().join(n));
    let base = d("base.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", &base, "1M"]);
    let qcow = d("q.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &qcow, "1M"]);
    let e = d("e.vmdk");
    let cases: Vec<Vec<&str>> = vec![
        vec!["create", "-f", "vmdk", "-o", "help"],
        vec!["create", "-f", "vmdk", "-o", "help", &e],
        vec!["convert", "-O", "vmdk", "-o", "help"],
        vec!["create", "-f", "vmdk", "-o", "adapter_type=foo", &e, "1M"],
        vec!["create", "-f", "vmdk", "-o", "subformat=foo", &e, "1M"],
        vec![
            "create",
            "-f",
            "vmdk",
            "-o",
            "compat6=on,hwversion=7",
            &e,
            "1M",
        ],
        vec!["create", "-f", "vmdk", "-b", &qcow, "-F", "qcow2", &e],
        vec![
            "create",
            "-f",
            "vmdk",
            "-b",
            &base,
            "-F",
            "vmdk",
            "-o",
            "subformat=monolithicFlat",
            &e,
        ],
        vec![
            "create",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on,compat6=on",
            &e,
            "1M",
        ],
    ];
    for args in cases {
        let q = run("qemu-img", &args);
        let _ = std::fs::remove_file(&e);
        let i = img(&args);
        let _ = std::fs::remove_file(&e);
        assert_eq!(
            String::from_utf8_lossy(&i.stdout),
            String::from_utf8_lossy(&q.stdout),
            "{args:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&i.stderr),
            String::from_utf8_lossy(&q.stderr).replace("qemu-img:", "img:"),
            "{args:?}"
        );
        assert_eq!(i.status.code(), q.status.code(), "{args:?}");
    }
    // A backing file: the parent's CID and name are recorded as qemu records them.
    let child = d("child.vmdk");
    img_ok(&[
        "create", "-q", "-f", "vmdk", "-b", &base, "-F", "vmdk", &child,
    ]);
    let info = img_ok(&["info", "--output=json", &child]);
    let qinfo = qemu_img(&["info", "--output=json", &child]);
    assert_eq!(info, qinfo);
    assert!(qinfo.contains("\"backing-filename\""), "{qinfo}");
    let parent: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", &base])).unwrap();
    let child_v: serde_json::Value = serde_json::from_str(&qinfo).unwrap();
    assert_eq!(
        child_v["format-specific"]["data"]["parent-cid"],
        parent["format-specific"]["data"]["cid"]
    );
}

#[test]
fn convert_to_every_subformat_passes_qemu_check_and_compare() {
    for sub in SUBFORMATS {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", &s(&src), "7M"]);
        common::qemu_io(
            "qcow2",
            &src,
            &WRITES.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        );
        common::qemu_io("qcow2", &src, &["write -P 0x77 7167k 1k".to_string()]);
        let out = dir.path().join("out.vmdk");
        img_ok(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            &s(&src),
            &s(&out),
        ]);
        assert_qemu_check_clean_vmdk(&out);
        common::assert_qemu_compare_identical(&src, "qcow2", &out, "vmdk");
        // And back: img reads what it wrote as qemu does.
        assert_reads_like_qemu(&out);
        if *sub == "streamOptimized" {
            let info = qemu_img(&["info", &s(&out)]);
            assert!(info.contains("compressed: true"), "{info}");
            // Only compressed grains: qemu's map says so for every data range.
            let map = qemu_img(&["map", "--output=json", &s(&out)]);
            assert!(
                !map.contains("\"data\": true, \"compressed\": false"),
                "{map}"
            );
        }
    }
}

#[test]
fn writes_through_the_library_keep_qemu_happy() {
    // Unaligned writes over unallocated grains (copy-on-write of the rest of the grain from
    // zeros), over allocated grains (in place), and into grain tables that do not exist yet
    // (their directory entries are cleared by hand, in both directories).
    for sub in ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("w.vmdk");
        let size: u64 = 100 << 20;
        img_ok(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            &s(&image),
            &size.to_string(),
        ]);
        if sub == "monolithicSparse" {
            // Drop the tables of directory entries 1 and 2 from both directories.
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&image)
                .unwrap();
            let mut h = [0u8; 512];
            f.read_exact_at(&mut h, 0).unwrap();
            let rgd = u64::from_le_bytes(h[48..56].try_into().unwrap()) * 512;
            let gd = u64::from_le_bytes(h[56..64].try_into().unwrap()) * 512;
            for dir_at in [rgd, gd] {
                f.write_all_at(&[0u8; 8], dir_at + 4).unwrap();
            }
        }
        let mut model = vec![0u8; size as usize];
        let writes: &[(u64, usize, u8)] = &[
            (1000, 5000, 1),
            (65536 * 3 + 17, 200_000, 2),
            (40 << 20, 1 << 20, 3),
            ((32 << 20) + 512, 4096, 4),
            (1000, 100, 5),
            (size - 700, 700, 6),
        ];
        {
            let img = common::open(&image, "vmdk", false);
            for &(off, len, seed) in writes {
                let data = common::pattern(seed, off, len);
                img.write_at(&data, off).unwrap();
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            img.close().unwrap();
        }
        assert_qemu_check_clean_vmdk(&image);
        let reference = dir.path().join("model.raw");
        std::fs::write(&reference, &model).unwrap();
        common::assert_qemu_compare_identical(&image, "vmdk", &reference, "raw");
        let img = common::open(&image, "vmdk", true);
        common::assert_image_matches_raw(&img, &reference);
    }
}

/// Patches `bytes` at `at` in the file `path`.
fn patch(path: &Path, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// The header fields of a sparse extent: (rgd, gd) byte offsets.
fn directories(path: &Path) -> (u64, u64) {
    let b = std::fs::read(path).unwrap();
    let at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) * 512;
    (at(48), at(56))
}

/// The byte offset of grain table `index` (from the primary directory).
fn grain_table(path: &Path, index: u64) -> u64 {
    let b = std::fs::read(path).unwrap();
    let (_, gd) = directories(path);
    let o = (gd + 4 * index) as usize;
    u64::from(u32::from_le_bytes(b[o..o + 4].try_into().unwrap())) * 512
}

/// Asserts `img ARGS` and `qemu-img ARGS` print the same (stdout and stderr, with the
/// program name replaced) and exit alike.
fn assert_same_outcome(args: &[&str]) {
    let q = run("qemu-img", args);
    let i = img(args);
    assert_eq!(
        String::from_utf8_lossy(&i.stdout),
        String::from_utf8_lossy(&q.stdout),
        "{args:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&i.stderr),
        String::from_utf8_lossy(&q.stderr).replace("qemu-img:", "img:"),
        "{args:?}"
    );
    assert_eq!(i.status.code(), q.status.code(), "{args:?}");
}

#[test]
fn check_reports_as_qemu_img() {
    for sub in SUBFORMATS {
        let dir = tempfile::tempdir().unwrap();
        let image = qemu_image(dir.path(), sub, "");
        let p = s(&image);
        for args in [
            vec!["check", p.as_str()],
            vec!["check", "--output=json", p.as_str()],
            vec!["check", "-q", p.as_str()],
            vec!["check", "-r", "all", p.as_str()],
        ] {
            assert_same_outcome(&args);
        }
    }
    // A grain table entry pointing past the end of the file: qemu's error, and its exit.
    let dir = tempfile::tempdir().unwrap();
    let image = qemu_image(dir.path(), "monolithicSparse", "");
    let gt = grain_table(&image, 0);
    patch(&image, gt + 4 * 2, &999_999u32.to_le_bytes());
    let p = s(&image);
    assert_same_outcome(&["check", &p]);
    assert_same_outcome(&["check", "--output=json", &p]);
    let out = img(&["check", &p]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sector 256 points after EOF"));
}

/// Opening, reading all of, and writing to a hostile image must fail (or succeed) cleanly:
/// an error naming a file, never a panic.
fn assert_refused_cleanly(image: &Path, expect: &str) {
    let out = img(&[
        "convert",
        "-O",
        "raw",
        &s(image),
        &s(&image.with_extension("out")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}: {stderr}", image.display());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains(expect),
        "{}: expected '{expect}' in: {stderr}",
        image.display()
    );
    let info = img(&["info", &s(image)]);
    assert!(!String::from_utf8_lossy(&info.stderr).contains("panicked"));
}

#[test]
fn hostile_images_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fresh = |name: &str| -> std::path::PathBuf {
        let p = d.join(name);
        qemu_img(&["create", "-q", "-f", "vmdk", &s(&p), "64M"]);
        qemu_io(&p, &["write -P 1 0 1M"]);
        p
    };
    // Header fields out of range, with qemu's messages.
    let p = fresh("gtes.vmdk");
    patch(&p, 44, &4096u32.to_le_bytes());
    assert_refused_cleanly(&p, "L2 table size too big");
    let p = fresh("gran0.vmdk");
    patch(&p, 20, &0u64.to_le_bytes());
    assert_refused_cleanly(&p, "L1 entry size is invalid");
    let p = fresh("granbig.vmdk");
    patch(&p, 20, &(1u64 << 40).to_le_bytes());
    assert_refused_cleanly(&p, "Invalid granularity, image may be corrupt");
    let p = fresh("capacity.vmdk");
    patch(&p, 12, &(1u64 << 62).to_le_bytes());
    assert_refused_cleanly(&p, "L1 size too big");
    let p = fresh("version.vmdk");
    patch(&p, 4, &7u32.to_le_bytes());
    assert_refused_cleanly(&p, "Unsupported VMDK version 7");
    let p = fresh("truncated.vmdk");
    patch(&p, 64, &(1u64 << 40).to_le_bytes());
    assert_refused_cleanly(&p, "File truncated, expecting at least");
    // A huge capacity with a directory that fits the limit: the directory is read only as
    // far as the file holds it (no allocation in proportion to the claim).
    let p = fresh("bigdisk.vmdk");
    patch(&p, 12, &(1u64 << 40).to_le_bytes());
    let info = img_ok(&["info", "--output=json", &s(&p)]);
    assert!(info.contains("\"virtual-size\": 562949953421312"), "{info}");
    // Grain table and grain outside the file.
    let p = fresh("gt-out.vmdk");
    let (rgd, gd) = directories(&p);
    for at in [rgd, gd] {
        patch(&p, at, &0x7fff_ffffu32.to_le_bytes());
    }
    assert_refused_cleanly(&p, "grain table 0 lies outside the extent file");
    let p = fresh("grain-out.vmdk");
    let gt = grain_table(&p, 0);
    patch(&p, gt, &0x7fff_ffffu32.to_le_bytes());
    assert_refused_cleanly(&p, "lies outside the extent file");
    // Offsets near 2^64 (sectors times 512 would overflow): no panic, reads see zeros
    // (the directory is past the end of the file) and writes are refused with the file named.
    let p = fresh("gdfar.vmdk");
    for at in [28u64, 48, 56] {
        patch(&p, at, &(u64::MAX - 5).to_le_bytes());
    }
    let out = img(&["convert", "-O", "raw", &s(&p), &s(&d.join("gdfar.raw"))]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    {
        let opts = img_core::OpenOptions {
            format: Some("vmdk".into()),
            ..Default::default()
        };
        let image = img_core::open_image(&p, &opts).unwrap();
        let err = image.write_at(&[1u8; 512], 0).unwrap_err().to_string();
        assert!(err.contains("grain directory lies outside"), "{err}");
    }
    // Too short to be a sparse extent.
    let p = d.join("short.vmdk");
    std::fs::write(&p, b"KDMV\x01\0\0\0").unwrap();
    assert_refused_cleanly(&p, "Could not read header");
    // A stream whose footer is garbage.
    let p = d.join("stream.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        &s(&p),
        "1M",
    ]);
    patch(&p, 56, &u64::MAX.to_le_bytes());
    assert_refused_cleanly(&p, "Invalid footer");
    // A compressed grain whose marker claims a huge size.
    let raw = d.join("c.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let p = d.join("cstream.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        &s(&raw),
        &s(&p),
    ]);
    let gt = grain_table(&p, 0);
    let b = std::fs::read(&p).unwrap();
    let grain = u64::from(u32::from_le_bytes(
        b[gt as usize..gt as usize + 4].try_into().unwrap(),
    )) * 512;
    patch(&p, grain + 8, &u32::MAX.to_le_bytes());
    assert_refused_cleanly(&p, "compressed grain size");
}

#[test]
fn hostile_descriptors_fail_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let desc = |name: &str, extents: &str| -> std::path::PathBuf {
        let p = d.join(name);
        std::fs::write(
            &p,
            format!(
                "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n\
                 createType=\"monolithicFlat\"\n\n# Extent description\n{extents}"
            ),
        )
        .unwrap();
        p
    };
    std::fs::write(d.join("data.bin"), vec![1u8; 1 << 20]).unwrap();
    // Naming itself, as a flat or a sparse extent.
    let p = desc("self.vmdk", "RW 2048 FLAT \"self.vmdk\" 0\n");
    assert_refused_cleanly(&p, "names itself");
    let p = desc("self2.vmdk", "RW 2048 SPARSE \"./self2.vmdk\"\n");
    assert_refused_cleanly(&p, "names itself");
    // A file that does not exist.
    let p = desc("missing.vmdk", "RW 2048 FLAT \"nothere.bin\" 0\n");
    assert_refused_cleanly(&p, "nothere.bin");
    // Absurd sizes and offsets.
    let p = desc("huge.vmdk", "RW 18446744073709551615 FLAT \"data.bin\" 0\n");
    assert_refused_cleanly(&p, "larger than a disk can be");
    let p = desc("sum.vmdk", &"RW 9007199254740991 ZERO\n".repeat(3));
    assert_refused_cleanly(&p, "more than a disk can be");
    let p = desc(
        "offset.vmdk",
        "RW 2048 FLAT \"data.bin\" 18446744073709551615\n",
    );
    assert_refused_cleanly(&p, "Invalid extent line");
    // A flat extent longer than its file: past the end it reads as zeros, as in qemu.
    let p = desc("short.vmdk", "RW 8192 FLAT \"data.bin\" 0\n");
    assert_reads_like_qemu(&p);
    // A sparse extent that is not one.
    let p = desc("notsparse.vmdk", "RW 2048 SPARSE \"data.bin\"\n");
    assert_refused_cleanly(&p, "Image not in VMDK format");
    // Bad extent lines, an unknown create type, too many extents.
    let p = desc("badline.vmdk", "RW 2048 FLAT \"data.bin\"\n");
    assert_refused_cleanly(&p, "Invalid extent line");
    let p = d.join("type.vmdk");
    std::fs::write(&p, "# Disk DescriptorFile\ncreateType=\"weird\"\n").unwrap();
    assert_refused_cleanly(&p, "Unsupported image type 'weird'");
    let many: String = (0..300)
        .map(|i| {
            let name = format!("x{i}.bin");
            std::fs::write(d.join(&name), [0u8; 512]).unwrap();
            format!("RW 1 FLAT \"{name}\" 0\n")
        })
        .collect();
    let p = desc("many.vmdk", &many);
    assert_refused_cleanly(&p, "extent files are not supported");
    // A descriptor of many megabytes is read only up to its bound.
    let p = d.join("big.vmdk");
    let mut text = String::from(
        "# Disk DescriptorFile\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"data.bin\" 0\n",
    );
    text.push_str(&"# padding\n".repeat(1 << 20));
    text.push_str("RW 2048 FLAT \"data.bin\" 0\n");
    std::fs::write(&p, text).unwrap();
    let info = img_ok(&["info", "--output=json", &s(&p)]);
    assert!(info.contains("\"virtual-size\": 1048576"), "{info}");
}

#[test]
fn backing_chains_read_and_copy_on_write_as_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vmdk");
    let child = dir.path().join("child.vmdk");
    qemu_img(&["create", "-q", "-f", "vmdk", &s(&base), "4M"]);
    qemu_io(&base, &["write -P 0x31 0 1M", "write -P 0x32 3M 1M"]);
    img_ok(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        &s(&child),
    ]);
    // Partial-grain writes in the child copy the rest of the grain from the base.
    {
        let img = common::open(&child, "vmdk", false);
        img.write_at(&[0x41; 1000], 70_000).unwrap();
        img.write_at(&[0x42; 512], (3 << 20) + 512).unwrap();
        img.close().unwrap();
    }
    assert_qemu_check_clean_vmdk(&child);
    assert_reads_like_qemu(&child);
    for args in [
        vec!["info", "--backing-chain", &s(&child)],
        vec!["map", "--output=json", &s(&child)],
        vec!["map", &s(&child)],
    ] {
        let args: Vec<&str> = args.iter().map(|a| a.as_ref()).collect();
        assert_same_output(&args);
    }
    // The same writes made by qemu-io give the same content.
    let qchild = dir.path().join("qchild.vmdk");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-b",
        "base.vmdk",
        "-F",
        "vmdk",
        &s(&qchild),
    ]);
    qemu_io(
        &qchild,
        &[
            "write -P 0x41 70000 1000",
            &format!("write -P 0x42 {} 512", (3 << 20) + 512),
        ],
    );
    common::assert_qemu_compare_identical(&child, "vmdk", &qchild, "vmdk");
}

#[test]
fn zeroed_grains_written_by_img_as_qemu_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("ours.vmdk");
    let theirs = dir.path().join("theirs.vmdk");
    for p in [&ours, &theirs] {
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-o",
            "zeroed_grain=on",
            &s(p),
            "3M",
        ]);
        qemu_io(p, &["write -P 9 0 3M"]);
    }
    {
        let img = common::open(&ours, "vmdk", false);
        img.write_zeroes(65536, 3 * 65536 + 100, false).unwrap();
        img.write_zeroes((3 << 20) - 65536, 65536, false).unwrap();
        img.close().unwrap();
    }
    qemu_io(
        &theirs,
        &[
            &format!("write -z 65536 {}", 3 * 65536 + 100),
            &format!("write -z {} 65536", (3 << 20) - 65536),
        ],
    );
    assert_qemu_check_clean_vmdk(&ours);
    common::assert_qemu_compare_identical(&ours, "vmdk", &theirs, "vmdk");
    // Whole grains became zeroed grains (no data), as qemu's map shows for both.
    let a = qemu_img(&["map", "--output=json", &s(&ours)]);
    let b = qemu_img(&["map", "--output=json", &s(&theirs)]);
    assert_eq!(a, b);
    assert!(a.contains("\"start\": 65536, \"length\": 196608, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), "{a}");
}

#[test]
fn locks_are_taken_as_qemu_takes_them() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    for sub in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse"] {
        let dir = tempfile::tempdir().unwrap();
        let image = qemu_image(dir.path(), sub, "");
        // qemu-io holds the image open for writing; it is ready once it answered a read.
        let mut child = Command::new("qemu-io")
            .args(["-f", "vmdk"])
            .arg(&image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "read 0 512").unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("read 512/512 bytes") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "qemu-io did not open"
            );
        }
        let p = s(&image);
        let raw = s(&dir.path().join("out.raw"));
        for args in [
            vec!["info", p.as_str()],
            vec!["info", "-U", p.as_str()],
            vec!["check", p.as_str()],
            vec!["map", p.as_str()],
            vec!["convert", "-U", "-O", "raw", p.as_str(), raw.as_str()],
        ] {
            assert_same_outcome(&args);
        }
        writeln!(stdin, "quit").unwrap();
        drop(stdin);
        child.wait().unwrap();
    }
}

#[test]
fn concurrent_writers_and_readers_agree_with_qemu() {
    // Threads allocate grains in the same grain tables while others read them: every write
    // must survive (no reader may cache a table older than an entry written meanwhile).
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("c.vmdk");
    let size: u64 = 64 << 20;
    img_ok(&["create", "-q", "-f", "vmdk", &s(&image), &size.to_string()]);
    let img = std::sync::Arc::new(common::open(&image, "vmdk", false));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 70_000];
                for k in 0..200u64 {
                    // Interleaved grains of all threads, unaligned.
                    let off = ((k * 4 + t) * 65536 + 1000) % (size - 70_000);
                    let data = common::pattern(t as u8 + 1, off, 3000);
                    img.write_at(&data, off).unwrap();
                    img.read_at(&mut buf, off.saturating_sub(20_000)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let img = std::sync::Arc::try_unwrap(img).ok().unwrap();
    img.close().unwrap();
    let mut model = vec![0u8; size as usize];
    for k in 0..200u64 {
        for t in 0..4u64 {
            let off = ((k * 4 + t) * 65536 + 1000) % (size - 70_000);
            let data = common::pattern(t as u8 + 1, off, 3000);
            model[off as usize..off as usize + 3000].copy_from_slice(&data);
        }
    }
    let reference = dir.path().join("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_qemu_check_clean_vmdk(&image);
    common::assert_qemu_compare_identical(&image, "vmdk", &reference, "raw");
}

#[test]
fn streams_with_the_header_in_a_footer_read_as_qemu_reads_them() {
    // VMware writes streams whose header says "directory at the end" and whose real header
    // is a footer before the end-of-stream marker. qemu-img does not write those: make one
    // from a stream qemu wrote, and read it with both.
    let dir = tempfile::tempdir().unwrap();
    let raw = raw_source(dir.path(), 5 << 20);
    let stream = dir.path().join("s.vmdk");
    qemu_img(&[
        "convert",
        "-O",
        "vmdk",
        "-o",
        "subformat=streamOptimized",
        &s(&raw),
        &s(&stream),
    ]);
    let mut b = std::fs::read(&stream).unwrap();
    b.resize(b.len().div_ceil(512) * 512, 0);
    let header: Vec<u8> = b[..512].to_vec();
    b[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut marker = vec![0u8; 512];
    marker[0..8].copy_from_slice(&1u64.to_le_bytes());
    marker[12..16].copy_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&marker);
    b.extend_from_slice(&header);
    b.extend_from_slice(&[0u8; 512]);
    let footer = dir.path().join("footer.vmdk");
    std::fs::write(&footer, &b).unwrap();
    assert_reads_like_qemu(&footer);
    assert_same_outcome(&["info", "--output=json", &s(&footer)]);
    // And a footer that is not one is refused by both.
    let n = b.len();
    b[n - 512 + 12] = 9;
    std::fs::write(&footer, &b).unwrap();
    assert_same_outcome(&["info", &s(&footer)]);
}

#[test]
fn convert_across_extent_files() {
    // Data across the 2 GiB boundaries of split images, written by img, checked by qemu.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &s(&src), "5G"]);
    common::qemu_io(
        "qcow2",
        &src,
        &[
            format!("write -P 7 {} 300k", (2u64 << 30) - 100_000),
            format!("write -P 8 {}k 1k", (4u64 << 20) + 5),
            "write -P 9 0 64k".to_string(),
        ],
    );
    for sub in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
        let out = dir.path().join(format!("{sub}.vmdk"));
        img_ok(&[
            "convert",
            "-O",
            "vmdk",
            "-o",
            &format!("subformat={sub}"),
            &s(&src),
            &s(&out),
        ]);
        assert_qemu_check_clean_vmdk(&out);
        common::assert_qemu_compare_identical(&src, "qcow2", &out, "vmdk");
        assert_info_and_map_like_qemu(&out);
    }
}

#[test]
fn a_crash_leaves_every_grain_whole_or_absent() {
    use common::recording::{crash_image, epochs, RecordingStorage};
    use std::sync::Arc;
    const GRAIN: u64 = 65536;
    let dir = tempfile::tempdir().unwrap();
    let made = dir.path().join("made.vmdk");
    let size: u64 = 8 << 20;
    img_core::vmdk::create(
        &made,
        &img_core::vmdk::VmdkCreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let storage = Arc::new(RecordingStorage::default());
    blockdev::Storage::write_at(storage.as_ref(), &std::fs::read(&made).unwrap(), 0).unwrap();
    blockdev::Storage::flush(storage.as_ref()).unwrap();
    let opts = img_core::OpenOptions {
        format: Some("vmdk".into()),
        ..Default::default()
    };
    let img = img_core::open::open_storage(storage.clone(), &opts).unwrap();
    // Each write lands in a grain of its own, somewhere inside it, so a grain must read as
    // zeros (not allocated) or as zeros around exactly that data.
    let mut writes = Vec::new();
    for k in 0..(size / GRAIN) {
        let grain = (k * 37) % (size / GRAIN);
        let start = grain * GRAIN + (k * 4099) % 30_000;
        let len = 1 + ((k * 7919) % 30_000) as usize;
        let data = common::pattern(k as u8 + 1, start, len);
        img.write_at(&data, start).unwrap();
        writes.push((grain, start, data, u64::MAX));
        if k % 9 == 8 {
            img.flush().unwrap();
            let durable = storage.flushes() as u64;
            for w in writes.iter_mut().filter(|w| w.3 == u64::MAX) {
                w.3 = durable;
            }
        }
    }
    img.close().unwrap();
    let log = storage.log();
    let mut coin = 0u32;
    for e in 1..=epochs(&log) {
        for mode in 0..3 {
            let bytes = crash_image(&log, e, &mut || match mode {
                0 => false,
                1 => true,
                _ => {
                    coin = coin.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    coin & 0x100 != 0
                }
            });
            let what = format!("crash in epoch {e}, mode {mode}");
            let p = dir.path().join("crash.vmdk");
            std::fs::write(&p, &bytes).unwrap();
            assert_qemu_check_clean_vmdk(&p);
            let img = common::open(&p, "vmdk", true);
            for (grain, start, data, durable) in &writes {
                let mut got = vec![0u8; GRAIN as usize];
                img.read_at(&mut got, grain * GRAIN).unwrap();
                let at = (start - grain * GRAIN) as usize;
                let mut expect = vec![0u8; GRAIN as usize];
                expect[at..at + data.len()].copy_from_slice(data);
                let absent = got.iter().all(|&b| b == 0);
                assert!(
                    got == expect || (absent && (*durable as usize) > e),
                    "{what}: grain {grain} is neither absent nor whole (durable from epoch {durable})"
                );
            }
        }
    }
}

#[test]
fn commit_into_a_vmdk_base_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    for who in ["q", "i"] {
        let base = d(&format!("b{who}.vmdk"));
        let child = d(&format!("c{who}.vmdk"));
        qemu_img(&["create", "-q", "-f", "vmdk", &s(&base), "4M"]);
        qemu_io(&base, &["write -P 1 0 1M"]);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "vmdk",
            "-b",
            &s(&base),
            "-F",
            "vmdk",
            &s(&child),
        ]);
        qemu_io(&child, &["write -P 2 512k 1M", "write -P 3 3M 4k"]);
    }
    let q = run("qemu-img", &["commit", &s(&d("cq.vmdk"))]);
    let i = img(&["commit", &s(&d("ci.vmdk"))]);
    assert_eq!(i.stdout, q.stdout);
    assert_eq!(i.status.code(), q.status.code());
    assert_qemu_check_clean_vmdk(&d("bi.vmdk"));
    common::assert_qemu_compare_identical(&d("bq.vmdk"), "vmdk", &d("bi.vmdk"), "vmdk");
    // The committed image keeps its grains, as qemu's does.
    assert_same_output(&["map", "--output=json", &s(&d("bi.vmdk"))]);
    assert_eq!(
        qemu_img(&["map", "--output=json", "-f", "vmdk", &s(&d("ci.vmdk"))])
            .replace("ci.vmdk", "C")
            .replace("bi.vmdk", "B"),
        qemu_img(&["map", "--output=json", "-f", "vmdk", &s(&d("cq.vmdk"))])
            .replace("cq.vmdk", "C")
            .replace("bq.vmdk", "B"),
    );
}

/// The CID an image's info reports.
fn cid_of(image: &Path) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&qemu_img(&["info", "--output=json", &s(image)])).unwrap();
    v["format-specific"]["data"]["cid"].as_u64().unwrap()
}

#[test]
fn the_first_write_renews_the_cid_as_qemu_does() {
    for sub in ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse"] {
        let (qdir, idir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let q = qdir.path().join("a.vmdk");
        let i = idir.path().join("a.vmdk");
        for p in [&q, &i] {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "vmdk",
                "-o",
                &format!("subformat={sub}"),
                &s(p),
                "1M",
            ]);
        }
        let before = cid_of(&i);
        qemu_io(&q, &["write -P 1 0 512", "write -P 2 4096 512"]);
        {
            let img = common::open(&i, "vmdk", false);
            img.write_at(&[1; 512], 0).unwrap();
            img.write_at(&[2; 512], 4096).unwrap();
            // info in the same session shows the new CID already.
            let cid = img.format().info().specific.unwrap()["cid"]
                .as_u64()
                .unwrap();
            assert_ne!(cid, before, "{sub}");
            img.close().unwrap();
        }
        assert_ne!(cid_of(&i), before, "{sub}");
        let a = files_without_cid(qdir.path(), "a");
        let b = files_without_cid(idir.path(), "a");
        assert_eq!(a.len(), b.len());
        for ((na, ba), (nb, bb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            assert!(ba == bb, "{sub}: {na} differs from what qemu-io leaves");
        }
        assert_qemu_check_clean_vmdk(&i);
        // Reads alone leave it.
        let after = cid_of(&i);
        img_ok(&[
            "convert",
            "-O",
            "raw",
            &s(&i),
            &s(&idir.path().join("x.raw")),
        ]);
        assert_eq!(cid_of(&i), after);
    }
}

#[test]
fn open_errors_as_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=monolithicFlat",
        &s(&d("a.vmdk")),
        "1M",
    ]);
    std::fs::remove_file(d("a-flat.vmdk")).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentSparse",
        &s(&d("c.vmdk")),
        "1M",
    ]);
    std::fs::remove_file(d("c-s001.vmdk")).unwrap();
    std::fs::write(d("j.vmdk"), "junk\n").unwrap();
    std::fs::write(d("z.vmdk"), [0u8; 100]).unwrap();
    std::fs::write(d("t.vmdk"), "ab").unwrap();
    for (f, args) in [
        ("a.vmdk", vec![]),
        ("c.vmdk", vec![]),
        ("j.vmdk", vec!["-f", "vmdk"]),
        ("z.vmdk", vec!["-f", "vmdk"]),
        ("t.vmdk", vec!["-f", "vmdk"]),
    ] {
        // Relative names, as the messages show them.
        let mut a = vec!["info"];
        a.extend(args);
        a.push(f);
        let q = std::process::Command::new("qemu-img")
            .args(&a)
            .current_dir(dir.path())
            .output()
            .unwrap();
        let i = std::process::Command::new(common::img_bin())
            .args(&a)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&i.stderr),
            String::from_utf8_lossy(&q.stderr).replace("qemu-img:", "img:"),
            "{a:?}"
        );
        assert_eq!(i.status.code(), q.status.code(), "{a:?}");
    }
}
