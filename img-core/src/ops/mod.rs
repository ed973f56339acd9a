//! Whole-image operations built on the generic [`Image`](crate::Image) access path.

pub mod compare;
pub mod commit;
pub mod map;
pub mod rebase;
pub mod status;
