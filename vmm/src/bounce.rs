//! The per-thread buffer through which device models move data between guest memory and the
//! image, so that memory stays bounded whatever length a request claims.
//!
//! The buffer is page-aligned: with `cache=none` the image file is opened with O_DIRECT, and a
//! buffer at a malloc'd address would send every request through a second, aligned bounce
//! buffer in the file layer (allocated, zeroed and copied per request; measured in the nested
//! lab: sequential guest I/O at 0.6-0.7 of QEMU's, at parity once aligned).

use std::cell::RefCell;

use blockdev::AlignedBuf;

/// The most a bounce buffer holds; longer transfers go through it in pieces.
pub const CHUNK: usize = 1 << 20;

/// Alignment of the buffer: a page, which covers every O_DIRECT requirement we meet.
const ALIGN: usize = 4096;

thread_local! {
    static BOUNCE: RefCell<Option<AlignedBuf>> = const { RefCell::new(None) };
}

/// Runs `f` with this thread's bounce buffer, sized for `len` bytes but at most [`CHUNK`];
/// the buffer starts on a page boundary.
pub fn with_bounce<T>(len: u64, f: impl FnOnce(&mut [u8]) -> T) -> T {
    BOUNCE.with(|b| {
        let mut b = b.borrow_mut();
        let want = (len.min(CHUNK as u64) as usize).max(1);
        if b.as_ref().is_none_or(|buf| buf.len() < want) {
            // Grown to the next page multiple at once, so that a thread's buffer is
            // reallocated a few times at most.
            *b = Some(AlignedBuf::zeroed(want.next_multiple_of(ALIGN), ALIGN));
        }
        let buf = b.as_mut().expect("allocated above");
        f(&mut buf[..want])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_is_page_aligned_bounded_and_reused() {
        let first = with_bounce(10, |b| {
            assert_eq!(b.len(), 10);
            b.as_ptr() as usize
        });
        assert_eq!(first % ALIGN, 0);
        let again = with_bounce(4096, |b| b.as_ptr() as usize);
        assert_eq!(again, first, "a request that fits reuses the buffer");
        with_bounce(64 << 20, |b| {
            assert_eq!(b.len(), CHUNK, "bounded whatever the request claims");
            assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        });
    }
}
