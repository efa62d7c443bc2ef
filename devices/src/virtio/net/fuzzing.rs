//! Fuzz entry points for virtio-net and the user NAT (devices/fuzz), also run as unit tests
//! over a few seeds.

use std::sync::Arc;

use super::backend::NetBackend;
use super::header::TxHeader;
use super::metrics::NetMetrics;
use super::user::{UserConfig, UserNet};

/// The virtio-net header of a transmitted frame: parse and finish (checksum completion) on
/// arbitrary bytes.
pub fn fuzz_net_header(data: &[u8]) {
    let Ok(header) = TxHeader::parse(data) else {
        return;
    };
    let mut frame = data[super::header::HDR_LEN..].to_vec();
    let _ = header.finish(&mut frame);
}

/// Guest frames through the NAT: `data` is a sequence of frames, each preceded by its length
/// (two bytes, little endian). The NAT has no flows (max_flows 0), so nothing reaches a host
/// socket; classification, DHCP, DHCPv6, router advertisements and the stack's gateway (ARP,
/// ICMP, TCP resets) all run. Whatever it answers must be a sane frame.
pub fn fuzz_nat_frames(data: &[u8]) {
    let config = UserConfig {
        max_flows: 0,
        ..Default::default()
    };
    let mut net = match UserNet::new(
        &config,
        [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        Arc::new(NetMetrics::default()),
    ) {
        Ok(n) => n,
        Err(_) => return,
    };
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let frame = &rest[..len.min(rest.len())];
        rest = &rest[frame.len()..];
        net.send(frame);
        net.flush();
        while let Some(out) = net.rx_peek() {
            assert!(
                out.len() >= 14 && out.len() <= super::device::MAX_FRAME,
                "{}",
                out.len()
            );
            net.rx_pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            out.extend_from_slice(&(f.len() as u16).to_le_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    #[test]
    fn fuzz_nat_seeds_run_clean() {
        // An ARP request for the gateway, a truncated IPv4 header, a junk frame.
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x08, 0x06]);
        arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        arp.extend_from_slice(&[10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 10, 0, 2, 1]);
        let mut short_ip = vec![
            0x52, 0x54, 0, 0x12, 0x35, 0x02, 0x52, 0x54, 0, 0x12, 0x34, 0x56,
        ];
        short_ip.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        fuzz_nat_frames(&framed(&[&arp, &short_ip, &[1, 2, 3]]));
        fuzz_nat_frames(&[0xff; 300]);
        fuzz_net_header(&[1, 0, 0, 0, 0, 0, 14, 0, 6, 0, 0, 0, 1, 2, 3]);
    }
}
