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
    std::fs::write(dir.join("etc/hosts"), "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n").unwrap();
    std::fs::write(dir.join("etc/network/interfaces"), "auto eth0\niface eth0 inet dhcp\n").unwrap();
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
        policy: PluginRef { plugin: "spread".into(), config: Default::default() },
        customizers: vec![
            PluginRef { plugin: "hostname".into(), config: Default::default() },
            PluginRef { plugin: "network".into(), config: Default::default() },
        ],
        driver: PluginRef { plugin: "noop".into(), config: Default::default() },
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
    assert_eq!(engine.import_image(&src, None).unwrap().digest, image.digest);

    let mut s = spec("web", &image.digest, 8, "198.18.0.0/24");
    s.gateway = Some("198.18.0.1".into());
    block_on(async {
        engine.create_tier(&s).await.unwrap();
        // All K exist, with identities and overlays, before any node exists.
        let inst = engine.store.instances("web").unwrap();
        assert_eq!(inst.len(), 8);
        assert!(engine.store.nodes().unwrap().is_empty());
        assert_eq!(inst[3].hostname, "web-03");
        assert_eq!(inst[3].address.to_string(), "198.18.0.5", ".0 is the network, .1 the gateway");
        let overlay = engine.overlay(&inst[3].overlay).unwrap().to_string();
        assert!(overlay.contains("/etc/network/interfaces") && overlay.contains("/etc/hostname"), "{overlay}");

        for (n, z) in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("b2", "b"), ("c1", "c"), ("c2", "c")] {
            engine.store.add_node(&node(n, z)).unwrap();
        }
        let p = engine.scale("web", 3).await.unwrap();
        assert_eq!(p.deployed.iter().map(|i| i.index).collect::<Vec<_>>(), [0, 1, 2], "lowest indexes first");
        let zones: std::collections::BTreeSet<String> =
            engine.store.nodes().unwrap().iter().filter(|n| n.instance.is_some()).map(|n| n.labels["zone"].clone()).collect();
        assert_eq!(zones.len(), 3, "spread over the three zones");

        engine.scale("web", 5).await.unwrap();
        let inst = engine.store.instances("web").unwrap();
        assert_eq!(inst.iter().filter(|i| i.state == InstanceState::Deployed).count(), 5);

        let before = inst[4].clone();
        let p = engine.scale("web", 2).await.unwrap();
        assert_eq!(p.undeployed.iter().map(|i| i.index).collect::<Vec<_>>(), [4, 3, 2], "highest indexes leave first");
        let after = &engine.store.instances("web").unwrap()[4];
        assert_eq!((after.state, after.address, &after.hostname), (InstanceState::Pooled, before.address, &before.hostname));

        // Asking for more than the free, eligible nodes can hold is blocked with the
        // policy's reason, and changes nothing.
        let p = engine.scale("web", 8).await.unwrap();
        assert_eq!(p.deployed.len(), 0);
        assert!(p.blocked.as_deref().unwrap().contains("only 4 of 4"), "{:?}", p.blocked);
        assert!(matches!(engine.scale("web", 9).await, Err(EngineError::Store(_))));

        assert_eq!(engine.store.check_invariants().unwrap(), Vec::<String>::new());
        let kinds: Vec<String> = engine.store.events(None, 1000).unwrap().into_iter().map(|e| e.kind).collect();
        assert_eq!(kinds.iter().filter(|k| *k == "bound").count(), 5);
        let bound = engine.store.events(None, 1000).unwrap().into_iter().find(|e| e.kind == "bound").unwrap();
        assert!(bound.detail["reason"].as_str().unwrap().contains("zone="), "{}", bound.detail);
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
        engine.create_tier(&spec("web", &image.digest, 4, "198.18.0.0/28")).await.unwrap();
        let events = engine.store.events(None, 1000).unwrap().len();
        let cases: Vec<(TierSpec, &str)> = vec![
            (spec("db", &image.digest, 4, "198.18.1.0/33"), "field `subnet`"),
            (spec("db", &image.digest, 4, "198.18.0.8/29"), "overlaps 198.18.0.0/28 of tier `web`"),
            (spec("db", &image.digest, 300, "198.18.1.0/24"), "has 254 usable addresses left, fewer than the 300"),
            (spec("web", &image.digest, 2, "198.18.2.0/24"), "a tier named `web` exists"),
            (spec("db", "sha256:feed", 2, "198.18.1.0/24"), "field `image`: no image"),
            (spec("Bad Name", &image.digest, 2, "198.18.1.0/24"), "field `name`"),
            (spec("db", &image.digest, 0, "198.18.1.0/24"), "field `max-instances`"),
            (
                TierSpec { policy: PluginRef { plugin: "nosuch".into(), config: Default::default() }, ..spec("db", &image.digest, 2, "198.18.1.0/24") },
                "field `policy`: no plugin named `nosuch`",
            ),
            (
                TierSpec { driver: PluginRef { plugin: "spread".into(), config: Default::default() }, ..spec("db", &image.digest, 2, "198.18.1.0/24") },
                "plugin `spread` is a node-policy, not a driver",
            ),
            (TierSpec { hostname: "db".into(), ..spec("db", &image.digest, 2, "198.18.1.0/24") }, "no {index}"),
        ];
        for (s, needle) in cases {
            let e = engine.create_tier(&s).await.unwrap_err().to_string();
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
