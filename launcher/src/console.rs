//! `podvm console SOCKET`: this terminal, in raw mode, on a VM's console socket. The escape
//! key (Ctrl-] by default) detaches; the terminal is restored on every way out.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::terminal::RawMode;

/// Attaching failed, or the VM went away.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("console {path}: no such socket; is the VM running with --console {path}?")]
    Missing { path: PathBuf },
    #[error("console {path}: connection refused; the VM that created it has exited")]
    Refused { path: PathBuf },
    #[error("console {path}: permission denied; attach as the user that runs the VM")]
    Permission { path: PathBuf },
    #[error("console {path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--escape {0:?}: use a character from @ to _ (Ctrl-@ .. Ctrl-_), e.g. ]")]
    Escape(char),
    #[error("console I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// The control character typed as Ctrl-`c`.
fn control(c: char) -> Option<u8> {
    let upper = c.to_ascii_uppercase();
    ('@'..='_').contains(&upper).then(|| upper as u8 - b'@')
}

/// Attaches to `path` until the escape key, end of input, or the VM closing the socket.
pub fn attach(path: &Path, escape: char) -> Result<(), AttachError> {
    let escape = control(escape).ok_or(AttachError::Escape(escape))?;
    let stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => AttachError::Missing { path: path.into() },
        io::ErrorKind::ConnectionRefused => AttachError::Refused { path: path.into() },
        io::ErrorKind::PermissionDenied => AttachError::Permission { path: path.into() },
        _ => AttachError::Connect {
            path: path.into(),
            source,
        },
    })?;
    let escape_name = (escape + b'@') as char;
    eprint!(
        "[podvm] attached to {}; Ctrl-{escape_name} detaches\r\n",
        path.display()
    );
    // Termination signals are taken through a signalfd, so they end the relay like the
    // escape key does and the terminal is restored before podvm exits.
    let signals = SignalFd::block_termination()?;
    let raw = RawMode::enter();

    let result = relay(stream, escape, &signals);
    drop(raw);
    match result {
        Ok(End::Detached) => eprintln!("\r\n[podvm] detached"),
        Ok(End::Signal(name)) => eprintln!("\r\n[podvm] detached on {name}"),
        Ok(End::VmGone) => eprintln!("\r\n[podvm] the VM closed the console (it has stopped)"),
        Ok(End::InputClosed) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

enum End {
    Detached,
    Signal(&'static str),
    VmGone,
    InputClosed,
}

/// Copies keys to the VM and output to the terminal, whichever is ready, until one ends.
fn relay(mut vm: UnixStream, escape: u8, signals: &SignalFd) -> io::Result<End> {
    let mut stdin = io::stdin();
    let mut stdout = io::stdout();
    let mut buf = [0u8; 4096];
    let mut fds = [
        libc::pollfd {
            fd: stdin.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: vm.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of three pollfd for the duration of the call, and both
        // descriptors are open (stdin, the stream this function owns, and the signalfd).
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[2].revents != 0 {
            if let Some(name) = signals.read() {
                return Ok(End::Signal(name));
            }
        }
        if fds[1].revents != 0 {
            let n = vm.read(&mut buf)?;
            if n == 0 {
                return Ok(End::VmGone);
            }
            stdout.write_all(&buf[..n])?;
            stdout.flush()?;
        }
        if fds[0].revents != 0 {
            let n = stdin.read(&mut buf)?;
            if n == 0 {
                return Ok(End::InputClosed);
            }
            let keys = &buf[..n];
            if let Some(i) = keys.iter().position(|&b| b == escape) {
                vm.write_all(&keys[..i])?;
                return Ok(End::Detached);
            }
            if vm.write_all(keys).is_err() {
                return Ok(End::VmGone);
            }
        }
    }
}

/// SIGTERM, SIGHUP, SIGINT and SIGQUIT, blocked and readable from a descriptor.
struct SignalFd {
    fd: std::os::fd::OwnedFd,
}

impl SignalFd {
    const SIGNALS: [(libc::c_int, &'static str); 4] = [
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGINT, "SIGINT"),
        (libc::SIGQUIT, "SIGQUIT"),
    ];

    fn block_termination() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: sigset_t is plain data; sigemptyset initializes it before any use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame; the signal numbers are valid.
        unsafe {
            libc::sigemptyset(&mut set);
            for (signo, _) in Self::SIGNALS {
                libc::sigaddset(&mut set, signo);
            }
        }
        // SAFETY: `set` is initialized; the old mask is not needed. This thread is the only
        // one, so the signals now reach only the signalfd.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor, checked below.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// The name of a pending signal, if one is.
    fn read(&self) -> Option<&'static str> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads at most `info.len()` bytes into `info`, a buffer this frame owns.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if n != info.len() as isize {
            return None;
        }
        let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]);
        Self::SIGNALS
            .iter()
            .find(|(s, _)| *s as u32 == signo)
            .map(|(_, name)| *name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_key_maps_to_control_character() {
        assert_eq!(control(']'), Some(0x1d));
        assert_eq!(control('a'), Some(0x01));
        assert_eq!(control('1'), None);
    }
}
