//! API throughput of the daemon over real HTTP on 127.0.0.1: listing a tier's 1,000
//! instances (one client and four at once), scale requests that each deploy or remove 10
//! instances through the `noop` driver, and scale requests that change nothing.
//! `cargo bench -p mint-daemon --bench api`.

mod common;

use serde_json::{Value, json};
use std::time::{Duration, Instant};

const K: u32 = 1_000;
const NODES: u32 = 1_000;

fn main() {
    let (dir, master) = common::scratch_with_master("api-bench");
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let data = dir.join("data");
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(mint_daemon::serve(
            &data,
            mint_daemon::Options::new("127.0.0.1:0".parse().unwrap()),
            async {
                stop_rx.await.ok();
            },
            move |r| addr_tx.send(r.addr).unwrap(),
        ))
        .unwrap();
    });
    let base = format!(
        "http://{}",
        addr_rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the daemon starts")
    );
    let auth = format!(
        "Bearer {}",
        std::fs::read_to_string(dir.join("data/admin.token"))
            .unwrap()
            .trim()
    );
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let post = |path: &str, body: Value| -> Value {
        agent
            .post(&format!("{base}{path}"))
            .set("Authorization", &auth)
            .send_json(body)
            .unwrap()
            .into_json()
            .unwrap()
    };

    let image = post("/v1/images", json!({"path": master}))["digest"]
        .as_str()
        .unwrap()
        .to_string();
    post(
        "/v1/tiers",
        json!({"name": "web", "image": image, "max-instances": K, "subnet": "198.18.0.0/20", "hostname": "web-{index:04}", "driver": {"plugin": "noop"}}),
    );
    let t = Instant::now();
    for i in 0..NODES {
        post(
            "/v1/nodes",
            json!({"name": format!("node-{i:04}"), "cpus": 8, "memory-mib": 16384, "labels": {"zone": format!("z{}", i % 4)}}),
        );
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "add node (one client, durable)                    {:>8.0} requests/s",
        f64::from(NODES) / secs
    );

    // Listing a tier's instances: a read, no lock, about 200 KB of JSON per answer.
    let list = |clients: usize, per_client: usize| -> f64 {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..clients {
                s.spawn(|| {
                    let agent = ureq::AgentBuilder::new()
                        .timeout(Duration::from_secs(120))
                        .build();
                    for _ in 0..per_client {
                        // Counted, not parsed: the figure is the daemon's, not the client's JSON parser's.
                        let text = agent
                            .get(&format!("{base}/v1/tiers/web/instances"))
                            .set("Authorization", &auth)
                            .call()
                            .unwrap()
                            .into_string()
                            .unwrap();
                        assert_eq!(text.matches("\"hostname\"").count(), K as usize);
                    }
                });
            }
        });
        (clients * per_client) as f64 / t.elapsed().as_secs_f64()
    };
    list(1, 5);
    println!(
        "list {K} instances, 1 client                    {:>8.0} requests/s",
        list(1, 200)
    );
    println!(
        "list {K} instances, 4 clients                   {:>8.0} requests/s",
        list(4, 100)
    );

    // Scale requests that move 10 instances each: policy over the free nodes, one bind
    // transaction, 10 driver calls, one finish transaction (or 10 undeploys and releases).
    let rounds = 100;
    let t = Instant::now();
    for r in 0..rounds {
        let to = if r % 2 == 0 { 20 } else { 10 };
        let v = post("/v1/tiers/web/scale", json!({"instances": to}));
        assert!(v["blocked"].is_null(), "{v}");
    }
    println!(
        "scale by 10 (deploy or remove 10 instances)       {:>8.1} requests/s",
        f64::from(rounds) / t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    for _ in 0..rounds {
        post("/v1/tiers/web/scale", json!({"instances": 10}));
    }
    println!(
        "scale to the current count (nothing to move)      {:>8.1} requests/s",
        f64::from(rounds) / t.elapsed().as_secs_f64()
    );

    let _ = stop_tx.send(());
    server.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
