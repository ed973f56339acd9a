//! Whole-image operations built on the generic [`Image`](crate::Image) access path.

pub mod compare;
pub mod measure;
pub mod status;
