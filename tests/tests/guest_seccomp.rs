//! Seccomp, seen from outside: each kind of podvm thread that makes a call outside its list
//! ends the process (exit status 159) with one line naming the thread kind and the call.
//! The violation comes from podvm's test hook (`PODVM_SECCOMP_TEST_VIOLATION=<kind>`: that
//! thread calls `getcwd`, which the pod's profile allows and no thread's list does, right after
//! installing its filter).

use podvm_tests::{guest_command, kvm_available, run_command};

/// Boots a guest with the hook set for `kind` and returns podvm's outcome and what it
/// wrote to its termination message file (Kubernetes' `terminationMessagePath`).
fn violate(kind: &str) -> (podvm_tests::Outcome, String) {
    violate_with(kind, &[])
}

/// [`violate`], with more podvm arguments (`more`).
fn violate_with(kind: &str, more: &[&str]) -> (podvm_tests::Outcome, String) {
    let dir = podvm_tests::TempDir::new(&format!("seccomp-{kind}"));
    let termination_log = dir.file("termination-log", b"");
    // Were the thread not stopped, the guest would end at once, podvm with status 0.
    // The status thread exists only with a status port or a readiness file.
    let ready = dir.0.join("ready").display().to_string();
    let extra: &[&str] = if kind == "status" {
        &["--ready-file", &ready]
    } else {
        &[]
    };
    let extra: Vec<&str> = extra.iter().chain(more).copied().collect();
    let mut cmd = guest_command("echo NOT-STOPPED", &extra);
    cmd.env("PODVM_SECCOMP_TEST_VIOLATION", kind)
        .env("PODVM_TERMINATION_LOG", &termination_log);
    let out = run_command(cmd);
    (out, std::fs::read_to_string(&termination_log).unwrap())
}

#[test]
fn seccomp_each_thread_kind_dies_on_a_call_outside_its_list_with_a_line_naming_it() {
    if !kvm_available() {
        return;
    }
    // The announcer runs only at a migration's destination with a tap NIC; its violation
    // is checked by guest_migration's tap test.
    for kind in ["vcpu", "event-loop", "migration", "main", "status"] {
        let (out, message) = violate(kind);
        assert_eq!(out.status.code(), Some(159), "{kind}:\n{out}");
        let line = format!(
            "podvm: seccomp: the {kind} thread made system call getcwd (79) with arguments 0x"
        );
        assert!(
            out.stderr.contains(&line),
            "{kind}: no line {line:?}:\n{out}"
        );
        assert!(
            out.stderr
                .contains("which its filter does not allow; podvm stops (exit status 159"),
            "{kind}:\n{out}"
        );
        // The same line is the pod's termination message.
        assert!(
            message.starts_with(&line) && message.ends_with('\n') && message.lines().count() == 1,
            "{kind}: termination message {message:?}"
        );
    }
}

/// With `--log-format json` the line is a JSON object like podvm's other log lines (a log
/// pipeline parses every line); the termination message stays the plain line.
#[test]
fn seccomp_violation_in_a_json_log_is_a_json_line() {
    if !kvm_available() {
        return;
    }
    let (out, message) = violate_with("vcpu", &["--log-format", "json"]);
    assert_eq!(out.status.code(), Some(159), "{out}");
    let lines: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter(|l| l.contains("seccomp: the vcpu thread"))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}\n{out}")))
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    let line = &lines[0];
    assert_eq!(line["level"], "error", "{line}");
    assert_eq!(line["target"], "podvm_seccomp", "{line}");
    assert!(
        line["ts"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );
    assert!(
        line["msg"].as_str().is_some_and(|m| m.starts_with(
            "seccomp: the vcpu thread made system call getcwd (79) with arguments 0x"
        )),
        "{line}"
    );
    assert!(
        message.starts_with("podvm: seccomp: the vcpu thread made system call getcwd (79)"),
        "termination message {message:?}"
    );
}

/// `Name: value` of a /proc status file.
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in\n{status}"))
}

#[test]
fn seccomp_podvm_runs_as_the_pod_user_without_capabilities_and_every_thread_filtered() {
    if !kvm_available() {
        return;
    }
    // The family's test with the container image's static podvm.
    podvm_tests::use_image_binary();
    if !podvm_tests::pod::unprivileged() {
        return podvm_tests::skip(
            "the tests are not root (or PODVM_TEST_AS_ROOT=1 or PODVM_TEST_STRACE is set), so \
             podvm is not started as a pod's user here",
        );
    }
    let mut vm = podvm_tests::SocketVm::start(
        "seccomp-status",
        "while true; do sleep 1; done",
        &["--cpus", "2"],
    );
    let pid = vm.pid();
    // The main thread filters itself right after starting the others; give it a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (status, tasks) = loop {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let mut tasks = Vec::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let path = entry.unwrap().path().join("status");
            if let Ok(s) = std::fs::read_to_string(path) {
                tasks.push(s);
            }
        }
        let filtered = |s: &String| field(s, "Seccomp") == "2";
        if tasks.iter().all(filtered) || std::time::Instant::now() > deadline {
            break (status, tasks);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let report = vm.kill_and_report();
    assert_eq!(field(&status, "Uid"), "107\t107\t107\t107", "{status}");
    assert_eq!(field(&status, "Gid"), "107\t107\t107\t107", "{status}");
    assert_eq!(field(&status, "Groups"), "", "{status}");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            field(&status, caps),
            "0000000000000000",
            "{caps}:\n{status}"
        );
    }
    assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(field(&status, "Seccomp"), "2", "{status}");
    let mut names = Vec::new();
    for task in &tasks {
        let name = field(task, "Name");
        names.push(name.to_string());
        assert_eq!(
            field(task, "Seccomp"),
            "2",
            "thread {name}:\n{task}\n{report}"
        );
        // The pod's profile and the thread's own list (the main thread: its own and the
        // profile; others may also carry the filters of the thread that started them).
        let filters: u32 = field(task, "Seccomp_filters").parse().unwrap();
        assert!(filters >= 2, "thread {name} has {filters} filters:\n{task}");
    }
    for kind in ["vcpu0", "vcpu1", "event-loop", "migration"] {
        assert!(
            names.iter().any(|n| n == kind),
            "no {kind} thread in {names:?}"
        );
    }
}

#[test]
fn seccomp_log_mode_lets_a_refused_call_through_logs_it_and_counts_it_on_metrics() {
    if !kvm_available() {
        return;
    }
    let port = 20_000 + (std::process::id() % 1000) as u16;
    let listen = format!("127.0.0.1:{port}");
    // Each vCPU thread makes one call outside its list right after filtering itself (one
    // the pod's profile allows: a call the profile refuses fails with EPERM before the
    // thread's own filter can count it, as a container runtime's profile decides first).
    let mut vm = podvm_tests::SocketVm::start_env(
        "seccomp-log",
        "while true; do sleep 1; done",
        &[
            "--cpus",
            "2",
            "--seccomp",
            "log",
            "--status-listen",
            &listen,
        ],
        &[("PODVM_SECCOMP_TEST_VIOLATION", "vcpu")],
    );
    let (code, metrics) = podvm_tests::http_get(port, "/metrics");
    let running = vm.running();
    let stderr = vm.stderr_text();
    let report = vm.kill_and_report();
    assert_eq!(code, 200, "{metrics}\n{report}");
    assert!(running, "podvm ended:\n{report}");
    assert_eq!(
        podvm_tests::metric_sample(
            &metrics,
            "podvm_seccomp_violations_total{thread=\"vcpu\",syscall=\"getcwd\"}"
        ),
        2.0,
        "{metrics}"
    );
    // One line per vCPU, ending as log mode's lines end.
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.starts_with(
                "podvm: seccomp: the vcpu thread made system call getcwd (79) with arguments 0x",
            )
        })
        .collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    for line in lines {
        assert!(
            line.ends_with("which its filter does not allow; allowed by --seccomp log (counted in podvm_seccomp_violations_total)"),
            "{line}"
        );
    }
    // Nothing else was refused.
    let refused: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("podvm_seccomp_violations_total{"))
        .collect();
    assert_eq!(refused.len(), 1, "{metrics}");
}
