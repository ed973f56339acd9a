//! Creating raw images, with qemu's preallocation modes.

use crate::{Error, Result};
use blockdev::{FileStorage, Storage};
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// How much of a new image to allocate up front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Preallocation {
    /// A sparse file.
    #[default]
    Off,
    /// Metadata only (qcow2); for raw the same as `off`.
    Metadata,
    /// Reserve the blocks with fallocate, without writing them.
    Falloc,
    /// Write zeros to every byte.
    Full,
}

impl Preallocation {
    /// Parses qemu's spelling.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "off" => Preallocation::Off,
            "metadata" => Preallocation::Metadata,
            "falloc" => Preallocation::Falloc,
            "full" => Preallocation::Full,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "Parameter 'preallocation' does not accept value '{s}'"
                )))
            }
        })
    }

    /// qemu's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Preallocation::Off => "off",
            Preallocation::Metadata => "metadata",
            Preallocation::Falloc => "falloc",
            Preallocation::Full => "full",
        }
    }
}

/// Options of `img create -f raw`.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCreateOptions {
    /// Virtual size in bytes.
    pub size: u64,
    /// Preallocation mode.
    pub preallocation: Preallocation,
}

/// Creates a raw image file.
pub fn create(path: &Path, opts: &RawCreateOptions) -> Result<()> {
    if let Some(name) = path
        .to_str()
        .filter(|n| blockdev::network::Protocol::of(n).is_network())
    {
        // librbd creates the image at its size and an iSCSI LUN has its own; blocks are
        // allocated when written, so only the modes that allocate nothing up front apply.
        if !matches!(
            opts.preallocation,
            Preallocation::Off | Preallocation::Metadata
        ) {
            return Err(blockdev::Error::InvalidOptions {
                message: format!(
                    "Unsupported preallocation mode '{}' for {}",
                    opts.preallocation.as_str(),
                    blockdev::network::Protocol::of(name).driver()
                ),
            }
            .into());
        }
        blockdev::network::create(name, opts.size).expect("a network name")?;
        return Ok(());
    }
    let storage = FileStorage::create(path)?;
    allocate(&storage, 0, opts.size, opts.preallocation)?;
    if opts.size > 0 && opts.preallocation != Preallocation::Full {
        // As qemu: the first block of a new file is written, so that the alignment of the
        // file can be probed later (and so that `disk size` matches qemu-img's images).
        let first = if opts.size < 4096 { 512 } else { 4096 };
        // Never past the end: qemu's sizes are whole sectors, but callers may pass any size.
        let first = first.min(opts.size as usize);
        storage.write_at(&[0u8; 4096][..first], 0)?;
    }
    Ok(())
}

/// Grows `storage` to `size`, preallocating the new part from `from`.
pub fn allocate(
    storage: &FileStorage,
    from: u64,
    size: u64,
    prealloc: Preallocation,
) -> Result<()> {
    match prealloc {
        Preallocation::Off | Preallocation::Metadata => storage.truncate(size)?,
        Preallocation::Falloc => {
            let len = size.saturating_sub(from);
            if len > 0 {
                // SAFETY: plain fallocate on a descriptor owned by `storage`.
                let r = unsafe {
                    libc::fallocate(storage.file().as_raw_fd(), 0, from as i64, len as i64)
                };
                if r != 0 {
                    return Err(blockdev::Error::Io {
                        op: "fallocate",
                        name: storage.name().to_string(),
                        offset: from,
                        source: std::io::Error::last_os_error(),
                    }
                    .into());
                }
            }
            storage.truncate(size)?;
        }
        Preallocation::Full => {
            storage.truncate(from)?;
            const CHUNK: u64 = 1 << 20;
            let zeros = vec![0u8; CHUNK as usize];
            let mut pos = from;
            while pos < size {
                let n = CHUNK.min(size - pos);
                storage.write_at(&zeros[..n as usize], pos)?;
                pos += n;
            }
            storage.flush()?;
        }
    }
    Ok(())
}
