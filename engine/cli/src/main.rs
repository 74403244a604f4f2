//! The `mint` command line: plugin tooling and a demonstration of the engine.
//!
//! Exit codes: 0 success; 1 the request failed (the daemon refused it, or a plugin call
//! failed: trap, timeout, refusal, invalid answer); 2 bad usage or input; 3 a plugin could
//! not be loaded; 4 the daemon could not be reached.

mod client;
mod demo;
mod plugin_cmd;
mod shell;
mod watch;

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "mint",
    version,
    about = "Mint image instances up front, deploy them on nodes, scale out from the pool."
)]
struct Cli {
    #[command(flatten)]
    conn: client::Conn,
    /// How log lines on stderr are written: `text` for people, `json` for a log
    /// collector (one object per line: timestamp, level, target, fields).
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

/// How the daemon serves TLS. Plain HTTP is for loopback only.
#[derive(clap::Args)]
struct TlsArgs {
    /// The certificate chain (PEM, end entity first) to serve TLS with; reread on SIGHUP.
    #[arg(long, requires = "tls_key", conflicts_with = "tls_self_signed")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM); reread on SIGHUP.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Serve TLS with a self-signed certificate, made at first start and kept in
    /// DATA_DIR/tls; its key's pin is printed and written to DATA_DIR/server.pin for agents'
    /// and the CLI's `--pin`.
    #[arg(long)]
    tls_self_signed: bool,
}

impl TlsArgs {
    fn source(self, data_dir: &std::path::Path) -> Option<mint_tls::ServerSource> {
        match (self.tls_cert, self.tls_key, self.tls_self_signed) {
            (Some(cert), Some(key), _) => Some(mint_tls::ServerSource::Files { cert, key }),
            (_, _, true) => Some(mint_tls::ServerSource::SelfSigned {
                dir: data_dir.join("tls"),
                names: Vec::new(),
            }),
            _ => None,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugins: run one call, inspect, list the bundled ones.
    #[command(subcommand)]
    Plugin(plugin_cmd::PluginCommand),
    /// Run every bundled plugin through the engine on example inputs and show the results.
    Demo(demo::DemoArgs),
    /// Run the daemon: the HTTP API and the reconciliation loop, state in sled (or etcd).
    Daemon {
        /// Where state, images and compiled plugins live.
        #[arg(long, default_value = "mint-data")]
        data_dir: std::path::PathBuf,
        /// Where the state lives: `sled` (embedded, in DATA_DIR/state) or
        /// etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE] (a cluster on this machine's loopback).
        #[arg(long, default_value = "sled")]
        store: String,
        /// With etcd: the leader's lease in whole seconds (at least 2). A leader that cannot
        /// renew it stops acting after two thirds of it; another daemon leads once it ends.
        #[arg(long, default_value_t = 15)]
        lease_secs: u64,
        /// With etcd: the directory every daemon of the site shares (NFS, say), holding
        /// masters, overlays, seeds and installed plugins (default: DATA_DIR).
        #[arg(long)]
        shared_dir: Option<std::path::PathBuf>,
        /// With etcd: the CA file that issued the other daemons' certificates, for passing
        /// writes to the leader (default: trust this daemon's own certificate, for a site
        /// that gives every daemon the same one).
        #[arg(long)]
        peer_ca: Option<std::path::PathBuf>,
        /// Address to serve the API on (loopback by default).
        #[arg(long, default_value = "127.0.0.1:7600")]
        listen: std::net::SocketAddr,
        /// The URL nodes reach the daemon at, for artifact URLs (default: http://LISTEN).
        #[arg(long)]
        advertise_url: Option<String>,
        /// Seconds an agent's node may miss heartbeats before it is declared failed.
        #[arg(long, default_value_t = 10.0)]
        node_timeout_secs: f64,
        /// The configuration file (trusted plugin keys, grants, BMC credentials, driver
        /// concurrency); default DATA_DIR/mint.toml when it exists.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
        /// Failed authentications one address may make in a minute; past them, every
        /// request from it is answered 429 until the minute ends.
        #[arg(long, default_value_t = mint_daemon::auth::MAX_FAILURES)]
        max_auth_failures: u32,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Master images.
    #[command(subcommand)]
    Image(client::ImageCommand),
    /// Tiers.
    #[command(subcommand)]
    Tier(client::TierCommand),
    /// The node inventory.
    #[command(subcommand)]
    Node(client::NodeCommand),
    /// Operators' bearer tokens.
    #[command(subcommand)]
    Token(client::TokenCommand),
    /// A tier's instances.
    Instance {
        #[command(subcommand)]
        cmd: InstanceCommand,
    },
    /// Create the nodes and tiers a file declares ([[node]], [[tier]]) that do not exist.
    Apply {
        #[arg(long, short)]
        file: std::path::PathBuf,
    },
    /// Network boot.
    #[command(subcommand)]
    Netboot(NetbootCommand),
    /// The event log: every decision with its reasons.
    Events {
        /// Only this tier's events.
        #[arg(long)]
        tier: Option<String>,
        /// Only events after this sequence number.
        #[arg(long)]
        after: Option<u64>,
        /// Keep going: print events as they are recorded (from now, or after --after)
        /// until interrupted; with --json, one object per line.
        #[arg(long, short)]
        follow: bool,
    },
    /// One screen of the site: each tier's counts and pool depth, nodes by state, the
    /// driver calls in flight, and which daemon leads.
    Status,
    /// Print a completion script for a shell, as `source <(mint completion bash)`.
    Completion {
        #[arg(value_enum)]
        shell: shell::Shell,
    },
    /// Write manual pages for mint and every subcommand (mint.1, mint-tier-scale.1, ...).
    Man {
        /// The directory to write them in (created if missing).
        #[arg(long, default_value = "man")]
        out_dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum NetbootCommand {
    /// Print a dnsmasq configuration for the boot network: DHCP only, a static range per
    /// tier subnet, iPXE chained to the daemon's boot listener, the nodes' static leases.
    DnsmasqConfig {
        /// The boot network's interface, written as `interface=` (dnsmasq answers only there).
        #[arg(long)]
        interface: Option<String>,
    },
}

#[derive(Subcommand)]
enum InstanceCommand {
    /// List a tier's instances with their identities and states.
    List { tier: String },
    /// Build an instance's root filesystem in a new directory on the daemon's host, below the
    /// directory its configuration allows (`[materialize] root`).
    Materialize {
        tier: String,
        index: u32,
        /// The directory to create: a path below the daemon's materialize root.
        #[arg(long)]
        into: std::path::PathBuf,
    },
}

/// A failure with the exit code it maps to.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn usage(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 2,
            error: error.into(),
        }
    }
    pub fn load(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 3,
            error: error.into(),
        }
    }
    pub fn call(error: impl Into<anyhow::Error>) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

/// Runs a blocking client call off the async runtime's workers.
async fn blocking(f: impl FnOnce() -> Result<(), Failure> + Send + 'static) -> Result<(), Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Failure::call(anyhow::anyhow!("client task failed: {e}"))))
}

async fn daemon(
    data_dir: std::path::PathBuf,
    options: mint_daemon::Options,
) -> Result<(), Failure> {
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!(target: "mint::daemon", "shutting down");
    };
    let dir = data_dir.clone();
    mint_daemon::serve(&data_dir, options, shutdown, move |ready| {
        tracing::info!(
            target: "mint::daemon",
            "serving {} with state in {}",
            ready.url,
            dir.display()
        );
        if let Some(pin) = ready.pin {
            tracing::info!(
                target: "mint::daemon",
                "certificate key {pin} (clients: --pin {pin}; also in {})",
                dir.join(mint_daemon::PIN_FILE).display()
            );
        }
    })
    .await
    .map_err(|e| Failure::usage(anyhow::anyhow!(e)))
}

/// Sends log lines to stderr, filtered by `MINT_LOG` (`warn` by default), in `format`.
/// The daemon's own lifecycle lines (where it serves, its certificate's pin, its stop)
/// are always written: operators and scripts wait for them.
fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("MINT_LOG").unwrap_or_else(|_| "warn".into());
    let filter = match "mint::daemon=info".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    use std::io::IsTerminal;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Plugin(cmd) => plugin_cmd::run(cmd, &cli.conn).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Daemon {
                data_dir,
                store,
                lease_secs,
                shared_dir,
                peer_ca,
                listen,
                advertise_url,
                node_timeout_secs,
                config,
                max_auth_failures,
                tls,
            } => match (
                std::time::Duration::try_from_secs_f64(node_timeout_secs),
                mint_store::Location::parse(&store, &data_dir.join("state")),
            ) {
                (_, Err(e)) => Err(Failure::usage(anyhow::anyhow!(e))),
                _ if lease_secs < 2 => Err(Failure::usage(anyhow::anyhow!(
                    "--lease-secs: {lease_secs} is too short; etcd grants leases of at least 2 s"
                ))),
                (Ok(t), Ok(state)) if t >= std::time::Duration::from_millis(100) => {
                    let tls = tls.source(&data_dir);
                    let options = mint_daemon::Options {
                        listen,
                        advertise: advertise_url,
                        node_timeout: t,
                        config,
                        max_auth_failures,
                        tls,
                        unauthenticated: false,
                        state: Some(state),
                        lease: Some(std::time::Duration::from_secs(lease_secs)),
                        shared_dir,
                        peer_ca,
                    };
                    daemon(data_dir, options).await
                }
                _ => Err(Failure::usage(anyhow::anyhow!(
                    "--node-timeout-secs: {node_timeout_secs} must be at least 0.1"
                ))),
            },
            Command::Image(c) => blocking(move || client::image(&cli.conn, c)).await,
            Command::Tier(c) => blocking(move || client::tier(&cli.conn, c)).await,
            Command::Node(c) => blocking(move || client::node(&cli.conn, c)).await,
            Command::Token(c) => blocking(move || client::token(&cli.conn, c)).await,
            Command::Instance {
                cmd: InstanceCommand::List { tier },
            } => blocking(move || client::instances(&cli.conn, &tier)).await,
            Command::Instance {
                cmd: InstanceCommand::Materialize { tier, index, into },
            } => blocking(move || client::materialize(&cli.conn, &tier, index, &into)).await,
            Command::Apply { file } => blocking(move || client::apply(&cli.conn, &file)).await,
            Command::Netboot(NetbootCommand::DnsmasqConfig { interface }) => {
                blocking(move || client::dnsmasq_config(&cli.conn, interface)).await
            }
            Command::Events {
                tier,
                after,
                follow: false,
            } => blocking(move || client::events(&cli.conn, tier, after)).await,
            Command::Events {
                tier,
                after,
                follow: true,
            } => blocking(move || watch::events_follow(&cli.conn, tier, after)).await,
            Command::Status => blocking(move || watch::status(&cli.conn)).await,
            Command::Completion { shell } => shell::completion(Cli::command(), shell),
            Command::Man { out_dir } => shell::man(Cli::command(), &out_dir),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
