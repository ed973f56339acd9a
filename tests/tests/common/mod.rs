//! Helpers shared by the integration tests: running qemu-img and img, making patterns.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs a command and returns its output, panicking only if it cannot be started.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

/// Runs `qemu-img` and asserts success.
pub fn qemu_img(args: &[&str]) -> String {
    let out = run("qemu-img", args);
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-io` on an image with one or more `-c` commands and asserts success.
pub fn qemu_io(fmt: &str, image: &Path, cmds: &[String]) {
    let mut args = vec!["-f".to_string(), fmt.to_string()];
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(image.display().to_string());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = run("qemu-io", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("error") && !stdout.contains("failed"),
        "qemu-io {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts `qemu-img check` finds no errors and no leaks.
pub fn assert_qemu_check_clean(image: &Path) {
    let out = run(
        "qemu-img",
        &["check", "-f", "qcow2", &image.display().to_string()],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: exit {:?}\n{text}",
        image.display(),
        out.status.code()
    );
}

/// Asserts `qemu-img compare` says the two images have identical content.
pub fn assert_qemu_compare_identical(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            fa,
            "-F",
            fb,
            &a.display().to_string(),
            &b.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `img` binary: `IMG_BIN`, or the workspace's target directory (release preferred).
pub fn img_bin() -> PathBuf {
    if let Ok(p) = std::env::var("IMG_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("img");
        if p.exists() {
            return p;
        }
    }
    panic!("the img binary is not built: run `cargo build --release -p img-cli` first (or set IMG_BIN)");
}

/// Runs `img` with `args`.
pub fn img(args: &[&str]) -> Output {
    Command::new(img_bin())
        .args(args)
        .output()
        .expect("cannot run img")
}

/// Runs `img` and asserts success, returning stdout.
pub fn img_ok(args: &[&str]) -> String {
    let out = img(args);
    assert!(
        out.status.success(),
        "img {args:?} failed ({:?}): {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deterministic byte pattern for a write: byte `i` of a write at `offset` tagged `seed`.
pub fn pattern(seed: u8, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(2654435761) ^ (seed as u64 * 0x9e37_79b9);
            (x >> 13) as u8 | 1
        })
        .collect()
}
