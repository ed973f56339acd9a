//! The virtio-blk device model's request path: parsing a chain from guest memory and running
//! it against a qcow2 image (4 KiB random and 1 MiB sequential, reads and writes), without a
//! transport, to see what the model itself costs per request.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use img_core::{open_image, OpenOptions};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::virtio_blk::{BlockDevice, DeviceOptions, Request, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const DISK: u64 = 256 << 20;
const WRITE_FLAG: u16 = 2;

fn device(dir: &std::path::Path) -> BlockDevice {
    let path = dir.join("d.qcow2");
    img_core::qcow2::create(
        &path,
        &img_core::qcow2::Qcow2CreateOptions {
            size: DISK,
            ..Default::default()
        },
    )
    .unwrap();
    let image = open_image(
        &path,
        &OpenOptions {
            format: Some("qcow2".into()),
            cache: blockdev::CacheMode::Unsafe,
            ..Default::default()
        },
    )
    .unwrap();
    BlockDevice::new(image, DeviceOptions::default())
}

/// Parses one request of `len` bytes at `sector` from a fresh chain and runs it.
fn request(dev: &BlockDevice, mem: &GuestMemoryMmap, kind: u32, sector: u64, len: u32) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(0x10_0000)).unwrap();
    let data_flag = if kind == VIRTIO_BLK_T_IN {
        WRITE_FLAG
    } else {
        0
    };
    let descs = [
        RawDescriptor::from(Descriptor::new(0x10_0000, 16, 0, 0)),
        RawDescriptor::from(Descriptor::new(0x20_0000, len, data_flag, 0)),
        RawDescriptor::from(Descriptor::new(0x10_1000, 1, WRITE_FLAG, 0)),
    ];
    let queue = MockSplitQueue::new(mem, 16);
    let chain = queue.build_desc_chain(&descs).unwrap();
    let req = Request::parse(chain).unwrap();
    assert_eq!(dev.execute(&req, mem).status, 0);
}

fn model(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let dev = device(dir.path());
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
    // Allocate the whole disk first, so that reads and writes hit allocated clusters.
    for s in (0..DISK / 512).step_by(2048) {
        request(&dev, &mem, VIRTIO_BLK_T_OUT, s, 1 << 20);
    }
    let mut g = c.benchmark_group("virtio_blk_model");
    for (name, kind, len) in [
        ("read_4k", VIRTIO_BLK_T_IN, 4096u32),
        ("write_4k", VIRTIO_BLK_T_OUT, 4096),
        ("read_1m", VIRTIO_BLK_T_IN, 1 << 20),
        ("write_1m", VIRTIO_BLK_T_OUT, 1 << 20),
    ] {
        g.throughput(Throughput::Bytes(u64::from(len)));
        let blocks = DISK / u64::from(len);
        let mut i = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 7919) % blocks;
                request(&dev, &mem, kind, i * u64::from(len) / 512, len);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, model);
criterion_main!(benches);
