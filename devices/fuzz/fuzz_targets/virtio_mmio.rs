//! A hostile driver on the virtio-mmio register interface, and migrated transport states
//! restored into it. Format: `devices::virtio::mmio_fuzzing`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::mmio_fuzzing::fuzz_mmio(data);
});
