//! Device models driven by the img engine, and the transports that expose them to guests.
//!
//! - [`virtio_blk`]: the virtio-blk device model, independent of its transport.
//! - [`vhost_user`]: vhost-user-blk, serving that model to a VMM in another process.
//! - [`qmp`]: the QEMU Machine Protocol server and its block commands.
//! - [`scsi`]: SCSI target emulation (disks and CD-ROMs) over images.
//! - [`virtio_scsi`]: the virtio-scsi controller model, independent of its transport.
//! - [`virtio_mmio`]: the virtio-mmio transport of the `vmm` machine.
//! - [`sg_list`]: guest buffers as byte streams.
//! - [`executor`]: the worker threads that keep many requests in flight.
//! - [`iothread`]: threads that wait on devices' notifications (`-object iothread`).
//! - [`machine`]: an x86-64 KVM machine (the `vmm` binary).

mod bounce;
pub mod executor;
pub mod iothread;
pub mod machine;
pub mod qmp;
pub mod scsi;
pub mod sg_list;
pub mod stats;
#[cfg(test)]
mod test_images;
pub mod vhost_user;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod virtio_scsi;
