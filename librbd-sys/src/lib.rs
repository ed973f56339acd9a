//! Raw bindings to Ceph's librbd, and the librados calls needed to reach a pool, generated at
//! build time by bindgen from Debian's `rados/librados.h` (librados-dev) and `rbd/librbd.h`
//! (librbd-dev). Everything here is `unsafe` C; `blockdev::rbd` wraps it.
#![allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    missing_docs
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
