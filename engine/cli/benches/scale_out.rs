//! Scale-out latency on real nodes: from the scale request to the new instance answering
//! at its address, for an instance from the pre-minted pool against one minted on demand
//! at that moment (a new tier of one, then the same scale request), same image, same run:
//! for the small test master and for one of 1 GiB (`MINT_BENCH_MASTER_MIB`; 0 skips it).
//! Needs root: the nodes are network namespaces (the test bed of `tests/testbed.rs`).
//! `cargo bench -p mint --bench scale_out`.

#[path = "../../../tests/testbed.rs"]
#[allow(dead_code)]
mod testbed;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use testbed::{TestBed, get, master, noise};

const ROUNDS: usize = 7;

/// A client trusting exactly the bed's daemon.
static HTTP: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();

fn http() -> &'static ureq::Agent {
    HTTP.get().expect("set when the bed starts")
}

/// `Authorization` for the bed's daemon, as its admin.
fn admin() -> String {
    format!("Bearer {}", std::env::var("MINT_TOKEN").unwrap_or_default())
}

fn post(base: &str, path: &str, body: Value) -> Value {
    http()
        .post(&format!("{base}{path}"))
        .set("Authorization", &admin())
        .timeout(Duration::from_secs(60))
        .send_json(body)
        .unwrap()
        .into_json()
        .unwrap()
}

/// Polls the address every 5 ms until the instance answers; the time from `t0`.
fn until_answer(address: &str, t0: Instant) -> Duration {
    let deadline = t0 + Duration::from_secs(60);
    loop {
        if get(&format!("http://{address}/")).is_some() {
            return t0.elapsed();
        }
        if Instant::now() >= deadline {
            let events = http()
                .get(&format!(
                    "{}/v1/events",
                    std::env::var("MINT_SERVER").unwrap_or_default()
                ))
                .set("Authorization", &admin())
                .call()
                .ok()
                .and_then(|r| r.into_string().ok());
            panic!(
                "{address} never answered; events: {}",
                events.unwrap_or_default()
            );
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

/// Waits until every instance of `tier` is back in the pool, so that the next round
/// deploys the same instance again (a scale request while it is still undeploying would
/// take the next pooled one).
fn until_pooled(base: &str, tier: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v: Value = http()
            .get(&format!("{base}/v1/tiers/{tier}/instances"))
            .set("Authorization", &admin())
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if v.as_array().unwrap().iter().all(|i| i["state"] == "pooled") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tier {tier} did not return to the pool"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn tier(digest: &str, name: &str, k: u32, subnet: &str) -> Value {
    json!({"name": name, "image": digest, "max-instances": k, "subnet": subnet, "hostname": format!("{name}-{{index}}"),
           "customizers": [{"plugin": "hostname"}, {"plugin": "hosts"}], "driver": {"plugin": "agent"}, "deploy-timeout-secs": 600})
}

fn first_address(base: &str, tier: &str) -> String {
    let v: Value = http()
        .get(&format!("{base}/v1/tiers/{tier}/instances"))
        .set("Authorization", &admin())
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// One master's rounds: `ROUNDS` scale-outs from a pre-minted pool, then `ROUNDS` from tiers
/// minted on demand. Tiers are named `{prefix}...` on `198.18.{net}.0/24` and
/// `198.18.{net + 1}.0/24`. The first pooled round is the node's first deploy of the master
/// (nothing cached); it is returned apart and kept out of the medians.
fn rounds(
    base: &str,
    digest: &str,
    prefix: &str,
    net: u8,
) -> (Duration, Vec<Duration>, Vec<Duration>) {
    // From the pool: the tier's K instances were minted long before.
    let pool = format!("{prefix}pool");
    post(
        base,
        "/v1/tiers",
        tier(digest, &pool, 64, &format!("198.18.{net}.0/24")),
    );
    let address = first_address(base, &pool);
    let mut pooled = Vec::new();
    for _ in 0..=ROUNDS {
        let t0 = Instant::now();
        post(
            base,
            &format!("/v1/tiers/{pool}/scale"),
            json!({"instances": 1}),
        );
        pooled.push(until_answer(&address, t0));
        post(
            base,
            &format!("/v1/tiers/{pool}/scale"),
            json!({"instances": 0}),
        );
        until_gone(&address);
        until_pooled(base, &pool);
    }
    let cold = pooled.remove(0);
    // On demand: the instance is minted (a tier of one) at the moment it is needed.
    let mut on_demand = Vec::new();
    for r in 0..ROUNDS {
        let name = format!("{prefix}od{r}");
        let subnet = format!("198.18.{}.{}/29", net + 1, r * 8);
        let t0 = Instant::now();
        post(base, "/v1/tiers", tier(digest, &name, 1, &subnet));
        let address = first_address(base, &name);
        post(
            base,
            &format!("/v1/tiers/{name}/scale"),
            json!({"instances": 1}),
        );
        on_demand.push(until_answer(&address, t0));
        post(
            base,
            &format!("/v1/tiers/{name}/scale"),
            json!({"instances": 0}),
        );
        until_gone(&address);
        until_pooled(base, &name);
    }
    (cold, pooled, on_demand)
}

fn report(what: &str, (cold, pooled, on_demand): (Duration, Vec<Duration>, Vec<Duration>)) {
    let (p, o) = (median(pooled.clone()), median(on_demand.clone()));
    println!(
        "{what}: scale request to the instance answering at its address ({ROUNDS} rounds each, medians)"
    );
    println!("  first deploy on a node without the master cached    {cold:>8.1?}");
    println!(
        "  from the pre-minted pool (K = 64, minted before)    {:>8.1?}   (min {:?}, max {:?})",
        p,
        pooled.iter().min().unwrap(),
        pooled.iter().max().unwrap()
    );
    println!(
        "  minted on demand (tier of 1 created, then scaled)   {:>8.1?}   (min {:?}, max {:?})",
        o,
        on_demand.iter().min().unwrap(),
        on_demand.iter().max().unwrap()
    );
    println!(
        "  on demand / pool = {:.2}",
        o.as_secs_f64() / p.as_secs_f64()
    );
}

fn main() {
    let big_mib: u64 = std::env::var("MINT_BENCH_MASTER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = std::env::temp_dir().join(format!("mint-scale-out-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bed = TestBed::new(dir.clone(), repo, 2, &[]);
    let image = bed.mint(&[
        "image",
        "import",
        master(&dir).to_str().unwrap(),
        "--name",
        "hello",
    ]);
    let digest = image["digest"].as_str().unwrap().to_string();
    bed.wait_for("two registered nodes", Duration::from_secs(30), || {
        (bed.mint(&["node", "list"]).as_array()?.len() == 2).then_some(())
    });
    let base = bed.url.clone();
    let _ = HTTP.set(bed.http());
    // SAFETY: set before any other thread of this process reads the environment.
    unsafe {
        std::env::set_var("MINT_SERVER", &base);
        std::env::set_var(
            "MINT_TOKEN",
            std::fs::read_to_string(bed.token_file()).unwrap().trim(),
        );
    }
    let small = rounds(&base, &digest, "", 2);
    report("the test master (the agent binary, a few MiB)", small);
    if big_mib > 0 {
        // The same root with a payload of `big_mib` MiB: a master as large as a real OS's.
        let root = dir.join("master");
        std::fs::create_dir_all(root.join("srv")).unwrap();
        noise(&root.join("srv/payload"), big_mib << 20);
        let big = bed.mint(&["image", "import", root.to_str().unwrap(), "--name", "big"]);
        std::fs::remove_dir_all(&root).unwrap();
        let big = rounds(&base, big["digest"].as_str().unwrap(), "big", 4);
        report(&format!("a {big_mib} MiB master"), big);
    }
    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
}
