//! Generates the bindings from the system's libiscsi headers and links libiscsi.
//!
//! Only the functions and types the safe wrapper in `blockdev::iscsi` uses are allowlisted, so
//! the generated file stays small and a libiscsi upgrade that changes something unused cannot
//! break the build.

use std::env;
use std::path::PathBuf;

/// Functions used by the wrapper: context lifecycle, login, the synchronous SCSI commands, the
/// asynchronous READ/WRITE(16) with the event-loop calls, and the task accessors.
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
    "iscsi_get_lba_status_sync",
    // The asynchronous path: several READ/WRITE(16) in flight on one session, driven by our own
    // poll loop, reads landing straight in the caller's buffer.
    "iscsi_read16_task",
    "iscsi_write16_task",
    "iscsi_get_fd",
    "iscsi_which_events",
    "iscsi_service",
    "iscsi_scsi_cancel_task",
    "scsi_task_add_data_in_buffer",
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
    "scsi_get_lba_status",
    "scsi_lba_status_descriptor",
    "scsi_provisioning_type",
    "scsi_residual",
    "iscsi_session_type",
    "iscsi_header_digest",
    "scsi_status",
    "scsi_sense_key",
    "scsi_inquiry_pagecode",
];

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    // The functions become fields of one struct, resolved from the library at run time (see
    // lib.rs); types and constants are generated as usual.
    let mut builder = bindgen::Builder::default()
        .dynamic_library_name("LibIscsi")
        .dynamic_link_require_all(true)
        .header("wrapper.h")
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .rustified_enum("iscsi_session_type")
        .rustified_enum("iscsi_header_digest")
        .constified_enum_module("scsi_status")
        .constified_enum_module("scsi_sense_key")
        .constified_enum_module("scsi_inquiry_pagecode")
        .constified_enum_module("scsi_provisioning_type")
        .constified_enum_module("scsi_residual")
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
