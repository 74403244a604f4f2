//! The CLI's commands that talk to a running daemon over its HTTP/JSON API, printing
//! tables for people and JSON with `--json`.
//!
//! Exit codes: 0 success; 1 the daemon refused or failed the request; 2 bad usage or
//! input; 4 the daemon could not be reached.

use crate::Failure;
use anyhow::anyhow;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;

/// Where the daemon is and how to print.
#[derive(Args, Clone)]
pub struct Conn {
    /// The daemon's address.
    #[arg(
        long,
        global = true,
        env = "MINT_SERVER",
        default_value = "http://127.0.0.1:7600"
    )]
    server: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Progress bars on stderr for imports and minting: `auto` draws them when stderr is a
    /// terminal, `always` also when it is not, `never` not at all.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    progress: ProgressMode,
    /// A file holding the bearer token to send (the token itself may be given in the
    /// MINT_TOKEN environment variable instead). Without either, a daemon on this host
    /// is asked where its first admin token is, and that file is used if this user may
    /// read it.
    #[arg(long, global = true, env = "MINT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Trust the daemon's certificate when it chains to the CA certificates in this PEM
    /// file (for an https:// --server).
    #[arg(long, global = true, env = "MINT_CA", conflicts_with = "pin")]
    ca: Option<PathBuf>,
    /// Trust exactly the daemon certificate whose key has this pin (`sha256:...`, as
    /// `mint daemon` prints and writes to DATA_DIR/server.pin). Without --ca or --pin, an
    /// https:// daemon must have a certificate the system trusts.
    #[arg(long, global = true, env = "MINT_PIN")]
    pin: Option<String>,
    /// The token, once found.
    #[arg(skip)]
    token: std::sync::Arc<std::sync::OnceLock<Option<String>>>,
    /// The HTTP client, once made.
    #[arg(skip)]
    agent: std::sync::Arc<std::sync::OnceLock<Result<ureq::Agent, String>>>,
}

/// When to draw progress bars.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// When stderr is a terminal.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

impl Conn {
    /// The bearer token to send: `--token-file`, else `MINT_TOKEN`, else the admin token
    /// file a daemon on this host names in its health answer (given only to callers on the
    /// same host), if readable. Found once per command.
    fn token(&self) -> Result<Option<String>, Failure> {
        if let Some(t) = self.token.get() {
            return Ok(t.clone());
        }
        let found = if let Some(f) = &self.token_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| Failure::usage(anyhow!("--token-file {}: {e}", f.display())))?;
            Some(text.trim().to_string())
        } else if let Some(t) = std::env::var("MINT_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
        {
            Some(t.trim().to_string())
        } else {
            self.local_token_file()
                .and_then(|f| std::fs::read_to_string(f).ok())
                .map(|t| t.trim().to_string())
        };
        let _ = self.token.set(found.clone());
        Ok(found)
    }

    /// Where a daemon on this host keeps its first admin token, as its health answer says.
    fn local_token_file(&self) -> Option<PathBuf> {
        let host = self.server.split("://").nth(1)?.split('/').next()?;
        let host = host
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let local = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback());
        if !local {
            return None;
        }
        let v: Value = self
            .agent()
            .ok()?
            .get(&url(self, "/v1/health"))
            .timeout(std::time::Duration::from_secs(10))
            .call()
            .ok()?
            .into_json()
            .ok()?;
        v["token-file"].as_str().map(PathBuf::from)
    }

    /// The HTTP client, trusting what `--ca` or `--pin` say (the system's roots without).
    pub(crate) fn agent(&self) -> Result<ureq::Agent, Failure> {
        let made = self
            .agent
            .get_or_init(|| self.build_agent(ureq::AgentBuilder::new()));
        made.clone().map_err(|e| Failure::usage(anyhow!(e)))
    }

    /// A client for a stream that stays open: reads time out after `read_timeout` of
    /// silence (the daemon sends something at least every 15 s), so a dead connection is
    /// noticed.
    pub(crate) fn streaming_agent(
        &self,
        read_timeout: std::time::Duration,
    ) -> Result<ureq::Agent, Failure> {
        self.build_agent(ureq::AgentBuilder::new().timeout_read(read_timeout))
            .map_err(|e| Failure::usage(anyhow!(e)))
    }

    fn build_agent(&self, builder: ureq::AgentBuilder) -> Result<ureq::Agent, String> {
        let trust =
            mint_tls::Trust::from_flags(self.ca.as_deref(), self.pin.as_deref(), &self.server)
                .map_err(|e| format!("--pin: {e}"))?;
        let Some(trust) = trust else {
            return Ok(builder.build());
        };
        let trust = mint_tls::ClientTrust::new(&trust).map_err(|e| format!("--ca/--pin: {e}"))?;
        Ok(builder.tls_config(trust.config()).build())
    }

    /// The bearer token's `Authorization` value, if there is a token.
    pub(crate) fn authorization(&self) -> Result<Option<String>, Failure> {
        Ok(self.token()?.map(|t| format!("Bearer {t}")))
    }

    /// A request with the token, if any.
    pub(crate) fn request(&self, method: &str, path: &str) -> Result<ureq::Request, Failure> {
        let mut r = self.agent()?.request(method, &url(self, path));
        if let Some(t) = self.token()? {
            r = r.set("Authorization", &format!("Bearer {t}"));
        }
        Ok(r)
    }

    fn bars(&self) -> bool {
        use std::io::IsTerminal;
        match self.progress {
            ProgressMode::Always => true,
            ProgressMode::Never => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        }
    }
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// Import a master image (a path on the daemon's host): a directory, a tar archive
    /// (plain, gzip or zstd), an OCI image layout, or a qcow2 or raw disk image.
    Import {
        path: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// The format the source must be; read from its contents when not given.
        #[arg(long, value_parser = ["dir", "tar", "tar+gzip", "tar+zstd", "oci", "qcow2", "raw"])]
        format: Option<String>,
    },
    /// List images.
    List,
    /// Show one image, by digest or name, and the tiers that use it.
    Show { image: String },
    /// Delete an image no tier uses.
    Delete { image: String },
    /// Remove masters no tier uses and blobs no instance refers to.
    Gc {
        /// Keep every imported master, used or not; collect only derived blobs.
        #[arg(long)]
        keep_masters: bool,
    },
}

/// The daemon's plugin commands.
pub enum PluginRequest {
    /// Install a package with its signature, if any.
    Install {
        package: PathBuf,
        signature: Option<PathBuf>,
        unsigned: bool,
    },
    /// List every plugin.
    List,
    /// Show one.
    Inspect { name: String },
    /// Remove an installed one.
    Remove { name: String },
}

#[derive(Subcommand)]
pub enum TierCommand {
    /// Create a tier from a TOML or JSON file and mint all its instances.
    Create {
        #[arg(long, short)]
        file: PathBuf,
    },
    /// List tiers.
    List,
    /// Show one tier.
    Show { name: String },
    /// Delete a tier whose instances are all in the pool (scale it to 0 first).
    Delete { name: String },
    /// Move a tier to a new master (digest or name): its instances are re-minted with the
    /// same identities and the deployed ones roll to it, `--batch` at a time.
    UpdateImage {
        name: String,
        image: String,
        #[arg(long, default_value_t = 1)]
        batch: u32,
    },
    /// Set how many instances of a tier run. The daemon records the intent and answers at
    /// once; this waits, drawing progress, until the tier reaches it or is blocked.
    Scale {
        name: String,
        #[arg(allow_negative_numbers = true)]
        instances: i64,
        /// Return once the intent is recorded; `mint tier show` follows it.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds (the intent stands).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Show a tier's instances and draw them again as they change, until interrupted.
    Watch {
        name: String,
        /// Stop once the tier has reached its intent (exit 0).
        #[arg(long)]
        until_settled: bool,
    },
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Add a node to the inventory.
    Add {
        name: String,
        #[arg(long)]
        cpus: u32,
        #[arg(long)]
        memory_mib: u64,
        #[arg(long, default_value = "x86_64")]
        arch: String,
        /// A label, as `zone=a`; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// A driver property, as `agent-url=http://...`; repeatable.
        #[arg(long = "property", value_name = "KEY=VALUE")]
        properties: Vec<String>,
    },
    /// List nodes.
    List,
    /// Issue a one-time join token for node NAME: its agent trades it for its own
    /// credential (`mint-agent run --join-token-file FILE`). Printed once, or written to
    /// `--output` (mode 0600).
    Enroll {
        name: String,
        /// A label the node gets, as `zone=a`; repeatable.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// How long the token works: `90s`, `30m`, `1h`, `2d` (at most 7d).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Write the token to this new file (mode 0600) instead of printing it.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Remove a node that holds no instance.
    Remove { name: String },
    /// Set a node free (repaired), in maintenance (never selected), or failed (its instance
    /// is redeployed elsewhere with the same identity).
    State {
        name: String,
        #[arg(value_parser = ["free", "maintenance", "failed"])]
        state: String,
        /// Why, for the event log.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create an operator token. It is shown once: printed, or written to `--output`
    /// (a new file, mode 0600); the daemon keeps only its hash.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["admin", "read-only"])]
        role: String,
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// List tokens: names, roles, creation times (never a token).
    List,
    /// Revoke a token: it authenticates nothing from now on.
    Revoke { name: String },
}

/// Seconds in a duration written as `90s`, `30m`, `1h` or `2d`.
fn parse_ttl(text: &str) -> Result<u64, Failure> {
    let bad = || {
        Failure::usage(anyhow!(
            "--ttl `{text}`: write a whole number with s, m, h or d, as `1h`"
        ))
    };
    let (n, unit) = text.split_at(text.len().saturating_sub(1));
    let n: u64 = n.parse().map_err(|_| bad())?;
    let per = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(per).filter(|s| *s > 0).ok_or_else(bad)
}

/// Hands a secret to the operator once: into a new file with mode 0600, or on stdout.
fn hand_over(secret: &str, output: Option<&PathBuf>, what: &str) -> Result<(), Failure> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match output {
        Some(path) => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| {
                    Failure::usage(anyhow!(
                        "--output {}: {e} (it must be a new file)",
                        path.display()
                    ))
                })?;
            f.write_all(format!("{secret}\n").as_bytes())
                .map_err(|e| Failure::usage(anyhow!("--output {}: {e}", path.display())))?;
            eprintln!(
                "{what} written to {} (mode 0600); it is not shown again",
                path.display()
            );
        }
        None => {
            println!("{secret}");
            eprintln!("{what} shown once; the daemon keeps only its hash");
        }
    }
    Ok(())
}

pub fn token(conn: &Conn, cmd: TokenCommand) -> Result<(), Failure> {
    match cmd {
        TokenCommand::Create { name, role, output } => {
            let v = call(
                conn,
                "POST",
                "/v1/tokens",
                Some(json!({ "name": name, "role": role })),
            )?;
            hand_over(
                v["token"].as_str().unwrap_or_default(),
                output.as_ref(),
                &format!("token `{name}` ({role})"),
            )?;
        }
        TokenCommand::List => {
            let v = call(conn, "GET", "/v1/tokens", None)?;
            print(conn, &v, |v| {
                println!("{:<20} {:<10} CREATED-MS", "NAME", "ROLE");
                for t in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<10} {}",
                        s(&t["name"]),
                        s(&t["role"]),
                        s(&t["created-ms"])
                    );
                }
            });
        }
        TokenCommand::Revoke { name } => {
            let v = call(conn, "DELETE", &format!("/v1/tokens/{name}"), None)?;
            print(conn, &v, |_| println!("token {name} revoked"));
        }
    }
    Ok(())
}

pub(crate) fn url(conn: &Conn, path: &str) -> String {
    format!("{}{path}", conn.server.trim_end_matches('/'))
}

/// Sends a request and returns the JSON answer, mapping failures to exit codes.
/// The daemon's refusal of a request, in the words of its `{"error": ...}` body.
pub(crate) fn refusal(code: u16, r: ureq::Response) -> Failure {
    let v: Value = r.into_json().unwrap_or(Value::Null);
    let msg = v["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {code}"));
    Failure::call(anyhow!("{msg}"))
}

pub(crate) fn call(
    conn: &Conn,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let req = conn
        .request(method, path)?
        .timeout(std::time::Duration::from_secs(300));
    let resp = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match resp {
        Ok(r) => r
            .into_json()
            .map_err(|e| Failure::call(anyhow!("the daemon's answer is not JSON: {e}"))),
        Err(ureq::Error::Status(code, r)) => Err(refusal(code, r)),
        Err(e @ ureq::Error::Transport(_)) => call_failure(conn, e),
    }
}

/// Sends a long operation (an import, a tier creation), drawing its progress from the
/// daemon's NDJSON stream when bars are wanted; otherwise as [`call`].
fn call_with_progress(conn: &Conn, path: &str, body: Value) -> Result<Value, Failure> {
    use std::io::BufRead;
    if !conn.bars() {
        return call(conn, "POST", path, Some(body));
    }
    let resp = conn
        .request("POST", path)?
        .timeout(std::time::Duration::from_secs(3600))
        .set("Accept", "application/x-ndjson")
        .send_json(body);
    let resp = match resp {
        Ok(r) => r,
        // Refused before the work started (a malformed body): an ordinary JSON error.
        Err(ureq::Error::Status(code, r)) => return Err(refusal(code, r)),
        Err(e @ ureq::Error::Transport(_)) => return call_failure(conn, e),
    };
    let mut bar = Bar::default();
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line
            .map_err(|e| Failure::call(anyhow!("the daemon's progress stream broke off: {e}")))?;
        let v: Value = serde_json::from_str(&line).map_err(|e| {
            Failure::call(anyhow!(
                "the daemon sent a progress line that is not JSON: {e}"
            ))
        })?;
        if let Some(p) = v.get("progress") {
            bar.draw(
                p["phase"].as_str().unwrap_or("working"),
                p["done"].as_u64().unwrap_or(0),
                p["total"].as_u64().unwrap_or(0),
            );
        } else if let Some(r) = v.get("result") {
            bar.finish();
            return Ok(r.clone());
        } else {
            bar.finish();
            return Err(Failure::call(anyhow!(
                "{}",
                v["error"]
                    .as_str()
                    .unwrap_or("the daemon reported a failure without a message")
            )));
        }
    }
    bar.finish();
    Err(Failure::call(anyhow!(
        "the daemon's progress stream ended without a result; check `mint events`"
    )))
}

pub(crate) fn call_failure<T>(conn: &Conn, e: ureq::Error) -> Result<T, Failure> {
    // ureq's own text leaves out the cause (a certificate refused, and why).
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(&format!(": {more}"));
        }
        source = s.source();
    }
    let hint = if text.to_ascii_lowercase().contains("certificate") {
        "; trust the daemon's certificate with --pin sha256:... (the daemon prints it and keeps it in DATA_DIR/server.pin) or --ca FILE"
    } else {
        "; start it with `mint daemon` or set --server"
    };
    Err(Failure {
        code: 4,
        error: anyhow!(
            "cannot reach the mint daemon at {}: {text}{hint}",
            conn.server
        ),
    })
}

/// A one-line progress bar on stderr, redrawn in place.
#[derive(Default)]
struct Bar {
    drawn: bool,
}

impl Bar {
    fn draw(&mut self, phase: &str, done: u64, total: u64) {
        use std::io::Write;
        const WIDTH: u64 = 30;
        let line = if total == 0 {
            format!("{phase:<10} ...")
        } else {
            let filled = (done.min(total) * WIDTH / total) as usize;
            format!(
                "{phase:<10} [{}{}] {done}/{total} {:>3}%",
                "#".repeat(filled),
                "-".repeat(WIDTH as usize - filled),
                done * 100 / total
            )
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line:<60}");
        let _ = err.flush();
        self.drawn = true;
    }

    fn finish(&mut self) {
        if std::mem::take(&mut self.drawn) {
            eprintln!();
        }
    }
}

pub(crate) fn print(conn: &Conn, v: &Value, table: impl FnOnce(&Value)) {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        table(v);
    }
}

fn pairs(list: &[String], flag: &str) -> Result<Value, Failure> {
    let mut m = serde_json::Map::new();
    for item in list {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| Failure::usage(anyhow!("--{flag} `{item}` must be KEY=VALUE")))?;
        m.insert(k.to_string(), json!(v));
    }
    Ok(Value::Object(m))
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub fn image(conn: &Conn, cmd: ImageCommand) -> Result<(), Failure> {
    match cmd {
        ImageCommand::Import { path, name, format } => {
            let abs = std::fs::canonicalize(&path)
                .map_err(|e| Failure::usage(anyhow!("cannot read {}: {e}", path.display())))?;
            let v = call_with_progress(
                conn,
                "/v1/images",
                json!({"path": abs, "name": name, "format": format}),
            )?;
            print(conn, &v, |v| {
                println!(
                    "imported {} as {} ({} entries, {} bytes)",
                    s(&v["name"]),
                    s(&v["digest"]),
                    v["entries"],
                    v["size"]
                )
            });
        }
        ImageCommand::List => {
            let v = call(conn, "GET", "/v1/images", None)?;
            print(conn, &v, |v| {
                println!("{:<20} {:<10} {:>10}  DIGEST", "NAME", "FORMAT", "BYTES");
                for i in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<10} {:>10}  {}",
                        s(&i["name"]),
                        s(&i["format"]),
                        s(&i["size"]),
                        s(&i["digest"])
                    );
                }
            });
        }
        ImageCommand::Delete { image } => {
            let v = call(conn, "DELETE", &format!("/v1/images/{image}"), None)?;
            print(conn, &v, |v| {
                println!(
                    "image {} ({}) deleted",
                    s(&v["deleted"]["name"]),
                    s(&v["deleted"]["digest"])
                )
            });
        }
        ImageCommand::Gc { keep_masters } => {
            let v = call(
                conn,
                "POST",
                "/v1/images/gc",
                Some(json!({ "keep-masters": keep_masters })),
            )?;
            print(conn, &v, |v| {
                println!(
                    "removed {} masters, {} blobs, {} overlays, {} staging directories; {} bytes freed",
                    v["masters"].as_array().map(Vec::len).unwrap_or(0),
                    s(&v["blobs"]),
                    s(&v["overlays"]),
                    s(&v["staging"]),
                    s(&v["bytes_freed"])
                )
            });
        }
        ImageCommand::Show { image } => {
            let v = call(conn, "GET", &format!("/v1/images/{image}"), None)?;
            print(conn, &v, |v| {
                let i = &v["image"];
                println!(
                    "name     {}\ndigest   {}\nformat   {}\nbytes    {}\nentries  {}",
                    s(&i["name"]),
                    s(&i["digest"]),
                    s(&i["format"]),
                    s(&i["size"]),
                    s(&i["entries"])
                );
                let tiers: Vec<String> =
                    v["tiers"].as_array().into_iter().flatten().map(s).collect();
                println!(
                    "tiers    {}",
                    if tiers.is_empty() {
                        "-".into()
                    } else {
                        tiers.join(", ")
                    }
                );
            });
        }
    }
    Ok(())
}

/// Reads a tier file: TOML, or JSON when it ends in `.json`.
fn read_spec(file: &PathBuf) -> Result<Value, Failure> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::usage(anyhow!("cannot read {}: {e}", file.display())))?;
    if file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).map_err(|e| Failure::usage(anyhow!("{}: {e}", file.display())))
    } else {
        let t: toml::Value = toml::from_str(&text)
            .map_err(|e| Failure::usage(anyhow!("{}: {e}", file.display())))?;
        serde_json::to_value(t).map_err(|e| Failure::usage(anyhow!("{}: {e}", file.display())))
    }
}

fn tier_row(v: &Value) {
    let t = &v["tier"];
    println!(
        "{:<16} {:>4} {:>8} {:>8}  {:<18} {:<16} {}",
        s(&t["name"]),
        s(&t["max_instances"]),
        s(&t["desired"]),
        s(&v["deployed"]),
        s(&t["plan"]["subnet"]),
        s(&t["hostname"]),
        s(&t["policy"]["plugin"])
    );
}

fn tier_header() {
    println!(
        "{:<16} {:>4} {:>8} {:>8}  {:<18} {:<16} POLICY",
        "TIER", "K", "DESIRED", "DEPLOYED", "SUBNET", "HOSTNAME"
    );
}

pub fn tier(conn: &Conn, cmd: TierCommand) -> Result<(), Failure> {
    match cmd {
        TierCommand::Create { file } => {
            let spec = read_spec(&file)?;
            let v = call_with_progress(conn, "/v1/tiers", spec)?;
            print(conn, &v, |v| {
                println!(
                    "tier {} created: {} instances minted in {}",
                    s(&v["name"]),
                    s(&v["max_instances"]),
                    s(&v["plan"]["subnet"])
                )
            });
        }
        TierCommand::List => {
            let v = call(conn, "GET", "/v1/tiers", None)?;
            print(conn, &v, |v| {
                tier_header();
                v.as_array().into_iter().flatten().for_each(tier_row);
            });
        }
        TierCommand::Show { name } => {
            let v = call(conn, "GET", &format!("/v1/tiers/{name}"), None)?;
            print(conn, &v, |v| {
                tier_header();
                tier_row(v);
                let st = &v["status"];
                let c = &st["counts"];
                println!(
                    "instances: {} deployed, {} deploying, {} undeploying, {} failed, {} pooled; {}",
                    s(&c["deployed"]),
                    s(&c["deploying"]),
                    s(&c["undeploying"]),
                    s(&c["failed"]),
                    s(&c["pooled"]),
                    if st["settled"] == true {
                        "settled"
                    } else {
                        "in progress"
                    }
                );
                for f in st["in-flight"].as_array().into_iter().flatten() {
                    println!(
                        "in flight: {name}/{} {} on node {}",
                        s(&f["index"]),
                        s(&f["action"]),
                        s(&f["node"])
                    );
                }
                if let Some(b) = st["blocked"].as_str() {
                    println!("blocked: {b}");
                }
                if let Some(f) = st["last-failure"].as_str() {
                    println!("last driver failure: {f}");
                }
            });
        }
        TierCommand::Delete { name } => {
            let v = call(conn, "DELETE", &format!("/v1/tiers/{name}"), None)?;
            print(conn, &v, |_| println!("tier {name} deleted"));
        }
        TierCommand::UpdateImage { name, image, batch } => {
            let v = call_with_progress(
                conn,
                &format!("/v1/tiers/{name}/image"),
                json!({ "image": image, "batch": batch }),
            )?;
            print(conn, &v, |v| {
                println!(
                    "tier {name} re-minted at revision {}; deployed instances roll {batch} at a time",
                    s(&v["revision"])
                )
            });
        }
        TierCommand::Scale {
            name,
            instances,
            no_wait,
            timeout,
        } => scale(conn, &name, instances, no_wait, timeout)?,
        TierCommand::Watch {
            name,
            until_settled,
        } => crate::watch::tier_watch(conn, &name, until_settled)?,
    }
    Ok(())
}

/// `mint tier scale`: records the intent, then follows the tier until it is settled (every
/// wanted instance deployed, none on its way or leaving), blocked, or changed by someone
/// else.
fn scale(
    conn: &Conn,
    name: &str,
    instances: i64,
    no_wait: bool,
    timeout: Option<u64>,
) -> Result<(), Failure> {
    let before = call(conn, "GET", &format!("/v1/tiers/{name}/instances"), None)?;
    let v = call(
        conn,
        "POST",
        &format!("/v1/tiers/{name}/scale"),
        Some(json!({ "instances": instances })),
    )?;
    let generation = v["generation"].as_u64().unwrap_or(0);
    if no_wait {
        print(conn, &v, |v| {
            println!(
                "tier {name} scaling to {instances} (generation {generation}): {} to deploy, {} to undeploy; `mint tier show {name}` follows it",
                s(&v["will"]["deploy"]),
                s(&v["will"]["undeploy"])
            )
        });
        return Ok(());
    }
    let deadline = timeout.map(|t| std::time::Instant::now() + std::time::Duration::from_secs(t));
    let mut bar = Bar::default();
    let draw = conn.bars() && !conn.json;
    let last = loop {
        let t = call(conn, "GET", &format!("/v1/tiers/{name}"), None)?;
        let st = &t["status"];
        if st["settled"] == true {
            break t;
        }
        if t["tier"]["generation"].as_u64().unwrap_or(0) > generation {
            bar.finish();
            return Err(Failure::call(anyhow!(
                "tier {name} was changed again (generation {}) while scaling to {instances}; `mint tier show {name}`",
                s(&t["tier"]["generation"])
            )));
        }
        let idle = st["in-flight"].as_array().is_none_or(|a| a.is_empty());
        if st["observed-generation"].as_u64().unwrap_or(0) >= generation
            && idle
            && st["blocked"].is_string()
        {
            bar.finish();
            let failure = st["last-failure"]
                .as_str()
                .map(|f| format!("; the last driver failure: {f}"))
                .unwrap_or_default();
            return Err(Failure::call(anyhow!(
                "tier {name} is blocked short of {instances} instances: {}{failure}",
                s(&st["blocked"])
            )));
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            bar.finish();
            return Err(Failure::call(anyhow!(
                "tier {name} did not reach {instances} instances in time; the intent stands, `mint tier show {name}` follows it"
            )));
        }
        if draw {
            let c = &st["counts"];
            bar.draw(
                "deploying",
                c["deployed"].as_u64().unwrap_or(0),
                instances.max(0) as u64,
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    bar.finish();
    let after = call(conn, "GET", &format!("/v1/tiers/{name}/instances"), None)?;
    let state = |v: &Value, i: usize| v[i]["state"].as_str().unwrap_or_default().to_string();
    let node = |v: &Value, i: usize| v[i]["node"].as_str().map(str::to_string);
    let n = after.as_array().map_or(0, |a| a.len());
    let pick = |f: &dyn Fn(usize) -> bool| {
        (0..n)
            .filter(|&i| f(i))
            .map(|i| format!("{name}/{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let deployed = pick(&|i| {
        state(&after, i) == "deployed"
            && (state(&before, i) != "deployed" || node(&before, i) != node(&after, i))
    });
    let undeployed = pick(&|i| node(&before, i).is_some() && node(&after, i).is_none());
    let out = json!({ "tier": name, "desired": instances, "generation": generation, "deployed": deployed, "undeployed": undeployed, "status": last["status"] });
    print(conn, &out, |_| {
        println!(
            "tier {name} scaled to {instances}: deployed [{deployed}] undeployed [{undeployed}]"
        )
    });
    Ok(())
}

pub fn node(conn: &Conn, cmd: NodeCommand) -> Result<(), Failure> {
    match cmd {
        NodeCommand::Add {
            name,
            cpus,
            memory_mib,
            arch,
            labels,
            properties,
        } => {
            let body = json!({
                "name": name, "cpus": cpus, "memory-mib": memory_mib, "arch": arch,
                "labels": pairs(&labels, "label")?, "properties": pairs(&properties, "property")?,
            });
            let v = call(conn, "POST", "/v1/nodes", Some(body))?;
            print(conn, &v, |v| println!("node {} added", s(&v["name"])));
        }
        NodeCommand::List => {
            let v = call(conn, "GET", "/v1/nodes", None)?;
            print(conn, &v, |v| {
                println!(
                    "{:<16} {:<12} {:>4} {:>8}  {:<14} LABELS",
                    "NODE", "STATE", "CPUS", "MEM-MIB", "INSTANCE"
                );
                for n in v.as_array().into_iter().flatten() {
                    let inst = if n["instance"].is_null() {
                        "-".into()
                    } else {
                        format!(
                            "{}/{}",
                            s(&n["instance"]["tier"]),
                            s(&n["instance"]["index"])
                        )
                    };
                    let labels: Vec<String> = n["labels"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={}", s(v)))
                        .collect();
                    println!(
                        "{:<16} {:<12} {:>4} {:>8}  {:<14} {}",
                        s(&n["name"]),
                        s(&n["state"]),
                        s(&n["cpus"]),
                        s(&n["memory_mib"]),
                        inst,
                        labels.join(",")
                    );
                }
            });
        }
        NodeCommand::Enroll {
            name,
            labels,
            ttl,
            output,
        } => {
            let body = json!({ "labels": pairs(&labels, "label")?, "ttl-secs": parse_ttl(&ttl)? });
            let v = call(
                conn,
                "POST",
                &format!("/v1/nodes/{name}/enroll"),
                Some(body),
            )?;
            hand_over(
                v["join-token"].as_str().unwrap_or_default(),
                output.as_ref(),
                &format!("join token for node `{name}` (valid {ttl}, once)"),
            )?;
        }
        NodeCommand::Remove { name } => {
            let v = call(conn, "DELETE", &format!("/v1/nodes/{name}"), None)?;
            print(conn, &v, |_| println!("node {name} removed"));
        }
        NodeCommand::State {
            name,
            state,
            reason,
        } => {
            let v = call(
                conn,
                "POST",
                &format!("/v1/nodes/{name}/state"),
                Some(json!({ "state": state, "reason": reason })),
            )?;
            print(conn, &v, |v| println!("node {name} is {}", s(&v["state"])));
        }
    }
    Ok(())
}

pub fn instances(conn: &Conn, tier: &str) -> Result<(), Failure> {
    let v = call(conn, "GET", &format!("/v1/tiers/{tier}/instances"), None)?;
    print(conn, &v, |v| {
        println!(
            "{:<14} {:>5}  {:<16} {:<28} {:<12} NODE",
            "TIER", "INDEX", "HOSTNAME", "ADDRESS", "STATE"
        );
        for i in v.as_array().into_iter().flatten() {
            println!(
                "{:<14} {:>5}  {:<16} {:<28} {:<12} {}",
                s(&i["id"]["tier"]),
                s(&i["id"]["index"]),
                s(&i["hostname"]),
                s(&i["address"]),
                s(&i["state"]),
                s(&i["node"])
            );
        }
    });
    Ok(())
}

pub fn materialize(
    conn: &Conn,
    tier: &str,
    index: u32,
    into: &std::path::Path,
) -> Result<(), Failure> {
    // A path below the daemon's materialize root, on the daemon's host: sent as given.
    let v = call(
        conn,
        "POST",
        &format!("/v1/tiers/{tier}/instances/{index}/materialize"),
        Some(json!({ "into": into })),
    )?;
    print(conn, &v, |v| {
        println!(
            "{tier}/{index} materialized in {}: {} files by {}, {} bytes copied, {} edits",
            s(&v["into"]),
            s(&v["files"]),
            s(&v["method"]),
            s(&v["bytes_copied"]),
            s(&v["edits"])
        )
    });
    Ok(())
}

pub fn events(conn: &Conn, tier: Option<String>, after: Option<u64>) -> Result<(), Failure> {
    let mut q = vec![];
    if let Some(t) = tier {
        q.push(format!("tier={t}"));
    }
    if let Some(a) = after {
        q.push(format!("after={a}"));
    }
    let v = call(conn, "GET", &format!("/v1/events?{}", q.join("&")), None)?;
    print(conn, &v, |v| {
        for e in v.as_array().into_iter().flatten() {
            println!("{}", crate::watch::event_row(e));
        }
    });
    Ok(())
}

/// `mint netboot dnsmasq-config [--interface IF]`: the dnsmasq configuration that serves
/// the engine's network boot, as the daemon renders it from its tiers and bindings.
pub fn dnsmasq_config(conn: &Conn, interface: Option<String>) -> Result<(), Failure> {
    let resp = conn
        .request("GET", "/v1/netboot/dnsmasq")?
        .timeout(std::time::Duration::from_secs(60))
        .call();
    let text = match resp {
        Ok(r) => r
            .into_string()
            .map_err(|e| Failure::call(anyhow!("reading the daemon's answer: {e}")))?,
        Err(ureq::Error::Status(code, r)) => return Err(refusal(code, r)),
        Err(e @ ureq::Error::Transport(_)) => return call_failure(conn, e),
    };
    if let Some(i) = interface {
        println!("interface={i}");
    }
    print!("{text}");
    Ok(())
}

/// `mint apply -f FILE`: creates the nodes (`[[node]]`) and tiers (`[[tier]]`) a TOML or
/// JSON file declares and that do not exist yet. A declared tier or node that exists is
/// left as it is; applying the same file twice changes nothing.
pub fn apply(conn: &Conn, file: &PathBuf) -> Result<(), Failure> {
    let doc = read_spec(file)?;
    let known = |k: &str| -> Result<(), Failure> {
        match doc.as_object() {
            Some(o) => match o.keys().find(|key| *key != "node" && *key != "tier") {
                Some(bad) => Err(Failure::usage(anyhow!(
                    "{}: unknown section `{bad}`; use [[node]] and [[tier]]",
                    file.display()
                ))),
                None => Ok(()),
            },
            None => Err(Failure::usage(anyhow!(
                "{}: expected a table of [[node]] and [[tier]] ({k})",
                file.display()
            ))),
        }
    };
    known("top level")?;
    let list = |key: &str| {
        doc.get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let nodes = call(conn, "GET", "/v1/nodes", None)?;
    let have_node = |name: &str| {
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"] == name)
    };
    let tiers = call(conn, "GET", "/v1/tiers", None)?;
    let have_tier = |name: &str| {
        tiers
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["tier"]["name"] == name)
    };
    let (mut created, mut kept) = (Vec::new(), Vec::new());
    for n in list("node") {
        let name = n["name"]
            .as_str()
            .ok_or_else(|| Failure::usage(anyhow!("{}: a [[node]] has no `name`", file.display())))?
            .to_string();
        if have_node(&name) {
            kept.push(format!("node {name}"));
        } else {
            call(conn, "POST", "/v1/nodes", Some(n))?;
            created.push(format!("node {name}"));
        }
    }
    for t in list("tier") {
        let name = t["name"]
            .as_str()
            .ok_or_else(|| Failure::usage(anyhow!("{}: a [[tier]] has no `name`", file.display())))?
            .to_string();
        if have_tier(&name) {
            kept.push(format!("tier {name}"));
        } else {
            call_with_progress(conn, "/v1/tiers", t)?;
            created.push(format!("tier {name}"));
        }
    }
    let v = json!({ "created": created, "unchanged": kept });
    print(conn, &v, |_| {
        for c in &created {
            println!("created {c}");
        }
        for k in &kept {
            println!("unchanged {k} (exists)");
        }
    });
    Ok(())
}

fn plugin_row(v: &Value) {
    let signer = signer_text(&v["signer"]);
    if let Some(e) = v["error"].as_str() {
        println!("{:<16} does not load: {e}", s(&v["name"]));
        return;
    }
    println!(
        "{:<16} {:<12} {:<9} {:<18} {:<10} {:<22} {}",
        s(&v["name"]),
        s(&v["kind"]),
        s(&v["version"]),
        s(&v["wit"]),
        s(&v["source"]),
        signer,
        s(&v["description"])
    );
}

/// `mint plugin install|list|inspect|remove`, against the daemon.
pub fn plugin(conn: &Conn, req: PluginRequest) -> Result<(), Failure> {
    match req {
        PluginRequest::List => {
            let v = call(conn, "GET", "/v1/plugins", None)?;
            print(conn, &v, |v| {
                println!(
                    "{:<16} {:<12} {:<9} {:<18} {:<10} {:<22} DESCRIPTION",
                    "NAME", "KIND", "VERSION", "WIT", "SOURCE", "SIGNER"
                );
                for p in v.as_array().into_iter().flatten() {
                    plugin_row(p);
                }
            });
        }
        PluginRequest::Inspect { name } => {
            let v = call(conn, "GET", &format!("/v1/plugins/{name}"), None)?;
            // One plugin is best read whole; the table form is the same JSON.
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        }
        PluginRequest::Remove { name } => {
            call(conn, "DELETE", &format!("/v1/plugins/{name}"), None)?;
            if !conn.json {
                println!("removed plugin `{name}`");
            }
        }
        PluginRequest::Install {
            package,
            signature,
            unsigned,
        } => {
            use base64::Engine as _;
            let bytes = std::fs::read(&package).map_err(|e| {
                Failure::usage(anyhow!("cannot read package {}: {e}", package.display()))
            })?;
            if bytes.starts_with(b"\0asm") {
                return Err(Failure::usage(anyhow!(
                    "{} is a bare WebAssembly component; make a package of it and its manifest first: mint plugin pack --manifest plugin.toml --wasm {} -o PACKAGE",
                    package.display(),
                    package.display()
                )));
            }
            let default_sig = PathBuf::from(format!("{}.minisig", package.display()));
            let sig_path = match signature {
                Some(_) if unsigned => {
                    return Err(Failure::usage(anyhow!(
                        "--signature and --unsigned contradict each other; give one"
                    )));
                }
                Some(p) => Some(p),
                None if unsigned => None,
                None if default_sig.is_file() => Some(default_sig),
                None => {
                    return Err(Failure::usage(anyhow!(
                        "no signature: {} does not exist; pass --signature FILE, or --unsigned if the daemon allows unsigned packages",
                        default_sig.display()
                    )));
                }
            };
            let mut req = conn
                .request("POST", "/v1/plugins")?
                .timeout(std::time::Duration::from_secs(600))
                .set("Content-Type", "application/octet-stream");
            if let Some(p) = &sig_path {
                let text = std::fs::read(p).map_err(|e| {
                    Failure::usage(anyhow!("cannot read signature {}: {e}", p.display()))
                })?;
                req = req.set(
                    "Mint-Signature",
                    &base64::engine::general_purpose::STANDARD.encode(text),
                );
            }
            let v: Value = match req.send_bytes(&bytes) {
                Ok(r) => r
                    .into_json()
                    .map_err(|e| Failure::call(anyhow!("the daemon's answer is not JSON: {e}")))?,
                Err(ureq::Error::Status(code, r)) => return Err(refusal(code, r)),
                Err(e @ ureq::Error::Transport(_)) => return call_failure(conn, e),
            };
            print(conn, &v, |v| {
                println!(
                    "installed plugin `{}` {} ({}, {}), signed by {}",
                    s(&v["name"]),
                    s(&v["version"]),
                    s(&v["kind"]),
                    s(&v["wit"]),
                    signer_text(&v["signer"])
                );
            });
        }
    }
    Ok(())
}

fn signer_text(v: &Value) -> String {
    match v {
        Value::Object(o) if o.contains_key("vendor") => {
            let inner = &o["vendor"];
            format!("{} (key {})", s(&inner["vendor"]), s(&inner["key-id"]))
        }
        other => s(other),
    }
}
