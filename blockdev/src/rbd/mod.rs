//! Ceph RBD images as storage, through librbd (the `librbd-sys` bindings).
//!
//! `name` parses QEMU's `rbd:` names, `cluster` connects to the cluster and opens the pool,
//! `image` wraps an open image and its asynchronous I/O, `extents` answers allocation queries, and `storage` puts it behind
//! [`crate::Storage`].

mod cluster;
mod extents;
mod image;
mod name;
mod storage;

pub use name::{is_rbd_name, RbdName};
pub use storage::RbdStorage;
