//! Memory and file descriptor bounds (img-core/docs/bounds.md): hostile images with tables at
//! the caps the code enforces, and just past them. Each case runs the `img` binary and measures
//! the child's peak resident set (wait4's ru_maxrss) or runs it under a low RLIMIT_NOFILE /
//! RLIMIT_AS, and asserts that it stays inside the bound the document states, or that a case
//! past a cap fails with a clear error (an exit code, never a signal).
//!
//! hostile.rs covers headers that declare absurd sizes (2^32 entries); this file covers the
//! sizes right at each cap, where the memory really is spent.

mod common;

use common::bytes::{be32, be64, put32, put64};

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

// Caps, as the code states them (img-core/docs/bounds.md cites where).
/// `qcow2::header::MAX_L1_BYTES`.
const MAX_L1_BYTES: u64 = 32 * MIB;
/// `qcow2::header::MAX_REFTABLE_BYTES`.
const MAX_REFTABLE_BYTES: u64 = 8 * MIB;
/// `qcow2::header::MAX_SNAPSHOTS`.
const MAX_SNAPSHOTS: u32 = 65536;
/// `qcow2::snapshot::MAX_TABLE`.
const MAX_SNAPSHOT_TABLE: u64 = 64 * MIB;
/// `vmdk::sparse::MAX_GD_ENTRIES`.
const MAX_GD_ENTRIES: u64 = 32 * 1024 * 1024;
/// `vmdk::MAX_EXTENTS`.
const MAX_EXTENTS: usize = 255;
/// `vmdk::MAX_DIRECTORY_BYTES`.
const MAX_DIRECTORY_BYTES: u64 = 256 * MIB;
/// `chain::DEFAULT_MAX_DEPTH`.
const MAX_DEPTH: usize = 4096;
/// `qcow2::check::imrt::MAX_BYTES`.
const MAX_IMRT_BYTES: u64 = 2 << 30;

/// What a measured run of `img` did.
struct Run {
    args: Vec<String>,
    /// Exit code, or None when a signal ended it.
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
    /// Peak resident set in KiB.
    max_rss_kib: u64,
}

impl Run {
    fn peak(&self) -> u64 {
        self.max_rss_kib * KIB
    }

    fn ok(self) -> Run {
        assert_eq!(
            self.code,
            Some(0),
            "img {:?} failed: {}{}",
            self.args,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts a clean failure (exit code 1, no signal) whose message contains `wanted`.
    fn fails_with(self, wanted: &str) -> Run {
        assert_eq!(
            self.signal, None,
            "img {:?} died of a signal: {}",
            self.args, self.stderr
        );
        assert_eq!(
            self.code,
            Some(1),
            "img {:?} did not fail cleanly: {}{}",
            self.args,
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.contains(wanted),
            "img {:?}: expected {wanted:?} in: {}",
            self.args,
            self.stderr
        );
        assert!(
            !self.stderr.contains("panicked"),
            "img {:?} panicked: {}",
            self.args,
            self.stderr
        );
        self
    }
}

/// Resource limits for the child.
#[derive(Clone, Copy, Default)]
struct Limits {
    /// RLIMIT_AS in bytes.
    address_space: Option<u64>,
    /// RLIMIT_NOFILE.
    files: Option<u64>,
}

const MEASURE_ENV: &str = "IMG_BOUNDS_MEASURE";

/// Runs `img args` under `limits` and measures its peak RSS.
///
/// The measuring parent is this test binary started afresh (see `measure_child`): a child's
/// ru_maxrss also counts the memory of the process it was forked from (Linux carries the old
/// address space's high-water mark across exec), so forking `img` from a test process that
/// holds large buffers would report their size, not img's.
fn run(args: &[&str], limits: Limits) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let file = |n: &str| dir.path().join(n);
    let spec = [
        args.join("\u{1f}"),
        format!("{}", limits.address_space.unwrap_or(0)),
        format!("{}", limits.files.unwrap_or(0)),
        s(&file("out")).to_string(),
        s(&file("err")).to_string(),
        s(&file("report")).to_string(),
    ]
    .join("\u{1e}");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "measure_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MEASURE_ENV, spec)
        .env("IMG_BIN", common::img_bin())
        .output()
        .unwrap();
    let report = std::fs::read_to_string(file("report")).unwrap_or_else(|_| {
        panic!(
            "the measuring child did not report: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let v: Vec<i64> = report
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    let read = |n: &str| String::from_utf8_lossy(&std::fs::read(file(n)).unwrap()).into_owned();
    Run {
        args: args.iter().map(|s| s.to_string()).collect(),
        code: (v[0] >= 0).then_some(v[0] as i32),
        signal: (v[1] >= 0).then_some(v[1] as i32),
        stdout: read("out"),
        stderr: read("err"),
        max_rss_kib: v[2] as u64,
    }
}

/// The measuring parent of `run`: forks img with the limits, waits for it with wait4 and
/// writes "exit-code signal max-rss-kib" to the report file.
#[test]
fn measure_child() {
    let Ok(spec) = std::env::var(MEASURE_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\u{1e}').collect();
    let args: Vec<&str> = parts[0].split('\u{1f}').collect();
    let address_space: u64 = parts[1].parse().unwrap();
    let files: u64 = parts[2].parse().unwrap();
    let mut cmd = Command::new(common::img_bin());
    cmd.args(&args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(parts[3]).unwrap())
        .stderr(std::fs::File::create(parts[4]).unwrap());
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let set = |resource, value: u64| {
                let l = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &l) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            if address_space > 0 {
                set(libc::RLIMIT_AS, address_space)?;
            }
            if files > 0 {
                set(libc::RLIMIT_NOFILE, files)?;
            }
            Ok(())
        });
    }
    // Reaped by the wait4 below, which std's wait cannot do: it discards the rusage.
    #[allow(clippy::zombie_processes)]
    let child = cmd.spawn().expect("cannot run img");
    let mut status = 0;
    // SAFETY: wait4 writes the status and the rusage we pass; the pid is our own child,
    // which std has not reaped (its wait is never called).
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        let pid = libc::wait4(child.id() as i32, &mut status, 0, &mut usage);
        assert_eq!(pid, child.id() as i32, "wait4 failed");
        usage
    };
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let signal = if libc::WIFSIGNALED(status) {
        libc::WTERMSIG(status)
    } else {
        -1
    };
    std::fs::write(parts[5], format!("{code} {signal} {}", usage.ru_maxrss)).unwrap();
}

/// Peak RSS of `img info` on a small image: what the binary itself costs, measured rather
/// than assumed so that the bounds below are about the tables, not the build profile.
fn baseline(dir: &Path) -> u64 {
    let p = dir.join("baseline.qcow2");
    common::img_ok(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    run(&["info", s(&p)], Limits::default()).ok().peak()
}

/// Slack over the tables' own bytes: allocator rounding, the header cluster, output.
const SLACK: u64 = 16 * MIB;

fn assert_peak_at_most(r: &Run, bound: u64, what: &str) {
    eprintln!(
        "{what}: img {:?}: peak RSS {} KiB (bound {} KiB)",
        r.args,
        r.max_rss_kib,
        bound / KIB
    );
    assert!(
        r.peak() <= bound,
        "{what}: img {:?} peaked at {} KiB, over the bound of {} KiB",
        r.args,
        r.max_rss_kib,
        bound / KIB
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Writes `bytes` at `offset` of the file `path`.
fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

fn set_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// qemu-img's verdict on an image: Ok(stdout) or Err(stderr).
fn qemu_info(path: &Path) -> Result<String, String> {
    let out = Command::new("qemu-img")
        .args(["info", s(path)])
        .output()
        .expect("qemu-img");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

// ---------------------------------------------------------------------------------------------
// qcow2 tables
// ---------------------------------------------------------------------------------------------

#[test]
fn l1_table_at_the_cap_and_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    // 512-byte clusters map 32 KiB per L2 table: 128 GiB needs 4 Mi L1 entries, 32 MiB.
    let p = dir.path().join("l1.qcow2");
    common::img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        s(&p),
        "128G",
    ]);
    let header = std::fs::read(&p).unwrap()[..104].to_vec();
    assert_eq!(be32(&header, 36) as u64 * 8, MAX_L1_BYTES);
    assert!(qemu_info(&p).is_ok(), "qemu-img opens the image at the cap");
    // Opening holds the table (read in pieces); check reads it whole, then decodes it.
    for (cmd, bound) in [
        ("info", base + MAX_L1_BYTES + SLACK),
        ("map", base + MAX_L1_BYTES + SLACK),
        ("check", base + 2 * MAX_L1_BYTES + SLACK),
    ] {
        let r = run(&[cmd, s(&p)], Limits::default()).ok();
        assert_peak_at_most(&r, bound, "L1 at the cap");
    }

    // One entry more: refused before anything is read, as qemu refuses it.
    let mut h = header.clone();
    put32(&mut h, 36, (MAX_L1_BYTES / 8 + 1) as u32);
    patch(&p, 0, &h);
    let qemu = qemu_info(&p).unwrap_err();
    assert!(qemu.contains("Active L1 table too large"), "{qemu}");
    for cmd in ["info", "map", "check"] {
        let r = run(&[cmd, s(&p)], Limits::default());
        let r = if cmd == "check" {
            // check reports an image it cannot open as qemu-img check does.
            assert_eq!(r.signal, None, "{}", r.stderr);
            assert!(
                r.stderr.contains("Active L1 table too large"),
                "{}",
                r.stderr
            );
            r
        } else {
            r.fails_with("Active L1 table too large")
        };
        assert_peak_at_most(&r, base + SLACK, "L1 past the cap");
    }
}

/// A 64 MiB qcow2 image with 64 KiB clusters and a little data.
fn small_qcow2(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    common::img_ok(&["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    common::qemu_io("qcow2", &p, &["write -P 7 0 1M".to_string()]);
    p
}

#[test]
fn refcount_table_at_the_cap_and_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    let p = small_qcow2(dir.path(), "rt.qcow2");
    let bytes = std::fs::read(&p).unwrap();
    let cs = 1u64 << be32(&bytes, 20);
    let old = be64(&bytes, 48) as usize;
    // Move the refcount table to the end of the file and declare it 8 MiB long: its first
    // cluster is the old table, the rest (a hole) reads as zeros.
    let at = (bytes.len() as u64).div_ceil(cs) * cs;
    patch(&p, at, &bytes[old..old + cs as usize]);
    set_len(&p, at + MAX_REFTABLE_BYTES);
    let mut h = bytes[..104].to_vec();
    put64(&mut h, 48, at);
    put32(&mut h, 56, (MAX_REFTABLE_BYTES / cs) as u32);
    patch(&p, 0, &h);
    assert!(qemu_info(&p).is_ok(), "qemu-img opens the image at the cap");
    let r = run(&["info", s(&p)], Limits::default()).ok();
    assert_peak_at_most(
        &r,
        base + MAX_REFTABLE_BYTES + SLACK,
        "refcount table at the cap",
    );
    // map and check: twice the table (check reads it whole before decoding it).
    let bound = base + 2 * MAX_REFTABLE_BYTES + SLACK;
    let r = run(&["map", s(&p)], Limits::default()).ok();
    assert_peak_at_most(&r, bound, "refcount table at the cap");
    let r = run(&["check", s(&p)], Limits::default());
    assert_eq!(r.signal, None, "{}", r.stderr);
    assert_peak_at_most(&r, bound, "refcount table at the cap");

    // One cluster more.
    set_len(&p, at + MAX_REFTABLE_BYTES + cs);
    put32(&mut h, 56, (MAX_REFTABLE_BYTES / cs + 1) as u32);
    patch(&p, 0, &h);
    let qemu = qemu_info(&p).unwrap_err();
    assert!(qemu.contains("Reference count table too large"), "{qemu}");
    let r = run(&["info", s(&p)], Limits::default()).fails_with("Reference count table too large");
    assert_peak_at_most(&r, base + SLACK, "refcount table past the cap");
}

/// Writes a snapshot table of `count` entries, each with `extra` bytes of extra data and a
/// 5-byte id and 3-byte name, after the end of the image, and points the header at it.
/// Returns the table's size.
fn write_snapshot_table(p: &Path, count: u32, extra: u32) -> u64 {
    let bytes = std::fs::read(p).unwrap();
    let cs = 1u64 << be32(&bytes, 20);
    let disk = be64(&bytes, 24);
    let entry_len = (40 + extra as usize + 8).div_ceil(8) * 8;
    let mut entry = vec![0u8; entry_len];
    // No L1 table of its own (info and snapshot -l never read one).
    put32(&mut entry, 8, 0);
    put32(&mut entry, 12, 5 << 16 | 3);
    put32(&mut entry, 36, extra);
    put64(&mut entry, 40 + 8, disk);
    let mut table = Vec::with_capacity(entry_len * count as usize);
    for i in 0..count {
        let strings = 40 + extra as usize;
        entry[strings..strings + 8].copy_from_slice(format!("{:05}snp", i % 100_000).as_bytes());
        table.extend_from_slice(&entry);
    }
    let at = (bytes.len() as u64).div_ceil(cs) * cs;
    patch(p, at, &table);
    let mut h = bytes[..104].to_vec();
    put32(&mut h, 60, count);
    put64(&mut h, 64, at);
    patch(p, 0, &h);
    table.len() as u64
}

#[test]
fn snapshot_table_at_the_caps_and_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    // 65536 snapshots of 1024 bytes each: both caps reached exactly.
    let p = small_qcow2(dir.path(), "sn.qcow2");
    let size = write_snapshot_table(&p, MAX_SNAPSHOTS, 1024 - 48);
    assert_eq!(size, MAX_SNAPSHOT_TABLE);
    let qemu = qemu_info(&p).expect("qemu-img opens the image at the caps");
    let r = run(&["info", s(&p)], Limits::default()).ok();
    assert_eq!(r.stdout.lines().count(), qemu.lines().count());
    // The table is read entry by entry; what stays is the parsed entries: the table's bytes
    // and some bookkeeping per entry (256 bytes allowed).
    let bound = base + MAX_SNAPSHOT_TABLE + MAX_SNAPSHOTS as u64 * 256 + SLACK;
    assert_peak_at_most(&r, bound, "65536 snapshots, 64 MiB table");
    let r = run(&["snapshot", "-l", s(&p)], Limits::default()).ok();
    assert_peak_at_most(&r, bound, "65536 snapshots, 64 MiB table");

    // Eight bytes more per entry: the table passes 64 MiB before its last entries.
    let p = small_qcow2(dir.path(), "sn-big.qcow2");
    write_snapshot_table(&p, MAX_SNAPSHOTS, 1024 - 40);
    let qemu = qemu_info(&p).unwrap_err();
    assert!(qemu.contains("Snapshot table is too big"), "{qemu}");
    let r = run(&["info", s(&p)], Limits::default()).fails_with("Snapshot table is too big");
    assert_peak_at_most(&r, bound, "snapshot table past the cap");

    // Extra data past 1024 bytes in one entry.
    let p = small_qcow2(dir.path(), "sn-extra.qcow2");
    write_snapshot_table(&p, 1, 1025);
    let qemu = qemu_info(&p).unwrap_err();
    assert!(qemu.contains("Too much extra metadata"), "{qemu}");
    run(&["info", s(&p)], Limits::default())
        .fails_with("Too much extra metadata in snapshot table entry 0");
}

#[test]
fn cache_options_reserve_but_do_not_spend_memory() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    let p = small_qcow2(dir.path(), "cache.qcow2");
    let opts = |extra: &str| format!("driver=qcow2,file.filename={},{extra}", s(&p));
    // A 1 GiB refcount cache on a 64 MiB image is reserved address space, touched only as
    // refcount blocks are loaded; the L2 cache is cut to what maps the disk.
    for args in [
        vec!["info", "--image-opts"],
        vec!["map", "--image-opts"],
        vec!["convert", "-O", "raw", "--image-opts"],
    ] {
        let spec = opts("l2-cache-size=1G,refcount-cache-size=1G");
        let target = dir.path().join("cache.raw");
        let mut a = args.clone();
        a.push(&spec);
        if args[0] == "convert" {
            a.push(s(&target));
        }
        let r = run(&a, Limits::default()).ok();
        assert_peak_at_most(&r, base + 4 * MIB + SLACK, "1 GiB cache options");
    }
    // Under an address-space limit the reservation fails, with qemu's message.
    let spec = opts("refcount-cache-size=4G");
    run(
        &["info", "--image-opts", &spec],
        Limits {
            address_space: Some(2 << 30),
            ..Default::default()
        },
    )
    .fails_with("Could not allocate metadata caches");
    // More entries than qemu's int holds.
    let spec = opts("refcount-cache-size=1P");
    run(&["info", "--image-opts", &spec], Limits::default())
        .fails_with("Refcount cache size too big");
}

#[test]
fn check_memory_follows_the_file_size_up_to_its_cap() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    // 512-byte clusters, 64-bit refcounts: 8 bytes of recount per 512 bytes of file.
    let make = |name: &str, file_len: u64| {
        let p = dir.path().join(name);
        common::img_ok(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=64",
            s(&p),
            "64M",
        ]);
        set_len(&p, file_len);
        p
    };
    // A 4 GiB (sparse) file: 8 Mi clusters, a 64 MiB in-memory refcount table.
    let p = make("check4g.qcow2", 4 << 30);
    let imrt = (4u64 << 30) / 512 * 8;
    let r = run(&["check", s(&p)], Limits::default());
    assert_eq!(r.signal, None, "{}", r.stderr);
    assert!(r.stdout.contains("No errors"), "{}{}", r.stdout, r.stderr);
    assert_peak_at_most(&r, base + imrt + SLACK, "check of a 4 GiB file");

    // A file whose recount would need more than 2 GiB: refused without allocating it.
    let len = MAX_IMRT_BYTES / 8 * 512 + 512 * 64;
    let p = make("check-huge.qcow2", len);
    let r = run(&["check", s(&p)], Limits::default());
    assert_eq!(r.signal, None, "{}", r.stderr);
    assert_ne!(r.code, Some(0), "{}", r.stdout);
    assert!(
        r.stderr.contains("Cannot allocate memory") || r.stdout.contains("Cannot allocate memory"),
        "{}{}",
        r.stdout,
        r.stderr
    );
    assert_peak_at_most(&r, base + SLACK, "check of a file past the cap");
}

// ---------------------------------------------------------------------------------------------
// VMDK
// ---------------------------------------------------------------------------------------------

/// A monolithic sparse VMDK (made by img create) whose header is rewritten to hold a grain
/// directory of `gd_entries` entries (512 tables of 64 KiB grains each) after the end of the
/// file, in a hole that reads as zeros, with no redundant copy.
fn vmdk_with_directory(p: &Path, gd_entries: u64) {
    let _ = std::fs::remove_file(p);
    common::img_ok(&["create", "-q", "-f", "vmdk", s(p), "1G"]);
    let b = std::fs::read(p).unwrap();
    let le32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let le64 = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    assert_eq!(
        (le64(20), le32(44)),
        (128, 512),
        "64 KiB grains, 512 per table"
    );
    let gd_sector = (b.len() as u64).div_ceil(512);
    let mut h = b[..512].to_vec();
    // Flags without the redundant directory.
    h[8..12].copy_from_slice(&(le32(8) & !2).to_le_bytes());
    h[12..20].copy_from_slice(&(gd_entries * 512 * 128).to_le_bytes());
    h[56..64].copy_from_slice(&gd_sector.to_le_bytes());
    patch(p, 0, &h);
    set_len(p, gd_sector * 512 + gd_entries * 4);
}

#[test]
fn vmdk_grain_directory_at_the_cap_and_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    let p = dir.path().join("gd.vmdk");
    let gd_bytes = MAX_GD_ENTRIES * 4;
    vmdk_with_directory(&p, MAX_GD_ENTRIES);
    assert!(qemu_info(&p).is_ok(), "qemu-img opens the image at the cap");
    // The directory is read in pieces into a table of its size.
    let r = run(&["info", s(&p)], Limits::default()).ok();
    assert_peak_at_most(&r, base + gd_bytes + SLACK, "VMDK GD at the cap");

    // One directory entry more.
    vmdk_with_directory(&p, MAX_GD_ENTRIES + 1);
    let qemu = qemu_info(&p).unwrap_err();
    assert!(qemu.contains("L1 size too big"), "{qemu}");
    let r = run(&["info", s(&p)], Limits::default()).fails_with("L1 size too big");
    assert_peak_at_most(&r, base + SLACK, "VMDK GD past the cap");
}

#[test]
fn vmdk_grain_directories_of_all_extents_share_one_budget() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    // One sparse extent file with a 2 MiB grain directory (a hole), named by many extents:
    // each extent holds its own copy of the directory.
    let entries = 512 * 1024;
    let per_extent = entries * 4;
    vmdk_with_directory(&dir.path().join("ext.vmdk"), entries);
    let descriptor = |n: u64| {
        let mut d = String::from(
            "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
             createType=\"twoGbMaxExtentSparse\"\n\n# Extent description\n",
        );
        for _ in 0..n {
            d.push_str("RW 2097152 SPARSE \"ext.vmdk\"\n");
        }
        d
    };
    let at = dir.path().join("at.vmdk");
    let fit = MAX_DIRECTORY_BYTES / per_extent;
    std::fs::write(&at, descriptor(fit)).unwrap();
    let r = run(&["info", s(&at)], Limits::default()).ok();
    assert_peak_at_most(
        &r,
        base + MAX_DIRECTORY_BYTES + SLACK,
        "VMDK directories at the budget",
    );
    // 255 extents would hold 510 MiB: refused once the budget is spent.
    let over = dir.path().join("over.vmdk");
    std::fs::write(&over, descriptor(MAX_EXTENTS as u64)).unwrap();
    let r = run(&["info", s(&over)], Limits::default())
        .fails_with("grain directories of the extents need more than 256 MiB");
    assert_peak_at_most(
        &r,
        base + MAX_DIRECTORY_BYTES + per_extent + SLACK,
        "VMDK directories past the budget",
    );
}

/// A descriptor of `files.len()` flat extents of 1 MiB each.
fn flat_descriptor(files: &[String]) -> String {
    let mut d = String::from(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n\
         createType=\"monolithicFlat\"\n\n# Extent description\n",
    );
    for f in files {
        d.push_str(&format!("RW 2048 FLAT \"{f}\" 0\n"));
    }
    d.push_str("\n# The Disk Data Base\n#DDB\n\nddb.virtualHWVersion = \"4\"\n");
    d
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn vmdk_extent_count_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for i in 0..=MAX_EXTENTS {
        let f = d.join(format!("e{i:03}.raw"));
        std::fs::write(&f, []).unwrap();
        set_len(&f, MIB);
    }
    let names: Vec<String> = (0..=MAX_EXTENTS).map(|i| format!("e{i:03}.raw")).collect();

    // 255 extents in 255 files: one descriptor per image plus one per extent file.
    let many = d.join("many.vmdk");
    std::fs::write(&many, flat_descriptor(&names[..MAX_EXTENTS])).unwrap();
    let before = open_fds();
    let image = common::open(&many, "vmdk", true);
    let held = open_fds() - before;
    eprintln!("255 extent files: {held} descriptors held");
    assert!(held <= 1 + MAX_EXTENTS, "{held} files open for 255 extents");
    assert_eq!(image.size(), MAX_EXTENTS as u64 * MIB);
    image.close().unwrap();
    assert_eq!(open_fds(), before, "files left open after close");
    // The binary under a descriptor limit that leaves no room for more than that (0-2 are
    // the standard streams).
    let limit = Limits {
        files: Some(3 + 1 + MAX_EXTENTS as u64 + 2),
        ..Default::default()
    };
    let r = run(&["info", s(&many)], limit).ok();
    assert!(r.stdout.contains("255 MiB"), "{}", r.stdout);
    // And one that is too low fails with an error, not a crash.
    run(
        &["info", s(&many)],
        Limits {
            files: Some(64),
            ..Default::default()
        },
    )
    .fails_with("Too many open files");

    // 255 extents naming one file share its descriptor.
    let same = d.join("same.vmdk");
    std::fs::write(&same, flat_descriptor(&vec![names[0].clone(); MAX_EXTENTS])).unwrap();
    let before = open_fds();
    let image = common::open(&same, "vmdk", true);
    let held = open_fds() - before;
    assert!(held <= 2, "{held} files open for 255 extents of one file");
    image.close().unwrap();
    run(
        &["info", s(&same)],
        Limits {
            files: Some(3 + 2 + 2),
            ..Default::default()
        },
    )
    .ok();

    // 256 extents: refused (qemu has no limit and opens them all).
    let over = d.join("over.vmdk");
    std::fs::write(&over, flat_descriptor(&names)).unwrap();
    run(&["info", s(&over)], Limits::default())
        .fails_with("more than 255 extent files are not supported");
    let over_same = d.join("over-same.vmdk");
    std::fs::write(
        &over_same,
        flat_descriptor(&vec![names[0].clone(); MAX_EXTENTS + 1]),
    )
    .unwrap();
    run(&["info", s(&over_same)], Limits::default())
        .fails_with("more than 255 extent files are not supported");
}

// ---------------------------------------------------------------------------------------------
// Backing chains
// ---------------------------------------------------------------------------------------------

/// Writes images c00000 .. c{top} (qcow2, 64 KiB clusters, 64 MiB), each backed by the one
/// below: one image made by img create, copied with the backing name rewritten.
fn chain(dir: &Path, top: usize) -> Vec<PathBuf> {
    let name = |i: usize| format!("c{i:05}.qcow2");
    let path = |i: usize| dir.join(name(i));
    common::img_ok(&["create", "-q", "-f", "qcow2", s(&path(0)), "64M"]);
    common::img_ok(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        &name(0),
        "-F",
        "qcow2",
        s(&path(1)),
        "64M",
    ]);
    let template = std::fs::read(path(1)).unwrap();
    let at = be64(&template, 8) as usize;
    assert_eq!(be32(&template, 16) as usize, name(0).len());
    for i in 2..=top {
        let mut b = template.clone();
        b[at..at + name(0).len()].copy_from_slice(name(i - 1).as_bytes());
        std::fs::write(path(i), b).unwrap();
    }
    (0..=top).map(path).collect()
}

#[test]
fn backing_chain_at_the_depth_cap_and_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    // MAX_DEPTH backing files below the top: the deepest chain followed.
    let images = chain(dir.path(), MAX_DEPTH + 1);
    let at_cap = &images[MAX_DEPTH];
    let files = (MAX_DEPTH + 1) as u64;
    // One descriptor per image and a few of the process's own.
    let limit = Limits {
        files: Some(files + 3 + 8),
        ..Default::default()
    };
    let r = run(&["map", "--output=json", s(at_cap)], limit).ok();
    assert!(
        r.stdout.contains(&format!("\"depth\": {MAX_DEPTH}")),
        "{}",
        r.stdout
    );
    let per_image = r.peak().saturating_sub(base) / files;
    eprintln!(
        "chain of {files} images: peak RSS {} KiB, {} KiB per image",
        r.max_rss_kib,
        per_image / KIB
    );
    // Per image of this chain: its L1 table (8 bytes) and refcount table (one 64 KiB
    // cluster), the driver's state; the cache reservations are not touched by reads.
    let per_image = 128 * KIB;
    assert_peak_at_most(&r, base + files * per_image, "chain at the depth cap");
    let target = dir.path().join("chain.raw");
    let r = run(&["convert", "-O", "raw", s(at_cap), s(&target)], limit).ok();
    assert_peak_at_most(
        &r,
        base + files * per_image + 64 * MIB,
        "chain at the depth cap",
    );

    // One image deeper.
    let r = run(
        &["info", "--backing-chain", s(&images[MAX_DEPTH + 1])],
        Limits::default(),
    )
    .fails_with("deeper than 4096 images");
    assert_peak_at_most(&r, base + files * per_image, "chain past the depth cap");

    // Out of descriptors: a clear error naming the file that could not be opened (qemu-img
    // aborts there).
    let r = run(
        &["map", s(at_cap)],
        Limits {
            files: Some(1024),
            ..Default::default()
        },
    )
    .fails_with("Too many open files");
    assert!(
        r.stderr
            .contains("Could not open backing file: Could not open '"),
        "{}",
        r.stderr
    );
}

/// A chain of images each at the L1 cap (32 MiB of L1 table apiece): the chain's tables
/// together are capped (`CHAIN_TABLE_BUDGET`, 1 GiB), so the open fails with a clear error
/// before the 33rd such image, at a peak near the budget, instead of holding 32 MiB per image
/// for as deep as the chain goes.
#[test]
fn backing_chain_tables_share_one_budget() {
    let dir = tempfile::tempdir().unwrap();
    let base = baseline(dir.path());
    let budget = img_core::chain::CHAIN_TABLE_BUDGET;
    let per_image = MAX_L1_BYTES;
    let depth = (budget / per_image) as usize + 8;
    let name = |i: usize| format!("big{i:03}.qcow2");
    for i in 0..depth {
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", "cluster_size=512"];
        let below = if i > 0 { name(i - 1) } else { String::new() };
        if i > 0 {
            args.extend(["-u", "-b", &below, "-F", "qcow2"]);
        }
        let path = dir.path().join(name(i));
        args.extend([s(&path), "128G"]);
        common::img_ok(&args);
    }
    let top = dir.path().join(name(depth - 1));
    let r = run(&["map", s(&top)], Limits::default())
        .fails_with("metadata tables need more than 1024 MiB");
    // Everything opened before the refusal is within the budget, plus the image refused.
    assert_peak_at_most(
        &r,
        base + budget + per_image + SLACK,
        "chain past the table budget",
    );
    // A chain within the budget opens.
    let within = dir.path().join(name((budget / per_image) as usize - 2));
    let r = run(&["map", "--output=json", s(&within)], Limits::default()).ok();
    assert!(r.stdout.contains("\"depth\""), "{}", r.stdout);
}
