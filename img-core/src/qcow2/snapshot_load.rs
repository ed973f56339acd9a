//! Reading a qcow2 image as one of its internal snapshots saw it (qemu's "temporarily load a
//! snapshot", behind `qemu-img convert -l` and `measure -l`): the snapshot's L1 table replaces
//! the active one in a read-only image, and every read then goes through it.
//!
//! As in qemu, the virtual size stays the image's current size: a snapshot taken before the
//! image grew reads as unallocated (or its backing file) past its own end.

use super::header::MAX_L1_BYTES;
use super::snapshot::Snapshot;
use super::Qcow2;
use crate::{Error, Image, Result};

/// Which internal snapshot to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotSelector {
    /// A snapshot ID or, when no snapshot has that ID, a name (`-l ID_OR_NAME`).
    IdOrName(String),
    /// The snapshot whose ID and name are those given; an absent one matches anything
    /// (`-l snapshot.id=ID,snapshot.name=NAME`).
    Match {
        /// The ID, if given.
        id: Option<String>,
        /// The name, if given.
        name: Option<String>,
    },
}

/// The part of a table string qemu sees: it keeps them as C strings, so an embedded NUL ends
/// them.
pub fn c_str(s: &[u8]) -> &[u8] {
    match s.iter().position(|&b| b == 0) {
        Some(end) => &s[..end],
        None => s,
    }
}

/// The index of the first snapshot in `list` whose ID and name match those given (qemu's
/// `find_snapshot_by_id_and_name`); with neither given, none matches.
pub fn find_by_id_and_name(
    list: &[Snapshot],
    id: Option<&str>,
    name: Option<&str>,
) -> Option<usize> {
    let is = |field: &[u8], want: Option<&str>| want.is_none_or(|w| c_str(field) == w.as_bytes());
    if id.is_none() && name.is_none() {
        return None;
    }
    list.iter()
        .position(|sn| is(&sn.id, id) && is(&sn.name, name))
}

/// The index of the snapshot `selector` names in `list`: for [`SnapshotSelector::IdOrName`] an
/// ID first, then a name, as qemu looks them up.
pub fn find(list: &[Snapshot], selector: &SnapshotSelector) -> Option<usize> {
    match selector {
        SnapshotSelector::IdOrName(s) => find_by_id_and_name(list, Some(s), None)
            .or_else(|| find_by_id_and_name(list, None, Some(s))),
        SnapshotSelector::Match { id, name } => {
            find_by_id_and_name(list, id.as_deref(), name.as_deref())
        }
    }
}

/// The highest offset qemu's block layer accepts in a request: reads of an L1 table beyond it
/// fail, where reads merely past the end of the file return zeros.
const MAX_REQUEST_END: u64 = (i64::MAX as u64) & !((1 << 30) - 1);

impl Qcow2 {
    /// Switches this read-only image to the L1 table of the snapshot `selector` names, so
    /// that reads return the disk as the snapshot saw it. Errors carry qemu's reasons:
    /// [`Error::SnapshotNotFound`] when no snapshot matches, [`Error::Invalid`] with "Snapshot
    /// L1 table too large", "Snapshot L1 table offset invalid" or "Failed to read l1 table
    /// for snapshot".
    pub fn load_snapshot(&mut self, selector: &SnapshotSelector) -> Result<()> {
        if !self.read_only {
            return Err(Error::InvalidArgument(
                "a snapshot can only be loaded into a read-only image".into(),
            ));
        }
        if let SnapshotSelector::Match {
            id: None,
            name: None,
        } = selector
        {
            return Err(Error::InvalidArgument(
                "snapshot_id and name are both NULL".into(),
            ));
        }
        let list = self.snapshots()?;
        let Some(index) = find(&list, selector) else {
            let name = match selector {
                SnapshotSelector::IdOrName(s) => s.clone(),
                SnapshotSelector::Match { id, name } => {
                    id.clone().or_else(|| name.clone()).unwrap_or_default()
                }
            };
            return Err(Error::SnapshotNotFound {
                file: self.name().to_string(),
                name,
            });
        };
        let sn = &list[index];
        let bytes = sn.l1_size as u64 * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::invalid(self.name(), "Snapshot L1 table too large"));
        }
        if i64::MAX as u64 - bytes < sn.l1_offset || !sn.l1_offset.is_multiple_of(self.cs()) {
            return Err(Error::invalid(
                self.name(),
                "Snapshot L1 table offset invalid",
            ));
        }
        let l1 = self.read_l1_zero_filled(sn.l1_offset, bytes)?;
        let mut meta = self.lock();
        meta.l1 = l1;
        meta.l1_offset = sn.l1_offset;
        Ok(())
    }

    /// Reads `bytes` of L1 table at `offset`; what lies past the end of the file reads as
    /// zeros (unallocated), as the block layer returns it to qemu.
    fn read_l1_zero_filled(&self, offset: u64, bytes: u64) -> Result<Vec<u64>> {
        let failed = || Error::invalid(self.name(), "Failed to read l1 table for snapshot");
        if offset + bytes > MAX_REQUEST_END {
            return Err(failed());
        }
        let mut raw = vec![0u8; bytes as usize];
        let file_size = self.file.size()?;
        let present = file_size.saturating_sub(offset).min(bytes) as usize;
        if present > 0 {
            self.file
                .read_at(&mut raw[..present], offset)
                .map_err(|_| failed())?;
        }
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }
}

/// Makes the read-only `image` read as the internal snapshot `selector` names (see
/// [`Qcow2::load_snapshot`]); formats without internal snapshots refuse with qemu's words.
pub fn load_snapshot(image: &mut Image, selector: &SnapshotSelector) -> Result<()> {
    let driver = image.format().driver();
    let name = image.file_name().to_string();
    let qcow2 = super::driver_of(image).ok_or_else(|| {
        Error::unsupported(
            &name,
            format!(
                "Block format '{driver}' used by device '' does not support temporarily \
                     loading internal snapshots"
            ),
        )
    })?;
    qcow2.load_snapshot(selector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(id: &str, name: &[u8]) -> Snapshot {
        Snapshot {
            l1_offset: 0,
            l1_size: 0,
            id: id.as_bytes().to_vec(),
            name: name.to_vec(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra_data_size: 24,
            disk_size: 0,
            icount: u64::MAX,
            unknown_extra: Vec::new(),
        }
    }

    #[test]
    fn lookups_as_qemu_makes_them() {
        let list = [sn("1", b"2"), sn("2", b"x"), sn("3", b"x\0tail")];
        let by = |s: &str| find(&list, &SnapshotSelector::IdOrName(s.into()));
        // An ID wins over a name.
        assert_eq!(by("2"), Some(1));
        assert_eq!(by("x"), Some(1));
        assert_eq!(by("nope"), None);
        let m = |id: Option<&str>, name: Option<&str>| {
            find(
                &list,
                &SnapshotSelector::Match {
                    id: id.map(Into::into),
                    name: name.map(Into::into),
                },
            )
        };
        assert_eq!(m(Some("3"), Some("x")), Some(2), "names end at a NUL");
        assert_eq!(m(Some("1"), Some("x")), None);
        assert_eq!(m(None, Some("2")), Some(0));
        assert_eq!(m(None, None), None);
    }
}
