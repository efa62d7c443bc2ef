//! The pod's view of the VM: readiness, liveness and Prometheus metrics over HTTP on a TCP
//! port (`--status-listen`), and a readiness file (`--ready-file`), served by a thread of its
//! own (seccomp kind `status`) that never touches guest memory or devices.
//!
//! - `GET /readyz`: 200 while the guest runs, 503 otherwise (paused, shutting down, ended);
//!   the readiness file exists exactly while the same holds.
//! - `GET /healthz`: 200 while the event loop turns (it beats at least once a second), 503
//!   once it has been silent for [`WEDGED_AFTER`]: a VMM that no longer serves its devices.
//! - `GET /metrics`: the counters of `podvm api SOCKET counters` and more, in the Prometheus
//!   text format.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::api::http::{self, Response};

/// After this long without a beat of the event loop, liveness fails.
pub const WEDGED_AFTER: Duration = Duration::from_secs(10);
/// How often the status thread looks at the VM's state (the readiness file follows it).
const TICK: Duration = Duration::from_millis(200);
/// How long a status client has to send its request and take the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most status connections served at once; a new one beyond this closes the oldest, so
/// idle connections cannot keep a probe out.
const MAX_CLIENTS: usize = 32;

/// The event loop's pulse: it beats after every wake-up, and wakes at least every second.
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    last_ms: AtomicU64,
    /// The longest time between two beats so far: how long a device's pass (or anything
    /// else on the loop) held it at worst.
    longest_ms: AtomicU64,
    /// CPU time of the beating thread at the last beat, and what it used during the
    /// longest silence (µs): about the silence if the loop was busy, about nothing if it
    /// was waiting for a CPU or a lock.
    last_cpu_us: AtomicU64,
    longest_cpu_us: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            longest_ms: AtomicU64::new(0),
            last_cpu_us: AtomicU64::new(0),
            longest_cpu_us: AtomicU64::new(0),
        }
    }
}

/// CPU time of the calling thread, in µs.
fn thread_cpu_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1000
}

impl Heartbeat {
    /// Called by one thread (the event loop) after every wake-up.
    pub fn beat(&self) {
        self.beat_at(self.start.elapsed().as_millis() as u64, thread_cpu_us());
    }

    /// A beat at `ms` after the start, with the beating thread's CPU time at `cpu` µs.
    fn beat_at(&self, ms: u64, cpu: u64) {
        let last = self.last_ms.swap(ms, Ordering::Relaxed);
        let last_cpu = self.last_cpu_us.swap(cpu, Ordering::Relaxed);
        // The first beat ends the VM's setup, not a silence of the loop.
        let gap = ms.saturating_sub(last);
        if last > 0 && gap > self.longest_ms.load(Ordering::Relaxed) {
            self.longest_ms.store(gap, Ordering::Relaxed);
            self.longest_cpu_us
                .store(cpu.saturating_sub(last_cpu), Ordering::Relaxed);
        }
    }

    /// CPU time the beating thread used during [`Heartbeat::longest_silence`].
    pub fn longest_silence_cpu(&self) -> Duration {
        Duration::from_micros(self.longest_cpu_us.load(Ordering::Relaxed))
    }

    /// The longest time between two beats so far.
    pub fn longest_silence(&self) -> Duration {
        Duration::from_millis(self.longest_ms.load(Ordering::Relaxed))
    }

    /// Time since the last beat.
    pub fn silence(&self) -> Duration {
        self.silence_at(self.start.elapsed().as_millis() as u64)
    }

    /// Time since the last beat, at `now` ms after the start.
    fn silence_at(&self, now: u64) -> Duration {
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// What the status thread reads of the VM.
pub trait StatusSource: Send + Sync {
    /// "running", "paused" or "shutting-down".
    fn state(&self) -> &'static str;
    /// The control API's `counters` answer.
    fn counters(&self) -> Value;
    /// The control API's `migration` answer.
    fn migration(&self) -> Value;
    /// Seconds since the VM started, and seconds it spent paused.
    fn uptime(&self) -> (f64, f64);
    /// CPU time of each vCPU thread, in seconds (empty once they have stopped).
    fn vcpu_seconds(&self) -> Vec<f64>;
    /// Exits of each vCPU to podvm, by kind.
    fn vcpu_exits(&self) -> Vec<Vec<(&'static str, u64)>>;
}

/// Where the status is served.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusConfig {
    /// The HTTP endpoint's address (TCP).
    pub listen: Option<SocketAddr>,
    /// A file that exists while the guest runs.
    pub ready_file: Option<PathBuf>,
}

/// The status endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("--status-listen {addr}: cannot listen: {source}{hint}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("cannot start the status thread: {0}")]
    Thread(#[source] io::Error),
    #[error("--ready-file {path}: cannot remove the one an earlier run left: {source}")]
    ReadyFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Binds the status port (before anything else takes it: the NAT's `ports=all` skips it).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, StatusError> {
    let listener = TcpListener::bind(addr).map_err(|source| StatusError::Bind {
        addr,
        hint: if source.kind() == io::ErrorKind::AddrInUse {
            "; the port is taken (a forwarded port of the VM, or another process): choose another"
        } else {
            ""
        },
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| StatusError::Bind {
            addr,
            source,
            hint: "",
        })?;
    Ok(listener)
}

/// Removes a readiness file an earlier run left behind.
pub fn clear_ready_file(path: &std::path::Path) -> Result<(), StatusError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StatusError::ReadyFile {
            path: path.to_path_buf(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The running status thread.
pub struct StatusThread {
    done: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<()>,
}

impl StatusThread {
    /// Starts serving; call before the main thread filters itself.
    pub fn spawn(
        listener: Option<TcpListener>,
        ready_file: Option<PathBuf>,
        source: Arc<dyn StatusSource>,
        heartbeat: Arc<Heartbeat>,
    ) -> Result<Self, StatusError> {
        Self::spawn_with(listener, ready_file, source, heartbeat, CLIENT_TIMEOUT)
    }

    fn spawn_with(
        listener: Option<TcpListener>,
        ready_file: Option<PathBuf>,
        source: Arc<dyn StatusSource>,
        heartbeat: Arc<Heartbeat>,
        client_timeout: Duration,
    ) -> Result<Self, StatusError> {
        let done = Arc::new(AtomicBool::new(false));
        let mut server = Server {
            listener,
            ready_file,
            ready: false,
            source,
            heartbeat,
            done: done.clone(),
            clients: Vec::new(),
            client_timeout,
        };
        let handle = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || {
                podvm_seccomp::install_or_exit(podvm_seccomp::ThreadKind::Status);
                server.run();
            })
            .map_err(StatusError::Thread)?;
        Ok(Self { done, handle })
    }

    /// Stops serving (the readiness file goes) and waits for the thread.
    pub fn stop(self) {
        self.done.store(true, Ordering::Release);
        let _ = self.handle.join();
    }
}

struct Server {
    listener: Option<TcpListener>,
    ready_file: Option<PathBuf>,
    ready: bool,
    source: Arc<dyn StatusSource>,
    heartbeat: Arc<Heartbeat>,
    done: Arc<AtomicBool>,
    /// The connections being served, oldest first.
    clients: Vec<Client>,
    /// [`CLIENT_TIMEOUT`] (tests choose another).
    client_timeout: Duration,
}

/// One status connection: its request as it arrives, then its answer as the socket takes it.
struct Client {
    stream: TcpStream,
    request: Vec<u8>,
    /// The encoded answer and how much of it was written.
    answer: Option<(Vec<u8>, usize)>,
    /// When the exchange must be over (read and write together).
    deadline: Instant,
}

impl Client {
    fn new(stream: TcpStream, deadline: Instant) -> Option<Self> {
        stream.set_nonblocking(true).ok()?;
        Some(Self {
            stream,
            request: Vec::new(),
            answer: None,
            deadline,
        })
    }

    /// Reads what has arrived, answers once the request is complete (`route`), and writes
    /// what the socket takes; true once the connection is finished with.
    fn progress(&mut self, route: impl FnOnce(&str, &str) -> Response) -> bool {
        if self.answer.is_none() {
            match self.read_request() {
                Ok(Some(req)) => self.answer = Some((route(&req.method, &req.path).encode(), 0)),
                Ok(None) => return false,
                Err(response) => self.answer = Some((response.encode(), 0)),
            }
        }
        self.write_answer()
    }

    /// The request once complete; `Ok(None)` while more must arrive; an error answer for a
    /// bad, oversized or cut-off request.
    fn read_request(&mut self) -> Result<Option<http::Request>, Response> {
        let mut chunk = [0u8; 2048];
        loop {
            match (&self.stream).read(&mut chunk) {
                Ok(0) => {
                    return Err(Response::error(
                        400,
                        "the request ended before it was complete",
                    ))
                }
                Ok(n) => self.request.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(_) => return Err(Response::error(400, "cannot read the request")),
            }
            match http::parse(&self.request) {
                Ok(Some(req)) => return Ok(Some(req)),
                Ok(None) if self.request.len() > http::MAX_HEAD => {
                    return Err(Response::error(431, "request head too large"))
                }
                Ok(None) => {}
                Err(e) => return Err(Response::error(e.status(), &e)),
            }
        }
    }

    /// Writes what the socket takes of the answer; true once it is all written (or the
    /// client went away).
    fn write_answer(&mut self) -> bool {
        let Some((bytes, written)) = &mut self.answer else {
            return false;
        };
        while *written < bytes.len() {
            match (&self.stream).write(&bytes[*written..]) {
                Ok(0) => return true,
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        true
    }

    /// Past its deadline: a 408 if it has no answer yet (one try, the socket will not wait).
    fn expire(&mut self) {
        if self.answer.is_none() {
            self.answer = Some((
                Response::error(408, "no complete request in time").encode(),
                0,
            ));
            self.write_answer();
        }
    }
}

impl Server {
    fn run(&mut self) {
        while !self.done.load(Ordering::Acquire) {
            self.follow_readiness(self.source.state() == "running");
            self.turn();
        }
        self.follow_readiness(false);
    }

    /// Creates or removes the readiness file as the VM's state changes.
    fn follow_readiness(&mut self, ready: bool) {
        if ready == self.ready {
            return;
        }
        self.ready = ready;
        let Some(path) = &self.ready_file else {
            return;
        };
        let result = if ready {
            // A new file only (O_EXCL): the status thread's filter allows nothing else.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .and_then(|mut f| f.write_all(b"running\n"))
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
        } else {
            std::fs::remove_file(path).or_else(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
        };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, ready, "cannot update the readiness file");
        }
    }

    /// Waits up to one tick (or the nearest client deadline) for the listener or a client,
    /// then accepts new clients and moves every client on. A slow or idle client costs the
    /// others nothing: all are served side by side, each within [`CLIENT_TIMEOUT`], at most
    /// [`MAX_CLIENTS`] at once (a new one closes the oldest).
    fn turn(&mut self) {
        let Some(listener) = &self.listener else {
            std::thread::sleep(TICK);
            return;
        };
        let now = Instant::now();
        let wait = self
            .clients
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .fold(TICK, Duration::min);
        let mut fds = Vec::with_capacity(1 + self.clients.len());
        fds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        fds.extend(self.clients.iter().map(|c| libc::pollfd {
            fd: c.stream.as_raw_fd(),
            events: if c.answer.is_some() {
                libc::POLLOUT
            } else {
                libc::POLLIN
            },
            revents: 0,
        }));
        // Milliseconds, rounded up so a deadline is not polled for again and again.
        let timeout = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the
        // call; the listener and the clients' sockets outlive it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        let ready: Vec<bool> = if n > 0 {
            fds.iter().map(|f| f.revents != 0).collect()
        } else {
            vec![false; fds.len()]
        };
        let now = Instant::now();
        let mut clients = std::mem::take(&mut self.clients);
        let mut i = 0;
        clients.retain_mut(|c| {
            i += 1;
            if ready[i] && c.progress(|method, path| self.route(method, path)) {
                return false;
            }
            if now >= c.deadline {
                c.expire();
                return false;
            }
            true
        });
        self.clients = clients;
        if ready[0] {
            self.accept_all(now);
        }
    }

    fn accept_all(&mut self, now: Instant) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    let Some(client) = Client::new(stream, now + self.client_timeout) else {
                        continue;
                    };
                    if self.clients.len() >= MAX_CLIENTS {
                        self.clients.remove(0);
                    }
                    self.clients.push(client);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return, // WouldBlock: no more clients
            }
        }
    }

    fn route(&self, method: &str, path: &str) -> Response {
        if method != "GET" && method != "HEAD" {
            let mut r = Response::error(405, format_args!("{path} takes GET"));
            r.allow = Some("GET");
            return r;
        }
        match path {
            "/readyz" => {
                let state = self.source.state();
                let status = if state == "running" { 200 } else { 503 };
                Response::json(
                    status,
                    &serde_json::json!({ "ready": status == 200, "state": state }),
                )
            }
            "/healthz" | "/livez" => {
                let silent = self.heartbeat.silence();
                let alive = silent < WEDGED_AFTER;
                Response::json(
                    if alive { 200 } else { 503 },
                    &serde_json::json!({
                        "alive": alive,
                        "event_loop_silent_s": silent.as_secs_f64(),
                    }),
                )
            }
            "/metrics" => Response::text(
                200,
                "text/plain; version=0.0.4",
                prometheus(self.source.as_ref(), &self.heartbeat),
            ),
            _ => Response::error(
                404,
                format_args!("no endpoint {path}; use /readyz, /healthz or /metrics"),
            ),
        }
    }
}

/// The Prometheus text exposition of the VM's state and counters.
pub fn prometheus(source: &dyn StatusSource, heartbeat: &Heartbeat) -> String {
    let silence = heartbeat.silence();
    let mut out = Metrics::default();
    let state = source.state();
    out.help("podvm_vm_state", "gauge", "1 for the VM's current state");
    for s in ["running", "paused", "shutting-down"] {
        out.sample(
            "podvm_vm_state",
            &[("state", s)],
            f64::from(u8::from(s == state)),
        );
    }
    let (uptime, paused) = source.uptime();
    out.metric(
        "podvm_vm_uptime_seconds",
        "gauge",
        "Seconds since the VM started",
        &[],
        uptime,
    );
    out.metric(
        "podvm_vm_paused_seconds_total",
        "counter",
        "Seconds the VM spent paused",
        &[],
        paused,
    );
    out.metric(
        "podvm_event_loop_silence_seconds",
        "gauge",
        "Seconds since the event loop last turned (it turns at least once a second)",
        &[],
        silence.as_secs_f64(),
    );
    out.metric(
        "podvm_event_loop_longest_silence_seconds",
        "gauge",
        "The longest time the event loop went without turning since the VM started (a device's pass over a busy queue, at worst)",
        &[],
        heartbeat.longest_silence().as_secs_f64(),
    );
    out.metric(
        "podvm_event_loop_longest_silence_cpu_seconds",
        "gauge",
        "CPU time the event loop used during its longest silence: near the silence if it was busy, near zero if it waited for a CPU or a lock",
        &[],
        heartbeat.longest_silence_cpu().as_secs_f64(),
    );
    out.help(
        "podvm_seccomp_violations_total",
        "counter",
        "System calls outside a thread's seccomp list, by thread kind and call (counted with --seccomp log, which lets them through; in kill mode the first ends podvm)",
    );
    for (thread, call, n) in podvm_seccomp::violations() {
        out.sample(
            "podvm_seccomp_violations_total",
            &[("thread", thread), ("syscall", call)],
            n as f64,
        );
    }
    let seconds = source.vcpu_seconds();
    out.help(
        "podvm_vcpu_seconds_total",
        "counter",
        "CPU time of each vCPU thread (guest and exits)",
    );
    for (i, s) in seconds.iter().enumerate() {
        out.sample("podvm_vcpu_seconds_total", &[("vcpu", &i.to_string())], *s);
    }
    out.help(
        "podvm_vcpu_exits_total",
        "counter",
        "vCPU exits handled by podvm, by kind",
    );
    for (i, exits) in source.vcpu_exits().iter().enumerate() {
        for (kind, n) in exits {
            out.sample(
                "podvm_vcpu_exits_total",
                &[("vcpu", &i.to_string()), ("kind", kind)],
                *n as f64,
            );
        }
    }
    let counters = source.counters();
    for (group, label) in [("disks", "disk"), ("nics", "nic")] {
        if let Some(items) = counters[group].as_array() {
            for (i, item) in items.iter().enumerate() {
                let index = i.to_string();
                out.flatten(&format!("podvm_{label}"), item, &[(label, &index)]);
            }
        }
    }
    for group in ["console", "rng", "vm", "api"] {
        if counters[group].is_object() {
            out.flatten(&format!("podvm_{group}"), &counters[group], &[]);
        }
    }
    let migration = source.migration();
    if let Some(s) = migration["state"].as_str() {
        out.help(
            "podvm_migration_state",
            "gauge",
            "1 for the last migration's state",
        );
        for st in ["none", "active", "completed", "failed"] {
            out.sample(
                "podvm_migration_state",
                &[("state", st)],
                f64::from(u8::from(st == s)),
            );
        }
    }
    out.flatten("podvm_migration", &migration, &[]);
    out.text
}

/// Counter-like names among the JSON counters are monotonic: all but these gauges.
const GAUGES: &[&str] = &[
    "clients_attached",
    "backlog_bytes",
    "tcp_flows",
    "udp_flows",
    "vhost_active",
    "flow_limit",
    "paused_s",
    "dirty_pages",
    "dirty_rate_pages_s",
    "bandwidth_mbit_s",
    "expected_downtime_ms",
    "downtime_ms",
    "total_ms",
    "rounds",
    "pages_sent",
    "zero_pages",
    "bytes_sent",
];

#[derive(Default)]
struct Metrics {
    text: String,
    described: std::collections::HashSet<String>,
}

impl Metrics {
    fn help(&mut self, name: &str, kind: &str, help: &str) {
        if self.described.insert(name.to_string()) {
            self.text
                .push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            let body: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            self.text.push_str(&format!("{{{}}}", body.join(",")));
        }
        self.text.push_str(&format!(" {value}\n"));
    }

    fn metric(&mut self, name: &str, kind: &str, help: &str, labels: &[(&str, &str)], value: f64) {
        self.help(name, kind, help);
        self.sample(name, labels, value);
    }

    /// Every number under `value` as `prefix_key[_key...]`, counters with `_total`.
    fn flatten(&mut self, prefix: &str, value: &Value, labels: &[(&str, &str)]) {
        let Some(map) = value.as_object() else {
            return;
        };
        for (key, v) in map {
            let name = format!("{prefix}_{}", key.replace('-', "_"));
            match v {
                Value::Object(_) => self.flatten(&name, v, labels),
                Value::Number(n) if key != "index" => {
                    let gauge =
                        GAUGES.contains(&key.as_str()) || prefix.starts_with("podvm_migration");
                    let (name, kind) = if gauge {
                        (name, "gauge")
                    } else {
                        (format!("{name}_total"), "counter")
                    };
                    self.help(&name, kind, &format!("{key} (podvm api counters)"));
                    self.sample(&name, labels, n.as_f64().unwrap_or(0.0));
                }
                _ => {}
            }
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Fake;

    impl StatusSource for Fake {
        fn state(&self) -> &'static str {
            "paused"
        }
        fn counters(&self) -> Value {
            json!({
                "disks": [{"index": 0, "path": "/d", "read_bytes": 4096, "read_requests": 1}],
                "nics": [{"rx_frames": 3, "nat": {"tcp_flows": 2, "tcp_opened": 7}}],
                "console": {"clients_attached": 1, "clients_connected": 3, "output_bytes": 10},
                "vm": {"pauses": 1, "paused_s": 0.5},
                "api": {"requests": 4},
            })
        }
        fn migration(&self) -> Value {
            json!({"state": "none", "rounds": 0, "downtime_phases_ms": {"pause": 0.0}})
        }
        fn uptime(&self) -> (f64, f64) {
            (12.5, 0.5)
        }
        fn vcpu_seconds(&self) -> Vec<f64> {
            vec![1.25, 0.75]
        }
        fn vcpu_exits(&self) -> Vec<Vec<(&'static str, u64)>> {
            vec![vec![("io", 5), ("mmio", 6)], vec![("io", 1), ("mmio", 0)]]
        }
    }

    #[test]
    fn status_metrics_are_prometheus_text() {
        let heartbeat = Heartbeat::default();
        let text = prometheus(&Fake, &heartbeat);
        for line in [
            "podvm_vm_state{state=\"paused\"} 1",
            "podvm_vm_state{state=\"running\"} 0",
            "podvm_vm_uptime_seconds 12.5",
            "podvm_vcpu_seconds_total{vcpu=\"1\"} 0.75",
            "podvm_vcpu_exits_total{vcpu=\"0\",kind=\"mmio\"} 6",
            "podvm_disk_read_bytes_total{disk=\"0\"} 4096",
            "podvm_nic_rx_frames_total{nic=\"0\"} 3",
            "podvm_nic_nat_tcp_flows{nic=\"0\"} 2",
            "podvm_nic_nat_tcp_opened_total{nic=\"0\"} 7",
            "podvm_console_clients_attached 1",
            "podvm_console_clients_connected_total 3",
            "podvm_console_output_bytes_total 10",
            "podvm_api_requests_total 4",
            "podvm_migration_state{state=\"none\"} 1",
            "podvm_migration_downtime_phases_ms_pause 0",
            "podvm_event_loop_longest_silence_seconds 0",
            "# TYPE podvm_disk_read_bytes_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        // Each metric is described once, and every sample line parses as name{labels} value.
        let mut types = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(
                    types.insert(rest.split(' ').next().unwrap().to_string()),
                    "{line}"
                );
            } else if !line.starts_with('#') {
                let value = line.rsplit(' ').next().unwrap();
                assert!(value.parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    /// A status server on a loopback port, answering for [`Fake`].
    fn server(client_timeout: Duration) -> (StatusThread, SocketAddr) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let thread = StatusThread::spawn_with(
            Some(listener),
            None,
            Arc::new(Fake),
            Arc::new(Heartbeat::default()),
            client_timeout,
        )
        .unwrap();
        (thread, addr)
    }

    /// `GET path` on a new connection; the whole answer. A server that never answers
    /// fails the test after a minute instead of hanging it.
    fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: podvm\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .expect("the status server answers");
        answer
    }

    #[test]
    fn status_probe_is_answered_while_idle_clients_hold_connections() {
        // Clients have ten minutes each: a server that serves one at a time answers the
        // probe only after the idle ones gave up, long after `get` does.
        let (thread, addr) = server(Duration::from_secs(600));
        let idle: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let answer = get(addr, "/healthz");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // The idle clients are still being waited for, not answered or closed.
        for s in &idle {
            s.set_nonblocking(true).unwrap();
            let e = (&*s).read(&mut [0u8; 16]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
        thread.stop();
    }

    #[test]
    fn status_clients_beyond_the_limit_close_the_oldest() {
        let (thread, addr) = server(Duration::from_secs(600));
        let idle: Vec<TcpStream> = (0..MAX_CLIENTS + 4)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let answer = get(addr, "/readyz");
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}"); // Fake is paused
                                                                 // The probe and the last MAX_CLIENTS - 1 idle ones fit; the first five were closed
                                                                 // unanswered.
        for s in &idle[..5] {
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            assert_eq!((&*s).read(&mut [0u8; 16]).unwrap(), 0);
        }
        thread.stop();
    }

    #[test]
    fn status_client_without_a_complete_request_gets_408_at_its_deadline() {
        let (thread, addr) = server(Duration::from_millis(100));
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        thread.stop();
    }

    #[test]
    fn status_oversized_request_head_is_refused() {
        let (thread, addr) = server(Duration::from_secs(600));
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let head = format!(
            "GET /healthz HTTP/1.1\r\nX: {}\r\n",
            "a".repeat(http::MAX_HEAD)
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
        thread.stop();
    }

    #[test]
    fn status_heartbeat_keeps_the_longest_silence() {
        let h = Heartbeat::default();
        // Setup before the first beat is not a silence of the loop.
        h.beat_at(5, 100);
        assert_eq!(h.longest_silence(), Duration::ZERO);
        h.beat_at(35, 2_100);
        h.beat_at(36, 2_150);
        // The longest gap, with the CPU time used during it, kept after a shorter gap.
        assert_eq!(h.longest_silence(), Duration::from_millis(30));
        assert_eq!(h.longest_silence_cpu(), Duration::from_micros(2_000));
        h.beat_at(136, 2_200);
        assert_eq!(h.longest_silence(), Duration::from_millis(100));
        assert_eq!(h.longest_silence_cpu(), Duration::from_micros(50));
    }

    #[test]
    fn status_heartbeat_measures_silence() {
        let h = Heartbeat::default();
        h.beat_at(1_000, 0);
        assert_eq!(h.silence_at(1_000), Duration::ZERO);
        assert_eq!(h.silence_at(4_500), Duration::from_millis(3_500));
        h.beat_at(4_600, 0);
        assert_eq!(h.silence_at(4_700), Duration::from_millis(100));
        // The real clock: right after a beat, the silence is what has passed since, which
        // cannot exceed the time since the heartbeat was made.
        let made = std::time::Instant::now();
        let h = Heartbeat::default();
        h.beat();
        assert!(h.silence() <= made.elapsed());
    }
}
