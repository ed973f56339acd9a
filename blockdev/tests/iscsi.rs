//! `IscsiStorage` against a real target: tgt's tgtd on loopback, started and stopped through
//! scripts/iscsi-lab.sh, one lab (own tgtd, own port, own LUN files) per test.
//!
//! Skips with a printed reason when tgtd is not installed, unless IMG_REQUIRE_ISCSI=1 (then the
//! lab script installs it, and any failure fails the test).

use blockdev::iscsi::{IscsiOptions, IscsiStorage};
use blockdev::{Error, Storage};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const IQN: &str = "iqn.2026-11.test:disk";
const LUN_SIZE: u64 = 64 << 20;

/// A running lab; stopped and removed on drop.
struct Lab {
    dir: tempfile::TempDir,
    urls: Vec<String>,
}

impl Lab {
    /// Starts a lab with `luns` LUNs, or returns None (after saying why) to skip.
    fn start(luns: u32) -> Option<Lab> {
        let required = std::env::var("IMG_REQUIRE_ISCSI").is_ok_and(|v| v == "1");
        if !required && !Path::new("/usr/sbin/tgtd").exists() {
            eprintln!(
                "SKIP: tgtd is not installed (apt-get install tgt, or set IMG_REQUIRE_ISCSI=1)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = lab_cmd(dir.path(), &["start", "--luns", &luns.to_string()]);
        let urls: Vec<String> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        assert_eq!(urls.len(), luns as usize, "lab printed {urls:?}");
        Some(Lab { dir, urls })
    }

    fn url(&self) -> &str {
        &self.urls[0]
    }

    /// The file behind LUN `n`, to check what reached the target without going through us.
    fn lun_file(&self, n: u32) -> PathBuf {
        self.dir.path().join(format!("lun{n}.img"))
    }

    fn port(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("port"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn open(&self) -> IscsiStorage {
        IscsiStorage::open(self.url(), &IscsiOptions::default())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.url()))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("clean")
            .env("ISCSI_LAB_DIR", self.dir.path())
            .status();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/iscsi-lab.sh")
}

fn lab_cmd(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(script())
        .args(args)
        .env("ISCSI_LAB_DIR", dir)
        .env("ISCSI_LAB_IQN", IQN)
        .output()
        .expect("running scripts/iscsi-lab.sh");
    assert!(
        out.status.success(),
        "iscsi-lab.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Bytes that differ from position to position and from seed to seed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ seed)
        .collect()
}

#[test]
fn size_block_size_and_flush() {
    let Some(lab) = Lab::start(1) else { return };
    let s = lab.open();
    assert_eq!(s.size().unwrap(), LUN_SIZE);
    assert_eq!(s.block_size(), 512);
    assert_eq!(s.alignment().request, 512);
    assert_eq!(s.name(), lab.url());
    s.flush().unwrap();
    // Resizing a LUN is not ours to do: a size within it is accepted and changes nothing
    // (as on a block device), growing is refused with qemu's message.
    s.truncate(LUN_SIZE).unwrap();
    s.truncate(LUN_SIZE / 2).unwrap();
    assert_eq!(s.size().unwrap(), LUN_SIZE);
    let e = s.truncate(LUN_SIZE + 512).unwrap_err();
    assert_eq!(e.to_string(), "Cannot grow iSCSI devices");
}

#[test]
fn round_trip_with_unaligned_edges() {
    let Some(lab) = Lab::start(1) else { return };
    let s = lab.open();
    let mut model = vec![0u8; 8 << 20];
    // (offset, len): aligned; inside one block; across one boundary; long with both edges
    // unaligned and more than one command's worth (1 MiB) in the middle; the last bytes.
    let writes: [(usize, usize); 6] = [
        (0, 4096),
        (5000, 10),
        (1000, 3000),
        (7, 3 << 20),
        ((4 << 20) + 511, 2),
        ((8 << 20) - 100, 100),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(len, i as u8 + 1);
        s.write_at(&data, off as u64).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    s.flush().unwrap();
    let mut back = vec![0u8; model.len()];
    s.read_at(&mut back, 0).unwrap();
    assert!(back == model, "aligned read-back differs");
    // Unaligned reads, including one longer than a command.
    for &(off, len) in &[(1, 1), (511, 2), (999, 3002), (3, (2 << 20) + 5)] {
        let mut b = vec![0u8; len];
        s.read_at(&mut b, off as u64).unwrap();
        assert!(
            b == model[off..off + len],
            "read at {off} len {len} differs"
        );
    }
    // What reached the target's backing file, read without going through our code.
    let file = std::fs::read(lab.lun_file(1)).unwrap();
    assert!(
        file[..model.len()] == model[..],
        "backing file differs from what was written"
    );
}

#[test]
fn writes_from_threads_into_shared_blocks() {
    let Some(lab) = Lab::start(1) else { return };
    let s = Arc::new(lab.open());
    // Eight writers of 300-byte stripes: neighbours share blocks, so a read-modify-write that
    // is not atomic against the others loses bytes.
    let handles: Vec<_> = (0..8u8)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for round in 0..20u64 {
                    let off = (round * 8 + u64::from(t)) * 300;
                    s.write_at(&pattern(300, t + 1), off).unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut back = vec![0u8; 160 * 300];
    s.read_at(&mut back, 0).unwrap();
    for (i, stripe) in back.chunks(300).enumerate() {
        assert!(stripe == pattern(300, (i % 8) as u8 + 1), "stripe {i} lost");
    }
}

#[test]
fn write_zeroes_and_discard() {
    let Some(lab) = Lab::start(1) else { return };
    let s = lab.open();
    let len = 4 << 20;
    let data = pattern(len, 9);
    s.write_at(&data, 0).unwrap();

    // Zeroing with unaligned edges, both with and without leave to unmap: the range reads as
    // zeros, everything around it keeps its data.
    let mut model = data.clone();
    for (off, n, unmap) in [
        (100u64, 10_000u64, false),
        ((1 << 20) + 3, (1 << 20) + 7, true),
    ] {
        s.write_zeroes(off, n, unmap).unwrap();
        model[off as usize..(off + n) as usize].fill(0);
        let mut b = vec![0u8; len];
        s.read_at(&mut b, 0).unwrap();
        if let Some(i) = (0..len).find(|&i| b[i] != model[i]) {
            panic!(
                "after zeroing {n} bytes at {off} (unmap {unmap}): byte {i} is {} not {}",
                b[i], model[i]
            );
        }
    }

    // Discard of whole blocks.
    let (off, n) = (2u64 << 20, 1u64 << 20);
    s.write_at(&pattern(n as usize, 3), off).unwrap();
    s.discard(off, n).unwrap();
    if !s.can_unmap() {
        eprintln!("SKIP (discard content): the target does not support UNMAP on this LUN");
        return;
    }
    if !s.unmapped_reads_zero() {
        eprintln!("SKIP (discard content): the target does not report LBPRZ");
        return;
    }
    let mut b = vec![0u8; n as usize];
    s.read_at(&mut b, off).unwrap();
    assert!(
        b.iter().all(|&x| x == 0),
        "discarded range does not read as zeros though LBPRZ is set"
    );
    // tgt punches holes for UNMAP: the backing file must have lost the blocks.
    use std::os::unix::fs::MetadataExt;
    let blocks = std::fs::metadata(lab.lun_file(1)).unwrap().blocks() * 512;
    assert!(
        blocks < 4 << 20,
        "backing file still has {blocks} bytes allocated after UNMAP"
    );
}

#[test]
fn errors_name_the_url() {
    let Some(lab) = Lab::start(1) else { return };
    let port = lab.port();

    let wrong_iqn = format!("iscsi://127.0.0.1:{port}/iqn.2026-11.test:nosuch/1");
    let e = IscsiStorage::open(&wrong_iqn, &IscsiOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::Open { .. }) && msg.contains(&wrong_iqn),
        "{msg}"
    );

    let no_lun = format!("iscsi://127.0.0.1:{port}/{IQN}/9");
    let msg = IscsiStorage::open(&no_lun, &IscsiOptions::default())
        .unwrap_err()
        .to_string();
    eprintln!("no such LUN: {msg}");
    assert!(msg.contains(&no_lun), "{msg}");

    // Nothing listens on port 1.
    let no_server = format!("iscsi://127.0.0.1:1/{IQN}/1");
    let msg = IscsiStorage::open(&no_server, &IscsiOptions::default())
        .unwrap_err()
        .to_string();
    eprintln!("no server: {msg}");
    assert!(msg.contains(&no_server), "{msg}");

    let msg = IscsiStorage::open("iscsi://127.0.0.1/only-target", &IscsiOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("invalid iSCSI URL") && msg.contains("iscsi://127.0.0.1/only-target"),
        "{msg}"
    );

    let s = lab.open();
    let mut b = [0u8; 2];
    let e = s.read_at(&mut b, LUN_SIZE - 1).unwrap_err();
    assert!(matches!(e, Error::PastEnd { .. }), "{e}");
    let e = s.write_at(&b, LUN_SIZE - 1).unwrap_err();
    assert!(
        e.to_string().contains(lab.url()) && e.to_string().contains("0x3ffffff"),
        "{e}"
    );

    let ro = IscsiStorage::open(lab.url(), &IscsiOptions { read_only: true }).unwrap();
    assert!(matches!(
        ro.write_at(&b, 0).unwrap_err(),
        Error::ReadOnly { .. }
    ));
    ro.read_at(&mut b, 0).unwrap();
}

#[test]
fn target_restart_reconnects() {
    let Some(lab) = Lab::start(1) else { return };
    let s = Arc::new(lab.open());
    let data = pattern(64 << 10, 5);
    s.write_at(&data, 4096).unwrap();
    s.flush().unwrap();
    // tgtd is killed (SIGKILL) and started again on the same port and files.
    lab_cmd(lab.dir.path(), &["restart"]);
    // Run the I/O on a thread so that a hang fails the test instead of stalling it.
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = Arc::clone(&s);
    std::thread::spawn(move || {
        let mut back = vec![0u8; 64 << 10];
        let read = s2.read_at(&mut back, 4096).map(|()| back);
        let write = s2.write_at(&pattern(4096, 6), 1 << 20);
        let _ = tx.send((read, write));
    });
    let (read, write) = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("I/O after a target restart hung for 60 s");
    // libiscsi logs in again by itself, and the UNIT ATTENTION the new session reports is
    // retried: both requests must go through, with the data intact.
    let back = read.unwrap_or_else(|e| panic!("read after a target restart: {e}"));
    assert!(back == data, "read after the restart returned wrong data");
    write.unwrap_or_else(|e| panic!("write after a target restart: {e}"));
    let file = std::fs::read(lab.lun_file(1)).unwrap();
    assert!(
        file[1 << 20..(1 << 20) + 4096] == pattern(4096, 6)[..],
        "write after the restart was lost"
    );
}

#[test]
fn target_gone_gives_an_error_not_a_hang() {
    let Some(lab) = Lab::start(1) else { return };
    let s = Arc::new(lab.open());
    s.write_at(&pattern(4096, 7), 0).unwrap();
    lab_cmd(lab.dir.path(), &["stop"]);
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = Arc::clone(&s);
    std::thread::spawn(move || {
        let mut back = vec![0u8; 4096];
        let _ = tx.send(s2.read_at(&mut back, 0));
    });
    let started = std::time::Instant::now();
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(90))
        .expect("a read from a stopped target hung for 90 s");
    let e = r.expect_err("a read from a stopped target succeeded");
    eprintln!("after {:?}: {e}", started.elapsed());
    assert!(e.to_string().contains(lab.url()), "{e}");
}

#[test]
fn no_write_is_lost_across_a_restart_mid_stream() {
    let Some(lab) = Lab::start(1) else { return };
    let s = Arc::new(lab.open());
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A writer streams 64 KiB writes (unaligned by 100 bytes, so edge read-modify-writes are in
    // the mix) while tgtd is killed and restarted under it; it notes which writes succeeded.
    let writer = {
        let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut done = Vec::new();
            let mut errors = Vec::new();
            for i in 0..400u64 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) && i > 100 {
                    break;
                }
                let off = 100 + i * (64 << 10);
                match s.write_at(&pattern(64 << 10, (i % 250) as u8 + 1), off) {
                    Ok(()) => done.push(i),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (done, errors)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    lab_cmd(lab.dir.path(), &["restart"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (done, errors) = writer.join().unwrap();
    eprintln!(
        "{} writes succeeded, {} failed: {:?}",
        done.len(),
        errors.len(),
        errors.first()
    );
    for e in &errors {
        assert!(e.contains(lab.url()), "{e}");
    }
    s.flush().unwrap();
    let file = std::fs::read(lab.lun_file(1)).unwrap();
    for i in done {
        let off = (100 + i * (64 << 10)) as usize;
        assert!(
            file[off..off + (64 << 10)] == pattern(64 << 10, (i % 250) as u8 + 1)[..],
            "write {i} reported success but is not on the target"
        );
    }
}

#[test]
fn concurrent_readers_and_writers_on_one_lun() {
    let Some(lab) = Lab::start(1) else { return };
    let s = Arc::new(lab.open());
    assert_eq!(s.sessions(), 1, "opening logs in one session");
    // Six writers, each owning interleaved 1 MiB + 300 byte regions (unaligned, so edge
    // read-modify-writes run beside other sessions' writes), and two readers hammering the
    // same regions meanwhile. Requests of several commands (more than one piece) are in the
    // mix, so commands of one request are in flight together.
    const REGION: u64 = (1 << 20) + 300;
    let writers: Vec<_> = (0..6u8)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                for round in 0..4u64 {
                    let off = 77 + (round * 6 + u64::from(t)) * REGION;
                    s.write_at(&pattern(REGION as usize, t * 4 + round as u8 + 1), off)
                        .unwrap();
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut b = vec![0u8; (3 << 20) + 5];
                for i in 0..6u64 {
                    s.read_at(&mut b, 3 + (r * 6 + i) * (2 << 20)).unwrap();
                }
            })
        })
        .collect();
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
    s.flush().unwrap();
    assert!(
        s.sessions() > 1,
        "eight threads at once were served by {} session(s)",
        s.sessions()
    );
    let file = std::fs::read(lab.lun_file(1)).unwrap();
    let mut back = vec![0u8; (24 * REGION) as usize];
    s.read_at(&mut back, 77).unwrap();
    for k in 0..24u64 {
        let (round, t) = (k / 6, (k % 6) as u8);
        let want = pattern(REGION as usize, t * 4 + round as u8 + 1);
        let at = (k * REGION) as usize;
        assert!(
            back[at..at + REGION as usize] == want[..],
            "region {k} read back wrong"
        );
        let f = 77 + at;
        assert!(
            file[f..f + REGION as usize] == want[..],
            "region {k} is wrong in the LUN's backing file"
        );
    }
    // Bytes before the first region and after the last were never written.
    assert!(
        file[..77].iter().all(|&b| b == 0),
        "bytes before the regions changed"
    );
    let end = 77 + (24 * REGION) as usize;
    assert!(
        file[end..end + 4096].iter().all(|&b| b == 0),
        "bytes after the regions changed"
    );
}

#[test]
fn block_status_follows_the_backing_file() {
    let Some(lab) = Lab::start(1) else { return };
    let s = lab.open();
    if !s.unmapped_reads_zero() {
        eprintln!("SKIP: the target does not report LBPRZ, so no range is a known hole");
        return;
    }
    // Data at 1 MiB..3 MiB and at 8 MiB..8 MiB+4 KiB; the rest of the thin LUN is unmapped.
    s.write_at(&pattern(2 << 20, 1), 1 << 20).unwrap();
    s.write_at(&pattern(4096, 2), 8 << 20).unwrap();
    s.flush().unwrap();
    let expect = [
        (0u64, blockdev::Allocation::Hole, 1u64 << 20),
        (1 << 20, blockdev::Allocation::Data, 2 << 20),
        (3 << 20, blockdev::Allocation::Hole, 5 << 20),
        (8 << 20, blockdev::Allocation::Data, 4096),
    ];
    for (off, kind, len) in expect {
        let (got, n) = s.allocation(off, LUN_SIZE - off).unwrap();
        assert_eq!(got, kind, "allocation at {off}");
        assert_eq!(n, len, "length of the run at {off}");
    }
    // Clipped to the question, and a question from inside a run.
    assert_eq!(
        s.allocation((1 << 20) + 512, 4096).unwrap(),
        (blockdev::Allocation::Data, 4096)
    );
    assert_eq!(
        s.allocation(4 << 20, 1 << 20).unwrap(),
        (blockdev::Allocation::Hole, 1 << 20)
    );
    // The file agrees (SEEK_DATA from 3 MiB lands on 8 MiB).
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(lab.lun_file(1)).unwrap();
    // SAFETY: a valid descriptor; lseek has no memory effects.
    let data = unsafe { libc::lseek(f.as_raw_fd(), 3 << 20, libc::SEEK_DATA) };
    assert_eq!(data, 8 << 20, "the backing file disagrees about the hole");
}

#[test]
fn zeroing_unmapped_blocks_leaves_them_unmapped_and_zero() {
    let Some(lab) = Lab::start(1) else { return };
    let s = lab.open();
    if !(s.unmapped_reads_zero() && s.can_unmap()) {
        eprintln!("SKIP: the target does not report LBPRZ and UNMAP");
        return;
    }
    // A range half mapped, half not: zeroing it with leave to unmap must zero the mapped half
    // (skipping the unmapped half is only an optimisation) and keep the neighbours.
    let data = pattern(4 << 20, 5);
    s.write_at(&data, 0).unwrap();
    s.write_zeroes(3 << 20, 4 << 20, true).unwrap();
    let mut b = vec![0u8; 8 << 20];
    s.read_at(&mut b, 0).unwrap();
    assert!(
        b[..3 << 20] == data[..3 << 20],
        "data before the zeroed range changed"
    );
    assert!(
        b[3 << 20..].iter().all(|&x| x == 0),
        "zeroed range has data"
    );
    let file = std::fs::read(lab.lun_file(1)).unwrap();
    assert!(
        file[3 << 20..8 << 20].iter().all(|&x| x == 0),
        "backing file has data"
    );
    assert_eq!(
        s.allocation(3 << 20, 5 << 20).unwrap().0,
        blockdev::Allocation::Hole,
        "zeroed range is still mapped"
    );
}
