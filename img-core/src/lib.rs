//! The format-agnostic block layer.
//!
//! An image is a [`Format`] (raw, qcow2, ...) that *maps* guest offsets to places in storage and
//! *allocates* on write, plus an optional backing image. [`Image`] is the one access path that
//! performs reads, writes, write-zeroes and discards for every format and walks backing chains;
//! formats never run I/O loops of their own.

pub mod chain;
pub mod convert;
pub mod error;
pub mod format;
pub mod image;
pub mod locking;
pub mod open;
pub mod ops;
pub mod qcow2;
pub mod raw;
pub mod size;
pub mod vmdk;

pub use chain::BackingPolicy;
pub use error::{Error, Result};
pub use format::{Allocation, Extent, Format, FormatInfo, Mapping, ResizeOptions, ZeroMode};
pub use image::{BlockStatus, Image};
pub use locking::Usage;
pub use open::{open_image, probe_format, DetectZeroes, DiscardMode, OpenOptions};
