//! iSCSI through libiscsi: `iscsi://` names ([`IscsiUrl`]), a safe wrapper around a libiscsi
//! session ([`context`]), its errors ([`IscsiError`]) and the storage ([`IscsiStorage`]).
//!
//! The first version drives libiscsi's synchronous calls from behind one mutex: one command at a
//! time per LUN. That is simple and safe; the asynchronous task API (several commands in flight
//! on one session) is the step after.

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
