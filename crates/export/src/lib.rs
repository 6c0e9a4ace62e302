//! The device layer: export a delta chain to the kernel as one file over
//! FUSE, put a loop device on it, and run the daemon that serves it with a
//! control socket for online operations; or serve it over NBD.

pub mod busy_poll;
pub mod control;
pub mod daemon;
pub mod fuse;
pub mod fuse_ring;
pub mod kernel;
pub mod nbd;
pub mod nbd_device;
pub mod online;
pub mod registry;
pub mod served;
pub mod uring;
