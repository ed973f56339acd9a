//! VMDK extents qemu reads but cannot create: VMFSSPARSE (the VMDK3 "COWD" layout) and
//! ESXi SESPARSE. The images are laid out here from the format's description (header,
//! grain directory, grain tables, grains), read by qemu-img and img, and must read alike;
//! hostile variants must fail cleanly.

mod common;

use common::{img, run};
use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;
/// Grain size of every image here, in sectors (seSparse only has 8).
const GRAIN: u64 = 8;
/// Entries per grain table (fixed in both layouts).
const GT: u64 = 4096;
/// Extent length in sectors: two grain tables' worth, the last grain partial.
const SECTORS: u64 = 2 * GT * GRAIN - 4;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Bytes of grain `g` (distinct per grain and per image seed).
fn grain_data(seed: u8, g: u64) -> Vec<u8> {
    (0..GRAIN * SECTOR)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (g as u8).wrapping_mul(7) | 1)
        .collect()
}

/// The grains that hold data: the first two, one after an unallocated gap, one in the
/// second table and the last (partial) grain.
const DATA_GRAINS: &[u64] = &[0, 1, 3, 5000, (SECTORS - 1) / GRAIN];

fn put(buf: &mut Vec<u8>, at: u64, bytes: &[u8]) {
    let at = at as usize;
    if buf.len() < at + bytes.len() {
        buf.resize(at + bytes.len(), 0);
    }
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// Knobs for hostile variants of the images.
#[derive(Default, Clone)]
struct Hostile {
    /// Replaces the grain directory size field.
    gd_size: Option<u64>,
    /// Replaces the granularity field (COWD only).
    granularity: Option<u32>,
    /// Points the last data grain this many grains past the end of the file.
    grain_past_end: bool,
    /// Replaces the entry of grain 2 (seSparse only).
    raw_entry: Option<u64>,
    /// Sets the volatile header's replay-journal field (seSparse only).
    dirty: bool,
    /// Grain directory entries (overrides the two a valid image has).
    gd_entries: Option<u32>,
    /// Makes the extent a whole number of grains (qemu reads a partial last grain on into
    /// the next extent, so only such extents may be followed by another).
    aligned: bool,
}

impl Hostile {
    fn sectors(&self) -> u64 {
        if self.aligned {
            2 * GT * GRAIN
        } else {
            SECTORS
        }
    }
}

/// A COWD extent file: header, directory of two entries, two tables, grains.
fn cowd_file(path: &Path, seed: u8, h: &Hostile) {
    let mut f = Vec::new();
    let gd_sector = 1u64;
    let gt_sectors = GT * 4 / SECTOR;
    let gt0 = 2u64;
    let gt1 = gt0 + gt_sectors;
    let grains = gt1 + gt_sectors;
    let gd_entries = h.gd_entries.unwrap_or(2);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(b"COWD");
    for v in [
        1u32,               // version
        3,                  // flags
        h.sectors() as u32, // disk sectors
        h.granularity.unwrap_or(GRAIN as u32),
        gd_sector as u32, // directory offset (sectors)
        h.gd_size.map_or(gd_entries, |v| v as u32),
        0, // file sectors (unused by readers)
        0,
        0,
        0,
    ] {
        hdr.extend_from_slice(&v.to_le_bytes());
    }
    put(&mut f, 0, &hdr);
    put(&mut f, gd_sector * SECTOR, &(gt0 as u32).to_le_bytes());
    if gd_entries > 1 {
        put(&mut f, gd_sector * SECTOR + 4, &(gt1 as u32).to_le_bytes());
    }
    put(&mut f, grains * SECTOR, &[]);
    for (n, &g) in DATA_GRAINS.iter().enumerate() {
        let mut host = grains + n as u64 * GRAIN;
        let last = n == DATA_GRAINS.len() - 1;
        if last && h.grain_past_end {
            host += 1000 * GRAIN;
        } else {
            put(&mut f, host * SECTOR, &grain_data(seed, g));
        }
        let table = if g < GT { gt0 } else { gt1 };
        put(
            &mut f,
            table * SECTOR + (g % GT) * 4,
            &(host as u32).to_le_bytes(),
        );
    }
    std::fs::write(path, f).unwrap();
}

/// The seSparse entry of grain number `k` of the grain area.
fn se_entry(k: u64) -> u64 {
    0x3000_0000_0000_0000 | ((k & 0xfff) << 48) | (k >> 12)
}

/// A seSparse extent file: const header, volatile header, directory (one sector),
/// tables, grains; grain 2 is a zeroed grain, grain 4 an unmapped one.
fn sesparse_file(path: &Path, seed: u8, h: &Hostile) {
    let mut f = Vec::new();
    let volatile = 1u64;
    let gd = 2u64;
    let tables = 3u64;
    let table_sectors = GT * 8 / SECTOR;
    let grains = tables + 2 * table_sectors;
    let fields: [u64; 26] = [
        0xcafe_babe,
        0x0000_0002_0000_0001,
        h.sectors(),
        GRAIN,
        table_sectors,
        0,
        0,
        0,
        0,
        0,
        volatile,
        1,
        0,
        0,
        0,
        0,
        gd,
        h.gd_size.unwrap_or(1),
        tables,
        2 * table_sectors,
        0,
        0,
        0,
        0,
        grains,
        DATA_GRAINS.len() as u64 * GRAIN,
    ];
    let hdr: Vec<u8> = fields.iter().flat_map(|v| v.to_le_bytes()).collect();
    put(&mut f, 0, &hdr);
    let mut vol = Vec::new();
    for v in [0xcafe_cafeu64, 0, 1, u64::from(h.dirty)] {
        vol.extend_from_slice(&v.to_le_bytes());
    }
    put(&mut f, volatile * SECTOR, &vol);
    put(&mut f, 2 * SECTOR - 1, &[0]);
    for i in 0..u64::from(h.gd_entries.unwrap_or(2)) {
        put(
            &mut f,
            gd * SECTOR + i * 8,
            &(0x1000_0000_0000_0000u64 | i).to_le_bytes(),
        );
    }
    put(&mut f, (gd + 1) * SECTOR - 1, &[0]);
    for (n, &g) in DATA_GRAINS.iter().enumerate() {
        let mut k = n as u64;
        let last = n == DATA_GRAINS.len() - 1;
        if last && h.grain_past_end {
            k += 1000;
        } else {
            put(&mut f, (grains + k * GRAIN) * SECTOR, &grain_data(seed, g));
        }
        let at = (tables + (g / GT) * table_sectors) * SECTOR + (g % GT) * 8;
        put(&mut f, at, &se_entry(k).to_le_bytes());
    }
    let zeroed = tables * SECTOR + 2 * 8;
    put(
        &mut f,
        zeroed,
        &h.raw_entry.unwrap_or(0x2000_0000_0000_0000).to_le_bytes(),
    );
    put(
        &mut f,
        tables * SECTOR + 4 * 8,
        &0x1000_0000_0000_0000u64.to_le_bytes(),
    );
    std::fs::write(path, f).unwrap();
}

/// A descriptor naming `extents` as (type, file name, sectors).
fn descriptor(path: &Path, create_type: &str, extents: &[(&str, &str)]) {
    let mut d = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"{create_type}\"\n\n# Extent description\n"
    );
    for (kind, file) in extents {
        d.push_str(&format!("RW {SECTORS} {kind} \"{file}\"\n"));
    }
    d.push_str("\n# The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\n");
    std::fs::write(path, d).unwrap();
}

/// Converts with both tools to raw and asserts equal, non-trivial bytes; compares `info`
/// (human and json) and `map` output.
fn assert_reads_like_qemu(dir: &Path, image: &Path) {
    let by_qemu = dir.join("q.raw");
    let by_img = dir.join("i.raw");
    let out = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vmdk",
            "-O",
            "raw",
            &s(image),
            &s(&by_qemu),
        ],
    );
    assert!(
        out.status.success(),
        "qemu cannot read the test image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = img(&["convert", "-f", "vmdk", "-O", "raw", &s(image), &s(&by_img)]);
    assert!(
        out.status.success(),
        "img convert failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = std::fs::read(&by_qemu).unwrap();
    let b = std::fs::read(&by_img).unwrap();
    assert_eq!(a.len(), b.len(), "sizes differ");
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "img reads other bytes than qemu from byte {at}: {:?} vs qemu's {:?}",
            &b[at..(at + 8).min(b.len())],
            &a[at..(at + 8).min(a.len())]
        );
    }
    // The data grains are really there (an all-zero reader would pass otherwise).
    let g = DATA_GRAINS[3];
    let at = (g * GRAIN * SECTOR) as usize;
    assert_ne!(&a[at..at + 64], &[0u8; 64][..]);
    // The unallocated grain reads as zeros.
    let at = (2 * GRAIN * SECTOR) as usize;
    assert!(a[at..at + (GRAIN * SECTOR) as usize]
        .iter()
        .all(|&x| x == 0));
    for args in [
        vec!["info".to_string(), s(image)],
        vec!["info".into(), "--output=json".into(), s(image)],
        vec!["map".into(), "--output=json".into(), s(image)],
    ] {
        let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let q = run("qemu-img", &args);
        let i = img(&args);
        assert!(q.status.success(), "qemu-img {args:?}");
        assert_eq!(
            String::from_utf8_lossy(&i.stdout),
            String::from_utf8_lossy(&q.stdout),
            "img {args:?} differs from qemu-img"
        );
        assert_eq!(i.status.code(), q.status.code());
    }
}

/// Asserts img refuses to open or read the image with an error naming a file, without
/// panicking; when qemu refuses too, img's message contains `expect` (qemu's words).
fn assert_fails_cleanly(dir: &Path, image: &Path, expect: Option<&str>) {
    let out_file = dir.join("h.raw");
    for args in [
        vec!["info".to_string(), s(image)],
        vec![
            "convert".into(),
            "-O".into(),
            "raw".into(),
            s(image),
            s(&out_file),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let out = img(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "img {args:?} panicked: {err}");
        if args[0] == "info" && expect.is_none() {
            // Reads fail, the header does not: info may succeed.
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "img {args:?}: {err}");
        assert!(err.starts_with("img: "), "{err}");
        if let Some(e) = expect {
            assert!(err.contains(e), "img {args:?}: {err:?} lacks {e:?}");
            let q = run("qemu-img", &args);
            let qerr = String::from_utf8_lossy(&q.stderr);
            assert!(!q.status.success());
            assert!(qerr.contains(e), "qemu-img says {qerr:?}");
        }
    }
}

fn cowd_image(dir: &Path, h: &Hostile) -> PathBuf {
    cowd_file(&dir.join("c-sparse.vmdk"), 0x5a, h);
    let image = dir.join("c.vmdk");
    descriptor(&image, "vmfsSparse", &[("VMFSSPARSE", "c-sparse.vmdk")]);
    image
}

fn sesparse_image(dir: &Path, h: &Hostile) -> PathBuf {
    sesparse_file(&dir.join("s-sesparse.vmdk"), 0xa5, h);
    let image = dir.join("s.vmdk");
    descriptor(&image, "seSparse", &[("SESPARSE", "s-sesparse.vmdk")]);
    image
}

#[test]
fn vmfssparse_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let image = cowd_image(dir.path(), &Hostile::default());
    assert_reads_like_qemu(dir.path(), &image);
}

#[test]
fn sparse_extent_in_cowd_layout_reads_like_qemu() {
    // A SPARSE line whose file has the COWD magic is read as COWD, as qemu does.
    let dir = tempfile::tempdir().unwrap();
    cowd_file(&dir.path().join("c-sparse.vmdk"), 0x11, &Hostile::default());
    let image = dir.path().join("c.vmdk");
    descriptor(
        &image,
        "twoGbMaxExtentSparse",
        &[("SPARSE", "c-sparse.vmdk")],
    );
    assert_reads_like_qemu(dir.path(), &image);
}

#[test]
fn sesparse_reads_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let image = sesparse_image(dir.path(), &Hostile::default());
    assert_reads_like_qemu(dir.path(), &image);
}

#[test]
fn cowd_and_sesparse_extents_in_one_image_read_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let aligned = Hostile {
        aligned: true,
        ..Default::default()
    };
    cowd_file(&dir.path().join("a.bin"), 0x33, &aligned);
    sesparse_file(&dir.path().join("b.bin"), 0x44, &Hostile::default());
    let image = dir.path().join("m.vmdk");
    descriptor(
        &image,
        "seSparse",
        &[("VMFSSPARSE", "a.bin"), ("SESPARSE", "b.bin")],
    );
    assert_reads_like_qemu(dir.path(), &image);
}

#[test]
fn sesparse_refuses_read_write_open() {
    let dir = tempfile::tempdir().unwrap();
    let image = sesparse_image(dir.path(), &Hostile::default());
    let out = img(&["resize", &s(&image), "+1M"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("No write support for seSparse images available"),
        "{err}"
    );
}

#[test]
fn hostile_cowd_images_fail_cleanly() {
    let cases: Vec<(Hostile, Option<&str>)> = vec![
        (
            Hostile {
                gd_size: Some(32 * 1024 * 1024 + 1),
                ..Default::default()
            },
            Some("L1 size too big"),
        ),
        (
            Hostile {
                granularity: Some(0x20_0001),
                ..Default::default()
            },
            Some("Invalid granularity, image may be corrupt"),
        ),
        // qemu divides by a zero granularity; img must simply refuse.
        (
            Hostile {
                granularity: Some(0),
                ..Default::default()
            },
            None,
        ),
        (
            Hostile {
                grain_past_end: true,
                ..Default::default()
            },
            None,
        ),
        // The directory covers less than the disk: reads past it fail (in qemu too).
        (
            Hostile {
                gd_entries: Some(1),
                ..Default::default()
            },
            None,
        ),
    ];
    for (h, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let image = cowd_image(dir.path(), &h);
        assert_fails_cleanly(dir.path(), &image, expect);
    }
}

#[test]
fn hostile_sesparse_images_fail_cleanly() {
    let cases: Vec<(Hostile, Option<&str>)> = vec![
        (
            Hostile {
                gd_size: Some(32 * 1024 * 1024 / 64 + 1),
                ..Default::default()
            },
            Some("L1 size too big"),
        ),
        (
            Hostile {
                dirty: true,
                ..Default::default()
            },
            Some("Image is dirty, Replaying journal not supported"),
        ),
        (
            Hostile {
                raw_entry: Some(0x5000_0000_0000_0000),
                ..Default::default()
            },
            None,
        ),
        (
            Hostile {
                raw_entry: Some(0x0000_0000_0000_0007),
                ..Default::default()
            },
            None,
        ),
        (
            Hostile {
                grain_past_end: true,
                ..Default::default()
            },
            None,
        ),
    ];
    for (h, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let image = sesparse_image(dir.path(), &h);
        assert_fails_cleanly(dir.path(), &image, expect);
    }
}

#[test]
fn sesparse_bad_magic_is_refused_as_qemu_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = sesparse_image(dir.path(), &Hostile::default());
    let file = dir.path().join("s-sesparse.vmdk");
    let mut b = std::fs::read(&file).unwrap();
    b[0] = 0xbf;
    std::fs::write(&file, b).unwrap();
    assert_fails_cleanly(dir.path(), &image, Some("Bad const header magic"));
}

#[test]
fn lone_cowd_file_is_probed_as_vmdk_and_refused_as_qemu_refuses_it() {
    // qemu probes the COWD magic as vmdk, reads the extent, then finds no content ID in
    // the file and fails: img must say the same (not read the file as raw).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lone.vmdk");
    cowd_file(&file, 0x77, &Hostile::default());
    let q = run("qemu-img", &["info", &s(&file)]);
    let i = img(&["info", &s(&file)]);
    assert_eq!(i.status.code(), q.status.code());
    let qerr = String::from_utf8_lossy(&q.stderr);
    let ierr = String::from_utf8_lossy(&i.stderr);
    assert!(qerr.starts_with("qemu-img: "), "{qerr}");
    assert_eq!(ierr.strip_prefix("img: "), qerr.strip_prefix("qemu-img: "));
}

/// Writes qemu-io and img both make to a COWD image: into an unallocated grain (partial),
/// over an allocated one, across two grains, zeros over data, and in the second table.
const COWD_WRITES: &[(u64, u64, u8)] = &[
    (2 * 4096 + 100, 1000, 0x61),
    (512, 1024, 0x62),
    (4 * 4096 - 512, 2048, 0x63),
    (4999 * 4096 + 7, 9000, 0x64),
    (10 * 4096, 3 * 4096, 0x00),
];

#[test]
fn cowd_writes_match_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("q")).unwrap();
    std::fs::create_dir_all(d.join("i")).unwrap();
    let by_qemu = cowd_image(&d.join("q"), &Hostile::default());
    let by_img = cowd_image(&d.join("i"), &Hostile::default());
    let cmds: Vec<String> = COWD_WRITES
        .iter()
        .map(|&(off, len, p)| format!("write -P {p:#x} {off} {len}"))
        .collect();
    common::qemu_io("vmdk", &by_qemu, &cmds);
    let image = common::open(&by_img, "vmdk", false);
    for &(off, len, p) in COWD_WRITES {
        image.write_at(&vec![p; len as usize], off).unwrap();
    }
    image.close().unwrap();
    let a = d.join("a.raw");
    let b = d.join("b.raw");
    common::qemu_img(&["convert", "-O", "raw", &s(&by_qemu), &s(&a)]);
    common::qemu_img(&["convert", "-O", "raw", &s(&by_img), &s(&b)]);
    let (a, b) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(a.len(), b.len());
    if let Some(at) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!("img's writes read back otherwise than qemu-io's from byte {at}");
    }
    for &(off, len, p) in COWD_WRITES {
        assert!(a[off as usize..(off + len) as usize]
            .iter()
            .all(|&x| x == p));
    }
    let out = run("qemu-img", &["check", "-f", "vmdk", &s(&by_img)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The content ID changed, as qemu changes it on the first write.
    let desc = std::fs::read_to_string(&by_img).unwrap();
    assert!(!desc.contains("CID=12345678\n"), "{desc}");
}

#[test]
fn sesparse_and_tableless_cowd_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let image = sesparse_image(dir.path(), &Hostile::default());
    let err = img_core::open_image(
        &image,
        &img_core::OpenOptions {
            format: Some("vmdk".into()),
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("No write support for seSparse images available"),
        "{err}"
    );
    // A COWD extent whose directory covers only the first half: writes past it fail (as
    // in qemu), cleanly.
    let dir = tempfile::tempdir().unwrap();
    let h = Hostile {
        gd_entries: Some(1),
        ..Default::default()
    };
    let path = cowd_image(dir.path(), &h);
    let image = common::open(&path, "vmdk", false);
    image.write_at(&[1u8; 512], 0).unwrap();
    let err = image
        .write_at(&[1u8; 512], GT * GRAIN * SECTOR)
        .unwrap_err();
    assert!(err.to_string().contains("grain directory"), "{err}");
}

#[test]
fn check_reports_what_qemu_reports() {
    for past in [false, true] {
        let h = Hostile {
            grain_past_end: past,
            ..Default::default()
        };
        for make in [cowd_image, sesparse_image] {
            let dir = tempfile::tempdir().unwrap();
            let image = make(dir.path(), &h);
            let args = ["check", "-f", "vmdk", &s(&image)].map(String::from);
            let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
            let q = run("qemu-img", &args);
            let i = img(&args);
            assert_eq!(
                String::from_utf8_lossy(&i.stdout),
                String::from_utf8_lossy(&q.stdout)
            );
            assert_eq!(i.status.code(), q.status.code());
            assert_eq!(q.status.success(), !past);
            let qerr = String::from_utf8_lossy(&q.stderr).replace("qemu-img: ", "img: ");
            assert_eq!(String::from_utf8_lossy(&i.stderr), qerr);
        }
    }
}
