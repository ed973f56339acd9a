//! An open RBD image and its I/O through librbd's asynchronous completions.

use std::ffi::c_char;
use std::io::{self, IoSlice, IoSliceMut};
use std::ptr;

use librbd_sys as sys;

use super::cluster::{cstring, errno, Pool};
use super::name::RbdName;

/// One librbd aio completion: created without a callback, waited for, released on drop.
///
/// Requests are issued asynchronously so that librbd runs them on its own threads (and can
/// split them over objects in parallel); the caller of `Storage` is synchronous, so each
/// request waits for its completion before returning.
struct Completion(sys::rbd_completion_t);

impl Completion {
    fn new() -> io::Result<Completion> {
        let mut c: sys::rbd_completion_t = ptr::null_mut();
        // SAFETY: no callback, so the null argument is never used; `c` is a valid out pointer.
        let r = unsafe { sys::loaded().rbd_aio_create_completion(ptr::null_mut(), None, &mut c) };
        if r < 0 {
            return Err(errno(r.into()));
        }
        Ok(Completion(c))
    }

    /// Issues a request with `submit` and waits for its result (a byte count or 0).
    fn run(submit: impl FnOnce(sys::rbd_completion_t) -> i32) -> io::Result<u64> {
        let c = Completion::new()?;
        let r = submit(c.0);
        if r < 0 {
            return Err(errno(r.into()));
        }
        // SAFETY: the completion was handed to a request that was accepted (r >= 0).
        unsafe { sys::loaded().rbd_aio_wait_for_complete(c.0) };
        // SAFETY: the request is complete, so its return value is final.
        let ret = unsafe { sys::loaded().rbd_aio_get_return_value(c.0) };
        if ret < 0 {
            return Err(errno(ret as i64));
        }
        Ok(ret as u64)
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // SAFETY: created by rbd_aio_create_completion and released once; a completion is
        // only dropped after its request completed or when it was never submitted.
        unsafe { sys::loaded().rbd_aio_release(self.0) };
    }
}

/// The buffer count as librbd's `int`.
fn iov_count(n: usize) -> io::Result<i32> {
    i32::try_from(n).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// An open image with the pool connection it was opened through.
pub(crate) struct Image {
    image: sys::rbd_image_t,
    // Declared after `image` only for clarity: Drop closes the image explicitly before the
    // pool is dropped.
    _pool: Pool,
}

// SAFETY: librbd image handles are thread-safe for I/O from several threads (QEMU and
// librbd's own tools issue aio from many); resize and snapshot selection are serialised by
// librbd's image locks.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl Image {
    /// Opens the named image (read-only when asked or when a snapshot is named).
    pub(crate) fn open(name: &RbdName, read_only: bool) -> io::Result<Image> {
        let pool = Pool::connect(name)?;
        let image_name = cstring(&name.image)?;
        let snap = name.snapshot.as_deref().map(cstring).transpose()?;
        let snap_ptr = snap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let mut image: sys::rbd_image_t = ptr::null_mut();
        let lib = sys::loaded();
        // A read-only user still opens the image read-write, as QEMU does (RbdStorage refuses
        // its writes): librbd uses the object map only on such a handle, and without it every
        // read of an object that does not exist (a hole) is a round trip to an OSD; an RBD ->
        // file convert measured 10% slower. A snapshot is read-only in librbd's eyes, and a
        // client whose caps allow reading only falls back to a read-only handle.
        let mut open_read_only = || {
            // SAFETY: the ioctx is open; the strings outlive the call; `image` is an out
            // pointer.
            unsafe {
                lib.rbd_open_read_only(pool.ioctx(), image_name.as_ptr(), &mut image, snap_ptr)
            }
        };
        let r = if snap.is_some() {
            open_read_only()
        } else {
            let mut handle: sys::rbd_image_t = ptr::null_mut();
            // SAFETY: as above, with `handle` the out pointer.
            let r = unsafe {
                lib.rbd_open(pool.ioctx(), image_name.as_ptr(), &mut handle, ptr::null())
            };
            if read_only && (r == -libc::EPERM || r == -libc::EACCES) {
                open_read_only()
            } else {
                image = handle;
                r
            }
        };
        if r < 0 {
            let what = format_args!("error reading header from {}", name.image);
            return Err(super::cluster::errno_in(what, r.into()));
        }
        Ok(Image { image, _pool: pool })
    }

    /// Creates an image of `size` bytes (librbd's defaults for format and features).
    pub(crate) fn create(name: &RbdName, size: u64) -> io::Result<()> {
        let pool = Pool::connect(name)?;
        let image_name = cstring(&name.image)?;
        let mut opts: sys::rbd_image_options_t = ptr::null_mut();
        // SAFETY: `opts` is an out pointer; destroyed below.
        unsafe { sys::loaded().rbd_image_options_create(&mut opts) };
        // SAFETY: the ioctx is open, the name outlives the call, `opts` is valid.
        let r = unsafe { sys::loaded().rbd_create4(pool.ioctx(), image_name.as_ptr(), size, opts) };
        // SAFETY: created above, destroyed once.
        unsafe { sys::loaded().rbd_image_options_destroy(opts) };
        if r < 0 {
            return Err(errno(r.into()));
        }
        Ok(())
    }

    /// The image's size in bytes.
    pub(crate) fn size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: the image is open; `size` is an out pointer.
        let r = unsafe { sys::loaded().rbd_get_size(self.image, &mut size) };
        if r < 0 {
            return Err(errno(r.into()));
        }
        Ok(size)
    }

    /// The size of the image's objects, the unit RADOS allocates in.
    pub(crate) fn object_size(&self) -> io::Result<u64> {
        // SAFETY: rbd_image_info_t is plain data for which all zeros is a valid value.
        let mut info: sys::rbd_image_info_t = unsafe { std::mem::zeroed() };
        // SAFETY: the image is open; `info` is an out pointer of the size passed.
        let r = unsafe {
            sys::loaded().rbd_stat(
                self.image,
                &mut info,
                std::mem::size_of::<sys::rbd_image_info_t>(),
            )
        };
        if r < 0 {
            return Err(errno(r.into()));
        }
        Ok(info.obj_size)
    }

    /// Reads `buf.len()` bytes at `offset`; returns how many librbd read.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<u64> {
        Completion::run(|c| {
            // SAFETY: `buf` stays borrowed until run() has waited for the completion.
            unsafe {
                sys::loaded().rbd_aio_read(
                    self.image,
                    offset,
                    buf.len(),
                    buf.as_mut_ptr() as *mut c_char,
                    c,
                )
            }
        })
    }

    /// Writes `buf` at `offset`. librbd completes a write with 0, not a byte count: success
    /// means all of it was written.
    pub(crate) fn write(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Completion::run(|c| {
            // SAFETY: `buf` stays borrowed until run() has waited for the completion.
            unsafe {
                sys::loaded().rbd_aio_write(
                    self.image,
                    offset,
                    buf.len(),
                    buf.as_ptr() as *const c_char,
                    c,
                )
            }
        })
        .map(drop)
    }

    /// Writes each `(buf, offset)` piece, all in flight at once, and waits for every one
    /// (also after a failure, so that no buffer stays referenced); the first error wins.
    pub(crate) fn write_many(&self, pieces: &[(&[u8], u64)]) -> io::Result<()> {
        let mut issued = Vec::with_capacity(pieces.len());
        let mut first_err = None;
        for &(buf, offset) in pieces {
            let c = match Completion::new() {
                Ok(c) => c,
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            };
            // SAFETY: `buf` is borrowed for the whole call, and the call waits below for every
            // completion that was handed to an accepted request.
            let r = unsafe {
                sys::loaded().rbd_aio_write(
                    self.image,
                    offset,
                    buf.len(),
                    buf.as_ptr() as *const c_char,
                    c.0,
                )
            };
            if r < 0 {
                first_err = Some(errno(r.into()));
                break;
            }
            issued.push(c);
        }
        for c in &issued {
            // SAFETY: each completion belongs to an accepted request.
            unsafe { sys::loaded().rbd_aio_wait_for_complete(c.0) };
            // SAFETY: complete, so the value is final.
            let ret = unsafe { sys::loaded().rbd_aio_get_return_value(c.0) };
            if ret < 0 && first_err.is_none() {
                first_err = Some(errno(ret as i64));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Reads into several buffers from `offset` on, in one request; returns the bytes read.
    pub(crate) fn read_vectored(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        offset: u64,
    ) -> io::Result<u64> {
        let count = iov_count(bufs.len())?;
        Completion::run(|c| {
            // SAFETY: IoSliceMut is ABI-compatible with struct iovec on Unix (std documents
            // it); the buffers stay borrowed until run() has waited for the completion.
            unsafe {
                sys::loaded().rbd_aio_readv(
                    self.image,
                    bufs.as_ptr() as *const sys::iovec,
                    count,
                    offset,
                    c,
                )
            }
        })
    }

    /// Writes several buffers from `offset` on, in one request.
    pub(crate) fn write_vectored(&self, bufs: &[IoSlice<'_>], offset: u64) -> io::Result<()> {
        let count = iov_count(bufs.len())?;
        Completion::run(|c| {
            // SAFETY: as for read_vectored; librbd only reads the buffers.
            unsafe {
                sys::loaded().rbd_aio_writev(
                    self.image,
                    bufs.as_ptr() as *const sys::iovec,
                    count,
                    offset,
                    c,
                )
            }
        })
        .map(drop)
    }

    /// Flushes librbd's cache to the cluster.
    pub(crate) fn flush(&self) -> io::Result<()> {
        // SAFETY: the image is open; the completion outlives the request.
        Completion::run(|c| unsafe { sys::loaded().rbd_aio_flush(self.image, c) }).map(drop)
    }

    /// Discards a range (it reads back as zeros).
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: as above.
        Completion::run(|c| unsafe { sys::loaded().rbd_aio_discard(self.image, offset, len, c) })
            .map(drop)
    }

    /// Writes zeros over a range.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let len =
            usize::try_from(len).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: as above; no zero flags (librbd may deallocate), no op flags.
        Completion::run(|c| unsafe {
            sys::loaded().rbd_aio_write_zeroes(self.image, offset, len, c, 0, 0)
        })
        .map(drop)
    }

    /// Whether `[offset, offset+len)` starts with allocated data, and for how many bytes.
    pub(crate) fn allocation(&self, offset: u64, len: u64) -> io::Result<(bool, u64)> {
        super::extents::allocation(self.image, offset, len)
    }

    /// Grows or shrinks the image.
    pub(crate) fn resize(&self, size: u64) -> io::Result<()> {
        // SAFETY: the image is open.
        let r = unsafe { sys::loaded().rbd_resize(self.image, size) };
        if r < 0 {
            return Err(errno(r.into()));
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed once, before `_pool` (its ioctx) is dropped.
        unsafe { sys::loaded().rbd_close(self.image) };
    }
}
