//! The guest's disks: the images the `-drive`s name, opened once, and the device models
//! (virtio-blk disks, virtio-scsi controllers with their LUNs) that outlive any one machine,
//! so that a reboot, which builds a new machine, keeps the same open images.

use std::collections::HashMap;
use std::sync::Arc;

use img_core::{open_image, Image, OpenOptions, Usage};
use vmm::executor::Executor;
use vmm::iothread::IoThread;
use vmm::machine::Machine;
use vmm::qmp::block::{Drive as QmpDrive, DriveSettings, NamedDrive};
use vmm::scsi::{Lun, LunKind, LunOptions};
use vmm::virtio_blk::{BlockDevice, DeviceOptions};
use vmm::virtio_mmio::{BlockBackend, ScsiBackend};
use vmm::virtio_scsi::{Controller, ControllerOptions};

use crate::args::{Args, Device, Drive, Interface, ScsiKind};
use crate::Fail;

/// Workers that run the devices' requests: the engine's calls block while their I/O runs,
/// so several threads keep several requests in flight.
const WORKERS: usize = 4;

/// One virtio device to put on each machine.
enum Model {
    Blk(Arc<BlockDevice>),
    Scsi(Arc<Controller>, String),
}

/// A device's place while the command line is read: a virtio-scsi controller is finished
/// (all its LUNs added) only after every `-device`.
enum Slot {
    Blk(Arc<BlockDevice>, Option<String>),
    Controller(usize),
}

/// The devices, in the order the guest sees them (virtio-mmio slots).
pub struct Devices {
    models: Vec<(Model, Option<String>)>,
    iothreads: Vec<String>,
    executor: Arc<Executor>,
    /// The drives QMP knows, by `-drive id=`.
    pub named: Vec<NamedDrive>,
}

fn open_drive(d: &Drive) -> Result<Option<Image>, Fail> {
    let Some(file) = &d.file else {
        return Ok(None);
    };
    let opts = OpenOptions {
        format: d.format.clone(),
        read_only: d.read_only,
        cache: d.cache,
        aio: d.aio,
        discard: d.discard,
        detect_zeroes: d.detect_zeroes,
        qcow2_cache: d.qcow2_cache.clone(),
        // A guest's disk, like QEMU's devices without share-rw: nobody else may write it.
        usage: Usage {
            no_share: true,
            ..Default::default()
        },
        ..Default::default()
    };
    open_image(file, &opts)
        .map(Some)
        .map_err(|e| Fail(format!("-drive id={}: {}: {e}", d.id, file.display())))
}

impl Devices {
    /// Opens every drive and makes the device models, in command-line order: `if=virtio`
    /// drives and `-device`s as they come.
    pub fn open(args: &Args) -> Result<Self, Fail> {
        let executor =
            Arc::new(Executor::new("blk", WORKERS).map_err(|e| Fail(format!("workers: {e}")))?);
        let mut images: HashMap<&str, (Option<Image>, &Drive)> = HashMap::new();
        let mut models = Vec::new();
        let mut named = Vec::new();
        let mut anon = 0;
        for d in &args.drives {
            let image = open_drive(d)?;
            if d.interface == Interface::Virtio {
                let image = image.expect("if=virtio drives have a file");
                let dev = Arc::new(BlockDevice::new(
                    image,
                    DeviceOptions {
                        read_only: d.read_only,
                        ..Default::default()
                    },
                ));
                named.push(NamedDrive {
                    settings: settings(d),
                    id: d.id.clone(),
                    qdev: qdev(&None, &mut anon),
                    drive: QmpDrive::Virtio(dev.clone()),
                });
                models.push((Model::Blk(dev), None));
            } else {
                images.insert(&d.id, (image, d));
            }
        }
        // Controllers first, so that a LUN may come before or after its controller on the
        // command line, as with QEMU.
        let mut controllers: Vec<(Option<String>, Controller, Option<String>)> = Vec::new();
        for dev in &args.devices {
            if let Device::VirtioScsi {
                id,
                iothread,
                num_queues,
                queue_size,
            } = dev
            {
                let options = ControllerOptions {
                    num_queues: *num_queues,
                    queue_size: *queue_size,
                };
                controllers.push((id.clone(), Controller::new(options), iothread.clone()));
            }
        }
        let mut slots = Vec::new();
        for dev in &args.devices {
            let mut take = |drive: &str| images.remove(drive).expect("drives were checked");
            match dev {
                Device::VirtioBlk {
                    id,
                    drive,
                    iothread,
                    num_queues,
                    queue_size,
                    serial,
                    logical_block_size,
                } => {
                    let (image, d) = take(drive);
                    let Some(image) = image else {
                        return Err(Fail(format!(
                            "-device virtio-blk: drive '{drive}' has no file"
                        )));
                    };
                    let dev = Arc::new(BlockDevice::new(
                        image,
                        DeviceOptions {
                            num_queues: *num_queues,
                            queue_size: *queue_size,
                            read_only: d.read_only,
                            logical_block_size: *logical_block_size,
                            serial: serial.clone(),
                        },
                    ));
                    named.push(NamedDrive {
                        settings: settings(d),
                        id: d.id.clone(),
                        qdev: qdev(id, &mut anon),
                        drive: QmpDrive::Virtio(dev.clone()),
                    });
                    slots.push(Slot::Blk(dev, iothread.clone()));
                }
                Device::VirtioScsi { .. } => {
                    let index = slots
                        .iter()
                        .filter(|s| matches!(s, Slot::Controller(_)))
                        .count();
                    slots.push(Slot::Controller(index));
                }
                Device::Scsi {
                    kind,
                    id,
                    drive,
                    bus,
                    scsi_id,
                    lun,
                    serial,
                } => {
                    let (image, d) = take(drive);
                    let c = match bus {
                        Some(b) => controllers
                            .iter_mut()
                            .find(|(id, _, _)| id.as_deref() == Some(b.as_str()))
                            .ok_or_else(|| Fail(format!("Bus '{b}.0' not found")))?,
                        None if controllers.len() == 1 => &mut controllers[0],
                        None if controllers.is_empty() => {
                            return Err(Fail(format!(
                                "-device scsi-{}: no virtio-scsi controller (-device \
                                 virtio-scsi-pci)",
                                if *kind == ScsiKind::Disk { "hd" } else { "cd" }
                            )))
                        }
                        None => {
                            return Err(Fail(
                                "several SCSI controllers: name one with bus=ID.0".into(),
                            ))
                        }
                    };
                    let target = match scsi_id {
                        Some(t) => *t,
                        // QEMU's choice: the first target whose LUN `lun` is free.
                        None => (0..=u8::MAX)
                            .find(|t| c.1.target(*t).and_then(|t| t.lun(*lun)).is_none())
                            .ok_or_else(|| Fail("no free SCSI target id".into()))?,
                    };
                    if c.1.target(target).and_then(|t| t.lun(*lun)).is_some() {
                        return Err(Fail(format!(
                            "SCSI target {target} LUN {lun} is already in use"
                        )));
                    }
                    let options = LunOptions {
                        kind: match kind {
                            ScsiKind::Disk => LunKind::Disk,
                            ScsiKind::Cdrom => LunKind::Cdrom,
                        },
                        read_only: d.read_only,
                        serial: serial.clone(),
                        discard: d.discard == img_core::DiscardMode::Unmap,
                        ..Default::default()
                    };
                    if image.is_none() && *kind == ScsiKind::Disk {
                        return Err(Fail(format!(
                            "-device scsi-hd: drive '{drive}' has no file"
                        )));
                    }
                    c.1.target_mut(target)
                        .insert(*lun, Lun::new(image, options));
                    let lun = c.1.target(target).and_then(|t| t.lun(*lun)).cloned();
                    named.push(NamedDrive {
                        settings: settings(d),
                        id: d.id.clone(),
                        qdev: qdev(id, &mut anon),
                        drive: QmpDrive::Scsi(lun.expect("just inserted")),
                    });
                }
            }
        }
        // The controllers, now complete, take the slots their -device held.
        let mut controllers: Vec<_> = controllers.into_iter().map(Some).collect();
        for slot in slots {
            models.push(match slot {
                Slot::Blk(dev, iothread) => (Model::Blk(dev), iothread),
                Slot::Controller(i) => {
                    let (id, c, iothread) = controllers[i].take().expect("one slot a controller");
                    let name = id.unwrap_or_else(|| "virtio-scsi".into());
                    (Model::Scsi(Arc::new(c), name), iothread)
                }
            });
        }
        Ok(Self {
            models,
            iothreads: args.iothreads.clone(),
            executor,
            named,
        })
    }

    /// Puts every device on `m`, with the `-object iothread`s made anew for this machine
    /// (they stop when the machine ends).
    pub fn attach(&self, m: &mut Machine) -> Result<(), Fail> {
        let mut threads = HashMap::new();
        for name in &self.iothreads {
            let t = IoThread::new(name).map_err(|e| Fail(format!("iothread {name}: {e}")))?;
            threads.insert(name.as_str(), Arc::new(t));
        }
        for (model, iothread) in &self.models {
            let backend: Arc<dyn vmm::virtio_mmio::Backend> = match model {
                Model::Blk(d) => Arc::new(BlockBackend::new(d.clone(), self.executor.clone())),
                Model::Scsi(c, name) => {
                    Arc::new(ScsiBackend::new(c.clone(), self.executor.clone(), name))
                }
            };
            let thread = iothread
                .as_deref()
                .map(|t| threads.get(t).cloned().expect("iothreads were checked"));
            m.add_virtio_mmio(backend, thread)
                .map_err(|e| Fail(e.to_string()))?;
        }
        Ok(())
    }

    /// Flushes and closes every image, after the requests still running (close waits for
    /// them); the first failure is returned.
    pub fn close(&self) -> Result<(), Fail> {
        let mut result = Ok(());
        for n in &self.named {
            let r = match &n.drive {
                QmpDrive::Virtio(d) => d.close(),
                QmpDrive::Scsi(l) => l.close(),
            };
            if let (Err(e), true) = (r, result.is_ok()) {
                result = Err(Fail(format!("-drive id={}: {e}", n.id)));
            }
        }
        result
    }
}

/// A device's QOM path: its `id=`, or an anonymous one as QEMU numbers them.
fn qdev(id: &Option<String>, anon: &mut usize) -> String {
    match id {
        Some(id) => id.clone(),
        None => {
            *anon += 1;
            format!("/machine/peripheral-anon/device[{}]", *anon - 1)
        }
    }
}

/// What query-block reports of a drive's options.
fn settings(d: &Drive) -> DriveSettings {
    DriveSettings {
        cache: d.cache,
        detect_zeroes: d.detect_zeroes,
    }
}
