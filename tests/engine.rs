//! The pool engine without its daemon: an image imported, a tier minted in full before any
//! node is chosen, deployed through its policy and driver, scaled out and in, with every
//! decision in the event log, and bad specs refused with nothing changed.

use crate::support::{block_on, scratch};
use mint_core::{Engine, EngineError, TierSpec};
use mint_model::records::{Node, PluginRef};
use mint_model::{InstanceState, NodeState};
use std::collections::BTreeMap;

fn master(dir: &std::path::Path) {
    std::fs::create_dir_all(dir.join("etc/network")).unwrap();
    std::fs::create_dir_all(dir.join("sbin")).unwrap();
    std::fs::write(dir.join("etc/hostname"), "debian\n").unwrap();
    std::fs::write(
        dir.join("etc/hosts"),
        "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/network/interfaces"),
        "auto eth0\niface eth0 inet dhcp\n",
    )
    .unwrap();
    std::fs::write(dir.join("sbin/ifup"), "").unwrap();
    std::os::unix::fs::symlink("/etc/hostname", dir.join("etc/name-link")).unwrap();
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
        hostname: format!("{name}-{{index:02}}"),
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

fn node(name: &str, zone: &str) -> Node {
    Node {
        name: name.into(),
        cpus: 4,
        memory_mib: 8192,
        arch: "x86_64".into(),
        labels: BTreeMap::from([("zone".into(), zone.into())]),
        properties: BTreeMap::new(),
        state: NodeState::Free,
        instance: None,
        load: 0,
        cached: Vec::new(),
    }
}

#[test]
fn mint_all_k_then_deploy_scale_out_and_in() {
    let dir = scratch("engine-flow");
    let src = dir.join("master");
    master(&src);
    let engine = Engine::open(&dir.join("data")).unwrap();
    let image = engine.import_image(&src, Some("debian")).unwrap();
    // The same tree imported again has the same digest.
    assert_eq!(
        engine.import_image(&src, None).unwrap().digest,
        image.digest
    );

    let mut s = spec("web", &image.digest, 8, "198.18.0.0/24");
    s.gateway = Some("198.18.0.1".into());
    block_on(async {
        engine.create_tier(&s, "admin:test").await.unwrap();
        // All K exist, with identities and overlays, before any node exists.
        let inst = engine.store.instances("web").unwrap();
        assert_eq!(inst.len(), 8);
        assert!(engine.store.nodes().unwrap().is_empty());
        assert_eq!(inst[3].hostname, "web-03");
        assert_eq!(
            inst[3].address.to_string(),
            "198.18.0.5",
            ".0 is the network, .1 the gateway"
        );
        let overlay = engine.overlay(&inst[3].overlay).unwrap().to_string();
        assert!(
            overlay.contains("/etc/network/interfaces") && overlay.contains("/etc/hostname"),
            "{overlay}"
        );

        for (n, z) in [
            ("a1", "a"),
            ("a2", "a"),
            ("b1", "b"),
            ("b2", "b"),
            ("c1", "c"),
            ("c2", "c"),
        ] {
            engine.store.add_node(&node(n, z), "admin:test").unwrap();
        }
        let p = engine.scale("web", 3, "admin:test").await.unwrap();
        assert_eq!(
            p.deployed.iter().map(|i| i.index).collect::<Vec<_>>(),
            [0, 1, 2],
            "lowest indexes first"
        );
        let zones: std::collections::BTreeSet<String> = engine
            .store
            .nodes()
            .unwrap()
            .iter()
            .filter(|n| n.instance.is_some())
            .map(|n| n.labels["zone"].clone())
            .collect();
        assert_eq!(zones.len(), 3, "spread over the three zones");

        engine.scale("web", 5, "admin:test").await.unwrap();
        let inst = engine.store.instances("web").unwrap();
        assert_eq!(
            inst.iter()
                .filter(|i| i.state == InstanceState::Deployed)
                .count(),
            5
        );

        let before = inst[4].clone();
        let p = engine.scale("web", 2, "admin:test").await.unwrap();
        assert_eq!(
            p.undeployed.iter().map(|i| i.index).collect::<Vec<_>>(),
            [4, 3, 2],
            "highest indexes leave first"
        );
        let after = &engine.store.instances("web").unwrap()[4];
        assert_eq!(
            (after.state, after.address, &after.hostname),
            (InstanceState::Pooled, before.address, &before.hostname)
        );

        // Asking for more than the free, eligible nodes can hold places what fits, and says
        // what the rest needs.
        let p = engine.scale("web", 8, "admin:test").await.unwrap();
        assert_eq!(p.deployed.len(), 4);
        assert_eq!(
            p.blocked.as_deref(),
            Some("4 of 6 placed; 2 need a free node"),
            "{:?}",
            p.blocked
        );
        engine.scale("web", 2, "admin:test").await.unwrap();
        assert!(matches!(
            engine.scale("web", 9, "admin:test").await,
            Err(EngineError::Store(_))
        ));

        assert_eq!(
            engine.store.check_invariants().unwrap(),
            Vec::<String>::new()
        );
        let kinds: Vec<String> = engine
            .store
            .events(None, 1000)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| *k == "bound").count(),
            9,
            "5, then 4 of the 6 asked for"
        );
        let bound = engine
            .store
            .events(None, 1000)
            .unwrap()
            .into_iter()
            .find(|e| e.kind == "bound")
            .unwrap();
        assert!(
            bound.detail["reason"].as_str().unwrap().contains("zone="),
            "{}",
            bound.detail
        );
    });
}

#[test]
fn bad_specs_are_refused_with_nothing_changed() {
    let dir = scratch("engine-bad");
    let src = dir.join("master");
    master(&src);
    let engine = Engine::open(&dir.join("data")).unwrap();
    let image = engine.import_image(&src, None).unwrap();
    block_on(async {
        engine
            .create_tier(
                &spec("web", &image.digest, 4, "198.18.0.0/28"),
                "admin:test",
            )
            .await
            .unwrap();
        let events = engine.store.events(None, 1000).unwrap().len();
        let cases: Vec<(TierSpec, &str)> = vec![
            (
                spec("db", &image.digest, 4, "198.18.1.0/33"),
                "field `subnet`",
            ),
            (
                spec("db", &image.digest, 4, "198.18.0.8/29"),
                "overlaps 198.18.0.0/28 of tier `web`",
            ),
            (
                spec("db", &image.digest, 300, "198.18.1.0/24"),
                "has 254 usable addresses left, fewer than the 300",
            ),
            (
                spec("web", &image.digest, 2, "198.18.2.0/24"),
                "a tier named `web` exists",
            ),
            (
                spec("db", "sha256:feed", 2, "198.18.1.0/24"),
                "field `image`: no image",
            ),
            (
                spec("Bad Name", &image.digest, 2, "198.18.1.0/24"),
                "field `name`",
            ),
            (
                spec("db", &image.digest, 0, "198.18.1.0/24"),
                "field `max-instances`",
            ),
            (
                TierSpec {
                    policy: PluginRef {
                        plugin: "nosuch".into(),
                        config: Default::default(),
                    },
                    ..spec("db", &image.digest, 2, "198.18.1.0/24")
                },
                "field `policy`: no plugin named `nosuch`",
            ),
            (
                TierSpec {
                    driver: PluginRef {
                        plugin: "spread".into(),
                        config: Default::default(),
                    },
                    ..spec("db", &image.digest, 2, "198.18.1.0/24")
                },
                "plugin `spread` is a node-policy, not a driver",
            ),
            (
                TierSpec {
                    hostname: "db".into(),
                    ..spec("db", &image.digest, 2, "198.18.1.0/24")
                },
                "no {index}",
            ),
            (
                TierSpec {
                    autoscale: Some(mint_model::records::Autoscale {
                        scale_out_above: 500,
                        scale_in_below: 600,
                        for_secs: 5,
                        step: 1,
                        cooldown_secs: 0,
                        min: 0,
                        max: None,
                    }),
                    ..spec("db", &image.digest, 2, "198.18.1.0/24")
                },
                "field `autoscale.scale-in-below`: 600 must be below scale-out-above (500)",
            ),
            (
                TierSpec {
                    deploy_timeout_secs: 0,
                    ..spec("db", &image.digest, 2, "198.18.1.0/24")
                },
                "field `deploy-timeout-secs`",
            ),
        ];
        for (s, needle) in cases {
            let e = engine
                .create_tier(&s, "admin:test")
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle} not in {e}");
        }
        assert_eq!(engine.store.tiers().unwrap().len(), 1);
        assert_eq!(engine.store.events(None, 1000).unwrap().len(), events);
    });
}

#[test]
fn tar_images_that_escape_their_root_are_refused() {
    let dir = scratch("engine-tar");
    let engine = Engine::open(&dir.join("data")).unwrap();
    // A tar whose entry climbs out with `..`.
    let mut header = tar_header("../evil", 5);
    let mut bytes = Vec::new();
    {
        let mut b = tar_builder(&mut bytes);
        b.append_data(&mut header, "../evil", &b"owned"[..]).err();
        let mut h = tar_header("etc/ok", 2);
        b.append_data(&mut h, "etc/ok", &b"ok"[..]).unwrap();
        b.finish().unwrap();
    }
    // The tar crate refuses to write `..`; write the name into the header by hand instead.
    let mut raw = Vec::new();
    {
        let mut b = tar_builder(&mut raw);
        let mut h = tar_header("xx/evil", 5);
        h.as_old_mut().name[..7].copy_from_slice(b"../evil");
        h.set_cksum();
        b.append(&h, &b"owned"[..]).unwrap();
        b.finish().unwrap();
    }
    let path = dir.join("evil.tar");
    std::fs::write(&path, &raw).unwrap();
    let e = engine.import_image(&path, None).unwrap_err().to_string();
    assert!(e.contains("climbs out with `..`"), "{e}");
    let cut = dir.join("cut.tar");
    std::fs::write(&cut, &bytes[..700]).unwrap();
    assert!(engine.import_image(&cut, None).is_err());
    assert!(engine.store.images().unwrap().is_empty());
}

fn tar_header(path: &str, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let _ = h.set_path(path);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

fn tar_builder(out: &mut Vec<u8>) -> tar::Builder<&mut Vec<u8>> {
    tar::Builder::new(out)
}

/// A tier whose driver answers `deploying`: later passes ask for the status and finish,
/// redeploy or fail each deployment according to the node's answer and the timeout.
#[test]
fn unfinished_deployments_are_polled_until_they_run_fail_or_time_out() {
    let dir = scratch("engine-poll");
    let src = dir.join("master");
    master(&src);
    let engine = Engine::open(&dir.join("data")).unwrap();
    let image = engine.import_image(&src, None).unwrap();
    let mut s = spec("web", &image.digest, 6, "198.18.0.0/24");
    s.driver.config.insert("deploy".into(), "deploying".into());
    s.deploy_timeout_secs = 1;
    let with_state = |name: &str, zone: &str, state: &str| {
        let mut n = node(name, zone);
        n.properties.insert("noop-state".into(), state.into());
        n
    };
    block_on(async {
        engine.create_tier(&s, "admin:test").await.unwrap();
        engine
            .store
            .add_node(&with_state("ok", "a", "running"), "admin:test")
            .unwrap();
        let p = engine.scale("web", 1, "admin:test").await.unwrap();
        assert_eq!(p.deployed.len(), 1);
        assert_eq!(
            engine.store.instances("web").unwrap()[0].state,
            InstanceState::Deploying,
            "the driver said deploying"
        );
        assert_eq!(engine.store.node("ok").unwrap().state, NodeState::Deploying);
        let p = engine.reconcile("web").await.unwrap();
        assert_eq!(p.finished.len(), 1, "{p:?}");
        assert_eq!(
            engine.store.instances("web").unwrap()[0].state,
            InstanceState::Deployed
        );
        assert_eq!(engine.store.node("ok").unwrap().state, NodeState::InService);

        // A node whose driver reports the instance failed is declared failed; the instance
        // keeps its identity and goes to the next node.
        engine
            .store
            .add_node(&with_state("bad", "b", "failed"), "admin:test")
            .unwrap();
        engine.scale("web", 2, "admin:test").await.unwrap();
        let p = engine.reconcile("web").await.unwrap();
        assert_eq!(
            p.failed.iter().map(|i| i.index).collect::<Vec<_>>(),
            [1],
            "{p:?}"
        );
        assert_eq!(engine.store.node("bad").unwrap().state, NodeState::Failed);
        let failed = engine.store.instances("web").unwrap()[1].clone();
        assert_eq!(
            (failed.state, failed.node.as_deref()),
            (InstanceState::Failed, None)
        );

        // A node that never finishes is failed after the deploy timeout, not before.
        engine
            .store
            .add_node(&with_state("slow", "c", "deploying"), "admin:test")
            .unwrap();
        engine.reconcile("web").await.unwrap();
        let again = engine.store.instances("web").unwrap()[1].clone();
        assert_eq!(
            (again.state, again.node.as_deref(), again.address),
            (InstanceState::Deploying, Some("slow"), failed.address)
        );
        let p = engine.reconcile("web").await.unwrap();
        assert!(p.failed.is_empty() && p.finished.is_empty(), "{p:?}");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let p = engine.reconcile("web").await.unwrap();
        assert_eq!(
            p.failed.iter().map(|i| i.index).collect::<Vec<_>>(),
            [1],
            "{p:?}"
        );
        assert_eq!(engine.store.node("slow").unwrap().state, NodeState::Failed);
        let last = engine
            .store
            .events(None, 1000)
            .unwrap()
            .into_iter()
            .rfind(|e| e.kind == "node-failed")
            .unwrap();
        assert!(
            last.message
                .contains("did not finish within the tier's deploy timeout of 1 s"),
            "{}",
            last.message
        );

        // A deployment the node does not have (the daemon stopped between binding the
        // instance and calling the driver) is deployed again, then finishes.
        engine
            .store
            .add_node(&with_state("lost", "d", "absent"), "admin:test")
            .unwrap();
        engine.reconcile("web").await.unwrap();
        assert_eq!(
            engine.store.node("lost").unwrap().state,
            NodeState::Deploying
        );
        let events = engine.store.events(None, 1000).unwrap().len();
        engine.reconcile("web").await.unwrap();
        assert_eq!(
            engine.store.events(None, 1000).unwrap().len(),
            events,
            "still unfinished: nothing to record"
        );
        assert_eq!(
            engine.store.check_invariants().unwrap(),
            Vec::<String>::new()
        );
        let kinds: Vec<String> = engine
            .store
            .events(None, 1000)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds.iter().filter(|k| *k == "node-failed").count(),
            2,
            "{kinds:?}"
        );
    });
}

/// A site's own policy, loaded from the data directory's plugin directory, that answers
/// wrongly, refuses or never returns: each pass is blocked with the reason and nothing is
/// bound, and the engine goes on serving.
#[test]
fn a_misbehaving_site_policy_blocks_its_tier_and_changes_nothing() {
    let dir = scratch("engine-site-policy");
    let src = dir.join("master");
    master(&src);
    let data = dir.join("data");
    let plugins = data.join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for (name, guest, extra) in [
        ("echo", "bad-answer", ""),
        ("spinner", "spin", "[capabilities]\ntimeout-ms = 300\n"),
    ] {
        std::fs::copy(
            crate::support::guest(guest),
            plugins.join(format!("{name}.wasm")),
        )
        .unwrap();
        let toml = format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\nkind = \"node-policy\"\nwit = \"mint:plugin@0.1.0\"\n{extra}"
        );
        std::fs::write(plugins.join(format!("{name}.toml")), toml).unwrap();
    }
    std::fs::copy(
        crate::support::guest("bad-answer"),
        plugins.join("misnamed.wasm"),
    )
    .unwrap();
    std::fs::write(
        plugins.join("misnamed.toml"),
        "name = \"other\"\nversion = \"1.0.0\"\nkind = \"node-policy\"\nwit = \"0.1.0\"\n",
    )
    .unwrap();

    let engine = Engine::open(&data).unwrap();
    // Loose files are unsigned: refused until the operator allows unsigned plugins.
    let e = engine
        .plugins
        .get("echo", mint_plugins::Kind::NodePolicy, "policy")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("not a signed package") && e.contains("allow-unsigned"),
        "{e}"
    );
    let trust = mint_plugins::package::Trust::new(&Default::default(), true).unwrap();
    engine.plugins.set_policy(mint_core::PluginPolicy {
        trust,
        ..Default::default()
    });
    let image = engine.import_image(&src, None).unwrap();
    let policy = |plugin: &str, config: serde_json::Value| PluginRef {
        plugin: plugin.into(),
        config: config.as_object().unwrap().clone(),
    };
    block_on(async {
        for (n, z) in [("a1", "a"), ("b1", "b"), ("c1", "c")] {
            engine.store.add_node(&node(n, z), "admin:test").unwrap();
        }
        let mut n = node("m1", "a");
        n.state = NodeState::Maintenance;
        engine.store.add_node(&n, "admin:test").unwrap();
        let cases = [
            (serde_json::json!({"answer": [0, 0]}), "twice"),
            (
                serde_json::json!({"answer": [7, 1]}),
                "it chose candidate 7, but there are only 3 candidates",
            ),
            (
                serde_json::json!({"answer": [0, 1, 2]}),
                "it chose 3 nodes, but 2 were asked for",
            ),
            (
                serde_json::json!({"refuse": "the site's rules say no"}),
                "the site's rules say no",
            ),
        ];
        for (i, (config, needle)) in cases.iter().enumerate() {
            let name = format!("t{i}");
            let s = TierSpec {
                policy: policy("echo", config.clone()),
                ..spec(&name, &image.digest, 3, &format!("198.18.{i}.0/24"))
            };
            engine.create_tier(&s, "admin:test").await.unwrap();
            let events = engine.store.events(None, 10_000).unwrap().len();
            let p = engine.scale(&name, 2, "admin:test").await.unwrap();
            let blocked = p.blocked.unwrap_or_default();
            assert!(
                p.deployed.is_empty() && blocked.contains(needle),
                "{needle} not in {blocked}"
            );
            assert_eq!(
                engine.store.events(None, 10_000).unwrap().len(),
                events + 1,
                "only the scale request is recorded"
            );
            assert!(
                engine
                    .store
                    .instances(&name)
                    .unwrap()
                    .iter()
                    .all(|i| i.state == InstanceState::Pooled)
            );
        }
        // A policy may answer fewer than asked: what it names is placed, the rest waits.
        let s = TierSpec {
            policy: policy("echo", serde_json::json!({"answer": [2]})),
            ..spec("fewer", &image.digest, 3, "198.18.7.0/24")
        };
        engine.create_tier(&s, "admin:test").await.unwrap();
        let p = engine.scale("fewer", 2, "admin:test").await.unwrap();
        assert_eq!(p.deployed.len(), 1, "{p:?}");
        assert_eq!(
            p.blocked.as_deref(),
            Some("1 of 2 placed; 1 needs a free node"),
            "{p:?}"
        );
        engine.scale("fewer", 0, "admin:test").await.unwrap();
        // Candidates are offered in name order (a1, b1, c1); with zone=a required, b1 is
        // offered but ineligible, and choosing it is refused.
        let mut s = TierSpec {
            policy: policy("echo", serde_json::json!({"answer": [1]})),
            ..spec("zoned", &image.digest, 3, "198.18.8.0/24")
        };
        s.requirements.labels.insert("zone".into(), "a".into());
        engine.create_tier(&s, "admin:test").await.unwrap();
        let p = engine.scale("zoned", 1, "admin:test").await.unwrap();
        assert!(
            p.blocked
                .unwrap_or_default()
                .contains("it chose node `b1`, which does not meet the tier's requirements")
        );
        assert!(
            engine
                .store
                .instances("zoned")
                .unwrap()
                .iter()
                .all(|i| i.state == InstanceState::Pooled)
        );

        let s = TierSpec {
            policy: policy("spinner", serde_json::json!({})),
            ..spec("spin", &image.digest, 3, "198.18.9.0/24")
        };
        engine.create_tier(&s, "admin:test").await.unwrap();
        let started = std::time::Instant::now();
        let p = engine.scale("spin", 1, "admin:test").await.unwrap();
        assert!(
            p.blocked
                .unwrap_or_default()
                .contains("did not finish `select` within"),
            "a policy that never returns is stopped"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        // The engine still serves: a tier on a bundled policy deploys.
        engine
            .create_tier(
                &spec("good", &image.digest, 3, "198.18.10.0/24"),
                "admin:test",
            )
            .await
            .unwrap();
        assert_eq!(
            engine
                .scale("good", 2, "admin:test")
                .await
                .unwrap()
                .deployed
                .len(),
            2
        );
        assert!(
            engine
                .store
                .nodes()
                .unwrap()
                .iter()
                .filter(|n| n.instance.is_some())
                .all(|n| n.instance.as_ref().unwrap().tier == "good")
        );

        let bad = [
            (
                TierSpec {
                    policy: policy("misnamed", serde_json::json!({})),
                    ..spec("x1", &image.digest, 2, "198.18.20.0/24")
                },
                "declares the name `other`",
            ),
            (
                TierSpec {
                    policy: policy("../echo", serde_json::json!({})),
                    ..spec("x2", &image.digest, 2, "198.18.21.0/24")
                },
                "no plugin named `../echo`",
            ),
            (
                TierSpec {
                    driver: policy("echo", serde_json::json!({})),
                    ..spec("x3", &image.digest, 2, "198.18.22.0/24")
                },
                "`echo` is a node-policy, not a driver",
            ),
        ];
        let tiers = engine.store.tiers().unwrap().len();
        for (s, needle) in bad {
            let e = engine
                .create_tier(&s, "admin:test")
                .await
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{needle} not in {e}");
        }
        assert_eq!(engine.store.tiers().unwrap().len(), tiers);
        assert_eq!(
            engine.store.check_invariants().unwrap(),
            Vec::<String>::new()
        );
    });
}

/// A new master version: every instance re-minted with its identity, pooled ones at once,
/// deployed ones rolled on their own nodes a batch at a time, lowest index first.
#[test]
fn a_new_master_rolls_through_deployed_instances_in_batches() {
    let dir = scratch("engine-roll");
    let (a, b) = (dir.join("a"), dir.join("b"));
    master(&a);
    master(&b);
    std::fs::write(b.join("etc/hosts"), "127.0.0.1\tlocalhost\n# v2\n").unwrap();
    let engine = Engine::open(&dir.join("data")).unwrap();
    let image_a = engine.import_image(&a, Some("debian")).unwrap();
    let image_b = engine.import_image(&b, Some("debian-v2")).unwrap();
    block_on(async {
        engine
            .create_tier(
                &spec("web", &image_a.digest, 6, "198.18.0.0/24"),
                "admin:test",
            )
            .await
            .unwrap();
        for (n, z) in [
            ("a1", "a"),
            ("a2", "a"),
            ("b1", "b"),
            ("b2", "b"),
            ("c1", "c"),
            ("c2", "c"),
        ] {
            engine.store.add_node(&node(n, z), "admin:test").unwrap();
        }
        engine.scale("web", 4, "admin:test").await.unwrap();
        let before = engine.store.instances("web").unwrap();

        // Bad requests change nothing.
        let e = engine
            .update_image("web", "nosuch", 2, &mint_core::quiet, "admin:test")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("field `image`: no image with digest or name `nosuch`"),
            "{e}"
        );
        let e = engine
            .update_image("web", "debian-v2", 0, &mint_core::quiet, "admin:test")
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("field `batch`"), "{e}");
        assert_eq!(engine.store.tier("web").unwrap().revision, 0);

        assert_eq!(
            engine
                .update_image("web", "debian-v2", 2, &mint_core::quiet, "admin:test")
                .await
                .unwrap(),
            1
        );
        let t = engine.store.tier("web").unwrap();
        assert_eq!(
            (t.image.as_str(), t.revision, t.rollout_batch),
            (image_b.digest.as_str(), 1, 2)
        );
        let now = engine.store.instances("web").unwrap();
        for (old, new) in before.iter().zip(&now) {
            assert_eq!(
                (&old.hostname, old.address, &old.node, old.state),
                (&new.hostname, new.address, &new.node, new.state),
                "identity and place kept"
            );
            assert_ne!(old.overlay, new.overlay, "customized from the new master");
        }
        engine.materialize("web", 5, &dir.join("web-5")).unwrap();
        let hosts = std::fs::read_to_string(dir.join("web-5/etc/hosts")).unwrap();
        assert!(
            hosts.contains("# v2") && hosts.contains("web-05"),
            "pooled instances carry the new master at once: {hosts}"
        );

        let rolled = |p: &mint_core::Progress| p.rolled.iter().map(|i| i.index).collect::<Vec<_>>();
        assert_eq!(rolled(&engine.reconcile("web").await.unwrap()), [0, 1]);
        let mid = engine.store.instances("web").unwrap();
        assert_eq!(
            mid.iter().map(|i| i.revision).collect::<Vec<_>>(),
            [1, 1, 0, 0, 0, 0]
        );
        assert_eq!(mid[0].node, before[0].node, "rolled on the node it holds");
        assert_eq!(rolled(&engine.reconcile("web").await.unwrap()), [2, 3]);
        assert!(
            engine.reconcile("web").await.unwrap().rolled.is_empty(),
            "all deployed instances are at revision 1"
        );
        // A later scale-out deploys the new revision directly.
        engine.scale("web", 5, "admin:test").await.unwrap();
        let last = engine.store.instances("web").unwrap();
        assert_eq!(
            (last[4].state, last[4].revision),
            (InstanceState::Deployed, 1)
        );
        assert_eq!(
            engine.store.check_invariants().unwrap(),
            Vec::<String>::new()
        );
        let kinds: Vec<String> = engine
            .store
            .events(None, 1000)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds.iter().filter(|k| *k == "master-updated").count(), 1);
        assert_eq!(kinds.iter().filter(|k| *k == "rolling").count(), 4);
    });
}
