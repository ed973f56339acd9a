//! Operation codes, and the fields of the command descriptor blocks this target decodes.

pub const TEST_UNIT_READY: u8 = 0x00;
pub const REQUEST_SENSE: u8 = 0x03;
pub const READ_6: u8 = 0x08;
pub const WRITE_6: u8 = 0x0a;
pub const INQUIRY: u8 = 0x12;
pub const MODE_SENSE_6: u8 = 0x1a;
pub const START_STOP_UNIT: u8 = 0x1b;
pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
pub const READ_CAPACITY_10: u8 = 0x25;
pub const READ_10: u8 = 0x28;
pub const WRITE_10: u8 = 0x2a;
pub const VERIFY_10: u8 = 0x2f;
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
pub const WRITE_SAME_10: u8 = 0x41;
pub const UNMAP: u8 = 0x42;
pub const READ_TOC: u8 = 0x43;
pub const GET_CONFIGURATION: u8 = 0x46;
pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
pub const MODE_SENSE_10: u8 = 0x5a;
pub const READ_16: u8 = 0x88;
pub const WRITE_16: u8 = 0x8a;
pub const VERIFY_16: u8 = 0x8f;
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
pub const WRITE_SAME_16: u8 = 0x93;
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
pub const REPORT_LUNS: u8 = 0xa0;
/// SERVICE ACTION IN(16)'s READ CAPACITY(16).
pub const SA_READ_CAPACITY_16: u8 = 0x10;

/// The length of a CDB by its operation code's group (SPC-4 4.2.5.1); `None` for the
/// vendor-specific and reserved groups.
pub fn cdb_len(op: u8) -> Option<usize> {
    match op >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

pub fn be16(b: &[u8]) -> u64 {
    u64::from(u16::from_be_bytes([b[0], b[1]]))
}

pub fn be24(b: &[u8]) -> u64 {
    u64::from(b[0]) << 16 | be16(&b[1..])
}

pub fn be32(b: &[u8]) -> u64 {
    u64::from(u32::from_be_bytes(b[..4].try_into().unwrap()))
}

pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// A READ or WRITE: first block, number of blocks, and force unit access.
pub struct Transfer {
    pub lba: u64,
    pub blocks: u64,
    pub fua: bool,
}

/// Decodes READ/WRITE(6), (10) and (16); the caller has checked the CDB's length.
pub fn transfer(cdb: &[u8]) -> Transfer {
    match cdb[0] {
        READ_6 | WRITE_6 => Transfer {
            lba: be24(&cdb[1..4]) & 0x1f_ffff,
            // A length of 0 means 256 blocks.
            blocks: match cdb[4] {
                0 => 256,
                n => u64::from(n),
            },
            fua: false,
        },
        READ_10 | WRITE_10 | VERIFY_10 => Transfer {
            lba: be32(&cdb[2..6]),
            blocks: be16(&cdb[7..9]),
            fua: cdb[1] & 0x08 != 0,
        },
        _ => Transfer {
            lba: be64(&cdb[2..10]),
            blocks: be32(&cdb[10..14]),
            fua: cdb[1] & 0x08 != 0,
        },
    }
}
