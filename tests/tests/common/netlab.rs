//! Real network storage for the tests, started by the project's own scripts: tgt's tgtd
//! (`scripts/iscsi-lab.sh`) and a single-node Ceph cluster (`scripts/ceph-lab.sh`), and the
//! oracle for them, Debian's qemu-img 7.2 with its iscsi and rbd modules
//! (`scripts/qemu-img72.sh`; the installed qemu-img 10 has neither module).
//!
//! Without the packages a test skips with a printed reason, unless IMG_REQUIRE_ISCSI=1 or
//! IMG_REQUIRE_CEPH=1 (scripts/test.sh sets both, so CI fails instead).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(name)
}

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Runs a lab script with `env`, panicking with its stderr when it fails; returns stdout.
fn lab_script(name: &str, args: &[&str], env: &[(&str, &Path)], ports: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(script(name));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for (k, v) in ports {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// qemu-img 7.2 with the iscsi and rbd block modules.
pub fn qemu_img72(args: &[&str]) -> Output {
    Command::new(script("qemu-img72.sh"))
        .args(args)
        .output()
        .expect("cannot run scripts/qemu-img72.sh")
}

/// qemu-img 7.2's stdout, panicking with its stderr when it fails.
pub fn qemu_img72_ok(args: &[&str]) -> String {
    let out = qemu_img72(args);
    assert!(
        out.status.success(),
        "qemu-img 7.2 {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// qemu-io 7.2 (same package as qemu-img72), which can write into images on network storage.
pub fn qemu_io72(args: &[&str]) {
    let out = Command::new(script("qemu-img72.sh"))
        .env("QEMU_TOOL", "qemu-io")
        .args(args)
        .output()
        .expect("cannot run qemu-io 7.2");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"),
        "qemu-io 7.2 {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that qemu-img 7.2 finds the image clean: no errors, no leaks.
pub fn assert_qemu72_check_clean(name: &str) {
    let out = qemu_img72(&["check", name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img 7.2 check {name}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that qemu-img 7.2 finds the two images' guest-visible contents identical.
pub fn assert_qemu72_identical(a: &str, b: &str) {
    let out = qemu_img72(&["compare", a, b]);
    assert!(
        out.status.success(),
        "qemu-img 7.2 compare {a} {b}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tgtd on loopback with file-backed LUNs, on its own port; stopped and removed on drop.
pub struct IscsiLab {
    dir: tempfile::TempDir,
    urls: Vec<String>,
}

impl IscsiLab {
    /// Starts a target with `luns` LUNs of `size` (qemu-img's size syntax), or returns `None`
    /// (having said why) when tgt is not installed and not required.
    pub fn start(luns: usize, size: &str) -> Option<IscsiLab> {
        Self::start_with(luns, size, None)
    }

    /// As [`IscsiLab::start`], with logins requiring CHAP as `user:password` when given.
    pub fn start_with(luns: usize, size: &str, chap: Option<&str>) -> Option<IscsiLab> {
        if !required("IMG_REQUIRE_ISCSI") && !Path::new("/usr/sbin/tgtd").exists() {
            eprintln!("SKIP: tgtd is not installed (set IMG_REQUIRE_ISCSI=1 to fail instead)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let luns = luns.to_string();
        let mut args = vec!["start", "--luns", &luns, "--size", size];
        if let Some(chap) = chap {
            args.extend(["--chap", chap]);
        }
        let out = lab_script("iscsi-lab.sh", &args, &[("ISCSI_LAB_DIR", dir.path())], &[]);
        let urls = out.lines().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(urls.len().to_string(), luns, "iscsi-lab.sh printed {out}");
        Some(IscsiLab { dir, urls })
    }

    /// The URL of LUN `n` (from 1).
    pub fn url(&self, n: usize) -> &str {
        &self.urls[n - 1]
    }

    /// The file behind LUN `n`: what reached the target, readable without img.
    pub fn lun_file(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("lun{n}.img"))
    }

    /// Kills tgtd; the LUN files stay.
    pub fn stop(&self) {
        lab_script(
            "iscsi-lab.sh",
            &["stop"],
            &[("ISCSI_LAB_DIR", self.dir.path())],
            &[],
        );
    }

    /// Kills tgtd and starts it again on the same port and files.
    pub fn restart(&self) {
        lab_script(
            "iscsi-lab.sh",
            &["restart"],
            &[("ISCSI_LAB_DIR", self.dir.path())],
            &[],
        );
    }
}

impl Drop for IscsiLab {
    fn drop(&mut self) {
        let _ = Command::new(script("iscsi-lab.sh"))
            .arg("clean")
            .env("ISCSI_LAB_DIR", self.dir.path())
            .output();
    }
}

/// Removes the images earlier test processes left in the shared cluster (named `tPID-...` by
/// [`CephLab::image`], the process gone): its OSD keeps objects in memory, a bounded store.
fn remove_stale_images(conf: &str) {
    let Ok(out) = Command::new("rbd").args(["-c", conf, "ls", "rbd"]).output() else {
        return;
    };
    for name in String::from_utf8_lossy(&out.stdout).lines() {
        let pid = name
            .strip_prefix('t')
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = Command::new("rbd")
                .args(["-c", conf, "rm", "--no-progress", &format!("rbd/{name}")])
                .output();
        }
    }
}

/// A single-node Ceph cluster.
pub struct CephLab {
    dir: PathBuf,
    conf: String,
    ports: Option<(String, String)>,
}

impl CephLab {
    fn available() -> bool {
        let have = Command::new("sh")
            .args([
                "-c",
                "command -v ceph-mon && command -v ceph-osd && command -v rbd",
            ])
            .output()
            .is_ok_and(|o| o.status.success());
        if !have && !required("IMG_REQUIRE_CEPH") {
            eprintln!("SKIP: the Ceph packages are not installed (set IMG_REQUIRE_CEPH=1 to fail instead)");
        }
        have || required("IMG_REQUIRE_CEPH")
    }

    /// The cluster the tests of this process share (scripts/ceph-lab.sh's default), started
    /// on first use; `None` (having said why) when Ceph is not installed and not required.
    pub fn shared() -> Option<&'static CephLab> {
        static LAB: OnceLock<Option<CephLab>> = OnceLock::new();
        LAB.get_or_init(|| {
            if !Self::available() {
                return None;
            }
            let dir = PathBuf::from("/tmp/img-ceph-lab");
            let conf = lab_script("ceph-lab.sh", &["start"], &[("IMG_CEPH_DIR", &dir)], &[]);
            remove_stale_images(&conf);
            Some(CephLab {
                dir,
                conf,
                ports: None,
            })
        })
        .as_ref()
    }

    /// A cluster of the caller's own, on ports `v2`/`v1`, that it may restart; stopped on
    /// drop.
    pub fn own(v2: &str, v1: &str) -> Option<CephLab> {
        if !Self::available() {
            return None;
        }
        let dir = std::env::temp_dir().join(format!("img-ceph-{v2}-{}", std::process::id()));
        let ports = (v2.to_string(), v1.to_string());
        let conf = lab_script(
            "ceph-lab.sh",
            &["start"],
            &[("IMG_CEPH_DIR", &dir)],
            &[("IMG_CEPH_PORT", v2), ("IMG_CEPH_PORT_V1", v1)],
        );
        Some(CephLab {
            dir,
            conf,
            ports: Some(ports),
        })
    }

    fn run(&self, action: &str) -> String {
        let ports: Vec<(&str, &str)> = match &self.ports {
            Some((v2, v1)) => vec![("IMG_CEPH_PORT", v2), ("IMG_CEPH_PORT_V1", v1)],
            None => Vec::new(),
        };
        lab_script(
            "ceph-lab.sh",
            &[action],
            &[("IMG_CEPH_DIR", &self.dir)],
            &ports,
        )
    }

    /// A name for a new image unique to this process: `rbd:rbd/NAME:conf=...`. Any image left
    /// by an earlier run of the same pid is removed first.
    pub fn image(&self, tag: &str) -> String {
        let image = format!("t{}-{tag}", std::process::id());
        let _ = Command::new("rbd")
            .args(["-c", &self.conf, "rm", &format!("rbd/{image}")])
            .output();
        format!("rbd:rbd/{image}:conf={}", self.conf)
    }

    /// Stops the daemons cleanly and starts them again; the images survive.
    pub fn restart(&self) {
        self.run("restart");
    }
}

impl Drop for CephLab {
    fn drop(&mut self) {
        // The shared cluster lives in a static and is never dropped; an own one is stopped.
        if self.ports.is_some() {
            self.run("stop");
        }
    }
}
