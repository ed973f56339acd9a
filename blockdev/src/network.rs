//! Which backend a name selects, and opening it.
//!
//! A name is a file path unless it has one of the network prefixes qemu recognises: `nbd:`
//! (and `nbd+tcp://`, `nbd+unix://`), `iscsi://`, `rbd:`. Everything that turns a user's name
//! into storage (opening an image, a backing file, a target to create) asks this module, so a
//! new backend is added here once instead of in every command.

use std::sync::Arc;

use crate::iscsi::{IscsiOptions, IscsiStorage};
use crate::nbd::NbdStorage;
use crate::rbd::RbdStorage;
use crate::{CacheMode, Result, Storage};

/// The backend a name selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// A local file or block device.
    File,
    /// An NBD export.
    Nbd,
    /// An iSCSI logical unit.
    Iscsi,
    /// A Ceph RBD image.
    Rbd,
}

impl Protocol {
    /// The protocol `name` selects.
    pub fn of(name: &str) -> Protocol {
        if crate::nbd::is_nbd_name(name) {
            Protocol::Nbd
        } else if crate::iscsi::is_iscsi_name(name) {
            Protocol::Iscsi
        } else if crate::rbd::is_rbd_name(name) {
            Protocol::Rbd
        } else {
            Protocol::File
        }
    }

    /// qemu's name of the protocol driver, as `qemu-img info` prints it ("protocol type").
    pub fn driver(self) -> &'static str {
        match self {
            Protocol::File => "file",
            Protocol::Nbd => "nbd",
            Protocol::Iscsi => "iscsi",
            Protocol::Rbd => "rbd",
        }
    }

    /// Whether the storage is reached over the network (no file locks, no local size on disk).
    pub fn is_network(self) -> bool {
        self != Protocol::File
    }
}

/// Opens the network storage `name` designates, or returns `None` for a file name (files are
/// opened by the caller, with its cache mode, engine and locks). `cache` applies as far as
/// the backend has it: cache mode `unsafe` skips flushes on a LUN and on RBD, as on a file.
pub fn open(name: &str, read_only: bool, cache: CacheMode) -> Option<Result<Arc<dyn Storage>>> {
    let ignore_flush = cache.ignores_flush();
    Some(match Protocol::of(name) {
        Protocol::File => return None,
        Protocol::Nbd => NbdStorage::open(name, read_only).map(|s| Arc::new(s) as _),
        Protocol::Iscsi => IscsiStorage::open(name, &IscsiOptions { read_only })
            .map(|s| Arc::new(s.ignoring_flush(ignore_flush)) as _),
        Protocol::Rbd => {
            RbdStorage::open(name, read_only).map(|s| Arc::new(s.ignoring_flush(ignore_flush)) as _)
        }
    })
}

/// Storage for a new image of `size` bytes on the network, or `None` for a file name.
///
/// An RBD image is created. An iSCSI LUN or an NBD export already exists and is opened
/// instead, as qemu does for protocols that cannot create: the image is then written over
/// what the LUN holds (its first sector zeroed), and a LUN smaller than `size` is refused by
/// its `truncate`.
pub fn create(name: &str, size: u64) -> Option<Result<Arc<dyn Storage>>> {
    Some(match Protocol::of(name) {
        Protocol::File => return None,
        Protocol::Rbd => RbdStorage::create(name, size).map(|s| Arc::new(s) as _),
        Protocol::Nbd | Protocol::Iscsi => match open(name, false, CacheMode::Writeback)? {
            // The first sector is zeroed, as qemu does, so that the format written before is
            // not probed again on what is now a raw image.
            Ok(storage) => storage
                .truncate(size)
                .and_then(|()| storage.write_zeroes(0, size.min(512), true))
                .map(|()| storage),
            Err(e) => Err(e),
        },
    })
}

/// `Storage::truncate` of storage whose size is its server's (a LUN, an export): as on a
/// block device, a size within `capacity` is accepted and changes nothing (a format keeps its
/// own size in its metadata, and a raw image there is the whole device); growing is refused
/// with qemu's message, "Cannot grow `what`".
pub(crate) fn truncate_within(size: u64, capacity: u64, what: &str) -> Result<()> {
    if size <= capacity {
        return Ok(());
    }
    Err(crate::Error::Unsupported {
        message: format!("Cannot grow {what}"),
    })
}

/// The options qemu's driver makes of a network name, as `(key, value)` pairs in the order
/// qemu inserts them; `qemu-img` shows them as a `json:{...}` file name. `None` for files and
/// NBD (whose names qemu prints as URLs), or when the name does not parse.
pub fn driver_options(name: &str) -> Option<Vec<(String, String)>> {
    let mut opts: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: &str| opts.push((k.to_string(), v.to_string()));
    match Protocol::of(name) {
        Protocol::File | Protocol::Nbd => return None,
        Protocol::Iscsi => {
            let url = crate::iscsi::IscsiUrl::parse(name).ok()?;
            put("transport", "tcp");
            if let Some(user) = &url.user {
                put("user", user);
            }
            if let Some(password) = &url.password {
                put("password", password);
            }
            put("portal", &url.portal());
            put("target", &url.target);
            put("lun", &url.lun.to_string());
        }
        Protocol::Rbd => {
            let rbd = crate::rbd::RbdName::parse(name).ok()?;
            put("pool", &rbd.pool);
            put("namespace", rbd.namespace.as_deref().unwrap_or(""));
            put("image", &rbd.image);
            if let Some(snap) = &rbd.snapshot {
                put("snapshot", snap);
            }
            if let Some(conf) = &rbd.conf {
                put("conf", conf);
            }
            if let Some(id) = &rbd.id {
                put("user", id);
            }
            // Other options go to librados; qemu keeps them out of the node's name.
        }
    }
    put("driver", Protocol::of(name).driver());
    Some(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_select_protocols() {
        assert_eq!(Protocol::of("disk.qcow2"), Protocol::File);
        assert_eq!(Protocol::of("/dev/sdb"), Protocol::File);
        assert_eq!(Protocol::of("nbd://h/x"), Protocol::Nbd);
        assert_eq!(Protocol::of("nbd:unix:/s"), Protocol::Nbd);
        assert_eq!(Protocol::of("iscsi://h/iqn.x/1"), Protocol::Iscsi);
        assert_eq!(Protocol::of("rbd:pool/img"), Protocol::Rbd);
        assert!(!Protocol::of("rbd-disk.raw").is_network());
    }

    #[test]
    fn driver_options_are_qemus() {
        let o = driver_options("iscsi://u%pw@127.0.0.1:3261/iqn.2026-11.test:d/3").unwrap();
        let keys: Vec<&str> = o.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "transport",
                "user",
                "password",
                "portal",
                "target",
                "lun",
                "driver"
            ]
        );
        assert_eq!(o[3].1, "127.0.0.1:3261");
        assert_eq!(o[5].1, "3");
        let o = driver_options("rbd:p/ns/i@s:conf=/c:id=admin:rbd_cache=true").unwrap();
        let get = |k: &str| o.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert_eq!(get("namespace"), Some("ns"));
        assert_eq!(get("snapshot"), Some("s"));
        assert_eq!(get("user"), Some("admin"));
        assert_eq!(get("rbd_cache"), None);
        assert_eq!(get("driver"), Some("rbd"));
        assert_eq!(driver_options("disk.raw"), None);
        assert_eq!(driver_options("iscsi://nohost"), None);
    }
}
