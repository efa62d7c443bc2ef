//! virtio-net on the user-mode masquerade NAT, from inside the guest and from the pod side.
//! Each test builds its own pod network namespace with a peer (tests/src/netns.rs); podvm
//! runs in the pod, the servers in the peer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use podvm_tests::netns::{PodNet, PEER_IP, PEER_IP6, POD_IP, POD_IP6};
use podvm_tests::{kvm_available, pattern, run_guest_script, sha256_file, TempDir};

/// Configures eth0 with busybox udhcpc and prints what DHCP handed out.
const DHCP: &str = r#"ip link set lo up
ip link set eth0 up
cat > /tmp/dhcp.sh <<'EOS'
#!/bin/sh
case "$1" in bound|renew)
  ip addr add $ip/$mask dev $interface
  [ -n "$mtu" ] && ip link set $interface mtu $mtu
  for r in $router; do ip route add default via $r; done
  for d in $dns; do echo "nameserver $d"; done > /etc/resolv.conf
  echo "DHCP-IP=$ip/$mask"
  echo "DHCP-ROUTER=$router"
  echo "DHCP-DNS=$dns"
  echo "DHCP-MTU=$mtu"
  echo "DHCP-SEARCH=$search";;
esac
EOS
chmod +x /tmp/dhcp.sh
udhcpc -i eth0 -f -q -n -t 10 -T 2 -s /tmp/dhcp.sh
"#;

/// A pod resolv.conf as Kubernetes writes it.
const RESOLV: &str = "search default.svc.cluster.local svc.cluster.local cluster.local\n\
                      nameserver 10.244.0.1\noptions ndots:5\n";

/// Serves `data` to the first TCP client and records where it came from.
fn serve_once(listener: TcpListener, data: Vec<u8>) -> JoinHandle<SocketAddr> {
    std::thread::spawn(move || {
        let (mut conn, from) = listener.accept().expect("accept");
        conn.write_all(&data).expect("send to the guest");
        from
    })
}

/// Reads everything the first client sends until it half-closes, answers `GOT n`, and
/// stores the bytes at `path`.
fn receive_once(listener: TcpListener, path: String) -> JoinHandle<(SocketAddr, usize)> {
    std::thread::spawn(move || {
        let (mut conn, from) = listener.accept().expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).expect("read the upload");
        std::fs::write(&path, &got).expect("store the upload");
        writeln!(conn, "GOT {}", got.len()).expect("answer the guest");
        (from, got.len())
    })
}

/// A name server on the peer: answers A queries for any name with 192.0.2.7 and anything
/// else with no records; records who asked.
fn dns_server(socket: UdpSocket, seen: Arc<Mutex<Vec<SocketAddr>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        socket
            .set_read_timeout(Some(Duration::from_secs(600)))
            .unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            seen.lock().unwrap().push(from);
            if let Some(reply) = dns_answer(&buf[..n]) {
                let _ = socket.send_to(&reply, from);
            }
        }
    })
}

fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
    // Header (12 bytes), then one question: labels up to a zero byte, QTYPE, QCLASS.
    let mut end = 12;
    while *query.get(end)? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let qtype = u16::from_be_bytes([*query.get(end + 1)?, *query.get(end + 2)?]);
    let question = query.get(12..end + 5)?;
    let a = qtype == 1;
    let mut r = Vec::new();
    r.extend_from_slice(&query[..2]); // ID
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(a), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if a {
        // Name (pointer to the question), A, IN, TTL 60, 4 bytes: 192.0.2.7.
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 0, 2, 7]);
    }
    Some(r)
}

#[test]
fn net_user_guest_configures_by_dhcp_and_moves_10_mib_each_way_from_the_pod_address() {
    if !kvm_available() {
        return;
    }
    // The family's test with the container image's static podvm.
    podvm_tests::use_image_binary();
    let net = PodNet::new();
    let dir = TempDir::new("net-user");
    let resolv = dir.file("resolv.conf", RESOLV.as_bytes());
    let download = pattern(10 << 20, 0x0e7);
    let download_file = dir.file("download", &download);
    let upload_file = dir.0.join("upload").display().to_string();

    let (down, up, udp, closed) = net.in_peer(|| {
        let bind = |port| TcpListener::bind((PEER_IP, port)).expect("bind in the peer");
        let closed = bind(0).local_addr().unwrap().port(); // bound, then closed again
        let udp = UdpSocket::bind((PEER_IP, 53)).expect("bind the peer's DNS port");
        (bind(0), bind(0), udp, closed)
    });
    let ports = (
        down.local_addr().unwrap().port(),
        up.local_addr().unwrap().port(),
    );
    let down = serve_once(down, download);
    let up = receive_once(up, upload_file.clone());
    let udp_senders = Arc::new(Mutex::new(Vec::new()));
    let _dns = dns_server(udp, udp_senders.clone());

    let script = format!(
        "{DHCP}\
         ping -c 2 -W 10 10.0.2.1 >/dev/null && echo PING-GW=ok\n\
         ping -c 2 -W 10 {PEER_IP} >/dev/null && echo PING-PEER=ok\n\
         nc {PEER_IP} {down} </dev/null >/tmp/down\n\
         echo DOWN-SHA=$(sha256sum </tmp/down | cut -d' ' -f1)\n\
         dd if=/dev/urandom of=/tmp/up bs=1M count=10 2>/dev/null\n\
         echo UP-SHA=$(sha256sum </tmp/up | cut -d' ' -f1)\n\
         echo UP-REPLY=$(nc {PEER_IP} {up} </tmp/up)\n\
         nslookup db.example >/tmp/ns 2>&1; sed 's/^/NSLOOKUP: /' /tmp/ns\n\
         grep -q 'Address: 192.0.2.7' /tmp/ns && echo DNS-ANSWER=192.0.2.7\n\
         nc -w 10 {PEER_IP} {closed} </dev/null 2>/tmp/refused || true # refused: what is checked\n\
         echo REFUSED=$(cat /tmp/refused)\n",
        down = ports.0,
        up = ports.1,
    );
    let out = run_guest_script(
        &script,
        &["--memory", "512", "--net", &format!("user,resolv={resolv}")],
    );
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    let value = |k: &str| out.value(k).unwrap_or_else(|| panic!("no {k}= in\n{out}"));

    // DHCP: KubeVirt's fixed address and gateway, the pod's DNS server and search list, and
    // podvm's large link MTU.
    assert_eq!(value("DHCP-IP"), "10.0.2.2/24");
    assert_eq!(value("DHCP-ROUTER"), "10.0.2.1");
    assert_eq!(value("DHCP-DNS"), PEER_IP);
    assert_eq!(value("DHCP-MTU"), "65520");
    assert_eq!(
        value("DHCP-SEARCH"),
        "default.svc.cluster.local svc.cluster.local cluster.local"
    );
    assert_eq!(value("PING-GW"), "ok");
    // Beyond the gateway, through the pod's unprivileged ping sockets.
    assert_eq!(value("PING-PEER"), "ok");

    // 10 MiB down: same bytes; the peer saw the pod's address, not the guest's.
    assert_eq!(value("DOWN-SHA"), sha256_file(&download_file));
    let from = podvm_tests::join_within(down, "the download server");
    assert_eq!(from.ip().to_string(), POD_IP);
    // 10 MiB up, half-closed by the guest, answered after the peer read it all.
    let (from, len) = podvm_tests::join_within(up, "the upload server");
    assert_eq!(from.ip().to_string(), POD_IP);
    assert_eq!(len, 10 << 20);
    assert_eq!(value("UP-REPLY"), format!("GOT {}", 10 << 20));
    assert_eq!(value("UP-SHA"), sha256_file(&upload_file));

    // UDP there and back: the guest asked the DNS server DHCP named, from the pod's address.
    assert_eq!(
        value("DNS-ANSWER"),
        "192.0.2.7",
        "senders seen by the peer: {:?}",
        udp_senders.lock().unwrap()
    );
    let senders = udp_senders.lock().unwrap();
    assert!(!senders.is_empty() && senders.iter().all(|a| a.ip().to_string() == POD_IP));
    drop(senders);
    // A closed port is refused, not timed out.
    assert!(value("REFUSED").contains("refused"), "{out}");
    eprintln!("user NAT: DHCP, gateway ping, 10 MiB down and up, DNS over UDP, refusal all seen");
}

/// Sends an HTTP/1.0 GET for `path` to `addr` and returns the body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(60))?;
    conn.set_read_timeout(Some(Duration::from_secs(120)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or(answer))
}

/// The client address a `/cgi-bin/who` answer names (busybox httpd writes IPv4 clients of
/// its dual-stack socket as `[::ffff:a.b.c.d]`).
fn remote_of(body: std::io::Result<String>) -> String {
    let body = body.expect("HTTP request through the forwarded port");
    let line = body
        .lines()
        .find_map(|l| l.strip_prefix("REMOTE="))
        .unwrap_or_else(|| panic!("no REMOTE= in {body:?}"));
    // busybox httpd writes IPv6 clients as [ADDR] (an IPv4 one on its dual-stack socket as
    // [::ffff:A.B.C.D]).
    line.trim_start_matches("[::ffff:")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// The guest serves HTTP on 8080 and 8005 (a CGI script tells who asked) and upper-cases
/// UDP datagrams on 123, then waits for a line on the console.
const SERVERS: &str = r#"mkdir -p /www/cgi-bin
echo hello-from-the-guest > /www/hello.txt
printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho "REMOTE=$REMOTE_ADDR"\n' > /www/cgi-bin/who
chmod +x /www/cgi-bin/who
httpd -p 8080 -h /www
httpd -p 8005 -h /www
socat UDP-RECVFROM:123,fork SYSTEM:'tr a-z A-Z' &
echo SERVERS-READY
read -r line
"#;

#[test]
fn net_user_forwards_pod_ports_to_the_guest_from_the_cluster_and_the_pod_loopback() {
    if !kvm_available() {
        return;
    }
    let net = PodNet::new();
    let vm = podvm_tests::SocketVm::start(
        "net-forward",
        &format!("{DHCP}{SERVERS}"),
        &[
            "--memory",
            "512",
            "--net",
            "user,port=8080,port=9090:8080,port=18000-18009:8000-8009,port=1123:123/udp",
        ],
    );
    let mut vm = vm;
    vm.wait_log("SERVERS-READY");

    // From another host of the cluster (the peer), to the pod's address: the guest sees
    // the real client, as behind KubeVirt's DNAT.
    let pod = |port: u16| SocketAddr::new(POD_IP.parse().unwrap(), port);
    let (hello, who, renamed, ranged, closed) = net.in_peer(|| {
        (
            http_get(pod(8080), "/hello.txt"),
            http_get(pod(8080), "/cgi-bin/who"),
            http_get(pod(9090), "/hello.txt"),
            http_get(pod(18005), "/cgi-bin/who"),
            http_get(pod(18001), "/hello.txt"),
        )
    });
    assert_eq!(hello.unwrap().trim(), "hello-from-the-guest");
    assert_eq!(remote_of(who), PEER_IP);
    assert_eq!(renamed.unwrap().trim(), "hello-from-the-guest");
    assert_eq!(remote_of(ranged), PEER_IP);
    // Nothing listens on the guest's 8001: the guest's reset becomes a reset of the accepted
    // connection (tcp.rs: "a reset either way a reset of the other side"), so the client gets
    // an error, not an answer, and not "refused" (the pod's port is forwarded, hence open).
    let kind = closed.as_ref().map_err(std::io::Error::kind);
    assert!(
        matches!(
            kind,
            Err(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        ),
        "a forwarded port the guest does not listen on: {closed:?}"
    );

    // From the pod itself, over its loopback: the guest sees the gateway.
    let local = SocketAddr::new("127.0.0.1".parse().unwrap(), 8080);
    assert_eq!(remote_of(http_get(local, "/cgi-bin/who")), "10.0.2.1");

    // UDP: a datagram to the pod's 1123 reaches the guest's 123; the answer comes back from
    // the pod's 1123.
    let reply = net.in_peer(|| udp_ask(PEER_IP, pod(1123)));
    let (text, from) = reply.expect("no answer through the forwarded UDP port");
    assert_eq!((text.trim(), from), ("HELLO-UDP", pod(1123)));

    let counters = vm.api_json(&["counters"]);
    assert!(
        counters["nics"][0]["nat"]["tcp_inbound"].as_u64().unwrap() >= 6,
        "{counters}"
    );
    let typist = std::os::unix::net::UnixStream::connect(&vm.console).unwrap();
    (&typist).write_all(b"done\n").unwrap();
    let out = vm.wait();
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        out.script_status(),
        Some(0),
        "{}",
        podvm_tests::tail(&out.stdout, 3000)
    );
}

#[test]
fn net_user_ipv6_router_advert_and_dhcpv6_give_route_and_address_and_reach_a_v6_peer() {
    if !kvm_available() {
        return;
    }
    let net = PodNet::new();
    let dir = TempDir::new("net-v6");
    let data = pattern(1 << 20, 0x66);
    let data_file = dir.file("data", &data);
    let listener = net.in_peer(|| TcpListener::bind((PEER_IP6, 0)).expect("bind v6 in the peer"));
    let port = listener.local_addr().unwrap().port();
    let server = serve_once(listener, data);
    let script = format!(
        "ip link set lo up\n\
         ip link set eth0 up\n\
         for i in $(seq 60); do ip -6 route show default | grep -q fe80::1 && break; sleep 0.5; done\n\
         ip -6 route show | sed 's/^/ROUTE6: /'\n\
         ip -6 route show default | grep -q 'via fe80::1 dev eth0' && echo V6-DEFAULT=ok\n\
         ip -6 route show | grep -q '^fd10:0:2::/120 dev eth0' && echo V6-ONLINK=ok\n\
         dhcpcd -6 -1 -w -t 60 -q -f /dev/null -c '' eth0 && echo DHCP6=ok\n\
         ip -6 addr show dev eth0 | grep -q 'inet6 fd10:0:2::2/' && echo V6-ADDR=fd10:0:2::2\n\
         ip -6 route show default | grep -q 'via fe80::1 dev eth0' && echo V6-DEFAULT-AFTER=ok\n\
         for i in $(seq 40); do ip -6 addr show dev eth0 | grep fd10 | grep -q tentative || break; sleep 0.5; done\n\
         ping6 -c 2 -W 10 fd10:0:2::1 >/dev/null && echo PING6-GW=ok\n\
         ping6 -c 2 -W 10 {peer} >/dev/null && echo PING6-PEER=ok\n\
         nc {peer} {port} </dev/null >/tmp/down6\n\
         echo DOWN6-SHA=$(sha256sum </tmp/down6 | cut -d' ' -f1)\n",
        peer = PEER_IP6,
    );
    let out = run_guest_script(&script, &["--memory", "512", "--net", "user"]);
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    let value = |k: &str| out.value(k).unwrap_or_else(|| panic!("no {k}= in\n{out}"));
    assert_eq!(value("V6-DEFAULT"), "ok");
    assert_eq!(value("V6-ONLINK"), "ok");
    // DHCPv6 hands out KubeVirt's address; the route stays.
    assert_eq!(value("DHCP6"), "ok");
    assert_eq!(value("V6-ADDR"), "fd10:0:2::2");
    assert_eq!(value("V6-DEFAULT-AFTER"), "ok");
    assert_eq!(value("PING6-GW"), "ok");
    assert_eq!(value("PING6-PEER"), "ok");
    assert_eq!(value("DOWN6-SHA"), sha256_file(&data_file));
    let from = podvm_tests::join_within(server, "the server");
    assert_eq!(from.ip().to_string(), POD_IP6);
}

/// From `local` (an address of the calling thread's namespace), sends `hello-udp` to `to`
/// until an answer comes (a datagram can be lost: up to 20 tries, 5 s each); returns the
/// answer and where it came from.
fn udp_ask(local: &str, to: SocketAddr) -> Option<(String, SocketAddr)> {
    let socket = UdpSocket::bind((local, 0)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 128];
    for _ in 0..20 {
        socket.send_to(b"hello-udp\n", to).unwrap();
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            return Some((String::from_utf8_lossy(&buf[..n]).to_string(), from));
        }
    }
    None
}

/// A UDP server on the peer: answers each datagram with it in upper case; records who sent.
fn udp_upper(socket: UdpSocket, seen: Arc<Mutex<Vec<SocketAddr>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        socket
            .set_read_timeout(Some(podvm_tests::run_timeout()))
            .unwrap();
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            seen.lock().unwrap().push(from);
            let _ = socket.send_to(&buf[..n].to_ascii_uppercase(), from);
        }
    })
}

#[test]
fn net_user_ipv6_upload_udp_and_inbound_forwarding_cross_the_nat() {
    if !kvm_available() {
        return;
    }
    let net = PodNet::new();
    let dir = TempDir::new("net-v6-more");
    let upload_file = dir.0.join("upload6").display().to_string();
    let (up, udp) = net.in_peer(|| {
        (
            TcpListener::bind((PEER_IP6, 0)).expect("bind v6 in the peer"),
            UdpSocket::bind((PEER_IP6, 0)).expect("bind v6 UDP in the peer"),
        )
    });
    let up_port = up.local_addr().unwrap().port();
    let udp_port = udp.local_addr().unwrap().port();
    let up = receive_once(up, upload_file.clone());
    let udp_senders = Arc::new(Mutex::new(Vec::new()));
    let _udp = udp_upper(udp, udp_senders.clone());
    // The guest takes its IPv6 address as in the test above, uploads 2 MiB to the peer,
    // asks the peer's UDP server (a datagram can be lost: up to five tries), then serves
    // HTTP and upper-case UDP on IPv6 for the pod's forwarded ports.
    let script = format!(
        "ip link set lo up\n\
         ip link set eth0 up\n\
         for i in $(seq 100); do ip -6 route show default | grep -q fe80::1 && break; sleep 0.2; done\n\
         dhcpcd -6 -1 -w -t 60 -q -f /dev/null -c '' eth0\n\
         for i in $(seq 100); do ip -6 addr show dev eth0 | grep fd10 | grep -q tentative || break; sleep 0.2; done\n\
         ip -6 addr show dev eth0 | grep -q 'inet6 fd10:0:2::2/' && echo V6-ADDR=fd10:0:2::2\n\
         yes podvm-v6-upload | head -c 2097152 > /tmp/up6\n\
         echo UP6-SHA=$(sha256sum </tmp/up6 | cut -d' ' -f1)\n\
         echo UP6-REPLY=$(nc {peer} {up_port} </tmp/up6)\n\
         for i in 1 2 3 4 5; do r=$(echo hello-udp6 | socat -T 3 - 'UDP6:[{peer}]:{udp_port}') && [ -n \"$r\" ] && break; done\n\
         echo UDP6-REPLY=$r\n\
         {servers}",
        peer = PEER_IP6,
        servers = SERVERS.replace("UDP-RECVFROM:123", "UDP6-RECVFROM:123"),
    );
    let mut vm = podvm_tests::SocketVm::start(
        "net-v6-more",
        &script,
        &[
            "--memory",
            "512",
            "--net",
            "user,port=8080,port=1123:123/udp",
        ],
    );
    vm.wait_log("SERVERS-READY");

    // Inbound from the cluster over IPv6: the guest sees the real client, as for IPv4.
    let pod = |port: u16| SocketAddr::new(POD_IP6.parse().unwrap(), port);
    let (hello, who) = net.in_peer(|| {
        (
            http_get(pod(8080), "/hello.txt"),
            http_get(pod(8080), "/cgi-bin/who"),
        )
    });
    assert_eq!(hello.unwrap().trim(), "hello-from-the-guest");
    assert_eq!(remote_of(who), PEER_IP6);
    let reply = net.in_peer(|| udp_ask(PEER_IP6, pod(1123)));
    let (text, from) = reply.expect("no answer through the forwarded IPv6 UDP port");
    assert_eq!((text.trim(), from), ("HELLO-UDP", pod(1123)));

    let typist = std::os::unix::net::UnixStream::connect(&vm.console).unwrap();
    (&typist).write_all(b"done\n").unwrap();
    let out = vm.wait();
    assert!(out.status.success(), "{}", out.stderr);
    let log = podvm_tests::tail(&out.stdout, 3000);
    assert_eq!(out.script_status(), Some(0), "{log}");
    let value = |k: &str| out.value(k).unwrap_or_else(|| panic!("no {k}= in\n{log}"));
    assert_eq!(value("V6-ADDR"), "fd10:0:2::2");
    // Outbound over IPv6, masqueraded to the pod's IPv6 address: the upload arrived whole,
    // and the UDP answer came back.
    let (from, len) = podvm_tests::join_within(up, "the upload server");
    assert_eq!((from.ip().to_string(), len), (POD_IP6.to_string(), 2 << 20));
    assert_eq!(value("UP6-REPLY"), format!("GOT {}", 2 << 20));
    assert_eq!(value("UP6-SHA"), sha256_file(&upload_file));
    assert_eq!(value("UDP6-REPLY"), "HELLO-UDP6");
    let senders = udp_senders.lock().unwrap().clone();
    assert!(
        !senders.is_empty() && senders.iter().all(|a| a.ip().to_string() == POD_IP6),
        "UDP senders seen by the peer: {senders:?}"
    );
}

/// Accepts connections until `want` are open at once (or `patience` has passed since the
/// first one came), then answers each with `ok` and closes them; returns the most that were
/// open together. The patience starts with the first connection, not with the test: in the
/// KVM sandbox a guest may be booted a second time, or boot slowly on a loaded machine.
fn hold_then_answer(listener: TcpListener, want: usize, patience: Duration) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        // No first connection at all within this long: the guest is gone (the test fails
        // on the guest's status before it looks at this count).
        let mut deadline = std::time::Instant::now() + podvm_tests::run_timeout();
        let mut open = Vec::new();
        while open.len() < want && std::time::Instant::now() < deadline {
            match listener.accept() {
                Ok((conn, _)) => {
                    if open.is_empty() {
                        deadline = std::time::Instant::now() + patience;
                    }
                    open.push(conn)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let most = open.len();
        for mut conn in open {
            let _ = conn.set_nonblocking(false);
            let _ = conn.write_all(b"ok\n");
        }
        most
    })
}

/// Accepts connections until `release` says so, then takes every connection still waiting
/// to be accepted, answers each with `ok` and closes them; returns how many it held.
fn hold_until_released(
    listener: TcpListener,
    release: std::sync::mpsc::Receiver<()>,
) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).unwrap();
        let mut open = Vec::new();
        let mut released = false;
        loop {
            match listener.accept() {
                Ok((conn, _)) => open.push(conn),
                // Nothing more waiting: done once released (a connection the far side's
                // kernel completed before the release is taken first).
                Err(_) if released => break,
                Err(_) => {
                    released = release.recv_timeout(Duration::from_millis(20)).is_ok();
                }
            }
        }
        let held = open.len();
        for mut conn in open {
            let _ = conn.set_nonblocking(false);
            let _ = conn.write_all(b"ok\n");
        }
        held
    })
}

/// Closes the first connection with a reset (SO_LINGER 0).
fn reset_once(listener: TcpListener) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().expect("accept");
        use std::os::fd::AsRawFd;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `conn` is an open socket; the option value lives for the call.
        let rc = unsafe {
            libc::setsockopt(
                conn.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        std::thread::sleep(Duration::from_millis(500));
        drop(conn);
    })
}

/// Sends data until the guest resets the connection; returns the error it saw.
fn flood_until_reset(listener: TcpListener) -> JoinHandle<std::io::ErrorKind> {
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let chunk = vec![7u8; 64 * 1024];
        loop {
            if let Err(e) = conn.write_all(&chunk) {
                return e.kind();
            }
        }
    })
}

#[test]
fn net_user_200_concurrent_connections_complete_and_resets_cross_both_ways() {
    if !kvm_available() {
        return;
    }
    let net = PodNet::new();
    let (many, rst, flood) = net.in_peer(|| {
        let bind = || TcpListener::bind((PEER_IP, 0)).expect("bind in the peer");
        (bind(), bind(), bind())
    });
    let port = |l: &TcpListener| l.local_addr().unwrap().port();
    let (p_many, p_rst, p_flood) = (port(&many), port(&rst), port(&flood));
    let most = hold_then_answer(many, 200, Duration::from_secs(300));
    let _rst = reset_once(rst);
    let flood = flood_until_reset(flood);
    let script = format!(
        "{DHCP}\
         i=0; while [ $i -lt 200 ]; do i=$((i+1)); nc {PEER_IP} {p_many} </dev/null >/tmp/c$i 2>&1 & done; wait\n\
         ok=0; for f in /tmp/c*; do grep -q '^ok$' $f && ok=$((ok+1)); done; echo CONCURRENT-OK=$ok\n\
         echo CONCURRENT-FAILS=$(for f in /tmp/c*; do grep -q '^ok$' $f || {{ cat $f; echo; }}; done | sort | uniq -c | tr '\\n' ';' | head -c 800)\n\
         wget -q -O /dev/null http://{PEER_IP}:{p_rst}/ 2>/tmp/rst || true # the far side's reset: checked\n\
         echo FAR-RESET=$(cat /tmp/rst)\n\
         (nc {PEER_IP} {p_flood} </dev/null | sleep 600) &\n\
         port=:$(printf %04X {p_flood})\n\
         until awk -v p=$port '$3 ~ p \"$\" && substr($5, 10) != \"00000000\" {{ f = 1 }} END {{ exit !f }}' /proc/net/tcp; do sleep 0.1; done\n\
         kill -9 $(pidof nc)\n\
         echo GUEST-RESET-SENT=1\n\
         read -r line\n"
    );
    // The flood's reader is killed once its connection holds data it has not read (its
    // pipe to sleep is full; the connection is half-closed, as nc shuts its side at the end
    // of its empty input), so the guest's kernel resets it.
    // The guest's reset must reach the far side while podvm still runs (podvm's exit would
    // end the connection too), so the guest waits for a line until the flood has ended.
    // The NAT's connection log (debug) goes with a failure's report.
    let mut vm = podvm_tests::SocketVm::start_env(
        "net-concurrent",
        &script,
        &["--memory", "512", "--net", "user"],
        &[("PODVM_LOG", "info,devices::virtio::net::user::tcp=debug")],
    );
    vm.wait_log("GUEST-RESET-SENT=1");
    let kind = podvm_tests::join_within(flood, "the flooding server");
    let typist = std::os::unix::net::UnixStream::connect(&vm.console).unwrap();
    (&typist).write_all(b"done\n").unwrap();
    let out = vm.wait();
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    let value = |k: &str| out.value(k).unwrap_or_else(|| panic!("no {k}= in\n{out}"));
    // All 200 were open at the far side at once, and each got its answer.
    let most = podvm_tests::join_within(most, "the server holding connections");
    assert_eq!(
        (most, value("CONCURRENT-OK").as_str()),
        (200, "200"),
        "the far side had {most} open at once; the guest's failures: {}\n{out}",
        value("CONCURRENT-FAILS")
    );
    // The far side's reset reached the guest's nc as a reset.
    assert!(value("FAR-RESET").contains("reset"), "{out}");
    // The guest's reset (a killed reader with unread data) reached the far side, before
    // podvm exited.
    assert!(
        matches!(
            kind,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "the far side saw {kind:?}"
    );
}

#[test]
fn net_user_connection_flood_hits_the_flow_limit_and_is_counted() {
    if !kvm_available() {
        return;
    }
    let net = PodNet::new();
    let (listener, one_by_one) = net.in_peer(|| {
        let bind = || TcpListener::bind((PEER_IP, 0)).expect("bind in the peer");
        (bind(), bind())
    });
    let p = listener.local_addr().unwrap().port();
    let p2 = one_by_one.local_addr().unwrap().port();
    let (release, released) = std::sync::mpsc::channel();
    let most = hold_until_released(listener, released);
    let answered = answer_each(one_by_one, 40);
    let script = format!(
        "{DHCP}\
         i=0; while [ $i -lt 30 ]; do i=$((i+1)); nc {PEER_IP} {p} </dev/null >/tmp/c$i 2>&1 & done; wait\n\
         ok=0; refused=0; for f in /tmp/c*; do grep -q '^ok$' $f && ok=$((ok+1)); grep -q refused $f && refused=$((refused+1)); done\n\
         echo FLOOD-OK=$ok; echo FLOOD-REFUSED=$refused\n\
         i=0; ok=0; while [ $i -lt 40 ]; do i=$((i+1)); nc {PEER_IP} {p2} </dev/null | grep -q '^ok$' && ok=$((ok+1)); done\n\
         echo ONE-BY-ONE-OK=$ok\n\
         read -r line\n"
    );
    let mut vm = podvm_tests::SocketVm::start(
        "net-flood",
        &script,
        &["--memory", "512", "--net", "user,max-flows=20"],
    );
    // The server holds what reaches it until the NAT has turned 10 away (and so holds 20
    // flows): only then do the held ones get their answer.
    let nat = |vm: &podvm_tests::SocketVm| vm.api_json(&["counters"])["nics"][0]["nat"].clone();
    let deadline = std::time::Instant::now() + podvm_tests::run_timeout();
    while nat(&vm)["flow_limit"].as_u64().unwrap_or(0) < 10 {
        if !vm.running() || std::time::Instant::now() > deadline {
            vm.hang(&format!(
                "the NAT never refused 10 connections: {}",
                nat(&vm)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    release.send(()).unwrap();
    let log = vm.wait_log("ONE-BY-ONE-OK=");
    // Every flow ends once both sides have closed it; none is left to the idle expiry.
    while nat(&vm)["tcp_flows"] != 0 {
        if std::time::Instant::now() > deadline {
            vm.hang(&format!("flows left open: {}", nat(&vm)));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let counters = vm.api_json(&["counters"]);
    let typist = std::os::unix::net::UnixStream::connect(&vm.console).unwrap();
    (&typist).write_all(b"done\n").unwrap();
    let out = vm.wait();
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        out.script_status(),
        Some(0),
        "{}",
        podvm_tests::tail(&out.stdout, 3000)
    );
    let value = |k: &str| {
        log.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{k}=")).map(str::to_string))
            .unwrap_or_else(|| panic!("no {k}= in\n{log}"))
    };
    // At most 20 at once got through; the rest were refused at once, not left hanging.
    assert_eq!(
        podvm_tests::join_within(most, "the server holding connections"),
        20
    );
    assert_eq!(value("FLOOD-OK"), "20");
    assert_eq!(value("FLOOD-REFUSED"), "10");
    assert_eq!(counters["nics"][0]["nat"]["flow_limit"], 10, "{counters}");
    // A closed connection gives its slot back at once (no TIME-WAIT hold in the NAT): 40
    // connections one after the other all pass a limit of 20, and none is left open.
    assert_eq!(
        podvm_tests::join_within(answered, "the answering server"),
        40
    );
    assert_eq!(value("ONE-BY-ONE-OK"), "40");
    assert_eq!(counters["nics"][0]["nat"]["tcp_flows"], 0, "{counters}");
    assert_eq!(counters["nics"][0]["nat"]["expired"], 0, "{counters}");
}

/// Accepts `n` connections one after the other, answering each with `ok` and closing it;
/// returns how many it answered.
fn answer_each(listener: TcpListener, n: usize) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut answered = 0;
        for _ in 0..n {
            let Ok((mut conn, _)) = listener.accept() else {
                break;
            };
            if conn.write_all(b"ok\n").is_ok() {
                answered += 1;
            }
        }
        answered
    })
}

/// Drops every capability from the bounding set before exec, so the program runs as root
/// with no capability at all (what "needs no capability" means, in a test that is root).
fn without_capabilities(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    if podvm_tests::pod::unprivileged() {
        // podvm already starts as the pod's user with no capability at all.
        return;
    }
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Boots a guest on the tap `tap0` (no capabilities; vhost-net on or off), moves 8 MiB each
/// way with a peer on the tap's host side, and returns podvm's stderr.
fn run_on_tap(vhost: bool) -> String {
    let dir = TempDir::new("net-tap");
    let data = pattern(8 << 20, 0x7a9);
    let data_file = dir.file("data", &data);
    let upload_file = dir.0.join("upload").display().to_string();
    let bind = || TcpListener::bind(("10.99.0.1", 0)).expect("bind on the tap's address");
    let (down, up) = (bind(), bind());
    let (p_down, p_up) = (
        down.local_addr().unwrap().port(),
        up.local_addr().unwrap().port(),
    );
    let down = serve_once(down, data);
    let up = receive_once(up, upload_file.clone());
    let script = format!(
        "ip link set lo up\n\
         ip link set eth0 up\n\
         ip addr add 10.99.0.2/24 dev eth0\n\
         echo TAP-MTU=$(cat /sys/class/net/eth0/mtu)\n\
         ping -c 2 -W 10 10.99.0.1 >/dev/null && echo PING-TAP=ok\n\
         nc 10.99.0.1 {p_down} </dev/null >/tmp/down\n\
         echo DOWN-SHA=$(sha256sum </tmp/down | cut -d' ' -f1)\n\
         dd if=/dev/urandom of=/tmp/up bs=1M count=8 2>/dev/null\n\
         echo UP-SHA=$(sha256sum </tmp/up | cut -d' ' -f1)\n\
         echo UP-REPLY=$(nc 10.99.0.1 {p_up} </tmp/up)\n"
    );
    let spec = format!("tap=tap0,vhost={}", if vhost { "on" } else { "off" });
    let out = podvm_tests::run_guest(|| {
        let mut cmd = podvm_tests::guest_command(&script, &["--memory", "512", "--net", &spec]);
        without_capabilities(&mut cmd);
        cmd
    });
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
    let value = |k: &str| out.value(k).unwrap_or_else(|| panic!("no {k}= in\n{out}"));
    assert_eq!(value("TAP-MTU"), "1500");
    assert_eq!(value("PING-TAP"), "ok");
    assert_eq!(value("DOWN-SHA"), sha256_file(&data_file));
    assert_eq!(
        podvm_tests::join_within(down, "the download server")
            .ip()
            .to_string(),
        "10.99.0.2"
    );
    assert_eq!(value("UP-REPLY"), format!("GOT {}", 8 << 20));
    assert_eq!(value("UP-SHA"), sha256_file(&upload_file));
    assert_eq!(
        podvm_tests::join_within(up, "the upload server")
            .0
            .ip()
            .to_string(),
        "10.99.0.2"
    );
    out.stderr
}

#[test]
fn net_tap_backend_opens_an_agents_tap_without_capabilities_and_reaches_a_peer() {
    if !kvm_available() {
        return;
    }
    let net = PodNet::new();
    // The privileged agent's part: a tap for podvm's user (the pod's, see
    // podvm_tests::pod), addressed, up.
    let podvm_user = podvm_tests::pod::podvm_uid().to_string();
    net.ip(&[
        "tuntap",
        "add",
        "dev",
        "tap0",
        "mode",
        "tap",
        "user",
        &podvm_user,
        "vnet_hdr",
    ]);
    net.ip(&["addr", "add", "10.99.0.1/24", "dev", "tap0"]);
    net.ip(&["link", "set", "tap0", "up"]);
    // podvm moving the frames itself, then the kernel's vhost-net (still no capability).
    let own = run_on_tap(false);
    assert!(!own.contains("vhost-net moves"), "{own}");
    if std::path::Path::new("/dev/vhost-net").exists() {
        let kernel = run_on_tap(true);
        assert!(
            kernel.contains("vhost-net moves this NIC's frames"),
            "{kernel}"
        );
    } else {
        podvm_tests::skip("no /dev/vhost-net here: the vhost-net half of the tap test did not run");
    }

    // A tap made for another user, and a tap nobody made: one clear error each.
    net.ip(&[
        "tuntap", "add", "dev", "tap1", "mode", "tap", "user", "4242",
    ]);
    for (tap, says) in [("tap1", "cannot attach"), ("tap9", "no such tap device")] {
        let mut cmd = podvm_tests::guest_command("true", &["--net", &format!("tap={tap}")]);
        without_capabilities(&mut cmd);
        let out = podvm_tests::run_command(cmd);
        assert_eq!(out.status.code(), Some(1), "{out}");
        assert!(
            out.stderr.contains(says) && !out.stderr.contains("panicked"),
            "{out}"
        );
    }
}

#[test]
fn net_user_ports_all_forwards_every_free_port_like_kubevirt_without_a_port_list() {
    if !kvm_available() {
        return;
    }
    let net = PodNet::new();
    let slab = || -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Slab:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let before = slab();
    let script = "ip link set lo up\nip link set eth0 up\n\
                  ip addr add 10.0.2.2/24 dev eth0\nip route add default via 10.0.2.1\n\
                  mkdir -p /www && echo any-port > /www/index.html\n\
                  httpd -p 31337 -h /www\n\
                  socat UDP-RECVFROM:5353,fork SYSTEM:'tr a-z A-Z' &\n\
                  echo SERVERS-READY\nread -r line\n";
    // Two sockets per port: the pod's open-file limit must allow ~131 072 (Kubernetes
    // runtimes give containers 1 048 576).
    let mut vm = {
        let raise = libc::rlimit {
            rlim_cur: 1 << 20,
            rlim_max: 1 << 20,
        };
        // SAFETY: setrlimit reads one rlimit for the duration of the call; the test process
        // is root (in the sandbox or on a CI host) and the limit is inherited by podvm.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raise) };
        assert_eq!(
            rc,
            0,
            "raise RLIMIT_NOFILE: {}",
            std::io::Error::last_os_error()
        );
        podvm_tests::SocketVm::start(
            "net-ports-all",
            script,
            &["--memory", "512", "--net", "user,ports=all"],
        )
    };
    vm.wait_log("SERVERS-READY");
    let after = slab();
    let pod = |port: u16| SocketAddr::new(POD_IP.parse().unwrap(), port);
    let (tcp, udp) = net.in_peer(|| {
        let tcp = http_get(pod(31337), "/index.html");
        let socket = UdpSocket::bind((PEER_IP, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 64];
        let mut udp = None;
        for _ in 0..20 {
            socket.send_to(b"any\n", pod(5353)).unwrap();
            if let Ok((n, _)) = socket.recv_from(&mut buf) {
                udp = Some(String::from_utf8_lossy(&buf[..n]).trim().to_string());
                break;
            }
        }
        (tcp, udp)
    });
    assert_eq!(tcp.expect("TCP to an unlisted port").trim(), "any-port");
    assert_eq!(udp.as_deref(), Some("ANY"));
    let typist = std::os::unix::net::UnixStream::connect(&vm.console).unwrap();
    (&typist).write_all(b"done\n").unwrap();
    let out = vm.wait();
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        out.script_status(),
        Some(0),
        "{}",
        podvm_tests::tail(&out.stdout, 3000)
    );
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("forwarding every free"))
        .unwrap_or_default()
        .to_string();
    eprintln!(
        "ports=all: {line}; kernel slab grew by {} MiB",
        after.saturating_sub(before) / 1024
    );
}

/// A guest sending UDP as fast as it can through the NAT (a flood of frames on the TX
/// queue, each a datagram the NAT sends on from a host socket to the pod's address, whose
/// closed port answers each with an ICMP error) does not hold the event loop: the liveness
/// probe, which fails once the loop has been silent for `vmm::status::WEDGED_AFTER`, keeps
/// answering throughout. The loop's longest silence is printed, not asserted (a duration).
#[test]
fn net_user_guest_flooding_tx_keeps_the_event_loop_and_probes_turning() {
    if !kvm_available() {
        return;
    }
    // A pod with an address, which the gateway stands for.
    let _net = PodNet::new();
    let port = 21_000 + (std::process::id() % 1000) as u16;
    let listen = format!("127.0.0.1:{port}");
    let script = "ip link set lo up\nip link set eth0 up\n\
                  ip addr add 10.0.2.2/24 dev eth0\nip route add default via 10.0.2.1\n\
                  echo FLOOD-START\n\
                  dd if=/dev/zero bs=1400 count=50000 2>/dev/null | socat -b1400 -u - UDP-SENDTO:10.0.2.1:9 || \
                  true # socat may stop on an ICMP error from the closed port: expected; the NAT's frame count is checked\n\
                  echo FLOOD-DONE\nread -r line\n";
    let mut vm = podvm_tests::SocketVm::start(
        "net-tx-flood",
        script,
        &[
            "--memory",
            "256",
            "--net",
            "user",
            "--status-listen",
            &listen,
        ],
    );
    vm.wait_log("FLOOD-START");
    // Probes while the guest floods, as the kubelet would send them.
    let mut probes = 0;
    let mut failed = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while !vm.log_text().contains("FLOOD-DONE") {
        if std::time::Instant::now() > deadline {
            vm.hang("the guest's flood never ended");
        }
        let (code, body) = podvm_tests::http_get(port, "/healthz");
        probes += 1;
        if code != 200 {
            failed.push(body);
        }
        std::thread::sleep(Duration::from_millis(500));
        assert!(vm.running(), "podvm ended during the flood");
    }
    let (_, metrics) = podvm_tests::http_get(port, "/metrics");
    let longest = podvm_tests::metric_sample(&metrics, "podvm_event_loop_longest_silence_seconds");
    let busy = podvm_tests::metric_sample(&metrics, "podvm_event_loop_longest_silence_cpu_seconds");
    let frames = podvm_tests::metric_sample(&metrics, "podvm_nic_tx_frames_total{nic=\"0\"}");
    let budget = podvm_tests::metric_sample(&metrics, "podvm_nic_tx_budget_spent_total{nic=\"0\"}");
    let typist = std::os::unix::net::UnixStream::connect(&vm.console).unwrap();
    (&typist).write_all(b"done\n").unwrap();
    let out = vm.wait();
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        out.script_status(),
        Some(0),
        "{}",
        podvm_tests::tail(&out.stdout, 3000)
    );
    assert!(
        failed.is_empty(),
        "/healthz failed during the flood: {failed:?}"
    );
    assert!(
        frames >= 50_000.0,
        "the flood reached the NAT: {frames} frames"
    );
    eprintln!(
        "TX flood: {frames} frames, {probes} probes all answered, {budget} passes ended on their budget, longest event-loop silence {longest} s ({busy} s of it on the CPU)"
    );
}
