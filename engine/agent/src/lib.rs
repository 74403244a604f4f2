//! `mint-agent`: the daemon on each node. It registers the node with the engine, sends
//! heartbeats with the node's load, and on the engine's command (through the `agent`
//! driver) fetches an instance's artifact, checks its digest, makes it the node's root,
//! brings up the instance's pre-assigned address and starts its service; on undeploy it
//! stops the service and releases the address. With `--vm` the node is a VM host slot: a
//! disk instance boots as a QEMU guest on the node's tap. `mint-agent hello` is the tiny
//! service a test master carries: it answers HTTP with the instance's host name and address.
//!
//! The `mint-agent` binary (in the `mint` package, beside `mint`) is [`main`].

mod boot;
mod cache;
mod confine;
mod instance;
mod vm;
mod write_disk;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::{Parser, Subcommand};
use instance::{DeployRequest, Slot};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser)]
#[command(name = "mint-agent", version, about = "mint's node agent.")]
struct Cli {
    /// How log lines on stderr are written: `text` (`mint-agent: ...`) or `json` for a
    /// log collector (one object per line: timestamp, level, target, fields). The level
    /// is `MINT_LOG`'s (`info` by default).
    #[arg(
        long,
        global = true,
        env = "MINT_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Sends the agent's log lines to stderr in `format`: as `mint-agent: MESSAGE` for people
/// (what the agent has always written), or as JSON objects.
fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MINT_LOG").unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.event_format(Plain).init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// The text format: `mint-agent: ` and the event's fields, nothing else.
struct Plain;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Plain
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "mint-agent: ")?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the node: register, heartbeat, deploy on command.
    Run(RunArgs),
    /// The deploy system's job (on mint's deploy ISO): write the deployment's raw master to
    /// this machine's disk, report to the engine, power off.
    WriteDisk(write_disk::WriteArgs),
    /// The boot stage's job (on mint's boot stage initramfs): the instance's address up,
    /// its parts fetched, checked and unpacked into `--root`, the boot reported.
    Boot(boot::BootArgs),
    /// The test service: answer HTTP on $MINT_ADDRESS with the instance's identity.
    Hello {
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// The engine's URL; several, comma-separated, for a site of several daemons (any of
    /// them will do: a follower passes writes on to the leader, and the agent moves to the
    /// next URL when one does not answer).
    #[arg(long)]
    engine: String,
    /// This node's name.
    #[arg(long)]
    name: String,
    /// Where to serve the agent's API.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// The agent's URL as the engine reaches it (default http://LISTEN).
    #[arg(long)]
    advertise: Option<String>,
    /// Where instance roots live.
    #[arg(long)]
    root: PathBuf,
    /// The interface instance addresses go on.
    #[arg(long, default_value = "eth0")]
    interface: String,
    /// A label, KEY=VALUE; repeatable.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Cpus to report (default: the machine's).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory to report in MiB (default: the machine's).
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Heartbeat period.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Read the load (0-1000) from this file instead of /proc/loadavg.
    #[arg(long)]
    load_file: Option<PathBuf>,
    /// The OCI runtime tree instances' services run confined under (their root as `/`,
    /// their own mount, UTS, PID and IPC namespaces, the node's network).
    #[arg(long, default_value = "crun")]
    oci_runtime: PathBuf,
    /// Set the host name of the agent's UTS namespace to the instance's (run the agent in
    /// its own UTS namespace, as `unshare --uts`, when this is on).
    #[arg(long)]
    set_hostname: bool,
    /// The one-time join token `mint node enroll NAME` printed, traded at the first
    /// registration for the node's own credential (prefer --join-token-file: arguments
    /// are visible to every user of the machine).
    #[arg(long, env = "MINT_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// A file holding the join token.
    #[arg(long)]
    join_token_file: Option<PathBuf>,
    /// Where masters are cached by digest (default ROOT/cache). Instance roots are built
    /// on the cached master, so keep it on the same file system as ROOT.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// The cache's bound in bytes; the least recently used masters no instance runs on
    /// are removed beyond it.
    #[arg(long, default_value_t = 20 << 30)]
    cache_max_bytes: u64,
    /// Build instance roots by sharing the cached master's files (clones, else hard
    /// links) instead of an overlay mount.
    #[arg(long)]
    no_overlay: bool,
    /// Trust the engine's certificate when it chains to the CA certificates in this PEM
    /// file (for an https:// --engine).
    #[arg(long, conflicts_with = "pin")]
    ca: Option<PathBuf>,
    /// Trust exactly the engine certificate whose key has this pin (`sha256:...`, as
    /// `mint daemon` prints). Without --ca or --pin, an https:// engine must have a
    /// certificate the system trusts; the agent never trusts one on first use.
    #[arg(long)]
    pin: Option<String>,
    /// The certificate chain (PEM) the agent serves its API with. Without it (and
    /// --tls-key), the agent makes a self-signed one in ROOT/tls at first start; either way
    /// it tells the engine the key's pin when it registers.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    vm: vm::VmArgs,
}

/// The agent's state, shared by the API and the deploy worker.
pub struct Agent {
    args: RunArgs,
    /// The HTTP client for the engine, trusting what --ca or --pin say.
    pub(crate) http: ureq::Agent,
    /// The pin of the certificate the agent's API serves.
    pin: mint_tls::Pin,
    slot: Mutex<Slot>,
    /// The node's cache of masters.
    pub(crate) cache: Arc<cache::Cache>,
    /// The node's credentials, once it has joined (kept in ROOT/credential, mode 0600).
    credential: Mutex<Option<Credentials>>,
    /// The highest fencing token a deploy or undeploy came with (kept in
    /// ROOT/fencing-token): a request with a lower one is from a leader that has since been
    /// replaced, and is refused.
    fencing: Mutex<u64>,
    /// Which of the engine's URLs the agent talks to now.
    engine_at: std::sync::atomic::AtomicUsize,
}

/// The header the engine's leader sends its fencing token in.
const FENCING_TOKEN_HEADER: &str = "mint-fencing-token";

impl Agent {
    /// The engine's URL the agent talks to now, without a trailing slash.
    fn engine(&self) -> String {
        let urls: Vec<&str> = self.args.engine.split(',').map(str::trim).collect();
        let i = self.engine_at.load(std::sync::atomic::Ordering::Relaxed) % urls.len();
        urls[i].trim_end_matches('/').to_string()
    }

    /// Moves to the engine's next URL, after the current one did not answer.
    fn next_engine(&self) {
        if self.args.engine.contains(',') {
            self.engine_at
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Admits a deploy or undeploy by its fencing token: a request with a lower token than
    /// the highest seen is from a deposed leader. A higher one is remembered on disk before
    /// the request runs, so a restarted agent still refuses the old leader.
    fn admit(&self, headers: &axum::http::HeaderMap) -> Result<(), Response> {
        let token = match headers.get(FENCING_TOKEN_HEADER) {
            None => 0,
            Some(v) => v.to_str().ok().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| {
                fail(
                    StatusCode::BAD_REQUEST,
                    format!("header {FENCING_TOKEN_HEADER}: not a number; the engine sends the decimal token of its leader"),
                )
            })?,
        };
        let mut highest = self.fencing.lock().unwrap_or_else(|p| p.into_inner());
        if token < *highest {
            return Err(fail(
                StatusCode::CONFLICT,
                format!(
                    "fenced: this request's fencing token {token} is older than {}, which a newer leader sent; only the current leader may deploy or undeploy",
                    *highest
                ),
            ));
        }
        if token > *highest {
            let path = self.args.root.join("fencing-token");
            let tmp = self.args.root.join("fencing-token.new");
            std::fs::write(&tmp, token.to_string())
                .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
                .and_then(|_| std::fs::rename(&tmp, &path))
                .map_err(|e| {
                    fail(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!(
                            "cannot record fencing token {token} in {}: {e}",
                            path.display()
                        ),
                    )
                })?;
            *highest = token;
        }
        Ok(())
    }
}

/// What a node gets when it joins: its own credential, which it sends to the engine, and
/// the engine's, which the engine sends to it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Credentials {
    /// The node's, for the engine.
    node: String,
    /// The engine's, for this agent's API.
    engine: String,
}

/// Where the agent keeps its node's credential.
fn credential_path(args: &RunArgs) -> PathBuf {
    args.root.join("credential")
}

impl Agent {
    /// The credential the agent sends to the engine, if it has joined.
    pub fn credential(&self) -> Option<String> {
        self.credential
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.node.clone())
    }

    /// Whether `header` (an `Authorization` value) carries the engine's credential for this
    /// node, compared in constant time.
    fn is_engine(&self, header: Option<&str>) -> bool {
        let held = self
            .credential
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| c.engine.clone());
        let (Some(held), Some(given)) = (held, header.and_then(|h| h.strip_prefix("Bearer ")))
        else {
            return false;
        };
        let (a, b) = (held.as_bytes(), given.trim().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// `request` with the node's credential, when it has one.
    pub fn authorized(&self, request: ureq::Request) -> ureq::Request {
        match self.credential() {
            Some(c) => request.set("Authorization", &format!("Bearer {c}")),
            None => request,
        }
    }

    /// Keeps a new credential: in memory, and in a file only this user may read.
    fn keep_credentials(&self, credentials: Credentials) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = credential_path(&self.args);
        let staged = path.with_extension("new");
        let _ = std::fs::remove_file(&staged);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&staged)
            .with_context(|| format!("writing {}", staged.display()))?;
        let text = serde_json::to_vec(&credentials)?;
        f.write_all(&text)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", staged.display()))?;
        std::fs::rename(&staged, &path).with_context(|| format!("writing {}", path.display()))?;
        *self.credential.lock().unwrap_or_else(|p| p.into_inner()) = Some(credentials);
        Ok(())
    }
}

fn machine_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

fn machine_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")
                    .map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
        })
        .flatten()
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

fn macs() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(mac) = std::fs::read_to_string(e.path().join("address")) {
            let mac = mac.trim().to_string();
            if mac != "00:00:00:00:00:00" && !mac.is_empty() {
                out.push(mac);
            }
        }
    }
    // A bridge takes the address of its first port: each MAC once.
    out.sort();
    out.dedup();
    out
}

fn load(args: &RunArgs) -> u32 {
    match &args.load_file {
        Some(f) => std::fs::read_to_string(f)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0),
        None => std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .map(|l| ((l / f64::from(machine_cpus())) * 1000.0).min(1000.0) as u32)
            .unwrap_or(0),
    }
}

fn register(agent: &Agent, agent_url: &str) -> anyhow::Result<()> {
    let args = &agent.args;
    let labels: BTreeMap<String, String> = args
        .labels
        .iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    let body = json!({
        "name": args.name, "cpus": args.cpus.unwrap_or_else(machine_cpus), "memory-mib": args.memory_mib.unwrap_or_else(machine_memory_mib),
        "arch": std::env::consts::ARCH, "labels": labels, "agent-url": agent_url, "agent-pin": agent.pin.to_string(), "macs": macs(),
    });
    let engine = agent.engine();
    let url = format!("{engine}/v1/agents/register");
    // The node's own credential once it has one; the join token only to get it.
    let bearer = match (agent.credential(), join_token(args)?) {
        (Some(c), _) => c,
        (None, Some(j)) => j,
        (None, None) => anyhow::bail!(
            "no credential for node `{}`: give --join-token-file FILE with the token `mint node enroll {}` prints",
            args.name,
            args.name
        ),
    };
    let answer = agent
        .http
        .post(&url)
        .timeout(Duration::from_secs(10))
        .set("Authorization", &format!("Bearer {bearer}"))
        .send_json(body);
    let v: serde_json::Value = match answer {
        Ok(r) => r
            .into_json()
            .with_context(|| format!("registering with {engine}: the answer is not JSON"))?,
        Err(ureq::Error::Status(code, r)) => {
            let v: serde_json::Value = r.into_json().unwrap_or_default();
            anyhow::bail!(
                "registering with {engine} was refused ({code}): {}",
                v["error"].as_str().unwrap_or("no reason given")
            );
        }
        Err(e) => {
            agent.next_engine();
            return Err(e).with_context(|| format!("registering with {engine}"));
        }
    };
    if let (Some(node), Some(engine)) = (v["credential"].as_str(), v["engine-credential"].as_str())
    {
        agent.keep_credentials(Credentials {
            node: node.into(),
            engine: engine.into(),
        })?;
    }
    Ok(())
}

/// The join token from --join-token or --join-token-file, if given.
fn join_token(args: &RunArgs) -> anyhow::Result<Option<String>> {
    if let Some(t) = &args.join_token {
        return Ok(Some(t.trim().to_string()));
    }
    match &args.join_token_file {
        Some(f) => Ok(Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("--join-token-file {}", f.display()))?
                .trim()
                .to_string(),
        )),
        None => Ok(None),
    }
}

/// Registers, then heartbeats forever; registers again when the engine does not know the
/// node (its state was reset, or the node was removed). When the engine answers that this
/// node must not run what it runs (it was declared failed meanwhile), the agent fences
/// itself: it stops the instance and releases its address.
fn heartbeat_loop(agent: Arc<Agent>, agent_url: String) {
    let args = &agent.args;
    let mut registered = false;
    loop {
        if !registered {
            match register(&agent, &agent_url) {
                Ok(()) => registered = true,
                Err(e) => tracing::warn!("{e:#}; retrying"),
            }
        } else {
            let url = format!("{}/v1/nodes/{}/heartbeat", agent.engine(), args.name);
            let instance = instance::current(&agent)
                .map(|(tier, index)| json!({ "tier": tier, "index": index }));
            // What the instance is doing (a service that died makes it failed), so the
            // engine needs no status call of its own to check this node's health.
            let status = serde_json::to_value(instance::status(&agent)).unwrap_or_default();
            // The masters it caches, so policies can prefer a node that need not fetch one.
            let body = json!({ "load": load(args), "instance": instance, "state": status["state"], "detail": status["detail"], "cached": agent.cache.digests() });
            match agent
                .authorized(agent.http.post(&url))
                .timeout(Duration::from_secs(5))
                .send_json(body)
            {
                Ok(resp) => {
                    let v: serde_json::Value = resp.into_json().unwrap_or_default();
                    if v["fence"] == true {
                        tracing::warn!(
                            "fenced: {}",
                            v["reason"].as_str().unwrap_or("the engine says so")
                        );
                        if let Err(e) = instance::stop(&agent) {
                            tracing::error!("cannot stop the fenced instance: {e}");
                        }
                    }
                }
                Err(ureq::Error::Status(404, _)) => registered = false,
                Err(ureq::Error::Status(401, _)) => {
                    tracing::warn!(
                        "the engine no longer knows this node's credential (the node was removed?); registering again"
                    );
                    registered = false;
                }
                Err(e) => {
                    tracing::warn!("heartbeat: {e}");
                    if matches!(
                        e,
                        ureq::Error::Transport(_) | ureq::Error::Status(502..=503, _)
                    ) {
                        agent.next_engine();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(args.heartbeat_ms.max(50)));
    }
}

/// Every route of the agent's API answers only the engine: a request without the
/// engine's credential for this node is refused (401) before anything runs.
async fn engine_only(
    State(agent): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !agent.is_engine(header) {
        return fail(
            StatusCode::UNAUTHORIZED,
            "only the engine, with its credential for this node, may call this agent",
        );
    }
    next.run(req).await
}

fn fail(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn deploy(
    State(agent): State<Arc<Agent>>,
    headers: axum::http::HeaderMap,
    req: Result<Json<DeployRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(refused) = agent.admit(&headers) {
        return refused;
    }
    let req = match req {
        Ok(Json(r)) => r,
        Err(e) => {
            return fail(
                StatusCode::BAD_REQUEST,
                format!("request body: {}", e.body_text()),
            );
        }
    };
    match instance::start(&agent, req) {
        Ok(status) => Json(status).into_response(),
        Err(message) => fail(StatusCode::CONFLICT, message),
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    Json(instance::status(&agent)).into_response()
}

async fn undeploy(State(agent): State<Arc<Agent>>, headers: axum::http::HeaderMap) -> Response {
    if let Err(refused) = agent.admit(&headers) {
        return refused;
    }
    let a = agent.clone();
    match tokio::task::spawn_blocking(move || instance::stop(&a)).await {
        Ok(Ok(())) => Json(instance::status(&agent)).into_response(),
        Ok(Err(e)) => fail(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.root)
        .with_context(|| format!("creating {}", args.root.display()))?;
    let http = engine_client(&args)?;
    let source = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => mint_tls::ServerSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ => mint_tls::ServerSource::SelfSigned {
            dir: args.root.join("tls"),
            names: vec![args.listen.ip().to_string()],
        },
    };
    let cert = mint_tls::ServerCert::load(source).context("the agent's certificate")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let listener = mint_tls::Incoming::tls(listener, cert.acceptor())
        .with_context(|| format!("listening on {}", args.listen))?;
    let agent_url = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("https://{}", args.listen));
    let credential: Option<Credentials> = std::fs::read(credential_path(&args))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let cache_dir = args
        .cache
        .clone()
        .unwrap_or_else(|| args.root.join("cache"));
    let cache = cache::Cache::open(&cache_dir, args.cache_max_bytes)
        .with_context(|| format!("opening the cache {}", cache_dir.display()))?;
    let agent = Arc::new(Agent {
        args: args.clone(),
        http,
        pin: cert.pin(),
        slot: Mutex::new(Slot::default()),
        cache,
        credential: Mutex::new(credential),
        engine_at: std::sync::atomic::AtomicUsize::new(0),
        fencing: Mutex::new(
            std::fs::read_to_string(args.root.join("fencing-token"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0),
        ),
    });
    tracing::info!(
        "cache {}: {} master(s), {} bytes (bound {})",
        cache_dir.display(),
        agent.cache.digests().len(),
        agent.cache.bytes(),
        args.cache_max_bytes
    );
    instance::restore(&agent);
    let (hb_agent, hb_url) = (agent.clone(), agent_url.clone());
    std::thread::spawn(move || heartbeat_loop(hb_agent, hb_url));
    tracing::info!(
        "{}: serving {agent_url} (certificate key {}), engine {}",
        args.name,
        cert.pin(),
        args.engine
    );
    let app = Router::new()
        .route("/v1/deploy", post(deploy))
        .route("/v1/status", get(status))
        .route("/v1/undeploy", post(undeploy))
        .layer(axum::middleware::from_fn_with_state(
            agent.clone(),
            engine_only,
        ))
        .with_state(agent.clone());
    let stop = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await?;
    // The instance keeps running: an agent restarted (an upgrade, say) takes it up again
    // from what it saved, and the engine fences it if the node was declared failed meanwhile.
    drop(agent);
    Ok(())
}

/// The client for the engine: trusting --ca or --pin, else the system's roots.
fn engine_client(args: &RunArgs) -> anyhow::Result<ureq::Agent> {
    let Some(trust) = mint_tls::Trust::from_flags(
        args.ca.as_deref(),
        args.pin.as_deref(),
        args.engine.split(',').next().unwrap_or_default().trim(),
    )
    .context("--pin")?
    else {
        return Ok(crate::write_disk::stall_timeouts(ureq::AgentBuilder::new()).build());
    };
    let trust = mint_tls::ClientTrust::new(&trust).context("--ca/--pin")?;
    Ok(crate::write_disk::stall_timeouts(ureq::AgentBuilder::new())
        .tls_config(trust.config())
        .build())
}

/// The `mint-agent` command line.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Hello { port } => instance::hello(port),
        Command::WriteDisk(args) => write_disk::run(args),
        Command::Boot(args) => boot::run(args),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(args))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
