//! The request parser and the commands: a client that negotiated
//! (structured replies or not, by the first byte) sends these bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ploop_nbd::replay;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let export = replay::memory_export(first & 2 != 0);
    let _ = replay::requests_session(&export, first & 1 != 0, rest);
});
