//! The allowlists: what each kind of podvm thread may ask of the kernel once it runs guest
//! work. A thread inherits the filter of the thread that created it, and filters stack (the
//! strictest answer wins), so every long-lived thread is created by the main thread before
//! the main thread filters itself; only the migration thread creates another (the
//! announcer, whose list is within the migration thread's).

use crate::ioctls;
use crate::ThreadKind;

/// A condition on one argument of a system call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Arg {
    /// Argument `index` is one of `values`.
    OneOf { index: u8, values: Vec<u64> },
    /// Argument `index` has none of the bits of `mask`.
    NoBits { index: u8, mask: u64 },
}

/// One allowed system call, unconditionally (`arg` is `None`) or when `arg` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    pub name: &'static str,
    pub nr: i64,
    pub arg: Option<Arg>,
}

fn any(calls: &[(&'static str, i64)]) -> Vec<Allowed> {
    calls
        .iter()
        .map(|&(name, nr)| Allowed {
            name,
            nr,
            arg: None,
        })
        .collect()
}

fn with(name: &'static str, nr: i64, arg: Arg) -> Allowed {
    Allowed {
        name,
        nr,
        arg: Some(arg),
    }
}

fn ioctl(values: Vec<u64>) -> Allowed {
    with("ioctl", libc::SYS_ioctl, Arg::OneOf { index: 1, values })
}

fn socket(families: &[i32]) -> Allowed {
    with(
        "socket",
        libc::SYS_socket,
        Arg::OneOf {
            index: 0,
            values: families.iter().map(|&f| f as u64).collect(),
        },
    )
}

fn fcntl() -> Allowed {
    with(
        "fcntl",
        libc::SYS_fcntl,
        Arg::OneOf {
            index: 1,
            values: [
                libc::F_GETFL,
                libc::F_SETFL,
                libc::F_GETFD,
                libc::F_SETFD,
                libc::F_DUPFD_CLOEXEC,
            ]
            .map(|c| c as u64)
            .to_vec(),
        },
    )
}

/// Every thread: memory (never executable), locks, signals' return, time, its own exit.
/// Not here, because a thread kind needs them or not: sleeping ([`sleep`]) and `getrandom`
/// (a thread's first hash map seeds its keys with it), which vCPU threads never do
/// (measured: seccomp/usage.sh; by the code: no vCPU path sleeps or makes a hash map).
fn base() -> Vec<Allowed> {
    let mut list = any(&[
        ("read", libc::SYS_read),
        ("write", libc::SYS_write),
        ("close", libc::SYS_close),
        ("futex", libc::SYS_futex),
        // Lock-free structures of the logging stack back off with it under contention.
        ("sched_yield", libc::SYS_sched_yield),
        ("rt_sigreturn", libc::SYS_rt_sigreturn),
        ("rt_sigprocmask", libc::SYS_rt_sigprocmask),
        ("sigaltstack", libc::SYS_sigaltstack),
        ("munmap", libc::SYS_munmap),
        ("madvise", libc::SYS_madvise),
        ("mremap", libc::SYS_mremap),
        ("brk", libc::SYS_brk),
        ("exit", libc::SYS_exit),
        ("exit_group", libc::SYS_exit_group),
        ("clock_gettime", libc::SYS_clock_gettime),
        ("gettid", libc::SYS_gettid),
        ("getpid", libc::SYS_getpid),
        ("restart_syscall", libc::SYS_restart_syscall),
        // pthread_kill: kicking a vCPU out of KVM_RUN, and abort() after a panic.
        ("tgkill", libc::SYS_tgkill),
    ]);
    let no_exec = |name, nr| {
        with(
            name,
            nr,
            Arg::NoBits {
                index: 2,
                mask: libc::PROT_EXEC as u64,
            },
        )
    };
    list.push(no_exec("mmap", libc::SYS_mmap));
    list.push(no_exec("mprotect", libc::SYS_mprotect));
    list.push(fcntl());
    list
}

/// What creating a thread takes, in the parent and in the child before its own filter.
fn spawn() -> Vec<Allowed> {
    let mut list = any(&[
        ("clone3", libc::SYS_clone3),
        ("set_robust_list", libc::SYS_set_robust_list),
        ("rseq", libc::SYS_rseq),
        // The new thread, before its own filter: Rust's thread start asks glibc for its
        // stack (pthread_getattr_np), which reads the thread's CPU affinity.
        ("sched_getaffinity", libc::SYS_sched_getaffinity),
        // The new thread installs its own filter (filters only ever add restrictions).
        ("seccomp", libc::SYS_seccomp),
    ]);
    list.push(with(
        "clone",
        libc::SYS_clone,
        Arg::OneOf {
            index: 0,
            // glibc's pthread_create when clone3 is refused.
            values: vec![
                (libc::CLONE_VM
                    | libc::CLONE_FS
                    | libc::CLONE_FILES
                    | libc::CLONE_SIGHAND
                    | libc::CLONE_THREAD
                    | libc::CLONE_SYSVSEM
                    | libc::CLONE_SETTLS
                    | libc::CLONE_PARENT_SETTID
                    | libc::CLONE_CHILD_CLEARTID) as u64,
            ],
        },
    ));
    list.push(with(
        "prctl",
        libc::SYS_prctl,
        Arg::OneOf {
            index: 0,
            values: vec![
                libc::PR_SET_NAME as u64,
                libc::PR_GET_NAME as u64,
                // Set again by seccompiler before each filter (already set: no change).
                libc::PR_SET_NO_NEW_PRIVS as u64,
            ],
        },
    ));
    list
}

/// Sleeping (std::thread::sleep: glibc's nanosleep is the clock_nanosleep call): the main
/// thread polling for joins, the migration thread's retries, the status thread's tick, the
/// announcer's gaps. Neither vCPU threads nor the event loop (it waits in epoll) sleep.
fn sleep() -> Allowed {
    Allowed {
        name: "clock_nanosleep",
        nr: libc::SYS_clock_nanosleep,
        arg: None,
    }
}

/// The allowlist of `kind`.
pub fn allowlist(kind: ThreadKind) -> Vec<Allowed> {
    let mut list = base();
    if kind != ThreadKind::Vcpu {
        list.push(Allowed {
            name: "getrandom",
            nr: libc::SYS_getrandom,
            arg: None,
        });
    }
    if !matches!(kind, ThreadKind::Vcpu | ThreadKind::EventLoop) {
        list.push(sleep());
    }
    match kind {
        ThreadKind::Vcpu => {
            // KVM_RUN and its own state; device emulation on MMIO and port exits writes
            // to eventfds, the console's sockets and log, and resets devices (a block
            // device drains its io_uring).
            list.extend(any(&[
                ("sendto", libc::SYS_sendto),
                ("io_uring_enter", libc::SYS_io_uring_enter),
            ]));
            // The driver's features reach a tap as its offloads (TUNSETOFFLOAD); its reset
            // of a NIC detaches the tap from vhost-net.
            let mut requests = ioctls::vcpu_run();
            requests.extend(ioctls::tap());
            requests.extend(ioctls::vhost_detach());
            list.push(ioctl(requests));
        }
        ThreadKind::EventLoop => {
            // Devices' queues, the NAT's sockets (IPv4 and IPv6; ICMP datagram sockets
            // included), the API and console sockets, signalfd, vhost-net, io_uring. Every
            // listening socket exists before the guest runs; nothing here moves vectors
            // of buffers (readv, writev, recvmsg, sendmsg) or polls outside epoll.
            list.extend(any(&[
                ("epoll_wait", libc::SYS_epoll_wait),
                ("epoll_ctl", libc::SYS_epoll_ctl),
                // The NAT's flows: connecting out, accepting forwarded ports, UDP and ICMP
                // datagrams, half-closes, a connect's outcome (SO_ERROR, the peer).
                ("accept4", libc::SYS_accept4),
                ("connect", libc::SYS_connect),
                ("bind", libc::SYS_bind),
                ("recvfrom", libc::SYS_recvfrom),
                ("sendto", libc::SYS_sendto),
                ("shutdown", libc::SYS_shutdown),
                ("getsockopt", libc::SYS_getsockopt),
                ("setsockopt", libc::SYS_setsockopt),
                ("getpeername", libc::SYS_getpeername),
                // vhost-net's call eventfds, made when the driver starts the NIC.
                ("eventfd2", libc::SYS_eventfd2),
                // Disks: the synchronous engine, io_uring, flushes, discard and zeroes.
                ("pread64", libc::SYS_pread64),
                ("pwrite64", libc::SYS_pwrite64),
                ("io_uring_enter", libc::SYS_io_uring_enter),
                ("fdatasync", libc::SYS_fdatasync),
                ("fallocate", libc::SYS_fallocate),
                // The shutdown timeout's timer.
                ("timerfd_settime", libc::SYS_timerfd_settime),
                // Removing the API and console sockets at the end.
                ("unlink", libc::SYS_unlink),
            ]));
            list.push(socket(&[libc::AF_INET, libc::AF_INET6]));
            // Pausing and resuming through the API reads and sets the KVM clock.
            let mut requests = ioctls::clock();
            requests.extend(ioctls::vhost());
            requests.extend(ioctls::devices());
            requests.push(ioctls::FIONBIO);
            list.push(ioctl(requests));
        }
        ThreadKind::Migration => {
            // The migration connection (TCP or unix, TLS), dirty logging and state,
            // disks flushed and their locks, the announcer it starts at the destination.
            list.extend(spawn());
            list.extend(any(&[
                // Connecting with a timeout (non-blocking connect, poll, SO_ERROR) or
                // accepting; the stream's timeouts and TCP_NODELAY.
                ("accept4", libc::SYS_accept4),
                ("connect", libc::SYS_connect),
                ("poll", libc::SYS_poll),
                ("getsockopt", libc::SYS_getsockopt),
                ("setsockopt", libc::SYS_setsockopt),
                // The stream: TLS records go out as vectors of buffers.
                ("recvfrom", libc::SYS_recvfrom),
                ("sendto", libc::SYS_sendto),
                ("writev", libc::SYS_writev),
                // Disks at the handover: requests in flight drained, data flushed, the
                // lock let go (source) or taken (destination).
                ("io_uring_enter", libc::SYS_io_uring_enter),
                ("fdatasync", libc::SYS_fdatasync),
                ("flock", libc::SYS_flock),
                // A destination removes its unix socket once the source connected.
                ("unlink", libc::SYS_unlink),
            ]));
            list.push(socket(&[libc::AF_UNIX, libc::AF_INET, libc::AF_INET6]));
            let mut requests = ioctls::migration();
            requests.push(ioctls::FIONBIO);
            // A destination restores a tap NIC's negotiated offloads (TUNSETOFFLOAD).
            requests.extend(ioctls::tap());
            list.push(ioctl(requests));
        }
        ThreadKind::Announce => {
            // Writes five frames to a tap, sleeping in between.
        }
        ThreadKind::Status => {
            // Accepts probe and scrape connections on its TCP port and answers each; creates
            // and removes the readiness file (openat only with O_CREAT|O_EXCL: it can make a
            // new file, never open, truncate or write an existing one).
            list.extend(any(&[
                ("poll", libc::SYS_poll),
                ("accept4", libc::SYS_accept4),
                ("recvfrom", libc::SYS_recvfrom),
                ("sendto", libc::SYS_sendto),
                ("setsockopt", libc::SYS_setsockopt),
                ("shutdown", libc::SYS_shutdown),
                ("unlink", libc::SYS_unlink),
            ]));
            list.push(with(
                "openat",
                libc::SYS_openat,
                Arg::OneOf {
                    index: 2,
                    values: vec![
                        (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC) as u64,
                    ],
                },
            ));
            list.push(ioctl(vec![ioctls::FIONBIO]));
        }
        ThreadKind::Main => {
            // Once the guest runs: waits for the event loop, stops and joins the vCPUs,
            // hands the console its last bytes (blocking writes with a timeout), drains
            // the disks' io_urings and flushes them, restores the terminal, and closes
            // everything. It reads nothing but an io_uring's eventfd (measured:
            // seccomp/usage.sh).
            list.extend(any(&[
                ("sendto", libc::SYS_sendto),
                ("setsockopt", libc::SYS_setsockopt),
                ("fdatasync", libc::SYS_fdatasync),
                ("io_uring_enter", libc::SYS_io_uring_enter),
            ]));
            list.push(ioctl(vec![
                // The console's last bytes: client sockets made blocking again.
                ioctls::FIONBIO,
                ioctls::TCGETS,
                ioctls::TCSETS,
                ioctls::TCSETSW,
                ioctls::TCSETSF,
            ]));
        }
    }
    dedup(list)
}

/// One entry per (call, condition), in call-number order.
fn dedup(mut list: Vec<Allowed>) -> Vec<Allowed> {
    list.sort_by(|a, b| a.nr.cmp(&b.nr).then_with(|| a.name.cmp(b.name)));
    list.dedup();
    list
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ThreadKind;

    /// docs/security.md's table counts each list's calls by name; `cargo test -p
    /// podvm-seccomp -- --nocapture seccomp_list_sizes` prints them.
    #[test]
    fn seccomp_list_sizes() {
        for kind in ThreadKind::ALL {
            let mut names: Vec<&str> = allowlist(kind).iter().map(|a| a.name).collect();
            names.dedup();
            assert!(names.contains(&"exit_group"), "{kind:?}");
            println!("{:>10}: {} calls", kind.name(), names.len());
        }
    }
}
