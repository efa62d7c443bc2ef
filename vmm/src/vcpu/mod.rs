//! vCPUs: creation and architectural setup, and one thread per vCPU running `KVM_RUN`.
//!
//! A vCPU thread dispatches port I/O and MMIO exits to the device buses, and parks or stops
//! when its [`control::VcpuControl`] says so. To stop a thread that is inside `KVM_RUN`, the VMM sends it the
//! kick signal ([`kick_signal`]), whose handler does nothing: the signal alone makes `KVM_RUN`
//! return `EINTR`.

pub mod control;
pub mod cpuid;
pub mod regs;
pub mod topology;

use std::sync::Arc;
use std::thread::JoinHandle;

use devices::bus::Bus;
use devices::exit::{ExitReason, ExitRequest};
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};

use crate::boot::KernelEntry;
use crate::memory::GuestMemory;

/// The buses a vCPU dispatches exits to.
#[derive(Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// A vCPU failed to set up or to run.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {id} (APIC ID {apic_id}): {source}")]
    Create {
        id: u8,
        apic_id: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: {count} CPUID entries are more than KVM takes")]
    CpuidTooLong { id: u8, count: usize },
    #[error("cannot set CPUID on vCPU {id}: {source}")]
    Cpuid {
        id: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: {source}")]
    Regs {
        id: u8,
        #[source]
        source: regs::RegsError,
    },
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn {
        id: u8,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
}

/// The signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick signal handler; call once before starting vCPU threads.
pub fn register_kick_handler() -> Result<(), VcpuError> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
        .map_err(VcpuError::KickSignal)
}

/// One vCPU, set up and ready to run.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    buses: Arc<Buses>,
    exit: ExitRequest,
    /// The last exit was an I/O or MMIO access, which KVM completes on the next KVM_RUN.
    io_pending: bool,
}

impl Vcpu {
    /// Creates vCPU `id` of `topology` with CPUID, MSRs, FPU and LAPIC set up. KVM takes
    /// the vCPU's APIC ID as its vCPU ID: that is the APIC ID the guest reads.
    pub fn new(
        vm: &VmFd,
        id: u8,
        topology: &topology::Topology,
        supported_cpuid: &CpuId,
        buses: Arc<Buses>,
        exit: ExitRequest,
    ) -> Result<Self, VcpuError> {
        let apic_id = topology.apic_id(u32::from(id));
        let fd = vm
            .create_vcpu(u64::from(apic_id))
            .map_err(|source| VcpuError::Create {
                id,
                apic_id,
                source,
            })?;
        let mut entries = supported_cpuid.as_slice().to_vec();
        cpuid::patch(&mut entries, topology, u32::from(id));
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::CpuidTooLong {
            id,
            count: entries.len(),
        })?;
        fd.set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::Cpuid { id, source })?;
        let regs_err = |source| VcpuError::Regs { id, source };
        regs::setup_msrs(&fd).map_err(regs_err)?;
        regs::setup_fpu(&fd).map_err(regs_err)?;
        regs::setup_lapic(&fd).map_err(regs_err)?;
        Ok(Self {
            id,
            fd,
            buses,
            exit,
            io_pending: false,
        })
    }

    /// The vCPU's KVM file descriptor.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Makes this the boot vCPU: registers for `entry`, and the GDT and page tables it uses.
    /// The others wait in KVM for the guest's INIT/SIPI.
    pub fn setup_boot(&self, mem: &GuestMemory, entry: KernelEntry) -> Result<(), VcpuError> {
        let regs_err = |source| VcpuError::Regs {
            id: self.id,
            source,
        };
        regs::write_boot_tables(mem, entry.mode).map_err(regs_err)?;
        regs::setup_sregs(&self.fd, entry.mode).map_err(regs_err)?;
        regs::setup_regs(&self.fd, entry).map_err(regs_err)
    }

    /// Starts the vCPU on its own thread, named `vcpu<N>`.
    pub fn spawn(self, control: Arc<control::VcpuControl>) -> Result<JoinHandle<()>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                podvm_seccomp::install_or_exit(podvm_seccomp::ThreadKind::Vcpu);
                self.run(&control);
                control.thread_ended();
            })
            .map_err(|source| VcpuError::Spawn { id, source })
    }

    fn run(mut self, control: &control::VcpuControl) {
        let exits = control.exits(self.id);
        loop {
            if self.io_pending && control.wants_attention() {
                self.complete_io(exits);
            }
            // Once the guest has asked to end (on any vCPU), nothing it runs afterwards
            // counts.
            if control.checkpoint(self.id, Some(&self.fd)) != control::Next::Run
                || self.exit.reason().is_some()
            {
                return;
            }
            if let Some(reason) = self.run_once(exits) {
                self.exit.request(reason);
                return;
            }
        }
    }

    /// KVM finishes an I/O or MMIO access (loads what a read returned, moves past the
    /// instruction) only on the next KVM_RUN, and the state KVM_GET_* return does not show
    /// the access pending. Before the thread parks, where a migration saves that state, the
    /// access is completed with `immediate_exit` set: KVM_RUN finishes it and returns
    /// without running guest code (a string instruction may exit again for its next part).
    fn complete_io(&mut self, exits: &control::ExitCounts) {
        self.fd.set_kvm_immediate_exit(1);
        for _ in 0..64 {
            if let Some(reason) = self.run_once(exits) {
                self.exit.request(reason);
                break;
            }
            if !self.io_pending {
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Runs the guest until one exit; returns a reason when the VM must end.
    fn run_once(&mut self, exits: &control::ExitCounts) -> Option<ExitReason> {
        let exit = self.fd.run();
        self.io_pending = matches!(
            exit,
            Ok(VcpuExit::IoIn(..)
                | VcpuExit::IoOut(..)
                | VcpuExit::MmioRead(..)
                | VcpuExit::MmioWrite(..))
        );
        exits.count(match &exit {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => control::ExitKind::Io,
            Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => control::ExitKind::Mmio,
            Ok(VcpuExit::Hlt) => control::ExitKind::Hlt,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                control::ExitKind::Interrupted
            }
            _ => control::ExitKind::Other,
        });
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.buses.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.buses.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.buses.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.buses.mmio.write(addr, data);
                None
            }
            // With the in-kernel LAPIC a halted vCPU waits in KVM; an exit here is spurious.
            Ok(VcpuExit::Hlt) => None,
            // A triple fault: what a PC does is reset.
            Ok(VcpuExit::Shutdown) => {
                tracing::info!(vcpu = self.id, "guest triple-faulted");
                Some(ExitReason::Reset)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Some(ExitReason::PowerOff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Some(ExitReason::Reset),
                other => {
                    tracing::warn!(vcpu = self.id, event = other, "unhandled system event");
                    None
                }
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                tracing::error!(
                    vcpu = self.id,
                    reason = format_args!("{reason:#x}"),
                    cpu,
                    "KVM could not enter the guest"
                );
                Some(ExitReason::Error)
            }
            Ok(VcpuExit::InternalError) => {
                tracing::error!(
                    vcpu = self.id,
                    "KVM internal error (the host's KVM could not emulate the guest)"
                );
                Some(ExitReason::Error)
            }
            Ok(other) => {
                tracing::error!(vcpu = self.id, exit = ?other, "unexpected vCPU exit");
                Some(ExitReason::Error)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => {
                tracing::error!(vcpu = self.id, error = %e, "KVM_RUN failed");
                Some(ExitReason::Error)
            }
        }
    }
}
