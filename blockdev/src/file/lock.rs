//! QEMU's image locking, so that img and QEMU processes never write one image at once.
//!
//! Every process that opens an image file announces what it does with it through read locks
//! on single bytes of the file (advisory locks: the data is not touched):
//!
//! - byte `100 + i` while it holds permission `i` (see [`Perm`]);
//! - byte `200 + i` while it does *not* let others hold permission `i`.
//!
//! Before it starts, an opener locks its bytes, then checks that nobody else holds byte
//! `200 + i` for a permission `i` it wants, nor byte `100 + i` for a permission it does not
//! share. The check asks the kernel whether a write lock could be taken on the byte, which it
//! could not if anybody else holds a read lock there. Locking before checking means that of two
//! processes racing for conflicting permissions at least one sees the other.
//!
//! The locks are open file description (OFD) locks, which belong to the descriptor and go
//! away when it is closed. Where the kernel lacks them (Linux before 3.15), `locking=on` falls
//! back to POSIX locks, which belong to the process and are lost when *any* descriptor of the
//! file is closed; `locking=auto` then does without locks, as QEMU does.

use crate::Error;
use std::fmt;
use std::io;
use std::ops::{BitAnd, BitOr, Not};
use std::os::unix::io::RawFd;
use std::sync::{Mutex, OnceLock};

/// The offset of the byte that stands for holding permission `i` (`100 + i`). Byte 0 is
/// libvirt's; QEMU leaves room for it to grow.
pub const PERM_BASE: u64 = 100;
/// The offset of the byte that stands for not sharing permission `i` (`200 + i`).
pub const SHARED_BASE: u64 = 200;

/// A set of QEMU's block permissions (`BLK_PERM_*`), the bit values being QEMU's.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Perm(u8);

impl Perm {
    /// No permission.
    pub const NONE: Perm = Perm(0);
    /// Reading data that is consistent ("consistent read"): nobody changes it behind the
    /// reader's back without telling.
    pub const CONSISTENT_READ: Perm = Perm(0x01);
    /// Changing the data ("write").
    pub const WRITE: Perm = Perm(0x02);
    /// Writes that leave the data as it reads ("write unchanged"), such as copy-on-read.
    pub const WRITE_UNCHANGED: Perm = Perm(0x04);
    /// Changing the size ("resize").
    pub const RESIZE: Perm = Perm(0x08);
    /// Every permission.
    pub const ALL: Perm = Perm(0x0f);

    /// The names QEMU's messages use, in bit order.
    const NAMES: [(Perm, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged"),
        (Perm::RESIZE, "resize"),
    ];

    /// The bits, QEMU's values.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// The set with these bits; bits that name no permission are dropped.
    pub const fn from_bits(bits: u8) -> Perm {
        Perm(bits & Perm::ALL.0)
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The single permissions in the set, in bit order, each with its bit index.
    fn each(self) -> impl Iterator<Item = (u64, Perm)> {
        (0..4u64)
            .map(|i| (i, Perm(1 << i)))
            .filter(move |(_, p)| self.contains(*p))
    }

    /// The names of the permissions, comma separated, as QEMU lists them in its messages.
    pub fn names(self) -> String {
        Perm::NAMES
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, o: Perm) -> Perm {
        Perm(self.0 | o.0)
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, o: Perm) -> Perm {
        Perm(self.0 & o.0)
    }
}

impl Not for Perm {
    type Output = Perm;
    /// The permissions not in the set.
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({:#x}: {})", self.0, self.names())
    }
}

/// What an opener does with an image and what it lets others do meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// The permissions held.
    pub perm: Perm,
    /// The permissions other users may hold at the same time.
    pub shared: Perm,
}

impl Default for Permissions {
    /// Nothing held, everything shared: no lock byte is taken or checked.
    fn default() -> Self {
        Permissions {
            perm: Perm::NONE,
            shared: Perm::ALL,
        }
    }
}

impl Permissions {
    /// QEMU's permissions while it creates an image file: writing and resizing it, and not
    /// letting others resize it, so that the file has the size asked for when creation ends.
    pub const CREATE: Permissions = Permissions {
        perm: Perm(Perm::WRITE.0 | Perm::RESIZE.0),
        shared: Perm(Perm::ALL.0 & !Perm::RESIZE.0),
    };
}

/// QEMU's `locking` option of the file driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// Lock if the kernel has OFD locks, which QEMU relies on (`auto`, the default).
    #[default]
    Auto,
    /// Always lock, with process-wide POSIX locks if there are no OFD locks (`on`).
    On,
    /// Never lock (`off`).
    Off,
}

impl Locking {
    /// Parses QEMU's names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Locking::Auto),
            "on" => Some(Locking::On),
            "off" => Some(Locking::Off),
            _ => None,
        }
    }
}

/// Whether the kernel has open file description locks. Probed once, on `/dev/null` as QEMU
/// does, so the answer does not depend on the filesystem of an image.
pub fn ofd_locks_available() -> bool {
    static OFD: OnceLock<bool> = OnceLock::new();
    *OFD.get_or_init(|| match std::fs::File::open("/dev/null") {
        Ok(f) => {
            use std::os::unix::io::AsRawFd;
            let mut fl = flock(libc::F_WRLCK as libc::c_short, 0, 0);
            // SAFETY: F_OFD_GETLK reads and writes the flock struct, a live local.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) == 0 }
        }
        Err(_) => false,
    })
}

/// The lock commands in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavour {
    /// F_OFD_SETLK / F_OFD_GETLK.
    Ofd,
    /// F_SETLK / F_GETLK.
    Posix,
}

impl Flavour {
    /// The flavour `mode` uses on this kernel, `None` for no locking.
    pub(crate) fn for_mode(mode: Locking) -> Option<Flavour> {
        match (mode, ofd_locks_available()) {
            (Locking::Off, _) => None,
            (_, true) => Some(Flavour::Ofd),
            (Locking::On, false) => Some(Flavour::Posix),
            (Locking::Auto, false) => None,
        }
    }

    fn set_cmd(self) -> libc::c_int {
        match self {
            Flavour::Ofd => libc::F_OFD_SETLK,
            Flavour::Posix => libc::F_SETLK,
        }
    }

    fn get_cmd(self) -> libc::c_int {
        match self {
            Flavour::Ofd => libc::F_OFD_GETLK,
            Flavour::Posix => libc::F_GETLK,
        }
    }
}

fn flock(kind: libc::c_short, start: u64, len: u64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all zeros is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl
}

/// What went wrong with a lock, before it is given a file name.
#[derive(Debug)]
pub(crate) enum Failure {
    /// A byte could not be locked (`source`: `None` when another process holds it in a way
    /// that excludes ours, which QEMU does not detail).
    Byte {
        byte: u64,
        source: Option<io::Error>,
    },
    /// Another process holds a lock that conflicts with `perm` (`shared`: with not sharing
    /// it), or the test failed with `source`.
    Conflict {
        perm: Perm,
        shared: bool,
        source: Option<io::Error>,
    },
}

impl Failure {
    pub(crate) fn into_error(self, name: &str) -> Error {
        match self {
            Failure::Byte { byte, source } => Error::LockByte {
                name: name.to_string(),
                byte,
                source,
            },
            Failure::Conflict {
                perm,
                shared,
                source,
            } => Error::Locked {
                name: name.to_string(),
                perm,
                shared,
                source,
            },
        }
    }
}

/// QEMU elides the reason when a lock is refused because somebody holds it: that is the
/// common case, and the message says as much.
fn detail(e: io::Error) -> Option<io::Error> {
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => None,
        _ => Some(e),
    }
}

/// One fcntl lock call, repeated on EINTR.
fn fcntl_lock(fd: RawFd, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: the lock commands read (and GETLK writes) the flock struct, which is
        // exclusively borrowed; `fd` is open for the duration of the call (the caller owns it).
        let r = unsafe { libc::fcntl(fd, cmd, fl as *mut libc::flock) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The lock state of one open file.
#[derive(Debug)]
pub(crate) struct Locks {
    /// `None`: locking is off.
    flavour: Option<Flavour>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The permissions in force.
    current: Permissions,
    /// Permissions whose byte at PERM_BASE is locked.
    locked_perm: Perm,
    /// Permissions whose byte at SHARED_BASE is locked.
    locked_unshared: Perm,
}

impl Locks {
    pub(crate) fn new(flavour: Option<Flavour>) -> Locks {
        Locks {
            flavour,
            state: Mutex::new(State {
                current: Permissions::default(),
                locked_perm: Perm::NONE,
                locked_unshared: Perm::NONE,
            }),
        }
    }

    /// Whether lock bytes are used.
    pub(crate) fn active(&self) -> bool {
        self.flavour.is_some()
    }

    /// The permissions in force.
    pub(crate) fn current(&self) -> Permissions {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).current
    }

    /// Moves to `new`: locks what it adds, checks that nobody conflicts with it, then drops
    /// what it no longer needs. On a conflict the previous permissions stay in force.
    pub(crate) fn set(&self, fd: RawFd, new: Permissions) -> std::result::Result<(), Failure> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let Some(fl) = self.flavour else {
            st.current = new;
            return Ok(());
        };
        let old = st.current;
        let widens = !old.perm.contains(new.perm) || !new.shared.contains(old.shared);
        if widens {
            // Hold the union of old and new while checking, so that a racing opener sees us.
            let r = apply(
                fl,
                fd,
                &mut st,
                old.perm | new.perm,
                !old.shared | !new.shared,
                false,
            )
            .and_then(|()| check(fl, fd, new));
            if let Err(e) = r {
                // Back to the old bytes; unlocking cannot meaningfully fail.
                let _ = apply(fl, fd, &mut st, old.perm, !old.shared, true);
                return Err(e);
            }
        }
        // Unlocking cannot meaningfully fail; if it did, an extra byte stays locked, which
        // only makes others more careful.
        let _ = apply(fl, fd, &mut st, new.perm, !new.shared, true);
        st.current = new;
        Ok(())
    }
}

impl Locks {
    /// Unlocks every byte held. Closing the descriptor would do the same, but an io_uring that
    /// registered the file keeps it open until the kernel frees the ring, some time after the
    /// ring's descriptor is closed; the bytes must not outlive the storage meanwhile.
    pub(crate) fn release(&self, fd: RawFd) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fl) = self.flavour {
            let _ = apply(fl, fd, &mut st, Perm::NONE, Perm::NONE, true);
        }
        st.current = Permissions::default();
    }
}

/// Locks the bytes of `perm` and `unshared` that are not locked yet; with `unlock`, also
/// unlocks the locked ones that are not in them.
fn apply(
    fl: Flavour,
    fd: RawFd,
    st: &mut State,
    perm: Perm,
    unshared: Perm,
    unlock: bool,
) -> std::result::Result<(), Failure> {
    for (base, want, locked) in [
        (PERM_BASE, perm, &mut st.locked_perm),
        (SHARED_BASE, unshared, &mut st.locked_unshared),
    ] {
        for (i, bit) in Perm::ALL.each() {
            let byte = base + i;
            if want.contains(bit) && !locked.contains(bit) {
                let mut l = flock(libc::F_RDLCK as libc::c_short, byte, 1);
                fcntl_lock(fd, fl.set_cmd(), &mut l).map_err(|e| Failure::Byte {
                    byte,
                    source: detail(e),
                })?;
                *locked = *locked | bit;
            } else if unlock && locked.contains(bit) && !want.contains(bit) {
                let mut l = flock(libc::F_UNLCK as libc::c_short, byte, 1);
                fcntl_lock(fd, fl.set_cmd(), &mut l).map_err(|e| Failure::Byte {
                    byte,
                    source: Some(e),
                })?;
                *locked = *locked & !bit;
            }
        }
    }
    Ok(())
}

/// Checks that no other opener holds a byte that conflicts with `p`: the "not shared" byte of
/// a permission it wants, or the "held" byte of a permission it does not share. A conflict is
/// a read lock somebody holds, so the test asks whether a write lock could be taken.
fn check(fl: Flavour, fd: RawFd, p: Permissions) -> std::result::Result<(), Failure> {
    let tests = p
        .perm
        .each()
        .map(|(i, bit)| (SHARED_BASE + i, bit, false))
        .chain(
            (!p.shared)
                .each()
                .map(|(i, bit)| (PERM_BASE + i, bit, true)),
        );
    for (byte, perm, shared) in tests {
        let mut l = flock(libc::F_WRLCK as libc::c_short, byte, 1);
        match fcntl_lock(fd, fl.get_cmd(), &mut l) {
            Ok(()) if l.l_type == libc::F_UNLCK as libc::c_short => {}
            Ok(()) => {
                return Err(Failure::Conflict {
                    perm,
                    shared,
                    source: None,
                })
            }
            Err(e) => {
                return Err(Failure::Conflict {
                    perm,
                    shared,
                    source: detail(e),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::unix::io::AsRawFd;

    fn p(perm: Perm, shared: Perm) -> Permissions {
        Permissions { perm, shared }
    }

    /// The lock bytes (100..=103, 200..=203) that a new descriptor sees locked by others.
    fn locked_bytes(path: &std::path::Path) -> Vec<u64> {
        let f = File::open(path).unwrap();
        let mut out = Vec::new();
        for byte in (PERM_BASE..PERM_BASE + 4).chain(SHARED_BASE..SHARED_BASE + 4) {
            let mut l = flock(libc::F_WRLCK as libc::c_short, byte, 1);
            fcntl_lock(f.as_raw_fd(), libc::F_OFD_GETLK, &mut l).unwrap();
            if l.l_type != libc::F_UNLCK as libc::c_short {
                out.push(byte);
            }
        }
        out
    }

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    #[test]
    fn names_as_qemu_prints_them() {
        assert_eq!(Perm::WRITE.names(), "write");
        assert_eq!(Perm::CONSISTENT_READ.names(), "consistent read");
        assert_eq!(
            (Perm::WRITE_UNCHANGED | Perm::RESIZE).names(),
            "write unchanged, resize"
        );
        assert_eq!(!Perm::RESIZE, Perm::from_bits(7));
    }

    #[test]
    fn bytes_follow_the_permissions() {
        if !ofd_locks_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = open(&path);
        let locks = Locks::new(Some(Flavour::Ofd));
        // A qcow2 writer: holds read, write, resize; shares neither write nor resize.
        let writer = p(
            Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        );
        locks.set(f.as_raw_fd(), writer).unwrap();
        assert_eq!(locked_bytes(&path), vec![100, 101, 103, 201, 203]);
        // Dropping to read-only releases the write and resize bytes.
        let reader = p(Perm::CONSISTENT_READ, Perm::ALL);
        locks.set(f.as_raw_fd(), reader).unwrap();
        assert_eq!(locked_bytes(&path), vec![100]);
        assert_eq!(locks.current(), reader);
        drop(f);
        assert!(locked_bytes(&path).is_empty(), "closing releases the locks");
    }

    #[test]
    fn conflicts_are_found_both_ways() {
        if !ofd_locks_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let (a, b) = (open(&path), open(&path));
        let (la, lb) = (
            Locks::new(Some(Flavour::Ofd)),
            Locks::new(Some(Flavour::Ofd)),
        );
        // A reader that does not share write.
        la.set(a.as_raw_fd(), p(Perm::CONSISTENT_READ, !Perm::WRITE))
            .unwrap();
        // A writer is refused: somebody does not share "write".
        match lb.set(b.as_raw_fd(), p(Perm::WRITE, Perm::ALL)) {
            Err(Failure::Conflict {
                perm,
                shared: false,
                source: None,
            }) => assert_eq!(perm, Perm::WRITE),
            other => panic!("{other:?}"),
        }
        // The refused opener holds nothing afterwards.
        assert_eq!(locked_bytes(&path), vec![100, 201]);
        assert_eq!(lb.current(), Permissions::default());
        // Another reader that shares everything is fine.
        lb.set(b.as_raw_fd(), p(Perm::CONSISTENT_READ, Perm::ALL))
            .unwrap();
        la.set(a.as_raw_fd(), p(Perm::NONE, Perm::ALL)).unwrap();
        // A reader that refuses to share "consistent read" conflicts with b holding it.
        match la.set(a.as_raw_fd(), p(Perm::NONE, !Perm::CONSISTENT_READ)) {
            Err(Failure::Conflict {
                perm, shared: true, ..
            }) => assert_eq!(perm, Perm::CONSISTENT_READ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn locking_off_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = open(&path);
        let locks = Locks::new(None);
        assert!(!locks.active());
        locks.set(f.as_raw_fd(), p(Perm::ALL, Perm::NONE)).unwrap();
        if ofd_locks_available() {
            assert!(locked_bytes(&path).is_empty());
        }
    }

    #[test]
    fn posix_flavour_locks_too() {
        // POSIX locks of this process are invisible to its own F_GETLK, so look from a
        // descriptor with OFD locks, which does see them.
        if !ofd_locks_available() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let f = open(&path);
        let locks = Locks::new(Some(Flavour::Posix));
        locks
            .set(f.as_raw_fd(), p(Perm::CONSISTENT_READ, !Perm::WRITE))
            .unwrap();
        assert_eq!(locked_bytes(&path), vec![100, 201]);
    }
}
