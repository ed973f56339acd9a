//! The transport's register file and queue set-up, driven the way Linux's virtio_mmio driver
//! drives it, against a test guest memory and a real raw image.

use super::*;
use crate::virtio_blk::{features, DeviceOptions, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vm_memory::{Address, Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
const NEXT: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
const WRITE: u16 = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
const ACKNOWLEDGE: u32 = 1;
const QUEUE_SIZE: u16 = 16;

/// The driver's split queue, laid out by hand (virtio-queue's mock lays its rings out
/// overlapping when event indexes are used).
struct Layout {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
}

impl Layout {
    fn new(mem: &GuestMemoryMmap) -> Self {
        Self::at(mem, 0)
    }
    /// A queue's rings `base` bytes further (for a device's other queues).
    fn at(mem: &GuestMemoryMmap, base: u64) -> Self {
        let l = Layout {
            desc: GuestAddress(base + 0x1000),
            avail: GuestAddress(base + 0x2000),
            used: GuestAddress(base + 0x3000),
        };
        mem.write_slice(&[0u8; 0x3000], l.desc).unwrap();
        l
    }
    fn desc_table_addr(&self) -> GuestAddress {
        self.desc
    }
    fn avail_addr(&self) -> GuestAddress {
        self.avail
    }
    fn used_addr(&self) -> GuestAddress {
        self.used
    }
    /// Writes descriptor `i`.
    fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, self.desc.unchecked_add(16 * u64::from(i)))
            .unwrap();
    }
    /// Makes the chain at `head` available.
    fn publish(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx: u16 = mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        let slot = self
            .avail
            .unchecked_add(4 + 2 * u64::from(idx % QUEUE_SIZE));
        mem.write_obj(head, slot).unwrap();
        mem.write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
    }
}
const DRIVER: u32 = 2;

struct Rig {
    _dir: tempfile::TempDir,
    mem: Arc<GuestMemoryMmap>,
    dev: MmioTransport,
    irq: EventFd,
    executor: Arc<Executor>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let image = crate::test_images::image(dir.path(), "disk.raw", 4 * MIB, "raw", false);
    let device = Arc::new(BlockDevice::new(image, DeviceOptions::default()));
    let executor = Arc::new(Executor::new("test", 2).unwrap());
    let mem =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap());
    let irq = EventFd::new(libc::EFD_CLOEXEC).unwrap();
    let dev = MmioTransport::new(
        Arc::new(BlockBackend::new(device, executor.clone())),
        mem.clone(),
        irq.try_clone().unwrap(),
        None,
    )
    .unwrap();
    Rig {
        _dir: dir,
        mem,
        dev,
        irq,
        executor,
    }
}

fn rd(dev: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(dev: &mut MmioTransport, off: u64, v: u32) {
    dev.write(off, &v.to_le_bytes());
}

fn device_features(dev: &mut MmioTransport) -> u64 {
    wr(dev, 0x14, 0);
    let lo = rd(dev, 0x10);
    wr(dev, 0x14, 1);
    let hi = rd(dev, 0x10);
    u64::from(lo) | u64::from(hi) << 32
}

/// The driver's start-up: negotiate `wanted` features, set queue 0 up on `q`, DRIVER_OK.
fn bring_up(dev: &mut MmioTransport, q: &Layout, wanted: u64) {
    wr(dev, 0x70, 0);
    wr(dev, 0x70, ACKNOWLEDGE);
    wr(dev, 0x70, ACKNOWLEDGE | DRIVER);
    let offered = device_features(dev);
    let acked = offered & wanted;
    wr(dev, 0x24, 0);
    wr(dev, 0x20, acked as u32);
    wr(dev, 0x24, 1);
    wr(dev, 0x20, (acked >> 32) as u32);
    wr(dev, 0x70, ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK);
    assert_ne!(rd(dev, 0x70) & STATUS_FEATURES_OK, 0, "features accepted");
    setup_queue(dev, 0, q);
    wr(
        dev,
        0x70,
        ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
}

/// Sets queue `index` up on `q` and makes it ready.
fn setup_queue(dev: &mut MmioTransport, index: u32, q: &Layout) {
    wr(dev, 0x30, index);
    assert_eq!(rd(dev, 0x44), 0, "queue not ready before set-up");
    assert_eq!(rd(dev, 0x34), 256, "QueueNumMax");
    wr(dev, 0x38, u32::from(QUEUE_SIZE));
    let split = |a: GuestAddress| (a.0 as u32, (a.0 >> 32) as u32);
    for (reg, addr) in [
        (0x80, q.desc_table_addr()),
        (0x90, q.avail_addr()),
        (0xa0, q.used_addr()),
    ] {
        let (lo, hi) = split(addr);
        wr(dev, reg, lo);
        wr(dev, reg + 4, hi);
    }
    wr(dev, 0x44, 1);
    assert_eq!(rd(dev, 0x44), 1);
}

/// Puts the request `kind` at `sector` with one 4 KiB data buffer at `data` as the chain
/// starting at descriptor `first`; the header goes at `at`, the status byte at `at + 0x100`.
fn request(
    q: &Layout,
    mem: &GuestMemoryMmap,
    first: u16,
    at: u64,
    kind: u32,
    sector: u64,
    data: u64,
) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
    mem.write_slice(&[0xff], GuestAddress(at + 0x100)).unwrap();
    let data_flags = if kind == VIRTIO_BLK_T_IN { WRITE } else { 0 };
    q.set_desc(mem, first, at, 16, NEXT, first + 1);
    q.set_desc(mem, first + 1, data, 4096, data_flags | NEXT, first + 2);
    q.set_desc(mem, first + 2, at + 0x100, 1, WRITE, 0);
    q.publish(mem, first);
}

fn used_idx(mem: &GuestMemoryMmap, q: &Layout) -> u16 {
    mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap()
}

/// Waits for the interrupt, acknowledges it, and returns the used ring's index.
fn wait_interrupt(r: &mut Rig, q: &Layout) -> u16 {
    r.irq.read().unwrap();
    assert_eq!(rd(&mut r.dev, 0x60) & INT_VRING, INT_VRING);
    wr(&mut r.dev, 0x64, INT_VRING);
    assert_eq!(rd(&mut r.dev, 0x60), 0, "InterruptACK clears the status");
    used_idx(&r.mem, q)
}

#[test]
fn registers_identify_a_virtio_blk_device_with_its_config() {
    let mut r = rig();
    assert_eq!(rd(&mut r.dev, 0x00), 0x7472_6976);
    assert_eq!(rd(&mut r.dev, 0x04), 2, "modern (version 2) layout");
    assert_eq!(rd(&mut r.dev, 0x08), 2, "block device");
    let f = device_features(&mut r.dev);
    for bit in [
        features::VERSION_1,
        features::RING_EVENT_IDX,
        features::FLUSH,
    ] {
        assert_ne!(f & 1 << bit, 0, "feature {bit} offered");
    }
    // The configuration space starts at 0x100: capacity in sectors, byte by byte too.
    let mut cap = [0u8; 8];
    r.dev.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 4 * MIB / 512);
    let mut b = [0u8; 1];
    r.dev.read(0x101, &mut b);
    assert_eq!(b[0], ((4 * MIB / 512) >> 8) as u8);
    // Registers are 32-bit: a byte read of one yields nothing.
    r.dev.read(0x00, &mut b);
    assert_eq!(b[0], 0);
}

#[test]
fn features_not_offered_are_refused() {
    let mut r = rig();
    wr(&mut r.dev, 0x70, ACKNOWLEDGE | DRIVER);
    wr(&mut r.dev, 0x24, 1);
    wr(&mut r.dev, 0x20, 1 << 31); // bit 63: never offered
    wr(&mut r.dev, 0x70, ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK);
    assert_eq!(rd(&mut r.dev, 0x70) & STATUS_FEATURES_OK, 0);
}

#[test]
fn write_then_read_through_the_queue_with_event_idx() {
    let mut r = rig();
    let mem = r.mem.clone();
    let q = Layout::new(&mem);
    bring_up(&mut r.dev, &q, u64::MAX);
    let io = crate::iothread::IoThread::new("test-io").unwrap();
    r.dev.attach(&io).unwrap();

    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(0x20_0000)).unwrap();
    request(&q, &mem, 0, 0x10_0000, VIRTIO_BLK_T_OUT, 8, 0x20_0000);
    wr(&mut r.dev, QUEUE_NOTIFY, 0);
    assert_eq!(wait_interrupt(&mut r, &q), 1);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x10_0100)).unwrap(),
        0,
        "status OK"
    );
    // The used element: head 0, one byte (the status) written.
    let elem = q.used_addr().unchecked_add(4);
    assert_eq!(mem.read_obj::<u32>(elem).unwrap(), 0);
    assert_eq!(mem.read_obj::<u32>(elem.unchecked_add(4)).unwrap(), 1);

    // With EVENT_IDX the driver asks to be interrupted at the next completion (used_event is
    // the u16 after the avail ring of 16 entries).
    let used_event = q.avail_addr().unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
    mem.write_obj::<u16>(1, used_event).unwrap();
    request(&q, &mem, 3, 0x11_0000, VIRTIO_BLK_T_IN, 8, 0x30_0000);
    wr(&mut r.dev, QUEUE_NOTIFY, 0);
    assert_eq!(wait_interrupt(&mut r, &q), 2);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x11_0100)).unwrap(), 0);
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(back, pattern, "read returns what was written");
    // The device asks for a kick at the next request (avail_event, after the used ring).
    let avail_event = q.used_addr().unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));
    assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 2);

    // Reset: the queue is no longer ready and the interrupt status is clear.
    wr(&mut r.dev, 0x70, 0);
    assert_eq!(rd(&mut r.dev, 0x70), 0);
    assert_eq!(rd(&mut r.dev, 0x44), 0);
    r.executor.shutdown();
}

#[test]
fn queue_registers_are_frozen_while_ready_and_ignored_out_of_range() {
    let mut r = rig();
    let mem = r.mem.clone();
    let q = Layout::new(&mem);
    bring_up(&mut r.dev, &q, u64::MAX);
    wr(&mut r.dev, 0x80, 0x1234_0000);
    assert_eq!(
        lock(&r.dev.shared.queues[0]).desc_table(),
        q.desc_table_addr().0,
        "a ready queue's layout does not change"
    );
    // Queue 5 does not exist: reads are zero, writes are ignored.
    wr(&mut r.dev, 0x30, 5);
    assert_eq!(rd(&mut r.dev, 0x34), 0);
    wr(&mut r.dev, 0x44, 1);
    assert_eq!(rd(&mut r.dev, 0x44), 0);
}

/// virtio-scsi through the transport: an INQUIRY on the command queue is answered by a
/// worker while the buffer the driver put on the event queue stays unused (the controller
/// has no events), and the device's registers say SCSI.
#[test]
fn scsi_commands_complete_and_event_buffers_wait() {
    use crate::scsi::{Lun, LunOptions};
    use crate::virtio_scsi::{Controller, ControllerOptions};
    let dir = tempfile::tempdir().unwrap();
    let image = crate::test_images::image(dir.path(), "lun.raw", MIB, "raw", false);
    let mut controller = Controller::new(ControllerOptions::default());
    controller
        .target_mut(0)
        .insert(0, Lun::new(Some(image), LunOptions::default()));
    let executor = Arc::new(Executor::new("test-scsi", 2).unwrap());
    let mem =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap());
    let irq = EventFd::new(libc::EFD_CLOEXEC).unwrap();
    let backend = ScsiBackend::new(Arc::new(controller), executor.clone(), "scsi0");
    let mut dev = MmioTransport::new(
        Arc::new(backend),
        mem.clone(),
        irq.try_clone().unwrap(),
        None,
    )
    .unwrap();
    assert_eq!(rd(&mut dev, 0x08), 8, "SCSI host");
    let mut num_queues = [0u8; 4];
    dev.read(0x100, &mut num_queues);
    assert_eq!(u32::from_le_bytes(num_queues), 1, "one command queue");

    // Queue 1 (events) and 2 (commands) on rings of their own.
    let (events, commands) = (Layout::at(&mem, 0x10_0000), Layout::at(&mem, 0x20_0000));
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER);
    wr(&mut dev, 0x24, 1);
    wr(&mut dev, 0x20, 1); // VERSION_1
    wr(&mut dev, 0x70, ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK);
    setup_queue(&mut dev, 1, &events);
    setup_queue(&mut dev, 2, &commands);
    wr(
        &mut dev,
        0x70,
        ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    let io = crate::iothread::IoThread::new("test-scsi-io").unwrap();
    dev.attach(&io).unwrap();

    events.set_desc(&mem, 0, 0x40_0000, 16, WRITE, 0);
    events.publish(&mem, 0);
    // INQUIRY, 96 bytes: request header (lun 1/0/0/0, CDB at 19), response header, data.
    let mut req = [0u8; 51];
    req[0] = 1;
    req[19] = 0x12;
    req[23] = 96;
    mem.write_slice(&req, GuestAddress(0x50_0000)).unwrap();
    let resp_len = 108u32;
    commands.set_desc(&mem, 0, 0x50_0000, req.len() as u32, NEXT, 1);
    commands.set_desc(&mem, 1, 0x51_0000, resp_len, WRITE | NEXT, 2);
    commands.set_desc(&mem, 2, 0x52_0000, 96, WRITE, 0);
    commands.publish(&mem, 0);
    wr(&mut dev, QUEUE_NOTIFY, 2);

    irq.read().unwrap();
    assert_eq!(used_idx(&mem, &commands), 1, "the INQUIRY completed");
    let elem = commands.used_addr().unchecked_add(4);
    assert_eq!(mem.read_obj::<u32>(elem).unwrap(), 0, "head 0");
    let used_len = mem.read_obj::<u32>(elem.unchecked_add(4)).unwrap();
    assert!(
        used_len > resp_len,
        "response and data written ({used_len})"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x51_000a)).unwrap(),
        0,
        "GOOD"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x51_000b)).unwrap(),
        0,
        "VIRTIO_SCSI_S_OK"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(0x52_0000)).unwrap() & 0x1f,
        0,
        "a disk"
    );
    assert_eq!(used_idx(&mem, &events), 0, "the event buffer is kept");
    executor.shutdown();
}
