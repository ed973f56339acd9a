//! The virtio-blk model behind rust-vmm's vhost-user back-end framework.

use crate::executor::{Executor, InFlight};
use crate::virtio_blk::{BlockDevice, Request};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Guest memory as the front end shares it.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: the back end speaks the protocol-feature negotiation.
const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;

/// One vhost-user-blk connection's back end: a device shared with the server, the requests
/// in flight per queue, and the guest memory of the current front end.
pub struct VhostUserBlk {
    device: Arc<BlockDevice>,
    executor: Arc<Executor>,
    inflight: Vec<Arc<InFlight>>,
    memory: RwLock<GuestMemory>,
    event_idx: AtomicBool,
}

impl VhostUserBlk {
    /// A back end for `device`, running requests on `executor`.
    pub fn new(device: Arc<BlockDevice>, executor: Arc<Executor>) -> Self {
        let queues = usize::from(device.config().options.num_queues);
        VhostUserBlk {
            device,
            executor,
            inflight: (0..queues).map(|_| Arc::default()).collect(),
            memory: RwLock::new(GuestMemoryAtomic::new(GuestMemoryMmap::new())),
            event_idx: AtomicBool::new(false),
        }
    }

    /// Waits until no request of any queue is in flight.
    pub fn drain(&self) {
        for q in &self.inflight {
            q.wait_idle();
        }
    }

    /// Takes every available request of `vring` and hands it to the workers.
    fn process_queue(&self, index: usize, vring: &VringRwLock) -> io::Result<()> {
        let memory = self
            .memory
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .memory();
        let event_idx = self.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                // Requests that arrive while the queue is drained need no kick.
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                let chain = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(memory.clone());
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                match Request::parse(chain) {
                    Ok(req) => self.submit(index, vring, req, memory.clone()),
                    Err(e) => {
                        // Return the chain unused so that the driver does not wait forever.
                        eprintln!("img: {}: queue {index}: {e}", self.device.name());
                        vring.add_used(head, 0).map_err(io::Error::other)?;
                        vring.signal_used_queue()?;
                    }
                }
            }
            // With event indexes, re-enabling notifications reports requests that slipped in
            // after the last pop; take them now, as no kick will come for them.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    fn submit<M>(&self, index: usize, vring: &VringRwLock, req: Request, memory: M)
    where
        M: std::ops::Deref<Target = GuestMemoryMmap<()>> + Send + 'static,
    {
        let inflight = Arc::clone(&self.inflight[index]);
        let device = Arc::clone(&self.device);
        let vring = vring.clone();
        inflight.start();
        self.executor.submit(move || {
            let done = device.execute(&req, &*memory);
            if let Err(e) = publish(&vring, done.head, done.used_len) {
                eprintln!("img: {}: queue {index}: {e}", device.name());
            }
            inflight.finish();
        });
    }
}

/// Puts a completed request in the used ring and interrupts the driver if it wants to be.
fn publish(vring: &VringRwLock, head: u16, len: u32) -> io::Result<()> {
    vring.add_used(head, len).map_err(io::Error::other)?;
    if vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

impl VhostUserBackend for VhostUserBlk {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.inflight.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.config().options.queue_size)
    }

    fn features(&self) -> u64 {
        self.device.config().features() | 1 << VHOST_USER_F_PROTOCOL_FEATURES
    }

    fn acked_features(&self, features: u64) {
        self.device.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let config = self.device.config().to_bytes();
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        // The front end asks for the size it knows; bytes past our layout read as zeros.
        out.resize(size as usize, 0);
        out
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        *self.memory.write().unwrap_or_else(|e| e.into_inner()) = mem;
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One thread per queue: queues of different vCPUs never wait for each other.
        (0..self.inflight.len()).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE must report a ring with nothing pending.
        if let Some(q) = self.inflight.get(queue_index as usize) {
            q.wait_idle();
        }
        Ok(())
    }

    fn reset_device(&self) {
        self.drain();
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let index = usize::from(device_event);
        match vrings.get(index) {
            Some(vring) => self.process_queue(index, vring),
            None => Err(io::Error::other(format!("event for unknown queue {index}"))),
        }
    }
}
