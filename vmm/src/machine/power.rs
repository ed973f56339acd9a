//! How the guest ends itself: the ACPI PM1 registers (S5 = power off, the fixed-feature power
//! button that asks the guest to shut down), the ACPI reset register, the i8042 reset line, and
//! the signal that tells the VMM the machine is done.
//!
//! The guest finds the PM1a blocks and the reset register through the FADT built in `acpi.rs`,
//! and the S5 sleep type through the DSDT's `_S5_` object: `poweroff` makes Linux write
//! `SLP_TYP = 5 | SLP_EN` to PM1a_CNT, which this module decodes.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// Base of the PM1a event block (status u16, enable u16).
pub const PM1A_EVT_PORT: u64 = 0x600;
/// Length of the PM1a event block.
pub const PM1A_EVT_LEN: u64 = 4;
/// PM1a control block (u16).
pub const PM1A_CNT_PORT: u64 = 0x604;
/// Length of the PM1a control block.
pub const PM1A_CNT_LEN: u64 = 2;
/// ACPI PM timer (24-bit, 3.579545 MHz).
pub const PM_TMR_PORT: u64 = 0x608;
/// Length of the PM timer block.
pub const PM_TMR_LEN: u64 = 4;
/// The sleep type our DSDT's `_S5_` names.
pub const S5_SLP_TYP: u16 = 5;
/// PM1_CNT.SLP_EN.
pub const SLP_EN: u16 = 1 << 13;
/// PM1_CNT.SCI_EN: we are always in ACPI mode (the FADT has no SMI command port).
pub const SCI_EN: u16 = 1;
/// The ACPI reset register (the PC's "reset control" port) and the value that resets.
pub const RESET_PORT: u64 = 0xcf9;
/// See [`RESET_PORT`].
pub const RESET_VALUE: u8 = 0x06;
/// The i8042's data and command ports (0x60..0x64; we model only the command port).
pub const I8042_PORT: u64 = 0x60;
/// The i8042 range covers 0x60..=0x64.
pub const I8042_LEN: u64 = 5;

/// Why the machine stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5, or KVM reported a shutdown system event).
    PowerOff,
    /// The guest asked for a reset (reset register, i8042, triple fault), or QMP
    /// `system_reset` did. The machine is gone either way: the caller builds a new one from
    /// the same [`Config`](super::Config) to reboot, or ends like QEMU's `-no-reboot`.
    Reset,
    /// A vCPU halted with nothing that could wake it (no in-kernel irqchip).
    Halted,
    /// A vCPU failed (KVM error, emulation failure); the cause was reported on stderr.
    Crashed,
    /// The VMM was asked to stop: a signal (SIGTERM, SIGINT, SIGHUP) or QMP `quit`
    /// ([`VmControl::request_shutdown`](super::control::VmControl::request_shutdown) records
    /// which, for the SHUTDOWN event). The caller ends the VMM.
    Terminated,
}

/// Shared by every device and vCPU: the first exit request wins; the main thread waits on `event`.
pub struct ExitSignal {
    state: AtomicU8,
    event: EventFd,
}

impl ExitSignal {
    /// A signal nobody has raised.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            state: AtomicU8::new(0),
            event: EventFd::new(libc::EFD_CLOEXEC)?,
        }))
    }

    /// Requests that the machine stop; later requests are ignored.
    pub fn raise(&self, reason: ExitReason) {
        let code = match reason {
            ExitReason::PowerOff => 1,
            ExitReason::Reset => 2,
            ExitReason::Halted => 3,
            ExitReason::Crashed => 4,
            ExitReason::Terminated => 5,
        };
        if self
            .state
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            // An eventfd write only fails on counter overflow, which one write cannot cause.
            let _ = self.event.write(1);
        }
    }

    /// The request, if any.
    pub fn get(&self) -> Option<ExitReason> {
        match self.state.load(Ordering::SeqCst) {
            1 => Some(ExitReason::PowerOff),
            2 => Some(ExitReason::Reset),
            3 => Some(ExitReason::Halted),
            4 => Some(ExitReason::Crashed),
            5 => Some(ExitReason::Terminated),
            _ => None,
        }
    }

    /// Blocks until some thread raises the signal.
    pub fn wait(&self) -> ExitReason {
        loop {
            if let Some(r) = self.get() {
                return r;
            }
            // EINTR and the like: just look again.
            let _ = self.event.read();
        }
    }
}

/// PM1_STS/PM1_EN bit 8: the fixed-feature power button (status is write-1-to-clear).
pub const PWRBTN: u16 = 1 << 8;

/// A level-triggered interrupt line the PM1 event block drives (the SCI).
pub trait IrqLine: Send + Sync {
    /// Asserts (`true`) or deasserts the line.
    fn set_level(&self, high: bool);
}

/// An interrupt line of the in-kernel irqchip, driven with `KVM_IRQ_LINE`.
pub struct KvmIrqLine {
    vm: Arc<kvm_ioctls::VmFd>,
    gsi: u32,
}

impl KvmIrqLine {
    /// The line `gsi` of `vm`'s irqchip.
    pub fn new(vm: Arc<kvm_ioctls::VmFd>, gsi: u32) -> Self {
        Self { vm, gsi }
    }
}

impl IrqLine for KvmIrqLine {
    fn set_level(&self, high: bool) {
        // KVM_IRQ_LINE only fails without an in-kernel irqchip or for a GSI beyond it; the
        // machine always creates the irqchip and the SCI is ISA IRQ 9, so there is nothing to
        // report at run time.
        let _ = self.vm.set_irq_line(self.gsi, high);
    }
}

/// The PM1a event block: PM1_STS (offset 0) and PM1_EN (offset 2).
///
/// The only event ever raised is the fixed-feature power button (QMP `system_powerdown`). The
/// SCI is a level interrupt, as ACPI defines it: it is asserted while any status bit is set
/// together with its enable bit, and dropped once the guest clears the status (write 1 to
/// clear) or the enable bit.
pub struct Pm1Event {
    status: u16,
    enable: u16,
    sci: Box<dyn IrqLine>,
    level: bool,
}

impl Pm1Event {
    /// An event block with nothing pending, driving `sci`.
    pub fn new(sci: Box<dyn IrqLine>) -> Self {
        Self {
            status: 0,
            enable: 0,
            sci,
            level: false,
        }
    }

    /// Presses the power button: sets PWRBTN_STS (raising the SCI if the guest enabled it).
    pub fn press_power_button(&mut self) {
        self.status |= PWRBTN;
        self.update_sci();
    }

    /// The status register as the guest reads it.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// Whether the SCI is asserted.
    pub fn sci_level(&self) -> bool {
        self.level
    }

    /// Drives the SCI from status and enable; the line is only touched on a change, so a
    /// guest polling the registers costs no ioctl.
    fn update_sci(&mut self) {
        let level = self.status & self.enable != 0;
        if level != self.level {
            self.level = level;
            self.sci.set_level(level);
        }
    }
}

impl BusDevice for Pm1Event {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = [self.status.to_le_bytes(), self.enable.to_le_bytes()].concat();
        fill_from(&regs, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        // Byte by byte, so any access width (ACPICA uses 16 bits, a dword covers both) works.
        for (i, v) in data.iter().enumerate() {
            let at = offset as usize + i;
            let shift = 8 * (at % 2);
            let bits = u16::from(*v) << shift;
            match at {
                // Status: write 1 to clear.
                0 | 1 => self.status &= !bits,
                2 | 3 => self.enable = (self.enable & !(0xff << shift)) | bits,
                _ => {}
            }
        }
        self.update_sci();
    }
}

/// The PM1a control register: decodes S5.
pub struct Pm1Control {
    value: u16,
    exit: Arc<ExitSignal>,
}

impl Pm1Control {
    /// A control register that raises `exit` on S5.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self {
            value: SCI_EN,
            exit,
        }
    }
}

impl BusDevice for Pm1Control {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        fill_from(&self.value.to_le_bytes(), offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut b = self.value.to_le_bytes();
        for (i, v) in data.iter().enumerate() {
            if let Some(slot) = b.get_mut(offset as usize + i) {
                *slot = *v;
            }
        }
        let v = u16::from_le_bytes(b);
        // SLP_EN is write-only: it triggers the transition and is never stored.
        self.value = (v & !SLP_EN) | SCI_EN;
        if v & SLP_EN != 0 && (v >> 10) & 7 == S5_SLP_TYP {
            self.exit.raise(ExitReason::PowerOff);
        }
    }
}

/// The ACPI PM timer: a free-running 24-bit counter at 3.579545 MHz.
pub struct PmTimer {
    start: Instant,
}

impl Default for PmTimer {
    fn default() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl BusDevice for PmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let ticks = self.start.elapsed().as_nanos() * 3_579_545 / 1_000_000_000;
        fill_from(&((ticks as u32) & 0xff_ffff).to_le_bytes(), offset, data);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Port 0xcf9: writing [`RESET_VALUE`] (the FADT's reset value) resets.
pub struct ResetPort {
    exit: Arc<ExitSignal>,
}

impl ResetPort {
    /// A reset port that raises `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for ResetPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        // Bit 2 starts the reset (bit 1 selects hard/soft, which makes no difference here).
        if data.first().is_some_and(|v| v & 0x04 != 0) {
            self.exit.raise(ExitReason::Reset);
        }
    }
}

/// Just enough of the i8042 for Linux's `reboot=k`: status reads "input buffer empty", and the
/// "pulse reset line" command (0xfe on port 0x64) resets.
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// An i8042 that raises `exit` on the reset command.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // 0x60: no data; 0x64: status 0 = output buffer empty, input buffer empty.
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.first() == Some(&0xfe) {
            self.exit.raise(ExitReason::Reset);
        }
    }
}

/// Copies the bytes of a little-endian register file at `offset` into `data` (0 beyond it).
fn fill_from(regs: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = regs.get(offset as usize + i).copied().unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_powers_off_and_other_sleep_types_do_not() {
        let exit = ExitSignal::new().unwrap();
        let mut cnt = Pm1Control::new(exit.clone());
        let mut v = [0u8; 2];
        cnt.read(0, &mut v);
        assert_eq!(u16::from_le_bytes(v) & SCI_EN, SCI_EN);
        // S3 (type 1 in many DSDTs; ours has no _S3_) with SLP_EN: ignored.
        cnt.write(0, &((1 << 10) | SLP_EN).to_le_bytes());
        assert_eq!(exit.get(), None);
        // S5 type without SLP_EN: just stored.
        cnt.write(0, &(S5_SLP_TYP << 10).to_le_bytes());
        assert_eq!(exit.get(), None);
        cnt.write(0, &((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes());
        assert_eq!(exit.get(), Some(ExitReason::PowerOff));
        // The first request wins.
        exit.raise(ExitReason::Reset);
        assert_eq!(exit.wait(), ExitReason::PowerOff);
    }

    #[test]
    fn s5_written_as_two_bytes_powers_off() {
        let exit = ExitSignal::new().unwrap();
        let mut cnt = Pm1Control::new(exit.clone());
        let v = ((S5_SLP_TYP << 10) | SLP_EN).to_le_bytes();
        cnt.write(0, &v[..1]);
        assert_eq!(exit.get(), None);
        cnt.write(1, &v[1..]);
        assert_eq!(exit.get(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn reset_paths() {
        let exit = ExitSignal::new().unwrap();
        let mut kbd = I8042::new(exit.clone());
        kbd.write(0, &[0xfe]);
        kbd.write(4, &[0xd1]);
        assert_eq!(exit.get(), None);
        kbd.write(4, &[0xfe]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));

        let exit = ExitSignal::new().unwrap();
        let mut rst = ResetPort::new(exit.clone());
        rst.write(0, &[0x02]);
        assert_eq!(exit.get(), None);
        rst.write(0, &[RESET_VALUE]);
        assert_eq!(exit.get(), Some(ExitReason::Reset));
    }

    /// An interrupt line that records its level changes.
    #[derive(Clone, Default)]
    struct FakeLine(Arc<std::sync::Mutex<Vec<bool>>>);
    impl IrqLine for FakeLine {
        fn set_level(&self, high: bool) {
            self.0.lock().unwrap().push(high);
        }
    }

    fn regs(ev: &mut Pm1Event) -> (u16, u16) {
        let mut b = [0u8; 4];
        ev.read(0, &mut b);
        (
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
        )
    }

    #[test]
    fn power_button_raises_a_level_sci_only_while_enabled_and_pending() {
        let line = FakeLine::default();
        let mut ev = Pm1Event::new(Box::new(line.clone()));
        assert_eq!(regs(&mut ev), (0, 0));
        // Pressed while disabled: the status is visible, the SCI stays low.
        ev.press_power_button();
        assert_eq!(regs(&mut ev), (PWRBTN, 0));
        assert!(line.0.lock().unwrap().is_empty());
        // Enabling with the status pending asserts the line (16-bit write at offset 2).
        ev.write(2, &PWRBTN.to_le_bytes());
        assert_eq!(regs(&mut ev), (PWRBTN, PWRBTN));
        assert_eq!(*line.0.lock().unwrap(), vec![true]);
        // Writing 0 to the status, or 1 to other bits, clears nothing.
        ev.write(0, &0u16.to_le_bytes());
        ev.write(0, &1u16.to_le_bytes());
        assert!(ev.sci_level());
        // Write 1 to clear: the line drops.
        ev.write(0, &PWRBTN.to_le_bytes());
        assert_eq!(regs(&mut ev), (0, PWRBTN));
        assert_eq!(*line.0.lock().unwrap(), vec![true, false]);
        // Pressed while enabled: asserted at once; disabling (byte write to the high byte of
        // PM1_EN) drops it although the status stays set.
        ev.press_power_button();
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true]);
        ev.write(3, &[0]);
        assert_eq!(regs(&mut ev), (PWRBTN, 0));
        assert_eq!(*line.0.lock().unwrap(), vec![true, false, true, false]);
        // A dword write covering both registers: clear the status and enable again.
        let mut dword = PWRBTN.to_le_bytes().to_vec();
        dword.extend_from_slice(&PWRBTN.to_le_bytes());
        ev.write(0, &dword);
        assert_eq!(regs(&mut ev), (0, PWRBTN));
        assert!(!ev.sci_level());
        // Byte write of the status' high byte clears bit 8 too.
        ev.press_power_button();
        assert!(ev.sci_level());
        ev.write(1, &[1]);
        assert_eq!(ev.status(), 0);
        assert!(!ev.sci_level());
    }

    #[test]
    fn pm_timer_counts_up_within_24_bits() {
        let mut t = PmTimer::default();
        let mut a = [0u8; 4];
        t.read(0, &mut a);
        assert!(u32::from_le_bytes(a) <= 0xff_ffff);
    }
}
