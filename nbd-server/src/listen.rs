//! Accepting clients: the connection limit, persistence and shutdown.

use crate::{serve_connection, Export};
use blockdev::nbd::Stream;
use std::io;
use std::net::TcpListener;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// A listening socket.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain.
    Unix(UnixListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
        })
    }
}

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Most clients connected at once (`-e`); 0 is unlimited. Further clients wait to be
    /// accepted until one leaves.
    pub shared: usize,
    /// Keep serving after the last client left (`-t`); otherwise the server returns once
    /// every client has gone (after the first one came).
    pub persistent: bool,
    /// Print a line per connection and error (`-v`).
    pub verbose: bool,
    /// Longest wait for a negotiation message (`--handshake-limit`; `None`: no limit).
    pub handshake_limit: Option<Duration>,
}

#[derive(Default)]
struct Clients {
    active: usize,
    served: usize,
    /// Handles to shut the connections with, on stop.
    sockets: Vec<(u64, Stream)>,
    next_id: u64,
}

/// Waits until `fd` is readable or `stop` is set; polls in short slices so a signal handler
/// that only sets the flag is noticed.
fn wait_readable(fd: RawFd, stop: impl Fn() -> bool) -> bool {
    loop {
        if stop() {
            return false;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is a valid pollfd for the duration of the call, and the count is 1.
        let n = unsafe { libc::poll(&mut p, 1, 200) };
        if n > 0 {
            return true;
        }
    }
}

/// Serves `export` on `listener` until `stop` is set, or (without `persistent`) until the
/// last client has disconnected. Connections still open when it stops are shut down.
pub fn serve(
    listener: Listener,
    export: Arc<Export>,
    opts: &ServeOptions,
    stop: &AtomicBool,
) -> io::Result<()> {
    let clients = Arc::new((Mutex::new(Clients::default()), Condvar::new()));
    let mut threads = Vec::new();
    loop {
        // Wait for a free slot (or, without -t, for the end once everyone left).
        {
            let (lock, cv) = &*clients;
            let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if !opts.persistent && c.served > 0 && c.active == 0 {
                    stop.store(true, Ordering::SeqCst);
                    break;
                }
                if opts.shared == 0 || c.active < opts.shared {
                    break;
                }
                c = cv
                    .wait_timeout(c, Duration::from_millis(200))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // Without -t, the last client leaving while we poll ends the server.
        let done = || {
            let c = clients.0.lock().unwrap_or_else(|e| e.into_inner());
            stop.load(Ordering::SeqCst) || (!opts.persistent && c.served > 0 && c.active == 0)
        };
        if !wait_readable(listener.fd(), done) {
            break;
        }
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let id = {
            let mut c = clients.0.lock().unwrap_or_else(|e| e.into_inner());
            c.active += 1;
            c.served += 1;
            c.next_id += 1;
            let id = c.next_id;
            if let Ok(h) = stream.try_clone() {
                c.sockets.push((id, h));
            }
            id
        };
        let export = export.clone();
        let clients2 = clients.clone();
        let verbose = opts.verbose;
        let limit = opts.handshake_limit;
        threads.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
        threads.push(std::thread::spawn(move || {
            if let Err(e) = serve_connection(stream, &export, limit) {
                if verbose {
                    eprintln!("img: Disconnect client, due to: {e}");
                }
            }
            let (lock, cv) = &*clients2;
            let mut c = lock.lock().unwrap_or_else(|e| e.into_inner());
            c.active -= 1;
            c.sockets.retain(|(i, _)| *i != id);
            cv.notify_all();
        }));
    }
    {
        let c = clients.0.lock().unwrap_or_else(|e| e.into_inner());
        for (_, s) in &c.sockets {
            s.shutdown();
        }
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}
