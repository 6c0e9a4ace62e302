//! A whole NBD client session from raw bytes: greeting reply, options,
//! then requests, against an in-memory ploop disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ploop_nbd::replay;

fuzz_target!(|data: &[u8]| {
    let export = replay::memory_export(false);
    let _ = replay::session(&export, data);
});
