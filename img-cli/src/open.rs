//! Opening images named on the command line, with qemu-img's `-f`, `--image-opts`, `-T` and
//! `-U` handling and its error messages.

use crate::options::parse_kv;
use crate::CliError;
use blockdev::CacheMode;
use img_core::{open_image, Image, OpenOptions};
use std::path::Path;

/// Formats qemu knows that this build cannot open; they get a clearer message than qemu's
/// "Unknown driver".
pub(crate) const UNSUPPORTED_FORMATS: &[&str] = &[
    "bochs",
    "cloop",
    "dmg",
    "luks",
    "parallels",
    "qcow",
    "qed",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// Which image an argument names and how to open it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSpec {
    /// The argument as the user wrote it, for "Could not open '...'" messages.
    pub arg: String,
    /// Path of the image file.
    pub path: String,
    /// The format driver (`None` probes).
    pub format: Option<String>,
    /// `driver=file` with `--image-opts`: the file itself, without a format layer.
    pub protocol_only: bool,
}

impl ImageSpec {
    /// An image named by a plain file name, with an optional `-f` format.
    pub fn file(arg: &str, format: Option<&str>) -> Self {
        ImageSpec {
            arg: arg.to_string(),
            path: arg.to_string(),
            format: format.map(str::to_string),
            protocol_only: false,
        }
    }

    /// An image named by an `--image-opts` option string such as
    /// `driver=qcow2,file.filename=disk.qcow2`.
    pub fn from_image_opts(arg: &str) -> Result<Self, CliError> {
        let fail = |m: String| CliError::new(format!("Could not open '{arg}': {m}"));
        let mut pairs = parse_kv(arg)?;
        // A leading value without a key names the `file` option, as in qemu.
        if let Some(first) = arg.split(',').next() {
            if !first.contains('=') && !first.is_empty() {
                pairs[0] = ("file".to_string(), pairs[0].0.clone());
            }
        }
        let mut driver: Option<String> = None;
        let mut file_filename: Option<String> = None;
        let mut filename: Option<String> = None;
        for (k, v) in &pairs {
            match k.as_str() {
                "driver" => driver = Some(v.clone()),
                "file.filename" => file_filename = Some(v.clone()),
                "filename" => filename = Some(v.clone()),
                "file" => {
                    return Err(fail(format!(
                        "Cannot find device='{v}' nor node-name='{v}'"
                    )))
                }
                "file.driver" if v != "file" => {
                    return Err(fail(format!("Unknown protocol driver '{v}'")))
                }
                // Options that change nothing this tool does.
                "file.driver"
                | "node-name"
                | "read-only"
                | "auto-read-only"
                | "force-share"
                | "discard"
                | "detect-zeroes"
                | "cache.direct"
                | "cache.no-flush"
                | "file.node-name"
                | "file.locking"
                | "file.aio"
                | "file.cache.direct"
                | "file.cache.no-flush"
                | "l2-cache-size"
                | "refcount-cache-size"
                | "cache-size"
                | "locking"
                | "aio" => {}
                other => {
                    let what = match driver.as_deref() {
                        Some("file") | None if other.starts_with("file.") => {
                            format!(
                                "Block protocol 'file' does not support the option '{}'",
                                &other["file.".len()..]
                            )
                        }
                        Some("file") => {
                            format!("Block protocol 'file' does not support the option '{other}'")
                        }
                        Some(d) => {
                            format!("Block format '{d}' does not support the option '{other}'")
                        }
                        None => format!("Invalid parameter '{other}'"),
                    };
                    return Err(fail(what));
                }
            }
        }
        if driver.as_deref() == Some("file") {
            let path = filename
                .ok_or_else(|| fail("The 'file' block driver requires a file name".into()))?;
            return Ok(ImageSpec {
                arg: arg.to_string(),
                path,
                format: Some("raw".to_string()),
                protocol_only: true,
            });
        }
        if filename.is_some() {
            return Err(fail(format!(
                "Block format '{}' does not support the option 'filename'",
                driver.as_deref().unwrap_or("raw")
            )));
        }
        let path = file_filename
            .ok_or_else(|| fail("A block device must be specified for \"file\"".into()))?;
        Ok(ImageSpec {
            arg: arg.to_string(),
            path,
            format: driver,
            protocol_only: false,
        })
    }

    /// Builds the spec for an image argument from the command's options.
    pub fn from_args(arg: &str, image_opts: bool, format: Option<&str>) -> Result<Self, CliError> {
        if image_opts {
            Self::from_image_opts(arg)
        } else {
            Ok(Self::file(arg, format))
        }
    }
}

/// Parses a `-t`/`-T` cache mode.
pub fn parse_cache(mode: &str) -> Option<CacheMode> {
    CacheMode::parse(mode)
}

/// Opens the image read-only (or read-write) with `cache`, mapping failures to qemu-img's
/// "Could not open 'name': reason" messages.
pub fn open(spec: &ImageSpec, read_only: bool, cache: CacheMode) -> Result<Image, CliError> {
    let fail = |m: String| CliError::new(format!("Could not open '{}': {m}", spec.arg));
    if let Some(f) = spec.format.as_deref() {
        if UNSUPPORTED_FORMATS.contains(&f) {
            return Err(fail(format!("The '{f}' format is not supported by img")));
        }
    }
    let path = Path::new(&spec.path);
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(fail(format!(
            "'file' driver requires '{}' to be a regular file",
            spec.path
        )));
    }
    open_image(
        path,
        &OpenOptions {
            format: spec.format.clone(),
            read_only,
            cache,
            ..Default::default()
        },
    )
    .map_err(|e| fail(open_reason(&e)))
}

/// The reason part of an open failure, without the file name the core error already carries
/// (qemu names the file once in front).
pub fn open_reason(e: &img_core::Error) -> String {
    match e {
        img_core::Error::Invalid { reason, .. } => reason.clone(),
        img_core::Error::Unsupported { what, .. } => what.clone(),
        img_core::Error::InvalidArgument(m) => m.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_opts() {
        let s = ImageSpec::from_image_opts("driver=qcow2,file.filename=a,,b.qcow2").unwrap();
        assert_eq!(s.path, "a,b.qcow2");
        assert_eq!(s.format.as_deref(), Some("qcow2"));
        let s = ImageSpec::from_image_opts("file.filename=x").unwrap();
        assert_eq!(s.format, None);
        let s = ImageSpec::from_image_opts("driver=file,filename=x").unwrap();
        assert!(s.protocol_only);
        let e = ImageSpec::from_image_opts("x.qcow2").unwrap_err();
        assert_eq!(
            e.message,
            "Could not open 'x.qcow2': Cannot find device='x.qcow2' nor node-name='x.qcow2'"
        );
        let e = ImageSpec::from_image_opts("driver=qcow2").unwrap_err();
        assert!(e
            .message
            .ends_with("A block device must be specified for \"file\""));
        let e = ImageSpec::from_image_opts("driver=qcow2,file.filename=a,foo=bar").unwrap_err();
        assert!(e
            .message
            .ends_with("Block format 'qcow2' does not support the option 'foo'"));
    }
}
