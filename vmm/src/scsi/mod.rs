//! SCSI target emulation over the engine's images: the command set Linux's sd and sr drivers
//! use (SPC-4/SBC-3/MMC-6 subsets), independent of the transport that carries the commands
//! (virtio-scsi today).
//!
//! A [`Lun`] is a disk or a CD-ROM drive with removable media; [`Target`] holds the LUNs of
//! one target and answers REPORT LUNS. Commands run synchronously on the caller's thread;
//! data moves through [`DataOut`] and [`DataIn`] in bounded chunks.

mod cdb;
pub mod lun;
mod sense;

pub use lun::{Lun, LunKind, LunOptions};
pub use sense::Sense;

/// SCSI status: the command completed.
pub const GOOD: u8 = 0x00;
/// SCSI status: sense data describes what went wrong.
pub const CHECK_CONDITION: u8 = 0x02;

/// The data the initiator sends with a command (a write's blocks, a parameter list).
pub trait DataOut {
    /// Bytes available.
    fn len(&self) -> u64;
    /// Whether there are none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes starting `offset` bytes in.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError>;
    /// Runs `f` on the initiator's own buffers for the `len` bytes starting `offset` bytes
    /// in, so that they can be written out without a copy; `false`, without calling `f`,
    /// when they cannot be handed out (the caller then uses [`DataOut::read_at`]).
    fn gather(&self, _offset: u64, _len: u64, _f: &mut dyn FnMut(&[std::io::IoSlice<'_>])) -> bool {
        false
    }
}

/// Where the command's data for the initiator goes (a read's blocks, INQUIRY's answer).
pub trait DataIn {
    /// Bytes of room.
    fn len(&self) -> u64;
    /// Whether there is none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf` in, starting `offset` bytes in.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), TransferError>;
    /// Runs `f` on the initiator's own buffers for the `len` bytes starting `offset` bytes
    /// in, so that data can be read into them without a copy; `false`, without calling `f`,
    /// when they cannot be handed out (the caller then uses [`DataIn::write_at`]).
    fn scatter(
        &self,
        _offset: u64,
        _len: u64,
        _f: &mut dyn FnMut(&mut [std::io::IoSliceMut<'_>]),
    ) -> bool {
        false
    }
}

/// The initiator's buffers could not be accessed (outside its memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferError;

/// No data.
pub struct NoData;

impl DataOut for NoData {
    fn len(&self) -> u64 {
        0
    }
    fn read_at(&self, _: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(TransferError)
        }
    }
}

impl DataIn for NoData {
    fn len(&self) -> u64 {
        0
    }
    fn write_at(&self, _: u64, buf: &[u8]) -> Result<(), TransferError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(TransferError)
        }
    }
}

impl DataOut for &[u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), TransferError> {
        let start = usize::try_from(offset).map_err(|_| TransferError)?;
        let src = self.get(start..start + buf.len()).ok_or(TransferError)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl DataIn for std::cell::RefCell<Vec<u8>> {
    fn len(&self) -> u64 {
        self.borrow().len() as u64
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), TransferError> {
        let start = usize::try_from(offset).map_err(|_| TransferError)?;
        let mut v = self.borrow_mut();
        let dst = v.get_mut(start..start + buf.len()).ok_or(TransferError)?;
        dst.copy_from_slice(buf);
        Ok(())
    }
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// GOOD or CHECK_CONDITION.
    pub status: u8,
    /// Sense data (with CHECK_CONDITION).
    pub sense: Option<Sense>,
    /// Bytes written to the data-in buffer.
    pub data_in: u64,
}

impl Outcome {
    /// Success with `data_in` bytes returned.
    pub fn good(data_in: u64) -> Self {
        Outcome {
            status: GOOD,
            sense: None,
            data_in,
        }
    }

    /// Failure described by `sense`.
    pub fn check(sense: Sense) -> Self {
        Outcome {
            status: CHECK_CONDITION,
            sense: Some(sense),
            data_in: 0,
        }
    }
}

/// The LUNs of one target.
#[derive(Debug, Default)]
pub struct Target {
    luns: Vec<(u16, std::sync::Arc<Lun>)>,
}

impl Target {
    /// Adds `lun` at number `n` (replacing one there).
    pub fn insert(&mut self, n: u16, lun: Lun) {
        self.luns.retain(|(m, _)| *m != n);
        self.luns.push((n, std::sync::Arc::new(lun)));
        self.luns.sort_by_key(|(m, _)| *m);
    }

    /// The LUN numbered `n`.
    pub fn lun(&self, n: u16) -> Option<&std::sync::Arc<Lun>> {
        self.luns.iter().find(|(m, _)| *m == n).map(|(_, l)| l)
    }

    /// Every LUN with its number.
    pub fn luns(&self) -> impl Iterator<Item = (u16, &std::sync::Arc<Lun>)> {
        self.luns.iter().map(|(n, l)| (*n, l))
    }

    /// Runs `cdb` for LUN `n`. REPORT LUNS is answered by the target whatever the LUN; other
    /// commands to a LUN that does not exist get LOGICAL UNIT NOT SUPPORTED.
    pub fn execute(&self, n: u16, cdb: &[u8], out: &dyn DataOut, din: &dyn DataIn) -> Outcome {
        if cdb.first() == Some(&cdb::REPORT_LUNS) {
            return self.report_luns(cdb, din);
        }
        match self.lun(n) {
            Some(lun) => lun.execute(cdb, out, din),
            None => Outcome::check(Sense::LUN_NOT_SUPPORTED),
        }
    }

    fn report_luns(&self, cdb: &[u8], din: &dyn DataIn) -> Outcome {
        if cdb.len() < 12 {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let alloc = u32::from_be_bytes(cdb[6..10].try_into().unwrap()) as usize;
        let mut list = Vec::with_capacity(8 + 8 * self.luns.len());
        list.extend_from_slice(&((8 * self.luns.len()) as u32).to_be_bytes());
        list.extend_from_slice(&[0; 4]);
        for (n, _) in &self.luns {
            // Flat addressing above 255, peripheral device addressing below (SAM-5).
            let first = if *n < 256 {
                [0, *n as u8]
            } else {
                [0x40 | (*n >> 8) as u8, *n as u8]
            };
            list.extend_from_slice(&first);
            list.extend_from_slice(&[0; 6]);
        }
        lun::reply(&list, alloc, din)
    }
}

#[cfg(test)]
mod tests;
