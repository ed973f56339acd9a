//! Host cache modes, as qemu names them (`-t`/`-T`, `cache=`).

/// How writes go through the host page cache and what a flush does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CacheMode {
    /// Page cache on; flush is fdatasync. qemu's default.
    #[default]
    Writeback,
    /// O_DIRECT: the page cache is bypassed; flush is fdatasync.
    None,
    /// Page cache on, every write is synchronous (O_DSYNC).
    Writethrough,
    /// O_DIRECT and O_DSYNC.
    Directsync,
    /// Page cache on and flushes ignored: fast, and unsafe if the host crashes.
    Unsafe,
}

impl CacheMode {
    /// Parses qemu's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "writeback" => CacheMode::Writeback,
            "none" | "off" => CacheMode::None,
            "writethrough" => CacheMode::Writethrough,
            "directsync" => CacheMode::Directsync,
            "unsafe" => CacheMode::Unsafe,
            _ => return None,
        })
    }

    /// Whether the page cache is bypassed (O_DIRECT).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether each write is durable when it completes (O_DSYNC).
    pub fn sync_writes(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }

    /// Whether flushes are skipped.
    pub fn ignores_flush(self) -> bool {
        self == CacheMode::Unsafe
    }
}
