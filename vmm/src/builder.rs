//! `VmConfig` → a VM ready to run, in the order the steps happen.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};

use devices::exit::ExitRequest;

use crate::api::{ApiError, ApiServer};
use crate::config::{ConfigError, ConsoleConfig, DiskConfig, NetBackendConfig, VmConfig};
use crate::console::{self, ConsoleError, ConsoleHub, ConsoleServer};
use crate::device_manager::{DeviceError, DeviceManager};
use crate::event_loop::{EventLoop, EventLoopError};
use crate::memory::{self, GuestMemory, MemoryError};
use crate::shutdown::{GracefulShutdown, ShutdownOnSignal};
use crate::vcpu::control::VcpuControl;
use crate::vcpu::{Vcpu, VcpuError};
use crate::{acpi, boot, Vm};
use devices::virtio::block::{Disk, DiskOptions, OpenError};

/// Where KVM keeps the TSS it needs for real-mode emulation on Intel (3 pages, in the MMIO
/// hole, below the IOAPIC).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Building the VM failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("/dev/kvm does not exist: this host has no KVM; run podvm on a host with hardware virtualization (kvm_intel or kvm_amd loaded), or inside the KVM sandbox (tests/sandbox/run)")]
    KvmMissing,
    #[error("permission denied opening /dev/kvm: add this user to the group that owns it (usually `kvm`), or in a pod request the devices.kubevirt.io/kvm resource")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which podvm needs")]
    KvmCapability(&'static str),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Console(#[from] ConsoleError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Status(#[from] crate::status::StatusError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    #[error("cannot watch termination signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("cannot create the VM exit eventfd: {0}")]
    ExitEvent(#[source] std::io::Error),
    #[error(transparent)]
    MigrationTls(#[from] crate::migration::tls::TlsError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// Opens `/dev/kvm`, with an actionable error when it is missing or not ours to use.
pub fn open_kvm() -> Result<Kvm, BuildError> {
    Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => BuildError::KvmMissing,
        libc::EACCES | libc::EPERM => BuildError::KvmPermission,
        _ => BuildError::KvmOpen(e),
    })
}

/// Builds the VM described by `config`; nothing runs until [`Vm::run`].
pub fn build(config: &VmConfig) -> Result<Vm, BuildError> {
    let started = std::time::Instant::now();
    let step =
        |name: &str| tracing::debug!(us = started.elapsed().as_micros() as u64, "build: {name}");
    // 1. The config itself.
    config.validate()?;

    // 1a. Migration TLS files, loaded now so a bad file fails before anything else.
    let tls = config
        .migration
        .tls
        .as_ref()
        .map(crate::migration::tls::Tls::load)
        .transpose()?;

    // 1a'. The status port, bound before the NICs: a user NIC forwarding every free port of
    //     the pod (ports=all) must leave it to the status endpoint.
    let status = config.status.listen.map(crate::status::bind).transpose()?;

    step("disks");
    // 1b. Disks, opened before anything else so a bad path or permission fails first.
    let disks = config
        .disks
        .iter()
        .map(|d| {
            let disk = Disk::open(&DiskOptions {
                path: d.path.clone(),
                read_only: d.read_only,
                direct: d.direct,
                // A migration destination takes the disks' locks at the handover.
                defer_lock: config.incoming,
            })?;
            Ok((disk, d))
        })
        .collect::<Result<Vec<_>, OpenError>>()
        .map_err(DeviceError::from)?;

    // 1b'. NIC backends: a tap that cannot be opened fails here.
    let nics = config
        .nics
        .iter()
        .enumerate()
        .map(|(index, nic)| open_nic(config, index, nic))
        .collect::<Result<Vec<_>, _>>()?;

    // 1c. The console socket, bound now so a bad path fails before the VM exists.
    let console = match &config.console {
        ConsoleConfig::Socket { path, history, log } => {
            let hub = ConsoleHub::new(*history, log.as_deref())?;
            let listener = console::bind(path)?;
            Some((hub, listener, path.clone()))
        }
        _ => None,
    };
    // 1d. The API socket, likewise.
    let api = config
        .api_socket
        .as_ref()
        .map(|path| crate::api::bind(path).map(|l| (l, path.clone())))
        .transpose()?;

    step("kvm");
    // 2. KVM and the capabilities podvm relies on.
    let kvm = open_kvm()?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::UserMemory, "user memory regions"),
        (Cap::Pit2, "an in-kernel PIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(BuildError::KvmCapability(name));
        }
    }

    step("vm");
    // 3. The VM with its in-kernel interrupt controllers (PIC, IOAPIC, LAPICs) and PIT.
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
    vm.set_tss_address(KVM_TSS_ADDR)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create the PIT"))?;

    step("memory");
    // 4. Guest RAM. KVM is told about it on a helper thread while steps 5-8 fill it in:
    //    registering a slot can take milliseconds (about 6 ms on PVM hosts), and nothing
    //    before the vCPUs run needs KVM to know the memory.
    let mem = memory::create(config.memory_bytes())?;
    let parts = std::thread::scope(|scope| {
        let registering = scope.spawn(|| register_memory(&vm, &mem));
        let parts = populate(
            config, disks, nics, console, api, status, tls, &kvm, &vm, &mem, &step,
        );
        match registering.join() {
            Ok(registered) => registered.and(parts),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })?;
    step("done");
    Ok(Vm {
        vcpus: parts.vcpus,
        event_loop: parts.event_loop,
        exit: parts.exit,
        serial: parts.serial,
        console_hub: parts.console_hub,
        blocks: parts.blocks,
        vcpu_control: parts.vcpu_control,
        migrator: parts.migrator,
        status: parts.status,
        _vm: vm,
        _mem: mem,
    })
}

/// What steps 5-8 produce.
struct Parts {
    vcpus: Vec<Vcpu>,
    event_loop: EventLoop,
    exit: ExitRequest,
    serial: Arc<std::sync::Mutex<devices::legacy::Serial>>,
    console_hub: Option<Arc<ConsoleHub>>,
    blocks: Vec<Arc<std::sync::Mutex<devices::virtio::block::Block>>>,
    vcpu_control: Arc<VcpuControl>,
    migrator: Arc<crate::migration::Migrator>,
    status: Option<crate::StatusParts>,
}

/// Steps 5-8: devices, ACPI and boot data in guest memory, vCPUs, the event loop.
#[allow(clippy::too_many_arguments)]
fn populate(
    config: &VmConfig,
    disks: Vec<(Disk, &DiskConfig)>,
    nics: Vec<devices::virtio::net::Net>,
    console: Option<(
        Arc<ConsoleHub>,
        std::os::unix::net::UnixListener,
        std::path::PathBuf,
    )>,
    api: Option<(std::os::unix::net::UnixListener, std::path::PathBuf)>,
    status: Option<std::net::TcpListener>,
    tls: Option<crate::migration::tls::Tls>,
    kvm: &Kvm,
    vm: &Arc<VmFd>,
    mem: &GuestMemory,
    step: &dyn Fn(&str),
) -> Result<Parts, BuildError> {
    step("devices");
    // 5. Devices, reporting guest reset and power-off to one exit request.
    let exit = ExitRequest::new().map_err(BuildError::ExitEvent)?;
    let hub = console.as_ref().map(|(hub, _, _)| hub.clone());
    let mut devices = DeviceManager::new(vm, &config.console, hub.as_ref(), &exit)?;
    for (disk, disk_config) in disks {
        devices.add_disk(vm, mem, disk, disk_config)?;
    }
    for nic in nics {
        devices.add_net(vm, mem, nic)?;
    }
    if config.rng {
        devices.add_rng(vm, mem)?;
    }

    let topology = crate::vcpu::topology::Topology::of(config);

    step("acpi+boot");
    // 6. ACPI tables, then the kernel, initrd and command line (not for a VM that waits for
    //    a migration: its memory comes from the source).
    let entry = if config.incoming {
        None
    } else {
        let described: Vec<&dyn acpi::AcpiDevice> = devices
            .acpi
            .iter()
            .map(|d| d as &dyn acpi::AcpiDevice)
            .collect();
        let rsdp = acpi::write_tables(mem, &topology.apic_ids(), &described)?;
        Some(boot::load(
            mem,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
            rsdp,
        )?)
    };

    step("vcpus");
    // 7. vCPUs: all get CPUID, MSRs, FPU and LAPIC; vCPU 0 gets the boot registers.
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report supported CPUID"))?;
    let buses = Arc::new(devices.buses);
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        vcpus.push(Vcpu::new(
            vm,
            id,
            &topology,
            &supported,
            buses.clone(),
            exit.clone(),
        )?);
    }
    if let Some(entry) = entry {
        vcpus[0].setup_boot(mem, entry)?;
    }
    let msr_index = kvm
        .get_msr_index_list()
        .map_err(kvm_err("list the MSRs to save"))?
        .as_slice()
        .to_vec();

    step("event loop");
    // 8. The event loop: devices, and console input when the console is stdio.
    let mut event_loop = EventLoop::new(&exit)?;
    for subscriber in devices.subscribers.drain(..) {
        event_loop.add_subscriber(subscriber);
    }
    if config.console == ConsoleConfig::Stdio {
        event_loop.add_stdin_console(devices.serial.clone())?;
    }
    let vcpu_control = Arc::new(VcpuControl::new(vcpus.len()));
    let migrator = Arc::new(crate::migration::Migrator::new(
        vm.clone(),
        mem.clone(),
        vcpu_control.clone(),
        devices.transports.clone(),
        devices.serial.clone(),
        devices.blocks.clone(),
        exit.clone(),
        crate::migration::state::Shape {
            memory_bytes: config.memory_bytes(),
            vcpus: config.vcpus,
            devices: devices.shape.clone(),
            topology: config.topology,
            vm_id: config.migration.vm_id.clone(),
            proof: None,
        },
        msr_index,
        config.migration.clone(),
        tls,
    ));
    let shutdown = Arc::new(
        GracefulShutdown::new(
            devices.power_button.clone(),
            exit.clone(),
            vcpu_control.clone(),
            vm.clone(),
            config.shutdown_timeout,
        )
        .map_err(BuildError::Signals)?,
    );
    let on_signal = ShutdownOnSignal::new(shutdown.clone()).map_err(BuildError::Signals)?;
    event_loop.add_subscriber(Arc::new(std::sync::Mutex::new(on_signal)));
    let wants_status = status.is_some() || config.status.ready_file.is_some();
    let mut status_parts = None;
    if api.is_some() || wants_status {
        let metrics = Arc::new(crate::api::ApiMetrics::default());
        let control = Arc::new(crate::control::VmControl {
            config: config.clone(),
            started: std::time::Instant::now(),
            vm: vm.clone(),
            vcpus: vcpu_control.clone(),
            shutdown,
            disks: devices
                .blocks
                .iter()
                .map(|b| b.lock().unwrap_or_else(|p| p.into_inner()).metrics())
                .collect(),
            nics: devices.nics.clone(),
            rng: devices.rng.clone(),
            console: hub.clone(),
            api: metrics.clone(),
            pauses: Default::default(),
            migration: migrator.clone(),
        });
        if let Some((listener, path)) = api {
            let server = ApiServer::new(listener, path, control.clone(), metrics)?;
            event_loop.add_subscriber(Arc::new(std::sync::Mutex::new(server)));
        }
        if wants_status {
            status_parts = Some(crate::StatusParts {
                listener: status,
                ready_file: config.status.ready_file.clone(),
                source: control,
                heartbeat: event_loop.heartbeat(),
            });
        }
    }
    if let Some((hub, listener, path)) = console {
        let server = ConsoleServer::new(listener, path, hub, devices.serial.clone())?;
        event_loop.add_subscriber(Arc::new(std::sync::Mutex::new(server)));
    }
    Ok(Parts {
        vcpus,
        event_loop,
        exit,
        serial: devices.serial,
        console_hub: hub,
        blocks: devices.blocks,
        vcpu_control,
        migrator,
        status: status_parts,
    })
}

/// NIC `index`'s device with its backend.
fn open_nic(
    config: &VmConfig,
    index: usize,
    nic: &crate::config::NicConfig,
) -> Result<devices::virtio::net::Net, DeviceError> {
    use devices::virtio::net::{user, Net, NetConfig, NetMetrics};
    let mac = config.nic_mac(index);
    let metrics = Arc::new(NetMetrics::default());
    let (backend, mtu): (Box<dyn devices::virtio::net::NetBackend>, u16) = match &nic.backend {
        NetBackendConfig::User {
            mtu,
            resolv_conf,
            forwards,
            forward_all,
            max_flows,
            pod_loopback,
        } => {
            let resolv = user::resolv::Resolv::load(resolv_conf);
            tracing::info!(
                nic = index,
                mac = %crate::config::format_mac(mac),
                dns = ?resolv.dns4,
                search = ?resolv.search,
                "NIC on the user-mode masquerade NAT"
            );
            let user_config = user::UserConfig {
                mtu: *mtu,
                resolv,
                forwards: forwards.clone(),
                forward_all: *forward_all,
                max_flows: *max_flows,
                gateway: if *pod_loopback {
                    tracing::warn!(
                        nic = index,
                        "pod-loopback=on: the guest reaches the pod's loopback and every \
                         service listening only there"
                    );
                    user::pod::GatewayTo::Loopback
                } else {
                    user::pod::GatewayTo::PodAddress
                },
                ..Default::default()
            };
            let net = user::UserNet::new(&user_config, mac, metrics.clone())
                .map_err(|source| DeviceError::Net { index, source })?;
            (Box::new(net), *mtu)
        }
        NetBackendConfig::Tap { name, .. } => {
            let tap = devices::virtio::net::tap::Tap::open(name, metrics.clone())
                .map_err(|source| DeviceError::Tap { index, source })?;
            let mtu = tap.mtu();
            tracing::info!(nic = index, tap = %name, mtu, mac = %crate::config::format_mac(mac), "NIC on a tap device");
            (Box::new(tap), mtu)
        }
    };
    let device_config = NetConfig {
        mac,
        mtu,
        // The user NAT checked (or computed) every checksum it hands the guest.
        rx_checksums_valid: matches!(nic.backend, NetBackendConfig::User { .. }),
        vhost: matches!(nic.backend, NetBackendConfig::Tap { vhost: true, .. }),
    };
    Net::new(device_config, backend, metrics).map_err(|source| DeviceError::Create {
        device: format!("nic {index}"),
        source,
    })
}

fn register_memory(vm: &VmFd, mem: &GuestMemory) -> Result<(), BuildError> {
    memory::register_slots(vm, mem, false).map_err(kvm_err("register guest memory"))
}
