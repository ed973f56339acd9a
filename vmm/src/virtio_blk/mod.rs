//! The virtio-blk device model (virtio 1.x, section 5.2), independent of its transport.
//!
//! A transport (vhost-user today, virtio-pci in our own VMM later) pops descriptor chains,
//! parses each into a [`Request`], and hands it to [`BlockDevice::execute`] on a worker
//! thread; the device runs it against the engine's [`img_core::Image`] and writes the status
//! byte. Feature bits and the configuration space come from [`BlockConfig`].

mod config;
mod device;
mod request;

pub use config::{BlockConfig, DeviceOptions};
pub use device::{BlockDevice, BlockStats, Completion};
pub use request::{ChainError, Request, RequestKind, SgList, HEADER_LEN, SEGMENT_LEN};

/// The unit of the request header's `sector` field and of the capacity, whatever the block
/// size.
pub const SECTOR_SIZE: u64 = 512;

/// Read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush the volatile write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device serial number.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Discard ranges.
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
/// Zero ranges.
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

/// Success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// The request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// The request is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Bytes of a GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Feature bits (their bit numbers).
pub mod features {
    /// `seg_max` in the configuration is valid.
    pub const SEG_MAX: u32 = 2;
    /// The device is read-only.
    pub const RO: u32 = 5;
    /// `blk_size` in the configuration is valid.
    pub const BLK_SIZE: u32 = 6;
    /// FLUSH requests are supported.
    pub const FLUSH: u32 = 9;
    /// The topology fields of the configuration are valid.
    pub const TOPOLOGY: u32 = 10;
    /// `num_queues` in the configuration is valid.
    pub const MQ: u32 = 12;
    /// DISCARD requests are supported.
    pub const DISCARD: u32 = 13;
    /// WRITE_ZEROES requests are supported.
    pub const WRITE_ZEROES: u32 = 14;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// Used and available event indexes (notification suppression).
    pub const RING_EVENT_IDX: u32 = 29;
    /// virtio 1.0 or later.
    pub const VERSION_1: u32 = 32;
}

#[cfg(test)]
mod tests;
