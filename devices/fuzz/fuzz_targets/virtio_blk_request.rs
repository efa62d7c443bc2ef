//! The virtio-blk request parser over an arbitrary descriptor list and guest memory.
//! Format: `devices::virtio::block::fuzzing::fuzz_request_parse`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::block::fuzzing::fuzz_request_parse(data);
});
