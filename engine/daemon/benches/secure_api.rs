//! What authentication and TLS cost: the same daemon measured three times in one run:
//! serving plain HTTP on 127.0.0.1 with authentication off, plain HTTP with tokens and node
//! credentials, and TLS (its self-signed certificate, pinned by the clients) with them.
//! Figures: listing a tier's 1,000 instances, and agents' heartbeats per second (over
//! kept-alive connections, as agents send them, and with a new connection each).
//! `cargo bench -p mint-daemon --bench secure_api`.

mod common;

use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const K: u32 = 1_000;
const AGENTS: usize = 16;
const CLIENT_THREADS: usize = 4;
const HEARTBEAT_SECS: f64 = 1.5;
const ROUNDS: usize = 7;

/// One daemon under test and how to speak to it.
struct Site {
    base: String,
    http: ureq::Agent,
    admin: Option<String>,
    /// Each agent node's name and the `Authorization` it sends (none when open).
    nodes: Vec<(String, Option<String>)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<()>>,
    /// One client configuration, as one agent process has (so TLS sessions resume).
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

impl Site {
    fn start(dir: &std::path::Path, mode: Mode) -> Site {
        let data = dir.join(format!("{mode:?}"));
        let mut options = mint_daemon::Options::new("127.0.0.1:0".parse().unwrap());
        match mode {
            Mode::Open => options.unauthenticated = true,
            Mode::Tokens => {}
            Mode::TlsTokens => {
                options.tls = Some(mint_tls::ServerSource::SelfSigned {
                    dir: data.join("tls"),
                    names: vec![],
                })
            }
        }
        let secure = mode != Mode::Open;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let d = data.clone();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(mint_daemon::serve(
                &d,
                options,
                async {
                    stop_rx.await.ok();
                },
                move |r| ready_tx.send(r.clone()).unwrap(),
            ))
            .unwrap();
        });
        let ready = ready_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the daemon starts");
        let tls = ready.pin.map(|p| {
            mint_tls::ClientTrust::new(&mint_tls::Trust::Pin(p))
                .unwrap()
                .config()
        });
        let admin = secure.then(|| {
            format!(
                "Bearer {}",
                std::fs::read_to_string(data.join("admin.token"))
                    .unwrap()
                    .trim()
            )
        });
        let mut site = Site {
            base: ready.url,
            http: ureq::Agent::new(),
            admin,
            nodes: Vec::new(),
            stop: Some(stop_tx),
            server: Some(server),
            tls,
        };
        site.http = site.client();
        site
    }

    /// A new client (its own connection pool), trusting the daemon's pin when it has one.
    fn client(&self) -> ureq::Agent {
        let b = ureq::AgentBuilder::new().timeout(Duration::from_secs(120));
        match &self.tls {
            Some(t) => b.tls_config(t.clone()).build(),
            None => b.build(),
        }
    }

    fn post(&self, path: &str, auth: Option<&str>, body: Value) -> Value {
        let mut r = self.http.post(&format!("{}{path}", self.base));
        if let Some(a) = auth {
            r = r.set("Authorization", a);
        }
        r.send_json(body)
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
            .into_json()
            .unwrap()
    }

    /// A tier of K instances and AGENTS nodes that heartbeat: enrolled and registered
    /// with their join tokens when secure, added by hand when open.
    fn populate(&mut self, master: &std::path::Path) {
        let admin = self.admin.clone();
        let admin = admin.as_deref();
        let image = self.post("/v1/images", admin, json!({"path": master}))["digest"]
            .as_str()
            .unwrap()
            .to_string();
        self.post(
            "/v1/tiers",
            admin,
            json!({"name": "web", "image": image, "max-instances": K, "subnet": "198.18.0.0/20", "hostname": "web-{index:04}", "driver": {"plugin": "noop"}}),
        );
        for i in 0..AGENTS {
            let name = format!("agent-{i:02}");
            let body = json!({"name": name, "cpus": 8, "memory-mib": 16384, "arch": "x86_64", "agent-url": "https://127.0.0.1:9"});
            let auth = if admin.is_some() {
                let join =
                    self.post(&format!("/v1/nodes/{name}/enroll"), admin, json!({}))["join-token"]
                        .as_str()
                        .unwrap()
                        .to_string();
                let v = self.post("/v1/agents/register", Some(&format!("Bearer {join}")), body);
                Some(format!("Bearer {}", v["credential"].as_str().unwrap()))
            } else {
                self.post("/v1/nodes", None, json!({"name": name, "cpus": 8, "memory-mib": 16384, "properties": {"agent-url": "https://127.0.0.1:9"}}));
                None
            };
            self.nodes.push((name, auth));
        }
    }

    /// Lists the tier's instances `n` times over one connection; requests per second.
    fn list(&self, n: usize) -> f64 {
        let http = self.client();
        let t = Instant::now();
        for _ in 0..n {
            let mut r = http.get(&format!("{}/v1/tiers/web/instances", self.base));
            if let Some(a) = &self.admin {
                r = r.set("Authorization", a);
            }
            let text = r.call().unwrap().into_string().unwrap();
            assert_eq!(text.matches("\"hostname\"").count(), K as usize);
        }
        n as f64 / t.elapsed().as_secs_f64()
    }

    /// Heartbeats from every node, CLIENT_THREADS threads at once, for HEARTBEAT_SECS;
    /// per second. `fresh` opens a new connection for each.
    fn heartbeats(&self, fresh: bool) -> f64 {
        let sent = AtomicU64::new(0);
        let t = Instant::now();
        let end = t + Duration::from_secs_f64(HEARTBEAT_SECS);
        std::thread::scope(|s| {
            for c in 0..CLIENT_THREADS {
                let sent = &sent;
                s.spawn(move || {
                    let mut http = self.client();
                    let mine: Vec<_> = self.nodes.iter().skip(c).step_by(CLIENT_THREADS).collect();
                    while Instant::now() < end {
                        for (name, auth) in &mine {
                            if fresh {
                                http = self.client();
                            }
                            let mut r =
                                http.post(&format!("{}/v1/nodes/{name}/heartbeat", self.base));
                            if let Some(a) = auth {
                                r = r.set("Authorization", a);
                            }
                            let v: Value = r
                                .send_json(json!({"load": 100, "instance": null}))
                                .unwrap()
                                .into_json()
                                .unwrap();
                            assert!(v.get("fence").is_some() || v.is_object(), "{v}");
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        sent.load(Ordering::Relaxed) as f64 / t.elapsed().as_secs_f64()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Tokens,
    TlsTokens,
}

fn main() {
    let (dir, master) = common::scratch_with_master("secure-bench");
    // All three daemons run at once, idle but for the one measured, and the measurements
    // alternate between them, round after round: the machine's noise then falls on all
    // three alike, and each figure is the median of its rounds.
    let sites: Vec<Site> = [Mode::Open, Mode::Tokens, Mode::TlsTokens]
        .into_iter()
        .map(|mode| {
            let mut site = Site::start(&dir, mode);
            site.populate(&master);
            site.list(5);
            site
        })
        .collect();
    let mut samples = vec![[Vec::new(), Vec::new(), Vec::new()]; sites.len()];
    for _round in 0..ROUNDS {
        for (i, site) in sites.iter().enumerate() {
            samples[i][0].push(site.list(40));
            samples[i][1].push(site.heartbeats(false));
            samples[i][2].push(site.heartbeats(true));
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("medians of {ROUNDS} alternating rounds");
    println!(
        "{:<42} {:>12} {:>14} {:>14}",
        "", "plain, open", "plain, tokens", "TLS + tokens"
    );
    for (i, what) in [
        (0, "list 1,000 instances (requests/s)"),
        (1, "heartbeats, kept-alive connections (/s)"),
        (2, "heartbeats, a new connection each (/s)"),
    ] {
        let [open, tokens, tls] = [
            median(&samples[0][i]),
            median(&samples[1][i]),
            median(&samples[2][i]),
        ];
        let pct = |x: f64| (x / open - 1.0) * 100.0;
        println!(
            "{what:<42} {open:>12.0} {tokens:>7.0} {:>+5.1}% {tls:>7.0} {:>+5.1}%",
            pct(tokens),
            pct(tls)
        );
    }
    drop(sites);
    let _ = std::fs::remove_dir_all(&dir);
}
