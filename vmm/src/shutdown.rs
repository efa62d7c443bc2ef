//! What a pod expects of SIGTERM: press the guest's ACPI power button, give it
//! `shutdown_timeout` to power off, then stop it. SIGINT is taken the same way; a second
//! signal stops at once.
//!
//! The signals arrive through a signalfd on the event loop, so the launcher must block them
//! in every thread ([`block_termination_signals`]) before any thread starts.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use devices::acpi_pm::PowerButton;
use devices::exit::{ExitReason, ExitRequest};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

const TOKEN_SIGNAL: u32 = 0;
const TOKEN_TIMEOUT: u32 = 1;

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    set
}

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts afterwards.
pub fn block_termination_signals() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is a valid, initialized sigset_t; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(rc))
    }
}

/// The event-loop side of graceful shutdown.
pub struct ShutdownOnSignal {
    signals: OwnedFd,
    timer: TimerFd,
    button: Arc<PowerButton>,
    exit: ExitRequest,
    timeout: Duration,
    pressed: bool,
}

impl ShutdownOnSignal {
    /// Watches SIGTERM and SIGINT (which must already be blocked).
    pub fn new(button: Arc<PowerButton>, exit: ExitRequest, timeout: Duration) -> io::Result<Self> {
        let set = termination_set();
        // SAFETY: `set` is a valid sigset_t; -1 asks for a new descriptor, which is checked.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let signals = unsafe { OwnedFd::from_raw_fd(fd) };
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self {
            signals,
            timer,
            button,
            exit,
            timeout,
            pressed: false,
        })
    }

    fn read_signal(&self) -> Option<u32> {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        let fd: RawFd = self.signals.as_raw_fd();
        // SAFETY: reads at most `info.len()` bytes into `info`, a buffer this frame owns.
        let n = unsafe { libc::read(fd, info.as_mut_ptr().cast(), info.len()) };
        (n == info.len() as isize).then(|| u32::from_ne_bytes([info[0], info[1], info[2], info[3]]))
    }
}

impl MutEventSubscriber for ShutdownOnSignal {
    fn init(&mut self, ops: &mut EventOps) {
        let watch = [
            Events::with_data(&self.signals, TOKEN_SIGNAL, EventSet::IN),
            Events::with_data(&self.timer, TOKEN_TIMEOUT, EventSet::IN),
        ];
        for events in watch {
            if let Err(e) = ops.add(events) {
                tracing::error!(error = ?e, "cannot watch termination signals");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_SIGNAL => {
                while let Some(signo) = self.read_signal() {
                    let name = if signo == libc::SIGINT as u32 {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    if self.pressed {
                        tracing::warn!(
                            signal = name,
                            "second termination signal: stopping the guest now"
                        );
                        self.exit.request(ExitReason::Stopped);
                        return;
                    }
                    self.pressed = true;
                    tracing::info!(
                        signal = name,
                        timeout_s = self.timeout.as_secs_f64(),
                        "pressing the ACPI power button; the guest is stopped if it has not powered off by the timeout"
                    );
                    if let Err(e) = self.button.press() {
                        tracing::error!(error = %e, "power button press failed; stopping the guest");
                        self.exit.request(ExitReason::Stopped);
                        return;
                    }
                    if let Err(e) = self.timer.reset(self.timeout, None) {
                        tracing::error!(error = %e, "shutdown timer failed; stopping the guest");
                        self.exit.request(ExitReason::Stopped);
                    }
                }
            }
            TOKEN_TIMEOUT => {
                let _ = self.timer.wait();
                tracing::warn!(
                    timeout_s = self.timeout.as_secs_f64(),
                    "the guest did not power off within the shutdown timeout; stopping it"
                );
                self.exit.request(ExitReason::Stopped);
            }
            _ => {}
        }
    }
}
