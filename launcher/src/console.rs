//! `podvm console SOCKET`: this terminal, in raw mode, on a VM's console socket. The escape
//! key (Ctrl-] by default) detaches; the terminal is restored on every way out.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;

use vmm::signals::SignalFd;

use crate::terminal::RawMode;

/// Attaching failed, or the VM went away.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(transparent)]
    Connect(#[from] crate::vm_socket::ConnectError),
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
    let stream = crate::vm_socket::connect(path, "console", "--console")?;
    let escape_name = (escape + b'@') as char;
    eprint!(
        "[podvm] attached to {}; Ctrl-{escape_name} detaches\r\n",
        path.display()
    );
    // Termination signals are taken through a signalfd, so they end the relay like the
    // escape key does and the terminal is restored before podvm exits.
    let numbers = DETACH_SIGNALS.map(|(signo, _)| signo);
    vmm::signals::block(&numbers)?;
    let signals = SignalFd::new(&numbers)?;
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
            fd: signals.as_raw_fd(),
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
            if let Some(signo) = signals.read() {
                let name = DETACH_SIGNALS
                    .iter()
                    .find(|(s, _)| *s == signo)
                    .map_or("a signal", |(_, name)| *name);
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

/// The signals that end an attached console (detaching first), with their names.
const DETACH_SIGNALS: [(libc::c_int, &str); 4] = [
    (libc::SIGTERM, "SIGTERM"),
    (libc::SIGHUP, "SIGHUP"),
    (libc::SIGINT, "SIGINT"),
    (libc::SIGQUIT, "SIGQUIT"),
];

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
