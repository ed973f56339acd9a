//! One logical unit: a disk, or a CD-ROM drive whose medium can be ejected and changed.

use super::cdb::{self, *};
use super::{DataIn, DataOut, Outcome, Sense};
use crate::bounce::with_bounce;
use crate::stats::BlockStats;
use img_core::Image;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, RwLock};

/// What the LUN is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LunKind {
    /// A direct-access block device (SBC), as `scsi-hd`.
    Disk,
    /// A CD/DVD drive (MMC) with removable media, as `scsi-cd`; always read-only.
    Cdrom,
}

/// How a LUN is set up, apart from its medium.
#[derive(Debug, Clone)]
pub struct LunOptions {
    /// Disk or CD-ROM.
    pub kind: LunKind,
    /// Refuse writes (always so for a CD-ROM).
    pub read_only: bool,
    /// The unit serial number (VPD page 0x80), also used in the device identification.
    pub serial: String,
    /// Logical block size of a disk: 512 or 4096 (a CD-ROM's is 2048).
    pub block_size: u32,
    /// Offer UNMAP and WRITE SAME with UNMAP (thin provisioning).
    pub discard: bool,
}

impl Default for LunOptions {
    fn default() -> Self {
        LunOptions {
            kind: LunKind::Disk,
            read_only: false,
            serial: String::new(),
            block_size: 512,
            discard: true,
        }
    }
}

/// Most blocks one UNMAP descriptor or WRITE SAME may cover (1 GiB of 512-byte blocks): a
/// bound on how long one command holds its thread.
const MAX_UNMAP_BLOCKS: u64 = 1 << 21;
/// Most descriptors in one UNMAP parameter list.
const MAX_UNMAP_DESCRIPTORS: u64 = 256;

#[derive(Debug, Default)]
struct State {
    /// The medium changed since the initiator last looked: the next command gets UNIT
    /// ATTENTION.
    unit_attention: bool,
    /// PREVENT ALLOW MEDIUM REMOVAL is in force.
    removal_prevented: bool,
    /// The tray is open (CD-ROM).
    tray_open: bool,
}

/// A logical unit backed by an image (a CD-ROM may have none).
#[derive(Debug)]
pub struct Lun {
    options: LunOptions,
    /// Commands hold the read side while they run; changing the medium takes the write side.
    medium: RwLock<Option<Image>>,
    state: Mutex<State>,
    stats: BlockStats,
}

/// Why an eject was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EjectError {
    /// Only a CD-ROM has removable media.
    #[error("Device is not removable")]
    NotRemovable,
    /// The guest locked the tray.
    #[error("Device is locked")]
    Locked,
}

impl Lun {
    /// A LUN with `medium` (which a CD-ROM may lack).
    pub fn new(medium: Option<Image>, mut options: LunOptions) -> Self {
        if options.kind == LunKind::Cdrom {
            options.read_only = true;
            options.block_size = 2048;
            options.discard = false;
        }
        if options.read_only {
            options.discard = false;
        }
        let tray_open = medium.is_none() && options.kind == LunKind::Cdrom;
        Lun {
            options,
            medium: RwLock::new(medium),
            state: Mutex::new(State {
                tray_open,
                ..State::default()
            }),
            stats: BlockStats::default(),
        }
    }

    /// How the LUN was set up.
    pub fn options(&self) -> &LunOptions {
        &self.options
    }

    /// What the LUN has done so far.
    pub fn stats(&self) -> &BlockStats {
        &self.stats
    }

    /// Runs `f` on the medium with every command quiesced (the write side of the medium's
    /// lock), e.g. to take an internal snapshot; `None` without a medium.
    pub fn with_medium_mut<T>(&self, f: impl FnOnce(&mut Image) -> T) -> Option<T> {
        self.medium
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(f)
    }

    /// The medium's image name, if there is a medium.
    pub fn medium_name(&self) -> Option<String> {
        self.read_medium()
            .as_ref()
            .map(|i| i.file_name().to_string())
    }

    /// The medium's file name, format driver, backing depth and size, if there is one.
    pub fn describe(&self) -> Option<(String, String, usize, u64)> {
        self.read_medium().as_ref().map(|i| {
            (
                i.file_name().to_string(),
                i.format().driver().to_string(),
                i.chain().count() - 1,
                i.size(),
            )
        })
    }

    /// Whether the tray is open.
    pub fn is_tray_open(&self) -> bool {
        self.lock_state().tray_open
    }

    /// Whether the guest locked the tray.
    pub fn is_locked(&self) -> bool {
        self.lock_state().removal_prevented
    }

    /// Opens the tray and removes the medium, closing its image (QMP `eject`). Unless
    /// `force`, a tray the guest locked stays shut.
    pub fn eject(&self, force: bool) -> Result<Option<img_core::Result<()>>, EjectError> {
        if self.options.kind != LunKind::Cdrom {
            return Err(EjectError::NotRemovable);
        }
        {
            let mut st = self.lock_state();
            if st.removal_prevented && !force {
                return Err(EjectError::Locked);
            }
            st.tray_open = true;
            st.unit_attention = true;
        }
        let old = self
            .medium
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        Ok(old.map(Image::close))
    }

    /// Puts `medium` in the drive and closes the tray (QMP `blockdev-change-medium`); the
    /// guest sees UNIT ATTENTION, medium may have changed.
    pub fn change_medium(&self, medium: Image) -> Result<Option<img_core::Result<()>>, EjectError> {
        if self.options.kind != LunKind::Cdrom {
            return Err(EjectError::NotRemovable);
        }
        let old = self
            .medium
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .replace(medium);
        let mut st = self.lock_state();
        st.tray_open = false;
        st.unit_attention = true;
        Ok(old.map(Image::close))
    }

    /// Waits for the commands in flight, then flushes and closes the medium.
    pub fn close(&self) -> img_core::Result<()> {
        match self
            .medium
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(image) => image.close(),
            None => Ok(()),
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_medium(&self) -> std::sync::RwLockReadGuard<'_, Option<Image>> {
        self.medium.read().unwrap_or_else(|e| e.into_inner())
    }

    fn block_size(&self) -> u64 {
        u64::from(self.options.block_size)
    }

    /// Runs one command. Never panics on what the initiator sent.
    pub fn execute(&self, cdb: &[u8], out: &dyn DataOut, din: &dyn DataIn) -> Outcome {
        let Some(&op) = cdb.first() else {
            return Outcome::check(Sense::INVALID_OPCODE);
        };
        if cdb.len() < cdb::cdb_len(op).unwrap_or(usize::MAX) {
            return Outcome::check(Sense::INVALID_OPCODE);
        }
        // A changed medium is reported once, to the first command that is not an inquiry.
        if !matches!(op, INQUIRY | REQUEST_SENSE | REPORT_LUNS) {
            let mut st = self.lock_state();
            if st.unit_attention {
                st.unit_attention = false;
                return Outcome::check(Sense::MEDIUM_CHANGED);
            }
        }
        match op {
            INQUIRY => self.inquiry(cdb, din),
            REQUEST_SENSE => {
                // Sense is returned with each failed command (autosense), so nothing is
                // pending here.
                reply(&Sense::new(0, 0, 0).to_fixed(), usize::from(cdb[4]), din)
            }
            PREVENT_ALLOW_MEDIUM_REMOVAL => {
                self.lock_state().removal_prevented = cdb[4] & 1 != 0;
                Outcome::good(0)
            }
            START_STOP_UNIT => self.start_stop(cdb),
            GET_EVENT_STATUS_NOTIFICATION if self.is_cdrom() => self.event_status(cdb, din),
            GET_CONFIGURATION if self.is_cdrom() => self.configuration(cdb, din),
            MODE_SENSE_6 | MODE_SENSE_10 => self.mode_sense(cdb, din),
            _ => {
                let medium = self.read_medium();
                let Some(image) = medium.as_ref() else {
                    return Outcome::check(Sense::NO_MEDIUM);
                };
                self.with_medium(image, cdb, out, din)
            }
        }
    }

    fn is_cdrom(&self) -> bool {
        self.options.kind == LunKind::Cdrom
    }

    /// Blocks of the medium.
    fn blocks(&self, image: &Image) -> u64 {
        image.size() / self.block_size()
    }

    /// The commands that need a medium.
    fn with_medium(
        &self,
        image: &Image,
        cdb: &[u8],
        out: &dyn DataOut,
        din: &dyn DataIn,
    ) -> Outcome {
        match cdb[0] {
            TEST_UNIT_READY => Outcome::good(0),
            READ_CAPACITY_10 => {
                let last = self
                    .blocks(image)
                    .saturating_sub(1)
                    .min(u64::from(u32::MAX));
                let mut r = [0u8; 8];
                r[0..4].copy_from_slice(&(last as u32).to_be_bytes());
                r[4..8].copy_from_slice(&self.options.block_size.to_be_bytes());
                reply(&r, 8, din)
            }
            SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == SA_READ_CAPACITY_16 => {
                let mut r = [0u8; 32];
                r[0..8].copy_from_slice(&self.blocks(image).saturating_sub(1).to_be_bytes());
                r[8..12].copy_from_slice(&self.options.block_size.to_be_bytes());
                if self.options.discard {
                    r[14] = 0x80; // LBPME: thin provisioned, UNMAP honoured.
                }
                reply(&r, cdb::be32(&cdb[10..14]) as usize, din)
            }
            READ_6 | READ_10 | READ_16 => self.read(image, cdb, din),
            WRITE_6 | WRITE_10 | WRITE_16 => self.write(image, cdb, out),
            VERIFY_10 | VERIFY_16 => {
                let t = cdb::transfer(cdb);
                match self.range(image, t.lba, t.blocks) {
                    Ok(_) => Outcome::good(0),
                    Err(s) => Outcome::check(s),
                }
            }
            SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => match image.flush() {
                Ok(()) => {
                    self.stats.flushes.fetch_add(1, Ordering::Relaxed);
                    Outcome::good(0)
                }
                Err(e) => self.failed(Sense::TARGET_FAILURE, "flush", 0, &e),
            },
            UNMAP if !self.is_cdrom() => self.unmap(image, cdb, out),
            WRITE_SAME_10 | WRITE_SAME_16 if !self.is_cdrom() => self.write_same(image, cdb, out),
            READ_TOC if self.is_cdrom() => self.read_toc(image, cdb, din),
            _ => Outcome::check(Sense::INVALID_OPCODE),
        }
    }

    /// The byte range of `blocks` blocks from `lba`, if the medium holds it.
    fn range(&self, image: &Image, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
        let end = lba.checked_add(blocks).ok_or(Sense::LBA_OUT_OF_RANGE)?;
        if end > self.blocks(image) {
            return Err(Sense::LBA_OUT_OF_RANGE);
        }
        Ok((lba * self.block_size(), blocks * self.block_size()))
    }

    fn failed(&self, sense: Sense, what: &str, offset: u64, e: &img_core::Error) -> Outcome {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let name = self.medium_name().unwrap_or_default();
        eprintln!("img: {name}: guest SCSI {what} at byte {offset} failed: {e}");
        Outcome::check(sense)
    }

    fn read(&self, image: &Image, cdb: &[u8], din: &dyn DataIn) -> Outcome {
        let t = cdb::transfer(cdb);
        let (offset, len) = match self.range(image, t.lba, t.blocks) {
            Ok(r) => r,
            Err(s) => return Outcome::check(s),
        };
        // The initiator's buffer bounds the transfer; the transport reports the residue.
        let len = len.min(din.len());
        // Straight into the initiator's buffers when they can be handed out.
        let mut direct = None;
        if din.scatter(0, len, &mut |bufs| {
            direct = Some(image.read_vectored_at(bufs, offset))
        }) {
            if let Some(Err(e)) = direct {
                return self.failed(Sense::READ_ERROR, "read", offset, &e);
            }
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.stats.read_bytes.fetch_add(len, Ordering::Relaxed);
            return Outcome::good(len);
        }
        with_bounce(len, |buf| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                if let Err(e) = image.read_at(&mut buf[..n], offset + done) {
                    return self.failed(Sense::READ_ERROR, "read", offset + done, &e);
                }
                if din.write_at(done, &buf[..n]).is_err() {
                    return Outcome::check(Sense::TRANSFER_FAILED);
                }
                done += n as u64;
            }
            self.stats.reads.fetch_add(1, Ordering::Relaxed);
            self.stats.read_bytes.fetch_add(len, Ordering::Relaxed);
            Outcome::good(len)
        })
    }

    fn write(&self, image: &Image, cdb: &[u8], out: &dyn DataOut) -> Outcome {
        if self.options.read_only {
            return Outcome::check(Sense::WRITE_PROTECTED);
        }
        let t = cdb::transfer(cdb);
        let (offset, len) = match self.range(image, t.lba, t.blocks) {
            Ok(r) => r,
            Err(s) => return Outcome::check(s),
        };
        if out.len() < len {
            return Outcome::check(Sense::TRANSFER_FAILED);
        }
        // Straight from the initiator's buffers when they can be handed out.
        let mut direct = None;
        let written = if out.gather(0, len, &mut |bufs| {
            direct = Some(image.write_vectored_at(bufs, offset))
        }) {
            match direct {
                Some(Err(e)) => Err(self.failed(Sense::WRITE_ERROR, "write", offset, &e)),
                _ => Ok(()),
            }
        } else {
            self.write_bounced(image, out, offset, len)
        };
        if let Err(o) = written {
            return o;
        }
        if t.fua {
            if let Err(e) = image.flush() {
                return self.failed(Sense::WRITE_ERROR, "flush", offset, &e);
            }
        }
        self.stats.writes.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(len, Ordering::Relaxed);
        Outcome::good(0)
    }

    /// A write through the bounce buffer, a piece at a time.
    fn write_bounced(
        &self,
        image: &Image,
        out: &dyn DataOut,
        offset: u64,
        len: u64,
    ) -> Result<(), Outcome> {
        with_bounce(len, |buf| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                if out.read_at(done, &mut buf[..n]).is_err() {
                    return Err(Outcome::check(Sense::TRANSFER_FAILED));
                }
                if let Err(e) = image.write_at(&buf[..n], offset + done) {
                    return Err(self.failed(Sense::WRITE_ERROR, "write", offset + done, &e));
                }
                done += n as u64;
            }
            Ok(())
        })
    }

    fn unmap(&self, image: &Image, cdb: &[u8], out: &dyn DataOut) -> Outcome {
        if self.options.read_only {
            return Outcome::check(Sense::WRITE_PROTECTED);
        }
        if !self.options.discard {
            return Outcome::check(Sense::INVALID_OPCODE);
        }
        let list_len = cdb::be16(&cdb[7..9]).min(out.len());
        if list_len == 0 {
            return Outcome::good(0);
        }
        if list_len < 8 {
            return Outcome::check(Sense::PARAMETER_LENGTH);
        }
        let mut list = vec![0u8; list_len.min(8 + 16 * MAX_UNMAP_DESCRIPTORS) as usize];
        if out.read_at(0, &mut list).is_err() {
            return Outcome::check(Sense::TRANSFER_FAILED);
        }
        let desc_len = cdb::be16(&list[2..4]);
        if desc_len % 16 != 0 || 8 + desc_len > list_len {
            return Outcome::check(Sense::PARAMETER_LENGTH);
        }
        if desc_len / 16 > MAX_UNMAP_DESCRIPTORS {
            return Outcome::check(Sense::INVALID_PARAMETER);
        }
        let mut ranges = Vec::new();
        for d in list[8..8 + desc_len as usize].chunks_exact(16) {
            let (lba, blocks) = (cdb::be64(&d[0..8]), cdb::be32(&d[8..12]));
            if blocks > MAX_UNMAP_BLOCKS {
                return Outcome::check(Sense::INVALID_PARAMETER);
            }
            match self.range(image, lba, blocks) {
                Ok(r) => ranges.push(r),
                Err(s) => return Outcome::check(s),
            }
        }
        for (offset, len) in ranges {
            if let Err(e) = image.discard(offset, len) {
                return self.failed(Sense::TARGET_FAILURE, "unmap", offset, &e);
            }
            self.stats.discards.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::good(0)
    }

    fn write_same(&self, image: &Image, cdb: &[u8], out: &dyn DataOut) -> Outcome {
        if self.options.read_only {
            return Outcome::check(Sense::WRITE_PROTECTED);
        }
        let unmap = cdb[1] & 0x08 != 0;
        let (lba, blocks, no_data) = if cdb[0] == WRITE_SAME_10 {
            (cdb::be32(&cdb[2..6]), cdb::be16(&cdb[7..9]), false)
        } else {
            (
                cdb::be64(&cdb[2..10]),
                cdb::be32(&cdb[10..14]),
                cdb[1] & 0x01 != 0,
            )
        };
        if unmap && !self.options.discard {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        // No block count means the rest of the medium (SBC-3), bounded like any other.
        let blocks = if blocks == 0 {
            self.blocks(image).saturating_sub(lba)
        } else {
            blocks
        };
        if blocks > MAX_UNMAP_BLOCKS {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let (offset, len) = match self.range(image, lba, blocks) {
            Ok(r) => r,
            Err(s) => return Outcome::check(s),
        };
        let mut block = vec![0u8; self.block_size() as usize];
        if !no_data && out.read_at(0, &mut block).is_err() {
            return Outcome::check(Sense::TRANSFER_FAILED);
        }
        if block.iter().all(|&b| b == 0) {
            return match image.write_zeroes(offset, len, unmap) {
                Ok(()) => Outcome::good(0),
                Err(e) => self.failed(Sense::WRITE_ERROR, "write same", offset, &e),
            };
        }
        with_bounce(len, |buf| {
            let bs = block.len();
            let usable = buf.len() / bs * bs;
            for (i, b) in buf[..usable].iter_mut().enumerate() {
                *b = block[i % bs];
            }
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(usable as u64) as usize;
                if let Err(e) = image.write_at(&buf[..n], offset + done) {
                    return self.failed(Sense::WRITE_ERROR, "write same", offset + done, &e);
                }
                done += n as u64;
            }
            Outcome::good(0)
        })
    }

    fn start_stop(&self, cdb: &[u8]) -> Outcome {
        let (load_eject, start) = (cdb[4] & 0x02 != 0, cdb[4] & 0x01 != 0);
        if !load_eject || !self.is_cdrom() {
            return Outcome::good(0);
        }
        let mut st = self.lock_state();
        if start {
            st.tray_open = false;
        } else if st.removal_prevented {
            return Outcome::check(Sense::REMOVAL_PREVENTED);
        } else {
            // The guest opens the tray; the medium stays in it, as with a real drive.
            st.tray_open = true;
        }
        Outcome::good(0)
    }

    fn inquiry(&self, cdb: &[u8], din: &dyn DataIn) -> Outcome {
        let alloc = cdb::be16(&cdb[3..5]) as usize;
        let evpd = cdb[1] & 1 != 0;
        let page = cdb[2];
        let peripheral = if self.is_cdrom() { 0x05 } else { 0x00 };
        if !evpd {
            if page != 0 {
                return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
            }
            let mut r = vec![0u8; 36];
            r[0] = peripheral;
            r[1] = if self.is_cdrom() { 0x80 } else { 0 };
            r[2] = 0x05; // SPC-3
            r[3] = 0x02; // response data format 2
            r[4] = 36 - 5;
            r[7] = 0x02; // CmdQue: commands are queued
            r[8..16].copy_from_slice(b"IMG     ");
            let product: &[u8; 16] = if self.is_cdrom() {
                b"IMG CD-ROM      "
            } else {
                b"IMG HARDDISK    "
            };
            r[16..32].copy_from_slice(product);
            r[32..36].copy_from_slice(b"0.1 ");
            return reply(&r, alloc, din);
        }
        let body: Vec<u8> = match page {
            0x00 => {
                let mut pages = vec![0x00, 0x80, 0x83];
                if !self.is_cdrom() {
                    pages.extend_from_slice(&[0xb0, 0xb1, 0xb2]);
                }
                pages
            }
            0x80 => self.serial().into_bytes(),
            0x83 => {
                // One designator: T10 vendor identification, ASCII.
                let id = format!("IMG     {}", self.serial());
                let mut d = vec![0x02, 0x01, 0x00, id.len() as u8];
                d.extend_from_slice(id.as_bytes());
                d
            }
            0xb0 if !self.is_cdrom() => {
                let mut b = vec![0u8; 0x3c];
                // Optimal transfer length granularity: one block; maximum transfer: 32 MiB.
                b[2..4].copy_from_slice(&1u16.to_be_bytes());
                let max_transfer = (32u64 << 20) / self.block_size();
                b[4..8].copy_from_slice(&(max_transfer as u32).to_be_bytes());
                if self.options.discard {
                    b[16..20].copy_from_slice(&(MAX_UNMAP_BLOCKS as u32).to_be_bytes());
                    b[20..24].copy_from_slice(&(MAX_UNMAP_DESCRIPTORS as u32).to_be_bytes());
                    b[24..28].copy_from_slice(&1u32.to_be_bytes());
                }
                b[32..40].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
                b
            }
            0xb1 if !self.is_cdrom() => {
                let mut b = vec![0u8; 0x3c];
                b[1] = 0x01; // medium rotation rate 1: not rotating
                b
            }
            0xb2 if !self.is_cdrom() => {
                let mut b = vec![0u8; 4];
                if self.options.discard {
                    b[1] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
                    b[2] = 0x02; // thin provisioned
                }
                b
            }
            _ => return Outcome::check(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut r = vec![peripheral, page];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(&body);
        reply(&r, alloc, din)
    }

    fn serial(&self) -> String {
        if self.options.serial.is_empty() {
            "0".into()
        } else {
            self.options.serial.chars().take(32).collect()
        }
    }

    fn mode_sense(&self, cdb: &[u8], din: &dyn DataIn) -> Outcome {
        let ten = cdb[0] == MODE_SENSE_10;
        let dbd = cdb[1] & 0x08 != 0 || self.is_cdrom();
        let (control, page) = (cdb[2] >> 6, cdb[2] & 0x3f);
        if control == 3 {
            // Saved values: saving parameters not supported.
            return Outcome::check(Sense::new(0x05, 0x39, 0x00));
        }
        let alloc = if ten {
            cdb::be16(&cdb[7..9]) as usize
        } else {
            usize::from(cdb[4])
        };
        let changeable = control == 1;
        let mut pages = Vec::new();
        let mut add = |p: u8| {
            let body: Vec<u8> = match p {
                // Caching: the write cache is on (the image is flushed on SYNCHRONIZE CACHE).
                0x08 if !self.is_cdrom() => {
                    let mut b = vec![0u8; 0x12];
                    b[0] = if changeable { 0 } else { 0x04 };
                    b
                }
                // Control: nothing beyond the defaults.
                0x0a => vec![0u8; 0x0a],
                // CD capabilities: reads CD-ROM media; tray with lock and eject.
                0x2a if self.is_cdrom() => {
                    let mut b = vec![0u8; 0x14];
                    if !changeable {
                        b[4] = 0x29; // lock, eject, tray-type loading
                    }
                    b
                }
                _ => return false,
            };
            pages.push(p);
            pages.push(body.len() as u8);
            pages.extend_from_slice(&body);
            true
        };
        if page == 0x3f {
            for p in [0x08, 0x0a, 0x2a] {
                add(p);
            }
        } else if !add(page) {
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let medium = self.read_medium();
        let mut desc = Vec::new();
        if !dbd {
            let blocks = medium
                .as_ref()
                .map_or(0, |i| self.blocks(i))
                .min(u64::from(u32::MAX));
            desc.extend_from_slice(&(blocks as u32).to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&self.options.block_size.to_be_bytes()[1..]);
        }
        let specific = if self.options.read_only && !self.is_cdrom() {
            0x80
        } else if self.is_cdrom() {
            0
        } else {
            0x10 // DPOFUA: FUA honoured
        };
        let mut r = Vec::new();
        if ten {
            let total = 8 + desc.len() + pages.len();
            r.extend_from_slice(&((total - 2) as u16).to_be_bytes());
            r.extend_from_slice(&[0, specific, 0, 0]);
            r.extend_from_slice(&(desc.len() as u16).to_be_bytes());
        } else {
            let total = 4 + desc.len() + pages.len();
            r.extend_from_slice(&[(total - 1) as u8, 0, specific, desc.len() as u8]);
        }
        r.extend_from_slice(&desc);
        r.extend_from_slice(&pages);
        reply(&r, alloc, din)
    }

    /// READ TOC: one data track and the lead-out (format 0), or the session information
    /// (format 1).
    fn read_toc(&self, image: &Image, cdb: &[u8], din: &dyn DataIn) -> Outcome {
        let msf = cdb[1] & 0x02 != 0;
        let format = cdb[2] & 0x0f;
        let alloc = cdb::be16(&cdb[7..9]) as usize;
        let address = |lba: u64| -> [u8; 4] {
            if msf {
                // Minutes, seconds, frames (75 a second), with the 2-second lead-in.
                let f = lba + 150;
                [
                    0,
                    (f / (75 * 60)) as u8,
                    (f / 75 % 60) as u8,
                    (f % 75) as u8,
                ]
            } else {
                (lba as u32).to_be_bytes()
            }
        };
        let mut r = vec![0, 0, 1, 1];
        match format {
            0 => {
                let track = cdb[6];
                if track > 1 && track != 0xaa {
                    return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
                }
                if track <= 1 {
                    r.extend_from_slice(&[0, 0x14, 1, 0]);
                    r.extend_from_slice(&address(0));
                }
                r.extend_from_slice(&[0, 0x14, 0xaa, 0]);
                r.extend_from_slice(&address(self.blocks(image)));
            }
            1 => {
                r.extend_from_slice(&[0, 0x14, 1, 0]);
                r.extend_from_slice(&address(0));
            }
            _ => return Outcome::check(Sense::INVALID_FIELD_IN_CDB),
        }
        let len = (r.len() - 2) as u16;
        r[0..2].copy_from_slice(&len.to_be_bytes());
        reply(&r, alloc, din)
    }

    /// GET CONFIGURATION: the feature header with the current profile (CD-ROM when a medium
    /// is loaded), and the profile list.
    fn configuration(&self, cdb: &[u8], din: &dyn DataIn) -> Outcome {
        let alloc = cdb::be16(&cdb[7..9]) as usize;
        let loaded = self.read_medium().is_some() && !self.is_tray_open();
        let current: u16 = if loaded { 0x0008 } else { 0 };
        let mut r = vec![0u8; 8];
        r[6..8].copy_from_slice(&current.to_be_bytes());
        // Feature 0: profile list, one profile (CD-ROM), current if loaded.
        r.extend_from_slice(&[0, 0, 0x03, 4, 0, 0x08, u8::from(loaded), 0]);
        let len = (r.len() - 4) as u32;
        r[0..4].copy_from_slice(&len.to_be_bytes());
        reply(&r, alloc, din)
    }

    /// GET EVENT STATUS NOTIFICATION (polled): the media class, with the medium's presence.
    fn event_status(&self, cdb: &[u8], din: &dyn DataIn) -> Outcome {
        if cdb[1] & 0x01 == 0 {
            // Only polled operation is supported.
            return Outcome::check(Sense::INVALID_FIELD_IN_CDB);
        }
        let alloc = cdb::be16(&cdb[7..9]) as usize;
        let wants_media = cdb[4] & 0x10 != 0;
        let present = self.read_medium().is_some();
        let open = self.is_tray_open();
        let r = if wants_media {
            let status = u8::from(open) | u8::from(present) << 1;
            vec![0, 6, 0x04, 0x10, 0, status, 0, 0]
        } else {
            // No supported class requested: NEA, with the classes we support.
            vec![0, 2, 0x80, 0x10]
        };
        reply(&r, alloc, din)
    }
}

/// Returns `data`, cut to the allocation length and the initiator's buffer.
pub(super) fn reply(data: &[u8], alloc: usize, din: &dyn DataIn) -> Outcome {
    let n = data.len().min(alloc).min(din.len() as usize);
    match din.write_at(0, &data[..n]) {
        Ok(()) => Outcome::good(n as u64),
        Err(_) => Outcome::check(Sense::TRANSFER_FAILED),
    }
}
