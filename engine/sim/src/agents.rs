//! Simulated node agents, speaking the real agent protocol to a real daemon: each is enrolled
//! with an operator's token, registers with its join token (getting its node credential),
//! heartbeats with its credential, and serves the agent API (`deploy`, `status`,
//! `undeploy`) over TLS on its own port under one self-signed certificate, whose pin it
//! reports at registration as the real agent does. A deployment runs `deploy` after it is
//! asked, or fails at `failure_rate`; nothing is fetched or started.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the agents behave.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a deployment takes.
    pub deploy: Duration,
    /// The share of deployments that fail (0 to 1).
    pub failure_rate: f64,
    /// How often each agent heartbeats.
    pub heartbeat: Duration,
    /// Whether the agents serve their API (a heartbeat-only load needs no listeners).
    pub serve: bool,
    /// Names are `PREFIX-00000`, ...
    pub prefix: String,
    /// Where the shared certificate is kept.
    pub dir: std::path::PathBuf,
    /// Seeds the failures.
    pub seed: u64,
    /// Threads sending registrations and heartbeats.
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            deploy: Duration::from_secs(2),
            failure_rate: 0.0,
            heartbeat: Duration::from_secs(5),
            serve: true,
            prefix: "sim".into(),
            dir: std::env::temp_dir().join(format!("mint-sim-{}", std::process::id())),
            seed: 1,
            threads: 16,
        }
    }
}

/// Where one simulated instance is.
#[derive(Debug, Clone, Default)]
struct Slot {
    request: Option<Value>,
    ready_at: Option<Instant>,
    fails: bool,
}

struct Agent {
    name: String,
    slot: Mutex<Slot>,
    rng: Mutex<crate::Rng>,
    options: Arc<Options>,
}

impl Agent {
    fn status(&self) -> Value {
        let slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        let Some(r) = &slot.request else {
            return json!({ "state": "absent", "tier": null, "index": null, "version": null, "detail": "no instance" });
        };
        let (state, detail) = match slot.ready_at {
            Some(at) if Instant::now() < at => ("deploying", "simulated deployment in progress"),
            _ if slot.fails => ("failed", "simulated failure"),
            _ => ("running", "simulated instance running"),
        };
        json!({ "state": state, "tier": r["tier"], "index": r["index"], "version": r["version"], "detail": detail })
    }
}

async fn deploy(State(a): State<Arc<Agent>>, Json(req): Json<Value>) -> Json<Value> {
    {
        let mut slot = a.slot.lock().unwrap_or_else(|p| p.into_inner());
        let same = slot.request.as_ref().is_some_and(|r| {
            r["tier"] == req["tier"] && r["index"] == req["index"] && r["version"] == req["version"]
        });
        if !same || slot.fails {
            let fails =
                a.rng.lock().unwrap_or_else(|p| p.into_inner()).unit() < a.options.failure_rate;
            *slot = Slot {
                request: Some(req),
                ready_at: Some(Instant::now() + a.options.deploy),
                fails,
            };
        }
    }
    Json(a.status())
}

async fn status(State(a): State<Arc<Agent>>) -> Json<Value> {
    Json(a.status())
}

async fn undeploy(State(a): State<Arc<Agent>>) -> Json<Value> {
    *a.slot.lock().unwrap_or_else(|p| p.into_inner()) = Slot::default();
    Json(a.status())
}

/// Running agents; dropping it stops their servers and heartbeats.
pub struct Agents {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Arc<AtomicBool>,
    beaters: Vec<std::thread::JoinHandle<()>>,
    /// The nodes' names.
    pub names: Vec<String>,
    /// Heartbeats answered, and heartbeats that failed.
    pub beats: Arc<(AtomicU64, AtomicU64)>,
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for b in self.beaters.drain(..) {
            let _ = b.join();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// How the simulator reaches the daemon.
#[derive(Clone)]
pub struct Engine {
    /// Its URL.
    pub url: String,
    /// An admin token, to enroll the nodes.
    pub admin_token: String,
    /// Trust for an `https` daemon (its pin), if it serves TLS.
    pub trust: Option<mint_tls::Trust>,
}

impl Engine {
    fn client(&self) -> anyhow::Result<ureq::Agent> {
        let b = ureq::AgentBuilder::new().timeout(Duration::from_secs(30));
        Ok(match &self.trust {
            Some(t) => b
                .tls_config(mint_tls::ClientTrust::new(t)?.config())
                .build(),
            None => b.build(),
        })
    }
}

fn send(http: &ureq::Agent, url: &str, bearer: &str, body: Value) -> anyhow::Result<Value> {
    match http
        .post(url)
        .set("Authorization", &format!("Bearer {bearer}"))
        .send_json(body)
    {
        Ok(r) => Ok(r.into_json()?),
        Err(ureq::Error::Status(code, r)) => {
            anyhow::bail!("{url}: {code} {}", r.into_string().unwrap_or_default())
        }
        Err(e) => Err(e.into()),
    }
}

impl Agents {
    /// Starts `count` agents: enrolls and registers each with `engine`, then heartbeats.
    /// Each node offers 4 CPUs and 8 GiB, labelled `zone=z0` to `z9` round-robin.
    pub fn start(engine: &Engine, count: usize, options: Options) -> anyhow::Result<Agents> {
        let options = Arc::new(options);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        std::fs::create_dir_all(&options.dir)?;
        let cert = mint_tls::ServerCert::load(mint_tls::ServerSource::SelfSigned {
            dir: options.dir.join("tls"),
            names: vec!["127.0.0.1".into()],
        })?;
        let pin = cert.pin().to_string();
        let listeners = if options.serve {
            runtime.block_on(crate::listeners(count))?
        } else {
            Vec::new()
        };
        let mut urls = Vec::with_capacity(count);
        let mut agents = Vec::with_capacity(count);
        let mut listeners = listeners.into_iter();
        for i in 0..count {
            let agent = Arc::new(Agent {
                name: format!("{}-{i:05}", options.prefix),
                slot: Mutex::new(Slot::default()),
                rng: Mutex::new(crate::Rng(
                    options
                        .seed
                        .wrapping_add(i as u64)
                        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                        | 1,
                )),
                options: options.clone(),
            });
            match listeners.next() {
                Some(l) => {
                    urls.push(format!("https://{}", l.local_addr()?));
                    let incoming = {
                        let _guard = runtime.enter();
                        mint_tls::Incoming::tls(l, cert.acceptor())?
                    };
                    let app = Router::new()
                        .route("/v1/deploy", post(deploy))
                        .route("/v1/status", get(status))
                        .route("/v1/undeploy", post(undeploy))
                        .with_state(agent.clone());
                    runtime.spawn(async move { axum::serve(incoming, app).await });
                }
                // Registered but never called: a heartbeat-only load.
                None => urls.push(format!("https://127.0.0.1:9/{i}")),
            }
            agents.push(agent);
        }
        // Enroll and register in parallel: each is two durable writes on the daemon.
        let credentials: Vec<Mutex<Option<String>>> =
            (0..count).map(|_| Mutex::new(None)).collect();
        let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..options.threads.max(1) {
                s.spawn(|| {
                    let http = match engine.client() {
                        Ok(h) => h,
                        Err(e) => return *failure.lock().unwrap() = Some(e),
                    };
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return;
                        }
                        let a = &agents[i];
                        let base = engine.url.trim_end_matches('/');
                        let joined = send(&http, &format!("{base}/v1/nodes/{}/enroll", a.name), &engine.admin_token, json!({})).and_then(|v| {
                            let join = v["join-token"].as_str().unwrap_or_default().to_string();
                            send(&http, &format!("{base}/v1/agents/register"), &join, json!({
                                "name": a.name, "cpus": 4, "memory-mib": 8192, "arch": std::env::consts::ARCH,
                                "labels": { "zone": format!("z{}", i % 10) }, "agent-url": urls[i], "agent-pin": pin,
                            }))
                        });
                        match joined {
                            Ok(v) => *credentials[i].lock().unwrap() = v["credential"].as_str().map(str::to_string),
                            Err(e) => return *failure.lock().unwrap() = Some(e.context(format!("registering {}", a.name))),
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().unwrap() {
            return Err(e);
        }
        let credentials: Vec<String> = credentials
            .into_iter()
            .map(|c| c.into_inner().unwrap().unwrap_or_default())
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let beats = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let threads = options.threads.max(1);
        let mut beaters = Vec::new();
        for t in 0..threads {
            let mine: Vec<(Arc<Agent>, String)> = (t..count)
                .step_by(threads)
                .map(|i| (agents[i].clone(), credentials[i].clone()))
                .collect();
            let (stop, beats, engine, every) = (
                stop.clone(),
                beats.clone(),
                engine.clone(),
                options.heartbeat,
            );
            beaters.push(std::thread::spawn(move || {
                heartbeats(&engine, &mine, every, &stop, &beats)
            }));
        }
        Ok(Agents {
            runtime: Some(runtime),
            stop,
            beaters,
            names: agents.iter().map(|a| a.name.clone()).collect(),
            beats,
        })
    }
}

/// Sends each agent's heartbeat every `every`, spread evenly over the interval.
fn heartbeats(
    engine: &Engine,
    agents: &[(Arc<Agent>, String)],
    every: Duration,
    stop: &AtomicBool,
    beats: &(AtomicU64, AtomicU64),
) {
    let Ok(http) = engine.client() else { return };
    if agents.is_empty() {
        return;
    }
    let gap = every / agents.len() as u32;
    let base = engine.url.trim_end_matches('/');
    let mut next = Instant::now();
    for (agent, credential) in agents.iter().cycle() {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        next += gap;
        let s = agent.status();
        let instance = if s["state"] == "absent" {
            Value::Null
        } else {
            json!({ "tier": s["tier"], "index": s["index"] })
        };
        let body = json!({ "load": 100, "instance": instance, "state": s["state"], "detail": s["detail"] });
        match send(
            &http,
            &format!("{base}/v1/nodes/{}/heartbeat", agent.name),
            credential,
            body,
        ) {
            Ok(_) => beats.0.fetch_add(1, Ordering::Relaxed),
            Err(_) => beats.1.fetch_add(1, Ordering::Relaxed),
        };
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}
