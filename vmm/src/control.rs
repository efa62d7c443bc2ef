//! The VM as the control API sees it: state, info, counters and the actions on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::virtio::block::BlockMetrics;
use kvm_ioctls::VmFd;
use serde_json::{json, Value};

use crate::api::{ApiMetrics, Control};
use crate::config::{ConsoleConfig, VmConfig};
use crate::console::ConsoleHub;
use crate::shutdown::{Begun, GracefulShutdown};
use crate::vcpu::control::{RunState, VcpuControl};

/// Everything the API reports on or acts on.
pub struct VmControl {
    pub config: VmConfig,
    pub started: Instant,
    pub vm: Arc<VmFd>,
    pub vcpus: Arc<VcpuControl>,
    pub shutdown: Arc<GracefulShutdown>,
    /// One per disk, in config order.
    pub disks: Vec<Arc<BlockMetrics>>,
    /// One per NIC, in config order.
    pub nics: Vec<Arc<devices::virtio::net::NetMetrics>>,
    /// The virtio-rng device, if the VM has one.
    pub rng: Option<Arc<devices::virtio::rng::RngMetrics>>,
    pub console: Option<Arc<ConsoleHub>>,
    pub api: Arc<ApiMetrics>,
    pub pauses: AtomicU64,
    pub migration: Arc<crate::migration::Migrator>,
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl VmControl {
    /// "running", "paused" or "shutting-down" (the power button was pressed).
    fn state(&self) -> &'static str {
        if self.shutdown.remaining().is_some() {
            "shutting-down"
        } else {
            match self.vcpus.run_state() {
                RunState::Running => "running",
                RunState::Paused => "paused",
            }
        }
    }

    fn state_json(&self) -> Value {
        json!({ "state": self.state() })
    }
}

fn nic_counters(m: &devices::virtio::net::NetMetrics) -> Value {
    json!({
        "tx_frames": get(&m.tx_frames),
        "tx_bytes": get(&m.tx_bytes),
        "rx_frames": get(&m.rx_frames),
        "rx_bytes": get(&m.rx_bytes),
        "tx_invalid": get(&m.tx_invalid),
        "tx_dropped": get(&m.tx_dropped),
        "rx_dropped": get(&m.rx_dropped),
        "interrupts": get(&m.interrupts),
        "broken_queues": get(&m.broken_queues),
        "tx_budget_spent": get(&m.tx_budget_spent),
        "vhost_active": get(&m.vhost_active),
        "announcements": get(&m.announcements),
        "nat": {
            "dropped_malformed": get(&m.nat_dropped_malformed),
            "dropped_checksum": get(&m.nat_dropped_checksum),
            "dropped_fragment": get(&m.nat_dropped_fragment),
            "dropped_unsupported": get(&m.nat_dropped_unsupported),
            "dropped_loopback": get(&m.nat_dropped_loopback),
            "tcp_opened": get(&m.nat_tcp_opened),
            "tcp_inbound": get(&m.nat_tcp_inbound),
            "tcp_connect_failed": get(&m.nat_tcp_connect_failed),
            "tcp_resets_from_guest": get(&m.nat_tcp_resets_from_guest),
            "tcp_resets_to_guest": get(&m.nat_tcp_resets_to_guest),
            "tcp_flows": get(&m.nat_tcp_flows),
            "udp_flows": get(&m.nat_udp_flows),
            "udp_send_errors": get(&m.nat_udp_send_errors),
            "flow_limit": get(&m.nat_flow_limit),
            "expired": get(&m.nat_expired),
            "icmp_replies": get(&m.nat_icmp_replies),
            "icmp_unanswered": get(&m.nat_icmp_unanswered),
            "reply_too_large": get(&m.nat_reply_too_large),
            "dhcp_replies": get(&m.dhcp_replies),
            "router_adverts": get(&m.router_adverts),
        },
    })
}

impl Control for VmControl {
    fn info(&self) -> Value {
        let c = &self.config;
        let console = match &c.console {
            ConsoleConfig::Stdio => json!({ "kind": "stdio" }),
            ConsoleConfig::Off => json!({ "kind": "off" }),
            ConsoleConfig::Socket { path, history, log } => json!({
                "kind": "socket",
                "path": path,
                "history_bytes": history,
                "log": log,
            }),
        };
        let disks: Vec<Value> = c
            .disks
            .iter()
            .enumerate()
            .map(|(index, d)| {
                json!({
                    "index": index,
                    "path": d.path,
                    "read_only": d.read_only,
                    "serial": d.serial,
                })
            })
            .collect();
        let nics: Vec<Value> = c
            .nics
            .iter()
            .enumerate()
            .map(|(index, n)| {
                let backend = match &n.backend {
                    crate::config::NetBackendConfig::User {
                        mtu,
                        resolv_conf,
                        forwards,
                        forward_all,
                        max_flows,
                        pod_loopback,
                    } => json!({
                        "pod_loopback": pod_loopback,
                        "ports_all": forward_all,
                        "max_flows": max_flows,
                        "kind": "user",
                        "mtu": mtu,
                        "resolv_conf": resolv_conf,
                        "ports": forwards
                            .iter()
                            .map(|f| format!("{}:{}/{}", f.host, f.guest, f.proto))
                            .collect::<Vec<_>>(),
                        "guest_ipv4": "10.0.2.2/24",
                        "gateway_ipv4": "10.0.2.1",
                    }),
                    crate::config::NetBackendConfig::Tap { name, vhost } => json!({
                        "kind": "tap",
                        "name": name,
                        "vhost": vhost,
                    }),
                };
                json!({
                    "index": index,
                    "mac": crate::config::format_mac(c.nic_mac(index)),
                    "backend": backend,
                })
            })
            .collect();
        json!({
            "state": self.state(),
            "shutdown_remaining_s": self.shutdown.remaining().map(|d| d.as_secs_f64()),
            "shutdown_timeout_s": self.shutdown.default_timeout().as_secs_f64(),
            "vcpus": c.vcpus,
            "topology": c.topology.map(|t| json!({
                "sockets": t.sockets,
                "cores": t.cores,
                "threads": t.threads,
            })),
            "memory_mib": c.memory_mib,
            "kernel": c.kernel,
            "initrd": c.initrd,
            "cmdline": c.cmdline,
            "console": console,
            "disks": disks,
            "nics": nics,
            "rng": c.rng,
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "paused_s": self.vcpus.paused_total().as_secs_f64(),
            "pid": std::process::id(),
            "podvm_version": env!("CARGO_PKG_VERSION"),
        })
    }

    fn counters(&self) -> Value {
        let disks: Vec<Value> = self
            .disks
            .iter()
            .zip(&self.config.disks)
            .enumerate()
            .map(|(index, (m, d))| {
                let errors =
                    get(&m.io_errors) + get(&m.read_only_violations) + get(&m.unsupported_requests);
                json!({
                    "index": index,
                    "path": d.path,
                    "requests": get(&m.read_requests) + get(&m.write_requests)
                        + get(&m.flush_requests) + get(&m.discard_requests)
                        + get(&m.write_zeroes_requests) + get(&m.get_id_requests),
                    "bytes": get(&m.read_bytes) + get(&m.write_bytes),
                    "errors": errors,
                    "dropped": get(&m.invalid_requests),
                    "read_requests": get(&m.read_requests),
                    "read_bytes": get(&m.read_bytes),
                    "write_requests": get(&m.write_requests),
                    "write_bytes": get(&m.write_bytes),
                    "flush_requests": get(&m.flush_requests),
                    "discard_requests": get(&m.discard_requests),
                    "write_zeroes_requests": get(&m.write_zeroes_requests),
                    "get_id_requests": get(&m.get_id_requests),
                    "unsupported_requests": get(&m.unsupported_requests),
                    "invalid_requests": get(&m.invalid_requests),
                    "io_errors": get(&m.io_errors),
                    "read_only_violations": get(&m.read_only_violations),
                    "interrupts": get(&m.interrupts),
                    "broken_queues": get(&m.broken_queues),
                    "write_through_syncs": get(&m.write_through_syncs),
                    "budget_spent": get(&m.budget_spent),
                })
            })
            .collect();
        let console = self.console.as_ref().map(|hub| {
            let m = hub.metrics();
            json!({
                "clients_attached": hub.clients_attached(),
                "clients_connected": get(&m.clients_connected),
                "clients_dropped_slow": get(&m.clients_dropped_slow),
                "output_bytes": get(&m.output_bytes),
                "input_bytes": get(&m.input_bytes),
                "log_errors": get(&m.log_errors),
                "log_dropped_bytes": get(&m.log_dropped_bytes),
                "backlog_bytes": get(&m.backlog_bytes),
            })
        });
        let rng = self.rng.as_ref().map(|m| {
            json!({
                "requests": get(&m.requests),
                "bytes": get(&m.bytes),
                "bad_chains": get(&m.bad_chains),
                "entropy_errors": get(&m.entropy_errors),
                "interrupts": get(&m.interrupts),
                "broken_queues": get(&m.broken_queues),
            })
        });
        json!({
            "disks": disks,
            "nics": self.nics.iter().map(|m| nic_counters(m)).collect::<Vec<_>>(),
            "rng": rng,
            "console": console,
            "vm": {
                "pauses": get(&self.pauses),
                "paused_s": self.vcpus.paused_total().as_secs_f64(),
            },
            "api": {
                "requests": get(&self.api.requests),
                "errors": get(&self.api.errors),
                "timeouts": get(&self.api.timeouts),
                "refused": get(&self.api.refused),
            },
        })
    }

    fn pause(&self) -> Result<Value, String> {
        if self.shutdown.remaining().is_some() {
            return Err("the guest is shutting down; it cannot be paused".into());
        }
        let was = self.vcpus.run_state();
        self.vcpus.pause(&self.vm).map_err(|e| e.to_string())?;
        if was == RunState::Running {
            self.pauses.fetch_add(1, Ordering::Relaxed);
            tracing::info!("VM paused (API)");
        }
        Ok(self.state_json())
    }

    fn migrate(&self, address: &str) -> Result<Value, (u16, String)> {
        let addr: crate::migration::MigrationAddr = address.parse().map_err(|e| (400, e))?;
        self.migration
            .start(addr)
            .map_err(|e| (409, e.to_string()))?;
        Ok(json!({ "state": "active" }))
    }

    fn migration(&self) -> Value {
        serde_json::to_value(self.migration.status()).unwrap_or(Value::Null)
    }

    fn resume(&self) -> Value {
        if self.migration.handing_over() {
            tracing::warn!("resume ignored: a migration holds the VM paused for its handover");
            return self.state_json();
        }
        if self.vcpus.run_state() == RunState::Paused {
            self.vcpus.resume(&self.vm);
            tracing::info!("VM resumed (API)");
        }
        self.state_json()
    }

    fn shutdown(&self, timeout: Option<Duration>) -> Value {
        let (pressed, remaining) = match self.shutdown.begin("API", timeout) {
            Begun::Pressed(t) => (true, Some(t)),
            Begun::AlreadyPressed(left) => (false, Some(left)),
            Begun::Stopped => (true, None),
        };
        json!({
            "state": if remaining.is_some() { "shutting-down" } else { "stopping" },
            "pressed": pressed,
            "timeout_s": remaining.map(|d| d.as_secs_f64()),
        })
    }

    fn stop(&self) -> Value {
        self.shutdown.stop_now("API");
        json!({ "state": "stopping" })
    }
}

impl crate::status::StatusSource for VmControl {
    fn state(&self) -> &'static str {
        VmControl::state(self)
    }

    fn counters(&self) -> Value {
        Control::counters(self)
    }

    fn migration(&self) -> Value {
        Control::migration(self)
    }

    fn uptime(&self) -> (f64, f64) {
        (
            self.started.elapsed().as_secs_f64(),
            self.vcpus.paused_total().as_secs_f64(),
        )
    }

    fn vcpu_seconds(&self) -> Vec<f64> {
        self.vcpus.cpu_seconds()
    }

    fn vcpu_exits(&self) -> Vec<Vec<(&'static str, u64)>> {
        self.vcpus.exit_counts()
    }
}
