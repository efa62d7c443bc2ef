//! The podvm virtual machine monitor: KVM, guest memory, vCPUs, boot, ACPI and the event loop.
//!
//! The launcher hands over a [`config::VmConfig`]; [`builder::build`] turns it into a [`Vm`]
//! in numbered steps, and [`Vm::run`] returns when the guest powers off or resets.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod builder;
pub mod config;
pub mod console;
pub mod control;
pub mod device_manager;
pub mod event_loop;
pub mod memory;
pub mod migration;
pub mod shutdown;
pub mod signals;
pub mod socket;
pub mod status;
pub mod vcpu;

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use devices::exit::ExitReason;
use devices::exit::ExitRequest;
use devices::legacy::Serial;
use vmm_sys_util::signal::Killable;

use crate::event_loop::EventLoop;
use crate::vcpu::control::VcpuControl;
use crate::vcpu::{Vcpu, VcpuError};

/// A built VM, not yet running.
pub struct Vm {
    vcpus: Vec<Vcpu>,
    event_loop: EventLoop,
    exit: ExitRequest,
    serial: Arc<Mutex<Serial>>,
    console_hub: Option<Arc<console::ConsoleHub>>,
    blocks: Vec<Arc<Mutex<devices::virtio::block::Block>>>,
    vcpu_control: Arc<VcpuControl>,
    migrator: Arc<migration::Migrator>,
    status: Option<StatusParts>,
    // Dropped after the vCPUs have stopped: the VM fd, then guest memory.
    _vm: Arc<kvm_ioctls::VmFd>,
    _mem: memory::GuestMemory,
}

/// What the status thread serves, started with the guest.
struct StatusParts {
    listener: Option<std::net::TcpListener>,
    ready_file: Option<std::path::PathBuf>,
    source: Arc<dyn status::StatusSource>,
    heartbeat: Arc<status::Heartbeat>,
}

/// Running the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot start the event loop thread: {0}")]
    EventLoopThread(#[source] std::io::Error),
    #[error("cannot start the migration thread: {0}")]
    MigrationThread(#[source] std::io::Error),
    #[error(transparent)]
    Status(#[from] status::StatusError),
    #[error(
        "flushing disk {path} at exit failed: {source}; writes the guest completed may be lost"
    )]
    Flush {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How long console clients get, in all, to take the guest's last output at exit.
const CONSOLE_FLUSH_GRACE: Duration = Duration::from_millis(500);

/// How often a stopping vCPU is kicked until its thread ends, and how often it is checked.
const KICK_INTERVAL: Duration = Duration::from_millis(10);
const JOIN_POLL: Duration = Duration::from_micros(100);

impl Vm {
    /// Takes the guest from a migration source (the VM was built with `incoming`); run the
    /// VM afterwards. On error the guest must not run: podvm exits.
    pub fn receive_migration(
        &self,
        listener: migration::IncomingListener,
    ) -> Result<(), migration::MigrationError> {
        // On a thread of its own, with the migration thread's seccomp filter: the stream
        // is read before anything else is filtered (the main thread filters itself once
        // it has started the others).
        let (migrator, vcpus) = (&self.migrator, &self.vcpus);
        std::thread::scope(|scope| {
            let receiving = std::thread::Builder::new()
                .name("migration".into())
                .spawn_scoped(scope, move || {
                    podvm_seccomp::install_or_exit(podvm_seccomp::ThreadKind::Migration);
                    migrator.receive(vcpus, listener)
                })
                .map_err(|e| {
                    migration::MigrationError::Invalid(format!(
                        "cannot start the migration thread: {e}"
                    ))
                })?;
            receiving.join().unwrap_or_else(|_| {
                Err(migration::MigrationError::Invalid(
                    "the migration thread panicked".into(),
                ))
            })
        })
    }

    /// Runs the guest until it powers off, resets, or a vCPU fails; returns which.
    pub fn run(self) -> Result<ExitReason, RunError> {
        vcpu::register_kick_handler()?;
        let stop = self.vcpu_control;
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus {
            match vcpu.spawn(stop.clone()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop_vcpus(&stop, threads);
                    return Err(e.into());
                }
            }
        }
        stop.set_threads(threads.iter().map(|t| t.as_pthread_t()).collect());
        tracing::info!(vcpus = threads.len(), "guest started");

        if let Err(e) = self.migrator.spawn_thread() {
            stop_vcpus(&stop, threads);
            return Err(RunError::MigrationThread(e));
        }
        let status = match self.status {
            Some(s) => {
                match status::StatusThread::spawn(s.listener, s.ready_file, s.source, s.heartbeat) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        stop_vcpus(&stop, threads);
                        return Err(e.into());
                    }
                }
            }
            None => None,
        };
        let event_loop = self.event_loop;
        let looper = std::thread::Builder::new()
            .name("event-loop".into())
            .spawn(move || event_loop.run());
        match looper {
            Ok(handle) => {
                // Every thread is started: from here the main thread only waits, stops
                // the vCPUs and flushes.
                podvm_seccomp::install_or_exit(podvm_seccomp::ThreadKind::Main);
                let _ = handle.join();
            }
            Err(e) => {
                stop_vcpus(&stop, threads);
                return Err(RunError::EventLoopThread(e));
            }
        }

        if let Some(status) = status {
            // Not ready any more (the readiness file goes) before the guest stops.
            status.stop();
        }
        stop_vcpus(&stop, threads);
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .flush();
        if let Some(hub) = &self.console_hub {
            hub.flush_clients(CONSOLE_FLUSH_GRACE);
        }
        // Everything the guest saw completed is made durable before podvm reports the end.
        for block in &self.blocks {
            let mut block = block.lock().unwrap_or_else(|p| p.into_inner());
            block.flush_on_exit().map_err(|source| RunError::Flush {
                path: block.disk().path().to_path_buf(),
                source,
            })?;
        }
        Ok(self.exit.reason().unwrap_or(ExitReason::Error))
    }
}

/// Stops every vCPU thread: sets the flag, then kicks each thread out of `KVM_RUN` until it
/// has ended (a kick that lands outside `KVM_RUN` is lost, hence the repeat).
fn stop_vcpus(control: &VcpuControl, threads: Vec<JoinHandle<()>>) {
    control.request_stop();
    // From here on only these handles kick: the control must not hold a joined thread's.
    control.set_threads(Vec::new());
    for thread in threads {
        let mut last_kick: Option<std::time::Instant> = None;
        while !thread.is_finished() {
            if last_kick.is_none_or(|t| t.elapsed() >= KICK_INTERVAL) {
                let _ = thread.kill(vcpu::kick_signal());
                last_kick = Some(std::time::Instant::now());
            }
            std::thread::sleep(JOIN_POLL);
        }
        let _ = thread.join();
    }
}
