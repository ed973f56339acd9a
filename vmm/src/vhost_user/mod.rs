//! vhost-user: serving devices to a front end (QEMU, Cloud Hypervisor, crosvm) in another
//! process, over a unix socket, with the guest's memory shared.

mod blk;

pub use blk::VhostUserBlk;

use crate::executor::Executor;
use crate::virtio_blk::BlockDevice;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be made.
    #[error("Failed to listen on '{path}': {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: vhost::vhost_user::Error,
    },
    /// The vhost-user framework failed.
    #[error("vhost-user: {0}")]
    Daemon(String),
    /// Worker threads could not be started.
    #[error("Failed to start worker threads: {0}")]
    Threads(#[from] std::io::Error),
}

/// Lets another thread (a signal handler's) stop a running [`serve`].
#[derive(Default, Clone)]
pub struct Stopper {
    inner: Arc<StopperInner>,
}

#[derive(Default)]
struct StopperInner {
    stopping: AtomicBool,
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Stopper {
    /// Asks `serve` to end: the current connection is cut, and no new one is served.
    pub fn stop(&self) {
        self.inner.stopping.store(true, Ordering::Release);
        if let Some(h) = self.inner.connection.lock().unwrap().as_ref() {
            h.shutdown();
        }
    }

    /// Whether [`Stopper::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }
}

/// Serves `device` as vhost-user-blk on the unix socket at `socket` (replacing a stale one),
/// one front end at a time, until `stopper` says stop. The device is flushed whenever a front
/// end disconnects. `on_listening` runs once the socket accepts connections.
pub fn serve_blk(
    socket: &Path,
    device: Arc<BlockDevice>,
    workers: usize,
    stopper: &Stopper,
    on_listening: impl FnOnce(),
) -> Result<(), ServeError> {
    let mut listener = Listener::new(socket, true).map_err(|source| ServeError::Listen {
        path: socket.to_path_buf(),
        source,
    })?;
    on_listening();
    let executor = Arc::new(Executor::new("img-blk", workers)?);
    while !stopper.is_stopping() {
        let backend = Arc::new(VhostUserBlk::new(
            Arc::clone(&device),
            Arc::clone(&executor),
        ));
        let mut daemon = VhostUserDaemon::new(
            "img-vhost-user-blk".into(),
            Arc::clone(&backend),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
        daemon
            .start(&mut listener)
            .map_err(|e| ServeError::Daemon(e.to_string()))?;
        *stopper.inner.connection.lock().unwrap() = daemon.shutdown_handle();
        if stopper.is_stopping() {
            daemon.request_shutdown();
        }
        let result = daemon.wait();
        stopper.inner.connection.lock().unwrap().take();
        backend.drain();
        drop(daemon);
        if let Err(e) = device.flush() {
            eprintln!("img: {}: flush failed: {e}", device.name());
        }
        match result {
            // A front end going away (a guest powered off, QEMU quit) is the normal end.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => {}
            Err(e) if !stopper.is_stopping() => {
                eprintln!("img: vhost-user connection ended: {e}")
            }
            Err(_) => {}
        }
    }
    executor.shutdown();
    Ok(())
}
