//! Errors of the block layer, with messages that name the file and, where it helps, the offset.

/// Result of an image operation.
pub type Result<T> = std::result::Result<T, Error>;

/// A failed image operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage underneath failed.
    #[error(transparent)]
    Storage(#[from] blockdev::Error),

    /// The image's metadata is malformed or out of range; it cannot be opened.
    #[error("'{file}': {reason}")]
    Invalid {
        /// The image file.
        file: String,
        /// What is wrong, in words a user can act on.
        reason: String,
    },

    /// Metadata found during an operation points somewhere impossible.
    #[error("'{file}': corrupt metadata at offset {offset:#x}: {reason}")]
    Corrupt {
        /// The image file.
        file: String,
        /// Where the bad metadata is (or what it points to).
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// The image uses a feature this version does not support.
    #[error("'{file}': {what}")]
    Unsupported {
        /// The image file.
        file: String,
        /// What is not supported, as a whole sentence ("... is not supported yet").
        what: String,
    },

    /// A write was attempted on an image opened read-only.
    #[error("'{file}': image is opened read-only")]
    ReadOnly {
        /// The image file.
        file: String,
    },

    /// A request reaches past the end of the virtual disk.
    #[error("'{file}': request at offset {offset} length {len} is past the end of the disk (size {size})")]
    OutOfRange {
        /// The image file.
        file: String,
        /// Offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Virtual size of the image.
        size: u64,
    },

    /// A backing file of the image could not be opened.
    #[error("'{file}': Could not open backing file: {}", .source.reason())]
    BackingOpen {
        /// The image whose chain was being opened.
        file: String,
        /// Why the backing file could not be opened.
        source: Box<Error>,
    },

    /// A convert failed reading its sources or writing its target (qemu-img's wording: the
    /// byte is the start of the failed piece in the target).
    #[error("error while {op} at byte {offset}: {}", .source.reason())]
    ConvertIo {
        /// "reading" or "writing".
        op: &'static str,
        /// Target offset of the piece that failed.
        offset: u64,
        /// What failed.
        source: Box<Error>,
    },

    /// No internal snapshot has the ID or name asked for.
    #[error("'{file}': no snapshot '{name}'")]
    SnapshotNotFound {
        /// The image file.
        file: String,
        /// The ID or name looked for.
        name: String,
    },

    /// An option given by the user is invalid.
    #[error("{0}")]
    InvalidArgument(String),
}

impl Error {
    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(file: &str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            file: file.to_string(),
            reason: reason.into(),
        }
    }

    /// The reason alone, without the file name the message would start with: what a user
    /// sees after "Could not open 'FILE': ", as qemu words it.
    pub fn reason(&self) -> String {
        match self {
            Error::Invalid { reason, .. } => reason.clone(),
            Error::Unsupported { what, .. } => what.clone(),
            Error::InvalidArgument(m) => m.clone(),
            Error::BackingOpen { source, .. } => {
                format!("Could not open backing file: {}", source.reason())
            }
            other => other.to_string(),
        }
    }

    /// Shorthand for [`Error::Corrupt`].
    pub fn corrupt(file: &str, offset: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            file: file.to_string(),
            offset,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(file: &str, what: impl Into<String>) -> Self {
        Error::Unsupported {
            file: file.to_string(),
            what: what.into(),
        }
    }
}
