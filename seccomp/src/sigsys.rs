//! What a filter in kill mode does with a system call it refuses: the kernel sends SIGSYS
//! (SECCOMP_RET_TRAP) to the thread; this handler writes one line naming the thread's kind,
//! the call and its first arguments, and ends the process with status 159 (128 + SIGSYS).
//! It allocates nothing and calls only write(2) and exit_group(2), which every filter
//! allows.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

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

/// Opens the termination message file if there is one (it is never created); once: a
/// second call keeps the file the first opened.
pub(crate) fn open_termination_log() {
    if TERMINATION_LOG.load(Ordering::SeqCst) >= 0 {
        return;
    }
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

/// JSON log lines: what follows `msg` in each (the VMI's fields, the target, the closing
/// brace), set once before the first filter. Unset: plain lines.
static JSON_TAIL: OnceLock<Box<[u8]>> = OnceLock::new();

/// Makes the lines about refused calls on stderr JSON objects like the rest of podvm's log
/// when it is JSON: `{"ts":...,"level":...,"msg":...` and then `tail`, the remaining
/// fields with the closing brace (`,"name":"vm","target":"podvm_seccomp"}`). The
/// termination message stays a plain line. Call before the first filter.
pub fn log_as_json(tail: &str) {
    let _ = JSON_TAIL.set(tail.as_bytes().into());
}

/// Year, month, day, hour, minute, second (UTC) of `secs` seconds after the Unix epoch;
/// pure arithmetic (Howard Hinnant's civil-from-days), so a signal handler may use it.
pub fn utc(secs: u64) -> (i64, u64, u64, u64, u64, u64) {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month as u64,
        day as u64,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
    )
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
    buf: [u8; 1024],
    len: usize,
    /// The level of the line in a JSON log.
    level: &'static [u8],
}

impl Line {
    pub(crate) fn new() -> Line {
        Line {
            buf: [0; 1024],
            len: 0,
            level: b"warn",
        }
    }

    /// Writes the line to `fd` with write(2) (no lock, no allocation).
    pub(crate) fn write_to(&self, fd: i32) {
        // SAFETY: writes the initialised part of the buffer.
        unsafe { libc::write(fd, self.buf.as_ptr().cast(), self.len) };
    }

    /// Writes the line to stderr: as it is, or as a JSON object when the log is JSON. No
    /// lock, no allocation: the signal handler and log mode's supervisor use it.
    pub(crate) fn log(&self) {
        match JSON_TAIL.get() {
            None => self.write_to(2),
            Some(tail) => {
                let mut json = Line::new();
                self.json(now(), tail, &mut json);
                json.write_to(2);
            }
        }
    }

    /// The line as a JSON object at `now` (seconds, milliseconds since the epoch), followed
    /// by `tail`. The message is cut, not the object, if it does not fit.
    fn json(&self, now: (u64, u64), tail: &[u8], out: &mut Line) {
        let (year, month, day, hour, minute, second) = utc(now.0);
        out.push(b"{\"ts\":\"");
        out.push_dec_width(year.max(0) as u64, 4);
        out.push(b"-");
        out.push_dec_width(month, 2);
        out.push(b"-");
        out.push_dec_width(day, 2);
        out.push(b"T");
        out.push_dec_width(hour, 2);
        out.push(b":");
        out.push_dec_width(minute, 2);
        out.push(b":");
        out.push_dec_width(second, 2);
        out.push(b".");
        out.push_dec_width(now.1, 3);
        out.push(b"Z\",\"level\":\"");
        out.push(self.level);
        out.push(b"\",\"msg\":\"");
        let text = &self.buf[..self.len];
        let text = text.strip_prefix(b"podvm: ").unwrap_or(text);
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        // Room for the longest escape, the closing quote, the tail and the line break.
        let end = out.buf.len().saturating_sub(tail.len() + 8);
        for &b in text {
            if out.len >= end {
                break;
            }
            match b {
                b'"' => out.push(b"\\\""),
                b'\\' => out.push(b"\\\\"),
                0x20..=0x7e => out.push(&[b]),
                // Control bytes, and bytes of a path that may not be UTF-8.
                _ => out.push(b"?"),
            }
        }
        out.push(b"\"");
        out.push(tail);
        out.push(b"\n");
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

    fn push_dec(&mut self, v: u64) {
        self.push_dec_width(v, 1);
    }

    /// `v` in decimal, zero-padded to `width` digits (at most 20).
    fn push_dec_width(&mut self, mut v: u64, width: usize) {
        let mut digits = [b'0'; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let start = i.min(digits.len().saturating_sub(width));
        self.push(&digits[start..]);
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
            line.level = b"error";
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
    // The line goes to stderr (JSON if the log is) and, plain, to the termination message
    // file (a descriptor opened at start, or none); then the process ends. Only
    // clock_gettime, write and _exit are called: async-signal-safe, and allowed by every
    // filter.
    line.log();
    write_termination_log(&line.buf[..line.len]);
    // SAFETY: _exit ends the process at once; nothing of this handler's runs after it.
    unsafe { libc::_exit(EXIT_STATUS) }
}

/// The wall clock: seconds and milliseconds since the epoch (clock_gettime, which a signal
/// handler may call and every filter allows).
fn now() -> (u64, u64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, which is valid for writes.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.max(0) as u64 / 1_000_000,
    )
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
    fn seccomp_violation_line_in_a_json_log_is_one_object_with_the_log_fields() {
        let mut line = Line::new();
        describe(
            Some(ThreadKind::Vcpu),
            libc::SYS_openat,
            [0xffff_ff9c, 0x1000, 0],
            Some(b"/tmp/a \"quoted\" \\ name\n\xff"),
            Verdict::Stopped,
            &mut line,
        );
        let mut json = Line::new();
        // 2026-11-29T18:40:05.123Z
        line.json(
            (1_795_977_605, 123),
            br#","namespace":"ns","name":"vm","target":"podvm_seccomp"}"#,
            &mut json,
        );
        let text = json.text();
        assert!(text.ends_with("}\n") && text.lines().count() == 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["ts"], "2026-11-29T18:40:05.123Z");
        assert_eq!(v["level"], "error");
        assert_eq!((&v["namespace"], &v["name"]), (&"ns".into(), &"vm".into()));
        assert_eq!(v["target"], "podvm_seccomp");
        let msg = v["msg"].as_str().unwrap();
        assert!(
            msg.starts_with("seccomp: the vcpu thread made system call openat (257)"),
            "{msg}"
        );
        assert!(
            msg.contains(r#"on "/tmp/a "quoted" \ name??""#),
            "escaped, control and non-ASCII bytes replaced: {msg}"
        );

        // A message too long for the buffer is cut; the object stays whole.
        let mut long = Line::new();
        long.push(&[b'"'; 1000]);
        let mut json = Line::new();
        long.json((0, 0), br#","target":"t"}"#, &mut json);
        let v: serde_json::Value = serde_json::from_str(json.text()).unwrap();
        assert_eq!(v["ts"], "1970-01-01T00:00:00.000Z");
        assert_eq!(v["level"], "warn");
        assert!(v["msg"].as_str().unwrap().len() > 400);
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
