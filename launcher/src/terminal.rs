//! Raw mode for an interactive stdio console, restored however podvm ends.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;

/// Puts stdin in raw mode while alive (only if stdin is a terminal); restores it on drop.
pub struct RawMode {
    saved: Option<libc::termios>,
}

impl RawMode {
    /// Enters raw mode if stdin is a terminal; otherwise does nothing.
    pub fn enter() -> Self {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Self { saved: None };
        }
        let fd = stdin.as_raw_fd();
        // SAFETY: termios is plain data; all-zero is a valid value that tcgetattr overwrites.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `fd` is stdin, open for the life of the process; `saved` is a valid termios.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Self { saved: None };
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios copied from the terminal's own settings.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so podvm's own log lines still start at column 0.
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: as above; `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Self { saved: None };
        }
        Self { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = self.saved.take() {
            // SAFETY: restores the settings read from this same fd in `enter`.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, &saved) };
        }
    }
}
