//! The sled store: tiers with all K instances minted in one transaction, the pool's
//! invariants kept by every change, refused changes that write nothing, and state that
//! survives a reopen.

use crate::support::scratch;
use mint_model::records::{Instance, InstanceId, Node, PluginRef, Requirements, Tier};
use mint_model::{AddressPlan, HostnamePattern, InstanceState, NodeState};
use mint_store::{Store, StoreError};
use std::collections::BTreeMap;

/// A store holding the image the test tiers name.
fn open(dir: &std::path::Path) -> Store {
    let s = Store::open(dir).unwrap();
    let image = mint_model::records::Image {
        digest: "sha256:00".into(),
        name: "test".into(),
        format: "tree".into(),
        size: 0,
        entries: 0,
        source: "dir".into(),
        virtual_size: 0,
    };
    s.put_image(&image).unwrap();
    s
}

fn plugin(name: &str) -> PluginRef {
    PluginRef {
        plugin: name.into(),
        config: Default::default(),
    }
}

/// A tier of `k` instances in `subnet`, with its instances minted from the plan.
fn tier(name: &str, subnet: &str, pattern: &str, k: u32, store: &Store) -> (Tier, Vec<Instance>) {
    let plan = AddressPlan {
        subnet: subnet.parse().unwrap(),
        reserved: vec![],
        gateway: None,
        dns: vec![],
    };
    let hostname = HostnamePattern::parse(pattern).unwrap();
    let taken = |a| store.address_taken(a).unwrap();
    let addresses = plan.allocate(k as u64, &taken).unwrap();
    let instances = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| Instance {
            id: InstanceId {
                tier: name.into(),
                index: i as u32,
            },
            hostname: hostname.render(name, i as u64),
            address: *a,
            state: InstanceState::Pooled,
            node: None,
            overlay: String::new(),
            since_ms: 0,
            revision: 0,
            deployment: 0,
            deployment_started_ms: 0,
            layer: None,
            disk: None,
        })
        .collect();
    let t = Tier {
        name: name.into(),
        image: "sha256:00".into(),
        max_instances: k,
        plan,
        hostname,
        requirements: Requirements {
            min_cpus: 2,
            ..Default::default()
        },
        policy: plugin("spread"),
        customizers: vec![plugin("hostname"), plugin("network")],
        driver: plugin("noop"),
        deploy_timeout_secs: 600,
        revision: 0,
        rollout_batch: 1,
        autoscale: None,
        autoscaled_at_ms: 0,
        generation: 0,
        desired: 0,
    };
    (t, instances)
}

fn node(name: &str, cpus: u32) -> Node {
    Node {
        name: name.into(),
        cpus,
        memory_mib: 4096,
        arch: "x86_64".into(),
        labels: BTreeMap::new(),
        properties: BTreeMap::new(),
        state: NodeState::Free,
        instance: None,
        load: 0,
        cached: Vec::new(),
    }
}

fn id(tier: &str, index: u32) -> InstanceId {
    InstanceId {
        tier: tier.into(),
        index,
    }
}

fn refused<T: std::fmt::Debug>(r: Result<T, StoreError>, needle: &str) {
    match r {
        Err(StoreError::Refused(m)) => assert!(m.contains(needle), "{needle} not in {m}"),
        other => panic!("expected a refusal containing {needle}, got {other:?}"),
    }
}

#[test]
fn a_tier_and_its_pool_survive_a_reopen() {
    let dir = scratch("store-reopen");
    {
        let s = open(&dir);
        let (t, inst) = tier("web", "198.18.0.0/24", "web-{index:03}", 50, &s);
        s.create_tier(&t, &inst, "admin:test").unwrap();
        s.add_node(&node("n1", 4), "admin:test").unwrap();
        s.bind(&id("web", 0), "n1", serde_json::json!({"reason": "test"}))
            .unwrap();
        let deployment = s.instances("web").unwrap()[0].deployment;
        assert!(
            s.finish_guarded(&[(id("web", 0), deployment, serde_json::Value::Null)])
                .unwrap()
                .is_empty()
        );
    }
    let s = open(&dir);
    let inst = s.instances("web").unwrap();
    assert_eq!(inst.len(), 50);
    assert_eq!(inst[0].state, InstanceState::Deployed);
    assert_eq!(inst[0].node.as_deref(), Some("n1"));
    assert_eq!(inst[7].hostname, "web-007");
    assert_eq!(inst[7].address.to_string(), "198.18.0.8");
    assert_eq!(s.nodes().unwrap()[0].state, NodeState::InService);
    let kinds: Vec<String> = s
        .events(None, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["tier-created", "node-added", "bound", "deployed"]);
    assert_eq!(s.check_invariants().unwrap(), Vec::<String>::new());
}

#[test]
fn refused_tiers_write_nothing() {
    let dir = scratch("store-refuse");
    let s = open(&dir);
    let (t, inst) = tier("web", "198.18.0.0/24", "web-{index}", 10, &s);
    s.create_tier(&t, &inst, "admin:test").unwrap();
    let events = s.events(None, 100).unwrap().len();

    let (dup, dup_inst) = tier("web", "198.18.9.0/24", "x-{index}", 3, &s);
    refused(
        s.create_tier(&dup, &dup_inst, "admin:test"),
        "a tier named `web` exists",
    );
    let (over, over_inst) = tier("api", "198.18.0.128/25", "api-{index}", 3, &s);
    refused(
        s.create_tier(&over, &over_inst, "admin:test"),
        "overlaps 198.18.0.0/24 of tier `web`",
    );
    // Host names collide half-way through the transaction: nothing of it may remain.
    let (clash, clash_inst) = tier("web2", "198.18.1.0/24", "web-{index}", 20, &s);
    refused(
        s.create_tier(&clash, &clash_inst, "admin:test"),
        "host name web-0 is already held by web/0",
    );
    let (short, mut short_inst) = tier("db", "198.18.2.0/24", "db-{index}", 4, &s);
    short_inst.pop();
    refused(
        s.create_tier(&short, &short_inst, "admin:test"),
        "max-instances 4 but 3 instances",
    );

    assert_eq!(s.tiers().unwrap().len(), 1);
    assert!(s.instances("web2").unwrap().is_empty());
    assert!(!s.address_taken("198.18.1.1".parse().unwrap()).unwrap());
    assert_eq!(s.events(None, 100).unwrap().len(), events);
    assert_eq!(s.check_invariants().unwrap(), Vec::<String>::new());
}

#[test]
fn binding_keeps_one_instance_per_node_and_at_most_k() {
    let dir = scratch("store-bind");
    let s = open(&dir);
    let (t, inst) = tier("web", "198.18.0.0/24", "web-{index}", 2, &s);
    s.create_tier(&t, &inst, "admin:test").unwrap();
    for (n, cpus) in [("a", 4), ("b", 4), ("c", 4), ("small", 1)] {
        s.add_node(&node(n, cpus), "admin:test").unwrap();
    }
    refused(
        s.add_node(&node("a", 4), "admin:test"),
        "a node named `a` exists",
    );
    s.bind(&id("web", 0), "a", serde_json::Value::Null).unwrap();
    refused(
        s.bind(&id("web", 1), "a", serde_json::Value::Null),
        "node `a` is deploying, not free",
    );
    refused(
        s.bind(&id("web", 0), "b", serde_json::Value::Null),
        "instance web/0 is deploying",
    );
    refused(
        s.bind(&id("web", 1), "small", serde_json::Value::Null),
        "does not meet the requirements",
    );
    refused(s.remove_node("a", "admin:test"), "scale its tier in first");
    s.bind(&id("web", 1), "b", serde_json::Value::Null).unwrap();
    // Both instances hold nodes: a third bind would pass K, whatever it names.
    refused(
        s.bind(&id("web", 2), "c", serde_json::Value::Null),
        "would exceed its maximum of 2",
    );
    refused(
        s.set_desired("web", 3, "admin:test"),
        "its max-instances (K) is 2",
    );
    s.set_desired("web", 2, "admin:test").unwrap();

    // Scaling in returns the instance to the pool with its identity; a later bind reuses it.
    // The deploy's answer, arriving after the scale-in began, is discarded: the instance
    // is undeploying now, and one event says so.
    let before = s.instances("web").unwrap()[1].clone();
    s.begin_undeploy(&[id("web", 1)], "scale in").unwrap();
    let events = s.events(None, 10_000).unwrap().len();
    assert_eq!(
        s.finish_guarded(&[(id("web", 1), before.deployment, serde_json::Value::Null)])
            .unwrap(),
        [id("web", 1)]
    );
    let late = s.events(None, 10_000).unwrap();
    assert_eq!(
        (late.len(), late.last().unwrap().kind.as_str()),
        (events + 1, "answer-discarded")
    );
    assert_eq!(
        s.instances("web").unwrap()[1].state,
        InstanceState::Undeploying
    );
    // An undeploy answer about an older deployment is discarded too; the current one lands.
    assert!(
        !s.release_guarded(&id("web", 1), before.deployment - 1, "scale in")
            .unwrap()
    );
    assert!(
        !s.fail_guarded(
            &id("web", 1),
            before.deployment,
            InstanceState::Deploying,
            InstanceState::Failed,
            "late"
        )
        .unwrap()
    );
    assert!(
        s.release_guarded(&id("web", 1), before.deployment, "scale in")
            .unwrap()
    );
    assert_eq!(s.node("b").unwrap().state, NodeState::Free);
    let after = s.instances("web").unwrap()[1].clone();
    assert_eq!((after.state, &after.node), (InstanceState::Pooled, &None));
    assert_eq!(
        (after.address, &after.hostname),
        (before.address, &before.hostname)
    );
    s.bind(&id("web", 1), "c", serde_json::Value::Null).unwrap();
    assert_eq!(
        s.instances("web").unwrap()[1].address,
        before.address,
        "identity lives with the instance"
    );
    s.remove_node("b", "admin:test").unwrap();
    assert_eq!(s.check_invariants().unwrap(), Vec::<String>::new());
}
