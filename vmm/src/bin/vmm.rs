//! `vmm`: boots a Linux kernel on KVM with a qemu-system-like command line.
//!
//! ```text
//! vmm -kernel vmlinux [-initrd initrd.cpio.gz] [-append 'console=ttyS0'] [-m 512M] [-smp 2]
//!     [-serial stdio|file:PATH|none] [-pidfile PATH] [-daemonize]
//!     [-drive file=PATH,format=raw|qcow2|vmdk,if=virtio[,readonly=on][,cache=MODE]]...
//! ```
//! The process exits 0 when the guest powers off or resets (like QEMU with `-no-reboot`), and 1
//! with a message on stderr on any error.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::Arc;

use blockdev::CacheMode;
use img_core::{open_image, OpenOptions};
use vmm::executor::Executor;
use vmm::machine::{Config, ExitReason, ExitSignal, Machine};
use vmm::virtio_blk::{BlockDevice, DeviceOptions};
use vmm::virtio_mmio::BlockBackend;

const USAGE: &str = "usage: vmm -kernel FILE [-initrd FILE] [-append CMDLINE] [-m SIZE] [-smp N]
           [-serial stdio|file:PATH|none] [-pidfile FILE] [-daemonize]
           [-drive file=PATH[,format=raw|qcow2|vmdk][,if=virtio][,readonly=on][,cache=MODE]]...

  -m SIZE          guest RAM; a number in MiB or with a suffix K, M, G, T (default 128M)
  -smp N           number of vCPUs (also cpus=N[,...]) (default 1)
  -kernel FILE     an ELF vmlinux (booted through its PVH entry) or a bzImage
  -initrd FILE     initial ramdisk
  -append CMDLINE  kernel command line
  -serial DEV      where COM1 goes: stdio (default), file:PATH, none
  -pidfile FILE    write the process id to FILE (removed at exit)
  -daemonize       detach once the machine is set up
  -drive OPTS      a virtio-blk disk (virtio-mmio, /dev/vda, vdb, ... in order); cache is
                   writeback (default), none, writethrough, directsync or unsafe
Accepted for compatibility and ignored: -nographic, -no-reboot, -enable-kvm, -accel kvm,
-cpu host, -display none.
";

enum Serial {
    Stdio,
    File(PathBuf),
    None,
}

/// One `-drive`.
#[derive(Debug, PartialEq)]
struct Drive {
    file: PathBuf,
    /// `None`: probe, as QEMU does without `format=`.
    format: Option<String>,
    read_only: bool,
    cache: CacheMode,
}

fn parse_drive(spec: &str) -> Result<Drive, Fail> {
    let (mut file, mut format, mut read_only, mut cache) =
        (None, None, false, CacheMode::default());
    for part in spec.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| Fail(format!("-drive {spec}: '{part}' is not key=value")))?;
        match k {
            "file" => file = Some(PathBuf::from(v)),
            "format" => match v {
                "raw" | "qcow2" | "vmdk" => format = Some(v.to_string()),
                _ => {
                    return Err(Fail(format!(
                        "-drive {spec}: unsupported format '{v}' (raw, qcow2, vmdk)"
                    )))
                }
            },
            "if" if v == "virtio" => {}
            "if" => return Err(Fail(format!("-drive {spec}: only if=virtio is supported"))),
            "readonly" => {
                read_only = match v {
                    "on" | "yes" | "true" => true,
                    "off" | "no" | "false" => false,
                    _ => return Err(Fail(format!("-drive {spec}: readonly expects on or off"))),
                }
            }
            "cache" => {
                cache = CacheMode::parse(v)
                    .ok_or_else(|| Fail(format!("-drive {spec}: invalid cache option '{v}'")))?
            }
            _ => return Err(Fail(format!("-drive {spec}: unsupported option '{k}'"))),
        }
    }
    let file = file.ok_or_else(|| Fail(format!("-drive {spec}: file= is required")))?;
    Ok(Drive {
        file,
        format,
        read_only,
        cache,
    })
}

struct Options {
    drives: Vec<Drive>,
    ram: u64,
    vcpus: u8,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    append: String,
    serial: Serial,
    pidfile: Option<PathBuf>,
    daemonize: bool,
}

/// A usage error or a failure, printed as `vmm: MESSAGE`.
struct Fail(String);

fn parse_size(s: &str) -> Result<u64, Fail> {
    let s = s.strip_prefix("size=").unwrap_or(s);
    let bad = || {
        Fail(format!(
            "Parameter 'size' expects a non-negative number below 2^64 (got '{s}')"
        ))
    };
    let (num, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&s[..i], shift)
        }
        _ => (s, 20), // QEMU's default unit for -m is MiB
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
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

fn parse(args: &[String]) -> Result<Option<Options>, Fail> {
    let mut ram = 128 << 20;
    let mut vcpus = 1;
    let (mut kernel, mut initrd, mut append, mut serial, mut pidfile) =
        (None, None, String::new(), None, None);
    let mut daemonize = false;
    let mut drives = Vec::new();
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
                ram = parse_size(&value()?)?
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
            "-drive" => drives.push(parse_drive(&value()?)?),
            "-daemonize" => daemonize = true,
            "-nographic" | "-no-reboot" | "-enable-kvm" => {}
            "-accel" | "-machine" => {
                let v = value()?;
                if !(v == "kvm"
                    || v.starts_with("accel=kvm")
                    || v.contains("accel=kvm")
                    || opt == "-machine")
                {
                    return Err(Fail(format!("{opt} {v}: only KVM is supported")));
                }
            }
            "-cpu" | "-display" => {
                value()?;
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
    Ok(Some(Options {
        drives,
        ram,
        vcpus,
        kernel,
        initrd,
        append,
        serial,
        pidfile,
        daemonize,
    }))
}

fn serial_out(s: &Serial) -> Result<Box<dyn Write + Send>, Fail> {
    Ok(match s {
        Serial::Stdio => Box::new(std::io::stdout()),
        Serial::None => Box::new(std::io::sink()),
        Serial::File(p) => {
            Box::new(File::create(p).map_err(|e| Fail(format!("{}: {e}", p.display())))?)
        }
    })
}

/// Opens the drives' images and plugs a virtio-blk device for each into the machine.
fn add_drives(m: &mut Machine, drives: &[Drive]) -> Result<Vec<Arc<BlockDevice>>, Fail> {
    if drives.is_empty() {
        return Ok(Vec::new());
    }
    // Requests block on the engine while they run, so a few workers keep several in flight.
    let executor = Arc::new(Executor::new("blk", 4).map_err(|e| Fail(format!("workers: {e}")))?);
    let mut devices = Vec::new();
    for d in drives {
        let opts = OpenOptions {
            format: d.format.clone(),
            read_only: d.read_only,
            cache: d.cache,
            ..Default::default()
        };
        let image = open_image(&d.file, &opts)
            .map_err(|e| Fail(format!("-drive file={}: {e}", d.file.display())))?;
        let device = Arc::new(BlockDevice::new(
            image,
            DeviceOptions {
                read_only: d.read_only,
                ..Default::default()
            },
        ));
        m.add_virtio_mmio(Arc::new(BlockBackend::new(
            device.clone(),
            executor.clone(),
        )))
        .map_err(|e| Fail(e.to_string()))?;
        devices.push(device);
    }
    Ok(devices)
}

/// Sets the machine up (everything that can fail because of the user's input).
fn build(o: &Options) -> Result<(Machine, Vec<Arc<BlockDevice>>), Fail> {
    // The guest reads stdin only when the console is stdio, as with QEMU's `-serial stdio`.
    let serial_in = match o.serial {
        Serial::Stdio => Some(
            vmm::machine::serial::SerialInput::spawn(
                Box::new(std::io::stdin()) as Box<dyn Read + Send>
            )
            .map_err(|e| Fail(format!("serial input thread: {e}")))?,
        ),
        _ => None,
    };
    let config = Config {
        ram: o.ram,
        vcpus: o.vcpus,
        serial_out: vmm::machine::serial::serial_out(serial_out(&o.serial)?),
        serial_in,
        kvm_path: "/dev/kvm".into(),
        // No reboot loop here yet: a reset ends the VMM, as with QEMU's -no-reboot.
        control: vmm::machine::VmControl::new(vmm::machine::ControlOptions {
            no_reboot: true,
            ..Default::default()
        }),
    };
    let mut m = Machine::new(config).map_err(|e| Fail(e.to_string()))?;
    let disks = add_drives(&mut m, &o.drives)?;
    m.load_linux(&o.kernel, o.initrd.as_deref(), &o.append)
        .map_err(|e| Fail(e.to_string()))?;
    Ok((m, disks))
}

/// Forks; the parent waits for the child's verdict on its set-up and exits with it. KVM ties a
/// VM to the process that created it, so this must happen before the machine is built. Returns
/// the pipe on which the child reports: an empty message is success.
fn daemonize() -> Result<File, Fail> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Fail(format!("pipe: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (no vCPU or other thread started yet), so the
    // child may run arbitrary code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(Fail(format!("fork: {}", std::io::Error::last_os_error()))),
        0 => {
            drop(rd);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            Ok(File::from(wr))
        }
        _ => {
            drop(wr);
            let mut msg = String::new();
            let _ = File::from(rd).read_to_string(&mut msg);
            if msg.is_empty() {
                std::process::exit(0);
            }
            // The child died or reported a failure.
            eprint!("{msg}");
            std::process::exit(1);
        }
    }
}

/// Turns SIGTERM, SIGINT and SIGHUP into a clean stop (the pid file is removed, the exit status
/// is 0, as QEMU does). The signals are blocked here, before any other thread exists, so every
/// thread inherits the mask and only the waiting thread receives them.
fn stop_on_signals(exit: Arc<ExitSignal>) -> Result<(), Fail> {
    // SAFETY: sigset_t is a plain bitmask that sigemptyset initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Fail(format!(
            "pthread_sigmask: {}",
            std::io::Error::from_raw_os_error(rc)
        )));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig = 0;
            // SAFETY: `set` and `sig` are valid for the call.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                eprintln!("vmm: terminating on signal {sig}");
                exit.raise(ExitReason::Terminated);
            }
        })
        .map_err(|e| Fail(format!("signal thread: {e}")))?;
    Ok(())
}

/// Points stdin, stdout and stderr at /dev/null (a daemon has no terminal).
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays open for the call.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn run(args: &[String]) -> Result<ExitReason, Fail> {
    let Some(o) = parse(args)? else {
        return Ok(ExitReason::PowerOff);
    };
    let report = if o.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    let setup = (|| {
        let m = build(&o)?;
        if let Some(p) = &o.pidfile {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .map_err(|e| Fail(format!("{}: {e}", p.display())))?;
        }
        Ok(m)
    })();
    let (m, disks) = match (setup, report) {
        (Ok(m), Some(pipe)) => {
            // Closing the pipe without a message tells the parent we are running.
            drop(pipe);
            detach_stdio();
            m
        }
        (Ok(m), None) => m,
        (Err(Fail(msg)), Some(mut pipe)) => {
            let _ = writeln!(pipe, "vmm: {msg}");
            std::process::exit(1);
        }
        (Err(e), None) => return Err(e),
    };
    stop_on_signals(m.exit_signal())?;
    let mut result = m.run().map_err(|e| Fail(e.to_string()));
    // Requests still running finish first (close waits for them); then caches reach the file.
    for d in disks {
        if let Err(e) = d.close() {
            if result.is_ok() {
                result = Err(Fail(format!("{}: {e}", d.name())));
            }
        }
    }
    if let Some(p) = &o.pidfile {
        let _ = std::fs::remove_file(p);
    }
    result
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(
            ExitReason::PowerOff | ExitReason::Reset | ExitReason::Halted | ExitReason::Terminated,
        ) => ExitCode::SUCCESS,
        Ok(ExitReason::Crashed) => ExitCode::from(1),
        Err(Fail(msg)) => {
            eprintln!("vmm: {msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_options_parse_into_a_typed_drive() {
        let d = parse_drive("file=/x/d.qcow2,format=qcow2,if=virtio,readonly=on,cache=none")
            .ok()
            .unwrap();
        assert_eq!(
            d,
            Drive {
                file: "/x/d.qcow2".into(),
                format: Some("qcow2".into()),
                read_only: true,
                cache: CacheMode::None,
            }
        );
        let d = parse_drive("file=a.img").ok().unwrap();
        assert_eq!(
            (d.format, d.read_only, d.cache),
            (None, false, CacheMode::Writeback)
        );
        for bad in [
            "format=raw",
            "file=a,format=vpc",
            "file=a,if=ide",
            "file=a,cache=sometimes",
            "file=a,readonly=maybe",
            "file=a,bogus=1",
            "file=a,novalue",
        ] {
            assert!(parse_drive(bad).is_err(), "{bad}");
        }
    }
}
