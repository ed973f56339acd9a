//! Backing chains: the one policy that decides what an image may open beneath it.
//!
//! An image names its backing file (and, in qcow2, the backing file's format). Everything an
//! image names is opened here, and only here, under these rules:
//! - a relative name is resolved against the directory of the image that names it, as qemu
//!   resolves it (string concatenation, no canonicalisation, so names stay as users wrote them);
//! - the format comes from the recorded backing format; only when none is recorded is the file
//!   probed. A recorded `raw` is never probed, so a guest that writes a qcow2 header into its
//!   raw disk cannot make the host open another file through it;
//! - a file that is already in the chain (by device and inode, whatever its name) is a loop
//!   and an error, as is a chain deeper than [`BackingPolicy::max_depth`];
//! - backing files are opened read-only, except the one image a commit writes into.
//!
//! The chain is opened iteratively and read iteratively ([`crate::Image`] walks down it in a
//! loop), so its depth costs one open file and one small driver per image, not stack.

use crate::locking::{self, Permissions};
use crate::open::{open_format, probe_format, OpenOptions};
use crate::{Error, Format, Image, Result};
use blockdev::{FileOptions, FileStorage, Storage};
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

/// The deepest chain [`crate::open_image`] opens by default. Each image of a chain holds a
/// file descriptor, so this is also a bound on the files one open holds.
pub const DEFAULT_MAX_DEPTH: usize = 4096;

/// Most bytes of metadata tables (qcow2 L1 and refcount tables, VMDK grain directories) that
/// the images of one chain may hold in memory together. Each image is capped on its own (40
/// MiB for qcow2, 256 MiB for VMDK); without a cap on their sum a chain of hostile images
/// would multiply that by its depth. A chain of 4096 images of 1 TiB with 64 KiB clusters
/// needs 512 MiB of L1 tables: real chains fit.
pub const CHAIN_TABLE_BUDGET: u64 = 1 << 30;

/// What an image may open beneath it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackingPolicy {
    /// Open the backing chain at all; `false` is qemu's `-u` (unsafe) mode, where only the
    /// named image is opened and its backing file is left alone.
    pub open_backing: bool,
    /// The most backing images one open may follow.
    pub max_depth: usize,
    /// The depth (1 = the top image's backing file) of the one backing image to open
    /// read-write, as `commit` needs for its base.
    pub writable_depth: Option<usize>,
}

impl BackingPolicy {
    /// Opens the named image alone, leaving its backing file closed.
    pub fn none() -> Self {
        BackingPolicy {
            open_backing: false,
            ..Default::default()
        }
    }
}

impl Default for BackingPolicy {
    fn default() -> Self {
        BackingPolicy {
            open_backing: true,
            max_depth: DEFAULT_MAX_DEPTH,
            writable_depth: None,
        }
    }
}

/// Resolves the backing file name `backing` recorded in the image named `image` as qemu does:
/// absolute names and names with a protocol prefix (`nbd:...`) stand as they are; a relative
/// name is relative to the directory of the image.
pub fn resolve_backing_name(image: &str, backing: &str) -> String {
    let has_protocol = backing
        .find(':')
        .is_some_and(|colon| !backing[..colon].contains('/'));
    if backing.starts_with('/') || has_protocol {
        return backing.to_string();
    }
    match image.rfind('/') {
        Some(slash) => format!("{}{backing}", &image[..=slash]),
        None => backing.to_string(),
    }
}

/// An image's identity, so that a loop is found whatever names its members go by: a file's
/// device and inode, or the name of network storage (which has no inode).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum FileId {
    File(u64, u64),
    Network(String),
}

fn file_id(storage: &dyn Storage) -> Option<FileId> {
    match storage.as_file() {
        Some(file) => {
            let meta = file.metadata().ok()?;
            Some(FileId::File(meta.dev(), meta.ino()))
        }
        None => Some(FileId::Network(storage.name().to_string())),
    }
}

/// Opens the backing chain beneath `top` (already opened from `opts`) and returns the whole
/// chain as one image.
pub(crate) fn open_chain(top: Box<dyn Format>, opts: &OpenOptions) -> Result<Image> {
    let mut seen: HashSet<FileId> = file_id(top.file().as_ref()).into_iter().collect();
    // The permissions each level's user holds; a backing image's user is the image above.
    let mut users = locking::user(opts.read_only, opts.usage);
    let mut tables = top.table_bytes();
    let mut layers = vec![top];
    if opts.backing.open_backing {
        while let Some(below) = open_below(&layers, &mut seen, &mut users, opts)? {
            tables = tables.saturating_add(below.table_bytes());
            if tables > CHAIN_TABLE_BUDGET {
                return Err(Error::invalid(
                    layers[0].file_name(),
                    format!(
                        "the backing chain's metadata tables need more than {} MiB of memory \
                         together (at '{}'); refusing to open more of it",
                        CHAIN_TABLE_BUDGET >> 20,
                        below.file_name()
                    ),
                ));
            }
            layers.push(below);
        }
    }
    // Assemble bottom up: each image owns the one beneath it.
    let mut below: Option<Image> = None;
    while let Some(format) = layers.pop() {
        if let Some(b) = &below {
            format.bind_backing(b.format());
        }
        let mut image = Image::new(format, below.take());
        if layers.is_empty() {
            image.set_request_options(opts.discard, opts.detect_zeroes);
        }
        below = Some(image);
    }
    Ok(below.expect("the chain has its top image"))
}

/// Opens the backing image of the last of `layers`, or returns `None` when it has none.
/// Loops and chains deeper than the policy allows are errors naming the top image.
fn open_below(
    layers: &[Box<dyn Format>],
    seen: &mut HashSet<FileId>,
    users: &mut Permissions,
    opts: &OpenOptions,
) -> Result<Option<Box<dyn Format>>> {
    let policy = &opts.backing;
    let top_name = layers[0].file_name();
    let above = &layers[layers.len() - 1];
    let info = above.info();
    // An empty name is no backing file, as in qemu.
    let Some(recorded) = info.backing_file.filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let depth = layers.len();
    if depth > policy.max_depth {
        return Err(Error::invalid(
            top_name,
            format!(
                "the backing chain is deeper than {} images; refusing to follow it further",
                policy.max_depth
            ),
        ));
    }
    let name = resolve_backing_name(above.file_name(), &recorded);
    // A loop is found before the file is opened again: a second open of a file this process
    // holds would first trip over its own image locks.
    let id = if blockdev::network::Protocol::of(&name).is_network() {
        Some(FileId::Network(name.clone()))
    } else {
        std::fs::metadata(&name)
            .ok()
            .map(|meta| FileId::File(meta.dev(), meta.ino()))
    };
    if let Some(id) = id {
        if !seen.insert(id) {
            return Err(Error::invalid(
                top_name,
                format!("Backing file '{recorded}' creates an infinite loop."),
            ));
        }
    }
    let writable = policy.writable_depth == Some(depth);
    *users = locking::backing_of(*users);
    if writable {
        users.perm = users.perm | locking::Perm::WRITE;
    }
    open_backing(
        &name,
        info.backing_format.as_deref(),
        writable,
        *users,
        opts,
    )
    .map(Some)
    .map_err(|e| Error::BackingOpen {
        file: top_name.to_string(),
        source: Box::new(e),
    })
}

/// Opens one backing image, read-only unless it is the image a commit writes into.
fn open_backing(
    name: &str,
    recorded_format: Option<&str>,
    writable: bool,
    users: Permissions,
    opts: &OpenOptions,
) -> Result<Box<dyn Format>> {
    let path = Path::new(name);
    let file_opts = |permissions| FileOptions {
        read_only: !writable,
        cache: opts.cache,
        aio: opts.aio,
        create: false,
        locking: opts.locking,
        permissions,
    };
    // The permissions depend on the format; a format that must be probed is probed through an
    // unlocked open first, as the top image is.
    // A backing file on network storage (qemu accepts any name there) is opened through its
    // backend, without file locks.
    if let Some(storage) = blockdev::network::open(name, !writable, opts.cache) {
        let storage = storage?;
        let format = match recorded_format {
            Some(f) => f.to_string(),
            None => probe_format(storage.as_ref())?.to_string(),
        };
        return open_format(storage, &backing_options(format, writable, opts));
    }
    let format = match recorded_format {
        Some(f) => f.to_string(),
        None => {
            let probe = FileStorage::open(path, file_opts(Permissions::default()))?;
            probe_format(&probe)?.to_string()
        }
    };
    let mut permissions = locking::file_of(&format, users, writable, false);
    if opts.force_share {
        permissions.shared = locking::Perm::ALL;
    }
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(path, file_opts(permissions))?);
    open_format(storage, &backing_options(format, writable, opts))
}

/// The options a backing image is opened with: its format, read-only unless a commit writes
/// into it, and the top image's other options.
fn backing_options(format: String, writable: bool, opts: &OpenOptions) -> OpenOptions {
    OpenOptions {
        format: Some(format),
        read_only: !writable,
        // Cache options given for the top image are not inherited, as in qemu.
        qcow2_cache: Default::default(),
        ..opts.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::resolve_backing_name as r;

    #[test]
    fn names_resolve_as_qemu_resolves_them() {
        assert_eq!(r("top.qcow2", "base.raw"), "base.raw");
        assert_eq!(r("sub/top.qcow2", "base.raw"), "sub/base.raw");
        assert_eq!(r("/a/b/top.qcow2", "../base.raw"), "/a/b/../base.raw");
        assert_eq!(r("sub/top.qcow2", "/abs/base"), "/abs/base");
        assert_eq!(
            r("sub/top.qcow2", "nbd:localhost:10809"),
            "nbd:localhost:10809"
        );
        assert_eq!(r("sub/top.qcow2", "dir/x:y"), "sub/dir/x:y");
    }
}
