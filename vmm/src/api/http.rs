//! The HTTP/1.1 subset the API speaks: one request per connection, a `Content-Length` body
//! (no chunked transfer), JSON in and out. Requests are parsed with `httparse`; everything
//! here is pure and has no I/O, so it is unit-tested and fuzzed directly.

use std::fmt::Write as _;

/// Longest request head (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Longest request body.
pub const MAX_BODY: usize = 64 * 1024;
/// Most headers in a request.
const MAX_HEADERS: usize = 32;

/// A complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// A request that cannot be served; each maps to one status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("request body longer than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("chunked bodies are not accepted; send Content-Length")]
    LengthRequired,
    #[error("only HTTP/1.1 and HTTP/1.0 are spoken here")]
    Version,
}

impl HttpError {
    /// The status code that answers this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed(_) => 400,
            Self::HeadTooLarge => 431,
            Self::BodyTooLarge => 413,
            Self::LengthRequired => 411,
            Self::Version => 505,
        }
    }
}

/// Parses the request at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD {
                Err(HttpError::HeadTooLarge)
            } else {
                Ok(None)
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::Malformed(format!(
                "more than {MAX_HEADERS} headers"
            )))
        }
        Err(httparse::Error::Version) => return Err(HttpError::Version),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let mut content_length: Option<usize> = None;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| HttpError::Malformed("bad Content-Length".into()))?;
            // Digits only, so the one failure is overflow: certainly too large.
            let n: usize = value.parse().map_err(|_| HttpError::BodyTooLarge)?;
            if content_length.is_some_and(|m| m != n) {
                return Err(HttpError::Malformed("conflicting Content-Length".into()));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired);
        }
    }
    let len = content_length.unwrap_or(0);
    if len > MAX_BODY {
        return Err(HttpError::BodyTooLarge);
    }
    // httparse fills these whenever it reports Complete.
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Err(HttpError::Malformed("no request line".into()));
    };
    if !target.starts_with('/') {
        return Err(HttpError::Malformed(
            "the request target must be a path".into(),
        ));
    }
    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or(target)
        .to_string();
    let method = method.to_string();
    let Some(body) = buf.get(head_len..head_len + len) else {
        return Ok(None);
    };
    Ok(Some(Request {
        method,
        path,
        body: body.to_vec(),
    }))
}

/// A response: status, a JSON body, and an `Allow` header for 405s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
    pub allow: Option<&'static str>,
    /// `application/json` unless made by [`Response::text`].
    pub content_type: &'static str,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self {
            status,
            body: body.to_string() + "\n",
            allow: None,
            content_type: "application/json",
        }
    }

    /// A plain text response of `content_type`.
    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            body,
            allow: None,
            content_type,
        }
    }

    /// An error response: `{"error": message}`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Self {
        Self::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    /// The bytes on the wire; the connection closes after them.
    pub fn encode(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(allow) = self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// The reason phrase of the status codes the API uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_parses_a_request_with_a_body_and_a_query() {
        let raw = b"PUT /v1/vm/shutdown?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\n\r\n{\"timeout_s\": 5}";
        let req = parse(raw).unwrap().unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/v1/vm/shutdown");
        assert_eq!(req.body, b"{\"timeout_s\": 5}");
    }

    #[test]
    fn http_waits_for_the_head_and_the_body() {
        let raw = b"PUT /v1/vm/pause HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        for cut in 0..raw.len() {
            assert_eq!(parse(&raw[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(raw).unwrap().is_some());
    }

    #[test]
    fn http_refuses_what_it_does_not_serve() {
        let cases: &[(&[u8], u16)] = &[
            (
                b"GET /v1/vm HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                413,
            ),
            (
                b"GET /v1/vm HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                413,
            ),
            (b"GET /v1/vm HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (
                b"GET /v1/vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                400,
            ),
            (
                b"PUT /v1/vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                411,
            ),
            (b"GET /v1/vm HTTP/2.0\r\n\r\n", 505),
            (b"GET http://x/v1/vm HTTP/1.1\r\n\r\n", 400),
            (b"\x00\x01\x02 garbage\r\n\r\n", 400),
        ];
        for (raw, status) in cases {
            let err = parse(raw).expect_err(&String::from_utf8_lossy(raw));
            assert_eq!(err.status(), *status, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn http_refuses_an_endless_head() {
        let mut raw = b"GET /v1/vm HTTP/1.1\r\n".to_vec();
        while raw.len() <= MAX_HEAD {
            raw.extend_from_slice(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let err = parse(&raw).unwrap_err();
        assert!(matches!(
            err,
            HttpError::HeadTooLarge | HttpError::Malformed(_)
        ));
        let long_line = [b"GET /".as_slice(), &vec![b'a'; MAX_HEAD + 1]].concat();
        assert_eq!(parse(&long_line), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn http_response_encodes_status_length_and_allow() {
        let mut r = Response::error(405, "use PUT");
        r.allow = Some("PUT");
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: PUT\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "use PUT");
    }
}
