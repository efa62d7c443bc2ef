//! A hostile driver's virtio-rng queue: arbitrary descriptor table, avail ring and buffers,
//! served by the real device with a fixed-seed entropy source. Format:
//! `devices::virtio::rng::fuzzing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::rng::fuzzing::fuzz_rng_queue(data);
});
