//! The format layer: virtual cluster → file offset.
//!
//! A format is handed an I/O backend ([`ploop_io::BlockIo`]) and never opens
//! files itself. This crate holds no `unsafe`.
#![forbid(unsafe_code)]

pub mod descriptor;
mod error;
pub mod ploop;
pub mod raw;

pub use error::{Error, Result};

/// Bytes in one sector: the unit of every size field on disk.
pub const SECTOR: u64 = 512;
