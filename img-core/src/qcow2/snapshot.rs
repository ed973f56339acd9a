//! The snapshot table's on-disk entry layout (docs/interop/qcow2.rst, "Snapshots"), shared by
//! everything that writes the table (check's repairs, amend's version changes).

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
