//! A virtio-blk request as the driver laid it out in a descriptor chain.
//!
//! The chain is read as two byte streams rather than as descriptors, since a driver may split
//! or merge the header, the data and the status byte across descriptors in any way (the spec's
//! VIRTIO_F_ANY_LAYOUT, mandatory since virtio 1.0): the device-readable stream starts with
//! the 16-byte request header, and the device-writable stream ends with the status byte.

use super::{SECTOR_SIZE, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID};
use super::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES};
use std::ops::Deref;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Bytes of the request header: type (le32), reserved (le32), sector (le64).
pub const HEADER_LEN: u64 = 16;

/// Bytes of one discard or write-zeroes segment: sector (le64), sectors (le32), flags (le32).
pub const SEGMENT_LEN: u64 = 16;

/// Why a chain is not a request the device can even answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    /// The descriptor chain itself is broken (a loop, an address outside guest memory, a bad
    /// indirect table).
    #[error("malformed descriptor chain")]
    Malformed,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 readable bytes: no header.
    #[error("request header missing ({0} readable bytes)")]
    ShortHeader(u64),
    /// No writable byte for the status.
    #[error("no writable byte for the request status")]
    NoStatus,
}

/// A scatter-gather list: guest buffers making up one byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SgList {
    segments: Vec<(GuestAddress, u64)>,
    len: u64,
}

impl SgList {
    fn push(&mut self, addr: GuestAddress, len: u64) {
        if len > 0 {
            self.segments.push((addr, len));
            self.len += len;
        }
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the list holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Splits off the first `n` bytes (at most all of them) into a list of their own.
    pub fn split_front(&mut self, n: u64) -> SgList {
        let mut front = SgList::default();
        let mut rest = SgList::default();
        let mut left = n;
        for &(addr, len) in &self.segments {
            let take = left.min(len);
            front.push(addr, take);
            // Guest addresses may wrap; such a segment fails when it is accessed.
            rest.push(GuestAddress(addr.0.wrapping_add(take)), len - take);
            left -= take;
        }
        *self = rest;
        front
    }

    /// Splits off the last `n` bytes (at most all of them) into a list of their own.
    pub fn split_back(&mut self, n: u64) -> SgList {
        let keep = self.len.saturating_sub(n);
        let front = self.split_front(keep);
        std::mem::replace(self, front)
    }

    /// Copies `buf.len()` bytes starting `offset` bytes into the list out of guest memory.
    pub fn read_into<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        self.walk(offset, buf.len() as u64, |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], addr)
        })
    }

    /// Copies `buf` into guest memory, starting `offset` bytes into the list.
    pub fn write_from<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        self.walk(offset, buf.len() as u64, |addr, at, n| {
            mem.write_slice(&buf[at..at + n], addr)
        })
    }

    /// Calls `f(guest address, offset in the caller's buffer, length)` for each piece of the
    /// `len` bytes starting `offset` bytes into the list.
    fn walk<F>(&self, offset: u64, len: u64, mut f: F) -> Result<(), vm_memory::GuestMemoryError>
    where
        F: FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    {
        let mut skip = offset;
        let mut done = 0u64;
        for &(addr, seg_len) in &self.segments {
            if done == len {
                break;
            }
            if skip >= seg_len {
                skip -= seg_len;
                continue;
            }
            let n = (seg_len - skip).min(len - done);
            let start = addr
                .0
                .checked_add(skip)
                .ok_or(vm_memory::GuestMemoryError::InvalidGuestAddress(addr))?;
            f(GuestAddress(start), done as usize, n as usize)?;
            done += n;
            skip = 0;
        }
        if done < len {
            return Err(vm_memory::GuestMemoryError::PartialBuffer {
                expected: len as usize,
                completed: done as usize,
            });
        }
        Ok(())
    }
}

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
        let mut readable = SgList::default();
        let mut writable = SgList::default();
        let mut count = 0usize;
        for desc in chain {
            count += 1;
            if desc.is_write_only() {
                writable.push(desc.addr(), u64::from(desc.len()));
            } else if !writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable);
            } else {
                readable.push(desc.addr(), u64::from(desc.len()));
            }
        }
        if count == 0 {
            return Err(ChainError::Malformed);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn list(parts: &[(u64, u64)]) -> SgList {
        let mut l = SgList::default();
        for &(a, n) in parts {
            l.push(GuestAddress(a), n);
        }
        l
    }

    #[test]
    fn splits_keep_every_byte_once() {
        let mut l = list(&[(0x1000, 10), (0x2000, 6), (0x3000, 1)]);
        let front = l.split_front(12);
        assert_eq!(front, list(&[(0x1000, 10), (0x2000, 2)]));
        assert_eq!(l, list(&[(0x2002, 4), (0x3000, 1)]));
        let back = l.split_back(1);
        assert_eq!(back, list(&[(0x3000, 1)]));
        assert_eq!(l, list(&[(0x2002, 4)]));
        let mut short = list(&[(0, 3)]);
        assert_eq!(short.split_back(5), list(&[(0, 3)]));
        assert!(short.is_empty());
    }
}
