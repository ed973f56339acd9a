//! `img serve` as a process: its command line, going to the background only once the socket
//! is up, the image lock held while serving, and an orderly stop on SIGTERM. The data path
//! with a real guest is `scripts/guest-lab.sh` (tests/tests/guest_lab.rs).

mod common;

use common::{img, img_bin, qemu_img};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn command_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let s = sock.to_str().unwrap();
    let out = img(&["serve", "x.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--vhost-user-blk"),
        "{}",
        stderr(&out)
    );
    let out = img(&["serve", "--vhost-user-blk", s]);
    assert_eq!(out.status.code(), Some(1));
    let out = img(&["serve", "--vhost-user-blk", s, "--num-queues", "0", "x"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("num-queues"), "{}", stderr(&out));
    let out = img(&["serve", "--vhost-user-blk", s, "--queue-size", "100", "x"]);
    assert!(stderr(&out).contains("power of two"), "{}", stderr(&out));
    // An image that cannot be opened: qemu-img's message, and no socket left behind.
    let missing = dir.path().join("missing.qcow2");
    let out = img(&["serve", "--vhost-user-blk", s, missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Could not open") && stderr(&out).contains("No such file"),
        "{}",
        stderr(&out)
    );
    assert!(!sock.exists());
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn wait_gone(pid: i32) {
    let start = Instant::now();
    while pid_alive(pid) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "img serve {pid} did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn serve_in_background(image: &Path, sock: &Path, pidfile: &Path, extra: &[&str]) -> i32 {
    let mut args = vec![
        "serve",
        "--vhost-user-blk",
        sock.to_str().unwrap(),
        "--daemonize",
        "--pidfile",
        pidfile.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(image.to_str().unwrap());
    let out = Command::new(img_bin()).args(&args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Ready means listening: the socket and the pid file exist as soon as the command returns.
    assert!(sock.exists(), "socket missing after --daemonize returned");
    std::fs::read_to_string(pidfile)
        .expect("pid file written")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn daemon_holds_the_lock_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "lazy_refcounts=on",
        image.to_str().unwrap(),
        "64M",
    ]);
    let (sock, pidfile) = (dir.path().join("sock"), dir.path().join("pid"));
    let pid = serve_in_background(&image, &sock, &pidfile, &["-f", "qcow2"]);
    assert!(pid_alive(pid));

    // The image is in use: qemu-img cannot open it without -U, nor can a second server.
    let out = common::run("qemu-img", &["info", image.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("lock"), "{}", stderr(&out));
    let out = img(&[
        "serve",
        "--vhost-user-blk",
        dir.path().join("sock2").to_str().unwrap(),
        "-f",
        "qcow2",
        image.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("lock"), "{}", stderr(&out));

    // SIGTERM: the image is closed (lock released, socket and pid file removed).
    // SAFETY: sending a signal to the child we started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_gone(pid);
    assert!(!sock.exists(), "socket left behind");
    assert!(!pidfile.exists(), "pid file left behind");
    common::assert_qemu_check_clean(&image);
    let info = qemu_img(&["info", "--output=json", image.to_str().unwrap()]);
    assert!(info.contains("\"lazy-refcounts\": true"), "{info}");
}

#[test]
fn read_only_server_shares_the_image_with_readers() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.raw");
    qemu_img(&["create", "-q", "-f", "raw", image.to_str().unwrap(), "16M"]);
    let before = std::fs::read(&image).unwrap();
    let (sock, pidfile) = (dir.path().join("sock"), dir.path().join("pid"));
    let pid = serve_in_background(&image, &sock, &pidfile, &["-f", "raw", "--readonly"]);
    // A read-only server takes no write permission: qemu-img opens the image without -U
    // while it is served, as it does beside qemu-storage-daemon's read-only export.
    qemu_img(&["info", image.to_str().unwrap()]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        image.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    wait_gone(pid);
    assert_eq!(std::fs::read(&image).unwrap(), before);
}
