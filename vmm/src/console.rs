//! COM1 on a unix socket: many clients see the output, one at a time types, a history ring is
//! replayed to each newcomer, and the whole output can also go to a log file.
//!
//! The guest never waits for a client. Output is written to each client without blocking;
//! what a client cannot take waits in its own bounded backlog, and a client whose backlog
//! overflows is disconnected (and counted). Idle clients are never dropped for being idle.
//!
//! Keyboard rule: the first client holds the keyboard until it leaves; later clients are
//! read-only and are told so in one line. When the holder leaves, the longest-connected
//! remaining client gets the keyboard and is told so.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use devices::legacy::Serial;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::timerfd::TimerFd;

/// History replayed to a new client, by default.
pub const DEFAULT_HISTORY: usize = 64 * 1024;
/// Output a slow client may fall behind by before it is disconnected.
const CLIENT_BACKLOG_MAX: usize = 1 << 20;
const NOTICE_READ_ONLY: &[u8] =
    b"\r\n[podvm] read-only: another client holds the keyboard; you get it when it leaves\r\n";
const NOTICE_KEYBOARD: &[u8] = b"\r\n[podvm] you now hold the keyboard\r\n";

/// How often input waiting for the guest is looked at: what the FIFO could not take is
/// offered again, and the guest's progress in reading the FIFO is checked.
const INPUT_RETRY: Duration = Duration::from_millis(5);
/// Looks ([`INPUT_RETRY`]) without the guest reading a byte of a non-empty FIFO after which
/// its received-data interrupt is raised again (20 ms); doubled after each raise that did not
/// help, up to [`INPUT_KICK_MAX_TICKS`] (1 s), so a guest that stopped reading costs little.
const INPUT_KICK_TICKS: u32 = 4;
const INPUT_KICK_MAX_TICKS: u32 = 200;
/// Most input bytes read from a console client or stdin at once.
pub(crate) const INPUT_CHUNK: usize = 256;

/// Keyboard input on its way into the UART's 64-byte receive FIFO. What the FIFO cannot take
/// waits here, the source (stdin, the socket of the client holding the keyboard) is not read
/// meanwhile, and a timer offers the rest again as the guest drains the FIFO: a paste arrives
/// whole, at the guest's pace, and the typist's side is held back by its own full socket
/// instead of losing what did not fit. At most one read's worth ([`INPUT_CHUNK`]) waits.
///
/// While bytes wait in the FIFO the timer also watches the guest read them: the UART's
/// received-data interrupt is an edge here (a level on the real part), and a guest that
/// missed one would never read the FIFO again; when the guest has read nothing for a while
/// the interrupt is raised again ([`Serial::raise_received_data`]).
pub(crate) struct UartInput {
    serial: Arc<Mutex<Serial>>,
    pending: Vec<u8>,
    retry: TimerFd,
    /// Bytes in the FIFO after the last offer: more (or as many) at the next look means the
    /// guest read nothing in between.
    fifo_after: usize,
    /// Looks in a row without the guest reading, and how many make it raise the interrupt.
    stalled: u32,
    kick_after: u32,
}

impl UartInput {
    pub(crate) fn new(serial: Arc<Mutex<Serial>>) -> Result<Self, vmm_sys_util::errno::Error> {
        Ok(Self {
            serial,
            pending: Vec::new(),
            retry: TimerFd::new()?,
            fifo_after: 0,
            stalled: 0,
            kick_after: INPUT_KICK_TICKS,
        })
    }

    /// Fires when pending input should be offered again ([`UartInput::retry`]).
    pub(crate) fn retry_timer(&self) -> &TimerFd {
        &self.retry
    }

    /// Whether input waits for room in the FIFO (the source must not be read meanwhile).
    pub(crate) fn is_blocked(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Offers `bytes` after what waits already; true when the FIFO took everything.
    /// Otherwise the rest waits, the retry timer is armed, and the caller stops reading its
    /// source until [`UartInput::retry`] says so.
    pub(crate) fn offer(&mut self, bytes: &[u8]) -> bool {
        self.pending.extend_from_slice(bytes);
        self.flush()
    }

    /// On the retry timer: raises the guest's interrupt again if it has read nothing for a
    /// while, and offers what waits again; true when input that waited has now all been
    /// taken (the caller reads its source again).
    pub(crate) fn retry(&mut self) -> bool {
        let _ = self.retry.wait();
        let was_blocked = self.is_blocked();
        {
            let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            let waiting = serial.input_waiting();
            if waiting == 0 || waiting < self.fifo_after {
                self.stalled = 0;
                self.kick_after = INPUT_KICK_TICKS;
            } else {
                self.stalled += 1;
                if self.stalled >= self.kick_after {
                    self.stalled = 0;
                    self.kick_after = (self.kick_after * 2).min(INPUT_KICK_MAX_TICKS);
                    serial.raise_received_data();
                }
            }
        }
        self.flush() && was_blocked
    }

    /// Offers what waits; true when it is all taken. Arms the timer while input waits here
    /// or in the FIFO (for a guest that has the received-data interrupt on).
    fn flush(&mut self) -> bool {
        let (taken, waiting, watch) = {
            let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            let taken = serial.enqueue_input(&self.pending);
            let waiting = serial.input_waiting();
            (
                taken,
                waiting,
                waiting > 0 && serial.received_data_enabled(),
            )
        };
        self.pending.drain(..taken);
        self.fifo_after = waiting;
        if !self.pending.is_empty() || watch {
            if let Err(e) = self.retry.reset(INPUT_RETRY, None) {
                tracing::warn!(error = %e, "console retry timer failed; input stops");
            }
        }
        self.pending.is_empty()
    }
}

/// Setting up the console socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot create the console input timer: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
    #[error(transparent)]
    Socket(#[from] crate::socket::SocketError),
    #[error("--console-log {path}: cannot open: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Console counters.
#[derive(Debug, Default)]
pub struct ConsoleMetrics {
    pub clients_connected: AtomicU64,
    pub clients_dropped_slow: AtomicU64,
    pub output_bytes: AtomicU64,
    pub input_bytes: AtomicU64,
    pub log_errors: AtomicU64,
    /// Output not written to the log file because it reached [`LOG_MAX`].
    pub log_dropped_bytes: AtomicU64,
    /// Output podvm holds now for clients that are behind (a gauge, not a total).
    pub backlog_bytes: AtomicU64,
}

struct Client {
    id: u64,
    stream: UnixStream,
    backlog: VecDeque<u8>,
}

impl Client {
    /// Writes as much of the backlog as the socket takes now; false if the client is gone.
    fn drain(&mut self) -> bool {
        while !self.backlog.is_empty() {
            let (front, _) = self.backlog.as_slices();
            match self.stream.write(front) {
                Ok(0) => return false,
                Ok(n) => {
                    self.backlog.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

struct HubState {
    history: VecDeque<u8>,
    history_max: usize,
    clients: Vec<Client>,
    /// The client that holds the keyboard.
    writer: Option<u64>,
    log: Option<File>,
    /// What the log file may still take before it reaches [`LOG_MAX`] (its notice aside).
    log_room: u64,
    next_id: u64,
}

/// The most the console log file grows to (what it held before this run included): a guest
/// printing without end must not fill the pod's disk. Output beyond it is counted, not
/// written, after one line that says so.
pub const LOG_MAX: u64 = 64 << 20;
const LOG_FULL_NOTICE: &[u8] =
    b"\r\n[podvm: the console log reached its limit of 64 MiB; later output is not logged]\r\n";

/// Shared between the UART's output (a vCPU thread) and the socket side (the event loop).
pub struct ConsoleHub {
    state: Mutex<HubState>,
    metrics: ConsoleMetrics,
}

impl ConsoleHub {
    /// A hub keeping `history` bytes, copying everything to `log` when given.
    pub fn new(history: usize, log: Option<&Path>) -> Result<Arc<Self>, ConsoleError> {
        Self::with_log_limit(history, log, LOG_MAX)
    }

    fn with_log_limit(
        history: usize,
        log: Option<&Path>,
        log_max: u64,
    ) -> Result<Arc<Self>, ConsoleError> {
        let log = log
            .map(|path| {
                // Never through a symlink: the file sits in a directory another container
                // of the pod may share, and podvm must not append where a link points.
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(path)
                    .map_err(|source| ConsoleError::Log {
                        path: path.into(),
                        source,
                    })
            })
            .transpose()?;
        let held = log
            .as_ref()
            .and_then(|f: &File| f.metadata().ok())
            .map_or(0, |m| m.len());
        let log_room = log_max.saturating_sub(held + LOG_FULL_NOTICE.len() as u64);
        Ok(Arc::new(Self {
            state: Mutex::new(HubState {
                history: VecDeque::with_capacity(history),
                history_max: history,
                clients: Vec::new(),
                writer: None,
                log,
                log_room,
                next_id: 0,
            }),
            metrics: ConsoleMetrics::default(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends guest output to the log file while it has room; at the limit, writes the
    /// notice and closes the file.
    fn log(&self, state: &mut HubState, bytes: &[u8]) {
        let Some(log) = state.log.as_mut() else {
            if state.log_room == 0 {
                self.metrics
                    .log_dropped_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            return;
        };
        let fits = bytes
            .len()
            .min(usize::try_from(state.log_room).unwrap_or(usize::MAX));
        let mut written = log.write_all(&bytes[..fits]);
        state.log_room -= fits as u64;
        if fits < bytes.len() {
            self.metrics
                .log_dropped_bytes
                .fetch_add((bytes.len() - fits) as u64, Ordering::Relaxed);
            written = written.and_then(|()| log.write_all(LOG_FULL_NOTICE));
            state.log = None;
        }
        if written.is_err() {
            self.metrics.log_errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Refreshes the backlog gauge; called with the state locked after any change.
    fn note_backlog(&self, state: &HubState) {
        let total: usize = state.clients.iter().map(|c| c.backlog.len()).sum();
        self.metrics
            .backlog_bytes
            .store(total as u64, Ordering::Relaxed);
    }

    /// Counters.
    pub fn metrics(&self) -> &ConsoleMetrics {
        &self.metrics
    }

    /// Clients attached now.
    pub fn clients_attached(&self) -> usize {
        self.lock().clients.len()
    }

    /// Guest output: into the history, the log, and every client.
    pub fn output(&self, bytes: &[u8]) {
        self.metrics
            .output_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut state = self.lock();
        self.log(&mut state, bytes);
        let max = state.history_max;
        state.history.extend(bytes);
        let excess = state.history.len().saturating_sub(max);
        state.history.drain(..excess);
        let mut gone = Vec::new();
        for client in &mut state.clients {
            client.backlog.extend(bytes);
            if !client.drain() {
                gone.push(client.id);
            } else if client.backlog.len() > CLIENT_BACKLOG_MAX {
                self.metrics
                    .clients_dropped_slow
                    .fetch_add(1, Ordering::Relaxed);
                gone.push(client.id);
            }
        }
        for id in gone {
            remove_client(&mut state, id);
        }
        self.note_backlog(&state);
    }

    /// A new client: history first, then the keyboard or a read-only notice.
    fn add_client(&self, stream: UnixStream) -> Option<u64> {
        stream.set_nonblocking(true).ok()?;
        limit_send_buffer(&stream);
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let mut backlog: VecDeque<u8> = state.history.iter().copied().collect();
        if state.writer.is_none() {
            state.writer = Some(id);
        } else {
            backlog.extend(NOTICE_READ_ONLY);
        }
        // Counted when accepted: a client that leaves while its history is still being sent
        // (it saw what it wanted) was connected all the same.
        self.metrics
            .clients_connected
            .fetch_add(1, Ordering::Relaxed);
        let mut client = Client {
            id,
            stream,
            backlog,
        };
        if !client.drain() {
            if state.writer == Some(id) {
                state.writer = None;
            }
            return None;
        }
        state.clients.push(client);
        self.note_backlog(&state);
        Some(id)
    }

    /// Writes what a client's socket takes now of its backlog (called when it becomes
    /// writable); a client that has gone is removed.
    fn drain_client(&self, id: u64) {
        let mut state = self.lock();
        let gone = state
            .clients
            .iter_mut()
            .find(|c| c.id == id)
            .is_some_and(|c| !c.drain());
        if gone {
            remove_client(&mut state, id);
        }
        self.note_backlog(&state);
    }

    fn is_writer(&self, id: u64) -> bool {
        self.lock().writer == Some(id)
    }

    fn remove(&self, id: u64) {
        let mut state = self.lock();
        remove_client(&mut state, id);
        self.note_backlog(&state);
    }

    /// At VM exit: gives every client up to `grace` (in all) to take what is still waiting
    /// for it, so the last words of the guest ("reboot: Power down") reach slow readers too.
    pub fn flush_clients(&self, grace: std::time::Duration) {
        let deadline = std::time::Instant::now() + grace;
        let mut state = self.lock();
        for client in &mut state.clients {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if client.backlog.is_empty() || left.is_zero() {
                continue;
            }
            let _ = client.stream.set_nonblocking(false);
            let _ = client.stream.set_write_timeout(Some(left));
            let (a, b) = client.backlog.as_slices();
            let _ = client
                .stream
                .write_all(a)
                .and_then(|()| client.stream.write_all(b));
            client.backlog.clear();
        }
        self.note_backlog(&state);
    }

    /// Flushes the log file.
    pub fn flush(&self) {
        if let Some(log) = self.lock().log.as_mut() {
            let _ = log.flush();
        }
    }
}

/// Kernel send buffer requested for each client (the kernel doubles it). What a client has
/// not taken waits in its backlog, where podvm counts it against [`CLIENT_BACKLOG_MAX`];
/// a large kernel buffer would only hide how far behind a client is.
const CLIENT_SNDBUF: libc::c_int = 16 * 1024;

fn limit_send_buffer(stream: &UnixStream) {
    use std::os::fd::AsRawFd;
    let size = CLIENT_SNDBUF;
    // SAFETY: `stream` is an open socket; the option value is a c_int that lives for the call
    // and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "cannot shrink a console client's send buffer");
    }
}

fn remove_client(state: &mut HubState, id: u64) {
    state.clients.retain(|c| c.id != id);
    if state.writer == Some(id) {
        state.writer = state.clients.first().map(|c| c.id);
        if let Some(next) = state.clients.first_mut() {
            next.backlog.extend(NOTICE_KEYBOARD);
            next.drain();
        }
    }
}

/// The UART's output sink when the console is a socket.
pub struct HubWriter(pub Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.output(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Binds the console socket at `path` with mode 0600, replacing a stale socket file.
pub fn bind(path: &Path) -> Result<UnixListener, ConsoleError> {
    Ok(crate::socket::bind_private("--console", path)?)
}

const TOKEN_LISTENER: u32 = u32::MAX;
const TOKEN_INPUT_RETRY: u32 = u32::MAX - 1;
/// Client tokens are client ids modulo this (below the two fixed tokens).
const CLIENT_TOKENS: u64 = u32::MAX as u64 - 1;

fn client_token(id: u64) -> u32 {
    (id % CLIENT_TOKENS) as u32
}

/// The socket side on the event loop: accepts clients and feeds the keyboard holder's input
/// to the UART.
pub struct ConsoleServer {
    listener: UnixListener,
    path: PathBuf,
    hub: Arc<ConsoleHub>,
    /// The keyboard holder's input on its way into the UART.
    input: UartInput,
    /// Client streams by token ([`client_token`]).
    readers: Vec<(u64, UnixStream)>,
}

impl ConsoleServer {
    /// Serves `listener` (bound at `path`) for `hub`, typing into `serial`.
    pub fn new(
        listener: UnixListener,
        path: PathBuf,
        hub: Arc<ConsoleHub>,
        serial: Arc<Mutex<Serial>>,
    ) -> Result<Self, ConsoleError> {
        Ok(Self {
            listener,
            path,
            hub,
            input: UartInput::new(serial).map_err(ConsoleError::Timer)?,
            readers: Vec::new(),
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    let Some(id) = self.hub.add_client(stream) else {
                        continue;
                    };
                    let token = client_token(id);
                    // Edge-triggered: OUT fires when a full socket has room again (its backlog
                    // is then sent even if the guest has gone quiet); IN is read to the end.
                    let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
                    if ops.add(Events::with_data(&reader, token, set)).is_err() {
                        self.hub.remove(id);
                        continue;
                    }
                    self.readers.push((id, reader));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!(error = %e, "console accept failed");
                    return;
                }
            }
        }
    }

    fn client_event(&mut self, token: u32, set: EventSet, ops: &mut EventOps) {
        let Some(pos) = self
            .readers
            .iter()
            .position(|(id, _)| client_token(*id) == token)
        else {
            return;
        };
        let id = self.readers[pos].0;
        if set.contains(EventSet::OUT) {
            self.hub.drain_client(id);
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.read_client(pos, ops);
        }
    }

    /// Reads what client `pos` sent, to the end or until the UART's FIFO is full: the
    /// keyboard holder's input goes to the guest, the others' nowhere.
    fn read_client(&mut self, pos: usize, ops: &mut EventOps) {
        let id = self.readers[pos].0;
        let mut buf = [0u8; INPUT_CHUNK];
        loop {
            let writer = self.hub.is_writer(id);
            if writer && self.input.is_blocked() {
                // What it sent waits in its socket; the retry timer comes back for it.
                return;
            }
            let n = match self.readers[pos].1.read(&mut buf) {
                Ok(0) => None,
                Ok(n) => Some(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => None,
            };
            let Some(n) = n else {
                let (_, stream) = self.readers.remove(pos);
                let _ = ops.remove(Events::empty(&stream));
                self.hub.remove(id);
                return;
            };
            if !writer {
                continue; // read-only clients' keys go nowhere
            }
            self.hub
                .metrics
                .input_bytes
                .fetch_add(n as u64, Ordering::Relaxed);
            self.input.offer(&buf[..n]);
        }
    }

    /// The retry timer: offers the waiting input again, and once the FIFO took it all,
    /// reads on from the keyboard holder.
    fn input_retry(&mut self, ops: &mut EventOps) {
        if !self.input.retry() {
            return;
        }
        if let Some(pos) = self
            .readers
            .iter()
            .position(|(id, _)| self.hub.is_writer(*id))
        {
            self.read_client(pos, ops);
        }
    }
}

impl Drop for ConsoleServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ConsoleServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(
            &self.listener,
            TOKEN_LISTENER,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "cannot watch the console socket");
        }
        if let Err(e) = ops.add(Events::with_data(
            self.input.retry_timer(),
            TOKEN_INPUT_RETRY,
            EventSet::IN,
        )) {
            tracing::error!(error = ?e, "cannot watch the console input timer");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTENER => self.accept(ops),
            TOKEN_INPUT_RETRY => self.input_retry(ops),
            token => self.client_event(token, events.event_set(), ops),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_available(stream: &mut UnixStream) -> Vec<u8> {
        stream.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn uart_input_raises_the_interrupt_again_for_a_guest_that_missed_it() {
        use devices::bus::BusDevice;
        use devices::irq::IrqTrigger;

        let irq = IrqTrigger::new().unwrap();
        let line = irq.try_clone().unwrap();
        let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(io::sink()))));
        serial.lock().unwrap().write(1, &[1]); // IER: received-data interrupt on
        let _ = line.eventfd().read();
        let mut input = UartInput::new(serial.clone()).unwrap();
        assert!(input.offer(b"hi\n"));
        assert_eq!(line.eventfd().read().unwrap(), 1, "raised for the bytes");
        // The guest missed that edge and reads nothing: the timer keeps looking, and after
        // INPUT_KICK_TICKS looks the interrupt comes again.
        let mut looks = 0;
        while line.eventfd().read().is_err() {
            assert!(input.retry_timer().is_armed().unwrap(), "stopped watching");
            assert!(!input.retry(), "nothing waited outside the FIFO");
            looks += 1;
            assert!(
                looks <= INPUT_KICK_TICKS,
                "not raised again after {looks} looks"
            );
        }
        assert_eq!(looks, INPUT_KICK_TICKS);
        // Missed again, and an identification read cleared IIR meanwhile: raised after twice
        // as many looks, with IIR showing received data for the guest's handler.
        let mut iir = [0u8];
        serial.lock().unwrap().read(2, &mut iir);
        let mut looks = 0;
        while line.eventfd().read().is_err() {
            input.retry();
            looks += 1;
            assert!(looks <= 2 * INPUT_KICK_TICKS, "not raised again");
        }
        assert_eq!(looks, 2 * INPUT_KICK_TICKS);
        serial.lock().unwrap().read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x04, "received data shown");
        // The guest reads it all: the timer stops.
        for _ in 0..3 {
            serial.lock().unwrap().read(0, &mut [0u8]);
        }
        input.retry();
        assert!(
            !input.retry_timer().is_armed().unwrap(),
            "still watching an empty FIFO"
        );
        assert!(
            line.eventfd().read().is_err(),
            "raised with nothing waiting"
        );
    }

    #[test]
    fn console_paste_longer_than_the_fifo_reaches_the_guest_whole() {
        use devices::bus::BusDevice;
        use devices::irq::IrqTrigger;
        use event_manager::{EventManager, SubscriberOps};

        let dir = std::env::temp_dir().join(format!("podvm-console-paste-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let listener = bind(&path).unwrap();
        let hub = ConsoleHub::new(16, None).unwrap();
        let serial = Arc::new(Mutex::new(Serial::new(
            IrqTrigger::new().unwrap(),
            Box::new(io::sink()),
        )));
        let server = ConsoleServer::new(listener, path.clone(), hub, serial.clone()).unwrap();
        let mut manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        manager.add_subscriber(Arc::new(Mutex::new(server)));

        // 4 KiB pasted at once: 64 times the FIFO.
        let paste: Vec<u8> = (0..4096u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut client = UnixStream::connect(&path).unwrap();
        let sent = paste.clone();
        let typist = std::thread::spawn(move || {
            client.write_all(&sent).unwrap();
            client
        });
        // The guest reads the receive buffer whenever the line status says data is ready.
        let mut got = Vec::new();
        let give_up = std::time::Instant::now() + Duration::from_secs(120);
        while got.len() < paste.len() && std::time::Instant::now() < give_up {
            manager.run_with_timeout(10).unwrap();
            let mut uart = serial.lock().unwrap();
            loop {
                let mut lsr = [0u8];
                uart.read(5, &mut lsr);
                if lsr[0] & 1 == 0 {
                    break;
                }
                let mut byte = [0u8];
                uart.read(0, &mut byte);
                got.push(byte[0]);
            }
        }
        assert_eq!(got.len(), paste.len(), "bytes lost on the way to the guest");
        assert_eq!(got, paste);
        drop(typist.join().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn console_late_client_gets_history_and_read_only_notice() {
        let hub = ConsoleHub::new(16, None).unwrap();
        let (first, mut first_peer) = UnixStream::pair().unwrap();
        let first_id = hub.add_client(first).unwrap();
        hub.output(b"0123456789abcdefXYZ");
        assert_eq!(read_available(&mut first_peer), b"0123456789abcdefXYZ");
        let (second, mut second_peer) = UnixStream::pair().unwrap();
        let second_id = hub.add_client(second).unwrap();
        let got = read_available(&mut second_peer);
        // The last 16 bytes of history, then the notice.
        assert!(got.starts_with(b"3456789abcdefXYZ"), "{got:?}");
        assert!(got.ends_with(NOTICE_READ_ONLY));
        assert!(hub.is_writer(first_id) && !hub.is_writer(second_id));
        hub.remove(first_id);
        assert!(hub.is_writer(second_id));
        assert!(read_available(&mut second_peer).ends_with(NOTICE_KEYBOARD));
    }

    #[test]
    fn console_client_that_never_reads_is_dropped_not_waited_for() {
        let hub = ConsoleHub::new(1024, None).unwrap();
        let (stuck, _stuck_peer) = UnixStream::pair().unwrap();
        hub.add_client(stuck).unwrap();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..(2 * CLIENT_BACKLOG_MAX / chunk.len() + 8) {
            hub.output(&chunk);
        }
        assert_eq!(hub.lock().clients.len(), 0);
        assert_eq!(
            hub.metrics().clients_dropped_slow.load(Ordering::Relaxed),
            1
        );
        assert_eq!(hub.metrics().backlog_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn console_backlog_is_sent_when_the_client_has_room_again_without_more_output() {
        let hub = ConsoleHub::new(1024, None).unwrap();
        let (client, mut peer) = UnixStream::pair().unwrap();
        let id = hub.add_client(client).unwrap();
        let sent: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        hub.output(&sent);
        let mut got = read_available(&mut peer);
        assert!(got.len() < sent.len(), "the kernel took everything at once");
        let held = hub.metrics().backlog_bytes.load(Ordering::Relaxed) as usize;
        assert!(held > 0 && held <= sent.len() - got.len(), "{held}");
        // The guest is quiet now; each time the socket has room (what the event loop's
        // writable event signals), more of the backlog goes out.
        for _ in 0..1000 {
            if got.len() == sent.len() {
                break;
            }
            hub.drain_client(id);
            got.extend(read_available(&mut peer));
        }
        assert_eq!(got, sent);
        assert_eq!(hub.metrics().backlog_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn console_exit_hands_slow_clients_what_is_left() {
        let hub = ConsoleHub::new(16, None).unwrap();
        let (client, mut peer) = UnixStream::pair().unwrap();
        hub.add_client(client).unwrap();
        let sent: Vec<u8> = (0..300 * 1024).map(|i| (i % 253) as u8).collect();
        hub.output(&sent);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).unwrap();
            got
        });
        hub.flush_clients(std::time::Duration::from_secs(10));
        drop(hub); // the VM is gone: the connection closes
        assert_eq!(reader.join().unwrap(), sent);
    }

    #[test]
    fn console_log_file_gets_everything() {
        let path = std::env::temp_dir().join(format!("podvm-console-log-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let hub = ConsoleHub::new(4, Some(&path)).unwrap();
        hub.output(b"hello ");
        hub.output(b"world");
        hub.flush();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn console_log_file_is_not_opened_through_a_symlink() {
        let dir = std::env::temp_dir().join(format!("podvm-console-link-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("elsewhere");
        std::fs::write(&target, b"keep\n").unwrap();
        let link = dir.join("console.log");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = ConsoleHub::new(4, Some(&link))
            .err()
            .expect("opened through a symlink");
        assert!(e.to_string().contains("--console-log"), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn console_log_file_stops_at_its_limit_with_a_notice_and_counts_the_rest() {
        let path = std::env::temp_dir().join(format!("podvm-console-cap-{}", std::process::id()));
        std::fs::write(&path, b"earlier run\n").unwrap();
        let limit = 12 + 10 + LOG_FULL_NOTICE.len() as u64;
        let hub = ConsoleHub::with_log_limit(4, Some(&path), limit).unwrap();
        hub.output(b"0123456");
        hub.output(b"789abcdef"); // 3 fit
        hub.output(&[b'x'; 1000]);
        hub.flush();
        let mut expected = b"earlier run\n0123456789".to_vec();
        expected.extend_from_slice(LOG_FULL_NOTICE);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        assert_eq!(
            hub.metrics().log_dropped_bytes.load(Ordering::Relaxed),
            6 + 1000
        );
        assert_eq!(hub.metrics().log_errors.load(Ordering::Relaxed), 0);
        let _ = std::fs::remove_file(&path);
    }
}
