//! What authentication and TLS cost: the same daemon measured twice in one run, once
//! serving plain HTTP on 127.0.0.1 with authentication off, once serving TLS (its
//! self-signed certificate, pinned by the clients) with tokens and node credentials.
//! Figures: listing a tier's 1,000 instances, and agents' heartbeats per second (over
//! kept-alive connections, as agents send them, and with a new connection each).
//! `cargo bench -p mint-daemon --bench secure_api`.

use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const K: u32 = 1_000;
const AGENTS: usize = 16;
const CLIENT_THREADS: usize = 4;
const HEARTBEAT_SECS: f64 = 5.0;

/// One daemon under test and how to speak to it.
struct Site {
    base: String,
    http: ureq::Agent,
    admin: Option<String>,
    /// Each agent node's name and the `Authorization` it sends (none when open).
    nodes: Vec<(String, Option<String>)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<std::thread::JoinHandle<()>>,
    trust: Option<mint_tls::ClientTrust>,
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
    fn start(dir: &std::path::Path, secure: bool) -> Site {
        let data = dir.join(if secure { "secure" } else { "open" });
        let mut options = mint_daemon::Options::new("127.0.0.1:0".parse().unwrap());
        if secure {
            options.tls = Some(mint_tls::ServerSource::SelfSigned { dir: data.join("tls"), names: vec![] });
        } else {
            options.unauthenticated = true;
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let d = data.clone();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
            rt.block_on(mint_daemon::serve(&d, options, async { stop_rx.await.ok(); }, move |r| ready_tx.send(r.clone()).unwrap())).unwrap();
        });
        let ready = ready_rx.recv_timeout(Duration::from_secs(120)).expect("the daemon starts");
        let trust = ready.pin.map(|p| mint_tls::ClientTrust::new(&mint_tls::Trust::Pin(p)).unwrap());
        let admin = secure.then(|| format!("Bearer {}", std::fs::read_to_string(data.join("admin.token")).unwrap().trim()));
        let mut site = Site { base: ready.url, http: ureq::Agent::new(), admin, nodes: Vec::new(), stop: Some(stop_tx), server: Some(server), trust };
        site.http = site.client();
        site
    }

    /// A new client (its own connection pool), trusting the daemon's pin when it has one.
    fn client(&self) -> ureq::Agent {
        let b = ureq::AgentBuilder::new().timeout(Duration::from_secs(120));
        match &self.trust {
            Some(t) => b.tls_config(t.config()).build(),
            None => b.build(),
        }
    }

    fn post(&self, path: &str, auth: Option<&str>, body: Value) -> Value {
        let mut r = self.http.post(&format!("{}{path}", self.base));
        if let Some(a) = auth {
            r = r.set("Authorization", a);
        }
        r.send_json(body).unwrap_or_else(|e| panic!("POST {path}: {e}")).into_json().unwrap()
    }

    /// A tier of K instances and AGENTS nodes that heartbeat: enrolled and registered
    /// with their join tokens when secure, added by hand when open.
    fn populate(&mut self, master: &std::path::Path) {
        let admin = self.admin.clone();
        let admin = admin.as_deref();
        let image = self.post("/v1/images", admin, json!({"path": master}))["digest"].as_str().unwrap().to_string();
        self.post(
            "/v1/tiers",
            admin,
            json!({"name": "web", "image": image, "max-instances": K, "subnet": "198.18.0.0/20", "hostname": "web-{index:04}", "driver": {"plugin": "noop"}}),
        );
        for i in 0..AGENTS {
            let name = format!("agent-{i:02}");
            let body = json!({"name": name, "cpus": 8, "memory-mib": 16384, "arch": "x86_64", "agent-url": "https://127.0.0.1:9"});
            let auth = if admin.is_some() {
                let join = self.post(&format!("/v1/nodes/{name}/enroll"), admin, json!({}))["join-token"].as_str().unwrap().to_string();
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
                            let mut r = http.post(&format!("{}/v1/nodes/{name}/heartbeat", self.base));
                            if let Some(a) = auth {
                                r = r.set("Authorization", a);
                            }
                            let v: Value = r.send_json(json!({"load": 100, "instance": null})).unwrap().into_json().unwrap();
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

fn main() {
    let dir = std::env::temp_dir().join(format!("mint-secure-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let master = dir.join("master");
    for (p, t) in [("etc/hostname", "debian\n"), ("etc/network/interfaces", "auto eth0\niface eth0 inet dhcp\n"), ("sbin/ifup", "")] {
        let f = master.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, t).unwrap();
    }
    let mut rows: Vec<(&str, f64, f64)> = Vec::new();
    let mut figures = Vec::new();
    for secure in [false, true] {
        let mut site = Site::start(&dir, secure);
        site.populate(&master);
        site.list(5);
        site.heartbeats(false);
        figures.push([site.list(200), site.heartbeats(false), site.heartbeats(true)]);
    }
    for (i, what) in [(0, "list 1,000 instances (requests/s)"), (1, "heartbeats, kept-alive connections (/s)"), (2, "heartbeats, a new connection each (/s)")] {
        rows.push((what, figures[0][i], figures[1][i]));
    }
    println!("{:<42} {:>12} {:>14} {:>8}", "", "plain, open", "TLS + tokens", "ratio");
    for (what, open, secure) in rows {
        println!("{what:<42} {open:>12.0} {secure:>14.0} {:>7.1}%", (secure / open - 1.0) * 100.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
