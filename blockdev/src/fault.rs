//! Storage that misbehaves on purpose, for tests of what the formats do when the disk does.
//!
//! [`FaultStorage`] wraps any storage and keeps two things apart: what the writer sees (every
//! request goes to the wrapped storage at once) and what a power loss would leave (the
//! *durable* copy, a second storage that receives a request only when a flush makes it
//! durable). [`FaultStorage::crash`] says which unflushed requests survive: none, or any
//! subset in any order, as a disk with a volatile cache may leave them. A format that orders
//! its metadata as the qcow2 spec asks (data before the L2 entry that points to it, refcounts
//! before the tables that use them, with flushes in between) leaves a durable copy that is at
//! worst leaky, whichever subset survives.
//!
//! It also fails chosen requests: the Nth write, flush or any request with EIO or ENOSPC
//! ([`Fault`]), so tests can check that the error reaches the caller and that what was written
//! before it is intact.

use std::io;
use std::sync::{Arc, Mutex};

use crate::{Alignment, Allocation, Error, Result, Storage};

/// One request that changes the storage, as the durable copy will replay it.
#[derive(Clone, Debug)]
enum Change {
    Write { offset: u64, data: Vec<u8> },
    Zeroes { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
    Truncate { size: u64 },
}

/// Which requests a [`Fault`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Requests that write (write, write-zeroes, discard, truncate).
    Write,
    /// Flushes.
    Flush,
    /// Every request, reads included.
    Any,
}

/// Fails requests: the `nth` request of `target`'s kind (counted from 1 since the storage was
/// wrapped) and, when `sticky`, every such request after it, with `errno`.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    /// Which requests count.
    pub target: Target,
    /// The first request that fails.
    pub nth: u64,
    /// `libc::EIO`, `libc::ENOSPC`, ...
    pub errno: i32,
    /// Whether every later request of the kind fails too (a dead disk, a full one).
    pub sticky: bool,
}

/// What survives a simulated power loss.
#[derive(Clone, Copy, Debug)]
pub enum Crash {
    /// Only what was flushed.
    DropUnflushed,
    /// What was flushed, and a subset of the unflushed requests chosen by the seed, replayed
    /// in an order of the seed's choosing (a volatile cache writes back in any order).
    Subset(u64),
}

#[derive(Default)]
struct State {
    pending: Vec<Change>,
    writes: u64,
    flushes: u64,
    requests: u64,
    /// A power loss armed by [`FaultStorage::crash_before`]: the request count (writes and
    /// flushes) at which it strikes, and what survives it.
    armed: Option<(u64, Crash)>,
}

/// Storage that can lose its unflushed writes and fail chosen requests (see the module docs).
pub struct FaultStorage {
    inner: Arc<dyn Storage>,
    durable: Arc<dyn Storage>,
    fault: Option<Fault>,
    state: Mutex<State>,
    /// Set by [`FaultStorage::crash`]: the durable copy receives nothing more.
    crashed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for FaultStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultStorage")
            .field("inner", &self.inner.name())
            .field("durable", &self.durable.name())
            .field("fault", &self.fault)
            .finish()
    }
}

/// A small deterministic generator (xorshift64*), so that a seed names one crash.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

impl FaultStorage {
    /// Wraps `inner`. `durable` must start with the same content as `inner` (a copy of the
    /// file); it receives what a flush makes durable.
    pub fn new(inner: Arc<dyn Storage>, durable: Arc<dyn Storage>, fault: Option<Fault>) -> Self {
        FaultStorage {
            inner,
            durable,
            fault,
            state: Mutex::new(State::default()),
            crashed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request and fails it if the fault says so.
    fn check(&self, write: bool, flush: bool, op: &'static str, offset: u64) -> Result<()> {
        let mut st = self.state();
        st.requests += 1;
        if write {
            st.writes += 1;
        }
        if flush {
            st.flushes += 1;
        }
        if write || flush {
            if let Some((at, crash)) = st.armed {
                if st.writes + st.flushes == at {
                    st.armed = None;
                    drop(st);
                    // The power fails before this request reaches the disk; the writer goes
                    // on unaware, as a process does until the machine is gone.
                    self.crash(crash)?;
                    st = self.state();
                }
            }
        }
        let Some(f) = self.fault else { return Ok(()) };
        let n = match f.target {
            Target::Write if write => st.writes,
            Target::Flush if flush => st.flushes,
            Target::Any => st.requests,
            _ => return Ok(()),
        };
        if n == f.nth || (f.sticky && n > f.nth) {
            return Err(Error::Io {
                op,
                name: self.inner.name().to_string(),
                offset,
                source: io::Error::from_raw_os_error(f.errno),
            });
        }
        Ok(())
    }

    fn record(&self, change: Change) {
        if !self.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            self.state().pending.push(change);
        }
    }

    /// Writes and flushes issued so far (the moments [`crash_before`](Self::crash_before)
    /// counts).
    pub fn changes(&self) -> u64 {
        let st = self.state();
        st.writes + st.flushes
    }

    /// Arms a power loss just before the `n`th write or flush from now (1 = the next one):
    /// the durable copy is left as `crash` says at that moment, and receives nothing after.
    /// So a test can stop the disk at every request of an operation that runs to completion.
    pub fn crash_before(&self, n: u64, crash: Crash) {
        let mut st = self.state();
        st.armed = Some((st.writes + st.flushes + n, crash));
    }

    /// How many requests that change the storage are not flushed yet.
    pub fn unflushed(&self) -> usize {
        self.state().pending.len()
    }

    /// Simulates a power loss now: the durable copy gets what `crash` lets survive, and is
    /// flushed. Whatever happens to the wrapper afterwards no longer reaches it.
    pub fn crash(&self, crash: Crash) -> Result<()> {
        self.crashed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let pending = std::mem::take(&mut self.state().pending);
        let survivors: Vec<Change> = match crash {
            Crash::DropUnflushed => Vec::new(),
            Crash::Subset(seed) => {
                let mut rng = seed | 1;
                let mut kept: Vec<Change> = pending
                    .into_iter()
                    .filter(|_| next(&mut rng) & 1 == 1)
                    .collect();
                // Fisher-Yates: the cache writes back in any order.
                for i in (1..kept.len()).rev() {
                    let j = (next(&mut rng) % (i as u64 + 1)) as usize;
                    kept.swap(i, j);
                }
                kept
            }
        };
        for c in &survivors {
            apply(self.durable.as_ref(), c)?;
        }
        self.durable.flush()
    }
}

/// Replays one change onto `to`.
fn apply(to: &dyn Storage, change: &Change) -> Result<()> {
    match change {
        Change::Write { offset, data } => to.write_at(data, *offset),
        Change::Zeroes { offset, len } => to.write_zeroes(*offset, *len, false),
        Change::Discard { offset, len } => to.discard(*offset, *len),
        Change::Truncate { size } => to.truncate(*size),
    }
}

impl Storage for FaultStorage {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn size(&self) -> Result<u64> {
        self.inner.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check(false, false, "read", offset)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check(true, false, "write", offset)?;
        self.inner.write_at(buf, offset)?;
        self.record(Change::Write {
            offset,
            data: buf.to_vec(),
        });
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.check(false, true, "flush", 0)?;
        self.inner.flush()?;
        if self.crashed.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        // What was written before the flush is durable now, in the order it was written.
        let pending = std::mem::take(&mut self.state().pending);
        for c in &pending {
            apply(self.durable.as_ref(), c)?;
        }
        self.durable.flush()
    }

    fn truncate(&self, size: u64) -> Result<()> {
        self.check(true, false, "truncate", size)?;
        self.inner.truncate(size)?;
        self.record(Change::Truncate { size });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check(true, false, "write zeroes", offset)?;
        self.inner.write_zeroes(offset, len, may_unmap)?;
        self.record(Change::Zeroes { offset, len });
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(true, false, "discard", offset)?;
        self.inner.discard(offset, len)?;
        self.record(Change::Discard { offset, len });
        Ok(())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<(Allocation, u64)> {
        self.inner.allocation(offset, len)
    }

    fn alignment(&self) -> Alignment {
        self.inner.alignment()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileStorage;

    fn pair(dir: &std::path::Path, fault: Option<Fault>) -> (FaultStorage, std::path::PathBuf) {
        let a = dir.join("a");
        let b = dir.join("b");
        std::fs::write(&a, vec![0u8; 8192]).unwrap();
        std::fs::write(&b, vec![0u8; 8192]).unwrap();
        let inner = Arc::new(FileStorage::open_read_write(&a).unwrap());
        let durable = Arc::new(FileStorage::open_read_write(&b).unwrap());
        (FaultStorage::new(inner, durable, fault), b)
    }

    #[test]
    fn only_flushed_writes_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let (s, durable) = pair(dir.path(), None);
        s.write_at(&[1; 512], 0).unwrap();
        s.flush().unwrap();
        s.write_at(&[2; 512], 512).unwrap();
        let mut buf = [0u8; 512];
        s.read_at(&mut buf, 512).unwrap();
        assert_eq!(buf, [2; 512], "the writer sees its unflushed write");
        assert_eq!(s.unflushed(), 1);
        s.crash(Crash::DropUnflushed).unwrap();
        let left = std::fs::read(durable).unwrap();
        assert!(left[..512].iter().all(|&b| b == 1));
        assert!(left[512..1024].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_subset_survives_in_some_order() {
        let dir = tempfile::tempdir().unwrap();
        let (s, durable) = pair(dir.path(), None);
        for i in 0..16u8 {
            s.write_at(&[i + 1; 512], u64::from(i) * 512).unwrap();
        }
        s.crash(Crash::Subset(7)).unwrap();
        let left = std::fs::read(durable).unwrap();
        let survived = (0..16).filter(|&i| left[i * 512] != 0).count();
        assert!(survived > 0 && survived < 16, "{survived} of 16 survived");
        for i in 0..16 {
            let b = left[i * 512];
            assert!(b == 0 || b == i as u8 + 1, "block {i} holds {b}");
        }
    }

    #[test]
    fn chosen_requests_fail() {
        let dir = tempfile::tempdir().unwrap();
        let fault = Fault {
            target: Target::Write,
            nth: 2,
            errno: libc::ENOSPC,
            sticky: false,
        };
        let (s, _) = pair(dir.path(), Some(fault));
        s.write_at(&[1; 512], 0).unwrap();
        let e = s.write_at(&[1; 512], 512).unwrap_err();
        assert_eq!(
            e.io_error().and_then(|e| e.raw_os_error()),
            Some(libc::ENOSPC)
        );
        s.write_at(&[1; 512], 1024).unwrap();
        let sticky = Fault {
            target: Target::Flush,
            nth: 1,
            errno: libc::EIO,
            sticky: true,
        };
        let (s, _) = pair(&dir.path().join(""), Some(sticky));
        assert!(s.flush().is_err() && s.flush().is_err());
    }
}
