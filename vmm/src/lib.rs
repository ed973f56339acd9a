//! Device models driven by the img engine, and the transports that expose them to guests.
//!
//! - [`virtio_blk`]: the virtio-blk device model, independent of its transport.
//! - [`vhost_user`]: vhost-user-blk, serving that model to a VMM in another process.
//! - [`executor`]: the worker threads that keep many requests in flight.
//! - [`machine`]: an x86-64 KVM machine (the `vmm` binary).

pub mod executor;
pub mod machine;
pub mod vhost_user;
pub mod virtio_blk;
