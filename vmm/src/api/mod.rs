//! The control API: HTTP/1.1 with JSON bodies on a unix socket (`--api-socket`), served on
//! the event loop. Endpoints are documented in `docs/api.md`; [`route`] is the one table of
//! them.
//!
//! Clients are untrusted in the small: a request that is malformed, too large, for an
//! unknown path or with the wrong method gets an error response; a client that connects and
//! sends nothing is answered 408 and dropped after [`REQUEST_TIMEOUT`]; at most
//! [`MAX_CONNECTIONS`] are served at once. None of it touches the VM.

pub mod http;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde::Deserialize;
use serde_json::Value;
use vmm_sys_util::timerfd::TimerFd;

use self::http::{HttpError, Request, Response, MAX_BODY, MAX_HEAD};

/// How long a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Most API connections served at once; more are answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 32;
/// How often pending connections are checked against their deadline.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);

/// What the API asks of the VM. [`crate::control::VmControl`] is the real one.
pub trait Control {
    /// VM info and state (`GET /v1/vm`).
    fn info(&self) -> Value;
    /// Device and API counters (`GET /v1/vm/counters`).
    fn counters(&self) -> Value;
    /// Parks the vCPUs; the new state on success.
    fn pause(&self) -> Result<Value, String>;
    /// Lets the vCPUs run again; the new state.
    fn resume(&self) -> Value;
    /// Presses the power button and arms the stop timer.
    fn shutdown(&self, timeout: Option<Duration>) -> Value;
    /// Stops the VM now.
    fn stop(&self) -> Value;
    /// Starts a live migration to `address` (`tcp:HOST:PORT` or `unix:PATH`); the error
    /// says which HTTP status it is.
    fn migrate(&self, address: &str) -> Result<Value, (u16, String)>;
    /// The last migration's progress and figures.
    fn migration(&self) -> Value;
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateBody {
    /// `tcp:HOST:PORT` or `unix:PATH` of a podvm started with `--incoming`.
    address: String,
}

/// Counters of the API itself.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    pub requests: AtomicU64,
    /// Requests answered with a 4xx or 5xx.
    pub errors: AtomicU64,
    /// Clients dropped because they did not send a whole request in time.
    pub timeouts: AtomicU64,
    /// Connections refused because too many were open.
    pub refused: AtomicU64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShutdownBody {
    /// Seconds the guest has to power off before it is stopped.
    timeout_s: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

/// Parses a JSON body, where an empty body means "no parameters".
fn body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<Option<T>, Response> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&req.body)
        .map(Some)
        .map_err(|e| Response::error(400, format_args!("bad JSON body: {e}")))
}

/// Serves one request.
pub fn route(control: &dyn Control, req: &Request) -> Response {
    let allow = |methods: &'static str| {
        let mut r = Response::error(
            405,
            format_args!("{} does not take {}; use {methods}", req.path, req.method),
        );
        r.allow = Some(methods);
        r
    };
    let path = req.path.strip_suffix('/').unwrap_or(&req.path);
    match (path, req.method.as_str()) {
        ("/v1/vm", "GET") => Response::json(200, &control.info()),
        ("/v1/vm", _) => allow("GET"),
        ("/v1/vm/counters", "GET") => Response::json(200, &control.counters()),
        ("/v1/vm/counters", _) => allow("GET"),
        ("/v1/vm/pause", "PUT") => match body::<NoParams>(req) {
            Err(r) => r,
            Ok(_) => match control.pause() {
                Ok(v) => Response::json(200, &v),
                Err(e) => Response::error(409, e),
            },
        },
        ("/v1/vm/resume", "PUT") => match body::<NoParams>(req) {
            Err(r) => r,
            Ok(_) => Response::json(200, &control.resume()),
        },
        ("/v1/vm/shutdown", "PUT") => match body::<ShutdownBody>(req) {
            Err(r) => r,
            Ok(b) => {
                let timeout = b.and_then(|b| b.timeout_s).map(Duration::from_secs);
                Response::json(202, &control.shutdown(timeout))
            }
        },
        ("/v1/vm/stop", "PUT") => match body::<NoParams>(req) {
            Err(r) => r,
            Ok(_) => Response::json(202, &control.stop()),
        },
        ("/v1/vm/migrate", "PUT") => match body::<MigrateBody>(req) {
            Err(r) => r,
            Ok(None) => Response::error(
                400,
                "migrate needs a body: {\"address\": \"tcp:HOST:PORT\"}",
            ),
            Ok(Some(b)) => match control.migrate(&b.address) {
                Ok(v) => Response::json(202, &v),
                Err((status, e)) => Response::error(status, e),
            },
        },
        ("/v1/vm/migration", "GET") => Response::json(200, &control.migration()),
        ("/v1/vm/migration", _) => allow("GET"),
        (
            "/v1/vm/pause" | "/v1/vm/resume" | "/v1/vm/shutdown" | "/v1/vm/stop" | "/v1/vm/migrate",
            _,
        ) => allow("PUT"),
        _ => Response::error(
            404,
            format_args!(
                "no endpoint {}; see docs/api.md (GET /v1/vm lists the VM's state)",
                req.path
            ),
        ),
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Bytes of the response still to write; `Some` once the request is answered.
    out: Option<Vec<u8>>,
    deadline: Instant,
}

const TOKEN_LISTENER: u32 = u32::MAX;
const TOKEN_SWEEP: u32 = u32::MAX - 1;

/// The API socket on the event loop.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    control: Arc<dyn Control + Send + Sync>,
    metrics: Arc<ApiMetrics>,
    conns: HashMap<u32, Conn>,
    next_token: u32,
    sweep: TimerFd,
    sweeping: bool,
}

/// The API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Socket(#[from] crate::socket::SocketError),
    #[error("cannot create the API timeout timer: {0}")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// Binds the API socket at `path` (mode 0600).
pub fn bind(path: &std::path::Path) -> Result<UnixListener, ApiError> {
    Ok(crate::socket::bind_private("--api-socket", path)?)
}

impl ApiServer {
    /// Serves `listener` (bound at `path`, removed when the server goes) for `control`.
    pub fn new(
        listener: UnixListener,
        path: PathBuf,
        control: Arc<dyn Control + Send + Sync>,
        metrics: Arc<ApiMetrics>,
    ) -> Result<Self, ApiError> {
        Ok(Self {
            listener,
            path,
            control,
            metrics,
            conns: HashMap::new(),
            next_token: 0,
            sweep: TimerFd::new().map_err(ApiError::Timer)?,
            sweeping: false,
        })
    }

    fn token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = (self.next_token + 1) % TOKEN_SWEEP;
            if !self.conns.contains_key(&t) {
                return t;
            }
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    break;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.conns.len() >= MAX_CONNECTIONS {
                self.metrics.refused.fetch_add(1, Ordering::Relaxed);
                let r = Response::error(503, "too many API connections; try again");
                let _ = (&stream).write(&r.encode());
                continue;
            }
            let token = self.token();
            if ops
                .add(Events::with_data(&stream, token, EventSet::IN))
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                token,
                Conn {
                    stream,
                    buf: Vec::new(),
                    out: None,
                    deadline: Instant::now() + REQUEST_TIMEOUT,
                },
            );
        }
        if !self.conns.is_empty() && !self.sweeping {
            self.sweeping = self
                .sweep
                .reset(SWEEP_INTERVAL, Some(SWEEP_INTERVAL))
                .is_ok();
        }
    }

    fn close(&mut self, token: u32, ops: &mut EventOps) {
        if let Some(conn) = self.conns.remove(&token) {
            let _ = ops.remove(Events::empty(&conn.stream));
        }
    }

    /// Queues `response` on the connection and writes what the socket takes now.
    fn answer(&mut self, token: u32, response: Response, ops: &mut EventOps) {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        if response.status >= 400 {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(conn) = self.conns.get_mut(&token) {
            conn.out = Some(response.encode());
            conn.buf = Vec::new();
            let _ = ops.modify(Events::with_data(&conn.stream, token, EventSet::OUT));
        }
        self.write(token, ops);
    }

    fn write(&mut self, token: u32, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let Some(out) = conn.out.as_mut() else {
            return;
        };
        while !out.is_empty() {
            match conn.stream.write(out) {
                Ok(0) => break,
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // Written (or the client left): one request per connection.
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        self.close(token, ops);
    }

    fn read(&mut self, token: u32, ops: &mut EventOps) {
        let Some(conn) = self.conns.get_mut(&token) else {
            return;
        };
        let cap = MAX_HEAD + MAX_BODY;
        let mut chunk = [0u8; 4096];
        let mut eof = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    conn.buf.extend_from_slice(&chunk[..n]);
                    if conn.buf.len() > cap {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        let parsed = http::parse(&conn.buf);
        let overflowed = conn.buf.len() > cap;
        let empty = conn.buf.is_empty();
        match parsed {
            Ok(Some(req)) => {
                let response = route(self.control.as_ref(), &req);
                tracing::debug!(method = %req.method, path = %req.path, status = response.status, "API request");
                self.answer(token, response, ops);
            }
            Ok(None) if eof && empty => self.close(token, ops),
            Ok(None) if eof => {
                let r = Response::error(400, "the request ended before it was complete");
                self.answer(token, r, ops);
            }
            Ok(None) if overflowed => {
                self.answer(token, Response::error(413, HttpError::BodyTooLarge), ops);
            }
            Ok(None) => {}
            Err(e) => self.answer(token, Response::error(e.status(), &e), ops),
        }
    }

    fn sweep(&mut self, ops: &mut EventOps) {
        let _ = self.sweep.wait();
        let now = Instant::now();
        let late: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            let waiting_to_write = self.conns.get(&token).is_some_and(|c| c.out.is_some());
            self.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
            if waiting_to_write {
                // The client does not read its answer: drop it.
                self.close(token, ops);
            } else {
                let timeout_s = REQUEST_TIMEOUT.as_secs();
                self.answer(
                    token,
                    Response::error(
                        408,
                        format_args!("no complete request within {timeout_s} s"),
                    ),
                    ops,
                );
                // A client that does not read is not waited for again.
                self.close(token, ops);
            }
        }
        if self.conns.is_empty() && self.sweeping {
            let _ = self.sweep.clear();
            self.sweeping = false;
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn init(&mut self, ops: &mut EventOps) {
        let watch = [
            Events::with_data(&self.listener, TOKEN_LISTENER, EventSet::IN),
            Events::with_data(&self.sweep, TOKEN_SWEEP, EventSet::IN),
        ];
        for events in watch {
            if let Err(e) = ops.add(events) {
                tracing::error!(error = ?e, "cannot watch the API socket");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_LISTENER => self.accept(ops),
            TOKEN_SWEEP => self.sweep(ops),
            token => {
                let set = events.event_set();
                let writing = self.conns.get(&token).is_some_and(|c| c.out.is_some());
                if writing {
                    self.write(token, ops);
                } else if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.read(token, ops);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;

    /// Records what the routes asked for.
    #[derive(Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
    }

    impl Control for Recorder {
        fn info(&self) -> Value {
            self.calls.lock().unwrap().push("info".into());
            json!({ "state": "running" })
        }
        fn counters(&self) -> Value {
            self.calls.lock().unwrap().push("counters".into());
            json!({ "disks": [] })
        }
        fn pause(&self) -> Result<Value, String> {
            self.calls.lock().unwrap().push("pause".into());
            Err("the VM is stopping".into())
        }
        fn resume(&self) -> Value {
            self.calls.lock().unwrap().push("resume".into());
            json!({ "state": "running" })
        }
        fn shutdown(&self, timeout: Option<Duration>) -> Value {
            self.calls
                .lock()
                .unwrap()
                .push(format!("shutdown {timeout:?}"));
            json!({ "state": "shutting-down" })
        }
        fn stop(&self) -> Value {
            self.calls.lock().unwrap().push("stop".into());
            json!({ "state": "stopping" })
        }
        fn migrate(&self, address: &str) -> Result<Value, (u16, String)> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("migrate {address}"));
            Ok(json!({ "state": "active" }))
        }
        fn migration(&self) -> Value {
            self.calls.lock().unwrap().push("migration".into());
            json!({ "state": "none" })
        }
    }

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn api_routes_each_endpoint_to_its_action() {
        let r = Recorder::default();
        assert_eq!(route(&r, &req("GET", "/v1/vm", "")).status, 200);
        assert_eq!(route(&r, &req("GET", "/v1/vm/counters/", "")).status, 200);
        assert_eq!(route(&r, &req("PUT", "/v1/vm/pause", "")).status, 409);
        assert_eq!(route(&r, &req("PUT", "/v1/vm/resume", "{}")).status, 200);
        let s = route(&r, &req("PUT", "/v1/vm/shutdown", "{\"timeout_s\": 7}"));
        assert_eq!(s.status, 202);
        assert_eq!(route(&r, &req("PUT", "/v1/vm/shutdown", "")).status, 202);
        assert_eq!(route(&r, &req("PUT", "/v1/vm/stop", " ")).status, 202);
        assert_eq!(
            *r.calls.lock().unwrap(),
            [
                "info",
                "counters",
                "pause",
                "resume",
                "shutdown Some(7s)",
                "shutdown None",
                "stop"
            ]
        );
    }

    #[test]
    fn api_bad_requests_never_reach_the_vm() {
        let r = Recorder::default();
        let cases = [
            (req("GET", "/v2/vm", ""), 404, None),
            (req("GET", "/", ""), 404, None),
            (req("DELETE", "/v1/vm", ""), 405, Some("GET")),
            (req("GET", "/v1/vm/stop", ""), 405, Some("PUT")),
            (req("POST", "/v1/vm/counters", ""), 405, Some("GET")),
            (
                req("PUT", "/v1/vm/shutdown", "{\"timeout_s\": \"soon\"}"),
                400,
                None,
            ),
            (req("PUT", "/v1/vm/shutdown", "{\"grace\": 3}"), 400, None),
            (req("PUT", "/v1/vm/shutdown", "{not json"), 400, None),
            (req("PUT", "/v1/vm/stop", "[1,2]"), 400, None),
            (req("PUT", "/v1/vm/pause", "{\"now\": true}"), 400, None),
        ];
        for (request, status, allow) in cases {
            let resp = route(&r, &request);
            assert_eq!(resp.status, status, "{request:?}");
            assert_eq!(resp.allow, allow, "{request:?}");
            let v: Value = serde_json::from_str(&resp.body).unwrap();
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        assert!(
            r.calls.lock().unwrap().is_empty(),
            "a bad request reached the VM"
        );
    }
}

/// A [`Control`] that answers without a VM, for the fuzz target.
struct Inert;

impl Control for Inert {
    fn info(&self) -> Value {
        Value::Null
    }
    fn counters(&self) -> Value {
        Value::Null
    }
    fn pause(&self) -> Result<Value, String> {
        Err("inert".into())
    }
    fn resume(&self) -> Value {
        Value::Null
    }
    fn shutdown(&self, _: Option<Duration>) -> Value {
        Value::Null
    }
    fn stop(&self) -> Value {
        Value::Null
    }
    fn migrate(&self, _: &str) -> Result<Value, (u16, String)> {
        Err((409, "inert".into()))
    }
    fn migration(&self) -> Value {
        Value::Null
    }
}

/// Fuzz entry point (`vmm/fuzz`, target `api_http`): parses `data` as a client's bytes, at
/// every split point a slow client could produce, routes what parses, and checks the
/// invariants that hold for any input: a parsed request has a path and a body within the
/// limits, a prefix of a request never parses to something else, and every answer encodes to
/// a well-formed HTTP response.
pub fn fuzz_api_request(data: &[u8]) {
    let whole = http::parse(data);
    if let Ok(Some(req)) = &whole {
        assert!(req.path.starts_with('/'));
        assert!(req.body.len() <= MAX_BODY);
        let resp = route(&Inert, req);
        let wire = resp.encode();
        assert!(wire.starts_with(b"HTTP/1.1 "));
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Response::new(&mut headers);
        assert!(matches!(
            parsed.parse(&wire),
            Ok(httparse::Status::Complete(_))
        ));
    }
    if let Err(e) = &whole {
        let wire = Response::error(e.status(), e).encode();
        assert!(wire.starts_with(b"HTTP/1.1 4") || wire.starts_with(b"HTTP/1.1 5"));
    }
    // A client's bytes arrive in pieces: a prefix is incomplete, an error, or (once the head
    // and body are in) the same request.
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        if let (Ok(Some(part)), Ok(Some(full))) = (http::parse(&data[..cut]), &whole) {
            assert_eq!(&part, full);
        }
    }
}

#[cfg(test)]
mod corpus {
    /// Replays the committed fuzz corpus, so every CI run covers the seeds and past finds.
    #[test]
    fn api_fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/api_http");
        devices::fuzz_replay::replay_dir(&dir, super::fuzz_api_request);
    }
}
