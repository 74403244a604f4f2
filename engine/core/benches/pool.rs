//! What the pool engine costs: minting K = 10,000 instances with the `hostname` and
//! `network` customizers (durable write included), selecting 100 nodes among 10,000, and
//! reopening a store of 100,000 instance records, with the resident memory it takes; each
//! on sled, then on a real etcd member the bench starts (if Debian's `etcd-server` is
//! installed), in the same run. `cargo bench -p mint-core --bench pool`.

use mint_core::{Engine, TierSpec};
use mint_model::records::{Instance, InstanceId, Node, PluginRef};
use mint_model::{InstanceState, NodeState};
use mint_store::Location;
use std::collections::BTreeMap;
use std::time::Instant;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn spec(name: &str, image: &str, k: u32, subnet: &str) -> TierSpec {
    TierSpec {
        name: name.into(),
        image: image.into(),
        max_instances: k,
        subnet: subnet.into(),
        reserved: vec![],
        gateway: None,
        dns: vec![],
        hostname: format!("{name}-{{index:05}}"),
        requirements: Default::default(),
        policy: PluginRef {
            plugin: "spread".into(),
            config: Default::default(),
        },
        customizers: vec![
            PluginRef {
                plugin: "hostname".into(),
                config: Default::default(),
            },
            PluginRef {
                plugin: "network".into(),
                config: Default::default(),
            },
        ],
        driver: PluginRef {
            plugin: "noop".into(),
            config: Default::default(),
        },
        deploy_timeout_secs: 600,
        autoscale: None,
    }
}

/// Placements per second at 5,000 nodes with `spread`: a tier of 5,000 grown to 5,000
/// by steps that each bind `per_step` instances (one policy call, one transaction), until
/// every node holds one.
fn placements(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    master: &std::path::Path,
    per_step: u32,
) {
    const NODES: u32 = 5_000;
    let engine = Engine::open(dir).unwrap();
    engine.plugins.preload_bundled().unwrap();
    let image = engine.import_image(master, None).unwrap().digest;
    let mut s = spec("place", &image, NODES, "198.18.0.0/16");
    s.customizers.truncate(1);
    rt.block_on(engine.create_tier(&s, "admin:test")).unwrap();
    for i in 0..NODES {
        let labels = BTreeMap::from([
            ("zone".to_string(), format!("z{}", i % 4)),
            ("rack".to_string(), format!("r{}", i % 100)),
        ]);
        let node = Node {
            name: format!("p-{i:05}"),
            cpus: 8,
            memory_mib: 16384,
            arch: "x86_64".into(),
            labels,
            properties: BTreeMap::new(),
            state: NodeState::Free,
            instance: None,
            load: 0,
            cached: Vec::new(),
        };
        engine.store.add_node(&node, "admin:test").unwrap();
    }
    let (busy, asked) = (std::collections::BTreeSet::new(), BTreeMap::new());
    let input = mint_core::StepInput {
        busy: &busy,
        asked_ms: &asked,
        reporting: &|_| false,
        poll_every_ms: u64::MAX / 4,
        check_every_ms: u64::MAX / 4,
    };
    let t = Instant::now();
    for round in 1..=NODES / per_step {
        engine
            .store
            .set_desired("place", round * per_step, "admin:test")
            .unwrap();
        let (p, effects) = rt.block_on(engine.step("place", &input)).unwrap();
        assert_eq!(
            (p.deployed.len(), effects.len()),
            (per_step as usize, per_step as usize),
            "{:?}",
            p.blocked
        );
    }
    let secs = t.elapsed().as_secs_f64();
    let rate = f64::from(NODES) / secs;
    println!(
        "place 5,000 instances on 5,000 nodes (spread), {per_step} per step  {secs:>6.2} s  {rate:>7.0} placements/s  (target >= 1000/s: {})",
        if rate >= 1000.0 { "met" } else { "MISSED" }
    );
}

fn main() {
    let dir = std::env::temp_dir().join(format!("mint-pool-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let master = dir.join("master");
    for (p, t) in [
        ("etc/hostname", "debian\n"),
        ("etc/hosts", "127.0.0.1 localhost\n"),
        (
            "etc/network/interfaces",
            "auto eth0\niface eth0 inet dhcp\n",
        ),
        ("sbin/ifup", ""),
    ] {
        let f = master.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, t).unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let data = dir.join("data");
    phases(
        &rt,
        "sled",
        &master,
        &data,
        &Location::Sled(data.join("state")),
        2000.0,
    );
    match mint_store::etcd::LocalMember::start(&dir.join("etcd"), "bench") {
        Ok(member) => {
            let at = Location::Etcd {
                endpoints: vec![member.endpoint.clone()],
                namespace: "/bench/".into(),
            };
            phases(&rt, "etcd", &master, &dir.join("data-etcd"), &at, 1000.0);
        }
        Err(e) => println!("etcd: not measured: {e}"),
    }
    placements(&rt, &dir.join("by-100"), &master, 100);
    placements(&rt, &dir.join("at-once"), &master, 5_000);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Minting, selection and reopening with the state at `state`; `mint_target` is the
/// minting rate the backend should reach.
fn phases(
    rt: &tokio::runtime::Runtime,
    backend: &str,
    master: &std::path::Path,
    data: &std::path::Path,
    state: &Location,
    mint_target: f64,
) {
    println!("== state on {backend}");
    let engine = Engine::open_at(data, state).unwrap();
    engine.plugins.preload_bundled().unwrap();
    let image = engine.import_image(master, None).unwrap().digest;

    // Minting 10,000 instances, two customizers each, one durable transaction.
    let k = 10_000;
    let t = Instant::now();
    rt.block_on(engine.create_tier(&spec("web", &image, k, "198.18.0.0/16"), "admin:test"))
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let rate = k as f64 / secs;
    println!(
        "mint K = {k} (hostname + network, durable)     {secs:>8.2} s  {rate:>8.0} instances/s  (target >= {mint_target}/s: {})",
        if rate >= mint_target { "met" } else { "MISSED" }
    );

    // Selecting 100 nodes among 10,000 through the engine: store read, request, policy, checks.
    for i in 0..10_000u32 {
        let labels = BTreeMap::from([
            ("zone".to_string(), format!("z{}", i % 4)),
            ("rack".to_string(), format!("r{}", i % 100)),
        ]);
        let node = Node {
            name: format!("node-{i:05}"),
            cpus: 8,
            memory_mib: 16384,
            arch: "x86_64".into(),
            labels,
            properties: BTreeMap::new(),
            state: NodeState::Free,
            instance: None,
            load: i * 7 % 1000,
            cached: Vec::new(),
        };
        engine.store.add_node(&node, "admin:test").unwrap();
    }
    let mut samples = Vec::new();
    for round in 0..10 {
        let want = (round + 1) * 100;
        engine.store.set_desired("web", want, "admin:test").unwrap();
        let t = Instant::now();
        let p = rt.block_on(engine.reconcile("web")).unwrap();
        samples.push(t.elapsed());
        assert_eq!(p.deployed.len(), 100, "{:?}", p.blocked);
    }
    samples.sort();
    println!(
        "scale out by 100 among 10,000 nodes (select + 100 binds + 100 noop deploys)  median {:>8.1?}  max {:>8.1?}",
        samples[5], samples[9]
    );
    let nodes = engine.store.nodes().unwrap();
    let tier = engine.store.tier("web").unwrap();
    let runs = 20;
    let mut reads = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        std::hint::black_box(engine.store.nodes().unwrap());
        reads.push(t0.elapsed());
    }
    reads.sort();
    println!(
        "  reading 10,000 node records (copies) from the store  median {:>8.2?}",
        reads[runs / 2]
    );
    let policy = engine
        .plugins
        .get("spread", mint_plugins::Kind::NodePolicy, "policy")
        .unwrap();
    let mut sel = Vec::new();
    for _ in 0..runs {
        let t0 = Instant::now();
        let handles = engine.store.node_handles();
        let (req, names) = mint_core::selection_request(&tier, handles.iter().map(|n| &**n), 100);
        let c = rt.block_on(policy.select(&req, &names, None)).unwrap();
        assert_eq!(c.value.len(), 100);
        sel.push(t0.elapsed());
    }
    sel.sort();
    println!(
        "select 100 of {} free nodes (read nodes, build request, policy)  median {:>8.2?}  (target < 20 ms: {})",
        nodes.iter().filter(|n| n.state.can_select()).count(),
        sel[runs / 2],
        if sel[runs / 2].as_millis() < 20 {
            "met"
        } else {
            "MISSED"
        }
    );
    // A loaded plugin holds the runtime, whose engine secrets hold the store: both go, so
    // the database is closed before it is reopened.
    drop(policy);
    drop(engine);

    // Restart recovery with 100,000 instance records: nine more tiers written directly.
    let engine = Engine::open_at(data, state).unwrap();
    for n in 1..10u32 {
        let name = format!("bulk{n}");
        let mut s = spec(&name, &image, 10_000, &format!("198.{}.0.0/16", 18 + n * 2));
        s.customizers.truncate(1);
        let tier = s.to_tier().unwrap();
        let taken = |_| false;
        let addrs = tier.plan.allocate(10_000, &taken).unwrap();
        let inst: Vec<Instance> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| Instance {
                id: InstanceId {
                    tier: name.clone(),
                    index: i as u32,
                },
                hostname: tier.hostname.render(&name, i as u64),
                address: *a,
                state: InstanceState::Pooled,
                node: None,
                overlay: String::new(),
                since_ms: 0,
                disk: None,
                revision: 0,
                deployment: 0,
                deployment_started_ms: 0,
                layer: None,
            })
            .collect();
        engine
            .store
            .create_tier(&tier, &inst, "admin:test")
            .unwrap();
    }
    drop(engine);
    let rss_before = rss_mib();
    let t = Instant::now();
    let engine = Engine::open_at(data, state).unwrap();
    engine.plugins.preload_bundled().unwrap();
    let total: usize = engine
        .store
        .tiers()
        .unwrap()
        .iter()
        .map(|t| engine.store.instances(&t.name).unwrap().len())
        .sum();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "reopen with {total} instance records, preload plugins, read them all   {secs:>8.2} s  (target < 5 s: {})",
        if secs < 5.0 { "met" } else { "MISSED" }
    );
    println!(
        "resident memory after reading 100,000 instances  {:.0} MiB (before reopening: {rss_before:.0} MiB)",
        rss_mib()
    );
    drop(engine);
}
