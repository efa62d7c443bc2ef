//! 1,024 TCP connections open at once through the user NAT, to a listener of the pod, with a
//! guest that reads nothing while the far side sends: the NAT's resident memory stays within
//! its budget (`tcp::BUFFER_BUDGET`). A test binary of its own, so that the process's RSS is
//! the NAT's alone. The numbers: `cargo test -p devices --test nat_flows_memory -- --nocapture`.

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::net::user::pod::GatewayTo;
use devices::virtio::net::user::{packet, tcp, UserConfig, UserNet, GATEWAY4, GATEWAY_MAC, GUEST4};
use devices::virtio::net::{NetBackend, NetMetrics};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, IpAddress, IpProtocol, Ipv4Packet, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber,
};

const FLOWS: usize = 1024;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// The guest's receive window: small, and never opened (it acknowledges nothing).
const GUEST_WINDOW: u16 = 4096;

/// This process's resident set, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A guest TCP segment to the gateway's `port`.
fn segment(guest_port: u16, port: u16, control: TcpControl, seq: u32, ack: Option<u32>) -> Vec<u8> {
    let repr = TcpRepr {
        src_port: guest_port,
        dst_port: port,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: GUEST_WINDOW,
        window_scale: None,
        max_seg_size: (control == TcpControl::Syn).then_some(65_480),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let gw = EthernetAddress(GATEWAY_MAC);
    packet::ipv4(
        gw,
        GUEST4,
        GATEWAY4,
        IpProtocol::Tcp,
        repr.buffer_len(),
        |b| {
            repr.emit(
                &mut TcpPacket::new_unchecked(b),
                &IpAddress::Ipv4(GUEST4),
                &IpAddress::Ipv4(GATEWAY4),
                &ChecksumCapabilities::default(),
            )
        },
    )
    .unwrap()
}

/// The guest's ARP request for the gateway.
fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[10, 0, 2, 2, 0, 0, 0, 0, 0, 0, 10, 0, 2, 1]);
    f
}

/// Takes every frame for the guest; the sequence number of a SYN-ACK to `guest_port`.
fn drain(net: &mut UserNet, guest_port: u16) -> Option<u32> {
    let mut syn_ack = None;
    while let Some(frame) = net.rx_peek() {
        if let Ok(eth) = EthernetFrame::new_checked(frame) {
            if let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) {
                if let Ok(tcp) = TcpPacket::new_checked(ip.payload()) {
                    if tcp.dst_port() == guest_port && tcp.syn() && tcp.ack() {
                        syn_ack = Some(tcp.seq_number().0 as u32);
                    }
                }
            }
        }
        net.rx_pop();
    }
    syn_ack
}

#[test]
fn nat_1024_open_flows_with_full_buffers_stay_within_the_memory_budget() {
    // On the loopback, with the NAT opted in to it: the gateway's mapping does not change
    // the memory, and the loopback needs no pod interface, so the test runs anywhere.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    let metrics = Arc::new(NetMetrics::default());
    let config = UserConfig {
        gateway: GatewayTo::Loopback,
        ..Default::default()
    };
    let buffer = config
        .tcp_buffer
        .unwrap_or_else(|| tcp::buffer_size(config.max_flows));
    let mut net = UserNet::new(&config, MAC, metrics.clone()).unwrap();
    net.send(&arp());
    net.flush();
    drain(&mut net, 0);

    let before = rss_kib();
    let started = Instant::now();
    // More than the largest buffer a connection may have: whatever it has fills up.
    let data = vec![0x5a_u8; tcp::MAX_BUFFER + (64 << 10)];
    let mut far_side: Vec<TcpStream> = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let guest_port = 20_000 + i as u16;
        net.send(&segment(guest_port, port, TcpControl::Syn, 1000, None));
        net.flush();
        let deadline = Instant::now() + Duration::from_secs(10);
        let server_seq = loop {
            net.process();
            if let Some(seq) = drain(&mut net, guest_port) {
                break seq;
            }
            assert!(Instant::now() < deadline, "flow {i}: no SYN-ACK");
            std::thread::sleep(Duration::from_millis(1));
        };
        let ack = server_seq.wrapping_add(1);
        net.send(&segment(
            guest_port,
            port,
            TcpControl::None,
            1001,
            Some(ack),
        ));
        net.flush();
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while sent < data.len() {
            match stream.write(&data[sent..]) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        far_side.push(stream);
        drain(&mut net, guest_port);
    }
    // Let the NAT take what it can from the far side (as much as each connection's buffer
    // toward the guest holds: the guest acknowledges nothing).
    for _ in 0..200 {
        net.process();
        drain(&mut net, 0);
        std::thread::sleep(Duration::from_millis(5));
    }
    let after = rss_kib();
    let grown = after.saturating_sub(before);
    eprintln!(
        "{FLOWS} open flows, {} KiB buffers each way: RSS {before} KiB before, {after} KiB \
         after (+{grown} KiB, {:.1} KiB per flow), {:.1} s",
        buffer >> 10,
        grown as f64 / FLOWS as f64,
        started.elapsed().as_secs_f64()
    );
    assert_eq!(NetMetrics::get(&metrics.nat_tcp_flows), FLOWS as u64);
    assert_eq!(NetMetrics::get(&metrics.nat_tcp_opened), FLOWS as u64);
    // Each connection holds its full buffer toward the guest; the budget covers both ways.
    let budget_kib = (tcp::BUFFER_BUDGET >> 10) as u64;
    assert!(
        grown <= budget_kib + (16 << 10),
        "+{grown} KiB for {FLOWS} flows: more than the {budget_kib} KiB budget"
    );
    assert!(
        grown as usize >= (FLOWS * buffer / 2) >> 10,
        "+{grown} KiB: the buffers toward the guest did not fill; the test measures nothing"
    );
    drop(far_side);
}
