//! podvm's log on stderr: text for people, or JSON lines for a pod's log pipeline (one
//! object per event, with the VMI's namespace and name once they are known).

use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// JSON lines when the VM comes from a VMI and stderr is not a terminal, else text.
    Auto,
    Json,
    Text,
}

/// The VMI every JSON line names (set once the spec is read).
static VMI: OnceLock<(String, String)> = OnceLock::new();
/// The log is JSON lines.
static JSON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Names the VMI in every later JSON line.
pub fn set_vmi(namespace: &str, name: &str) {
    let _ = VMI.set((namespace.to_string(), name.to_string()));
}

/// Starts logging; `PODVM_LOG` sets the filter (default `info`).
pub fn init(format: Format, from_vmi: bool) {
    let asked = std::env::var("PODVM_LOG").unwrap_or_default();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&asked)
        .ok()
        .filter(|_| !asked.is_empty())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    // Everything virtio-queue logs is about what a guest did wrong (a bad ring index, an
    // unreadable ring), which a guest can repeat without end; the devices count it and log it
    // rate-limited. Its own lines only if asked for by name.
    if !asked.contains("virtio_queue") {
        if let Ok(quiet) = "virtio_queue=off".parse() {
            filter = filter.add_directive(quiet);
        }
    }
    let json = match format {
        Format::Json => true,
        Format::Text => false,
        Format::Auto => from_vmi && !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    JSON.store(json, std::sync::atomic::Ordering::Relaxed);
    if json {
        builder.event_format(JsonLines).init();
    } else {
        builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal())
            .without_time()
            .init();
    }
}

/// One JSON object per event: `ts` (RFC 3339, UTC), `level`, `thread`, `msg`, the VMI's
/// `namespace` and `name`, the event's own fields, and `target`.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        writeln!(writer, "{}", json_line(event, std::time::SystemTime::now()))
    }
}

fn json_line(event: &Event<'_>, now: std::time::SystemTime) -> Value {
    let meta = event.metadata();
    let mut line = Map::new();
    line.insert("ts".into(), Value::String(rfc3339(now)));
    line.insert(
        "level".into(),
        Value::String(meta.level().as_str().to_ascii_lowercase()),
    );
    if let Some(thread) = std::thread::current().name() {
        line.insert("thread".into(), Value::String(thread.to_string()));
    }
    let mut fields = Fields(Map::new());
    event.record(&mut fields);
    if let Some(msg) = fields.0.remove("message") {
        line.insert("msg".into(), msg);
    }
    if let Some((namespace, name)) = VMI.get() {
        line.insert("namespace".into(), Value::String(namespace.clone()));
        line.insert("name".into(), Value::String(name.clone()));
    }
    for (key, value) in fields.0 {
        // An event's field never hides the fixed ones.
        line.entry(key).or_insert(value);
    }
    line.insert("target".into(), Value::String(meta.target().to_string()));
    Value::Object(line)
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
}

/// `2026-11-29T03:20:19.123Z`.
fn rfc3339(t: std::time::SystemTime) -> String {
    let since = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let (year, month, day, hour, minute, second) = podvm_seccomp::utc(since.as_secs());
    format!(
        "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{:03}Z",
        since.subsec_millis()
    )
}

/// The fields a JSON line of `target` carries after `msg` (the VMI's, the target), with
/// the closing brace, when the log is JSON: what podvm_seccomp's lines, written without
/// this subscriber, end with.
pub fn json_tail(target: &str) -> Option<String> {
    if !JSON.load(std::sync::atomic::Ordering::Relaxed) {
        return None;
    }
    let mut fields = Map::new();
    if let Some((namespace, name)) = VMI.get() {
        fields.insert("namespace".into(), Value::String(namespace.clone()));
        fields.insert("name".into(), Value::String(name.clone()));
    }
    fields.insert("target".into(), Value::String(target.into()));
    let object = Value::Object(fields).to_string();
    Some(format!(",{}", &object[1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn log_timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_922_419_123);
        assert_eq!(rfc3339(t), "2026-11-29T03:20:19.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn log_json_lines_carry_level_message_fields_and_the_vmi() {
        use std::sync::{Arc, Mutex};
        let lines = Arc::new(Mutex::new(Vec::new()));
        struct Capture(Arc<Mutex<Vec<Value>>>);
        impl<S: Subscriber> tracing_subscriber::Layer<S> for Capture {
            fn on_event(&self, e: &Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
                self.0.lock().unwrap().push(json_line(e, UNIX_EPOCH));
            }
        }
        use tracing_subscriber::layer::SubscriberExt;
        let subscriber = tracing_subscriber::registry().with(Capture(lines.clone()));
        set_vmi("vms", "web");
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(disk = 2, path = "/dev/x", "disk slow");
        });
        let got = lines.lock().unwrap();
        let line = &got[0];
        assert_eq!(line["level"], "warn");
        assert_eq!(line["msg"], "disk slow");
        assert_eq!(line["disk"], 2);
        assert_eq!(line["path"], "/dev/x");
        assert_eq!(line["namespace"], "vms");
        assert_eq!(line["name"], "web");
        assert_eq!(line["ts"], "1970-01-01T00:00:00.000Z");
        assert!(!line.to_string().contains('\n'));
    }
}
