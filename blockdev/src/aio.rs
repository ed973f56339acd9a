//! The I/O engine of a file, as qemu's `aio=` option names it.

/// How a file's reads and writes are issued.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Aio {
    /// Blocking positioned I/O from the calling threads (qemu's thread pool).
    #[default]
    Threads,
    /// Linux native AIO in qemu; requires O_DIRECT (cache=none or directsync), and opening
    /// without it fails with qemu's message. Here it runs on the io_uring engine.
    Native,
    /// io_uring: one ring per file, shared by all threads that use it. Where io_uring cannot be
    /// set up, the file quietly uses threads instead (qemu would fail to open it).
    IoUring,
}

impl Aio {
    /// Parses qemu's names.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "threads" => Aio::Threads,
            "native" => Aio::Native,
            "io_uring" => Aio::IoUring,
            _ => return None,
        })
    }

    /// qemu's name.
    pub fn name(self) -> &'static str {
        match self {
            Aio::Threads => "threads",
            Aio::Native => "native",
            Aio::IoUring => "io_uring",
        }
    }
}
