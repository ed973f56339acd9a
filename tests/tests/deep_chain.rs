//! A backing chain 1000 images deep opens and reads with bounded memory and one open file
//! per image, and reads what qemu-img reads.

mod common;

use common::*;
use std::path::Path;

const DEPTH: usize = 1000;

/// Peak resident set of the children waited for so far, in KiB.
fn children_max_rss_kib() -> i64 {
    // SAFETY: getrusage fills the struct we pass and reads nothing else.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage.ru_maxrss as i64
    }
}

fn open_files() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// qemu-io and qemu-img hold one file per image too; let them (and us) open the chain.
fn raise_open_file_limit() {
    // SAFETY: getrlimit and setrlimit read and write only the struct passed.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

#[test]
fn a_chain_1000_deep_reads_with_bounded_memory_and_files() {
    raise_open_file_limit();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let name = |i: usize| format!("l{i}.qcow2");
    let path = |i: usize| d.join(name(i));
    img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path(0).to_str().unwrap(),
        "64M",
    ]);
    for i in 1..=DEPTH {
        // -u with a size: each create would otherwise open the whole chain beneath it.
        img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            &name(i - 1),
            "-F",
            "qcow2",
            path(i).to_str().unwrap(),
            "64M",
        ]);
    }
    // Data at a few depths, some of it hidden by later layers.
    for (layer, cmd) in [
        (0, "write -P 1 0 8M"),
        (10, "write -P 2 1M 64k"),
        (500, "write -P 3 1M 4k"),
        (999, "write -z 2M 64k"),
    ] {
        qemu_io("qcow2", &path(layer), &[cmd.to_string()]);
    }
    // A partial-cluster write on top copies the rest of its cluster up from 1000 images
    // below. (qemu-io itself crashes on this write: its copy-on-write read recurses through
    // the chain on a small coroutine stack.)
    {
        let top = img_core::open_image(&path(DEPTH), &img_core::OpenOptions::default()).unwrap();
        top.write_at(&[4u8; 1000], 7 << 20).unwrap();
        top.close().unwrap();
    }

    let ours = d.join("ours.raw");
    img_ok(&[
        "convert",
        "-O",
        "raw",
        path(DEPTH).to_str().unwrap(),
        ours.to_str().unwrap(),
    ]);
    // Every child so far is an img process or a qemu-io on a shallow part of the chain.
    let peak_kib = children_max_rss_kib();
    assert!(
        peak_kib < 256 * 1024,
        "img read a {DEPTH}-deep chain with a peak RSS of {peak_kib} KiB"
    );
    // The expected disk, layer by layer from the bottom. (qemu-img 10.0.2 cannot be the
    // oracle here: its convert of this chain dies, recursing through 1000 images on a
    // coroutine stack.)
    let mut model = vec![0u8; 64 << 20];
    let mib = 1usize << 20;
    model[..8 * mib].fill(1);
    model[mib..mib + 65536].fill(2);
    model[mib..mib + 4096].fill(3);
    model[2 * mib..2 * mib + 65536].fill(0);
    model[7 * mib..7 * mib + 1000].fill(4);
    assert!(
        std::fs::read(&ours).unwrap() == model,
        "img read the chain wrongly"
    );

    // In process: one file descriptor per image of the chain, and all of them go on close.
    let before = open_files();
    let image = img_core::open_image(&path(DEPTH), &img_core::OpenOptions::default()).unwrap();
    assert_eq!(image.chain().count(), DEPTH + 1);
    let held = open_files() - before;
    assert!(
        held <= DEPTH + 1 + 4,
        "{held} files open for a chain of {} images",
        DEPTH + 1
    );
    let mut buf = vec![0u8; 4096];
    image.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 3), "the copy at depth 500 wins");
    image.close().unwrap();
    assert_eq!(open_files(), before, "files left open after close");

    // The depth limit is enforced with a clear error.
    let shallow = img_core::OpenOptions {
        backing: img_core::BackingPolicy {
            max_depth: 100,
            ..Default::default()
        },
        ..Default::default()
    };
    let e = img_core::open_image(Path::new(&path(DEPTH)), &shallow).unwrap_err();
    assert!(e.to_string().contains("deeper than 100"), "{e}");
}
