//! Interoperability with qemu: images qemu writes read correctly through img-core, and images
//! img-core writes pass `qemu-img check`, compare identical with `qemu-img compare` and read
//! back correctly with `qemu-io`, for every cluster size, refcount width and compat level.

mod common;

use common::{
    apply_to_image, apply_to_raw_file, assert_image_matches_raw, assert_qemu_check_clean,
    assert_qemu_compare_identical, create_raw_file, open, qemu_check, qemu_img, qemu_io,
    qemu_io_commands, qemu_io_many, Op,
};
use img_core::qcow2::{self, CompressionType, Qcow2CreateOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

const MIB: u64 = 1 << 20;

/// One qcow2 configuration of the matrix.
#[derive(Clone, Copy, Debug)]
struct Config {
    cluster_size: u64,
    version: u32,
    refcount_bits: u32,
}

impl Config {
    /// The configurations for one cluster size: compat 0.10 (16-bit refcounts only) and
    /// compat 1.1 with 1-, 16- and 64-bit refcounts.
    fn for_cluster_size(cluster_size: u64) -> Vec<Config> {
        [(2, 16), (3, 1), (3, 16), (3, 64)]
            .into_iter()
            .map(|(version, refcount_bits)| Config {
                cluster_size,
                version,
                refcount_bits,
            })
            .collect()
    }

    fn compat(&self) -> &'static str {
        if self.version >= 3 {
            "1.1"
        } else {
            "0.10"
        }
    }

    fn qemu_options(&self) -> String {
        format!(
            "cluster_size={},compat={},refcount_bits={}",
            self.cluster_size,
            self.compat(),
            self.refcount_bits
        )
    }

    fn create_options(&self, size: u64) -> Qcow2CreateOptions {
        Qcow2CreateOptions {
            size,
            cluster_size: self.cluster_size,
            version: self.version,
            refcount_bits: self.refcount_bits,
            ..Default::default()
        }
    }

    /// Guest bytes mapped by one L2 table.
    fn l2_span(&self) -> u64 {
        self.cluster_size * (self.cluster_size / 8)
    }

    /// A virtual size that leaves room for writes crossing two L2 table boundaries; large
    /// disks are sparse and compared region by region.
    fn disk_size(&self) -> u64 {
        (2 * self.l2_span() + 16 * self.cluster_size).max(64 * MIB)
    }
}

/// Creates a qcow2 image with qemu-img.
fn qemu_create(path: &Path, options: &str, size: u64) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        options,
        &path.display().to_string(),
        &size.to_string(),
    ]);
}

/// The scenario of the matrix: unaligned and cluster-crossing writes, overwrites, zero writes
/// with and without unmap, discards of partial and whole clusters, writes across L2 table
/// boundaries, a bulk of data that needs new refcount blocks (and, with small clusters, a
/// larger refcount table), and writes at the very end of the disk.
fn scenario(cfg: &Config, size: u64, bulk: u64) -> Vec<Op> {
    let c = cfg.cluster_size;
    let s = cfg.l2_span();
    let mut ops = vec![
        Op::write(0, 1, 1),
        Op::write(c / 2 + 3, 3 * c + 5, 2),
        Op::fill(5 * c, 2 * c, 0x5a),
        Op::Zero {
            off: 5 * c + 17,
            len: c,
            unmap: false,
        },
        Op::fill(9 * c, 6 * c, 0xa5),
        Op::Discard {
            off: 9 * c + c / 2,
            len: 2 * c + c / 2 + 1,
        },
        Op::Zero {
            off: 12 * c,
            len: 2 * c,
            unmap: true,
        },
        Op::Zero {
            off: 14 * c,
            len: c,
            unmap: false,
        },
        // Overwrite part of the first unaligned write.
        Op::write(c / 2 + 100, c, 3),
        // Across the first L2 table boundary, unaligned on both sides.
        Op::write(s - c / 2 - 7, c + 1000, 4),
        // Whole clusters across the second boundary, then a discard across the first.
        Op::fill(2 * s - 3 * c, 6 * c, 0x77),
        Op::Discard {
            off: s - 2 * c,
            len: 4 * c,
        },
        Op::Zero {
            off: 2 * s - c - 9,
            len: 2 * c + 18,
            unmap: true,
        },
    ];
    // The bulk: unaligned writes of a little over 1 MiB each.
    // Past the clusters the operations above touch, so they stay visible.
    let bulk_start = (16 * MIB).max(16 * c) + 77;
    let mut pos = bulk_start;
    let mut seed = 10u8;
    while pos < bulk_start + bulk {
        let len = (MIB + 12_345).min(bulk_start + bulk - pos);
        ops.push(Op::write(pos, len, seed));
        pos += len;
        seed = seed.wrapping_add(1);
    }
    // Overwrite the middle of the bulk with zeros and a fill.
    ops.push(Op::Zero {
        off: bulk_start + bulk / 3,
        len: 5 * c + 3,
        unmap: false,
    });
    ops.push(Op::fill(bulk_start + bulk / 2 + 1, 2 * c, 0x3c));
    // The end of the disk.
    ops.push(Op::write(size - 1000, 1000, 6));
    ops.push(Op::fill(size - 3 * c - 5, 100, 0xee));
    ops.push(Op::Discard {
        off: size - c - 10,
        len: c + 10,
    });
    ops
}

/// qemu-io commands that read back every range of `ops` whose final content (in the reference
/// file) is one repeated byte, with `read -P`.
fn read_back_commands(ops: &[Op], reference: &Path) -> Vec<String> {
    let f = std::fs::File::open(reference).unwrap();
    let mut cmds = Vec::new();
    for op in ops {
        let (off, len) = op.range();
        if len > 4 * MIB {
            continue;
        }
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).unwrap();
        if buf.iter().all(|&b| b == buf[0]) {
            cmds.push(format!("read -q -P {} {off} {len}", buf[0]));
        }
    }
    cmds
}

/// qemu writes, img reads.
fn qemu_to_img(cfg: Config) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("qemu.qcow2");
    let reference = dir.path().join("ref.raw");
    let size = cfg.disk_size();
    qemu_create(&image, &cfg.qemu_options(), size);
    create_raw_file(&reference, size);
    let ops = scenario(&cfg, size, 3 * MIB);
    let cs = cfg.cluster_size;
    qemu_io_many(
        "qcow2",
        &image,
        &qemu_io_commands(&ops, dir.path(), cs, size, false),
    );
    qemu_io_many(
        "raw",
        &reference,
        &qemu_io_commands(&ops, dir.path(), cs, size, true),
    );
    let img = open(&image, "qcow2", true);
    assert_image_matches_raw(&img, &reference);
    img.close().unwrap();
    // Opening read-write and closing again must leave qemu's image intact.
    let img = open(&image, "qcow2", false);
    assert_image_matches_raw(&img, &reference);
    img.close().unwrap();
    assert_qemu_check_clean(&image);
}

/// img writes, qemu checks, compares and reads.
fn img_to_qemu(cfg: Config) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("img.qcow2");
    let reference = dir.path().join("ref.raw");
    let size = cfg.disk_size();
    qcow2::create(&image, &cfg.create_options(size)).unwrap();
    let ref_file = create_raw_file(&reference, size);
    let bulk = if cfg.cluster_size <= 4096 {
        10 * MIB
    } else {
        5 * MIB
    };
    let ops = scenario(&cfg, size, bulk);
    let img = open(&image, "qcow2", false);
    for op in &ops {
        apply_to_image(&img, op);
        apply_to_raw_file(&ref_file, op, cfg.cluster_size);
    }
    img.close().unwrap();
    drop(ref_file);

    assert_qemu_check_clean(&image);
    assert_qemu_compare_identical(&image, "qcow2", &reference, "raw");
    let reads = read_back_commands(&ops, &reference);
    assert!(reads.len() >= 5, "too few uniform ranges to read back");
    qemu_io("qcow2", &image, &reads);

    // Whenever the file outgrew what one refcount block describes, more blocks must exist
    // (qemu-img check above vouches for their content).
    let header = std::fs::read(&image).unwrap();
    let cs = cfg.cluster_size;
    let per_block = cs * 8 / cfg.refcount_bits as u64;
    let file_clusters = (header.len() as u64).div_ceil(cs);
    let table_off = u64::from_be_bytes(header[48..56].try_into().unwrap()) as usize;
    let table_clusters = u32::from_be_bytes(header[56..60].try_into().unwrap()) as usize;
    let blocks = header[table_off..table_off + table_clusters * cs as usize]
        .chunks_exact(8)
        .filter(|e| e.iter().any(|&b| b != 0))
        .count() as u64;
    assert!(
        blocks >= file_clusters.div_ceil(per_block),
        "{cfg:?}: {blocks} refcount blocks for {file_clusters} clusters"
    );
    if cs <= 4096 && cfg.refcount_bits >= 16 {
        assert!(
            blocks > 1,
            "{cfg:?}: the bulk did not need a second refcount block"
        );
    }

    if cfg.cluster_size == 512 && cfg.refcount_bits >= 16 {
        // 10 MiB of 512-byte clusters need more refcount blocks than one table cluster holds.
        assert!(
            table_clusters > 1,
            "{cfg:?}: the refcount table did not grow"
        );
    }

    // img reads its own image back too.
    let img = open(&image, "qcow2", true);
    assert_image_matches_raw(&img, &reference);
}

macro_rules! matrix_tests {
    ($($name:ident: $cs:expr;)*) => {
        mod qemu_writes_img_reads {
            use super::*;
            $(
                #[test]
                fn $name() {
                    for cfg in Config::for_cluster_size($cs) {
                        qemu_to_img(cfg);
                    }
                }
            )*
        }
        mod img_writes_qemu_checks {
            use super::*;
            $(
                #[test]
                fn $name() {
                    for cfg in Config::for_cluster_size($cs) {
                        img_to_qemu(cfg);
                    }
                }
            )*
        }
    };
}

matrix_tests! {
    cluster_512: 512;
    cluster_4k: 4096;
    cluster_64k: 65536;
    cluster_2m: 2 * MIB;
}

// ---------------------------------------------------------------------------------------------
// Compressed clusters
// ---------------------------------------------------------------------------------------------

/// A tiny deterministic generator for incompressible bytes.
struct XorShift(u64);

impl XorShift {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 24) as u8
            })
            .collect()
    }
}

/// Cluster `k` of a compression test: compressible text, random bytes, text with a random
/// stretch, or zeros, in turn.
fn cluster_content(k: u64, cs: usize, rng: &mut XorShift) -> Vec<u8> {
    match k % 4 {
        0 => {
            let text = format!("cluster {k} holds compressible text; ");
            text.bytes().cycle().take(cs).collect()
        }
        1 => rng.bytes(cs),
        2 => {
            let mut d: Vec<u8> = format!("mixed {k} ").bytes().cycle().take(cs).collect();
            let r = rng.bytes(cs / 8);
            d[cs / 3..cs / 3 + r.len()].copy_from_slice(&r);
            d
        }
        _ => vec![0u8; cs],
    }
}

/// Fills a raw file with clusters of mixed compressibility.
fn write_mixed_raw(path: &Path, cs: u64, size: u64) {
    let f = create_raw_file(path, size);
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    let mut k = 0;
    while k * cs < size {
        let n = cs.min(size - k * cs) as usize;
        let d = cluster_content(k, cs as usize, &mut rng);
        f.write_all_at(&d[..n], k * cs).unwrap();
        k += 1;
    }
}

fn compression_name(t: CompressionType) -> &'static str {
    t.name()
}

/// Counts the compressed extents qemu-img map reports.
fn qemu_compressed_extents(image: &Path) -> usize {
    let out = qemu_img(&[
        "map",
        "--output=json",
        "-f",
        "qcow2",
        &image.display().to_string(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["compressed"] == serde_json::Value::Bool(true))
        .count()
}

/// Sizes for compression tests: a few dozen clusters, with a partial last cluster where the
/// cluster size allows.
fn compressed_disk_size(cs: u64) -> u64 {
    let n = if cs >= MIB { 6 } else { 24 };
    n * cs + if cs > 512 { 3 * 512 } else { 0 }
}

#[test]
fn qemu_compresses_img_reads() {
    for cs in [512u64, 4096, 65536, 2 * MIB] {
        for ctype in [CompressionType::Zlib, CompressionType::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let raw = dir.path().join("src.raw");
            let image = dir.path().join("c.qcow2");
            let size = compressed_disk_size(cs);
            write_mixed_raw(&raw, cs, size);
            qemu_img(&[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                &format!(
                    "cluster_size={cs},compression_type={}",
                    compression_name(ctype)
                ),
                &raw.display().to_string(),
                &image.display().to_string(),
            ]);
            assert!(qemu_compressed_extents(&image) > 0);
            let img = open(&image, "qcow2", true);
            let compressed = (0..size.div_ceil(cs))
                .filter(|k| img.block_status(k * cs, 1).unwrap().compressed)
                .count();
            assert!(
                compressed >= 2,
                "cs {cs} {ctype:?}: img sees {compressed} compressed clusters"
            );
            assert_image_matches_raw(&img, &raw);
        }
    }
}

#[test]
fn img_compresses_qemu_reads() {
    // (cluster size, version, refcount bits, compression): narrow refcounts limit how many
    // compressed clusters may share one host cluster.
    let combos = [
        (512u64, 2u32, 16u32, CompressionType::Zlib),
        (512, 3, 1, CompressionType::Zlib),
        (512, 3, 2, CompressionType::Zstd),
        (4096, 3, 16, CompressionType::Zlib),
        (4096, 3, 64, CompressionType::Zstd),
        (65536, 2, 16, CompressionType::Zlib),
        (65536, 3, 16, CompressionType::Zlib),
        (65536, 3, 1, CompressionType::Zstd),
        (2 * MIB, 3, 16, CompressionType::Zlib),
        (2 * MIB, 3, 16, CompressionType::Zstd),
    ];
    for (cs, version, refcount_bits, ctype) in combos {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("c.qcow2");
        let reference = dir.path().join("ref.raw");
        let size = compressed_disk_size(cs);
        qcow2::create(
            &image,
            &Qcow2CreateOptions {
                size,
                cluster_size: cs,
                version,
                refcount_bits,
                compression_type: ctype,
                ..Default::default()
            },
        )
        .unwrap();
        let ref_file = create_raw_file(&reference, size);
        let img = open(&image, "qcow2", false);
        let mut rng = XorShift(0xfeed_f00d_1234_5678 ^ cs);
        let clusters = size.div_ceil(cs);
        for k in 0..clusters {
            let n = cs.min(size - k * cs) as usize;
            let d = cluster_content(k, cs as usize, &mut rng);
            img.write_compressed(k * cs, &d[..n])
                .unwrap_or_else(|e| panic!("write_compressed cluster {k}: {e}"));
            ref_file.write_all_at(&d[..n], k * cs).unwrap();
        }
        // Partial overwrites of compressed clusters, one spanning two of them, zero writes
        // and a discard on compressed clusters.
        let ops = [
            Op::write(cs / 3, 17, 1),
            Op::write(2 * cs + cs / 2, cs, 2),
            Op::Zero {
                off: 4 * cs,
                len: cs,
                unmap: false,
            },
            Op::Zero {
                off: 5 * cs + 100,
                len: 50,
                unmap: true,
            },
            Op::Discard {
                off: 6 * cs - 1,
                len: cs + 2,
            }, // partial on both sides: no effect
            Op::Discard {
                off: 8 * cs,
                len: cs,
            },
            Op::Zero {
                off: 10 * cs,
                len: cs,
                unmap: true,
            },
        ];
        for op in ops.iter().filter(|op| op.range().0 + op.range().1 <= size) {
            apply_to_image(&img, op);
            apply_to_raw_file(&ref_file, op, cs);
        }
        // Compressed clusters written again after other clusters changed.
        for k in [12u64, 13] {
            if (k + 1) * cs <= size {
                let d = cluster_content(0, cs as usize, &mut rng);
                img.write_compressed(k * cs, &d).unwrap();
                ref_file.write_all_at(&d, k * cs).unwrap();
            }
        }
        img.close().unwrap();
        drop(ref_file);
        let what = format!("cs {cs} v{version} refcount_bits {refcount_bits} {ctype:?}");
        assert!(
            qemu_compressed_extents(&image) > 0,
            "{what}: qemu sees no compressed cluster"
        );
        assert_qemu_check_clean(&image);
        assert_qemu_compare_identical(&image, "qcow2", &reference, "raw");
        let img = open(&image, "qcow2", true);
        assert_image_matches_raw(&img, &reference);
    }
}

// ---------------------------------------------------------------------------------------------
// Disk sizes that are not a multiple of the cluster size
// ---------------------------------------------------------------------------------------------

/// Operations on the last, partial cluster.
fn tail_ops(cs: u64, size: u64) -> Vec<Op> {
    let last = size / cs * cs;
    vec![
        Op::write(size - 700, 700, 1),
        Op::write(last - 3, 10, 2),
        Op::fill(last - 2 * cs, 2 * cs + 512, 0x42),
        Op::Zero {
            off: last + 512,
            len: size - last - 512,
            unmap: false,
        },
        Op::fill(last - cs, size - last + cs, 0x43),
        // Reaches the end: drops the partial last cluster as a whole one.
        Op::Discard {
            off: last - 10,
            len: size - last + 10,
        },
        Op::write(size - 512, 512, 3),
        Op::Zero {
            off: last - 100,
            len: size - last + 100,
            unmap: true,
        },
        Op::write(last - cs + 1, 1, 4),
    ]
}

#[test]
fn sizes_not_a_multiple_of_the_cluster_size() {
    for cs in [4096u64, 65536, 2 * MIB] {
        for version in [2u32, 3] {
            let cfg = Config {
                cluster_size: cs,
                version,
                refcount_bits: 16,
            };
            let size = 5 * cs + 3 * 512;
            let ops = tail_ops(cs, size);

            // qemu writes, img reads.
            let dir = tempfile::tempdir().unwrap();
            let qimage = dir.path().join("q.qcow2");
            let qref = dir.path().join("q.raw");
            qemu_create(&qimage, &cfg.qemu_options(), size);
            create_raw_file(&qref, size);
            qemu_io_many(
                "qcow2",
                &qimage,
                &qemu_io_commands(&ops, dir.path(), cs, size, false),
            );
            qemu_io_many(
                "raw",
                &qref,
                &qemu_io_commands(&ops, dir.path(), cs, size, true),
            );
            let img = open(&qimage, "qcow2", true);
            assert_image_matches_raw(&img, &qref);

            // img writes, qemu checks; the reference must equal qemu's own result.
            let image = dir.path().join("i.qcow2");
            let reference = dir.path().join("i.raw");
            qcow2::create(&image, &cfg.create_options(size)).unwrap();
            let ref_file = create_raw_file(&reference, size);
            let img = open(&image, "qcow2", false);
            for op in &ops {
                apply_to_image(&img, op);
                apply_to_raw_file(&ref_file, op, cs);
            }
            img.close().unwrap();
            assert_eq!(
                std::fs::read(&reference).unwrap(),
                std::fs::read(&qref).unwrap(),
                "cs {cs}: our model of the operations differs from qemu's"
            );
            assert_qemu_check_clean(&image);
            assert_qemu_compare_identical(&image, "qcow2", &reference, "raw");
            assert_qemu_compare_identical(&image, "qcow2", &qimage, "qcow2");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Lazy refcounts: an image qemu left dirty
// ---------------------------------------------------------------------------------------------

/// Runs qemu-io expecting it to die by abort(3), without leaving a core file behind.
fn qemu_io_abort(image: &Path, cmds: &[String]) {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg("-c").arg("abort").arg(image);
    // SAFETY: setrlimit is async-signal-safe; it only limits the child's core dumps.
    unsafe {
        cmd.pre_exec(|| {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "qemu-io did not abort: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn dirty_lazy_refcounts_image_is_repaired_on_open() {
    for cs in [512u64, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("lazy.qcow2");
        let reference = dir.path().join("ref.raw");
        let size = 64 * MIB;
        qemu_create(
            &image,
            &format!("cluster_size={cs},lazy_refcounts=on"),
            size,
        );
        create_raw_file(&reference, size);
        let ops = vec![
            Op::write(0, 3 * cs + 7, 1),
            Op::fill(MIB + 5, 200 * 1024, 0x61),
            Op::write(40 * MIB - 1, 2, 2),
        ];
        qemu_io_abort(&image, &qemu_io_commands(&ops, dir.path(), cs, size, false));
        qemu_io_many(
            "raw",
            &reference,
            &qemu_io_commands(&ops, dir.path(), cs, size, true),
        );
        let header = std::fs::read(&image).unwrap();
        let incompatible = u64::from_be_bytes(header[72..80].try_into().unwrap());
        assert_eq!(incompatible & 1, 1, "qemu-io left the image clean");
        let (code, text) = qemu_check(&image);
        assert_ne!(
            code,
            Some(0),
            "the aborted image should have refcount errors: {text}"
        );

        let img = open(&image, "qcow2", false);
        assert_image_matches_raw(&img, &reference);
        let more = [
            Op::write(2 * MIB + 3, cs * 3, 3),
            Op::Discard { off: 0, len: cs },
        ];
        let ref_file = std::fs::OpenOptions::new()
            .write(true)
            .read(true)
            .open(&reference)
            .unwrap();
        for op in &more {
            apply_to_image(&img, op);
            apply_to_raw_file(&ref_file, op, cs);
        }
        img.close().unwrap();
        let header = std::fs::read(&image).unwrap();
        let incompatible = u64::from_be_bytes(header[72..80].try_into().unwrap());
        assert_eq!(incompatible & 1, 0, "img left the image dirty");
        assert_qemu_check_clean(&image);
        assert_qemu_compare_identical(&image, "qcow2", &reference, "raw");
    }
}

// ---------------------------------------------------------------------------------------------
// Unknown header extensions
// ---------------------------------------------------------------------------------------------

/// Inserts an extension of type `kind` with `data` just before the end marker of the header
/// extension area of a qcow2 v3 image. Returns the offset of the new extension.
fn insert_header_extension(image: &Path, kind: u32, data: &[u8]) -> u64 {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut h = vec![0u8; 512];
    f.read_exact_at(&mut h, 0).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let cluster_size = 1u64 << be32(&h, 20);
    let mut area = vec![0u8; cluster_size as usize];
    f.read_exact_at(&mut area, 0).unwrap();
    let mut pos = be32(&area, 100) as usize;
    loop {
        let t = be32(&area, pos);
        let len = be32(&area, pos + 4) as usize;
        if t == 0 {
            break;
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
    let mut ext = Vec::new();
    ext.extend_from_slice(&kind.to_be_bytes());
    ext.extend_from_slice(&(data.len() as u32).to_be_bytes());
    ext.extend_from_slice(data);
    ext.resize(ext.len().div_ceil(8) * 8, 0);
    ext.extend_from_slice(&[0u8; 8]); // the end marker, moved behind
    assert!(pos + ext.len() <= cluster_size as usize);
    f.write_all_at(&ext, pos as u64).unwrap();
    pos as u64
}

#[test]
fn unknown_header_extensions_are_preserved() {
    // 512-byte clusters make the writes grow the refcount table (a header update); 64 KiB
    // clusters carry qemu's feature name table before the extension.
    for (cs, bulk) in [(512u64, 3 * MIB), (65536, 2 * MIB)] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("ext.qcow2");
        let reference = dir.path().join("ref.raw");
        let size = 64 * MIB;
        qemu_create(&image, &format!("cluster_size={cs},refcount_bits=64"), size);
        let data = b"an extension nobody knows\x00\x01\x02";
        let kind = 0x7e57_da7a;
        let at = insert_header_extension(&image, kind, data);
        assert_qemu_check_clean(&image);
        let before = std::fs::read(&image).unwrap()[..at as usize + 48].to_vec();

        let ref_file = create_raw_file(&reference, size);
        let img = open(&image, "qcow2", false);
        let mut ops = vec![Op::write(100, 5000, 1), Op::Discard { off: 0, len: cs }];
        let mut pos = 4 * MIB + 1;
        let mut seed = 2;
        while pos < 4 * MIB + bulk {
            ops.push(Op::write(pos, 256 * 1024 + 3, seed));
            pos += 256 * 1024 + 3;
            seed += 1;
        }
        for op in &ops {
            apply_to_image(&img, op);
            apply_to_raw_file(&ref_file, op, cs);
        }
        img.close().unwrap();
        let after = std::fs::read(&image).unwrap();
        // Fields the writes may change (L1 and refcount table location) aside, the header and
        // every extension must be byte for byte what they were.
        let mut a = after[..before.len()].to_vec();
        let mut b = before.clone();
        for v in [&mut a, &mut b] {
            v[36..60].fill(0);
        }
        assert_eq!(a, b, "cs {cs}: the header extension area changed");
        if cs == 512 {
            let clusters = u32::from_be_bytes(after[56..60].try_into().unwrap());
            assert!(clusters > 1, "the refcount table was expected to grow");
        }
        assert_qemu_check_clean(&image);
        assert_qemu_compare_identical(&image, "qcow2", &reference, "raw");
        // qemu still sees the extension and keeps it when it rewrites the header itself.
        qemu_img(&[
            "amend",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            &image.display().to_string(),
        ]);
        let amended = std::fs::read(&image).unwrap();
        let needle: Vec<u8> = kind
            .to_be_bytes()
            .into_iter()
            .chain((data.len() as u32).to_be_bytes())
            .chain(data.iter().copied())
            .collect();
        assert!(
            amended[..cs as usize]
                .windows(needle.len())
                .any(|w| w == needle),
            "qemu dropped the extension: it was not well formed"
        );
    }
}
