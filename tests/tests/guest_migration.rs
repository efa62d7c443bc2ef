//! Live migration between two podvm processes on this machine: the guest's memory, vCPUs,
//! devices and disk move, the guest carries on where it was; failures leave the source
//! running and the destination refuses what it does not understand.

use std::io::Write;
use std::time::{Duration, Instant};

use podvm_tests::{kvm_available, SocketVm, TempDir};

/// Counts in memory (a shell variable), prints each value and writes it to the disk, once a
/// second, until a line arrives on the console; then prints the last value.
const COUNTER: &str = "i=0\n\
    while true; do\n\
      i=$((i+1)); echo \"COUNT=$i\"\n\
      echo \"$i\" | dd of=/dev/vda bs=512 count=1 conv=fsync 2>/dev/null\n\
      if read -t 1 -r line; then break; fi\n\
    done\n\
    echo \"FINAL=$i\"\n";

/// Every COUNT value in `log`, in order (a line cut by the handover is split across the
/// two logs: concatenated they read whole).
fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("COUNT=")?.parse().ok())
        .collect()
}

fn last_count(vm: &SocketVm) -> u64 {
    counts(&vm.log_text()).last().copied().unwrap_or(0)
}

/// The podvm arguments both sides of a migration get.
fn vm_args(disk: &str) -> Vec<String> {
    [
        "--memory",
        "256",
        "--disk",
        disk,
        "--net",
        "user",
        "--migration-insecure",
    ]
    .map(String::from)
    .to_vec()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Migrates `src` to a new destination; returns it once the source has exited "migrated".
fn migrate(src: &mut SocketVm, name: &str, args: &[&str]) -> SocketVm {
    let (dst, addr) = SocketVm::incoming(name, COUNTER, args);
    let answer = src.api_json(&["migrate", &addr]);
    assert_eq!(answer["state"], "active", "{answer}");
    dst_after_source_exits(src, dst)
}

fn dst_after_source_exits(src: &mut SocketVm, mut dst: SocketVm) -> SocketVm {
    let deadline = Instant::now() + Duration::from_secs(300);
    while src.running() {
        if Instant::now() > deadline || !dst.running() {
            let status = src.api(&["migration"]);
            panic!(
                "the source did not finish migrating; its migration status:\n{status}\n\
                 SOURCE {}\nDESTINATION {}",
                src.kill_and_report(),
                dst.kill_and_report()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    dst
}

fn finish(src: SocketVm) -> podvm_tests::Outcome {
    let out = src.wait();
    assert!(
        out.status.success(),
        "the source did not exit cleanly:\n{out}"
    );
    assert!(out.stderr.contains("migrated"), "{out}");
    // Measured, not asserted: the source's own account (rounds, downtime, total).
    for line in out.stderr.lines().filter(|l| l.contains("migrated")) {
        eprintln!("source: {}", line.trim());
    }
    out
}

#[test]
fn migration_moves_a_running_guest_whose_counter_continues_and_disk_holds_the_last_value() {
    if !kvm_available() {
        return;
    }
    let tmp = TempDir::new("migrate-counter");
    let disk = tmp.sparse("disk.img", 1 << 20);
    let args = vm_args(&disk);
    let mut a = SocketVm::start("migrate-a", COUNTER, &refs(&args));
    a.wait_log("COUNT=3\n");

    // A to B, then B to C: the same guest, counting on.
    let mut b = migrate(&mut a, "migrate-b", &refs(&args));
    let a_log = a.log_text();
    let a_out = finish(a);
    let before = counts(&a_log).last().copied().unwrap();
    let migration = b.api_json(&["info"]);
    assert_eq!(migration["state"], "running", "{migration}");
    b.wait_log(&format!("COUNT={}\n", before + 2));

    let mut c = migrate(&mut b, "migrate-c", &refs(&args));
    let b_log = b.log_text();
    let b_out = finish(b);
    let middle = counts(&b_log).last().copied().unwrap();
    c.wait_log(&format!("COUNT={}\n", middle + 2));

    // Stop the counter: the guest writes the last value and powers off.
    let typist = std::os::unix::net::UnixStream::connect(&c.console).unwrap();
    (&typist).write_all(b"stop\n").unwrap();
    let c_out = c.wait();
    assert!(c_out.status.success(), "{c_out}");
    let finals: Vec<u64> = c_out
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("FINAL=")?.parse().ok())
        .collect();
    assert_eq!(finals.len(), 1, "{c_out}");
    let last = finals[0];

    // One run of numbers from 1 to the last, across the three logs: no reset, no gap, no
    // number twice.
    let all = counts(&format!("{}{}{}", a_out.stdout, b_out.stdout, c_out.stdout));
    let expected: Vec<u64> = (1..=last).collect();
    assert_eq!(all, expected, "\nA:\n{a_out}\nB:\n{b_out}\nC:\n{c_out}");
    assert!(before >= 3 && middle > before + 1 && last > middle + 1);

    // The disk holds what the guest wrote last, at the destination.
    let bytes = std::fs::read(&disk).unwrap();
    let on_disk: u64 = String::from_utf8_lossy(&bytes[..16])
        .split('\n')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("disk holds {:?}: {e}", &bytes[..16]));
    assert_eq!(on_disk, last);
}

#[test]
fn migration_failures_leave_the_source_running_and_a_later_migration_succeeds() {
    if !kvm_available() {
        return;
    }
    let tmp = TempDir::new("migrate-fail");
    let disk = tmp.sparse("disk.img", 1 << 20);
    let args = vm_args(&disk);
    let mut src = SocketVm::start("migrate-fail-src", COUNTER, &refs(&args));
    src.wait_log("COUNT=2\n");

    let wait_failed = |src: &SocketVm| {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let s = src.api_json(&["migration"]);
            match s["state"].as_str() {
                Some("failed") => return s,
                Some("active") => {}
                other => panic!("migration state {other:?}: {s}"),
            }
            assert!(Instant::now() < deadline, "the migration never ended: {s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let still_counting = |src: &mut SocketVm| {
        let n = last_count(src);
        src.wait_log(&format!("COUNT={}\n", n + 2));
        assert_eq!(src.api_json(&["info"])["state"], "running");
    };

    // 1. A destination with another shape refuses at once, and exits without running.
    let mut other = args.clone();
    other[1] = "128".into();
    let (dst, addr) = SocketVm::incoming("migrate-fail-shape", COUNTER, &refs(&other));
    src.api_json(&["migrate", &addr]);
    let s = wait_failed(&src);
    assert!(s["error"].as_str().unwrap().contains("--memory"), "{s}");
    let out = dst.wait();
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("did not start here"), "{out}");
    still_counting(&mut src);

    // 2. A destination killed while memory flows: it is stopped first, so the source is
    //    surely in the middle of sending (blocked on a full socket), then killed.
    let (mut dst, addr) = SocketVm::incoming("migrate-fail-kill", COUNTER, &refs(&args));
    // SAFETY: signalling the podvm child this test started.
    assert_eq!(unsafe { libc::kill(dst.pid(), libc::SIGSTOP) }, 0);
    src.api_json(&["migrate", &addr]);
    std::thread::sleep(Duration::from_secs(2));
    dst.kill();
    let s = wait_failed(&src);
    assert!(s["error"].is_string(), "{s}");
    still_counting(&mut src);

    // 3. Destinations that die at later points, played by the test: after 1 MiB of the
    //    stream, and after the whole stream (the source has paused the guest and waits
    //    for the destination's answer): the guest runs on at the source.
    for stop in [Stop::After(1 << 20), Stop::AtEnd] {
        let sock = tmp.0.join(format!("fake-{stop:?}.sock"));
        let fake = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let reader = std::thread::spawn(move || fake_destination(fake, stop));
        src.api_json(&["migrate", &format!("unix:{}", sock.display())]);
        let s = wait_failed(&src);
        assert!(
            reader.join().unwrap(),
            "the fake destination did not reach {stop:?}"
        );
        assert!(s["error"].is_string(), "{s}");
        still_counting(&mut src);
    }

    // After all that, the same source migrates for real, and the guest takes keys and
    // ends cleanly at the destination, its count unbroken.
    let mut dst = migrate(&mut src, "migrate-fail-ok", &refs(&args));
    let before = last_count(&src);
    let src_out = finish(src);
    dst.wait_log(&format!("COUNT={}\n", before + 2));
    let typist = std::os::unix::net::UnixStream::connect(&dst.console).unwrap();
    (&typist).write_all(b"stop\n").unwrap();
    let out = dst.wait();
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("FINAL="), "{out}");
    let all = counts(&format!("{}{}", src_out.stdout, out.stdout));
    let expected: Vec<u64> = (1..=*all.last().unwrap()).collect();
    assert_eq!(all, expected, "\nSOURCE:\n{src_out}\nDESTINATION:\n{out}");
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    After(usize),
    AtEnd,
}

/// The destination's `Accept` section: kind 15, no payload, its CRC-32.
const ACCEPT: [u8; 12] = [15, 0, 0, 0, 0, 0, 0, 0, 0xc5, 0xcd, 0x02, 0xbc];

/// Reads one migration stream from `listener` (accepting the shape, as a podvm would) until
/// `stop`, then hangs up without another answer; true if it got there.
fn fake_destination(listener: std::os::unix::net::UnixListener, stop: Stop) -> bool {
    use std::io::Read;
    let (mut conn, _) = listener.accept().unwrap();
    let mut sections = 0;
    let mut header = [0u8; 16];
    if conn.read_exact(&mut header).is_err() || &header[..8] != b"PODVMMIG" {
        return false;
    }
    let mut read = 16;
    loop {
        let mut head = [0u8; 8];
        if conn.read_exact(&mut head).is_err() {
            return false;
        }
        let kind = u32::from_le_bytes(head[..4].try_into().unwrap());
        let len = u32::from_le_bytes(head[4..].try_into().unwrap()) as usize;
        let mut rest = vec![0u8; len + 4];
        if conn.read_exact(&mut rest).is_err() {
            return false;
        }
        read += 12 + len;
        sections += 1;
        if sections == 1 && (&conn).write_all(&ACCEPT).is_err() {
            return false;
        }
        match stop {
            Stop::After(n) if read >= n => return true,
            Stop::AtEnd if kind == 5 => {
                // Everything sent; the source waits for the answer that never comes.
                std::thread::sleep(Duration::from_millis(500));
                return true;
            }
            _ => {}
        }
    }
}

#[test]
fn migration_destination_refuses_a_wrong_version_and_a_corrupted_stream() {
    if !kvm_available() {
        return;
    }
    let tmp = TempDir::new("migrate-refuse");
    let disk = tmp.sparse("disk.img", 1 << 20);
    let args = vm_args(&disk);
    let header = |version: u32| {
        let mut h = b"PODVMMIG".to_vec();
        h.extend_from_slice(&version.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h
    };
    // A section of kind 1 (shape) whose checksum does not match.
    let mut corrupted = header(1);
    corrupted.extend_from_slice(&1u32.to_le_bytes());
    corrupted.extend_from_slice(&2u32.to_le_bytes());
    corrupted.extend_from_slice(b"{}");
    corrupted.extend_from_slice(&0xdead_beefu32.to_le_bytes());

    for (name, bytes, expect) in [
        ("migrate-refuse-version", header(7), "version 7"),
        ("migrate-refuse-crc", corrupted, "checksum"),
        (
            "migrate-refuse-magic",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            "magic",
        ),
    ] {
        let (dst, addr) = SocketVm::incoming(name, COUNTER, &refs(&args));
        let path = addr.strip_prefix("unix:").unwrap();
        let mut conn = std::os::unix::net::UnixStream::connect(path).unwrap();
        conn.write_all(&bytes).unwrap();
        let out = dst.wait();
        assert!(!out.status.success(), "{name}: {out}");
        assert!(out.stderr.contains(expect), "{name}: {out}");
        assert!(out.stderr.contains("did not start here"), "{name}: {out}");
        assert!(
            !out.stdout.contains("COUNT="),
            "{name}: the guest ran:\n{out}"
        );
    }
}

/// A CA and a certificate it signed for `localhost`, as PEM files in `dir` named after
/// `name`; returns (cert, key, ca) paths.
fn pki(dir: &TempDir, name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    (
        dir.file(&format!("{name}.crt"), cert.pem().as_bytes()),
        dir.file(&format!("{name}.key"), key.serialize_pem().as_bytes()),
        dir.file(&format!("{name}-ca.crt"), ca.pem().as_bytes()),
    )
}

fn tls_args(disk: &str, (cert, key, ca): &(String, String, String)) -> Vec<String> {
    let mut args = vm_args(disk);
    args.retain(|a| a != "--migration-insecure");
    for (flag, value) in [
        ("--migration-tls-cert", cert),
        ("--migration-tls-key", key),
        ("--migration-tls-ca", ca),
    ] {
        args.push(flag.into());
        args.push(value.clone());
    }
    args
}

#[test]
fn migration_over_mutual_tls_refuses_a_source_the_ca_did_not_sign() {
    if !kvm_available() {
        return;
    }
    let tmp = TempDir::new("migrate-tls");
    let disk = tmp.sparse("disk.img", 1 << 20);
    let good = pki(&tmp, "good");
    let other = pki(&tmp, "other");
    let args = tls_args(&disk, &good);
    let mut src = SocketVm::start("migrate-tls-src", COUNTER, &refs(&args));
    src.wait_log("COUNT=2\n");

    // A destination whose CA is another: it refuses the source's certificate, and neither
    // side goes on with the migration.
    let picky = tls_args(&disk, &(good.0.clone(), good.1.clone(), other.2.clone()));
    let (dst, addr) = SocketVm::incoming("migrate-tls-picky", COUNTER, &refs(&picky));
    src.api_json(&["migrate", &addr]);
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let s = src.api_json(&["migration"]);
        if s["state"] != "active" || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["state"], "failed", "{status}");
    let out = dst.wait();
    assert!(!out.status.success(), "{out}");
    assert!(out.stderr.contains("TLS with"), "{out}");
    assert!(out.stderr.contains("did not start here"), "{out}");
    let n = last_count(&src);
    src.wait_log(&format!("COUNT={}\n", n + 2));

    // The right destination takes the guest over TLS.
    let mut dst = migrate(&mut src, "migrate-tls-dst", &refs(&args));
    let n = last_count(&src);
    finish(src);
    dst.wait_log(&format!("COUNT={}\n", n + 2));
    dst.kill();
}
