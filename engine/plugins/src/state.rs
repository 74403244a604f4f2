//! What one call's `Store` holds, and the host side of the imports plugins call: logging,
//! configuration, the master's files, the tier's peers, and the outbound-HTTP gate.

use crate::bindings::customizer::mint::plugin::master::{self, DirEntry, FileStat, FsError};
use crate::bindings::customizer::mint::plugin::tier::{self, Peer};
use crate::bindings::policy::mint::plugin::{host, types};
use crate::manifest::HostPattern;
use crate::master::{EmptyMaster, MasterView};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// The most log lines one call keeps; later ones are counted.
pub const MAX_LOG_LINES: usize = 1_000;
/// The most bytes of one log line (message and fields) the host keeps.
pub const MAX_LOG_LINE_BYTES: usize = 4_096;
/// What the host keeps of a guest's stdout and stderr. A guest that writes more gets a
/// write error (a Rust guest then panics), so a flood fails only its own call.
pub const OUTPUT_CAPACITY: usize = 64 * 1024;
/// The most peers one `tier.peers` call returns.
pub const MAX_PEERS_PER_CALL: u32 = 4_096;

/// A log line a plugin wrote.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LogLine {
    /// `trace`, `debug`, `info`, `warn` or `error`.
    pub level: &'static str,
    /// The message.
    pub message: String,
    /// Key/value fields.
    pub fields: Vec<(String, String)>,
}

/// The inputs of one call beyond its arguments.
#[derive(Clone)]
pub struct CallInputs {
    /// The configuration as a JSON object's text.
    pub config_json: String,
    /// The master a customizer reads.
    pub master: Arc<dyn MasterView>,
    /// The tier's instances, by index, for `tier.peers`.
    pub peers: Arc<[Peer]>,
    /// Destinations granted for this call only (the node's own management endpoints).
    pub endpoints: Vec<Endpoint>,
    /// The URL of the artifact a driver call is about: the driver may read (GET, HEAD)
    /// it and what lies under it (its descriptor and parts), nothing else of the engine.
    pub artifact: Option<String>,
    /// How the engine's certificate is trusted when the driver reads that artifact.
    pub artifact_tls: Option<crate::endpoint_tls::EndpointTrust>,
    /// Whether this `status` call checks a running instance's health.
    pub checking_health: bool,
}

impl Default for CallInputs {
    fn default() -> Self {
        Self {
            config_json: "{}".into(),
            master: Arc::new(EmptyMaster),
            peers: Arc::from(Vec::new()),
            endpoints: Vec::new(),
            artifact: None,
            artifact_tls: None,
            checking_health: false,
        }
    }
}

/// A node endpoint one driver call may reach.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Its scheme, host and port.
    pub pattern: HostPattern,
    /// The `Authorization` value the host adds to requests to it, if the operator (or the
    /// engine, for its agents) holds credentials for it. The plugin never sees it.
    pub authorization: Option<crate::credentials::Authorization>,
    /// How its certificate is trusted; none: the system's roots.
    pub tls: Option<crate::endpoint_tls::EndpointTrust>,
}

/// Store data of one call.
pub struct CallState {
    pub(crate) plugin: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    http: WasiHttpCtx,
    hooks: Gate,
    pub(crate) limits: Limits,
    pub(crate) inputs: CallInputs,
    pub(crate) logs: Vec<LogLine>,
    pub(crate) dropped_logs: usize,
    pub(crate) stderr: MemoryOutputPipe,
    /// When the call's wall-clock limit ends it, for `host.remaining-ms`.
    pub(crate) deadline: Instant,
    /// Time spent running the guest's own code (not in host imports).
    pub(crate) guest: GuestClock,
}

/// Counts the wall time the guest's own code runs, from wasmtime's call hooks: entering
/// wasm (a call, or a host import returning) starts the clock, leaving it (a return, or a
/// call of a host import, where waits happen) stops it.
#[derive(Default)]
pub(crate) struct GuestClock {
    since: Option<Instant>,
    pub(crate) total: std::time::Duration,
}

impl GuestClock {
    pub(crate) fn hook(&mut self, hook: wasmtime::CallHook) {
        use wasmtime::CallHook as H;
        match hook {
            H::CallingWasm | H::ReturningFromHost => self.since = Some(Instant::now()),
            H::ReturningFromWasm | H::CallingHost => {
                if let Some(s) = self.since.take() {
                    self.total += s.elapsed();
                }
            }
        }
    }
}

impl CallState {
    pub(crate) fn new(
        plugin: Arc<str>,
        memory_bytes: usize,
        outbound: Arc<[HostPattern]>,
        inputs: CallInputs,
        deadline: Instant,
        fencing_token: u64,
    ) -> Self {
        let stderr = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        // No preopened directories, no environment, no arguments, no sockets: WASI is
        // linked because guests built by Rust import it, not to give them anything.
        let wasi = wasmtime_wasi::WasiCtxBuilder::new()
            .stdout(MemoryOutputPipe::new(OUTPUT_CAPACITY))
            .stderr(stderr.clone())
            .build();
        let denied = Arc::new(Mutex::new(Vec::new()));
        let allowed = if inputs.endpoints.is_empty() {
            outbound
        } else {
            outbound
                .iter()
                .chain(inputs.endpoints.iter().map(|e| &e.pattern))
                .cloned()
                .collect::<Vec<_>>()
                .into()
        };
        let endpoints = inputs.endpoints.clone();
        let artifact = inputs
            .artifact
            .as_deref()
            .and_then(ArtifactGrant::of)
            .map(|mut a| {
                a.tls = inputs.artifact_tls.clone();
                a
            });
        Self {
            hooks: Gate {
                allowed,
                endpoints,
                artifact,
                denied,
                tls_refused: Arc::default(),
                waited_ns: Arc::new(AtomicU64::new(0)),
                fencing_token,
            },
            deadline,
            guest: GuestClock::default(),
            plugin,
            wasi,
            table: ResourceTable::new(),
            http: WasiHttpCtx::new(),
            limits: Limits {
                memory_bytes,
                exceeded: false,
            },
            inputs,
            logs: Vec::new(),
            dropped_logs: 0,
            stderr,
        }
    }

    /// What the guest wrote to stderr, as text, trimmed to its last 4 KiB.
    pub(crate) fn stderr_text(&self) -> String {
        let bytes = self.stderr.contents();
        let tail = &bytes[bytes.len().saturating_sub(4096)..];
        String::from_utf8_lossy(tail).trim().to_string()
    }

    /// How long this call waited on outbound HTTP requests (until their answers' heads).
    pub(crate) fn waited(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.hooks.waited_ns.load(Ordering::Relaxed))
    }

    /// The outbound requests the gate refused during this call.
    pub(crate) fn denied(&self) -> Vec<String> {
        self.hooks
            .denied
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    /// Why the host refused endpoints' certificates, with the fix, one line each.
    pub(crate) fn tls_refused(&self) -> Vec<String> {
        self.hooks
            .tls_refused
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }
}

/// Memory limiter that remembers whether it refused a growth, so a memory bomb is told
/// apart from other traps.
pub(crate) struct Limits {
    memory_bytes: usize,
    pub(crate) exceeded: bool,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.exceeded = true;
            // Trapping, rather than answering -1 to `memory.grow`, stops a guest that
            // would otherwise retry or limp on.
            return Err(wasmtime::format_err!(
                "memory limit of {} bytes reached",
                self.memory_bytes
            ));
        }
        Ok(true)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// The outbound-HTTP gate: a request leaves only for a granted destination, carries the
/// operator's credentials only to the endpoint they were configured for, goes out through
/// the host's own client with the TLS trust chosen for that endpoint, and is timed, so
/// that a call's time splits into time in the sandbox and time waiting on the network.
struct Gate {
    allowed: Arc<[HostPattern]>,
    endpoints: Vec<Endpoint>,
    artifact: Option<ArtifactGrant>,
    denied: Arc<Mutex<Vec<String>>>,
    tls_refused: Arc<Mutex<Vec<String>>>,
    waited_ns: Arc<AtomicU64>,
    /// The engine's fencing token as a leader, 0 for none.
    fencing_token: u64,
}

/// The header that carries the engine's fencing token to node endpoints.
pub const FENCING_TOKEN_HEADER: &str = "mint-fencing-token";

/// Read access to one artifact's URL and what lies under it.
struct ArtifactGrant {
    origin: HostPattern,
    path: String,
    tls: Option<crate::endpoint_tls::EndpointTrust>,
}

impl ArtifactGrant {
    fn of(url: &str) -> Option<ArtifactGrant> {
        let origin = HostPattern::of_url(url).ok()?;
        let rest = url.split_once("://")?.1;
        let path = rest
            .find('/')
            .map(|i| rest[i..].trim_end_matches('/').to_string())?;
        Some(ArtifactGrant {
            origin,
            path,
            tls: None,
        })
    }

    fn admits(
        &self,
        method: &http::Method,
        scheme: &str,
        host: &str,
        port: u16,
        path: &str,
    ) -> bool {
        // Dot segments, encoded or not, could climb out of the artifact on a server or proxy
        // that normalises them; an artifact's own paths never contain them.
        let lower = path.to_ascii_lowercase();
        let climbs = lower.split('/').any(|seg| seg == ".." || seg == ".")
            || lower.contains("%2e")
            || lower.contains("%2f")
            || lower.contains('\\');
        let under = path == self.path
            || path
                .strip_prefix(&self.path)
                .is_some_and(|r| r.starts_with('/'));
        (method == http::Method::GET || method == http::Method::HEAD)
            && self.origin.matches(scheme, host, port)
            && under
            && !climbs
    }
}

impl WasiHttpHooks for Gate {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
                )>,
            > + Send,
    > {
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("https").to_string();
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        let path = uri.path().to_string();
        let admitted = self.allowed.iter().any(|p| p.matches(&scheme, &host, port))
            || self
                .artifact
                .as_ref()
                .is_some_and(|a| a.admits(request.method(), &scheme, &host, port, &path));
        if !admitted {
            if let Ok(mut d) = self.denied.lock() {
                d.push(format!("{scheme}://{host}:{port}"));
            }
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let mut request = request;
        let endpoint = self
            .endpoints
            .iter()
            .find(|e| e.pattern.matches(&scheme, &host, port));
        // The host's credentials replace whatever the guest set: a plugin can neither read
        // them nor send other ones in their place to this endpoint.
        if let Some(auth) = endpoint.and_then(|e| e.authorization.as_ref()) {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, auth.header_value());
        }
        // Only the host states the token, so a plugin cannot speak for a newer leader.
        request.headers_mut().remove(FENCING_TOKEN_HEADER);
        if endpoint.is_some() && self.fencing_token > 0 {
            request.headers_mut().insert(
                FENCING_TOKEN_HEADER,
                http::HeaderValue::from(self.fencing_token),
            );
        }
        let engine = self
            .artifact
            .as_ref()
            .filter(|a| a.origin.matches(&scheme, &host, port))
            .and_then(|a| a.tls.clone());
        let trust = match endpoint.and_then(|e| e.tls.clone()).or(engine) {
            Some(t) => Ok(t),
            None => crate::endpoint_tls::system(),
        };
        let origin = format!("{scheme}://{host}:{port}");
        let waited = self.waited_ns.clone();
        let refused = self.tls_refused.clone();
        Box::new(async move {
            let started = Instant::now();
            let trust = match trust {
                Ok(t) => t,
                Err(why) if scheme == "https" => {
                    push(&refused, format!("{origin}: {why}"));
                    return Err(wasmtime_wasi_http::Error::Tls(std::io::Error::other(why)));
                }
                // Plain HTTP needs no trust anchors.
                Err(_) => crate::endpoint_tls::EndpointTrust {
                    trust: Arc::new(insecure()),
                    from: String::new(),
                },
            };
            if scheme == "https" && *trust.trust.trust() == mint_tls::Trust::Insecure {
                tracing::warn!(endpoint = %origin, from = %trust.from, "TLS certificate NOT verified: tls = \"insecure\"");
            }
            let mut presented = None;
            let answer =
                crate::outbound::send(request, options, &trust.trust, &mut presented).await;
            if let Err(wasmtime_wasi_http::Error::Tls(e)) = &answer {
                let seen = presented.and_then(|p| p.pin());
                push(&refused, refusal(&origin, &trust, e, seen));
            }
            waited.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            answer
        })
    }
}

fn push(list: &Mutex<Vec<String>>, line: String) {
    if let Ok(mut l) = list.lock()
        && !l.contains(&line)
        && l.len() < 16
    {
        l.push(line);
    }
}

/// A trust that checks nothing, for plain-HTTP requests (which never use it).
fn insecure() -> mint_tls::ClientTrust {
    mint_tls::ClientTrust::new(&mint_tls::Trust::Insecure).expect("insecure trust needs no files")
}

/// Says why `origin`'s certificate was refused and what in mint.toml would admit it.
fn refusal(
    origin: &str,
    trust: &crate::endpoint_tls::EndpointTrust,
    error: &std::io::Error,
    seen: Option<mint_tls::Pin>,
) -> String {
    let key = match seen {
        Some(p) => format!("; the certificate's key is {p}"),
        None => String::new(),
    };
    let pin = seen
        .map(|p| p.to_string())
        .unwrap_or_else(|| "sha256:...".into());
    format!(
        "{origin}: TLS refused under {} ({}): {error}{key}. If that is the endpoint's own certificate, add to mint.toml `[[endpoint]]` with `endpoint = \"{origin}\"` (or `node = \"NAME\"`) and `tls = {{ pin = \"{pin}\" }}`, or `tls = {{ ca = \"FILE\" }}` with the CA that signed it, then send the daemon SIGHUP",
        trust.trust.trust(),
        trust.from
    )
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl types::Host for CallState {}

fn clip(mut s: String, budget: &mut usize) -> String {
    if s.len() > *budget {
        let mut at = *budget;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    *budget -= s.len();
    s
}

impl host::Host for CallState {
    fn log(&mut self, level: types::LogLevel, message: String, fields: Vec<(String, String)>) {
        if self.logs.len() >= MAX_LOG_LINES {
            self.dropped_logs += 1;
            return;
        }
        let level = match level {
            types::LogLevel::Trace => "trace",
            types::LogLevel::Debug => "debug",
            types::LogLevel::Info => "info",
            types::LogLevel::Warn => "warn",
            types::LogLevel::Error => "error",
        };
        let mut budget = MAX_LOG_LINE_BYTES;
        let message = clip(message, &mut budget);
        let fields = fields
            .into_iter()
            .take(32)
            .map(|(k, v)| (clip(k, &mut budget), clip(v, &mut budget)))
            .collect();
        tracing::debug!(plugin = %self.plugin, level, %message, "plugin log");
        self.logs.push(LogLine {
            level,
            message,
            fields,
        });
    }

    fn config(&mut self) -> String {
        self.inputs.config_json.clone()
    }

    fn remaining_ms(&mut self) -> u64 {
        self.deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as u64
    }

    fn checking_health(&mut self) -> bool {
        self.inputs.checking_health
    }
}

impl master::Host for CallState {
    fn stat(&mut self, path: String) -> Result<Option<FileStat>, FsError> {
        self.inputs.master.stat(&path)
    }
    fn read_file(&mut self, path: String, max_bytes: u64) -> Result<Option<Vec<u8>>, FsError> {
        self.inputs.master.read_file(&path, max_bytes)
    }
    fn list_dir(&mut self, path: String) -> Result<Option<Vec<DirEntry>>, FsError> {
        self.inputs.master.list_dir(&path)
    }
    fn read_link(&mut self, path: String) -> Result<Option<String>, FsError> {
        self.inputs.master.read_link(&path)
    }
}

impl tier::Host for CallState {
    fn peers(&mut self, start: u32, len: u32) -> Vec<Peer> {
        let all = &self.inputs.peers;
        let start = (start as usize).min(all.len());
        let end = start
            .saturating_add(len.min(MAX_PEERS_PER_CALL) as usize)
            .min(all.len());
        all[start..end].to_vec()
    }
}
