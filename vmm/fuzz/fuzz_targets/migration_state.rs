//! A migration destination restoring an arbitrary state section into devices: COM1 and the
//! virtio transports, which then serve (the vCPU and in-kernel device states go to KVM).
//! Entry point: `vmm::migration::state::fuzz_restore_state`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::migration::state::fuzz_restore_state(data);
});
