//! The store, on both backends (sled, and a real etcd the test starts): tiers with all K
//! instances minted (in batches where one commit cannot hold them), the pool's invariants
//! kept by every change, refused changes that write nothing, state that survives a
//! reopen, interrupted work finished by the next opener, and two writers racing on one
//! backend without breaking a rule.

use crate::etcd::Etcd;
use crate::support::scratch;
use mint_model::records::{Instance, InstanceId, Node, PluginRef, Requirements, Tier};
use mint_model::{AddressPlan, HostnamePattern, InstanceState, NodeState};
use mint_store::kv::{self, Kv, SledKv};
use mint_store::{Store, StoreError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Where a test's store lives.
enum Backend {
    Sled(std::path::PathBuf),
    Etcd(Etcd),
}

impl Backend {
    fn sled(name: &str) -> Backend {
        Backend::Sled(scratch(&format!("store-{name}")))
    }

    fn etcd(name: &str) -> Backend {
        Backend::Etcd(Etcd::start(name))
    }

    /// The backend itself, for stores that share one (only one sled handle may be open
    /// on a directory at a time).
    fn kv(&self) -> Arc<dyn Kv> {
        match self {
            Backend::Sled(dir) => Arc::new(SledKv::open(dir).unwrap()),
            Backend::Etcd(e) => Arc::new(e.kv("mint")),
        }
    }

    /// A store holding the image the test tiers name.
    fn open(&self) -> Store {
        let s = match self {
            Backend::Sled(dir) => Store::open(dir).unwrap(),
            Backend::Etcd(e) => Store::open_at(&e.location("mint")).unwrap(),
        };
        with_image(s)
    }
}

/// Each listed test, once on sled and once on etcd.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod on_sled {
            $( #[test] fn $name() { super::$name(&super::Backend::sled(stringify!($name))) } )*
        }
        mod on_etcd {
            $( #[test] fn $name() { super::$name(&super::Backend::etcd(stringify!($name))) } )*
        }
    };
}

on_both!(
    a_tier_and_its_pool_survive_a_reopen,
    refused_tiers_write_nothing,
    binding_keeps_one_instance_per_node_and_at_most_k,
    tiers_too_large_for_one_commit_are_minted_and_deleted_in_batches,
    an_interrupted_minting_is_removed_by_the_next_opener,
    two_writers_racing_never_break_an_invariant,
);

fn with_image(s: Store) -> Store {
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

fn a_tier_and_its_pool_survive_a_reopen(b: &Backend) {
    {
        let s = b.open();
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
    let s = b.open();
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
    // The log keeps the newest events it is told to; the next one follows on.
    assert_eq!(s.trim_events(2).unwrap(), 2);
    assert_eq!(crate::store::kinds(&s), ["bound", "deployed"]);
    s.note(
        "test",
        "one more".into(),
        serde_json::Value::Null,
        "admin:test",
    )
    .unwrap();
    let seqs: Vec<u64> = s.events(None, 10).unwrap().iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [2, 3, 4]);
}

fn refused_tiers_write_nothing(b: &Backend) {
    let s = b.open();
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

fn binding_keeps_one_instance_per_node_and_at_most_k(b: &Backend) {
    let s = b.open();
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
        "is not one of tier `web`'s K = 2 instances",
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

/// A backend that takes at most `max_ops` per commit (etcd's limit, also on sled), counts
/// its commits, and fails every commit after `commits_left` (a writer stopped half-way).
struct Limited {
    inner: Arc<dyn Kv>,
    max_ops: usize,
    commits: AtomicUsize,
    commits_left: AtomicUsize,
}

impl Limited {
    fn new(inner: Arc<dyn Kv>, max_ops: usize, commits_left: usize) -> Arc<Limited> {
        Arc::new(Limited {
            inner,
            max_ops,
            commits: AtomicUsize::new(0),
            commits_left: AtomicUsize::new(commits_left),
        })
    }
}

impl Kv for Limited {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn max_ops(&self) -> usize {
        self.max_ops
    }
    fn get(&self, key: &[u8]) -> Result<Option<kv::Entry>, kv::KvError> {
        self.inner.get(key)
    }
    fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at: Option<kv::Rev>,
    ) -> Result<(Vec<kv::Entry>, kv::Rev), kv::KvError> {
        self.inner.range(start, end, limit, at)
    }
    fn commit(&self, guards: &[kv::Guard], ops: &[kv::Op]) -> Result<kv::Rev, kv::KvError> {
        if guards.len() > self.max_ops || ops.len() > self.max_ops {
            return Err(kv::KvError::TooLarge(format!(
                "{} guards, {} writes",
                guards.len(),
                ops.len()
            )));
        }
        if self
            .commits_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(kv::KvError::Unavailable("the writer stopped".into()));
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(guards, ops)
    }
    fn watch(&self, start: &[u8], end: &[u8], from: kv::Rev) -> Result<kv::Watch, kv::KvError> {
        self.inner.watch(start, end, from)
    }
}

fn kinds(s: &Store) -> Vec<String> {
    s.events(None, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

fn tiers_too_large_for_one_commit_are_minted_and_deleted_in_batches(b: &Backend) {
    let limited = Limited::new(b.kv(), 128, usize::MAX);
    let s = with_image(Store::with_kv(limited.clone()).unwrap());
    let (small, small_inst) = tier("web", "198.18.0.0/24", "web-{index}", 10, &s);
    s.create_tier(&small, &small_inst, "admin:test").unwrap();
    let before = limited.commits.load(Ordering::SeqCst);
    let (big, big_inst) = tier("big", "198.18.4.0/22", "big-{index}", 500, &s);
    s.create_tier(&big, &big_inst, "admin:test").unwrap();
    let commits = limited.commits.load(Ordering::SeqCst) - before;
    assert!(commits >= 13, "500 instances took {commits} commits");
    assert_eq!(s.instances("big").unwrap().len(), 500);
    assert_eq!(kinds(&s), ["tier-created", "tier-created"]);
    assert_eq!(s.check_invariants().unwrap(), Vec::<String>::new());

    // A host name held by another tier, met in the seventh batch: the creation is refused
    // and every identity its first six batches took is free again.
    let (clash, mut clash_inst) = tier("clash", "198.18.8.0/23", "clash-{index}", 300, &s);
    clash_inst[250].hostname = "big-7".into();
    refused(
        s.create_tier(&clash, &clash_inst, "admin:test"),
        "host name big-7 is already held by big/7",
    );
    assert_eq!(s.tiers().unwrap().len(), 2);
    assert!(s.instances("clash").unwrap().is_empty());
    assert!(!s.address_taken("198.18.8.1".parse().unwrap()).unwrap());
    assert_eq!(kinds(&s).len(), 2, "a refused creation leaves no event");
    assert_eq!(s.check_invariants().unwrap(), Vec::<String>::new());
    let (clash, clash_inst) = tier("clash", "198.18.8.0/23", "clash-{index}", 300, &s);
    s.create_tier(&clash, &clash_inst, "admin:test").unwrap();

    // Deleting is refused while an instance holds a node, and the tier stays whole.
    s.add_node(&node("n1", 4), "admin:test").unwrap();
    s.bind(&id("clash", 3), "n1", serde_json::Value::Null)
        .unwrap();
    refused(
        s.delete_tier("clash", "admin:test"),
        "has 1 instances on nodes",
    );
    assert_eq!(s.instances("clash").unwrap().len(), 300);
    assert_eq!(s.tier("clash").unwrap().max_instances, 300);
    s.delete_tier("big", "admin:test").unwrap();
    assert!(s.instances("big").unwrap().is_empty());
    assert!(!s.address_taken("198.18.4.1".parse().unwrap()).unwrap());
    assert_eq!(kinds(&s).last().map(String::as_str), Some("tier-deleted"));
    assert_eq!(s.check_invariants().unwrap(), Vec::<String>::new());
}

fn an_interrupted_minting_is_removed_by_the_next_opener(b: &Backend) {
    let kv = b.kv();
    {
        // The writer stops after five commits, part-way through 500 instances.
        let s = with_image(Store::with_kv(Limited::new(kv.clone(), 128, 5)).unwrap());
        let (big, big_inst) = tier("big", "198.18.4.0/22", "big-{index}", 500, &s);
        let e = s.create_tier(&big, &big_inst, "admin:test").unwrap_err();
        assert!(e.to_string().contains("the writer stopped"), "{e}");
    }
    let s = Store::with_kv(Limited::new(kv, 128, usize::MAX)).unwrap();
    assert!(
        s.tiers().unwrap().is_empty(),
        "a tier being minted is no tier"
    );
    assert!(
        s.address_taken("198.18.4.1".parse().unwrap()).unwrap(),
        "its first batches were written"
    );
    let done = s.finish_interrupted().unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    assert!(!s.address_taken("198.18.4.1".parse().unwrap()).unwrap());
    assert!(s.instances("big").unwrap().is_empty());
    assert_eq!(kinds(&s), ["tier-abandoned"]);
    assert!(s.finish_interrupted().unwrap().is_empty());
    let (big, big_inst) = tier("big", "198.18.4.0/22", "big-{index}", 500, &s);
    s.create_tier(&big, &big_inst, "admin:test").unwrap();
    assert_eq!(s.instances("big").unwrap().len(), 500);
}

fn two_writers_racing_never_break_an_invariant(b: &Backend) {
    let first = b.kv();
    // sled allows one handle per directory, so its two writers share it; on etcd each has
    // its own connection, as two daemons would.
    let second = match b {
        Backend::Sled(_) => first.clone(),
        Backend::Etcd(_) => b.kv(),
    };
    let a = with_image(Store::with_kv(first.clone()).unwrap());
    let (t, inst) = tier("web", "198.18.0.0/24", "web-{index}", 20, &a);
    a.create_tier(&t, &inst, "admin:test").unwrap();
    for n in 0..8 {
        a.add_node(&node(&format!("n{n}"), 4), "admin:test")
            .unwrap();
    }
    let writers = [Arc::new(a), Arc::new(Store::with_kv(second).unwrap())];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let threads: Vec<_> = writers
        .iter()
        .enumerate()
        .map(|(w, s)| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (w as u64 + 1);
                let mut next = move |n: u64| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % n
                };
                let mut bound = 0;
                for _ in 0..300 {
                    if std::time::Instant::now() > deadline {
                        break;
                    }
                    let i = id("web", next(20) as u32);
                    let n = format!("n{}", next(8));
                    match next(4) {
                        0 | 1 => bound += s.bind(&i, &n, serde_json::Value::Null).is_ok() as usize,
                        2 => {
                            let d = s.instances("web").unwrap()[i.index as usize].deployment;
                            if s.begin_undeploy(&[i.clone()], "test").is_ok() {
                                s.release_guarded(&i, d, "test").unwrap();
                            }
                        }
                        _ => {
                            let _ = s.fail_node(&n, "test");
                            let _ = s.set_node_state(&n, NodeState::Free, "back", "admin:test");
                        }
                    }
                }
                bound
            })
        })
        .collect();
    let bound: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(bound > 0, "some binds landed");
    // A third store reads what both committed.
    let check = Store::with_kv(first).unwrap();
    assert_eq!(check.check_invariants().unwrap(), Vec::<String>::new());
    let events = check.events(None, 100_000).unwrap();
    assert_eq!(
        events.iter().filter(|e| e.kind == "bound").count(),
        bound,
        "every acknowledged bind, and only those, is in the log"
    );
    assert!(
        events.windows(2).all(|w| w[0].seq + 1 == w[1].seq),
        "event numbers are dense and unique"
    );
}
