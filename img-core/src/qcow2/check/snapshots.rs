//! The snapshot table: read in check mode (reporting what cannot be right, and with `-r all`
//! dropping what cannot be kept), and written anew when it had to be repaired.

use super::{Checker, Fail, Fix, Res, Snapshot};
use crate::qcow2::header::MAX_SNAPSHOTS;
use std::borrow::Cow;

type R<T> = std::result::Result<T, Fail>;

use crate::qcow2::snapshot::{KNOWN_EXTRA, MAX_EXTRA, MAX_TABLE, REQUIRED_EXTRA_V3};
/// Bytes of a snapshot table entry's fixed part.
const ENTRY_HEADER: u64 = crate::qcow2::snapshot::ENTRY_HEADER as u64;

/// Offset of `nb_snapshots` in the header (followed by `snapshots_offset`).
const NB_SNAPSHOTS: u64 = 60;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Why the table could not be read: qemu's error text and hint, and the errno.
struct ReadError {
    message: String,
    hint: Option<String>,
    fail: Fail,
}

impl Checker<'_> {
    /// Reads the snapshot table as qemu's check does. Entries that do not fit are reported;
    /// with `-r all`, overhanging entries are dropped at once (the header's count is updated,
    /// leaking their clusters for the refcount check to free) and oversized extra data is cut
    /// (the table is rewritten after the refcount check).
    pub(super) fn read_snapshot_table(&mut self, sres: &mut Res, fix: Fix) -> R<()> {
        let mut count = self.sn_count;
        let mut reduced = 0u64;
        if count > MAX_SNAPSHOTS && fix.errors {
            self.msg(format!(
                "Discarding {} overhanging snapshots",
                count - MAX_SNAPSHOTS
            ));
            reduced += (count - MAX_SNAPSHOTS) as u64;
            count = MAX_SNAPSHOTS;
        }
        let invalid = if count > MAX_SNAPSHOTS {
            Some(("snapshot table too large", Fail::EFBIG))
        } else if (i64::MAX as u64) - count as u64 * ENTRY_HEADER < self.snapshots_offset
            || self.snapshots_offset & (self.cs - 1) != 0
        {
            Some(("snapshot table offset invalid", Fail::EINVAL))
        } else {
            None
        };
        if let Some((what, fail)) = invalid {
            sres.check_errors += 1;
            self.msg(format!("img: ERROR {what}"));
            if count > MAX_SNAPSHOTS {
                self.msg(format!(
                    "You can force-remove all {} overhanging snapshots with img check -r all",
                    count - MAX_SNAPSHOTS
                ));
            }
            self.sn_count = 0;
            self.snapshots_offset = 0;
            return Err(fail);
        }

        let mut dropped = 0u64;
        match self.read_entries(count, fix.errors, &mut reduced, &mut dropped) {
            Ok(()) => {}
            Err(e) => {
                sres.check_errors += 1;
                self.msg(format!(
                    "img: ERROR failed to read the snapshot table: {}",
                    e.message
                ));
                if let Some(h) = e.hint {
                    self.msg(h);
                }
                self.snapshots.clear();
                self.sn_count = 0;
                self.snapshots_offset = 0;
                self.snapshots_size = 0;
                return Err(e.fail);
            }
        }
        sres.corruptions += (reduced + dropped) as i64;
        if reduced > 0 {
            // The header must say what the refcount check will walk; the entries dropped
            // leak their clusters, which that check then frees.
            let n = self.snapshots.len() as u32;
            let written = self
                .write(&n.to_be_bytes(), NB_SNAPSHOTS)
                .and_then(|_| self.file.flush().map_err(Fail::from));
            if let Err(e) = written {
                sres.check_errors += 1;
                self.msg(format!(
                    "ERROR failed to update the snapshot count in the image header: {}",
                    e.text()
                ));
                return Err(e);
            }
            self.sn_count = n;
            sres.corruptions_fixed += reduced as i64;
            sres.corruptions -= reduced as i64;
        }
        if self.version >= 3 {
            let word = if fix.errors { "Repairing" } else { "ERROR" };
            for i in 0..self.snapshots.len() {
                if self.snapshots[i].extra_data_size < REQUIRED_EXTRA_V3 {
                    sres.corruptions += 1;
                    self.msg(format!("{word} snapshot table entry {i} is incomplete"));
                }
            }
        }
        Ok(())
    }

    /// Reads `count` entries; with `repair`, drops what does not fit instead of failing.
    fn read_entries(
        &mut self,
        count: u32,
        repair: bool,
        reduced: &mut u64,
        dropped: &mut u64,
    ) -> std::result::Result<(), ReadError> {
        let io = |e: Fail| ReadError {
            message: format!("Failed to read snapshot table: {}", e.text()),
            hint: None,
            fail: e,
        };
        self.snapshots.clear();
        let start = self.snapshots_offset;
        let mut offset = start;
        let mut table_len = 0u64;
        for i in 0..count {
            let entry_start = offset;
            table_len = table_len.div_ceil(8) * 8;
            offset = offset.div_ceil(8) * 8;
            let mut h = [0u8; ENTRY_HEADER as usize];
            self.read(&mut h, offset).map_err(io)?;
            offset += ENTRY_HEADER;
            let mut sn = Snapshot {
                l1_offset: be64(&h, 0),
                l1_size: be32(&h, 8),
                date_sec: be32(&h, 16),
                date_nsec: be32(&h, 20),
                vm_clock_nsec: be64(&h, 24),
                vm_state_size: be32(&h, 32) as u64,
                extra_data_size: be32(&h, 36),
                ..Default::default()
            };
            let id_len = be16(&h, 12) as usize;
            let name_len = be16(&h, 14) as usize;
            let mut truncate_extra = false;
            if sn.extra_data_size > MAX_EXTRA {
                if !repair {
                    return Err(ReadError {
                        message: format!("Too much extra metadata in snapshot table entry {i}"),
                        hint: Some(
                            "You can force-remove this extra metadata with img check -r all".into(),
                        ),
                        fail: Fail::EFBIG,
                    });
                }
                self.msg(format!(
                    "Discarding too much extra metadata in snapshot table entry {i} ({} > {MAX_EXTRA})",
                    sn.extra_data_size
                ));
                *dropped += 1;
                truncate_extra = true;
            }
            let known = (sn.extra_data_size as usize).min(KNOWN_EXTRA);
            let mut extra = [0u8; KNOWN_EXTRA];
            self.read(&mut extra[..known], offset).map_err(io)?;
            offset += known as u64;
            if known >= 8 {
                sn.vm_state_size = be64(&extra, 0);
            }
            sn.disk_size = if known >= 16 {
                be64(&extra, 8)
            } else {
                self.virtual_size.div_ceil(512) * 512
            };
            sn.icount = if known >= 24 {
                be64(&extra, 16)
            } else {
                u64::MAX
            };
            if sn.extra_data_size as usize > KNOWN_EXTRA {
                let extra_end = offset + sn.extra_data_size as u64 - KNOWN_EXTRA as u64;
                if truncate_extra {
                    sn.extra_data_size = MAX_EXTRA;
                }
                let mut unknown = vec![0u8; sn.extra_data_size as usize - KNOWN_EXTRA];
                self.read(&mut unknown, offset).map_err(io)?;
                sn.unknown_extra = unknown;
                offset = extra_end;
            }
            let mut strings = vec![0u8; id_len + name_len];
            self.read(&mut strings, offset).map_err(io)?;
            offset += strings.len() as u64;
            sn.id = c_string(&strings[..id_len]);
            sn.name = c_string(&strings[id_len..]);
            table_len += ENTRY_HEADER + sn.extra_data_size as u64 + (id_len + name_len) as u64;
            if table_len > MAX_TABLE || offset - start > i32::MAX as u64 {
                if !repair {
                    return Err(ReadError {
                        message: "Snapshot table is too big".into(),
                        hint: Some(format!(
                            "You can force-remove all {} overhanging snapshots with img check -r all",
                            count - i
                        )),
                        fail: Fail::EFBIG,
                    });
                }
                self.msg(format!(
                    "Discarding {} overhanging snapshots (snapshot table is too big)",
                    count - i
                ));
                *reduced += (count - i) as u64;
                offset = entry_start;
                break;
            }
            self.snapshots.push(sn);
        }
        self.snapshots_size = offset - start;
        Ok(())
    }

    /// With `-r all`, writes the snapshot table anew if reading it found anything wrong.
    pub(super) fn fix_snapshot_table(&mut self, sres: &mut Res, fix: Fix) -> R<()> {
        if sres.corruptions == 0 || !fix.errors {
            return Ok(());
        }
        if let Err(e) = self.write_snapshots() {
            sres.check_errors += 1;
            self.msg(format!(
                "ERROR failed to update snapshot table: {}",
                e.text()
            ));
            return Err(e);
        }
        sres.corruptions_fixed += sres.corruptions;
        sres.corruptions = 0;
        Ok(())
    }

    /// Writes the snapshot table into newly allocated clusters, switches the header to it
    /// after a flush, and frees the old table.
    fn write_snapshots(&mut self) -> R<()> {
        let mut table = Vec::new();
        for sn in &self.snapshots {
            crate::qcow2::snapshot::push_entry(
                &mut table,
                &crate::qcow2::snapshot::EntryRef {
                    l1_offset: sn.l1_offset,
                    l1_size: sn.l1_size,
                    id: sn.id.as_bytes(),
                    name: sn.name.as_bytes(),
                    date_sec: sn.date_sec,
                    date_nsec: sn.date_nsec,
                    vm_clock_nsec: sn.vm_clock_nsec,
                    vm_state_size: sn.vm_state_size,
                    extra_data_size: sn.extra_data_size,
                    disk_size: sn.disk_size,
                    icount: sn.icount,
                    unknown_extra: &sn.unknown_extra,
                },
            );
            if table.len() as u64 > MAX_TABLE {
                return Err(Fail::EFBIG);
            }
        }
        let size = table.len() as u64;
        let offset = self.alloc_clusters(size)?;
        let written = self
            .flush_refblocks()
            .and_then(|_| self.file.flush().map_err(Fail::from))
            .and_then(|_| self.pre_write_overlap_check(0, offset, size, false))
            .and_then(|_| self.write(&table, offset))
            .and_then(|_| self.file.flush().map_err(Fail::from));
        if let Err(e) = written {
            self.free_clusters(offset, size, false);
            return Err(e);
        }
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(self.snapshots.len() as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&offset.to_be_bytes());
        let switched = self
            .write(&hdr, NB_SNAPSHOTS)
            .and_then(|_| self.file.flush().map_err(Fail::from));
        if let Err(e) = switched {
            self.free_clusters(offset, size, false);
            return Err(e);
        }
        let (old_offset, old_size) = (self.snapshots_offset, self.snapshots_size);
        self.free_clusters(old_offset, old_size, true);
        self.sn_count = self.snapshots.len() as u32;
        self.snapshots_offset = offset;
        self.snapshots_size = size;
        Ok(())
    }

    /// Allocates clusters for `size` bytes through the stored refcounts: the first run of
    /// clusters with refcount 0. Growing the refcount structure is left to a later open; a
    /// run that would need a new refcount block fails.
    fn alloc_clusters(&mut self, size: u64) -> R<u64> {
        let n = size.div_ceil(self.cs);
        let mut next = 0u64;
        let mut run = 0u64;
        while run < n {
            let c = next;
            next += 1;
            if self.get_refcount(c)? != 0 {
                run = 0;
            } else {
                run += 1;
            }
        }
        let first = next - n;
        for c in first..next {
            if self.refblock_of(c)?.is_none() {
                return Err(Fail(Cow::Borrowed("No space left on device")));
            }
        }
        for c in first..next {
            self.set_refcount(c, 1)?;
        }
        Ok(first << self.cluster_bits)
    }

    /// Drops one reference from each cluster of the host range (all or nothing, as qemu
    /// rolls back a partial update), discarding clusters that become free when `discard`.
    fn free_clusters(&mut self, offset: u64, size: u64, discard: bool) {
        if size == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + size - 1) >> self.cluster_bits;
        let mut counts = Vec::new();
        for c in first..=last {
            match self.get_refcount(c) {
                Ok(rc) if rc > 0 && self.refblock_of(c).ok().flatten().is_some() => counts.push(rc),
                _ => {
                    self.msg("qcow2_free_clusters failed: Invalid argument".into());
                    return;
                }
            }
        }
        for (c, rc) in (first..=last).zip(counts) {
            if self.set_refcount(c, rc - 1).is_err() {
                return;
            }
            if rc == 1 && discard {
                let at = c << self.cluster_bits;
                if at < self.file_len {
                    let _ = self.file.discard(at, self.cs.min(self.file_len - at));
                }
            }
        }
    }
}

/// A name from the table, as C reads it: up to the first NUL.
fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}
