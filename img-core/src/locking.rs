//! The permissions an open image announces through QEMU's lock bytes (see `blockdev`'s
//! locking), worked out the way QEMU's block layer works them out, so that img and a QEMU
//! process (qemu-img, qemu-io, qemu-nbd, qemu-storage-daemon, a VM) see each other exactly as
//! two QEMU processes do.
//!
//! In QEMU the user of an image (a BlockBackend) takes permissions on the top node according
//! to how it opened the image ([`Usage`], [`user`]); each format node then asks its file for
//! what it needs itself ([`file_of`]) and its backing image for what copy-on-write needs
//! ([`backing_of`]). Only file nodes lock bytes. `force-share=on` makes a node share every
//! permission with others, whatever its users would refuse.
//!
//! What qemu-img 10 takes on the file of a qcow2 image (byte 100+i: holds permission i,
//! 200+i: does not share it; 0 read, 1 write, 2 write unchanged, 3 resize):
//!
//! | opener                                   | qcow2 file bytes        | raw file bytes    |
//! |------------------------------------------|-------------------------|-------------------|
//! | info                                     | 201 203                 | none              |
//! | check, compare, map, measure, bench      | 100 201 203             | 100               |
//! | convert source                           | 100 201 203             | 100 201 203       |
//! | writable (check -r, bench -w, convert target)| 100 101 103 201 203     | 100 101           |
//! | resize                                   | 100 101 103 201 203     | 100 101 103       |
//! | any read-only open with -U               | 100 (none for info)     | 100 (none: info)  |
//! | create (while the file is created)       | 101 103 203             | 101 103 203       |

use crate::open::OpenOptions;
use crate::Result;
use blockdev::{FileOptions, FileStorage};
pub use blockdev::{Locking, Perm, Permissions};
use std::path::Path;

/// How an opener uses an image (QEMU's BlockBackend open flags), which decides the
/// permissions it takes and those it refuses to share. The default is a plain reader (or
/// writer, by `OpenOptions::read_only`) that lets others write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Only metadata is read, never guest data (`qemu-img info`; QEMU's `BDRV_O_NO_IO`): no
    /// "consistent read" permission is taken.
    pub metadata_only: bool,
    /// Others may not write or resize the image while it is open (the sources of
    /// `qemu-img convert`; QEMU's `BDRV_O_NO_SHARE`).
    pub no_share: bool,
    /// The image is resized (`qemu-img resize`; QEMU's `BDRV_O_RESIZE`).
    pub resize: bool,
}

/// The message of QEMU's refusal of `force-share=on` on a writable image.
pub const FORCE_SHARE_NEEDS_READ_ONLY: &str =
    "force-share=on can only be used with read-only images";

/// What the user of an image takes on its top node.
pub fn user(read_only: bool, usage: Usage) -> Permissions {
    let mut perm = Perm::NONE;
    if !usage.metadata_only {
        perm = perm | Perm::CONSISTENT_READ;
    }
    if !read_only {
        perm = perm | Perm::WRITE;
    }
    if usage.resize {
        perm = perm | Perm::RESIZE;
    }
    let shared = if usage.no_share {
        Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
    } else {
        Perm::ALL
    };
    Permissions { perm, shared }
}

/// What a node of format `driver` asks of its file, given what its users take on the node.
///
/// Raw passes its users' permissions through. qcow2 always reads its metadata consistently
/// (unless nothing at all is read), writes and resizes its file when it is writable (metadata
/// changes even when the guest data does not), and never lets others write or resize the file
/// under its metadata.
pub fn file_of(
    driver: &str,
    users: Permissions,
    writable: bool,
    metadata_only: bool,
) -> Permissions {
    match driver {
        // Files holding metadata (a vmdk descriptor or sparse extent, as a qcow2 file).
        "qcow2" | "vmdk" => {
            let mut perm = users.perm;
            if writable {
                perm = perm | Perm::WRITE | Perm::RESIZE;
            }
            if !metadata_only {
                perm = perm | Perm::CONSISTENT_READ;
            }
            Permissions {
                perm,
                shared: users.shared & !(Perm::WRITE | Perm::RESIZE),
            }
        }
        _ => users,
    }
}

/// What an image asks of its backing image (the node, before the backing's format adds its
/// own needs with [`file_of`]), given what the image's users take on it: consistent reads if
/// they read, nothing else; and other writers and resizers only if the image's users let
/// others write.
pub fn backing_of(users: Permissions) -> Permissions {
    let others = if users.shared.contains(Perm::WRITE) {
        Perm::WRITE | Perm::RESIZE
    } else {
        Perm::NONE
    };
    Permissions {
        perm: users.perm & Perm::CONSISTENT_READ,
        shared: others | Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
    }
}

/// The permissions the file of an image of format `driver` opened with `opts` announces.
pub fn file_permissions(driver: &str, opts: &OpenOptions) -> Permissions {
    let users = user(opts.read_only, opts.usage);
    let mut p = file_of(driver, users, !opts.read_only, opts.usage.metadata_only);
    if opts.force_share {
        p.shared = Perm::ALL;
    }
    p
}

/// The locking part of the file options for opening the image at `path` with `opts`. The
/// permissions depend on the format, so without one this probes the file first (through a
/// descriptor of its own that takes no locks, as QEMU probes).
pub(crate) fn file_options(path: &Path, opts: &OpenOptions) -> Result<FileOptions> {
    if opts.force_share && !opts.read_only {
        return Err(crate::Error::InvalidArgument(
            FORCE_SHARE_NEEDS_READ_ONLY.into(),
        ));
    }
    let mut fo = FileOptions {
        locking: opts.locking,
        ..Default::default()
    };
    if opts.locking == Locking::Off {
        return Ok(fo);
    }
    let driver = match &opts.format {
        Some(f) => Some(f.clone()),
        // A file that cannot be opened or read fails the real open with the right message.
        None => FileStorage::open_read_only(path)
            .ok()
            .and_then(|s| crate::probe_format(&s).ok().map(str::to_string)),
    };
    // An unknown driver locks nothing: the open fails on the driver, as in QEMU, before any
    // file is opened.
    if let Some(d) = driver.filter(|d| crate::open::FORMATS.contains(&d.as_str())) {
        fo.permissions = file_permissions(&d, opts);
    }
    Ok(fo)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lock bytes a file with `p` holds, as QEMU numbers them.
    fn bytes(p: Permissions) -> Vec<u64> {
        let held = (0..4).filter(|i| p.perm.contains(Perm::from_bits(1 << i)));
        let unshared = (0..4).filter(|i| !p.shared.contains(Perm::from_bits(1 << i)));
        held.map(|i| 100 + i)
            .chain(unshared.map(|i| 200 + i))
            .collect()
    }

    fn opts(format: &str, read_only: bool, usage: Usage, force_share: bool) -> OpenOptions {
        OpenOptions {
            format: Some(format.into()),
            read_only,
            usage,
            force_share,
            ..Default::default()
        }
    }

    /// The bytes qemu-img 10.0 takes (traced with strace), for each opener.
    #[test]
    fn as_qemu_img_locks() {
        let info = Usage {
            metadata_only: true,
            ..Default::default()
        };
        let source = Usage {
            no_share: true,
            ..Default::default()
        };
        let resize = Usage {
            resize: true,
            ..Default::default()
        };
        let plain = Usage::default();
        let cases: &[(&str, bool, Usage, bool, &[u64])] = &[
            ("qcow2", true, info, false, &[201, 203]),
            ("raw", true, info, false, &[]),
            ("qcow2", true, plain, false, &[100, 201, 203]),
            ("raw", true, plain, false, &[100]),
            ("qcow2", true, source, false, &[100, 201, 203]),
            ("raw", true, source, false, &[100, 201, 203]),
            ("qcow2", false, plain, false, &[100, 101, 103, 201, 203]),
            ("raw", false, plain, false, &[100, 101]),
            ("raw", false, resize, false, &[100, 101, 103]),
            ("qcow2", true, info, true, &[]),
            ("qcow2", true, plain, true, &[100]),
            ("raw", true, source, true, &[100]),
        ];
        for &(fmt, ro, usage, fs, want) in cases {
            let got = bytes(file_permissions(fmt, &opts(fmt, ro, usage, fs)));
            assert_eq!(got, want, "{fmt} read_only={ro} {usage:?} force_share={fs}");
        }
        assert_eq!(bytes(Permissions::CREATE), [101, 103, 203]);
    }

    #[test]
    fn backing_images() {
        // qemu-io on an overlay: the overlay's users read and write, sharing everything.
        let users = user(false, Usage::default());
        let b = backing_of(users);
        assert_eq!(bytes(file_of("qcow2", b, false, false)), [100, 201, 203]);
        assert_eq!(bytes(file_of("raw", b, false, false)), [100]);
        // A convert source refuses writers, down the chain.
        let users = user(
            true,
            Usage {
                no_share: true,
                ..Default::default()
            },
        );
        assert_eq!(
            bytes(file_of("raw", backing_of(users), false, false)),
            [100, 201, 203]
        );
    }

    #[test]
    fn force_share_needs_read_only() {
        let o = opts("qcow2", false, Usage::default(), true);
        let e = file_options(Path::new("/nonexistent"), &o).unwrap_err();
        assert_eq!(e.to_string(), FORCE_SHARE_NEEDS_READ_ONLY);
    }
}
