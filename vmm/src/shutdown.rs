//! What a pod expects of SIGTERM: press the guest's ACPI power button, give it
//! `shutdown_timeout` to power off, then stop it. SIGINT is taken the same way; a second
//! signal stops at once. The API's `shutdown` goes through the same [`GracefulShutdown`].
//!
//! The signals arrive through a signalfd on the event loop, so the launcher must block them
//! in every thread ([`block_termination_signals`]) before any thread starts.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::acpi_pm::PowerButton;
use devices::exit::{ExitReason, ExitRequest};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::VmFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::signals::{self, SignalFd};
use crate::vcpu::control::{RunState, VcpuControl};

const TOKEN_SIGNAL: u32 = 0;
const TOKEN_TIMEOUT: u32 = 1;

/// The signals that ask podvm to shut the guest down.
const TERMINATION: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// Blocks SIGTERM and SIGINT in the calling thread and every thread it starts afterwards.
pub fn block_termination_signals() -> io::Result<()> {
    signals::block(&TERMINATION)
}

/// Graceful shutdown, shared by the signal handler and the API: press the power button once,
/// arm the timer, stop the guest when the timer fires. A paused VM is resumed first, since a
/// paused guest cannot answer the button.
pub struct GracefulShutdown {
    button: Arc<PowerButton>,
    exit: ExitRequest,
    vcpus: Arc<VcpuControl>,
    vm: Arc<VmFd>,
    default_timeout: Duration,
    state: Mutex<GraceState>,
}

struct GraceState {
    timer: TimerFd,
    /// When the button was pressed and how long the guest was given.
    pressed: Option<(Instant, Duration)>,
}

/// What [`GracefulShutdown::begin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begun {
    /// The button was pressed; the guest is stopped after this long.
    Pressed(Duration),
    /// It had been pressed already; the earlier deadline stands, this much of it is left.
    AlreadyPressed(Duration),
    /// The button or the timer failed, so the guest was stopped at once.
    Stopped,
}

impl GracefulShutdown {
    /// Shutdown for the VM whose button, exit request and vCPUs these are.
    pub fn new(
        button: Arc<PowerButton>,
        exit: ExitRequest,
        vcpus: Arc<VcpuControl>,
        vm: Arc<VmFd>,
        default_timeout: Duration,
    ) -> io::Result<Self> {
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self {
            button,
            exit,
            vcpus,
            vm,
            default_timeout,
            state: Mutex::new(GraceState {
                timer,
                pressed: None,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GraceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The grace period used when a caller gives none (`--shutdown-timeout`).
    pub fn default_timeout(&self) -> Duration {
        self.default_timeout
    }

    /// Time left before the guest is stopped, once the button has been pressed.
    pub fn remaining(&self) -> Option<Duration> {
        self.lock()
            .pressed
            .map(|(at, timeout)| timeout.saturating_sub(at.elapsed()))
    }

    /// Presses the power button (once) and arms the stop timer; `why` is logged.
    pub fn begin(&self, why: &str, timeout: Option<Duration>) -> Begun {
        let mut state = self.lock();
        if let Some((at, timeout)) = state.pressed {
            return Begun::AlreadyPressed(timeout.saturating_sub(at.elapsed()));
        }
        let timeout = timeout.unwrap_or(self.default_timeout);
        if self.vcpus.run_state() == RunState::Paused {
            tracing::info!("resuming the paused guest so it can answer the power button");
            self.vcpus.resume(&self.vm);
        }
        tracing::info!(
            by = why,
            timeout_s = timeout.as_secs_f64(),
            "pressing the ACPI power button; the guest is stopped if it has not powered off by the timeout"
        );
        if let Err(e) = self.button.press() {
            tracing::error!(error = %e, "power button press failed; stopping the guest");
            self.exit.request(ExitReason::Stopped);
            return Begun::Stopped;
        }
        // A zero timer would be disarmed: the shortest grace is one millisecond.
        if let Err(e) = state
            .timer
            .reset(timeout.max(Duration::from_millis(1)), None)
        {
            tracing::error!(error = %e, "shutdown timer failed; stopping the guest");
            self.exit.request(ExitReason::Stopped);
            return Begun::Stopped;
        }
        state.pressed = Some((Instant::now(), timeout));
        Begun::Pressed(timeout)
    }

    /// Stops the guest now, without waiting for it; `why` is logged.
    pub fn stop_now(&self, why: &str) {
        tracing::warn!(by = why, "stopping the guest now");
        self.exit.request(ExitReason::Stopped);
    }

    fn timer_fired(&self) {
        let mut state = self.lock();
        let _ = state.timer.wait();
        let timeout = state.pressed.map_or(self.default_timeout, |(_, t)| t);
        tracing::warn!(
            timeout_s = timeout.as_secs_f64(),
            "the guest did not power off within the shutdown timeout; stopping it"
        );
        self.exit.request(ExitReason::Stopped);
    }
}

/// The event-loop side of graceful shutdown: termination signals and the stop timer.
pub struct ShutdownOnSignal {
    signals: SignalFd,
    timer_fd: RawFd,
    shutdown: Arc<GracefulShutdown>,
}

impl ShutdownOnSignal {
    /// Watches SIGTERM and SIGINT (which must already be blocked) and `shutdown`'s timer.
    pub fn new(shutdown: Arc<GracefulShutdown>) -> io::Result<Self> {
        let signals = SignalFd::new(&TERMINATION)?;
        let timer_fd = shutdown.lock().timer.as_raw_fd();
        Ok(Self {
            signals,
            timer_fd,
            shutdown,
        })
    }
}

impl MutEventSubscriber for ShutdownOnSignal {
    fn init(&mut self, ops: &mut EventOps) {
        let watch = [
            Events::with_data(&self.signals, TOKEN_SIGNAL, EventSet::IN),
            Events::with_data_raw(self.timer_fd, TOKEN_TIMEOUT, EventSet::IN),
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
                while let Some(signo) = self.signals.read() {
                    let name = if signo == libc::SIGINT {
                        "SIGINT"
                    } else {
                        "SIGTERM"
                    };
                    match self.shutdown.begin(name, None) {
                        Begun::AlreadyPressed(_) => {
                            tracing::warn!(
                                signal = name,
                                "second termination signal: stopping the guest now"
                            );
                            self.shutdown.stop_now(name);
                            return;
                        }
                        Begun::Stopped => return,
                        Begun::Pressed(_) => {}
                    }
                }
            }
            TOKEN_TIMEOUT => self.shutdown.timer_fired(),
            _ => {}
        }
    }
}
