//! Tiny guest programs run through the whole machine (RAM, irqchip, buses, COM1, the ACPI PM1a
//! registers, the run loop) on the host's /dev/kvm, and the run-state QMP commands (stop, cont,
//! system_reset, system_powerdown, quit) driving them through a real QMP socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::machine::cpu::EntryMode;
use vmm::machine::serial::{serial_out, SerialInput};
use vmm::machine::{Config, ControlOptions, ExitReason, Machine, RunState, VmControl};
use vmm::qmp::machine::MachineCommands;
use vmm::qmp::{Events, Handler, Handlers, Server};

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);
impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        true
    } else {
        eprintln!("skipped: /dev/kvm is absent");
        false
    }
}

/// Runs `code` at `addr` in `mode` on a machine with `vcpus` CPUs; returns the exit and COM1's
/// output.
fn run(code: &[u8], addr: u64, mode: EntryMode, vcpus: u8) -> (ExitReason, String) {
    run_with_input(code, addr, mode, vcpus, None)
}

/// [`run`] with `input` for the guest to read from COM1.
fn run_with_input(
    code: &[u8],
    addr: u64,
    mode: EntryMode,
    vcpus: u8,
    input: Option<&'static [u8]>,
) -> (ExitReason, String) {
    let out = SharedBuf::default();
    let serial_in =
        input.map(|i| SerialInput::spawn(Box::new(i) as Box<dyn std::io::Read + Send>).unwrap());
    let mut m = Machine::new(Config {
        ram: 16 << 20,
        vcpus,
        serial_out: serial_out(out.clone()),
        serial_in,
        kvm_path: "/dev/kvm".into(),
        control: VmControl::new(ControlOptions::default()),
    })
    .unwrap();
    m.load_program(addr, code, mode).unwrap();
    // A broken machine would leave the guest halted forever: end it instead, so the test fails
    // (the assertions expect another exit reason) rather than hangs.
    let exit = m.exit_signal();
    std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(120));
        exit.raise(ExitReason::Terminated);
    });
    let reason = m.run().unwrap();
    let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
    (reason, text)
}

/// 16-bit: print "Hi\n" on COM1, then write SLP_TYP=5|SLP_EN to PM1a_CNT (port 0x604).
const REAL_HELLO_POWEROFF: &[u8] = &[
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'H', 0xee, // mov al, 'H'; out dx, al
    0xb0, b'i', 0xee, // mov al, 'i'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xba, 0x04, 0x06, // mov dx, 0x604
    0xb8, 0x00, 0x34, // mov ax, 0x3400
    0xef, // out dx, ax
    0xf4, // hlt (not reached)
];

/// The same in 32- or 64-bit code. It prints the mode it runs in: 0x48 is `dec eax` in 32-bit
/// code but a REX prefix in 64-bit code, so the character is 'A' in protected and 'B' in long
/// mode.
const WIDE_HELLO_POWEROFF: &[u8] = &[
    0xba, 0xf8, 0x03, 0x00, 0x00, // mov edx, 0x3f8
    0xb0, b'A', // mov al, 'A'
    0x48, 0xfe, 0xc0, // 32-bit: dec eax; inc al. 64-bit: inc al
    0xee, // out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xba, 0x04, 0x06, 0x00, 0x00, // mov edx, 0x604
    0x66, 0xb8, 0x00, 0x34, // mov ax, 0x3400
    0x66, 0xef, // out dx, ax
    0xf4, // hlt (not reached)
];

#[test]
fn real_mode_guest_prints_and_powers_off() {
    if !kvm_available() {
        return;
    }
    assert_eq!(
        run(REAL_HELLO_POWEROFF, 0x1000, EntryMode::Real, 1),
        (ExitReason::PowerOff, "Hi\n".to_string())
    );
}

#[test]
fn protected_mode_pvh_entry_prints_and_powers_off() {
    if !kvm_available() {
        return;
    }
    assert_eq!(
        run(WIDE_HELLO_POWEROFF, 0x10_0000, EntryMode::Pvh, 1),
        (ExitReason::PowerOff, "A\n".to_string())
    );
}

#[test]
fn long_mode_entry_prints_and_powers_off() {
    if !kvm_available() {
        return;
    }
    // At 2 MiB + 4 KiB: inside the identity map, past its first large page.
    assert_eq!(
        run(WIDE_HELLO_POWEROFF, 0x20_1000, EntryMode::Long, 1),
        (ExitReason::PowerOff, "B\n".to_string())
    );
}

#[test]
fn i8042_reset_ends_the_machine() {
    if !kvm_available() {
        return;
    }
    // mov al, 0xfe; out 0x64, al; hlt
    let code = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];
    assert_eq!(
        run(&code, 0x1000, EntryMode::Real, 1),
        (ExitReason::Reset, String::new())
    );
}

#[test]
fn secondary_vcpus_waiting_for_sipi_are_stopped_on_power_off() {
    if !kvm_available() {
        return;
    }
    // vCPU 1 sits in KVM_RUN waiting for an INIT/SIPI that never comes; the machine must still
    // stop when vCPU 0 powers off.
    assert_eq!(
        run(REAL_HELLO_POWEROFF, 0x1000, EntryMode::Real, 2),
        (ExitReason::PowerOff, "Hi\n".to_string())
    );
}

#[test]
fn guest_reads_stdin_through_com1() {
    if !kvm_available() {
        return;
    }
    // 16-bit: poll LSR.DR, read RBR, echo it, until a newline; then power off.
    let code = [
        0xba, 0xfd, 0x03, // mov dx, 0x3fd
        0xec, 0xa8, 0x01, 0x74, 0xfb, // wait: in al, dx; test al, 1; jz wait
        0xba, 0xf8, 0x03, 0xec, 0xee, // mov dx, 0x3f8; in al, dx; out dx, al
        0x3c, 0x0a, 0x75, 0xef, // cmp al, '\n'; jne start
        0xba, 0x04, 0x06, 0xb8, 0x00, 0x34, 0xef, 0xf4, // power off
    ];
    // Longer than the 64-byte FIFO, so the input thread must wait for the guest.
    const INPUT: &[u8] =
        b"0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ\nnot read\n";
    let (reason, text) = run_with_input(&code, 0x1000, EntryMode::Real, 1, Some(INPUT));
    assert_eq!(reason, ExitReason::PowerOff);
    assert_eq!(
        text,
        "0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
    );
}

// ---- Run-state control through QMP -------------------------------------------------------

/// 16-bit: `inc dword [0x2000]` forever. A second vCPU, if any, waits for a SIPI in KVM_RUN.
const COUNTER: &[u8] = &[
    0x66, 0xff, 0x06, 0x00, 0x20, // start: inc dword [0x2000]
    0xeb, 0xf9, // jmp start
];

/// 16-bit: marks 0x2000 (started), polls PM1_STS until PWRBTN_STS (bit 8) is set, clears it by
/// writing it back (write 1 to clear), checks that it reads 0 now, prints "P" and powers off
/// through PM1_CNT (S5). If the bit did not clear it halts instead.
const POWER_BUTTON: &[u8] = &[
    0xc6, 0x06, 0x00, 0x20, 0x01, // mov byte [0x2000], 1
    0xba, 0x00, 0x06, // mov dx, 0x600 (PM1a_STS)
    0xed, // wait: in ax, dx
    0xa9, 0x00, 0x01, // test ax, 0x100
    0x74, 0xfa, // jz wait
    0xef, // out dx, ax: write 1 to clear
    0xed, // in ax, dx
    0xa9, 0x00, 0x01, // test ax, 0x100
    0x75, 0x10, // jnz fail
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, b'P', 0xee, // mov al, 'P'; out dx, al
    0xb0, b'\n', 0xee, // mov al, '\n'; out dx, al
    0xba, 0x04, 0x06, // mov dx, 0x604
    0xb8, 0x00, 0x34, // mov ax, 0x3400 (SLP_TYP 5 | SLP_EN)
    0xef, // out dx, ax
    0xf4, // fail: hlt
];

/// 16-bit: programs the PICs (slave on IRQ 2, vectors 0x20 and 0x28), installs an interrupt
/// handler for IRQ 9 (vector 0x29), enables PWRBTN_EN in PM1_EN, marks 0x2000 and halts with
/// interrupts on. The handler checks PWRBTN_STS, clears it, sends EOIs, prints "S" and powers
/// off; anything else leaves the guest halted. So the guest only powers off if the power
/// button's SCI arrives as IRQ 9.
const SCI_GUEST: &[u8] = &[
    0xc7, 0x06, 0xa4, 0x00, 0x44, 0x10, // mov word [0xa4], 0x1044 (IVT[0x29].offset: handler)
    0xc7, 0x06, 0xa6, 0x00, 0x00, 0x00, // mov word [0xa6], 0 (segment)
    0xb0, 0x11, 0xe6, 0x20, // master ICW1
    0xb0, 0x20, 0xe6, 0x21, // ICW2: vectors 0x20-0x27
    0xb0, 0x04, 0xe6, 0x21, // ICW3: slave on IRQ 2
    0xb0, 0x01, 0xe6, 0x21, // ICW4: 8086 mode
    0xb0, 0x11, 0xe6, 0xa0, // slave ICW1
    0xb0, 0x28, 0xe6, 0xa1, // ICW2: vectors 0x28-0x2f
    0xb0, 0x02, 0xe6, 0xa1, // ICW3: cascade identity 2
    0xb0, 0x01, 0xe6, 0xa1, // ICW4
    0xb0, 0xfb, 0xe6, 0x21, // master mask: only IRQ 2
    0xb0, 0xfd, 0xe6, 0xa1, // slave mask: only IRQ 9
    0xba, 0x02, 0x06, 0xb8, 0x00, 0x01, 0xef, // PM1_EN (0x602) = PWRBTN_EN
    0xc6, 0x06, 0x00, 0x20, 0x01, // mov byte [0x2000], 1
    0xfb, // sti
    0xf4, 0xeb, 0xfd, // idle: hlt; jmp idle
    // handler (0x1044):
    0xba, 0x00, 0x06, 0xed, // mov dx, 0x600; in ax, dx
    0xa9, 0x00, 0x01, 0x74, 0x17, // test ax, 0x100; jz spurious
    0xef, // out dx, ax: write 1 to clear (the SCI drops)
    0xb0, 0x20, 0xe6, 0xa0, 0xe6, 0x20, // EOI to the slave and the master
    0xba, 0xf8, 0x03, 0xb0, b'S', 0xee, 0xb0, b'\n', 0xee, // print "S\n"
    0xba, 0x04, 0x06, 0xb8, 0x00, 0x34, 0xef, // S5
    0xf4, // spurious: hlt
];

/// Where the guests above count or mark.
const MARK: u64 = 0x2000;

/// How long anything may take on the slow software KVM before a test gives up (and fails).
const PATIENCE: Duration = Duration::from_secs(120);

/// A VMM in miniature: a control with events, a QMP server over the machine commands, and the
/// config every machine of the "VMM" is built from.
struct Vmm {
    _dir: tempfile::TempDir,
    config: Config,
    out: SharedBuf,
    qmp: Qmp,
}

impl Vmm {
    fn new(vcpus: u8, start_paused: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let events = Events::default();
        let control = VmControl::new(ControlOptions {
            start_paused,
            no_reboot: false,
            events: Some(events.clone()),
        });
        let handler: Arc<dyn Handler> = Arc::new(Handlers(vec![Arc::new(MachineCommands::new(
            control.clone(),
        ))]));
        let sock = dir.path().join("qmp.sock");
        Server::bind(&sock, handler, events, (7, 2, 0)).unwrap();
        let out = SharedBuf::default();
        let config = Config {
            ram: 16 << 20,
            vcpus,
            serial_out: serial_out(out.clone()),
            serial_in: None,
            kvm_path: "/dev/kvm".into(),
            control,
        };
        Vmm {
            qmp: Qmp::connect(&sock),
            _dir: dir,
            config,
            out,
        }
    }

    /// Builds a machine from the shared config, loads `code` and runs it on a thread of its own.
    fn boot(&self, code: &[u8]) -> Running {
        let mut m = Machine::new(self.config.clone()).unwrap();
        m.load_program(0x1000, code, EntryMode::Real).unwrap();
        let mem = m.memory().clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(m.run().unwrap());
        });
        Running { mem, done: rx }
    }

    fn output(&self) -> String {
        String::from_utf8(self.out.0.lock().unwrap().clone()).unwrap()
    }
}

/// A machine running on its own thread.
struct Running {
    mem: GuestMemoryMmap,
    done: mpsc::Receiver<ExitReason>,
}

impl Running {
    fn mark(&self) -> u32 {
        self.mem.read_obj(GuestAddress(MARK)).unwrap()
    }

    /// Waits until the guest's counter or mark passes `from`.
    fn wait_past(&self, from: u32) -> u32 {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let v = self.mark();
            if v > from {
                return v;
            }
            assert!(Instant::now() < deadline, "the guest did not run");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// How the machine ended; fails the test if it does not end.
    fn end(self) -> ExitReason {
        self.done
            .recv_timeout(PATIENCE)
            .expect("the machine did not stop")
    }
}

/// A QMP client in command mode.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
            events: Vec::new(),
        };
        assert!(q.line().get("QMP").is_some());
        assert_eq!(q.exec("qmp_capabilities"), json!({"return": {}}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l:?}: {e}"))
    }

    /// Runs `cmd`; returns the whole answer (`return` or `error`), keeping events for later.
    fn exec(&mut self, cmd: &str) -> Value {
        self.writer
            .write_all(json!({"execute": cmd}).to_string().as_bytes())
            .unwrap();
        loop {
            let v = self.line();
            if v.get("event").is_some() {
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// The next event, without its timestamp.
    fn event(&mut self) -> Value {
        let mut v = if self.events.is_empty() {
            self.line()
        } else {
            self.events.remove(0)
        };
        assert!(v["timestamp"]["seconds"].is_u64(), "{v}");
        v.as_object_mut().unwrap().remove("timestamp");
        v
    }

    fn status(&mut self) -> Value {
        self.exec("query-status")["return"].clone()
    }
}

#[test]
fn qmp_stop_parks_every_vcpu_and_cont_resumes() {
    if !kvm_available() {
        return;
    }
    // Two vCPUs: the second sits in KVM_RUN waiting for a SIPI and must be kicked out too.
    let mut vmm = Vmm::new(2, false);
    let m = vmm.boot(COUNTER);
    assert_eq!(vmm.qmp.event(), json!({"event": "RESUME"}));
    m.wait_past(0);
    assert_eq!(
        vmm.qmp.status(),
        json!({"status": "running", "running": true})
    );
    assert_eq!(vmm.qmp.exec("stop"), json!({"return": {}}));
    assert_eq!(vmm.qmp.event(), json!({"event": "STOP"}));
    assert_eq!(
        vmm.qmp.status(),
        json!({"status": "paused", "running": false})
    );
    // `stop` answers only once the vCPUs are out of KVM_RUN: the counter no longer moves.
    let a = m.mark();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(m.mark(), a, "the guest ran while paused");
    assert_eq!(vmm.qmp.exec("cont"), json!({"return": {}}));
    assert_eq!(vmm.qmp.event(), json!({"event": "RESUME"}));
    m.wait_past(a);
    assert_eq!(vmm.qmp.exec("quit"), json!({"return": {}}));
    assert_eq!(m.end(), ExitReason::Terminated);
    assert_eq!(
        vmm.qmp.event(),
        json!({"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}})
    );
    assert_eq!(
        vmm.qmp.exec("cont"),
        json!({"error": {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}})
    );
    assert_eq!(vmm.config.control.state(), RunState::Shutdown);
}

#[test]
fn start_paused_runs_only_after_cont_and_quit_while_paused_does_not_hang() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::new(1, true);
    let m = vmm.boot(COUNTER);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(m.mark(), 0, "the guest ran before cont");
    assert_eq!(vmm.qmp.status()["status"], "prelaunch");
    assert_eq!(vmm.qmp.exec("cont"), json!({"return": {}}));
    assert_eq!(vmm.qmp.event(), json!({"event": "RESUME"}));
    m.wait_past(0);
    assert_eq!(vmm.qmp.exec("stop"), json!({"return": {}}));
    assert_eq!(vmm.qmp.event(), json!({"event": "STOP"}));
    assert_eq!(vmm.qmp.exec("quit"), json!({"return": {}}));
    assert_eq!(m.end(), ExitReason::Terminated);
}

#[test]
fn system_powerdown_presses_the_acpi_power_button() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::new(1, false);
    let m = vmm.boot(POWER_BUTTON);
    assert_eq!(vmm.qmp.event(), json!({"event": "RESUME"}));
    // Press only once the guest polls, so that it is the guest that sees the bit appear.
    m.wait_past(0);
    assert_eq!(vmm.qmp.exec("system_powerdown"), json!({"return": {}}));
    assert_eq!(vmm.qmp.event(), json!({"event": "POWERDOWN"}));
    assert_eq!(m.end(), ExitReason::PowerOff);
    assert_eq!(vmm.output(), "P\n");
    assert_eq!(
        vmm.qmp.event(),
        json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}})
    );
}

#[test]
fn system_reset_ends_the_machine_and_a_new_one_boots_from_the_same_config() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::new(1, false);
    let m = vmm.boot(COUNTER);
    assert_eq!(vmm.qmp.event(), json!({"event": "RESUME"}));
    m.wait_past(0);
    assert_eq!(vmm.qmp.exec("system_reset"), json!({"return": {}}));
    let reason = m.end();
    assert_eq!(reason, ExitReason::Reset);
    assert!(vmm.config.control.reboots_after(reason));
    assert_eq!(
        vmm.qmp.event(),
        json!({"event": "RESET", "data": {"guest": false, "reason": "host-qmp-system-reset"}})
    );
    assert_eq!(vmm.qmp.status()["status"], "running");
    // The second machine: fresh RAM, the same console and control.
    let m = vmm.boot(REAL_HELLO_POWEROFF);
    assert_eq!(m.mark(), 0);
    assert_eq!(m.end(), ExitReason::PowerOff);
    assert_eq!(vmm.output(), "Hi\n");
    assert_eq!(
        vmm.qmp.event(),
        json!({"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}})
    );
    // The guest resetting itself (i8042) on a third machine is a guest reset.
    let m = vmm.boot(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    assert_eq!(vmm.qmp.event(), json!({"event": "RESUME"}));
    assert_eq!(m.end(), ExitReason::Reset);
    assert_eq!(
        vmm.qmp.event(),
        json!({"event": "RESET", "data": {"guest": true, "reason": "guest-reset"}})
    );
}

#[test]
fn system_powerdown_raises_the_sci_on_irq_9() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::new(1, false);
    let m = vmm.boot(SCI_GUEST);
    assert_eq!(vmm.qmp.event(), json!({"event": "RESUME"}));
    m.wait_past(0);
    assert_eq!(vmm.qmp.exec("system_powerdown"), json!({"return": {}}));
    assert_eq!(m.end(), ExitReason::PowerOff);
    assert_eq!(vmm.output(), "S\n");
}

#[test]
fn guest_time_stands_still_while_paused() {
    if !kvm_available() {
        return;
    }
    let mut vmm = Vmm::new(1, false);
    let m = vmm.boot(COUNTER);
    m.wait_past(0);
    let control = vmm.config.control.clone();
    assert_eq!(vmm.qmp.exec("stop"), json!({"return": {}}));
    let paused_at = control.guest_clock().expect("KVM_GET_CLOCK");
    let pause = Duration::from_secs(1);
    std::thread::sleep(pause);
    // The VM's clock kept running while paused...
    assert!(control.guest_clock().unwrap() >= paused_at + pause.as_nanos() as u64);
    assert_eq!(vmm.qmp.exec("cont"), json!({"return": {}}));
    // ...and `cont` set it back to where the guest stopped: the pause is not seen (the margin
    // is the time between the two reads around `stop`'s answer and `cont`'s).
    let resumed_at = control.guest_clock().unwrap();
    assert!(
        resumed_at < paused_at + pause.as_nanos() as u64 / 2,
        "guest time jumped by {} ns over a {pause:?} pause",
        resumed_at - paused_at
    );
    assert_eq!(vmm.qmp.exec("quit"), json!({"return": {}}));
    assert_eq!(m.end(), ExitReason::Terminated);
}
