//! An NBD server exporting an [`img_core::Image`].
//!
//! Fixed newstyle negotiation (EXPORT_NAME, GO, INFO, LIST, ABORT, STRUCTURED_REPLY,
//! LIST_META_CONTEXT and SET_META_CONTEXT with `base:allocation`), then transmission with
//! several requests in flight per connection: one thread reads requests, a few workers run
//! them against the image, and replies go out whole under a writer lock. Reads answer with
//! structured replies when negotiated, zero ranges as hole chunks, so clients (qemu-img map,
//! nbdinfo) see holes and zeros. Every length a client sends is bounded before memory is
//! allocated for it.

mod conn;
mod listen;

pub use conn::serve_connection;
pub use listen::{serve, Listener, ServeOptions};

use img_core::Image;
use std::sync::Arc;

/// What a server exports.
pub struct Export {
    /// The export name clients ask for ("" is the default export).
    pub name: String,
    /// A description shown by LIST and INFO (`-D`).
    pub description: Option<String>,
    /// The image.
    pub image: Arc<Image>,
    /// Refuse writes (`-r`), also when the image itself is writable.
    pub read_only: bool,
}

impl Export {
    /// Whether writes are refused.
    pub fn is_read_only(&self) -> bool {
        self.read_only || self.image.is_read_only()
    }

    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        use blockdev::nbd::proto::*;
        let mut flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_DF
            | TFLAG_SEND_CACHE
            // Every connection shares one Image (one cache, one set of metadata), so what one
            // connection flushed is what every other one reads.
            | TFLAG_CAN_MULTI_CONN;
        if self.is_read_only() {
            flags |= TFLAG_READ_ONLY;
        } else {
            flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
        }
        flags
    }
}

/// The NBD error value for an image error.
pub fn error_code(e: &img_core::Error) -> u32 {
    use blockdev::nbd::proto::*;
    match e {
        img_core::Error::ReadOnly { .. } => EPERM,
        img_core::Error::OutOfRange { .. } => EINVAL,
        img_core::Error::Storage(blockdev::Error::ReadOnly { .. }) => EPERM,
        img_core::Error::Storage(s) => s.io_error().map(from_io_error).unwrap_or(EIO),
        img_core::Error::Unsupported { .. } => ENOTSUP,
        _ => EIO,
    }
}
