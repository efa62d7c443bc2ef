//! The console socket: clients attach while the guest runs, late ones get the history, the
//! first one types, and the socket goes away with the VM.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use podvm_tests::{guest_command, kvm_available, TempDir};

/// Reads lines from `stream` until one contains `marker`; returns everything read.
fn read_until(stream: &mut BufReader<UnixStream>, marker: &str) -> String {
    let mut seen = String::new();
    loop {
        let mut line = Vec::new();
        match stream.read_until(b'\n', &mut line) {
            Ok(0) => panic!("console closed before {marker:?}; got:\n{seen}"),
            Ok(_) => {
                let text = String::from_utf8_lossy(&line).replace('\r', "");
                seen.push_str(&text);
                if text.contains(marker) {
                    return seen;
                }
            }
            Err(e) => panic!("console read failed before {marker:?}: {e}; got:\n{seen}"),
        }
    }
}

#[test]
fn console_socket_serves_history_keyboard_and_log() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("console");
    let socket = dir.0.join("console.sock");
    let log = dir.0.join("console.log");
    let script = "echo BOOT-MARKER\nread -r line\necho \"GOT=[$line]\"\n";
    let mut child = guest_command(script, &[])
        .arg("--console")
        .arg(&socket)
        .arg("--console-log")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn podvm");

    let deadline = Instant::now() + Duration::from_secs(120);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "console socket never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode");

    // The first client holds the keyboard and sees the guest start.
    let first = UnixStream::connect(&socket).expect("connect first client");
    let mut first_out = BufReader::new(first.try_clone().unwrap());
    read_until(&mut first_out, "BOOT-MARKER");

    // A late client gets the history (the marker came before it) and is told it is read-only.
    let late = UnixStream::connect(&socket).expect("connect late client");
    let mut late_out = BufReader::new(late.try_clone().unwrap());
    let history = read_until(&mut late_out, "read-only");
    assert!(history.contains("BOOT-MARKER"), "history:\n{history}");

    // Keys of the read-only client go nowhere; the keyboard holder's reach the guest.
    (&late).write_all(b"ignored words\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    (&first).write_all(b"typed words\n").unwrap();
    let first_seen = read_until(&mut first_out, "GOT=[");
    assert!(first_seen.contains("GOT=[typed words]"), "{first_seen}");
    let late_seen = read_until(&mut late_out, "GOT=[");
    assert!(late_seen.contains("GOT=[typed words]"), "{late_seen}");

    // The guest powers off: podvm exits 0, clients see the end, the socket is removed.
    let status = child.wait().expect("wait podvm");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "podvm failed: {stderr}");
    let mut rest = String::new();
    let _ = first_out.read_to_string(&mut rest);
    assert!(rest.contains("PODVM-EXIT 0"), "{rest}");
    assert!(!socket.exists(), "the socket outlived the VM");
    let logged = String::from_utf8_lossy(&std::fs::read(&log).unwrap()).replace('\r', "");
    assert!(logged.contains("BOOT-MARKER") && logged.contains("GOT=[typed words]"));
    assert!(logged.contains("PODVM-EXIT 0"), "log:\n{logged}");
}
