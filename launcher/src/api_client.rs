//! `podvm api SOCKET ACTION`: one request to a VM's control API, its JSON answer on stdout.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cli::ApiAction;

/// How long the client waits for an answer. Pausing waits up to 5 s for the vCPUs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// The API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiClientError {
    #[error(transparent)]
    Connect(#[from] crate::vm_socket::ConnectError),
    #[error("api socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("api socket {path}: the answer is not HTTP ({0})", path = .1.display())]
    BadAnswer(String, PathBuf),
    #[error("{action}: the VM answered {status}: {message}")]
    Answered {
        action: &'static str,
        status: u16,
        message: String,
    },
}

/// Method, path and body of each action.
fn request(action: &ApiAction) -> (&'static str, &'static str, &'static str, String) {
    if let ApiAction::Migrate { address } = action {
        let body = serde_json::json!({ "address": address }).to_string();
        return ("migrate", "PUT", "/v1/vm/migrate", body);
    }
    match action {
        ApiAction::Info => ("info", "GET", "/v1/vm", String::new()),
        ApiAction::Counters => ("counters", "GET", "/v1/vm/counters", String::new()),
        ApiAction::Pause => ("pause", "PUT", "/v1/vm/pause", String::new()),
        ApiAction::Resume => ("resume", "PUT", "/v1/vm/resume", String::new()),
        ApiAction::Shutdown { timeout } => (
            "shutdown",
            "PUT",
            "/v1/vm/shutdown",
            timeout.map_or_else(String::new, |t| format!("{{\"timeout_s\":{t}}}")),
        ),
        ApiAction::Stop => ("stop", "PUT", "/v1/vm/stop", String::new()),
        ApiAction::Migration => ("migration", "GET", "/v1/vm/migration", String::new()),
        ApiAction::Migrate { .. } => unreachable!("answered above"),
    }
}

/// Calls the API at `path`; prints the JSON answer.
pub fn call(path: &Path, action: &ApiAction) -> Result<(), ApiClientError> {
    let (name, method, target, body) = request(action);
    let io_err = |source| ApiClientError::Io {
        path: path.into(),
        source,
    };
    let mut stream = crate::vm_socket::connect(path, "api socket", "--api-socket")?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(io_err)?;
    let head = format!(
        "{method} {target} HTTP/1.1\r\nHost: podvm\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io_err)?;
    stream.write_all(body.as_bytes()).map_err(io_err)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(io_err)?;

    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let bad = |why: &str| ApiClientError::BadAnswer(why.into(), path.into());
    let body_at = match resp.parse(&answer) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(bad("cut short")),
        Err(e) => return Err(bad(&e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let text = String::from_utf8_lossy(&answer[body_at..]);
    let json: serde_json::Value =
        serde_json::from_str(text.trim()).map_err(|_| bad("the body is not JSON"))?;
    if !(200..300).contains(&status) {
        let message = json["error"]
            .as_str()
            .unwrap_or("no reason given")
            .to_string();
        return Err(ApiClientError::Answered {
            action: name,
            status,
            message,
        });
    }
    let pretty = serde_json::to_string_pretty(&json).unwrap_or_else(|_| text.to_string());
    println!("{pretty}");
    Ok(())
}
