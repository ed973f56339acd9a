//! Tiny guest programs run through the whole machine (RAM, irqchip, buses, COM1, the ACPI PM1a
//! control register, the run loop) on the host's /dev/kvm.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vmm::machine::cpu::EntryMode;
use vmm::machine::{Config, ExitReason, Machine};

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
    let serial_in = input.map(|i| Box::new(i) as Box<dyn std::io::Read + Send>);
    let mut m = Machine::new(Config {
        ram: 16 << 20,
        vcpus,
        serial_out: Box::new(out.clone()),
        serial_in,
        kvm_path: "/dev/kvm".into(),
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
