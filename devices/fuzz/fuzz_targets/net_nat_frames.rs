//! Arbitrary guest frames through the user NAT (no host sockets: max_flows 0).
//! Format: `devices::virtio::net::fuzzing::fuzz_nat_frames`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::net::fuzzing::fuzz_nat_frames(data);
});
