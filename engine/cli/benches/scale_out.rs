//! Scale-out latency on real nodes: from the scale request to the new instance answering
//! at its address, for an instance from the pre-minted pool against one minted on demand
//! at that moment (a new tier of one, then the same scale request), same image, same run.
//! Needs root: the nodes are network namespaces (the test bed of `tests/testbed.rs`).
//! `cargo bench -p mint --bench scale_out`.

#[path = "../../../tests/testbed.rs"]
#[allow(dead_code)]
mod testbed;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use testbed::{TestBed, get, master};

const ROUNDS: usize = 7;

/// `Authorization` for the bed's daemon, as its admin.
fn admin() -> String {
    format!("Bearer {}", std::env::var("MINT_TOKEN").unwrap_or_default())
}

fn post(base: &str, path: &str, body: Value) -> Value {
    ureq::post(&format!("{base}{path}")).set("Authorization", &admin()).timeout(Duration::from_secs(60)).send_json(body).unwrap().into_json().unwrap()
}

/// Polls the address every 5 ms until the instance answers; the time from `t0`.
fn until_answer(address: &str, t0: Instant) -> Duration {
    let deadline = t0 + Duration::from_secs(60);
    loop {
        if get(&format!("http://{address}/")).is_some() {
            return t0.elapsed();
        }
        if Instant::now() >= deadline {
            let events = ureq::get(&format!("{}/v1/events", std::env::var("MINT_SERVER").unwrap_or_default())).set("Authorization", &admin()).call().ok().and_then(|r| r.into_string().ok());
            panic!("{address} never answered; events: {}", events.unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn until_gone(address: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&format!("http://{address}/")).is_some() {
        assert!(Instant::now() < deadline, "{address} kept answering");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let dir = std::env::temp_dir().join(format!("mint-scale-out-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bed = TestBed::new(dir.clone(), repo, 2, &[]);
    let image = bed.mint(&["image", "import", master(&dir).to_str().unwrap(), "--name", "hello"]);
    let digest = image["digest"].as_str().unwrap().to_string();
    bed.wait_for("two registered nodes", Duration::from_secs(30), || (bed.mint(&["node", "list"]).as_array()?.len() == 2).then_some(()));
    let tier = |name: &str, k: u32, subnet: &str| {
        json!({"name": name, "image": digest, "max-instances": k, "subnet": subnet, "hostname": format!("{name}-{{index}}"),
               "customizers": [{"plugin": "hostname"}, {"plugin": "hosts"}], "driver": {"plugin": "agent"}})
    };
    let base = bed.url.clone();
    // SAFETY: set before any other thread of this process reads the environment.
    unsafe {
        std::env::set_var("MINT_SERVER", &base);
        std::env::set_var("MINT_TOKEN", std::fs::read_to_string(bed.token_file()).unwrap().trim());
    }

    // From the pool: the tier's K instances were minted long before.
    post(&base, "/v1/tiers", tier("pool", 64, "198.18.2.0/24"));
    let first_address = |tier: &str| -> String {
        let v: Value = ureq::get(&format!("{base}/v1/tiers/{tier}/instances")).set("Authorization", &admin()).call().unwrap().into_json().unwrap();
        v[0]["address"].as_str().unwrap().to_string()
    };
    let address = first_address("pool");
    let mut pooled = Vec::new();
    for _ in 0..ROUNDS {
        let t0 = Instant::now();
        post(&base, "/v1/tiers/pool/scale", json!({"instances": 1}));
        pooled.push(until_answer(&address, t0));
        post(&base, "/v1/tiers/pool/scale", json!({"instances": 0}));
        until_gone(&address);
    }

    // On demand: the instance is minted (a tier of one) at the moment it is needed.
    let mut on_demand = Vec::new();
    for r in 0..ROUNDS {
        let name = format!("od{r}");
        let subnet = format!("198.18.3.{}/29", r * 8);
        let t0 = Instant::now();
        post(&base, "/v1/tiers", tier(&name, 1, &subnet));
        let address = first_address(&name);
        post(&base, &format!("/v1/tiers/{name}/scale"), json!({"instances": 1}));
        on_demand.push(until_answer(&address, t0));
        post(&base, &format!("/v1/tiers/{name}/scale"), json!({"instances": 0}));
        until_gone(&address);
    }
    let (p, o) = (median(pooled.clone()), median(on_demand.clone()));
    println!("scale-out latency, request to the instance answering at its address ({ROUNDS} rounds each, medians)");
    println!("  from the pre-minted pool (K = 64, minted before)    {:>8.1?}   (min {:?}, max {:?})", p, pooled.iter().min().unwrap(), pooled.iter().max().unwrap());
    println!("  minted on demand (tier of 1 created, then scaled)   {:>8.1?}   (min {:?}, max {:?})", o, on_demand.iter().min().unwrap(), on_demand.iter().max().unwrap());
    println!("  on demand / pool = {:.2}", o.as_secs_f64() / p.as_secs_f64());
    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
}
