//! Real machines booting over the network, from the scale request to the instance answering
//! at its address: libvirt domains (TCG here) behind sushy-tools, powered by the `redfish`
//! driver, DHCP from dnsmasq, iPXE from QEMU's ROMs, mint's boot stage and the real test
//! master's tree (a Debian root with systemd, about 600 MB, run from memory). First one
//! machine booted again and again, each boot split into the boot stage's start, fetching,
//! checking and unpacking the instance, and the instance's own boot; then ten machines
//! booting at once straight from the engine, and ten through an HTTP cache for blobs in
//! front of it (`docs/blob-cache.nginx.conf` run by Debian's nginx): the wall time, each
//! machine's time and the bytes of the master the engine itself sent.
//! Needs root, QEMU, libvirt, sushy-tools, dnsmasq, nginx (`cargo xtask setup`) and about
//! 17 GiB of free memory. `cargo bench -p mint --bench netboot` (about 40 minutes on 2 cores).

#[path = "../../../tests/blob_cache.rs"]
mod blob_cache;
#[path = "../../../tests/bmc.rs"]
#[allow(dead_code)]
mod bmc;
#[path = "../../../tests/libvirt.rs"]
#[allow(dead_code)]
mod libvirt;
#[path = "../../../tests/netboot.rs"]
// Its tests compile only into the test binary; what they use is unused here.
#[allow(dead_code, unused_imports)]
mod netboot;
#[path = "../../../tests/real_os.rs"]
#[allow(dead_code)]
mod real_os;
#[path = "../../../tests/running.rs"]
#[allow(dead_code)]
mod running;
#[path = "../../../tests/support.rs"]
#[allow(dead_code)]
mod support;
#[path = "../../../tests/testbed.rs"]
#[allow(dead_code)]
mod testbed;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Machines in the lab, and how many boot at once.
const MACHINES: usize = 10;
/// Boots of one machine, one after another (`MINT_BENCH_ROUNDS` to choose; 0 boots only the
/// ten at once).
const ROUNDS: usize = 3;
/// Each machine's memory: the instance lives in it.
const MEMORY_MIB: u64 = 1536;
/// The host's address on the lab's bridge: the engine, its boot listener and the cache.
const HOST: &str = "198.18.9.253";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The lab: domains, their BMCs, the engine, dnsmasq.
struct Lab {
    // Dropped in this order: dnsmasq, the engine, the BMCs, then the domains and bridge.
    _dhcp: netboot::Dnsmasq,
    daemon: running::Daemon,
    _bmc: bmc::Emulator,
    lv: libvirt::Libvirt,
    dir: PathBuf,
    ca: testbed::TestCa,
    http: ureq::Agent,
    config: PathBuf,
    netboot: String,
}

impl Lab {
    fn start(master: &Path, stage: &Path) -> Lab {
        let dir = std::env::temp_dir().join(format!("mint-bench-netboot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut lv = libvirt::Libvirt::start(&dir.join("libvirt"), "198.18.9.254/24");
        lv.link_host(&format!("{HOST}/24"));
        let mut uuids = Vec::new();
        for i in 0..MACHINES {
            let uuid = format!("5a17e000-0f15-4000-8000-0000000002{i:02}");
            lv.define_with(&name(i), &uuid, &mac(i), 1, MEMORY_MIB);
            uuids.push(uuid);
        }
        let bmc = bmc::Emulator::libvirt(&repo(), &dir.join("bmc"), &lv.uri, uuids);
        // A site CA signs the engine's certificate (and later the cache's): boot stages
        // get it from the engine's boot listener and trust both.
        let ca = testbed::TestCa::new(&dir);
        let (cert, key) = ca.issue(&dir, "engine", &[HOST, testbed::ENGINE_NAME]);
        let config = dir.join("mint.toml");
        let netboot = format!(
            "[netboot]\nlisten = \"{HOST}:0\"\nstage = \"{}\"\ncmdline = \"console=ttyS0,115200 net.ifnames=0\"\ndnsmasq-hosts = \"{}\"\ndnsmasq-pid-file = \"{}\"\nca = \"{}\"\n",
            stage.display(),
            dir.join("dnsmasq.hosts").display(),
            dir.join("dnsmasq.pid").display(),
            ca.cert.display()
        );
        std::fs::write(&config, &netboot).unwrap();
        let daemon = running::Daemon::start(
            &dir.join("data"),
            &[
                "--listen",
                &format!("{HOST}:0"),
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
            ],
            &repo(),
        );
        for i in 0..MACHINES {
            daemon.mint(&[
                "node",
                "add",
                &name(i),
                "--cpus",
                "1",
                "--memory-mib",
                &MEMORY_MIB.to_string(),
                "--property",
                &format!("bmc-url={}", bmc.system_url(i)),
                "--property",
                &format!("mac={}", mac(i)),
            ]);
        }
        let imported = Instant::now();
        let image = daemon.mint(&["image", "import", master.to_str().unwrap()]);
        println!(
            "imported the tree master ({} MB) in {:.1} s",
            image["size"].as_u64().unwrap_or(0) / 1_000_000,
            imported.elapsed().as_secs_f64()
        );
        netboot::redfish_tier(&daemon, &dir, &image["digest"], MACHINES, 2400);
        let conf = netboot::dnsmasq_conf(&daemon, &dir, "br0");
        let dhcp = netboot::Dnsmasq::start(&lv.ns, &conf, &dir.join("dnsmasq.log"));
        let trust =
            mint_tls::ClientTrust::new(&mint_tls::Trust::Ca(ca.cert.clone())).expect("the CA");
        let http = ureq::AgentBuilder::new()
            .tls_config(trust.config())
            .timeout(Duration::from_secs(30))
            .build();
        Lab {
            _dhcp: dhcp,
            daemon,
            _bmc: bmc,
            lv,
            dir,
            ca,
            http,
            config,
            netboot,
        }
    }

    /// `GET path` on the engine as its operator.
    fn admin_get(&self, path: &str) -> Value {
        let token = std::fs::read_to_string(self.daemon.data.join("admin.token")).unwrap();
        self.http
            .get(&format!("{}{path}", self.daemon.url))
            .set("Authorization", &format!("Bearer {}", token.trim()))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .unwrap()
    }

    /// What the engine itself has sent of blob `digest` since it started.
    fn served(&self, digest: &str) -> u64 {
        self.admin_get("/v1/blobs")["served"][digest]["bytes"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Scales `net` to `n` at `t0` and waits for every placed instance to answer with its
    /// host name; each one's time from `t0`, and the boot stage's reports.
    fn boot(&self, n: usize) -> (Vec<Duration>, Vec<Value>) {
        let since = self.last_event();
        let t0 = Instant::now();
        self.daemon.mint(&["tier", "scale", "net", &n.to_string()]);
        let placed = netboot::placed(&self.daemon);
        assert_eq!(placed.len(), n, "{placed:?}");
        let mut answered: Vec<Option<Duration>> = vec![None; n];
        let deadline = t0 + Duration::from_secs(2400);
        while answered.iter().any(Option::is_none) {
            for (k, (hostname, address, node)) in placed.iter().enumerate() {
                if answered[k].is_some() {
                    continue;
                }
                if let Some(a) = self.lv.get(address) {
                    assert_eq!(a.trim(), hostname, "{address} on {node}");
                    answered[k] = Some(t0.elapsed());
                }
            }
            assert!(
                Instant::now() < deadline,
                "not all of {placed:?} answered; events: {}",
                self.daemon.mint(&["events"])
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        let reports = self.reports(since);
        (answered.into_iter().map(Option::unwrap).collect(), reports)
    }

    /// Scales `net` to 0 and waits until every instance is pooled and every domain is off.
    fn scale_in(&self) {
        self.daemon.mint(&["tier", "scale", "net", "0"]);
        self.daemon
            .wait_for("every instance pooled", Duration::from_secs(300), || {
                self.daemon
                    .instances("net")
                    .iter()
                    .all(|i| i["state"] == "pooled")
                    .then_some(())
            });
        self.daemon
            .wait_for("every domain off", Duration::from_secs(120), || {
                (0..MACHINES)
                    .all(|i| self.lv.state(&name(i)) == "shut off")
                    .then_some(())
            });
    }

    /// The sequence number of the engine's newest event.
    fn last_event(&self) -> u64 {
        let mut last = 0;
        loop {
            let page = self.daemon.mint(&["events", "--after", &last.to_string()]);
            match page.as_array().and_then(|a| a.last()) {
                Some(e) => last = e["seq"].as_u64().unwrap(),
                None => return last,
            }
        }
    }

    /// The boot stage's reports (`instance-booted` events' details) after event `since`.
    fn reports(&self, since: u64) -> Vec<Value> {
        self.daemon
            .mint(&["events", "--after", &since.to_string()])
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "instance-booted")
            .map(|e| e["detail"].clone())
            .collect()
    }

    /// Puts the HTTP cache at `base` into the descriptors (`[artifacts] blob-base`, SIGHUP)
    /// and waits until they name it.
    fn use_cache(&self, base: &str) {
        std::fs::write(
            &self.config,
            format!("{}\n[artifacts]\nblob-base = \"{base}\"\n", self.netboot),
        )
        .unwrap();
        let hup = std::process::Command::new("kill")
            .args(["-HUP", &self.daemon.pid().to_string()])
            .status()
            .unwrap();
        assert!(hup.success());
        self.daemon.wait_for(
            "descriptors naming the cache",
            Duration::from_secs(30),
            || {
                let a = self.admin_get("/v1/artifacts/net/0");
                a["parts"][0]["url"]
                    .as_str()?
                    .starts_with(base)
                    .then_some(())
            },
        );
    }
}

fn name(i: usize) -> String {
    format!("bench-{i}")
}

fn mac(i: usize) -> String {
    format!("52:54:00:18:09:{:02x}", 0x20 + i)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Minimum, median and maximum of `v`, in seconds.
fn spread(v: &[Duration]) -> String {
    let mut s: Vec<f64> = v.iter().map(|d| secs(*d)).collect();
    s.sort_by(f64::total_cmp);
    format!(
        "first {:.1} s, median {:.1} s, last {:.1} s",
        s[0],
        s[s.len() / 2],
        s[s.len() - 1]
    )
}

/// Free memory in MiB, from /proc/meminfo.
fn available_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb / 1024)
}

fn main() {
    if let Some(why) = real_os::qemu_missing() {
        println!("skipped: {why}");
        return;
    }
    let need = MACHINES as u64 * (MEMORY_MIB + 128) + 1024;
    if available_mib() < need {
        println!(
            "skipped: {MACHINES} machines of {MEMORY_MIB} MiB need about {need} MiB free; {} MiB are",
            available_mib()
        );
        return;
    }
    let (master, stage) = (real_os::debian_master_tree(), real_os::boot_stage());
    let _machine = testbed::exclusive();
    let lab = Lab::start(&master, &stage);
    let digest = lab.admin_get("/v1/artifacts/net/0")["parts"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();

    // One machine at a time: what a single boot costs, and how it splits.
    let rounds = std::env::var("MINT_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS);
    println!("one machine, {rounds} boots one after another (scale request to answering):");
    let mut single = Vec::new();
    for round in 0..rounds {
        let (times, reports) = lab.boot(1);
        let report = reports.last().cloned().unwrap_or_default();
        let ms = |k: &str| report[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
        let (up, fetch) = (ms("booted-ms"), ms("fetch-unpack-ms"));
        println!(
            "  boot {}: {:.1} s (boot stage up {up:.1} s after power-on; fetch, check and unpack {fetch:.1} s)",
            round + 1,
            secs(times[0])
        );
        single.push(times[0]);
        lab.scale_in();
    }
    if !single.is_empty() {
        let mean = single.iter().map(|d| secs(*d)).sum::<f64>() / single.len() as f64;
        println!("  mean {mean:.1} s; {}", spread(&single));
    }

    // Ten at once, straight from the engine.
    let sent = lab.served(&digest);
    let t0 = Instant::now();
    let (direct, _) = lab.boot(MACHINES);
    let direct_wall = t0.elapsed();
    let direct_sent = lab.served(&digest) - sent;
    lab.scale_in();

    // Ten at once through the cache.
    let port = bmc::free_port();
    let base = format!("https://{HOST}:{port}");
    let cache = blob_cache::Nginx::start(
        &lab.dir.join("nginx"),
        &format!("{HOST}:{port}"),
        lab.daemon.url.trim_start_matches("https://"),
        &lab.ca,
    );
    lab.use_cache(&base);
    let sent = lab.served(&digest);
    let t0 = Instant::now();
    let (cached, _) = lab.boot(MACHINES);
    let cached_wall = t0.elapsed();
    let cached_sent = lab.served(&digest) - sent;
    let from_cache = cache.requests_for(&digest);
    lab.scale_in();

    println!("{MACHINES} machines booting at once (scale request to each answering):");
    println!(
        "  straight from the engine: all answering after {:.1} s ({}); the engine sent {:.2} GB of the master",
        secs(direct_wall),
        spread(&direct),
        direct_sent as f64 / 1e9
    );
    println!(
        "  through the HTTP cache:   all answering after {:.1} s ({}); the engine sent {:.2} GB of the master, the cache answered {from_cache} requests for it",
        secs(cached_wall),
        spread(&cached),
        cached_sent as f64 / 1e9
    );
    println!(
        "  cached / direct wall time: {:.2}; engine bytes of the master: {:.2}",
        secs(cached_wall) / secs(direct_wall),
        cached_sent as f64 / direct_sent.max(1) as f64
    );
}
