//! A migration destination reading arbitrary bytes as a source's stream: header, sections,
//! pages and zero runs written into guest memory, shape and state parsed.
//! Entry point: `vmm::migration::stream::fuzz_read_stream`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::migration::stream::fuzz_read_stream(data);
});
