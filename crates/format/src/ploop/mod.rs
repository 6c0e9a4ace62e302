//! The ploop image format (byte-compatible with OpenVZ ploop and qemu's
//! `parallels` driver).

mod bat;
pub mod cbt;
pub mod check;
pub mod compact;
pub mod convert;
mod delta;
pub mod ext;
mod free;
pub mod header;
pub mod resize;

pub use bat::{scan_bat, BatProblem};
pub use delta::{CreateOptions, FillFn, MappingPin, Move, OpenFlags, PloopDelta, META_PAGE};
pub use header::{entry_to_offset, offset_to_entry};
pub use header::{Header, RawHeader, Version, MIN_CLUSTER_SECTORS};

/// True if the first bytes of a file carry a ploop signature.
pub fn has_signature(first: &[u8]) -> bool {
    first.len() >= 16
        && (first[..16] == header::SIGNATURE_V1 || first[..16] == header::SIGNATURE_V2)
}
