//! Scatter reads (`Image::read_vectored_at`, what the VMM uses to read straight into a
//! guest's buffers) return exactly what plain reads return, on every kind of extent: data in
//! the image, zero clusters, compressed clusters, unallocated ranges read from a backing file,
//! and past a shorter backing file; with the page cache and with O_DIRECT, through aligned
//! buffers (one vectored request) and misaligned ones (buffer by buffer).

mod common;

use blockdev::{AlignedBuf, CacheMode};
use common::{qemu_img, qemu_io};
use img_core::{open_image, OpenOptions};
use rand::{Rng, SeedableRng};
use std::io::IoSliceMut;

const MIB: u64 = 1 << 20;

/// Reads `len` bytes at `offset` with read_vectored_at into buffers cut at random places of
/// an aligned region (offset `shift` into it), and returns them joined.
fn read_scattered(
    image: &img_core::Image,
    rng: &mut impl Rng,
    offset: u64,
    len: usize,
    shift: usize,
    granule: usize,
) -> Vec<u8> {
    let mut mem = AlignedBuf::zeroed(len + shift + 4096, 4096);
    mem.fill(0xee);
    let region = &mut mem[shift..shift + len];
    let mut bufs = Vec::new();
    let mut rest: &mut [u8] = region;
    while !rest.is_empty() {
        let max = rest.len() / granule;
        let n = if max <= 1 {
            rest.len()
        } else {
            rng.random_range(1..=max.min(64)) * granule
        };
        let (head, tail) = rest.split_at_mut(n);
        bufs.push(IoSliceMut::new(head));
        rest = tail;
    }
    image
        .read_vectored_at(&mut bufs, offset)
        .unwrap_or_else(|e| panic!("read_vectored_at({offset}, {len}): {e}"));
    drop(bufs);
    mem[shift..shift + len].to_vec()
}

#[test]
fn scatter_reads_match_plain_reads_on_every_extent_kind() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    // A backing file shorter than the overlay, with data of its own.
    qemu_img(&["create", "-q", "-f", "qcow2", b, "6M"]);
    qemu_io(
        "qcow2",
        &base,
        &["write -P 0x11 0 6M".into(), "write -P 0x22 1M 512k".into()],
    );
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", t, "8M",
    ]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 0x33 64k 192k".into(),
            "write -z 2M 256k".into(),
            "write -c -P 0x44 3M 64k".into(),
            "write -c -P 0x55 3200k 64k".into(),
            "write -P 0x66 7M 512k".into(),
            "write -P 0x77 4100k 4k".into(),
        ],
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5ca7_7e4d);
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let image = open_image(
            &top,
            &OpenOptions {
                format: Some("qcow2".into()),
                read_only: true,
                cache,
                ..Default::default()
            },
        )
        .unwrap();
        for case in 0..120 {
            // Page- and sector-aligned requests through aligned buffers take the vectored path
            // under O_DIRECT (as far as the file's alignment allows); byte-granular ones take
            // the buffer-by-buffer path.
            let (granule, shift) = [(4096, 0), (512, 0), (1, 7)][case % 3];
            let len = rng.random_range(1..=(MIB as usize / granule)) * granule;
            let offset = rng.random_range(0..=(8 * MIB - len as u64) / 512) * 512
                + if granule == 1 {
                    rng.random_range(0..512)
                } else {
                    0
                };
            let len = len.min((8 * MIB - offset) as usize);
            let mut want = vec![0u8; len];
            image.read_at(&mut want, offset).unwrap();
            let got = read_scattered(&image, &mut rng, offset, len, shift, granule);
            assert!(
                got == want,
                "cache={cache:?}: scatter read of {len} bytes at {offset} differs"
            );
        }
        // Past the end is refused, as read_at refuses it.
        let mut buf = vec![0u8; 4096];
        let mut bufs = [IoSliceMut::new(&mut buf)];
        assert!(image.read_vectored_at(&mut bufs, 8 * MIB - 2048).is_err());
    }
}

/// A raw image with O_DIRECT whose size is not a multiple of the block size: a scatter read
/// that reaches the end takes the short read at the end of the file in its stride.
#[test]
fn scatter_reads_up_to_an_unaligned_end_of_a_raw_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    let data: Vec<u8> = (0..(MIB + 512) as usize)
        .map(|i| (i * 7 % 253) as u8)
        .collect();
    std::fs::write(&path, &data).unwrap();
    let image = open_image(
        &path,
        &OpenOptions {
            format: Some("raw".into()),
            read_only: true,
            cache: CacheMode::None,
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for len in [512usize, 4096, 65536 + 512, MIB as usize + 512] {
        let offset = MIB + 512 - len as u64;
        let got = read_scattered(&image, &mut rng, offset, len, 0, 512);
        assert_eq!(got, &data[offset as usize..], "the last {len} bytes");
    }
}

/// Gather writes (`Image::write_vectored_at`) leave an image identical to the one plain
/// writes make, through allocated clusters (one vectored request), fresh allocations,
/// compressed and zero clusters and an overlay over a backing file, with and without
/// O_DIRECT and zero detection; both images stay clean for `qemu-img check`.
#[test]
fn gather_writes_leave_the_image_plain_writes_leave() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let b = base.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", b, "4M"]);
    qemu_io("qcow2", &base, &["write -P 0x11 0 4M".into()]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x9a7e);
    for (round, (cache, detect)) in [
        (CacheMode::Writeback, img_core::DetectZeroes::Off),
        (CacheMode::None, img_core::DetectZeroes::Off),
        (CacheMode::None, img_core::DetectZeroes::On),
    ]
    .into_iter()
    .enumerate()
    {
        let plain = dir.path().join(format!("plain{round}.qcow2"));
        let gathered = dir.path().join(format!("gathered{round}.qcow2"));
        for p in [&plain, &gathered] {
            let p = p.to_str().unwrap();
            qemu_img(&[
                "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", p, "6M",
            ]);
            // Some clusters allocated (written in place), some compressed, some zero.
            qemu_io(
                "qcow2",
                std::path::Path::new(p),
                &[
                    "write -P 0x22 0 1M".into(),
                    "write -c -P 0x33 2M 64k".into(),
                    "write -z 3M 128k".into(),
                ],
            );
        }
        let open = |p: &std::path::Path| {
            open_image(
                p,
                &OpenOptions {
                    format: Some("qcow2".into()),
                    cache,
                    detect_zeroes: detect,
                    ..Default::default()
                },
            )
            .unwrap()
        };
        let (a, g) = (open(&plain), open(&gathered));
        for case in 0..60 {
            let granule = [4096, 512, 1][case % 3];
            let len = rng.random_range(1..=(512 * 1024 / granule)) * granule;
            let offset = rng.random_range(0..(6 * MIB - len as u64) / 512) * 512;
            let mut data = AlignedBuf::zeroed(len, 4096);
            if case % 5 != 4 {
                rng.fill(&mut data[..]);
            }
            a.write_at(&data, offset).unwrap();
            let mut bufs = Vec::new();
            let mut rest: &[u8] = &data;
            while !rest.is_empty() {
                let max = rest.len() / granule;
                let n = if max <= 1 {
                    rest.len()
                } else {
                    rng.random_range(1..=max.min(32)) * granule
                };
                let (head, tail) = rest.split_at(n);
                bufs.push(std::io::IoSlice::new(head));
                rest = tail;
            }
            g.write_vectored_at(&bufs, offset)
                .unwrap_or_else(|e| panic!("write_vectored_at({offset}, {len}): {e}"));
        }
        a.close().unwrap();
        g.close().unwrap();
        let (pa, pg) = (plain.to_str().unwrap(), gathered.to_str().unwrap());
        qemu_img(&["check", pa]);
        qemu_img(&["check", pg]);
        qemu_img(&["compare", "-q", pa, pg]);
    }
}
