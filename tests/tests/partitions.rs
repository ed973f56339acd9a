//! `img partitions`: tables made by sfdisk (the oracle: `sfdisk --json`), read from raw files
//! and from their qcow2/vmdk conversions; damaged primary GPTs; hostile tables made by hand.
//! Needs fdisk (sfdisk), e2fsprogs, qemu-img; the mount workflow test needs root and fuse3.

mod common;

use common::{img, img_ok, pattern, qemu_img, run};
use img_core::ops::partitions::crc32;
use serde_json::Value;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

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

/// A raw disk of `size` bytes partitioned by sfdisk with `script`.
fn sfdisk_disk(dir: &Path, name: &str, size: u64, script: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel", s(&path)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (package fdisk) is needed");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "sfdisk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

/// `sfdisk --json`'s table.
fn oracle(raw: &Path) -> Value {
    let v: Value = serde_json::from_str(&ok("sfdisk", &["--json", s(raw)])).unwrap();
    v["partitiontable"].clone()
}

/// `img partitions --output=json`.
fn ours(image: &Path, fmt: &str) -> Value {
    serde_json::from_str(&img_ok(&[
        "partitions",
        "-f",
        fmt,
        "--output=json",
        s(image),
    ]))
    .unwrap()
}

/// Asserts our table lists what sfdisk lists: numbers, byte starts and sizes, types,
/// and for GPT the UUIDs, names and attributes.
fn assert_matches_oracle(ours: &Value, oracle: &Value) {
    let sector = oracle["sectorsize"].as_u64().unwrap();
    let label = oracle["label"].as_str().unwrap();
    assert_eq!(ours["label"], label);
    assert_eq!(
        ours["id"].as_str().unwrap().to_lowercase(),
        oracle["id"].as_str().unwrap().to_lowercase()
    );
    let theirs = oracle["partitions"].as_array().unwrap();
    let mine = ours["partitions"].as_array().unwrap();
    assert_eq!(mine.len(), theirs.len(), "ours {ours:#}\noracle {oracle:#}");
    for t in theirs {
        let node = t["node"].as_str().unwrap();
        let digits = node.len() - node.chars().rev().take_while(char::is_ascii_digit).count();
        let number: u64 = node[digits..].parse().unwrap();
        let m = mine
            .iter()
            .find(|m| m["number"] == number)
            .unwrap_or_else(|| panic!("partition {number} missing: {ours:#}"));
        let start = t["start"].as_u64().unwrap() * sector;
        let size = t["size"].as_u64().unwrap() * sector;
        assert_eq!(m["start"], start, "partition {number}");
        assert_eq!(m["size"], size, "partition {number}");
        assert_eq!(m["end"], start + size - 1, "partition {number}");
        let ttype = t["type"].as_str().unwrap();
        if label == "dos" {
            let a = u8::from_str_radix(m["type"].as_str().unwrap(), 16).unwrap();
            let b = u8::from_str_radix(ttype, 16).unwrap();
            assert_eq!(a, b, "partition {number}");
            assert_eq!(
                m["bootable"].as_bool().unwrap(),
                t["bootable"].as_bool().unwrap_or(false)
            );
        } else {
            assert_eq!(m["type"], ttype.to_uppercase(), "partition {number}");
            assert_eq!(m["uuid"], t["uuid"], "partition {number}");
            assert_eq!(
                m["name"],
                t["name"].as_str().unwrap_or(""),
                "partition {number}"
            );
            assert_eq!(
                m["attributes"].as_str(),
                t["attrs"].as_str(),
                "partition {number}"
            );
        }
    }
}

const MBR_SCRIPT: &str = "label: dos
start=2048, size=20480, type=83, bootable
start=22528, size=100000, type=5
start=24576, size=10240, type=83
start=36864, size=8192, type=82
start=47104, size=20000, type=8e
start=69632, size=4096, type=c
start=130000, size=20000, type=7
";

const GPT_SCRIPT: &str = "label: gpt
start=2048, size=20480, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=\"EFI system\", attrs=\"RequiredPartition LegacyBIOSBootable GUID:60\"
start=22528, size=40960, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"root \u{fc}ber alles\"
start=100000, size=2000, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
start=110000, size=3000, type=12345678-1234-1234-1234-123456789ABC, name=\"custom\"
";

#[test]
fn mbr_with_logical_partitions_matches_sfdisk_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sfdisk_disk(d, "mbr.raw", 100 * MIB, MBR_SCRIPT);
    let want = oracle(&raw);
    assert!(want["partitions"].as_array().unwrap().len() >= 7);
    assert_matches_oracle(&ours(&raw, "raw"), &want);
    for fmt in ["qcow2", "vmdk"] {
        let image = d.join(format!("mbr.{fmt}"));
        qemu_img(&["convert", "-f", "raw", "-O", fmt, s(&raw), s(&image)]);
        assert_matches_oracle(&ours(&image, fmt), &want);
    }
    // The human table shows the byte offsets mount needs.
    let text = img_ok(&["partitions", s(&raw)]);
    assert!(text.contains("offset=1048576,sizelimit=10485760"), "{text}");
    assert!(text.contains("83 Linux"), "{text}");
}

#[test]
fn gpt_matches_sfdisk_in_every_format() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sfdisk_disk(d, "gpt.raw", 100 * MIB, GPT_SCRIPT);
    let want = oracle(&raw);
    let got = ours(&raw, "raw");
    assert_matches_oracle(&got, &want);
    assert_eq!(got["warnings"], serde_json::json!([]));
    assert_eq!(got["partitions"][0]["type-name"], "EFI System");
    assert_eq!(got["partitions"][1]["type-name"], "Linux filesystem");
    assert!(got["partitions"][3].get("type-name").is_none());
    // A qcow2 overlay over a qcow2 conversion: read through the chain.
    let base = d.join("gpt.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&base)]);
    assert_matches_oracle(&ours(&base, "qcow2"), &want);
    let top = d.join("top.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "gpt.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    assert_matches_oracle(&ours(&top, "qcow2"), &want);
    let vmdk = d.join("gpt.vmdk");
    qemu_img(&["convert", "-f", "raw", "-O", "vmdk", s(&raw), s(&vmdk)]);
    assert_matches_oracle(&ours(&vmdk, "vmdk"), &want);
}

fn corrupt(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn a_damaged_primary_gpt_falls_back_to_the_backup_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sfdisk_disk(d, "gpt.raw", 64 * MIB, GPT_SCRIPT);
    let want = oracle(&raw);
    // (offset, what the warning names): a header field, then an entry's name.
    for (offset, what) in [(512 + 60, "header CRC32"), (1024 + 60, "entry array CRC32")] {
        let bad = d.join("bad.raw");
        std::fs::copy(&raw, &bad).unwrap();
        corrupt(&bad, offset);
        let got = ours(&bad, "raw");
        assert_matches_oracle(&got, &want);
        let warnings = got["warnings"].to_string();
        assert!(warnings.contains(what), "{warnings}");
        assert!(warnings.contains("backup"), "{warnings}");
        // As a qcow2 too, and the human output warns on stderr.
        let q = d.join("bad.qcow2");
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&bad), s(&q)]);
        let out = img(&["partitions", s(&q)]);
        assert!(out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("warning") && err.contains(what), "{err}");
        // Both damaged: a clear error.
        corrupt(&bad, 64 * MIB - 512 + 60);
        let out = img(&["partitions", "-f", "raw", s(&bad)]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("invalid GPT") && err.contains("backup"),
            "{err}"
        );
    }
}

/// Writes a 16-byte MBR/EBR entry into the sector at `sector_off` of the file.
fn mbr_entry(f: &std::fs::File, sector_off: u64, idx: u64, kind: u8, lba: u32, sectors: u32) {
    let mut e = [0u8; 16];
    e[4] = kind;
    e[8..12].copy_from_slice(&lba.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    f.write_all_at(&e, sector_off + 446 + 16 * idx).unwrap();
    f.write_all_at(&[0x55, 0xaa], sector_off + 510).unwrap();
}

fn blank(dir: &Path, name: &str, size: u64) -> (PathBuf, std::fs::File) {
    let p = dir.join(name);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    f.set_len(size).unwrap();
    (p, f)
}

fn refused(image: &Path, fmt: &str, needle: &str) {
    let out = img(&["partitions", "-f", fmt, s(image)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn hostile_mbr_tables_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // An EBR whose link points back at itself.
    let (p, f) = blank(d, "loop.raw", 16 * MIB);
    mbr_entry(&f, 0, 0, 0x05, 2048, 20000);
    mbr_entry(&f, 2048 * 512, 0, 0x83, 63, 100);
    mbr_entry(&f, 2048 * 512, 1, 0x05, 0, 100);
    refused(&p, "raw", "loops");
    // The same as qcow2.
    let q = d.join("loop.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&p), s(&q)]);
    refused(&q, "qcow2", "loops");
    // A longer loop: EBR 1 -> EBR 2 -> EBR 1.
    let (p, f) = blank(d, "loop2.raw", 16 * MIB);
    mbr_entry(&f, 0, 0, 0x0f, 2048, 20000);
    mbr_entry(&f, 2048 * 512, 0, 0x83, 63, 100);
    mbr_entry(&f, 2048 * 512, 1, 0x05, 1000, 200);
    mbr_entry(&f, 3048 * 512, 0, 0x83, 63, 100);
    mbr_entry(&f, 3048 * 512, 1, 0x05, 0, 200);
    refused(&p, "raw", "loops");
    // A chain longer than any real one (each EBR links to the next one sector on).
    let (p, f) = blank(d, "long.raw", 16 * MIB);
    mbr_entry(&f, 0, 0, 0x05, 2048, 30000);
    for i in 0..400u32 {
        let at = u64::from(2048 + 2 * i) * 512;
        mbr_entry(&f, at, 0, 0x83, 1, 1);
        mbr_entry(&f, at, 1, 0x05, 2 * (i + 1), 2);
    }
    refused(&p, "raw", "more than 256 logical partitions");
    // A link out of the extended partition.
    let (p, f) = blank(d, "out.raw", 16 * MIB);
    mbr_entry(&f, 0, 0, 0x05, 2048, 4096);
    mbr_entry(&f, 2048 * 512, 0, 0x83, 63, 100);
    mbr_entry(&f, 2048 * 512, 1, 0x05, 9000, 100);
    refused(&p, "raw", "outside the extended partition");
    // An EBR without boot signature.
    let (p, f) = blank(d, "nosig.raw", 16 * MIB);
    mbr_entry(&f, 0, 0, 0x05, 2048, 4096);
    refused(&p, "raw", "no boot signature");
    drop(f);
    // Partitions past the end of the disk: primary, and a link at u32::MAX.
    let (p, f) = blank(d, "past.raw", 16 * MIB);
    mbr_entry(&f, 0, 0, 0x83, 2048, u32::MAX);
    refused(&p, "raw", "extends past the end of the disk");
    let (p, f) = blank(d, "past2.raw", 16 * MIB);
    mbr_entry(&f, 0, 0, 0x05, u32::MAX, u32::MAX);
    refused(&p, "raw", "extends past the end of the disk");
    drop(f);
    // No table at all.
    let (p, _f) = blank(d, "empty.raw", 16 * MIB);
    refused(&p, "raw", "no partition table");
    let (p, _f) = blank(d, "tiny.raw", 100);
    refused(&p, "raw", "no partition table");
}

/// Rewrites the GPT header at `at` with `edit` applied and its CRC recomputed.
fn edit_gpt_header(f: &std::fs::File, at: u64, edit: impl Fn(&mut [u8])) {
    let mut h = [0u8; 92];
    f.read_exact_at(&mut h, at).unwrap();
    edit(&mut h);
    h[16..20].fill(0);
    let crc = crc32(&h);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&h, at).unwrap();
}

#[test]
fn hostile_gpt_tables_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let size = 64 * MIB;
    let raw = sfdisk_disk(d, "gpt.raw", size, GPT_SCRIPT);
    let headers = [512, size - 512];
    // Absurd entry counts (with valid header CRCs): refused before anything is allocated.
    for (count, entry_size, needle) in [
        (u32::MAX, 128u32, "entries"),
        (65536, 1 << 20, "entry array of"),
        (128, 100, "entry size"),
    ] {
        let p = d.join("count.raw");
        std::fs::copy(&raw, &p).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        for at in headers {
            edit_gpt_header(&f, at, |h| {
                h[80..84].copy_from_slice(&count.to_le_bytes());
                h[84..88].copy_from_slice(&entry_size.to_le_bytes());
            });
        }
        refused(&p, "raw", needle);
    }
    // An entry past the end of the disk, with every CRC valid.
    let p = d.join("past.raw");
    std::fs::copy(&raw, &p).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    for at in headers {
        let mut h = [0u8; 92];
        f.read_exact_at(&mut h, at).unwrap();
        let array_at = u64::from_le_bytes(h[72..80].try_into().unwrap()) * 512;
        let len = 128 * 128;
        let mut array = vec![0u8; len];
        f.read_exact_at(&mut array, array_at).unwrap();
        array[40..48].copy_from_slice(&(size / 512 + 10).to_le_bytes());
        f.write_all_at(&array, array_at).unwrap();
        let crc = crc32(&array);
        edit_gpt_header(&f, at, |h| h[88..92].copy_from_slice(&crc.to_le_bytes()));
    }
    refused(&p, "raw", "partition 1");
    refused(&p, "raw", "extends past the end of the disk");
    // An entry array pointing past the end.
    let p = d.join("array.raw");
    std::fs::copy(&raw, &p).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .unwrap();
    for at in headers {
        edit_gpt_header(&f, at, |h| {
            h[72..80].copy_from_slice(&u64::MAX.to_le_bytes())
        });
    }
    refused(&p, "raw", "invalid GPT");
    // A protective MBR without any GPT.
    let (p, f) = blank(d, "pmbr.raw", 16 * MIB);
    mbr_entry(&f, 0, 0, 0xee, 1, 32767);
    refused(&p, "raw", "invalid GPT");
}

#[test]
fn partition_offsets_mount_a_filesystem_from_the_exported_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = sfdisk_disk(
        d,
        "disk.raw",
        48 * MIB,
        "label: gpt\nstart=2048, size=8192, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=12288, size=65536, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=\"data\"\n",
    );
    // An ext4 filesystem with a file, put into partition 2.
    let fs = d.join("fs.raw");
    std::fs::File::create(&fs)
        .unwrap()
        .set_len(65536 * 512)
        .unwrap();
    ok("mkfs.ext4", &["-q", "-F", s(&fs)]);
    let content = pattern(5, 0, 1_000_000);
    let host = d.join("host.bin");
    std::fs::write(&host, &content).unwrap();
    ok(
        "debugfs",
        &["-w", "-R", &format!("write {} f.bin", s(&host)), s(&fs)],
    );
    let disk = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    disk.write_all_at(&std::fs::read(&fs).unwrap(), 12288 * 512)
        .unwrap();
    drop(disk);
    let image = d.join("disk.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&image)]);
    let table = ours(&image, "qcow2");
    let p2 = table["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "data")
        .unwrap()
        .clone();
    let (start, size) = (p2["start"].as_u64().unwrap(), p2["size"].as_u64().unwrap());
    let mp = d.join("export");
    std::fs::write(&mp, b"").unwrap();
    img_ok(&["mount", "-f", "qcow2", s(&image), s(&mp)]);
    // The mounted image is locked: listing it again needs -U.
    let locked = img(&["partitions", "-f", "qcow2", s(&image)]);
    assert_eq!(locked.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&locked.stderr).contains("lock"));
    let shared = img_ok(&["partitions", "-U", "-f", "qcow2", s(&image)]);
    assert!(
        shared.contains(&format!("offset={start},sizelimit={size}")),
        "{shared}"
    );
    let fsdir = d.join("fs");
    std::fs::create_dir(&fsdir).unwrap();
    let opts = format!("loop,offset={start},sizelimit={size}");
    let mounted = run("mount", &["-o", &opts, s(&mp), s(&fsdir)]);
    let read = std::fs::read(fsdir.join("f.bin"));
    let _ = run("umount", &[s(&fsdir)]);
    let unmounted = img(&["unmount", s(&mp)]);
    assert!(
        mounted.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&mounted.stderr)
    );
    assert!(read.unwrap() == content);
    assert!(unmounted.status.success());
}
