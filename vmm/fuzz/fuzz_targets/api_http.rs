//! The control API's HTTP request parser and router over arbitrary bytes from a client.
//! Entry point: `vmm::api::fuzz_api_request`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::api::fuzz_api_request(data);
});
