//! Every img command on network storage: qcow2 and raw images on an iSCSI LUN (tgt's tgtd)
//! and on Ceph RBD (a single-node cluster), started by the project's scripts, with Debian's
//! qemu-img 7.2 and its iscsi/rbd modules as the oracle: it checks what img wrote, img reads
//! what it wrote, and their outputs are compared where the versions agree. The servers are
//! also restarted while img converts onto them: the convert reconnects and the target matches,
//! or img fails with a message naming the target; it never reports success over lost data.

mod common;

use common::netlab::{
    assert_qemu72_check_clean, assert_qemu72_identical, qemu_img72, qemu_img72_ok, qemu_io72,
    CephLab, IscsiLab,
};
use common::{assert_qemu_compare_identical, img, img_ok, qemu_img, qemu_io};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A 64 MiB qcow2 with data in a few places, zeros written over part of it, and holes.
fn source_image(dir: &Path) -> PathBuf {
    let src = dir.join("src.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&src), "64M"]);
    let cmds: Vec<String> = [
        "write -P 0x5a 0 3M",
        "write -P 0x11 3M 777",
        "write -z 1M 64k",
        "write -P 0x77 40M 1M",
        "write -P 0x33 67107840 1024",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    qemu_io("qcow2", &src, &cmds);
    src
}

/// The part of img's human `info` that qemu-img 7.2 prints too (7.2 shows no child nodes).
fn top_node(info: &str) -> &str {
    info.split("Child node").next().unwrap()
}

/// Runs img and qemu-img 7.2 with the same arguments and asserts the same stdout.
fn same_output(args: &[&str]) -> String {
    let ours = img_ok(args);
    let theirs = qemu_img72_ok(args);
    assert_eq!(ours, theirs, "img and qemu-img 7.2 differ on {args:?}");
    ours
}

/// The commands, in the order a user runs them, on `target` (an iSCSI LUN or an RBD image):
/// a qcow2 image is created there by img, filled, inspected, snapshotted, resized, amended,
/// benchmarked, used as a backing file, committed into and converted out, and qemu-img 7.2
/// checks each step.
fn every_command(target: &str, dir: &Path) {
    let src = source_image(dir);
    let src = p(&src);

    img_ok(&["create", "-q", "-f", "qcow2", target, "64M"]);
    assert_qemu72_check_clean(target);
    img_ok(&["convert", "-n", "-O", "qcow2", &src, target]);
    assert_qemu72_identical(&src, target);
    img_ok(&["compare", &src, target]);
    assert_qemu72_check_clean(target);

    // What qemu-img 7.2 prints, img prints (up to the child nodes 7.2 does not show).
    let ours = img_ok(&["info", target]);
    let theirs = qemu_img72_ok(&["info", target]);
    assert_eq!(top_node(&ours), theirs, "info differs");
    assert!(theirs.starts_with("image: json:{\"driver\": \"qcow2\", \"file\": {"));
    let json: serde_json::Value =
        serde_json::from_str(&img_ok(&["info", "--output=json", target])).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_str(&qemu_img72_ok(&["info", "--output=json", target])).unwrap();
    for key in ["filename", "format", "virtual-size", "cluster-size"] {
        assert_eq!(json[key], theirs[key], "info --output=json: {key}");
    }
    // The json: name info prints opens the same image, as qemu accepts it, and so do the
    // protocol driver's options given with --image-opts.
    let name = json["filename"].as_str().unwrap();
    img_ok(&["compare", name, target]);
    same_output(&["check", name]);
    let inner: serde_json::Value =
        serde_json::from_str(name.strip_prefix("json:").unwrap()).unwrap();
    let opts: Vec<String> = std::iter::once("driver=qcow2".to_string())
        .chain(
            inner["file"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| format!("file.{k}={}", v.as_str().unwrap())),
        )
        .collect();
    assert_eq!(
        img_ok(&["map", "--output=json", "--image-opts", &opts.join(",")]),
        img_ok(&["map", "--output=json", target])
    );
    same_output(&["map", target]);
    same_output(&["measure", "-O", "qcow2", target]);
    same_output(&["check", target]);

    // Internal snapshots: made, listed by qemu, reverted to, deleted; clean throughout.
    img_ok(&["snapshot", "-c", "before", target]);
    qemu_io72(&["-c", "write -P 0x99 0 64k", target]);
    let list = qemu_img72_ok(&["snapshot", "-l", target]);
    assert!(list.contains("before"), "{list}");
    img_ok(&["snapshot", "-a", "before", target]);
    assert_qemu72_identical(&src, target);
    img_ok(&["snapshot", "-d", "before", target]);
    assert_qemu72_check_clean(target);

    img_ok(&["resize", "-q", target, "+32M"]);
    let info = qemu_img72_ok(&["info", target]);
    assert!(info.contains("virtual size: 96 MiB"), "{info}");
    img_ok(&["amend", "-o", "lazy_refcounts=on", target]);
    let info = qemu_img72_ok(&["info", target]);
    assert!(info.contains("lazy refcounts: true"), "{info}");
    let bench = img_ok(&["bench", "-w", "-c", "200", "-s", "64k", "-o", "48M", target]);
    assert!(bench.contains("Run completed"), "{bench}");
    assert_qemu72_check_clean(target);

    // A local overlay over the network image: written, then committed down into it.
    let overlay = p(&dir.join("overlay.qcow2"));
    img_ok(&[
        "create", "-q", "-f", "qcow2", "-b", target, "-F", "qcow2", &overlay,
    ]);
    let chain = img_ok(&["info", "--backing-chain", &overlay]);
    assert!(chain.contains("backing file: rbd:") || chain.contains("backing file: iscsi://"));
    qemu_io72(&["-c", "write -P 0x42 8M 2M", &overlay]);
    let expect = p(&dir.join("expect.qcow2"));
    img_ok(&["convert", "-O", "qcow2", &overlay, &expect]);
    img_ok(&["commit", "-q", &overlay]);
    assert_qemu72_identical(&expect, target);
    assert_qemu72_check_clean(target);
    // Rebased onto nothing, the overlay holds everything itself.
    img_ok(&["rebase", "-b", "", &overlay]);
    assert_qemu72_identical(&expect, &overlay);

    // Converted out to a local file, and compared by the installed qemu-img as well.
    let out = dir.join("out.qcow2");
    img_ok(&["convert", "-O", "qcow2", target, &p(&out)]);
    assert_qemu_compare_identical(&out, "qcow2", Path::new(&expect), "qcow2");
}

#[test]
fn every_command_on_an_iscsi_lun() {
    let Some(lab) = IscsiLab::start(2, "256M") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    every_command(lab.url(1), dir.path());

    // A raw image over what was a qcow2 one: the first sector is zeroed, so it probes raw.
    img_ok(&["create", "-q", "-f", "raw", lab.url(1), "32M"]);
    let info = img_ok(&["info", lab.url(1)]);
    assert!(info.contains("file format: raw"), "{info}");
    let check = img(&["check", lab.url(1)]);
    assert_eq!(check.status.code(), Some(63), "check of raw");
    assert_eq!(
        String::from_utf8_lossy(&check.stderr),
        "img: This image format does not support checks\n"
    );

    // Raw onto a LUN: checked on the target's own file, without img or libiscsi.
    let src = source_image(dir.path());
    std::fs::write(lab.lun_file(2), vec![0xeeu8; 256 << 20]).unwrap();
    img_ok(&["convert", "-O", "raw", &p(&src), lab.url(2)]);
    let lun = lab.lun_file(2);
    let head = dir.path().join("head.raw");
    std::fs::write(&head, &std::fs::read(&lun).unwrap()[..64 << 20]).unwrap();
    assert_qemu_compare_identical(&src, "qcow2", &head, "raw");
    // And back from the LUN into a local qcow2.
    let back = dir.path().join("back.qcow2");
    img_ok(&["convert", "-f", "raw", "-O", "qcow2", lab.url(2), &p(&back)]);
    assert_qemu_compare_identical(&lun, "raw", &back, "qcow2");
    common::assert_qemu_check_clean(&back);
    // The rest of the LUN is the LUN's: a raw image on a LUN is the whole LUN.
    let info = img_ok(&["info", "-f", "raw", lab.url(2)]);
    assert!(info.contains("virtual size: 256 MiB"), "{info}");

    // What a LUN cannot do is refused with qemu's words.
    let big = dir.path().join("big.raw");
    qemu_img(&["create", "-q", "-f", "raw", &p(&big), "512M"]);
    let o = img(&["convert", "-O", "raw", &p(&big), lab.url(2)]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.ends_with("error while converting raw: Cannot grow iSCSI devices\n"),
        "{err}"
    );
    let o = img(&["resize", "-f", "raw", lab.url(2), "300M"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "img: Cannot resize iSCSI devices\n"
    );
}

/// `iscsi://user%password@...`: a target that requires CHAP is opened with the credentials in
/// the name, and refused without them or with a wrong password, in qemu's words.
#[test]
fn chap_credentials_in_the_name() {
    let Some(lab) = IscsiLab::start_with(1, "64M", Some("alice:s3cret-pw")) else {
        return;
    };
    let url = lab.url(1);
    let with = |cred: &str| url.replacen("iscsi://", &format!("iscsi://{cred}@"), 1);
    let good = with("alice%s3cret-pw");
    img_ok(&["create", "-q", "-f", "qcow2", &good, "32M"]);
    assert_qemu72_check_clean(&good);
    let info = img_ok(&["info", &good]);
    assert_eq!(top_node(&info), qemu_img72_ok(&["info", &good]));
    for name in [url.to_string(), with("alice%wrong")] {
        let ours = img(&["info", &name]);
        let theirs = qemu_img72(&["info", &name]);
        assert_eq!(ours.status.code(), Some(1));
        let err = String::from_utf8_lossy(&ours.stderr);
        assert!(err.contains("Authentication failure"), "{err}");
        assert_eq!(
            err.strip_prefix("img"),
            String::from_utf8_lossy(&theirs.stderr).strip_prefix("qemu-img")
        );
    }
}

/// Names that reach no LUN fail in qemu's words, naming what was given.
#[test]
fn bad_iscsi_names_fail_as_in_qemu() {
    let Some(lab) = IscsiLab::start(1, "64M") else {
        return;
    };
    let no_target = lab.url(1).replace(":disk/1", ":nosuch/1");
    let no_lun = lab.url(1).replace(":disk/1", ":disk/9");
    for name in [
        no_target.as_str(),
        no_lun.as_str(),
        "iscsi://127.0.0.1/no-lun",
    ] {
        let ours = img(&["info", name]);
        let theirs = qemu_img72(&["info", name]);
        let err = String::from_utf8_lossy(&ours.stderr);
        assert_eq!(ours.status.code(), Some(1), "img info {name}: {err}");
        assert!(err.contains(name), "img info {name}: {err}");
        if name != "iscsi://127.0.0.1/no-lun" {
            // (libiscsi's URL parser words a malformed URL its own way in qemu.)
            assert_eq!(
                err.strip_prefix("img"),
                String::from_utf8_lossy(&theirs.stderr).strip_prefix("qemu-img")
            );
        }
    }
}

#[test]
fn every_command_on_rbd() {
    let Some(ceph) = CephLab::shared() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let target = ceph.image("cmds");
    every_command(&target, dir.path());

    // Raw images: created at their size, resized, converted; cluster_size is the object size.
    let raw = ceph.image("raw");
    let src = source_image(dir.path());
    img_ok(&["convert", "-O", "raw", &p(&src), &raw]);
    assert_qemu72_identical(&p(&src), &raw);
    let info = img_ok(&["info", "-f", "raw", &raw]);
    assert_eq!(top_node(&info), qemu_img72_ok(&["info", "-f", "raw", &raw]));
    assert!(top_node(&info).contains("cluster_size: 4194304"), "{info}");
    img_ok(&["resize", "-q", "-f", "raw", &raw, "80M"]);
    let info = qemu_img72_ok(&["info", &raw]);
    assert!(info.contains("virtual size: 80 MiB"), "{info}");

    // Errors are qemu's.
    let o = img(&["create", "-f", "raw", &raw, "1M"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).ends_with(": error rbd create: File exists\n"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let missing = raw.replacen("rbd/t", "rbd/missing-t", 1);
    let ours = img(&["info", &missing]);
    let theirs = qemu_img72(&["info", &missing]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert_eq!(
        String::from_utf8_lossy(&ours.stderr).strip_prefix("img"),
        String::from_utf8_lossy(&theirs.stderr).strip_prefix("qemu-img")
    );
}

/// Images qemu-img 7.2 writes onto network storage are read by img, and the reverse for a
/// compressed qcow2 (the one layout every_command does not make).
#[test]
fn qemu_made_images_are_read_and_the_reverse() {
    let lab = IscsiLab::start(1, "128M");
    let ceph = CephLab::shared();
    let dir = tempfile::tempdir().unwrap();
    let src = p(&source_image(dir.path()));
    // Where qemu writes, and where img writes next (a LUN is written over; an RBD image
    // exists once, so img creates another).
    let mut targets = Vec::new();
    if let Some(lab) = &lab {
        targets.push((lab.url(1).to_string(), lab.url(1).to_string()));
    }
    if let Some(ceph) = ceph {
        targets.push((ceph.image("byqemu"), ceph.image("byimg")));
    }
    for (target, ours) in &targets {
        qemu_img72_ok(&["convert", "-O", "qcow2", &src, target]);
        img_ok(&["compare", &src, target]);
        let back = dir.path().join("back.raw");
        img_ok(&["convert", "-O", "raw", target, &p(&back)]);
        assert_qemu_compare_identical(Path::new(&src), "qcow2", &back, "raw");
        same_output(&["check", target]);

        img_ok(&["convert", "-c", "-O", "qcow2", &src, ours]);
        assert_qemu72_check_clean(ours);
        assert_qemu72_identical(&src, ours);
        let map = img_ok(&["map", "--output=json", ours]);
        assert!(map.contains("\"compressed\": true"), "{map}");
    }
}

/// Starts `img convert` onto `target` and runs `restart` while it copies. Returns img's exit
/// status and stderr; panics if the convert had finished before the restart began (the test
/// would prove nothing) or does not end within five minutes.
fn convert_across(src: &str, fmt: &str, target: &str, restart: impl FnOnce()) -> (bool, String) {
    let mut child = Command::new(common::img_bin())
        .args(["convert", "-n", "-O", fmt, src, target])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the convert ended before the server restarted"
    );
    restart();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err);
        }
        if start.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("img convert hung after the server restarted");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A source big enough that a convert is still running when the server goes away: 384 MiB of
/// data that does not compress to zeros.
fn big_source(dir: &Path) -> String {
    let path = dir.join("big.raw");
    let mut data = vec![0u8; 384 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&path, data).unwrap();
    p(&path)
}

/// The outcome of a convert across a restart: success with identical content, or a failure
/// whose message names the target. Success over different content is lost data.
fn assert_reconnected_or_failed_clearly(ok: bool, err: &str, src: &str, target: &str) {
    if ok {
        eprintln!("convert onto {target} reconnected and completed");
        assert_qemu72_identical(src, target);
    } else {
        eprintln!("convert onto {target} failed: {err}");
        assert!(err.starts_with("img: "), "not a clear error: {err}");
        assert!(!err.contains("panicked"), "img panicked: {err}");
    }
}

#[test]
fn convert_onto_a_lun_across_a_target_restart() {
    let Some(lab) = IscsiLab::start(1, "512M") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = big_source(dir.path());
    let (ok, err) = convert_across(&src, "raw", lab.url(1), || lab.restart());
    assert_reconnected_or_failed_clearly(ok, &err, &src, lab.url(1));
    // img reconnects after a target restart: the convert must have completed.
    assert!(ok, "img convert did not survive a tgtd restart: {err}");
    assert_qemu_compare_identical(
        Path::new(&src),
        "raw",
        &{
            let head = dir.path().join("head.raw");
            std::fs::write(&head, &std::fs::read(lab.lun_file(1)).unwrap()[..384 << 20]).unwrap();
            head
        },
        "raw",
    );
}

/// A target that dies for good under a running convert: img gives up with an error naming the
/// LUN (libiscsi's reconnection is bounded) instead of hanging or reporting success.
#[test]
fn convert_onto_a_lun_whose_target_dies() {
    let Some(lab) = IscsiLab::start(1, "512M") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = big_source(dir.path());
    let (ok, err) = convert_across(&src, "raw", lab.url(1), || lab.stop());
    assert!(!ok, "img convert reported success onto a target that died");
    assert!(
        err.starts_with("img: ") && err.contains(lab.url(1)),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn convert_onto_rbd_across_a_cluster_restart() {
    let Some(ceph) = CephLab::own("3330", "6791") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let src = big_source(dir.path());
    let target = ceph.image("restart");
    img_ok(&["create", "-q", "-f", "qcow2", &target, "384M"]);
    let (ok, err) = convert_across(&src, "qcow2", &target, || ceph.restart());
    assert_reconnected_or_failed_clearly(ok, &err, &src, &target);
    assert!(ok, "img convert did not survive a Ceph restart: {err}");
    assert_qemu72_check_clean(&target);
}

/// `img nbd` serves a qcow2 image that lives on network storage: the installed qemu-img and
/// qemu-io (no iscsi or rbd driver needed) read and write it over NBD, and qemu-img 7.2 finds
/// the image clean with the write in it once the server has stopped.
#[test]
fn img_nbd_serves_images_on_network_storage() {
    let lab = IscsiLab::start(1, "128M");
    let ceph = CephLab::shared();
    let dir = tempfile::tempdir().unwrap();
    let src = source_image(dir.path());
    // What the image holds after the write through the server, made locally.
    let expect = dir.path().join("expect.qcow2");
    std::fs::copy(&src, &expect).unwrap();
    qemu_io("qcow2", &expect, &["write -P 0xc4 20M 1M".to_string()]);
    let mut targets = Vec::new();
    if let Some(lab) = &lab {
        targets.push(lab.url(1).to_string());
    }
    if let Some(ceph) = ceph {
        targets.push(ceph.image("nbd"));
    }
    for (i, target) in targets.iter().enumerate() {
        img_ok(&["convert", "-O", "qcow2", &p(&src), target]);
        let sock = dir.path().join(format!("nbd{i}.sock"));
        let pid_file = dir.path().join(format!("nbd{i}.pid"));
        img_ok(&[
            "nbd",
            "--fork",
            "-t",
            "--pid-file",
            &p(&pid_file),
            "-k",
            &p(&sock),
            "-f",
            "qcow2",
            target,
        ]);
        let url = format!("nbd+unix:///?socket={}", sock.display());
        let out = Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "qcow2", &url, &p(&src)])
            .output()
            .unwrap();
        assert!(out.status.success(), "compare over NBD: {out:?}");
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0xc4 20M 1M", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
            "write over NBD: {out:?}"
        );
        // Stopped, the server flushes and closes the image.
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: kill only sends a signal, to the server this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "img nbd did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_qemu72_check_clean(target);
        assert_qemu72_identical(&p(&expect), target);
    }
}

/// The network client libraries are loaded when a name needs them, not at start: librbd alone
/// brings librados, Ceph's common library, boost and libstdc++, which would cost every img
/// command (an `info` of a local file included) about 10 ms of loading.
#[test]
fn client_libraries_are_not_loaded_at_start() {
    let out = Command::new("ldd").arg(common::img_bin()).output().unwrap();
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ldd: {out:?}");
    for lib in ["librbd", "librados", "libiscsi", "libceph"] {
        assert!(!libs.contains(lib), "img links {lib}:\n{libs}");
    }
}
