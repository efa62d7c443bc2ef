//! What the tests tell the test bed beyond pass and fail: a retry, a skip, a heartbeat.
//!
//! libtest captures what a test prints with `eprintln!` and shows it only when the test
//! fails, so a retry or a skip inside a test that then passed would be invisible. These
//! lines are written to the process's stderr directly (`std::io::stderr().write_all`, which
//! libtest does not capture), each on a line of its own:
//!
//! - `PODVM-RETRY layer=harness test=NAME reason=...`: the harness booted a guest once more;
//!   tests/sandbox/cargo-runner, which sees the sandbox's output, copies it into the retry
//!   log (`PODVM_TEST_RETRY_LOG`) that tests/run.sh summarises;
//! - `PODVM-SKIP test=NAME reason=...`: a test skipped (only without `PODVM_REQUIRE_KVM=1`,
//!   under which a skip is a failure);
//! - `PODVM-HEARTBEAT test=NAME has run for N s`: inside the KVM sandbox, every [`heartbeat`],
//!   so the sandbox's silence limit (`PODVM_SANDBOX_SILENCE`, 600 s) never ends a test that
//!   waits: a stuck podvm meets the harness's own timeouts, which report its threads and
//!   fail the test. A wedged sandbox stops its heartbeat too, so the limit still catches it.
//!
//! The runner removes these lines from the text it parses for libtest's results (a line
//! may have cut `test NAME ... ` from its `ok`); the rules are in tests/sandbox/README.md.

use std::io::Write;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// How often a test inside the KVM sandbox prints a heartbeat line: every 120 s, or a
/// quarter of the sandbox's silence limit (`PODVM_SANDBOX_SILENCE`, passed in by the
/// runner) if that is shorter.
pub fn heartbeat() -> Duration {
    let silence = std::env::var("PODVM_SANDBOX_SILENCE")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(600);
    Duration::from_secs((silence / 4).clamp(1, 120))
}

/// Whether the test bed may run something again (`PODVM_TEST_RETRIES=0` turns every retry
/// layer off: this harness's and cargo-runner's).
pub fn retries_enabled() -> bool {
    std::env::var("PODVM_TEST_RETRIES").as_deref() != Ok("0")
}

/// Whether a skipped precondition is a failure here (`PODVM_REQUIRE_KVM=1`, set by CI).
pub fn skips_forbidden() -> bool {
    std::env::var("PODVM_REQUIRE_KVM").as_deref() == Ok("1")
}

/// The running test's name (libtest names each test's thread after it).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("unknown")
        .to_string()
}

/// One line on the real stderr, past libtest's capture, on a line of its own.
fn announce(line: &str) {
    let one_line = line.replace(['\n', '\r'], " ");
    let _ = std::io::stderr().write_all(format!("\n{one_line}\n").as_bytes());
}

/// Records that the harness runs something again, and why (see the module doc).
pub(crate) fn log_retry(reason: &str) {
    announce(&format!(
        "PODVM-RETRY layer=harness test={} reason={reason}",
        test_name()
    ));
}

/// Ends a test whose precondition `why` does not hold here: a loud skip, or a failure under
/// `PODVM_REQUIRE_KVM=1`. Call it and `return`:
///
/// ```ignore
/// if !have("setpriv") {
///     return podvm_tests::skip("needs setpriv (util-linux)");
/// }
/// ```
pub fn skip(why: &str) {
    if skips_forbidden() {
        panic!("PODVM_REQUIRE_KVM=1 and this test cannot run here: {why}");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
    announce(&format!("PODVM-SKIP test={} reason={why}", test_name()));
}

/// The test that last started inside the KVM sandbox, and when (tests run one at a time
/// there), for the heartbeat line.
static CURRENT: Mutex<Option<(String, Instant)>> = Mutex::new(None);

/// Inside the KVM sandbox, notes that the calling test starts and starts (once per test
/// binary) a thread that prints a heartbeat line every [`heartbeat`] naming it, so waiting
/// is never mistaken for a wedged sandbox.
pub(crate) fn start_heartbeat() {
    static STARTED: Once = Once::new();
    if let Ok(mut current) = CURRENT.lock() {
        *current = Some((test_name(), Instant::now()));
    }
    STARTED.call_once(|| {
        let every = heartbeat();
        let _ = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let line = match CURRENT.lock().ok().and_then(|c| c.clone()) {
                    Some((test, since)) => format!(
                        "PODVM-HEARTBEAT test={test} has run for {} s",
                        since.elapsed().as_secs()
                    ),
                    None => "PODVM-HEARTBEAT".to_string(),
                };
                announce(&line);
            });
    });
}

/// What in podvm's output rules out booting a guest once more: these are podvm's faults or
/// the guest's, never the sandbox losing a guest (tests/sandbox/README.md, "Retries").
pub(crate) fn never_retried(stdout: &str, stderr: &str, status: &str) -> Option<&'static str> {
    let all = [stdout, stderr, status];
    let has = |s: &str| all.iter().any(|t| t.contains(s));
    if has("podvm: seccomp:") || has("SIGSYS") {
        Some("a seccomp kill")
    } else if has("panicked at") || has("SIGABRT") {
        Some("a podvm panic")
    } else if has("triple-faulted") || has("triple fault") {
        Some("a triple fault")
    } else {
        None
    }
}

/// Whether a guest that never reached its script is booted once more: `Ok(reason)` only
/// inside the KVM sandbox, with retries on (`PODVM_TEST_RETRIES` not 0), when the harness
/// had to kill a podvm that was still running at the boot timeout (`stalled`: its threads
/// then), no vCPU thread of it waited on a lock (a podvm deadlock, not a lost guest) and
/// its output shows no seccomp kill, panic or triple fault. A podvm that exited by itself
/// before the script (an error, a signal, the guest's reset or power-off) is never booted
/// again: that is podvm's or the guest's doing, not the sandbox's. `Err(Some(why))` says
/// why a sandbox boot failure is not retried.
pub(crate) fn boot_retry(
    stalled: Option<&str>,
    stdout: &str,
    stderr: &str,
    status: &str,
) -> Result<String, Option<String>> {
    if std::env::var_os("PODVM_IN_SANDBOX").is_none() {
        return Err(None);
    }
    if !retries_enabled() {
        return Err(Some("PODVM_TEST_RETRIES=0".into()));
    }
    if let Some(fault) = never_retried(stdout, stderr, status) {
        return Err(Some(format!("podvm's output shows {fault}")));
    }
    let Some(threads) = stalled else {
        return Err(Some(format!(
            "podvm exited by itself ({status}), it was not the sandbox losing the guest"
        )));
    };
    if let Some(thread) = vcpu_on_a_lock(threads) {
        return Err(Some(format!(
            "a vCPU thread waited on a lock (futex), podvm's doing: {thread}"
        )));
    }
    Ok(format!(
        "the guest stalled before its script: podvm was still running after {:?} and was \
         killed",
        crate::boot_timeout()
    ))
}

/// The line of a thread report (see `thread_report` in lib.rs: `TID NAME: STATE wchan=...
/// syscall=NR ...`) of a vCPU thread blocked in futex (system call 202): waiting on a lock
/// of podvm's, not running its guest (a vCPU runs its guest in ioctl, 16).
pub(crate) fn vcpu_on_a_lock(threads: &str) -> Option<&str> {
    threads.lines().map(str::trim).find(|line| {
        let mut words = line.split_whitespace();
        let name = words.nth(1).unwrap_or("");
        name.starts_with("vcpu") && line.contains(" syscall=202 ")
    })
}

#[cfg(test)]
mod tests {
    use super::{never_retried, vcpu_on_a_lock};

    #[test]
    fn a_vcpu_waiting_on_a_lock_is_found_in_a_thread_report() {
        let running = "  122 vcpu0: S (sleeping) wchan=kvm_vcpu_block syscall=16 0xb 0xae80 \
                       stack=kvm_vcpu_block+0x52/0xc0\n  120 podvm: S (sleeping) wchan=futex \
                       syscall=202 0x7f 0x80 stack=\n";
        assert_eq!(vcpu_on_a_lock(running), None);
        let locked =
            "  123 vcpu1: S (sleeping) wchan=futex_wait_queue syscall=202 0x7f 0x80 stack=";
        assert_eq!(vcpu_on_a_lock(locked), Some(locked.trim()));
    }

    #[test]
    fn podvm_faults_are_never_retried() {
        let seccomp = "podvm: seccomp: the vcpu thread made system call getcwd (79)";
        assert_eq!(never_retried("", seccomp, ""), Some("a seccomp kill"));
        assert_eq!(
            never_retried("", "", "signal: 31 (SIGSYS) (core dumped)"),
            Some("a seccomp kill")
        );
        let panic = "thread 'vcpu0' panicked at vmm/src/vcpu/mod.rs:1:1:";
        assert_eq!(never_retried("", panic, ""), Some("a podvm panic"));
        let fault = "INFO vcpu: guest triple-faulted vcpu=0";
        assert_eq!(never_retried("", fault, ""), Some("a triple fault"));
        assert_eq!(never_retried("booting", "", "signal: 9 (SIGKILL)"), None);
    }
}
