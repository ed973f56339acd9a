//! Sense data: why a command ended with CHECK CONDITION.

/// A sense key with its additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// The sense key (NOT READY, MEDIUM ERROR, ILLEGAL REQUEST, ...).
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

impl Sense {
    /// NOT READY: medium not present.
    pub const NO_MEDIUM: Sense = Sense::new(0x02, 0x3a, 0x00);
    /// MEDIUM ERROR: unrecovered read error.
    pub const READ_ERROR: Sense = Sense::new(0x03, 0x11, 0x00);
    /// MEDIUM ERROR: write error.
    pub const WRITE_ERROR: Sense = Sense::new(0x03, 0x0c, 0x00);
    /// HARDWARE ERROR: internal target failure (a flush or a discard that failed).
    pub const TARGET_FAILURE: Sense = Sense::new(0x04, 0x44, 0x00);
    /// ILLEGAL REQUEST: invalid command operation code.
    pub const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    /// ILLEGAL REQUEST: logical block address out of range.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    /// ILLEGAL REQUEST: invalid field in CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(0x05, 0x24, 0x00);
    /// ILLEGAL REQUEST: logical unit not supported.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x25, 0x00);
    /// ILLEGAL REQUEST: invalid field in parameter list.
    pub const INVALID_PARAMETER: Sense = Sense::new(0x05, 0x26, 0x00);
    /// ILLEGAL REQUEST: parameter list length error.
    pub const PARAMETER_LENGTH: Sense = Sense::new(0x05, 0x1a, 0x00);
    /// ILLEGAL REQUEST: medium removal prevented.
    pub const REMOVAL_PREVENTED: Sense = Sense::new(0x05, 0x53, 0x02);
    /// UNIT ATTENTION: not ready to ready change, medium may have changed.
    pub const MEDIUM_CHANGED: Sense = Sense::new(0x06, 0x28, 0x00);
    /// DATA PROTECT: write protected.
    pub const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);
    /// ABORTED COMMAND: the initiator's buffers could not be accessed.
    pub const TRANSFER_FAILED: Sense = Sense::new(0x0b, 0x00, 0x00);

    /// The sense `key`/`asc`/`ascq`.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// Fixed-format sense data (response code 0x70, 18 bytes).
    pub fn to_fixed(self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}
