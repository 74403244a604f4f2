//! Several daemons on one etcd cluster (three members on loopback), measured:
//! - failover: the leader SIGKILLed, to the next write a surviving daemon acknowledges,
//!   p50 and p99 over the runs, with the production lease (15 s) unless told;
//! - a follower's resident memory with 100,000 instances in the store (ten tiers of 10,000
//!   minted through the leader), before and after it serves a list of 10,000 of them.
//!
//! `cargo bench -p mint --bench failover` (`MINT_BENCH_RUNS`, 10 by default;
//! `MINT_BENCH_LEASE` in seconds, 15 by default; `MINT_BENCH_PARTS=failover,memory`).

#[path = "../../../tests/running.rs"]
mod running;

use mint_store::etcd::LocalCluster;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A site of daemons on loopback ports that stay theirs across restarts.
struct Site {
    dir: PathBuf,
    args: Vec<String>,
    listens: Vec<String>,
    children: Vec<Option<Child>>,
    auth: String,
}

impl Site {
    fn start(dir: &Path, n: usize, store: &str, lease: u64) -> Site {
        let args = vec![
            "--store".to_string(),
            store.to_string(),
            "--lease-secs".into(),
            lease.to_string(),
            "--shared-dir".into(),
            dir.join("shared").display().to_string(),
        ];
        let mut site = Site {
            dir: dir.to_path_buf(),
            args,
            listens: (0..n)
                .map(|_| format!("127.0.0.1:{}", free_port()))
                .collect(),
            children: (0..n).map(|_| None).collect(),
            auth: String::new(),
        };
        for i in 0..n {
            site.restart(i);
            if i == 0 {
                wait("the first daemon to lead", Duration::from_secs(30), || {
                    site.leads(0).then_some(())
                });
                let token = std::fs::read_to_string(dir.join("d0/admin.token")).unwrap();
                site.auth = format!("Bearer {}", token.trim());
            }
        }
        site
    }

    fn url(&self, i: usize) -> String {
        format!("http://{}", self.listens[i])
    }

    fn restart(&mut self, i: usize) {
        self.kill(i);
        let mut extra: Vec<&str> = self.args.iter().map(String::as_str).collect();
        extra.extend(["--listen", &self.listens[i]]);
        let (child, _, _) = running::spawn_daemon(&self.dir.join(format!("d{i}")), &extra, "warn");
        self.children[i] = Some(child);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn pid(&self, i: usize) -> u32 {
        self.children[i].as_ref().expect("running").id()
    }

    fn leads(&self, i: usize) -> bool {
        ureq::get(&format!("{}/v1/health", self.url(i)))
            .timeout(Duration::from_millis(500))
            .call()
            .ok()
            .and_then(|r| r.into_json::<Value>().ok())
            .is_some_and(|v| v["role"]["leads"] == true)
    }

    fn leader(&self) -> Option<usize> {
        (0..self.listens.len()).find(|i| self.children[*i].is_some() && self.leads(*i))
    }

    fn post(&self, i: usize, path: &str, body: Value, within: Duration) -> Result<Value, String> {
        ureq::post(&format!("{}{path}", self.url(i)))
            .set("Authorization", &self.auth)
            .timeout(within)
            .send_json(body)
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
    }
}

fn wait<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn failover(runs: usize, lease: u64) {
    let dir = std::env::temp_dir().join(format!("mint-bench-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let etcd = LocalCluster::start(&dir.join("etcd"), 3).unwrap();
    let store = format!("etcd://{}/bench", etcd.endpoints().join(","));
    let mut site = Site::start(&dir, 3, &store, lease);
    let mut times = Vec::new();
    for run in 0..runs {
        let leader = wait("a leader", Duration::from_secs(lease * 3), || site.leader());
        // Killed at a moment unrelated to its renewals.
        std::thread::sleep(Duration::from_millis(300 + 613 * run as u64 % 2000));
        site.kill(leader);
        let killed = Instant::now();
        let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
        let mut n = 0;
        let took = loop {
            n += 1;
            let i = others[n % others.len()];
            let spec = json!({ "name": format!("r{run}-{n}"), "cpus": 1, "memory-mib": 512 });
            if site
                .post(i, "/v1/nodes", spec, Duration::from_secs(1))
                .is_ok()
            {
                break killed.elapsed();
            }
            assert!(
                killed.elapsed() < Duration::from_secs(lease * 4),
                "no write accepted"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        eprintln!("run {run}: daemon {leader} killed; a write was accepted after {took:?}");
        times.push(took);
        site.restart(leader);
    }
    times.sort();
    let pick = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "failover, lease {lease} s, {runs} runs: leader killed to the next write accepted: p50 {:.2} s, p99 {:.2} s (min {:.2} s, max {:.2} s; target TTL + 2 s = {} s)",
        pick(0.5).as_secs_f64(),
        pick(0.99).as_secs_f64(),
        times[0].as_secs_f64(),
        times.last().unwrap().as_secs_f64(),
        lease + 2
    );
    drop(site);
    let _ = std::fs::remove_dir_all(&dir);
}

fn memory(lease: u64) {
    let dir = std::env::temp_dir().join(format!("mint-bench-follower-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let etcd = LocalCluster::start(&dir.join("etcd"), 3).unwrap();
    let store = format!("etcd://{}/bench", etcd.endpoints().join(","));
    let site = Site::start(&dir, 2, &store, lease);
    let long = Duration::from_secs(600);
    let master = root().join("tests/fixtures/master-ifupdown");
    let digest = site
        .post(0, "/v1/images", json!({ "path": master }), long)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    for t in 0..10 {
        let spec = json!({
            "name": format!("t{t}"), "image": digest, "max-instances": 10_000,
            "subnet": format!("10.{t}.0.0/16"), "hostname": format!("t{t}-{{index}}"),
            "driver": {"plugin": "noop"},
        });
        // Through the follower, which passes each creation on to the leader.
        site.post(1, "/v1/tiers", spec, long).unwrap();
    }
    let minted = started.elapsed();
    let before = rss_mib(site.pid(1));
    let listed = Instant::now();
    let v: Value = ureq::get(&format!("{}/v1/tiers/t3/instances", site.url(1)))
        .set("Authorization", &site.auth)
        .timeout(long)
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let list_took = listed.elapsed();
    assert_eq!(v.as_array().map(Vec::len), Some(10_000));
    let after = rss_mib(site.pid(1));
    println!(
        "follower at 100,000 instances (10 tiers of 10,000, minted in {:.1} s through it, {:.0} instances/s): resident {before:.0} MiB; {after:.0} MiB after serving a list of 10,000 ({:.0} ms); the leader {:.0} MiB",
        minted.as_secs_f64(),
        100_000.0 / minted.as_secs_f64(),
        list_took.as_secs_f64() * 1000.0,
        rss_mib(site.pid(0)),
    );
    drop(site);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let runs = env_or("MINT_BENCH_RUNS", 10usize);
    let lease = env_or("MINT_BENCH_LEASE", 15u64);
    let parts = std::env::var("MINT_BENCH_PARTS").unwrap_or_else(|_| "failover,memory".into());
    if parts.contains("failover") {
        failover(runs, lease);
    }
    if parts.contains("memory") {
        memory(lease);
    }
}
