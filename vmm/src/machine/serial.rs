//! The 16550 UART on COM1 (port 0x3f8, IRQ 4), built on vm-superio.
//!
//! The UART raises its interrupt by writing an eventfd that KVM injects as GSI 4 through an
//! irqfd, so a vCPU thread never has to call into KVM to deliver it.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;

/// COM1's base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA interrupt.
pub const COM1_IRQ: u32 = 4;
/// The UART's register window.
pub const COM1_LEN: u64 = 8;

/// An interrupt line backed by an eventfd (registered with KVM as an irqfd).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's console output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// The UART as a PIO bus device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SerialOut>,
}

impl SerialDevice {
    /// A UART whose interrupt is `irq` and whose transmitter writes to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&byte), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // A failed console write (a closed stdout) must not stop the guest; vm-superio
            // reports it, and there is nobody to tell.
            let _ = self.uart.write(off, byte);
            if off == 0 {
                // The guest sees a character as sent once it reaches us: flush so a console
                // read by a person or a test is never behind the guest.
                let _ = self.uart.writer_mut().flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer that test code can read back.
    #[derive(Clone, Default)]
    pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_and_raises_the_interrupt_when_enabled() {
        let out = SharedBuf::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt.try_clone().unwrap(), Box::new(out.clone()));
        for b in b"ok\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"ok\n");
        // No interrupt without IER.THRE.
        assert!(evt.read().is_err());
        // Enable the "transmitter holding register empty" interrupt (IER bit 1).
        dev.write(1, &[0x02]);
        dev.write(0, b"!");
        assert!(evt.read().unwrap() >= 1);
        // LSR (offset 5) says the transmitter is empty: THRE and TEMT.
        let mut lsr = [0u8; 1];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }
}
