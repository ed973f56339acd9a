//! `-o nocow=on` sets the No_COW attribute on Btrfs, as qemu-img does. The test makes a Btrfs
//! filesystem on a loop device of its own (scripts/test.sh installs btrfs-progs).

mod common;

use common::{img_ok, qemu_img, run};
use std::path::{Path, PathBuf};

/// A Btrfs filesystem mounted from an image file; unmounted on drop.
struct Btrfs {
    _dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl Btrfs {
    fn new() -> Btrfs {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("btrfs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let f = std::fs::File::create(&backing).unwrap();
        f.set_len(1 << 30).unwrap();
        drop(f);
        let mkfs = run("mkfs.btrfs", &["-q", "-f", backing.to_str().unwrap()]);
        assert!(
            mkfs.status.success(),
            "mkfs.btrfs: {}",
            String::from_utf8_lossy(&mkfs.stderr)
        );
        let m = run(
            "mount",
            &[
                "-o",
                "loop",
                backing.to_str().unwrap(),
                mnt.to_str().unwrap(),
            ],
        );
        assert!(
            m.status.success(),
            "mounting a Btrfs loop device needs root and /dev/loop*: {}",
            String::from_utf8_lossy(&m.stderr)
        );
        Btrfs { _dir: dir, mnt }
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = run("umount", &[self.mnt.to_str().unwrap()]);
    }
}

/// Whether `lsattr` shows the No_COW ('C') attribute on the file.
fn nocow(path: &Path) -> bool {
    let out = run("lsattr", &[path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "lsattr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().next().unwrap_or("").contains('C')
}

#[test]
fn nocow_is_set_on_btrfs_like_qemu_img() {
    let fs = Btrfs::new();
    for fmt in ["raw", "qcow2"] {
        for opt in ["nocow=on", "nocow=off"] {
            let ours = fs.mnt.join(format!("ours-{opt}.{fmt}"));
            let theirs = fs.mnt.join(format!("theirs-{opt}.{fmt}"));
            img_ok(&[
                "create",
                "-q",
                "-f",
                fmt,
                "-o",
                opt,
                ours.to_str().unwrap(),
                "64M",
            ]);
            qemu_img(&[
                "create",
                "-q",
                "-f",
                fmt,
                "-o",
                opt,
                theirs.to_str().unwrap(),
                "64M",
            ]);
            assert_eq!(nocow(&ours), nocow(&theirs), "{fmt} {opt}");
            assert_eq!(nocow(&ours), opt == "nocow=on", "{fmt} {opt}");
            if fmt == "qcow2" {
                common::assert_qemu_check_clean(&ours);
            }
        }
    }
}
