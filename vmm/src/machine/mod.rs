//! An x86-64 KVM machine: guest RAM, the in-kernel irqchip and PIT, a PIO and an MMIO bus with
//! the legacy devices a Linux guest needs (COM1, ACPI power management, reset, CMOS), ACPI tables,
//! direct kernel boot, and one thread per vCPU.
//!
//! Modules, one job each: [`memory`] (layout and RAM), [`cpu`] (CPUID, MSRs, FPU, entry
//! registers), [`boot`] (kernel, initrd, command line, zero page / PVH), [`acpi`] (tables),
//! [`irqchip`], [`bus`], [`serial`], [`power`] (power off, reset, the power button), [`rtc`],
//! [`exits`] (the run loop), [`control`] (pause/resume, reset and quit requests, the run state
//! and its QMP events, across reboots). Disks (virtio) are registered on the buses like the
//! devices here.
//!
//! A machine runs once: a reboot ends [`Machine::run`] with [`ExitReason::Reset`] and the caller
//! builds a new machine from a clone of the same [`Config`], whose shared parts (console output,
//! the stdin reader, the [`VmControl`]) carry over.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod control;
pub mod cpu;
pub mod exits;
pub mod irqchip;
pub mod memory;
pub mod power;
pub mod rtc;
pub mod serial;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::iothread::IoThread;
use bus::Bus;
pub use control::{ControlOptions, RunState, ShutdownCause, VmControl};
use cpu::EntryMode;
use exits::ExitContext;
pub use power::ExitReason;
pub use power::ExitSignal;

/// Machine errors. Every message names what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0}: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be allocated or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A bad machine configuration.
    #[error("{0}")]
    Config(String),
    /// The kernel, initrd or command line could not be loaded.
    #[error("{0}")]
    Boot(String),
    /// A file could not be read.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A device could not be set up.
    #[error("{0}")]
    Device(String),
    /// A vCPU stopped on an error.
    #[error("{0}")]
    Vcpu(String),
}

/// Result of machine operations.
pub type Result<T> = std::result::Result<T, Error>;

/// What to build. Cloning it shares the console and the control, so that the machine built
/// after a reset continues where the last one stopped.
#[derive(Clone)]
pub struct Config {
    /// Guest RAM in bytes.
    pub ram: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Where COM1's output goes (see [`serial::serial_out`]).
    pub serial_out: serial::SerialOut,
    /// What the guest reads from COM1 (the VMM's stdin, see [`serial::SerialInput::spawn`]), if
    /// anything.
    pub serial_in: Option<Arc<serial::SerialInput>>,
    /// The KVM device (normally `/dev/kvm`).
    pub kvm_path: PathBuf,
    /// Pause/resume, reset, power button and quit requests, and the run state.
    pub control: Arc<VmControl>,
}

/// A created machine, before or while it runs.
pub struct Machine {
    kvm: Kvm,
    /// Shared with the SCI's interrupt line ([`power::KvmIrqLine`]).
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    ram: u64,
    pio: Bus,
    mmio: Bus,
    exit: Arc<ExitSignal>,
    rsdp: GuestAddress,
    com1: Arc<Mutex<serial::SerialDevice>>,
    serial_in: Option<Arc<serial::SerialInput>>,
    pm1: Arc<Mutex<power::Pm1Event>>,
    control: Arc<VmControl>,
    nr_vcpus: u8,
    virtio_mmio: Vec<acpi::MmioDevice>,
    iothreads: Vec<Arc<IoThread>>,
    /// Owns the mappings behind `mem`; declared last so that it is dropped after the VM and
    /// every other field.
    host_ram: Arc<memory::HostRam>,
}

/// Where the virtio-mmio register windows go: one page each from here, in the MMIO hole.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The first GSI given to virtio-mmio devices: IOAPIC pins 16-23 are not shared with ISA.
pub const VIRTIO_MMIO_GSI: u32 = 16;
/// The IOAPIC has 24 pins, so at most 8 virtio-mmio devices.
pub const VIRTIO_MMIO_MAX: usize = 8;

impl Machine {
    /// Creates the VM, its RAM, irqchip, legacy devices, ACPI tables and vCPUs.
    pub fn new(config: Config) -> Result<Self> {
        if config.vcpus == 0 {
            return Err(Error::Config("at least one vCPU is needed".into()));
        }
        let path = std::ffi::CString::new(config.kvm_path.as_os_str().as_encoded_bytes()).map_err(
            |_| Error::Config(format!("bad KVM device path {}", config.kvm_path.display())),
        )?;
        let kvm = Kvm::new_with_path(path).map_err(|e| Error::Kvm("opening the KVM device", e))?;
        let max = kvm.get_max_vcpus().min(u8::MAX as usize);
        if usize::from(config.vcpus) > max {
            return Err(Error::Config(format!(
                "KVM supports at most {max} vCPUs, {} requested",
                config.vcpus
            )));
        }
        let vm = Arc::new(
            kvm.create_vm()
                .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?,
        );
        let (mem, host_ram) = memory::create_guest_memory(config.ram)?;
        memory::register_memory(&vm, &mem)?;
        irqchip::setup_irqchip(&vm)?;

        let exit = ExitSignal::new().map_err(|e| Error::Device(format!("exit eventfd: {e}")))?;
        let mut pio = Bus::new();
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| Error::Device(format!("serial eventfd: {e}")))?;
        vm.register_irqfd(&irq, serial::COM1_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let com1 = Arc::new(Mutex::new(serial::SerialDevice::new(
            irq,
            config.serial_out,
        )));
        let pm1 = Arc::new(Mutex::new(power::Pm1Event::new(Box::new(
            power::KvmIrqLine::new(vm.clone(), u32::from(acpi::SCI_IRQ)),
        ))));
        let devices: Vec<(bus::SharedDevice, u64, u64)> = vec![
            (com1.clone(), serial::COM1_PORT, serial::COM1_LEN),
            (pm1.clone(), power::PM1A_EVT_PORT, power::PM1A_EVT_LEN),
            (
                Arc::new(Mutex::new(power::Pm1Control::new(exit.clone()))),
                power::PM1A_CNT_PORT,
                power::PM1A_CNT_LEN,
            ),
            (
                Arc::new(Mutex::new(power::PmTimer::default())),
                power::PM_TMR_PORT,
                power::PM_TMR_LEN,
            ),
            (
                Arc::new(Mutex::new(power::ResetPort::new(exit.clone()))),
                power::RESET_PORT,
                1,
            ),
            (
                Arc::new(Mutex::new(power::I8042::new(exit.clone()))),
                power::I8042_PORT,
                power::I8042_LEN,
            ),
            (
                Arc::new(Mutex::new(rtc::Cmos::default())),
                rtc::CMOS_PORT,
                rtc::CMOS_LEN,
            ),
        ];
        for (dev, base, len) in devices {
            pio.insert(dev, base, len)
                .map_err(|e| Error::Device(e.to_string()))?;
        }
        let rsdp = acpi::write_tables(&mem, config.vcpus, &[])?;

        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
            cpu::setup_cpuid(&kvm, &fd, id, config.vcpus)?;
            cpu::setup_msrs(&fd)?;
            cpu::setup_fpu(&fd)?;
            vcpus.push(fd);
        }
        Ok(Self {
            kvm,
            vm,
            mem,
            vcpus,
            ram: config.ram,
            pio,
            mmio: Bus::new(),
            exit,
            rsdp,
            com1,
            serial_in: config.serial_in,
            pm1,
            control: config.control,
            nr_vcpus: config.vcpus,
            virtio_mmio: Vec::new(),
            iothreads: Vec::new(),
            host_ram,
        })
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The VM fd (for devices that register irqfds or ioeventfds).
    pub fn vm(&self) -> &VmFd {
        &self.vm
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The PIO bus, to register more devices before [`Machine::run`].
    pub fn pio_bus(&mut self) -> &mut Bus {
        &mut self.pio
    }

    /// The machine's stop request, for whoever else may end it (a signal handler, QMP `quit`).
    /// It ends this machine only; [`VmControl::request_shutdown`] reaches whichever machine is
    /// current, which is what a VMM that reboots needs.
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// The control this machine runs under.
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// The MMIO bus, to register more devices before [`Machine::run`].
    pub fn mmio_bus(&mut self) -> &mut Bus {
        &mut self.mmio
    }

    /// Adds a virtio-mmio device serving `backend`: a register window in the MMIO hole, an irqfd
    /// on its own IOAPIC pin, an ioeventfd on `QueueNotify` served by `iothread` (or by a
    /// thread of the device's own), and its declaration in the DSDT (the tables are
    /// rewritten). Call before [`Machine::load_linux`].
    pub fn add_virtio_mmio(
        &mut self,
        backend: Arc<dyn crate::virtio_mmio::Backend>,
        iothread: Option<Arc<IoThread>>,
    ) -> Result<Arc<Mutex<crate::virtio_mmio::MmioTransport>>> {
        use crate::virtio_mmio::{MmioTransport, MMIO_LEN, QUEUE_NOTIFY};
        let index = self.virtio_mmio.len();
        if index >= VIRTIO_MMIO_MAX {
            return Err(Error::Config(format!(
                "at most {VIRTIO_MMIO_MAX} virtio devices are supported"
            )));
        }
        let base = VIRTIO_MMIO_BASE + index as u64 * 0x1000;
        let gsi = VIRTIO_MMIO_GSI + index as u32;
        let dev_err =
            |what: &str, e: std::io::Error| Error::Device(format!("virtio{index}: {what}: {e}"));
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| dev_err("eventfd", e))?;
        self.vm
            .register_irqfd(&irq, gsi)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let transport = MmioTransport::new(
            backend,
            Arc::new(self.mem.clone()),
            irq,
            Some(self.host_ram.clone()),
        )
        .map_err(|e| dev_err("transport", e))?;
        self.vm
            .register_ioevent(
                transport.notify_event(),
                &kvm_ioctls::IoEventAddress::Mmio(base + QUEUE_NOTIFY),
                kvm_ioctls::NoDatamatch,
            )
            .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
        let iothread = match iothread {
            Some(t) => t,
            None => Arc::new(
                IoThread::new(&format!("virtio{index}")).map_err(|e| dev_err("I/O thread", e))?,
            ),
        };
        transport
            .attach(&iothread)
            .map_err(|e| dev_err("I/O thread", e))?;
        // The machine keeps the thread until it ends (dropping the last reference stops it).
        if !self.iothreads.iter().any(|t| Arc::ptr_eq(t, &iothread)) {
            self.iothreads.push(iothread);
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), base, MMIO_LEN)
            .map_err(|e| Error::Device(e.to_string()))?;
        self.virtio_mmio.push(acpi::MmioDevice {
            base: base as u32,
            len: MMIO_LEN as u32,
            gsi,
        });
        self.rsdp = acpi::write_tables(&self.mem, self.nr_vcpus, &self.virtio_mmio)?;
        Ok(transport)
    }

    /// Loads a Linux kernel (vmlinux through PVH or the 64-bit entry, or a bzImage), an optional
    /// initramfs and the command line, and points the boot vCPU at it.
    pub fn load_linux(
        &mut self,
        kernel: &std::path::Path,
        initrd: Option<&std::path::Path>,
        append: &str,
    ) -> Result<()> {
        let (k, arg) = boot::load_linux(&self.mem, self.ram, kernel, initrd, append, self.rsdp.0)?;
        cpu::setup_boot_regs(&self.vcpus[0], &self.mem, k.mode, k.entry, arg)
    }

    /// Copies `code` to `addr` and starts the boot vCPU there in `mode` (for test programs).
    pub fn load_program(&mut self, addr: u64, code: &[u8], mode: EntryMode) -> Result<()> {
        self.mem
            .write_slice(code, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("program: {e}")))?;
        cpu::setup_boot_regs(&self.vcpus[0], &self.mem, mode, addr, 0)
    }

    /// Runs every vCPU on its own thread until the guest powers off, resets or fails, or the
    /// control asks for a reset or quit; stops the other vCPUs and returns why the machine
    /// ended. While the control is paused (or was created with `start_paused`), the vCPUs wait
    /// outside `KVM_RUN`. After [`ExitReason::Reset`], build a new machine from the same
    /// [`Config`] if [`VmControl::reboots_after`] says so.
    pub fn run(self) -> Result<ExitReason> {
        install_kick_handler()?;
        let nr = self.vcpus.len();
        self.control
            .attach(
                self.exit.clone(),
                self.pm1.clone(),
                Some(self.vm.clone() as Arc<dyn control::GuestClock>),
                nr,
            )
            .map_err(|e| Error::Config(e.to_string()))?;
        if let Some(input) = &self.serial_in {
            input.attach(self.com1.clone());
        }
        let ctx = ExitContext {
            pio: Arc::new(self.pio),
            mmio: Arc::new(self.mmio),
            exit: self.exit.clone(),
            control: self.control.clone(),
        };
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for (id, mut fd) in self.vcpus.into_iter().enumerate() {
            let ctx = ctx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Err(e) = exits::run_vcpu(&mut fd, id, &ctx) {
                        eprintln!("vmm: vCPU {id}: {e}");
                        ctx.exit.raise(ExitReason::Crashed);
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // The threads already started must still be stopped and joined.
                    spawn_error = Some(Error::Vcpu(format!("starting vCPU thread {id}: {e}")));
                    self.exit.raise(ExitReason::Crashed);
                    break;
                }
            }
        }
        let reason = self.exit.wait();
        // Parked vCPUs wake up and see the request; the control forgets the threads before
        // they are joined below.
        self.control.stopping();
        // The other vCPUs may be inside KVM_RUN: interrupt them until each has seen the request.
        // A kick can land just before a thread enters KVM_RUN and be lost, hence the retries.
        while threads.iter().any(|t| !t.is_finished()) {
            for t in threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in threads {
            let _ = t.join();
        }
        if let Some(input) = &self.serial_in {
            input.detach();
        }
        self.control.detach(reason);
        // Keep RAM mapped until no vCPU can touch it (the SCI line holds the VM fd too).
        drop(ctx);
        drop(self.pm1);
        drop(self.vm);
        drop(self.mem);
        match spawn_error {
            Some(e) => Err(e),
            None => Ok(reason),
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only purpose is to make KVM_RUN return EINTR.
}

/// Installs the (empty) handler of the vCPU kick signal, once per process.
pub(crate) fn install_kick_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), kick_handler)
            .map_err(|e| Error::Device(format!("vCPU kick signal: {e}")));
    });
    result
}
