//! Log mode (`--seccomp log`): a call a thread's list does not allow is handed to a
//! supervisor thread (`SECCOMP_RET_USER_NOTIF`), which counts it per thread kind and call,
//! writes the line naming the thread and the call, and lets the call go through
//! (`SECCOMP_USER_NOTIF_FLAG_CONTINUE`, Linux 5.5). The counts are
//! `podvm_seccomp_violations_total` on the status endpoint's `/metrics` ([`violations`]).
//!
//! Each filtering thread installs its filter with `SECCOMP_FILTER_FLAG_NEW_LISTENER` and
//! gives the descriptor to the supervisor through a fixed table and an eventfd. The
//! supervisor neither allocates nor takes a lock a blocked thread could hold (the one
//! waiting for it may be inside malloc or hold stderr's lock): it polls, reads the
//! notification, counts in atomics, formats into a stack buffer and writes with write(2).
//!
//! A thread that inherits a filter with a listener cannot add another (the kernel allows
//! one per thread's stack; the announcer, started by the migration thread, is the one
//! case), and a kernel older than 5.5 has no CONTINUE: there the filter logs through the
//! kernel (`SECCOMP_RET_LOG`, audit records) as before, and the supervisor still sees what
//! the inherited filter refuses, named by the thread that made the call.

use std::io;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};

use seccompiler::BpfProgram;

use crate::sigsys::{describe, Line, Verdict};
use crate::ThreadKind;

/// Call numbers counted one by one; larger ones (none on x86_64) share the last slot.
const CALLS: usize = 512;
const KINDS: usize = ThreadKind::ALL.len();

#[allow(clippy::declare_interior_mutable_const)] // only the arrays' initialisers
const ZERO: AtomicU64 = AtomicU64::new(0);
static COUNTS: [AtomicU64; KINDS * CALLS] = [ZERO; KINDS * CALLS];

/// Listener slots: more than the threads podvm filters (vCPUs and a handful of others).
const SLOTS: usize = 1024;
const FREE: i32 = -1;
const TAKEN: i32 = -2;
#[allow(clippy::declare_interior_mutable_const)]
const NO_FD: AtomicI32 = AtomicI32::new(FREE);
#[allow(clippy::declare_interior_mutable_const)]
const NO_KIND: AtomicU8 = AtomicU8::new(u8::MAX);
static LISTENERS: [AtomicI32; SLOTS] = [NO_FD; SLOTS];
static LISTENER_KINDS: [AtomicU8; SLOTS] = [NO_KIND; SLOTS];
/// Which thread (by id) installed which kind of filter: names the thread of a call that
/// only an inherited filter refused.
static THREADS: [AtomicI32; SLOTS] = [NO_FD; SLOTS];
static THREAD_KINDS: [AtomicU8; SLOTS] = [NO_KIND; SLOTS];
/// The supervisor's wake-up eventfd (a new listener to watch); -1 until it runs.
static WAKE: AtomicI32 = AtomicI32::new(-1);

fn kind_index(kind: ThreadKind) -> usize {
    ThreadKind::ALL.iter().position(|&k| k == kind).unwrap_or(0)
}

/// Counts one refused call.
fn count(kind: usize, nr: i64) {
    let call = usize::try_from(nr).unwrap_or(CALLS - 1).min(CALLS - 1);
    COUNTS[kind.min(KINDS - 1) * CALLS + call].fetch_add(1, Ordering::Relaxed);
}

/// Refused calls so far, by thread kind and call name (never any in kill mode, which ends
/// podvm at the first; nor with filters off).
pub fn violations() -> Vec<(&'static str, &'static str, u64)> {
    let mut out = Vec::new();
    for (k, kind) in ThreadKind::ALL.iter().enumerate() {
        for call in 0..CALLS {
            let n = COUNTS[k * CALLS + call].load(Ordering::Relaxed);
            if n > 0 {
                let name = crate::names::name(call as i64).unwrap_or("unknown");
                out.push((kind.name(), name, n));
            }
        }
    }
    out
}

/// Starts the supervisor thread; call once, before any thread filters itself.
pub(crate) fn start() -> io::Result<()> {
    // SAFETY: eventfd with constant flags; the descriptor is kept for the process's life.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    WAKE.store(fd, Ordering::SeqCst);
    std::thread::Builder::new()
        .name("seccomp-log".into())
        .spawn(supervise)?;
    Ok(())
}

/// Turns the program's "refused" answer `from` into `to`.
pub(crate) fn refuse_with(program: &BpfProgram, from: u32, to: u32) -> BpfProgram {
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    program
        .iter()
        .map(|insn| {
            let mut insn = insn.clone();
            if insn.code == RET_K && insn.k == from {
                insn.k = to;
            }
            insn
        })
        .collect()
}

/// Installs `program` (log mode's: refusals notify) on the calling thread.
pub(crate) fn install(kind: ThreadKind, program: &BpfProgram) -> Result<(), String> {
    let k = kind_index(kind) as u8;
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    if let Some(slot) = take_slot(&THREADS) {
        THREAD_KINDS[slot].store(k, Ordering::SeqCst);
        THREADS[slot].store(tid, Ordering::SeqCst);
    }
    if WAKE.load(Ordering::SeqCst) >= 0 {
        if let Some(slot) = take_slot(&LISTENERS) {
            match apply(program, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER) {
                Ok(fd) => {
                    LISTENER_KINDS[slot].store(k, Ordering::SeqCst);
                    LISTENERS[slot].store(fd, Ordering::SeqCst);
                    wake();
                    return Ok(());
                }
                // EBUSY: a listener is already on this thread's stack (inherited);
                // EINVAL: a kernel without listeners. The kernel logs instead.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::EINVAL)) => {
                    LISTENERS[slot].store(FREE, Ordering::SeqCst);
                }
                Err(e) => {
                    LISTENERS[slot].store(FREE, Ordering::SeqCst);
                    return Err(e.to_string());
                }
            }
        }
    }
    let log = refuse_with(program, libc::SECCOMP_RET_USER_NOTIF, libc::SECCOMP_RET_LOG);
    apply(&log, 0).map(drop).map_err(|e| e.to_string())
}

/// Reserves a free slot of `table`.
fn take_slot(table: &[AtomicI32; SLOTS]) -> Option<usize> {
    (0..SLOTS).find(|&i| {
        table[i]
            .compare_exchange(FREE, TAKEN, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    })
}

/// seccomp(SECCOMP_SET_MODE_FILTER, flags, program) after PR_SET_NO_NEW_PRIVS; returns
/// what the call returns (the listener's descriptor with NEW_LISTENER).
fn apply(program: &BpfProgram, flags: libc::c_ulong) -> io::Result<i32> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "filter too long"))?;
    // SAFETY: sets this thread's no_new_privs bit; constant arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: the kernel copies the program (seccompiler's sock_filter has the kernel's
    // layout) and keeps no pointer to it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as i32)
}

fn wake() {
    let fd = WAKE.load(Ordering::SeqCst);
    let one = 1u64;
    // SAFETY: writes eight bytes from a valid u64 to the supervisor's eventfd.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// The kind of the thread `tid`, if it installed a filter.
fn thread_kind(tid: u32) -> Option<usize> {
    (0..SLOTS)
        .find(|&i| THREADS[i].load(Ordering::SeqCst) == tid as i32)
        .map(|i| usize::from(THREAD_KINDS[i].load(Ordering::SeqCst)))
        .filter(|&k| k < KINDS)
}

fn supervise() {
    let wake_fd = WAKE.load(Ordering::SeqCst);
    let empty = libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    };
    let mut fds = [empty; SLOTS + 1];
    let mut slots = [0usize; SLOTS + 1];
    loop {
        fds[0] = libc::pollfd {
            fd: wake_fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut n = 1;
        for (slot, listener) in LISTENERS.iter().enumerate() {
            let fd = listener.load(Ordering::SeqCst);
            if fd >= 0 {
                fds[n] = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                slots[n] = slot;
                n += 1;
            }
        }
        // SAFETY: `fds` holds `n` initialised pollfds.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, -1) };
        if rc < 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            let mut buf = 0u64;
            // SAFETY: reads the eventfd's counter into a valid u64.
            unsafe { libc::read(wake_fd, (&mut buf as *mut u64).cast(), 8) };
        }
        for i in 1..n {
            let revents = fds[i].revents;
            if revents & libc::POLLIN != 0 {
                answer(fds[i].fd, slots[i]);
            } else if revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                // Every thread of this filter has ended.
                LISTENERS[slots[i]].store(FREE, Ordering::SeqCst);
                // SAFETY: closes the listener this table owned.
                unsafe { libc::close(fds[i].fd) };
            }
        }
    }
}

/// Receives one notification from `fd`, counts and logs it, and lets the call go on.
fn answer(fd: i32, slot: usize) {
    // SAFETY: seccomp_notif is plain data; the kernel wants it zeroed.
    let mut notif: libc::seccomp_notif = unsafe { std::mem::zeroed() };
    // SAFETY: the listener fills `notif`, a valid seccomp_notif.
    if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut notif) } != 0 {
        // ENOENT: the thread went away (a signal) before we read it.
        return;
    }
    let kind = thread_kind(notif.pid)
        .unwrap_or_else(|| usize::from(LISTENER_KINDS[slot].load(Ordering::SeqCst)));
    let nr = i64::from(notif.data.nr);
    count(kind, nr);
    let args = notif.data.args;
    let mut line = Line::new();
    describe(
        ThreadKind::ALL.get(kind).copied(),
        nr,
        [args[0], args[1], args[2]],
        None,
        Verdict::Allowed,
        &mut line,
    );
    line.log();
    let resp = libc::seccomp_notif_resp {
        id: notif.id,
        val: 0,
        error: 0,
        flags: libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
    };
    // SAFETY: answers the notification just received with a valid response.
    unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One supervisor for the test process (podvm starts it once, in set_mode).
    fn supervisor() {
        static START: std::sync::Once = std::sync::Once::new();
        START.call_once(|| start().unwrap());
    }

    #[test]
    fn seccomp_log_mode_counts_a_refused_call_names_it_and_lets_it_through() {
        // The test process runs unfiltered; only the thread below filters itself.
        supervisor();
        let program = crate::filter(ThreadKind::Status, crate::Mode::Log)
            .unwrap()
            .unwrap();
        let before = violations();
        let fd = std::thread::spawn(move || {
            install(ThreadKind::Status, &program).unwrap();
            // Not in the status thread's list: the supervisor counts it and lets it run.
            // SAFETY: socket with constant arguments; closed below.
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) }
        })
        .join()
        .unwrap();
        assert!(fd >= 0, "the call did not go through");
        // SAFETY: closes the socket the thread opened.
        unsafe { libc::close(fd) };
        let count = |v: &[(&str, &str, u64)]| {
            v.iter()
                .find(|(k, c, _)| *k == "status" && *c == "socket")
                .map_or(0, |e| e.2)
        };
        assert_eq!(count(&violations()), count(&before) + 1);
    }

    #[test]
    fn seccomp_log_mode_names_the_thread_under_an_inherited_listener() {
        supervisor();
        let program = |kind| crate::filter(kind, crate::Mode::Log).unwrap().unwrap();
        let (migration, announce) = (
            program(ThreadKind::Migration),
            program(ThreadKind::Announce),
        );
        let count = || {
            violations()
                .iter()
                .find(|(k, c, _)| *k == "announce" && *c == "socket")
                .map_or(0, |e| e.2)
        };
        let before = count();
        // As at a destination: the migration thread filters itself (with a listener) and
        // starts the announcer, whose own filter cannot have one.
        let fd = std::thread::spawn(move || {
            install(ThreadKind::Migration, &migration).unwrap();
            std::thread::spawn(move || {
                install(ThreadKind::Announce, &announce).unwrap();
                // Refused by both lists: the migration thread's listener reports it.
                // SAFETY: socket with constant arguments; closed below.
                unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) }
            })
            .join()
            .unwrap()
        })
        .join()
        .unwrap();
        assert!(fd >= 0, "the call did not go through");
        // SAFETY: closes the socket the announcer opened.
        unsafe { libc::close(fd) };
        assert!(count() > before, "{:?}", violations());
    }

    #[test]
    fn seccomp_log_mode_rewrites_only_the_refusal() {
        let program = crate::filter(ThreadKind::Vcpu, crate::Mode::Kill)
            .unwrap()
            .unwrap();
        let notify = crate::filter(ThreadKind::Vcpu, crate::Mode::Log)
            .unwrap()
            .unwrap();
        assert_eq!(program.len(), notify.len());
        let mut changed = 0;
        for (a, b) in program.iter().zip(&notify) {
            if a.k != b.k {
                assert_eq!(a.k, libc::SECCOMP_RET_TRAP);
                assert_eq!(b.k, libc::SECCOMP_RET_USER_NOTIF);
                changed += 1;
            } else {
                assert_eq!((a.code, a.jt, a.jf), (b.code, b.jt, b.jf));
            }
        }
        assert!(changed > 0);
    }
}
