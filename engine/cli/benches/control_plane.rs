//! The control plane under load, with `mint-sim`'s simulated BMCs and agents against a real
//! daemon process (its CPU time and peak memory read from /proc):
//! - a `noop` tier's scale latency (p50, p99 of the HTTP answer) while 50 simulated BMCs
//!   with a 10 s power-on delay are being deployed through the `redfish` driver;
//! - 1,000 simulated agents, 2 s per deploy, `drivers.concurrency = 200`: scaling a tier
//!   from 0 to 1,000, with the daemon's CPU time and peak RSS;
//! - 10,000 simulated nodes heartbeating every 5 s (2,000 heartbeats/s): the daemon's CPU
//!   and the API's p99 meanwhile.
//!
//! `cargo bench -p mint --bench control_plane` (`MINT_BENCH_PARTS=latency,scale,heartbeats`
//! picks parts).

#[path = "../../../tests/running.rs"]
mod running;

use running::Daemon;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// The daemon's user and system CPU time, and its peak resident memory (MiB).
fn usage(pid: u32) -> (Duration, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    (cpu, hwm / 1024.0)
}

struct Api {
    http: ureq::Agent,
    base: String,
    auth: String,
}

impl Api {
    fn of(d: &Daemon) -> Api {
        let token = std::fs::read_to_string(d.data.join("admin.token")).expect("admin token");
        Api {
            http: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(60))
                .build(),
            base: d.url.clone(),
            auth: format!("Bearer {}", token.trim()),
        }
    }
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let r = self
            .http
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &self.auth);
        let r = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        r.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
            .into_json()
            .unwrap_or_default()
    }
    fn status(&self, tier: &str) -> Value {
        self.call("GET", &format!("/v1/tiers/{tier}"), None)["status"].clone()
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn tree_tier(
    d: &Daemon,
    dir: &Path,
    name: &str,
    k: u32,
    subnet: &str,
    driver: &str,
    zone_label: Option<&str>,
) {
    let image = d.mint(&[
        "image",
        "import",
        "tests/fixtures/master-ifupdown",
        "--name",
        "tree",
    ]);
    let mut spec = json!({"name": name, "image": image["digest"], "max-instances": k, "subnet": subnet,
        "hostname": format!("{name}-{{index:05}}"), "driver": {"plugin": driver}, "deploy-timeout-secs": 600});
    if let Some(l) = zone_label {
        spec["requirements"] = json!({"labels": {"role": l}});
    }
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, spec.to_string()).unwrap();
    d.mint(&["tier", "create", "-f", file.to_str().unwrap()]);
}

/// `wait_ms`: how long each redfish deploy call waits for its power-on (0: it answers at
/// once and the engine follows with status calls; above the power-on delay: every deploy
/// holds a driver call for the whole power-on, the worst case for head-of-line blocking).
fn latency(dir: &Path, repo: &Path, wait_ms: u64) {
    let dir = dir.join(format!("latency-{wait_ms}"));
    std::fs::create_dir_all(&dir).unwrap();
    let bmcs = mint_sim::bmc::Bmcs::start(
        50,
        mint_sim::bmc::Options {
            power_on: Duration::from_secs(10),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::write(
        dir.join("creds.toml"),
        "[[credential]]\nusername = \"admin\"\npassword = \"bench\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("mint.toml"),
        "[credentials]\nfile = \"creds.toml\"\n[drivers]\nconcurrency = 64\n",
    )
    .unwrap();
    let d = Daemon::start(
        &dir.join("data"),
        &["--config", dir.join("mint.toml").to_str().unwrap()],
        repo,
    );
    let api = Api::of(&d);
    let disk = dir.join("live.iso");
    running::tiny_iso(&disk);
    let image = d.mint(&["image", "import", disk.to_str().unwrap()]);
    let spec = json!({"name": "bm", "image": image["digest"], "max-instances": 50, "subnet": "198.18.64.0/24",
        "hostname": "bm-{index:03}", "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "redfish", "config": {"wait-ms": wait_ms}}, "deploy-timeout-secs": 300,
        "requirements": {"labels": {"role": "bm"}}});
    std::fs::write(dir.join("bm.json"), spec.to_string()).unwrap();
    d.mint(&[
        "tier",
        "create",
        "-f",
        dir.join("bm.json").to_str().unwrap(),
    ]);
    for (i, u) in bmcs.urls.iter().enumerate() {
        api.call("POST", "/v1/nodes", Some(json!({"name": format!("bm{i:03}"), "cpus": 8, "memory-mib": 8192, "labels": {"role": "bm"}, "properties": {"bmc-url": u}})));
    }
    tree_tier(&d, &dir, "web", 2, "198.18.65.0/24", "noop", Some("web"));
    for i in 0..2 {
        api.call("POST", "/v1/nodes", Some(json!({"name": format!("web{i}"), "cpus": 2, "memory-mib": 1024, "labels": {"role": "web"}})));
    }
    api.call("POST", "/v1/tiers/bm/scale", Some(json!({"instances": 50})));
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut i = 0u32;
    // Scale the noop tier back and forth while the BMCs power on, until the redfish tier
    // has all 50 running.
    let mut most_in_flight = 0;
    while started.elapsed() < Duration::from_secs(180) {
        let t = Instant::now();
        api.call(
            "POST",
            "/v1/tiers/web/scale",
            Some(json!({"instances": i % 3})),
        );
        samples.push(t.elapsed());
        i += 1;
        std::thread::sleep(Duration::from_millis(20));
        if i % 10 == 0 {
            let st = api.status("bm");
            most_in_flight = most_in_flight.max(st["in-flight"].as_array().map_or(0, |a| a.len()));
            if st["settled"] == true {
                break;
            }
        }
    }
    let during = started.elapsed();
    let settled = api.status("bm")["settled"] == true;
    let (p50, p99) = (
        percentile(&mut samples, 0.5),
        percentile(&mut samples, 0.99),
    );
    println!(
        "noop scale while 50 BMCs (10 s power-on, deploy wait-ms {wait_ms}) deploy: {} requests over {:.1} s  p50 {p50:>8.2?}  p99 {p99:>8.2?}  (target p99 < 50 ms: {}; the redfish tier {}; at most {most_in_flight} calls in flight)",
        samples.len(),
        during.as_secs_f64(),
        if p99 < Duration::from_millis(50) {
            "met"
        } else {
            "MISSED"
        },
        if settled {
            "reached 50 meanwhile"
        } else {
            "still deploying at the end"
        }
    );
    println!(
        "  {} BMC requests, {} systems on",
        bmcs.requests(),
        bmcs.powered_on()
    );
}

fn agents_engine(d: &Daemon) -> mint_sim::agents::Engine {
    let token = std::fs::read_to_string(d.data.join("admin.token")).unwrap();
    mint_sim::agents::Engine {
        url: d.url.clone(),
        admin_token: token.trim().into(),
        trust: None,
    }
}

fn scale(dir: &Path, repo: &Path) {
    let dir = dir.join("scale");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("mint.toml"), "[drivers]\nconcurrency = 200\n").unwrap();
    let d = Daemon::start(
        &dir.join("data"),
        &[
            "--config",
            dir.join("mint.toml").to_str().unwrap(),
            "--node-timeout-secs",
            "60",
        ],
        repo,
    );
    let api = Api::of(&d);
    tree_tier(&d, &dir, "web", 1000, "198.18.0.0/22", "agent", None);
    let t = Instant::now();
    let options = mint_sim::agents::Options {
        deploy: Duration::from_secs(2),
        heartbeat: Duration::from_secs(5),
        dir: dir.join("sim"),
        ..Default::default()
    };
    let agents = mint_sim::agents::Agents::start(&agents_engine(&d), 1000, options).unwrap();
    println!(
        "1,000 simulated agents enrolled and registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let (cpu0, _) = usage(d.pid());
    let t = Instant::now();
    api.call(
        "POST",
        "/v1/tiers/web/scale",
        Some(json!({"instances": 1000})),
    );
    while api.status("web")["settled"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "not settled: {}",
            api.status("web")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let secs = t.elapsed().as_secs_f64();
    let (cpu1, peak) = usage(d.pid());
    println!(
        "scale 0 -> 1,000 on 1,000 simulated agents (2 s deploys, concurrency 200): {secs:.1} s  (target < 15 s: {})  daemon CPU {:.1} s  peak RSS {peak:.0} MiB",
        if secs < 15.0 { "met" } else { "MISSED" },
        (cpu1 - cpu0).as_secs_f64()
    );
    drop(agents);
}

fn heartbeats(dir: &Path, repo: &Path) {
    let dir = dir.join("heartbeats");
    std::fs::create_dir_all(&dir).unwrap();
    let d = Daemon::start(&dir.join("data"), &["--node-timeout-secs", "60"], repo);
    let api = Api::of(&d);
    tree_tier(&d, &dir, "web", 10, "198.18.0.0/24", "agent", None);
    let t = Instant::now();
    let options = mint_sim::agents::Options {
        heartbeat: Duration::from_secs(5),
        serve: false,
        threads: 48,
        dir: dir.join("sim"),
        ..Default::default()
    };
    let agents = mint_sim::agents::Agents::start(&agents_engine(&d), 10_000, options).unwrap();
    println!(
        "10,000 simulated agents enrolled and registered in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Let the heartbeats settle into their rhythm, then measure over 20 s.
    std::thread::sleep(Duration::from_secs(6));
    let (beats0, cpu0) = (
        agents.beats.0.load(std::sync::atomic::Ordering::Relaxed),
        usage(d.pid()).0,
    );
    let t = Instant::now();
    let mut samples = Vec::new();
    while t.elapsed() < Duration::from_secs(20) {
        let s = Instant::now();
        api.call("GET", "/v1/tiers/web", None);
        samples.push(s.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let secs = t.elapsed().as_secs_f64();
    let (beats1, cpu1) = (
        agents.beats.0.load(std::sync::atomic::Ordering::Relaxed),
        usage(d.pid()).0,
    );
    let cores = (cpu1 - cpu0).as_secs_f64() / secs;
    let p99 = percentile(&mut samples, 0.99);
    println!(
        "10,000 nodes heartbeating every 5 s: {:.0} heartbeats/s answered ({} failed)  daemon CPU {:.2} cores (target < 0.5: {})  API p99 {p99:.2?} (target < 100 ms: {})",
        (beats1 - beats0) as f64 / secs,
        agents.beats.1.load(std::sync::atomic::Ordering::Relaxed),
        cores,
        if cores < 0.5 { "met" } else { "MISSED" },
        if p99 < Duration::from_millis(100) {
            "met"
        } else {
            "MISSED"
        }
    );
    drop(agents);
}

fn main() {
    let parts =
        std::env::var("MINT_BENCH_PARTS").unwrap_or_else(|_| "latency,scale,heartbeats".into());
    let dir = std::env::temp_dir().join(format!("mint-bench-control-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let repo = root();
    for part in parts.split(',') {
        match part.trim() {
            "latency" => {
                latency(&dir, &repo, 0);
                latency(&dir, &repo, 30_000);
            }
            "scale" => scale(&dir, &repo),
            "heartbeats" => heartbeats(&dir, &repo),
            other => panic!("MINT_BENCH_PARTS: no part `{other}` (latency, scale, heartbeats)"),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
