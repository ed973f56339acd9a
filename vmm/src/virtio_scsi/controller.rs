//! The controller: its configuration space, and requests of the control and command queues.

use super::*;
use crate::scsi::{DataIn, DataOut, Outcome, Target, TransferError};
use crate::sg_list::{split_chain, ChainError, SgList};
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

/// How the controller is set up.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Command queues (the control and event queues come on top).
    pub num_queues: u32,
    /// Size of each queue.
    pub queue_size: u16,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            num_queues: 1,
            queue_size: 256,
        }
    }
}

/// What to put in the used ring for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCompletion {
    /// The chain's head descriptor.
    pub head: u16,
    /// Bytes written into the chain's device-writable buffers.
    pub used_len: u32,
}

/// A virtio-scsi controller with its targets.
#[derive(Debug, Default)]
pub struct Controller {
    options: ControllerOptions,
    /// Targets by id.
    targets: Vec<(u8, Target)>,
}

/// The device-readable data after the request header.
struct GuestOut<'a, M: ?Sized> {
    list: &'a SgList,
    mem: &'a M,
}

impl<M: GuestMemory + ?Sized> DataOut for GuestOut<'_, M> {
    fn len(&self) -> u64 {
        self.list.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        self.list
            .read_into(self.mem, offset, buf)
            .map_err(|_| TransferError)
    }
    fn gather(&self, offset: u64, len: u64, f: &mut dyn FnMut(&[std::io::IoSlice<'_>])) -> bool {
        self.list
            .with_guest_buffers(self.mem, offset, len, f)
            .is_some()
    }
}

/// The device-writable room after the response header.
struct GuestIn<'a, M: ?Sized> {
    list: &'a SgList,
    mem: &'a M,
}

impl<M: GuestMemory + ?Sized> DataIn for GuestIn<'_, M> {
    fn len(&self) -> u64 {
        self.list.len()
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), TransferError> {
        self.list
            .write_from(self.mem, offset, buf)
            .map_err(|_| TransferError)
    }
    fn scatter(
        &self,
        offset: u64,
        len: u64,
        f: &mut dyn FnMut(&mut [std::io::IoSliceMut<'_>]),
    ) -> bool {
        self.list
            .with_guest_slices(self.mem, offset, len, f)
            .is_some()
    }
}

impl Controller {
    /// A controller with no targets yet.
    pub fn new(options: ControllerOptions) -> Self {
        Controller {
            options,
            targets: Vec::new(),
        }
    }

    /// The target with `id`, made if missing.
    pub fn target_mut(&mut self, id: u8) -> &mut Target {
        if let Some(i) = self.targets.iter().position(|(t, _)| *t == id) {
            return &mut self.targets[i].1;
        }
        self.targets.push((id, Target::default()));
        &mut self.targets.last_mut().unwrap().1
    }

    /// The target with `id`.
    pub fn target(&self, id: u8) -> Option<&Target> {
        self.targets.iter().find(|(t, _)| *t == id).map(|(_, t)| t)
    }

    /// Every target with its id.
    pub fn targets(&self) -> impl Iterator<Item = (u8, &Target)> {
        self.targets.iter().map(|(id, t)| (*id, t))
    }

    /// Queues in all: control, event and the command queues.
    pub fn queue_count(&self) -> usize {
        FIRST_REQUEST_QUEUE + self.options.num_queues.max(1) as usize
    }

    /// Size of each queue.
    pub fn queue_size(&self) -> u16 {
        self.options.queue_size
    }

    /// The features offered: VERSION_1, indirect descriptors and event indexes; no hotplug
    /// or parameter-change events.
    pub fn features(&self) -> u64 {
        1 << 32 | 1 << 28 | 1 << 29
    }

    /// The configuration space, `struct virtio_scsi_config` in little endian.
    pub fn config_bytes(&self) -> Vec<u8> {
        let max_target = self.targets.iter().map(|(t, _)| *t).max().unwrap_or(0);
        let mut c = Vec::with_capacity(36);
        for v in [
            self.options.num_queues.max(1),
            u32::from(self.options.queue_size.saturating_sub(2).max(1)), // seg_max
            0xffff,                                                      // max_sectors
            128,                                                         // cmd_per_lun
            16,                                                          // event_info_size
            SENSE_SIZE as u32,
            CDB_SIZE as u32,
        ] {
            c.extend_from_slice(&v.to_le_bytes());
        }
        c.extend_from_slice(&0u16.to_le_bytes()); // max_channel
        c.extend_from_slice(&u16::from(max_target).to_le_bytes());
        c.extend_from_slice(&16383u32.to_le_bytes()); // max_lun
        c
    }

    /// Runs a request popped from queue `queue`: a control request on queue 0, a command on
    /// the command queues. A chain too malformed to answer is returned with nothing written.
    pub fn execute<M>(&self, queue: usize, chain: DescriptorChain<M>) -> ScsiCompletion
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mem_chain = chain.clone();
        let mem = mem_chain.memory();
        let used_len = match split_chain(chain) {
            Ok((readable, writable)) => self.execute_split(queue, mem, readable, writable),
            Err(_) => 0,
        };
        ScsiCompletion { head, used_len }
    }

    /// [`Controller::execute`] for a chain already split into its device-readable and
    /// device-writable buffers (so that the split can happen on the thread that pops the
    /// chain and the command run on another); returns the used length.
    pub fn execute_split<M: GuestMemory + ?Sized>(
        &self,
        queue: usize,
        mem: &M,
        readable: SgList,
        writable: SgList,
    ) -> u32 {
        let used_len = match queue {
            CONTROL_QUEUE => self.control(mem, readable, writable),
            q if q >= FIRST_REQUEST_QUEUE => self.command(mem, readable, writable),
            _ => Err(ChainError::Malformed),
        };
        used_len.unwrap_or(0)
    }

    fn command<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        mut readable: SgList,
        mut writable: SgList,
    ) -> Result<u32, ChainError> {
        if readable.len() < CMD_REQ_LEN {
            return Err(ChainError::ShortHeader(readable.len()));
        }
        if writable.len() < CMD_RESP_LEN {
            return Err(ChainError::NoStatus);
        }
        let mut req = [0u8; CMD_REQ_LEN as usize];
        readable
            .split_front(CMD_REQ_LEN)
            .read_into(mem, 0, &mut req)
            .map_err(|_| ChainError::Malformed)?;
        let resp_list = writable.split_front(CMD_RESP_LEN);
        let lun: [u8; 8] = req[0..8].try_into().unwrap();
        let cdb = &req[19..19 + CDB_SIZE];
        let target = decode_lun(&lun).and_then(|(t, n)| Some((self.target(t)?, n)));
        let (response, outcome) = match target {
            None => (S_BAD_TARGET, None),
            Some((target, n)) => {
                let out = GuestOut {
                    list: &readable,
                    mem,
                };
                let din = GuestIn {
                    list: &writable,
                    mem,
                };
                (S_OK, Some(target.execute(n, cdb, &out, &din)))
            }
        };
        let mut resp = [0u8; CMD_RESP_LEN as usize];
        let data_in = outcome.as_ref().map_or(0, |o| o.data_in);
        if let Some(Outcome { status, sense, .. }) = &outcome {
            let resid = writable.len().saturating_sub(data_in) as u32;
            resp[4..8].copy_from_slice(&resid.to_le_bytes());
            resp[10] = *status;
            if let Some(s) = sense {
                let fixed = s.to_fixed();
                resp[0..4].copy_from_slice(&(fixed.len() as u32).to_le_bytes());
                resp[12..12 + fixed.len()].copy_from_slice(&fixed);
            }
        }
        resp[11] = response;
        resp_list
            .write_from(mem, 0, &resp)
            .map_err(|_| ChainError::Malformed)?;
        Ok((CMD_RESP_LEN + data_in) as u32)
    }

    fn control<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        readable: SgList,
        writable: SgList,
    ) -> Result<u32, ChainError> {
        let mut kind = [0u8; 4];
        readable
            .read_into(mem, 0, &mut kind)
            .map_err(|_| ChainError::ShortHeader(readable.len()))?;
        match u32::from_le_bytes(kind) {
            // Task management: requests complete before the driver could ask to abort
            // them, so every function has nothing left to do.
            T_TMF => {
                writable
                    .write_from(mem, 0, &[S_FUNCTION_COMPLETE])
                    .map_err(|_| ChainError::NoStatus)?;
                Ok(1)
            }
            // No asynchronous notification is offered: event_actual 0, response OK.
            T_AN_QUERY | T_AN_SUBSCRIBE => {
                let mut resp = [0u8; 5];
                resp[4] = S_OK;
                writable
                    .write_from(mem, 0, &resp)
                    .map_err(|_| ChainError::NoStatus)?;
                Ok(5)
            }
            _ => {
                writable
                    .write_from(mem, 0, &[S_FUNCTION_REJECTED])
                    .map_err(|_| ChainError::NoStatus)?;
                Ok(1)
            }
        }
    }
}
