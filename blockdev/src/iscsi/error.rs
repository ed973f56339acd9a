//! What can go wrong talking to an iSCSI target. These are the reasons inside the storage
//! layer's [`crate::Error`], which adds the URL and the offset.

/// Why an iSCSI operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IscsiError {
    /// The name is not a valid `iscsi://` URL.
    #[error("invalid iSCSI URL: {0}")]
    Url(String),
    /// Creating the context, logging in, or the transport failed (libiscsi's own message).
    #[error("{0}")]
    Session(String),
    /// The target answered a command with a status other than GOOD.
    #[error("{command} failed: {status}{}", sense.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Scsi {
        /// The SCSI command, e.g. "READ(16)".
        command: &'static str,
        /// The SCSI status in words ("CHECK CONDITION").
        status: String,
        /// The sense key and additional sense code in words, for CHECK CONDITION.
        sense: Option<String>,
        /// The sense key (0 when there was no sense data), to tell ILLEGAL REQUEST apart.
        key: u32,
    },
    /// The target's answer did not make sense.
    #[error("{0}")]
    Protocol(String),
}

impl IscsiError {
    /// Whether the target refused the command as not supported (ILLEGAL REQUEST): a caller may
    /// fall back to another command.
    pub fn is_illegal_request(&self) -> bool {
        matches!(self, IscsiError::Scsi { key: 0x05, .. })
    }

    /// Whether the target reported a UNIT ATTENTION (a new session, a reset, a changed LUN): the
    /// command was not executed and may be reissued.
    pub fn is_unit_attention(&self) -> bool {
        matches!(self, IscsiError::Scsi { key: 0x06, .. })
    }

    /// The error as an `io::Error`, so it can travel as the source of [`crate::Error`].
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::other(self)
    }
}
