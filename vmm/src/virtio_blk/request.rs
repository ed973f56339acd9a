//! A virtio-blk request as the driver laid it out in a descriptor chain.
//!
//! The chain is read as two byte streams rather than as descriptors, since a driver may split
//! or merge the header, the data and the status byte across descriptors in any way (the spec's
//! VIRTIO_F_ANY_LAYOUT, mandatory since virtio 1.0): the device-readable stream starts with
//! the 16-byte request header, and the device-writable stream ends with the status byte.

use super::{SECTOR_SIZE, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID};
use super::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES};
pub use crate::sg_list::{split_chain, ChainError, SgList};
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemory;

/// Bytes of the request header: type (le32), reserved (le32), sector (le64).
pub const HEADER_LEN: u64 = 16;

/// Bytes of one discard or write-zeroes segment: sector (le64), sectors (le32), flags (le32).
pub const SEGMENT_LEN: u64 = 16;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read into the writable data buffers.
    In,
    /// Write the readable data buffers.
    Out,
    /// Make every completed write durable.
    Flush,
    /// Return the device's serial number (20 bytes).
    GetId,
    /// Deallocate the ranges listed in the readable data.
    Discard,
    /// Zero the ranges listed in the readable data.
    WriteZeroes,
    /// A type this device does not know (answered with VIRTIO_BLK_S_UNSUPP).
    Unsupported(u32),
}

impl RequestKind {
    fn from_type(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

/// One request, parsed from its chain; the data stays in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The chain's head descriptor, returned in the used ring.
    pub head: u16,
    /// What is asked.
    pub kind: RequestKind,
    /// The first sector (512 bytes each, whatever the block size) of IN and OUT.
    pub sector: u64,
    /// The device-readable bytes after the header: OUT data, discard/write-zeroes segments.
    pub readable: SgList,
    /// The device-writable bytes before the status byte: IN data, the GET_ID buffer.
    pub writable: SgList,
    /// Where the status byte goes.
    pub status: SgList,
}

impl Request {
    /// Parses the chain. The header is read now; data is touched only when the request runs.
    pub fn parse<M>(chain: DescriptorChain<M>) -> Result<Self, ChainError>
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        let head = chain.head_index();
        let mem_chain = chain.clone();
        let mem = mem_chain.memory();
        let (mut readable, mut writable) = split_chain(chain)?;
        if readable.len() < HEADER_LEN {
            return Err(ChainError::ShortHeader(readable.len()));
        }
        if writable.is_empty() {
            return Err(ChainError::NoStatus);
        }
        let header_list = readable.split_front(HEADER_LEN);
        let mut header = [0u8; HEADER_LEN as usize];
        header_list
            .read_into(mem, 0, &mut header)
            .map_err(|_| ChainError::Malformed)?;
        let kind = RequestKind::from_type(u32::from_le_bytes(header[0..4].try_into().unwrap()));
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let status = writable.split_back(1);
        Ok(Request {
            head,
            kind,
            sector,
            readable,
            writable,
            status,
        })
    }

    /// The byte offset of the first sector, if it does not overflow.
    pub fn offset(&self) -> Option<u64> {
        self.sector.checked_mul(SECTOR_SIZE)
    }
}
