//! A connection to a Ceph cluster and an I/O context on one pool: the librados half.

use std::ffi::{CString, NulError};
use std::io;
use std::ptr;

use librbd_sys as sys;

use super::name::RbdName;

/// An errno returned negated by librados/librbd, as an `io::Error`.
pub(crate) fn errno(ret: i64) -> io::Error {
    io::Error::from_raw_os_error((-ret) as i32)
}

/// `errno` with what failed in front, as qemu's rbd driver words it ("error opening pool
/// rbd: No such file or directory").
pub(crate) fn errno_in(what: impl std::fmt::Display, ret: i64) -> io::Error {
    let e = errno(ret);
    io::Error::new(e.kind(), format!("{what}: {}", crate::os_message(&e)))
}

pub(crate) fn cstring(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|e: NulError| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A connected cluster handle with an I/O context on the image's pool (and namespace).
///
/// Dropping it destroys the context, then shuts the connection down.
pub(crate) struct Pool {
    cluster: sys::rados_t,
    ioctx: sys::rados_ioctx_t,
}

// SAFETY: librados handles are usable from any thread; librados synchronises internally, and
// `Pool` only hands the raw handles to librbd calls, which are thread-safe as well.
unsafe impl Send for Pool {}
// SAFETY: as above; no method mutates the handles themselves.
unsafe impl Sync for Pool {}

impl Pool {
    /// Connects as the name's client, with its ceph.conf and options, and opens its pool.
    pub(crate) fn connect(name: &RbdName) -> io::Result<Pool> {
        let client = format!("client.{}", name.id.as_deref().unwrap_or("admin"));
        let cluster_name = cstring("ceph")?;
        let client = cstring(&client)?;
        let mut cluster: sys::rados_t = ptr::null_mut();
        // The first RBD name a process opens loads librbd (see librbd_sys::library).
        let lib = sys::library().map_err(io::Error::other)?;
        // SAFETY: `cluster` is a valid out pointer; the strings outlive the call.
        let r =
            unsafe { lib.rados_create2(&mut cluster, cluster_name.as_ptr(), client.as_ptr(), 0) };
        if r < 0 {
            return Err(errno(r.into()));
        }
        // From here on `pool` owns the handle, so every early return shuts it down.
        let mut pool = Pool {
            cluster,
            ioctx: ptr::null_mut(),
        };
        pool.configure(name)?;
        // SAFETY: the handle is configured and not yet connected.
        let r = unsafe { sys::loaded().rados_connect(pool.cluster) };
        if r < 0 {
            return Err(errno_in("error connecting", r.into()));
        }
        let pool_name = cstring(&name.pool)?;
        // SAFETY: the cluster is connected; `ioctx` is a valid out pointer.
        let r = unsafe {
            sys::loaded().rados_ioctx_create(pool.cluster, pool_name.as_ptr(), &mut pool.ioctx)
        };
        if r < 0 {
            pool.ioctx = ptr::null_mut();
            return Err(errno_in(
                format_args!("error opening pool {}", name.pool),
                r.into(),
            ));
        }
        if let Some(ns) = &name.namespace {
            pool.set_namespace(ns)?;
        }
        Ok(pool)
    }

    fn configure(&mut self, name: &RbdName) -> io::Result<()> {
        // Like QEMU: the named file, or Ceph's default search path when there is none. A
        // missing named file is an error; a missing default is not.
        let conf = name.conf.as_deref().map(cstring).transpose()?;
        let path = conf.as_ref().map_or(ptr::null(), |c| c.as_ptr());
        // SAFETY: the handle is valid and not connected; `path` is null or a C string that
        // outlives the call.
        let r = unsafe { sys::loaded().rados_conf_read_file(self.cluster, path) };
        if r < 0 && conf.is_some() {
            return Err(errno(r.into()));
        }
        for (key, value) in &name.options {
            let (k, v) = (cstring(key)?, cstring(value)?);
            // SAFETY: as above.
            let r = unsafe { sys::loaded().rados_conf_set(self.cluster, k.as_ptr(), v.as_ptr()) };
            if r < 0 {
                return Err(io::Error::new(
                    errno(r.into()).kind(),
                    format!("invalid conf option {key}={value}: {}", errno(r.into())),
                ));
            }
        }
        Ok(())
    }

    fn set_namespace(&self, ns: &str) -> io::Result<()> {
        let ns = cstring(ns)?;
        // SAFETY: the ioctx is open; librados copies the string.
        unsafe { sys::loaded().rados_ioctx_set_namespace(self.ioctx, ns.as_ptr()) };
        Ok(())
    }

    /// The raw I/O context, for librbd calls.
    pub(crate) fn ioctx(&self) -> sys::rados_ioctx_t {
        self.ioctx
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the handles were created by librados and are released once, context first;
        // the caller (RbdImage) closes its image before dropping the pool.
        unsafe {
            if !self.ioctx.is_null() {
                sys::loaded().rados_ioctx_destroy(self.ioctx);
            }
            sys::loaded().rados_shutdown(self.cluster);
        }
    }
}
