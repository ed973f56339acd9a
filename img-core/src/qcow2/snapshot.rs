//! Internal snapshots: the snapshot table (docs/interop/qcow2.rst, "Snapshots"), read and
//! written for everything that touches it (check's repairs, amend, the snapshot operations).

use super::header::MAX_L1_BYTES;
use super::l2::COPIED;
use super::snapshot_switch::{Switch, Tree};
use super::{Meta, Qcow2};
use crate::{Error, Result};
use std::sync::Arc;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Bytes of an entry before its extra data.
pub const ENTRY_HEADER: usize = 40;
/// Extra data bytes this version knows (VM state size, disk size, instruction count).
pub const KNOWN_EXTRA: usize = 24;
/// Extra data a version 3 image requires of every entry (VM state size and disk size).
pub const REQUIRED_EXTRA_V3: u32 = 16;
/// The largest extra data qemu accepts in an entry.
pub const MAX_EXTRA: u32 = 1024;
/// The largest snapshot table qemu accepts.
pub const MAX_TABLE: u64 = 64 << 20;

/// One entry, as it is written.
pub struct EntryRef<'a> {
    /// Offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries of that L1 table.
    pub l1_size: u32,
    /// The unique ID string.
    pub id: &'a [u8],
    /// The name (tag).
    pub name: &'a [u8],
    /// Creation time, seconds and nanoseconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (0: none).
    pub vm_state_size: u64,
    /// Extra data size as recorded (at least [`KNOWN_EXTRA`] is written).
    pub extra_data_size: u32,
    /// Virtual disk size at creation.
    pub disk_size: u64,
    /// Instruction count at creation (-1: none).
    pub icount: u64,
    /// Extra data past the fields this version knows, kept as read.
    pub unknown_extra: &'a [u8],
}

/// Appends `e` to `table`, aligned to 8 bytes as entries are.
pub fn push_entry(table: &mut Vec<u8>, e: &EntryRef) {
    table.resize(table.len().div_ceil(8) * 8, 0);
    let extra_size = (e.extra_data_size as usize).max(KNOWN_EXTRA);
    table.extend_from_slice(&e.l1_offset.to_be_bytes());
    table.extend_from_slice(&e.l1_size.to_be_bytes());
    table.extend_from_slice(&(e.id.len() as u16).to_be_bytes());
    table.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
    table.extend_from_slice(&e.date_sec.to_be_bytes());
    table.extend_from_slice(&e.date_nsec.to_be_bytes());
    table.extend_from_slice(&e.vm_clock_nsec.to_be_bytes());
    // A VM state too large for 32 bits reads as none to older readers.
    let small_vm_state = u32::try_from(e.vm_state_size).unwrap_or(0);
    table.extend_from_slice(&small_vm_state.to_be_bytes());
    table.extend_from_slice(&(extra_size as u32).to_be_bytes());
    table.extend_from_slice(&e.vm_state_size.to_be_bytes());
    table.extend_from_slice(&e.disk_size.to_be_bytes());
    table.extend_from_slice(&e.icount.to_be_bytes());
    table.extend_from_slice(e.unknown_extra);
    table.extend_from_slice(e.id);
    table.extend_from_slice(e.name);
}

/// One entry of the snapshot table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_offset: u64,
    /// Entries of that L1 table.
    pub l1_size: u32,
    /// The unique ID string.
    pub id: Vec<u8>,
    /// The name (tag).
    pub name: Vec<u8>,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (0: none).
    pub vm_state_size: u64,
    /// Extra data size as recorded.
    pub extra_data_size: u32,
    /// Virtual disk size at creation.
    pub disk_size: u64,
    /// Instruction count at creation (`u64::MAX`: none).
    pub icount: u64,
    /// Extra data past the fields known here, kept as it is.
    pub unknown_extra: Vec<u8>,
}

impl Snapshot {
    /// The entry as the table writer takes it.
    pub fn entry(&self) -> EntryRef<'_> {
        EntryRef {
            l1_offset: self.l1_offset,
            l1_size: self.l1_size,
            id: &self.id,
            name: &self.name,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            vm_state_size: self.vm_state_size,
            extra_data_size: self.extra_data_size,
            disk_size: self.disk_size,
            icount: self.icount,
            unknown_extra: &self.unknown_extra,
        }
    }
}

impl Qcow2 {
    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(self.read_snapshots()?.0)
    }

    /// Creates an internal snapshot named `name` of the disk as it is now (qemu-img
    /// snapshot -c): the active tables become the snapshot's, and every cluster they reach
    /// gains a reference, so later writes copy instead of overwriting. `date` is (seconds,
    /// nanoseconds) since the epoch.
    ///
    /// The whole change is one switch of the header (see `snapshot_switch`): a crash before
    /// it leaves the image as it was, after it the image with the snapshot.
    pub fn create_snapshot(&mut self, name: &str, date: (u32, u32)) -> Result<()> {
        self.check_writable()?;
        let (mut snapshots, table_size) = self.read_snapshots()?;
        let meta_arc = Arc::clone(&self.meta);
        let mut meta = meta_arc.lock().unwrap_or_else(|e| e.into_inner());
        let meta = &mut *meta;
        let active: Vec<u64> = meta.l1.clone();
        let next_id = snapshots
            .iter()
            .filter_map(|s| std::str::from_utf8(&s.id).ok()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        snapshots.push(Snapshot {
            // The active L1 table stays where it is, as the snapshot's; the active one moves.
            l1_offset: meta.l1_offset,
            l1_size: active.len() as u32,
            id: next_id.to_string().into_bytes(),
            name: name.as_bytes().to_vec(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra_data_size: KNOWN_EXTRA as u32,
            disk_size: self.header.size,
            icount: 0,
            unknown_extra: Vec::new(),
        });
        let gained = Tree {
            offset: meta.l1_offset,
            l1: &active,
        };
        self.switch_snapshots(
            meta,
            Switch {
                gained: Some(gained),
                lost: None,
                active: None,
                snapshots: &snapshots,
                old_table_size: table_size,
            },
        )
    }

    /// Reverts the disk to the snapshot whose ID, or else name, is `id_or_name` (qemu-img
    /// snapshot -a). [`Error::SnapshotNotFound`] when there is none.
    ///
    /// After a resize to the snapshot's disk size (when it differs), the change of the active
    /// tables is one switch of the header (see `snapshot_switch`): a crash before it leaves the
    /// disk as it was, after it the disk as the snapshot has it.
    pub fn apply_snapshot(&mut self, id_or_name: &str) -> Result<()> {
        self.check_writable()?;
        let (snapshots, table_size) = self.read_snapshots()?;
        let sn = snapshots
            .iter()
            .find(|s| s.id == id_or_name.as_bytes())
            .or_else(|| snapshots.iter().find(|s| s.name == id_or_name.as_bytes()))
            .cloned()
            .ok_or_else(|| Error::SnapshotNotFound {
                file: self.name().to_string(),
                name: id_or_name.to_string(),
            })?;
        if sn.disk_size != self.header.size {
            self.resize_to(sn.disk_size, &crate::format::ResizeOptions::default())?;
        }
        let snapshot_l1 = self.read_l1(sn.l1_offset, sn.l1_size)?;
        if snapshot_l1.len() > self.lock().l1.len() {
            self.grow_l1(snapshot_l1.len() as u64)?;
        }
        let meta_arc = Arc::clone(&self.meta);
        let mut meta = meta_arc.lock().unwrap_or_else(|e| e.into_inner());
        let old: Vec<u64> = meta.l1.clone();
        let new: Vec<u64> = (0..old.len())
            .map(|i| snapshot_l1.get(i).map_or(0, |e| e & !COPIED))
            .collect();
        let lost = Tree {
            offset: meta.l1_offset,
            l1: &old,
        };
        // The new active table is written anew: only what its entries reach counts.
        let gained = Tree {
            offset: 0,
            l1: &new,
        };
        self.switch_snapshots(
            &mut meta,
            Switch {
                gained: Some(gained),
                lost: Some(lost),
                active: Some(new.clone()),
                snapshots: &snapshots,
                old_table_size: table_size,
            },
        )
    }

    /// Deletes the first snapshot named `name` (qemu-img snapshot -d matches names only),
    /// freeing what only it used. [`Error::SnapshotNotFound`] when there is none.
    ///
    /// The whole change is one switch of the header (see `snapshot_switch`): a crash before
    /// it leaves the snapshot in place, after it the image without it.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<()> {
        self.check_writable()?;
        let (mut snapshots, table_size) = self.read_snapshots()?;
        let at = snapshots
            .iter()
            .position(|s| s.name == name.as_bytes())
            .ok_or_else(|| Error::SnapshotNotFound {
                file: self.name().to_string(),
                name: name.to_string(),
            })?;
        let sn = snapshots.remove(at);
        let snapshot_l1 = self.read_l1(sn.l1_offset, sn.l1_size)?;
        let meta_arc = Arc::clone(&self.meta);
        let mut meta = meta_arc.lock().unwrap_or_else(|e| e.into_inner());
        let lost = Tree {
            offset: sn.l1_offset,
            l1: &snapshot_l1,
        };
        self.switch_snapshots(
            &mut meta,
            Switch {
                gained: None,
                lost: Some(lost),
                active: None,
                snapshots: &snapshots,
                old_table_size: table_size,
            },
        )
    }

    /// Reads the snapshot table; returns its entries and its size in bytes.
    pub(super) fn read_snapshots(&self) -> Result<(Vec<Snapshot>, u64)> {
        let count = self.header.nb_snapshots;
        let start = self.header.snapshots_offset;
        let mut out = Vec::with_capacity(count.min(1024) as usize);
        let mut offset = start;
        let bad = |at: u64, why: String| Error::corrupt(self.name(), at, why);
        for i in 0..count {
            offset = offset.div_ceil(8) * 8;
            let mut h = [0u8; ENTRY_HEADER];
            self.file.read_at(&mut h, offset)?;
            let entry_at = offset;
            offset += ENTRY_HEADER as u64;
            let extra_data_size = be32(&h, 36);
            if extra_data_size > MAX_EXTRA {
                return Err(bad(
                    entry_at,
                    format!("Too much extra metadata in snapshot table entry {i}"),
                ));
            }
            let mut extra = vec![0u8; extra_data_size as usize];
            self.file.read_at(&mut extra, offset)?;
            offset += extra_data_size as u64;
            let known = extra.len().min(KNOWN_EXTRA);
            let id_len = be16(&h, 12) as usize;
            let name_len = be16(&h, 14) as usize;
            let mut strings = vec![0u8; id_len + name_len];
            self.file.read_at(&mut strings, offset)?;
            offset += strings.len() as u64;
            if offset - start > MAX_TABLE {
                return Err(bad(start, "Snapshot table is too big".into()));
            }
            // The L1 table's place is checked where it is used ([`Qcow2::read_l1`]): as in
            // qemu, one bad entry does not hide the others.
            let l1_size = be32(&h, 8);
            let l1_offset = be64(&h, 0);
            out.push(Snapshot {
                l1_offset,
                l1_size,
                id: strings[..id_len].to_vec(),
                name: strings[id_len..].to_vec(),
                date_sec: be32(&h, 16),
                date_nsec: be32(&h, 20),
                vm_clock_nsec: be64(&h, 24),
                vm_state_size: if known >= 8 {
                    be64(&extra, 0)
                } else {
                    be32(&h, 32) as u64
                },
                extra_data_size,
                disk_size: if known >= 16 {
                    be64(&extra, 8)
                } else {
                    self.header.size / 512 * 512
                },
                icount: if known >= 24 {
                    be64(&extra, 16)
                } else {
                    u64::MAX
                },
                unknown_extra: extra[known..].to_vec(),
            });
        }
        Ok((out, offset - start))
    }

    /// Writes the snapshot table anew (every entry with the extra data version 3 needs) into
    /// fresh clusters, switches the header to it once it is durable, and frees the old one.
    pub(super) fn write_snapshots(
        &mut self,
        meta: &mut Meta,
        snapshots: &[Snapshot],
        old_size: u64,
    ) -> Result<()> {
        let mut table = Vec::new();
        for sn in snapshots {
            push_entry(&mut table, &sn.entry());
        }
        let file = Arc::clone(&self.file);
        let file = file.as_ref();
        let size = table.len() as u64;
        let clusters = size.div_ceil(self.cs());
        let first = meta.refcounts.alloc(file, clusters)?;
        let offset = first << self.cluster_bits;
        // The table and its refcounts are durable before the header points at it.
        meta.refcounts.flush(file)?;
        file.write_at(&table, offset)?;
        file.flush()?;
        let mut hdr = [0u8; 12];
        hdr[..4].copy_from_slice(&(snapshots.len() as u32).to_be_bytes());
        hdr[4..].copy_from_slice(&offset.to_be_bytes());
        file.write_at(&hdr, 60)?;
        file.flush()?;
        let old = self.header.snapshots_offset;
        self.header.snapshots_offset = offset;
        if old_size > 0 {
            // As qemu, the freed table is discarded.
            let first_old = old >> self.cluster_bits;
            let last_old = (old + old_size - 1) >> self.cluster_bits;
            for c in first_old..=last_old {
                if self.release_now(meta, c)? {
                    file.discard(c << self.cluster_bits, self.cs())?;
                }
            }
            meta.refcounts.flush(file)?;
            file.flush()?;
        }
        Ok(())
    }

    /// Drops one reference to `cluster` at once (for clusters nothing points at any more, or
    /// never did); returns whether it became free.
    pub(super) fn release_now(&self, meta: &mut Meta, cluster: u64) -> Result<bool> {
        let file = self.file.as_ref();
        let rc = meta.refcounts.get(file, cluster)?;
        if rc == 0 {
            return Err(Error::corrupt(
                self.name(),
                cluster << self.cluster_bits,
                format!("freeing cluster {cluster}, whose refcount is already 0"),
            ));
        }
        meta.refcounts.set(file, cluster, rc - 1)?;
        Ok(rc == 1)
    }

    /// Reads the L1 table of a snapshot.
    pub(super) fn read_l1(&self, offset: u64, entries: u32) -> Result<Vec<u64>> {
        let bytes = entries as u64 * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::invalid(self.name(), "Snapshot L1 table too large"));
        }
        if i64::MAX as u64 - bytes < offset || !offset.is_multiple_of(self.cs()) {
            return Err(Error::invalid(
                self.name(),
                "Snapshot L1 table offset invalid",
            ));
        }
        let mut raw = vec![0u8; bytes as usize];
        self.file.read_at(&mut raw, offset)?;
        Ok(raw.chunks_exact(8).map(|c| be64(c, 0)).collect())
    }
}
