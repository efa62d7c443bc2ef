//! The device event loop: one thread, one epoll set (event-manager), named tokens.
//!
//! For now it carries the console input (stdin to the UART) and the "guest wants to end"
//! eventfd; device queues join it as they land.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::exit::ExitRequest;
use devices::legacy::Serial;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::console::{UartInput, INPUT_CHUNK};

/// What the event loop serves.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The event loop and the flag that ends it.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    done: Arc<AtomicBool>,
    heartbeat: Arc<crate::status::Heartbeat>,
}

/// The event loop wakes at least this often, so its heartbeat shows it is not stuck.
const BEAT_MS: i32 = 1000;

/// The event loop could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("cannot create the event loop: {0}")]
    Create(#[source] event_manager::Error),
    #[error("cannot create the console retry timer: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

impl EventLoop {
    /// A loop that ends when `exit` is requested.
    pub fn new(exit: &ExitRequest) -> Result<Self, EventLoopError> {
        let mut manager: EventManager<Subscriber> =
            EventManager::new().map_err(EventLoopError::Create)?;
        let done = Arc::new(AtomicBool::new(false));
        let watcher: Subscriber = Arc::new(Mutex::new(ExitWatcher {
            exit: exit.clone(),
            done: done.clone(),
        }));
        manager.add_subscriber(watcher);
        Ok(Self {
            manager,
            done,
            heartbeat: Default::default(),
        })
    }

    /// The loop's pulse (see [`crate::status`]'s liveness).
    pub fn heartbeat(&self) -> Arc<crate::status::Heartbeat> {
        self.heartbeat.clone()
    }

    /// Adds a device (or anything else) that handles its own events.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Feeds podvm's stdin to the guest's UART.
    pub fn add_stdin_console(&mut self, serial: Arc<Mutex<Serial>>) -> Result<(), EventLoopError> {
        let console: Subscriber = Arc::new(Mutex::new(StdinConsole {
            stdin: io::stdin(),
            input: UartInput::new(serial).map_err(EventLoopError::Timer)?,
        }));
        self.manager.add_subscriber(console);
        Ok(())
    }

    /// Runs until the guest asks to end.
    pub fn run(mut self) {
        podvm_seccomp::install_or_exit(podvm_seccomp::ThreadKind::EventLoop);
        while !self.done.load(Ordering::Acquire) {
            self.heartbeat.beat();
            if let Err(e) = self.manager.run_with_timeout(BEAT_MS) {
                tracing::error!(error = ?e, "event loop wait failed");
                return;
            }
        }
    }
}

struct ExitWatcher {
    exit: ExitRequest,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the VM exit event");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
        self.done.store(true, Ordering::Release);
    }
}

/// stdin → UART, with back-pressure: bytes the FIFO cannot take wait in [`UartInput`],
/// stdin is not read meanwhile, and its timer offers them again.
struct StdinConsole {
    stdin: io::Stdin,
    input: UartInput,
}

impl StdinConsole {
    fn stdin_events(&self) -> Events {
        Events::new(&self.stdin, EventSet::IN)
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; INPUT_CHUNK];
        match self.stdin.lock().read(&mut buf) {
            Ok(0) => {
                // End of input: the guest keeps running, it just gets no more keys.
                let _ = ops.remove(self.stdin_events());
            }
            Ok(n) => {
                if !self.input.offer(&buf[..n]) {
                    let _ = ops.remove(self.stdin_events());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "reading stdin failed; console input stops");
                let _ = ops.remove(self.stdin_events());
            }
        }
    }
}

impl MutEventSubscriber for StdinConsole {
    fn init(&mut self, ops: &mut EventOps) {
        // epoll refuses regular files and /dev/null: then there is simply no input.
        if let Err(e) = ops.add(self.stdin_events()) {
            tracing::debug!(error = ?e, "stdin cannot be polled; console has no input");
        }
        if let Err(e) = ops.add(Events::new(self.input.retry_timer(), EventSet::IN)) {
            tracing::warn!(error = ?e, "cannot watch the console retry timer");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.stdin.as_raw_fd() {
            self.read_stdin(ops);
        } else if events.fd() == self.input.retry_timer().as_raw_fd() && self.input.retry() {
            if let Err(e) = ops.add(self.stdin_events()) {
                tracing::debug!(error = ?e, "cannot resume watching stdin");
            }
        }
    }
}
