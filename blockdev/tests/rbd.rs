//! RbdStorage against a real single-node Ceph cluster started by scripts/ceph-lab.sh.
//!
//! Run with `cargo test -p blockdev --features rbd --test rbd`. Without the Ceph packages the
//! tests skip with a printed reason, unless IMG_REQUIRE_CEPH=1 (then they fail). The `rbd`
//! command line tool is the independent check of what librbd stored.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use blockdev::rbd::RbdStorage;
use blockdev::{Error, Storage};

/// The cluster's ceph.conf, or None (with the reason printed) when the tests must skip.
fn cluster() -> Option<&'static Path> {
    static CONF: OnceLock<Option<PathBuf>> = OnceLock::new();
    CONF.get_or_init(|| {
        let required = std::env::var("IMG_REQUIRE_CEPH").is_ok_and(|v| v == "1");
        let have = Command::new("sh")
            .args(["-c", "command -v ceph-mon && command -v ceph-osd && command -v rbd"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have {
            assert!(!required, "IMG_REQUIRE_CEPH=1 but ceph-mon/ceph-osd/rbd are missing");
            eprintln!("skipping: the Ceph packages are not installed (scripts/ceph-lab.sh start installs them)");
            return None;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-lab.sh");
        let out = Command::new(&script).arg("start").output().expect("run ceph-lab.sh");
        assert!(
            out.status.success(),
            "ceph-lab.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
    })
    .as_deref()
}

/// A fresh image name for one test, and its `rbd:` name with the cluster's conf.
fn image(conf: &Path, test: &str) -> (String, String) {
    let image = format!("t-{}-{test}", std::process::id());
    let name = format!("rbd:rbd/{image}:conf={}", conf.display());
    (image, name)
}

/// Asserts that `rbd export` (the independent check of what librbd stored) gives `expect`,
/// then removes the image.
fn assert_exported_then_remove(conf: &Path, img: &str, expect: &[u8]) {
    let file = std::env::temp_dir().join(format!("{img}.raw"));
    let _ = std::fs::remove_file(&file);
    rbd(
        conf,
        &["export", &format!("rbd/{img}"), file.to_str().unwrap()],
    );
    let exported = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    assert!(
        exported == expect,
        "rbd export differs from what was written"
    );
    rbd(conf, &["rm", &format!("rbd/{img}")]);
}

fn rbd(conf: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("run rbd");
    assert!(
        out.status.success(),
        "rbd {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8)
        .collect()
}

#[test]
fn create_write_read_and_export() {
    let Some(conf) = cluster() else { return };
    let (img, name) = image(conf, "rw");
    let size = 16 << 20;
    let s = RbdStorage::create(&name, size).unwrap();
    assert_eq!(s.size().unwrap(), size);
    // Unwritten space reads as zeros.
    let mut buf = vec![0xffu8; 8192];
    s.read_at(&mut buf, 1 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    // A write spanning the 4 MiB object boundary, and a small unaligned one.
    let big = pattern(3 << 20, 7);
    s.write_at(&big, (3 << 20) + 512).unwrap();
    let small = pattern(1000, 99);
    s.write_at(&small, 12345).unwrap();
    s.flush().unwrap();
    let mut back = vec![0u8; big.len()];
    s.read_at(&mut back, (3 << 20) + 512).unwrap();
    assert!(back == big, "read back differs from what was written");
    drop(s);

    // The rbd tool sees the same bytes: export and compare against the expected image.
    let mut expect = vec![0u8; size as usize];
    expect[12345..12345 + small.len()].copy_from_slice(&small);
    let at = (3 << 20) + 512;
    expect[at..at + big.len()].copy_from_slice(&big);
    assert_exported_then_remove(conf, &img, &expect);
}

#[test]
fn zeroes_discard_resize_and_bounds() {
    let Some(conf) = cluster() else { return };
    let (img, name) = image(conf, "zd");
    let s = RbdStorage::create(&name, 8 << 20).unwrap();
    let data = pattern(8 << 20, 3);
    s.write_at(&data, 0).unwrap();
    s.write_zeroes(4096, 1 << 20, false).unwrap();
    s.discard(5 << 20, 1 << 20).unwrap();
    let mut back = vec![0u8; 8 << 20];
    s.read_at(&mut back, 0).unwrap();
    let mut expect = data.clone();
    expect[4096..4096 + (1 << 20)].fill(0);
    expect[5 << 20..6 << 20].fill(0);
    assert!(
        back == expect,
        "zeroed/discarded ranges do not read back as expected"
    );

    // Past the end reads as zeros, as a file does (a format reads its whole last cluster);
    // discarding there changes nothing, and an offset that overflows is a typed error.
    let mut buf = [7u8; 4096];
    s.read_at(&mut buf, (8 << 20) - 100).unwrap();
    assert!(
        buf[..100] == data[(8 << 20) - 100..],
        "the part inside was not read"
    );
    assert!(
        buf[100..].iter().all(|&b| b == 0),
        "past the end did not read as zeros"
    );
    s.discard((8 << 20) - 512, 1 << 20).unwrap();
    assert_eq!(s.size().unwrap(), 8 << 20);
    match s.read_at(&mut buf, u64::MAX - 100) {
        Err(Error::PastEnd { name: n, .. }) => assert_eq!(n, name),
        other => panic!("expected PastEnd, got {other:?}"),
    }

    // Grow: the new space reads as zeros and the old data stays; shrink: the size follows.
    s.truncate(12 << 20).unwrap();
    assert_eq!(s.size().unwrap(), 12 << 20);
    s.read_at(&mut buf, 10 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    s.read_at(&mut buf, 0).unwrap();
    assert!(buf[..] == data[..4096]);
    s.truncate(2 << 20).unwrap();
    assert_eq!(s.size().unwrap(), 2 << 20);
    drop(s);
    let info = rbd(conf, &["info", "--format", "json", &format!("rbd/{img}")]);
    let info = String::from_utf8(info.stdout).unwrap();
    assert!(
        info.contains(&format!("\"size\":{}", 2 << 20)),
        "rbd info: {info}"
    );
    rbd(conf, &["rm", &format!("rbd/{img}")]);
}

#[test]
fn snapshots_and_read_only() {
    let Some(conf) = cluster() else { return };
    let (img, name) = image(conf, "snap");
    let s = RbdStorage::create(&name, 4 << 20).unwrap();
    let before = pattern(65536, 1);
    s.write_at(&before, 0).unwrap();
    s.flush().unwrap();
    rbd(conf, &["snap", "create", &format!("rbd/{img}@s1")]);
    s.write_at(&pattern(65536, 2), 0).unwrap();
    s.flush().unwrap();

    // The snapshot is read-only and shows the data as it was when it was taken.
    let snap_name = format!("rbd:rbd/{img}@s1:conf={}", conf.display());
    let snap = RbdStorage::open(&snap_name, false).unwrap();
    assert!(snap.is_read_only());
    let mut back = vec![0u8; before.len()];
    snap.read_at(&mut back, 0).unwrap();
    assert!(
        back == before,
        "snapshot does not show the data at snapshot time"
    );
    assert!(matches!(
        snap.write_at(&[1], 0),
        Err(Error::ReadOnly { .. })
    ));

    let ro = RbdStorage::open(&name, true).unwrap();
    assert!(matches!(ro.write_at(&[1], 0), Err(Error::ReadOnly { .. })));
    drop((s, snap, ro));
    rbd(conf, &["snap", "purge", &format!("rbd/{img}")]);
    rbd(conf, &["rm", &format!("rbd/{img}")]);
}

#[test]
fn missing_image_and_pool_are_open_errors() {
    let Some(conf) = cluster() else { return };
    let name = format!("rbd:rbd/does-not-exist:conf={}", conf.display());
    let e = RbdStorage::open(&name, false).unwrap_err();
    assert!(matches!(&e, Error::Open { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("does-not-exist") && msg.contains("No such file"),
        "{msg}"
    );

    let name = format!("rbd:nopool/x:conf={}", conf.display());
    let e = RbdStorage::open(&name, false).unwrap_err();
    assert!(e.to_string().contains("nopool"), "{e}");

    let e = RbdStorage::open("rbd:rbd/x:conf=/nonexistent/ceph.conf", false).unwrap_err();
    assert!(e.to_string().contains("No such file"), "{e}");
}

#[test]
fn vectored_reads_and_writes() {
    let Some(conf) = cluster() else { return };
    let (img, name) = image(conf, "vec");
    let s = RbdStorage::create(&name, 8 << 20).unwrap();
    let (a, b, c) = (pattern(4096, 1), pattern(100_000, 2), pattern(7, 3));
    let at = (4 << 20) - 50_000;
    s.write_vectored_at(
        &[
            std::io::IoSlice::new(&a),
            std::io::IoSlice::new(&b),
            std::io::IoSlice::new(&c),
        ],
        at,
    )
    .unwrap();
    let whole = [a.as_slice(), b.as_slice(), c.as_slice()].concat();
    let mut back = vec![0u8; whole.len()];
    s.read_at(&mut back, at).unwrap();
    assert!(back == whole, "vectored write did not land in order");

    let (mut x, mut y) = (vec![0u8; 5000], vec![0u8; whole.len() - 5000]);
    s.read_vectored_at(
        &mut [
            std::io::IoSliceMut::new(&mut x),
            std::io::IoSliceMut::new(&mut y),
        ],
        at,
    )
    .unwrap();
    assert!([x, y].concat() == whole, "vectored read differs");
    drop(s);
    rbd(conf, &["rm", &format!("rbd/{img}")]);
}

#[test]
fn namespaces() {
    let Some(conf) = cluster() else { return };
    let ns = format!("ns{}", std::process::id());
    rbd(conf, &["namespace", "create", &format!("rbd/{ns}")]);
    let name = format!("rbd:rbd/{ns}/img:conf={}", conf.display());
    let s = RbdStorage::create(&name, 1 << 20).unwrap();
    s.write_at(&pattern(4096, 5), 0).unwrap();
    drop(s);
    // The image is in the namespace, not in the pool's default one.
    let listed = rbd(conf, &["ls", &format!("rbd/{ns}")]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "img");
    let e = RbdStorage::open(&format!("rbd:rbd/img:conf={}", conf.display()), true);
    assert!(
        e.is_err(),
        "the image must not appear outside its namespace"
    );
    rbd(conf, &["rm", &format!("rbd/{ns}/img")]);
    rbd(conf, &["namespace", "remove", &format!("rbd/{ns}")]);
}

/// QEMU 7.2's qemu-img with its rbd module: scripts/qemu-img72.sh, which unpacks Debian's
/// qemu-utils 7.2 and qemu-block-extra on first use (the installed qemu-img 10 has no rbd
/// driver).
fn qemu72() -> Option<PathBuf> {
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/qemu-img72.sh"))
}

#[test]
fn qemu_img_reads_what_we_write_and_the_reverse() {
    let Some(conf) = cluster() else { return };
    let Some(qemu) = qemu72() else { return };
    let dir = tempfile::tempdir().unwrap();
    // An image name with an escaped colon: both sides must parse it to the same image.
    let img = format!("t-{}-q:x", std::process::id());
    let name = format!(
        r"rbd:rbd/t-{}-q\:x:conf={}",
        std::process::id(),
        conf.display()
    );
    let data = pattern(5 << 20, 11);
    let local = dir.path().join("local.raw");
    std::fs::write(&local, &data).unwrap();

    let s = RbdStorage::create(&name, data.len() as u64).unwrap();
    s.write_at(&data, 0).unwrap();
    s.flush().unwrap();
    drop(s);
    let out = Command::new(&qemu)
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&local)
        .arg(&name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // qemu-img writes other content; we read it back.
    let other = pattern(5 << 20, 12);
    std::fs::write(&local, &other).unwrap();
    let out = Command::new(&qemu)
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&local)
        .arg(&name)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = RbdStorage::open(&name, true).unwrap();
    let mut back = vec![0u8; other.len()];
    s.read_at(&mut back, 0).unwrap();
    assert!(
        back == other,
        "what qemu-img wrote does not read back through RbdStorage"
    );
    drop(s);
    rbd(conf, &["rm", &format!("rbd/{img}")]);
}

#[test]
fn conf_options_from_the_name() {
    let Some(conf) = cluster() else { return };
    let (img, name) = image(conf, "opt");
    RbdStorage::create(&name, 1 << 20).unwrap();
    // Options after the conf are handed to librados: a valid one opens, an unknown one is an
    // open error that names the option.
    let s = RbdStorage::open(
        &format!("{name}:rbd_cache=false:rados_osd_op_timeout=30"),
        false,
    );
    s.unwrap().write_at(&[1, 2, 3], 0).unwrap();
    let e = RbdStorage::open(&format!("{name}:no_such_option=1"), false).unwrap_err();
    assert!(e.to_string().contains("no_such_option"), "{e}");
    rbd(conf, &["rm", &format!("rbd/{img}")]);
}

#[test]
fn allocation_follows_writes_and_discards() {
    use blockdev::Allocation::{Data, Hole};
    let Some(conf) = cluster() else { return };
    let (img, name) = image(conf, "alloc");
    let s = RbdStorage::create(&name, 16 << 20).unwrap();
    assert_eq!(s.allocation(0, 16 << 20).unwrap(), (Hole, 16 << 20));
    s.write_at(&pattern(1 << 20, 1), 5 << 20).unwrap();
    s.write_at(&pattern(1 << 20, 2), 6 << 20).unwrap();
    // librbd reports whole objects (4 MiB here) when the image has an object map, so the
    // data may start before 5 MiB and end after 7 MiB, but never the other way round.
    let (kind, hole) = s.allocation(0, 16 << 20).unwrap();
    assert_eq!(kind, Hole);
    assert!(hole > 0 && hole <= 5 << 20, "hole before the data: {hole}");
    let (kind, data) = s.allocation(5 << 20, 11 << 20).unwrap();
    assert_eq!(kind, Data);
    assert!(data >= 2 << 20, "data run: {data}");
    // Objects 2 and 3 were never written.
    assert_eq!(s.allocation(8 << 20, 8 << 20).unwrap(), (Hole, 8 << 20));
    s.discard(4 << 20, 4 << 20).unwrap();
    assert_eq!(s.allocation(0, 16 << 20).unwrap(), (Hole, 16 << 20));
    // Past the end: nothing left to describe.
    assert_eq!(s.allocation(16 << 20, 4096).unwrap().1, 0);
    drop(s);
    rbd(conf, &["rm", &format!("rbd/{img}")]);
}

#[test]
fn writes_past_the_end_grow_the_image() {
    let Some(conf) = cluster() else { return };
    let (img, name) = image(conf, "grow");
    let s = RbdStorage::create(&name, 0).unwrap();
    let data = pattern(70_000, 9);
    s.write_at(&data, 1 << 20).unwrap();
    assert_eq!(s.size().unwrap(), (1 << 20) + 70_000);
    let mut back = vec![0u8; data.len()];
    s.read_at(&mut back, 1 << 20).unwrap();
    assert!(back == data);
    // A write inside the image leaves its size alone.
    s.write_at(&data[..100], 0).unwrap();
    assert_eq!(s.size().unwrap(), (1 << 20) + 70_000);
    drop(s);
    rbd(conf, &["rm", &format!("rbd/{img}")]);
}

#[test]
fn large_requests_from_threads_are_split_and_kept_whole() {
    let Some(conf) = cluster() else { return };
    let (img, name) = image(conf, "split");
    let size: u64 = 24 << 20;
    let s = std::sync::Arc::new(RbdStorage::create(&name, size).unwrap());
    // Four writers of 2.5 MiB + 77 bytes each (several pieces in flight per request, the last
    // piece short, pieces crossing 4 MiB object boundaries at odd offsets), and readers of
    // large ranges meanwhile.
    const LEN: usize = (5 << 19) + 77;
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let s = std::sync::Arc::clone(&s);
            std::thread::spawn(move || {
                for round in 0..2u64 {
                    let k = round * 4 + t;
                    s.write_at(&pattern(LEN, k as u8 + 1), 333 + k * LEN as u64)
                        .unwrap();
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let s = std::sync::Arc::clone(&s);
            std::thread::spawn(move || {
                let mut b = vec![0u8; (3 << 20) + 11];
                for i in 0..4u64 {
                    s.read_at(&mut b, 5 + (r * 4 + i) * (2 << 20)).unwrap();
                }
            })
        })
        .collect();
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
    let mut expect = vec![0u8; size as usize];
    for k in 0..8u64 {
        let at = 333 + (k as usize) * LEN;
        expect[at..at + LEN].copy_from_slice(&pattern(LEN, k as u8 + 1));
    }
    let mut back = vec![0u8; size as usize];
    s.read_at(&mut back, 0).unwrap();
    assert!(back == expect, "read back differs from what was written");
    drop(s);
    assert_exported_then_remove(conf, &img, &expect);
}
