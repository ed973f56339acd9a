//! The block commands of QMP over the VMM's drives: query-block, query-blockstats, eject,
//! blockdev-change-medium (with DEVICE_TRAY_MOVED events) and
//! blockdev-snapshot-internal-sync.

use super::{Events, Handler, QmpError};
use crate::scsi::{lun::EjectError, Lun, LunKind};
use crate::stats::BlockStats;
use crate::virtio_blk::BlockDevice;
use img_core::Image;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The device model behind a drive.
#[derive(Debug, Clone)]
pub enum Drive {
    /// A virtio-blk disk.
    Virtio(Arc<BlockDevice>),
    /// A SCSI disk or CD-ROM.
    Scsi(Arc<Lun>),
}

/// A drive as QMP names it: the `-drive id=` and the device's `id=`.
#[derive(Debug, Clone)]
pub struct NamedDrive {
    /// The drive's id (QMP's `device`).
    pub id: String,
    /// The device's id (QMP's `qdev`/`id`).
    pub qdev: String,
    /// The device model.
    pub drive: Drive,
    /// How the image was opened, as query-block reports it.
    pub settings: DriveSettings,
}

/// The `-drive` options query-block reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct DriveSettings {
    /// The host cache mode.
    pub cache: blockdev::CacheMode,
    /// Whether zero writes become write-zeroes.
    pub detect_zeroes: img_core::DetectZeroes,
}

/// Opens the image a `blockdev-change-medium` names: (file name, format) to an image.
pub type MediumOpener = dyn Fn(&str, Option<&str>) -> img_core::Result<Image> + Send + Sync;

/// The block commands.
pub struct BlockCommands {
    drives: Vec<NamedDrive>,
    events: Events,
    open: Box<MediumOpener>,
}

impl BlockCommands {
    /// Commands over `drives`, emitting events to `events`; new media are opened read-only
    /// with the engine's defaults.
    pub fn new(drives: Vec<NamedDrive>, events: Events) -> Self {
        BlockCommands {
            drives,
            events,
            open: Box::new(|file, format| {
                img_core::open_image(
                    std::path::Path::new(file),
                    &img_core::OpenOptions {
                        format: format.map(str::to_string),
                        read_only: true,
                        ..Default::default()
                    },
                )
            }),
        }
    }

    /// The drive an `id` (qdev) or `device` argument names.
    fn find(&self, args: &Map<String, Value>) -> Result<&NamedDrive, QmpError> {
        let by = |key: &str| args.get(key).and_then(Value::as_str);
        let found = match (by("device"), by("id")) {
            (Some(d), _) => self.drives.iter().find(|n| n.id == d).ok_or(d),
            (None, Some(q)) => self.drives.iter().find(|n| n.qdev == q).ok_or(q),
            (None, None) => return Err(QmpError::generic("Need exactly one of 'device' and 'id'")),
        };
        found.map_err(QmpError::device_not_found)
    }

    fn query_block(&self) -> Value {
        let list: Vec<Value> = self
            .drives
            .iter()
            .map(|n| {
                let (inserted, removable, locked, tray) = match &n.drive {
                    Drive::Virtio(d) => (
                        d.describe().map(|(drv, depth, size)| {
                            inserted(d.name(), &drv, depth, size, d.is_read_only(), n.settings)
                        }),
                        false,
                        false,
                        false,
                    ),
                    Drive::Scsi(l) => (
                        l.describe().map(|(file, drv, depth, size)| {
                            inserted(&file, &drv, depth, size, l.options().read_only, n.settings)
                        }),
                        l.options().kind == LunKind::Cdrom,
                        l.is_locked(),
                        l.is_tray_open(),
                    ),
                };
                let mut m = json!({
                    "device": n.id,
                    "qdev": n.qdev,
                    "locked": locked,
                    "removable": removable,
                    "io-status": "ok",
                    "type": "unknown",
                });
                if removable {
                    m["tray_open"] = json!(tray);
                }
                if let Some(i) = inserted {
                    m["inserted"] = i;
                }
                m
            })
            .collect();
        Value::Array(list)
    }

    fn query_blockstats(&self) -> Value {
        let list: Vec<Value> = self
            .drives
            .iter()
            .map(|n| {
                let s: &BlockStats = match &n.drive {
                    Drive::Virtio(d) => d.stats(),
                    Drive::Scsi(l) => l.stats(),
                };
                let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                json!({
                    "device": n.id,
                    "qdev": n.qdev,
                    "stats": {
                        "rd_bytes": get(&s.read_bytes),
                        "wr_bytes": get(&s.write_bytes),
                        "rd_operations": get(&s.reads),
                        "wr_operations": get(&s.writes),
                        "flush_operations": get(&s.flushes),
                        "unmap_operations": get(&s.discards),
                        "failed_rd_operations": 0,
                        "failed_wr_operations": get(&s.failed),
                    },
                })
            })
            .collect();
        Value::Array(list)
    }

    fn tray_moved(&self, n: &NamedDrive, open: bool) {
        self.events.emit(
            "DEVICE_TRAY_MOVED",
            json!({"device": n.id, "id": n.qdev, "tray-open": open}),
        );
    }

    fn cdrom<'a>(&self, n: &'a NamedDrive) -> Result<&'a Arc<Lun>, QmpError> {
        match &n.drive {
            Drive::Scsi(l) if l.options().kind == LunKind::Cdrom => Ok(l),
            _ => Err(QmpError::generic(format!(
                "Device '{}' is not removable",
                n.id
            ))),
        }
    }

    fn eject(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let n = self.find(args)?;
        let lun = self.cdrom(n)?;
        let force = args.get("force").and_then(Value::as_bool).unwrap_or(false);
        let was_open = lun.is_tray_open();
        match lun.eject(force) {
            Err(EjectError::Locked) => Err(QmpError::generic(format!(
                "Device '{}' is locked and force was not specified, wait for tray to open and try again",
                n.id
            ))),
            Err(EjectError::NotRemovable) => {
                Err(QmpError::generic(format!("Device '{}' is not removable", n.id)))
            }
            Ok(closed) => {
                if !was_open {
                    self.tray_moved(n, true);
                }
                if let Some(Err(e)) = closed {
                    return Err(QmpError::generic(e.to_string()));
                }
                Ok(json!({}))
            }
        }
    }

    fn change_medium(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let n = self.find(args)?;
        let lun = self.cdrom(n)?;
        let file = args
            .get("filename")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("Parameter 'filename' is missing"))?;
        let format = args.get("format").and_then(Value::as_str);
        let image = (self.open)(file, format)
            .map_err(|e| QmpError::generic(format!("Could not open '{file}': {}", e.reason())))?;
        if lun.is_locked() {
            return Err(QmpError::generic(format!(
                "Device '{}' is locked and force was not specified, wait for tray to open and try again",
                n.id
            )));
        }
        if !lun.is_tray_open() {
            self.tray_moved(n, true);
        }
        let old = lun
            .change_medium(image)
            .map_err(|e| QmpError::generic(e.to_string()))?;
        self.tray_moved(n, false);
        if let Some(Err(e)) = old {
            return Err(QmpError::generic(e.to_string()));
        }
        Ok(json!({}))
    }

    fn snapshot_internal(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let n = self.find(args)?;
        let name = args
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| QmpError::generic("Parameter 'name' is missing"))?;
        if name.is_empty() {
            return Err(QmpError::generic("Name is empty"));
        }
        let take = |image: &mut Image| -> Result<(), QmpError> {
            if image.is_read_only() {
                return Err(QmpError::generic(format!("Device '{}' is read only", n.id)));
            }
            let driver = image.format().driver().to_string();
            let Some(q) = img_core::qcow2::driver_of(image) else {
                return Err(QmpError::generic(format!(
                    "Block format '{driver}' used by device '{}' does not support internal snapshots",
                    n.id
                )));
            };
            let existing = q
                .snapshots()
                .map_err(|e| QmpError::generic(e.to_string()))?;
            if existing.iter().any(|s| s.name == name.as_bytes()) {
                return Err(QmpError::generic(format!(
                    "Snapshot with name '{name}' already exists"
                )));
            }
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            q.create_snapshot(name, (t.as_secs() as u32, t.subsec_nanos()))
                .map_err(|e| QmpError::generic(e.to_string()))
        };
        let done = match &n.drive {
            Drive::Virtio(d) => d.with_image_mut(take),
            Drive::Scsi(l) => l.with_medium_mut(take),
        };
        done.unwrap_or_else(|| {
            Err(QmpError::generic(format!(
                "Device '{}' has no medium",
                n.id
            )))
        })?;
        Ok(json!({}))
    }
}

fn inserted(
    file: &str,
    drv: &str,
    depth: usize,
    size: u64,
    ro: bool,
    settings: DriveSettings,
) -> Value {
    use blockdev::CacheMode;
    let cache = settings.cache;
    let detect_zeroes = match settings.detect_zeroes {
        img_core::DetectZeroes::Off => "off",
        img_core::DetectZeroes::On => "on",
        img_core::DetectZeroes::Unmap => "unmap",
    };
    json!({
        "file": file,
        "ro": ro,
        "drv": drv,
        "backing_file_depth": depth,
        "encrypted": false,
        "detect_zeroes": detect_zeroes,
        "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0,
        "write_threshold": 0,
        "cache": {
            "writeback": !matches!(cache, CacheMode::Writethrough | CacheMode::Directsync),
            "direct": cache.direct(),
            "no-flush": cache == CacheMode::Unsafe,
        },
        "image": {"filename": file, "format": drv, "virtual-size": size},
    })
}

impl Handler for BlockCommands {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Option<Result<Value, QmpError>> {
        Some(match command {
            "query-block" => Ok(self.query_block()),
            "query-blockstats" => Ok(self.query_blockstats()),
            "eject" => self.eject(args),
            "blockdev-change-medium" => self.change_medium(args),
            "blockdev-snapshot-internal-sync" => self.snapshot_internal(args),
            _ => return None,
        })
    }
}
