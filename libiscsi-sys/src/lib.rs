//! Raw FFI bindings to libiscsi, generated at build time by bindgen from the installed headers
//! (`iscsi/iscsi.h`, `iscsi/scsi-lowlevel.h`, Debian's libiscsi-dev). Only what the safe
//! wrapper in `blockdev::iscsi` needs is generated; see build.rs for the list.
//!
//! The library is not linked but loaded on first use ([`library`]), as QEMU loads its iscsi
//! module: libiscsi brings libibverbs, librdmacm and libnl, which every process linking this
//! crate would otherwise load at start. The functions are methods of [`LibIscsi`].

#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));

use std::sync::OnceLock;

/// The shared library loaded (Debian's libiscsi7).
pub const LIBRARY: &str = "libiscsi.so.7";

static LOADED: OnceLock<Result<LibIscsi, String>> = OnceLock::new();

/// libiscsi, loaded on the first call; the error says what could not be loaded.
pub fn library() -> Result<&'static LibIscsi, String> {
    LOADED
        .get_or_init(|| {
            // SAFETY: loading libiscsi runs its and its dependencies' initialisers, which only
            // set up their own state; every symbol is resolved with the type the headers give.
            unsafe { LibIscsi::new(LIBRARY) }
                .map_err(|e| format!("cannot load {LIBRARY} (the libiscsi7 package): {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// The library once [`library`] has loaded it. Callers hold a context, which exists only after
/// a successful load, so this never fails for them.
pub fn loaded() -> &'static LibIscsi {
    match LOADED.get() {
        Some(Ok(lib)) => lib,
        _ => panic!("libiscsi used before libiscsi_sys::library() loaded it"),
    }
}
