//! Engine benchmarks: qcow2 sequential writes and reads through the generic access path, and
//! convert raw -> qcow2, each on a fresh image in a temporary directory.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use img_core::convert::{convert, ConvertOptions};
use img_core::qcow2::{self, Qcow2CreateOptions};
use img_core::{open_image, OpenOptions};
use std::path::Path;

const DISK: u64 = 64 << 20;

fn new_qcow2(path: &Path, cluster_size: u64) {
    qcow2::create(
        path,
        &Qcow2CreateOptions {
            size: DISK,
            cluster_size,
            ..Default::default()
        },
    )
    .unwrap();
}

fn rw() -> OpenOptions {
    OpenOptions {
        cache: blockdev::CacheMode::Unsafe,
        ..Default::default()
    }
}

fn sequential_write(c: &mut Criterion) {
    let mut g = c.benchmark_group("qcow2_sequential_write_64MiB");
    g.throughput(Throughput::Bytes(DISK));
    g.sample_size(10);
    for cs in [4096u64, 65536] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.qcow2");
        let data = vec![0x5au8; 1 << 20];
        g.bench_function(format!("cluster_{cs}"), |b| {
            b.iter_batched(
                || new_qcow2(&path, cs),
                |_| {
                    let img = open_image(&path, &rw()).unwrap();
                    for off in (0..DISK).step_by(data.len()) {
                        img.write_at(&data, off).unwrap();
                    }
                    img.close().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn sequential_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("qcow2_sequential_read_64MiB");
    g.throughput(Throughput::Bytes(DISK));
    g.sample_size(10);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.qcow2");
    new_qcow2(&path, 65536);
    {
        let img = open_image(&path, &rw()).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        for off in (0..DISK).step_by(data.len()) {
            img.write_at(&data, off).unwrap();
        }
        img.close().unwrap();
    }
    let mut buf = vec![0u8; 1 << 20];
    g.bench_function("cluster_65536", |b| {
        b.iter(|| {
            let img = open_image(
                &path,
                &OpenOptions {
                    read_only: true,
                    ..Default::default()
                },
            )
            .unwrap();
            for off in (0..DISK).step_by(buf.len()) {
                img.read_at(&mut buf, off).unwrap();
            }
        })
    });
    g.finish();
}

fn convert_raw_to_qcow2(c: &mut Criterion) {
    let mut g = c.benchmark_group("convert_raw_to_qcow2_64MiB_half_allocated");
    g.throughput(Throughput::Bytes(DISK));
    g.sample_size(10);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.raw");
    {
        img_core::raw::create(
            &src,
            &img_core::raw::RawCreateOptions {
                size: DISK,
                ..Default::default()
            },
        )
        .unwrap();
        let img = open_image(&src, &rw()).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8).collect();
        for off in (0..DISK).step_by(2 << 20) {
            img.write_at(&data, off).unwrap();
        }
        img.close().unwrap();
    }
    let dst = dir.path().join("d.qcow2");
    for compress in [false, true] {
        g.bench_function(if compress { "compressed" } else { "plain" }, |b| {
            b.iter_batched(
                || new_qcow2(&dst, 65536),
                |_| {
                    let s = open_image(
                        &src,
                        &OpenOptions {
                            read_only: true,
                            ..Default::default()
                        },
                    )
                    .unwrap();
                    let d = open_image(&dst, &rw()).unwrap();
                    let opts = ConvertOptions {
                        compress,
                        ..Default::default()
                    };
                    convert(&[&s], &d, &opts, &mut |_, _| {}).unwrap();
                    d.close().unwrap();
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn compressed_reads(c: &mut Criterion) {
    let mut g = c.benchmark_group("qcow2_compressed_read_64MiB");
    g.throughput(Throughput::Bytes(DISK));
    g.sample_size(10);
    let dir = tempfile::tempdir().unwrap();
    for ctype in [
        img_core::qcow2::CompressionType::Zlib,
        img_core::qcow2::CompressionType::Zstd,
    ] {
        let path = dir.path().join(format!("c-{}.qcow2", ctype.name()));
        qcow2::create(
            &path,
            &Qcow2CreateOptions {
                size: DISK,
                compression_type: ctype,
                ..Default::default()
            },
        )
        .unwrap();
        {
            let img = open_image(&path, &rw()).unwrap();
            let text: Vec<u8> = (0..65536u32)
                .flat_map(|i| format!("{i:08} compressible line\n").into_bytes())
                .take(65536)
                .collect();
            for off in (0..DISK).step_by(65536) {
                img.write_compressed(off, &text).unwrap();
            }
            img.close().unwrap();
        }
        let ro = OpenOptions {
            read_only: true,
            ..Default::default()
        };
        let mut buf = vec![0u8; 1 << 20];
        g.bench_function(format!("{}_sequential_1MiB", ctype.name()), |b| {
            b.iter(|| {
                let img = open_image(&path, &ro).unwrap();
                for off in (0..DISK).step_by(buf.len()) {
                    img.read_at(&mut buf, off).unwrap();
                }
            })
        });
        let mut small = vec![0u8; 4096];
        g.bench_function(format!("{}_random_4k", ctype.name()), |b| {
            b.iter(|| {
                let img = open_image(&path, &ro).unwrap();
                // Scattered 4 KiB reads: nearly every one decompresses a cluster.
                for i in 0..16384u64 {
                    let off = (i * 4096 * 997) % (DISK - 4096);
                    img.read_at(&mut small, off / 4096 * 4096).unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    sequential_write,
    sequential_read,
    convert_raw_to_qcow2,
    compressed_reads
);
criterion_main!(benches);
