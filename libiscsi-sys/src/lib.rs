//! Raw FFI bindings to libiscsi, generated at build time by bindgen from the installed headers
//! (`iscsi/iscsi.h`, `iscsi/scsi-lowlevel.h`, Debian's libiscsi-dev). Only what the safe
//! wrapper in `blockdev::iscsi` needs is generated; see build.rs for the list.

#![allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    missing_docs
)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
