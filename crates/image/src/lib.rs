//! The image layer: delta chains over the formats, and the operations that
//! reshape them (snapshot, merge, delete, switch, convert, check), offline
//! or on a disk being served.
#![forbid(unsafe_code)]

pub mod chain;
pub mod dirty;
pub mod disk;
pub mod gpt;
pub mod moves;
pub mod online;
pub mod ops;
pub mod served;
pub mod throttle;

pub use chain::{Chain, Delta, Plan};
pub use disk::{Disk, OpenOptions};
pub use ploop_io::Segment;
