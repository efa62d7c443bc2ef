//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// podvm: a KVM virtual machine monitor that runs one VM per pod.
#[derive(Debug, Parser)]
#[command(name = "podvm", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run it until the guest powers off or reboots.
    Run(RunArgs),
}

/// Where COM1 goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Console {
    /// podvm's own stdin and stdout (raw mode when stdin is a terminal).
    Stdio,
    /// Discard guest output; no input.
    Off,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel image: a bzImage, or an ELF vmlinux (PVH entry used when present).
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; replaces the default entirely.
    #[arg(long, value_name = "STR", default_value = vmm::config::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u8,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub memory: u64,
    /// Where the serial console (COM1) goes.
    #[arg(long, value_enum, default_value_t = Console::Stdio)]
    pub console: Console,
    /// Run even though this host's KVM is PVM, which boots only PVM-enabled guest kernels
    /// (or tiny guests such as the benchmark's).
    #[arg(long)]
    pub allow_pvm: bool,
}
