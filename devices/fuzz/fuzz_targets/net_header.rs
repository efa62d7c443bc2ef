//! The virtio-net header of a transmitted frame and its checksum completion.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::net::fuzzing::fuzz_net_header(data);
});
