//! What the device offers the driver: feature bits and the configuration space.

use super::features::*;
use super::{ID_BYTES, SECTOR_SIZE};

/// Limits of one discard or write-zeroes request: ranges per request, and sectors per range
/// (chosen so that one range is at most 1 GiB, which bounds the time one request holds a
/// worker).
const MAX_RANGES: u32 = 32;
const MAX_RANGE_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

/// How the device is set up, apart from the image.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Number of virtqueues (request queues), 1 or more.
    pub num_queues: u16,
    /// Size of each virtqueue.
    pub queue_size: u16,
    /// Refuse writes, and tell the driver the disk is read-only.
    pub read_only: bool,
    /// Logical block size the driver must align requests to (512, 4096, ...).
    pub logical_block_size: u32,
    /// Serial number returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            num_queues: 1,
            queue_size: 256,
            read_only: false,
            logical_block_size: SECTOR_SIZE as u32,
            serial: String::new(),
        }
    }
}

/// The negotiable facts of one device: its features and its configuration space.
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Options the device was made with.
    pub options: DeviceOptions,
    /// Serial number, padded with zeros.
    pub serial: [u8; ID_BYTES],
}

impl BlockConfig {
    /// The configuration of a device of `size` bytes. A size that is not a multiple of the
    /// sector is rounded down: the tail cannot be addressed by the driver, as with QEMU.
    pub fn new(size: u64, options: DeviceOptions) -> Self {
        let mut serial = [0u8; ID_BYTES];
        let bytes = options.serial.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&bytes[..n]);
        BlockConfig {
            capacity: size / SECTOR_SIZE,
            options,
            serial,
        }
    }

    /// Maximum ranges in one discard or write-zeroes request.
    pub fn max_ranges(&self) -> u32 {
        MAX_RANGES
    }

    /// Maximum sectors of one discard or write-zeroes range.
    pub fn max_range_sectors(&self) -> u32 {
        MAX_RANGE_SECTORS
    }

    /// The virtio-blk features offered (transport features such as VERSION_1 included).
    pub fn features(&self) -> u64 {
        let mut bits = [
            VERSION_1,
            RING_INDIRECT_DESC,
            RING_EVENT_IDX,
            SEG_MAX,
            BLK_SIZE,
            TOPOLOGY,
            FLUSH,
            MQ,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | 1 << b);
        if self.options.read_only {
            bits |= 1 << RO;
        } else {
            // Discarding and zeroing write; a read-only disk offers neither.
            bits |= 1 << DISCARD | 1 << WRITE_ZEROES;
        }
        bits
    }

    /// The configuration space, `struct virtio_blk_config` in little endian (60 bytes: the
    /// fields up to and including `write_zeroes_may_unmap` and its padding).
    pub fn to_bytes(&self) -> Vec<u8> {
        let o = &self.options;
        let mut c = Vec::with_capacity(60);
        c.extend_from_slice(&self.capacity.to_le_bytes());
        // size_max (unused: SIZE_MAX not offered) and seg_max: a chain holds at most
        // queue_size descriptors, two of which are the header and the status.
        c.extend_from_slice(&0u32.to_le_bytes());
        c.extend_from_slice(&u32::from(o.queue_size.saturating_sub(2).max(1)).to_le_bytes());
        // geometry: cylinders, heads, sectors (unused).
        c.extend_from_slice(&[0, 0, 0, 0]);
        c.extend_from_slice(&o.logical_block_size.to_le_bytes());
        // topology: physical block exponent, alignment offset, min and optimal I/O size
        // (in logical blocks).
        c.push(0);
        c.push(0);
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes());
        // writeback (CONFIG_WCE not offered), unused.
        c.push(0);
        c.push(0);
        c.extend_from_slice(&o.num_queues.to_le_bytes());
        // discard: max sectors, max segments, sector alignment (in sectors).
        c.extend_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c.extend_from_slice(&MAX_RANGES.to_le_bytes());
        c.extend_from_slice(&(o.logical_block_size / SECTOR_SIZE as u32).to_le_bytes());
        // write zeroes: max sectors, max segments, may unmap.
        c.extend_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        c.extend_from_slice(&MAX_RANGES.to_le_bytes());
        c.push(1);
        c.extend_from_slice(&[0, 0, 0]);
        debug_assert_eq!(c.len(), 60);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_spec_offsets() {
        let cfg = BlockConfig::new(
            1 << 30,
            DeviceOptions {
                num_queues: 4,
                logical_block_size: 4096,
                ..Default::default()
            },
        );
        let b = cfg.to_bytes();
        let le32 = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 2 << 20);
        assert_eq!(le32(12), 254, "seg_max");
        assert_eq!(le32(20), 4096, "blk_size");
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4, "num_queues");
        assert_eq!(le32(36), MAX_RANGE_SECTORS);
        assert_eq!(le32(40), MAX_RANGES);
        assert_eq!(le32(44), 8, "discard alignment in sectors");
        assert_eq!(le32(48), MAX_RANGE_SECTORS);
        assert_eq!(b[56], 1, "write_zeroes_may_unmap");
    }

    #[test]
    fn read_only_offers_no_writing_features() {
        let ro = BlockConfig::new(
            4096,
            DeviceOptions {
                read_only: true,
                ..Default::default()
            },
        );
        let f = ro.features();
        assert_ne!(f & 1 << RO, 0);
        assert_eq!(f & (1 << DISCARD | 1 << WRITE_ZEROES), 0);
        let rw = BlockConfig::new(4096, DeviceOptions::default());
        assert_eq!(rw.features() & 1 << RO, 0);
        assert_ne!(rw.features() & 1 << DISCARD, 0);
    }
}
