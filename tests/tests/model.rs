//! Model-based property test: random sequences of writes, zero writes, discards, compressed
//! writes, reopenings and operations done by qemu-io in between on a qcow2 image behave exactly like the same operations on an
//! in-memory disk, and leave an image that `qemu-img check` finds clean and `qemu-img compare`
//! finds identical to the model.
//!
//! The run is deterministic (fixed seed, no failure persistence) so CI sees the same cases on
//! every run; `IMG_MODEL_SEED` and `IMG_MODEL_CASES` explore further.

mod common;

use common::{
    apply_to_image, apply_to_model, assert_image_matches_raw, assert_qemu_check_clean,
    assert_qemu_compare_identical, qemu_io, qemu_io_commands, Op,
};
use img_core::qcow2::{self, CompressionType, Qcow2CreateOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestRunner};
use std::path::Path;

/// The image configuration of one case.
#[derive(Clone, Debug)]
struct ImageConfig {
    cluster_size: u64,
    version: u32,
    refcount_bits: u32,
    compression: CompressionType,
    size: u64,
    /// A tiny metadata cache forces evictions and ordered flushes in the middle of operations.
    small_cache: bool,
    /// lazy_refcounts=on (compat 1.1 only): the dirty bit is set while the image is open.
    lazy_refcounts: bool,
}

/// One step, drawn as raw numbers and made concrete against the disk size, so that shrinking
/// works on plain integers.
#[derive(Clone, Debug)]
struct RawStep {
    kind: u8,
    at: u64,
    len: u64,
    snap: bool,
    seed: u8,
}

/// A concrete step.
#[derive(Clone, Debug)]
enum Step {
    Op(Op),
    /// Write one whole cluster compressed (compressible data).
    Compressed {
        cluster: u64,
        seed: u8,
    },
    /// Close the image and open it again.
    Reopen,
    /// Close the image, let qemu-io perform the operation, and open the image again.
    Qemu(Op),
}

fn config_strategy() -> impl Strategy<Value = ImageConfig> {
    let cs = prop_oneof![Just(512u64), Just(4096u64), Just(65536u64)];
    let flavour = prop_oneof![
        Just((2u32, 16u32, CompressionType::Zlib)),
        Just((3, 1, CompressionType::Zlib)),
        Just((3, 2, CompressionType::Zstd)),
        Just((3, 8, CompressionType::Zlib)),
        Just((3, 16, CompressionType::Zlib)),
        Just((3, 16, CompressionType::Zstd)),
        Just((3, 32, CompressionType::Zlib)),
        Just((3, 64, CompressionType::Zstd)),
    ];
    (
        cs,
        flavour,
        4u64..160,
        0u64..4,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                cluster_size,
                (version, refcount_bits, compression),
                clusters,
                tail,
                small_cache,
                lazy,
            )| {
                // Up to 160 clusters (10 MiB with 64 KiB clusters), sometimes with a partial last
                // cluster.
                let tail = if cluster_size > 512 { tail * 512 } else { 0 };
                ImageConfig {
                    cluster_size,
                    version,
                    refcount_bits,
                    compression,
                    size: clusters * cluster_size + tail,
                    small_cache,
                    lazy_refcounts: lazy && version >= 3,
                }
            },
        )
}

fn steps_strategy() -> impl Strategy<Value = Vec<RawStep>> {
    let step = (
        0u8..20,
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        any::<u8>(),
    )
        .prop_map(|(kind, at, len, snap, seed)| RawStep {
            kind,
            at,
            len,
            snap,
            seed,
        });
    prop::collection::vec(step, 10..40)
}

/// Makes a drawn step concrete: offsets are often snapped to cluster boundaries (give or take
/// a few bytes), lengths range from one byte to several clusters.
fn concrete(raw: &RawStep, cfg: &ImageConfig) -> Step {
    let cs = cfg.cluster_size;
    let size = cfg.size;
    let mut off = raw.at % size;
    if raw.snap {
        let delta = (raw.at >> 40) % 5;
        off = (off / cs * cs + delta).min(size - 1);
    }
    let max_len = (size - off).min(if raw.len & 1 == 0 { 3 * cs } else { 12 * cs });
    let mut len = 1 + (raw.len >> 1) % max_len;
    if raw.snap && raw.len & 2 == 0 {
        // Whole clusters.
        len = (len.div_ceil(cs) * cs).min(size - off);
    }
    let seed = raw.seed;
    match raw.kind {
        0..=7 => Step::Op(Op::write(off, len, seed)),
        8..=9 => Step::Op(Op::fill(off, len, seed)),
        10..=11 => Step::Op(Op::Zero {
            off,
            len,
            unmap: false,
        }),
        12..=13 => Step::Op(Op::Zero {
            off,
            len,
            unmap: true,
        }),
        14..=16 => Step::Op(Op::Discard { off, len }),
        17..=18 => Step::Compressed {
            cluster: off / cs,
            seed,
        },
        19 => Step::Reopen,
        20 => Step::Qemu(Op::fill(off, len, seed)),
        21 => Step::Qemu(Op::Zero {
            off,
            len,
            unmap: seed & 1 == 1,
        }),
        _ => Step::Qemu(Op::Discard { off, len }),
    }
}

fn open_image(path: &Path, cfg: &ImageConfig) -> img_core::Image {
    let small = cfg.small_cache.then_some(2 * cfg.cluster_size);
    img_core::open_image(
        path,
        &img_core::OpenOptions {
            format: Some("qcow2".into()),
            read_only: false,
            qcow2_cache: img_core::qcow2::CacheOptions {
                l2_cache_size: small,
                refcount_cache_size: small,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Compressible content for a compressed write.
fn compressible(seed: u8, len: usize) -> Vec<u8> {
    format!("compressible {seed} ")
        .bytes()
        .cycle()
        .take(len)
        .collect()
}

fn run_case(cfg: &ImageConfig, raw_steps: &[RawStep]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.qcow2");
    qcow2::create(
        &path,
        &Qcow2CreateOptions {
            size: cfg.size,
            cluster_size: cfg.cluster_size,
            version: cfg.version,
            refcount_bits: cfg.refcount_bits,
            compression_type: cfg.compression,
            lazy_refcounts: cfg.lazy_refcounts,
            ..Default::default()
        },
    )
    .unwrap();
    let cs = cfg.cluster_size;
    let mut model = vec![0u8; cfg.size as usize];
    let mut image = open_image(&path, cfg);
    for raw in raw_steps {
        match concrete(raw, cfg) {
            Step::Op(op) => {
                apply_to_image(&image, &op);
                apply_to_model(&mut model, &op, cs);
            }
            Step::Compressed { cluster, seed } => {
                let off = cluster * cs;
                let len = cs.min(cfg.size - off) as usize;
                let data = compressible(seed, len);
                image
                    .write_compressed(off, &data)
                    .unwrap_or_else(|e| panic!("write_compressed at {off}: {e}"));
                model[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Step::Reopen => {
                image.close().unwrap();
                image = open_image(&path, cfg);
            }
            Step::Qemu(op) => {
                image.close().unwrap();
                let cmds =
                    qemu_io_commands(std::slice::from_ref(&op), dir.path(), cs, cfg.size, false);
                qemu_io("qcow2", &path, &cmds);
                apply_to_model(&mut model, &op, cs);
                image = open_image(&path, cfg);
            }
        }
    }
    let reference = dir.path().join("model.raw");
    std::fs::write(&reference, &model).unwrap();
    assert_image_matches_raw(&image, &reference);
    image.close().unwrap();
    assert_qemu_check_clean(&path);
    assert_qemu_compare_identical(&path, "qcow2", &reference, "raw");
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")),
    )
}

#[test]
fn qcow2_behaves_like_a_flat_disk() {
    let config = ProptestConfig {
        cases: env_u64("IMG_MODEL_CASES").unwrap_or(24) as u32,
        rng_seed: RngSeed::Fixed(env_u64("IMG_MODEL_SEED").unwrap_or(0x1a2b_3c4d_5e6f_7081)),
        failure_persistence: None,
        // Each case runs qemu-img twice; keep shrinking bounded.
        max_shrink_iters: 300,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&(config_strategy(), steps_strategy()), |(cfg, steps)| {
        run_case(&cfg, &steps);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
