//! The virtio-scsi device model (virtio 1.x, section 5.6), independent of its transport: one
//! controller with SCSI targets whose LUNs are [`crate::scsi::Lun`]s.
//!
//! Queue 0 is the control queue (task management, asynchronous notification queries), queue
//! 1 the event queue (which this controller never fills: it offers no hotplug or parameter
//! change events, and reports media changes as UNIT ATTENTION), and queues 2 onwards carry
//! commands.

mod controller;

pub use controller::{Controller, ControllerOptions, ScsiCompletion};

/// Bytes of the CDB field in a command request (the configuration's `cdb_size`).
pub const CDB_SIZE: usize = 32;
/// Bytes of the sense field in a command response (the configuration's `sense_size`).
pub const SENSE_SIZE: usize = 96;
/// Bytes of a command request's header: lun[8], id, task_attr, prio, crn, cdb.
pub const CMD_REQ_LEN: u64 = 8 + 8 + 3 + CDB_SIZE as u64;
/// Bytes of a command response's header: sense_len, resid, status_qualifier, status,
/// response, sense.
pub const CMD_RESP_LEN: u64 = 4 + 4 + 2 + 1 + 1 + SENSE_SIZE as u64;

/// Response: the command reached the LUN (its SCSI status says how it went).
pub const S_OK: u8 = 0;
/// Response: the data did not fit the buffers.
pub const S_OVERRUN: u8 = 1;
/// Response: no such target or LUN.
pub const S_BAD_TARGET: u8 = 3;
/// Response: the request could not be carried out (a malformed request).
pub const S_FAILURE: u8 = 9;
/// Task management: done.
pub const S_FUNCTION_COMPLETE: u8 = 0;
/// Task management: not supported.
pub const S_FUNCTION_REJECTED: u8 = 11;

/// Control request type: task management function.
pub const T_TMF: u32 = 0;
/// Control request type: asynchronous notification query.
pub const T_AN_QUERY: u32 = 1;
/// Control request type: asynchronous notification subscription.
pub const T_AN_SUBSCRIBE: u32 = 2;

/// Queue index of the control queue.
pub const CONTROL_QUEUE: usize = 0;
/// Queue index of the event queue.
pub const EVENT_QUEUE: usize = 1;
/// Queue index of the first command queue.
pub const FIRST_REQUEST_QUEUE: usize = 2;

/// The target and LUN an 8-byte virtio-scsi LUN field names, if it is in the single-level
/// format the spec defines (byte 0 is 1, byte 1 the target, bytes 2-3 the LUN).
pub fn decode_lun(lun: &[u8; 8]) -> Option<(u8, u16)> {
    if lun[0] != 1 {
        return None;
    }
    let n = u16::from_be_bytes([lun[2], lun[3]]) & 0x3fff;
    Some((lun[1], n))
}

#[cfg(test)]
mod tests;
