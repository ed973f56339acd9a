//! Whole-image operations built on the generic [`Image`](crate::Image) access path.

pub mod commit;
pub mod compare;
pub mod map;
pub mod measure;
pub mod partitions;
pub mod rebase;
pub mod status;
