//! The image layer: delta chains over the formats, and the operations that
//! reshape them (snapshot, merge, delete, switch, convert, check).
#![forbid(unsafe_code)]

pub mod chain;
pub mod disk;
pub mod ops;

pub use chain::{Chain, Delta, Plan, Segment};
pub use disk::{Disk, OpenOptions};
