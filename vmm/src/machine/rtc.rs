//! A CMOS stub at ports 0x70/0x71: an index register and zero data.
//!
//! Linux reads the RTC at boot and polls "update in progress" in register A; an empty bus reads
//! 0xff, which says an update never ends. Zero reads as a valid, idle clock at 2000-00-00.

use super::bus::BusDevice;

/// The CMOS index and data ports.
pub const CMOS_PORT: u64 = 0x70;
/// Index and data.
pub const CMOS_LEN: u64 = 2;

/// The stub.
#[derive(Default)]
pub struct Cmos {
    index: u8,
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1 {
            // Register D bit 7: "valid RAM and time"; everything else reads as zero.
            if self.index & 0x7f == 0x0d {
                data[0] = 0x80;
            }
        } else if let Some(d) = data.first_mut() {
            *d = self.index;
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(v) = data.first() {
                self.index = *v;
            }
        }
    }
}
