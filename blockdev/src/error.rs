//! Errors of the storage layer; each names the storage and, where it helps, the offset.

use std::io;

/// Result of a storage operation.
pub type Result<T> = std::result::Result<T, Error>;

/// A failed storage operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The storage could not be opened.
    #[error("Could not open '{name}': {}", os_message(source))]
    Open {
        /// File name or URL.
        name: String,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// An I/O operation failed.
    #[error(
        "{op} failed on '{name}' at offset {offset:#x}: {}",
        os_message(source)
    )]
    Io {
        /// What was being done: "read", "write", "flush", ...
        op: &'static str,
        /// File name or URL.
        name: String,
        /// Byte offset of the request.
        offset: u64,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// A read reached past the end of the storage.
    #[error("read of {len} bytes at offset {offset:#x} is past the end of '{name}' (size {size})")]
    PastEnd {
        /// File name or URL.
        name: String,
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Size of the storage.
        size: u64,
    },
    /// A network backend's own failure, worded as qemu words it ("error rbd create: ...").
    #[error("{message}")]
    Backend {
        /// The message.
        message: String,
    },
    /// The backend cannot do what was asked (qemu's wording).
    #[error("{message}")]
    Unsupported {
        /// What the backend cannot do, as qemu says it.
        message: String,
    },
    /// The options given to open the storage cannot be honoured together (qemu's wording).
    #[error("{message}")]
    InvalidOptions {
        /// What is wrong, as qemu says it.
        message: String,
    },
    /// Another process uses the image in a way that conflicts with this open: it holds a
    /// permission this opener does not share, or does not share one this opener needs
    /// (`shared`). QEMU's image locking; the message is QEMU's.
    #[error(
        "Failed to get {}\"{}\" lock{}\nIs another process using the image [{name}]?",
        if *shared { "shared " } else { "" },
        perm.names(),
        reason_suffix(source)
    )]
    Locked {
        /// File name.
        name: String,
        /// The permission in conflict.
        perm: crate::Perm,
        /// Whether the conflict is with not sharing `perm` (someone else holds it).
        shared: bool,
        /// Why the conflict test itself failed, if it did (`None`: a real conflict).
        source: Option<io::Error>,
    },
    /// A lock byte could not be taken (QEMU's image locking).
    #[error("Failed to lock byte {byte}{}", reason_suffix(source))]
    LockByte {
        /// File name.
        name: String,
        /// The byte offset.
        byte: u64,
        /// The operating system's reason (`None`: another process holds the byte).
        source: Option<io::Error>,
    },
    /// A write was attempted on storage opened read-only.
    #[error("'{name}' is opened read-only")]
    ReadOnly {
        /// File name or URL.
        name: String,
    },
}

impl Error {
    /// The underlying OS error, if there is one.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Open { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// ": reason" after a lock message, when there is a reason to give.
fn reason_suffix(e: &Option<io::Error>) -> String {
    e.as_ref()
        .map(|e| format!(": {}", os_message(e)))
        .unwrap_or_default()
}

/// An OS error as strerror words it ("No such file or directory"), without Rust's
/// " (os error 2)" suffix, so messages read like qemu-img's.
pub fn os_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if e.raw_os_error().is_some() => text[..i].to_string(),
        _ => text,
    }
}
