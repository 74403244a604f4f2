//! Several daemons on one three-member etcd cluster, under faults: agents on namespace
//! nodes, a workload of scales, node additions and tier creations sent to whichever daemon
//! answers, and fault iterations (the leader SIGKILLed; the leader SIGSTOPped past its lease
//! and then let go on; an etcd member killed and brought back). After every iteration every
//! invariant holds, no acknowledged write is lost, no instance ran on two nodes at once as
//! the agents themselves report it, and a new leader accepted a write within the lease's
//! TTL plus 5 s. The leader killed in the middle of minting 10,000 instances leaves a tier
//! of 0 or 10,000.
//!
//! `MINT_FAILOVER_ITERATIONS` sets how many iterations run (21 unless told; `cargo xtask
//! soak` runs more), and `MINT_FAILOVER_REPORT` names a file the figures are written to.

use crate::support::{root, scratch};
use crate::testbed::{TestBed, TestCa, master};
use mint_store::etcd::LocalCluster;
use mint_store::{Location, Store};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The test lease: short, so that iterations fit in CI.
const LEASE_SECS: u64 = 3;

/// How long a new leader may take to accept a write after a fault.
const FAILOVER_BOUND: Duration = Duration::from_secs(LEASE_SECS + 5);

/// What the workload was told was done: each of these must hold afterwards.
#[derive(Default)]
struct Ledger {
    /// Nodes whose addition was acknowledged.
    nodes: BTreeSet<String>,
    /// Tiers whose creation was acknowledged.
    tiers: BTreeSet<String>,
    /// The last scale of `web` sent, and whether it was acknowledged (an unanswered one may
    /// or may not have landed, so it proves nothing).
    scale: Option<(u32, bool)>,
}

/// A request to the first daemon of `urls` that answers it; `Err` when none acknowledged it.
fn send(
    http: &ureq::Agent,
    urls: &[String],
    auth: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    send_within(http, urls, auth, method, path, body, Duration::from_secs(3))
}

/// [`send`], waiting at most `within` for each daemon.
fn send_within(
    http: &ureq::Agent,
    urls: &[String],
    auth: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    within: Duration,
) -> Result<Value, String> {
    let mut last = String::new();
    for url in urls {
        let r = http
            .request(method, &format!("{url}{path}"))
            .set("Authorization", auth)
            .timeout(within);
        let answer = match &body {
            Some(b) => r.send_json(b.clone()),
            None => r.call(),
        };
        match answer {
            Ok(r) => return r.into_json().map_err(|e| e.to_string()),
            // A refusal by the leader is an answer: it did not land.
            Err(ureq::Error::Status(code, r)) if code < 500 => {
                return Err(format!("{code}: {}", r.into_string().unwrap_or_default()));
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// How to ask each node's agent what it runs: a client pinned to its certificate, the
/// engine's credential for it, and its status URL.
type Agents = Vec<(ureq::Agent, String, String)>;

fn agents(bed: &TestBed, nodes: usize) -> Agents {
    (0..nodes)
        .map(|i| {
            (
                bed.agent_http(i),
                format!("Bearer {}", bed.engine_credential(i)),
                format!("https://198.18.1.{}:7601/v1/status", 10 + i),
            )
        })
        .collect()
}

/// Every instance each agent reports deploying or running, by node.
fn agents_report(agents: &Agents) -> Vec<(usize, String)> {
    agents
        .iter()
        .enumerate()
        .filter_map(|(i, (http, auth, url))| {
            let v: Value = http
                .get(url)
                .set("Authorization", auth)
                .timeout(Duration::from_secs(2))
                .call()
                .ok()?
                .into_json()
                .ok()?;
            let live = v["state"] == "running" || v["state"] == "deploying";
            live.then(|| (i, format!("{}/{}", v["tier"], v["index"])))
        })
        .collect()
}

/// One fault and what it showed.
struct Outcome {
    fault: &'static str,
    /// From the fault to the first write a daemon acknowledged.
    failover: Duration,
}

#[test]
fn three_daemons_on_three_etcd_members_survive_kills_pauses_and_lost_members() {
    let iterations: usize = std::env::var("MINT_FAILOVER_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(21);
    let dir = scratch("failover");
    let mut etcd = LocalCluster::start(&dir.join("etcd"), 3).unwrap_or_else(|e| panic!("{e}"));
    let store_arg = format!("etcd://{}/failover", etcd.endpoints().join(","));
    let location = Location::parse(&store_arg, &dir.join("unused")).unwrap();
    let shared = dir.join("shared");
    let ca = TestCa::new(&dir);
    let lease = LEASE_SECS.to_string();
    let nodes = 4;
    let mut bed = TestBed::cluster(
        dir.clone(),
        root(),
        nodes,
        3,
        &[
            "--store",
            &store_arg,
            "--lease-secs",
            &lease,
            "--shared-dir",
            shared.to_str().unwrap(),
            "--node-timeout-secs",
            "15",
        ],
        &ca,
    );
    let http = bed.http();
    let auth = crate::support::admin_auth(&dir.join("data"));
    let urls = bed.daemon_urls();
    bed.wait_for("4 registered nodes", Duration::from_secs(60), || {
        let v = send(&http, &urls, &auth, "GET", "/v1/nodes", None).ok()?;
        (v.as_array()?.len() == nodes).then_some(())
    });
    let image = send(
        &http,
        &urls[..1],
        &auth,
        "POST",
        "/v1/images",
        Some(json!({ "path": master(&dir), "name": "hello" })),
    )
    .unwrap();
    let digest = image["digest"].as_str().unwrap().to_string();
    let web = json!({
        "name": "web", "image": digest, "max-instances": 4, "subnet": "198.18.2.0/24",
        "hostname": "web-{index:03}", "customizers": [{"plugin": "hostname"}],
        "driver": {"plugin": "agent"},
    });
    send(&http, &urls[..1], &auth, "POST", "/v1/tiers", Some(web)).unwrap();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    send(
        &http,
        &urls[..1],
        &auth,
        "POST",
        "/v1/tiers/web/scale",
        Some(json!({ "instances": 2 })),
    )
    .unwrap();
    ledger.lock().unwrap().scale = Some((2, true));
    ledger.lock().unwrap().tiers.insert("web".into());

    // The agents' own reports, sampled all along: an instance live on two nodes at once
    // is what fencing must prevent.
    let stop = Arc::new(AtomicBool::new(false));
    let doubled = Arc::new(Mutex::new(Vec::<String>::new()));
    let samples = Arc::new(AtomicUsize::new(0));
    let asking = agents(&bed, nodes);
    let sampler = {
        let (stop, doubled, samples, asking) = (
            stop.clone(),
            doubled.clone(),
            samples.clone(),
            asking.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let report = agents_report(&asking);
                let mut on: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
                for (node, instance) in &report {
                    on.entry(instance).or_default().push(*node);
                }
                for (instance, holders) in on.iter().filter(|(_, h)| h.len() > 1) {
                    doubled
                        .lock()
                        .unwrap()
                        .push(format!("{instance} live on nodes {holders:?}"));
                }
                samples.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    // The workload: scales of `web`, plain nodes added, small tiers of the `noop` driver
    // created, each sent to whichever daemon answers first, in a rotating order.
    let workload = {
        let (stop, ledger, http, auth, urls) = (
            stop.clone(),
            ledger.clone(),
            http.clone(),
            auth.clone(),
            urls.clone(),
        );
        let digest = digest.clone();
        std::thread::spawn(move || {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut order = urls.clone();
                order.rotate_left(n % urls.len());
                match n % 3 {
                    0 => {
                        let count = 1 + (n / 3 % 3) as u32;
                        // Unknown until answered: a check meanwhile may see it landed.
                        ledger.lock().unwrap().scale = Some((count, false));
                        let r = send(
                            &http,
                            &order,
                            &auth,
                            "POST",
                            "/v1/tiers/web/scale",
                            Some(json!({ "instances": count })),
                        );
                        ledger.lock().unwrap().scale = Some((count, r.is_ok()));
                    }
                    1 => {
                        let name = format!("extra-{n}");
                        let spec = json!({ "name": name, "cpus": 2, "memory-mib": 1024 });
                        if send(&http, &order, &auth, "POST", "/v1/nodes", Some(spec)).is_ok() {
                            ledger.lock().unwrap().nodes.insert(name);
                        }
                    }
                    _ if n % 12 == 2 && n < 12 * 40 => {
                        let name = format!("t{n}");
                        let spec = json!({
                            "name": name, "image": digest, "max-instances": 3,
                            "subnet": format!("198.19.{}.0/24", n / 12), "hostname": format!("{name}-{{index}}"),
                            "driver": {"plugin": "noop"},
                        });
                        if send(&http, &order, &auth, "POST", "/v1/tiers", Some(spec)).is_ok() {
                            ledger.lock().unwrap().tiers.insert(name.clone());
                            let _ = send(
                                &http,
                                &order,
                                &auth,
                                "POST",
                                &format!("/v1/tiers/{name}/scale"),
                                Some(json!({ "instances": 1 })),
                            );
                        }
                    }
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };

    let check = |when: &str| {
        let store = Store::open_at(&location).unwrap();
        let broken = store.check_invariants().unwrap();
        assert!(broken.is_empty(), "{when}: invariants broken: {broken:?}");
        let l = ledger.lock().unwrap();
        let nodes: BTreeSet<String> = store.nodes().unwrap().into_iter().map(|n| n.name).collect();
        let lost: Vec<&String> = l.nodes.difference(&nodes).collect();
        assert!(lost.is_empty(), "{when}: acknowledged nodes lost: {lost:?}");
        let tiers: BTreeSet<String> = store.tiers().unwrap().into_iter().map(|t| t.name).collect();
        let lost: Vec<&String> = l.tiers.difference(&tiers).collect();
        assert!(lost.is_empty(), "{when}: acknowledged tiers lost: {lost:?}");
        if let Some((count, true)) = l.scale {
            assert_eq!(
                store.tier("web").unwrap().desired,
                count,
                "{when}: the last acknowledged scale of web was lost"
            );
        }
    };

    let mut outcomes = Vec::new();
    for i in 0..iterations {
        let leader = bed.wait_for("a leader", FAILOVER_BOUND, || bed.leader());
        let fault = [
            "kill the leader",
            "pause the leader past its lease",
            "kill an etcd member",
        ][i % 3];
        let t0 = Instant::now();
        let member = i / 3 % 3;
        match i % 3 {
            0 => bed.kill_daemon(leader),
            1 => bed.signal(leader, "-STOP"),
            _ => etcd.kill(member),
        }
        // A write through the daemons that were not hit, until one is acknowledged.
        let others: Vec<String> = urls
            .iter()
            .enumerate()
            .filter(|(j, _)| i % 3 == 2 || *j != leader)
            .map(|(_, u)| u.clone())
            .collect();
        let probe = format!("probe-{i}");
        let failover = loop {
            let spec = json!({ "name": probe, "cpus": 1, "memory-mib": 512 });
            // A client that gives up on a daemon after 1 s and tries the next, as an
            // operator's script would.
            let within = Duration::from_secs(1);
            match send_within(
                &http,
                &others,
                &auth,
                "POST",
                "/v1/nodes",
                Some(spec),
                within,
            ) {
                Ok(_) => break t0.elapsed(),
                Err(e) if e.starts_with("409") => break t0.elapsed(),
                Err(_) => {}
            }
            assert!(
                t0.elapsed() < FAILOVER_BOUND * 2,
                "iteration {i} ({fault}): no write accepted for {:?}",
                t0.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        ledger.lock().unwrap().nodes.insert(probe);
        match i % 3 {
            0 => bed.restart_daemon(leader),
            1 => {
                // Held past its lease, then let go on: it must find itself deposed.
                let past = Duration::from_secs(LEASE_SECS + 1);
                if let Some(rest) = past.checked_sub(t0.elapsed()) {
                    std::thread::sleep(rest);
                }
                let b = &bed;
                b.signal(leader, "-CONT");
                b.wait_for(
                    "the paused leader to step down",
                    Duration::from_secs(5),
                    || {
                        let v: Value = b
                            .http()
                            .get(&format!("{}/v1/health", urls[leader]))
                            .timeout(Duration::from_secs(1))
                            .call()
                            .ok()?
                            .into_json()
                            .ok()?;
                        (v["role"]["leads"] == false).then_some(())
                    },
                );
            }
            _ => etcd.restart(member).unwrap(),
        }
        eprintln!("iteration {i}: {fault}: a write was accepted after {failover:?}");
        assert!(
            failover <= FAILOVER_BOUND,
            "iteration {i} ({fault}): the first write was accepted after {failover:?}, over {FAILOVER_BOUND:?}"
        );
        outcomes.push(Outcome { fault, failover });
        // Let the reconciler work under the new leader before the next fault.
        std::thread::sleep(Duration::from_secs(2));
        check(&format!("after iteration {i} ({fault})"));
    }
    stop.store(true, Ordering::Relaxed);
    workload.join().unwrap();
    sampler.join().unwrap();
    check("at the end");
    let doubled = doubled.lock().unwrap();
    assert!(
        doubled.is_empty(),
        "instances ran on two nodes at once: {doubled:?}"
    );
    assert!(
        samples.load(Ordering::Relaxed) > iterations,
        "the agents were sampled"
    );
    // The tier the workload scaled is deployed as last asked, under whichever leader.
    let (count, _) = ledger.lock().unwrap().scale.unwrap();
    bed.wait_for("web to settle", Duration::from_secs(60), || {
        send(
            &http,
            &urls,
            &auth,
            "POST",
            "/v1/tiers/web/scale",
            Some(json!({ "instances": count })),
        )
        .ok()?;
        (agents_report(&asking).len() == count as usize).then_some(())
    });
    // Each agent remembers the highest fencing token it was sent, and refuses an older one
    // as coming from a deposed leader.
    let (node, token): (usize, u64) = (0..nodes)
        .find_map(|i| {
            let t = std::fs::read_to_string(dir.join(format!("node-{i}/fencing-token"))).ok()?;
            Some((i, t.trim().parse().ok()?))
        })
        .expect("an agent that was deployed to keeps the leader's token");
    assert!(token > 1, "a real token, not a default");
    let (agent, agent_auth, status) = &asking[node];
    let undeploy = status.replace("/v1/status", "/v1/undeploy");
    match agent
        .post(&undeploy)
        .set("Authorization", agent_auth)
        .set("mint-fencing-token", &(token - 1).to_string())
        .call()
    {
        Err(ureq::Error::Status(409, r)) => {
            let body = r.into_string().unwrap();
            assert!(body.contains("fenced"), "{body}");
        }
        other => panic!("an older leader's undeploy was not refused: {other:?}"),
    }
    let mut times: Vec<Duration> = outcomes.iter().map(|o| o.failover).collect();
    times.sort();
    let pick = |q: f64| times[((times.len() as f64 - 1.0) * q).round() as usize];
    let report = format!(
        "{} iterations ({} leader kills, {} pauses, {} etcd member kills), lease {LEASE_SECS} s: first write accepted after p50 {:?}, p99 {:?}, max {:?}; {} samples of the agents, no instance on two nodes; invariants held after each\n",
        outcomes.len(),
        outcomes
            .iter()
            .filter(|o| o.fault.starts_with("kill the"))
            .count(),
        outcomes
            .iter()
            .filter(|o| o.fault.starts_with("pause"))
            .count(),
        outcomes.iter().filter(|o| o.fault.contains("etcd")).count(),
        pick(0.5),
        pick(0.99),
        times.last().unwrap(),
        samples.load(Ordering::Relaxed),
    );
    eprint!("{report}");
    if let Some(path) = std::env::var_os("MINT_FAILOVER_REPORT") {
        std::fs::write(path, &report).unwrap();
    }
}

/// Whether the daemon at `url` says it leads.
fn leads(url: &str) -> bool {
    ureq::get(&format!("{url}/v1/health"))
        .timeout(Duration::from_secs(1))
        .call()
        .ok()
        .and_then(|r| r.into_json::<Value>().ok())
        .is_some_and(|v| v["role"]["leads"] == true)
}

fn wait_until(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_leader_killed_while_minting_10000_leaves_the_next_leader_0_or_10000() {
    use crate::support::start_daemon_with;
    use mint_store::kv::{Kv, prefix_end};
    let etcd = crate::etcd::Etcd::start("failover-mint");
    let dir = scratch("failover-mint");
    let store_arg = format!("etcd://{}/fm", etcd.endpoint);
    let shared = dir.join("shared");
    let args = [
        "--store",
        store_arg.as_str(),
        "--lease-secs",
        "3",
        "--shared-dir",
        shared.to_str().unwrap(),
    ];
    let (mut first, first_url) = start_daemon_with(&dir.join("a"), &args);
    wait_until("the first daemon to lead", Duration::from_secs(20), || {
        leads(&first_url)
    });
    let (mut second, second_url) = start_daemon_with(&dir.join("b"), &args);
    let auth = crate::support::admin_auth(&dir.join("a"));
    let post = |url: &str, path: &str, body: Value| -> Result<Value, String> {
        ureq::post(&format!("{url}{path}"))
            .set("Authorization", &auth)
            .timeout(Duration::from_secs(120))
            .send_json(body)
            .map_err(|e| e.to_string())?
            .into_json()
            .map_err(|e| e.to_string())
    };
    // Through the follower, so the import and the creation are forwarded to the leader.
    let master = root().join("tests/fixtures/master-ifupdown");
    let digest = post(&second_url, "/v1/images", json!({ "path": master })).unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let spec = json!({
        "name": "big", "image": digest, "max-instances": 10_000, "subnet": "198.18.0.0/16",
        "hostname": "big-{index}", "driver": {"plugin": "noop"},
    });
    let (url, a) = (second_url.clone(), auth.clone());
    let request = std::thread::spawn(move || {
        ureq::post(&format!("{url}/v1/tiers"))
            .set("Authorization", &a)
            .timeout(Duration::from_secs(120))
            .send_json(spec)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let kv = etcd.kv("fm");
    wait_until("the tier to begin minting", Duration::from_secs(60), || {
        kv.get(b"minting/big").unwrap().is_some()
    });
    std::thread::sleep(Duration::from_millis(150));
    first.kill().unwrap();
    first.wait().unwrap();
    let killed = Instant::now();
    assert!(request.join().unwrap().is_err(), "the request was cut off");
    let start = b"instances/big\0".to_vec();
    let written = kv
        .range(&start, &prefix_end(&start), usize::MAX, None)
        .unwrap()
        .0
        .len();
    eprintln!("the leader was killed with {written} of 10,000 instances written");

    // The follower takes over within the lease and the bound, and settles the tier.
    wait_until("the follower to lead", FAILOVER_BOUND, || {
        leads(&second_url)
    });
    eprintln!("the follower led after {:?}", killed.elapsed());
    wait_until(
        "the half-minted tier to be settled",
        Duration::from_secs(60),
        || kv.get(b"minting/big").unwrap().is_none(),
    );
    let store = Store::open_at(&etcd.location("fm")).unwrap();
    let n = store.instances("big").map(|i| i.len()).unwrap_or(0);
    assert!(n == 0 || n == 10_000, "the tier has {n} instances");
    if n == 0 {
        assert!(store.tiers().unwrap().is_empty());
        assert!(
            store
                .events(None, 1000)
                .unwrap()
                .iter()
                .any(|e| e.kind == "tier-abandoned")
        );
    }
    assert_eq!(store.check_invariants().unwrap(), Vec::<String>::new());
    second.kill().unwrap();
    second.wait().unwrap();
}

#[test]
fn a_second_daemon_on_one_data_directory_is_refused_before_it_opens_anything() {
    use crate::support::start_daemon_with;
    let etcd = crate::etcd::Etcd::start("failover-lock");
    let dir = scratch("failover-lock");
    let store_arg = format!("etcd://{}/lock", etcd.endpoint);
    let args = ["--store", store_arg.as_str(), "--lease-secs", "3"];
    let (mut first, _) = start_daemon_with(&dir.join("d"), &args);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["daemon", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("d"))
        .args(args)
        .output()
        .unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("--data-dir") && err.contains("another mint daemon uses this directory"),
        "{err}"
    );
}
