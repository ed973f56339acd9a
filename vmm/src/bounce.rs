//! The per-thread buffer through which device models move data between guest memory and the
//! image, so that memory stays bounded whatever length a request claims.

use std::cell::RefCell;

/// The most a bounce buffer holds; longer transfers go through it in pieces.
pub const CHUNK: usize = 1 << 20;

thread_local! {
    static BOUNCE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's bounce buffer, sized for `len` bytes but at most [`CHUNK`].
pub fn with_bounce<T>(len: u64, f: impl FnOnce(&mut [u8]) -> T) -> T {
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        let want = (len.min(CHUNK as u64) as usize).max(1);
        if b.len() < want {
            b.resize(want, 0);
        }
        f(&mut b[..want])
    })
}
