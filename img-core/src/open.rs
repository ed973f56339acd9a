//! Opening images: format probing and the policy of what may be opened how.

use crate::qcow2::{Qcow2, Qcow2OpenOptions};
use crate::raw::Raw;
use crate::{Error, Format, Image, Result};
use blockdev::{FileOptions, FileStorage, Storage};
use std::path::Path;
use std::sync::Arc;

/// How to open an image.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    /// The format, or `None` to probe.
    pub format: Option<String>,
    /// Open read-only.
    pub read_only: bool,
    /// Host cache mode of the image file.
    pub cache: blockdev::CacheMode,
    /// The I/O engine of the image file (`aio=`).
    pub aio: blockdev::Aio,
    /// What discard requests do (`discard=`).
    pub discard: DiscardMode,
    /// Whether writes of zeros become write-zeroes requests (`detect-zeroes=`).
    pub detect_zeroes: DetectZeroes,
    /// qcow2 metadata cache options.
    pub qcow2_cache: crate::qcow2::CacheOptions,
    /// `force-share=on` (`-U`): let other processes write and resize the image while it is
    /// open. Only for read-only opens.
    pub force_share: bool,
    /// QEMU's image locking of the file (`file.locking=`).
    pub locking: crate::locking::Locking,
    /// How the image is used, which decides the lock permissions (see [`crate::locking`]).
    pub usage: crate::locking::Usage,
    /// What the image may open beneath it (see [`crate::chain`]).
    pub backing: crate::chain::BackingPolicy,
    /// Read the image as this internal snapshot saw it (read-only opens; the backing chain
    /// is opened as usual). See [`crate::qcow2::snapshot_load`].
    pub snapshot: Option<crate::qcow2::SnapshotSelector>,
}

/// qemu's `discard=` option.
///
/// The library default is `Unmap`, which is what qemu-img and qemu-io do with discard
/// requests; a device exposed to a guest chooses `Ignore` (qemu's `-drive` default) unless the
/// user asks for unmap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// Discards are ignored (`discard=ignore`/`off`).
    Ignore,
    /// Discards free clusters and punch holes in the file (`discard=unmap`/`on`).
    #[default]
    Unmap,
}

impl DiscardMode {
    /// Parses qemu's names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ignore" | "off" => Some(DiscardMode::Ignore),
            "unmap" | "on" => Some(DiscardMode::Unmap),
            _ => None,
        }
    }
}

/// qemu's `detect-zeroes=` option.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DetectZeroes {
    /// Writes are written as given.
    #[default]
    Off,
    /// Writes of all-zero buffers become write-zeroes requests.
    On,
    /// As `On`, and the zeroed range may be unmapped (when `discard=unmap`).
    Unmap,
}

impl DetectZeroes {
    /// Parses qemu's names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "off" => Some(DetectZeroes::Off),
            "on" => Some(DetectZeroes::On),
            "unmap" => Some(DetectZeroes::Unmap),
            _ => None,
        }
    }
}

/// The formats this build knows, as `-f` spells them.
pub const FORMATS: &[&str] = &["qcow2", "raw", "vmdk"];

/// Guesses the format of `storage` from its first bytes. Anything that is not recognised is
/// raw, exactly as qemu-img probes.
pub fn probe_format(storage: &dyn Storage) -> Result<&'static str> {
    let mut magic = [0u8; 4];
    if storage.size()? >= 4 {
        storage.read_at(&mut magic, 0)?;
        if u32::from_be_bytes(magic) == crate::qcow2::header::MAGIC {
            return Ok("qcow2");
        }
        if u32::from_le_bytes(magic) == crate::vmdk::sparse::MAGIC
            || u32::from_be_bytes(magic) == crate::vmdk::foreign::COWD_MAGIC
        {
            return Ok("vmdk");
        }
        let sig = crate::vmdk::descriptor::SIGNATURE.as_bytes();
        if storage.size()? >= sig.len() as u64 {
            let mut head = vec![0u8; sig.len()];
            storage.read_at(&mut head, 0)?;
            if crate::vmdk::descriptor::is_descriptor(&head) {
                return Ok("vmdk");
            }
        }
    }
    Ok("raw")
}

/// Opens the image at `path`.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<Image> {
    // Network names (nbd:, iscsi://, rbd:) open their backend; QEMU's file locks do not apply
    // there (librbd has its own exclusive lock, a LUN or an export its server).
    if let Some(storage) = path
        .to_str()
        .and_then(|n| blockdev::network::open(n, opts.read_only, opts.cache))
    {
        return open_storage(storage?, opts);
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(
        path,
        FileOptions {
            read_only: opts.read_only,
            cache: opts.cache,
            aio: opts.aio,
            create: false,
            ..crate::locking::file_options(path, opts)?
        },
    )?);
    open_storage(storage, opts)
}

/// Opens an image on already opened storage, with its backing chain.
pub fn open_storage(storage: Arc<dyn Storage>, opts: &OpenOptions) -> Result<Image> {
    let format = open_format(storage, opts)?;
    let mut image = crate::chain::open_chain(format, opts)?;
    if let Some(selector) = &opts.snapshot {
        // Only the image named: its backing images are read as they are.
        crate::qcow2::snapshot_load::load_snapshot(&mut image, selector)?;
    }
    Ok(image)
}

/// Opens the format driver of one image (no backing chain).
pub(crate) fn open_format(
    storage: Arc<dyn Storage>,
    opts: &OpenOptions,
) -> Result<Box<dyn Format>> {
    let driver = match opts.format.as_deref() {
        Some(f) => f.to_string(),
        None => probe_format(storage.as_ref())?.to_string(),
    };
    Ok(match driver.as_str() {
        "raw" => Box::new(Raw::open(storage)?),
        "qcow2" => Box::new(Qcow2::open(
            storage,
            &Qcow2OpenOptions {
                read_only: opts.read_only,
                cache: opts.qcow2_cache.clone(),
                discard: opts.discard,
            },
        )?),
        "vmdk" => Box::new(crate::vmdk::Vmdk::open(storage, opts)?),
        other => return Err(Error::InvalidArgument(format!("Unknown driver '{other}'"))),
    })
}
