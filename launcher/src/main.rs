//! `podvm`: the VM pod launcher.

mod api_client;
mod cli;
mod console;
mod logging;
mod preflight;
mod terminal;
mod vm_socket;

use std::process::ExitCode;

use clap::Parser;
use launcher::vmi;
use vmm::config::{ConsoleConfig, VmConfig};
use vmm::ExitReason;

use crate::cli::{Cli, Command, RunArgs, VmiArgs};

/// A failure that ends podvm with a non-zero exit.
#[derive(Debug, thiserror::Error)]
enum Error {
    #[error(transparent)]
    Seccomp(podvm_seccomp::Error),
    #[error(transparent)]
    Preflight(#[from] preflight::PreflightError),
    #[error(transparent)]
    Build(#[from] vmm::builder::BuildError),
    #[error(transparent)]
    Run(#[from] vmm::RunError),
    #[error(transparent)]
    Console(#[from] console::AttachError),
    #[error(transparent)]
    Api(#[from] api_client::ApiClientError),
    #[error("the guest was stopped without powering off (shutdown timeout, a second signal, or the API's stop)")]
    Stopped,
    #[error("cannot block termination signals: {0}")]
    Signals(#[source] std::io::Error),
    #[error("the VM stopped on an unrecoverable vCPU error (see the log above)")]
    VcpuFailed,
    #[error("incoming migration failed, the guest did not start here: {0}")]
    Migration(#[from] vmm::migration::MigrationError),
    #[error(transparent)]
    Vmi(#[from] vmi::Errors),
    #[error("--vmi {0}: cannot read it: {1}")]
    VmiRead(std::path::PathBuf, #[source] std::io::Error),
    #[error("give the VirtualMachineInstance: --vmi FILE, or its text in PODVM_VMI")]
    VmiMissing,
    #[error("give the VM: --kernel PATH (with --disk, --net, ... as needed), or a KubeVirt VirtualMachineInstance with --vmi FILE or PODVM_VMI")]
    NoKernel,
    #[error(transparent)]
    VmiPrepare(#[from] vmi::prepare::PrepareError),
    #[error("--incoming: the VMI's {0}; its contents live in the source pod's run directory and podvm migrates memory, not disks: use a PVC (shared storage) for a VM that migrates")]
    EphemeralDiskMigration(String),
    #[error("--incoming: the VMI's disk {0:?} is a hostDisk without shared: true; its image is on the source node and podvm migrates memory, not disks: mark it shared (storage both nodes reach) or use a PVC")]
    HostDiskMigration(String),
    #[error("--incoming: migration traffic carries all guest memory; give --migration-tls-cert, --migration-tls-key and --migration-tls-ca (mutual TLS), or --migration-insecure (on both podvms) to migrate in plaintext on a trusted link")]
    MigrationTls,
}

/// podvm's exit status says why the VM ended (README, "Exit status").
mod exit {
    /// The guest powered off, or the VM migrated away and runs on elsewhere.
    pub const POWERED_OFF: u8 = 0;
    /// podvm could not start the VM: a problem with the spec, a flag, a file or KVM.
    pub const NOT_STARTED: u8 = 1;
    // 2: command-line usage (clap).
    /// The guest rebooted; a reboot ends the VM.
    pub const REBOOTED: u8 = 3;
    /// The guest was stopped without powering off: the shutdown grace period ran out, a
    /// second signal, or the API's stop.
    pub const STOPPED: u8 = 4;
    /// The VM failed: a vCPU hit an error KVM could not handle.
    pub const FAILED: u8 = 5;
    /// An incoming migration failed; the guest never ran here.
    pub const MIGRATION_FAILED: u8 = 6;
    // 159 (128 + SIGSYS): a seccomp violation (podvm_seccomp::EXIT_STATUS).
}

impl Error {
    fn exit_code(&self) -> u8 {
        match self {
            Error::Stopped => exit::STOPPED,
            Error::VcpuFailed => exit::FAILED,
            Error::Migration(_) => exit::MIGRATION_FAILED,
            _ => exit::NOT_STARTED,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // First: every error of run and validate, a bad VMI or a failed preflight too, is the
    // pod's termination message (console and api, run through kubectl exec, leave it alone).
    if matches!(cli.command, Command::Run(_) | Command::Validate(_)) {
        podvm_seccomp::open_termination_log();
    }
    let from_vmi = matches!(&cli.command, Command::Run(a) if a.vmi.vmi.is_some() || a.vmi.vmi_inline.is_some());
    logging::init(cli.log_format, from_vmi);
    let result = match cli.command {
        Command::Run(args) => match run(*args) {
            Ok(code) => return ExitCode::from(code),
            Err(e) => Err(e),
        },
        Command::Validate(args) => validate(&args.vmi),
        Command::Console(args) => console::attach(&args.socket, args.escape).map_err(Error::from),
        Command::Api(args) => api_client::call(&args.socket, &args.action).map_err(Error::from),
        Command::SeccompProfile { threads } => {
            let value = if threads {
                podvm_seccomp::ThreadKind::ALL
                    .iter()
                    .map(|&kind| {
                        let mut names: Vec<&str> = podvm_seccomp::allowlist(kind)
                            .iter()
                            .map(|a| a.name)
                            .collect();
                        names.sort_unstable();
                        names.dedup();
                        (kind.name().to_string(), serde_json::json!(names))
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into()
            } else {
                podvm_seccomp::oci_profile()
            };
            println!(
                "{}",
                serde_json::to_string_pretty(&value).expect("the profile serializes")
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podvm: error: {e}");
            podvm_seccomp::termination_message(&format!("podvm: error: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Reads and maps the VMI of `--vmi` or `PODVM_VMI`, if one is given.
fn load_vmi(args: &VmiArgs) -> Result<Option<vmi::Plan>, Error> {
    let text = match (&args.vmi, &args.vmi_inline) {
        (Some(path), _) => read_vmi(path)?,
        (None, Some(text)) => text.clone(),
        (None, None) => return Ok(None),
    };
    let doc = vmi::parse_document(&text)?;
    let paths = vmi::Paths {
        block_dir: args.pvc_block_dir.clone(),
        fs_dir: args.pvc_fs_dir.clone(),
        container_disk_dir: args.container_disk_dir.clone(),
        kernel_boot_root: args.kernel_boot_root.clone(),
        run_dir: args.run_dir.clone(),
        volume_paths: args.volume_paths.iter().cloned().collect(),
    };
    Ok(Some(vmi::plan(&doc, &paths, &vmi::RealHost)?))
}

/// The text of the VMI file at `path`, reading no more than the largest VMI podvm takes
/// (a path to a huge file, or to /dev/zero, is refused without filling memory).
fn read_vmi(path: &std::path::Path) -> Result<String, Error> {
    use std::io::Read;
    let fail = |e| Error::VmiRead(path.to_path_buf(), e);
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(fail)?
        .take(vmi::MAX_DOCUMENT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() > vmi::MAX_DOCUMENT_BYTES {
        return Err(vmi::document_too_large(bytes.len()).into());
    }
    String::from_utf8(bytes)
        .map_err(|e| fail(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// `podvm validate`: the VM a VMI describes, or every problem in it.
fn validate(args: &VmiArgs) -> Result<(), Error> {
    let plan = load_vmi(args)?.ok_or(Error::VmiMissing)?;
    print!("{}", vmi::prepare::describe(&plan));
    if !plan.ignored.is_empty() {
        println!("  accepted without effect in podvm:");
        for line in &plan.ignored {
            println!("    {line}");
        }
    }
    Ok(())
}

/// The VM of the command-line flags.
fn config_from_flags(args: &RunArgs) -> Result<VmConfig, Error> {
    let args = args.clone();
    Ok(VmConfig {
        vcpus: args.cpus,
        topology: args.topology,
        memory_mib: args.memory,
        kernel: args.kernel.ok_or(Error::NoKernel)?,
        initrd: args.initrd,
        cmdline: args.cmdline,
        console: match args.console.as_str() {
            "stdio" => ConsoleConfig::Stdio,
            "off" => ConsoleConfig::Off,
            path => ConsoleConfig::Socket {
                path: path.into(),
                history: args.console_history,
                log: args.console_log.clone(),
            },
        },
        disks: args.disk,
        nics: args.net,
        rng: args.rng,
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout),
        api_socket: args.api_socket,
        migration: Default::default(),
        incoming: false,
        status: Default::default(),
    })
}

/// Runs the VM until it ends; the exit status says how it ended (errors have their own).
fn run(args: RunArgs) -> Result<u8, Error> {
    let plan = load_vmi(&args.vmi)?;
    let mut config = match &plan {
        Some(plan) => {
            logging::set_vmi(&plan.namespace, &plan.name);
            tracing::info!(
                vmi = %format!("{}/{}", plan.namespace, plan.name),
                "VM from a VirtualMachineInstance"
            );
            for line in &plan.ignored {
                tracing::info!("{line}");
            }
            let mut config = plan.config.clone();
            if let Some(api) = &args.api_socket {
                config.api_socket = Some(api.clone());
            }
            if let ConsoleConfig::Socket { history, .. } = &mut config.console {
                *history = args.console_history;
            }
            config
        }
        None => config_from_flags(&args)?,
    };
    config.migration = vmm::migration::MigrationConfig {
        downtime: std::time::Duration::from_millis(args.migration_downtime_ms),
        timeout: std::time::Duration::from_secs(args.migration_timeout),
        insecure: args.migration_insecure,
        // A VMI's UID unless the flag says otherwise.
        vm_id: args
            .migration_vm_id
            .clone()
            .or_else(|| plan.as_ref().and_then(|p| p.uid.clone())),
        tls: match (
            args.migration_tls_cert,
            args.migration_tls_key,
            args.migration_tls_ca,
        ) {
            (Some(cert), Some(key), Some(ca)) => Some(vmm::migration::tls::TlsFiles {
                cert,
                key,
                ca,
                server_name: args.migration_tls_server_name,
                token: args.migration_token_file,
            }),
            _ => None,
        },
    };
    config.incoming = args.incoming.is_some();
    config.status = vmm::status::StatusConfig {
        listen: args.status_listen,
        ready_file: args
            .ready_file
            .clone()
            .or_else(|| plan.as_ref().map(|_| args.vmi.run_dir.join("ready"))),
    };
    config.validate().map_err(vmm::builder::BuildError::from)?;
    preflight::check_file("--kernel", &config.kernel)?;
    preflight::check_kernel_format(&config.kernel)?;
    if let Some(initrd) = &config.initrd {
        preflight::check_file("--initrd", initrd)?;
        preflight::check_initrd_fits(initrd, config.memory_mib)?;
    }
    if let Some(plan) = &plan {
        if config.incoming {
            if let Some(d) = plan.disks.iter().find(|d| {
                matches!(
                    d.source,
                    vmi::DiskSource::EmptyDisk { .. }
                        | vmi::DiskSource::ContainerDisk { copy: true, .. }
                )
            }) {
                return Err(Error::EphemeralDiskMigration(format!(
                    "disk {:?} is an emptyDisk or a writable containerDisk",
                    d.name
                )));
            }
            if let Some(d) = plan
                .disks
                .iter()
                .find(|d| matches!(d.source, vmi::DiskSource::HostDisk { shared: false, .. }))
            {
                return Err(Error::HostDiskMigration(d.name.clone()));
            }
        }
        vmi::prepare::prepare(plan, &args.vmi.run_dir)?;
    }
    if preflight::host_kvm_is_pvm() {
        if !args.allow_pvm {
            return Err(preflight::PreflightError::PvmHost.into());
        }
        tracing::warn!("host KVM is PVM: only PVM-enabled or tiny guest kernels will run");
    }
    // Before any thread starts: each thread installs its filter in this mode.
    if args.seccomp == podvm_seccomp::Mode::Off {
        tracing::warn!("--seccomp off: podvm runs WITHOUT seccomp filters; for development only, never in a pod");
    }
    if let Some(tail) = logging::json_tail("podvm_seccomp") {
        podvm_seccomp::log_as_json(&tail);
    }
    podvm_seccomp::set_mode(args.seccomp).map_err(Error::Seccomp)?;
    // Before any thread starts: SIGTERM/SIGINT then reach only the event loop's signalfd.
    vmm::shutdown::block_termination_signals().map_err(Error::Signals)?;
    let incoming = match &args.incoming {
        Some(addr) => {
            if !args.migration_insecure && config.migration.tls.is_none() {
                return Err(Error::MigrationTls);
            }
            Some(vmm::migration::IncomingListener::bind(addr)?)
        }
        None => None,
    };
    let vm = vmm::builder::build(&config)?;
    if let Some(listener) = incoming {
        tracing::info!(on = %listener.local_addr(), "waiting for a migration");
        vm.receive_migration(listener)?;
        tracing::info!("migration received; the guest runs here now");
    }
    let raw = (config.console == ConsoleConfig::Stdio).then(terminal::RawMode::enter);
    let reason = vm.run();
    drop(raw);
    let (code, why) = match reason? {
        ExitReason::PowerOff => (exit::POWERED_OFF, "guest powered off"),
        ExitReason::Reset => (
            exit::REBOOTED,
            "guest rebooted (a reboot ends the VM, as in a pod)",
        ),
        ExitReason::Error => return Err(Error::VcpuFailed),
        ExitReason::Stopped => return Err(Error::Stopped),
        ExitReason::Migrated => {
            eprintln!("migrated");
            (
                exit::POWERED_OFF,
                "migrated: the VM runs on at the destination",
            )
        }
    };
    tracing::info!(exit_code = code, "{why}; podvm exits");
    podvm_seccomp::termination_message(why);
    Ok(code)
}
