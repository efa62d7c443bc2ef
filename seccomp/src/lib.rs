//! podvm's seccomp filters. Each kind of thread (main, event loop, vCPU, migration,
//! announcer) installs its own allowlist as it starts its guest-facing work, after
//! `PR_SET_NO_NEW_PRIVS`; the lists (see [`allowlist`]) say per call, and for `ioctl`,
//! `socket`, `mmap`, `mprotect`, `clone`, `prctl` and `fcntl` per argument, what the thread
//! may do. The pod's OCI seccomp profile ([`oci_profile`]) is made from the same lists.
//!
//! Modes ([`Mode`]): `kill` (what podvm runs with): a refused call ends the process with a
//! line naming the thread kind, the call and its arguments; `log`: refused calls go through,
//! each logged with the same line and counted ([`violations`], on `/metrics`), for finding
//! what a list lacks; `off`: no filters, for development only.

pub mod ioctls;
mod lists;
pub mod names;
mod notify;
mod profile;
mod sigsys;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use lists::{allowlist, Allowed, Arg};
pub use notify::violations;
pub use profile::oci_profile;
pub use sigsys::{log_as_json, utc, EXIT_STATUS, TERMINATION_LOG_ENV};

/// The kinds of podvm threads, each with its own list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread, once the guest runs: waits, stops the vCPUs, flushes at exit.
    Main,
    /// The event loop: virtio queues, the NAT, the console and API sockets.
    EventLoop,
    /// A vCPU thread: KVM_RUN and the device emulation of its exits.
    Vcpu,
    /// The migration thread, at the source and at the destination.
    Migration,
    /// The announcer a destination starts for a tap NIC (RARP frames).
    Announce,
    /// The pod's status endpoint (readiness, liveness, metrics over HTTP) and readiness file.
    Status,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Main,
        ThreadKind::EventLoop,
        ThreadKind::Vcpu,
        ThreadKind::Migration,
        ThreadKind::Announce,
        ThreadKind::Status,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::EventLoop => "event-loop",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Migration => "migration",
            ThreadKind::Announce => "announce",
            ThreadKind::Status => "status",
        }
    }
}

/// What a filter does with a call its list does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The process ends, with a line naming the thread and the call.
    Kill,
    /// The call goes through; podvm logs and counts it.
    Log,
    /// No filters at all (development only).
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "seccomp mode {other:?}: use kill (the default), log (debugging: refused calls are logged, counted and allowed) or off (development only)"
            )),
        }
    }
}

/// Installing a filter failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the seccomp filter of the {kind} thread: {detail}")]
    Build { kind: &'static str, detail: String },
    #[error("cannot install the seccomp filter of the {kind} thread: {detail} (a kernel without seccomp filters? --seccomp off runs without them, for development only)")]
    Install { kind: &'static str, detail: String },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] std::io::Error),
    #[error("cannot start the seccomp log mode's supervisor thread: {0}")]
    Supervisor(#[source] std::io::Error),
}

const UNSET: u8 = u8::MAX;
static MODE: AtomicU8 = AtomicU8::new(UNSET);

/// The test hook's environment variable: `PODVM_SECCOMP_TEST_VIOLATION=<thread kind>`
/// makes every thread of that kind, right after installing its filter, call `getcwd`
/// ([`TEST_VIOLATION_CALL`]), which no thread's list allows and the pod's profile does (for
/// start-up), so that the thread's own filter is what answers it: in kill mode it ends the
/// process with the line naming the thread, in log mode it is logged, counted and goes
/// through. The integration tests use it for both. Harmless where it goes through.
pub const TEST_VIOLATION_ENV: &str = "PODVM_SECCOMP_TEST_VIOLATION";
/// The call the test hook makes (see [`TEST_VIOLATION_ENV`]).
pub const TEST_VIOLATION_CALL: i64 = libc::SYS_getcwd;
static TEST_VIOLATION: AtomicU8 = AtomicU8::new(UNSET);

fn mode_code(mode: Mode) -> u8 {
    match mode {
        Mode::Kill => 0,
        Mode::Log => 1,
        Mode::Off => 2,
    }
}

/// Opens the container's termination message file (see [`TERMINATION_LOG_ENV`]) if there is
/// one, so that [`termination_message`] reaches it. Call it first thing in `main`: an error
/// before [`set_mode`] (a bad spec, a failed preflight) is a reason to report too.
/// [`set_mode`] opens it as well, for library users that do not call this; either keeps the
/// descriptor the first call opened.
pub fn open_termination_log() {
    sigsys::open_termination_log();
}

/// Writes `line` (and a newline) to the container's termination message file, when there
/// is one (see [`TERMINATION_LOG_ENV`]; opened by [`open_termination_log`] or
/// [`set_mode`]): why podvm ended, shown as the pod's `lastState.terminated.message`.
pub fn termination_message(line: &str) {
    sigsys::write_termination_log(format!("{line}\n").as_bytes());
}

/// Chooses the mode for every thread of the process; call it once, on the main thread,
/// before any thread starts. Until it is called, [`install`] installs nothing (library
/// users and unit tests run unfiltered).
pub fn set_mode(mode: Mode) -> Result<(), Error> {
    sigsys::open_termination_log();
    match mode {
        Mode::Kill => sigsys::install_handler().map_err(Error::Handler)?,
        Mode::Log => notify::start().map_err(Error::Supervisor)?,
        Mode::Off => {}
    }
    if mode != Mode::Off {
        fix_malloc_arenas();
    }
    MODE.store(mode_code(mode), Ordering::SeqCst);
    if let Some(kind) = std::env::var(TEST_VIOLATION_ENV)
        .ok()
        .and_then(|name| ThreadKind::ALL.iter().position(|k| k.name() == name))
    {
        TEST_VIOLATION.store(kind as u8, Ordering::SeqCst);
    }
    Ok(())
}

/// The test hook (see [`TEST_VIOLATION_ENV`]).
fn test_violation(kind: ThreadKind) {
    let wanted = TEST_VIOLATION.load(Ordering::SeqCst);
    if ThreadKind::ALL.get(usize::from(wanted)) != Some(&kind) {
        return;
    }
    let mut buf = [0u8; 256];
    // SAFETY: getcwd writes at most `buf.len()` bytes into `buf`, which outlives the call.
    unsafe { libc::syscall(TEST_VIOLATION_CALL, buf.as_mut_ptr(), buf.len()) };
}

/// glibc's malloc opens files at random moments in threads that may not open anything:
/// the first time two threads contend for an arena it counts the CPUs from
/// `/sys/devices/system/cpu/online` (unless the arena limit is set), and the first time a
/// thread arena's heap shrinks it reads `/proc/sys/vm/overcommit_memory` (whatever the
/// limit; seen on the event loop in the KVM sandbox). With one arena neither happens:
/// every thread allocates from the main arena (brk and mmap), which has no heaps to
/// shrink; glibc's per-thread caches keep most small allocations off its lock.
#[cfg(target_env = "gnu")]
fn fix_malloc_arenas() {
    // SAFETY: mallopt only sets a malloc parameter; called before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

#[cfg(not(target_env = "gnu"))]
fn fix_malloc_arenas() {}

/// The mode [`set_mode`] chose (`Off` if it was never called).
pub fn mode() -> Mode {
    match MODE.load(Ordering::SeqCst) {
        0 => Mode::Kill,
        1 => Mode::Log,
        _ => Mode::Off,
    }
}

fn condition(arg: &Arg) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    match arg {
        Arg::OneOf { index, values } => values
            .iter()
            .map(|&v| {
                let len = if v > u64::from(u32::MAX) {
                    SeccompCmpArgLen::Qword
                } else {
                    SeccompCmpArgLen::Dword
                };
                SeccompRule::new(vec![SeccompCondition::new(
                    *index,
                    len,
                    SeccompCmpOp::Eq,
                    v,
                )?])
            })
            .collect(),
        Arg::NoBits { index, mask } => Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
            *index,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(*mask),
            0,
        )?])?]),
    }
}

/// The BPF program of `kind` in `mode` (`Off` has none). A refused call gets
/// `SECCOMP_RET_TRAP` in kill mode (the SIGSYS handler) and `SECCOMP_RET_USER_NOTIF` in
/// log mode (the supervisor, see notify.rs).
pub fn filter(kind: ThreadKind, mode: Mode) -> Result<Option<BpfProgram>, Error> {
    if mode == Mode::Off {
        return Ok(None);
    }
    let build = |e: &dyn std::fmt::Display| Error::Build {
        kind: kind.name(),
        detail: e.to_string(),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut unconditional = Vec::new();
    for allowed in allowlist(kind) {
        match &allowed.arg {
            None => unconditional.push(allowed.nr),
            Some(arg) => rules
                .entry(allowed.nr)
                .or_default()
                .extend(condition(arg).map_err(|e| build(&e))?),
        }
    }
    // A call allowed without conditions is allowed whatever other entries say.
    for nr in unconditional {
        rules.insert(nr, Vec::new());
    }
    // seccompiler has no notification action: log mode's program is kill mode's with its
    // refusals rewritten.
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| build(&e))?;
    let program: BpfProgram = filter.try_into().map_err(|e| build(&e))?;
    Ok(Some(match mode {
        Mode::Log => notify::refuse_with(
            &program,
            libc::SECCOMP_RET_TRAP,
            libc::SECCOMP_RET_USER_NOTIF,
        ),
        _ => program,
    }))
}

/// Installs the filter of `kind` on the calling thread, in the mode [`set_mode`] chose.
pub fn install(kind: ThreadKind) -> Result<(), Error> {
    let mode = mode();
    let Some(program) = filter(kind, mode)? else {
        return Ok(());
    };
    sigsys::remember(kind);
    let installed = if mode == Mode::Log {
        notify::install(kind, &program)
    } else {
        seccompiler::apply_filter(&program).map_err(|e| e.to_string())
    };
    installed.map_err(|detail| Error::Install {
        kind: kind.name(),
        detail,
    })?;
    test_violation(kind);
    Ok(())
}

/// [`install`], ending the process if the filter cannot be installed: a thread must not
/// go on to guest work unfiltered when filters were asked for.
pub fn install_or_exit(kind: ThreadKind) {
    if let Err(e) = install(kind) {
        eprintln!("podvm: error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_every_kind_compiles_in_every_mode() {
        for kind in ThreadKind::ALL {
            assert!(filter(kind, Mode::Kill).unwrap().is_some());
            assert!(filter(kind, Mode::Log).unwrap().is_some());
            assert!(filter(kind, Mode::Off).unwrap().is_none());
        }
    }

    #[test]
    fn seccomp_mode_parses_and_names_the_choices_on_error() {
        assert_eq!("kill".parse::<Mode>(), Ok(Mode::Kill));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        let e = "on".parse::<Mode>().unwrap_err();
        assert!(
            e.contains("kill") && e.contains("log") && e.contains("off"),
            "{e}"
        );
    }

    #[test]
    fn seccomp_lists_name_their_calls_as_the_kernel_does() {
        for kind in ThreadKind::ALL {
            for allowed in allowlist(kind) {
                assert_eq!(
                    names::name(allowed.nr),
                    Some(allowed.name),
                    "{kind:?}: {allowed:?}"
                );
            }
        }
    }

    #[test]
    fn seccomp_test_hook_call_is_refused_by_every_list_and_allowed_by_the_profile() {
        let name = names::name(TEST_VIOLATION_CALL).unwrap();
        for kind in ThreadKind::ALL {
            assert!(
                allowlist(kind).iter().all(|a| a.nr != TEST_VIOLATION_CALL),
                "{kind:?} allows {name}"
            );
        }
        let profile = oci_profile().to_string();
        assert!(profile.contains(&format!("\"{name}\"")), "{profile}");
    }

    #[test]
    fn seccomp_lists_keep_threads_apart() {
        let has = |kind, name| allowlist(kind).iter().any(|a| a.name == name);
        // Only the migration thread starts threads once the guest runs.
        for kind in ThreadKind::ALL {
            assert_eq!(
                has(kind, "clone3"),
                kind == ThreadKind::Migration,
                "{kind:?}"
            );
        }
        // No thread runs programs or opens files once the guest runs; the status thread
        // may only create a new file (its readiness file), never open an existing one.
        for kind in ThreadKind::ALL {
            for name in ["execve", "execveat", "open", "ptrace", "mount"] {
                assert!(!has(kind, name), "{kind:?} allows {name}");
            }
            let openat: Vec<Allowed> = allowlist(kind)
                .into_iter()
                .filter(|a| a.name == "openat")
                .collect();
            if kind == ThreadKind::Status {
                let create_new =
                    (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC) as u64;
                assert_eq!(
                    openat.iter().map(|a| a.arg.clone()).collect::<Vec<_>>(),
                    [Some(Arg::OneOf {
                        index: 2,
                        values: vec![create_new]
                    })]
                );
            } else {
                assert!(openat.is_empty(), "{kind:?} allows openat");
            }
        }
        // vCPU threads open no sockets; the event loop no unix sockets.
        assert!(!has(ThreadKind::Vcpu, "socket"));
        let families = |kind| {
            allowlist(kind)
                .into_iter()
                .find(|a| a.name == "socket")
                .and_then(|a| a.arg)
        };
        assert_eq!(
            families(ThreadKind::EventLoop),
            Some(Arg::OneOf {
                index: 0,
                values: vec![libc::AF_INET as u64, libc::AF_INET6 as u64]
            })
        );
        // The announcer's list is within the migration thread's, which starts it.
        let migration = allowlist(ThreadKind::Migration);
        for a in allowlist(ThreadKind::Announce) {
            assert!(migration.contains(&a), "{a:?}");
        }
    }

    #[test]
    fn seccomp_filter_in_kill_mode_stops_a_refused_call_and_allows_the_rest() {
        let program = filter(ThreadKind::Vcpu, Mode::Kill).unwrap().unwrap();
        // In a child process: the filter stays with it.
        // SAFETY: fork in a test; the child only installs the filter, makes two calls and
        // exits, allocating nothing.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: ends the child.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: getpid is allowed; socket is not, and the default SIGSYS action
            // (no handler in this child) kills it.
            unsafe {
                libc::getpid();
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                libc::_exit(0);
            }
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }
}
