//! The SCSI target against real images, command by command.

use super::*;
use crate::test_images::image;
use std::cell::RefCell;
use std::path::Path;

const MIB: u64 = 1 << 20;

fn disk(dir: &Path, options: LunOptions) -> Lun {
    let ro = options.read_only;
    Lun::new(Some(image(dir, "d.raw", 64 * MIB, "raw", ro)), options)
}

/// Runs `cdb` with `out` as data-out and a data-in buffer of `room` bytes.
fn run(lun: &Lun, cdb: &[u8], out: &[u8], room: usize) -> (Outcome, Vec<u8>) {
    let din = RefCell::new(vec![0u8; room]);
    let o = lun.execute(cdb, &out, &din);
    let mut data = din.into_inner();
    data.truncate(o.data_in as usize);
    (o, data)
}

fn sense_of(o: &Outcome) -> Sense {
    assert_eq!(o.status, CHECK_CONDITION, "{o:?}");
    o.sense.unwrap()
}

fn rw10(op: u8, lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw16(op: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[test]
fn inquiry_standard_and_vital_product_data() {
    let dir = tempfile::tempdir().unwrap();
    let lun = disk(
        dir.path(),
        LunOptions {
            serial: "SER123".into(),
            ..Default::default()
        },
    );
    let (o, d) = run(&lun, &[0x12, 0, 0, 0, 96, 0], &[], 96);
    assert_eq!(o.status, GOOD);
    assert_eq!(d.len(), 36);
    assert_eq!(d[0], 0x00, "direct-access device");
    assert_eq!(&d[8..16], b"IMG     ");
    assert_eq!(&d[16..32], b"IMG HARDDISK    ");
    // The allocation length cuts the answer.
    assert_eq!(run(&lun, &[0x12, 0, 0, 0, 5, 0], &[], 96).1.len(), 5);
    // VPD: supported pages, serial, identification, block limits, provisioning.
    let (_, d) = run(&lun, &[0x12, 1, 0x00, 0, 255, 0], &[], 255);
    assert_eq!(&d[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let (_, d) = run(&lun, &[0x12, 1, 0x80, 0, 255, 0], &[], 255);
    assert_eq!(&d[4..], b"SER123");
    let (_, d) = run(&lun, &[0x12, 1, 0x83, 0, 255, 0], &[], 255);
    assert_eq!(&d[8..], b"IMG     SER123");
    let (_, d) = run(&lun, &[0x12, 1, 0xb0, 0, 255, 0], &[], 255);
    assert_eq!(
        u32::from_be_bytes(d[20..24].try_into().unwrap()),
        1 << 21,
        "max unmap LBAs"
    );
    let (_, d) = run(&lun, &[0x12, 1, 0xb2, 0, 255, 0], &[], 255);
    assert_eq!(d[5] & 0x80, 0x80, "LBPU");
    // An unknown page, or a page without EVPD.
    assert_eq!(
        sense_of(&run(&lun, &[0x12, 1, 0x99, 0, 255, 0], &[], 255).0),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        sense_of(&run(&lun, &[0x12, 0, 0x80, 0, 255, 0], &[], 255).0),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn capacity_in_both_forms_and_block_sizes() {
    for bs in [512u32, 4096] {
        let dir = tempfile::tempdir().unwrap();
        let lun = disk(
            dir.path(),
            LunOptions {
                block_size: bs,
                ..Default::default()
            },
        );
        let (o, d) = run(&lun, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
        assert_eq!(o.status, GOOD);
        let blocks = 64 * MIB / u64::from(bs);
        assert_eq!(
            u32::from_be_bytes(d[0..4].try_into().unwrap()) as u64,
            blocks - 1
        );
        assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), bs);
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = 32;
        let (_, d) = run(&lun, &c, &[], 32);
        assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), blocks - 1);
        assert_eq!(d[14] & 0x80, 0x80, "LBPME");
    }
}

#[test]
fn reads_and_writes_of_every_size() {
    let dir = tempfile::tempdir().unwrap();
    let lun = disk(dir.path(), LunOptions::default());
    let data: Vec<u8> = (0..3 * MIB as usize + 4096)
        .map(|i| (i % 251) as u8)
        .collect();
    let blocks = (data.len() / 512) as u16;
    // WRITE(10) with FUA, then READ(16) and READ(6) of parts of it.
    let mut w = rw10(0x2a, 100, blocks);
    w[1] = 0x08;
    assert_eq!(run(&lun, &w, &data, 0).0.status, GOOD);
    let (o, d) = run(&lun, &rw16(0x88, 100, u32::from(blocks)), &[], data.len());
    assert_eq!(o.data_in, data.len() as u64);
    assert_eq!(d, data);
    let (_, d) = run(&lun, &[0x08, 0, 0, 101, 2, 0], &[], 1024);
    assert_eq!(d, &data[512..1536]);
    // WRITE(16) at the last block; past the end and overflowing ranges refused.
    let last = 64 * MIB / 512 - 1;
    assert_eq!(
        run(&lun, &rw16(0x8a, last, 1), &[7u8; 512], 0).0.status,
        GOOD
    );
    assert_eq!(
        sense_of(&run(&lun, &rw16(0x8a, last, 2), &[7u8; 1024], 0).0),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        sense_of(&run(&lun, &rw16(0x88, u64::MAX, 1), &[], 512).0),
        Sense::LBA_OUT_OF_RANGE
    );
    // A write whose data-out is shorter than its blocks.
    assert_eq!(
        sense_of(&run(&lun, &rw10(0x2a, 0, 4), &[1u8; 512], 0).0),
        Sense::TRANSFER_FAILED
    );
    // SYNCHRONIZE CACHE.
    assert_eq!(
        run(&lun, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0)
            .0
            .status,
        GOOD
    );
    lun.close().unwrap();
    let raw = std::fs::read(dir.path().join("d.raw")).unwrap();
    assert_eq!(&raw[100 * 512..100 * 512 + data.len()], &data[..]);
    assert_eq!(&raw[(last * 512) as usize..], &[7u8; 512]);
}

#[test]
fn unmap_and_write_same() {
    let dir = tempfile::tempdir().unwrap();
    let lun = Lun::new(
        Some(image(dir.path(), "d.qcow2", 64 * MIB, "qcow2", false)),
        LunOptions::default(),
    );
    let ones = vec![0xffu8; 4 * MIB as usize];
    assert_eq!(
        run(&lun, &rw10(0x2a, 0, (ones.len() / 512) as u16), &ones, 0)
            .0
            .status,
        GOOD
    );
    // UNMAP blocks 0..2048 (1 MiB) and 4096..4224 (one 64 KiB cluster: an unmap of part of a
    // cluster may leave the data, as LBPRZ is not claimed).
    let mut list = vec![0u8; 8 + 32];
    list[0..2].copy_from_slice(&(6u16 + 32).to_be_bytes());
    list[2..4].copy_from_slice(&32u16.to_be_bytes());
    list[8..16].copy_from_slice(&0u64.to_be_bytes());
    list[16..20].copy_from_slice(&2048u32.to_be_bytes());
    list[24..32].copy_from_slice(&4096u64.to_be_bytes());
    list[32..36].copy_from_slice(&128u32.to_be_bytes());
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&(list.len() as u16).to_be_bytes());
    assert_eq!(run(&lun, &c, &list, 0).0.status, GOOD);
    // WRITE SAME(16) of a pattern block over blocks 6000..6010, and WRITE SAME(10) with
    // UNMAP of a zero block over 7000..7100.
    let mut ws = rw16(0x93, 6000, 10);
    ws[1] = 0;
    let pattern: Vec<u8> = (0..512).map(|i| i as u8).collect();
    assert_eq!(run(&lun, &ws, &pattern, 0).0.status, GOOD);
    let mut ws10 = rw10(0x41, 7000, 100);
    ws10[1] = 0x08;
    assert_eq!(run(&lun, &ws10, &[0u8; 512], 0).0.status, GOOD);
    // A descriptor past the end is refused, and nothing of that list is unmapped.
    list[24..32].copy_from_slice(&(64 * MIB / 512).to_be_bytes());
    assert_eq!(
        sense_of(&run(&lun, &c, &list, 0).0),
        Sense::LBA_OUT_OF_RANGE
    );
    let (_, d) = run(&lun, &rw10(0x28, 0, 8192), &[], 4 * MIB as usize);
    for (i, b) in d.chunks(512).enumerate() {
        if (6000..6010).contains(&i) {
            assert_eq!(b, &pattern[..], "block {i}");
            continue;
        }
        let zero = i < 2048 || (4096..4224).contains(&i) || (7000..7100).contains(&i);
        assert!(
            b.iter().all(|&x| x == if zero { 0 } else { 0xff }),
            "block {i}"
        );
    }
    let (_, d) = run(&lun, &rw10(0x28, 6000, 10), &[], 5120);
    assert!(d.chunks(512).all(|b| b == &pattern[..]));
    lun.close().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(dir.path().join("d.qcow2"))
        .output()
        .expect("qemu-img runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let map = std::process::Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(dir.path().join("d.qcow2"))
        .output()
        .unwrap();
    let map = String::from_utf8_lossy(&map.stdout);
    assert!(map.contains("{ \"start\": 0, \"length\": 1048576, \"depth\": 0, \"present\": true, \"zero\": true, \"data\": false"), "{map}");
}

#[test]
fn read_only_disk_is_write_protected() {
    let dir = tempfile::tempdir().unwrap();
    drop(image(dir.path(), "d.raw", 64 * MIB, "raw", false));
    let lun = disk(
        dir.path(),
        LunOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert_eq!(
        sense_of(&run(&lun, &rw10(0x2a, 0, 1), &[1u8; 512], 0).0),
        Sense::WRITE_PROTECTED
    );
    assert_eq!(
        sense_of(&run(&lun, &rw10(0x41, 0, 1), &[1u8; 512], 0).0),
        Sense::WRITE_PROTECTED
    );
    let (_, d) = run(&lun, &[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
    assert_eq!(d[2] & 0x80, 0x80, "mode sense write-protect bit");
}

#[test]
fn mode_sense_pages() {
    let dir = tempfile::tempdir().unwrap();
    let lun = disk(dir.path(), LunOptions::default());
    // MODE SENSE(6), caching page, with the block descriptor.
    let (o, d) = run(&lun, &[0x1a, 0, 0x08, 0, 255, 0], &[], 255);
    assert_eq!(o.status, GOOD);
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[3], 8, "block descriptor length");
    assert_eq!(
        u32::from_be_bytes(d[4..8].try_into().unwrap()) as u64,
        64 * MIB / 512
    );
    assert_eq!(&d[12..14], &[0x08, 0x12]);
    assert_eq!(d[14] & 0x04, 0x04, "WCE");
    // MODE SENSE(10), every page, no block descriptor.
    let (_, d) = run(&lun, &[0x5a, 0x08, 0x3f, 0, 0, 0, 0, 1, 0, 0], &[], 256);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 0);
    assert_eq!(d[8], 0x08);
    assert_eq!(
        sense_of(&run(&lun, &[0x1a, 0, 0x19, 0, 255, 0], &[], 255).0),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn report_luns_and_missing_luns() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Target::default();
    t.insert(0, disk(dir.path(), LunOptions::default()));
    t.insert(
        300,
        Lun::new(
            None,
            LunOptions {
                kind: LunKind::Cdrom,
                ..Default::default()
            },
        ),
    );
    let din = RefCell::new(vec![0u8; 64]);
    let mut c = [0u8; 12];
    c[0] = 0xa0;
    c[9] = 64;
    let o = t.execute(5, &c, &NoData, &din);
    assert_eq!(o.data_in, 24);
    let d = din.into_inner();
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 16);
    assert_eq!(&d[8..10], &[0, 0]);
    assert_eq!(&d[16..18], &[0x41, 0x2c], "LUN 300, flat addressing");
    let o = t.execute(7, &[0, 0, 0, 0, 0, 0], &NoData, &NoData);
    assert_eq!(o.sense, Some(Sense::LUN_NOT_SUPPORTED));
}

#[test]
fn cdrom_media_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cd = Lun::new(
        None,
        LunOptions {
            kind: LunKind::Cdrom,
            ..Default::default()
        },
    );
    let (_, d) = run(&cd, &[0x12, 0, 0, 0, 36, 0], &[], 36);
    assert_eq!((d[0], d[1]), (0x05, 0x80), "CD-ROM, removable");
    assert_eq!(
        sense_of(&run(&cd, &[0, 0, 0, 0, 0, 0], &[], 0).0),
        Sense::NO_MEDIUM
    );
    // Insert a medium: one UNIT ATTENTION, then ready, 2048-byte blocks.
    let iso = image(dir.path(), "cd.iso", 8 * MIB, "raw", true);
    cd.change_medium(iso).unwrap();
    assert!(!cd.is_tray_open());
    assert_eq!(
        sense_of(&run(&cd, &[0, 0, 0, 0, 0, 0], &[], 0).0),
        Sense::MEDIUM_CHANGED
    );
    assert_eq!(run(&cd, &[0, 0, 0, 0, 0, 0], &[], 0).0.status, GOOD);
    let (_, d) = run(&cd, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
    assert_eq!(
        u32::from_be_bytes(d[0..4].try_into().unwrap()),
        8 * MIB as u32 / 2048 - 1
    );
    assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 2048);
    // Writes are refused; READ TOC lists track 1 and the lead-out.
    assert_eq!(
        sense_of(&run(&cd, &rw10(0x2a, 0, 1), &[0u8; 2048], 0).0),
        Sense::WRITE_PROTECTED
    );
    let (o, d) = run(&cd, &[0x43, 0, 0, 0, 0, 0, 0, 0, 255, 0], &[], 255);
    assert_eq!(o.status, GOOD);
    assert_eq!(&d[0..4], &[0, 18, 1, 1]);
    assert_eq!(d[14], 0xaa);
    assert_eq!(u32::from_be_bytes(d[16..20].try_into().unwrap()), 4096);
    // The guest locks the tray: eject is refused unless forced.
    assert_eq!(run(&cd, &[0x1e, 0, 0, 0, 1, 0], &[], 0).0.status, GOOD);
    assert!(matches!(cd.eject(false), Err(lun::EjectError::Locked)));
    assert_eq!(
        sense_of(&run(&cd, &[0x1b, 0, 0, 0, 0x02, 0], &[], 0).0),
        Sense::REMOVAL_PREVENTED
    );
    assert!(matches!(cd.eject(true), Ok(Some(Ok(())))));
    assert!(cd.is_tray_open());
    assert_eq!(
        sense_of(&run(&cd, &[0, 0, 0, 0, 0, 0], &[], 0).0),
        Sense::MEDIUM_CHANGED
    );
    assert_eq!(
        sense_of(&run(&cd, &[0, 0, 0, 0, 0, 0], &[], 0).0),
        Sense::NO_MEDIUM
    );
    // Media event status reports the open tray and no medium.
    let (_, d) = run(&cd, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0], &[], 8);
    assert_eq!(d[5], 0x01);
    // A disk is not removable.
    let disk = disk(dir.path(), LunOptions::default());
    assert!(matches!(
        disk.eject(true),
        Err(lun::EjectError::NotRemovable)
    ));
}

#[test]
fn hostile_commands_are_answered_not_panicked_on() {
    let dir = tempfile::tempdir().unwrap();
    let lun = disk(dir.path(), LunOptions::default());
    assert_eq!(sense_of(&run(&lun, &[], &[], 0).0), Sense::INVALID_OPCODE);
    // A CDB shorter than its group's length.
    assert_eq!(
        sense_of(&run(&lun, &[0x28, 0, 0], &[], 512).0),
        Sense::INVALID_OPCODE
    );
    assert_eq!(
        sense_of(&run(&lun, &[0xff, 0, 0, 0, 0, 0], &[], 0).0),
        Sense::INVALID_OPCODE
    );
    // Every opcode with a zeroed CDB of 16 bytes, and tiny buffers.
    for op in 0..=255u8 {
        let mut c = [0u8; 16];
        c[0] = op;
        c[4] = 0xff;
        c[8] = 0xff;
        let _ = run(&lun, &c, &[0u8; 16], 16);
    }
    // UNMAP with a descriptor length that does not fit the list.
    let mut list = vec![0u8; 24];
    list[2..4].copy_from_slice(&64u16.to_be_bytes());
    assert_eq!(
        sense_of(&run(&lun, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list, 0).0),
        Sense::PARAMETER_LENGTH
    );
}
