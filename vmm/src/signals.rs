//! Signals taken through a signalfd instead of a handler: blocked in every thread, read from
//! a descriptor that an event loop or `poll` watches. Used by the VMM's graceful shutdown and
//! by the `podvm console` client.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for &signo in signals {
            libc::sigaddset(&mut set, signo);
        }
    }
    set
}

/// Blocks `signals` in the calling thread and every thread it starts afterwards, so they
/// reach only a [`SignalFd`].
pub fn block(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals);
    // SAFETY: `set` is a valid, initialized sigset_t; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// A non-blocking descriptor that becomes readable when one of its signals is pending.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// A descriptor for `signals`, which must already be [`block`]ed.
    pub fn new(signals: &[libc::c_int]) -> io::Result<Self> {
        let set = sigset(signals);
        // SAFETY: `set` is a valid sigset_t; -1 asks for a new descriptor, which is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// The number of a pending signal, consuming it; `None` when none is pending.
    pub fn read(&self) -> Option<libc::c_int> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        // SAFETY: reads at most `info.len()` bytes into `info`, a buffer this frame owns.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        // ssi_signo is the first field of signalfd_siginfo.
        (n == info.len() as isize)
            .then(|| u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as libc::c_int)
    }
}

impl AsRawFd for SignalFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
