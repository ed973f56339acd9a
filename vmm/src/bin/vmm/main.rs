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

fn run(args: &[String]) -> Result<ExitReason, Fail> {
    let Some(o) = args::parse(args)? else {
        return Ok(ExitReason::PowerOff);
    };
    // KVM ties a VM to the process that created it, so the fork comes before the machine;
    // the parent exits once the child has built it (or with the child's status when it
    // failed, the child having printed why).
    let mut readiness = daemon::fork_when_ready(o.daemonize).map_err(|e| Fail(e.to_string()))?;
    daemon::block_stop_signals();
    let devices = Devices::open(&o)?;
    let events = qmp::Events::default();
    let config = machine_config(&o, &events)?;
    let mut m = build(&o, &devices, &config)?;
    let qmp = start_qmp(&o, &devices, &config.control, &events)?;
    let _pid_file = o
        .pidfile
        .as_deref()
        .map(|p| daemon::PidFile::create(&p.to_string_lossy()))
        .transpose()
        .map_err(|e| Fail(e.to_string()))?;
    readiness.ready();
    if o.daemonize {
        daemon::detach_stdio();
    }
    let control = config.control.clone();
    daemon::on_stop_signal(move |sig| {
        eprintln!("vmm: terminating on signal {sig}");
        control.request_shutdown(ShutdownCause::HostSignal);
        true
    })
    .map_err(|e| Fail(format!("signal thread: {e}")))?;
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
