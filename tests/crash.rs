//! Crash safety: the daemon is killed with SIGKILL at random moments while it mints tiers
//! and scales them, restarted on the same state, and checked each time: every invariant of
//! the pool holds and nothing it acknowledged is lost. Once with the state in sled, once
//! in etcd (where tiers of more than a few dozen instances are minted in batches, so a
//! kill can land between them).

use crate::etcd::Etcd;
use crate::support::{scratch, start_daemon_with};
use mint_store::Store;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A small deterministic generator, so a failing run can be replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the daemon acknowledged, and what it may have done without acknowledging.
#[derive(Default)]
struct Acked {
    /// Tiers acknowledged as created, with K.
    tiers: Vec<(String, u32)>,
    /// Per tier: the last acknowledged desired count, and counts requested since.
    desired: std::collections::HashMap<String, (u32, Vec<u32>)>,
    /// Requests cut off by a kill.
    interrupted: u32,
    /// Requests refused (a tier whose subnet another holds, a scale above K).
    refused: u32,
    /// Scale requests acknowledged.
    scaled: u32,
}

/// A daemon's URL and the `Authorization` its admin sends.
type Api = (String, String);

fn post(
    (base, auth): &Api,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, String> {
    ureq::post(&format!("{base}{path}"))
        .set("Authorization", auth)
        .timeout(Duration::from_secs(30))
        .send_json(body)
        .map_err(|e| e.to_string())?
        .into_json()
        .map_err(|e| e.to_string())
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    // `cargo xtask soak` runs 1,000; CI keeps 100.
    let cycles: u64 = std::env::var("MINT_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(100);
    crash_cycles("crash", cycles, None);
}

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged_on_etcd() {
    let etcd = Etcd::start("crash");
    let cycles: u64 = std::env::var("MINT_CRASH_CYCLES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(50);
    crash_cycles("crash-etcd", cycles, Some(&etcd));
}

/// `cycles` kills of a daemon whose state is in `etcd`, or in sled if none.
fn crash_cycles(name: &str, cycles: u64, etcd: Option<&Etcd>) {
    let store_arg = etcd.map(|e| format!("etcd://{}/crash", e.endpoint));
    // On etcd, tiers of over 40 instances are minted in batches: up to 120, so that some
    // kills land between batches.
    let max_k: u64 = if etcd.is_some() { 120 } else { 40 };
    // Each change is a round trip to etcd, so requests take longer there; the kill comes
    // within a wider window so that some requests still finish between kills.
    let kill_within_ms: u64 = if etcd.is_some() { 300 } else { 120 };
    let daemon_args: Vec<&str> = match &store_arg {
        Some(a) => vec!["--store", a],
        None => vec![],
    };
    let open = |data: &std::path::Path| match etcd {
        Some(e) => Store::open_at(&e.location("crash")).unwrap(),
        None => Store::open(&data.join("state")).unwrap(),
    };
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let dir = scratch(name);
    let data = dir.join("data");
    let master = crate::support::root().join("tests/fixtures/master-ifupdown");
    let acked = Arc::new(Mutex::new(Acked::default()));
    let started = Instant::now();
    let mut digest = String::new();
    // Instances holding nodes when the daemon was killed, summed over the kills: evidence
    // that the kills landed while tiers were being reconciled, not only between requests.
    let mut held_at_kills = 0;

    for cycle in 0..cycles {
        // Bound the whole test in time whatever the machine's speed.
        assert!(
            started.elapsed() < Duration::from_secs(6 * cycles),
            "{cycles} cycles took over {} s",
            6 * cycles
        );
        let (mut child, url) = start_daemon_with(&data, &daemon_args);
        let url: Api = (url, crate::support::admin_auth(&data));
        if cycle == 0 {
            let v = post(&url, "/v1/images", serde_json::json!({"path": master})).unwrap();
            digest = v["digest"].as_str().unwrap().to_string();
            for i in 0..6 {
                post(&url, "/v1/nodes", serde_json::json!({"name": format!("n{i}"), "cpus": 4, "memory-mib": 4096, "labels": {"zone": format!("z{}", i % 3)}})).unwrap();
            }
        }
        // A client thread issues requests while the main thread picks a moment to kill.
        let ops = rng.below(4) + 1;
        let plan: Vec<(u64, u64)> = (0..ops).map(|_| (rng.below(3), rng.next())).collect();
        let (client_acked, client_url, client_digest) =
            (acked.clone(), url.clone(), digest.clone());
        let client = std::thread::spawn(move || {
            for (op, arg) in plan {
                let tiers = client_acked.lock().unwrap().tiers.clone();
                if op == 0 || tiers.is_empty() {
                    let n = tiers.len() + cycle as usize * 10;
                    let name = format!("t{cycle}x{n}");
                    let k = (arg % max_k + 1) as u32;
                    let spec = serde_json::json!({
                        "name": name, "image": client_digest, "max-instances": k,
                        "subnet": format!("198.18.{}.0/24", (cycle as usize * 4 + tiers.len()) % 250),
                        "hostname": format!("{name}-{{index}}"), "driver": {"plugin": "noop"},
                    });
                    match post(&client_url, "/v1/tiers", spec) {
                        Ok(_) => client_acked.lock().unwrap().tiers.push((name, k)),
                        Err(e) if e.contains("status code 4") => {
                            client_acked.lock().unwrap().refused += 1
                        }
                        Err(_) => client_acked.lock().unwrap().interrupted += 1,
                    }
                } else {
                    let (name, k) = tiers[(arg % tiers.len() as u64) as usize].clone();
                    let n = ((arg >> 8) % (k as u64 + 1)).min(6) as u32;
                    client_acked
                        .lock()
                        .unwrap()
                        .desired
                        .entry(name.clone())
                        .or_default()
                        .1
                        .push(n);
                    if post(
                        &client_url,
                        &format!("/v1/tiers/{name}/scale"),
                        serde_json::json!({"instances": n}),
                    )
                    .is_ok()
                    {
                        let mut a = client_acked.lock().unwrap();
                        a.scaled += 1;
                        let e = a.desired.entry(name).or_default();
                        e.0 = n;
                        e.1.clear();
                    } else {
                        client_acked.lock().unwrap().interrupted += 1;
                    }
                }
            }
        });
        std::thread::sleep(Duration::from_millis(rng.below(kill_within_ms)));
        child.kill().unwrap();
        child.wait().unwrap();
        client.join().unwrap();

        let store = open(&data);
        let broken = store.check_invariants().unwrap();
        held_at_kills += store
            .nodes()
            .unwrap()
            .iter()
            .filter(|n| n.instance.is_some())
            .count();
        assert!(broken.is_empty(), "cycle {cycle} (seed {seed}): {broken:?}");
        let a = acked.lock().unwrap();
        for (name, k) in &a.tiers {
            let t = store.tier(name).unwrap_or_else(|e| {
                panic!("cycle {cycle} (seed {seed}): acknowledged tier {name} lost: {e}")
            });
            assert_eq!(t.max_instances, *k);
            if let Some((last, pending)) = a.desired.get(name) {
                assert!(
                    t.desired == *last || pending.contains(&t.desired),
                    "cycle {cycle} (seed {seed}): tier {name} desired {} not {last} or one of {pending:?}",
                    t.desired
                );
            }
        }
    }
    // The run must have exercised what it claims to: acknowledged work, and kills that
    // landed in the middle of requests.
    let a = acked.lock().unwrap();
    // A daemon that opens the state removes a tier whose minting a kill cut off, with an
    // event: how many kills landed between batches.
    let (mut last, _) = start_daemon_with(&data, &daemon_args);
    last.kill().unwrap();
    last.wait().unwrap();
    let abandoned = open(&data)
        .events(None, usize::MAX)
        .unwrap()
        .iter()
        .filter(|e| e.kind == "tier-abandoned")
        .count();
    eprintln!(
        "crash test: {cycles} kills; {} tiers and {} scalings acknowledged, {} requests cut off by a kill, {} refused; {held_at_kills} instances on nodes at the kills in all; {abandoned} tiers cut off between batches of their minting and removed",
        a.tiers.len(),
        a.scaled,
        a.interrupted,
        a.refused
    );
    assert!(
        held_at_kills > 0,
        "no kill found an instance on a node: nothing was reconciled"
    );
    assert!(
        a.tiers.len() as u64 >= cycles / 5 && a.scaled as u64 >= cycles / 5,
        "too little acknowledged work to mean anything"
    );
    assert!(
        a.interrupted as u64 >= cycles / 10,
        "too few kills landed during a request"
    );
}

#[test]
fn a_kill_in_the_middle_of_minting_10000_leaves_0_or_10000() {
    use mint_store::kv::{Kv, prefix_end};
    let etcd = Etcd::start("mint-kill");
    let dir = scratch("crash-mint-kill");
    let data = dir.join("data");
    let store_arg = format!("etcd://{}/mintk", etcd.endpoint);
    let args = ["--store", store_arg.as_str(), "--lease-secs", "3"];
    let (mut child, url) = start_daemon_with(&data, &args);
    let api: Api = (url, crate::support::admin_auth(&data));
    let master = crate::support::root().join("tests/fixtures/master-ifupdown");
    let digest = post(&api, "/v1/images", serde_json::json!({"path": master})).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let spec = serde_json::json!({
        "name": "big", "image": digest, "max-instances": 10_000, "subnet": "198.18.0.0/16",
        "hostname": "big-{index}", "driver": {"plugin": "noop"},
    });
    let request = std::thread::spawn(move || post(&api, "/v1/tiers", spec));
    // Killed as soon as the tier is recorded as minting, while its batches are written.
    let kv = etcd.kv("mintk");
    let deadline = Instant::now() + Duration::from_secs(120);
    while kv.get(b"minting/big").unwrap().is_none() {
        assert!(Instant::now() < deadline, "the tier never began minting");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(150));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(request.join().unwrap().is_err(), "the request was cut off");
    let start = b"instances/big\0".to_vec();
    let (written, _) = kv
        .range(&start, &prefix_end(&start), usize::MAX, None)
        .unwrap();
    assert!(
        kv.get(b"minting/big").unwrap().is_some() && !written.is_empty() && written.len() < 10_000,
        "the kill landed between batches ({} instances written)",
        written.len()
    );
    eprintln!("killed with {} of 10,000 instances written", written.len());

    // The next daemon to lead removes them all, once the killed one's lease has run out.
    let (mut child, _) = start_daemon_with(&data, &args);
    let deadline = Instant::now() + Duration::from_secs(60);
    while kv.get(b"minting/big").unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the half-minted tier was never removed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let store = Store::open_at(&etcd.location("mintk")).unwrap();
    assert!(store.tiers().unwrap().is_empty());
    assert!(store.instances("big").unwrap().is_empty());
    assert!(!store.address_taken("198.18.0.2".parse().unwrap()).unwrap());
    assert_eq!(
        kv.range(b"", b"", usize::MAX, None)
            .unwrap()
            .0
            .iter()
            .filter(|e| e.key.starts_with(b"addresses/") || e.key.starts_with(b"hostnames/"))
            .count(),
        0
    );
    assert!(
        store
            .events(None, 1000)
            .unwrap()
            .iter()
            .any(|e| e.kind == "tier-abandoned")
    );
    assert_eq!(store.check_invariants().unwrap(), Vec::<String>::new());
}
