//! The control API against a running guest: info, pause/resume (the guest's progress and
//! clock stop), shutdown through the power button, stop, and requests that must not reach
//! the VM.

use std::time::{Duration, Instant};

use podvm_tests::{kvm_available, SocketVm};

/// A guest that prints a numbered tick with its uptime five times a second.
const TICKER: &str = "i=0\nwhile true; do i=$((i+1)); echo \"TICK $i $(cut -d' ' -f1 /proc/uptime)\"; sleep 0.2; done\n";

/// The (number, guest uptime) of every complete TICK line.
fn ticks(log: &str) -> Vec<(u64, f64)> {
    log.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("TICK ")?.split(' ');
            let n = w.next()?.parse().ok()?;
            let up = w.next()?.parse().ok()?;
            w.next().is_none().then_some((n, up))
        })
        .collect()
}

fn last_tick(vm: &SocketVm) -> u64 {
    ticks(&vm.log_text()).last().map_or(0, |t| t.0)
}

/// Waits until the guest prints a tick numbered above `after`.
fn wait_tick_after(vm: &mut SocketVm, after: u64) -> u64 {
    vm.wait_log(&format!("TICK {} ", after + 1));
    last_tick(vm)
}

#[test]
fn api_pause_stops_the_guest_and_its_clock_resume_continues_and_shutdown_is_clean() {
    if !kvm_available() {
        return;
    }
    let mut vm = SocketVm::start("api-pause", TICKER, &[]);
    wait_tick_after(&mut vm, 3);

    let info = vm.api_json(&["info"]);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["vcpus"], 1, "{info}");
    assert_eq!(info["console"]["kind"], "socket", "{info}");

    assert_eq!(vm.api_json(&["pause"])["state"], "paused");
    // The vCPUs write the UART themselves, and the console logs what they write before the
    // write returns: once pause has answered (every vCPU parked), everything the guest
    // printed is in the log.
    let printed = |vm: &SocketVm| {
        vm.api_json(&["counters"])["console"]["output_bytes"]
            .as_u64()
            .unwrap()
    };
    let at_pause = printed(&vm);
    assert_eq!(
        vm.log_len(),
        at_pause,
        "guest output still arriving after the pause"
    );
    let before = last_tick(&vm);
    let paused_at = Instant::now();
    let info = vm.api_json(&["info"]);
    assert_eq!(info["state"], "paused", "{info}");
    let paused_first = info["paused_s"].as_f64().unwrap();
    // A window in which a running guest prints about 15 ticks (it only makes the check below
    // meaningful: nothing waits for it to end).
    std::thread::sleep(Duration::from_secs(3));
    // Pausing twice is harmless.
    assert_eq!(vm.api_json(&["pause"])["state"], "paused");
    let info = vm.api_json(&["info"]);
    assert_eq!(info["state"], "paused", "{info}");
    assert_eq!(printed(&vm), at_pause, "the guest printed while paused");
    assert_eq!(vm.log_len(), at_pause, "the guest printed while paused");
    // The paused time grows while paused...
    let paused_last = info["paused_s"].as_f64().unwrap();
    assert!(paused_last > paused_first, "{paused_first} then {info}");

    assert_eq!(vm.api_json(&["resume"])["state"], "running");
    let wall_paused = paused_at.elapsed().as_secs_f64();
    // ...and stands still while running: the same total before and after the next tick.
    let paused_total = |vm: &SocketVm| vm.api_json(&["counters"])["vm"]["paused_s"].as_f64();
    let resumed = paused_total(&vm);
    // The guest goes on where it stopped: the next tick is the one after the last before
    // the pause.
    let after = wait_tick_after(&mut vm, before);
    assert_eq!(paused_total(&vm), resumed);
    assert!(
        resumed.unwrap() >= paused_last,
        "{resumed:?} < {paused_last}"
    );
    assert!(after > before);
    let t = ticks(&vm.log_text());
    let numbers: Vec<u64> = t.iter().map(|x| x.0).collect();
    assert_eq!(
        numbers,
        (1..=numbers.len() as u64).collect::<Vec<_>>(),
        "ticks lost or repeated across the pause"
    );
    let up = |n: u64| t.iter().find(|x| x.0 == n).map(|x| x.1).unwrap();
    let guest_gap = up(before + 1) - up(before);
    // The KVM clock is frozen while paused (the vcpu::control unit test checks that resume
    // writes back the value read at the pause): the guest's uptime should not see the
    // pause. Reported, not asserted (a time comparison fails on a loaded machine).
    eprintln!(
        "paused for {wall_paused:.2} s of wall time ({resumed:?} s by podvm's count); guest \
         uptime between tick {before} and the next advanced {guest_gap:.2} s"
    );

    let counters = vm.api_json(&["counters"]);
    assert_eq!(counters["vm"]["pauses"], 1, "{counters}");
    assert!(counters["console"]["output_bytes"].as_u64().unwrap() > 0);

    let answer = vm.api_json(&["shutdown"]);
    assert_eq!(answer["state"], "shutting-down", "{answer}");
    let out = vm.wait();
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("power button pressed"), "{out}");
    assert!(out.stderr.contains("by=\"API\""), "{out}");
    assert!(out.stderr.contains("guest powered off"), "{out}");
}

#[test]
fn api_shutdown_of_a_paused_guest_resumes_it_to_power_off_cleanly() {
    if !kvm_available() {
        return;
    }
    let mut vm = SocketVm::start("api-paused-shutdown", TICKER, &[]);
    wait_tick_after(&mut vm, 1);
    assert_eq!(vm.api_json(&["pause"])["state"], "paused");
    let answer = vm.api_json(&["shutdown", "--timeout", "120"]);
    assert_eq!(answer["timeout_s"], 120.0, "{answer}");
    let out = vm.wait();
    assert!(out.status.success(), "{out}");
    assert!(out.stderr.contains("resuming the paused guest"), "{out}");
    assert!(out.stdout.contains("power button pressed"), "{out}");
}

#[test]
fn api_shutdown_of_a_guest_that_ignores_the_button_stops_it_after_the_timeout() {
    if !kvm_available() {
        return;
    }
    let mut vm = SocketVm::start("api-ignored", &format!("killall acpid\n{TICKER}"), &[]);
    wait_tick_after(&mut vm, 1);
    // Long enough for the calls below to find the VM still there on a loaded machine (the
    // official CI once saw 3 s pass before the fourth call).
    let answer = vm.api_json(&["shutdown", "--timeout", "20"]);
    assert_eq!(answer["pressed"], true, "{answer}");
    assert_eq!(vm.api_json(&["info"])["state"], "shutting-down");
    // A second press changes nothing: the first deadline stands.
    let again = vm.api_json(&["shutdown", "--timeout", "100"]);
    assert_eq!(again["pressed"], false, "{again}");
    assert!(again["timeout_s"].as_f64().unwrap() <= 20.0, "{again}");
    // Nor can a VM that is shutting down be paused.
    let out = vm.api(&["pause"]);
    assert!(
        out.stderr.contains("409") && out.stderr.contains("shutting down"),
        "{out}"
    );
    let out = vm.wait();
    assert_eq!(out.status.code(), Some(4), "{out}");
    assert!(
        out.stderr
            .contains("did not power off within the shutdown timeout"),
        "{out}"
    );
    assert!(!out.stdout.contains("power button pressed"), "{out}");
}

/// The status code of a raw HTTP answer.
fn status(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

#[test]
fn api_bad_requests_get_errors_and_the_guest_runs_on() {
    if !kvm_available() {
        return;
    }
    // The family's test with the container image's static podvm.
    podvm_tests::use_image_binary();
    let mut vm = SocketVm::start("api-bad", TICKER, &[]);
    wait_tick_after(&mut vm, 1);

    // A client that connects and says nothing, held open while the others are served.
    let silent = std::os::unix::net::UnixStream::connect(&vm.api).unwrap();
    let connected = Instant::now();

    let cases: &[(&[u8], u16, &str)] = &[
        (b"GET /v1/nope HTTP/1.1\r\n\r\n", 404, "no endpoint"),
        (b"DELETE /v1/vm HTTP/1.1\r\n\r\n", 405, "Allow: GET"),
        (b"GET /v1/vm/stop HTTP/1.1\r\n\r\n", 405, "Allow: PUT"),
        (
            b"PUT /v1/vm/shutdown HTTP/1.1\r\nContent-Length: 9\r\n\r\n{not json",
            400,
            "bad JSON",
        ),
        (
            b"PUT /v1/vm/shutdown HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"grace\": 1}",
            400,
            "unknown field",
        ),
        (
            b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n",
            413,
            "body longer",
        ),
        (
            b"GET /v1/vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            411,
            "Content-Length",
        ),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
            400,
            "malformed",
        ),
        (b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n", 400, "ended before"),
    ];
    for (request, code, says) in cases {
        let request = *request;
        let answer = if *code == 400 && says == &"ended before" {
            // A request cut short: the client half-closes its side.
            let mut s = std::os::unix::net::UnixStream::connect(&vm.api).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            use std::io::{Read, Write};
            s.write_all(request).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            let mut a = String::new();
            s.read_to_string(&mut a).unwrap();
            a
        } else {
            vm.raw_api(request)
        };
        assert_eq!(status(&answer), *code, "{answer}");
        assert!(answer.contains(says), "{answer}");
    }
    // A body that really is that large.
    let mut huge = b"PUT /v1/vm/stop HTTP/1.1\r\nContent-Length: 200000\r\n\r\n".to_vec();
    huge.resize(huge.len() + 200_000, b'{');
    assert_eq!(status(&vm.raw_api(&huge)), 413);

    // Too many idle clients: the ones past the limit are turned away, the VM is not touched.
    let idle: Vec<_> = (0..40)
        .map(|_| std::os::unix::net::UnixStream::connect(&vm.api).unwrap())
        .collect();
    // With the silent client, the last one is past the limit: its answer, at once, is the
    // event that the API has seen them all.
    {
        use std::io::Read;
        let mut last = idle.last().unwrap();
        last.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut answer = String::new();
        last.read_to_string(&mut answer).unwrap();
        assert_eq!(status(&answer), 503, "{answer}");
        assert!(answer.contains("too many API connections"), "{answer}");
    }
    drop(idle);
    // Until the API has seen them go, a new client is turned away too: wait for that.
    let deadline = Instant::now() + podvm_tests::run_timeout();
    while status(&vm.raw_api(b"GET /v1/vm HTTP/1.1\r\n\r\n")) == 503 {
        if Instant::now() > deadline {
            vm.hang("the API never dropped its closed idle clients");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // None of that reached the VM; the API still answers and the guest still ticks.
    let info = vm.api_json(&["info"]);
    assert_eq!(info["state"], "running", "{info}");
    let now = last_tick(&vm);
    wait_tick_after(&mut vm, now);

    // The silent client is answered 408 and dropped after the request timeout.
    {
        use std::io::Read;
        let mut silent = silent;
        silent
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut answer = String::new();
        silent.read_to_string(&mut answer).unwrap();
        assert_eq!(status(&answer), 408, "{answer}");
        eprintln!(
            "silent client dropped after {:.1} s",
            connected.elapsed().as_secs_f64()
        );
    }
    let counters = vm.api_json(&["counters"]);
    assert!(
        counters["api"]["timeouts"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    assert!(
        counters["api"]["refused"].as_u64().unwrap() >= 1,
        "{counters}"
    );
    assert!(
        counters["api"]["errors"].as_u64().unwrap() >= 10,
        "{counters}"
    );

    // A wrong action name is the CLI's to refuse.
    let out = vm.api(&["reboot"]);
    assert_eq!(out.status.code(), Some(2), "{out}");

    // Stop: no cooperation from the guest, exit 1, and the sockets are gone.
    let answer = vm.api_json(&["stop"]);
    assert_eq!(answer["state"], "stopping");
    let api = vm.api.clone();
    let console = vm.console.clone();
    let out = vm.wait();
    assert_eq!(out.status.code(), Some(4), "{out}");
    assert!(
        out.stderr.contains("podvm: error: the guest was stopped"),
        "{out}"
    );
    assert!(
        !api.exists() && !console.exists(),
        "sockets outlived the VM"
    );
}
