//! The device model against a test guest memory and queue (virtio-queue's mock driver), over
//! real images.

use super::*;
use img_core::{open_image, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const MIB: u64 = 1 << 20;

/// Guest memory: the queue at 0, buffers from 1 MiB on.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap()
}

/// A descriptor: guest address, length, device-writable.
type Desc = (u64, u32, bool);

/// Builds the chain `descs` in a fresh queue and parses it.
fn parse(mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<Request, ChainError> {
    let queue = MockSplitQueue::new(mem, 64);
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .map(|&(a, l, w)| {
            RawDescriptor::from(SplitDescriptor::new(a, l, if w { WRITE } else { 0 }, 0))
        })
        .collect();
    let chain = queue.build_desc_chain(&raw).unwrap();
    Request::parse(chain)
}

fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

fn raw_device(dir: &Path, size: u64, options: DeviceOptions) -> BlockDevice {
    let image = crate::test_images::image(dir, "disk.raw", size, "raw", options.read_only);
    BlockDevice::new(image, options)
}

fn status(mem: &GuestMemoryMmap, at: u64) -> u8 {
    let mut b = [0u8];
    mem.read_slice(&mut b, GuestAddress(at)).unwrap();
    b[0]
}

#[test]
fn write_then_read_with_any_layout() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(dir.path(), 4 * MIB, DeviceOptions::default());
    let mem = memory();
    // OUT: header and the first data bytes in one descriptor, the rest split unevenly.
    let data: Vec<u8> = (0..3 * 4096u32).map(|i| (i * 7 % 251) as u8).collect();
    header(&mem, 0x10_0000, VIRTIO_BLK_T_OUT, 8);
    mem.write_slice(&data[..100], GuestAddress(0x10_0010))
        .unwrap();
    mem.write_slice(&data[100..5000], GuestAddress(0x20_0000))
        .unwrap();
    mem.write_slice(&data[5000..], GuestAddress(0x30_0000))
        .unwrap();
    let req = parse(
        &mem,
        &[
            (0x10_0000, 16 + 100, false),
            (0x20_0000, 4900, false),
            (0x30_0000, (data.len() - 5000) as u32, false),
            (0x40_0000, 1, true),
        ],
    )
    .unwrap();
    assert_eq!(req.kind, RequestKind::Out);
    let done = dev.execute(&req, &mem);
    assert_eq!((done.status, done.used_len), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(status(&mem, 0x40_0000), VIRTIO_BLK_S_OK);

    // IN: data and status byte share the last descriptor.
    header(&mem, 0x50_0000, VIRTIO_BLK_T_IN, 8);
    let req = parse(
        &mem,
        &[
            (0x50_0000, 16, false),
            (0x60_0000, 4096, true),
            (0x70_0000, (data.len() - 4096 + 1) as u32, true),
        ],
    )
    .unwrap();
    let done = dev.execute(&req, &mem);
    assert_eq!(
        (done.status, done.used_len),
        (VIRTIO_BLK_S_OK, data.len() as u32 + 1)
    );
    let mut back = vec![0u8; data.len()];
    mem.read_slice(&mut back[..4096], GuestAddress(0x60_0000))
        .unwrap();
    mem.read_slice(&mut back[4096..], GuestAddress(0x70_0000))
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(
        status(&mem, 0x70_0000 + data.len() as u64 - 4096),
        VIRTIO_BLK_S_OK
    );
    assert_eq!(
        dev.stats()
            .write_bytes
            .load(std::sync::atomic::Ordering::Relaxed),
        data.len() as u64
    );
}

#[test]
fn bad_requests_fail_with_the_spec_status() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(
        dir.path(),
        MIB,
        DeviceOptions {
            serial: "img-serial-0123456789-too-long".into(),
            ..Default::default()
        },
    );
    let mem = memory();
    let run = |kind: u32, sector: u64, data: Option<(u32, bool)>| {
        header(&mem, 0x10_0000, kind, sector);
        let mut d = vec![(0x10_0000, 16, false)];
        if let Some((len, w)) = data {
            d.push((0x20_0000, len, w));
        }
        d.push((0x30_0000, 1, true));
        let done = dev.execute(&parse(&mem, &d).unwrap(), &mem);
        assert_eq!(status(&mem, 0x30_0000), done.status);
        done
    };
    // Past the end, ending past the end, not whole sectors, an overflowing sector.
    assert_eq!(
        run(VIRTIO_BLK_T_IN, 2048, Some((512, true))).status,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        run(VIRTIO_BLK_T_OUT, 2047, Some((1024, false))).status,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        run(VIRTIO_BLK_T_IN, 0, Some((100, true))).status,
        VIRTIO_BLK_S_IOERR
    );
    assert_eq!(
        run(VIRTIO_BLK_T_IN, u64::MAX / 2, Some((512, true))).status,
        VIRTIO_BLK_S_IOERR
    );
    // The last sector is fine.
    assert_eq!(
        run(VIRTIO_BLK_T_IN, 2047, Some((512, true))).status,
        VIRTIO_BLK_S_OK
    );
    assert_eq!(run(VIRTIO_BLK_T_FLUSH, 0, None).status, VIRTIO_BLK_S_OK);
    assert_eq!(run(77, 0, None).status, VIRTIO_BLK_S_UNSUPP);
    // GET_ID: 20 bytes of the serial.
    let done = run(VIRTIO_BLK_T_GET_ID, 0, Some((20, true)));
    assert_eq!((done.status, done.used_len), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(0x20_0000)).unwrap();
    assert_eq!(&id, b"img-serial-012345678");
}

#[test]
fn malformed_chains_are_refused() {
    let mem = memory();
    header(&mem, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        parse(
            &mem,
            &[
                (0x10_0000, 16, false),
                (0x20_0000, 512, true),
                (0x30_0000, 1, false)
            ]
        ),
        Err(ChainError::ReadableAfterWritable)
    );
    assert_eq!(
        parse(&mem, &[(0x10_0000, 16, false)]),
        Err(ChainError::NoStatus)
    );
    assert_eq!(
        parse(&mem, &[(0x10_0000, 8, false), (0x30_0000, 1, true)]),
        Err(ChainError::ShortHeader(8))
    );
    // A header outside guest memory.
    assert_eq!(
        parse(&mem, &[(0x7fff_0000_0000, 16, false), (0x30_0000, 1, true)]),
        Err(ChainError::Malformed)
    );
}

#[test]
fn data_outside_guest_memory_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(dir.path(), MIB, DeviceOptions::default());
    let mem = memory();
    header(&mem, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let req = parse(
        &mem,
        &[
            (0x10_0000, 16, false),
            (16 * MIB - 512, 1024, true),
            (0x30_0000, 1, true),
        ],
    )
    .unwrap();
    assert_eq!(dev.execute(&req, &mem).status, VIRTIO_BLK_S_IOERR);
}

fn range(mem: &GuestMemoryMmap, at: u64, sector: u64, sectors: u32, flags: u32) {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&s, GuestAddress(at)).unwrap();
}

#[test]
fn write_zeroes_and_discard() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(dir.path(), MIB, DeviceOptions::default());
    let mem = memory();
    let ones = vec![0xffu8; 64 * 1024];
    header(&mem, 0x10_0000, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&ones, GuestAddress(0x20_0000)).unwrap();
    let req = parse(
        &mem,
        &[
            (0x10_0000, 16, false),
            (0x20_0000, ones.len() as u32, false),
            (0x30_0000, 1, true),
        ],
    )
    .unwrap();
    assert_eq!(dev.execute(&req, &mem).status, VIRTIO_BLK_S_OK);

    // Two ranges in one request: sectors 8..16 (unmap allowed) and 64..72.
    header(&mem, 0x10_0000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    range(&mem, 0x40_0000, 8, 8, 1);
    range(&mem, 0x40_0010, 64, 8, 0);
    let req = parse(
        &mem,
        &[
            (0x10_0000, 16, false),
            (0x40_0000, 32, false),
            (0x30_0000, 1, true),
        ],
    )
    .unwrap();
    assert_eq!(dev.execute(&req, &mem).status, VIRTIO_BLK_S_OK);
    let image = open_image(
        &dir.path().join("disk.raw"),
        &OpenOptions {
            format: Some("raw".into()),
            read_only: true,
            force_share: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut back = vec![0u8; ones.len()];
    image.read_at(&mut back, 0).unwrap();
    for (i, b) in back.chunks(512).enumerate() {
        let zero = (8..16).contains(&i) || (64..72).contains(&i);
        assert!(
            b.iter().all(|&x| x == if zero { 0 } else { 0xff }),
            "sector {i}"
        );
    }

    // A discard with the unmap flag, or an unknown flag, is unsupported; a range past the end
    // is an I/O error; neither touches anything.
    header(&mem, 0x10_0000, VIRTIO_BLK_T_DISCARD, 0);
    let discard = |flags: u32, sector: u64| {
        range(&mem, 0x40_0000, sector, 8, flags);
        let req = parse(
            &mem,
            &[
                (0x10_0000, 16, false),
                (0x40_0000, 16, false),
                (0x30_0000, 1, true),
            ],
        )
        .unwrap();
        dev.execute(&req, &mem).status
    };
    assert_eq!(discard(1, 0), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(discard(4, 0), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(discard(0, 2044), VIRTIO_BLK_S_IOERR);
    assert_eq!(discard(0, 0), VIRTIO_BLK_S_OK);
    // A segment list that is not whole segments.
    let req = parse(
        &mem,
        &[
            (0x10_0000, 16, false),
            (0x40_0000, 12, false),
            (0x30_0000, 1, true),
        ],
    )
    .unwrap();
    assert_eq!(dev.execute(&req, &mem).status, VIRTIO_BLK_S_IOERR);
}

#[test]
fn read_only_device_refuses_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(
        dir.path(),
        MIB,
        DeviceOptions {
            read_only: true,
            ..Default::default()
        },
    );
    assert_ne!(dev.config().features() & 1 << features::RO, 0);
    let before = std::fs::read(dir.path().join("disk.raw")).unwrap();
    let mem = memory();
    mem.write_slice(&[0xaa; 512], GuestAddress(0x20_0000))
        .unwrap();
    for kind in [
        VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_T_DISCARD,
    ] {
        header(&mem, 0x10_0000, kind, 0);
        range(&mem, 0x20_0000, 0, 1, 0);
        let req = parse(
            &mem,
            &[
                (0x10_0000, 16, false),
                (0x20_0000, 512, false),
                (0x30_0000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(
            dev.execute(&req, &mem).status,
            VIRTIO_BLK_S_IOERR,
            "type {kind}"
        );
    }
    dev.close().unwrap();
    assert_eq!(std::fs::read(dir.path().join("disk.raw")).unwrap(), before);
}

#[test]
fn requests_after_close_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(dir.path(), MIB, DeviceOptions::default());
    dev.close().unwrap();
    dev.close().unwrap();
    let mem = memory();
    header(&mem, 0x10_0000, VIRTIO_BLK_T_IN, 0);
    let req = parse(
        &mem,
        &[
            (0x10_0000, 16, false),
            (0x20_0000, 512, true),
            (0x30_0000, 1, true),
        ],
    )
    .unwrap();
    assert_eq!(dev.execute(&req, &mem).status, VIRTIO_BLK_S_IOERR);
}

/// Many requests in flight at once on the worker pool, writing a qcow2 image: every write
/// lands, and the image is consistent.
#[test]
fn concurrent_requests_on_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    img_core::qcow2::create(
        &path,
        &img_core::qcow2::Qcow2CreateOptions {
            size: 64 * MIB,
            cluster_size: 4096,
            ..Default::default()
        },
    )
    .unwrap();
    let image = open_image(
        &path,
        &OpenOptions {
            format: Some("qcow2".into()),
            ..Default::default()
        },
    )
    .unwrap();
    let dev = Arc::new(BlockDevice::new(image, DeviceOptions::default()));
    let mem = Arc::new(memory());
    let pool = crate::executor::Executor::new("test", 8).unwrap();
    let inflight = Arc::new(crate::executor::InFlight::default());
    // 256 requests of 8 KiB scattered over the disk, each with its own buffers.
    let n = 256u64;
    let sector_of = |i: u64| (i * 7919 % 8000) * 16;
    let mut reqs = Vec::new();
    for i in 0..n {
        let base = MIB + i * 0x4000;
        header(&mem, base, VIRTIO_BLK_T_OUT, sector_of(i));
        mem.write_slice(
            &vec![(i % 250) as u8 + 1; 8192],
            GuestAddress(base + 0x1000),
        )
        .unwrap();
        reqs.push(
            parse(
                &mem,
                &[
                    (base, 16, false),
                    (base + 0x1000, 8192, false),
                    (base + 0x3000, 1, true),
                ],
            )
            .unwrap(),
        );
    }
    for req in reqs {
        let (dev, mem, inflight) = (Arc::clone(&dev), Arc::clone(&mem), Arc::clone(&inflight));
        inflight.start();
        pool.submit(move || {
            assert_eq!(dev.execute(&req, &*mem).status, VIRTIO_BLK_S_OK);
            inflight.finish();
        });
    }
    inflight.wait_idle();
    dev.close().unwrap();
    let image = open_image(
        &path,
        &OpenOptions {
            format: Some("qcow2".into()),
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 8192];
    for i in 0..n {
        image.read_at(&mut buf, sector_of(i) * 512).unwrap();
        assert!(buf.iter().all(|&b| b == (i % 250) as u8 + 1), "request {i}");
    }
    drop(image);
    if let Ok(out) = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&path)
        .output()
    {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// A driver that does not accept FLUSH gets durable writes without asking: the write reaches
/// the file before the request completes, as a flush would make it.
#[test]
fn without_flush_negotiated_writes_are_write_through() {
    let dir = tempfile::tempdir().unwrap();
    let dev = raw_device(dir.path(), MIB, DeviceOptions::default());
    assert!(!dev.is_write_through());
    dev.set_acked_features(dev.config().features() & !(1 << features::FLUSH));
    assert!(dev.is_write_through());
    dev.set_acked_features(dev.config().features());
    assert!(!dev.is_write_through());
}

/// A disk that fails under the guest: writes and flushes that meet EIO or ENOSPC end with
/// VIRTIO_BLK_S_IOERR (the guest sees the error, nothing is swallowed), and what the disk
/// kept has no corruption by `qemu-img check`.
#[test]
fn a_failing_disk_reaches_the_guest_as_ioerr() {
    use blockdev::fault::{Fault, FaultStorage, Target};
    use blockdev::{FileStorage, Storage};
    for (target, nth, errno) in [
        (Target::Write, 1, libc::EIO),
        (Target::Write, 5, libc::ENOSPC),
        (Target::Flush, 1, libc::EIO),
        (Target::Flush, 3, libc::EIO),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live.qcow2");
        let durable = dir.path().join("durable.qcow2");
        img_core::qcow2::create(
            &live,
            &img_core::qcow2::Qcow2CreateOptions {
                size: 16 * MIB,
                cluster_size: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        std::fs::copy(&live, &durable).unwrap();
        let fault = Fault {
            target,
            nth,
            errno,
            sticky: true,
        };
        let inner: Arc<dyn Storage> = Arc::new(FileStorage::open_read_write(&live).unwrap());
        let disk: Arc<dyn Storage> = Arc::new(FileStorage::open_read_write(&durable).unwrap());
        let faulty: Arc<dyn Storage> = Arc::new(FaultStorage::new(inner, disk, Some(fault)));
        let image = img_core::open::open_storage(
            faulty,
            &OpenOptions {
                format: Some("qcow2".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let dev = BlockDevice::new(image, DeviceOptions::default());
        let mem = memory();
        let mut statuses = Vec::new();
        for i in 0..8u64 {
            let base = MIB + i * 0x4000;
            // A write of 8 KiB to a fresh cluster, then a flush.
            header(&mem, base, VIRTIO_BLK_T_OUT, i * 64);
            mem.write_slice(&[i as u8 + 1; 8192], GuestAddress(base + 0x1000))
                .unwrap();
            let req = parse(
                &mem,
                &[
                    (base, 16, false),
                    (base + 0x1000, 8192, false),
                    (base + 0x3000, 1, true),
                ],
            )
            .unwrap();
            statuses.push(dev.execute(&req, &mem).status);
            header(&mem, base + 0x3800, VIRTIO_BLK_T_FLUSH, 0);
            let req = parse(
                &mem,
                &[(base + 0x3800, 16, false), (base + 0x3900, 1, true)],
            )
            .unwrap();
            statuses.push(dev.execute(&req, &mem).status);
        }
        let what = format!("{target:?} #{nth} errno {errno}");
        assert!(
            statuses.contains(&VIRTIO_BLK_S_IOERR),
            "{what}: no request failed: {statuses:?}"
        );
        // Once the (sticky) fault struck, no request of the failing kind may report
        // success (writes are the even requests, flushes the odd ones). A write fault may
        // first surface in a flush (metadata written back), and a flush may still succeed
        // after a failed write, as a write may after a failed flush.
        let first = statuses
            .iter()
            .position(|&s| s == VIRTIO_BLK_S_IOERR)
            .unwrap();
        let kind = if target == Target::Flush { 1 } else { 0 };
        assert!(
            (first..statuses.len())
                .filter(|i| i % 2 == kind)
                .all(|i| statuses[i] == VIRTIO_BLK_S_IOERR),
            "{what}: a request succeeded after the disk failed: {statuses:?}"
        );
        let _ = dev.close();
        drop(dev);
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(&durable)
            .output()
            .expect("qemu-img runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)) && !text.contains("ERROR"),
            "{what}: corruption on the disk:\n{text}"
        );
    }
}
