//! Allocation status of an RBD image range, from librbd's diff iteration.
//!
//! Diffing from the image's creation (no "from" snapshot) lists the extents that hold data;
//! the walk stops at the first extent that settles the answer, so asking about a large range
//! costs no more than the objects up to that point.

use std::ffi::c_void;
use std::io;
use std::ptr;

use librbd_sys as sys;

use super::cluster::errno;

/// Returned by the callback to stop the iteration early; librbd passes it back unchanged.
/// Far outside the errno range so that it cannot be mistaken for a real error.
const STOP: i32 = -9000;

/// What the walk found: where the range starts (data or hole) and how far that lasts.
struct Walk {
    offset: u64,
    end: u64,
    /// First data extent seen: (start, end), clipped to the range.
    data: Option<(u64, u64)>,
}

unsafe extern "C" fn on_extent(off: u64, len: usize, exists: i32, arg: *mut c_void) -> i32 {
    // SAFETY: `arg` is the `Walk` that allocation() passed, alive and exclusively ours for
    // the duration of rbd_diff_iterate2, which calls back on the calling thread's behalf.
    let walk = unsafe { &mut *(arg as *mut Walk) };
    if exists == 0 {
        return 0;
    }
    let start = off.max(walk.offset);
    let end = off.saturating_add(len as u64).min(walk.end);
    if start >= end {
        return 0;
    }
    match &mut walk.data {
        // Extents come in increasing order; extend the first run while they touch.
        Some((_, e)) if *e == start => {
            *e = end;
            0
        }
        Some(_) => STOP,
        None => {
            walk.data = Some((start, end));
            // A hole before the first extent is already answered.
            if start > walk.offset {
                STOP
            } else {
                0
            }
        }
    }
}

/// Whether `[offset, offset+len)` starts with data, and for how many bytes that holds.
pub(crate) fn allocation(
    image: sys::rbd_image_t,
    offset: u64,
    len: u64,
) -> io::Result<(bool, u64)> {
    let mut walk = Walk {
        offset,
        end: offset + len,
        data: None,
    };
    // SAFETY: the image is open; the callback only touches `walk`, which outlives the call.
    let r = unsafe {
        sys::loaded().rbd_diff_iterate2(
            image,
            ptr::null(),
            offset,
            len,
            1,
            // Whole objects: with an object map (fast-diff, librbd's default features) librbd
            // answers from the map alone; asking for exact extents costs one OSD operation
            // per object of the range, and a long range made block status cost more than the
            // copy. An object that exists is reported whole, which only counts some zeros
            // as data (qemu asks the same way).
            1,
            Some(on_extent),
            &mut walk as *mut Walk as *mut c_void,
        )
    };
    if r < 0 && r != STOP {
        return Err(errno(r.into()));
    }
    Ok(match walk.data {
        Some((start, end)) if start == offset => (true, end - offset),
        Some((start, _)) => (false, start - offset),
        None => (false, len),
    })
}
