//! `img serve`: serves an image to a virtual machine in another process, as
//! qemu-storage-daemon's vhost-user-blk export does.
//!
//! The image stays open, with its locks held, until the daemon is told to stop (SIGTERM,
//! SIGINT or SIGHUP); it is flushed whenever a front end disconnects, and flushed and closed
//! on the way out.

use crate::daemon;
use crate::getopt::{opt, parse, OptSpec};
use crate::open::{open_with_aio, parse_cache, ImageSpec};
use crate::{CliError, CmdResult};
use blockdev::{Aio, CacheMode};
use std::path::PathBuf;
use std::sync::Arc;
use vmm::vhost_user::{serve_blk, Stopper};
use vmm::virtio_blk::{BlockDevice, DeviceOptions};

const SPECS: &[OptSpec] = &[
    opt(Some('h'), Some("help"), false),
    opt(None, Some("vhost-user-blk"), true),
    opt(Some('f'), Some("format"), true),
    opt(None, Some("image-opts"), false),
    opt(Some('r'), Some("readonly"), false),
    opt(None, Some("read-only"), false),
    opt(None, Some("num-queues"), true),
    opt(None, Some("queue-size"), true),
    opt(None, Some("logical-block-size"), true),
    opt(None, Some("serial"), true),
    opt(Some('t'), Some("cache"), true),
    opt(None, Some("aio"), true),
    opt(None, Some("workers"), true),
    opt(None, Some("pidfile"), true),
    opt(None, Some("daemonize"), false),
];

const USAGE: &str = "Usage: img serve --vhost-user-blk SOCKET [--image-opts | -f FMT] [--readonly]
                 [--num-queues N] [--queue-size N] [--logical-block-size 512|4096]
                 [--serial ID] [-t CACHE] [--aio threads|io_uring|native] [--workers N]
                 [--pidfile PATH] [--daemonize] IMAGE

Serves IMAGE (any format img opens: raw, qcow2 with its cache options, vmdk, backing
chains) as a vhost-user-blk device on the unix socket SOCKET, for QEMU's
vhost-user-blk-pci, Cloud Hypervisor or crosvm. Front ends may connect one after the
other; the image is flushed after each. SIGTERM, SIGINT or SIGHUP stop the server,
which flushes and closes the image.

  --num-queues N   virtqueues offered (default 1; the front end may use fewer)
  --workers N      requests run at once (default 8 per queue, at most 64)
  --aio            file engine (default io_uring)
  -t CACHE         writeback (default), none, writethrough, directsync, unsafe
  --daemonize      return once the socket accepts connections, serving in the background
";

/// Runs `img serve`.
pub fn run(args: &[String]) -> CmdResult {
    let (opts, pos) = parse(args, SPECS)?;
    let mut socket: Option<PathBuf> = None;
    let mut format: Option<String> = None;
    let mut image_opts = false;
    let mut device = DeviceOptions::default();
    let mut cache = CacheMode::Writeback;
    let mut aio = Aio::IoUring;
    let mut workers: Option<usize> = None;
    let mut pidfile: Option<String> = None;
    let mut background = false;
    for o in &opts {
        let v = o.value.clone().unwrap_or_default();
        match o.name.as_str() {
            "help" => {
                print!("{USAGE}");
                return Ok(0);
            }
            "vhost-user-blk" => socket = Some(PathBuf::from(v)),
            "format" => format = Some(v),
            "image-opts" => image_opts = true,
            "readonly" | "read-only" => device.read_only = true,
            "num-queues" => device.num_queues = number(&v, "num-queues", 1, 64)? as u16,
            "queue-size" => {
                let n = number(&v, "queue-size", 2, 1024)?;
                if !n.is_power_of_two() {
                    return Err(CliError::new("queue-size must be a power of two"));
                }
                device.queue_size = n as u16;
            }
            "logical-block-size" => {
                let n = number(&v, "logical-block-size", 512, 65536)?;
                if !n.is_power_of_two() {
                    return Err(CliError::new("logical-block-size must be a power of two"));
                }
                device.logical_block_size = n as u32;
            }
            "serial" => device.serial = v,
            "cache" => {
                cache = parse_cache(&v).ok_or_else(|| CliError::new("Invalid cache mode"))?
            }
            "aio" => {
                aio = Aio::parse(&v)
                    .ok_or_else(|| CliError::new(format!("Invalid aio option: {v}")))?
            }
            "workers" => workers = Some(number(&v, "workers", 1, 1024)? as usize),
            "pidfile" => pidfile = Some(v),
            "daemonize" => background = true,
            _ => unreachable!("option {} is in SPECS", o.name),
        }
    }
    let Some(socket) = socket else {
        return Err(CliError::usage("Expecting --vhost-user-blk SOCKET"));
    };
    let [image] = pos.as_slice() else {
        return Err(CliError::usage("Expecting one image file name"));
    };
    let workers = workers.unwrap_or((8 * usize::from(device.num_queues)).min(64));

    // Forking must come first: only the forking thread survives, and opening a qcow2 starts
    // the cache cleaner thread.
    let mut readiness = daemon::fork_when_ready(background)?;
    daemon::block_stop_signals();
    let spec = ImageSpec::from_args(image, image_opts, format.as_deref())?;
    let image = open_with_aio(&spec, device.read_only, cache, aio)?;
    let device = Arc::new(BlockDevice::new(image, device));
    let pidfile = pidfile
        .as_deref()
        .map(daemon::pid_file)
        .transpose()?
        .map(Arc::new);

    let stopper = Stopper::default();
    {
        let (stopper, device, socket) = (stopper.clone(), Arc::clone(&device), socket.clone());
        let pidfile = pidfile.clone();
        daemon::on_stop_signal(move |_| {
            stopper.stop();
            // The accept loop may be blocked waiting for a front end: finish here. Closing
            // waits for the requests in flight, then flushes and closes the image.
            let code = match device.close() {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("img: {}: {e}", device.name());
                    1
                }
            };
            let _ = std::fs::remove_file(&socket);
            if let Some(p) = &pidfile {
                p.remove();
            }
            std::process::exit(code);
        })
        .map_err(|e| CliError::new(format!("Could not start the signal thread: {e}")))?;
    }
    serve_blk(&socket, Arc::clone(&device), workers, &stopper, || {
        readiness.ready();
        if background {
            daemon::detach_stdio();
        }
    })
    .map_err(|e| CliError::new(e.to_string()))?;
    device
        .close()
        .map_err(|e| CliError::new(format!("{}: {e}", device.name())))?;
    Ok(0)
}

fn number(v: &str, what: &str, min: u64, max: u64) -> Result<u64, CliError> {
    match v.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(CliError::new(format!(
            "Invalid {what} '{v}': must be between {min} and {max}"
        ))),
    }
}
