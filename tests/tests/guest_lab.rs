//! The guest lab: `scripts/guest-lab.sh` boots a real Linux guest (Debian's kernel under QEMU
//! 7.2, TCG) whose disk `img serve --vhost-user-blk` serves, and checks from the guest and from
//! the host (qemu-img check, debugfs on a raw copy, byte-identical read-only and backing files)
//! that the guest's filesystem work landed intact. The same run against qemu-storage-daemon is
//! the control: when it passes and ours fails, the fault is ours, not the lab's.
//! The script fetches what it needs (kernel, busybox, QEMU) into /var/cache/img-lab.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

/// One guest at a time: the machine has few cores, and TCG guests are CPU-bound.
static ONE_GUEST: Mutex<()> = Mutex::new(());

const CASES: &[&str] = &[
    "rw",
    "rw-mq",
    "rw-raw",
    "rw-direct",
    "chain",
    "ro",
    "verify",
    "trim",
];

/// Runs the lab script with `args` and extra environment; returns (success, all output).
fn run_lab(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let _guard = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let script = root.join("scripts/guest-lab.sh");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .env("IMG_BIN", common::img_bin())
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    (out.status.success(), text)
}

fn lab(server: &str) {
    let (ok, text) = run_lab(&[], &[("SERVER", server)]);
    assert!(ok, "guest-lab.sh with SERVER={server} failed:\n{text}");
    // Every case must have run and passed, not merely the script have exited 0.
    for case in CASES {
        let pass = format!("PASS {case} (SERVER={server},");
        assert!(text.contains(&pass), "no `{pass}` in the output:\n{text}");
    }
}

#[test]
fn guest_lab_img_serve() {
    lab("img");
}

#[test]
fn guest_lab_qemu_storage_daemon_control() {
    lab("qsd");
}

/// Disks on network storage: a qcow2 image on an iSCSI LUN (tgtd) and one on RBD (a Ceph
/// cluster), each served by `img serve` to a guest that writes ext4 on it; the host checks both
/// with qemu-img 7.2 and debugfs.
#[test]
fn guest_lab_network_storage() {
    let (ok, text) = run_lab(&["rw-iscsi", "rw-rbd"], &[("SERVER", "img")]);
    assert!(ok, "guest-lab.sh rw-iscsi rw-rbd failed:\n{text}");
    for case in ["rw-iscsi", "rw-rbd"] {
        assert!(
            text.contains(&format!("PASS {case} (SERVER=img,")),
            "{case}:\n{text}"
        );
    }
}

/// The server killed with SIGKILL while a real guest writes and flushes, at three moments:
/// no corruption, leaks that `img check -r leaks` removes, and every block the guest saw
/// flushed is in the image. (With flush requests answered without flushing, this fails.)
#[test]
fn guest_lab_server_killed_while_serving() {
    let (ok, text) = run_lab(&["kill"], &[("SERVER", "img")]);
    assert!(ok, "guest-lab.sh kill failed:\n{text}");
    assert!(text.contains("PASS kill (SERVER=img,"), "{text}");
    assert_eq!(
        text.matches("none lost, no corruption").count(),
        3,
        "not every kill was checked:\n{text}"
    );
}

/// The image's filesystem fills up under a real guest (a 16 MiB tmpfs, 40 MiB written): the
/// guest's write fails with an I/O error instead of succeeding or hanging, what it wrote
/// before reads back, the server exits cleanly, and the image is clean (as under
/// qemu-storage-daemon, which behaves the same in this case).
#[test]
fn guest_lab_full_disk_reaches_the_guest() {
    let (ok, text) = run_lab(&["enospc"], &[("SERVER", "img")]);
    assert!(ok, "guest-lab.sh enospc failed:\n{text}");
    assert!(text.contains("PASS enospc (SERVER=img,"), "{text}");
    assert!(text.contains("LAB-IOERR"), "{text}");
}

/// The lab's checks can fail: a block of a file the guest wrote, changed in the image after the
/// guest read it back, must be caught by the host's comparison.
#[test]
fn guest_lab_notices_corruption() {
    let (ok, text) = run_lab(&["rw"], &[("SERVER", "img"), ("LAB_FAULT", "corrupt")]);
    assert!(!ok, "the lab passed a corrupted image:\n{text}");
    assert!(
        text.contains("lab/random.bin: the guest read") && text.contains("FAIL rw"),
        "the lab failed, but not on the corrupted file:\n{text}"
    );
}

/// A server that dies under a running guest fails the lab at once (no wait for the boot
/// timeout), with the guest's console and the server's log in the report.
#[test]
fn guest_lab_notices_a_dead_server() {
    let (ok, text) = run_lab(&["rw"], &[("SERVER", "img"), ("LAB_FAULT", "kill-server")]);
    assert!(!ok, "the lab passed with its server killed:\n{text}");
    assert!(
        text.contains("the server exited") && text.contains("server log"),
        "the lab failed, but not on the dead server:\n{text}"
    );
}
