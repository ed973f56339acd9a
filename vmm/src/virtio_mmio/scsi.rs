//! virtio-scsi as a [`Backend`] of the virtio-mmio transport.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::{dispatch, Backend};
use crate::executor::Executor;
use crate::sg_list::split_chain;
use crate::virtio_scsi::{Controller, EVENT_QUEUE};

/// A virtio-scsi controller (device id 8) whose commands run on `executor`'s workers.
pub struct ScsiBackend {
    controller: Arc<Controller>,
    executor: Arc<Executor>,
    name: String,
}

impl ScsiBackend {
    /// `controller`, named `name` in messages, with commands run on `executor`.
    pub fn new(controller: Arc<Controller>, executor: Arc<Executor>, name: &str) -> Self {
        Self {
            controller,
            executor,
            name: name.to_string(),
        }
    }
}

impl Backend for ScsiBackend {
    fn device_id(&self) -> u32 {
        8
    }
    fn features(&self) -> u64 {
        self.controller.features()
    }
    fn ack_features(&self, _features: u64) {
        // Nothing the controller does depends on the driver's choice among its features.
    }
    fn config(&self) -> Vec<u8> {
        self.controller.config_bytes()
    }
    fn num_queues(&self) -> usize {
        self.controller.queue_count()
    }
    fn queue_size(&self) -> u16 {
        self.controller.queue_size()
    }
    fn polls_queue(&self, queue: usize) -> bool {
        // The controller has no events to report (media changes reach the guest as UNIT
        // ATTENTION): the driver's event buffers wait in the ring.
        queue != EVENT_QUEUE
    }
    fn submit(
        &self,
        queue: usize,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        mem: Arc<GuestMemoryMmap>,
        done: Box<dyn FnOnce(u16, u32) + Send>,
    ) {
        let controller = Arc::clone(&self.controller);
        dispatch(
            &self.executor,
            &self.name,
            queue,
            chain,
            split_chain,
            move |(readable, writable)| controller.execute_split(queue, &*mem, readable, writable),
            done,
        );
    }
}
