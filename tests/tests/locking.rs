//! Image locking against real QEMU processes: while qemu-io, qemu-storage-daemon or qemu-nbd
//! holds an image, img must refuse (and allow) exactly what qemu-img refuses (and allows),
//! with the same message and exit code; and while img holds an image, QEMU's tools must see
//! the same lock bytes a QEMU process would hold, and refuse accordingly.
//!
//! Every case runs qemu-img and img side by side and asserts the outcome qemu-img has, so a
//! case can only pass if the holder really holds the image (the qemu-img run would otherwise
//! succeed where it is asserted to fail).

mod common;

use common::holder::Holder;
use common::{img_bin, qemu_img, run};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Output};

/// The lock bytes QEMU uses: 100 + i while holding permission i, 200 + i while not sharing
/// it (0 consistent read, 1 write, 2 write unchanged, 3 resize).
const LOCK_BYTES: [u64; 8] = [100, 101, 102, 103, 200, 201, 202, 203];

/// The lock bytes of `path` that some process holds, seen from a fresh descriptor of ours.
fn locked_bytes(path: &Path) -> Vec<u64> {
    let f = std::fs::File::open(path).unwrap();
    LOCK_BYTES
        .iter()
        .copied()
        .filter(|&byte| {
            // SAFETY: flock is a plain C struct; all zeros is a valid value.
            let mut fl: libc::flock = unsafe { std::mem::zeroed() };
            fl.l_type = libc::F_WRLCK as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = byte as libc::off_t;
            fl.l_len = 1;
            // SAFETY: F_OFD_GETLK reads and writes the flock struct, a live local; the
            // descriptor is open.
            let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
            assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
            fl.l_type != libc::F_UNLCK as libc::c_short
        })
        .collect()
}

/// The outcome of one command line run by qemu-img and by img.
struct Both {
    args: Vec<String>,
    /// qemu-img's outcome (img's is asserted to be the same).
    qemu: Output,
}

impl Both {
    fn qemu_err(&self) -> String {
        String::from_utf8_lossy(&self.qemu.stderr).into_owned()
    }

    /// Asserts qemu-img failed with a message containing `text`, and img failed the same way.
    fn fails_with(&self, text: &str) -> &Self {
        assert!(
            !self.qemu.status.success() && self.qemu_err().contains(text),
            "qemu-img {:?} was expected to fail with {text:?}: {:?} {}",
            self.args,
            self.qemu.status.code(),
            self.qemu_err()
        );
        self
    }

    /// Asserts qemu-img succeeded (and img too, as `same` checks).
    fn succeeds(&self) -> &Self {
        assert!(
            self.qemu.status.success(),
            "qemu-img {:?} was expected to succeed: {}",
            self.args,
            self.qemu_err()
        );
        self
    }
}

/// Runs `args` with qemu-img and with img, and asserts that both exit with the same code and
/// print the same error (img's prefixed `img:`) and, with `same_stdout`, the same output.
fn both(args: &[&str], same_stdout: bool) -> Both {
    let qemu = run("qemu-img", args);
    let img = Command::new(img_bin()).args(args).output().unwrap();
    let qerr = String::from_utf8_lossy(&qemu.stderr);
    let ierr = String::from_utf8_lossy(&img.stderr).replace("img: ", "qemu-img: ");
    assert_eq!(
        (qemu.status.code(), qerr.as_ref()),
        (img.status.code(), ierr.as_str()),
        "qemu-img vs img {args:?}"
    );
    if same_stdout {
        assert_eq!(
            String::from_utf8_lossy(&qemu.stdout),
            String::from_utf8_lossy(&img.stdout),
            "stdout of {args:?}"
        );
    }
    Both {
        args: args.iter().map(|s| s.to_string()).collect(),
        qemu,
    }
}

/// A new qcow2 image with some data, and a raw image of the same content.
fn images(dir: &Path) -> (String, String) {
    let q = dir.join("held.qcow2").display().to_string();
    let r = dir.join("other.raw").display().to_string();
    qemu_img(&["create", "-q", "-f", "qcow2", &q, "4M"]);
    common::qemu_io("qcow2", Path::new(&q), &["write -P 0x5a 0 64k".to_string()]);
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", &q, &r]);
    (q, r)
}

const SHARED_WRITE: &str = "Failed to get shared \"write\" lock";
const WRITE: &str = "Failed to get \"write\" lock";

#[test]
fn a_qemu_writer_keeps_img_out_as_it_keeps_qemu_img_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, r) = images(d);
    let out_raw = d.join("out.raw").display().to_string();
    let out_qcow2 = d.join("out.qcow2").display().to_string();
    let holder = Holder::qemu_io("qcow2", Path::new(&q), &[]);
    assert_eq!(locked_bytes(Path::new(&q)), [100, 101, 103, 201, 203]);
    let before = std::fs::read(&q).unwrap();
    let hint = format!("Is another process using the image [{q}]?");

    // Readers: refused, as the writer does not share writing; -U lets them in.
    both(&["info", &q], true)
        .fails_with(SHARED_WRITE)
        .fails_with(&hint);
    both(&["info", "--output=json", &q], true).fails_with(SHARED_WRITE);
    both(&["info", "-U", &q], true).succeeds();
    both(&["check", &q], true).fails_with(SHARED_WRITE);
    both(&["check", "-U", &q], true).succeeds();
    both(&["check", "-U", "--output=json", &q], true).succeeds();
    let c = both(&["compare", &q, &r], true);
    c.fails_with(SHARED_WRITE);
    assert_eq!(c.qemu.status.code(), Some(2));
    both(&["compare", &r, &q], true).fails_with(SHARED_WRITE);
    both(&["compare", "-U", &q, &r], true).succeeds();
    both(&["convert", "-O", "raw", &q, &out_raw], true).fails_with(SHARED_WRITE);
    both(&["convert", "-U", "-O", "raw", &q, &out_raw], true).succeeds();
    both(&["bench", "-c", "1", &q], false).fails_with(SHARED_WRITE);
    both(&["bench", "-U", "-c", "1", &q], false).succeeds();
    // Even with another format the lock comes first, before the file is looked at.
    both(&["info", "-f", "raw", &q], true).succeeds();
    both(&["check", "-f", "raw", &q], true).fails_with("does not support checks");

    // Writers: refused, the writer holds "write"; -U is only for read-only opens.
    both(&["check", "-r", "all", &q], true).fails_with(WRITE);
    both(&["check", "-r", "leaks", "-U", &q], true)
        .fails_with("force-share=on can only be used with read-only images");
    both(&["bench", "-w", "-c", "1", &q], false).fails_with(WRITE);
    both(&["bench", "-w", "-U", "-c", "1", &q], false)
        .fails_with("force-share=on can only be used with read-only images");
    both(&["convert", "-n", "-O", "qcow2", &r, &q], true).fails_with(WRITE);
    both(&["convert", "-O", "qcow2", &r, &q], true)
        .fails_with(&format!("{q}: error while converting qcow2: {WRITE}"));
    both(&["create", "-f", "qcow2", &q, "1M"], true).fails_with(&format!("{q}: {WRITE}"));
    both(&["create", "-f", "raw", &q, "1M"], true).fails_with(WRITE);
    // Creating over the image must not have touched it.
    assert_eq!(std::fs::read(&q).unwrap(), before, "the held image changed");

    // --image-opts: force-share on the image or on its file, or no locking at all.
    let opts = format!("driver=qcow2,file.filename={q}");
    for extra in ["force-share=on", "file.force-share=on", "file.locking=off"] {
        both(&["info", "--image-opts", &format!("{opts},{extra}")], true).succeeds();
        both(&["check", "--image-opts", &format!("{opts},{extra}")], true).succeeds();
    }
    // The file's own flag wins over the image's.
    both(
        &[
            "info",
            "--image-opts",
            &format!("{opts},force-share=on,file.force-share=off"),
        ],
        true,
    )
    .fails_with(SHARED_WRITE);
    both(
        &[
            "info",
            "-U",
            "--image-opts",
            &format!("{opts},force-share=off"),
        ],
        true,
    )
    .fails_with("--force-share/-U conflicts with image options");
    both(
        &[
            "check",
            "-r",
            "all",
            "--image-opts",
            &format!("{opts},file.force-share=on"),
        ],
        true,
    )
    .fails_with("force-share=on can only be used with read-only images");
    both(
        &["info", "--image-opts", &format!("{opts},file.locking=bad")],
        true,
    )
    .fails_with("invalid parameter value: bad");

    // A second qemu-io is kept out just the same.
    let second = run("qemu-io", &["-c", "quit", "-f", "qcow2", &q]);
    assert!(String::from_utf8_lossy(&second.stderr).contains(WRITE));

    drop(holder);
    assert!(locked_bytes(Path::new(&q)).is_empty());
    // Without the holder the same command lines work.
    both(&["info", &q], true).succeeds();
    both(&["check", "-r", "all", &q], true).succeeds();
    both(&["convert", "-O", "qcow2", &r, &out_qcow2], true).succeeds();
}

#[test]
fn a_raw_writer_shares_with_plain_readers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, r) = images(d);
    let out = d.join("out.raw").display().to_string();
    let holder = Holder::qemu_io("raw", Path::new(&r), &[]);
    // A raw writer shares everything, so it holds "read" and "write" and refuses nothing.
    assert_eq!(locked_bytes(Path::new(&r)), [100, 101]);
    both(&["info", &r], true).succeeds();
    both(&["compare", &r, &q], true).succeeds();
    both(&["bench", "-w", "-c", "1", "-f", "raw", &r], false).succeeds();
    both(&["check", "-f", "raw", &r], true).fails_with("does not support checks");
    // convert does not let others write its sources.
    both(&["convert", "-O", "raw", &r, &out], true).fails_with(SHARED_WRITE);
    both(&["convert", "-U", "-O", "raw", &r, &out], true).succeeds();
    // Opened as qcow2, the file may not be written by others.
    both(&["info", "-f", "qcow2", &r], true).fails_with(SHARED_WRITE);
    drop(holder);
}

#[test]
fn a_qemu_reader_keeps_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, r) = images(d);
    let holder = Holder::qemu_io("qcow2", Path::new(&q), &["-r"]);
    assert_eq!(locked_bytes(Path::new(&q)), [100, 201, 203]);
    let before = std::fs::read(&q).unwrap();
    // Readers share with readers.
    both(&["info", &q], true).succeeds();
    both(&["check", &q], true).succeeds();
    both(&["compare", &q, &r], true).succeeds();
    both(
        &[
            "convert",
            "-O",
            "raw",
            &q,
            &d.join("o.raw").display().to_string(),
        ],
        true,
    )
    .succeeds();
    // Writers are refused.
    both(&["check", "-r", "all", &q], true).fails_with(WRITE);
    both(&["bench", "-w", "-c", "1", &q], false).fails_with(WRITE);
    both(&["convert", "-n", "-O", "qcow2", &r, &q], true).fails_with(WRITE);
    both(&["create", "-f", "qcow2", &q, "1M"], true).fails_with(WRITE);
    assert_eq!(std::fs::read(&q).unwrap(), before);
    drop(holder);
}

#[test]
fn daemons_hold_images_as_qemu_io_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, _) = images(d);
    for which in ["qemu-storage-daemon", "qemu-nbd"] {
        let holder = if which == "qemu-nbd" {
            Holder::nbd(d, Path::new(&q))
        } else {
            Holder::storage_daemon(d, Path::new(&q))
        };
        assert_eq!(
            locked_bytes(Path::new(&q)),
            [100, 101, 103, 201, 203],
            "{which}"
        );
        both(&["info", &q], true).fails_with(SHARED_WRITE);
        both(&["info", "-U", &q], true).succeeds();
        both(&["check", "-r", "all", &q], true).fails_with(WRITE);
        drop(holder);
        assert!(locked_bytes(Path::new(&q)).is_empty(), "{which} left locks");
    }
}

/// img holds exactly the bytes a QEMU process holds for the same use: qemu-io as the reference,
/// img bench as the long-running img (read-only, read-write, -U), for qcow2 and raw.
#[test]
fn img_holds_the_bytes_qemu_holds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, r) = images(d);
    for (fmt, path) in [("qcow2", &q), ("raw", &r)] {
        let p = Path::new(path.as_str());
        for (io_flags, bench_flags) in [
            (&[][..], &["-w"][..]),
            (&["-r"][..], &[][..]),
            (&["-r", "-U"][..], &["-U"][..]),
        ] {
            let expected = {
                let _h = Holder::qemu_io(fmt, p, io_flags);
                locked_bytes(p)
            };
            let _h = Holder::img_bench(fmt, p, bench_flags);
            assert_eq!(
                locked_bytes(p),
                expected,
                "{fmt}: img bench {bench_flags:?} vs qemu-io {io_flags:?}"
            );
        }
    }
}

#[test]
fn an_img_writer_keeps_qemu_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, _) = images(d);
    let holder = Holder::img_bench("qcow2", Path::new(&q), &["-w"]);
    assert_eq!(locked_bytes(Path::new(&q)), [100, 101, 103, 201, 203]);
    let hint = format!("Is another process using the image [{q}]?");
    for args in [
        &["info", &q][..],
        &["check", &q],
        &["info", "--output=json", &q],
    ] {
        let out = run("qemu-img", args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "qemu-img {args:?}");
        assert!(err.contains(SHARED_WRITE) && err.contains(&hint), "{err}");
    }
    assert!(qemu_img(&["info", "-U", &q]).contains("file format: qcow2"));
    for (flags, message) in [(&[][..], WRITE), (&["-r"][..], SHARED_WRITE)] {
        let mut args = flags.to_vec();
        args.extend(["-c", "quit", "-f", "qcow2", &q]);
        let out = run("qemu-io", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(message) && err.contains(&hint),
            "qemu-io {args:?}: {err}"
        );
    }
    let out = run("qemu-img", &["create", "-f", "qcow2", &q, "1M"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(WRITE));
    // img against img, the same.
    let out = common::img(&["info", &q]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(SHARED_WRITE));
    drop(holder);
    assert!(locked_bytes(Path::new(&q)).is_empty());
    common::assert_qemu_check_clean(Path::new(&q));
}

#[test]
fn an_img_reader_keeps_qemu_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (q, _) = images(d);
    let holder = Holder::img_bench("qcow2", Path::new(&q), &[]);
    assert_eq!(locked_bytes(Path::new(&q)), [100, 201, 203]);
    // Other readers are welcome.
    assert!(qemu_img(&["check", &q]).contains("No errors"));
    let out = run("qemu-io", &["-c", "quit", "-f", "qcow2", &q]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(WRITE), "{err}");
    let out = run("qemu-img", &["check", "-r", "all", &q]);
    assert!(String::from_utf8_lossy(&out.stderr).contains(WRITE));
    drop(holder);
}
