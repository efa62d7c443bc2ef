//! `VmConfig`: the one contract between the launcher and the VMM. Plain data plus `validate()`.

use std::path::PathBuf;

/// Most vCPUs a VM may have: APIC IDs and MADT UIDs are bytes, and 0xff is the broadcast ID.
pub const MAX_VCPUS: u8 = 254;
/// Least guest memory podvm accepts: the boot layout alone uses the first MiB, and no Linux
/// kernel gets to userspace in less.
pub const MIN_MEMORY_MIB: u64 = 32;
/// Most guest memory podvm accepts (1 TiB).
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Most virtio devices (disks, NICs and the RNG together): one interrupt line each, from the
/// IOAPIC's free pins.
pub const MAX_DISKS: usize = 16;
/// Command line used when none is given: serial console, reboot through the i8042 reset line
/// (which podvm turns into a clean exit), reboot at once on panic, and no PCI probing (podvm
/// has no PCI bus; its devices are described in ACPI).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off";

/// Where COM1 goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// COM1 on podvm's own stdin/stdout (raw mode when stdin is a terminal).
    Stdio,
    /// COM1 output discarded and no input.
    Off,
    /// COM1 on a unix stream socket (mode 0600) that `podvm console` attaches to.
    Socket {
        /// Where the socket is created.
        path: PathBuf,
        /// Bytes of output replayed to each new client.
        history: usize,
        /// A file that receives all console output too.
        log: Option<PathBuf>,
    },
}

/// Longest disk serial (virtio-blk GET_ID answers 20 bytes).
pub const MAX_SERIAL_LEN: usize = 20;

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// A raw image file or a block device.
    pub path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
    /// O_DIRECT; `None` means the default (on for block devices, off for files).
    pub direct: Option<bool>,
    /// Serial number the guest reads (`/sys/block/vdX/serial`).
    pub serial: Option<String>,
    /// io_uring (the default, falling back to synchronous I/O where unavailable) or sync.
    pub io_engine: IoEngine,
}

pub use devices::virtio::block::IoEngine;
pub use devices::virtio::net::user::forward::{parse as parse_port_forward, PortForward, Proto};

/// The default MAC of the first NIC; later NICs count up in the last byte. Locally
/// administered (bit 1 of the first byte), like QEMU's 52:54:00 prefix.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// Default limit of the user NAT's table: TCP connections, and UDP conversations, at once.
pub const DEFAULT_MAX_FLOWS: usize = 1024;

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackendConfig {
    /// The userspace masquerade NAT (KubeVirt's `masquerade` binding, no privileges).
    User {
        /// The link MTU handed to the guest (device config and DHCP).
        mtu: u16,
        /// Where the pod's name servers and search domains come from.
        resolv_conf: PathBuf,
        /// The pod's ports forwarded to the guest.
        forwards: Vec<PortForward>,
        /// Every free TCP and UDP port of the pod forwarded to the same guest port.
        forward_all: bool,
        /// Most TCP connections (and, separately, UDP conversations) at once.
        max_flows: usize,
        /// The gateway stands for the pod's loopback and the guest may reach 127.0.0.0/8 and
        /// ::1 (opt-in: it opens the pod's loopback-only services to the guest); otherwise
        /// the gateway is the pod's own address, as in KubeVirt.
        pod_loopback: bool,
    },
    /// An existing tap device, opened by name (created by a privileged agent).
    Tap {
        /// The tap's interface name.
        name: String,
        /// Let vhost-net move the frames where /dev/vhost-net opens (otherwise podvm does).
        vhost: bool,
    },
}

/// One virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicConfig {
    pub backend: NetBackendConfig,
    /// The guest's MAC; `None` means [`DEFAULT_MAC`] (counted up per NIC).
    pub mac: Option<[u8; 6]>,
}

impl NicConfig {
    /// The user backend with its defaults.
    pub fn user() -> Self {
        Self {
            backend: NetBackendConfig::User {
                mtu: devices::virtio::net::user::DEFAULT_MTU,
                resolv_conf: PathBuf::from("/etc/resolv.conf"),
                forwards: Vec::new(),
                forward_all: false,
                max_flows: DEFAULT_MAX_FLOWS,
                pod_loopback: false,
            },
            mac: None,
        }
    }
}

/// How the vCPUs are grouped: `sockets` of `cores` of `threads` (KubeVirt's
/// `spec.domain.cpu`). The guest sees this layout in CPUID and in its CPUs' APIC IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CpuTopology {
    pub sockets: u8,
    pub cores: u8,
    pub threads: u8,
}

impl CpuTopology {
    /// How many vCPUs the layout holds.
    pub fn vcpus(&self) -> u32 {
        u32::from(self.sockets) * u32::from(self.cores) * u32::from(self.threads)
    }
}

impl std::fmt::Display for CpuTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.sockets, self.cores, self.threads)
    }
}

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// How the vCPUs are grouped into sockets, cores and threads; `None` is one socket of
    /// `vcpus` single-threaded cores.
    pub topology: Option<CpuTopology>,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Kernel image: a bzImage, or an ELF vmlinux (PVH entry used when present).
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Where COM1 goes.
    pub console: ConsoleConfig,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net NICs, in the order the guest sees them (eth0, ...).
    pub nics: Vec<NicConfig>,
    /// A virtio-rng device (after the disks and NICs) that feeds the guest entropy from the
    /// host's `getrandom(2)` (KubeVirt's `spec.domain.devices.rng`).
    pub rng: bool,
    /// After SIGTERM presses the power button, how long the guest has to power off before
    /// it is stopped.
    pub shutdown_timeout: std::time::Duration,
    /// Where the control API listens (a unix socket, mode 0600); no API when `None`.
    pub api_socket: Option<PathBuf>,
    /// How migrations of this VM go.
    pub migration: crate::migration::MigrationConfig,
    /// The VM waits for a migration instead of booting: no kernel is loaded.
    pub incoming: bool,
    /// The pod's status endpoint and readiness file.
    pub status: crate::status::StatusConfig,
}

/// Kubernetes' default termination grace period.
pub const DEFAULT_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A `VmConfig` field that cannot work, with the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("cpus: {0} is out of range; use a value from 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    #[error(
        "topology {topology}: {field} is 0; give each of sockets, cores and threads at least 1"
    )]
    TopologyZero {
        topology: CpuTopology,
        field: &'static str,
    },
    #[error("topology {topology}: sockets x cores x threads is {product} vCPUs but cpus is {vcpus}; give --cpus {product}, or a topology whose product is {vcpus}")]
    TopologyCount {
        topology: CpuTopology,
        product: u32,
        vcpus: u8,
    },
    #[error("topology {topology}: the last vCPU's APIC ID would be {max_apic_id}, above {MAX_VCPUS} (each count is rounded up to a power of two in the APIC ID); use counts that are powers of two, or fewer sockets")]
    TopologyApicIds {
        topology: CpuTopology,
        max_apic_id: u32,
    },
    #[error(
        "memory: {0} MiB is out of range; use a value from {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MiB"
    )]
    Memory(u64),
    #[error(
        "cmdline: the kernel command line contains a NUL or non-ASCII byte; use printable ASCII"
    )]
    Cmdline,
    #[error("disk {index} serial {serial:?}: use at most {MAX_SERIAL_LEN} printable ASCII characters without commas")]
    Serial { index: usize, serial: String },
    #[error("--api-socket {0}: is also the --console socket; give the two different paths")]
    SocketClash(PathBuf),
    #[error("disks, nics and rng: {count} virtio devices is more than podvm's {max}; give fewer --disk or --net")]
    TooManyDevices { count: usize, max: usize },
    #[error("--net {index}: mtu {mtu} is out of range; use a value from 68 to {max}")]
    Mtu { index: usize, mtu: u16, max: u16 },
    #[error("--net {index}: max-flows {max_flows} is more than the NAT's memory budget holds; use at most {max}")]
    MaxFlows {
        index: usize,
        max_flows: usize,
        max: usize,
    },
    #[error("--net {index}: mac {mac} is not a unicast address; use one whose first byte is even, such as 52:54:00:xx:xx:xx")]
    Mac { index: usize, mac: String },
    #[error("--net {index}: the pod's {proto} port {port} is forwarded twice; forward each pod port once")]
    DuplicatePort {
        index: usize,
        proto: String,
        port: u16,
    },
    #[error("--net {index}: ports=all already forwards every port to the same guest port; drop the port= options or ports=all")]
    PortsAllAndList { index: usize },
    #[error("--net {index}: tap name {name:?} is not an interface name; use 1 to 15 characters without '/'")]
    TapName { index: usize, name: String },
    #[error("--net: two NICs have the MAC {0}; give each its own mac=")]
    DuplicateMac(String),
}

impl VmConfig {
    /// A config with podvm's defaults: 1 vCPU, 256 MiB, the default command line, stdio console.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            vcpus: 1,
            topology: None,
            memory_mib: 256,
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            console: ConsoleConfig::Stdio,
            disks: Vec::new(),
            nics: Vec::new(),
            rng: false,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            api_socket: None,
            migration: Default::default(),
            incoming: false,
            status: Default::default(),
        }
    }

    /// Checks what can be checked without touching files or KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if let Some(topology) = self.topology {
            self.validate_topology(topology)?;
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::Memory(self.memory_mib));
        }
        if !self.cmdline.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(ConfigError::Cmdline);
        }
        let count = self.virtio_devices();
        if count > MAX_DISKS {
            return Err(ConfigError::TooManyDevices {
                count,
                max: MAX_DISKS,
            });
        }
        let mut macs = Vec::new();
        for (index, nic) in self.nics.iter().enumerate() {
            let mac = self.nic_mac(index);
            if mac[0] & 1 != 0 || mac == [0; 6] {
                return Err(ConfigError::Mac {
                    index,
                    mac: format_mac(mac),
                });
            }
            if macs.contains(&mac) {
                return Err(ConfigError::DuplicateMac(format_mac(mac)));
            }
            macs.push(mac);
            match &nic.backend {
                NetBackendConfig::User {
                    mtu,
                    forwards,
                    forward_all,
                    max_flows,
                    ..
                } => {
                    let max = devices::virtio::net::user::tcp::MAX_FLOWS;
                    if *max_flows > max {
                        return Err(ConfigError::MaxFlows {
                            index,
                            max_flows: *max_flows,
                            max,
                        });
                    }
                    if *forward_all && !forwards.is_empty() {
                        return Err(ConfigError::PortsAllAndList { index });
                    }
                    let mut seen = std::collections::HashSet::new();
                    if let Some(f) = forwards.iter().find(|f| !seen.insert((f.proto, f.host))) {
                        return Err(ConfigError::DuplicatePort {
                            index,
                            proto: f.proto.to_string(),
                            port: f.host,
                        });
                    }
                    let max = devices::virtio::net::user::DEFAULT_MTU;
                    if !(68..=max).contains(mtu) {
                        return Err(ConfigError::Mtu {
                            index,
                            mtu: *mtu,
                            max,
                        });
                    }
                }
                NetBackendConfig::Tap { name, .. } => {
                    if name.is_empty() || name.len() > 15 || name.contains('/') {
                        return Err(ConfigError::TapName {
                            index,
                            name: name.clone(),
                        });
                    }
                }
            }
        }
        if let (Some(api), ConsoleConfig::Socket { path, .. }) = (&self.api_socket, &self.console) {
            if api == path {
                return Err(ConfigError::SocketClash(api.clone()));
            }
        }
        for (index, disk) in self.disks.iter().enumerate() {
            if let Some(serial) = &disk.serial {
                let printable = serial
                    .bytes()
                    .all(|b| (0x21..0x7f).contains(&b) && b != b',');
                if serial.len() > MAX_SERIAL_LEN || !printable {
                    return Err(ConfigError::Serial {
                        index,
                        serial: serial.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn validate_topology(&self, topology: CpuTopology) -> Result<(), ConfigError> {
        for (field, count) in [
            ("sockets", topology.sockets),
            ("cores", topology.cores),
            ("threads", topology.threads),
        ] {
            if count == 0 {
                return Err(ConfigError::TopologyZero { topology, field });
            }
        }
        let product = topology.vcpus();
        if product != u32::from(self.vcpus) {
            return Err(ConfigError::TopologyCount {
                topology,
                product,
                vcpus: self.vcpus,
            });
        }
        // APIC IDs are bytes in the MADT, and 0xff is the broadcast ID.
        let max_apic_id = crate::vcpu::topology::Topology::of(self).max_apic_id();
        if max_apic_id > u32::from(MAX_VCPUS) {
            return Err(ConfigError::TopologyApicIds {
                topology,
                max_apic_id,
            });
        }
        Ok(())
    }

    /// The MAC of NIC `index`: its own, or the default counted up by the index.
    pub fn nic_mac(&self, index: usize) -> [u8; 6] {
        self.nics[index].mac.unwrap_or_else(|| {
            let mut mac = DEFAULT_MAC;
            mac[5] = mac[5].wrapping_add(index as u8);
            mac
        })
    }

    /// How many virtio devices the guest gets.
    pub fn virtio_devices(&self) -> usize {
        self.disks.len() + self.nics.len() + usize::from(self.rng)
    }

    /// Guest RAM in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }
}

/// `52:54:00:12:34:56`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_are_valid() {
        let cfg = VmConfig::new("/k");
        assert_eq!(cfg.vcpus, 1);
        assert_eq!(cfg.memory_mib, 256);
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn config_rejects_zero_cpus_and_tiny_memory() {
        let mut cfg = VmConfig::new("/k");
        cfg.vcpus = 0;
        assert_eq!(cfg.validate(), Err(ConfigError::Vcpus(0)));
        cfg.vcpus = 255;
        assert_eq!(cfg.validate(), Err(ConfigError::Vcpus(255)));
        cfg.vcpus = 2;
        cfg.memory_mib = 1;
        assert_eq!(cfg.validate(), Err(ConfigError::Memory(1)));
        assert!(ConfigError::Memory(1).to_string().contains("memory: 1 MiB"));
    }

    #[test]
    fn config_rejects_long_or_odd_serials() {
        let mut cfg = VmConfig::new("/k");
        let disk = |serial: &str| DiskConfig {
            path: "/d".into(),
            read_only: false,
            direct: None,
            serial: Some(serial.into()),
            io_engine: IoEngine::default(),
        };
        cfg.disks = vec![disk("ok-serial-123")];
        assert_eq!(cfg.validate(), Ok(()));
        cfg.disks = vec![disk("x"), disk("012345678901234567890")];
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Serial { index: 1, .. })
        ));
        cfg.disks = vec![disk("has space")];
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn config_rejects_one_path_for_console_and_api() {
        let mut cfg = VmConfig::new("/k");
        cfg.console = ConsoleConfig::Socket {
            path: "/run/vm.sock".into(),
            history: 1024,
            log: None,
        };
        cfg.api_socket = Some("/run/api.sock".into());
        assert_eq!(cfg.validate(), Ok(()));
        cfg.api_socket = Some("/run/vm.sock".into());
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::SocketClash("/run/vm.sock".into()))
        );
    }

    fn with_topology(vcpus: u8, sockets: u8, cores: u8, threads: u8) -> VmConfig {
        let mut cfg = VmConfig::new("/k");
        cfg.vcpus = vcpus;
        cfg.topology = Some(CpuTopology {
            sockets,
            cores,
            threads,
        });
        cfg
    }

    #[test]
    fn config_accepts_a_topology_whose_product_is_the_vcpu_count() {
        assert_eq!(with_topology(12, 2, 3, 2).validate(), Ok(()));
        assert_eq!(with_topology(1, 1, 1, 1).validate(), Ok(()));
        assert_eq!(VmConfig::new("/k").topology, None);
    }

    #[test]
    fn config_rejects_a_topology_that_does_not_multiply_to_the_vcpus() {
        let err = with_topology(8, 2, 2, 1).validate().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::TopologyCount {
                product: 4,
                vcpus: 8,
                ..
            }
        ));
        let text = err.to_string();
        assert!(text.contains("topology 2:2:1"), "{text}");
        assert!(text.contains("--cpus 4"), "{text}");
    }

    #[test]
    fn config_rejects_a_zero_in_the_topology_naming_the_field() {
        let err = with_topology(4, 2, 0, 2).validate().unwrap_err();
        assert!(matches!(
            err,
            ConfigError::TopologyZero { field: "cores", .. }
        ));
        assert!(err.to_string().contains("cores is 0"));
    }

    #[test]
    fn config_rejects_a_topology_whose_apic_ids_do_not_fit_a_byte() {
        // 3 sockets of 80 single-threaded cores: 240 vCPUs, but cores take 7 bits, so the
        // last vCPU is APIC ID 2 << 7 | 79 = 335.
        let err = with_topology(240, 3, 80, 1).validate().unwrap_err();
        assert_eq!(
            err,
            ConfigError::TopologyApicIds {
                topology: CpuTopology {
                    sockets: 3,
                    cores: 80,
                    threads: 1
                },
                max_apic_id: 335
            }
        );
        // The same count as 1 socket of 240 fits.
        assert_eq!(with_topology(240, 1, 240, 1).validate(), Ok(()));
    }

    #[test]
    fn config_counts_the_rng_among_the_virtio_devices() {
        let mut cfg = VmConfig::new("/k");
        assert!(!cfg.rng, "no RNG unless asked for");
        cfg.nics = (0..MAX_DISKS)
            .map(|i| NicConfig {
                mac: Some([0x52, 0x54, 0, 0, 0, i as u8]),
                ..NicConfig::user()
            })
            .collect();
        assert_eq!(cfg.validate(), Ok(()));
        cfg.rng = true;
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::TooManyDevices {
                count: MAX_DISKS + 1,
                max: MAX_DISKS
            })
        );
        cfg.nics.pop();
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn config_rejects_control_bytes_in_cmdline() {
        let mut cfg = VmConfig::new("/k");
        cfg.cmdline = "console=ttyS0\nfoo".into();
        assert_eq!(cfg.validate(), Err(ConfigError::Cmdline));
    }

    #[test]
    fn config_rejects_more_flows_than_the_nat_budget_holds() {
        let max = devices::virtio::net::user::tcp::MAX_FLOWS;
        let mut cfg = VmConfig::new("/k");
        cfg.nics = vec![NicConfig::user()];
        let NetBackendConfig::User { max_flows, .. } = &mut cfg.nics[0].backend else {
            unreachable!()
        };
        *max_flows = max;
        assert_eq!(cfg.validate(), Ok(()));
        let NetBackendConfig::User { max_flows, .. } = &mut cfg.nics[0].backend else {
            unreachable!()
        };
        *max_flows = max + 1;
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::MaxFlows {
                index: 0,
                max_flows: max + 1,
                max
            })
        );
    }
}
