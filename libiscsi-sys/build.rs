//! Generates the bindings from the system's libiscsi headers and links libiscsi.
//!
//! Only the functions and types the safe wrapper in `blockdev::iscsi` uses are allowlisted, so
//! the generated file stays small and a libiscsi upgrade that changes something unused cannot
//! break the build.

use std::env;
use std::path::PathBuf;

/// Functions used by the wrapper: context lifecycle, login, the synchronous SCSI commands, and
/// the task accessors.
const FUNCTIONS: &[&str] = &[
    "iscsi_create_context",
    "iscsi_destroy_context",
    "iscsi_set_targetname",
    "iscsi_set_session_type",
    "iscsi_set_header_digest",
    "iscsi_set_initiator_username_pwd",
    "iscsi_set_timeout",
    "iscsi_full_connect_sync",
    "iscsi_reconnect_sync",
    "iscsi_set_reconnect_max_retries",
    "iscsi_disconnect",
    "iscsi_is_logged_in",
    "iscsi_get_error",
    "iscsi_readcapacity16_sync",
    "iscsi_inquiry_sync",
    "iscsi_read16_sync",
    "iscsi_write16_sync",
    "iscsi_synchronizecache10_sync",
    "iscsi_synchronizecache16_sync",
    "iscsi_unmap_sync",
    "iscsi_writesame16_sync",
    "scsi_datain_unmarshall",
    "scsi_free_scsi_task",
    "scsi_sense_key_str",
    "scsi_sense_ascq_str",
];

/// Types and enums those functions take or return.
const TYPES: &[&str] = &[
    "iscsi_context",
    "scsi_task",
    "scsi_sense",
    "scsi_readcapacity16",
    "scsi_inquiry_logical_block_provisioning",
    "scsi_inquiry_block_limits",
    "unmap_list",
    "iscsi_session_type",
    "iscsi_header_digest",
    "scsi_status",
    "scsi_sense_key",
    "scsi_inquiry_pagecode",
];

fn main() {
    println!("cargo:rustc-link-lib=iscsi");
    println!("cargo:rerun-if-changed=wrapper.h");
    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .rustified_enum("iscsi_session_type")
        .rustified_enum("iscsi_header_digest")
        .constified_enum_module("scsi_status")
        .constified_enum_module("scsi_sense_key")
        .constified_enum_module("scsi_inquiry_pagecode")
        .derive_default(true);
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    for t in TYPES {
        builder = builder.allowlist_type(t);
    }
    let bindings = builder.generate().unwrap_or_else(|e| {
        panic!("bindgen could not read the libiscsi headers ({e}); install libiscsi-dev and libclang-dev")
    });
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing the generated bindings");
}
