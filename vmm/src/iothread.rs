//! I/O threads: a thread that waits on the notification eventfds of one or more devices and
//! runs each device's handler when its eventfd fires (QEMU's `-object iothread`).
//!
//! A device given no I/O thread gets one of its own, so by default devices never wait on each
//! other; several devices named with the same `iothread=` share one thread. The handler only
//! pops descriptor chains and hands requests to the executor's workers (whose engine calls
//! block while the I/O runs), so one thread keeps up with many queues.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// What an I/O thread runs when a registered eventfd becomes readable. The handler reads
/// (resets) its eventfd itself.
pub type IoHandler = Box<dyn FnMut() + Send>;

/// Epoll token of the stop eventfd (handlers get 1, 2, ...).
const STOP: u64 = 0;

struct Handlers {
    next: u64,
    by_token: HashMap<u64, (RawFd, IoHandler)>,
}

/// One I/O thread. Dropping it stops and joins the thread (handlers still registered are
/// dropped with it).
pub struct IoThread {
    name: String,
    epoll: Arc<Epoll>,
    handlers: Arc<Mutex<Handlers>>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl IoThread {
    /// Starts an idle I/O thread called `name` (the `-object iothread,id=` or the device).
    pub fn new(name: &str) -> std::io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let stop = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP),
        )?;
        let handlers = Arc::new(Mutex::new(Handlers {
            next: STOP + 1,
            by_token: HashMap::new(),
        }));
        let thread = {
            let (epoll, handlers) = (Arc::clone(&epoll), Arc::clone(&handlers));
            std::thread::Builder::new()
                .name(name.to_string())
                .spawn(move || run(&epoll, &handlers))?
        };
        Ok(Self {
            name: name.to_string(),
            epoll,
            handlers,
            stop,
            thread: Some(thread),
        })
    }

    /// The thread's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `handler` on this thread whenever `fd` becomes readable. The caller keeps `fd`
    /// open for as long as the thread lives.
    pub fn add(&self, fd: RawFd, handler: IoHandler) -> std::io::Result<()> {
        let mut h = self.handlers.lock().unwrap_or_else(|e| e.into_inner());
        let token = h.next;
        h.next += 1;
        h.by_token.insert(token, (fd, handler));
        // Registered while holding the lock, so the thread never sees a token without its
        // handler.
        if let Err(e) = self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token),
        ) {
            h.by_token.remove(&token);
            return Err(e);
        }
        Ok(())
    }

    /// Number of eventfds the thread waits on.
    pub fn handler_count(&self) -> usize {
        self.handlers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_token
            .len()
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        // Only fails on counter overflow, which a single write cannot cause.
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let h = self.handlers.lock().unwrap_or_else(|e| e.into_inner());
        for (fd, _) in h.by_token.values() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
        }
    }
}

fn run(epoll: &Epoll, handlers: &Mutex<Handlers>) {
    let mut events = vec![EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("vmm: I/O thread: epoll_wait: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            if ev.data() == STOP {
                return;
            }
            let mut h = handlers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, handler)) = h.by_token.get_mut(&ev.data()) {
                handler();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Duration;

    #[test]
    fn handlers_run_on_the_thread_for_their_own_eventfd() {
        let io = IoThread::new("io-test").unwrap();
        let (tx, rx) = channel();
        let fds: Vec<Arc<EventFd>> = (0..3)
            .map(|_| Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()))
            .collect();
        for (i, fd) in fds.iter().enumerate() {
            let (fd2, tx) = (Arc::clone(fd), tx.clone());
            io.add(
                fd.as_raw_fd(),
                Box::new(move || {
                    let _ = fd2.read();
                    let name = std::thread::current().name().map(str::to_string);
                    tx.send((i, name)).unwrap();
                }),
            )
            .unwrap();
        }
        assert_eq!(io.handler_count(), 3);
        fds[2].write(1).unwrap();
        let (i, name) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((i, name.as_deref()), (2, Some("io-test")));
        fds[0].write(1).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap().0, 0);
        // Each notification ran exactly one handler once.
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(io);
        // After the thread stopped, nothing runs any more.
        fds[1].write(1).unwrap();
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
