//! `podvm`: the VM pod launcher.

mod api_client;
mod cli;
mod console;
mod preflight;
mod terminal;
mod vm_socket;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use vmm::config::{ConsoleConfig, VmConfig};
use vmm::ExitReason;

use crate::cli::{Cli, Command, RunArgs};

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
    #[error("--incoming: migration traffic carries all guest memory; give --migration-tls-cert, --migration-tls-key and --migration-tls-ca (mutual TLS), or --migration-insecure (on both podvms) to migrate in plaintext on a trusted link")]
    MigrationTls,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Console(args) => console::attach(&args.socket, args.escape).map_err(Error::from),
        Command::Api(args) => api_client::call(&args.socket, &args.action).map_err(Error::from),
        Command::SeccompProfile => {
            println!(
                "{}",
                serde_json::to_string_pretty(&podvm_seccomp::oci_profile())
                    .expect("the profile serializes")
            );
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PODVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .without_time()
        .init();
}

fn run(args: RunArgs) -> Result<(), Error> {
    let config = VmConfig {
        vcpus: args.cpus,
        topology: args.topology,
        memory_mib: args.memory,
        kernel: args.kernel,
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
        migration: vmm::migration::MigrationConfig {
            downtime: std::time::Duration::from_millis(args.migration_downtime_ms),
            timeout: std::time::Duration::from_secs(args.migration_timeout),
            insecure: args.migration_insecure,
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
                }),
                _ => None,
            },
        },
        incoming: args.incoming.is_some(),
    };
    config.validate().map_err(vmm::builder::BuildError::from)?;
    preflight::check_file("--kernel", &config.kernel)?;
    preflight::check_kernel_format(&config.kernel)?;
    if let Some(initrd) = &config.initrd {
        preflight::check_file("--initrd", initrd)?;
        preflight::check_initrd_fits(initrd, config.memory_mib)?;
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
    match reason? {
        ExitReason::PowerOff => {
            tracing::info!("guest powered off; podvm exits");
            Ok(())
        }
        ExitReason::Reset => {
            tracing::info!("guest rebooted; podvm exits (a reboot ends the VM, as in a pod)");
            Ok(())
        }
        ExitReason::Error => Err(Error::VcpuFailed),
        ExitReason::Stopped => Err(Error::Stopped),
        ExitReason::Migrated => {
            eprintln!("migrated");
            Ok(())
        }
    }
}
