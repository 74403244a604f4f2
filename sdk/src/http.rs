//! A small blocking HTTP client for drivers, over `wasi:http`. The host decides where a
//! request may go (the manifest's granted hosts and the node's own endpoints) and adds the
//! operator's credentials for a node's endpoint itself: a driver never handles them.
//!
//! ```ignore
//! let answer = mint_sdk::http::Request::get(&url).timeout(Duration::from_secs(5)).send()?;
//! let system: serde_json::Value = answer.json()?;
//! ```

use std::fmt;
use std::time::Duration;

/// The most bytes of an answer's body a request reads.
pub const MAX_BODY: usize = 4 << 20;

/// An HTTP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// PATCH
    Patch,
    /// PUT
    Put,
    /// DELETE
    Delete,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Patch => "PATCH",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        })
    }
}

/// A request being built.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    timeout: Option<Duration>,
}

/// An answer: its status and body (whatever the status).
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, at most [`MAX_BODY`] bytes.
    pub body: Vec<u8>,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The host refused the destination: not granted to this plugin.
    Denied,
    /// No connection or no answer within the request's timeout.
    Timeout,
    /// The destination refused or dropped the connection.
    Connection(String),
    /// The answer's body exceeds [`MAX_BODY`].
    TooLarge,
    /// The URL or another part of the request is malformed.
    Invalid(String),
    /// Anything else `wasi:http` reports.
    Other(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied => f.write_str(
                "the host denied the request: the destination is not granted to this plugin",
            ),
            HttpError::Timeout => f.write_str("no answer within the timeout"),
            HttpError::Connection(m) => write!(f, "connection failed: {m}"),
            HttpError::TooLarge => write!(f, "the answer exceeds {MAX_BODY} bytes"),
            HttpError::Invalid(m) => write!(f, "invalid request: {m}"),
            HttpError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for HttpError {}

impl Request {
    /// A request of `method` to `url` (`http://host:port/path?query`).
    pub fn new(method: Method, url: &str) -> Request {
        Request {
            method,
            url: url.to_string(),
            headers: Vec::new(),
            body: None,
            timeout: None,
        }
    }
    /// A GET request.
    pub fn get(url: &str) -> Request {
        Request::new(Method::Get, url)
    }
    /// A request with a JSON body.
    pub fn json(method: Method, url: &str, body: &serde_json::Value) -> Request {
        Request::new(method, url)
            .header("content-type", "application/json")
            .body(body.to_string().into_bytes())
    }
    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }
    /// Sets the body.
    pub fn body(mut self, body: Vec<u8>) -> Request {
        self.body = Some(body);
        self
    }
    /// Bounds the time to connect and to the first byte of the answer, each.
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = Some(timeout);
        self
    }
    /// The request's method.
    pub fn method(&self) -> Method {
        self.method
    }
    /// The request's URL.
    pub fn url(&self) -> &str {
        &self.url
    }
    /// The request's body (empty when it has none), for tests that check what a driver
    /// sends.
    pub fn body_bytes(&self) -> &[u8] {
        self.body.as_deref().unwrap_or_default()
    }

    /// Sends the request and reads the whole answer.
    pub fn send(self) -> Result<Response, HttpError> {
        send(self)
    }
}

impl Response {
    /// The body as JSON, or an error that says what came instead.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body).map_err(|e| {
            let start = String::from_utf8_lossy(&self.body[..self.body.len().min(60)])
                .replace(char::is_control, " ");
            if self.body.is_empty() {
                "an empty body instead of JSON".to_string()
            } else {
                format!("malformed JSON ({e}), starting `{start}`")
            }
        })
    }
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

#[cfg(target_arch = "wasm32")]
fn send(r: Request) -> Result<Response, HttpError> {
    use wasi::http::outgoing_handler;
    use wasi::http::types::{
        ErrorCode, Fields, Method as M, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
    };
    let (scheme, rest) = r
        .url
        .split_once("://")
        .ok_or_else(|| HttpError::Invalid(format!("`{}` needs a scheme", r.url)))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let invalid = |what: &str| HttpError::Invalid(format!("{what} of `{}`", r.url));
    let headers = Fields::new();
    for (k, v) in &r.headers {
        headers
            .append(k, v.as_bytes())
            .map_err(|_| invalid("a header"))?;
    }
    let req = OutgoingRequest::new(headers);
    let method = match r.method {
        Method::Get => M::Get,
        Method::Post => M::Post,
        Method::Patch => M::Patch,
        Method::Put => M::Put,
        Method::Delete => M::Delete,
    };
    req.set_method(&method).map_err(|_| invalid("the method"))?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(invalid("the scheme")),
    };
    req.set_scheme(Some(&scheme))
        .map_err(|_| invalid("the scheme"))?;
    req.set_authority(Some(authority))
        .map_err(|_| invalid("the host"))?;
    req.set_path_with_query(Some(path))
        .map_err(|_| invalid("the path"))?;
    let options = r.timeout.map(|t| {
        let o = RequestOptions::new();
        let ns = t.as_nanos() as u64;
        let _ = o.set_connect_timeout(Some(ns));
        let _ = o.set_first_byte_timeout(Some(ns));
        let _ = o.set_between_bytes_timeout(Some(ns));
        o
    });
    let out = req
        .body()
        .map_err(|_| HttpError::Other("no request body".into()))?;
    let pending = outgoing_handler::handle(req, options).map_err(map_error)?;
    if let Some(b) = &r.body {
        let stream = out
            .write()
            .map_err(|_| HttpError::Other("no request stream".into()))?;
        for chunk in b.chunks(4096) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| HttpError::Connection(format!("{e:?}")))?;
        }
        drop(stream);
    }
    OutgoingBody::finish(out, None).map_err(map_error)?;
    pending.subscribe().block();
    let answer = pending
        .get()
        .ok_or_else(|| HttpError::Other("no answer".into()))?;
    let resp = answer
        .map_err(|_| HttpError::Other("answer taken twice".into()))?
        .map_err(map_error)?;
    let status = resp.status();
    let body = resp
        .consume()
        .map_err(|_| HttpError::Other("no answer body".into()))?;
    let stream = body
        .stream()
        .map_err(|_| HttpError::Other("no answer stream".into()))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => {
                bytes.extend(chunk);
                if bytes.len() > MAX_BODY {
                    return Err(HttpError::TooLarge);
                }
            }
            Err(wasi::io::streams::StreamError::Closed) => break,
            Err(wasi::io::streams::StreamError::LastOperationFailed(e)) => {
                return Err(HttpError::Connection(e.to_debug_string()));
            }
        }
    }
    drop(stream);
    // Trailers and the body's own error code: a timeout between bytes shows here.
    if let Some(Err(e)) = wasi::http::types::IncomingBody::finish(body)
        .get()
        .and_then(|r| r.ok())
    {
        return Err(map_error(e));
    }
    let _: Option<ErrorCode> = None;
    Ok(Response {
        status,
        body: bytes,
    })
}

#[cfg(target_arch = "wasm32")]
fn map_error(e: wasi::http::types::ErrorCode) -> HttpError {
    use wasi::http::types::ErrorCode as E;
    match e {
        E::HttpRequestDenied => HttpError::Denied,
        E::ConnectionTimeout
        | E::ConnectionReadTimeout
        | E::ConnectionWriteTimeout
        | E::HttpResponseTimeout => HttpError::Timeout,
        E::ConnectionRefused => HttpError::Connection("refused".into()),
        E::ConnectionTerminated => HttpError::Connection("closed by the peer".into()),
        E::DnsError(_) => HttpError::Connection("the name does not resolve".into()),
        E::HttpProtocolError => HttpError::Connection("not HTTP".into()),
        other => HttpError::Other(format!("{other:?}")),
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn send(r: Request) -> Result<Response, HttpError> {
    crate::testing::http_answer(&r)
}
