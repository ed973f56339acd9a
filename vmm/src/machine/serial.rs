//! The 16550 UART on COM1 (port 0x3f8, IRQ 4), built on vm-superio.
//!
//! The UART raises its interrupt by writing an eventfd that KVM injects as GSI 4 through an
//! irqfd, so a vCPU thread never has to call into KVM to deliver it.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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

/// Where the guest's console output goes. Shared, because a reboot builds a new machine (and
/// a new UART) that must keep writing to the same place.
pub type SerialOut = Arc<Mutex<dyn Write + Send>>;

/// Wraps any writer as a [`SerialOut`].
pub fn serial_out(w: impl Write + Send + 'static) -> SerialOut {
    Arc::new(Mutex::new(w))
}

/// The UART's view of a [`SerialOut`].
struct SharedOut(SerialOut);

impl SharedOut {
    fn lock(&self) -> MutexGuard<'_, dyn Write + Send + 'static> {
        // A writer whose holder panicked is still a writer; the console must keep going.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lock().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.lock().flush()
    }
}

/// The UART as a PIO bus device.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, vm_superio::serial::NoEvents, SharedOut>,
}

impl SerialDevice {
    /// A UART whose interrupt is `irq` and whose transmitter writes to `out`.
    pub fn new(irq: EventFd, out: SerialOut) -> Self {
        Self {
            uart: Serial::new(EventFdTrigger(irq), SharedOut(out)),
        }
    }
}

impl SerialDevice {
    /// Queues bytes the guest will read from the receive buffer (raising the "data available"
    /// interrupt if enabled); returns how many fit (0 when the FIFO is full).
    pub fn enqueue(&mut self, input: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(input).unwrap_or(0)
    }
}

/// The VMM's stdin feeding COM1: one reader thread for the life of the VMM, delivering to
/// whichever machine is current. A reboot replaces the machine (and its UART) while input may be
/// arriving; input read while no machine is attached waits for the next one.
pub struct SerialInput {
    target: Mutex<Option<Arc<Mutex<SerialDevice>>>>,
}

impl SerialInput {
    /// Starts the reader thread on `input`. It ends at EOF or on a read error.
    pub fn spawn(mut input: Box<dyn Read + Send>) -> std::io::Result<Arc<Self>> {
        let me = Arc::new(Self {
            target: Mutex::new(None),
        });
        let feed = Arc::clone(&me);
        std::thread::Builder::new()
            .name("serial-in".into())
            .spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = input.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut rest = &buf[..n];
                    while !rest.is_empty() {
                        let sent = feed.deliver(rest);
                        rest = &rest[sent..];
                        if sent == 0 {
                            // The guest reads slower than we type or paste (or no machine is
                            // attached during a reboot); it polls or takes the interrupt at its
                            // own pace, so poll gently.
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
            })?;
        Ok(me)
    }

    /// Makes `dev` the UART that receives the input.
    pub fn attach(&self, dev: Arc<Mutex<SerialDevice>>) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = Some(dev);
    }

    /// Stops delivering (the machine is going away).
    pub fn detach(&self) {
        *self.target.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Queues what fits into the current UART; returns how many bytes it took.
    fn deliver(&self, bytes: &[u8]) -> usize {
        let target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        match target.as_ref() {
            Some(dev) => dev.lock().unwrap_or_else(|p| p.into_inner()).enqueue(bytes),
            None => 0,
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
    fn received_bytes_are_read_back_through_rbr_and_lsr() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt, serial_out(std::io::sink()));
        assert_eq!(dev.enqueue(b"hi"), 2);
        let mut b = [0u8; 1];
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 1, "LSR.DR");
        dev.read(0, &mut b);
        assert_eq!(b[0], b'h');
        dev.read(0, &mut b);
        assert_eq!(b[0], b'i');
        dev.read(5, &mut b);
        assert_eq!(b[0] & 1, 0);
        // The FIFO is bounded: a long input is only partly taken.
        let big = [b'x'; 1000];
        let n = dev.enqueue(&big);
        assert!(n > 0 && n < big.len());
        assert_eq!(dev.enqueue(&big), 0);
    }

    #[test]
    fn transmits_and_raises_the_interrupt_when_enabled() {
        let out = SharedBuf::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(evt.try_clone().unwrap(), serial_out(out.clone()));
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
