//! DHCPv6 messages straight to the NAT's server (no frame or checksums in the way), up
//! to 64 KiB. Format: `devices::virtio::net::fuzzing::fuzz_dhcp6`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devices::virtio::net::fuzzing::fuzz_dhcp6(data);
});
