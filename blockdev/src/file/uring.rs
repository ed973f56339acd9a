//! The io_uring engine: one ring per file, shared by every thread that issues requests on it.
//!
//! # Design
//!
//! There is no completion thread. A request is a slot in a fixed table (its index is the SQE's
//! `user_data`) that points at a [`Waiter`] on the requesting thread's stack; the table's size is
//! the queue depth, so at most `depth` requests are in flight, and a thread that finds the table
//! full waits on a condition variable until a slot frees up. The submission queue has twice as
//! many entries, because the kernel may post a completion before it publishes that it has
//! consumed the SQE; a push that still finds the queue full submits or yields and tries again.
//!
//! Submission is batched: a thread pushes its SQE under the state mutex and counts it as pending;
//! whoever next enters the kernel submits every pending SQE at once (one `io_uring_enter` for
//! all SQEs that several threads pushed meanwhile).
//!
//! Reaping is a role, not a thread. The first requester that finds no reaper becomes the reaper:
//! it submits the pending SQEs and waits in `io_uring_enter(GETEVENTS)` for completions, hands
//! each completion to its waiter (result, then `unpark`), and keeps reaping until its own request
//! has completed. When it leaves, it promotes another waiter that is still in flight to reaper
//! (under the same mutex, so the role is never lost). Other requesters submit their SQEs without
//! waiting and park. At queue depth 1 this makes a request exactly one `io_uring_enter` that
//! submits and waits, with no thread switch; under load one thread waits for everybody.
//!
//! The ring is set up without `COOP_TASKRUN`/`DEFER_TASKRUN`: completions may need task work on
//! whichever thread submitted the SQE, and with several submitting threads the kernel must be
//! allowed to interrupt a parked submitter to run it.
//!
//! The file is registered (IORING_REGISTER_FILES) and named by its fixed index, which saves
//! an fd lookup per request. Buffers are not registered: callers bring arbitrary buffers, and
//! copying into registered ones would cost more than the page pinning it saves.
//!
//! Results are raw: a short read or write is returned as such and the caller (`FileStorage`)
//! issues the rest; so are EINTR, EAGAIN and ECANCELED (the kernel cancels requests whose
//! submitting thread exits, and with batched submission that thread may not be the requester).
//!
//! Drop takes `&mut self`, so no request is in flight then; dropping the ring closes it and no
//! thread is left behind.

use io_uring::{opcode, register::Probe, squeue, types, IoUring};
use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::{self, Thread};

/// `IORING_ENTER_GETEVENTS`: wait for `min_complete` completions.
const ENTER_GETEVENTS: u32 = 1;
/// `IORING_ENTER_SQ_WAKEUP`: wake the SQPOLL kernel thread.
const ENTER_SQ_WAKEUP: u32 = 2;
/// How long the SQPOLL kernel thread polls an idle queue before it sleeps, in milliseconds.
const SQPOLL_IDLE_MS: u32 = 50;

/// Largest length one SQE carries; longer requests complete short and are resubmitted.
pub(super) const MAX_SQE_LEN: usize = 1 << 30;

/// States of a [`Waiter`].
const PENDING: u8 = 0;
const DONE: u8 = 1;
const PROMOTED: u8 = 2;

/// One request's completion slot, on the requester's stack while the request is in flight.
struct Waiter {
    /// The requesting thread, woken when the request completes or it is made reaper.
    thread: Thread,
    /// PENDING, then DONE (result is valid) or PROMOTED (become the reaper).
    state: AtomicU8,
    /// The CQE's result: bytes transferred or a negated errno.
    result: AtomicI32,
}

/// A pointer to a waiter in the slot table.
#[derive(Clone, Copy)]
struct WaiterPtr(*const Waiter);

// SAFETY: the pointee is only accessed through atomics and `Thread` (which is Sync), and it
// outlives its slot: a requester does not return before its waiter is DONE, and the slot is
// cleared (under the state mutex) before DONE is stored.
unsafe impl Send for WaiterPtr {}

/// An I/O request for the ring.
pub(super) enum Op {
    /// Read `len` bytes at `offset` into `buf`.
    Read {
        buf: *mut u8,
        len: usize,
        offset: u64,
    },
    /// Write `len` bytes from `buf` at `offset`.
    Write {
        buf: *const u8,
        len: usize,
        offset: u64,
    },
    /// Read into the `count` buffers of the iovec array at `iov`, from `offset`.
    Readv {
        iov: *const libc::iovec,
        count: u32,
        offset: u64,
    },
    /// Write the `count` buffers of the iovec array at `iov`, at `offset`.
    Writev {
        iov: *const libc::iovec,
        count: u32,
        offset: u64,
    },
    /// fdatasync.
    DataSync,
}

/// Everything the state mutex protects.
struct State {
    /// In-flight requests by slot index (the SQE's user_data).
    slots: Vec<Option<WaiterPtr>>,
    /// Free slot indexes.
    free: Vec<u32>,
    /// SQEs pushed to the submission queue but not yet handed to `io_uring_enter`.
    pending: u32,
    /// Whether some requester holds the reaper role.
    reaper: bool,
    /// Threads waiting for a free slot.
    slot_waiters: u32,
}

/// How SQEs name the file.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// Index 0 of the registered file table.
    Fixed,
    /// A plain descriptor (registration failed).
    Fd(RawFd),
}

/// An io_uring shared by all threads that use one file.
pub(super) struct Ring {
    ring: IoUring,
    /// Small private rings for requests that arrive while the shared ring is busy (see
    /// `execute_private`).
    spare: Mutex<Vec<IoUring>>,
    fd: RawFd,
    target: Target,
    depth: u32,
    /// A kernel thread polls the submission queue and submits; nobody else enters to submit.
    sqpoll: bool,
    state: Mutex<State>,
    slot_freed: Condvar,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("depth", &self.depth)
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Ring {
    /// Sets up a ring of `depth` entries for `fd`. Fails if the kernel lacks io_uring, forbids
    /// it (seccomp, `kernel.io_uring_disabled`), or lacks the opcodes this engine uses.
    pub(super) fn new(fd: RawFd, depth: u32, sqpoll: bool) -> io::Result<Ring> {
        // The submission queue has room for twice the requests in flight (see `execute`).
        let mut builder = IoUring::builder();
        if sqpoll {
            builder.setup_sqpoll(SQPOLL_IDLE_MS);
        }
        let ring: IoUring = builder.build(depth.saturating_mul(2))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for code in [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE] {
            if !probe.is_supported(code) {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
        }
        // A registered file saves the kernel an fd lookup and refcount per request.
        let target = match ring.submitter().register_files(&[fd]) {
            Ok(()) => Target::Fixed,
            Err(_) => Target::Fd(fd),
        };
        // The slot table is the real bound on requests in flight; the CQ (twice the SQ) always
        // has room for all their completions.
        let depth = depth.min(ring.params().sq_entries());
        Ok(Ring {
            ring,
            spare: Mutex::new(Vec::new()),
            fd,
            target,
            depth,
            sqpoll,
            state: Mutex::new(State {
                slots: vec![None; depth as usize],
                free: (0..depth).rev().collect(),
                pending: 0,
                reaper: false,
                slot_waiters: 0,
            }),
            slot_freed: Condvar::new(),
        })
    }

    /// The number of requests that can be in flight at once.
    pub(super) fn depth(&self) -> u32 {
        self.depth
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent across a panic (no code that can panic runs under the
        // lock between related updates), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sqe(&self, op: &Op) -> squeue::Entry {
        match self.target {
            Target::Fixed => build_sqe(op, types::Fixed(0)),
            Target::Fd(fd) => build_sqe(op, types::Fd(fd)),
        }
    }

    /// Runs one request and returns its raw result: bytes transferred, or the error. A result
    /// may be short; the caller resubmits the rest.
    ///
    /// # Safety
    ///
    /// The buffer named by `op` must be valid for the access (writable for `Read`, readable for
    /// `Write`) for `len` bytes until this function returns. It does not return before the
    /// kernel is done with the request.
    pub(super) unsafe fn execute(&self, op: Op) -> io::Result<usize> {
        // When another request is already in flight, this one would park and be woken by the
        // reaper: two extra kernel entries (futex wait and wake) for every request, which at
        // high concurrency costs more than the ring saves (measured: 32 O_DIRECT requesters
        // ran 30% slower than with positioned syscalls). A private ring instead makes the
        // request one io_uring_enter that submits and waits, on this thread.
        if !self.sqpoll && self.lock().reaper {
            // SAFETY: forwarded from this function's contract.
            return unsafe { self.execute_private(op) };
        }
        let waiter = Waiter {
            thread: thread::current(),
            state: AtomicU8::new(PENDING),
            result: AtomicI32::new(0),
        };
        let become_reaper;
        let to_submit;
        let wake;
        {
            let mut st = self.lock();
            let slot;
            (slot, wake) = loop {
                let Some(&slot) = st.free.last() else {
                    // Ring full: every slot is in flight, so a reaper exists and will free one.
                    st.slot_waiters += 1;
                    st = self.slot_freed.wait(st).unwrap_or_else(|e| e.into_inner());
                    st.slot_waiters -= 1;
                    continue;
                };
                let entry = self.sqe(&op).user_data(u64::from(slot));
                // SAFETY: SubmissionQueues are only created under the state mutex, which we
                // hold, so this is the only one. The entry's buffer is valid until we return
                // (contract of this function) and we do not return before the request
                // completes.
                let (pushed, wake) = unsafe {
                    let mut sq = self.ring.submission_shared();
                    let r = sq.push(&entry);
                    sq.sync();
                    (r, self.sqpoll && sq.need_wakeup())
                };
                if pushed.is_ok() {
                    st.free.pop();
                    break (slot, wake);
                }
                // The queue is twice the depth, but the kernel posts completions before it
                // publishes how far it has consumed the queue, so a slot can free up a moment
                // before its queue entry does. Submit what is pending (so that the queue
                // drains even if nobody else would) or let the kernel finish, and try again.
                let n = std::mem::take(&mut st.pending);
                drop(st);
                if n > 0 || self.sqpoll {
                    self.submit(n, true);
                }
                if n == 0 {
                    thread::yield_now();
                }
                st = self.lock();
            };
            st.slots[slot as usize] = Some(WaiterPtr(&waiter));
            st.pending += 1;
            become_reaper = !st.reaper;
            if become_reaper {
                st.reaper = true;
                to_submit = 0;
            } else {
                to_submit = std::mem::take(&mut st.pending);
            }
        }
        if !become_reaper {
            if to_submit > 0 {
                self.submit(to_submit, wake);
            }
            loop {
                match waiter.state.load(Ordering::Acquire) {
                    DONE => return decode(waiter.result.load(Ordering::Relaxed)),
                    PROMOTED => break,
                    _ => thread::park(),
                }
            }
        }
        self.reap_until(&waiter);
        decode(waiter.result.load(Ordering::Relaxed))
    }

    /// Runs one request on a private ring taken from (and returned to) the spare pool.
    ///
    /// # Safety
    ///
    /// As for [`Ring::execute`].
    unsafe fn execute_private(&self, op: Op) -> io::Result<usize> {
        let spare = self.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut ring = match spare {
            Some(r) => r,
            None => IoUring::new(4)?,
        };
        let entry = build_sqe(&op, types::Fd(self.fd)).user_data(0);
        // SAFETY: the ring is ours alone (popped from the pool or new), its queue is empty,
        // and the buffer stays valid until the completion is reaped below.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // The SQE may still be queued with our buffer in it: do not reuse or
                    // drop-close the ring while the kernel might act on it later; leak it.
                    std::mem::forget(ring);
                    return Err(e);
                }
            }
            let res = ring.completion().next().map(|cqe| cqe.result());
            if let Some(res) = res {
                self.spare
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(ring);
                return decode(res);
            }
        }
    }

    /// Submits `n` pending SQEs without waiting, retrying until the kernel has taken them all:
    /// the SQEs sit in the shared queue and their requesters wait for them, so they cannot be
    /// abandoned. With SQPOLL the kernel thread takes them; it is woken if `wake` says it
    /// sleeps.
    fn submit(&self, mut n: u32, wake: bool) {
        if self.sqpoll {
            if wake {
                // SAFETY: io_uring_enter with no argument struct, only waking the SQ thread.
                // Errors are harmless: the next enter wakes it again.
                let _ = unsafe {
                    self.ring
                        .submitter()
                        .enter::<libc::sigset_t>(0, 0, ENTER_SQ_WAKEUP, None)
                };
            }
            return;
        }
        let mut failures = 0u32;
        while n > 0 {
            // SAFETY: io_uring_enter with no argument struct; the SQEs it consumes are
            // complete (pushed and synced under the state mutex before being counted).
            match unsafe { self.ring.submitter().enter::<libc::sigset_t>(n, 0, 0, None) } {
                Ok(k) => {
                    n -= (k as u32).min(n);
                    failures = 0;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => {
                    // EAGAIN/EBUSY: the kernel is short of memory or the CQ is backed up; the
                    // reaper is draining it. Back off and try again.
                    failures += 1;
                    backoff(failures);
                }
            }
        }
    }

    /// The reaper's loop: submits what is pending, waits for completions and dispatches them,
    /// until `own` is done; then hands the role on.
    fn reap_until(&self, own: &Waiter) {
        let mut failures = 0u32;
        loop {
            let (n, flags) = {
                let mut st = self.lock();
                let n = std::mem::take(&mut st.pending);
                // SAFETY: SubmissionQueues are only created under the state mutex.
                let wake = self.sqpoll && unsafe { self.ring.submission_shared() }.need_wakeup();
                let flags = ENTER_GETEVENTS | if wake { ENTER_SQ_WAKEUP } else { 0 };
                (n, flags)
            };
            // With SQPOLL the kernel thread submits; the count only matters without it.
            let to_submit = if self.sqpoll { 0 } else { n };
            // SAFETY: as in `submit`; GETEVENTS with min_complete 1 waits for one completion.
            let r = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(to_submit, 1, flags, None)
            };
            let submitted = match r {
                Ok(_) if self.sqpoll => n,
                Ok(k) => {
                    failures = 0;
                    (k as u32).min(n)
                }
                Err(e) => {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        failures += 1;
                        backoff(failures);
                    }
                    0
                }
            };
            let mut st = self.lock();
            st.pending += n - submitted;
            let mut freed = 0u32;
            // Threads to wake, woken after the lock is released so that they do not wake up
            // only to wait for it.
            let mut wake = Vec::new();
            // SAFETY: only the reaper creates a CompletionQueue, and there is one reaper (the
            // role is handed over under the state mutex).
            let cq = unsafe { self.ring.completion_shared() };
            for cqe in cq {
                let slot = cqe.user_data() as usize;
                let Some(WaiterPtr(w)) = st.slots.get_mut(slot).and_then(Option::take) else {
                    continue;
                };
                st.free.push(slot as u32);
                freed += 1;
                // SAFETY: the waiter is alive: its requester is blocked until DONE, which we
                // store below as the last access (after cloning the thread handle).
                let w = unsafe { &*w };
                w.result.store(cqe.result(), Ordering::Relaxed);
                if !std::ptr::eq(w, own) {
                    wake.push(w.thread.clone());
                }
                w.state.store(DONE, Ordering::Release);
            }
            if freed > 0 && st.slot_waiters > 0 {
                self.slot_freed.notify_all();
            }
            let done = own.state.load(Ordering::Acquire) == DONE;
            if done {
                st.reaper = false;
                if let Some(WaiterPtr(next)) = st.slots.iter().flatten().next().copied() {
                    st.reaper = true;
                    // SAFETY: an occupied slot's waiter is alive (see above) and not yet DONE;
                    // PROMOTED hands it the role, and it stays alive until it has reaped its own
                    // completion.
                    let next = unsafe { &*next };
                    wake.push(next.thread.clone());
                    next.state.store(PROMOTED, Ordering::Release);
                }
            }
            drop(st);
            // The handles are our own clones, valid after their waiters are gone.
            for t in wake {
                t.unpark();
            }
            if done {
                return;
            }
        }
    }
}

/// The SQE for `op` on file `target` (a registered index or a plain descriptor).
fn build_sqe(op: &Op, target: impl Into<FileTarget> + Copy) -> squeue::Entry {
    let t = target.into();
    macro_rules! build {
        ($t:expr) => {
            match op {
                Op::Read { buf, len, offset } => {
                    opcode::Read::new($t, *buf, (*len).min(MAX_SQE_LEN) as u32)
                        .offset(*offset)
                        .build()
                }
                Op::Write { buf, len, offset } => {
                    opcode::Write::new($t, *buf, (*len).min(MAX_SQE_LEN) as u32)
                        .offset(*offset)
                        .build()
                }
                Op::Readv { iov, count, offset } => {
                    opcode::Readv::new($t, *iov, *count).offset(*offset).build()
                }
                Op::Writev { iov, count, offset } => opcode::Writev::new($t, *iov, *count)
                    .offset(*offset)
                    .build(),
                Op::DataSync => opcode::Fsync::new($t)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            }
        };
    }
    match t {
        FileTarget::Fixed(i) => build!(types::Fixed(i)),
        FileTarget::Fd(fd) => build!(types::Fd(fd)),
    }
}

/// Either way of naming the file in an SQE.
#[derive(Clone, Copy)]
enum FileTarget {
    Fixed(u32),
    Fd(RawFd),
}

impl From<types::Fixed> for FileTarget {
    fn from(f: types::Fixed) -> Self {
        FileTarget::Fixed(f.0)
    }
}

impl From<types::Fd> for FileTarget {
    fn from(f: types::Fd) -> Self {
        FileTarget::Fd(f.0)
    }
}

/// Turns a CQE result into bytes transferred or an error.
fn decode(res: i32) -> io::Result<usize> {
    if res < 0 {
        Err(io::Error::from_raw_os_error(-res))
    } else {
        Ok(res as usize)
    }
}

/// Waits a little longer after each consecutive failure.
fn backoff(failures: u32) {
    if failures < 16 {
        thread::yield_now();
    } else {
        thread::sleep(std::time::Duration::from_millis(1));
    }
}
