//! `vmm`: boots a Linux kernel on KVM with a qemu-system-like command line (see
//! [`args::USAGE`]): virtio-blk and virtio-scsi disks served by the img engine on virtio-mmio,
//! I/O threads, and QMP on a unix socket.
//!
//! The process exits 0 when the guest powers off (or resets, with `-no-reboot`), and 1 with a
//! message on stderr on any error.

mod args;
mod devices;
mod options;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::sync::Arc;

use args::{Args, Serial};
use devices::Devices;
use vmm::machine::serial::{self, SerialInput};
use vmm::machine::{Config, ControlOptions, ExitReason, Machine, ShutdownCause, VmControl};
use vmm::qmp;

/// A usage error or a failure, printed as `vmm: MESSAGE`.
#[derive(Debug)]
pub struct Fail(pub String);

fn serial_out(s: &Serial) -> Result<Box<dyn Write + Send>, Fail> {
    Ok(match s {
        Serial::Stdio => Box::new(std::io::stdout()),
        Serial::None => Box::new(std::io::sink()),
        Serial::File(p) => {
            Box::new(File::create(p).map_err(|e| Fail(format!("{}: {e}", p.display())))?)
        }
    })
}

/// What every machine of this run is built from: a reboot builds a new machine from the same
/// configuration (the serial console, its input thread and the run control carry over).
fn machine_config(o: &Args, events: &qmp::Events) -> Result<Config, Fail> {
    // The guest reads stdin only when the console is stdio, as with QEMU's `-serial stdio`.
    let serial_in = match o.serial {
        Serial::Stdio => Some(
            SerialInput::spawn(Box::new(std::io::stdin()) as Box<dyn Read + Send>)
                .map_err(|e| Fail(format!("serial input thread: {e}")))?,
        ),
        _ => None,
    };
    Ok(Config {
        ram: o.ram,
        vcpus: o.vcpus,
        serial_out: serial::serial_out(serial_out(&o.serial)?),
        serial_in,
        kvm_path: "/dev/kvm".into(),
        control: VmControl::new(ControlOptions {
            start_paused: o.start_paused,
            no_reboot: o.no_reboot,
            events: Some(events.clone()),
        }),
    })
}

/// Builds a machine with the devices on it and the kernel loaded (everything that can fail
/// because of the user's input).
fn build(o: &Args, devices: &Devices, config: &Config) -> Result<Machine, Fail> {
    let mut m = Machine::new(config.clone()).map_err(|e| Fail(e.to_string()))?;
    devices.attach(&mut m)?;
    m.load_linux(&o.kernel, o.initrd.as_deref(), &o.append)
        .map_err(|e| Fail(e.to_string()))?;
    Ok(m)
}

/// Starts the QMP servers: the block commands over the drives and the machine commands over
/// the run control.
fn start_qmp(
    o: &Args,
    devices: &Devices,
    control: &Arc<VmControl>,
    events: &qmp::Events,
) -> Result<Vec<qmp::Server>, Fail> {
    let handler: Arc<dyn qmp::Handler> = Arc::new(qmp::Handlers(vec![
        Arc::new(qmp::block::BlockCommands::new(
            devices.named.clone(),
            events.clone(),
        )),
        Arc::new(qmp::machine::MachineCommands::new(control.clone())),
    ]));
    o.qmp
        .iter()
        .map(|q| {
            qmp::Server::bind(&q.path, handler.clone(), events.clone(), QMP_VERSION)
                .map_err(|e| Fail(format!("-qmp unix:{}: {e}", q.path.display())))
        })
        .collect()
}

/// The QEMU version QMP announces: the one whose protocol the commands follow.
const QMP_VERSION: (u32, u32, u32) = (10, 0, 2);

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

/// SIGTERM, SIGINT and SIGHUP, blocked in every thread so that one thread can wait for them.
struct StopSignals(libc::sigset_t);

impl StopSignals {
    /// Blocks the signals in the calling thread, which every thread started later inherits:
    /// call it before any other thread exists.
    fn block() -> Result<Self, Fail> {
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
        Ok(Self(set))
    }

    /// Turns the first signal into a clean stop (the pid file is removed, the exit status is
    /// 0, as QEMU does): `stop` runs on a thread that waits for it.
    fn on_signal(self, stop: impl FnOnce() + Send + 'static) -> Result<(), Fail> {
        let set = self.0;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut sig = 0;
                // SAFETY: `set` and `sig` are valid for the call.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    eprintln!("vmm: terminating on signal {sig}");
                    stop();
                }
            })
            .map_err(|e| Fail(format!("signal thread: {e}")))?;
        Ok(())
    }
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
    let Some(o) = args::parse(args)? else {
        return Ok(ExitReason::PowerOff);
    };
    let report = if o.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    let signals = StopSignals::block()?;
    let setup = (|| {
        let devices = Devices::open(&o)?;
        let events = qmp::Events::default();
        let config = machine_config(&o, &events)?;
        let m = build(&o, &devices, &config)?;
        let qmp = start_qmp(&o, &devices, &config.control, &events)?;
        if let Some(p) = &o.pidfile {
            std::fs::write(p, format!("{}\n", std::process::id()))
                .map_err(|e| Fail(format!("{}: {e}", p.display())))?;
        }
        Ok((m, devices, config, qmp))
    })();
    let (mut m, devices, config, qmp) = match (setup, report) {
        (Ok(s), Some(pipe)) => {
            // Closing the pipe without a message tells the parent we are running.
            drop(pipe);
            detach_stdio();
            s
        }
        (Ok(s), None) => s,
        (Err(Fail(msg)), Some(mut pipe)) => {
            let _ = writeln!(pipe, "vmm: {msg}");
            std::process::exit(1);
        }
        (Err(e), None) => return Err(e),
    };
    let control = config.control.clone();
    signals.on_signal(move || control.request_shutdown(ShutdownCause::HostSignal))?;
    for (server, q) in qmp.iter().zip(&o.qmp) {
        if q.wait {
            server.wait_for_client();
        }
    }
    // A reset (the guest's, or QMP's system_reset) builds a new machine on the same devices,
    // unless -no-reboot says that a reset ends the VMM.
    let mut result = loop {
        match m.run() {
            Ok(reason) if config.control.reboots_after(reason) => {
                match build(&o, &devices, &config) {
                    Ok(next) => m = next,
                    Err(e) => break Err(e),
                }
            }
            Ok(reason) => break Ok(reason),
            Err(e) => break Err(Fail(e.to_string())),
        }
    };
    // A `quit` is answered before the process goes.
    for server in &qmp {
        server.finish_replies();
    }
    // Requests still running finish first (close waits for them); then caches reach the file.
    if let (Err(e), true) = (devices.close(), result.is_ok()) {
        result = Err(e);
    }
    if let Some(p) = &o.pidfile {
        let _ = std::fs::remove_file(p);
    }
    for q in &o.qmp {
        let _ = std::fs::remove_file(&q.path);
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
