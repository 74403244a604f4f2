//! A model-based test of the pool: random tier creations, node additions, scalings, node
//! failures and restarts against the real engine (bundled plugins; state in sled, then in
//! a real etcd), compared after every step with a simple in-memory model of what the pool
//! must look like.

use crate::support::{block_on, scratch};
use mint_core::{Engine, TierSpec};
use mint_model::records::{Node, PluginRef};
use mint_model::{InstanceState, NodeState};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// The model: per tier, K, the desired count, each instance's state and identity; the
/// number of free nodes.
#[derive(Default)]
struct Model {
    tiers: BTreeMap<String, ModelTier>,
    free_nodes: usize,
}

struct ModelTier {
    desired: u32,
    /// By index: state, and the identity minted at creation.
    instances: Vec<(InstanceState, IpAddr, String)>,
}

impl ModelTier {
    fn on_nodes(&self) -> usize {
        self.instances.iter().filter(|i| i.0.holds_node()).count()
    }
    /// What one reconciliation pass does: scale in from the highest index; scale out
    /// failed instances first, then pooled ones by index, as many as there are free nodes.
    fn reconcile(&mut self, free: &mut usize) {
        let on = self.on_nodes();
        let desired = self.desired as usize;
        if on > desired {
            let mut surplus: Vec<usize> = (0..self.instances.len())
                .filter(|&i| self.instances[i].0.holds_node())
                .collect();
            surplus.sort_by_key(|&i| std::cmp::Reverse(i));
            for i in surplus.into_iter().take(on - desired) {
                self.instances[i].0 = InstanceState::Pooled;
                *free += 1;
            }
        } else if desired > on && *free > 0 {
            let mut waiting: Vec<usize> = (0..self.instances.len())
                .filter(|&i| self.instances[i].0.can_deploy())
                .collect();
            waiting.sort_by_key(|&i| (self.instances[i].0 != InstanceState::Failed, i));
            for i in waiting.into_iter().take((desired - on).min(*free)) {
                self.instances[i].0 = InstanceState::Deployed;
                *free -= 1;
            }
        }
    }
}

fn spec(name: &str, image: &str, k: u32, subnet: u32) -> TierSpec {
    TierSpec {
        name: name.into(),
        image: image.into(),
        max_instances: k,
        subnet: format!("198.18.{subnet}.0/24"),
        reserved: vec![],
        gateway: Some(format!("198.18.{subnet}.1")),
        dns: vec![],
        hostname: format!("{name}-{{index:02}}"),
        requirements: Default::default(),
        policy: PluginRef {
            plugin: "spread".into(),
            config: Default::default(),
        },
        customizers: vec![PluginRef {
            plugin: "hostname".into(),
            config: Default::default(),
        }],
        driver: PluginRef {
            plugin: "noop".into(),
            config: Default::default(),
        },
        deploy_timeout_secs: 600,
        autoscale: None,
    }
}

fn compare(engine: &Engine, model: &Model, step: usize, seed: u64) {
    let ctx = format!("step {step} (seed {seed})");
    assert_eq!(
        engine.store.check_invariants().unwrap(),
        Vec::<String>::new(),
        "{ctx}"
    );
    let tiers = engine.store.tiers().unwrap();
    assert_eq!(
        tiers.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        model.tiers.keys().cloned().collect::<Vec<_>>(),
        "{ctx}"
    );
    for t in tiers {
        let m = &model.tiers[&t.name];
        assert_eq!(t.desired, m.desired, "{ctx}: tier {}", t.name);
        let real: Vec<(InstanceState, IpAddr, String)> = engine
            .store
            .instances(&t.name)
            .unwrap()
            .into_iter()
            .map(|i| (i.state, i.address, i.hostname))
            .collect();
        assert_eq!(real, m.instances, "{ctx}: tier {}", t.name);
    }
    let free = engine
        .store
        .nodes()
        .unwrap()
        .iter()
        .filter(|n| n.state == NodeState::Free)
        .count();
    assert_eq!(free, model.free_nodes, "{ctx}: free nodes");
}

#[test]
fn random_operations_match_the_model_across_restarts() {
    model_run("model", None);
}

#[test]
fn random_operations_match_the_model_across_restarts_on_etcd() {
    let etcd = crate::etcd::Etcd::start("model");
    model_run("model-etcd", Some(&etcd));
}

/// 250 random steps on an engine whose state is in `etcd`, or in sled if none.
fn model_run(name: &str, etcd: Option<&crate::etcd::Etcd>) {
    let open = |data: &std::path::Path| match etcd {
        Some(e) => Engine::open_at(data, &e.location("model")).unwrap(),
        None => Engine::open(data).unwrap(),
    };
    // On etcd, tiers of over 40 instances take more than one commit.
    let max_k = if etcd.is_some() { 60 } else { 12 };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("model test seed {seed}");
    let mut rng = Rng(seed);
    let dir = scratch(name);
    let src = crate::support::root().join("tests/fixtures/master-ifupdown");
    let data = dir.join("data");
    let mut engine = open(&data);
    let image = engine.import_image(&src, None).unwrap().digest;
    let mut model = Model::default();
    let started = Instant::now();
    let (mut nodes, mut restarts, mut failures, mut created, mut deleted) = (0usize, 0, 0, 0u32, 0);

    block_on(async {
        for step in 0..250 {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "the model test is bounded to 5 minutes"
            );
            match rng.below(10) {
                0 if model.tiers.len() < 6 => {
                    // Names and subnets are never reused, so a deleted tier's identities
                    // are not confused with a new one's.
                    let n = created;
                    created += 1;
                    let name = format!("t{n}");
                    let k = rng.below(max_k) as u32 + 1;
                    engine
                        .create_tier(&spec(&name, &image, k, n), "admin:test")
                        .await
                        .unwrap();
                    // The model mints identities the way the plan orders them: .2 upward.
                    let instances = (0..k)
                        .map(|i| {
                            (
                                InstanceState::Pooled,
                                format!("198.18.{n}.{}", i + 2).parse().unwrap(),
                                format!("{name}-{i:02}"),
                            )
                        })
                        .collect();
                    model.tiers.insert(
                        name,
                        ModelTier {
                            desired: 0,
                            instances,
                        },
                    );
                }
                1 => {
                    let name = format!("n{nodes}");
                    nodes += 1;
                    let labels =
                        BTreeMap::from([("zone".to_string(), format!("z{}", rng.below(3)))]);
                    let node = Node {
                        name,
                        cpus: 4,
                        memory_mib: 4096,
                        arch: "x86_64".into(),
                        labels,
                        properties: BTreeMap::new(),
                        state: NodeState::Free,
                        instance: None,
                        load: 0,
                        cached: Vec::new(),
                    };
                    engine.store.add_node(&node, "admin:test").unwrap();
                    model.free_nodes += 1;
                }
                3..=6 if !model.tiers.is_empty() => {
                    let names: Vec<String> = model.tiers.keys().cloned().collect();
                    let name = &names[rng.below(names.len() as u64) as usize];
                    let m = model.tiers.get_mut(name).unwrap();
                    let n = rng.below(m.instances.len() as u64 + 1) as u32;
                    engine.scale(name, n, "admin:test").await.unwrap();
                    m.desired = n;
                    m.reconcile(&mut model.free_nodes);
                }
                7 => {
                    let busy: Vec<Node> = engine
                        .store
                        .nodes()
                        .unwrap()
                        .into_iter()
                        .filter(|n| n.instance.is_some())
                        .collect();
                    if let Some(node) = busy.get(rng.below(busy.len() as u64) as usize) {
                        let id = engine.store.fail_node(&node.name, "test").unwrap().unwrap();
                        failures += 1;
                        model.tiers.get_mut(&id.tier).unwrap().instances[id.index as usize].0 =
                            InstanceState::Failed;
                        // The next pass redeploys it, with the same identity, if a node is free.
                        engine.reconcile(&id.tier).await.unwrap();
                        model
                            .tiers
                            .get_mut(&id.tier)
                            .unwrap()
                            .reconcile(&mut model.free_nodes);
                    }
                }
                9 if !model.tiers.is_empty() && rng.below(3) == 0 => {
                    let names: Vec<String> = model.tiers.keys().cloned().collect();
                    let name = names[rng.below(names.len() as u64) as usize].clone();
                    engine.scale(&name, 0, "admin:test").await.unwrap();
                    engine.store.delete_tier(&name, "admin:test").unwrap();
                    let mut m = model.tiers.remove(&name).unwrap();
                    m.desired = 0;
                    m.reconcile(&mut model.free_nodes);
                    deleted += 1;
                }
                8 => {
                    drop(engine);
                    engine = open(&data);
                    restarts += 1;
                }
                _ => {}
            }
            compare(&engine, &model, step, seed);
        }
    });
    eprintln!(
        "model test: {created} tiers created, {deleted} deleted, {nodes} nodes, {failures} node failures, {restarts} restarts"
    );
    assert!(
        restarts > 5 && failures > 0 && created > 1,
        "the run exercised too little"
    );
}
