//! virtio-rng (`--rng`): the guest's hw_random core picks the device and reads entropy from
//! it, the API counts what was served, and the device carries on after a live migration.

use std::io::Write;
use std::time::{Duration, Instant};

use podvm_tests::{kvm_available, SocketVm};

/// Prints the hw_random core's current source and 256 bytes read from /dev/hwrng in hex,
/// then waits for a line on the console.
const READ_ONCE: &str = "f=/sys/class/misc/hw_random/rng_current\n\
    [ -r $f ] || f=/sys/devices/virtual/misc/hw_random/rng_current\n\
    echo \"RNG_CURRENT=$(cat $f)\"\n\
    echo \"RNG_HEX=$(dd if=/dev/hwrng bs=64 count=4 2>/dev/null | od -An -v -tx1 | tr -d ' \\n')\"\n\
    echo RNG-READ\n\
    read -r line\n";

/// Reads 64 bytes from /dev/hwrng once a second, printing them numbered, until a line
/// arrives on the console.
const READ_LOOP: &str = "i=0\n\
    while true; do\n\
      i=$((i+1))\n\
      echo \"RNG=$i $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -v -tx1 | tr -d ' \\n')\"\n\
      if read -t 1 -r line; then break; fi\n\
    done\n\
    echo \"FINAL=$i\"\n";

/// The value of the first line of `log` that starts with `key=`.
fn value(log: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    log.lines()
        .find_map(|l| l.trim().strip_prefix(&prefix).map(str::to_string))
}

/// `hex` is `bytes` bytes of hex digits, not all zero.
fn assert_random_hex(hex: &str, bytes: usize, context: &str) {
    assert_eq!(
        hex.len(),
        2 * bytes,
        "{hex:?} is not {bytes} bytes\n{context}"
    );
    assert!(
        hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{hex:?}\n{context}"
    );
    assert!(
        hex.chars().any(|c| c != '0'),
        "{bytes} bytes of zeroes from /dev/hwrng\n{context}"
    );
}

/// Types `line` on the guest's console; the connection must stay open until the guest has
/// read it (a client that leaves at once may lose what it typed).
#[must_use = "keep the connection until the guest has read the line"]
fn type_line(vm: &SocketVm, line: &str) -> std::os::unix::net::UnixStream {
    let typist = std::os::unix::net::UnixStream::connect(&vm.console).unwrap();
    (&typist).write_all(line.as_bytes()).unwrap();
    typist
}

#[test]
fn rng_guest_reads_entropy_from_virtio_rng_and_the_api_counts_the_bytes() {
    if !kvm_available() {
        return;
    }
    // The family's test with the container image's static podvm.
    podvm_tests::use_image_binary();
    let mut vm = SocketVm::start("rng-read", READ_ONCE, &["--rng"]);
    let log = vm.wait_log("RNG-READ\n");

    let current = value(&log, "RNG_CURRENT").unwrap_or_default();
    assert!(
        current.starts_with("virtio_rng"),
        "the guest's hw_random source is {current:?}\n{log}"
    );
    let hex = value(&log, "RNG_HEX").unwrap_or_default();
    assert_random_hex(&hex, 256, &log);

    let info = vm.api_json(&["info"]);
    assert_eq!(info["rng"], true, "{info}");
    let counters = vm.api_json(&["counters"]);
    let rng = &counters["rng"];
    assert!(rng["bytes"].as_u64().unwrap() >= 256, "{counters}");
    assert!(rng["requests"].as_u64().unwrap() >= 1, "{counters}");
    assert_eq!(rng["bad_chains"], 0, "{counters}");
    assert_eq!(rng["entropy_errors"], 0, "{counters}");

    let _typist = type_line(&vm, "done\n");
    let out = vm.wait();
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
}

#[test]
fn rng_without_the_flag_the_guest_has_no_hw_random_source_and_the_api_no_counters() {
    if !kvm_available() {
        return;
    }
    let mut vm = SocketVm::start("rng-off", READ_ONCE, &[]);
    let log = vm.wait_log("RNG-READ\n");
    // The hw_random core is built into the kernel; with no device it says "none".
    let current = value(&log, "RNG_CURRENT").unwrap_or_default();
    assert!(!current.contains("virtio"), "{current:?}\n{log}");
    assert_eq!(value(&log, "RNG_HEX").as_deref(), Some(""), "{log}");
    let counters = vm.api_json(&["counters"]);
    assert!(counters["rng"].is_null(), "{counters}");
    let _typist = type_line(&vm, "done\n");
    let out = vm.wait();
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");
}

/// The (number, hex) of every complete RNG line of `log`.
fn reads(log: &str) -> Vec<(u64, String)> {
    log.lines()
        .filter_map(|l| {
            let (n, hex) = l.trim().strip_prefix("RNG=")?.split_once(' ')?;
            (hex.len() == 128).then(|| Some((n.parse().ok()?, hex.to_string())))?
        })
        .collect()
}

#[test]
fn rng_migrates_with_the_guest_and_serves_entropy_at_the_destination() {
    if !kvm_available() {
        return;
    }
    let args = ["--memory", "256", "--rng", "--migration-insecure"];
    let mut src = SocketVm::start("rng-migrate-src", READ_LOOP, &args);
    src.wait_log("RNG=2 ");

    // A destination without the device is another VM: it refuses before any memory moves,
    // naming the flag, and the source runs on.
    let (other, addr) = SocketVm::incoming(
        "rng-migrate-norng",
        READ_LOOP,
        &[
            "--memory",
            "256",
            "--migration-insecure",
            "--migration-timeout",
            "20",
        ],
    );
    src.api_json(&["migrate", &addr]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        let s = src.api_json(&["migration"]);
        if s["state"] == "failed" {
            break s;
        }
        if Instant::now() > deadline {
            src.hang(&format!("the migration never failed: {s}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status["error"].as_str().unwrap_or("").contains("--rng"),
        "{status}"
    );
    assert!(!other.wait().status.success());
    let n = reads(&src.log_text()).last().map_or(0, |r| r.0);
    src.wait_log(&format!("RNG={} ", n + 1));

    // The real one.
    let (mut dst, addr) = SocketVm::incoming("rng-migrate-dst", READ_LOOP, &args);
    let src_out = src.migrate_into(&mut dst, &addr);
    assert!(src_out.status.success(), "{src_out}");
    let before = reads(&src_out.stdout).last().map_or(0, |r| r.0);

    // The guest reads on at the destination, from the destination's device.
    dst.wait_log(&format!("RNG={} ", before + 2));
    let counters = dst.api_json(&["counters"]);
    assert!(
        counters["rng"]["bytes"].as_u64().unwrap() >= 64,
        "{counters}"
    );
    assert_eq!(counters["rng"]["bad_chains"], 0, "{counters}");
    let _typist = type_line(&dst, "stop\n");
    let out = dst.wait();
    assert!(out.status.success(), "{out}");
    assert_eq!(out.script_status(), Some(0), "{out}");

    // Every read on either side got 64 bytes, not all zero, and no two were alike.
    let all = reads(&format!("{}{}", src_out.stdout, out.stdout));
    let numbers: Vec<u64> = all.iter().map(|r| r.0).collect();
    let expected: Vec<u64> = (1..=*numbers.last().unwrap()).collect();
    assert_eq!(
        numbers, expected,
        "\nSOURCE:\n{src_out}\nDESTINATION:\n{out}"
    );
    for (_, hex) in &all {
        assert_random_hex(hex, 64, &out.stdout);
    }
    let mut distinct: Vec<&String> = all.iter().map(|r| &r.1).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), all.len(), "a read repeated\n{out}");
}
