//! RbdStorage across a restart of the Ceph daemons: I/O issued while the cluster is down
//! completes once it is back (librados resends it), and nothing written is lost.
//!
//! The test runs its own cluster (separate state directory and ports) so that restarting it
//! disturbs no other test. Skips like tests/rbd.rs when the Ceph packages are missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use blockdev::rbd::RbdStorage;
use blockdev::Storage;

fn lab(dir: &Path, action: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-lab.sh");
    let out = Command::new(&script)
        .arg(action)
        .env("IMG_CEPH_DIR", dir)
        .env("IMG_CEPH_PORT", "3310")
        .env("IMG_CEPH_PORT_V1", "6799")
        .output()
        .expect("run ceph-lab.sh");
    assert!(
        out.status.success(),
        "ceph-lab.sh {action} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Stops this test's cluster however the test ends.
struct Cluster(PathBuf);

impl Drop for Cluster {
    fn drop(&mut self) {
        lab(&self.0, "stop");
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 10) as u8)
        .collect()
}

#[test]
fn io_survives_a_cluster_restart() {
    let have = Command::new("sh")
        .args([
            "-c",
            "command -v ceph-mon && command -v ceph-osd && command -v rbd",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var("IMG_REQUIRE_CEPH").as_deref() != Ok("1"),
            "IMG_REQUIRE_CEPH=1 but the Ceph packages are missing"
        );
        eprintln!("skipping: the Ceph packages are not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("img-ceph-restart-{}", std::process::id()));
    let conf = lab(&dir, "start");
    let cluster = Cluster(dir.clone());
    let name = format!("rbd:rbd/restart:conf={conf}");
    let size = 8u64 << 20;
    let s = std::sync::Arc::new(RbdStorage::create(&name, size).unwrap());
    let first = pattern(4 << 20, 1);
    s.write_at(&first, 0).unwrap();
    s.flush().unwrap();

    // Restart in the background while writing the second half, chunk by chunk.
    let restart = {
        let dir = dir.clone();
        std::thread::spawn(move || lab(&dir, "restart"))
    };
    let second = pattern(4 << 20, 2);
    let (tx, rx) = mpsc::channel();
    {
        let s = s.clone();
        let second = second.clone();
        std::thread::spawn(move || {
            let r = (|| {
                for (i, chunk) in second.chunks(256 << 10).enumerate() {
                    s.write_at(chunk, (4 << 20) + (i as u64) * (256 << 10))?;
                    std::thread::sleep(Duration::from_millis(200));
                }
                s.flush()
            })();
            let _ = tx.send(r);
        });
    }
    // A hang is a failure too, reported instead of blocking the suite forever.
    let r = rx
        .recv_timeout(Duration::from_secs(180))
        .expect("writes did not complete within 180 s of the restart");
    r.expect("writes across the restart failed");
    restart.join().expect("restart thread");

    let mut back = vec![0u8; size as usize];
    s.read_at(&mut back, 0).unwrap();
    assert!(
        back[..4 << 20] == first[..],
        "data written before the restart was lost"
    );
    assert!(
        back[4 << 20..] == second[..],
        "data written across the restart was lost"
    );
    drop(s);
    drop(cluster);
}
