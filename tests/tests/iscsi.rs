//! img on iSCSI LUNs: `img info` and `img convert` to and from a LUN of a real target (tgt's
//! tgtd on loopback, through scripts/iscsi-lab.sh; one lab per test), checked with qemu-img.
//!
//! Skips with a printed reason when tgtd is not installed, unless IMG_REQUIRE_ISCSI=1.

mod common;

use common::{assert_qemu_compare_identical, img, img_ok, qemu_img, qemu_io};
use std::path::{Path, PathBuf};
use std::process::Command;

const IQN: &str = "iqn.2026-11.test:disk";

/// A running lab; stopped and removed on drop.
struct Lab {
    dir: tempfile::TempDir,
    url: String,
}

impl Lab {
    fn start() -> Option<Lab> {
        let required = std::env::var("IMG_REQUIRE_ISCSI").is_ok_and(|v| v == "1");
        if !required && !Path::new("/usr/sbin/tgtd").exists() {
            eprintln!(
                "SKIP: tgtd is not installed (apt-get install tgt, or set IMG_REQUIRE_ISCSI=1)"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let out =
            Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/iscsi-lab.sh"))
                .args(["start", "--size", "64M"])
                .env("ISCSI_LAB_DIR", dir.path())
                .env("ISCSI_LAB_IQN", IQN)
                .output()
                .expect("running scripts/iscsi-lab.sh");
        assert!(
            out.status.success(),
            "iscsi-lab.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Some(Lab { dir, url })
    }

    /// The file behind the LUN: what reached the target, readable without img.
    fn lun_file(&self) -> PathBuf {
        self.dir.path().join("lun1.img")
    }

    fn port(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("port"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/iscsi-lab.sh"))
            .arg("clean")
            .env("ISCSI_LAB_DIR", self.dir.path())
            .status();
    }
}

/// A 64 MiB qcow2 with data in a few places, zeros written over part of it, and holes.
fn source_image(dir: &Path) -> PathBuf {
    let src = dir.join("src.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &src.display().to_string(),
        "64M",
    ]);
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

#[test]
fn convert_qcow2_to_a_lun_and_back() {
    let Some(lab) = Lab::start() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = source_image(tmp.path());
    // The LUN holds leftovers first: convert must overwrite them, zeros included.
    std::fs::write(lab.lun_file(), vec![0xeeu8; 64 << 20]).unwrap();
    img_ok(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &src.display().to_string(),
        &lab.url,
    ]);
    // Checked on the target's own file, not through img.
    assert_qemu_compare_identical(&src, "qcow2", &lab.lun_file(), "raw");

    let back = tmp.path().join("back.qcow2");
    img_ok(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &lab.url,
        &back.display().to_string(),
    ]);
    assert_qemu_compare_identical(&src, "qcow2", &back, "qcow2");
    common::assert_qemu_check_clean(&back);
}

#[test]
fn info_shows_the_lun() {
    let Some(lab) = Lab::start() else { return };
    let out = img_ok(&["info", "--output=json", "-f", "raw", &lab.url]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["virtual-size"], 64 << 20, "{out}");
    assert_eq!(v["format"], "raw", "{out}");
    // As qemu: a LUN is named by the iscsi driver's options.
    let port = lab.port();
    assert_eq!(
        v["filename"],
        format!(
            "json:{{\"driver\": \"raw\", \"file\": {{\"lun\": \"1\", \"portal\": \"127.0.0.1:{port}\", \"driver\": \"iscsi\", \"transport\": \"tcp\", \"target\": \"{IQN}\"}}}}"
        ),
        "{out}"
    );
    assert_eq!(v["children"][0]["info"]["format"], "iscsi", "{out}");
}

#[test]
fn bad_names_fail_clearly() {
    let Some(lab) = Lab::start() else { return };
    let wrong = format!("iscsi://127.0.0.1:{}/iqn.2026-11.test:nosuch/1", lab.port());
    for name in [wrong.as_str(), "iscsi://127.0.0.1/no-lun"] {
        let out = img(&["info", name]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "img info {name} succeeded");
        assert!(err.contains(name), "img info {name}: {err}");
    }
}
