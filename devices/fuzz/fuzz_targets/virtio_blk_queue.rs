//! A hostile driver's virtio-blk queue: arbitrary descriptor table, avail ring and buffers,
//! served by the real device over an in-memory disk. Format: `devices::virtio::block::fuzzing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::block::fuzzing::fuzz_block_queue(data);
});
