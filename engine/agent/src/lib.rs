//! `mint-agent`: the daemon on each node. It registers the node with the engine, sends
//! heartbeats with the node's load, and on the engine's command (through the `agent`
//! driver) fetches an instance's artifact, checks its digest, makes it the node's root,
//! brings up the instance's pre-assigned address and starts its service; on undeploy it
//! stops the service and releases the address. `mint-agent hello` is the tiny service a
//! test master carries: it answers HTTP with the instance's host name and address.
//!
//! The `mint-agent` binary (in the `mint` package, beside `mint`) is [`main`].

mod instance;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the node: register, heartbeat, deploy on command.
    Run(RunArgs),
    /// The test service: answer HTTP on $MINT_ADDRESS with the instance's identity.
    Hello {
        #[arg(long, default_value_t = 80)]
        port: u16,
    },
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// The engine's URL.
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
    /// Set the host name of the agent's UTS namespace to the instance's (run the agent in
    /// its own UTS namespace, as `unshare --uts`, when this is on).
    #[arg(long)]
    set_hostname: bool,
}

/// The agent's state, shared by the API and the deploy worker.
pub struct Agent {
    args: RunArgs,
    slot: Mutex<Slot>,
}

fn machine_cpus() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1)
}

fn machine_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find_map(|l| l.strip_prefix("MemTotal:").map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())))
        .flatten()
        .map(|kb| kb / 1024)
        .unwrap_or(1024)
}

fn macs() -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/class/net").into_iter().flatten().flatten() {
        if let Ok(mac) = std::fs::read_to_string(e.path().join("address")) {
            let mac = mac.trim().to_string();
            if mac != "00:00:00:00:00:00" && !mac.is_empty() {
                out.push(mac);
            }
        }
    }
    out.sort();
    out
}

fn load(args: &RunArgs) -> u32 {
    match &args.load_file {
        Some(f) => std::fs::read_to_string(f).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0),
        None => std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .map(|l| ((l / f64::from(machine_cpus())) * 1000.0).min(1000.0) as u32)
            .unwrap_or(0),
    }
}

fn register(args: &RunArgs, agent_url: &str) -> anyhow::Result<()> {
    let labels: BTreeMap<String, String> = args.labels.iter().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
    let body = json!({
        "name": args.name, "cpus": args.cpus.unwrap_or_else(machine_cpus), "memory-mib": args.memory_mib.unwrap_or_else(machine_memory_mib),
        "arch": std::env::consts::ARCH, "labels": labels, "agent-url": agent_url, "macs": macs(),
    });
    ureq::post(&format!("{}/v1/agents/register", args.engine.trim_end_matches('/')))
        .timeout(Duration::from_secs(10))
        .send_json(body)
        .with_context(|| format!("registering with {}", args.engine))?;
    Ok(())
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
            match register(args, &agent_url) {
                Ok(()) => registered = true,
                Err(e) => eprintln!("mint-agent: {e:#}; retrying"),
            }
        } else {
            let url = format!("{}/v1/nodes/{}/heartbeat", args.engine.trim_end_matches('/'), args.name);
            let instance = instance::current(&agent).map(|(tier, index)| json!({ "tier": tier, "index": index }));
            match ureq::post(&url).timeout(Duration::from_secs(5)).send_json(json!({ "load": load(args), "instance": instance })) {
                Ok(resp) => {
                    let v: serde_json::Value = resp.into_json().unwrap_or_default();
                    if v["fence"] == true {
                        eprintln!("mint-agent: fenced: {}", v["reason"].as_str().unwrap_or("the engine says so"));
                        if let Err(e) = instance::stop(&agent) {
                            eprintln!("mint-agent: cannot stop the fenced instance: {e}");
                        }
                    }
                }
                Err(ureq::Error::Status(404, _)) => registered = false,
                Err(e) => eprintln!("mint-agent: heartbeat: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(args.heartbeat_ms.max(50)));
    }
}

fn fail(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn deploy(State(agent): State<Arc<Agent>>, req: Result<Json<DeployRequest>, axum::extract::rejection::JsonRejection>) -> Response {
    let req = match req {
        Ok(Json(r)) => r,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("request body: {}", e.body_text())),
    };
    match instance::start(&agent, req) {
        Ok(status) => Json(status).into_response(),
        Err(message) => fail(StatusCode::CONFLICT, message),
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> Response {
    Json(instance::status(&agent)).into_response()
}

async fn undeploy(State(agent): State<Arc<Agent>>) -> Response {
    let a = agent.clone();
    match tokio::task::spawn_blocking(move || instance::stop(&a)).await {
        Ok(Ok(())) => Json(instance::status(&agent)).into_response(),
        Ok(Err(e)) => fail(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.root).with_context(|| format!("creating {}", args.root.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let agent_url = args.advertise.clone().unwrap_or_else(|| format!("http://{}", args.listen));
    let agent = Arc::new(Agent { args: args.clone(), slot: Mutex::new(Slot::default()) });
    instance::restore(&agent);
    let (hb_agent, hb_url) = (agent.clone(), agent_url.clone());
    std::thread::spawn(move || heartbeat_loop(hb_agent, hb_url));
    eprintln!("mint-agent {}: serving {agent_url}, engine {}", args.name, args.engine);
    let app = Router::new()
        .route("/v1/deploy", post(deploy))
        .route("/v1/status", get(status))
        .route("/v1/undeploy", post(undeploy))
        .with_state(agent.clone());
    let stop = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    axum::serve(listener, app).with_graceful_shutdown(stop).await?;
    // The instance keeps running: an agent restarted (an upgrade, say) takes it up again
    // from what it saved, and the engine fences it if the node was declared failed meanwhile.
    drop(agent);
    Ok(())
}

/// The `mint-agent` command line.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Hello { port } => instance::hello(port),
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(args))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mint-agent: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
