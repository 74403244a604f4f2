//! A boot storm on real nodes: as many network-namespace nodes as asked (20 by default)
//! deploy instances of one 1 GiB tree master at the same moment, none having it cached.
//! Measured in the same run: a plain parallel `curl` of the same blob from the engine
//! into every node (the transport's own rate, nothing unpacked), then the storm: the time
//! from the scale request to the engine having sent the master to every node, the engine's
//! throughput over that window, the time until every instance answers at its address, and
//! the engine's peak RSS in each phase (VmHWM, reset between them).
//! Needs root: the nodes are network namespaces (the test bed of `tests/testbed.rs`).
//! `cargo bench -p mint --bench boot_storm` (`MINT_BENCH_NODES`, `MINT_BENCH_MASTER_MIB`).

#[path = "../../../tests/testbed.rs"]
#[allow(dead_code)]
mod testbed;

use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use testbed::{TestBed, get, master, noise};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The daemon's peak resident set since the last reset, in MiB, and a reset.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn reset_peak_rss(pid: u32) {
    // Writing 5 to clear_refs resets VmHWM to the current resident set.
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn main() {
    let nodes = env_or("MINT_BENCH_NODES", 20);
    let master_mib = env_or("MINT_BENCH_MASTER_MIB", 1024) as u64;
    let dir = std::env::temp_dir().join(format!("mint-boot-storm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bed = TestBed::new(dir.clone(), repo, nodes, &[]);
    let root = master(&dir);
    std::fs::create_dir_all(root.join("srv")).unwrap();
    noise(&root.join("srv/payload"), master_mib << 20);
    let t = Instant::now();
    let image = bed.mint(&["image", "import", root.to_str().unwrap(), "--name", "big"]);
    println!(
        "imported a {master_mib} MiB tree master in {:.1?}",
        t.elapsed()
    );
    std::fs::remove_dir_all(&root).unwrap();
    let spec = json!({
        "name": "storm", "image": image["digest"], "max-instances": nodes, "subnet": "198.18.2.0/24",
        "hostname": "storm-{index:03}", "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "agent"},
        "deploy-timeout-secs": 900,
    });
    std::fs::write(dir.join("storm.json"), spec.to_string()).unwrap();
    bed.mint(&[
        "tier",
        "create",
        "-f",
        dir.join("storm.json").to_str().unwrap(),
    ]);
    bed.wait_for("every node registered", Duration::from_secs(60), || {
        (bed.mint(&["node", "list"]).as_array()?.len() == nodes).then_some(())
    });

    let token = std::fs::read_to_string(bed.token_file())
        .unwrap()
        .trim()
        .to_string();
    let admin_get = |path: &str| -> Value {
        bed.http()
            .get(&format!("{}{path}", bed.url))
            .set("Authorization", &format!("Bearer {token}"))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let artifact = admin_get("/v1/artifacts/storm/0");
    let (digest, size) = (
        artifact["parts"][0]["digest"].as_str().unwrap().to_string(),
        artifact["parts"][0]["size"].as_u64().unwrap(),
    );
    let served = |d: &str| {
        admin_get("/v1/blobs")["served"][d]["bytes"]
            .as_u64()
            .unwrap_or(0)
    };
    let pid = bed.daemon_pid();
    println!(
        "{nodes} nodes, master blob {digest} of {:.1} MiB",
        size as f64 / 1048576.0
    );

    // The transport's rate: curl in every node's namespace, all at once, to a file beside
    // the node's cache (the same disk the agents write to).
    let cert = dir.join("data/tls/cert.pem");
    let url = format!("{}/v1/blobs/{digest}", bed.url);
    reset_peak_rss(pid);
    let t = Instant::now();
    let curls: Vec<_> = (0..nodes)
        .map(|i| {
            let out = dir.join(format!("node-{i}/curl.out"));
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &bed.namespaces[i],
                    "curl",
                    "-sS",
                    "--fail",
                    "--cacert",
                ])
                .arg(&cert)
                .args(["-H", &format!("Authorization: Bearer {token}"), "-o"])
                .arg(&out)
                .arg(&url)
                .spawn()
                .expect("curl")
        })
        .collect();
    let mut curls: Vec<Option<std::process::Child>> = curls.into_iter().map(Some).collect();
    let mut curl_done = Vec::new();
    while curls.iter().any(Option::is_some) {
        for slot in curls.iter_mut() {
            if let Some(status) = slot.as_mut().and_then(|c| c.try_wait().unwrap()) {
                assert!(status.success(), "a curl failed");
                curl_done.push(t.elapsed());
                *slot = None;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let curl_time = t.elapsed();
    let curl_rss = peak_rss_mib(pid);
    for i in 0..nodes {
        let out = dir.join(format!("node-{i}/curl.out"));
        assert_eq!(std::fs::metadata(&out).unwrap().len(), size);
        std::fs::remove_file(out).unwrap();
    }
    let curl_rate = (nodes as u64 * size) as f64 / curl_time.as_secs_f64() / 1048576.0;
    let before = served(&digest);

    // The storm: every instance at once, on nodes that do not have the master.
    reset_peak_rss(pid);
    let t = Instant::now();
    // By the API, which records the intent and answers at once (`mint tier scale` would
    // wait for the whole storm before the polls below could start).
    let scaled = bed
        .http()
        .post(&format!("{}/v1/tiers/storm/scale", bed.url))
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(json!({"instances": nodes}));
    assert!(scaled.is_ok(), "scale request: {scaled:?}");
    // Measured from the nodes' side, which the engine's load cannot delay: when each
    // node's download is complete (its partial file has every byte, or the cache has the
    // entry), and when each pre-assigned address answers (one poller per address).
    let hex = digest.trim_start_matches("sha256:").to_string();
    let addresses: Vec<String> = admin_get("/v1/tiers/storm/instances")
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().to_string())
        .collect();
    let pollers: Vec<_> = addresses
        .into_iter()
        .map(|address| {
            std::thread::spawn(move || {
                while t.elapsed() < Duration::from_secs(900) {
                    if get(&format!("http://{address}/")).is_some() {
                        return Some(t.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                None
            })
        })
        .collect();
    let mut received: Vec<Option<Duration>> = vec![None; nodes];
    while received.iter().any(Option::is_none) {
        assert!(
            t.elapsed() < Duration::from_secs(900),
            "the downloads did not end in 15 minutes"
        );
        for (i, r) in received.iter_mut().enumerate().filter(|(_, r)| r.is_none()) {
            let cache = dir.join(format!("node-{i}/cache"));
            let full =
                std::fs::metadata(cache.join("partial").join(&hex)).is_ok_and(|m| m.len() >= size);
            if full || cache.join(format!("{hex}.meta")).exists() {
                *r = Some(t.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let received: Vec<Duration> = received.into_iter().flatten().collect();
    let answered: Vec<Duration> = pollers
        .into_iter()
        .map(|p| p.join().unwrap().expect("an instance never answered"))
        .collect();
    let sent = *received.iter().max().unwrap();
    let answering = *answered.iter().max().unwrap();
    let storm_rss = peak_rss_mib(pid);
    let sent_bytes = served(&digest) - before;
    let storm_rate = (nodes as u64 * size) as f64 / sent.as_secs_f64() / 1048576.0;
    println!(
        "plain parallel curl of the master into {nodes} nodes: first done {:.1?}, last {curl_time:.1?}, {curl_rate:.0} MiB/s, engine peak RSS {curl_rss:.0} MiB",
        curl_done.iter().min().unwrap()
    );
    println!(
        "boot storm, {nodes} nodes at once: master on the first node {:.1?}, on all {sent:.1?} ({storm_rate:.0} MiB/s; engine sent {:.1} MiB per node), first answering {:.1?}, all {answering:.1?}, engine peak RSS {storm_rss:.0} MiB",
        received.iter().min().unwrap(),
        sent_bytes as f64 / nodes as f64 / 1048576.0,
        answered.iter().min().unwrap()
    );
    println!(
        "engine throughput in the storm / plain curl = {:.2}",
        storm_rate / curl_rate
    );
    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
}
