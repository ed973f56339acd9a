//! What a long-running server needs: going to the background only once it is ready (so that
//! a script can connect as soon as the command returns), a pid file, and an orderly stop on
//! SIGTERM, SIGINT or SIGHUP. Shared by `img serve`, `img nbd`, `img mount` and `vmm`.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

/// The child's side of a [`fork_when_ready`]: tells the waiting parent the server is up.
pub struct Readiness {
    pipe: Option<std::fs::File>,
}

impl Readiness {
    /// Lets the parent exit with success. Further calls do nothing.
    pub fn ready(&mut self) {
        if let Some(mut p) = self.pipe.take() {
            let _ = p.write_all(b"1");
        }
    }
}

/// With `background`, forks: the parent waits until the child calls [`Readiness::ready`]
/// (then exits 0) or ends without being ready (then exits with the child's exit code, at
/// least 1, the child having printed why on the shared stderr); the child detaches into its
/// own session and carries on. Without it, nothing happens. Must be called before any
/// thread is started, since only the calling thread survives a fork.
pub fn fork_when_ready(background: bool) -> std::io::Result<Readiness> {
    if !background {
        return Ok(Readiness { pipe: None });
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(context("Failed to create a pipe"));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet (the caller's contract), so the child is a complete
    // copy of this process.
    match unsafe { libc::fork() } {
        -1 => Err(context("Failed to fork")),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            Ok(Readiness {
                pipe: Some(std::fs::File::from(write_end)),
            })
        }
        child => {
            drop(write_end);
            let mut byte = [0u8; 1];
            if matches!(std::fs::File::from(read_end).read(&mut byte), Ok(1)) {
                std::process::exit(0);
            }
            let mut status = 0;
            // SAFETY: waiting for our own child, with a valid place for its status.
            let waited = unsafe { libc::waitpid(child, &mut status, 0) } == child;
            let code = if waited && libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status).max(1)
            } else {
                1
            };
            std::process::exit(code);
        }
    }
}

/// The last OS error, with what was being done.
fn context(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Sends the child's standard streams to /dev/null, once it is ready and detached, so that
/// it does not keep the parent's terminal or pipes open.
pub fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, from a descriptor we hold open.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

/// A pid file, removed again when dropped.
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes this process's id to `path`.
    pub fn create(path: &str) -> std::io::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
            std::io::Error::new(e.kind(), format!("Failed to write pid file '{path}': {e}"))
        })?;
        Ok(PidFile(PathBuf::from(path)))
    }

    /// Removes the file now (for a process about to `exit`, which skips destructors).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// The signals that ask a server to stop.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset only adds valid signals.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the stop signals in this thread and every thread it starts afterwards, so that
/// they are only ever taken by [`on_stop_signal`]'s thread. Call before starting threads.
pub fn block_stop_signals() {
    let set = stop_set();
    // SAFETY: `set` is an initialised signal set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Calls `f` with the number of each stop signal that arrives, on a thread of its own, until
/// `f` returns true (the stop is under way). [`block_stop_signals`] must have been called
/// first.
pub fn on_stop_signal(
    mut f: impl FnMut(libc::c_int) -> bool + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("img-signals".into())
        .spawn(move || {
            let set = stop_set();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is initialised and `sig` is a valid place for the number.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 && f(sig) {
                    return;
                }
            }
        })
        .map(drop)
}
