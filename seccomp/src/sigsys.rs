//! What a filter in kill mode does with a system call it refuses: the kernel sends SIGSYS
//! (SECCOMP_RET_TRAP) to the thread; this handler writes one line naming the thread's kind,
//! the call and its first arguments, and ends the process with status 159 (128 + SIGSYS).
//! It allocates nothing and calls only write(2) and exit_group(2), which every filter
//! allows.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::ThreadKind;

/// Exit status of a process a filter stopped: 128 + SIGSYS, as a shell shows a process
/// that SIGSYS killed.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

thread_local! {
    /// The kind of the filter this thread installed (an index into [`ThreadKind::ALL`]).
    static KIND: Cell<u8> = const { Cell::new(u8::MAX) };
}

/// Where, besides stderr, the handler writes its line: the container's termination
/// message file, opened at start (the handler may not open anything). -1: none.
static TERMINATION_LOG: AtomicI32 = AtomicI32::new(-1);

/// The variable naming the termination message file, and its default: Kubernetes' default
/// `terminationMessagePath`, which kubelet mounts writable for any user. What a stopped
/// podvm wrote there becomes its pod's `lastState.terminated.message`.
pub const TERMINATION_LOG_ENV: &str = "PODVM_TERMINATION_LOG";
const TERMINATION_LOG_DEFAULT: &str = "/dev/termination-log";

/// Opens the termination message file if there is one (it is never created).
pub(crate) fn open_termination_log() {
    let path =
        std::env::var_os(TERMINATION_LOG_ENV).unwrap_or_else(|| TERMINATION_LOG_DEFAULT.into());
    if let Ok(file) = std::fs::OpenOptions::new().append(true).open(path) {
        use std::os::fd::IntoRawFd;
        TERMINATION_LOG.store(file.into_raw_fd(), Ordering::SeqCst);
    }
}

/// Appends `bytes` to the termination message file, if one is open.
pub(crate) fn write_termination_log(bytes: &[u8]) {
    let fd = TERMINATION_LOG.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: `fd` was opened by open_termination_log and is never closed; the buffer
        // is a valid slice for its length.
        unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    }
}

pub(crate) fn remember(kind: ThreadKind) {
    let index = ThreadKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
    KIND.with(|k| k.set(index as u8));
}

/// Installs the handler for the whole process (once, before the first filter).
pub(crate) fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset to initialise.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler that only reads its arguments, a thread-local byte and
    // static tables, writes to stderr and exits.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A fixed buffer for the log line.
pub(crate) struct Line {
    buf: [u8; 512],
    len: usize,
}

impl Line {
    pub(crate) fn new() -> Line {
        Line {
            buf: [0; 512],
            len: 0,
        }
    }

    /// Writes the line to `fd` with write(2) (no lock, no allocation).
    pub(crate) fn write_to(&self, fd: i32) {
        // SAFETY: writes the initialised part of the buffer.
        unsafe { libc::write(fd, self.buf.as_ptr().cast(), self.len) };
    }

    #[cfg(test)]
    fn text(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap()
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_dec(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn push_hex(&mut self, v: u64) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        let mut v = v;
        loop {
            i -= 1;
            digits[i] = HEX[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.push(b"0x");
        self.push(&digits[i..]);
    }
}

/// What became of a refused call.
#[derive(Clone, Copy)]
pub(crate) enum Verdict {
    /// Kill mode: podvm ends.
    Stopped,
    /// Log mode: the call went through, counted.
    Allowed,
}

/// Formats the log line for a refused call (kept apart from the handler to be testable).
pub(crate) fn describe(
    kind: Option<ThreadKind>,
    nr: i64,
    args: [u64; 3],
    path: Option<&[u8]>,
    verdict: Verdict,
    line: &mut Line,
) {
    line.push(b"podvm: seccomp: the ");
    line.push(kind.map_or("unfiltered", ThreadKind::name).as_bytes());
    line.push(b" thread made system call ");
    match crate::names::name(nr) {
        Some(name) => line.push(name.as_bytes()),
        None => line.push(b"?"),
    }
    line.push(b" (");
    line.push_dec(nr as u64);
    line.push(b") with arguments ");
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            line.push(b", ");
        }
        line.push_hex(*a);
    }
    if let Some(path) = path {
        line.push(b" on \"");
        line.push(path);
        line.push(b"\"");
    }
    line.push(b", which its filter does not allow; ");
    match verdict {
        Verdict::Stopped => {
            line.push(b"podvm stops (exit status ");
            line.push_dec(EXIT_STATUS as u64);
            line.push(b"; --seccomp log lets it run and logs instead)\n");
        }
        Verdict::Allowed => {
            line.push(b"allowed by --seccomp log (counted in podvm_seccomp_violations_total)\n");
        }
    }
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // siginfo_t for SIGSYS on x86_64: signo, errno, code, padding (4 x i32), then
    // _sigsys { void *call_addr; int syscall; unsigned arch; }.
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; the offset is
    // that of si_syscall in its SIGSYS variant.
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let args = if context.is_null() {
        [0; 3]
    } else {
        // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's
        // ucontext_t; the general registers hold the call's arguments.
        let gregs = unsafe { &(*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
        [
            gregs[libc::REG_RDI as usize] as u64,
            gregs[libc::REG_RSI as usize] as u64,
            gregs[libc::REG_RDX as usize] as u64,
        ]
    };
    let kind = KIND
        .try_with(|k| k.get())
        .ok()
        .and_then(|i| ThreadKind::ALL.get(i as usize).copied());
    // A refused open names its file: that is what says which code path opened it. The
    // pointer is one podvm's own code passed to the call (a C string in this process).
    let path_ptr = match i64::from(nr) {
        libc::SYS_open | libc::SYS_stat | libc::SYS_lstat | libc::SYS_access => args[0],
        libc::SYS_openat | libc::SYS_newfstatat | libc::SYS_faccessat => args[1],
        _ => 0,
    };
    let mut path_buf = [0u8; 160];
    let mut path_len = 0;
    if path_ptr != 0 {
        let p = path_ptr as *const u8;
        while path_len < path_buf.len() {
            // SAFETY: reads the NUL-terminated path the interrupted call was given, byte
            // by byte, at most 160 bytes; the process ends right after.
            let b = unsafe { p.add(path_len).read_volatile() };
            if b == 0 {
                break;
            }
            path_buf[path_len] = b;
            path_len += 1;
        }
    }
    let path = (path_ptr != 0).then_some(&path_buf[..path_len]);
    let mut line = Line::new();
    describe(kind, i64::from(nr), args, path, Verdict::Stopped, &mut line);
    // Writes the line to stderr and to the termination message file (a descriptor opened
    // at start, or none), then ends the process.
    // SAFETY: write and _exit are async-signal-safe, allowed by every filter, and given an initialised buffer.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        let log = TERMINATION_LOG.load(Ordering::Relaxed);
        if log >= 0 {
            libc::write(log, line.buf.as_ptr().cast(), line.len);
        }
        libc::_exit(EXIT_STATUS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seccomp_violation_line_names_thread_call_and_arguments() {
        let socket_line = |verdict| {
            let mut line = Line::new();
            describe(
                Some(ThreadKind::Vcpu),
                libc::SYS_socket,
                [2, 1, 0],
                None,
                verdict,
                &mut line,
            );
            line.text().to_string()
        };
        let text = socket_line(Verdict::Stopped);
        assert!(
            text.starts_with(
                "podvm: seccomp: the vcpu thread made system call socket (41) with arguments 0x2, 0x1, 0x0,"
            ),
            "{text}"
        );
        assert!(text.ends_with("logs instead)\n"), "{text}");
        let text = socket_line(Verdict::Allowed);
        assert!(
            text.ends_with(
                "which its filter does not allow; allowed by --seccomp log (counted in podvm_seccomp_violations_total)\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn seccomp_violation_line_names_the_file_a_refused_open_was_for() {
        let mut line = Line::new();
        describe(
            Some(ThreadKind::EventLoop),
            libc::SYS_openat,
            [0xffff_ff9c, 0x1000, 0x80000],
            Some(b"/dev/vhost-net"),
            Verdict::Stopped,
            &mut line,
        );
        let text = line.text();
        assert!(
            text.contains("openat (257) with arguments 0xffffff9c, 0x1000, 0x80000 on \"/dev/vhost-net\", which"),
            "{text}"
        );
    }
}
