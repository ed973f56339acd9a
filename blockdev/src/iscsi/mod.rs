//! iSCSI through libiscsi: `iscsi://` names ([`IscsiUrl`]), a safe wrapper around a libiscsi
//! session ([`context`]), its errors ([`IscsiError`]) and the storage ([`IscsiStorage`]).
//!
//! READ and WRITE go through libiscsi's task API, several commands in flight per session, over a
//! small pool of sessions per LUN (see [`IscsiStorage`]'s module for why and for the flush
//! semantics); the rarer commands use libiscsi's synchronous calls.

pub mod context;
mod error;
mod storage;
mod url;

pub use error::IscsiError;
pub use storage::{IscsiOptions, IscsiStorage};
pub use url::IscsiUrl;

/// Whether `name` is an iSCSI name (`iscsi://...`) rather than a file name.
pub fn is_iscsi_name(name: &str) -> bool {
    name.starts_with("iscsi://")
}
