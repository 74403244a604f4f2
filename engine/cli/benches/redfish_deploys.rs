//! Deploys per minute through the `redfish` driver against 50 emulated BMCs (one
//! sushy-tools emulator process each, fake-driver mode, on 127.0.0.1), at several
//! settings of `drivers.concurrency`, and where a deploy's time goes: the guest's own
//! code in the sandbox, waiting on the BMCs' HTTP answers, and the rest of the host's time
//! (mostly the waits between power-state polls, and instantiation).
//!
//! A deploy here is: insert two virtual media, set the boot override, power on, and poll
//! until the system reports On. The emulator applies a power change 1 to 11 s (uniformly
//! random) after it is asked, so a deploy takes about 6 s of mostly waiting, and
//! concurrency decides the rate. `cargo bench -p mint --bench redfish_deploys`
//! (`MINT_BENCH_BMCS` and `MINT_BENCH_CONCURRENCY=4,16,50` override the defaults).

#[path = "../../../tests/bmc.rs"]
mod bmc;
#[path = "../../../tests/running.rs"]
mod running;

use bmc::Emulator;
use running::Daemon;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PASSWORD: &str = "bench-pw";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

fn deployed(d: &Daemon) -> usize {
    d.instances("bm")
        .iter()
        .filter(|i| i["state"] == "deployed")
        .count()
}

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn main() {
    let bmcs = env_list("MINT_BENCH_BMCS", &[50])[0];
    let settings = env_list("MINT_BENCH_CONCURRENCY", &[4, 16, 50]);
    let dir = std::env::temp_dir().join(format!("mint-bench-redfish-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let repo = root();

    let started = Instant::now();
    let emulators: Vec<Emulator> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..bmcs)
            .map(|i| {
                let (repo, dir) = (&repo, &dir);
                s.spawn(move || {
                    Emulator::start(
                        repo,
                        &dir.join(format!("bmc-{i}")),
                        100 + i as u32,
                        1,
                        Some(("admin", PASSWORD)),
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("emulator"))
            .collect()
    });
    println!(
        "{bmcs} emulated BMCs (one sushy-emulator process each) up in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let disk = dir.join("live.iso");
    running::tiny_iso(&disk);
    std::fs::write(
        dir.join("creds.toml"),
        format!("[[credential]]\nusername = \"admin\"\npassword = \"{PASSWORD}\"\n"),
    )
    .unwrap();

    println!(
        "{:>11} {:>9} {:>13} {:>9} {:>10} {:>10} {:>10}",
        "concurrency", "seconds", "deploys/min", "calls", "in guest", "BMC HTTP", "host rest"
    );
    for c in settings {
        let config = dir.join(format!("mint-{c}.toml"));
        std::fs::write(
            &config,
            format!("[credentials]\nfile = \"creds.toml\"\n[drivers]\nconcurrency = {c}\n"),
        )
        .unwrap();
        let d = Daemon::start(
            &dir.join(format!("data-{c}")),
            &["--config", config.to_str().unwrap()],
            &repo,
        );
        let image = d.mint(&["image", "import", disk.to_str().unwrap()]);
        let spec = json!({"name": "bm", "image": image["digest"], "max-instances": bmcs, "subnet": "198.18.64.0/18",
            "hostname": "bm-{index:03}", "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "redfish"},
            "deploy-timeout-secs": 300});
        std::fs::write(dir.join("bm.json"), spec.to_string()).unwrap();
        d.mint(&[
            "tier",
            "create",
            "-f",
            dir.join("bm.json").to_str().unwrap(),
        ]);
        for (i, e) in emulators.iter().enumerate() {
            d.mint(&[
                "node",
                "add",
                &format!("n{i:03}"),
                "--cpus",
                "8",
                "--memory-mib",
                "8192",
                "--property",
                &format!("bmc-url={}", e.system_url(0)),
            ]);
        }
        let before = d.mint(&["plugin", "inspect", "redfish"])["stats"].clone();
        let t0 = Instant::now();
        d.mint(&["tier", "scale", "bm", &bmcs.to_string()]);
        let deadline = t0 + Duration::from_secs(900);
        while deployed(&d) < bmcs {
            assert!(
                Instant::now() < deadline,
                "not all deployed: {}",
                d.mint(&["events", "--tier", "bm"])
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = d.mint(&["plugin", "inspect", "redfish"])["stats"].clone();
        let delta = |k: &str| after[k].as_f64().unwrap_or(0.0) - before[k].as_f64().unwrap_or(0.0);
        let (busy, guest, waited) = (delta("busy-ms"), delta("guest-ms"), delta("waited-ms"));
        let calls = after["calls"].as_u64().unwrap_or(0) - before["calls"].as_u64().unwrap_or(0);
        let pct = |x: f64| format!("{:.2}%", 100.0 * x / busy.max(1e-9));
        println!(
            "{c:>11} {secs:>9.1} {:>13.1} {calls:>9} {:>10} {:>10} {:>10}",
            bmcs as f64 / secs * 60.0,
            pct(guest),
            pct(waited),
            pct(busy - guest - waited)
        );
        println!(
            "{:>11} driver time {:.1} s in all: guest {:.3} s, BMC HTTP {:.1} s, host rest {:.1} s",
            "",
            busy / 1e3,
            guest / 1e3,
            waited / 1e3,
            (busy - guest - waited) / 1e3
        );
        // Put the systems back off before the next setting.
        d.mint(&["tier", "scale", "bm", "0"]);
        drop(d);
        let deadline = Instant::now() + Duration::from_secs(30);
        while emulators.iter().any(|e| e.system(0)["PowerState"] != "Off") {
            assert!(
                Instant::now() < deadline,
                "systems stayed on after undeploy"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
