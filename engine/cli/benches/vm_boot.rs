//! Real machines booting: from the scale request to a VM instance of the real test master
//! (Debian 12, systemd, cloud-init; TCG here) answering at its address, through an agent in
//! VM mode, for an instance from the pre-minted pool against one minted on demand (a new
//! tier of one, then the same scale request), alternating in the same run; and the deploy
//! ISO path through the `redfish` driver and sushy-tools' libvirt backend, split into the
//! deploy system's boot, fetching and writing the master, flushing, and the reboot from
//! the disk until the instance answers.
//! Needs root (namespaces, libvirtd) and QEMU. `cargo bench -p mint --bench vm_boot`.

#[path = "../../../tests/bmc.rs"]
mod bmc;
#[path = "../../../tests/libvirt.rs"]
#[allow(dead_code)]
mod libvirt;
#[path = "../../../tests/real_os.rs"]
mod real_os;
#[path = "../../../tests/running.rs"]
mod running;
#[path = "../../../tests/testbed.rs"]
#[allow(dead_code)]
mod testbed;

use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use testbed::{TestBed, get};

const ROUNDS: usize = 2;

/// Polls `address` every 250 ms until it answers; the time from `t0`.
fn until_answer(address: &str, t0: Instant) -> Duration {
    let deadline = t0 + Duration::from_secs(600);
    while get(&format!("http://{address}/")).is_none() {
        assert!(Instant::now() < deadline, "{address} never answered");
        std::thread::sleep(Duration::from_millis(250));
    }
    t0.elapsed()
}

/// Waits until every instance of `tier` is back in the pool and its address is silent.
fn until_pooled(bed: &TestBed, tier: &str, address: &str) {
    bed.wait_for(
        &format!("{tier} back in the pool"),
        Duration::from_secs(120),
        || {
            let all = bed.mint(&["instance", "list", tier]);
            all.as_array()?
                .iter()
                .all(|i| i["state"] == "pooled")
                .then_some(())
        },
    );
    bed.wait_for(
        &format!("{address} silent"),
        Duration::from_secs(30),
        || get(&format!("http://{address}/")).is_none().then_some(()),
    );
}

/// Creates tier `name` on `198.18.{net}.0/24`, whose gateway is the bed's bridge; the first
/// instance's address.
fn tier(bed: &TestBed, digest: &str, name: &str, k: u32, net: u8) -> String {
    let spec = json!({"name": name, "image": digest, "max-instances": k, "subnet": format!("198.18.{net}.0/24"), "gateway": format!("198.18.{net}.1"),
        "hostname": format!("{name}-{{index}}"), "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "agent"}, "deploy-timeout-secs": 600});
    let file = bed.dir.join(format!("{name}.json"));
    std::fs::write(&file, spec.to_string()).unwrap();
    bed.mint(&["tier", "create", "-f", file.to_str().unwrap()]);
    bed.mint(&["instance", "list", name])[0]["address"]
        .as_str()
        .unwrap()
        .to_string()
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Pooled against on-demand VM scale-outs through one agent in VM mode.
fn agents(repo: &std::path::Path, master: &std::path::Path) {
    let dir = std::env::temp_dir().join(format!("mint-bench-vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bed = TestBed::vm_hosts(dir.clone(), repo.to_path_buf(), 1, &[]);
    bed.wait_for("the VM host", Duration::from_secs(30), || {
        (bed.mint(&["node", "list"]).as_array()?.len() == 1).then_some(())
    });
    let digest = bed.mint(&[
        "image",
        "import",
        master.to_str().unwrap(),
        "--name",
        "debian-real",
    ])["digest"]
        .as_str()
        .unwrap()
        .to_string();
    // Each tier has its own subnet, routed through the bed's bridge.
    bed.add_bridge_address("198.18.3.1/24");
    bed.add_bridge_address("198.18.4.1/24");
    let pool_address = tier(&bed, &digest, "pool", 8, 3);

    // The node's first deploy of the master also fetches it (1 GB) into its cache: apart.
    let t0 = Instant::now();
    bed.mint(&["tier", "scale", "pool", "1"]);
    let first = until_answer(&pool_address, t0);
    bed.mint(&["tier", "scale", "pool", "0"]);
    until_pooled(&bed, "pool", &pool_address);

    let (mut pooled, mut on_demand) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let t0 = Instant::now();
        bed.mint(&["tier", "scale", "pool", "1"]);
        pooled.push(until_answer(&pool_address, t0));
        bed.mint(&["tier", "scale", "pool", "0"]);
        until_pooled(&bed, "pool", &pool_address);

        let name = format!("od{round}");
        let t0 = Instant::now();
        let address = tier(&bed, &digest, &name, 1, 4);
        bed.mint(&["tier", "scale", &name, "1"]);
        on_demand.push(until_answer(&address, t0));
        bed.mint(&["tier", "scale", &name, "0"]);
        until_pooled(&bed, &name, &address);
        bed.mint(&["tier", "delete", &name]);
        println!(
            "round {round}: pooled {}, on demand {}",
            secs(pooled[round]),
            secs(on_demand[round])
        );
    }
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    let (p, o) = (mean(&pooled), mean(&on_demand));
    println!(
        "VM scale-out through an agent in VM mode (TCG, 1 GB raw master, {ROUNDS} rounds each, alternating):"
    );
    println!(
        "  first deploy on the node (master fetched into its cache): {}",
        secs(first)
    );
    println!(
        "  pooled: mean {}; on demand: mean {}; on demand / pooled = {:.3}",
        secs(p),
        secs(o),
        o.as_secs_f64() / p.as_secs_f64()
    );
    drop(bed);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One disk deployment through the deploy ISO, split.
fn deploy_iso(master: &std::path::Path) {
    let iso = real_os::deploy_iso();
    let dir = std::env::temp_dir().join(format!("mint-bench-deploy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mint.toml");
    std::fs::write(&config, format!("[deploy]\niso = \"{}\"\n", iso.display())).unwrap();
    let lab = libvirt::RedfishLab::start(
        &dir,
        "bench-1",
        "5a17e000-0f15-4000-8000-0000000000b1",
        "52:54:00:18:09:b1",
        true,
        &[
            "--listen",
            "198.18.9.253:0",
            "--tls-self-signed",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    lab.tier(master, "metal");
    let d = &lab.daemon;
    let address = d.mint(&["instance", "list", "metal"])[0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let asked = SystemTime::now();
    let t0 = Instant::now();
    d.mint(&["tier", "scale", "metal", "1"]);
    lab.wait_answer(&address, Duration::from_secs(600));
    let total = t0.elapsed();
    let events = d.mint(&["events"]);
    let written = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "disk-written")
        .expect("a disk-written event")
        .clone();
    let ms = |k: &str| written["detail"][k].as_u64().unwrap_or(0);
    let asked_ms = asked.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let reported = Duration::from_millis(
        written["at_ms"]
            .as_u64()
            .unwrap_or(asked_ms)
            .saturating_sub(asked_ms),
    );
    let (boot, fetch_write, sync) = (
        Duration::from_millis(ms("booted-ms")),
        Duration::from_millis(ms("fetch-write-ms")),
        Duration::from_millis(ms("sync-ms")),
    );
    println!(
        "a raw disk master (1 GB) through the deploy ISO (Redfish, sushy-tools' libvirt backend, TCG):"
    );
    println!("  scale request to answering: {}", secs(total));
    println!(
        "  deploy system boot (power-on to its start): {}; fetch and write {} bytes: {} ({:.1} MB/s); flush: {}",
        secs(boot),
        ms("bytes"),
        secs(fetch_write),
        ms("bytes") as f64 / 1e6 / fetch_write.as_secs_f64().max(0.001),
        secs(sync)
    );
    println!(
        "  request to the report: {}; the rest (engine and BMC before power-on, then power-off, media swap and the boot from the disk until it answers): {}",
        secs(reported),
        secs(total.saturating_sub(reported))
    );
    lab.scale_in("metal");
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    if let Some(why) = real_os::qemu_missing() {
        println!("skipped: {why}");
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap();
    let master = real_os::debian_master();
    agents(&repo, &master);
    deploy_iso(&master);
}
