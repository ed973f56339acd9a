//! Port-I/O and MMIO buses: devices registered by address range, looked up on every exit.
//!
//! One `Bus` type serves both address spaces; the machine owns one for PIO (16-bit ports) and one
//! for MMIO. Devices are shared with the vCPU threads behind a `Mutex`; a device sees the offset of
//! the access within its range, so the same model can be mapped at any base (virtio-mmio and PCI
//! BARs will be registered the same way).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` within the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` within the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever created it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Registering a range that overlaps another, or is empty.
#[derive(Debug, thiserror::Error)]
#[error("bus range {base:#x}+{len:#x} is empty or overlaps a registered device")]
pub struct Overlap {
    /// Start of the refused range.
    pub base: u64,
    /// Its length.
    pub len: u64,
}

/// Devices by range: `base -> (len, device)`.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), Overlap> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Overlap { base, len })?;
        if let Some((&b, &(l, _))) = self.devices.range(..end).next_back() {
            if b + l > base {
                return Err(Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    /// The device covering `addr`, with the offset of `addr` inside it.
    fn find(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let (&base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((dev, addr - base))
    }

    /// Dispatches a read; returns false (and fills `data` with 0xff, what an empty ISA bus
    /// returns) when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                lock(dev).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device is there (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((dev, off)) => {
                lock(dev).write(off, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a panicking vCPU thread already ends the VM,
/// and the other threads should still be able to flush their output.
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 1).unwrap();
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fd, &mut buf));
        assert_eq!(buf, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert!(bus.write(0x400, b"yz"));
        assert!(!bus.write(0x3f7, b"q"));
        assert!(!bus.write(0x401, b"q"));
        assert!(!bus.read(0x3f0, &mut buf));
        assert_eq!(buf, [0xff]);
        assert_eq!(a.lock().unwrap().writes, vec![(0, b"x".to_vec())]);
        assert_eq!(b.lock().unwrap().writes, vec![(0, b"yz".to_vec())]);
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(d.clone(), 0x100, 0x10).unwrap();
        assert!(bus.insert(d.clone(), 0x10f, 1).is_err());
        assert!(bus.insert(d.clone(), 0xf8, 0x9).is_err());
        assert!(bus.insert(d.clone(), 0x0, 0x1000).is_err());
        assert!(bus.insert(d.clone(), 0x200, 0).is_err());
        assert!(bus.insert(d.clone(), u64::MAX, 2).is_err());
        bus.insert(d.clone(), 0xf0, 0x10).unwrap();
        bus.insert(d, 0x110, 1).unwrap();
    }
}
