//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// podvm: a KVM virtual machine monitor that runs one VM per pod.
#[derive(Debug, Parser)]
#[command(name = "podvm", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines on stderr: json (one object per line, with the VMI's namespace and name),
    /// text, or auto (json for a VM from a VMI when stderr is not a terminal, else text).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "PODVM_LOG_FORMAT"
    )]
    pub log_format: crate::logging::Format,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM and run it until the guest powers off or reboots.
    Run(Box<RunArgs>),
    /// Check a KubeVirt VirtualMachineInstance without starting anything, and print the VM
    /// `podvm run --vmi` would run (vCPUs, memory, disks with paths and modes, NICs with
    /// ports, kernel); every problem is reported, with its field path, and exits non-zero.
    Validate(ValidateArgs),
    /// Attach this terminal to a VM's console socket (detach with Ctrl-]).
    Console(ConsoleArgs),
    /// Call a running VM's control API (`podvm run --api-socket`); prints the JSON answer.
    Api(ApiArgs),
    /// Print the pod's seccomp profile (OCI JSON, for a Localhost seccompProfile), made
    /// from the same allowlists podvm's threads filter themselves with.
    SeccompProfile {
        /// Print instead each thread kind's own list of system calls (JSON).
        #[arg(long)]
        threads: bool,
    },
}

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// The socket given to `podvm run --api-socket`.
    pub socket: PathBuf,
    #[command(subcommand)]
    pub action: ApiAction,
}

#[derive(Debug, Subcommand)]
pub enum ApiAction {
    /// The VM's configuration and state (running, paused, shutting-down).
    Info,
    /// Per-device counters: disks, NICs, console, API.
    Counters,
    /// Stop the vCPUs (and the guest's clock) until resume.
    Pause,
    /// Let a paused VM run again.
    Resume,
    /// Press the ACPI power button; the guest is stopped if it has not powered off in time.
    Shutdown {
        /// Seconds the guest has (default: the VM's --shutdown-timeout).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Stop the VM now, without the guest's cooperation (podvm exits 4).
    Stop,
    /// Start a live migration to a podvm started with `--incoming ADDR` and the same
    /// devices; `podvm api SOCKET migration` follows it. When it completes, this podvm exits
    /// 0 ("migrated"); when it fails, the VM runs on here.
    Migrate {
        /// `tcp:HOST:PORT` or `unix:PATH`.
        address: String,
    },
    /// The last migration's state, progress and figures (rounds, pages, bandwidth, downtime).
    Migration,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    pub vmi: VmiArgs,
}

/// A KubeVirt VirtualMachineInstance as the VM's spec, and where its volumes are.
#[derive(Debug, Args, Clone)]
pub struct VmiArgs {
    /// The VM as a KubeVirt VirtualMachineInstance (kubevirt.io/v1, YAML or JSON) in FILE;
    /// without it, the environment variable PODVM_VMI holds the spec itself (for a Downward
    /// API or ConfigMap). docs/vmi.md lists what is supported.
    #[arg(long, value_name = "FILE")]
    pub vmi: Option<PathBuf>,
    /// The VirtualMachineInstance itself (YAML or JSON), when --vmi is not given.
    #[arg(long, env = "PODVM_VMI", hide = true, conflicts_with = "vmi")]
    pub vmi_inline: Option<String>,
    /// The VM's writable run directory (an emptyDir): console and API sockets, emptyDisks,
    /// cloud-init seed disks, containerDisk copies.
    #[arg(long, value_name = "DIR", default_value = "/var/run/podvm")]
    pub run_dir: PathBuf,
    /// Where block PVCs (volumeDevices) are: DIR/<volume name>.
    #[arg(long, value_name = "DIR", default_value = "/dev")]
    pub pvc_block_dir: PathBuf,
    /// Where filesystem PVCs are mounted: DIR/<volume name>/disk.img.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/run/kubevirt-private/vmi-disks"
    )]
    pub pvc_fs_dir: PathBuf,
    /// Where each containerDisk's image is mounted: DIR/<volume name>/ (its disk under
    /// disk/, or at the volume's path).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/run/kubevirt/container-disks"
    )]
    pub container_disk_dir: PathBuf,
    /// The directory kernelBoot's kernelPath and initrdPath are relative to (where the kernel
    /// image's files are mounted; `/` for files in podvm's own image).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub kernel_boot_root: PathBuf,
    /// A volume's disk at PATH instead of the default place (repeatable).
    #[arg(long = "volume", value_name = "NAME=PATH", value_parser = parse_volume_path)]
    pub volume_paths: Vec<(String, PathBuf)>,
}

/// A VMI describes the VM; the flags that do so conflict with it.
const VMI: [&str; 2] = ["vmi", "vmi_inline"];

fn parse_volume_path(value: &str) -> Result<(String, PathBuf), String> {
    match value.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), path.into()))
        }
        _ => Err(format!(
            "{value:?}: use --volume NAME=PATH (a volume name of the VMI and its disk's path)"
        )),
    }
}

#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// The socket given to `podvm run --console`.
    pub socket: PathBuf,
    /// The key that detaches, as a control character: `]` means Ctrl-].
    #[arg(long, value_name = "CHAR", default_value = "]")]
    pub escape: char,
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub vmi: VmiArgs,
    /// Kernel image: a bzImage, or an ELF vmlinux (PVH entry used when present). Required
    /// unless the VM comes from --vmi or PODVM_VMI.
    #[arg(long, value_name = "PATH", conflicts_with_all = VMI)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH", conflicts_with_all = VMI)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; replaces the default entirely.
    #[arg(long, value_name = "STR", default_value = vmm::config::DEFAULT_CMDLINE, conflicts_with_all = VMI)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with_all = VMI)]
    pub cpus: u8,
    /// How the vCPUs are grouped, as KubeVirt's spec.domain.cpu: SOCKETS:CORES:THREADS
    /// (threads per core), whose product must be --cpus. The guest sees it in CPUID and its
    /// CPUs' APIC IDs. Default: one socket of --cpus single-threaded cores.
    #[arg(long, value_name = "SOCKETS:CORES:THREADS", value_parser = parse_topology, conflicts_with_all = VMI)]
    pub topology: Option<vmm::config::CpuTopology>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 256, conflicts_with_all = VMI)]
    pub memory: u64,
    /// Where the serial console (COM1) goes: `stdio` (podvm's own terminal, raw mode when it
    /// is one), `off`, or the PATH of a unix socket to create (mode 0600) for `podvm console`.
    #[arg(long, value_name = "stdio|off|PATH", default_value = "stdio", conflicts_with_all = VMI)]
    pub console: String,
    /// Bytes of console output replayed to each client that attaches to a console socket.
    #[arg(long, value_name = "BYTES", default_value_t = vmm::console::DEFAULT_HISTORY)]
    pub console_history: usize,
    /// Also append all console output to this file (with a console socket), up to 64 MiB
    /// (what it held before included); later output is counted, not written.
    #[arg(long, value_name = "PATH", conflicts_with_all = VMI)]
    pub console_log: Option<PathBuf>,
    /// A virtio-blk disk: a raw image file or a block device, with options
    /// `readonly`, `direct=on|off` (default on for block devices, off for files) and
    /// `serial=ID` and `aio=io_uring|sync` (default io_uring, falling back to sync where the
    /// kernel or seccomp forbids it). Repeat for more disks; the guest sees them in this order (vda, vdb, ...).
    #[arg(long, value_name = "PATH[,readonly][,direct=on|off][,serial=ID][,aio=io_uring|sync]", value_parser = parse_disk, conflicts_with_all = VMI)]
    pub disk: Vec<vmm::config::DiskConfig>,
    /// A virtio-net NIC. `user`: the userspace masquerade NAT (KubeVirt's masquerade
    /// binding, no privileges): the guest gets 10.0.2.2/24 by DHCP, gateway 10.0.2.1, the
    /// DNS servers of the pod's resolv.conf, and its traffic leaves from the pod's address.
    /// Options: `mac=52:54:00:xx:xx:xx`, `mtu=N` (default 65520: the link is podvm's own),
    /// `resolv=PATH` (default /etc/resolv.conf), and `port=SPEC` (repeatable) to forward the
    /// pod's ports to the guest: `port=8080`, `port=2222:22`, `port=8000-8100`, with `/udp`
    /// for UDP (default TCP), or `ports=all`: every free TCP and UDP port of the pod to the same
    /// guest port, as KubeVirt does for a VMI without ports (costs two sockets per port;
    /// the default is no ports, see docs/network.md); `max-flows=N`: most TCP connections, and UDP conversations, at
    /// once (default 1024, at most 16384; beyond it new ones are refused and counted; the
    /// connections share a 128 MiB buffer budget, so fewer flows get larger buffers: 64 KiB
    /// each way at 1024, 256 KiB at 256 or fewer). The gateway is the pod's own address
    /// (services on the pod's loopback stay private, and 127.0.0.0/8 is dropped);
    /// `pod-loopback=on` makes it the pod's loopback instead and lets the guest reach every
    /// loopback-only service of the pod (see docs/network.md). Repeat --net for more
    /// NICs (eth0, eth1, ...). `tap=NAME`: an existing tap device that a privileged agent
    /// created for podvm's user (`ip tuntap add dev NAME mode tap user UID`); podvm opens it
    /// without privileges and never changes its MTU or flags; vhost-net moves its frames when
    /// /dev/vhost-net opens (`vhost=off` to have podvm do it). Options: `mac=MAC`, `vhost=`.
    #[arg(long, value_name = "user[,mac=MAC][,mtu=N][,resolv=PATH][,port=SPEC]...[,max-flows=N][,pod-loopback=on] | tap=NAME[,mac=MAC][,vhost=on|off]", value_parser = parse_net, conflicts_with_all = VMI)]
    pub net: Vec<vmm::config::NicConfig>,
    /// Give the guest a virtio-rng device (after the disks and NICs) that feeds it entropy
    /// from the host's getrandom(2), as KubeVirt's `spec.domain.devices.rng` does.
    #[arg(long, conflicts_with_all = VMI)]
    pub rng: bool,
    /// Seconds the guest has to power off after SIGTERM presses its ACPI power button, before
    /// podvm stops it (Kubernetes' default grace period is 30 s).
    #[arg(long, value_name = "SECS", default_value_t = 30, conflicts_with_all = VMI)]
    pub shutdown_timeout: u64,
    /// Serve the control API (HTTP/1.1 + JSON, docs/api.md) on a unix socket created at PATH
    /// (mode 0600); `podvm api PATH ...` calls it.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Serve the pod's probes and metrics over HTTP on this TCP address (`0.0.0.0:9000`,
    /// `[::]:9000`): GET /readyz (200 while the guest runs), /healthz (200 while podvm's
    /// event loop turns), /metrics (Prometheus). Read-only; the control API stays on its
    /// unix socket.
    #[arg(long, value_name = "ADDR")]
    pub status_listen: Option<std::net::SocketAddr>,
    /// A file that exists while the guest runs (for an exec probe or a sidecar); default
    /// `<run dir>/ready` for a VM from a VMI, none otherwise.
    #[arg(long, value_name = "PATH")]
    pub ready_file: Option<PathBuf>,
    /// Wait for a live migration on ADDR (`tcp:HOST:PORT` or `unix:PATH`) instead of
    /// booting; give the same devices as the source. Exits non-zero, without running the
    /// guest, if the migration fails.
    #[arg(long, value_name = "ADDR", value_parser = parse_migration_addr)]
    pub incoming: Option<vmm::migration::MigrationAddr>,
    /// The longest pause a live migration of this VM aims for, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub migration_downtime_ms: u64,
    /// Seconds after which a live migration whose dirty pages do not converge gives up (the
    /// VM runs on here).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub migration_timeout: u64,
    /// This VM's identity for live migration (a VMI's UID): the source sends it, and a
    /// destination given one takes only a source that carries the same ID.
    #[arg(long, value_name = "ID", value_parser = parse_vm_id)]
    pub migration_vm_id: Option<String>,
    /// Migrate without TLS (for tests on one machine): migration traffic carries all of the
    /// guest's memory, so anywhere else use TLS.
    #[arg(long, conflicts_with = "migration_tls_cert")]
    pub migration_insecure: bool,
    /// Mutual TLS for live migration, as a source and as a destination: this podvm's
    /// certificate chain (PEM). Needs --migration-tls-key and --migration-tls-ca.
    #[arg(long, value_name = "PATH", requires_all = ["migration_tls_key", "migration_tls_ca"])]
    pub migration_tls_cert: Option<PathBuf>,
    /// The private key of --migration-tls-cert (PEM).
    #[arg(long, value_name = "PATH", requires = "migration_tls_cert")]
    pub migration_tls_key: Option<PathBuf>,
    /// The CA (PEM) that must have signed the peer's certificate: the destination accepts
    /// only sources it signed, the source only destinations it signed.
    #[arg(long, value_name = "PATH", requires = "migration_tls_cert")]
    pub migration_tls_ca: Option<PathBuf>,
    /// The name the destination's certificate must carry (default: the host of the
    /// migration address, `localhost` for a unix socket).
    #[arg(long, value_name = "NAME", requires = "migration_tls_cert")]
    pub migration_tls_server_name: Option<String>,
    /// A secret only this VM's migrations share (16 to 4096 bytes; an operator mounts one
    /// per-VM Secret into the source's and the destination's pods): the source proves it
    /// holds it, bound to the TLS session, and a destination given one takes no source that
    /// cannot, whatever certificate it has.
    #[arg(long, value_name = "PATH", requires = "migration_tls_cert")]
    pub migration_token_file: Option<PathBuf>,
    /// Run even though this host's KVM is PVM, which boots only PVM-enabled guest kernels
    /// (or tiny guests such as the benchmark's).
    #[arg(long)]
    pub allow_pvm: bool,
    /// Seccomp filters, one allowlist per thread: kill (a call outside the list ends podvm
    /// with a line naming the thread and the call), log (such calls go through and the
    /// kernel logs them; for finding what a list lacks) or off (development only).
    #[arg(long, value_name = "MODE", default_value = "kill", env = "PODVM_SECCOMP", value_parser = parse_seccomp)]
    pub seccomp: podvm_seccomp::Mode,
}

fn parse_seccomp(value: &str) -> Result<podvm_seccomp::Mode, String> {
    value.parse()
}

fn parse_migration_addr(value: &str) -> Result<vmm::migration::MigrationAddr, String> {
    value.parse()
}

/// A VM ID for migration: 1 to 253 printable ASCII characters (a Kubernetes UID is 36).
fn parse_vm_id(value: &str) -> Result<String, String> {
    if value.is_empty() || value.len() > 253 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "a VM ID is 1 to 253 printable ASCII characters without spaces, such as the VMI's metadata.uid"
                .into(),
        );
    }
    Ok(value.to_string())
}

/// Parses one `--disk` value.
pub fn parse_disk(value: &str) -> Result<vmm::config::DiskConfig, String> {
    let mut parts = value.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
        "the disk path is empty; use --disk PATH[,readonly][,direct=on|off][,serial=ID]".to_string()
    })?;
    let mut disk = vmm::config::DiskConfig {
        path: path.into(),
        read_only: false,
        direct: None,
        serial: None,
        io_engine: vmm::config::IoEngine::default(),
    };
    for option in parts {
        match option.split_once('=') {
            None if option == "readonly" => disk.read_only = true,
            Some(("direct", "on")) => disk.direct = Some(true),
            Some(("direct", "off")) => disk.direct = Some(false),
            Some(("direct", other)) => {
                return Err(format!("direct={other}: use direct=on or direct=off"));
            }
            Some(("serial", id)) => disk.serial = Some(id.to_string()),
            Some(("aio", "io_uring")) => disk.io_engine = vmm::config::IoEngine::IoUring,
            Some(("aio", "sync")) => disk.io_engine = vmm::config::IoEngine::Sync,
            Some(("aio", other)) => {
                return Err(format!("aio={other}: use aio=io_uring or aio=sync"));
            }
            _ => {
                return Err(format!(
                    "unknown disk option {option:?}; use readonly, direct=on|off, serial=ID or aio=io_uring|sync"
                ));
            }
        }
    }
    Ok(disk)
}

/// Parses one `--net` value.
pub fn parse_net(value: &str) -> Result<vmm::config::NicConfig, String> {
    use vmm::config::{NetBackendConfig, NicConfig};
    let mut parts = value.split(',');
    let mut nic = match parts.next() {
        Some("user") => NicConfig::user(),
        Some(tap) if tap.starts_with("tap=") => NicConfig {
            backend: NetBackendConfig::Tap {
                name: tap["tap=".len()..].to_string(),
                vhost: true,
            },
            mac: None,
        },
        Some(other) => {
            return Err(format!(
                "unknown network backend {other:?}; use --net user[,OPTIONS] or --net tap=NAME[,mac=MAC][,vhost=on|off]"
            ))
        }
        None => unreachable!("split yields at least one item"),
    };
    for option in parts {
        match (option.split_once('='), &mut nic.backend) {
            (Some(("mac", mac)), _) => nic.mac = Some(parse_mac(mac)?),
            (Some(("mtu", n)), NetBackendConfig::User { mtu, .. }) => {
                *mtu = n.parse().map_err(|_| {
                    format!("mtu {n:?} is not a number; use mtu=N with N from 68 to 65520")
                })?
            }
            (Some(("resolv", path)), NetBackendConfig::User { resolv_conf, .. }) => {
                *resolv_conf = PathBuf::from(path)
            }
            (Some(("port", spec)), NetBackendConfig::User { forwards, .. }) => {
                forwards.extend(vmm::config::parse_port_forward(spec)?)
            }
            (Some(("vhost", v)), NetBackendConfig::Tap { vhost, .. }) => {
                *vhost = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("vhost {v:?}: use vhost=on or vhost=off")),
                }
            }
            (Some(("ports", "all")), NetBackendConfig::User { forward_all, .. }) => {
                *forward_all = true
            }
            (Some(("pod-loopback", v)), NetBackendConfig::User { pod_loopback, .. }) => {
                *pod_loopback = match v {
                    "on" => true,
                    "off" => false,
                    _ => {
                        return Err(format!(
                            "pod-loopback {v:?}: use pod-loopback=on or pod-loopback=off"
                        ))
                    }
                }
            }
            (Some(("max-flows", n)), NetBackendConfig::User { max_flows, .. }) => {
                *max_flows = n.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                    format!("max-flows {n:?} is not a positive number; use max-flows=N (default 1024)")
                })?
            }
            _ => {
                return Err(format!(
                "unknown network option {option:?}; use mac=MAC, mtu=N, resolv=PATH, port=SPEC, ports=all, max-flows=N or pod-loopback=on"
            ))
            }
        }
    }
    Ok(nic)
}

/// Parses one `--topology` value.
pub fn parse_topology(value: &str) -> Result<vmm::config::CpuTopology, String> {
    let usage = || {
        format!("{value:?} is not SOCKETS:CORES:THREADS; give three numbers from 1 to 255, such as 2:4:2")
    };
    let counts: Vec<u8> = value
        .split(':')
        .map(|n| n.trim().parse().map_err(|_| usage()))
        .collect::<Result<_, _>>()?;
    let [sockets, cores, threads] = counts[..] else {
        return Err(usage());
    };
    Ok(vmm::config::CpuTopology {
        sockets,
        cores,
        threads,
    })
}

fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| {
            if b.len() == 2 {
                u8::from_str_radix(b, 16).ok()
            } else {
                None
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(|| format!("mac {text:?} is not six hex bytes; use mac=52:54:00:12:34:56"))?;
    bytes
        .try_into()
        .map_err(|_| format!("mac {text:?} is not six hex bytes; use mac=52:54:00:12:34:56"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_topology_parses_sockets_cores_threads() {
        let t = parse_topology("2:3:2").unwrap();
        assert_eq!((t.sockets, t.cores, t.threads), (2, 3, 2));
        for bad in ["2:2", "2:2:2:2", "a:1:1", "1:1:256", "", "2::2"] {
            let err = parse_topology(bad).unwrap_err();
            assert!(err.contains("SOCKETS:CORES:THREADS"), "{bad}: {err}");
        }
    }

    #[test]
    fn disk_flag_parses_path_and_options() {
        let d = parse_disk("/dev/vol,readonly,direct=off,serial=abc-1").unwrap();
        assert_eq!(d.path, std::path::PathBuf::from("/dev/vol"));
        assert!(d.read_only);
        assert_eq!(d.direct, Some(false));
        assert_eq!(d.serial.as_deref(), Some("abc-1"));
        let d = parse_disk("disk.img,aio=sync").unwrap();
        assert_eq!(d.io_engine, vmm::config::IoEngine::Sync);
        let d = parse_disk("disk.img").unwrap();
        assert_eq!((d.read_only, d.direct, d.serial), (false, None, None));
    }

    #[test]
    fn net_flag_parses_backend_and_options() {
        use vmm::config::NetBackendConfig;
        let n = parse_net("user").unwrap();
        assert_eq!(n, vmm::config::NicConfig::user());
        let n = parse_net("user,mac=52:54:00:aa:bb:0c,mtu=1500,resolv=/tmp/r").unwrap();
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0x0c]));
        assert_eq!(
            n.backend,
            NetBackendConfig::User {
                mtu: 1500,
                resolv_conf: "/tmp/r".into(),
                forwards: Vec::new(),
                forward_all: false,
                max_flows: vmm::config::DEFAULT_MAX_FLOWS,
                pod_loopback: false,
            }
        );
        let n = parse_net("user,pod-loopback=on").unwrap();
        assert!(matches!(
            n.backend,
            NetBackendConfig::User {
                pod_loopback: true,
                ..
            }
        ));
        assert!(parse_net("user,pod-loopback=yes")
            .unwrap_err()
            .contains("pod-loopback=on"));
        assert!(parse_net("slirp")
            .unwrap_err()
            .contains("unknown network backend"));
        assert!(parse_net("user,mac=52:54")
            .unwrap_err()
            .contains("six hex bytes"));
        assert!(parse_net("user,mtu=big")
            .unwrap_err()
            .contains("not a number"));
        assert!(parse_net("user,ports=some")
            .unwrap_err()
            .contains("unknown network option"));
        let n = parse_net("user,port=8080,port=2222:22,port=53/udp,port=7000-7001").unwrap();
        let NetBackendConfig::User { forwards, .. } = n.backend else {
            panic!("not user: {n:?}")
        };
        assert_eq!(forwards.len(), 5);
        let n = parse_net("tap=tap0,mac=52:54:00:00:00:09").unwrap();
        assert_eq!(
            n.backend,
            NetBackendConfig::Tap {
                name: "tap0".into(),
                vhost: true
            }
        );
        let n = parse_net("tap=tap0,vhost=off").unwrap();
        assert!(matches!(
            n.backend,
            NetBackendConfig::Tap { vhost: false, .. }
        ));
        assert!(parse_net("tap=tap0,port=80")
            .unwrap_err()
            .contains("unknown network option"));
        assert!(parse_net("user,port=99999")
            .unwrap_err()
            .contains("not a port"));
    }

    #[test]
    fn disk_flag_rejects_unknown_options() {
        assert!(parse_disk("d.img,cache=none")
            .unwrap_err()
            .contains("unknown disk option"));
        assert!(parse_disk("d.img,direct=maybe")
            .unwrap_err()
            .contains("direct=on or direct=off"));
        assert!(parse_disk(",readonly")
            .unwrap_err()
            .contains("path is empty"));
    }
}
