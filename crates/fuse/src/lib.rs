//! The FUSE export: a disk shown as one file in a FUSE filesystem (a loop
//! device sits on it), served by /dev/fuse worker threads or by FUSE over
//! io_uring. The kernel's FUSE messages are typed structs in [`abi`].

pub mod abi;
pub mod file;
pub mod ring;
