//! Live migration: pre-copy of guest memory with dirty-page logging, then a short pause in
//! which the last pages and all device and vCPU state move, then the handover.
//!
//! The source ([`Migrator::start`], from the API's `migrate`) connects to a destination
//! podvm started with `--incoming ADDR` and the same devices ([`Migrator::receive`]):
//!
//! 1. header and [`state::Shape`]: a destination built differently refuses at once;
//! 2. dirty logging on, every page once (all-zero pages as compact runs), then rounds of the
//!    pages written meanwhile, until what is left would take no longer than the downtime
//!    target at the bandwidth measured so far (or the time limit passes: the source gives up
//!    and runs on);
//! 3. pause: the vCPUs park, the virtio devices finish their requests in flight and stop,
//!    disks are flushed; the last dirty pages, then [`state::VmState`], then `End`;
//! 4. the destination restores everything and answers `Ready`, or `Error`;
//! 5. on `Ready` the source is committed: it sends `Go` and ends ("migrated"); the
//!    destination runs the guest only once it has the `Go`.
//!
//! Until step 5 any failure (a refused or corrupted stream, a destination that dies, a
//! network cut, a timeout) leaves the source exactly as it was: devices thawed, vCPUs
//! resumed, dirty logging off. The disks are written by one side only: the source stops
//! writing before step 3 ends, the destination starts after the `Go`.

pub mod memory;
pub mod state;
pub mod stream;
pub mod tls;

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use devices::exit::{ExitReason, ExitRequest};
use devices::legacy::Serial;
use devices::virtio::block::Block;
use devices::virtio::mmio::MmioTransport;
use kvm_ioctls::VmFd;
use serde::Serialize;

use self::state::{Shape, StateError, VmState};
use self::stream::{Kind, StreamError};
use crate::memory::GuestMemory;
use crate::vcpu::control::VcpuControl;
use crate::vcpu::Vcpu;

/// Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for MigrationAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("tcp", hostport)) if hostport.rsplit_once(':').is_some_and(|(h, p)| {
                !h.is_empty() && p.parse::<u16>().is_ok()
            }) =>
            {
                Ok(Self::Tcp(hostport.to_string()))
            }
            Some(("unix", path)) if !path.is_empty() => Ok(Self::Unix(path.into())),
            _ => Err(format!(
                "migration address {s:?}: use tcp:HOST:PORT (for example tcp:10.0.0.5:4444) or unix:PATH"
            )),
        }
    }
}

impl std::fmt::Display for MigrationAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "tcp:{a}"),
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// How migrations of this VM go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationConfig {
    /// The longest pause the source aims for.
    pub downtime: Duration,
    /// After this long without converging, the source gives up and runs on.
    pub timeout: Duration,
    /// Plaintext migration traffic was asked for explicitly.
    pub insecure: bool,
    /// Mutual TLS for migration traffic.
    pub tls: Option<tls::TlsFiles>,
    /// The VM's identity (a VMI's UID): a source sends it, and a destination given one
    /// takes only a source that carries the same, so a source meant for another VM, or a
    /// peer that merely has a certificate from the same CA, cannot push its guest in.
    pub vm_id: Option<String>,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        Self {
            downtime: Duration::from_millis(50),
            timeout: Duration::from_secs(300),
            insecure: false,
            tls: None,
            vm_id: None,
        }
    }
}

/// A migration failed; the source runs on.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: MigrationAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: MigrationAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("migration stream: {0}")]
    Stream(#[from] StreamError),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("this VM cannot take the source's: {0}")]
    Shape(String),
    #[error("bad migration stream: {0}")]
    Invalid(String),
    #[error("{0}")]
    State(#[from] StateError),
    #[error("KVM refused dirty page logging: {0}")]
    DirtyLog(#[source] kvm_ioctls::Error),
    #[error("cannot pause the VM: {0}")]
    Pause(String),
    #[error("the dirty rate did not converge: after {elapsed_s} s (--migration-timeout {timeout_s}) and {rounds} rounds after the first pass, {left_kib} KiB are still dirty, {expected_ms} ms to send at the {mbit_s} Mbit/s measured, against a downtime target of {target_ms} ms; the guest writes memory faster than it can be sent; the VM runs on here")]
    NotConverging {
        elapsed_s: u64,
        timeout_s: u64,
        rounds: u64,
        left_kib: u64,
        expected_ms: u64,
        mbit_s: u64,
        target_ms: u64,
    },
    #[error("virtio device {0} did not take its queues back from vhost-net within {1} s (vhost-net's writes into guest memory would escape the dirty log)")]
    Vhost(usize, u64),
    #[error("a migration is already under way")]
    Busy,
    #[error("migration traffic carries all guest memory: start both podvms with --migration-tls-cert, --migration-tls-key and --migration-tls-ca (mutual TLS), or with --migration-insecure to migrate in plaintext on a trusted link")]
    Tls,
    #[error("no migration source connected to {addr} within --migration-timeout")]
    NoSource { addr: MigrationAddr },
    #[error("TLS with {addr} failed: {source}")]
    Handshake {
        addr: MigrationAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM is not running")]
    NotRunning,
}

impl MigrationError {
    /// Whether a destination may drop the connection that failed so and wait for another:
    /// what a stranger can cause (a failed handshake, a stream that is not a migration, a
    /// source of another VM), not a failure of this podvm.
    fn is_refusable(&self) -> bool {
        matches!(
            self,
            Self::Handshake { .. }
                | Self::Stream(_)
                | Self::Invalid(_)
                | Self::Shape(_)
                | Self::Refused(_)
        )
    }
}

/// What the API reports about the last migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationStatus {
    /// "none", "active", "completed" or "failed".
    pub state: &'static str,
    pub address: Option<String>,
    /// Rounds of dirty pages after the first full pass.
    pub rounds: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub bytes_sent: u64,
    /// Pages found dirty by the last round.
    pub dirty_pages: u64,
    /// Pages the guest dirtied per second during the last round.
    pub dirty_rate_pages_s: u64,
    pub bandwidth_mbit_s: f64,
    /// What the pause was expected to take when it started.
    pub expected_downtime_ms: f64,
    /// From the pause to the destination's go-ahead.
    pub downtime_ms: f64,
    /// Where the downtime went.
    pub downtime_phases_ms: DowntimePhases,
    pub total_ms: f64,
    pub error: Option<String>,
}

/// The parts of the downtime, in milliseconds, in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DowntimePhases {
    /// Stopping the vCPUs and freezing the devices.
    pub pause: f64,
    /// Flushing the disks.
    pub disks: f64,
    /// Collecting the last dirty pages.
    pub harvest: f64,
    /// Saving the vCPUs' and devices' state.
    pub save: f64,
    /// Sending the last pages and the state.
    pub send: f64,
    /// The destination restoring everything and answering `Ready` (until the go-ahead).
    pub destination: f64,
}

impl std::fmt::Display for DowntimePhases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pause {:.1} + disks {:.1} + harvest {:.1} + save {:.1} + send {:.1} + destination {:.1}",
            self.pause, self.disks, self.harvest, self.save, self.send, self.destination
        )
    }
}

fn ms_since(t: &mut Instant) -> f64 {
    let now = Instant::now();
    let ms = now.duration_since(*t).as_secs_f64() * 1e3;
    *t = now;
    ms
}

/// A migration connection.
pub trait Connection: Read + Write + Send {}
impl<T: Read + Write + Send> Connection for T {}

/// Everything a migration reads or restores, shared with the running VM.
pub struct Migrator {
    pub vm: Arc<VmFd>,
    pub mem: GuestMemory,
    pub vcpus: Arc<VcpuControl>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub serial: Arc<Mutex<Serial>>,
    pub blocks: Vec<Arc<Mutex<Block>>>,
    pub exit: ExitRequest,
    pub shape: Shape,
    /// The MSRs KVM saves and restores.
    pub msr_index: Vec<u32>,
    pub config: MigrationConfig,
    /// Loaded from `config.tls`; `None` means plaintext (only with `config.insecure`).
    pub tls: Option<tls::Tls>,
    status: Mutex<MigrationStatus>,
    active: AtomicBool,
    /// The source has paused the VM for the handover.
    handover: AtomicBool,
    /// Hands a destination to the migration thread ([`Migrator::spawn_thread`]).
    jobs: Mutex<Option<mpsc::Sender<MigrationAddr>>>,
}

/// How long the source waits for the destination's answer once it sent everything, and
/// the destination for the go.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The share of the downtime target the last pages may take without trying another round.
const HANDOVER_PAGE_SHARE: f64 = 0.2;
/// At most this many more rounds once the rest fits the downtime target.
const EXTRA_ROUNDS: u32 = 3;
/// How long devices get to take their queues back from vhost-net.
const HOLD_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits until the destination has stored everything sent so far: what the socket buffers
/// took is not sent yet (on loopback TCP they hold megabytes), and a pause decided on
/// that would wait for it.
fn sync(w: &mut BufWriter<Box<dyn Connection>>) -> Result<(), MigrationError> {
    stream::write_section(w, Kind::Sync, &[])
        .and_then(|()| w.flush())
        .map_err(|e| MigrationError::Stream(StreamError::Io(e)))?;
    expect_answer(w.get_mut(), Kind::Synced)
}

/// Reads the destination's answer: `want`, or its refusal (an `Error` section).
fn expect_answer(mut conn: &mut dyn Connection, want: Kind) -> Result<(), MigrationError> {
    let mut payload = Vec::new();
    match stream::read_section(&mut conn, &mut payload)? {
        kind if kind == want => Ok(()),
        Kind::Error => Err(MigrationError::Refused(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        other => Err(MigrationError::Invalid(format!(
            "the destination answered {other:?} where {want:?} was due"
        ))),
    }
}

/// What a vCPU thread saved of its vCPU.
type SavedVcpu = Result<state::VcpuState, String>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Migrator {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: Arc<VmFd>,
        mem: GuestMemory,
        vcpus: Arc<VcpuControl>,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        serial: Arc<Mutex<Serial>>,
        blocks: Vec<Arc<Mutex<Block>>>,
        exit: ExitRequest,
        shape: Shape,
        msr_index: Vec<u32>,
        config: MigrationConfig,
        tls: Option<tls::Tls>,
    ) -> Self {
        Self {
            vm,
            mem,
            vcpus,
            transports,
            serial,
            blocks,
            exit,
            shape,
            msr_index,
            config,
            tls,
            status: Mutex::new(MigrationStatus {
                state: "none",
                ..Default::default()
            }),
            active: AtomicBool::new(false),
            handover: AtomicBool::new(false),
            jobs: Mutex::new(None),
        }
    }

    /// Starts the thread outgoing migrations run on, idle until [`Migrator::start`] hands
    /// it a destination. It is started with the VM, by the main thread, so that it gets
    /// only its own seccomp filter (a thread inherits the filter of the thread that
    /// creates it, and the event loop, where `migrate` arrives, has another). It lives as
    /// long as the process and keeps the migrator alive: the devices the migrator holds are
    /// never dropped on this thread, whose filter does not allow what their teardown does
    /// (the process's exit closes everything).
    pub fn spawn_thread(self: &Arc<Self>) -> std::io::Result<()> {
        let (tx, rx) = mpsc::channel::<MigrationAddr>();
        let me = self.clone();
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || {
                podvm_seccomp::install_or_exit(podvm_seccomp::ThreadKind::Migration);
                while let Ok(addr) = rx.recv() {
                    me.run_outgoing(addr);
                }
            })?;
        *lock(&self.jobs) = Some(tx);
        Ok(())
    }

    /// One outgoing migration, on the migration thread.
    fn run_outgoing(&self, addr: MigrationAddr) {
        let started = Instant::now();
        let result = self.send(&addr);
        let mut status = lock(&self.status);
        status.total_ms = started.elapsed().as_secs_f64() * 1e3;
        match result {
            Ok(()) => {
                status.state = "completed";
                tracing::info!(
                    to = %addr,
                    total_ms = status.total_ms as u64,
                    downtime_ms = format_args!("{:.1}", status.downtime_ms),
                    rounds = status.rounds,
                    phases = %status.downtime_phases_ms,
                    "migrated"
                );
                drop(status);
                self.exit.request(ExitReason::Migrated);
            }
            Err(e) => {
                tracing::warn!(to = %addr, error = %e, "migration failed; the VM runs on here");
                status.state = "failed";
                status.error = Some(e.to_string());
            }
        }
        self.active.store(false, Ordering::SeqCst);
    }

    /// Whether the VM is paused for a migration's handover (an API resume must wait).
    pub fn handing_over(&self) -> bool {
        self.handover.load(Ordering::SeqCst)
    }

    /// The last migration's progress and figures.
    pub fn status(&self) -> MigrationStatus {
        lock(&self.status).clone()
    }

    /// Starts migrating the running VM to `addr` on the migration thread.
    pub fn start(self: &Arc<Self>, addr: MigrationAddr) -> Result<(), MigrationError> {
        if self.exit.reason().is_some() {
            return Err(MigrationError::NotRunning);
        }
        if self.tls.is_none() && !self.config.insecure {
            return Err(MigrationError::Tls);
        }
        if self.active.swap(true, Ordering::SeqCst) {
            return Err(MigrationError::Busy);
        }
        *lock(&self.status) = MigrationStatus {
            state: "active",
            address: Some(addr.to_string()),
            ..Default::default()
        };
        let sent = lock(&self.jobs)
            .as_ref()
            .is_some_and(|jobs| jobs.send(addr).is_ok());
        if !sent {
            self.active.store(false, Ordering::SeqCst);
            let mut status = lock(&self.status);
            status.state = "failed";
            status.error = Some("the migration thread is not running".into());
        }
        Ok(())
    }

    /// A connection to the destination, and its TLS session's binding (`None` in plaintext).
    fn connect(
        &self,
        addr: &MigrationAddr,
    ) -> Result<(Box<dyn Connection>, Option<tls::Binding>), MigrationError> {
        let err = |source| MigrationError::Connect {
            addr: addr.clone(),
            source,
        };
        let handshake = |source| MigrationError::Handshake {
            addr: addr.clone(),
            source,
        };
        Ok(match addr {
            MigrationAddr::Tcp(hostport) => {
                let target = match hostport.parse::<std::net::SocketAddr>() {
                    Ok(target) => target,
                    // Resolving a name reads files and loads resolver modules, which the
                    // migration thread's seccomp filter refuses (it would end podvm).
                    Err(_) if podvm_seccomp::mode() != podvm_seccomp::Mode::Off => {
                        return Err(err(std::io::Error::new(
                            std::io::ErrorKind::InvalidInput,
                            "podvm resolves no host names under its seccomp filters; give the destination's IP address (tcp:10.0.0.6:4444, tcp:[fd00::6]:4444)",
                        )));
                    }
                    Err(_) => hostport
                        .to_socket_addrs()
                        .map_err(err)?
                        .next()
                        .ok_or_else(|| err(std::io::ErrorKind::NotFound.into()))?,
                };
                let s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(err)?;
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(HANDOVER_TIMEOUT)).map_err(err)?;
                s.set_write_timeout(Some(HANDOVER_TIMEOUT)).map_err(err)?;
                let host = hostport.rsplit_once(':').map_or("", |(h, _)| h);
                match &self.tls {
                    Some(tls) => tls
                        .connect(s, host)
                        .map(|(c, b)| (c, Some(b)))
                        .map_err(handshake)?,
                    None => (Box::new(s), None),
                }
            }
            MigrationAddr::Unix(path) => {
                let s = UnixStream::connect(path).map_err(err)?;
                s.set_read_timeout(Some(HANDOVER_TIMEOUT)).map_err(err)?;
                s.set_write_timeout(Some(HANDOVER_TIMEOUT)).map_err(err)?;
                match &self.tls {
                    Some(tls) => tls
                        .connect(s, "localhost")
                        .map(|(c, b)| (c, Some(b)))
                        .map_err(handshake)?,
                    None => (Box::new(s), None),
                }
            }
        })
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut lock(&self.status));
    }

    /// The source side; on error everything is as before the migration.
    fn send(&self, addr: &MigrationAddr) -> Result<(), MigrationError> {
        let (conn, binding) = self.connect(addr)?;
        let mut w = BufWriter::with_capacity(1 << 20, conn);
        let io = |e: std::io::Error| MigrationError::Stream(StreamError::Io(e));
        stream::write_header(&mut w).map_err(io)?;
        let mut shape = self.shape.clone();
        shape.proof = self
            .tls
            .as_ref()
            .zip(binding)
            .and_then(|(t, b)| t.prove(&b));
        let shape = serde_json::to_vec(&shape).expect("the shape serializes");
        stream::write_section(&mut w, Kind::Shape, &[&shape]).map_err(io)?;
        w.flush().map_err(io)?;
        // The destination checks the header and shape before any memory moves.
        expect_answer(w.get_mut(), Kind::Accept)?;

        let result = self.hold_devices().and_then(|()| {
            memory::set_dirty_logging(&self.vm, &self.mem, true)
                .map_err(MigrationError::DirtyLog)?;
            let result = self.precopy_and_handover(&mut w);
            if result.is_err() {
                if let Err(e) = memory::set_dirty_logging(&self.vm, &self.mem, false) {
                    tracing::warn!(error = %e, "cannot turn dirty page logging off");
                }
            }
            result
        });
        if result.is_err() {
            for t in &self.transports {
                lock(t).hold_for_migration(false);
            }
        }
        result
    }

    /// Has every device stop anything outside podvm writing guest memory (vhost-net), and
    /// waits until they have.
    fn hold_devices(&self) -> Result<(), MigrationError> {
        for t in &self.transports {
            lock(t).hold_for_migration(true);
        }
        let deadline = Instant::now() + HOLD_TIMEOUT;
        for (i, t) in self.transports.iter().enumerate() {
            while !lock(t).held_for_migration() {
                if Instant::now() > deadline {
                    return Err(MigrationError::Vhost(i, HOLD_TIMEOUT.as_secs()));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    fn precopy_and_handover(
        &self,
        w: &mut BufWriter<Box<dyn Connection>>,
    ) -> Result<(), MigrationError> {
        let io = |e: std::io::Error| MigrationError::Stream(StreamError::Io(e));
        let started = Instant::now();
        let downtime_s = self.config.downtime.as_secs_f64();

        // The first pass: everything.
        let t = Instant::now();
        let sent = memory::send_pages(w, &self.mem, &memory::all_pages(&self.mem)).map_err(io)?;
        sync(w)?;
        let mut bytes_per_s = sent.bytes as f64 / t.elapsed().as_secs_f64().max(1e-6);
        self.update(|s| {
            s.pages_sent += sent.pages;
            s.zero_pages += sent.zero_pages;
            s.bytes_sent += sent.bytes;
            s.bandwidth_mbit_s = bytes_per_s * 8.0 / 1e6;
        });

        // Rounds of what was written meanwhile, until the rest fits the downtime.
        let mut last = Instant::now();
        let mut rounds = 0u64;
        let mut previous = u64::MAX;
        let mut rounds_fitting = 0u32;
        loop {
            let dirty = memory::harvest(&self.vm, &self.mem).map_err(MigrationError::DirtyLog)?;
            let n = memory::count(&dirty);
            let since = last.elapsed().as_secs_f64().max(1e-6);
            let expected = (n as f64 * memory::PAGE as f64) / bytes_per_s;
            self.update(|s| {
                s.dirty_pages = n;
                s.dirty_rate_pages_s = (n as f64 / since) as u64;
                s.expected_downtime_ms = expected * 1e3;
            });
            if expected <= downtime_s {
                // The pages are only part of the pause (the vCPUs stop, the state is saved,
                // sent and restored): while rounds still shrink the rest quickly, a few
                // more are cheaper than sending it paused.
                let small = expected <= downtime_s * HANDOVER_PAGE_SHARE;
                let shrinking = n.saturating_mul(4) < previous.saturating_mul(3);
                if small || !shrinking || rounds_fitting >= EXTRA_ROUNDS {
                    return self.handover(w, dirty);
                }
                rounds_fitting += 1;
            }
            previous = n;
            if started.elapsed() > self.config.timeout {
                return Err(MigrationError::NotConverging {
                    elapsed_s: started.elapsed().as_secs(),
                    timeout_s: self.config.timeout.as_secs(),
                    rounds,
                    left_kib: (n * memory::PAGE as u64) >> 10,
                    expected_ms: (expected * 1e3) as u64,
                    mbit_s: (bytes_per_s * 8.0 / 1e6) as u64,
                    target_ms: self.config.downtime.as_millis() as u64,
                });
            }
            last = Instant::now();
            let sent = memory::send_pages(w, &self.mem, &dirty).map_err(io)?;
            sync(w)?;
            let took = last.elapsed().as_secs_f64().max(1e-6);
            if sent.bytes > (4 << 20) {
                // Big rounds measure the link; small ones mostly measure their own latency.
                bytes_per_s = sent.bytes as f64 / took;
            }
            rounds += 1;
            self.update(|s| {
                s.rounds = rounds;
                s.pages_sent += sent.pages;
                s.zero_pages += sent.zero_pages;
                s.bytes_sent += sent.bytes;
                s.bandwidth_mbit_s = bytes_per_s * 8.0 / 1e6;
            });
        }
    }

    /// Pauses the VM, sends the rest and hands over; undoes the pause on failure.
    fn handover(
        &self,
        w: &mut BufWriter<Box<dyn Connection>>,
        mut dirty: memory::DirtyPages,
    ) -> Result<(), MigrationError> {
        let paused_at = Instant::now();
        // A VM the user paused stays paused if the migration fails.
        let was_running = self.vcpus.run_state() == crate::vcpu::control::RunState::Running;
        self.handover.store(true, Ordering::SeqCst);
        if let Err(e) = self.vcpus.pause(&self.vm) {
            self.handover.store(false, Ordering::SeqCst);
            return Err(MigrationError::Pause(e.to_string()));
        }
        for t in &self.transports {
            lock(t).freeze();
        }
        let result = self.final_pass(w, &mut dirty, paused_at);
        if result.is_err() {
            for t in &self.transports {
                lock(t).thaw();
            }
            if was_running {
                self.vcpus.resume(&self.vm);
            }
            self.handover.store(false, Ordering::SeqCst);
        }
        result
    }

    fn final_pass(
        &self,
        w: &mut BufWriter<Box<dyn Connection>>,
        dirty: &mut memory::DirtyPages,
        paused_at: Instant,
    ) -> Result<(), MigrationError> {
        let io = |e: std::io::Error| MigrationError::Stream(StreamError::Io(e));
        let mut phases = DowntimePhases::default();
        let mut t = paused_at;
        phases.pause = ms_since(&mut t);
        for block in &self.blocks {
            let mut block = lock(block);
            if let Err(e) = block.flush_on_exit() {
                return Err(MigrationError::Invalid(format!(
                    "flushing disk {} failed: {e}",
                    block.disk().path().display()
                )));
            }
        }
        phases.disks = ms_since(&mut t);
        // What was written since the last harvest, the devices' last answers included.
        let more = memory::harvest(&self.vm, &self.mem).map_err(MigrationError::DirtyLog)?;
        for (a, b) in dirty.iter_mut().zip(more) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= y;
            }
        }
        phases.harvest = ms_since(&mut t);
        let state = self.save_state()?;
        phases.save = ms_since(&mut t);
        let sent = memory::send_pages(w, &self.mem, dirty).map_err(io)?;
        let encoded = state.encode();
        stream::write_section(w, Kind::State, &[&encoded]).map_err(io)?;
        stream::write_section(w, Kind::End, &[]).map_err(io)?;
        w.flush().map_err(io)?;
        phases.send = ms_since(&mut t);
        self.update(|s| {
            s.pages_sent += sent.pages;
            s.zero_pages += sent.zero_pages;
            s.bytes_sent += sent.bytes + encoded.len() as u64;
        });

        let conn = w.get_mut();
        expect_answer(conn, Kind::Ready)?;
        // Committed: from here on the guest is the destination's, and so are the disks.
        for block in &self.blocks {
            lock(block).disk().unlock();
        }
        if let Err(e) = stream::write_section(conn, Kind::Go, &[]).and_then(|()| conn.flush()) {
            tracing::error!(error = %e, "the go to the destination may not have arrived; the guest stays stopped here (it must not run twice)");
        }
        phases.destination = ms_since(&mut t);
        let downtime = paused_at.elapsed().as_secs_f64() * 1e3;
        self.update(|s| {
            s.downtime_ms = downtime;
            s.downtime_phases_ms = phases;
        });
        Ok(())
    }

    fn save_state(&self) -> Result<VmState, MigrationError> {
        let saved: Arc<Mutex<Vec<Option<SavedVcpu>>>> =
            Arc::new(Mutex::new((0..self.shape.vcpus).map(|_| None).collect()));
        let msrs = Arc::new(self.msr_index.clone());
        let slots = saved.clone();
        self.vcpus
            .run_parked(Arc::new(move |id, fd| {
                let s = state::save_vcpu(fd, &msrs).map_err(|e| e.to_string());
                if let Some(slot) = lock(&slots).get_mut(usize::from(id)) {
                    *slot = Some(s);
                }
            }))
            .map_err(|e| MigrationError::Pause(e.to_string()))?;
        let vcpus = std::mem::take(&mut *lock(&saved))
            .into_iter()
            .enumerate()
            .map(|(id, s)| match s {
                Some(Ok(s)) => Ok(s),
                Some(Err(e)) => Err(MigrationError::Invalid(format!("vCPU {id}: {e}"))),
                None => Err(MigrationError::Invalid(format!("vCPU {id} saved nothing"))),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let clock = self
            .vcpus
            .paused_clock()
            .map_or_else(|| self.vm.get_clock(), Ok)
            .map_err(|source| StateError::Kvm {
                what: "read the KVM clock",
                source,
            })?;
        Ok(VmState {
            vcpus,
            machine: state::save_machine(&self.vm, clock)?,
            serial: lock(&self.serial).state(),
            virtio: self.transports.iter().map(|t| lock(t).state()).collect(),
        })
    }

    /// The destination side: takes one migration from `listener` into this VM, whose vCPUs
    /// (`vcpus`) have not run. Returns once the source has handed over (run the VM then);
    /// on error the guest must not run.
    ///
    /// A connection that fails before the guest's memory is touched (a port scan, a failed
    /// TLS handshake, garbage, a source of another shape or VM) is dropped, logged and
    /// counted, and the destination waits on for the real source, until
    /// `--migration-timeout` has passed without one.
    pub fn receive(
        &self,
        vcpus: &[Vcpu],
        listener: IncomingListener,
    ) -> Result<(), MigrationError> {
        let deadline = Instant::now() + self.config.timeout;
        let mut refused = 0u64;
        let mut refusals = devices::log_limit::LogLimit::default();
        loop {
            let outcome = listener
                .accept(self.tls.as_ref(), deadline)
                .map_err(|e| (e, false))
                .and_then(|(conn, binding)| {
                    tracing::info!(from = %listener.addr, "migration connection accepted");
                    self.receive_from(vcpus, conn, binding)
                });
            match outcome {
                Ok(()) => {
                    if refused > 0 {
                        tracing::info!(
                            dropped = refused,
                            "the migration came after connections that were dropped"
                        );
                    }
                    return Ok(());
                }
                Err((e, false)) if e.is_refusable() => {
                    refused += 1;
                    if let Some(suppressed) = refusals.allow() {
                        tracing::warn!(
                            error = %e,
                            refused,
                            suppressed,
                            "migration connection dropped before it touched the guest; waiting for the source"
                        );
                    }
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// One migration over `conn`. The error says whether guest memory was written (then the
    /// destination cannot wait for another source).
    fn receive_from(
        &self,
        vcpus: &[Vcpu],
        conn: Box<dyn Connection>,
        binding: Option<tls::Binding>,
    ) -> Result<(), (MigrationError, bool)> {
        let mut r = BufReader::with_capacity(1 << 20, conn);
        let mut touched = false;
        let result = self.receive_stream(vcpus, &mut r, binding, &mut touched);
        let conn = r.get_mut();
        self.finish_receive(conn, result).map_err(|e| (e, touched))
    }

    /// Answers the stream's end: Ready and the source's Go, or the error.
    fn finish_receive(
        &self,
        conn: &mut Box<dyn Connection>,
        result: Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        match result {
            Ok(()) => {
                stream::write_section(conn, Kind::Ready, &[])
                    .and_then(|()| conn.flush())
                    .map_err(|e| MigrationError::Stream(StreamError::Io(e)))?;
                let mut payload = Vec::new();
                match stream::read_section(conn, &mut payload)? {
                    Kind::Go => {
                        for block in &self.blocks {
                            lock(block).disk().lock(HANDOVER_TIMEOUT).map_err(|e| {
                                MigrationError::Invalid(format!("after the handover: {e}"))
                            })?;
                        }
                        for t in &self.transports {
                            lock(t).announce();
                        }
                        Ok(())
                    }
                    other => Err(MigrationError::Invalid(format!(
                        "the source sent {other:?} instead of the go"
                    ))),
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = stream::write_section(conn, Kind::Error, &[msg.as_bytes()])
                    .and_then(|()| conn.flush());
                Err(e)
            }
        }
    }

    fn receive_stream(
        &self,
        vcpus: &[Vcpu],
        r: &mut BufReader<Box<dyn Connection>>,
        binding: Option<tls::Binding>,
        touched: &mut bool,
    ) -> Result<(), MigrationError> {
        stream::read_header(r)?;
        let mut payload = Vec::new();
        match stream::read_section(r, &mut payload)? {
            Kind::Shape => {
                let theirs: Shape = serde_json::from_slice(&payload)
                    .map_err(|e| MigrationError::Invalid(format!("shape: {e}")))?;
                if let Some(why) = self.shape.mismatch(&theirs) {
                    return Err(MigrationError::Shape(why));
                }
                if let (Some(tls), Some(binding)) = (&self.tls, binding) {
                    tls.verify(&binding, theirs.proof.as_deref())
                        .map_err(MigrationError::Shape)?;
                }
                let conn = r.get_mut();
                stream::write_section(conn, Kind::Accept, &[])
                    .and_then(|()| conn.flush())
                    .map_err(|e| MigrationError::Stream(StreamError::Io(e)))?;
            }
            other => {
                return Err(MigrationError::Invalid(format!(
                    "the stream starts with {other:?}, not the VM's shape"
                )))
            }
        }
        let mut state: Option<VmState> = None;
        let mut pages = 0u64;
        // Where the destination's part of the pause goes: reading the last pass (from its
        // first section after the last Sync to End), parsing the state, restoring.
        let mut last_pass: Option<Instant> = None;
        let mut parse_ms = 0.0;
        // The source was accepted: from here on the stream writes guest memory.
        *touched = true;
        loop {
            let kind = stream::read_section(r, &mut payload)?;
            last_pass.get_or_insert_with(Instant::now);
            match kind {
                Kind::Pages if state.is_none() => {
                    pages += memory::receive_pages(&self.mem, &payload)
                        .map_err(MigrationError::Invalid)?
                }
                Kind::Zeroes if state.is_none() => {
                    pages += memory::receive_zeroes(&self.mem, &payload)
                        .map_err(MigrationError::Invalid)?
                }
                Kind::State if state.is_none() => {
                    let t = Instant::now();
                    state = Some(VmState::decode(&payload).map_err(MigrationError::Invalid)?);
                    parse_ms = t.elapsed().as_secs_f64() * 1e3;
                }
                Kind::Sync if state.is_none() => {
                    let conn = r.get_mut();
                    stream::write_section(conn, Kind::Synced, &[])
                        .and_then(|()| conn.flush())
                        .map_err(|e| MigrationError::Stream(StreamError::Io(e)))?;
                    last_pass = None;
                }
                Kind::End => break,
                other => {
                    return Err(MigrationError::Invalid(format!(
                        "unexpected {other:?} section"
                    )))
                }
            }
        }
        let state = state.ok_or_else(|| MigrationError::Invalid("no state section".into()))?;
        let last_pass_ms = last_pass.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        self.restore(vcpus, &state)?;
        tracing::info!(
            pages,
            last_pass_ms = format_args!("{last_pass_ms:.1}"),
            state_parse_ms = format_args!("{parse_ms:.1}"),
            restore_ms = format_args!("{:.1}", t.elapsed().as_secs_f64() * 1e3),
            "migration received and restored"
        );
        Ok(())
    }

    fn restore(&self, vcpus: &[Vcpu], s: &VmState) -> Result<(), MigrationError> {
        if s.vcpus.len() != vcpus.len() || s.virtio.len() != self.transports.len() {
            return Err(MigrationError::Invalid(format!(
                "state for {} vCPUs and {} devices, this VM has {} and {}",
                s.vcpus.len(),
                s.virtio.len(),
                vcpus.len(),
                self.transports.len()
            )));
        }
        state::restore_machine(&self.vm, &s.machine)?;
        for (vcpu, state) in vcpus.iter().zip(&s.vcpus) {
            state::restore_vcpu(vcpu.fd(), state)?;
        }
        lock(&self.serial)
            .restore(&s.serial)
            .map_err(MigrationError::Invalid)?;
        for (i, (t, state)) in self.transports.iter().zip(&s.virtio).enumerate() {
            lock(t)
                .restore(state)
                .map_err(|e| MigrationError::Invalid(format!("virtio device {i}: {e}")))?;
        }
        Ok(())
    }
}

/// The destination's listening socket, bound before the VM is built so that a bad address
/// fails first.
pub struct IncomingListener {
    addr: MigrationAddr,
    listener: Listener,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl IncomingListener {
    /// Binds `addr` (a unix socket is created with mode 0600).
    pub fn bind(addr: &MigrationAddr) -> Result<Self, MigrationError> {
        let err = |source| MigrationError::Listen {
            addr: addr.clone(),
            source,
        };
        let listener = match addr {
            MigrationAddr::Tcp(hostport) => {
                Listener::Tcp(TcpListener::bind(hostport.as_str()).map_err(err)?)
            }
            MigrationAddr::Unix(path) => {
                let l = crate::socket::bind_private("--incoming", path)
                    .map_err(|e| err(std::io::Error::other(e.to_string())))?;
                // The destination waits for its one connection.
                l.set_nonblocking(false).map_err(err)?;
                Listener::Unix(l, path.clone())
            }
        };
        Ok(Self {
            addr: addr.clone(),
            listener,
        })
    }

    /// The address bound (with the real port for `tcp:HOST:0`).
    pub fn local_addr(&self) -> String {
        match &self.listener {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| self.addr.to_string(), |a| format!("tcp:{a}")),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// The next connection, TLS-wrapped when `tls` is given; [`MigrationError::NoSource`]
    /// once `deadline` has passed without one.
    fn accept(
        &self,
        tls: Option<&tls::Tls>,
        deadline: Instant,
    ) -> Result<(Box<dyn Connection>, Option<tls::Binding>), MigrationError> {
        let err = |source| MigrationError::Listen {
            addr: self.addr.clone(),
            source,
        };
        let fd = match &self.listener {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(MigrationError::NoSource {
                    addr: self.addr.clone(),
                });
            }
            let mut fds = [libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            }];
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: `fds` is one valid pollfd for the duration of the call, and the
            // listener it names outlives it.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            if n > 0 {
                break;
            }
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err(e));
                }
            }
        }
        let handshake = |source| MigrationError::Handshake {
            addr: self.addr.clone(),
            source,
        };
        Ok(match &self.listener {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(err)?;
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(HANDOVER_TIMEOUT)).map_err(err)?;
                match tls {
                    Some(tls) => tls
                        .accept(s)
                        .map(|(c, b)| (c, Some(b)))
                        .map_err(handshake)?,
                    None => (Box::new(s), None),
                }
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().map_err(err)?;
                s.set_read_timeout(Some(HANDOVER_TIMEOUT)).map_err(err)?;
                match tls {
                    Some(tls) => tls
                        .accept(s)
                        .map(|(c, b)| (c, Some(b)))
                        .map_err(handshake)?,
                    None => (Box::new(s), None),
                }
            }
        })
    }
}

impl Drop for IncomingListener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = &self.listener {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_addresses_parse_or_say_what_is_expected() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<MigrationAddr>(),
            Ok(MigrationAddr::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<MigrationAddr>(),
            Ok(MigrationAddr::Tcp("[::1]:4444".into()))
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<MigrationAddr>(),
            Ok(MigrationAddr::Unix("/run/m.sock".into()))
        );
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
            "udp:h:1",
            "/x",
        ] {
            let e = bad.parse::<MigrationAddr>().unwrap_err();
            assert!(e.contains("tcp:HOST:PORT"), "{bad}: {e}");
        }
    }
}
