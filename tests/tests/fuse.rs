//! `img mount` / `img unmount`: the FUSE export, checked with real components: ext4
//! filesystems made by mkfs.ext4 and filled by debugfs, images converted by qemu-img, the
//! exported file loop-mounted by the kernel, and qemu-img check/map/convert afterwards.
//! Needs root, /dev/fuse and loop devices, e2fsprogs and fuse3 (scripts/test.sh installs them).

mod common;

use common::{img, img_ok, pattern, qemu_img, qemu_io, run};
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Runs a tool and asserts success, returning stdout.
fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs an unmount tool, retrying while the mount is busy: another test's child process may
/// hold a copy of one of our descriptors for an instant between its fork and exec.
fn unmount_with(cmd: &str, args: &[&str]) {
    for _ in 0..40 {
        let out = run(cmd, args);
        if out.status.success() {
            return;
        }
        if !String::from_utf8_lossy(&out.stderr).contains("busy") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ok(cmd, args);
}

/// Whether something is mounted at `path`.
fn is_mounted(path: &Path) -> bool {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    table
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap()))
}

/// An `img mount` export; unmounted on drop if the test did not unmount it.
struct Mounted {
    mountpoint: PathBuf,
    /// The exported file: the mount point itself, or the file inside the directory.
    file: PathBuf,
}

impl Mounted {
    fn new(args: &[&str], mountpoint: &Path) -> Mounted {
        let mut all = vec!["mount"];
        all.extend_from_slice(args);
        all.push(s(mountpoint));
        img_ok(&all);
        assert!(
            is_mounted(mountpoint),
            "img mount returned before the mount was live"
        );
        Mounted {
            mountpoint: mountpoint.to_path_buf(),
            file: mountpoint.to_path_buf(),
        }
    }

    fn unmount(self) {
        img_ok(&["unmount", s(&self.mountpoint)]);
        assert!(!is_mounted(&self.mountpoint));
        std::mem::forget(self);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = run("umount", &["-l", s(&self.mountpoint)]);
        }
    }
}

/// A filesystem loop-mounted from a file; unmounted on drop.
struct LoopMount {
    dir: PathBuf,
}

impl LoopMount {
    fn new(file: &Path, dir: &Path, extra: &str) -> LoopMount {
        std::fs::create_dir_all(dir).unwrap();
        let opts = format!("loop{extra}");
        ok("mount", &["-o", &opts, s(file), s(dir)]);
        LoopMount {
            dir: dir.to_path_buf(),
        }
    }

    fn umount(self) {
        unmount_with("umount", &[s(&self.dir)]);
        std::mem::forget(self);
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", s(&self.dir)]);
    }
}

/// A deterministic blob of `len` bytes (not compressible into nothing, not all zeros).
fn blob(seed: u8, len: usize) -> Vec<u8> {
    pattern(seed, 0, len)
}

/// A raw 64 MiB ext4 image holding `hello.bin` (3 MiB).
fn ext4_raw(dir: &Path) -> (PathBuf, Vec<u8>) {
    let raw = dir.join("src.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    ok("mkfs.ext4", &["-q", "-F", s(&raw)]);
    let hello = blob(7, 3 * MIB as usize + 1234);
    let host = dir.join("hello.host");
    std::fs::write(&host, &hello).unwrap();
    ok(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} hello.bin", s(&host)),
            s(&raw),
        ],
    );
    (raw, hello)
}

/// Reads a file out of an ext4 image with debugfs (after converting it to raw).
fn debugfs_dump(image: &Path, fmt: &str, name: &str, dir: &Path) -> Vec<u8> {
    let tag = name.replace('/', "_");
    let raw = dir.join(format!("dump-{tag}.raw"));
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(image), s(&raw)]);
    let out = dir.join(format!("dump-{tag}.out"));
    ok(
        "debugfs",
        &["-R", &format!("dump {name} {}", s(&out)), s(&raw)],
    );
    std::fs::read(&out).unwrap_or_else(|e| panic!("debugfs did not dump {name}: {e}"))
}

fn qemu_check_clean(image: &Path, fmt: &str) {
    let out = run("qemu-img", &["check", "-f", fmt, s(image)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {}: {text}",
        image.display()
    );
}

/// The whole ext4 workflow on an image of `fmt`: mount it, loop-mount the exported file,
/// read the file debugfs wrote, write new files, unmount everything, and check the image
/// with qemu-img and debugfs.
fn ext4_roundtrip(fmt: &str, dir_mountpoint: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, hello) = ext4_raw(d);
    let image = d.join(format!("fs.{fmt}"));
    qemu_img(&["convert", "-f", "raw", "-O", fmt, s(&raw), s(&image)]);
    let mp = if dir_mountpoint {
        let m = d.join("mnt");
        std::fs::create_dir(&m).unwrap();
        m
    } else {
        let m = d.join("export");
        std::fs::write(&m, b"").unwrap();
        m
    };
    let mut m = Mounted::new(&["-f", fmt, s(&image)], &mp);
    if dir_mountpoint {
        // The image appears under its own file name, alone.
        let names: Vec<_> = std::fs::read_dir(&mp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [format!("fs.{fmt}")]);
        m.file = mp.join(format!("fs.{fmt}"));
    }
    assert_eq!(std::fs::metadata(&m.file).unwrap().len(), 64 * MIB);
    let fsdir = d.join("fs");
    let lm = LoopMount::new(&m.file, &fsdir, "");
    assert!(std::fs::read(fsdir.join("hello.bin")).unwrap() == hello);
    let new = blob(9, 4 * MIB as usize + 77);
    std::fs::write(fsdir.join("new.bin"), &new).unwrap();
    std::fs::create_dir(fsdir.join("sub")).unwrap();
    std::fs::write(fsdir.join("sub/small.txt"), b"written through img mount\n").unwrap();
    lm.umount();
    m.unmount();
    if fmt != "raw" {
        qemu_check_clean(&image, fmt);
    }
    assert!(debugfs_dump(&image, fmt, "new.bin", d) == new);
    assert_eq!(
        debugfs_dump(&image, fmt, "sub/small.txt", d),
        b"written through img mount\n"
    );
    assert!(debugfs_dump(&image, fmt, "hello.bin", d) == hello);
}

#[test]
fn ext4_on_qcow2_through_a_file_mountpoint() {
    ext4_roundtrip("qcow2", false);
}

#[test]
fn ext4_on_vmdk_through_a_directory_mountpoint() {
    ext4_roundtrip("vmdk", true);
}

#[test]
fn ext4_on_raw() {
    ext4_roundtrip("raw", false);
}

#[test]
fn ext4_on_a_qcow2_overlay_leaves_the_backing_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (raw, hello) = ext4_raw(d);
    let base = d.join("base.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    let overlay = d.join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    let base_before = std::fs::read(&base).unwrap();
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    // Cache options reach the image.
    let m = Mounted::new(&["-o", "cache=none,aio=threads", s(&overlay)], &mp);
    let fsdir = d.join("fs");
    let lm = LoopMount::new(&m.file, &fsdir, "");
    assert!(std::fs::read(fsdir.join("hello.bin")).unwrap() == hello);
    let new = blob(11, 2 * MIB as usize);
    std::fs::write(fsdir.join("new.bin"), &new).unwrap();
    lm.umount();
    m.unmount();
    qemu_check_clean(&overlay, "qcow2");
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the backing file changed"
    );
    assert!(debugfs_dump(&overlay, "qcow2", "new.bin", d) == new);
    assert!(debugfs_dump(&overlay, "qcow2", "hello.bin", d) == hello);
}

#[test]
fn read_only_mount_refuses_writes_and_leaves_the_image_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("ro.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "8M"]);
    qemu_io("qcow2", &image, &["write -P 0x5a 1M 1M".to_string()]);
    let before = std::fs::read(&image).unwrap();
    for args in [vec!["--readonly", "-f", "qcow2"], vec!["--image-opts"]] {
        let mp = d.join("export");
        std::fs::write(&mp, b"").unwrap();
        let spec = format!("driver=qcow2,read-only=on,file.filename={}", s(&image));
        let mut all = args.clone();
        all.push(if args[0] == "--image-opts" {
            &spec
        } else {
            s(&image)
        });
        let m = Mounted::new(&all, &mp);
        let err = OpenOptions::new().write(true).open(&m.file).unwrap_err();
        assert!(
            matches!(
                err.raw_os_error(),
                Some(libc::EROFS | libc::EPERM | libc::EACCES)
            ),
            "opening for writing: {err}"
        );
        let mut buf = vec![0u8; MIB as usize];
        std::fs::File::open(&m.file)
            .unwrap()
            .read_exact_at(&mut buf, MIB)
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0x5a));
        // A read-only mount still takes the shared lock: readers may come, writers not.
        let w = run("qemu-io", &["-f", "qcow2", "-c", "write 0 512", s(&image)]);
        assert!(
            !w.status.success(),
            "qemu-io wrote to an image exported read-only"
        );
        m.unmount();
        assert!(
            std::fs::read(&image).unwrap() == before,
            "the image changed"
        );
    }
}

#[test]
fn the_image_is_locked_while_mounted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("locked.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "8M"]);
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    let m = Mounted::new(&[s(&image)], &mp);
    let info = run("qemu-img", &["info", s(&image)]);
    assert!(!info.status.success());
    assert!(
        String::from_utf8_lossy(&info.stderr).contains("lock"),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    ok("qemu-img", &["info", "-U", s(&image)]);
    // A second export of the same image is refused too.
    let mp2 = d.join("export2");
    std::fs::write(&mp2, b"").unwrap();
    let again = img(&["mount", s(&image), s(&mp2)]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("lock"));
    assert!(!is_mounted(&mp2));
    m.unmount();
    ok("qemu-img", &["info", s(&image)]);
}

/// The data ranges lseek(SEEK_DATA/SEEK_HOLE) reports for a file.
fn seek_data_ranges(file: &std::fs::File, size: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0i64;
    while (pos as u64) < size {
        // SAFETY: lseek on a valid descriptor.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENXIO),
                "SEEK_DATA at {pos}: {e}"
            );
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(hole > data, "SEEK_HOLE at {data} returned {hole}");
        out.push((data as u64, hole as u64));
        pos = hole;
    }
    out
}

/// The data ranges of `qemu-img map --output=json`, merged.
fn qemu_map_data(image: &Path, fmt: &str) -> Vec<(u64, u64)> {
    let text = qemu_img(&["map", "-f", fmt, "--output=json", s(image)]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().unwrap() {
        if !e["data"].as_bool().unwrap() {
            continue;
        }
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

#[test]
fn seek_data_and_hole_follow_the_qcow2_allocation_through_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "32M"]);
    qemu_io("qcow2", &base, &["write -P 1 4M 1M".into()]);
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    qemu_io(
        "qcow2",
        &top,
        &[
            "write -P 2 1M 64k".into(),
            "write -P 3 4608k 64k".into(),
            "write -z 4M 64k".into(),
            "write -P 4 20M 3M".into(),
            "write -P 5 32704k 64k".into(),
        ],
    );
    let expected = qemu_map_data(&top, "qcow2");
    assert!(expected.len() >= 3, "{expected:?}");
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    let m = Mounted::new(&["-f", "qcow2", s(&top)], &mp);
    let f = std::fs::File::open(&m.file).unwrap();
    assert_eq!(seek_data_ranges(&f, 32 * MIB), expected);
    // qemu-img's own probing of the exported raw file (SEEK_DATA/SEEK_HOLE) sees the same.
    assert_eq!(qemu_map_data(&m.file, "raw"), expected);
    // `cp --sparse=always` keeps the holes and the data.
    let copy = d.join("copy.raw");
    ok("cp", &["--sparse=always", s(&m.file), s(&copy)]);
    let exported = std::fs::read(&m.file).unwrap();
    assert!(std::fs::read(&copy).unwrap() == exported);
    let data_bytes: u64 = expected.iter().map(|(a, b)| b - a).sum();
    let copy_alloc = std::fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        copy_alloc <= data_bytes + MIB,
        "the copy allocates {copy_alloc} bytes for {data_bytes} bytes of data"
    );
    drop(f);
    m.unmount();
    // qemu-img sees the same content through the export as in the image.
    let via_qemu = d.join("via-qemu.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&top), s(&via_qemu)]);
    assert!(std::fs::read(&via_qemu).unwrap() == exported);
}

#[test]
fn punched_holes_and_zeroed_ranges_show_in_qemu_img_map() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("punch.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "16M"]);
    qemu_io("qcow2", &image, &["write -P 0x33 0 8M".into()]);
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    let m = Mounted::new(&["-f", "qcow2", s(&image)], &mp);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.file)
        .unwrap();
    let fallocate = |mode: i32, off: u64, len: u64| {
        // SAFETY: fallocate on a valid descriptor.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    fallocate(
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        MIB,
        MIB,
    )
    .unwrap();
    fallocate(libc::FALLOC_FL_ZERO_RANGE, 3 * MIB, 512 * 1024).unwrap();
    // Unaligned punches zero their partial clusters.
    fallocate(
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        5 * MIB + 100,
        1000,
    )
    .unwrap();
    // Zeroing past the end would grow the file; plain allocation is not supported.
    let e = fallocate(libc::FALLOC_FL_ZERO_RANGE, 16 * MIB - 512, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EFBIG), "{e}");
    let e = fallocate(0, 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}");
    drop(f);
    m.unmount();
    qemu_check_clean(&image, "qcow2");
    let map = qemu_img(&["map", "-f", "qcow2", "--output=json", s(&image)]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let at = |off: u64| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                let st = e["start"].as_u64().unwrap();
                st <= off && off < st + e["length"].as_u64().unwrap()
            })
            .cloned()
            .unwrap()
    };
    let hole = at(MIB);
    assert_eq!(hole["data"], false, "{map}");
    assert_eq!(hole["zero"], true, "{map}");
    assert!(hole["start"].as_u64().unwrap() <= MIB);
    assert!(hole["start"].as_u64().unwrap() + hole["length"].as_u64().unwrap() >= 2 * MIB);
    assert_eq!(at(3 * MIB)["zero"], true, "{map}");
    assert_eq!(at(0)["data"], true, "{map}");
    // The content is the model's.
    let mut model = vec![0u8; 16 * MIB as usize];
    model[..8 * MIB as usize].fill(0x33);
    model[MIB as usize..2 * MIB as usize].fill(0);
    model[3 * MIB as usize..3 * MIB as usize + 512 * 1024].fill(0);
    model[5 * MIB as usize + 100..5 * MIB as usize + 1100].fill(0);
    let out = d.join("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&image), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == model);
}

#[test]
fn unaligned_partial_and_out_of_range_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("odd.qcow2");
    let size = 3 * MIB + 512;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&image),
        &size.to_string(),
    ]);
    let mut model = vec![0u8; size as usize];
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    let m = Mounted::new(&["-f", "qcow2", s(&image)], &mp);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&m.file)
        .unwrap();
    // Small writes across cluster boundaries, at odd offsets.
    for (seed, &(off, len)) in (1u8..).zip(&[
        (4095u64, 3usize),
        (1, 1),
        (65_530, 70_000),
        (MIB - 7, 14),
        (2 * MIB + 12_345, 100_001),
    ]) {
        let data = pattern(seed, off, len);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    // A write crossing the end is short; one at the end fails: the disk cannot grow.
    let tail = pattern(9, size - 100, 300);
    let n = f.write_at(&tail, size - 100).unwrap();
    assert_eq!(n, 100);
    model[(size - 100) as usize..].copy_from_slice(&tail[..100]);
    let e = f.write_at(b"x", size).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    // Reads: short at the end, empty past it.
    let mut buf = vec![0u8; 1000];
    assert_eq!(f.read_at(&mut buf, size - 10).unwrap(), 10);
    assert_eq!(&buf[..10], &model[(size - 10) as usize..]);
    assert_eq!(f.read_at(&mut buf, size + 4096).unwrap(), 0);
    // Odd-sized sequential reads see the model.
    let mut r = std::fs::File::open(&m.file).unwrap();
    r.seek(SeekFrom::Start(4093)).unwrap();
    let mut odd = vec![0u8; 777_777];
    r.read_exact(&mut odd).unwrap();
    assert!(odd == model[4093..4093 + 777_777]);
    // The size is fixed: truncation to another size is refused, to the same size is a no-op.
    let e = f.set_len(size + 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    let e = f.set_len(4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    f.set_len(size).unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    f.sync_all().unwrap();
    let whole = std::fs::read(&m.file).unwrap();
    assert!(whole == model);
    // mmap sees the same bytes.
    let len = 200_000usize;
    // SAFETY: a shared read-only mapping of an open file, unmapped below, read within len.
    let mapped = unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
        let v = std::slice::from_raw_parts(p as *const u8, len).to_vec();
        libc::munmap(p, len);
        v
    };
    assert!(mapped == model[..len]);
    drop((f, r));
    m.unmount();
    qemu_check_clean(&image, "qcow2");
    let out = d.join("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&image), s(&out)]);
    assert!(std::fs::read(&out).unwrap() == model);
}

#[test]
fn sigterm_to_the_daemon_flushes_and_unmounts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("term.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "16M"]);
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    // In the foreground the test knows the daemon's pid.
    let mut child = Command::new(common::img_bin())
        .args(["mount", "--foreground", "-f", "qcow2", s(&image), s(&mp)])
        .spawn()
        .unwrap();
    let mut waited = 0;
    while !is_mounted(&mp) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "img mount --foreground exited"
        );
        assert!(waited < 3000, "the mount did not appear");
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    let data = pattern(3, 0, 3 * MIB as usize);
    {
        let mut f = OpenOptions::new().write(true).open(&mp).unwrap();
        f.seek(SeekFrom::Start(MIB)).unwrap();
        f.write_all(&data).unwrap();
        // No fsync: the daemon flushes on its way out.
    }
    // SAFETY: kill with a valid pid of our child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!is_mounted(&mp));
    qemu_check_clean(&image, "qcow2");
    let out = d.join("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&image), s(&out)]);
    let content = std::fs::read(&out).unwrap();
    assert!(content[MIB as usize..4 * MIB as usize] == data[..]);
    assert!(content[..MIB as usize].iter().all(|&b| b == 0));
}

/// The pids of processes holding both /dev/fuse and `image` open (the export's daemon).
fn daemon_of(image: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let links: Vec<PathBuf> = fds
            .flatten()
            .filter_map(|f| std::fs::read_link(f.path()).ok())
            .collect();
        if links.iter().any(|l| l == Path::new("/dev/fuse")) && links.iter().any(|l| l == image) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether a process is gone (or a zombie).
fn gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(st) => st
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_none_or(|state| state == "Z"),
    }
}

#[test]
fn sigterm_to_a_background_daemon_flushes_and_unmounts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("bg.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "8M"]);
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    let m = Mounted::new(&["-f", "qcow2", s(&image)], &mp);
    let data = pattern(8, 0, 2 * MIB as usize + 3);
    OpenOptions::new()
        .write(true)
        .open(&m.file)
        .unwrap()
        .write_all_at(&data, 12_345)
        .unwrap();
    let image_abs = std::fs::canonicalize(&image).unwrap();
    let pids = daemon_of(&image_abs);
    assert_eq!(
        pids.len(),
        1,
        "daemons of {}: {pids:?}",
        image_abs.display()
    );
    // SAFETY: kill with the daemon's pid.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGTERM) }, 0);
    let mut waited = 0;
    while !gone(pids[0]) {
        assert!(waited < 3000, "the daemon did not exit after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    std::mem::forget(m);
    assert!(!is_mounted(&mp));
    qemu_check_clean(&image, "qcow2");
    let out = d.join("out.raw");
    qemu_img(&["convert", "-f", "qcow2", "-O", "raw", s(&image), s(&out)]);
    let content = std::fs::read(&out).unwrap();
    assert!(content[12_345..12_345 + data.len()] == data[..]);
}

#[test]
fn umount_from_outside_ends_the_daemon_and_closes_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = d.join("ext.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "4M"]);
    for tool in [["umount", ""], ["fusermount3", "-u"]] {
        let mp = d.join("mnt");
        std::fs::create_dir_all(&mp).unwrap();
        let m = Mounted::new(&["-o", "name=disk.raw", s(&image)], &mp);
        let file = mp.join("disk.raw");
        // No O_TRUNC: the disk's size is fixed.
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .write_all(&vec![0x77u8; 4 * MIB as usize])
            .unwrap();
        let mut args: Vec<&str> = tool[1..]
            .iter()
            .copied()
            .filter(|a| !a.is_empty())
            .collect();
        args.push(s(&mp));
        unmount_with(tool[0], &args);
        std::mem::forget(m);
        // The daemon releases its lock once it closed the image.
        let mut tries = 0;
        while !run("qemu-img", &["info", s(&image)]).status.success() {
            assert!(
                tries < 3000,
                "the daemon kept the image open after {}",
                tool[0]
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
            tries += 1;
        }
        qemu_check_clean(&image, "qcow2");
        qemu_io("qcow2", &image, &["read -P 0x77 0 4M".into()]);
        qemu_io("qcow2", &image, &["write -z 0 4M".into()]);
    }
}

#[test]
fn mount_and_unmount_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    let missing = d.join("missing.qcow2");
    let out = img(&["mount", s(&missing), s(&mp)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Could not open"), "{err}");
    assert!(!is_mounted(&mp));
    let image = d.join("e.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&image), "1M"]);
    let out = img(&["mount", s(&image), s(&d.join("nowhere"))]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"));
    let out = img(&["unmount", s(&mp)]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not mounted"));
    // `img mount -u` is the same as `img unmount`.
    let m = Mounted::new(&[s(&image)], &mp);
    let busy = std::fs::File::open(&m.file).unwrap();
    drop(busy);
    img_ok(&["mount", "-u", s(&mp)]);
    assert!(!is_mounted(&mp));
    std::mem::forget(m);
    ok("qemu-img", &["info", s(&image)]);
}
