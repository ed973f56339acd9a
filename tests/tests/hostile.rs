//! Hostile images: truncated files, header fields out of range and metadata that points
//! nowhere. Opening such an image — and, where opening succeeds, reading the whole disk and
//! writing — must fail with an error that names the file, never panic, and never allocate
//! memory in proportion to what a header merely claims.

mod common;

use common::bytes::{be32, be64, put32, put64};

use img_core::qcow2::{self, Qcow2CreateOptions};
use img_core::{Image, OpenOptions};
use std::path::{Path, PathBuf};

const CS: u64 = 65536;
const DISK: u64 = 64 << 20;
const COPIED: u64 = 1 << 63;

/// A valid image to corrupt: 64 KiB clusters, data in guest clusters 0-2, a compressed guest
/// cluster 5, and where its metadata lives.
struct Base {
    bytes: Vec<u8>,
    l1_offset: u64,
    l2_offset: u64,
    reftable_offset: u64,
    compressed_offset: u64,
}

fn base_image(dir: &Path) -> Base {
    let path = dir.join("base.qcow2");
    qcow2::create(
        &path,
        &Qcow2CreateOptions {
            size: DISK,
            cluster_size: CS,
            ..Default::default()
        },
    )
    .unwrap();
    let img = common::open(&path, "qcow2", false);
    img.write_at(&common::pattern(1, 0, 3 * CS as usize), 0)
        .unwrap();
    let text: Vec<u8> = b"compressible "
        .iter()
        .copied()
        .cycle()
        .take(CS as usize)
        .collect();
    img.write_compressed(5 * CS, &text).unwrap();
    assert!(img.block_status(5 * CS, 1).unwrap().compressed);
    img.close().unwrap();
    common::assert_qemu_check_clean(&path);

    let bytes = std::fs::read(&path).unwrap();
    let l1_offset = be64(&bytes, 40);
    let l2_offset = be64(&bytes, l1_offset as usize) & 0x00ff_ffff_ffff_fe00;
    let entry = be64(&bytes, (l2_offset + 5 * 8) as usize);
    let x = 62 - (16 - 8);
    let compressed_offset = entry & ((1u64 << x) - 1);
    Base {
        l1_offset,
        l2_offset,
        reftable_offset: be64(&bytes, 48),
        compressed_offset,
        bytes,
    }
}

/// A named hostile variant of the base image.
struct Case {
    name: String,
    bytes: Vec<u8>,
}

fn field_cases(base: &Base) -> Vec<Case> {
    let b = &base.bytes;
    let end = b.len() as u64;
    let past_eof = end.div_ceil(CS) * CS + 64 * CS;
    let mut cases = Vec::new();
    let mut case = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = b.clone();
        f(&mut bytes);
        cases.push(Case {
            name: name.to_string(),
            bytes,
        });
    };
    case("version 1", &|h| put32(h, 4, 1));
    case("version 4", &|h| put32(h, 4, 4));
    case("version 0", &|h| put32(h, 4, 0));
    for bits in [0u32, 8, 22, 31, 32, 63, u32::MAX] {
        case(&format!("cluster_bits {bits}"), &|h| put32(h, 20, bits));
    }
    for order in [7u32, 8, 64, u32::MAX] {
        case(&format!("refcount_order {order}"), &|h| put32(h, 96, order));
    }
    for len in [0u32, 50, 71, 72, 103] {
        case(&format!("header_length {len} (too small)"), &|h| {
            put32(h, 100, len)
        });
    }
    for len in [CS as u32 + 1, 1 << 20, u32::MAX] {
        case(&format!("header_length {len} (too large)"), &|h| {
            put32(h, 100, len)
        });
    }
    for n in [1u32 << 31, u32::MAX, 1 << 28] {
        case(&format!("l1_size {n}"), &|h| put32(h, 36, n));
    }
    case("l1_size 0 for a 64 MiB disk", &|h| put32(h, 36, 0));
    let l1 = base.l1_offset;
    case("l1_table_offset unaligned", &|h| put64(h, 40, l1 + 8));
    case("l1_table_offset past EOF", &|h| put64(h, 40, past_eof));
    case("l1_table_offset 0", &|h| put64(h, 40, 0));
    case("l1_table_offset 2^63", &|h| put64(h, 40, 1 << 63));
    case("l1_table_offset near 2^64", &|h| {
        put64(h, 40, u64::MAX - CS + 1)
    });
    let rt = base.reftable_offset;
    case("refcount_table_offset 0 (the header)", &|h| put64(h, 48, 0));
    case("refcount_table_offset past EOF", &|h| {
        put64(h, 48, past_eof)
    });
    case("refcount_table_offset unaligned", &|h| {
        put64(h, 48, rt + 512)
    });
    case("refcount_table_offset at the L1 table", &|h| {
        put64(h, 48, l1)
    });
    case("refcount_table_offset near 2^64", &|h| {
        put64(h, 48, u64::MAX - CS + 1)
    });
    for n in [0u32, 1 << 20, u32::MAX] {
        case(&format!("refcount_table_clusters {n}"), &|h| {
            put32(h, 56, n)
        });
    }
    case("nb_snapshots huge, no table", &|h| put32(h, 60, u32::MAX));
    case("nb_snapshots huge, table past EOF", &|h| {
        put32(h, 60, u32::MAX);
        put64(h, 64, past_eof);
    });
    case("backing_file_size 1024", &|h| {
        put64(h, 8, 0x1000);
        put32(h, 16, 1024);
    });
    case("backing_file_size 2^32-1", &|h| {
        put64(h, 8, 0x1000);
        put32(h, 16, u32::MAX);
    });
    case("backing_file_offset past the first cluster", &|h| {
        put64(h, 8, 2 * CS);
        put32(h, 16, 10);
    });
    case("backing_file_offset 2^64-1", &|h| {
        put64(h, 8, u64::MAX);
        put32(h, 16, 10);
    });
    for crypt in [1u32, 2, 3] {
        case(&format!("crypt_method {crypt}"), &|h| put32(h, 32, crypt));
    }
    case("size 2^63", &|h| put64(h, 24, 1 << 63));
    case("size 2^64-1", &|h| put64(h, 24, u64::MAX));
    case("size 2^62 with the small L1", &|h| put64(h, 24, 1 << 62));
    for bit in [5u32, 40, 63] {
        case(&format!("unknown incompatible feature bit {bit}"), &|h| {
            let v = be64(h, 72) | (1u64 << bit);
            put64(h, 72, v);
        });
    }
    case("corrupt bit", &|h| {
        let v = be64(h, 72) | 2;
        put64(h, 72, v);
    });
    case("external data file bit", &|h| {
        let v = be64(h, 72) | 4;
        put64(h, 72, v);
    });
    case("compression type zstd without the bit", &|h| h[104] = 1);
    case("compression type 7", &|h| {
        h[104] = 7;
        let v = be64(h, 72) | 8;
        put64(h, 72, v);
    });
    // The first header extension (qemu's feature name table) claims a huge length.
    let first_ext = be32(b, 100) as usize;
    for len in [u32::MAX, 1 << 31, CS as u32] {
        case(&format!("header extension length {len}"), &|h| {
            put32(h, first_ext + 4, len)
        });
    }
    cases
}

fn structure_cases(base: &Base) -> Vec<Case> {
    let b = &base.bytes;
    let end = b.len() as u64;
    let past_eof = end.div_ceil(CS) * CS + 64 * CS;
    let (l1, l2, rt) = (
        base.l1_offset as usize,
        base.l2_offset as usize,
        base.reftable_offset as usize,
    );
    let mut cases = Vec::new();
    let mut case = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = b.clone();
        f(&mut bytes);
        cases.push(Case {
            name: name.to_string(),
            bytes,
        });
    };
    case("L1 entry past EOF", &|h| put64(h, l1, COPIED | past_eof));
    case("L1 entry past EOF, not copied", &|h| put64(h, l1, past_eof));
    case("L1 entry unaligned", &|h| {
        put64(h, l1, COPIED | (base.l2_offset + 512))
    });
    case("L1 entry at the largest host offset", &|h| {
        put64(h, l1, COPIED | ((1 << 56) - CS))
    });
    case("L2 entry past EOF", &|h| put64(h, l2, COPIED | past_eof));
    case("L2 entry past EOF, not copied", &|h| {
        put64(h, l2 + 8, past_eof)
    });
    case("L2 entry unaligned", &|h| {
        put64(h, l2, COPIED | (3 * CS + 512))
    });
    case(
        "refcount table entry pointing at the refcount table",
        &|h| put64(h, rt, base.reftable_offset),
    );
    case("refcount block saying every cluster is free", &|h| {
        let block = (be64(h, rt) & !0x1ff) as usize;
        h[block..block + CS as usize].fill(0);
    });
    case("refcount table entry past EOF", &|h| put64(h, rt, past_eof));
    case("refcount table entry unaligned", &|h| {
        put64(h, rt, 2 * CS + 512)
    });
    case("compressed cluster with garbage data", &|h| {
        let off = base.compressed_offset as usize;
        for (i, x) in h[off..off + 200].iter_mut().enumerate() {
            *x = (i as u8).wrapping_mul(37) ^ 0xa5;
        }
    });
    case("compressed cluster descriptor past EOF", &|h| {
        let x = 62 - (16 - 8);
        put64(h, l2 + 5 * 8, (1 << 62) | (3 << x) | past_eof);
    });
    case("compressed cluster descriptor at the header", &|h| {
        put64(h, l2 + 5 * 8, (1 << 62) | 16);
    });
    cases
}

/// Opens the image read-only and reads the whole disk, stopping at the first error.
fn read_only_pass(path: &Path) -> img_core::Result<()> {
    let img: Image = img_core::open_image(
        path,
        &OpenOptions {
            format: Some("qcow2".into()),
            read_only: true,
            ..Default::default()
        },
    )?;
    let size = img.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], pos)?;
        pos += n as u64;
    }
    img.close()
}

/// Opens the image, reads the whole disk and writes to it, stopping at the first error.
fn exercise(path: &Path) -> img_core::Result<()> {
    let img: Image = img_core::open_image(
        path,
        &OpenOptions {
            format: Some("qcow2".into()),
            read_only: false,
            ..Default::default()
        },
    )?;
    let size = img.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(buf.len() as u64) as usize;
        img.read_at(&mut buf[..n], pos)?;
        pos += n as u64;
    }
    let data = vec![0x5au8; 3 * CS as usize];
    for off in [0, 5 * CS, size / 2] {
        if off + data.len() as u64 <= size {
            img.write_at(&data, off)?;
        }
    }
    img.write_zeroes(0, CS.min(size), false)?;
    img.close()
}

/// Runs `exercise` on each case; returns descriptions of the cases that did not fail cleanly.
fn run_cases(dir: &Path, cases: &[Case]) -> Vec<String> {
    let mut bad = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let path: PathBuf = dir.join(format!("hostile-{i}.qcow2"));
        std::fs::write(&path, &case.bytes).unwrap();
        if let Ok(keep) = std::env::var("IMG_HOSTILE_KEEP") {
            // For looking at a case with other tools (qemu-img, qemu-io).
            let slug: String = case
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            std::fs::write(Path::new(&keep).join(format!("{slug}.qcow2")), &case.bytes).unwrap();
        }
        let name = path.display().to_string();
        // Read-only first (it must leave the file alone), then read-write.
        match std::panic::catch_unwind(|| read_only_pass(&path)) {
            Err(_) => bad.push(format!("{}: panicked when opened read-only", case.name)),
            Ok(Err(e)) if !e.to_string().contains(&name) => bad.push(format!(
                "{}: the read-only error does not name the file: {e}",
                case.name
            )),
            Ok(_) => {}
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            case.bytes,
            "{}: a read-only open changed the file",
            case.name
        );
        let outcome = std::panic::catch_unwind(|| exercise(&path));
        match outcome {
            Err(_) => bad.push(format!("{}: panicked", case.name)),
            Ok(Ok(())) => bad.push(format!("{}: no error at all", case.name)),
            Ok(Err(e)) => {
                let msg = e.to_string();
                if !msg.contains(&name) {
                    bad.push(format!(
                        "{}: the error does not name the file: {msg}",
                        case.name
                    ));
                }
            }
        }
    }
    bad
}

fn assert_all_fail(cases: Vec<Case>) {
    let dir = tempfile::tempdir().unwrap();
    let bad = run_cases(dir.path(), &cases);
    assert!(
        bad.is_empty(),
        "{} of {} hostile images were not refused cleanly:\n{}",
        bad.len(),
        cases.len(),
        bad.join("\n")
    );
}

#[test]
fn truncated_headers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    let mut cases: Vec<Case> = (0..=120)
        .map(|len| Case {
            name: format!("file of {len} bytes"),
            bytes: base.bytes[..len].to_vec(),
        })
        .collect();
    // Cut right after the header cluster, and after each further cluster that holds
    // metadata or data the disk refers to.
    let clusters = (base.bytes.len() as u64).div_ceil(CS);
    for n in 1..clusters {
        let len = (n * CS) as usize;
        cases.push(Case {
            name: format!("file cut after {n} clusters"),
            bytes: base.bytes[..len].to_vec(),
        });
    }
    cases.push(Case {
        name: "file cut in the middle of the L1 table".into(),
        bytes: base.bytes[..base.l1_offset as usize + 4].to_vec(),
    });
    assert_all_fail(cases);
}

#[test]
fn header_fields_out_of_range_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    assert_all_fail(field_cases(&base));
}

#[test]
fn broken_metadata_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    assert_all_fail(structure_cases(&base));
}

#[test]
fn the_base_image_itself_is_fine() {
    // The harness must be able to tell a good image from a bad one.
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    let path = dir.path().join("good.qcow2");
    std::fs::write(&path, &base.bytes).unwrap();
    exercise(&path).unwrap();
    common::assert_qemu_check_clean(&path);
}

// ---------------------------------------------------------------------------------------------
// Memory: headers that declare enormous tables must not make us allocate them.
// ---------------------------------------------------------------------------------------------

const CHILD_ENV: &str = "IMG_HOSTILE_MEMORY_CHILD";

/// Peak resident set size of this process in KiB.
fn max_rss_kib() -> i64 {
    // SAFETY: getrusage fills the zeroed struct we pass; no other memory is touched.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage.ru_maxrss as i64
    }
}

fn huge_cases(base: &Base) -> Vec<Case> {
    let b = &base.bytes;
    let mut cases = Vec::new();
    let mut case = |name: &str, f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = b.clone();
        f(&mut bytes);
        cases.push(Case {
            name: name.to_string(),
            bytes,
        });
    };
    case("l1_size 2^31", &|h| put32(h, 36, 1 << 31));
    case("l1_size 2^32-1", &|h| put32(h, 36, u32::MAX));
    case("l1_size 2^31 and a disk that needs it", &|h| {
        put32(h, 36, 1 << 31);
        put64(h, 24, 1 << 61);
    });
    case("refcount_table_clusters 2^32-1", &|h| {
        put32(h, 56, u32::MAX)
    });
    case("refcount_table_clusters 2^31 at offset 0", &|h| {
        put32(h, 56, 1 << 31);
        put64(h, 48, 0);
    });
    case("nb_snapshots 2^32-1", &|h| {
        put32(h, 60, u32::MAX);
        put64(h, 64, 4 * CS);
    });
    case("header extension length 2^32-1", &|h| {
        let first = be32(h, 100) as usize;
        put32(h, first + 4, u32::MAX);
    });
    case("size 2^63", &|h| put64(h, 24, 1 << 63));
    case("everything huge", &|h| {
        put32(h, 36, 1 << 31);
        put32(h, 56, u32::MAX);
        put32(h, 60, u32::MAX);
        put64(h, 24, 1 << 62);
    });
    cases
}

/// Runs in a child process (see `declared_table_sizes_do_not_drive_memory`): opens the images
/// that declare huge tables and reports the peak RSS.
#[test]
fn memory_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let base = base_image(&dir);
    let before = max_rss_kib();
    let bad = run_cases(&dir, &huge_cases(&base));
    let after = max_rss_kib();
    println!("HOSTILE-RSS before={before} after={after}");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn declared_table_sizes_do_not_drive_memory() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "memory_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.find("HOSTILE-RSS").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("the child did not report its memory use: {stdout}"));
    let field = |key: &str| -> i64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad report {line}"))
    };
    let after_kib = field("after=");
    assert!(
        after_kib < 200 * 1024,
        "peak RSS {after_kib} KiB after opening images with huge declared tables"
    );
}

// ---------------------------------------------------------------------------------------------
// Random damage: whatever happens, no panic, and errors name the file.
// ---------------------------------------------------------------------------------------------

#[test]
fn random_metadata_damage_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_image(dir.path());
    // The clusters that hold metadata: header, refcount table, refcount block, L1, L2, and the
    // compressed data.
    let reftable = base.reftable_offset as usize;
    let refblock = (be64(&base.bytes, reftable) & !0x1ff) as usize;
    let regions = [
        (0usize, 512usize),
        (reftable, 64),
        (refblock, 64),
        (base.l1_offset as usize, 64),
        (base.l2_offset as usize, 64),
        (base.compressed_offset as usize, 512),
    ];
    // Fixed by default so CI is deterministic; IMG_HOSTILE_SEED / IMG_HOSTILE_ITERS explore.
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let mut x = env("IMG_HOSTILE_SEED").unwrap_or(0x9e37_79b9_7f4a_7c15) | 1;
    let iterations = env("IMG_HOSTILE_ITERS").unwrap_or(400);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut panics = Vec::new();
    for i in 0..iterations {
        let mut bytes = base.bytes.clone();
        let damage = 1 + next() % 4;
        let mut what = Vec::new();
        for _ in 0..damage {
            let (start, len) = regions[(next() % regions.len() as u64) as usize];
            let len = len.min(bytes.len() - start);
            let at = start + (next() % len as u64) as usize;
            let v = next() as u8;
            // Half of the time a whole big-endian field of extremes, else one byte.
            if next() % 2 == 0 && at + 8 <= bytes.len() {
                let field = [0u64, u64::MAX, 1 << 63, 1 << 31, (1 << 32) - 1, 1 << 56]
                    [(next() % 6) as usize];
                bytes[at & !7..(at & !7) + 8].copy_from_slice(&field.to_be_bytes());
                what.push(format!("u64 at {:#x} = {field:#x}", at & !7));
            } else {
                bytes[at] = v;
                what.push(format!("byte at {at:#x} = {v:#04x}"));
            }
        }
        let path = dir.path().join(format!("damaged-{i}.qcow2"));
        std::fs::write(&path, &bytes).unwrap();
        let name = path.display().to_string();
        match std::panic::catch_unwind(|| read_only_pass(&path)) {
            Err(_) => panics.push(format!("read-only panic with {}", what.join(", "))),
            Ok(Err(e)) if !e.to_string().contains(&name) => panics.push(format!(
                "read-only error without the file name ({e}) with {}",
                what.join(", ")
            )),
            Ok(_) => {}
        }
        match std::panic::catch_unwind(|| exercise(&path)) {
            Err(_) => panics.push(format!("panic with {}", what.join(", "))),
            Ok(Err(e)) if !e.to_string().contains(&name) => panics.push(format!(
                "error without the file name ({e}) with {}",
                what.join(", ")
            )),
            Ok(_) => {}
        }
    }
    assert!(panics.is_empty(), "{}", panics.join("\n"));
}
