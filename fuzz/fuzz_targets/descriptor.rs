//! DiskDescriptor.xml from bytes: parse, and walk every snapshot's chain.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ploop_format::descriptor::Descriptor;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = Descriptor::parse(text, "fuzz.xml") {
        for s in &d.snapshots {
            let _ = d.chain(s.guid, "fuzz.xml");
        }
        let _ = d.to_xml();
    }
});
