//! The plugin host, exercised through real components: each kind through the real
//! loader, and misbehaving guests that must fail their own call and nothing else.

use crate::support::*;
use mint_plugins::fixture::{NamedRequest, NodeJson, RequirementsJson, SelectRequestJson, ip};
use mint_plugins::master::DirMaster;
use mint_plugins::types::*;
use mint_plugins::{
    CallError, CodeSource, Grants, HostPattern, LoadError, MAX_LOG_LINES, Manifest, Runtime,
    RuntimeOptions,
};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn nodes(n: usize) -> Vec<NodeJson> {
    (0..n)
        .map(|i| NodeJson {
            name: format!("n{i:05}"),
            cpus: 4 + (i % 3) as u32 * 4,
            memory_mib: 8192,
            arch: "x86_64".into(),
            labels: BTreeMap::from([
                ("zone".into(), format!("z{}", i % 3)),
                ("rack".into(), format!("r{}", i % 12)),
            ]),
            load: (i * 37 % 1000) as u32,
        })
        .collect()
}

fn request(count: u32, n: usize) -> NamedRequest {
    SelectRequestJson {
        tier: "web".into(),
        count,
        requirements: RequirementsJson::default(),
        placed: vec![],
        candidates: nodes(n),
    }
    .to_wit()
}

/// Calls a policy on a named request.
async fn select(
    p: &mint_plugins::Plugin,
    r: &NamedRequest,
    config: Option<&serde_json::Value>,
) -> Result<mint_plugins::Called<Vec<Choice>>, CallError> {
    p.select(&r.request, &r.names, config).await
}

fn zone_of(r: &SelectionRequest, c: &Choice) -> String {
    let cand = &r.candidates[c.candidate as usize];
    let zone = r.label_keys.iter().position(|k| k == "zone").unwrap() as u32;
    let labels =
        &r.labels[cand.labels_start as usize..(cand.labels_start + cand.labels_len) as usize];
    let v = labels.iter().find(|l| l.key == zone).unwrap().value;
    r.label_values[v as usize].clone()
}

fn web(index: u32) -> Instance {
    Instance {
        tier: "web".into(),
        index,
        hostname: format!("web-{index:03}"),
        address: ip(format!("198.18.0.{}", 10 + index).parse().unwrap()),
        prefix_len: 24,
        gateway: Some(ip("198.18.0.1".parse().unwrap())),
        dns: vec![ip("198.18.0.53".parse().unwrap())],
        peer_count: 1,
    }
}

fn text(edits: &[Edit], path: &str) -> Option<String> {
    edits.iter().find_map(|e| match e {
        Edit::WriteFile(w) if w.path == path => {
            Some(String::from_utf8(w.contents.clone()).unwrap())
        }
        _ => None,
    })
}

fn no_peers() -> Arc<[Peer]> {
    Arc::from(Vec::new())
}

/// A call that must still work after a misbehaving one, on the same runtime.
async fn still_serves(rt: &Runtime) {
    let spread = bundled(rt, "spread");
    let r = request(3, 30);
    let c = select(&spread, &r, None)
        .await
        .expect("the engine keeps serving");
    assert_eq!(c.value.len(), 3);
}

#[test]
fn policies_choose_through_the_real_host() {
    block_on(async {
        let rt = runtime();
        let r = request(6, 60);
        let spread = bundled(&rt, "spread");
        let c = select(&spread, &r, None).await.unwrap();
        let mut per_zone = BTreeMap::new();
        for ch in &c.value {
            *per_zone.entry(zone_of(&r.request, ch)).or_insert(0) += 1;
            assert!(
                ch.reason.as_deref().unwrap().contains("zone="),
                "{:?}",
                ch.reason
            );
        }
        assert_eq!(
            per_zone.values().copied().collect::<Vec<_>>(),
            [2, 2, 2],
            "spread evenly over 3 zones"
        );

        let binpack = bundled(&rt, "binpack");
        let mut packed = SelectRequestJson {
            tier: "b".into(),
            count: 2,
            requirements: RequirementsJson::default(),
            placed: vec![],
            candidates: nodes(12),
        };
        packed
            .placed
            .push(BTreeMap::from([("rack".into(), "r5".into())]));
        let r = packed.to_wit();
        let c = select(&binpack, &r, None).await.unwrap();
        assert_eq!(
            r.names[c.value[0].candidate as usize], "n00005",
            "packs into the rack in use"
        );

        // A policy that cannot find enough eligible nodes says so.
        let mut need = SelectRequestJson {
            tier: "w".into(),
            count: 2,
            requirements: RequirementsJson::default(),
            placed: vec![],
            candidates: nodes(6),
        };
        need.requirements.min_cpus = 16;
        let e = select(&spread, &need.to_wit(), None).await.unwrap_err();
        assert!(
            matches!(
                e,
                CallError::Refused {
                    kind: "unsatisfiable",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("only 0 of 6"), "{e}");
    });
}

#[test]
fn customizers_render_identity_from_the_masters_own_files() {
    block_on(async {
        let rt = runtime();
        let dir = scratch("netplan-master");
        std::fs::create_dir_all(dir.join("etc/netplan")).unwrap();
        std::fs::write(
            dir.join("etc/netplan/50-cloud-init.yaml"),
            "network: {version: 2}\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("etc/hosts"),
            "127.0.0.1 localhost\n127.0.1.1 ubuntu\n",
        )
        .unwrap();
        let master = Arc::new(DirMaster::new(&dir));

        let net = bundled(&rt, "network");
        let c = net
            .customize(&web(7), no_peers(), master.clone(), None)
            .await
            .unwrap();
        assert!(
            matches!(&c.value[0], Edit::Remove(p) if p == "/etc/netplan/50-cloud-init.yaml"),
            "{:?}",
            c.value[0]
        );
        let yaml = text(&c.value, "/etc/netplan/50-mint.yaml").unwrap();
        assert!(
            yaml.contains("addresses: [\"198.18.0.17/24\"]") && yaml.contains("via: 198.18.0.1"),
            "{yaml}"
        );

        let host = bundled(&rt, "hostname");
        let c = host
            .customize(
                &web(7),
                no_peers(),
                master,
                Some(&json!({"domain": "test.example"})),
            )
            .await
            .unwrap();
        assert_eq!(text(&c.value, "/etc/hostname").unwrap(), "web-007\n");
        assert!(
            text(&c.value, "/etc/hosts")
                .unwrap()
                .ends_with("198.18.0.17\tweb-007.test.example web-007\n")
        );

        // Bad configuration is the plugin's clear refusal, naming the key.
        let e = host
            .customize(
                &web(1),
                no_peers(),
                Arc::new(DirMaster::new(&dir)),
                Some(&json!({"domian": "x"})),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("domian"), "{e}");
        let e = host
            .customize(
                &web(1),
                no_peers(),
                Arc::new(DirMaster::new(&dir)),
                Some(&json!(["not", "an", "object"])),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
    });
}

#[test]
fn peers_page_through_the_whole_tier_and_master_reads_work() {
    block_on(async {
        let rt = runtime();
        let p = load_guest(&rt, "peers", "customizer", "").unwrap();
        let k = 5_000u32;
        let peers: Arc<[Peer]> = (0..k)
            .map(|i| Peer {
                index: i,
                hostname: format!("w{i}"),
                address: ip(IpAddr::from([198, 18, (i >> 8) as u8, i as u8])),
            })
            .collect::<Vec<_>>()
            .into();
        let dir = scratch("motd-master");
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/motd"), "welcome\n").unwrap();
        let mut inst = web(0);
        inst.peer_count = k;
        let c = p
            .customize(&inst, peers, Arc::new(DirMaster::new(&dir)), None)
            .await
            .unwrap();
        let listed = text(&c.value, "/peers").unwrap();
        assert_eq!(
            listed.lines().count(),
            k as usize,
            "more than one page of 4,096 peers"
        );
        assert_eq!(listed.lines().last().unwrap(), "4999 w4999 198.18.19.135");
        assert_eq!(text(&c.value, "/motd-copy").unwrap(), "welcome\n");
    });
}

#[test]
fn noop_driver_deploys_and_reports() {
    block_on(async {
        let rt = runtime();
        let noop = bundled(&rt, "noop");
        let d = Deployment {
            tier: "web".into(),
            index: 0,
            hostname: "web-000".into(),
            artifact: Artifact {
                url: "http://127.0.0.1:1/a".into(),
                digest: "sha256:00".into(),
                size: 0,
                format: "tree".into(),
            },
        };
        let mut node = Node {
            name: "n1".into(),
            properties: vec![],
            labels: vec![],
        };
        let r = noop.deploy(&node, &d, None).await.unwrap();
        assert_eq!(r.value.state, InstanceState::Running);
        assert_eq!(r.logs[0].message, "deploy");
        node.properties.push(("noop-state".into(), "failed".into()));
        assert_eq!(
            noop.status(&node, &d, None).await.unwrap().value.state,
            InstanceState::Failed
        );
        node.properties
            .push(("noop-fail".into(), "disk full".into()));
        let e = noop.deploy(&node, &d, None).await.unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        noop.undeploy(&node, &d, None).await.unwrap();
        // Asking a driver to select is a typed error, not a trap.
        assert!(matches!(
            select(&noop, &request(1, 1), None).await,
            Err(CallError::WrongKind { .. })
        ));
    });
}

#[test]
fn a_panicking_guest_fails_its_call_with_its_message() {
    block_on(async {
        let rt = runtime();
        let p = load_guest(&rt, "panic", "node-policy", "").unwrap();
        let e = select(&p, &request(3, 5), None).await.unwrap_err();
        let CallError::Trap { ref stderr, .. } = e else {
            panic!("expected a trap, got {e}")
        };
        assert!(
            stderr.contains("deliberate panic while choosing 3 nodes"),
            "{stderr}"
        );
        assert!(
            e.to_string().contains("plugin `panic` crashed in `select`"),
            "{e}"
        );
        // The same plugin and the engine both serve the next call.
        assert!(select(&p, &request(1, 5), None).await.is_err());
        still_serves(&rt).await;
    });
}

#[test]
fn an_endless_loop_is_stopped_at_its_deadline() {
    block_on(async {
        let rt = runtime();
        let p = load_guest(
            &rt,
            "spin",
            "node-policy",
            "[capabilities]\ntimeout-ms = 300",
        )
        .unwrap();
        let started = Instant::now();
        let e = select(&p, &request(1, 5), None).await.unwrap_err();
        assert!(matches!(e, CallError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("within 300ms"), "{e}");
        // Generous bound: the point is that it stops, not how fast this machine is.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        still_serves(&rt).await;
    });
}

#[test]
fn a_memory_bomb_hits_its_limit() {
    block_on(async {
        let rt = runtime();
        let p = load_guest(
            &rt,
            "memory-bomb",
            "node-policy",
            "[capabilities]\nmemory-mib = 32",
        )
        .unwrap();
        let e = select(&p, &request(1, 5), None).await.unwrap_err();
        assert!(
            matches!(e, CallError::MemoryLimit { limit_mib: 32, .. }),
            "{e}"
        );
        still_serves(&rt).await;
    });
}

#[test]
fn huge_output_is_capped_or_refused() {
    block_on(async {
        let rt = runtime();
        let p = load_guest(
            &rt,
            "flood",
            "customizer",
            "[capabilities]\nmemory-mib = 256\ntimeout-ms = 20000",
        )
        .unwrap();
        let m = Arc::new(mint_plugins::master::EmptyMaster);
        let c = p
            .customize(
                &web(0),
                no_peers(),
                m.clone(),
                Some(&json!({"lines": MAX_LOG_LINES + 500})),
            )
            .await
            .unwrap();
        assert_eq!(c.logs.len(), MAX_LOG_LINES);
        assert_eq!(c.dropped_logs, 500);
        assert!(c.logs.iter().all(|l| l.message.len() <= 4096));
        let e = p
            .customize(&web(0), no_peers(), m, Some(&json!({"mib": 20})))
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::InvalidAnswer { .. }), "{e}");
        assert!(e.to_string().contains("exceed 16 MiB"), "{e}");
        still_serves(&rt).await;
    });
}

#[test]
fn invalid_policy_answers_are_refused_by_the_host() {
    block_on(async {
        let rt = runtime();
        let p = load_guest(&rt, "bad-answer", "node-policy", "").unwrap();
        let mut r = SelectRequestJson {
            tier: "w".into(),
            count: 2,
            requirements: RequirementsJson::default(),
            placed: vec![],
            candidates: nodes(4),
        };
        r.requirements.min_cpus = 8; // n00001 qualifies, n00000 does not
        let r = r.to_wit();
        for (answer, needle) in [
            (json!([1, 99]), "only 4 candidates"),
            (json!([1, 1]), "`n00001` twice"),
            (json!([1, 0]), "`n00000`, which does not meet"),
            (json!([1, 2, 3]), "chose 3 nodes, but 2"),
        ] {
            let e = select(&p, &r, Some(&json!({ "answer": answer })))
                .await
                .unwrap_err();
            assert!(matches!(e, CallError::InvalidAnswer { .. }), "{e}");
            assert!(e.to_string().contains(needle), "{needle} not in {e}");
        }
        assert_eq!(
            select(&p, &r, Some(&json!({"answer": [1, 2]})))
                .await
                .unwrap()
                .value
                .len(),
            2
        );
        // Fewer than asked is an answer (the host places what fits); none at all too.
        assert_eq!(
            select(&p, &r, Some(&json!({"answer": [1]})))
                .await
                .unwrap()
                .value
                .len(),
            1
        );
        let e = select(&p, &r, Some(&json!({"refuse": "no rack has room"})))
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("refused `select` (unsatisfiable): no rack has room"),
            "{e}"
        );
    });
}

#[test]
fn components_that_do_not_fit_are_refused_at_load() {
    let rt = runtime();
    let hostname = mint_plugins::bundled::get("hostname").unwrap();
    // The wrong world: a customizer declared as a policy.
    let e = rt
        .load(
            manifest("hostname", "node-policy", ""),
            hostname.wasm,
            "hostname.wasm",
            &Grants::default(),
        )
        .err()
        .unwrap();
    assert!(matches!(e, LoadError::WrongKind { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("exports `mint:plugin/node-policy`")
            && msg.contains("`mint:plugin/customizer@0.1.2`"),
        "{msg}"
    );

    // A component built for an incompatible WIT major.
    let e = load_guest(&rt, "wit-v1", "node-policy", "").err().unwrap();
    assert!(matches!(e, LoadError::IncompatibleWit { .. }), "{e}");
    assert!(
        e.to_string().contains("mint:plugin@1.0.0") && e.to_string().contains("mint:plugin@0.1.2"),
        "{e}"
    );
    // A manifest that claims one.
    let m = mint_plugins::Manifest::parse(
        "m",
        "name = \"x\"\nversion = \"1\"\nkind = \"customizer\"\nwit = \"0.2.0\"",
    )
    .unwrap();
    let e = rt
        .load(m, hostname.wasm, "x", &Grants::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("mint:plugin@0.2.0"), "{e}");

    // Not wasm, and a core module.
    let e = rt
        .load(
            manifest("text", "node-policy", ""),
            b"#!/bin/sh\necho hi\n",
            "plugin.wasm",
            &Grants::default(),
        )
        .err()
        .unwrap();
    assert!(
        matches!(e, LoadError::NotWasm { .. }) && e.to_string().contains("wasm32-wasip2"),
        "{e}"
    );
    let core = b"\0asm\x01\0\0\0";
    let e = rt
        .load(
            manifest("core", "node-policy", ""),
            core,
            "core.wasm",
            &Grants::default(),
        )
        .err()
        .unwrap();
    assert!(matches!(e, LoadError::CoreModule { .. }), "{e}");
    // Truncated component bytes.
    let e = rt
        .load(
            manifest("cut", "customizer", ""),
            &hostname.wasm[..1000],
            "cut.wasm",
            &Grants::default(),
        )
        .err()
        .unwrap();
    assert!(matches!(e, LoadError::Compile { .. }), "{e}");
}

#[test]
fn compiled_code_is_cached_by_content_and_engine() {
    let dir = scratch("cache");
    let rt = Runtime::new(RuntimeOptions {
        cache_dir: Some(dir.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(bundled(&rt, "spread").code_source(), CodeSource::Compiled);
    assert_eq!(bundled(&rt, "spread").code_source(), CodeSource::Cached);
    // A damaged cache entry is recompiled, not trusted.
    let entry = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&entry, b"garbage").unwrap();
    let p = bundled(&rt, "spread");
    assert_eq!(p.code_source(), CodeSource::Compiled);
    block_on(async {
        assert_eq!(
            select(&p, &request(2, 9), None).await.unwrap().value.len(),
            2
        )
    });
}

/// Serves `body` to each connection on 127.0.0.1 until the returned sender is dropped.
async fn http_server(body: &'static str) -> (u16, tokio::sync::oneshot::Sender<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut rx => break,
                Ok((mut s, _)) = listener.accept() => {
                    let mut buf = [0u8; 4096];
                    let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
                    let reply = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                    let _ = s.write_all(reply.as_bytes()).await;
                }
            }
        }
    });
    (port, tx)
}

#[test]
fn drivers_reach_only_granted_hosts() {
    block_on(async {
        let (port, _stop) = http_server("hello from the agent").await;
        let (other, _stop2) = http_server("must not be reached").await;
        let allowed = format!("http://127.0.0.1:{port}");
        let grants = Grants {
            outbound_hosts: vec![HostPattern::parse(&allowed).unwrap()],
        };
        let rt = runtime();
        let extra = format!("[capabilities]\nallowed-outbound-hosts = [\"{allowed}\"]");
        let p = load_guest_granted(&rt, "http-driver", "driver", &extra, &grants).unwrap();
        let d = Deployment {
            tier: "w".into(),
            index: 0,
            hostname: "w-0".into(),
            artifact: Artifact {
                url: String::new(),
                digest: String::new(),
                size: 0,
                format: "tree".into(),
            },
        };
        let node = |url: String| Node {
            name: "n".into(),
            properties: vec![("agent-url".into(), url)],
            labels: vec![],
        };
        let ok = p
            .deploy(&node(format!("{allowed}/status")), &d, None)
            .await
            .unwrap();
        assert_eq!(ok.value.detail, "hello from the agent");

        let e = p
            .deploy(&node(format!("http://127.0.0.1:{other}/status")), &d, None)
            .await
            .unwrap_err();
        assert!(matches!(e, CallError::Refused { .. }), "{e}");
        assert!(
            e.to_string().contains(&format!(
                "denied outbound requests to http://127.0.0.1:{other}"
            )),
            "{e}"
        );

        // Deny by default: without a grant the same manifest does not load.
        let e = load_guest(&rt, "http-driver", "driver", &extra)
            .err()
            .unwrap();
        assert!(
            matches!(e, LoadError::NotGranted { .. }) && e.to_string().contains("--allow-host"),
            "{e}"
        );
        // And with no request in the manifest, nothing is reachable.
        let bare = load_guest_granted(&rt, "http-driver", "driver", "", &grants).unwrap();
        assert!(
            bare.deploy(&node(format!("{allowed}/status")), &d, None)
                .await
                .is_err()
        );
    });
}

/// `node-endpoints`: a driver reaches the endpoint a node's own property names, during a
/// call about that node, without any operator grant; nothing else.
#[test]
fn drivers_reach_the_nodes_own_endpoints() {
    block_on(async {
        let (port, _stop) = http_server("hello from the agent").await;
        let (other, _stop2) = http_server("must not be reached").await;
        let rt = runtime();
        let d = Deployment {
            tier: "w".into(),
            index: 0,
            hostname: "w-0".into(),
            artifact: Artifact {
                url: String::new(),
                digest: String::new(),
                size: 0,
                format: "tree".into(),
            },
        };
        let node = |props: &[(&str, String)]| Node {
            name: "n".into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            labels: vec![],
        };
        let agent = load_guest(
            &rt,
            "http-driver",
            "driver",
            "[capabilities]\nnode-endpoints = [\"agent-url\"]",
        )
        .unwrap();
        let ok = agent
            .deploy(
                &node(&[("agent-url", format!("http://127.0.0.1:{port}/v1/status"))]),
                &d,
                None,
            )
            .await
            .unwrap();
        assert_eq!(ok.value.detail, "hello from the agent");

        // A driver whose endpoint is the node's `bmc-url` cannot use the node's `agent-url`.
        let bmc = load_guest(
            &rt,
            "http-driver",
            "driver",
            "[capabilities]\nnode-endpoints = [\"bmc-url\"]",
        )
        .unwrap();
        let props = [
            ("agent-url", format!("http://127.0.0.1:{other}/")),
            ("bmc-url", format!("http://127.0.0.1:{port}/")),
        ];
        let e = bmc.deploy(&node(&props), &d, None).await.unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "denied outbound requests to http://127.0.0.1:{other}"
            )),
            "{e}"
        );
        let e = agent
            .deploy(
                &node(&[("agent-url", "http://user:pw@127.0.0.1:1/".into())]),
                &d,
                None,
            )
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("do not belong in an endpoint URL")
                && !e.to_string().contains("user:pw"),
            "{e}"
        );

        // Any driver may read the artifact its call is about, and what lies under it, and
        // nothing else of the engine's.
        let bare = load_guest(&rt, "http-driver", "driver", "").unwrap();
        let artifact = format!("http://127.0.0.1:{port}/v1/artifacts/w/0");
        let d = Deployment {
            artifact: Artifact {
                url: artifact.clone(),
                ..d.artifact.clone()
            },
            ..d.clone()
        };
        for (url, readable) in [
            (artifact.clone(), true),
            (format!("{artifact}/seed"), true),
            (format!("http://127.0.0.1:{port}/v1/artifacts/w/1"), false),
            (format!("{artifact}0"), false),
            (format!("{artifact}/../1"), false),
            (format!("{artifact}/%2e%2e/1"), false),
            (format!("http://127.0.0.1:{port}/v1/tiers"), false),
            (format!("http://127.0.0.1:{other}/v1/artifacts/w/0"), false),
        ] {
            let r = bare
                .deploy(&node(&[("agent-url", url.clone())]), &d, None)
                .await;
            assert_eq!(
                r.is_ok(),
                readable,
                "{url}: {:?}",
                r.map(|c| c.value.detail)
            );
        }

        let text = "name = \"p\"\nversion = \"0.0.0\"\nkind = \"node-policy\"\nwit = \"0.1.0\"\n[capabilities]\nnode-endpoints = [\"agent-url\"]";
        let e = Manifest::parse("p", text).unwrap_err();
        assert!(e.to_string().contains("only drivers reach nodes"), "{e}");
    });
}

#[test]
fn concurrent_calls_each_get_their_own_sandbox() {
    block_on(async {
        let rt = Arc::new(runtime());
        let spread = Arc::new(bundled(&rt, "spread"));
        let bomb = Arc::new(
            load_guest(
                &rt,
                "memory-bomb",
                "node-policy",
                "[capabilities]\nmemory-mib = 16",
            )
            .unwrap(),
        );
        let mut tasks = Vec::new();
        for i in 0..40u32 {
            let (s, b) = (spread.clone(), bomb.clone());
            tasks.push(tokio::spawn(async move {
                if i % 8 == 0 {
                    select(&b, &request(1, 4), None).await.map(|_| 0)
                } else {
                    select(&s, &request(1 + i % 5, 50), None)
                        .await
                        .map(|c| c.value.len())
                }
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t.await.unwrap();
            if i % 8 == 0 {
                assert!(matches!(r, Err(CallError::MemoryLimit { .. })));
            } else {
                assert_eq!(r.unwrap(), 1 + i % 5);
            }
        }
    });
}
