//! NBD, both ends, against QEMU's: `img nbd` serving images to qemu-img, qemu-io and nbdinfo
//! (compared with what qemu-nbd serves from a copy of the same image), and img's client
//! (nbd://, nbd+unix://, nbd:...) against qemu-nbd. Plus hostile peers on both sides.

mod common;

use common::{img, img_bin, img_ok, qemu_img, qemu_io, run};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A forked NBD server (img nbd or qemu-nbd) on a unix socket; stopped with SIGTERM on drop.
struct Server {
    pid: i32,
    sock: PathBuf,
}

fn alive(pid: i32) -> bool {
    // A zombie (nobody reaped it) has exited too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits (bounded) for `pid` to exit; whether it did.
fn wait_exit(pid: i32) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > Duration::from_secs(20) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

impl Server {
    /// Starts `prog` (img nbd / qemu-nbd) with `--fork` on a socket in `dir`, named `tag`.
    fn start(prog: &str, dir: &Path, tag: &str, args: &[&str]) -> Server {
        let sock = dir.join(format!("{tag}.sock"));
        let pid_file = dir.join(format!("{tag}.pid"));
        let mut cmd = if prog == "img" {
            let mut c = Command::new(img_bin());
            c.arg("nbd");
            c
        } else {
            Command::new(prog)
        };
        let out = cmd
            .args(["--fork", "--pid-file"])
            .arg(&pid_file)
            .arg("-k")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
        assert!(
            out.status.success(),
            "{prog} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // --fork returns once the socket listens: no waiting needed.
        assert!(sock.exists(), "{prog} returned before listening");
        let pid = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("{prog} wrote no pid file: {e}"))
            .trim()
            .parse()
            .unwrap();
        Server { pid, sock }
    }

    fn img(dir: &Path, args: &[&str]) -> Server {
        Server::start("img", dir, "img", args)
    }

    fn qemu(dir: &Path, args: &[&str]) -> Server {
        Server::start("qemu-nbd", dir, "qemu", args)
    }

    fn url(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Stops the server and waits for it to exit (so the image is closed).
    fn stop(self) {
        // SAFETY: kill only sends a signal to the pid we started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        assert!(wait_exit(self.pid), "server {} did not exit", self.pid);
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: as in stop.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        wait_exit(self.pid);
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// A qcow2 with data, zero (allocated and not) and unallocated clusters.
fn qcow2_fixture(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&path), "16M"]);
    qemu_io(
        "qcow2",
        &path,
        &[
            "write -P 0xaa 0 1M".into(),
            "write -P 0xbb 3M 64k".into(),
            "write -P 0xcc 4M 1M".into(),
            "write -z 4M 512k".into(),
            "write -z 8M 1M".into(),
            "write -P 0xdd 15M 1M".into(),
        ],
    );
    path
}

fn out_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a client (`qemu-img`, `nbdinfo`, `img`) against both servers and returns both outputs
/// with the socket names made equal.
fn both(tool: &str, args: &[&str], ours: &Server, theirs: &Server) -> (String, String) {
    let go = |s: &Server| {
        let url = s.url();
        let args: Vec<String> = args.iter().map(|a| a.replace("URL", &url)).collect();
        let o = if tool == "img" {
            img(&args.iter().map(String::as_str).collect::<Vec<_>>())
        } else {
            run(tool, &args.iter().map(String::as_str).collect::<Vec<_>>())
        };
        assert!(o.status.success(), "{tool} {args:?}: {}", out_text(&o));
        out_text(&o).replace(&s.sock.display().to_string(), "SOCK")
    };
    (go(ours), go(theirs))
}

#[test]
fn qemu_img_sees_what_qemu_nbd_serves_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let a = qcow2_fixture(dir.path(), "a.qcow2");
    // Copies made the same way (same holes in the files too); the third to compare with,
    // as the servers hold theirs open for writing.
    let b = qcow2_fixture(dir.path(), "b.qcow2");
    let c = qcow2_fixture(dir.path(), "c.qcow2");
    for fmt in ["qcow2", "raw"] {
        let ours = Server::img(dir.path(), &["-t", "-f", fmt, &p(&a)]);
        let theirs = Server::qemu(dir.path(), &["-t", "-f", fmt, &p(&b)]);
        for args in [
            vec!["map", "URL"],
            vec!["map", "--output=json", "URL"],
            vec!["info", "URL"],
            vec!["info", "--output=json", "URL"],
            // The export shows the guest view (qcow2) or the file's bytes (raw).
            vec!["compare", "-f", "raw", "-F", fmt, "URL", &p(&c)],
        ] {
            let (x, y) = both("qemu-img", &args, &ours, &theirs);
            assert_eq!(x, y, "qemu-img {args:?} over {fmt}");
        }
        let (x, y) = both("nbdinfo", &["--map", "URL"], &ours, &theirs);
        assert_eq!(x, y, "nbdinfo --map over {fmt}");
        if fmt == "qcow2" {
            // Holes and zeros are visible: the zeroed and unallocated ranges are not data.
            let map = qemu_img(&["map", "--output=json", &ours.url()]);
            let v: serde_json::Value = serde_json::from_str(&map).unwrap();
            let at = |off: u64| {
                v.as_array()
                    .unwrap()
                    .iter()
                    .find(|e| {
                        let s = e["start"].as_u64().unwrap();
                        s <= off && off < s + e["length"].as_u64().unwrap()
                    })
                    .unwrap()
                    .clone()
            };
            assert_eq!(at(0)["data"], true);
            assert_eq!(at(4 << 20)["zero"], true);
            assert_eq!(at(4 << 20)["data"], false);
            assert_eq!(at(8 << 20)["zero"], true);
            assert_eq!(at(12 << 20)["data"], false);
            assert_eq!(at(15 << 20)["data"], true);
        }
        // A full copy reads the same bytes.
        let out = dir.path().join(format!("copy-{fmt}.raw"));
        qemu_img(&["convert", "-f", "raw", "-O", "raw", &ours.url(), &p(&out)]);
        let src = if fmt == "raw" { "raw" } else { "qcow2" };
        let cmp = run(
            "qemu-img",
            &["compare", "-f", "raw", "-F", src, &p(&out), &p(&c)],
        );
        if fmt == "raw" {
            // The raw view of a qcow2 is the file's bytes.
            assert!(cmp.status.success() || cmp.status.code() == Some(1));
            assert!(
                std::fs::read(&out).unwrap() == std::fs::read(&c).unwrap(),
                "the raw export differs from the file"
            );
        } else {
            assert!(cmp.status.success(), "{}", out_text(&cmp));
        }
        ours.stop();
        theirs.stop();
    }
}

#[test]
fn sparse_raw_and_nbdinfo_json() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    qemu_img(&["create", "-q", "-f", "raw", &p(&a), "8M"]);
    qemu_io(
        "raw",
        &a,
        &["write -P 1 1M 64k".into(), "write -P 2 6M 1M".into()],
    );
    let b = dir.path().join("b.raw");
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &p(&a), &p(&b)]);
    let ours = Server::img(
        dir.path(),
        &["-t", "-f", "raw", "-D", "a test disk", &p(&a)],
    );
    let theirs = Server::qemu(dir.path(), &["-t", "-f", "raw", &p(&b)]);
    let (x, y) = both("qemu-img", &["map", "--output=json", "URL"], &ours, &theirs);
    assert_eq!(x, y);
    let (x, y) = both("nbdinfo", &["--map", "URL"], &ours, &theirs);
    assert_eq!(x, y);
    assert!(x.contains("hole,zero"), "{x}");
    let json = run("nbdinfo", &["--json", &ours.url()]);
    assert!(json.status.success(), "{}", out_text(&json));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let e = &v["exports"][0];
    assert_eq!(v["structured"], true);
    assert_eq!(e["export-size"], 8 << 20);
    assert_eq!(e["is_read_only"], false);
    assert_eq!(e["can_trim"], true);
    assert_eq!(e["can_zero"], true);
    assert_eq!(e["can_flush"], true);
    assert_eq!(e["can_fua"], true);
    assert_eq!(e["can_multi_conn"], true);
    assert_eq!(e["description"], "a test disk");
    assert_eq!(e["block_size_maximum"], 32 << 20);
    assert!(e["contexts"]
        .as_array()
        .unwrap()
        .contains(&"base:allocation".into()));
}

#[test]
fn backing_chain_and_vmdk() {
    let dir = tempfile::tempdir().unwrap();
    let base = qcow2_fixture(dir.path(), "base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &p(&base),
        "-F",
        "qcow2",
        &p(&top),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &["write -P 0x77 512k 1M".into(), "write -z 15M 512k".into()],
    );
    let vmdk = dir.path().join("d.vmdk");
    qemu_img(&["convert", "-f", "qcow2", "-O", "vmdk", &p(&top), &p(&vmdk)]);
    for (path, fmt) in [(&top, "qcow2"), (&vmdk, "vmdk")] {
        let ours = Server::img(dir.path(), &["-t", "-r", "-f", fmt, &p(path)]);
        let theirs = Server::qemu(dir.path(), &["-t", "-r", "-f", fmt, &p(path)]);
        for args in [
            vec!["map", "--output=json", "URL"],
            vec!["compare", "-f", "raw", "URL", &p(&top)],
        ] {
            let (x, y) = both("qemu-img", &args, &ours, &theirs);
            assert_eq!(x, y, "qemu-img {args:?} over {fmt}");
        }
        let out = dir.path().join("out.qcow2");
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &ours.url(), &p(&out)]);
        common::assert_qemu_compare_identical(&out, "qcow2", &top, "qcow2");
    }
}

#[test]
fn writes_through_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let img_path = qcow2_fixture(dir.path(), "w.qcow2");
    let model = dir.path().join("model.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &p(&img_path),
        &p(&model),
    ]);
    let cmds: Vec<String> = vec![
        "write -P 0x31 100k 300k".into(),
        "write -z 0 64k".into(),
        "write -f -P 0x32 15M 4k".into(),
        "write -z 6M 2M".into(),
        "discard 3M 64k".into(),
        "write -P 0x33 16773120 4096".into(),
        "flush".into(),
    ];
    let srv = Server::img(
        dir.path(),
        &["-t", "--discard=unmap", "-f", "qcow2", &p(&img_path)],
    );
    let url = srv.url();
    qemu_io("raw", Path::new(&url), &cmds);
    qemu_io("raw", &model, &cmds);
    // Read back through the server while it runs.
    qemu_io(
        "raw",
        Path::new(&url),
        &["read -P 0x31 100k 300k".into(), "read -P 0 6M 2M".into()],
    );
    let cmp = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &url, &p(&model)],
    );
    assert!(cmp.status.success(), "{}", out_text(&cmp));
    srv.stop();
    common::assert_qemu_check_clean(&img_path);
    common::assert_qemu_compare_identical(&img_path, "qcow2", &model, "raw");
    // The discard freed the cluster (discard=unmap): it reads as zeros, unallocated.
    let map = qemu_img(&["map", "--output=json", &p(&img_path)]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert!(v.as_array().unwrap().iter().any(|e| {
        e["start"].as_u64().unwrap() <= 3 << 20
            && e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap() > 3 << 20
            && e["data"] == false
    }));
}

#[test]
fn several_clients_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&path), "64M"]);
    let srv = Server::img(dir.path(), &["-t", "-e", "4", "-f", "qcow2", &p(&path)]);
    let url = srv.url();
    std::thread::scope(|s| {
        for i in 0..4u64 {
            let url = url.clone();
            s.spawn(move || {
                let mut cmds = Vec::new();
                for j in 0..16u64 {
                    let off = (i * 16 + j) << 20;
                    cmds.push(format!("write -P {} {off} 1M", 0x40 + i));
                }
                cmds.push(format!("read -P {} {} 16M", 0x40 + i, (i * 16) << 20));
                qemu_io("raw", Path::new(&url), &cmds);
            });
        }
    });
    // All four wrote through one image: each range holds its writer's pattern.
    let mut cmds = Vec::new();
    for i in 0..4u64 {
        cmds.push(format!("read -P {} {} 16M", 0x40 + i, (i * 16) << 20));
    }
    qemu_io("raw", Path::new(&url), &cmds);
    srv.stop();
    common::assert_qemu_check_clean(&path);
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_fixture(dir.path(), "r.qcow2");
    let before = std::fs::read(&path).unwrap();
    let srv = Server::img(dir.path(), &["-t", "-r", "-f", "qcow2", &p(&path)]);
    let o = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &srv.url()]);
    let text = out_text(&o);
    // qemu-io opens a read-only export read-only; forcing it through the protocol must fail
    // with EPERM from the server.
    assert!(
        text.contains("read-only")
            || text.contains("Operation not permitted")
            || text.contains("Permission denied"),
        "{text}"
    );
    let raw = raw_client(&srv.sock, b"");
    let reply = raw.request(1, 0, 0, 4096, Some(&[0u8; 4096]));
    assert_eq!(reply, 1, "EPERM for a write to a read-only export");
    drop(raw);
    let json = run("nbdinfo", &["--json", &srv.url()]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true);
    assert_eq!(v["exports"][0]["can_trim"], false);
    srv.stop();
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[test]
fn exits_after_last_client_unless_persistent() {
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_fixture(dir.path(), "p.qcow2");
    let once = Server::img(dir.path(), &["-f", "qcow2", &p(&path)]);
    qemu_img(&["info", &once.url()]);
    assert!(wait_exit(once.pid), "img nbd without -t kept running");
    // It closed the image cleanly and removed its socket.
    assert!(!once.sock.exists());
    std::mem::forget(once);
    common::assert_qemu_check_clean(&path);
    let kept = Server::img(dir.path(), &["-t", "-f", "qcow2", &p(&path)]);
    for _ in 0..3 {
        qemu_img(&["info", &kept.url()]);
    }
    assert!(alive(kept.pid));
    let pid_file = dir.path().join("img.pid");
    assert!(pid_file.exists());
    kept.stop();
    assert!(!pid_file.exists(), "pid file left behind");
}

#[test]
fn fork_reports_errors_and_tcp_works() {
    let dir = tempfile::tempdir().unwrap();
    // Errors of the forked server reach the caller, with a failing exit.
    let o = Command::new(img_bin())
        .args(["nbd", "--fork", "-k"])
        .arg(dir.path().join("x.sock"))
        .arg(dir.path().join("missing.qcow2"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("No such file or directory"),
        "{}",
        out_text(&o)
    );
    let o = img(&["nbd", "-c", "/dev/nbd0", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("kernel NBD client"));
    // TCP on a free port, with an export name.
    let path = qcow2_fixture(dir.path(), "t.qcow2");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let pid_file = dir.path().join("tcp.pid");
    let o = Command::new(img_bin())
        .args(["nbd", "--fork", "-t", "-b", "127.0.0.1", "-x", "disk", "-p"])
        .arg(port.to_string())
        .arg("--pid-file")
        .arg(&pid_file)
        .args(["-f", "qcow2"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out_text(&o));
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let guard = Server {
        pid,
        sock: dir.path().join("none"),
    };
    let url = format!("nbd://127.0.0.1:{port}/disk");
    let info = qemu_img(&["info", &url]);
    assert!(info.contains("virtual size: 16 MiB"), "{info}");
    let legacy = format!("nbd:127.0.0.1:{port}:exportname=disk");
    let ours = img_ok(&["map", "--output=json", &legacy]);
    assert_eq!(ours, qemu_img(&["map", "--output=json", &url]));
    let list = run(
        "nbdinfo",
        &["--list", "--json", &format!("nbd://127.0.0.1:{port}")],
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains("\"disk\""));
    let wrong = img(&["info", &format!("nbd://127.0.0.1:{port}/other")]);
    assert_eq!(
        String::from_utf8_lossy(&wrong.stderr),
        format!(
            "img: Could not open 'nbd://127.0.0.1:{port}/other': Requested export not available\n\
             server reported: export 'other' not present\n"
        )
    );
    guard.stop();
}

#[test]
fn sigterm_flushes_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&path), "8M"]);
    let srv = Server::img(dir.path(), &["-t", "-f", "qcow2", &p(&path)]);
    qemu_io("raw", Path::new(&srv.url()), &["write -P 9 0 3M".into()]);
    srv.stop();
    common::assert_qemu_check_clean(&path);
    qemu_io("qcow2", &path, &["read -P 9 0 3M".into()]);
}

// ---- our client against qemu-nbd ----

#[test]
fn img_reads_from_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let a = qcow2_fixture(dir.path(), "a.qcow2");
    let srv = Server::qemu(dir.path(), &["-t", "-r", "-f", "qcow2", &p(&a)]);
    let url = srv.url();
    let legacy = format!("nbd:unix:{}", srv.sock.display());
    for name in [&url, &legacy] {
        for args in [
            vec!["info", name.as_str()],
            vec!["info", "--output=json", name.as_str()],
            vec!["map", name.as_str()],
            vec!["map", "--output=json", name.as_str()],
            vec!["compare", name.as_str(), &p(&a)],
        ] {
            let ours = img(&args);
            let theirs = run("qemu-img", &args);
            assert_eq!(
                common::Run::from(ours),
                common::Run::from(theirs),
                "{args:?}"
            );
        }
    }
    // --image-opts with qemu's nbd driver options, as a protocol node and under qcow2.
    let sock = srv.sock.display().to_string();
    for spec in [
        format!("driver=nbd,server.type=unix,server.path={sock}"),
        format!("driver=qcow2,file.driver=nbd,file.server.type=unix,file.server.path={sock}"),
        format!("driver=nbd,path={sock},bogus=1"),
    ] {
        for cmd in ["info", "map"] {
            let args = [cmd, "--image-opts", spec.as_str()];
            assert_eq!(
                common::Run::from(img(&args)),
                common::Run::from(run("qemu-img", &args)),
                "{args:?}"
            );
        }
    }
    let out = dir.path().join("o.qcow2");
    img_ok(&["convert", "-O", "qcow2", &url, &p(&out)]);
    common::assert_qemu_compare_identical(&out, "qcow2", &a, "qcow2");
    let bench = img_ok(&["bench", "-c", "2000", "-d", "16", "-f", "raw", &url]);
    assert!(bench.contains("Run completed"), "{bench}");
}

#[test]
fn img_writes_into_qemu_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_fixture(dir.path(), "src.qcow2");
    let target = dir.path().join("t.raw");
    qemu_img(&["create", "-q", "-f", "raw", &p(&target), "16M"]);
    qemu_io("raw", &target, &["write -P 0x5a 0 16M".into()]);
    let srv = Server::qemu(dir.path(), &["-t", "-f", "raw", &p(&target)]);
    let url = srv.url();
    img_ok(&["convert", "-n", "-O", "raw", &p(&src), &url]);
    let cmp = run("qemu-img", &["compare", "-F", "qcow2", &url, &p(&src)]);
    assert!(cmp.status.success(), "{}", out_text(&cmp));
    // Without -n the export is only checked for size, and rewritten whole (zeros included).
    qemu_io("raw", Path::new(&url), &["write -P 0x5b 0 16M".into()]);
    img_ok(&["convert", "-O", "raw", &p(&src), &url]);
    let cmp = run("qemu-img", &["compare", "-F", "qcow2", &url, &p(&src)]);
    assert!(cmp.status.success(), "{}", out_text(&cmp));
    let small = dir.path().join("small.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&small), "32M"]);
    let o = img(&["convert", "-O", "raw", &p(&small), &url]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("Cannot grow NBD nodes"));
    let bench = img_ok(&["bench", "-w", "-c", "500", "-f", "raw", &url]);
    assert!(bench.contains("Run completed"), "{bench}");
    srv.stop();
}

#[test]
fn qcow2_over_an_nbd_export() {
    let dir = tempfile::tempdir().unwrap();
    let a = qcow2_fixture(dir.path(), "q.qcow2");
    let model = dir.path().join("model.qcow2");
    std::fs::copy(&a, &model).unwrap();
    // qemu-nbd serves the qcow2 file raw; img opens the qcow2 format over the network. An
    // export cannot grow, so the file gets room for new clusters first.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let srv = Server::qemu(dir.path(), &["-t", "-f", "raw", &p(&a)]);
    let url = srv.url();
    for args in [
        vec!["info", "-f", "qcow2", url.as_str()],
        vec!["info", url.as_str()],
        vec!["map", "-f", "qcow2", "--output=json", url.as_str()],
        vec!["check", "-f", "qcow2", url.as_str()],
    ] {
        assert_eq!(
            common::Run::from(img(&args)),
            common::Run::from(run("qemu-img", &args)),
            "{args:?}"
        );
    }
    // Writes through the qcow2 driver over NBD, then qemu-img checks the file.
    let cmds = ["write -P 0x66 2M 1M", "write -z 0 64k", "discard 15M 1M"];
    let w = img_ok(&[
        "convert",
        "-n",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        &p(&model),
        &url,
    ]);
    assert!(w.is_empty());
    let patch = dir.path().join("patch.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&patch), "16M"]);
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io("qcow2", &patch, &cmds);
    qemu_io("qcow2", &model, &cmds);
    img_ok(&[
        "convert",
        "-n",
        "-f",
        "qcow2",
        "-O",
        "qcow2",
        &p(&model),
        &url,
    ]);
    srv.stop();
    common::assert_qemu_check_clean(&a);
    common::assert_qemu_compare_identical(&a, "qcow2", &model, "qcow2");
}

#[test]
fn connection_errors_are_worded_as_qemu_words_them() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!(
        "nbd+unix:///?socket={}",
        dir.path().join("none.sock").display()
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let refused = format!("nbd://127.0.0.1:{port}/");
    for name in [&missing, &refused] {
        let ours = common::Run::from(img(&["info", name]));
        let theirs = common::Run::from(run("qemu-img", &["info", name]));
        assert_eq!(ours, theirs);
    }
}

// ---- hostile peers ----

/// A raw protocol client for poking the server.
struct RawClient {
    s: std::os::unix::net::UnixStream,
}

fn raw_client(sock: &Path, export: &[u8]) -> RawClient {
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    s.write_all(&3u32.to_be_bytes()).unwrap(); // fixed newstyle, no zeroes
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&1u32.to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export);
    s.write_all(&opt).unwrap();
    let mut info = [0u8; 10];
    s.read_exact(&mut info).unwrap();
    RawClient { s }
}

impl RawClient {
    /// Sends a request; returns the simple reply's error (after reading any read data).
    fn request(&self, kind: u16, offset: u64, cookie: u64, len: u32, data: Option<&[u8]>) -> u32 {
        let mut s = &self.s;
        let mut h = 0x2560_9513u32.to_be_bytes().to_vec();
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        s.write_all(&h).unwrap();
        if let Some(d) = data {
            s.write_all(d).unwrap();
        }
        let mut r = [0u8; 16];
        s.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), 0x6744_6698);
        assert_eq!(u64::from_be_bytes(r[8..16].try_into().unwrap()), cookie);
        let err = u32::from_be_bytes(r[4..8].try_into().unwrap());
        if kind == 0 && err == 0 {
            let mut d = vec![0u8; len as usize];
            s.read_exact(&mut d).unwrap();
        }
        err
    }
}

#[test]
fn server_bounds_what_clients_send() {
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_fixture(dir.path(), "h.qcow2");
    let srv = Server::img(dir.path(), &["-t", "-e", "0", "-f", "qcow2", &p(&path)]);
    let c = raw_client(&srv.sock, b"");
    // A read longer than 32 MiB, one past the end, a write past the end: errors, and the
    // connection stays usable.
    assert_eq!(c.request(0, 0, 1, (32 << 20) + 1, None), 22);
    assert_eq!(c.request(0, 16 << 20, 2, 1, None), 22);
    assert_eq!(c.request(1, 16 << 20, 3, 512, Some(&[1u8; 512])), 28);
    assert_eq!(c.request(0, 0, 4, 4096, None), 0);
    // A write announcing 4 GiB - 1 bytes is drained piecewise, not buffered: send a little
    // and hang up; the server must not have allocated it (it keeps serving others).
    {
        let mut s = &c.s;
        let mut h = 0x2560_9513u32.to_be_bytes().to_vec();
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&1u16.to_be_bytes());
        h.extend_from_slice(&5u64.to_be_bytes());
        h.extend_from_slice(&0u64.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        s.write_all(&h).unwrap();
        s.write_all(&[0u8; 65536]).unwrap();
    }
    drop(c);
    // Bad request magic: the server hangs up on that client only.
    let c = raw_client(&srv.sock, b"");
    (&c.s).write_all(&[0xffu8; 28]).unwrap();
    let mut b = [0u8; 1];
    assert_eq!((&c.s).read(&mut b).unwrap_or(0), 0);
    // A huge option length during negotiation is refused without reading it into memory.
    let mut s = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&3u32.to_be_bytes());
    opt.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    s.write_all(&opt).unwrap();
    drop(s);
    // Still serving.
    let info = qemu_img(&["info", &srv.url()]);
    assert!(info.contains("16 MiB"));
    srv.stop();
    common::assert_qemu_check_clean(&path);
}

/// A fake server on a TCP port that sends `script` after a valid handshake prefix (or
/// instead of one), then hangs up.
fn fake_server(script: impl FnOnce(&mut std::net::TcpStream) + Send + 'static) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            script(&mut s);
        }
    });
    format!("nbd://127.0.0.1:{port}/")
}

/// Handshake up to transmission with structured replies, advertising `size`.
fn fake_handshake(s: &mut std::net::TcpStream, size: u64) {
    let mut hello = b"NBDMAGICIHAVEOPT".to_vec();
    hello.extend_from_slice(&3u16.to_be_bytes());
    s.write_all(&hello).unwrap();
    let mut f = [0u8; 4];
    s.read_exact(&mut f).unwrap();
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h).unwrap();
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        s.read_exact(&mut d).unwrap();
        let reply = |s: &mut std::net::TcpStream, kind: u32, data: &[u8]| {
            let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
            r.extend_from_slice(&opt.to_be_bytes());
            r.extend_from_slice(&kind.to_be_bytes());
            r.extend_from_slice(&(data.len() as u32).to_be_bytes());
            r.extend_from_slice(data);
            s.write_all(&r).unwrap();
        };
        match opt {
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&1u16.to_be_bytes());
                reply(s, 3, &info);
                reply(s, 1, &[]);
                return;
            }
            8 => reply(s, 1, &[]),
            _ => reply(s, (1 << 31) | 1, &[]),
        }
    }
}

#[test]
fn client_survives_hostile_servers() {
    use blockdev::nbd::NbdStorage;
    use blockdev::Storage;
    // Not an NBD server at all.
    let url = fake_server(|s| {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let e = NbdStorage::open(&url, true).unwrap_err().to_string();
    assert!(e.contains("not an NBD server"), "{e}");
    // An option reply claiming 4 GiB of data.
    let url = fake_server(|s| {
        let mut hello = b"NBDMAGICIHAVEOPT".to_vec();
        hello.extend_from_slice(&3u16.to_be_bytes());
        let _ = s.write_all(&hello);
        let mut r = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        r.extend_from_slice(&8u32.to_be_bytes());
        r.extend_from_slice(&1u32.to_be_bytes());
        r.extend_from_slice(&u32::MAX.to_be_bytes());
        let _ = s.write_all(&r);
        std::thread::sleep(Duration::from_millis(500));
    });
    let e = NbdStorage::open(&url, true).unwrap_err().to_string();
    assert!(e.contains("too long"), "{e}");
    // A read answered with a data chunk far longer than asked for.
    let url = fake_server(|s| {
        fake_handshake(s, 1 << 20);
        let mut req = [0u8; 28];
        if s.read_exact(&mut req).is_ok() {
            let mut c = 0x668e_33efu32.to_be_bytes().to_vec();
            c.extend_from_slice(&1u16.to_be_bytes());
            c.extend_from_slice(&1u16.to_be_bytes());
            c.extend_from_slice(&req[8..16]);
            c.extend_from_slice(&u32::MAX.to_be_bytes());
            let _ = s.write_all(&c);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let st = NbdStorage::open(&url, true).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = st.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("bad data chunk length"), "{e}");
    // Later requests fail at once: the connection is dead.
    assert!(st.read_at(&mut buf, 0).is_err());
    // Bad reply magic.
    let url = fake_server(|s| {
        fake_handshake(s, 1 << 20);
        let mut req = [0u8; 28];
        if s.read_exact(&mut req).is_ok() {
            let _ = s.write_all(&[0xabu8; 64]);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let st = NbdStorage::open(&url, true).unwrap();
    let e = st.read_at(&mut buf, 0).unwrap_err().to_string();
    assert!(e.contains("bad reply magic"), "{e}");
    // The server hangs up mid-request: an error naming the export and offset, not a hang.
    let url = fake_server(|s| {
        fake_handshake(s, 1 << 20);
        let mut req = [0u8; 28];
        let _ = s.read_exact(&mut req);
    });
    let st = NbdStorage::open(&url, true).unwrap();
    let e = st.read_at(&mut buf, 8192).unwrap_err().to_string();
    assert!(
        e.contains("Connection closed") && e.contains("0x2000") && e.contains("127.0.0.1"),
        "{e}"
    );
    // Reads past the advertised end never reach the wire.
    let e = st.read_at(&mut buf, 1 << 20).unwrap_err().to_string();
    assert!(e.contains("past the end"), "{e}");
}

#[test]
fn overlay_and_internal_snapshot_exports() {
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_fixture(dir.path(), "o.qcow2");
    qemu_img(&["snapshot", "-c", "before", &p(&path)]);
    qemu_io("qcow2", &path, &["write -P 0x42 0 1M".into()]);
    let before = std::fs::read(&path).unwrap();
    // -s: writes land in a temporary overlay; the image stays as it was.
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = Command::new(img_bin())
        .env("TMPDIR", &tmp)
        .args(["nbd", "--fork", "-t", "-s", "-k"])
        .arg(dir.path().join("s.sock"))
        .arg("--pid-file")
        .arg(dir.path().join("s.pid"))
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", out_text(&out));
    let pid: i32 = std::fs::read_to_string(dir.path().join("s.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let srv = Server {
        pid,
        sock: dir.path().join("s.sock"),
    };
    let url = srv.url();
    qemu_io(
        "raw",
        Path::new(&url),
        &[
            "write -P 0x43 64k 64k".into(),
            "read -P 0x43 64k 64k".into(),
            "read -P 0x42 0 64k".into(),
            "read -P 0xbb 3M 64k".into(),
        ],
    );
    // The overlay was unlinked as soon as it was open.
    assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
    srv.stop();
    assert!(
        std::fs::read(&path).unwrap() == before,
        "-s wrote the image"
    );
    // -l: the internal snapshot, read-only.
    let srv = Server::img(dir.path(), &["-t", "-l", "before", &p(&path)]);
    let url = srv.url();
    let o = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0xaa 0 1M", &url],
    );
    let text = out_text(&o);
    assert!(
        o.status.success() && text.contains("read 1048576/1048576") && !text.contains("fail"),
        "{text}"
    );
    let json = run("nbdinfo", &["--json", &url]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true);
    srv.stop();
}

#[test]
fn errors_are_worded_as_qemu_nbd_words_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_fixture(dir.path(), "e.qcow2");
    let missing = p(&dir.path().join("missing.qcow2"));
    let file = p(&path);
    let cases: Vec<Vec<&str>> = vec![
        vec![&missing],
        vec!["-f", "foo", &file],
        vec!["-e", "-1", &file],
        vec![],
        vec![&file, &file],
        vec!["--discard=bad", &file],
        vec!["--detect-zeroes=unmap", &file],
        vec!["--cache=bad", &file],
        vec!["--aio=bad", &file],
        vec!["-l", "nosuch", &file],
    ];
    for args in cases {
        let sock = dir.path().join("e.sock");
        let mut full = vec!["nbd", "-k", sock.to_str().unwrap()];
        full.extend(&args);
        let ours = img(&full);
        let theirs = run("qemu-nbd", &full[1..]);
        let norm = |o: &std::process::Output, prog: &str, help: &str| {
            (
                o.status.code(),
                String::from_utf8_lossy(&o.stderr)
                    .replace(&format!("{prog}:"), "PROG:")
                    .replace(&format!("`{help} --help'"), "`PROG --help'"),
            )
        };
        assert_eq!(
            norm(&ours, "img", "img nbd"),
            norm(&theirs, "qemu-nbd", "qemu-nbd"),
            "{args:?}"
        );
    }
}

#[test]
fn img_client_against_img_server() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2_fixture(dir.path(), "src.qcow2");
    let target = dir.path().join("t.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", &p(&target), "16M"]);
    qemu_io("qcow2", &target, &["write -P 0x12 0 16M".into()]);
    let srv = Server::img(
        dir.path(),
        &["-t", "--discard=unmap", "-f", "qcow2", &p(&target)],
    );
    let url = srv.url();
    // Parallel writes (8 workers, zeroes as write-zeroes requests) and reads over one
    // connection each.
    img_ok(&[
        "convert",
        "-n",
        "-m",
        "8",
        "-W",
        "-O",
        "raw",
        &p(&src),
        &url,
    ]);
    img_ok(&["compare", "-f", "raw", "-F", "qcow2", &url, &p(&src)]);
    let bench = img_ok(&[
        "bench", "-w", "-d", "32", "-c", "4000", "-s", "4k", "-S", "12288", "-f", "raw", &url,
    ]);
    assert!(bench.contains("Run completed"), "{bench}");
    let map = img_ok(&["map", "--output=json", "-f", "raw", &url]);
    assert_eq!(map, qemu_img(&["map", "--output=json", "-f", "raw", &url]));
    srv.stop();
    common::assert_qemu_check_clean(&target);
}

#[test]
fn silent_clients_are_dropped_after_the_handshake_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = qcow2_fixture(dir.path(), "l.qcow2");
    let srv = Server::img(
        dir.path(),
        &[
            "-t",
            "-e",
            "2",
            "--handshake-limit=1",
            "-f",
            "qcow2",
            &p(&path),
        ],
    );
    let mut s = std::os::unix::net::UnixStream::connect(&srv.sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    // Say nothing: the server hangs up (EOF), rather than our own timeout firing.
    let mut b = [0u8; 1];
    assert_eq!(s.read(&mut b).unwrap(), 0);
    // Transmission has no limit: a negotiated client may idle.
    let c = raw_client(&srv.sock, b"");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.request(0, 0, 7, 512, None), 0);
    drop(c);
    srv.stop();
}
