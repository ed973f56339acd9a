//! Images for the device models' unit tests, made by the engine in a test's directory.

use img_core::{open_image, OpenOptions};
use std::path::Path;

/// Opens `dir/name` as `format` (raw or qcow2), creating it with `size` bytes first if it does
/// not exist yet.
pub fn image(dir: &Path, name: &str, size: u64, format: &str, read_only: bool) -> img_core::Image {
    let path = dir.join(name);
    if !path.exists() {
        match format {
            "qcow2" => img_core::qcow2::create(
                &path,
                &img_core::qcow2::Qcow2CreateOptions {
                    size,
                    ..Default::default()
                },
            )
            .unwrap(),
            _ => img_core::raw::create(
                &path,
                &img_core::raw::RawCreateOptions {
                    size,
                    preallocation: img_core::raw::Preallocation::Off,
                },
            )
            .unwrap(),
        }
    }
    open_image(
        &path,
        &OpenOptions {
            format: Some(format.into()),
            read_only,
            ..Default::default()
        },
    )
    .unwrap()
}
