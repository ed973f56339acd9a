//! Counters of what a disk did, shared by the device models.

use std::sync::atomic::AtomicU64;

/// Counters of what the device did, as QEMU's query-blockstats reports them.
#[derive(Debug, Default)]
pub struct BlockStats {
    /// Completed reads.
    pub reads: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Completed writes (zeroing included).
    pub writes: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Completed discards.
    pub discards: AtomicU64,
    /// Requests that ended with an I/O error.
    pub failed: AtomicU64,
}
