//! Real machines booting mint's instances, from the real test master (`real_os.rs`): its
//! raw disk booted in QEMU (TCG) by agents in VM mode from exactly the parts the engine
//! serves (the shared master, cached once per node, each instance's own overlay and its
//! NoCloud seed), and through the `redfish` driver against sushy-tools' libvirt backend:
//! the live ISO from the virtual CD, the raw disk through mint's deploy ISO. Each VM is on
//! a bridge in a network namespace the test owns, on 198.18.0.0/15.

use crate::libvirt::RedfishLab;
use crate::real_os::{debian_master, debian_master_iso, deploy_iso, qemu_missing};
use crate::support::{root, scratch};
use crate::testbed::{TestBed, get};
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn sha256_file(p: &Path) -> String {
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(p).unwrap(), &mut h).unwrap();
    format!("sha256:{}", hex::encode(h.finalize()))
}

/// The serial log of node `node`'s VM of `tier`/`index` (the newest deployment's).
fn serial_log(bed: &TestBed, node: &str, tier: &str, index: u32) -> PathBuf {
    let dir = bed.dir.join(node);
    let prefix = format!("{tier}-{index}.");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().join("serial.log"))
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| dir.join("no-vm-deployed"))
}

/// Waits until `address` answers HTTP, for at most `limit`; the answer. The failure
/// message carries the end of the VM's console.
fn wait_answer(address: &str, limit: Duration, serial: impl Fn() -> PathBuf) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(a) = get(&format!("http://{address}/")) {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "{address} did not answer within {limit:?}; its console ends:\n{}",
            std::fs::read_to_string(serial())
                .unwrap_or_default()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The instances of `tier`, once `n` are deployed.
fn deployed(bed: &TestBed, tier: &str, n: usize) -> Option<Vec<serde_json::Value>> {
    let all = bed.mint(&["instance", "list", tier]);
    let up: Vec<serde_json::Value> = all
        .as_array()?
        .iter()
        .filter(|i| i["state"] == "deployed")
        .cloned()
        .collect();
    (up.len() == n).then_some(up)
}

#[test]
fn disk_instances_boot_as_vms_through_agents_and_a_failed_hosts_instance_boots_elsewhere() {
    if let Some(why) = qemu_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let master = debian_master();
    let mut bed = TestBed::vm_hosts(
        scratch("vms-agents"),
        root(),
        3,
        &["--node-timeout-secs", "3"],
    );
    let image = bed.mint(&[
        "image",
        "import",
        master.to_str().unwrap(),
        "--name",
        "debian-real",
    ]);
    // The guests share the bed's /16 with the host's bridge, so the test reaches them
    // directly; the agents' own addresses are kept out of the tier's hands.
    let spec = serde_json::json!({
        "name": "vm", "image": image["digest"], "max-instances": 4, "subnet": "198.18.0.0/16",
        "reserved": ["198.18.0.0-198.18.2.0"], "hostname": "vm-{index}", "customizers": [{"plugin": "hostname"}],
        "driver": {"plugin": "agent"}, "deploy-timeout-secs": 300,
    });
    std::fs::write(bed.dir.join("vm.json"), spec.to_string()).unwrap();
    bed.mint(&[
        "tier",
        "create",
        "-f",
        bed.dir.join("vm.json").to_str().unwrap(),
    ]);
    bed.wait_for("three VM hosts", Duration::from_secs(30), || {
        (bed.mint(&["node", "list"]).as_array()?.len() == 3).then_some(())
    });

    let asked = Instant::now();
    bed.mint(&["tier", "scale", "vm", "2"]);
    let up = bed.wait_for("two instances deployed", Duration::from_secs(300), || {
        deployed(&bed, "vm", 2)
    });
    for inst in &up {
        let (address, hostname, node) = (
            inst["address"].as_str().unwrap(),
            inst["hostname"].as_str().unwrap(),
            inst["node"].as_str().unwrap(),
        );
        let index = inst["id"]["index"].as_u64().unwrap() as u32;
        let answer = wait_answer(address, Duration::from_secs(420), || {
            serial_log(&bed, node, "vm", index)
        });
        assert_eq!(answer.trim(), hostname, "{address}");
        eprintln!(
            "{hostname} answered at {address} from {node}'s VM {:.1?} after the scale request",
            asked.elapsed()
        );
        let console = std::fs::read_to_string(serial_log(&bed, node, "vm", index)).unwrap();
        assert!(
            console.contains("Datasource DataSourceNoCloud"),
            "{hostname} did not use its NoCloud seed"
        );
        assert!(
            !console.contains("DataSourceNone"),
            "{hostname} fell back to no datasource"
        );
    }

    // The master each node cached is the engine's, unchanged by the VMs that ran on it.
    let desc: serde_json::Value = bed
        .http()
        .get(&format!("{}/v1/artifacts/vm/0", bed.url))
        .set(
            "Authorization",
            &format!(
                "Bearer {}",
                std::fs::read_to_string(bed.token_file()).unwrap().trim()
            ),
        )
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let digest = desc["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "master")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    for inst in &up {
        let cached = bed
            .dir
            .join(inst["node"].as_str().unwrap())
            .join("cache")
            .join(format!("{}.blob", digest.trim_start_matches("sha256:")));
        assert_eq!(
            sha256_file(&cached),
            digest,
            "the master {} cached is unchanged",
            cached.display()
        );
    }

    // vm-0's host dies, its VM with it: the instance boots on the free host, with the
    // same address, host name and MAC.
    let first = up.iter().find(|i| i["id"]["index"] == 0).unwrap().clone();
    let (address, old_node) = (
        first["address"].as_str().unwrap().to_string(),
        first["node"].as_str().unwrap().to_string(),
    );
    let i: usize = old_node.trim_start_matches("node-").parse().unwrap();
    let failed = Instant::now();
    if let Ok(o) = Command::new("ip")
        .args(["netns", "pids", &bed.namespaces[i]])
        .output()
    {
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = bed.agents[i].wait();
    assert!(
        get(&format!("http://{address}/")).is_none(),
        "vm-0 is gone with its host"
    );
    let moved = bed.wait_for(
        "vm-0 deployed on another host",
        Duration::from_secs(120),
        || {
            let all = bed.mint(&["instance", "list", "vm"]);
            let i0 = all
                .as_array()?
                .iter()
                .find(|i| i["id"]["index"] == 0)?
                .clone();
            (i0["state"] == "deployed" && i0["node"] != old_node.as_str()).then_some(i0)
        },
    );
    assert_eq!(
        (moved["address"].as_str(), moved["hostname"].as_str()),
        (Some(address.as_str()), Some("vm-0")),
        "same identity"
    );
    let new_node = moved["node"].as_str().unwrap().to_string();
    let answer = wait_answer(&address, Duration::from_secs(420), || {
        serial_log(&bed, &new_node, "vm", 0)
    });
    assert_eq!(answer.trim(), "vm-0");
    eprintln!(
        "vm-0 answered at {address} from {new_node}'s VM {:.1?} after its host died",
        failed.elapsed()
    );
    let console = std::fs::read_to_string(serial_log(&bed, &new_node, "vm", 0)).unwrap();
    assert!(
        console.contains("Datasource DataSourceNoCloud"),
        "the replacement used its NoCloud seed"
    );

    // The new host's agent restarts (an upgrade, say) and finds its VM again.
    let j: usize = new_node.trim_start_matches("node-").parse().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &bed.agents[j].id().to_string()])
        .status();
    let _ = bed.agents[j].wait();
    bed.agents[j] = bed.start_agent(j);
    let agent_status = |j: usize| -> Option<serde_json::Value> {
        let url = format!("https://198.18.1.{}:7601/v1/status", 10 + j);
        bed.agent_http(j)
            .get(&url)
            .set(
                "Authorization",
                &format!("Bearer {}", bed.engine_credential(j)),
            )
            .call()
            .ok()?
            .into_json()
            .ok()
    };
    let status = bed.wait_for(
        "the restarted agent to answer",
        Duration::from_secs(20),
        || agent_status(j),
    );
    assert_eq!(
        (status["state"].as_str(), status["vm-state"].as_str()),
        (Some("running"), Some("running")),
        "{status}"
    );
    assert!(
        status["detail"].as_str().unwrap().contains("VM alive"),
        "{status}"
    );
    assert_eq!(
        get(&format!("http://{address}/")).as_deref().map(str::trim),
        Some("vm-0"),
        "the VM ran on through the agent's restart"
    );

    // Scaling in undeploys an instance: its agent stops its VM.
    let qemus = |ns: &str| {
        let o = Command::new("ip")
            .args(["netns", "pids", ns])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(b"qemu"))
            })
            .count()
    };
    let second = up.iter().find(|i| i["id"]["index"] == 1).unwrap();
    let k: usize = second["node"]
        .as_str()
        .unwrap()
        .trim_start_matches("node-")
        .parse()
        .unwrap();
    assert_eq!(qemus(&bed.namespaces[k]), 1);
    bed.mint(&["tier", "scale", "vm", "1"]);
    bed.wait_for("vm-1's VM to stop", Duration::from_secs(60), || {
        (qemus(&bed.namespaces[k]) == 0).then_some(())
    });
    assert!(
        get(&format!("http://{}/", second["address"].as_str().unwrap())).is_none(),
        "vm-1 no longer answers"
    );
    assert_eq!(qemus(&bed.namespaces[j]), 1, "vm-0's VM runs on");
}

#[test]
fn redfish_boots_an_iso_master_from_a_libvirt_domains_virtual_cd_and_scale_in_powers_it_off() {
    if let Some(why) = qemu_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let iso = debian_master_iso();
    let _machine = crate::testbed::exclusive();
    let dir = scratch("vms-redfish-iso");
    let lab = RedfishLab::start(
        &dir,
        "bm-0",
        "5a17e000-0f15-4000-8000-000000000001",
        "52:54:00:18:09:01",
        false,
        &[],
    );
    let image = lab.tier(&iso, "live");
    assert_eq!(image["format"], "iso");

    let asked = Instant::now();
    lab.daemon.mint(&["tier", "scale", "live", "1"]);
    let powered = asked.elapsed();
    let inst = lab.daemon.mint(&["instance", "list", "live"])[0].clone();
    assert_eq!(
        (inst["state"].as_str(), inst["node"].as_str()),
        (Some("deployed"), Some("bm-0")),
        "{inst}"
    );
    let address = inst["address"].as_str().unwrap().to_string();
    assert_eq!(
        lab.wait_answer(&address, Duration::from_secs(420)).trim(),
        "live-0"
    );
    eprintln!(
        "live-0 (ISO master, Redfish, libvirt) powered on {powered:.1?} and answered at {address} {:.1?} after the scale request",
        asked.elapsed()
    );
    let console = std::fs::read_to_string(&lab.serial).unwrap();
    assert!(
        console.contains("Datasource DataSourceNoCloud") && console.contains("/dev/fd0"),
        "the seed came from the virtual floppy"
    );
    assert!(!console.contains("DataSourceNone"));
    // libvirt's own view: running, the ISO on the CD and the seed on the floppy.
    assert_eq!(lab.lv.state("bm-0"), "running");
    assert_eq!(
        (lab.inserted("cdrom").len(), lab.inserted("floppy").len()),
        (1, 1)
    );

    // Scale-in powers the system off and ejects both, as libvirt sees it.
    lab.scale_in("live");
    assert_eq!(
        (lab.inserted("cdrom").len(), lab.inserted("floppy").len()),
        (0, 0),
        "both ejected"
    );
    assert!(lab.lv.get(&address).is_none());
}

#[test]
fn redfish_writes_a_disk_master_through_the_deploy_iso_and_the_server_boots_it_from_its_disk() {
    if let Some(why) = qemu_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let (master, deploy) = (debian_master(), deploy_iso());
    let _machine = crate::testbed::exclusive();
    let dir = scratch("vms-redfish-disk");
    // The deploy system fetches from the engine, which serves TLS on the host's end of a
    // link into the guests' bridge.
    std::fs::write(
        dir.join("mint.toml"),
        format!("[deploy]\niso = \"{}\"\n", deploy.display()),
    )
    .unwrap();
    let config = dir.join("mint.toml");
    let lab = RedfishLab::start(
        &dir,
        "bm-1",
        "5a17e000-0f15-4000-8000-000000000002",
        "52:54:00:18:09:02",
        true,
        &[
            "--listen",
            "198.18.9.253:0",
            "--tls-self-signed",
            "--config",
            config.to_str().unwrap(),
        ],
    );
    let image = lab.tier(&master, "metal");

    let asked = Instant::now();
    lab.daemon.mint(&["tier", "scale", "metal", "1"]);
    let deployed = asked.elapsed();
    let address = lab.daemon.mint(&["instance", "list", "metal"])[0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        lab.wait_answer(&address, Duration::from_secs(420)).trim(),
        "metal-0"
    );
    let events = lab.daemon.mint(&["events"]);
    let written = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "disk-written")
        .unwrap_or_else(|| panic!("no disk-written event: {events}"))
        .clone();
    eprintln!(
        "metal-0 (raw disk master through the deploy ISO, Redfish, libvirt): deployed {deployed:.1?} and answering {:.1?} after the scale request; the deploy system: booted {} ms, fetched and wrote {} bytes in {} ms, flushed in {} ms",
        asked.elapsed(),
        written["detail"]["booted-ms"],
        written["detail"]["bytes"],
        written["detail"]["fetch-write-ms"],
        written["detail"]["sync-ms"]
    );
    let console = std::fs::read_to_string(&lab.serial).unwrap();
    assert!(
        console.contains("mint deploy system: configuration on /dev/fd0"),
        "the deploy system read its configuration from the floppy"
    );
    assert!(
        console.contains("Datasource DataSourceNoCloud") && console.contains("/dev/fd0"),
        "the seed came from the virtual floppy"
    );
    // libvirt's view: running from its disk, no CD, the seed on the floppy.
    assert_eq!(lab.lv.state("bm-1"), "running");
    let xml = lab.lv.xml("bm-1");
    let first_boot = xml
        .split("<disk ")
        .find(|d| d.contains("<boot order='1'/>"))
        .unwrap_or_else(|| panic!("no first boot device: {xml}"));
    assert!(
        first_boot.contains("device='disk'") && first_boot.contains("dev='vda'"),
        "boots from its disk: {xml}"
    );
    assert_eq!(
        (lab.inserted("cdrom").len(), lab.inserted("floppy").len()),
        (0, 1),
        "the deploy ISO ejected, the seed in"
    );
    // The master the engine keeps is unchanged.
    let digest = image["digest"].as_str().unwrap();
    let stored = lab
        .daemon
        .data
        .join("images")
        .join(format!("{}.raw", digest.trim_start_matches("sha256:")));
    assert_eq!(sha256_file(&stored), digest);
    lab.scale_in("metal");
}
