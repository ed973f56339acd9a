//! Helpers shared by the integration tests: running qemu-img and img, making patterns.
#![allow(dead_code)]

pub mod bytes;
pub mod holder;
pub mod netlab;
pub mod recording;

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

// ---------------------------------------------------------------------------------------------
// Guest operations applied identically to an image under test and to a raw reference.
// ---------------------------------------------------------------------------------------------

/// One guest operation of a test scenario.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write `len` bytes at `off`: every byte `fill` when it is `Some`, else
    /// `pattern(seed, off, len)` (data that differs from byte to byte, so misplaced bytes
    /// inside a cluster are caught).
    Write {
        off: u64,
        len: u64,
        fill: Option<u8>,
        seed: u8,
    },
    /// Make the range read as zeros; `unmap` allows deallocation.
    Zero { off: u64, len: u64, unmap: bool },
    /// Discard the range: the whole clusters inside it read as zeros afterwards, partial
    /// clusters keep their data.
    Discard { off: u64, len: u64 },
}

impl Op {
    /// A write of `pattern(seed, ..)` data.
    pub fn write(off: u64, len: u64, seed: u8) -> Op {
        Op::Write {
            off,
            len,
            fill: None,
            seed,
        }
    }

    /// A write of one repeated byte.
    pub fn fill(off: u64, len: u64, byte: u8) -> Op {
        Op::Write {
            off,
            len,
            fill: Some(byte),
            seed: 0,
        }
    }

    /// The range the operation touches.
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Op::Write { off, len, .. } | Op::Zero { off, len, .. } | Op::Discard { off, len } => {
                (off, len)
            }
        }
    }

    /// The bytes a write stores (empty for other operations).
    pub fn data(&self) -> Vec<u8> {
        match *self {
            Op::Write {
                off,
                len,
                fill: Some(b),
                ..
            } => {
                let _ = off;
                vec![b; len as usize]
            }
            Op::Write {
                off,
                len,
                fill: None,
                seed,
            } => pattern(seed, off, len as usize),
            _ => Vec::new(),
        }
    }
}

/// The part of `[off, off + len)` that a discard drops: the whole clusters inside it, where
/// the last cluster of a disk whose size is not cluster aligned counts as whole when the range
/// reaches the end of the disk (as qemu does).
pub fn discarded_range(
    off: u64,
    len: u64,
    cluster_size: u64,
    disk_size: u64,
) -> Option<(u64, u64)> {
    let start = off.div_ceil(cluster_size) * cluster_size;
    let end = off + len;
    let end = if end == disk_size {
        disk_size
    } else {
        end / cluster_size * cluster_size
    };
    (end > start).then(|| (start, end - start))
}

/// Applies `op` to an image through the library API.
pub fn apply_to_image(image: &img_core::Image, op: &Op) {
    let r = match *op {
        Op::Write { off, .. } => image.write_at(&op.data(), off),
        Op::Zero { off, len, unmap } => image.write_zeroes(off, len, unmap),
        Op::Discard { off, len } => image.discard(off, len),
    };
    r.unwrap_or_else(|e| panic!("{op:?} on {}: {e}", image.file_name()));
}

/// Applies `op` to an in-memory model of a disk with the given cluster size.
pub fn apply_to_model(model: &mut [u8], op: &Op, cluster_size: u64) {
    let size = model.len() as u64;
    match *op {
        Op::Write { off, .. } => {
            let d = op.data();
            model[off as usize..off as usize + d.len()].copy_from_slice(&d);
        }
        Op::Zero { off, len, .. } => model[off as usize..(off + len) as usize].fill(0),
        Op::Discard { off, len } => {
            if let Some((s, l)) = discarded_range(off, len, cluster_size, size) {
                model[s as usize..(s + l) as usize].fill(0);
            }
        }
    }
}

/// Punches a hole into (or zeroes) `[off, off + len)` of a plain file.
pub fn zero_file_range(file: &std::fs::File, off: u64, len: u64) {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    if len == 0 {
        return;
    }
    // SAFETY: fallocate on a descriptor we own; on failure we fall back to writing zeros.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r != 0 {
        let zeros = vec![0u8; 1 << 20];
        let mut pos = off;
        while pos < off + len {
            let n = (off + len - pos).min(zeros.len() as u64);
            file.write_all_at(&zeros[..n as usize], pos).unwrap();
            pos += n;
        }
    }
}

/// Applies `op` to a raw reference file with plain file I/O (independent of img-core), with
/// the discard semantics of a disk of the given cluster size.
pub fn apply_to_raw_file(file: &std::fs::File, op: &Op, cluster_size: u64) {
    use std::os::unix::fs::FileExt;
    let size = file.metadata().unwrap().len();
    match *op {
        Op::Write { off, .. } => file.write_all_at(&op.data(), off).unwrap(),
        Op::Zero { off, len, .. } => zero_file_range(file, off, len),
        Op::Discard { off, len } => {
            if let Some((s, l)) = discarded_range(off, len, cluster_size, size) {
                zero_file_range(file, s, l);
            }
        }
    }
}

/// Creates a sparse raw reference file of `size` bytes.
pub fn create_raw_file(path: &Path, size: u64) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(size).unwrap();
    f
}

/// qemu-io commands performing `ops` on an image (`for_raw_reference`: the discards become
/// zero writes of the whole clusters they drop, because a raw file would punch the partial
/// clusters too). Writes of patterned data read their bytes from files made in `dir`.
pub fn qemu_io_commands(
    ops: &[Op],
    dir: &Path,
    cluster_size: u64,
    disk_size: u64,
    for_raw_reference: bool,
) -> Vec<String> {
    let mut cmds = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match *op {
            Op::Write {
                off,
                len,
                fill: Some(b),
                ..
            } => cmds.push(format!("write -q -P {b} {off} {len}")),
            Op::Write {
                off,
                len,
                fill: None,
                ..
            } => {
                let src = dir.join(format!("src-{i}.bin"));
                if !src.exists() {
                    std::fs::write(&src, op.data()).unwrap();
                }
                cmds.push(format!("write -q -s {} {off} {len}", src.display()));
            }
            Op::Zero { off, len, unmap } => {
                let u = if unmap { " -u" } else { "" };
                cmds.push(format!("write -q -z{u} {off} {len}"));
            }
            Op::Discard { off, len } => {
                if for_raw_reference {
                    if let Some((s, l)) = discarded_range(off, len, cluster_size, disk_size) {
                        cmds.push(format!("write -q -z {s} {l}"));
                    }
                } else {
                    cmds.push(format!("discard -q {off} {len}"));
                }
            }
        }
    }
    cmds
}

/// Runs qemu-io with many commands, splitting them over several invocations so that the
/// command line stays short.
pub fn qemu_io_many(fmt: &str, image: &Path, cmds: &[String]) {
    for chunk in cmds.chunks(200) {
        qemu_io(fmt, image, chunk);
    }
}

/// Chunk sizes for reading a disk: odd, so reads start and end everywhere inside clusters.
const READ_CHUNKS: [u64; 7] = [1, 511, 4097, 65_535, 300_007, 1_048_579, 3];

/// Finds the next data or hole boundary of a file with lseek (SEEK_DATA / SEEK_HOLE).
fn seek(file: &std::fs::File, offset: u64, whence: libc::c_int) -> Option<u64> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: lseek on a descriptor we own; it does not touch memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    (r >= 0).then_some(r as u64)
}

/// Reads `[start, end)` through `image` and from `reference` (None: zeros) in odd-sized
/// chunks and asserts they are equal.
fn compare_range(
    image: &img_core::Image,
    reference: Option<&std::fs::File>,
    start: u64,
    end: u64,
    chunk_index: &mut usize,
) {
    use std::os::unix::fs::FileExt;
    let mut pos = start;
    let mut a = Vec::new();
    let mut b = Vec::new();
    while pos < end {
        let n = READ_CHUNKS[*chunk_index % READ_CHUNKS.len()].min(end - pos);
        *chunk_index += 1;
        a.resize(n as usize, 0);
        b.resize(n as usize, 0);
        image
            .read_at(&mut a, pos)
            .unwrap_or_else(|e| panic!("read {n} bytes at {pos} of {}: {e}", image.file_name()));
        match reference {
            Some(f) => f.read_exact_at(&mut b, pos).unwrap(),
            None => b.fill(0),
        }
        if a != b {
            let i = (0..a.len()).find(|&i| a[i] != b[i]).unwrap();
            panic!(
                "{}: guest byte {} is {:#04x}, the reference has {:#04x}",
                image.file_name(),
                pos + i as u64,
                a[i],
                b[i]
            );
        }
        pos += n;
    }
}

/// Asserts that `image` reads exactly as the raw file `reference`, reading in odd-sized chunks.
///
/// Disks up to 256 MiB are read whole. On larger (sparse) disks, the reference's data regions
/// are read whole, and in its holes every range the image does not report as zero is read and
/// must be zeros; ranges the image reports as zero read as zeros by construction.
pub fn assert_image_matches_raw(image: &img_core::Image, reference: &Path) {
    let f = std::fs::File::open(reference).unwrap();
    let size = f.metadata().unwrap().len();
    assert_eq!(image.size(), size, "virtual size of {}", image.file_name());
    let mut chunk = 0usize;
    if size <= 256 << 20 {
        compare_range(image, Some(&f), 0, size, &mut chunk);
        return;
    }
    let mut pos = 0;
    while pos < size {
        let data = seek(&f, pos, libc::SEEK_DATA).unwrap_or(size);
        // The hole [pos, data).
        let mut p = pos;
        while p < data {
            let st = image.block_status(p, data - p).unwrap();
            assert!(st.len > 0 && st.len <= data - p);
            if !st.zero {
                compare_range(image, None, p, p + st.len, &mut chunk);
            }
            p += st.len;
        }
        if data >= size {
            break;
        }
        let hole = seek(&f, data, libc::SEEK_HOLE).unwrap_or(size).min(size);
        compare_range(image, Some(&f), data, hole, &mut chunk);
        pos = hole;
    }
}

/// Opens an image with img-core.
pub fn open(path: &Path, format: &str, read_only: bool) -> img_core::Image {
    img_core::open_image(
        path,
        &img_core::OpenOptions {
            format: Some(format.to_string()),
            read_only,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Runs `qemu-img check` and returns (exit code, combined output).
pub fn qemu_check(image: &Path) -> (Option<i32>, String) {
    let out = run(
        "qemu-img",
        &["check", "-f", "qcow2", &image.display().to_string()],
    );
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// What a run printed and returned, with qemu-img's program name replaced by ours, so that
/// runs of both tools compare equal when they behave alike.
#[derive(Debug, PartialEq, Eq)]
pub struct Run {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Exit code.
    pub code: Option<i32>,
}

impl Run {
    /// The run of `out`, names neutralised.
    pub fn from(out: Output) -> Self {
        Run {
            stdout: String::from_utf8_lossy(&out.stdout).replace("qemu-img", "img"),
            stderr: String::from_utf8_lossy(&out.stderr).replace("qemu-img", "img"),
            code: out.status.code(),
        }
    }
}

/// Runs `program` with `args` in `dir`.
pub fn run_in(program: &Path, dir: &Path, args: &[&str]) -> Run {
    Run::from(
        Command::new(program)
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display())),
    )
}
