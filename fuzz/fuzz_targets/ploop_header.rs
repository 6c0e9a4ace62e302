//! A ploop image from bytes: open it (header and BAT checks), read all of
//! it, and run check on it.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ploop_format::ploop::{check, OpenFlags, PloopDelta};
use ploop_io::{BlockIo, MemIo, SharedIo};

fuzz_target!(|data: &[u8]| {
    let io: SharedIo = Arc::new(MemIo::new("fuzz.hdd"));
    if io.write_at(data, 0).is_err() {
        return;
    }
    let flags = OpenFlags {
        writable: false,
        allow_dirty: true,
    };
    if let Ok(delta) = PloopDelta::open(io.clone(), flags) {
        let cs = delta.cluster_size().min(1 << 20) as usize;
        let mut buf = vec![0u8; cs];
        for cluster in 0..delta.clusters().min(64) {
            if let Some(off) = delta.map(cluster) {
                let _ = delta.read_data(&mut buf, off);
            }
        }
    }
    let _ = check::check(&io, false);
});
