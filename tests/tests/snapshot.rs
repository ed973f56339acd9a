//! Internal snapshots seen from the command line, side by side with qemu-img: `img snapshot`
//! listings, the snapshot list of `img info` (human, JSON, whole backing chains), copies of
//! snapshots by `img convert -l` (and `measure -l`), and the refusals and error messages of
//! all of them.
//!
//! Snapshots are made by qemu-img itself. Fields qemu-img cannot set (saved VM state, guest
//! clock, instruction count, old-style table entries) are written into its table by a small
//! editor here, and then qemu-img's listing of the edited image is the reference.
//!
//! Creating, applying and deleting snapshots are the core's part and are tested there; here
//! only what refuses before the core is reached.

mod common;

use common::holder::Holder;
use common::{img_bin, qemu_img, qemu_io, run};
use std::path::Path;
use std::process::{Command, Output};

/// Time zones the listings are compared in: the date column is local time.
fn time_zones() -> Vec<&'static str> {
    let mut zones = vec!["UTC"];
    // Zones with a fractional offset and with daylight saving, where the system has them.
    for z in ["Asia/Kolkata", "America/New_York"] {
        if Path::new("/usr/share/zoneinfo").join(z).exists() {
            zones.push(z);
        }
    }
    zones
}

/// One command line, run by qemu-img and img in time zone `tz`.
fn run_both(args: &[&str], tz: &str) -> (Output, Output) {
    let qemu = Command::new("qemu-img")
        .args(args)
        .env("TZ", tz)
        .output()
        .expect("cannot run qemu-img");
    let img = Command::new(img_bin())
        .args(args)
        .env("TZ", tz)
        .output()
        .expect("cannot run img");
    (qemu, img)
}

/// img's stderr in qemu-img's words (the program name differs).
fn as_qemu(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .replace("img: ", "qemu-img: ")
        .replace("img snapshot: ", "qemu-img snapshot: ")
        .replace("img convert: ", "qemu-img convert: ")
        .replace("Try 'img ", "Try 'qemu-img ")
}

/// Asserts that qemu-img and img exit alike, with the same stdout (byte for byte) and the
/// same messages; returns qemu-img's output.
fn same(args: &[&str], tz: &str) -> Output {
    let (qemu, img) = run_both(args, tz);
    assert_eq!(
        (
            qemu.status.code(),
            String::from_utf8_lossy(&qemu.stderr).into_owned()
        ),
        (img.status.code(), as_qemu(&img.stderr)),
        "exit code and messages of {args:?} (TZ={tz})"
    );
    assert!(
        qemu.stdout == img.stdout,
        "stdout of {args:?} (TZ={tz}):\nqemu-img:\n{}\nimg:\n{}",
        String::from_utf8_lossy(&qemu.stdout),
        String::from_utf8_lossy(&img.stdout)
    );
    qemu
}

/// [`same`], and qemu-img failed with `text` in its message.
fn same_failure(args: &[&str], text: &str) {
    let qemu = same(args, "UTC");
    let err = String::from_utf8_lossy(&qemu.stderr);
    assert!(
        !qemu.status.success() && err.contains(text),
        "qemu-img {args:?} was expected to fail with {text:?}: {err}"
    );
}

/// Every listing of `image` both tools have: `snapshot` (-l, the default, -U, -f,
/// --image-opts) and `info` (human, JSON, with and without --backing-chain), in every time
/// zone. Returns qemu-img's `snapshot -l` output.
fn assert_listings_match(image: &Path) -> String {
    let p = image.display().to_string();
    let opts = format!("driver=qcow2,file.filename={p}");
    let mut listing = String::new();
    for tz in time_zones() {
        let out = same(&["snapshot", "-l", &p], tz);
        assert!(out.status.success());
        listing = String::from_utf8_lossy(&out.stdout).into_owned();
        for args in [
            &["snapshot", &p][..],
            &["snapshot", "-U", "-l", &p],
            &["snapshot", "-f", "qcow2", "--list", &p],
            &["snapshot", "--image-opts", &opts],
            &["info", &p],
            &["info", "--output=json", &p],
            &["info", "--backing-chain", &p],
            &["info", "--backing-chain", "--output=json", &p],
        ] {
            assert!(same(args, tz).status.success(), "{args:?}");
        }
    }
    listing
}

/// A snapshot table entry, as the editor reads and writes it.
#[derive(Clone, Debug)]
struct Entry {
    l1_offset: u64,
    l1_size: u32,
    id: Vec<u8>,
    name: Vec<u8>,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    vm_state_size32: u32,
    extra: Vec<u8>,
}

impl Entry {
    /// Sets a big-endian u64 in the extra data (growing it if needed).
    fn set_extra(&mut self, at: usize, value: u64) {
        if self.extra.len() < at + 8 {
            self.extra.resize(at + 8, 0);
        }
        self.extra[at..at + 8].copy_from_slice(&value.to_be_bytes());
    }
}

fn be<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    b[at..at + N].try_into().unwrap()
}

/// The snapshot table of a qcow2 image: its offset, its entries and its length in bytes.
fn read_table(path: &Path) -> (u64, Vec<Entry>, u64) {
    let data = std::fs::read(path).unwrap();
    let count = u32::from_be_bytes(be(&data, 60));
    let start = u64::from_be_bytes(be(&data, 64));
    let mut pos = start as usize;
    let mut entries = Vec::new();
    for _ in 0..count {
        pos = pos.div_ceil(8) * 8;
        let h = &data[pos..pos + 40];
        let id_len = u16::from_be_bytes(be(h, 12)) as usize;
        let name_len = u16::from_be_bytes(be(h, 14)) as usize;
        let extra_len = u32::from_be_bytes(be(h, 36)) as usize;
        let mut p = pos + 40;
        let extra = data[p..p + extra_len].to_vec();
        p += extra_len;
        let id = data[p..p + id_len].to_vec();
        p += id_len;
        let name = data[p..p + name_len].to_vec();
        p += name_len;
        entries.push(Entry {
            l1_offset: u64::from_be_bytes(be(h, 0)),
            l1_size: u32::from_be_bytes(be(h, 8)),
            id,
            name,
            date_sec: u32::from_be_bytes(be(h, 16)),
            date_nsec: u32::from_be_bytes(be(h, 20)),
            vm_clock_nsec: u64::from_be_bytes(be(h, 24)),
            vm_state_size32: u32::from_be_bytes(be(h, 32)),
            extra,
        });
        pos = p;
    }
    (start, entries, pos as u64 - start)
}

/// Rewrites the snapshot table in place (it must not outgrow the cluster it is in).
fn write_table(path: &Path, entries: &[Entry]) {
    let (start, _, old_len) = read_table(path);
    let mut t = Vec::new();
    for e in entries {
        t.resize(t.len().div_ceil(8) * 8, 0);
        t.extend_from_slice(&e.l1_offset.to_be_bytes());
        t.extend_from_slice(&e.l1_size.to_be_bytes());
        t.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
        t.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        t.extend_from_slice(&e.date_sec.to_be_bytes());
        t.extend_from_slice(&e.date_nsec.to_be_bytes());
        t.extend_from_slice(&e.vm_clock_nsec.to_be_bytes());
        t.extend_from_slice(&e.vm_state_size32.to_be_bytes());
        t.extend_from_slice(&(e.extra.len() as u32).to_be_bytes());
        t.extend_from_slice(&e.extra);
        t.extend_from_slice(&e.id);
        t.extend_from_slice(&e.name);
    }
    assert!(
        start % 65536 + (t.len() as u64) <= 65536,
        "the edited table leaves its cluster"
    );
    t.resize(t.len().max(old_len as usize), 0);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &t, start).unwrap();
}

fn create(path: &Path, opts: &[&str], size: &str) {
    let p = path.display().to_string();
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[&p, size]);
    qemu_img(&args);
}

fn snap(path: &Path, name: &str) {
    qemu_img(&["snapshot", "-c", name, &path.display().to_string()]);
}

fn io(path: &Path, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    qemu_io("qcow2", path, &cmds);
}

#[test]
fn listings_of_snapshots_made_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    create(&a, &[], "64M");
    // Nothing at all is listed without snapshots, and no list appears in info.
    assert_eq!(assert_listings_match(&a), "");
    io(&a, &["write -P 1 0 1M"]);
    snap(&a, "first");
    io(&a, &["write -P 2 64k 64k"]);
    snap(&a, "second");
    // A name that is taken again, names wider than their column, a name with spaces and
    // one with characters of several bytes (columns are padded by bytes).
    snap(&a, "first");
    snap(
        &a,
        "a name much longer than the sixteen bytes of its column",
    );
    snap(&a, "with spaces");
    snap(&a, "é-ü-ß");
    snap(&a, "");
    let long = "n".repeat(300);
    // qemu-img cuts a name to 255 bytes.
    snap(&a, &long);
    let listing = assert_listings_match(&a);
    assert_eq!(listing.lines().count(), 2 + 8, "{listing}");
    assert!(listing.contains("é-ü-ß"));

    // Version 2 images, and more snapshots than one digit of ID.
    let v2 = dir.path().join("v2.qcow2");
    create(&v2, &["-o", "compat=0.10,cluster_size=4096"], "1M");
    for i in 0..12 {
        io(&v2, &[&format!("write -P {i} {} 4k", i * 4096)]);
        snap(&v2, &format!("s{i}"));
    }
    assert_eq!(assert_listings_match(&v2).lines().count(), 2 + 12);

    // A raw image has none: nothing is printed, and that is success.
    let r = dir.path().join("r.raw");
    qemu_img(&["create", "-q", "-f", "raw", &r.display().to_string(), "1M"]);
    for args in [
        &["snapshot", "-l", &r.display().to_string()][..],
        &["snapshot", "-f", "raw", &r.display().to_string()],
        &["info", "--output=json", &r.display().to_string()],
    ] {
        let out = same(args, "UTC");
        assert!(out.status.success());
    }
}

#[test]
fn info_lists_the_snapshots_of_every_image_of_a_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, &[], "4M");
    io(&base, &["write -P 1 0 1M"]);
    snap(&base, "base-1");
    snap(&base, "base-2");
    create(
        &mid,
        &["-b", &base.display().to_string(), "-F", "qcow2"],
        "4M",
    );
    create(
        &top,
        &["-b", &mid.display().to_string(), "-F", "qcow2"],
        "4M",
    );
    snap(&top, "top-1");
    // The middle image has none: its part of the chain shows no list.
    let t = top.display().to_string();
    for tz in time_zones() {
        for args in [
            &["info", "--backing-chain", &t][..],
            &["info", "--backing-chain", "--output=json", &t],
        ] {
            let out = same(args, tz);
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("base-2") && text.contains("top-1"), "{text}");
        }
    }
}

#[test]
fn fields_qemu_img_cannot_set_are_listed_as_qemu_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    create(&a, &[], "1M");
    io(&a, &["write -P 5 0 64k"]);
    for n in ["s1", "s2", "s3", "s4"] {
        snap(&a, n);
    }
    let (_, mut e, _) = read_table(&a);
    assert_eq!(e.len(), 4);
    // Saved VM state, a guest clock of hours, no instruction count, the epoch.
    e[0].set_extra(0, 0x1234_5678);
    e[0].vm_state_size32 = 0x1234_5678;
    e[0].vm_clock_nsec = 123_456_789_012_345;
    e[0].set_extra(16, u64::MAX);
    e[0].date_sec = 0;
    // Everything at its largest: sizes and counts qemu prints as signed.
    e[1].set_extra(0, u64::MAX);
    e[1].vm_clock_nsec = u64::MAX;
    e[1].set_extra(16, 1 << 63);
    e[1].date_sec = u32::MAX;
    e[1].date_nsec = 999_999_999;
    // A large VM state that only the extra data records (older readers see none).
    e[2].set_extra(0, 5 << 30);
    e[2].vm_state_size32 = 0;
    e[2].set_extra(16, 42);
    e[2].vm_clock_nsec = 59_999_999_999;
    // An entry without an instruction count (extra data of an older qemu).
    e[3].extra.truncate(16);
    e[3].date_sec = 1_700_000_000;
    write_table(&a, &e);
    let listing = assert_listings_match(&a);
    for text in [
        "291 MiB",
        "16 EiB",
        "5 GiB",
        "--",
        "-9223372036854775808",
        "0034:17:36.789",
    ] {
        assert!(listing.contains(text), "{text} in {listing}");
    }

    // Version 2 entries without any extra data: the VM state size is the 32-bit field.
    let v2 = dir.path().join("v2.qcow2");
    create(&v2, &["-o", "compat=0.10"], "1M");
    snap(&v2, "old");
    snap(&v2, "older");
    let (_, mut e, _) = read_table(&v2);
    for (i, entry) in e.iter_mut().enumerate() {
        entry.extra.clear();
        entry.vm_state_size32 = 12345 * (i as u32 + 1);
    }
    write_table(&v2, &e);
    let listing = assert_listings_match(&v2);
    assert!(listing.contains("12.1 KiB"), "{listing}");
}

/// An image whose snapshots see different disks: data rewritten, zeroed, discarded and
/// compressed between them, and the image grown and shrunk.
fn history(dir: &Path) -> std::path::PathBuf {
    let a = dir.join("h.qcow2");
    create(&a, &["-o", "cluster_size=65536"], "4M");
    io(&a, &["write -P 1 0 2M", "write -c -P 7 3M 64k"]);
    snap(&a, "one");
    io(
        &a,
        &[
            "write -P 2 64k 128k",
            "write -z 1M 64k",
            "discard 1536k 64k",
            "write -P 3 100000 5000",
        ],
    );
    snap(&a, "two");
    qemu_img(&["resize", "-q", &a.display().to_string(), "8M"]);
    io(&a, &["write -P 4 5M 512k", "write -c -P 8 4M 64k"]);
    snap(&a, "three");
    io(&a, &["write -P 9 0 8M"]);
    snap(&a, "one"); // a second "one", found only by its ID
    io(&a, &["write -P 10 0 4M"]);
    // Shrunk below what the later snapshots saw.
    qemu_img(&["resize", "-q", "--shrink", &a.display().to_string(), "6M"]);
    a
}

/// Converts with `args` (then the output name) by both tools and asserts the same outcome
/// and, when both wrote one, byte-identical raw outputs.
fn same_conversion(dir: &Path, args: &[&str]) -> bool {
    let q = dir.join("out.qemu").display().to_string();
    let i = dir.join("out.img").display().to_string();
    let _ = std::fs::remove_file(&q);
    let _ = std::fs::remove_file(&i);
    let mut qa: Vec<&str> = vec!["convert"];
    qa.extend_from_slice(args);
    let mut ia = qa.clone();
    qa.push(&q);
    ia.push(&i);
    let qemu = run("qemu-img", &qa);
    let img = Command::new(img_bin()).args(&ia).output().unwrap();
    assert_eq!(
        (
            qemu.status.code(),
            String::from_utf8_lossy(&qemu.stderr).into_owned()
        ),
        (img.status.code(), as_qemu(&img.stderr)),
        "convert {args:?}"
    );
    if !qemu.status.success() {
        return false;
    }
    let (qb, ib) = (std::fs::read(&q).unwrap(), std::fs::read(&i).unwrap());
    assert!(qb == ib, "convert {args:?}: outputs differ");
    true
}

#[test]
fn convert_copies_each_snapshot_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let a = history(dir.path());
    let p = a.display().to_string();
    let mut outputs = std::collections::HashSet::new();
    for sel in [
        "one",
        "1",
        "two",
        "2",
        "three",
        "3",
        "4",
        "snapshot.id=1",
        "snapshot.name=one",
        "snapshot.name=two",
        "snapshot.id=3,snapshot.name=three",
        "snapshot.id=4,snapshot.name=one",
    ] {
        assert!(
            same_conversion(dir.path(), &["-l", sel, "-O", "raw", &p]),
            "-l {sel}"
        );
        outputs.insert(std::fs::read(dir.path().join("out.img")).unwrap());
    }
    // Four different disks were copied (and each one is the image's present length).
    assert_eq!(outputs.len(), 4);
    assert!(outputs.iter().all(|o| o.len() == 6 << 20));
    // Into qcow2 too, with the same content.
    let q = dir.path().join("t.qemu.qcow2").display().to_string();
    let i = dir.path().join("t.img.qcow2").display().to_string();
    qemu_img(&["convert", "-l", "two", "-O", "qcow2", &p, &q]);
    common::img_ok(&["convert", "-l", "two", "-O", "qcow2", &p, &i]);
    common::assert_qemu_compare_identical(Path::new(&q), "qcow2", Path::new(&i), "qcow2");
    // Options that change how the source is opened do not change the snapshot.
    let opts = format!("driver=qcow2,file.filename={p}");
    assert!(same_conversion(
        dir.path(),
        &["-l", "three", "--image-opts", "-O", "raw", &opts]
    ));
    assert!(same_conversion(
        dir.path(),
        &["-U", "-f", "qcow2", "-l", "three", "-O", "raw", &p]
    ));
}

#[test]
fn a_snapshot_reads_through_the_backing_chain() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, &[], "4M");
    io(&base, &["write -P 1 0 2M"]);
    create(
        &top,
        &["-b", &base.display().to_string(), "-F", "qcow2"],
        "4M",
    );
    io(&top, &["write -P 2 1M 64k", "write -z 64k 64k"]);
    snap(&top, "s");
    io(&top, &["write -P 3 0 4M"]);
    io(&base, &["write -P 4 3M 64k"]);
    let t = top.display().to_string();
    assert!(same_conversion(dir.path(), &["-l", "s", "-O", "raw", &t]));
    let out = std::fs::read(dir.path().join("out.img")).unwrap();
    assert_eq!(out[0], 1, "from the backing file");
    assert_eq!(out[64 << 10], 0, "zeroed in the snapshot");
    assert_eq!(out[1 << 20], 2, "written before the snapshot");
    assert_eq!(out[3 << 20], 4, "the backing file as it is now");
    // measure -l counts what the snapshot reads, backing file included.
    same(&["measure", "-O", "qcow2", "-l", "s", &t], "UTC");
    let m = same(
        &["measure", "-O", "qcow2", "-l", "s", "--output=json", &t],
        "UTC",
    );
    assert!(m.status.success());
}

#[test]
fn snapshot_loading_errors_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let a = history(dir.path());
    let p = a.display().to_string();
    let r = dir.path().join("r.raw").display().to_string();
    qemu_img(&["create", "-q", "-f", "raw", &r, "1M"]);
    let none = dir.path().join("none.qcow2").display().to_string();
    let out = dir.path().join("o").display().to_string();
    for (args, text) in [
        (
            vec!["-l", "nope", "-O", "raw", &p],
            "Failed to load snapshot: Can't find snapshot",
        ),
        (
            vec!["-l", "snapshot.id=1,snapshot.name=two", "-O", "raw", &p],
            "Can't find snapshot",
        ),
        (
            vec!["-l", "snapshot.foo=1", "-O", "raw", &p],
            "Invalid parameter 'snapshot.foo'",
        ),
        (
            vec!["-l", "x", "-O", "raw", &r],
            "Block format 'raw' used by device '' does not support temporarily loading \
             internal snapshots",
        ),
        (
            vec!["-l", "one", "-f", "raw", "-O", "raw", &p],
            "does not support temporarily loading",
        ),
        (
            vec!["-l", "one", "-O", "raw", &p, &p],
            "No support for concatenating multiple snapshot",
        ),
        (vec!["-l", "one", "-O", "raw", &p, &none], "Could not open"),
        (vec!["-s", "one", "-O", "raw", &p], "invalid option -- 's'"),
        (
            vec!["-l", "nope", "-O", "qcow2", "-o", "foo=bar", &p],
            "Can't find snapshot",
        ),
    ] {
        let mut full = vec!["convert"];
        full.extend_from_slice(&args);
        full.push(&out);
        same_failure(&full, text);
    }
    for (sel, text) in [
        ("nope", "Failed to load snapshot: Can't find snapshot"),
        ("snapshot.bar=1", "Invalid parameter 'snapshot.bar'"),
    ] {
        same_failure(&["measure", "-O", "qcow2", "-l", sel, &p], text);
    }
    same_failure(
        &["measure", "-l", "x", &r],
        "does not support temporarily loading",
    );
}

#[test]
fn snapshot_l1_tables_where_qemu_reads_zeros_or_fails() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    create(&a, &[], "1M");
    io(&a, &["write -P 5 0 64k"]);
    snap(&a, "s1");
    snap(&a, "s2");
    let p = a.display().to_string();
    let (_, mut e, _) = read_table(&a);
    // Past the end of the file: the table reads as zeros, the disk as unallocated.
    e[1].l1_offset = 1 << 28;
    write_table(&a, &e);
    assert!(same_conversion(dir.path(), &["-l", "s2", "-O", "raw", &p]));
    assert!(std::fs::read(dir.path().join("out.img"))
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    same(&["measure", "-O", "qcow2", "-l", "s2", &p], "UTC");
    // Beyond what qemu's block layer reads at all.
    e[1].l1_offset = 0x7fff_ffff_fff0_0000;
    write_table(&a, &e);
    let mut args = vec!["-l", "s2", "-O", "raw", &p];
    assert!(!same_conversion(dir.path(), &args));
    args[1] = "s1";
    assert!(
        same_conversion(dir.path(), &args),
        "the other snapshot reads"
    );
    assert_listings_match(&a);
    // An unaligned table, and one too large: listed as qemu lists them, refused when used,
    // and the other snapshot still reads.
    for (offset, size) in [(0x10200, e[1].l1_size), (e[1].l1_offset, 1 << 30)] {
        let (_, mut e, _) = read_table(&a);
        e[1].l1_offset = offset;
        e[1].l1_size = size;
        write_table(&a, &e);
        assert_listings_match(&a);
        args[1] = "s2";
        assert!(!same_conversion(dir.path(), &args));
        args[1] = "s1";
        assert!(same_conversion(dir.path(), &args), "s1 beside a bad s2");
    }
}

#[test]
fn snapshot_command_refusals_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    create(&a, &[], "1M");
    snap(&a, "s");
    let p = a.display().to_string();
    let r = dir.path().join("r.raw").display().to_string();
    qemu_img(&["create", "-q", "-f", "raw", &r, "1M"]);
    let none = dir.path().join("none.qcow2").display().to_string();
    for (args, text) in [
        // A raw image has no snapshots (probed, with qemu's warning, or named).
        (
            vec!["-c", "x", &r],
            "Could not create snapshot 'x': Operation not supported",
        ),
        (
            vec!["-c", "x", "-f", "raw", &r],
            "Could not create snapshot 'x': Operation not supported",
        ),
        (
            vec!["-a", "x", &r],
            "Could not apply snapshot 'x': Block driver does not support snapshots",
        ),
        (
            vec!["-d", "x", "-f", "raw", &r],
            "Could not delete snapshot 'x': snapshot not found",
        ),
        // Nothing by that name (or ID).
        (
            vec!["-a", "nope", &p],
            "Could not apply snapshot 'nope': Failed to load snapshot: No such file or directory",
        ),
        (
            vec!["-d", "nope", &p],
            "Could not delete snapshot 'nope': snapshot not found",
        ),
        // -d takes names only.
        (
            vec!["-d", "1", &p],
            "Could not delete snapshot '1': snapshot not found",
        ),
        // The command line.
        (
            vec!["-l", "-c", "x", &p],
            "Cannot mix '-l', '-a', '-c', '-d'",
        ),
        (vec!["-c", "x", "-d", "x", &p], "Cannot mix"),
        (vec!["-l", "-l", &p], "Cannot mix"),
        (vec![&p, &p], "Expecting one image file name"),
        (vec![], "Expecting one image file name"),
        (vec!["-c"], "option requires an argument -- 'c'"),
        (vec!["-x", &p], "invalid option -- 'x'"),
        (
            vec!["-c", "x", "-U", &p],
            "force-share=on can only be used with read-only images",
        ),
        (
            vec!["--image-opts", "-f", "qcow2", &p],
            "--image-opts and --format are mutually exclusive",
        ),
        (vec!["-l", &none], "Could not open"),
        (vec!["-c", "x", &none], "Could not open"),
    ] {
        let mut full = vec!["snapshot"];
        full.extend_from_slice(&args);
        same_failure(&full, text);
    }
    // The table is as it was.
    assert_eq!(read_table(&a).1.len(), 1);
}

#[test]
fn a_missing_backing_file_stops_every_operation() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    create(&base, &[], "1M");
    create(
        &top,
        &["-b", &base.display().to_string(), "-F", "qcow2"],
        "1M",
    );
    snap(&top, "s");
    std::fs::remove_file(&base).unwrap();
    let t = top.display().to_string();
    for op in [&["-l"][..], &["-c", "x"], &["-a", "s"], &["-d", "s"]] {
        let mut args = vec!["snapshot"];
        args.extend_from_slice(op);
        args.push(&t);
        same_failure(&args, "Could not open backing file");
    }
    let out = dir.path().join("o.raw").display().to_string();
    same_failure(
        &["convert", "-l", "s", "-O", "raw", &t, &out],
        "Could not open backing file",
    );
    // info does not open the backing file, and lists the snapshot.
    assert!(same(&["info", &t], "UTC").status.success());
}

#[test]
fn an_image_another_process_writes_is_refused_as_qemu_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    create(&a, &[], "1M");
    snap(&a, "s");
    let p = a.display().to_string();
    let shared_write = "Failed to get shared \"write\" lock";
    let write = "Failed to get \"write\" lock";
    {
        let _writer = Holder::qemu_io("qcow2", &a, &[]);
        same_failure(&["snapshot", "-l", &p], shared_write);
        same_failure(&["snapshot", &p], shared_write);
        assert!(same(&["snapshot", "-l", "-U", &p], "UTC").status.success());
        for op in [&["-c", "x"][..], &["-a", "s"], &["-d", "s"]] {
            let mut args = vec!["snapshot"];
            args.extend_from_slice(op);
            args.push(&p);
            same_failure(&args, write);
        }
        let out = dir.path().join("o.raw").display().to_string();
        same_failure(&["convert", "-l", "s", "-O", "raw", &p, &out], shared_write);
    }
    {
        // A reader lets others read, and not write.
        let _reader = Holder::qemu_io("qcow2", &a, &["-r"]);
        assert!(same(&["snapshot", "-l", &p], "UTC").status.success());
        same_failure(&["snapshot", "-c", "x", &p], write);
        same_failure(&["snapshot", "-d", "s", &p], write);
    }
    assert_eq!(read_table(&a).1.len(), 1);
}

#[test]
fn the_library_opens_an_image_as_a_snapshot_saw_it() {
    use img_core::qcow2::SnapshotSelector;
    let dir = tempfile::tempdir().unwrap();
    let a = history(dir.path());
    let p = a.display().to_string();
    let open = |snapshot: Option<SnapshotSelector>, read_only: bool| {
        img_core::open_image(
            &a,
            &img_core::OpenOptions {
                read_only,
                snapshot,
                ..Default::default()
            },
        )
    };
    for (sel, name) in [
        (SnapshotSelector::IdOrName("two".into()), "two"),
        (
            SnapshotSelector::Match {
                id: Some("4".into()),
                name: None,
            },
            "4",
        ),
    ] {
        let image = open(Some(sel), true).unwrap();
        let want = dir.path().join("want.raw");
        let _ = std::fs::remove_file(&want);
        qemu_img(&[
            "convert",
            "-l",
            name,
            "-O",
            "raw",
            &p,
            &want.display().to_string(),
        ]);
        let want = std::fs::read(&want).unwrap();
        assert_eq!(image.size(), want.len() as u64);
        let mut got = vec![0u8; want.len()];
        image.read_at(&mut got, 0).unwrap();
        assert!(got == want, "snapshot {name}");
    }
    let e = open(Some(SnapshotSelector::IdOrName("nope".into())), true).unwrap_err();
    assert!(matches!(e, img_core::Error::SnapshotNotFound { .. }), "{e}");
    // A snapshot is only ever read.
    assert!(open(Some(SnapshotSelector::IdOrName("two".into())), false).is_err());
}

/// The snapshots `info --output=json` shows, without their dates (which differ between two
/// runs), after asserting that the dates have qemu-img's microsecond resolution.
fn snapshots_without_dates(image: &Path) -> Vec<serde_json::Value> {
    let out = qemu_img(&["info", "--output=json", &image.display().to_string()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut list = v["snapshots"].as_array().cloned().unwrap_or_default();
    for sn in &mut list {
        let sn = sn.as_object_mut().unwrap();
        let nsec = sn.remove("date-nsec").unwrap().as_u64().unwrap();
        assert_eq!(nsec % 1000, 0, "{sn:?}");
        sn.remove("date-sec").unwrap();
    }
    list
}

#[test]
fn the_operations_through_the_command_line_do_what_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("q.qcow2");
    let i = dir.path().join("i.qcow2");
    create(&q, &[], "4M");
    io(&q, &["write -P 1 0 1M"]);
    std::fs::copy(&q, &i).unwrap();
    let long = "x".repeat(300);
    let steps: Vec<Vec<&str>> = vec![
        vec!["-c", "s1"],
        vec!["-c", &long],
        vec!["-c", "s1"],
        vec!["-a", "1"],
        vec!["-d", "s1"],
        vec!["-q", "-a", "s1"],
        vec!["-c", "after"],
    ];
    for (n, step) in steps.iter().enumerate() {
        for (tool, image) in [("qemu-img", &q), ("img", &i)] {
            let mut args = vec!["snapshot"];
            args.extend_from_slice(step);
            let path = image.display().to_string();
            args.push(&path);
            let out = if tool == "img" {
                Command::new(img_bin()).args(&args).output().unwrap()
            } else {
                run(tool, &args)
            };
            assert!(
                out.status.success(),
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.stdout.is_empty() && out.stderr.is_empty(),
                "{tool} {args:?}"
            );
            if n == 0 {
                // Data written after the first snapshot, which applying it drops.
                io(image, &["write -P 2 0 64k"]);
            }
        }
    }
    assert_eq!(snapshots_without_dates(&i), snapshots_without_dates(&q));
    // The table itself: names as stored (a listing shows at most 255 bytes of them).
    let names = |p: &Path| -> Vec<(Vec<u8>, Vec<u8>)> {
        read_table(p)
            .1
            .into_iter()
            .map(|e| (e.id, e.name))
            .collect()
    };
    assert_eq!(names(&i), names(&q));
    common::assert_qemu_check_clean(&i);
    common::assert_qemu_compare_identical(&q, "qcow2", &i, "qcow2");
}

/// A snapshot taken after the refcount table grew in the same session (512-byte clusters: one
/// table cluster covers 8 MiB of file) counts the table as it is now, not as the header said
/// at open: no leak. (The snapshot switch once freed only the header's table size, leaking the
/// grown table's other clusters; tests/races.rs found it.)
#[test]
fn snapshot_after_the_refcount_table_grew_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.qcow2");
    common::qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        path.to_str().unwrap(),
        "64M",
    ]);
    let mut image = img_core::open_image(
        &path,
        &img_core::OpenOptions {
            format: Some("qcow2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let data = common::pattern(9, 0, 24 << 20);
    image.write_at(&data, 0).unwrap();
    let q = img_core::qcow2::driver_of(&mut image).unwrap();
    q.create_snapshot("grown", (1, 0)).unwrap();
    q.delete_snapshot("grown").unwrap();
    image.close().unwrap();
    common::assert_qemu_check_clean(&path);
}
