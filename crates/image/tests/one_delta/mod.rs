//! A disk of one ploop delta on any I/O backend, for tests that drive the
//! chain directly.

use std::sync::Arc;

use ploop_format::ploop::{CreateOptions, OpenFlags, PloopDelta, Version};
use ploop_image::{Chain, Delta};
use ploop_io::SharedIo;

/// Write an empty version 2 delta.
pub fn create(io: SharedIo, virtual_size: u64, cluster_size: u64) {
    PloopDelta::create(
        io,
        CreateOptions {
            virtual_size,
            cluster_size,
            version: Version::V2,
            preallocate: false,
        },
    )
    .unwrap();
}

/// Open the delta writable (a dirty one is refused) as a one-layer chain.
pub fn open(io: SharedIo, virtual_size: u64, cluster_size: u64) -> (Chain, Arc<Delta>) {
    let delta = PloopDelta::open(
        io,
        OpenFlags {
            writable: true,
            allow_dirty: false,
        },
    )
    .unwrap();
    let top = Arc::new(Delta::Ploop(delta));
    let chain = Chain::new(vec![top.clone()], cluster_size, virtual_size).unwrap();
    (chain, top)
}
