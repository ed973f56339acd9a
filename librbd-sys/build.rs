//! Generates the bindings from the system's librbd and librados headers.
//!
//! Only the calls the RBD backend uses are allowlisted: the headers declare hundreds of
//! functions, and a small surface keeps the generated file reviewable and the build quick.

use std::env;
use std::path::PathBuf;

/// librados calls: connect to a cluster and open a pool.
const RADOS_FUNCTIONS: &[&str] = &[
    "rados_create2",
    "rados_conf_read_file",
    "rados_conf_set",
    "rados_connect",
    "rados_shutdown",
    "rados_ioctx_create",
    "rados_ioctx_destroy",
    "rados_ioctx_set_namespace",
];

/// librbd calls: images, their snapshots, and asynchronous I/O.
const RBD_FUNCTIONS: &[&str] = &[
    "rbd_create4",
    "rbd_image_options_create",
    "rbd_image_options_destroy",
    "rbd_image_options_set_uint64",
    "rbd_open",
    "rbd_open_read_only",
    "rbd_close",
    "rbd_stat",
    "rbd_get_size",
    "rbd_resize",
    "rbd_snap_set",
    "rbd_diff_iterate2",
    "rbd_read",
    "rbd_write",
    "rbd_flush",
    "rbd_discard",
    "rbd_write_zeroes",
    "rbd_aio_create_completion",
    "rbd_aio_wait_for_complete",
    "rbd_aio_get_return_value",
    "rbd_aio_release",
    "rbd_aio_read",
    "rbd_aio_write",
    "rbd_aio_readv",
    "rbd_aio_writev",
    "rbd_aio_flush",
    "rbd_aio_discard",
    "rbd_aio_write_zeroes",
];

/// Where Debian's librados-dev and librbd-dev put the headers.
const HEADERS: &[&str] = &["/usr/include/rados/librados.h", "/usr/include/rbd/librbd.h"];

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    for h in HEADERS {
        println!("cargo:rerun-if-changed={h}");
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // Fail early with the packages to install, rather than with bindgen's clang error.
    if let Some(missing) = HEADERS.iter().find(|h| !std::path::Path::new(h).exists()) {
        panic!(
            "librbd-sys: {missing} not found; install librados-dev and librbd-dev \
             (scripts/build-deps.sh installs everything the workspace needs to build)"
        );
    }

    // The functions become fields of one struct, resolved from the library at run time (see
    // lib.rs); types and constants are generated as usual.
    let mut builder = bindgen::Builder::default()
        .dynamic_library_name("LibRbd")
        .dynamic_link_require_all(true)
        .header("wrapper.h")
        .allowlist_var("RBD_IMAGE_OPTION_.*")
        .allowlist_var("LIBRADOS_VERSION_.*")
        .allowlist_var("LIBRBD_VERSION_.*")
        .layout_tests(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for f in RADOS_FUNCTIONS.iter().chain(RBD_FUNCTIONS) {
        builder = builder.allowlist_function(f);
    }
    let bindings = builder
        .generate()
        .expect("bindgen failed on rados/librados.h and rbd/librbd.h: are librados-dev and librbd-dev installed (scripts/ceph-lab.sh start installs them)?");
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("cannot write the generated bindings");
}
