//! Raw bindings to Ceph's librbd, and the librados calls needed to reach a pool, generated at
//! build time by bindgen from Debian's `rados/librados.h` (librados-dev) and `rbd/librbd.h`
//! (librbd-dev). Everything here is `unsafe` C; `blockdev::rbd` wraps it.
//!
//! The library is not linked but loaded on first use ([`library`]), as QEMU loads its rbd
//! module: librbd brings librados, Ceph's common library, boost and libstdc++, whose loading
//! and relocation would otherwise cost every process that links this crate about 10 ms at
//! start, whether it ever opens an RBD image or not. The functions are methods of
//! [`LibRbd`]; librados's are resolved through librbd, which depends on it.
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    missing_docs
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

use std::sync::OnceLock;

/// The shared library loaded (Debian's librbd1; librados2 comes with it).
pub const LIBRARY: &str = "librbd.so.1";

static LOADED: OnceLock<Result<LibRbd, String>> = OnceLock::new();

/// librbd, loaded on the first call; the error says what could not be loaded.
pub fn library() -> Result<&'static LibRbd, String> {
    LOADED
        .get_or_init(|| {
            // SAFETY: loading librbd runs its and its dependencies' initialisers, which only
            // set up their own state; every symbol is resolved with the type the headers give.
            unsafe { LibRbd::new(LIBRARY) }
                .map_err(|e| format!("cannot load {LIBRARY} (the librbd1 package): {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The library once [`library`] has loaded it. Callers hold a cluster connection or an image,
/// which exist only after a successful load, so this never fails for them.
pub fn loaded() -> &'static LibRbd {
    match LOADED.get() {
        Some(Ok(lib)) => lib,
        _ => panic!("librbd used before librbd_sys::library() loaded it"),
    }
}
