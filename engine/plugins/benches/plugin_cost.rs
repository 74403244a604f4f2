//! What a plugin costs: cold compile, cached load, instantiate + call, and a selection
//! over 1,000 and 10,000 candidates by the Wasm `spread` against the same policy compiled
//! natively, measured in one run. `cargo xtask bench` (or `cargo bench -p mint-plugins`).

use mint_plugins::fixture::{NodeJson, RequirementsJson, SelectRequestJson};
use mint_plugins::types::{Artifact, Deployment, Node, SelectionRequest};

use mint_plugins::{Grants, Manifest, Runtime, RuntimeOptions, bundled};
use mint_sdk::policy::Policy;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

struct Stats {
    median: Duration,
    p90: Duration,
    n: usize,
}

/// Runs `f` `n` times after `warm` warm-up runs and returns the median and 90th percentile.
fn measure(warm: usize, n: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..warm {
        f();
    }
    let mut t: Vec<Duration> = (0..n)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    Stats {
        median: t[n / 2],
        p90: t[n * 9 / 10],
        n,
    }
}

fn show(name: &str, s: &Stats, target: Option<Duration>) {
    let verdict = match target {
        Some(t) if s.median <= t => format!("  (target < {t:?}: met)"),
        Some(t) => format!("  (target < {t:?}: MISSED)"),
        None => String::new(),
    };
    println!(
        "{name:<44} median {:>11.3?}  p90 {:>11.3?}  n={}{verdict}",
        s.median, s.p90, s.n
    );
}

fn nodes(n: usize) -> mint_plugins::fixture::NamedRequest {
    let candidates = (0..n)
        .map(|i| NodeJson {
            name: format!("node-{i:05}"),
            cpus: 8,
            memory_mib: 16384,
            arch: "x86_64".into(),
            labels: BTreeMap::from([
                ("zone".to_string(), format!("z{}", i % 4)),
                ("rack".to_string(), format!("r{}", i % 100)),
                ("pool".to_string(), "general".to_string()),
            ]),
            load: (i * 7919 % 1000) as u32,
        })
        .collect();
    SelectRequestJson {
        tier: "web".into(),
        count: 100,
        requirements: RequirementsJson::default(),
        placed: vec![],
        candidates,
    }
    .to_wit()
}

/// The host's request in the SDK's types: what a native policy would be handed.
fn to_native(r: &SelectionRequest) -> mint_sdk::policy::Request {
    use mint_sdk::policy as p;
    let labels = |l: &[mint_plugins::types::LabelRef]| {
        l.iter()
            .map(|l| p::LabelRef {
                key: l.key,
                value: l.value,
            })
            .collect()
    };
    p::Request {
        tier: r.tier.clone(),
        count: r.count,
        requirements: p::Requirements {
            labels: labels(&r.requirements.labels),
            min_cpus: r.requirements.min_cpus,
            min_memory_mib: r.requirements.min_memory_mib,
            arch: r.requirements.arch,
        },
        label_keys: r.label_keys.clone(),
        label_values: r.label_values.clone(),
        placed: r
            .placed
            .iter()
            .map(|x| p::Placement {
                labels: labels(&x.labels),
            })
            .collect(),
        labels: labels(&r.labels),
        candidates: r
            .candidates
            .iter()
            .map(|c| p::Candidate {
                cpus: c.cpus,
                memory_mib: c.memory_mib,
                arch: c.arch,
                labels_start: c.labels_start,
                labels_len: c.labels_len,
                load: c.load,
            })
            .collect(),
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter word is not supported, so ignore arguments.
    let rt_tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let spread = bundled::get("spread").unwrap();
    let manifest = Manifest::parse("spread", spread.manifest).unwrap();
    println!(
        "mint plugin cost ({} byte spread component)\n",
        spread.wasm.len()
    );

    let plain = Runtime::new(RuntimeOptions::default()).unwrap();
    let s = measure(1, 5, || {
        plain
            .load(manifest.clone(), spread.wasm, "spread", &Grants::default())
            .unwrap();
    });
    show("cold compile + load (no cache)", &s, None);

    let dir = std::env::temp_dir().join(format!("mint-bench-cache-{}", std::process::id()));
    let cached = Runtime::new(RuntimeOptions {
        cache_dir: Some(dir.clone()),
        ..Default::default()
    })
    .unwrap();
    cached
        .load(manifest.clone(), spread.wasm, "spread", &Grants::default())
        .unwrap();
    let s = measure(3, 50, || {
        cached
            .load(manifest.clone(), spread.wasm, "spread", &Grants::default())
            .unwrap();
    });
    show(
        "cached load (hash, deserialize, link, check)",
        &s,
        Some(Duration::from_millis(5)),
    );
    let _ = std::fs::remove_dir_all(&dir);

    let noop = plain.load_bundled("noop").unwrap().unwrap();
    let node = Node {
        name: "n".into(),
        properties: vec![],
        labels: vec![],
    };
    let d = Deployment {
        tier: "t".into(),
        index: 0,
        hostname: "t-0".into(),
        artifact: Artifact {
            url: String::new(),
            digest: String::new(),
            size: 0,
            format: "tree".into(),
        },
    };
    let s = measure(200, 2000, || {
        rt_tokio.block_on(noop.status(&node, &d, None)).unwrap();
    });
    show(
        "instantiate + call (noop status, fresh store)",
        &s,
        Some(Duration::from_micros(50)),
    );

    let policy = plain
        .load(manifest, spread.wasm, "spread", &Grants::default())
        .unwrap();
    let mut small = nodes(3);
    small.request.count = 1;
    let s = measure(200, 2000, || {
        rt_tokio
            .block_on(policy.select(&small.request, &small.names, None))
            .unwrap();
    });
    show("instantiate + call (spread, 3 candidates)", &s, None);

    println!();
    for n in [1_000, 10_000] {
        let named = nodes(n);
        let (req, names) = (&named.request, &named.names);
        let config = mint_sdk::Config::new();
        let iters = if n == 1_000 { 300 } else { 60 };
        let native = measure(5, iters, || {
            let r = to_native(req);
            let c = mint_spread::Spread::select(&r, &config).unwrap();
            assert_eq!(c.len(), 100);
        });
        let prebuilt = to_native(req);
        let algorithm = measure(5, iters, || {
            let c = mint_spread::Spread::select(&prebuilt, &config).unwrap();
            assert_eq!(c.len(), 100);
        });
        let wasm = measure(5, iters, || {
            let c = rt_tokio.block_on(policy.select(req, names, None)).unwrap();
            assert_eq!(c.value.len(), 100);
        });
        // The two must agree, or the comparison means nothing.
        let a: Vec<u32> = mint_spread::Spread::select(&to_native(req), &config)
            .unwrap()
            .iter()
            .map(|c| c.candidate)
            .collect();
        let b: Vec<u32> = rt_tokio
            .block_on(policy.select(req, names, None))
            .unwrap()
            .value
            .iter()
            .map(|c| c.candidate)
            .collect();
        assert_eq!(a, b, "native and Wasm spread disagree");
        show(
            &format!("spread 100 of {n}: native (incl. conversion)"),
            &native,
            None,
        );
        show(
            &format!("spread 100 of {n}: native (algorithm only)"),
            &algorithm,
            None,
        );
        show(
            &format!("spread 100 of {n}: wasm (marshal + call + check)"),
            &wasm,
            None,
        );
        let pure = wasm.median.as_secs_f64() / algorithm.median.as_secs_f64();
        println!(
            "{:<44} {pure:.2}x",
            format!("  wasm / native algorithm only at {n}")
        );
        let ratio = wasm.median.as_secs_f64() / native.median.as_secs_f64();
        let target = if n == 10_000 {
            if ratio <= 3.0 {
                "  (target <= 3x: met)"
            } else {
                "  (target <= 3x: MISSED)"
            }
        } else {
            ""
        };
        println!(
            "{:<44} {ratio:.2}x{target}",
            format!("  wasm / native incl. conversion at {n}")
        );
    }
}
