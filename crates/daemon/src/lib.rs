//! The mount daemon: a disk served to the kernel (FUSE + loop, or the
//! kernel's NBD client) and mounted, a control socket for online
//! operations, the registry of what is mounted, and the kernel tools it
//! runs (losetup, mount, mkfs, fsfreeze).

#![forbid(unsafe_code)]

pub mod control;
pub mod error;
pub mod kernel;
pub mod registry;
pub mod serve_control;
pub mod session;

pub use error::{Error, Result};
