//! The virtio-mmio transport (virtio 1.x, section 4.2, register layout version 2) for the
//! virtio-blk model, found by a stock Linux through an ACPI `LNRO0005` device (see `acpi.rs`).
//!
//! Threads: the vCPU that touches a register runs [`MmioTransport`]'s `BusDevice` methods
//! (feature negotiation, queue set-up, status); queue notifications do not leave the kernel
//! (an ioeventfd on `QueueNotify`) and wake the device's I/O thread, which pops descriptor
//! chains and hands each request to the executor pool; the worker that completes a request puts
//! it in the used ring and, when the driver wants to hear about it (EVENT_IDX), sets the
//! interrupt status and signals the irqfd of the device's GSI.
//!
//! The transport is device-independent apart from [`Backend`], which [`BlockBackend`]
//! (virtio-blk) and [`ScsiBackend`] (virtio-scsi) implement.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::executor::{Executor, InFlight};
use crate::iothread::IoThread;
use crate::machine::bus::BusDevice;
use crate::virtio_blk::{BlockDevice, Request};

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x200;
/// Offset of the `QueueNotify` register (where the ioeventfd sits).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x554d_4551; // the vendor id Linux guests commonly see ("QEMU")
const CONFIG_OFFSET: u64 = 0x100;

/// Device status bits.
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_NEEDS_RESET: u32 = 0x40;
/// Interrupt status: a used buffer was added.
const INT_VRING: u32 = 1;

/// The device model behind a transport.
pub trait Backend: Send + Sync + 'static {
    /// The virtio device id (2 = block, 8 = SCSI).
    fn device_id(&self) -> u32;
    /// Features offered, transport bits included.
    fn features(&self) -> u64;
    /// Called once the driver has set FEATURES_OK.
    fn ack_features(&self, features: u64);
    /// The configuration space.
    fn config(&self) -> Vec<u8>;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Maximum size of each virtqueue.
    fn queue_size(&self) -> u16;
    /// Whether the transport pops this queue's buffers when notified. A queue the device
    /// fills only when it has something to report (virtio-scsi's event queue) keeps the
    /// driver's buffers in its available ring until then.
    fn polls_queue(&self, _queue: usize) -> bool {
        true
    }
    /// Parses the chain and runs the request on a worker; `done(head, used_len)` must be called
    /// exactly once, from any thread, when the request is complete.
    fn submit(
        &self,
        queue: usize,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: Arc<GuestMemoryMmap>,
        done: Box<dyn FnOnce(u16, u32) + Send>,
    );
}

mod scsi;
pub use scsi::ScsiBackend;

/// virtio-blk as a [`Backend`].
pub struct BlockBackend {
    device: Arc<BlockDevice>,
    executor: Arc<Executor>,
}

impl BlockBackend {
    /// `device`, with requests run on `executor`.
    pub fn new(device: Arc<BlockDevice>, executor: Arc<Executor>) -> Self {
        Self { device, executor }
    }
}

impl Backend for BlockBackend {
    fn device_id(&self) -> u32 {
        2
    }
    fn features(&self) -> u64 {
        self.device.config().features()
    }
    fn ack_features(&self, features: u64) {
        self.device.set_acked_features(features);
    }
    fn config(&self) -> Vec<u8> {
        self.device.config().to_bytes()
    }
    fn num_queues(&self) -> usize {
        usize::from(self.device.config().options.num_queues)
    }
    fn queue_size(&self) -> u16 {
        self.device.config().options.queue_size
    }
    fn submit(
        &self,
        queue: usize,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: Arc<GuestMemoryMmap>,
        done: Box<dyn FnOnce(u16, u32) + Send>,
    ) {
        let device = Arc::clone(&self.device);
        dispatch(
            &self.executor,
            self.device.name(),
            queue,
            chain,
            Request::parse,
            move |req| device.execute(&req, &*mem).used_len,
            done,
        );
    }
}

/// Parses `chain` with `parse` on the calling (I/O) thread, while the chain borrows guest
/// memory, and runs the parsed request with `run` on one of `executor`'s workers, which calls
/// `done` with the used length. A chain that does not parse is returned unused (so that the
/// driver does not wait for it forever) and reported as `name`'s.
pub(crate) fn dispatch<'a, T: Send + 'static, E: std::fmt::Display>(
    executor: &Executor,
    name: &str,
    queue: usize,
    chain: virtio_queue::DescriptorChain<&'a GuestMemoryMmap>,
    parse: impl FnOnce(virtio_queue::DescriptorChain<&'a GuestMemoryMmap>) -> Result<T, E>,
    run: impl FnOnce(T) -> u32 + Send + 'static,
    done: Box<dyn FnOnce(u16, u32) + Send>,
) {
    let head = chain.head_index();
    match parse(chain) {
        Ok(req) => executor.submit(move || done(head, run(req))),
        Err(e) => {
            eprintln!("vmm: {name}: queue {queue}: {e}");
            done(head, 0);
        }
    }
}

/// State shared by the register file, the I/O thread and the workers.
struct Shared {
    backend: Arc<dyn Backend>,
    mem: Arc<GuestMemoryMmap>,
    queues: Vec<Mutex<Queue>>,
    inflight: Vec<Arc<InFlight>>,
    interrupt_status: AtomicU32,
    irq: EventFd,
    /// What must stay mapped while requests run (the machine's RAM, when `mem` does not own
    /// its mappings): the requests' completions hold this state, so guest memory outlives the
    /// last request that touches it, even after the machine has stopped.
    _keep_alive: Option<Arc<crate::machine::memory::HostRam>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn interrupt(&self, bits: u32) {
        self.interrupt_status.fetch_or(bits, Ordering::SeqCst);
        // Only fails on counter overflow, which means an interrupt is pending anyway.
        let _ = self.irq.write(1);
    }

    /// Takes every available request of queue `index` (the I/O thread's job).
    fn process(self: &Arc<Self>, index: usize) {
        let mem: &GuestMemoryMmap = &self.mem;
        let mut q = lock(&self.queues[index]);
        if !q.ready() || !q.is_valid(mem) {
            return;
        }
        let event_idx = q.event_idx_enabled();
        loop {
            if event_idx {
                // Requests that arrive while the queue is drained need no notification.
                let _ = q.disable_notification(mem);
            }
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let this = Arc::clone(self);
                self.inflight[index].start();
                self.backend.submit(
                    index,
                    chain,
                    Arc::clone(&self.mem),
                    Box::new(move |head, len| this.complete(index, head, len)),
                );
            }
            // With event indexes, re-enabling notifications reports requests that slipped in
            // after the last pop; take them now, as no notification will come for them.
            match q.enable_notification(mem) {
                Ok(true) if event_idx => continue,
                _ => return,
            }
        }
    }

    /// Publishes a completed request (on the worker that ran it).
    fn complete(&self, index: usize, head: u16, len: u32) {
        let mem: &GuestMemoryMmap = &self.mem;
        let notify = {
            let mut q = lock(&self.queues[index]);
            match q.add_used(mem, head, len) {
                Ok(()) => q.needs_notification(mem).unwrap_or(true),
                Err(e) => {
                    eprintln!("vmm: queue {index}: used ring: {e}");
                    false
                }
            }
        };
        if notify {
            self.interrupt(INT_VRING);
        }
        self.inflight[index].finish();
    }
}

/// One virtio-mmio device: its register file (a [`BusDevice`]), its notification eventfd and
/// its interrupt eventfd.
pub struct MmioTransport {
    shared: Arc<Shared>,
    notify: Arc<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `backend` over guest memory `mem`, interrupting through `irq` (an eventfd
    /// the caller registers as an irqfd). `keep_alive` owns `mem`'s mappings when `mem` does
    /// not (the machine's [`HostRam`](crate::machine::memory::HostRam)).
    pub fn new(
        backend: Arc<dyn Backend>,
        mem: Arc<GuestMemoryMmap>,
        irq: EventFd,
        keep_alive: Option<Arc<crate::machine::memory::HostRam>>,
    ) -> std::io::Result<Self> {
        let max = backend.queue_size();
        let queues = (0..backend.num_queues().max(1))
            .map(|_| {
                Queue::new(max)
                    .map(Mutex::new)
                    .map_err(std::io::Error::other)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let inflight = queues.iter().map(|_| Arc::default()).collect();
        Ok(Self {
            shared: Arc::new(Shared {
                backend,
                mem,
                queues,
                inflight,
                interrupt_status: AtomicU32::new(0),
                irq,
                _keep_alive: keep_alive,
            }),
            notify: Arc::new(EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?),
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The eventfd a `QueueNotify` write signals: register it as an ioeventfd at
    /// `base + QUEUE_NOTIFY` so notifications stay in the kernel.
    pub fn notify_event(&self) -> &EventFd {
        &self.notify
    }

    /// Serves the device's notifications on `io`: when the eventfd fires, every queue the
    /// backend polls is processed (one eventfd for all queues: the driver writes the queue
    /// index, and a look at an idle queue is cheap).
    pub fn attach(&self, io: &IoThread) -> std::io::Result<()> {
        let shared = Arc::clone(&self.shared);
        let notify = Arc::clone(&self.notify);
        io.add(
            notify.as_raw_fd(),
            Box::new(move || {
                // Non-blocking: a read that finds the counter already reset means another
                // wake-up did the work.
                if notify.read().is_err() {
                    return;
                }
                for i in 0..shared.queues.len() {
                    if shared.backend.polls_queue(i) {
                        shared.process(i);
                    }
                }
            }),
        )
    }

    /// Waits for every request in flight.
    pub fn drain(&self) {
        for q in &self.shared.inflight {
            q.wait_idle();
        }
    }

    fn selected(&self) -> Option<MutexGuard<'_, Queue>> {
        self.shared
            .queues
            .get(self.queue_sel as usize)
            .map(|q| lock(q))
    }

    fn reset(&mut self) {
        self.drain();
        for q in &self.shared.queues {
            lock(q).reset();
        }
        self.shared.interrupt_status.store(0, Ordering::SeqCst);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.shared.backend.device_id(),
            0x0c => VENDOR_ID,
            // Asked only for this register: the others (InterruptStatus on every interrupt)
            // are read on the hot path.
            0x10 => {
                let features = self.shared.backend.features();
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.shared.interrupt_status.load(Ordering::SeqCst),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue layout registers may only change while the queue is not ready.
        let set_queue = |this: &mut Self, f: &dyn Fn(&mut Queue)| {
            if let Some(mut q) = this.selected() {
                if !q.ready() {
                    f(&mut q);
                }
            }
        };
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffffu64 << shift)) | (u64::from(v) << shift);
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => set_queue(self, &|q| q.set_size(v as u16)),
            0x44 => {
                let event_idx =
                    self.driver_features & (1 << crate::virtio_blk::features::RING_EVENT_IDX) != 0;
                if let Some(mut q) = self.selected() {
                    q.set_event_idx(event_idx);
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                // Reached only when no ioeventfd is registered (unit tests, old kernels).
                let _ = self.notify.write(1);
            }
            0x64 => {
                self.shared.interrupt_status.fetch_and(!v, Ordering::SeqCst);
            }
            0x70 => {
                if v == 0 {
                    self.reset();
                    return;
                }
                let newly = v & !self.status;
                if newly & STATUS_FEATURES_OK != 0 {
                    let offered = self.shared.backend.features();
                    if self.driver_features & !offered != 0 {
                        // The driver accepted something we never offered: refuse FEATURES_OK.
                        self.status = v & !STATUS_FEATURES_OK;
                        return;
                    }
                    self.shared.backend.ack_features(self.driver_features);
                }
                if newly & STATUS_DRIVER_OK != 0 {
                    // Requests queued before DRIVER_OK were not notified: look now.
                    let _ = self.notify.write(1);
                }
                self.status = v & !STATUS_NEEDS_RESET;
            }
            0x80 => set_queue(self, &|q| q.set_desc_table_address(Some(v), None)),
            0x84 => set_queue(self, &|q| q.set_desc_table_address(None, Some(v))),
            0x90 => set_queue(self, &|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => set_queue(self, &|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => set_queue(self, &|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => set_queue(self, &|q| q.set_used_ring_address(None, Some(v))),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            let config = self.shared.backend.config();
            for (i, d) in data.iter_mut().enumerate() {
                *d = config
                    .get((offset - CONFIG_OFFSET) as usize + i)
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        // Registers are 32-bit and must be accessed as such; other sizes read as zeros.
        if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            // virtio-blk's configuration is read-only apart from `writeback`, which we do not
            // offer (CONFIG_WCE).
            return;
        }
        if let (Ok(b), true) = (<[u8; 4]>::try_from(data), offset % 4 == 0) {
            self.write_reg(offset, u32::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
mod tests;
