//! Harness for podvm's integration tests: find the binary and the test guest, decide whether
//! guests can boot here, run podvm with a time limit and collect what it printed.
//!
//! Guest-booting tests live in `tests/guest_*.rs`. On a host with hardware KVM they run
//! directly; on a host whose KVM cannot run a stock kernel (PVM), cargo's runner
//! (`tests/sandbox/cargo-runner`) ships the whole test binary into the KVM sandbox, where
//! `PODVM_IN_SANDBOX=1` is set. Where neither works, tests skip loudly, and fail instead
//! when `PODVM_REQUIRE_KVM=1` (see [`skip`]). Retries, skips and heartbeats are reported
//! past libtest's capture ([`testbed`]); the rules are in tests/sandbox/README.md, "Retries".

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use base64::Engine;

mod bounded;
pub mod netns;
pub mod pod;
pub mod testbed;

pub use bounded::{join_within, read_within, wait_within};

pub use testbed::skip;

/// podvm's default kernel command line (kept equal to `vmm::config::DEFAULT_CMDLINE`).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

std::thread_local! {
    /// Whether the calling test runs the container image's podvm ([`use_image_binary`]).
    static IMAGE_BINARY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The static podvm that goes into the container image (`resources/image/build.sh` builds
/// the same), named by `PODVM_IMAGE_BIN`: tests/run.sh builds it before the tests.
pub fn image_binary() -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("PODVM_IMAGE_BIN")?);
    path.exists().then_some(path)
}

/// Makes the calling test (its thread: every podvm it starts through this harness) run the
/// image's static podvm instead of the build's, so each feature family is proven with the
/// binary users get too. Without `PODVM_IMAGE_BIN` the test runs the build's podvm, loudly,
/// and under `PODVM_REQUIRE_KVM=1` (CI) that is a failure ([`skip`]).
pub fn use_image_binary() {
    if image_binary().is_none() {
        skip(
            "PODVM_IMAGE_BIN does not name the image's static podvm (tests/run.sh builds it \
             and sets it); this test runs the build's podvm instead",
        );
        return;
    }
    IMAGE_BINARY.with(|on| on.set(true));
}

/// The `podvm` binary the calling test runs: the image's static one after
/// [`use_image_binary`], otherwise the one of the same build as this test binary
/// (`target/<profile>/podvm`).
pub fn podvm_bin() -> PathBuf {
    if IMAGE_BINARY.with(|on| on.get()) {
        if let Some(path) = image_binary() {
            return path;
        }
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/podvm
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("podvm"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p launcher` (tests/run.sh does)",
        bin.display()
    );
    bin
}

/// The test guest: a Debian cloud kernel and the busybox initramfs of `tests/guest/`.
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The test guest from `PODVM_GUEST_DIR`, or `target/guest` (built by `tests/guest/build.sh`).
pub fn guest() -> Guest {
    let dir = std::env::var_os("PODVM_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/guest"));
    let g = Guest {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initramfs.cpio.gz"),
    };
    assert!(
        g.kernel.exists() && g.initrd.exists(),
        "test guest missing in {}: run tests/guest/build.sh",
        dir.display()
    );
    g
}

/// How guests boot here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// The host's KVM is Intel or AMD hardware virtualization.
    Hardware,
    /// Inside the KVM sandbox (QEMU TCG with emulated SVM).
    Sandbox,
}

fn host_kvm() -> Option<KvmKind> {
    if !Path::new("/dev/kvm").exists() {
        return None;
    }
    if std::env::var_os("PODVM_IN_SANDBOX").is_some() {
        return Some(KvmKind::Sandbox);
    }
    let hw = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists());
    (hw && !Path::new("/sys/module/kvm_pvm").exists()).then_some(KvmKind::Hardware)
}

/// Whether guest tests can run here. Prints once how they run (inside the KVM sandbox, it
/// starts the heartbeat: see [`testbed`]); when they cannot, [`skip`]s (a failure under
/// `PODVM_REQUIRE_KVM=1`).
pub fn kvm_available() -> bool {
    static SAID: Once = Once::new();
    let kind = host_kvm();
    SAID.call_once(|| match kind {
        Some(KvmKind::Hardware) => eprintln!("guest tests: running directly on hardware KVM"),
        Some(KvmKind::Sandbox) => {
            eprintln!("guest tests: running inside the KVM sandbox (QEMU TCG, emulated SVM)")
        }
        None => {}
    });
    match kind {
        Some(KvmKind::Sandbox) => testbed::start_heartbeat(),
        Some(KvmKind::Hardware) => {}
        None => skip(
            "no guest can boot here: no hardware KVM and not inside the KVM sandbox (run \
             through `cargo test`, whose runner uses tests/sandbox)",
        ),
    }
    kind.is_some()
}

/// What a podvm run left behind.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// The harness killed podvm because its guest did not reach its script in time: podvm's
    /// threads just before.
    boot_stalled: Option<String>,
}

impl Outcome {
    /// The status the guest's `podvm.exec` script exited with (its `PODVM-EXIT n` line).
    pub fn script_status(&self) -> Option<i32> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim().strip_prefix("PODVM-EXIT "))
            .filter_map(|s| s.trim().parse().ok())
            .next_back()
    }

    /// The value of the first stdout line that starts with `key=`.
    pub fn value(&self, key: &str) -> Option<String> {
        let prefix = format!("{key}=");
        self.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix).map(str::to_string))
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "podvm exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// How every harness panic for something that never finished starts: tests/sandbox/
/// cargo-runner runs such a test once more (inside the KVM sandbox only), and no other
/// failed test (tests/sandbox/README.md, "Retries").
pub const HANG: &str = "hang:";

/// Longest a single podvm run may take before the harness kills it (nested TCG is slow).
/// Inside the KVM sandbox the heartbeat (see [`testbed`]) keeps the sandbox's silence
/// limit from ending the test first, so a stuck podvm fails its test with the report of
/// its threads. Tests bound their own waits with it too ([`join_within`], [`wait_within`],
/// [`read_within`]).
pub fn run_timeout() -> Duration {
    let secs = std::env::var("PODVM_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

/// Runs `podvm` with `args`, stdin closed, and waits for it (killing it after the timeout).
pub fn run_podvm(args: &[&str]) -> Outcome {
    let mut cmd = Command::new(podvm_bin());
    cmd.args(args);
    run_command(cmd)
}

/// Runs a prepared command with stdin closed and collects its output, killing it after the
/// harness timeout.
pub fn run_command(cmd: Command) -> Outcome {
    run_watched(cmd, false, false, |_, _, _| {})
}

/// The last `max` bytes of `text` or a little fewer (cut at a character boundary), for
/// failure messages.
pub fn tail(text: &str, max: usize) -> &str {
    let cut = (text.len().saturating_sub(max)..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[cut..]
}

/// Runs the guest command `make` builds (from [`guest_command`]) under the harness timeout;
/// in the KVM sandbox a guest that never reached its script is booted once more, as for
/// [`run_guest_script`].
pub fn run_guest(mut make: impl FnMut() -> Command) -> Outcome {
    run_guest_with_retry(|| run_watched(make(), true, false, |_, _, _| {}))
}

/// Runs `cmd` under the harness timeout. Each stdout line goes to `on_line` as it arrives,
/// with the child's stdin (piped when `stdin_piped`, else closed) and its pid, so a test can
/// type or signal in response; everything printed is returned.
fn run_watched(
    mut cmd: Command,
    watch_boot: bool,
    stdin_piped: bool,
    mut on_line: impl FnMut(&str, &mut Option<ChildStdin>, i32) + Send + 'static,
) -> Outcome {
    use std::io::{BufRead, BufReader};

    cmd.stdin(if stdin_piped {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn podvm");
    let pid = child.id() as i32;
    let mut stdin = child.stdin.take();
    let stdout = child.stdout.take().expect("stdout");
    let stderr = reader(child.stderr.take().expect("stderr"));
    let started = Arc::new(AtomicBool::new(!watch_boot));
    let started_seen = started.clone();
    let watcher = std::thread::spawn(move || {
        let mut seen = String::new();
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let line = String::from_utf8_lossy(&line).replace('\r', "");
            if line.contains(SCRIPT_START) {
                started_seen.store(true, Ordering::Release);
            }
            on_line(&line, &mut stdin, pid);
            seen.push_str(&line);
            seen.push('\n');
        }
        seen
    });
    let status = wait_with_timeout(&mut child, run_timeout(), &started);
    let threads = match status {
        Some(_) => String::new(),
        None => thread_report(pid),
    };
    let boot_timed_out = status.is_none() && !started.load(Ordering::Acquire);
    let boot_stalled = boot_timed_out.then(|| threads.clone());
    let outcome = Outcome {
        status: status.unwrap_or_else(|| {
            let _ = child.kill();
            child.wait().expect("wait after kill")
        }),
        stdout: watcher.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
        boot_stalled,
    };
    match status {
        Some(_) => {}
        None if boot_timed_out => {
            eprintln!(
                "guest did not reach its script within {:?}; killed. podvm's threads before \
                 the kill:\n{threads}",
                boot_timeout()
            );
        }
        None => panic!(
            "{HANG} podvm did not finish within {:?}; killed. Its threads before the kill \
             (name, state, kernel wait, system call, kernel stack):\n{threads}{outcome}",
            run_timeout()
        ),
    }
    outcome
}

/// What each thread of process `pid` is doing: name, state, kernel wait channel, system call
/// and the top of its kernel stack, for the report of a VM that hangs (a vCPU in KVM_RUN,
/// system call 16 = ioctl, runs its guest; a thread in futex waits for a lock).
pub fn thread_report(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", pid)) else {
        return String::new();
    };
    let mut out = String::new();
    for task in tasks.flatten() {
        let read = |f: &str| {
            std::fs::read_to_string(task.path().join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let status = read("status");
        let state = status
            .lines()
            .find_map(|l| l.strip_prefix("State:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let syscall: String = read("syscall")
            .split(' ')
            .take(3)
            .collect::<Vec<_>>()
            .join(" ");
        // The kernel stack (root only): where in KVM_RUN a vCPU is, or what a thread waits on.
        let stack: Vec<String> = read("stack")
            .lines()
            .take(6)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect();
        out.push_str(&format!(
            "  {} {}: {} wchan={} syscall={} stack={}\n",
            task.file_name().to_string_lossy(),
            read("comm"),
            state,
            read("wchan"),
            syscall,
            stack.join("<")
        ));
    }
    out
}

fn reader(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).replace('\r', "")
    })
}

/// Waits for `child` up to `timeout`, and only up to the boot timeout while `started` is
/// false.
pub(crate) fn wait_with_timeout(
    child: &mut Child,
    timeout: Duration,
    started: &AtomicBool,
) -> Option<ExitStatus> {
    let begin = Instant::now();
    let deadline = begin + timeout;
    let boot_deadline = begin + boot_timeout();
    while Instant::now() < deadline {
        if !started.load(Ordering::Acquire) && Instant::now() > boot_deadline {
            return None;
        }
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The kernel command line that makes the test guest run `script` and power off.
pub fn exec_cmdline(script: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(script);
    format!("{DEFAULT_CMDLINE} quiet podvm.exec={encoded}")
}

/// The command that starts a podvm that runs a VM: podvm itself or, with
/// `PODVM_TEST_STRACE=DIR`, podvm under `strace -f -ff -o DIR/podvm` (one file per thread:
/// what each thread kind really calls, tallied by tests/sandbox/cargo-runner; see
/// seccomp/usage.sh). Traced podvms run as the tests' user, without the pod's profile,
/// which forbids ptrace.
pub fn vm_command() -> Command {
    match std::env::var_os("PODVM_TEST_STRACE") {
        Some(dir) => {
            let mut cmd = Command::new("strace");
            cmd.args(["-f", "-ff", "-qq", "-o"])
                .arg(Path::new(&dir).join("podvm"))
                .arg(podvm_bin());
            cmd
        }
        None => Command::new(podvm_bin()),
    }
}

/// The podvm command that boots the test guest running `script`, with `extra` arguments.
/// The guest's /init runs it under `set -eu` and, when it fails, prints the failing line
/// (tests/guest/README.md, "Running a script"); the line numbers it gives count the
/// [`SCRIPT_START`] line put first, so they are one more than in `script`.
pub fn guest_command(script: &str, extra: &[&str]) -> Command {
    guest_command_with_cmdline(
        &exec_cmdline(&format!("echo {SCRIPT_START}\n{script}")),
        extra,
    )
}

/// The podvm command that boots the test guest with kernel command line `cmdline`, with
/// `extra` arguments.
fn guest_command_with_cmdline(cmdline: &str, extra: &[&str]) -> Command {
    let g = guest();
    let mut cmd = vm_command();
    cmd.args(["run", "--kernel"])
        .arg(&g.kernel)
        .arg("--initrd")
        .arg(&g.initrd)
        .args(["--cmdline", cmdline])
        .args(extra);
    // As root, podvm runs as a VM pod's user would (see `pod`).
    pod::confine(&mut cmd);
    cmd
}

/// The first line every harness guest script prints: the guest reached its script.
pub const SCRIPT_START: &str = "PODVM-SCRIPT-START";

/// How long a guest may take to reach its script before the harness calls the boot failed.
pub fn boot_timeout() -> Duration {
    let secs = std::env::var("PODVM_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(240);
    Duration::from_secs(secs)
}

/// Runs a guest command built by `make`; in the KVM sandbox, a guest that stalled before its
/// script (nested SVM under TCG has lost guests during early boot: a stall before /init) is
/// booted once more, loudly and logged (see [`testbed::boot_retry`]). Anything that happens after
/// the script started is never retried.
fn run_guest_with_retry(mut make: impl FnMut() -> Outcome) -> Outcome {
    let first = make();
    if first.stdout.contains(SCRIPT_START) {
        return first;
    }
    let status = first.status.to_string();
    match testbed::boot_retry(
        first.boot_stalled.as_deref(),
        &first.stdout,
        &first.stderr,
        &status,
    ) {
        Ok(reason) => {
            eprintln!("*** {reason}; booting it once more. First attempt:\n{first}");
            testbed::log_retry(&reason);
            make()
        }
        Err(why) => {
            if let Some(why) = why {
                eprintln!("*** guest never reached its script: {why}; not booted again ***");
            }
            first
        }
    }
}

/// Boots the test guest running `script`, and each time a console line contains the first
/// element of a pair in `replies`, types the second element on podvm's stdin (the console).
pub fn run_guest_interactive(script: &str, replies: &[(&str, &str)]) -> Outcome {
    use std::io::Write;

    let replies: Vec<(String, String)> = replies
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    run_guest_with_retry(|| {
        let replies = replies.clone();
        run_watched(
            guest_command(script, &[]),
            true,
            true,
            move |line, stdin, _| {
                for (prompt, reply) in &replies {
                    if let (true, Some(stdin)) = (line.contains(prompt.as_str()), stdin.as_mut()) {
                        let _ = stdin.write_all(reply.as_bytes());
                        let _ = stdin.flush();
                    }
                }
            },
        )
    })
}

/// Boots the test guest without a script, as the demo does (its `/init` configures the NIC
/// and starts a shell on the console), with `extra` podvm arguments; types `input` into the
/// shell once `/init` says it starts it, and returns what happened (`exit` in `input` ends
/// the VM).
pub fn run_guest_shell(extra: &[&str], input: &str) -> Outcome {
    use std::io::Write;

    let cmd = guest_command_with_cmdline(&format!("{DEFAULT_CMDLINE} quiet"), extra);
    let input = input.to_string();
    run_watched(cmd, false, true, move |line, stdin, _| {
        if let (true, Some(stdin)) = (line.contains("starting a shell"), stdin.as_mut()) {
            let _ = stdin.write_all(input.as_bytes());
            let _ = stdin.flush();
        }
    })
}

/// Boots the test guest running `script` with `extra` podvm arguments, and sends podvm the
/// signal `signo` once a console line contains `marker`.
pub fn run_guest_signal_on(script: &str, extra: &[&str], marker: &str, signo: i32) -> Outcome {
    run_guest_with_retry(|| {
        let marker = marker.to_string();
        run_watched(
            guest_command(script, extra),
            true,
            false,
            move |line, _, pid| {
                if line.contains(&marker) {
                    // SAFETY: kill has no memory-safety preconditions; `pid` is our unreaped child.
                    unsafe { libc::kill(pid, signo) };
                }
            },
        )
    })
}

/// Boots the test guest with `extra` podvm arguments, runs `script` in it, and returns what
/// happened.
pub fn run_guest_script(script: &str, extra: &[&str]) -> Outcome {
    run_guest_with_retry(|| run_watched(guest_command(script, extra), true, false, |_, _, _| {}))
}

/// The test guest's files and kernel arguments, for a VMI's `kernelBoot`.
pub struct VmiGuest {
    pub kernel: String,
    pub initrd: String,
    /// podvm's default command line with the script to run.
    pub kernel_args: String,
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir, its own even when another of the process
    /// has the same name (a test's and its VM's: the second one used to empty the first).
    pub fn new(name: &str) -> Self {
        static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("podvm-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        pod::give(&dir);
        Self(dir)
    }

    /// Writes `bytes` to `name` in the directory; returns the path as a string.
    pub fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("write temp file");
        pod::give(&path);
        path.to_str().expect("utf-8 path").to_string()
    }

    /// Creates a sparse file of `size` bytes; returns the path as a string.
    pub fn sparse(&self, name: &str, size: u64) -> String {
        let path = self.0.join(name);
        std::fs::File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create sparse file");
        pod::give(&path);
        path.to_str().expect("utf-8 path").to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic bytes for disk contents (xorshift64), so host and guest checks agree.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of a file, in hex, from the `sha256sum` of the host (coreutils or busybox).
pub fn sha256_file(path: &str) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(
        out.status.success(),
        "sha256sum {path} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// A [`SocketVm`] whose guest did not reach its script.
struct BootFailure {
    /// What was waited for and what happened instead (with podvm's exit status if it exited).
    why: String,
    /// podvm was still running at the boot timeout.
    timed_out: bool,
    threads: String,
    stderr: String,
    console: String,
}

impl std::fmt::Display for BootFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "guest did not reach its script: {}\nstderr:\n{}\nthreads:\n{}\nconsole log:\n{}",
            self.why, self.stderr, self.threads, self.console
        )
    }
}

/// A guest running in the background with its console on a socket (every byte also in a log
/// file) and the control API on another socket: for tests that attach, detach and call the
/// API while the guest runs.
pub struct SocketVm {
    pub dir: TempDir,
    pub console: PathBuf,
    pub log: PathBuf,
    pub api: PathBuf,
    child: Option<Child>,
    /// podvm's stderr goes to a file, so a failure seen through `&self` (an API call to a
    /// VM that is gone) can still say what podvm printed last.
    stderr: PathBuf,
}

impl SocketVm {
    /// Boots the test guest running `script` with `extra` podvm arguments and returns once
    /// the script has started. In the KVM sandbox a guest that never reaches its script is
    /// booted once more (see [`run_guest_script`]).
    pub fn start(name: &str, script: &str, extra: &[&str]) -> Self {
        Self::start_env(name, script, extra, &[])
    }

    /// [`SocketVm::start`] with more environment variables for podvm.
    pub fn start_env(name: &str, script: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with_retry(|| {
            Self::spawn(TempDir::new(name), script, extra, env).until_script_started()
        })
    }

    /// Runs `attempt` (which spawns a podvm and waits for its script); in the KVM sandbox
    /// a guest that stalled before its script is booted once more, loudly and logged, under
    /// the rules of [`testbed::boot_retry`].
    fn start_with_retry(attempt: impl Fn() -> Result<Self, BootFailure>) -> Self {
        let first = match attempt() {
            Ok(vm) => return vm,
            Err(first) => first,
        };
        let stalled = first.timed_out.then_some(first.threads.as_str());
        match testbed::boot_retry(stalled, &first.console, &first.stderr, &first.why) {
            Ok(reason) => {
                eprintln!("*** {reason}; booting it once more. First attempt:\n{first}");
                testbed::log_retry(&reason);
                attempt().unwrap_or_else(|e| panic!("{e}"))
            }
            Err(Some(why)) => panic!("{first}\n(not booted again: {why})"),
            Err(None) => panic!("{first}"),
        }
    }

    /// Waits for the script to start; if it does not, kills podvm and says why.
    fn until_script_started(mut self) -> Result<Self, BootFailure> {
        match self.try_wait_log(SCRIPT_START, boot_timeout()) {
            Ok(_) => Ok(self),
            Err(why) => {
                let timed_out = self.running();
                let threads = self.threads();
                self.kill();
                Err(BootFailure {
                    why,
                    timed_out,
                    threads,
                    stderr: self.take_stderr(),
                    console: self.log_text(),
                })
            }
        }
    }

    /// A podvm built like a guest started with `script` and `extra`, waiting for a
    /// migration on `unix:<its dir>/migration.sock` (returned with it) instead of booting.
    pub fn incoming(name: &str, script: &str, extra: &[&str]) -> (Self, String) {
        Self::incoming_env(name, script, extra, &[])
    }

    /// [`SocketVm::incoming`] with more environment variables for podvm.
    pub fn incoming_env(
        name: &str,
        script: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Self, String) {
        let dir = TempDir::new(name);
        let socket = dir.0.join("migration.sock");
        let addr = format!("unix:{}", socket.display());
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["--incoming", &addr]);
        let mut vm = Self::spawn(dir, script, &args, env);
        let deadline = Instant::now() + boot_timeout();
        while !socket.exists() {
            if let Some(status) = vm.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "the destination podvm exited ({status}) before listening\nstderr:\n{}",
                    vm.take_stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the destination never listened on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (vm, addr)
    }

    /// Boots the test guest running `script` from a KubeVirt VirtualMachineInstance:
    /// `vmi` gets the VM's directory (also podvm's `--run-dir`) and the guest's files and
    /// kernel arguments, and returns the VMI's text (written to `vmi.yaml` there). The VMI
    /// must set `logSerialConsole: true` (the harness reads `console.log`) and keep the
    /// serial console; podvm runs with `--vmi`, `--run-dir` and `extra`, with `env` added
    /// to its environment (in both, `{dir}` stands for the VM's directory, a new one for
    /// each boot attempt). Returns once the script has started.
    pub fn start_vmi(
        name: &str,
        script: &str,
        vmi: impl Fn(&TempDir, &VmiGuest) -> String,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let attempt = || {
            let dir = TempDir::new(name);
            let g = guest();
            let boot = VmiGuest {
                kernel: g.kernel.display().to_string(),
                initrd: g.initrd.display().to_string(),
                kernel_args: exec_cmdline(&format!("echo {SCRIPT_START}\n{script}")),
            };
            let file = dir.file("vmi.yaml", vmi(&dir, &boot).as_bytes());
            let mut cmd = vm_command();
            let dir_text = dir.0.display().to_string();
            cmd.args(["run", "--vmi", &file, "--run-dir"])
                .arg(&dir.0)
                .args(extra.iter().map(|a| a.replace("{dir}", &dir_text)))
                .envs(env.iter().map(|(k, v)| (*k, v.replace("{dir}", &dir_text))));
            pod::confine(&mut cmd);
            Self::spawn_command(dir, cmd).until_script_started()
        };
        Self::start_with_retry(attempt)
    }

    fn spawn(dir: TempDir, script: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let console = dir.0.join("console.sock");
        let log = dir.0.join("console.log");
        let api = dir.0.join("api.sock");
        let mut cmd = guest_command(script, extra);
        cmd.envs(env.iter().copied());
        cmd.arg("--console")
            .arg(&console)
            .arg("--console-log")
            .arg(&log)
            .arg("--api-socket")
            .arg(&api);
        Self::spawn_command(dir, cmd)
    }

    /// Spawns `cmd`, a podvm whose console socket, console log and API socket are
    /// `console.sock`, `console.log` and `api.sock` in `dir`.
    fn spawn_command(dir: TempDir, mut cmd: Command) -> Self {
        let console = dir.0.join("console.sock");
        let log = dir.0.join("console.log");
        let api = dir.0.join("api.sock");
        let stderr = dir.0.join("stderr.log");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("create stderr file"));
        let child = cmd.spawn().expect("spawn podvm");
        Self {
            dir,
            console,
            log,
            api,
            child: Some(child),
            stderr,
        }
    }

    /// Whether podvm is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Everything the guest printed so far (carriage returns removed).
    pub fn log_text(&self) -> String {
        let bytes = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }

    /// Bytes in the console log so far.
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log).map_or(0, |m| m.len())
    }

    fn try_wait_log(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.log_text();
            if text.contains(needle) {
                return Ok(text);
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "podvm exited ({status}) before {needle:?} appeared"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("{needle:?} did not appear within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the console log contains `needle`; returns the whole log.
    pub fn wait_log(&mut self, needle: &str) -> String {
        match self.try_wait_log(needle, run_timeout()) {
            Ok(text) => text,
            // Still running: a hang, reported with podvm's threads.
            Err(why) if self.running() => panic!("{HANG} {why}: {}", self.kill_and_report()),
            Err(why) => panic!(
                "{why}\nstderr:\n{}\nconsole log:\n{}",
                self.take_stderr(),
                self.log_text()
            ),
        }
    }

    /// Runs `podvm api SOCKET args...`.
    pub fn api(&self, args: &[&str]) -> Outcome {
        let mut cmd = Command::new(podvm_bin());
        cmd.arg("api").arg(&self.api).args(args);
        run_command(cmd)
    }

    /// Runs `podvm api SOCKET args...`, which must succeed, and parses its JSON answer.
    pub fn api_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.api(args);
        if !out.status.success() {
            // The VM may be gone (its socket with it): what the guest printed last says why.
            let log = self.log_text();
            panic!(
                "podvm api {args:?} failed:\n{out}\nthe VM's stderr ends:\n{}\n\
                 the VM's console log ends:\n{}",
                tail(&self.stderr_text(), 4000),
                tail(&log, 3000)
            );
        }
        serde_json::from_str(&out.stdout)
            .unwrap_or_else(|e| panic!("podvm api {args:?}: not JSON ({e}):\n{out}"))
    }

    /// Migrates this VM to `dst` (waiting on `addr`) through the API and waits, up to 300 s,
    /// for the handover: returns this podvm's outcome once it has exited.
    pub fn migrate_into(mut self, dst: &mut SocketVm, addr: &str) -> Outcome {
        let answer = self.api_json(&["migrate", addr]);
        assert_eq!(answer["state"], "active", "{answer}");
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.running() {
            if !dst.running() {
                panic!(
                    "the destination exited before the source: SOURCE {} DESTINATION {}",
                    self.kill_and_report(),
                    dst.kill_and_report()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{HANG} the migration did not finish within 300 s: SOURCE {} DESTINATION {}",
                    self.kill_and_report(),
                    dst.kill_and_report()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait()
    }

    /// Sends `request` as is on a new API connection and returns everything answered.
    pub fn raw_api(&self, request: &[u8]) -> String {
        use std::io::Write;
        let mut stream = std::os::unix::net::UnixStream::connect(&self.api).expect("connect api");
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        // The server may answer and close before a large request is all written.
        let _ = stream.write_all(request);
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Waits for podvm to exit; the console log is the outcome's stdout.
    pub fn wait(mut self) -> Outcome {
        let mut child = self.child.take().expect("running");
        let never = AtomicBool::new(true);
        let status = wait_with_timeout(&mut child, run_timeout(), &never);
        let status = status.unwrap_or_else(|| {
            let threads = thread_report(child.id() as i32);
            let _ = child.kill();
            let status = child.wait().expect("wait after kill");
            panic!(
                "{HANG} podvm did not exit within {:?}; killed ({status})\nstderr:\n{}\n\
                 threads (name, state, kernel wait, system call, kernel stack):\n{threads}\n\
                 console log:\n{}",
                run_timeout(),
                self.take_stderr(),
                self.log_text()
            );
        });
        Outcome {
            status,
            stdout: self.log_text(),
            stderr: self.take_stderr(),
            boot_stalled: None,
        }
    }

    /// podvm's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// What podvm wrote to its stderr so far.
    pub fn stderr_text(&self) -> String {
        let bytes = std::fs::read(&self.stderr).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn take_stderr(&mut self) -> String {
        self.stderr_text()
    }

    /// Fails the test as a hang (see [`HANG`]): `what` never happened; kills podvm and
    /// reports its threads, stderr and console log.
    pub fn hang(&mut self, what: &str) -> ! {
        panic!("{HANG} {what}: {}", self.kill_and_report())
    }

    /// Kills podvm and returns its stderr and console log, for a failure message.
    pub fn kill_and_report(&mut self) -> String {
        let threads = self.threads();
        self.kill();
        format!(
            "stderr:\n{}\nthreads (name, state, kernel wait, system call, kernel stack):\n{threads}\nconsole log:\n{}",
            self.take_stderr(),
            self.log_text()
        )
    }

    /// What each podvm thread is doing (for a failure report of a VM that hangs).
    fn threads(&mut self) -> String {
        if !self.running() {
            return "(podvm has exited)".into();
        }
        thread_report(self.pid())
    }

    /// Kills podvm (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SocketVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One HTTP GET on podvm's status port (`--status-listen 127.0.0.1:PORT`): (status code,
/// body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    http_get_at(std::net::SocketAddr::from(([127, 0, 0, 1], port)), path)
}

/// One HTTP GET on `addr` (a status port elsewhere: the pod's address, as the kubelet's
/// probes reach it): (status code, body).
pub fn http_get_at(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(30)).expect("status port");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    std::io::Write::write_all(
        &mut stream,
        format!("GET {path} HTTP/1.1\r\nHost: podvm\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("status answer");
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (code, body.to_string())
}

/// The value of the sample `line_start` (a metric name with its labels) in `metrics`.
pub fn metric_sample(metrics: &str, line_start: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line_start)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {line_start:?} in\n{metrics}"))
}
