//! The command line, in qemu-system's spelling: what the user asked for, checked and typed,
//! before anything is opened.

use std::path::PathBuf;

use blockdev::{Aio, CacheMode};
use img_core::{DetectZeroes, DiscardMode};

use crate::options::{parse_size, OptionList};
use crate::Fail;

pub const USAGE: &str =
    "usage: vmm -kernel FILE [-initrd FILE] [-append CMDLINE] [-m SIZE] [-smp N]
           [-drive OPTS]... [-device OPTS]... [-object iothread,id=ID]...
           [-qmp unix:PATH,server=on,wait=off] [-serial DEV] [-pidfile FILE] [-daemonize]
           [-S] [-no-reboot]

  -m SIZE          guest RAM; a number in MiB or with a suffix K, M, G, T (default 128M)
  -smp N           number of vCPUs (also cpus=N[,...]) (default 1)
  -kernel FILE     an ELF vmlinux (booted through its PVH entry) or a bzImage
  -initrd FILE     initial ramdisk
  -append CMDLINE  kernel command line
  -serial DEV      where COM1 goes: stdio (default), file:PATH, none
  -pidfile FILE    write the process id to FILE (removed at exit)
  -daemonize       detach once the machine is set up
  -S               do not start the vCPUs until QMP 'cont'
  -no-reboot       exit when the guest resets instead of rebooting it
  -drive OPTS      an image: file=PATH, format=raw|qcow2|vmdk, if=virtio|none, id=NAME,
                   media=disk|cdrom, readonly=on|off, cache=writeback|none|writethrough|
                   directsync|unsafe, aio=io_uring|threads|native (default io_uring),
                   discard=ignore|unmap, detect-zeroes=off|on|unmap, and the qcow2 cache
                   options l2-cache-size, l2-cache-entry-size, refcount-cache-size, cache-size,
                   cache-clean-interval. if=virtio makes a virtio-blk disk of it (/dev/vda,
                   vdb, ... in order); if=none leaves it to a -device.
  -device OPTS     virtio-blk-pci,drive=ID[,id=][,iothread=][,num-queues=][,queue-size=]
                     [,serial=][,logical_block_size=]
                   virtio-scsi-pci[,id=][,iothread=][,num_queues=][,virtqueue_size=]
                   scsi-hd|scsi-cd,drive=ID[,id=][,bus=SCSI.0][,scsi-id=][,lun=][,serial=]
                   (the -pci names are accepted for compatibility: the devices sit on
                   virtio-mmio, which the guest finds in ACPI; -device names ending in
                   -device are accepted too)
  -object iothread,id=ID   an I/O thread devices may share (by default each device has one)
  -qmp unix:PATH,server=on,wait=off   QMP on a unix socket (wait=on: start the guest only
                   once a client has connected)
Accepted for compatibility and ignored: -nographic, -enable-kvm, -accel kvm, -machine,
-cpu, -display, -vga none, -nodefaults, -name, -monitor none.
";

/// Where COM1 goes.
#[derive(Debug, PartialEq)]
pub enum Serial {
    Stdio,
    File(PathBuf),
    None,
}

/// How a drive reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// A virtio-blk disk of its own.
    Virtio,
    /// Only through a `-device` that names it.
    None,
}

/// One `-drive`.
#[derive(Debug, PartialEq)]
pub struct Drive {
    /// QMP's name for it (`id=`, or QEMU's `virtioN` for `if=virtio`).
    pub id: String,
    /// `None`: an empty CD-ROM drive.
    pub file: Option<PathBuf>,
    /// `None`: probe, as QEMU does without `format=`.
    pub format: Option<String>,
    pub interface: Interface,
    pub cdrom: bool,
    pub read_only: bool,
    pub cache: CacheMode,
    pub aio: Aio,
    pub discard: DiscardMode,
    pub detect_zeroes: DetectZeroes,
    pub qcow2_cache: img_core::qcow2::CacheOptions,
}

/// Which SCSI device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScsiKind {
    Disk,
    Cdrom,
}

/// One `-device` (or the virtio-blk device an `if=virtio` drive implies).
#[derive(Debug, PartialEq)]
pub enum Device {
    VirtioBlk {
        id: Option<String>,
        drive: String,
        iothread: Option<String>,
        num_queues: u16,
        queue_size: u16,
        serial: String,
        logical_block_size: u32,
    },
    VirtioScsi {
        id: Option<String>,
        iothread: Option<String>,
        num_queues: u32,
        queue_size: u16,
    },
    Scsi {
        kind: ScsiKind,
        id: Option<String>,
        drive: String,
        /// The controller's id (`bus=ID.0`); `None`: the only controller.
        bus: Option<String>,
        /// `None`: the first target id with this LUN free, as QEMU picks.
        scsi_id: Option<u8>,
        lun: u16,
        serial: String,
    },
}

/// `-qmp unix:PATH,server=on,wait=off`.
#[derive(Debug, PartialEq)]
pub struct Qmp {
    pub path: PathBuf,
    /// Hold the guest until a client connects (QEMU's default for a server).
    pub wait: bool,
}

/// Everything the command line asked for.
pub struct Args {
    pub drives: Vec<Drive>,
    pub devices: Vec<Device>,
    pub iothreads: Vec<String>,
    pub qmp: Vec<Qmp>,
    pub ram: u64,
    pub vcpus: u8,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub append: String,
    pub serial: Serial,
    pub pidfile: Option<PathBuf>,
    pub daemonize: bool,
    pub start_paused: bool,
    pub no_reboot: bool,
}

/// Parses one `-drive`; `index` counts the `if=virtio` drives before it (QEMU's default ids).
pub fn parse_drive(spec: &str, virtio_index: usize) -> Result<Drive, Fail> {
    let mut o = OptionList::parse("-drive", spec, None)?;
    let file = o.take("file").filter(|f| !f.is_empty()).map(PathBuf::from);
    let format = o.take_with("format", "raw, qcow2 or vmdk", |v| {
        img_core::open::FORMATS.contains(&v).then(|| v.to_string())
    })?;
    let interface = o
        .take_with("if", "virtio or none", |v| match v {
            "virtio" => Some(Interface::Virtio),
            "none" => Some(Interface::None),
            _ => None,
        })?
        .unwrap_or(Interface::Virtio);
    let cdrom = o
        .take_with("media", "disk or cdrom", |v| match v {
            "disk" => Some(false),
            "cdrom" => Some(true),
            _ => None,
        })?
        .unwrap_or(false);
    let read_only = o.take_bool("readonly")?.unwrap_or(false) || cdrom;
    let cache = o
        .take_with(
            "cache",
            "writeback, none, writethrough, directsync or unsafe",
            CacheMode::parse,
        )?
        .unwrap_or_default();
    let aio = o
        .take_with("aio", "io_uring, threads or native", Aio::parse)?
        .unwrap_or(Aio::IoUring);
    if aio == Aio::Native && !cache.direct() {
        return Err(o.fail("aio=native was specified, but it requires cache.direct=on"));
    }
    // A guest's discards are ignored unless the user asks for them to unmap, as in QEMU.
    let discard = o
        .take_with("discard", "ignore or unmap", DiscardMode::parse)?
        .unwrap_or(DiscardMode::Ignore);
    let detect_zeroes = o
        .take_with("detect-zeroes", "off, on or unmap", DetectZeroes::parse)?
        .unwrap_or_default();
    if detect_zeroes == DetectZeroes::Unmap && discard != DiscardMode::Unmap {
        return Err(o.fail("setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"));
    }
    let qcow2_cache = img_core::qcow2::CacheOptions {
        l2_cache_size: o.take_size("l2-cache-size")?,
        l2_cache_entry_size: o.take_size("l2-cache-entry-size")?,
        refcount_cache_size: o.take_size("refcount-cache-size")?,
        cache_size: o.take_size("cache-size")?,
        cache_clean_interval: o.take_num("cache-clean-interval")?,
    };
    let id = o.take("id");
    if interface == Interface::Virtio && cdrom {
        return Err(o.fail("a CD-ROM needs if=none and -device scsi-cd"));
    }
    if file.is_none() && !cdrom {
        return Err(o.fail("file= is required (only a CD-ROM drive may be empty)"));
    }
    let id = match (id, interface) {
        (Some(id), _) => id,
        (None, Interface::Virtio) => format!("virtio{virtio_index}"),
        (None, Interface::None) => return Err(o.fail("if=none needs an id= for a -device to name")),
    };
    o.finish()?;
    Ok(Drive {
        id,
        file,
        format,
        interface,
        cdrom,
        read_only,
        cache,
        aio,
        discard,
        detect_zeroes,
        qcow2_cache,
    })
}

/// Parses one `-device`.
pub fn parse_device(spec: &str) -> Result<Device, Fail> {
    let mut o = OptionList::parse("-device", spec, Some("driver"))?;
    let driver = o.take("driver").unwrap_or_default();
    let id = o.take("id");
    let device = match driver.as_str() {
        "virtio-blk-pci" | "virtio-blk-device" | "virtio-blk" => Device::VirtioBlk {
            id,
            drive: o
                .take("drive")
                .ok_or_else(|| o.fail("drive= is required"))?,
            iothread: o.take("iothread"),
            num_queues: o.take_num("num-queues")?.unwrap_or(1).max(1),
            queue_size: queue_size(&mut o, "queue-size")?,
            serial: o.take("serial").unwrap_or_default(),
            logical_block_size: o.take_num("logical_block_size")?.unwrap_or(512),
        },
        "virtio-scsi-pci" | "virtio-scsi-device" | "virtio-scsi" => Device::VirtioScsi {
            id,
            iothread: o.take("iothread"),
            num_queues: o.take_num("num_queues")?.unwrap_or(1).max(1),
            queue_size: queue_size(&mut o, "virtqueue_size")?,
        },
        "scsi-hd" | "scsi-cd" => Device::Scsi {
            kind: if driver == "scsi-hd" {
                ScsiKind::Disk
            } else {
                ScsiKind::Cdrom
            },
            id,
            drive: o
                .take("drive")
                .ok_or_else(|| o.fail("drive= is required"))?,
            bus: o
                .take("bus")
                .map(|b| match b.strip_suffix(".0") {
                    Some(c) => Ok(c.to_string()),
                    None => Err(o.fail(format!("bus '{b}': expected CONTROLLER-ID.0"))),
                })
                .transpose()?,
            scsi_id: o.take_num("scsi-id")?,
            lun: match o.take_num::<u16>("lun")? {
                Some(n) if n >= 16384 => return Err(o.fail("lun must be below 16384")),
                n => n.unwrap_or(0),
            },
            serial: o.take("serial").unwrap_or_default(),
        },
        "" => return Err(o.fail("no device model named")),
        other => {
            return Err(o.fail(format!(
                "'{other}' is not a valid device model name (virtio-blk-pci, virtio-scsi-pci, \
                 scsi-hd, scsi-cd)"
            )))
        }
    };
    o.finish()?;
    Ok(device)
}

fn queue_size(o: &mut OptionList, key: &str) -> Result<u16, Fail> {
    match o.take_num::<u16>(key)? {
        None => Ok(256),
        Some(n) if n.is_power_of_two() && n >= 2 => Ok(n),
        Some(n) => Err(o.fail(format!("{key} {n}: must be a power of 2 from 2 to 32768"))),
    }
}

/// Parses `-object iothread,id=ID`; returns the id.
pub fn parse_object(spec: &str) -> Result<String, Fail> {
    let mut o = OptionList::parse("-object", spec, Some("qom-type"))?;
    match o.take("qom-type").as_deref() {
        Some("iothread") => {}
        Some(t) => return Err(o.fail(format!("object type '{t}' is not supported (iothread)"))),
        None => return Err(o.fail("no object type")),
    }
    let id = o
        .take("id")
        .ok_or_else(|| o.fail("Parameter 'id' is missing"))?;
    // Polling tunables of QEMU's event loop: our threads sleep in epoll, there is nothing
    // to tune.
    for knob in ["poll-max-ns", "poll-grow", "poll-shrink", "aio-max-batch"] {
        o.take_num::<u64>(knob)?;
    }
    o.finish()?;
    Ok(id)
}

/// Parses `-qmp unix:PATH[,server=on][,wait=off]`.
pub fn parse_qmp(spec: &str) -> Result<Qmp, Fail> {
    let mut o = OptionList::parse("-qmp", spec, Some("path"))?;
    let path = o.take("path").unwrap_or_default();
    let Some(path) = path.strip_prefix("unix:").filter(|p| !p.is_empty()) else {
        return Err(o.fail("only unix:PATH sockets are supported"));
    };
    if o.take_bool("server")? != Some(true) {
        return Err(o.fail("only server=on is supported (the VMM listens)"));
    }
    // QEMU's `nowait` is `wait=off`.
    let nowait = o.take_bool("nowait")?.unwrap_or(false);
    let wait = o.take_bool("wait")?.unwrap_or(!nowait);
    o.finish()?;
    Ok(Qmp {
        path: PathBuf::from(path),
        wait,
    })
}

fn parse_smp(s: &str) -> Result<u8, Fail> {
    let first = s.split(',').next().unwrap_or("");
    let cpus = s
        .split(',')
        .find_map(|p| p.strip_prefix("cpus="))
        .unwrap_or(first);
    match cpus.parse::<u8>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Fail(format!("Invalid SMP CPUs {cpus}"))),
    }
}

/// Parses the command line; `None` when it only asked for help or the version.
pub fn parse(args: &[String]) -> Result<Option<Args>, Fail> {
    let mut ram = 128 << 20;
    let mut vcpus = 1;
    let (mut kernel, mut initrd, mut append, mut serial, mut pidfile) =
        (None, None, String::new(), None, None);
    let (mut daemonize, mut start_paused, mut no_reboot) = (false, false, false);
    let (mut drives, mut devices, mut iothreads, mut qmp) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        // QEMU accepts both -opt and --opt.
        let opt = arg
            .strip_prefix("--")
            .map(|o| format!("-{o}"))
            .unwrap_or_else(|| arg.clone());
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| Fail(format!("{arg}: requires an argument")))
        };
        match opt.as_str() {
            "-h" | "-help" => {
                print!("{USAGE}");
                return Ok(None);
            }
            "-version" => {
                println!("vmm version {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "-m" => {
                // Like QEMU, round the size up to a multiple of 8 KiB.
                let v = value()?;
                ram = parse_size(v.strip_prefix("size=").unwrap_or(&v), 20)
                    .map_err(|e| Fail(format!("Parameter 'size' {e}")))?
                    .checked_next_multiple_of(8192)
                    .ok_or_else(|| Fail("-m: size too large".into()))?;
            }
            "-smp" => vcpus = parse_smp(&value()?)?,
            "-kernel" => kernel = Some(PathBuf::from(value()?)),
            "-initrd" => initrd = Some(PathBuf::from(value()?)),
            "-append" => append = value()?,
            "-serial" => {
                let v = value()?;
                serial = Some(match v.as_str() {
                    "stdio" => Serial::Stdio,
                    "none" | "null" => Serial::None,
                    _ => match v.strip_prefix("file:") {
                        Some(p) if !p.is_empty() => Serial::File(p.into()),
                        _ => {
                            return Err(Fail(format!(
                            "-serial {v}: unsupported character device (stdio, file:PATH, none)"
                        )))
                        }
                    },
                });
            }
            "-pidfile" => pidfile = Some(PathBuf::from(value()?)),
            "-drive" => {
                let virtio = drives
                    .iter()
                    .filter(|d: &&Drive| d.interface == Interface::Virtio)
                    .count();
                drives.push(parse_drive(&value()?, virtio)?);
            }
            "-device" => devices.push(parse_device(&value()?)?),
            "-object" => iothreads.push(parse_object(&value()?)?),
            "-qmp" => qmp.push(parse_qmp(&value()?)?),
            "-daemonize" => daemonize = true,
            "-S" => start_paused = true,
            "-no-reboot" => no_reboot = true,
            "-nographic" | "-enable-kvm" | "-nodefaults" => {}
            "-accel" | "-machine" => {
                let v = value()?;
                if !(v == "kvm" || v.contains("accel=kvm") || opt == "-machine") {
                    return Err(Fail(format!("{opt} {v}: only KVM is supported")));
                }
            }
            "-cpu" | "-display" | "-name" => {
                value()?;
            }
            "-vga" | "-monitor" => {
                let v = value()?;
                if v != "none" {
                    return Err(Fail(format!("{opt} {v}: only 'none' is supported")));
                }
            }
            _ => return Err(Fail(format!("{arg}: invalid option\n{USAGE}"))),
        }
    }
    let kernel = kernel.ok_or_else(|| Fail(format!("-kernel is required\n{USAGE}")))?;
    let serial = match serial {
        Some(Serial::Stdio) if daemonize => {
            return Err(Fail("-serial stdio is incompatible with -daemonize".into()))
        }
        Some(s) => s,
        None if daemonize => Serial::None,
        None => Serial::Stdio,
    };
    check_ids(&drives, &devices, &iothreads)?;
    Ok(Some(Args {
        drives,
        devices,
        iothreads,
        qmp,
        ram,
        vcpus,
        kernel,
        initrd,
        append,
        serial,
        pidfile,
        daemonize,
        start_paused,
        no_reboot,
    }))
}

/// Duplicate ids, and references to drives and I/O threads that do not exist, are the
/// user's mistakes: say so before opening anything.
fn check_ids(drives: &[Drive], devices: &[Device], iothreads: &[String]) -> Result<(), Fail> {
    let mut seen = std::collections::HashSet::new();
    for id in drives.iter().map(|d| &d.id) {
        if !seen.insert(id.as_str()) {
            return Err(Fail(format!("Duplicate ID '{id}' for drive")));
        }
    }
    let mut seen = std::collections::HashSet::new();
    for id in iothreads {
        if !seen.insert(id.as_str()) {
            return Err(Fail(format!("Duplicate ID '{id}' for object")));
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut used_drives = std::collections::HashSet::new();
    for dev in devices {
        let (id, drive, iothread) = match dev {
            Device::VirtioBlk {
                id,
                drive,
                iothread,
                ..
            } => (id, Some(drive), iothread.as_ref()),
            Device::VirtioScsi { id, iothread, .. } => (id, None, iothread.as_ref()),
            Device::Scsi { id, drive, .. } => (id, Some(drive), None),
        };
        if let Some(id) = id {
            if !seen.insert(id.as_str()) {
                return Err(Fail(format!("Duplicate ID '{id}' for device")));
            }
        }
        if let Some(t) = iothread {
            if !iothreads.contains(t) {
                return Err(Fail(format!("Cannot find iothread {t}")));
            }
        }
        if let Some(drive) = drive {
            let Some(d) = drives.iter().find(|d| &d.id == drive) else {
                return Err(Fail(format!("Property 'drive' can't find value '{drive}'")));
            };
            if d.interface != Interface::None || !used_drives.insert(drive.as_str()) {
                return Err(Fail(format!(
                    "Drive '{drive}' is already in use by another device"
                )));
            }
            let wants_cd = matches!(
                dev,
                Device::Scsi {
                    kind: ScsiKind::Cdrom,
                    ..
                }
            );
            if d.cdrom && !wants_cd {
                return Err(Fail(format!(
                    "Drive '{drive}' is a CD-ROM (media=cdrom): use -device scsi-cd"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn drive_options_parse_into_a_typed_drive() {
        let d = parse_drive(
            "file=/x/d,,1.qcow2,format=qcow2,if=none,id=d0,readonly=on,cache=none,aio=native,\
             discard=unmap,detect-zeroes=unmap,l2-cache-size=4M,cache-clean-interval=30",
            0,
        )
        .ok()
        .unwrap();
        assert_eq!(
            d.file.as_deref(),
            Some(std::path::Path::new("/x/d,1.qcow2"))
        );
        assert_eq!(
            (d.id.as_str(), d.interface, d.read_only, d.cache, d.aio),
            ("d0", Interface::None, true, CacheMode::None, Aio::Native)
        );
        assert_eq!(
            (d.discard, d.detect_zeroes),
            (DiscardMode::Unmap, DetectZeroes::Unmap)
        );
        assert_eq!(d.qcow2_cache.l2_cache_size, Some(4 << 20));
        assert_eq!(d.qcow2_cache.cache_clean_interval, Some(30));
        // Defaults: a virtio disk named as QEMU names it, on io_uring, discards ignored.
        let d = parse_drive("file=a.img", 2).ok().unwrap();
        assert_eq!(
            (d.id.as_str(), d.format, d.read_only, d.aio, d.discard),
            ("virtio2", None, false, Aio::IoUring, DiscardMode::Ignore)
        );
        // An empty CD-ROM drive is read-only.
        let d = parse_drive("if=none,id=cd,media=cdrom", 0).ok().unwrap();
        assert_eq!((d.file, d.cdrom, d.read_only), (None, true, true));
        for bad in [
            "format=raw",
            "file=a,format=vpc",
            "file=a,if=ide",
            "file=a,cache=sometimes",
            "file=a,readonly=maybe",
            "file=a,bogus=1",
            "file=a,if=none",
            "file=a,aio=native",
            "file=a,detect-zeroes=unmap",
            "file=a,media=cdrom",
            "file=a,l2-cache-size=lots",
        ] {
            assert!(parse_drive(bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn devices_objects_and_qmp_parse() {
        let d = parse_device("scsi-cd,drive=cd0,bus=scsi0.0,scsi-id=3,lun=2,id=cd")
            .ok()
            .unwrap();
        assert_eq!(
            d,
            Device::Scsi {
                kind: ScsiKind::Cdrom,
                id: Some("cd".into()),
                drive: "cd0".into(),
                bus: Some("scsi0".into()),
                scsi_id: Some(3),
                lun: 2,
                serial: String::new(),
            }
        );
        assert!(matches!(
            parse_device("virtio-scsi-pci,id=scsi0,iothread=io0,num_queues=2").ok(),
            Some(Device::VirtioScsi { num_queues: 2, .. })
        ));
        assert!(matches!(
            parse_device("virtio-blk-pci,drive=d,num-queues=4,queue-size=128").ok(),
            Some(Device::VirtioBlk {
                num_queues: 4,
                queue_size: 128,
                ..
            })
        ));
        for bad in [
            "e1000",
            "scsi-hd",
            "scsi-hd,drive=d,bus=scsi0",
            "scsi-hd,drive=d,lun=20000",
            "virtio-blk-pci,drive=d,queue-size=100",
        ] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_object("iothread,id=io0").ok().as_deref(), Some("io0"));
        assert!(parse_object("memory-backend-ram,id=m").is_err());
        let q = parse_qmp("unix:/run/q.sock,server=on,wait=off")
            .ok()
            .unwrap();
        assert_eq!((q.path.to_str(), q.wait), (Some("/run/q.sock"), false));
        assert!(parse_qmp("unix:/q,server,nowait")
            .ok()
            .is_some_and(|q| !q.wait));
        assert!(parse_qmp("unix:/q,server").ok().is_some_and(|q| q.wait));
        assert!(parse_qmp("tcp:localhost:4444,server=on").is_err());
        assert!(parse_qmp("unix:/q").is_err());
    }

    #[test]
    fn references_between_options_are_checked() {
        let ok = parse(&strings(&[
            "-kernel",
            "k",
            "-object",
            "iothread,id=io0",
            "-drive",
            "file=a,if=none,id=d0",
            "-drive",
            "if=none,id=cd0,media=cdrom",
            "-device",
            "virtio-scsi-pci,id=s,iothread=io0",
            "-device",
            "scsi-hd,drive=d0",
            "-device",
            "scsi-cd,drive=cd0",
            "-S",
            "-no-reboot",
        ]));
        let a = ok.ok().flatten().unwrap();
        assert!(a.start_paused && a.no_reboot);
        assert_eq!((a.drives.len(), a.devices.len()), (2, 3));
        for bad in [
            &["-device", "scsi-hd,drive=nope"][..],
            &["-drive", "file=a,id=x", "-device", "scsi-hd,drive=x"],
            &[
                "-drive",
                "file=a,if=none,id=x",
                "-drive",
                "file=b,if=none,id=x",
            ],
            &[
                "-drive",
                "if=none,id=c,media=cdrom",
                "-device",
                "scsi-hd,drive=c",
            ],
            &["-device", "virtio-scsi-pci,iothread=nope"],
            &[
                "-drive",
                "file=a,if=none,id=x",
                "-device",
                "scsi-hd,drive=x",
                "-device",
                "scsi-hd,drive=x",
            ],
        ] {
            let mut v = strings(&["-kernel", "k"]);
            v.extend(strings(bad));
            assert!(parse(&v).is_err(), "{bad:?}");
        }
    }
}
