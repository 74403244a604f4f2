//! Network boot: the engine's iPXE scripts by MAC, the boot files of a tree master, the
//! boot stage's report and the DHCP configuration for dnsmasq (read by Debian's dnsmasq);
//! then real machines: libvirt domains behind sushy-tools, booted over the network by the
//! `redfish` driver into their instances (DHCP from the test's own dnsmasq, iPXE from
//! QEMU's ROMs, mint's boot stage, the real test master's systemd).

use crate::bmc::Emulator;
use crate::libvirt::Libvirt;
use crate::real_os::{boot_stage, debian_master_tree, qemu_missing};
use crate::running::Daemon;
use crate::support::scratch;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The boot listener's URL, from the `dhcp-boot` line of the rendered configuration.
pub(crate) fn boot_url(dnsmasq_conf: &str) -> String {
    dnsmasq_conf
        .lines()
        .find_map(|l| l.strip_prefix("dhcp-boot=tag:ipxe,"))
        .and_then(|u| u.strip_suffix("/v1/boot"))
        .unwrap_or_else(|| panic!("no iPXE chain in:\n{dnsmasq_conf}"))
        .to_string()
}

pub(crate) fn get_text(url: &str) -> (u16, String) {
    match ureq::get(url).timeout(Duration::from_secs(30)).call() {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap_or_default()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

fn get_bytes(url: &str) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(url)
            .timeout(Duration::from_secs(60))
            .call()
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .into_reader(),
        &mut out,
    )
    .unwrap();
    out
}

/// The `kernel` line's URL and arguments of a boot script.
fn kernel_line(script: &str) -> (String, Vec<String>) {
    let line = script
        .lines()
        .find_map(|l| l.strip_prefix("kernel "))
        .unwrap_or_else(|| panic!("no kernel line in:\n{script}"));
    let mut words = line.split_whitespace().map(str::to_string);
    (words.next().unwrap(), words.collect())
}

/// The rendered dnsmasq configuration, with the test's own files.
pub(crate) fn dnsmasq_conf(daemon: &Daemon, dir: &Path, interface: &str) -> PathBuf {
    let out = daemon.run(&["netboot", "dnsmasq-config", "--interface", interface]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut conf = String::from_utf8(out.stdout).unwrap();
    conf.push_str(&format!(
        "dhcp-leasefile={}\npid-file={}\n",
        dir.join("dnsmasq.leases").display(),
        dir.join("dnsmasq.pid").display()
    ));
    let file = dir.join("dnsmasq.conf");
    std::fs::write(&file, conf).unwrap();
    file
}

#[test]
fn boot_scripts_name_the_bound_instances_kernel_and_descriptor_and_dnsmasq_reads_the_leases() {
    let dir = scratch("netboot-scripts");
    // A tree master with a kernel and a NIC driver (with what it needs) in its modules.
    let root = dir.join("master");
    let modules = root.join("lib/modules/6.1.0-9-amd64");
    for d in [
        "boot",
        "sbin",
        "lib/modules/6.1.0-9-amd64/kernel/drivers/net",
        "lib/modules/6.1.0-9-amd64/kernel/net/core",
        "etc",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("boot/vmlinuz-6.1.0-9-amd64"), b"the kernel").unwrap();
    std::fs::write(
        root.join("boot/vmlinuz-5.10.0-30-amd64"),
        b"an older kernel",
    )
    .unwrap();
    std::fs::write(modules.join("kernel/drivers/net/virtio_net.ko"), b"virtio").unwrap();
    std::fs::write(modules.join("kernel/net/core/failover.ko"), b"failover").unwrap();
    std::fs::write(
        modules.join("modules.dep"),
        "kernel/drivers/net/virtio_net.ko: kernel/net/core/failover.ko\nkernel/net/core/failover.ko:\n",
    )
    .unwrap();
    std::fs::write(root.join("sbin/init"), b"#!/bin/sh\n").unwrap();
    std::fs::write(dir.join("stage.cpio"), b"070701 a boot stage").unwrap();
    // A site CA, which the boot stage trusts instead of the engine's pin.
    let ca = crate::testbed::TestCa::new(&dir);
    let hosts = dir.join("dnsmasq.hosts");
    std::fs::write(
        dir.join("mint.toml"),
        format!(
            "[netboot]\nlisten = \"127.0.0.1:0\"\nstage = \"stage.cpio\"\ncmdline = \"console=ttyS0\"\nmodules = [\"virtio_net\", \"e1000\"]\ndnsmasq-hosts = \"{}\"\ncheck-source = false\nca = \"ca.pem\"\n",
            hosts.display()
        ),
    )
    .unwrap();
    let config = dir.join("mint.toml");
    let daemon = Daemon::start(
        &dir.join("data"),
        &["--config", config.to_str().unwrap()],
        &dir,
    );
    let image = daemon.mint(&["image", "import", root.to_str().unwrap()]);
    let spec = json!({
        "name": "net", "image": image["digest"], "max-instances": 3, "subnet": "198.18.31.0/24",
        "gateway": "198.18.31.1", "hostname": "net-{index}", "customizers": [{"plugin": "hostname"}],
        "driver": {"plugin": "noop"},
    });
    std::fs::write(dir.join("net.json"), spec.to_string()).unwrap();
    daemon.mint(&[
        "tier",
        "create",
        "-f",
        dir.join("net.json").to_str().unwrap(),
    ]);
    for (i, mac) in ["52:54:00:31:00:01", "52:54:00:31:00:02"]
        .iter()
        .enumerate()
    {
        daemon.mint(&[
            "node",
            "add",
            &format!("n{i}"),
            "--cpus",
            "1",
            "--memory-mib",
            "1024",
            "--property",
            &format!("mac={mac}"),
        ]);
    }
    let conf = dnsmasq_conf(&daemon, &dir, "lo");
    let base = boot_url(&std::fs::read_to_string(&conf).unwrap());
    let (code, chain) = get_text(&format!("{base}/v1/boot"));
    assert_eq!(code, 200);
    assert!(
        chain.contains(&format!("chain {base}/v1/boot/${{netX/mac}}")),
        "{chain}"
    );
    // Nothing bound yet: the script says so and boots nothing, as for a MAC no node has.
    for mac in ["52:54:00:31:00:01", "52:54:00:99:99:99"] {
        let (code, s) = get_text(&format!("{base}/v1/boot/{mac}"));
        assert_eq!(code, 200);
        assert!(
            s.contains("is bound to no instance") && !s.contains("kernel"),
            "{s}"
        );
    }
    let (code, bad) = get_text(&format!("{base}/v1/boot/not-a-mac"));
    assert!(
        code == 400 && bad.contains("not a MAC address"),
        "{code} {bad}"
    );
    // The boot listener serves the boot and nothing else of the API.
    let (code, _) = get_text(&format!("{base}/v1/tiers"));
    assert_eq!(code, 404);

    daemon.mint(&["tier", "scale", "net", "1"]);
    let bound = daemon.wait_for("net-0 running", Duration::from_secs(60), || {
        let i = daemon.instances("net");
        (i[0]["state"] == "deployed").then(|| i[0]["node"].as_str().unwrap().to_string())
    });
    let mac = if bound == "n0" {
        "52:54:00:31:00:01"
    } else {
        "52:54:00:31:00:02"
    };
    let other = if bound == "n0" {
        "52:54:00:31:00:02"
    } else {
        "52:54:00:31:00:01"
    };
    // MACs are compared in one form: upper case and hyphens name the same NIC.
    let (_, script) = get_text(&format!(
        "{base}/v1/boot/{}",
        mac.to_uppercase().replace(':', "-")
    ));
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    let (kernel_url, args) = kernel_line(&script);
    for want in [
        &format!("mint.mac={mac}"),
        "mint.addr=198.18.31.2/24",
        "mint.gw=198.18.31.1",
        "console=ttyS0",
        "mint.ca=/etc/mint/ca.pem",
    ] {
        assert!(
            args.iter().any(|a| a == want),
            "{want} missing from {args:?}"
        );
    }
    let descriptor = args
        .iter()
        .find_map(|a| a.strip_prefix("mint.descriptor="))
        .expect("a descriptor")
        .to_string();
    assert!(
        descriptor.starts_with(&format!("{}/v1/cap/net/0/", daemon.url)),
        "{descriptor}"
    );
    assert!(
        script.contains(&format!(
            "initrd {base}/v1/boot/stage\ninitrd {base}/v1/boot/trust\n"
        )),
        "{script}"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("mint.pin=")),
        "a CA replaces the pin: {args:?}"
    );
    // The CA's certificate, at the path the command line names, as one more initramfs.
    let trust = String::from_utf8_lossy(&get_bytes(&format!("{base}/v1/boot/trust"))).into_owned();
    let pem = std::fs::read_to_string(&ca.cert).unwrap();
    assert!(
        trust.starts_with("070701")
            && trust.contains("etc/mint/ca.pem\0")
            && trust.contains(&pem)
            && trust.contains("TRAILER!!!\0"),
        "{trust}"
    );
    let (_, unbound) = get_text(&format!("{base}/v1/boot/{other}"));
    assert!(unbound.contains("bound to no instance"), "{unbound}");
    // The newest kernel of the master, its NIC driver with what it needs, and the stage.
    assert_eq!(get_bytes(&kernel_url), b"the kernel");
    let modules_url = script
        .lines()
        .filter_map(|l| l.strip_prefix("initrd "))
        .find(|u| u.ends_with("/modules"))
        .expect("a modules initrd")
        .to_string();
    let archive = String::from_utf8_lossy(&get_bytes(&modules_url)).into_owned();
    for name in [
        "lib/modules/6.1.0-9-amd64/kernel/drivers/net/virtio_net.ko\0",
        "lib/modules/6.1.0-9-amd64/kernel/net/core/failover.ko\0",
        "lib/modules/6.1.0-9-amd64/modules.dep\0",
        "etc/mint-modules\0",
        "TRAILER!!!\0",
    ] {
        assert!(
            archive.contains(name),
            "{name:?} missing from the modules archive"
        );
    }
    assert!(archive.contains("virtio_net\n") && !archive.contains("e1000\n"));
    assert_eq!(
        get_bytes(&format!("{base}/v1/boot/stage")),
        b"070701 a boot stage"
    );
    // A capability altered in one character admits nothing.
    let forged = kernel_url.replacen("/v1/cap/net/0/", "/v1/cap/net/1/", 1);
    assert_eq!(get_text(&forged).0, 404);

    // The boot stage's report: an event, and the descriptor's `booted`.
    let pin = daemon.pin();
    let http = match &pin {
        Some(p) => crate::testbed::pinned(p),
        None => ureq::agent(),
    };
    let r = http
        .post(&format!("{descriptor}/booted"))
        .send_json(json!({"ok": true, "bytes": 42, "fetch-unpack-ms": 7, "booted-ms": 900}))
        .unwrap();
    assert_eq!(r.status(), 204);
    let desc: Value = http.get(&descriptor).call().unwrap().into_json().unwrap();
    assert_eq!(desc["booted"]["ok"], true, "{desc}");
    let events = daemon.mint(&["events"]);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "instance-booted"),
        "{events}"
    );
    let refused = http
        .post(&format!("{descriptor}/booted"))
        .send_string("{\"bytes\": 1}");
    assert!(
        matches!(refused, Err(ureq::Error::Status(400, _))),
        "{refused:?}"
    );

    // The leases: the engine keeps the hosts file, dnsmasq reads the whole configuration.
    let lease = format!("{mac},198.18.31.2,net-0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&hosts)
        .unwrap_or_default()
        .contains(&lease)
    {
        assert!(
            Instant::now() < deadline,
            "{} lacks {lease}",
            hosts.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&conf).unwrap();
    for want in [
        "dhcp-range=set:net,198.18.31.0,static,255.255.255.0",
        "dhcp-option=tag:net,option:router,198.18.31.1",
        "dhcp-match=set:ipxe,175",
        &format!("dhcp-hostsfile={}", hosts.display()),
        "interface=lo",
    ] {
        assert!(text.contains(want), "{want} missing from:\n{text}");
    }
    let test = Command::new("dnsmasq")
        .arg("--test")
        .arg(format!("--conf-file={}", conf.display()))
        .output()
        .expect("dnsmasq (cargo xtask setup installs dnsmasq-base)");
    assert!(
        test.status.success(),
        "dnsmasq refused the rendered configuration: {}",
        String::from_utf8_lossy(&test.stderr)
    );
    daemon.mint(&["tier", "scale", "net", "0"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&hosts)
        .unwrap_or_default()
        .contains(&lease)
    {
        assert!(Instant::now() < deadline, "the lease outlived the binding");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, after) = get_text(&format!("{base}/v1/boot/{mac}"));
    assert!(after.contains("bound to no instance"), "{after}");
}

/// Creates tier `net` of `k` tree instances of `image` on the lab's 198.18.9.0/24, booted
/// by the `redfish` driver, each with its host name and networkd address.
pub(crate) fn redfish_tier(daemon: &Daemon, dir: &Path, image: &Value, k: usize, timeout: u64) {
    let spec = json!({
        "name": "net", "image": image, "max-instances": k, "subnet": "198.18.9.0/24",
        "reserved": ["198.18.9.250-198.18.9.254"], "hostname": "net-{index}",
        "customizers": [{"plugin": "hostname"}, {"plugin": "network", "config": {"format": "networkd", "interface": "eth0"}}],
        "driver": {"plugin": "redfish"}, "deploy-timeout-secs": timeout,
    });
    std::fs::write(dir.join("net.json"), spec.to_string()).unwrap();
    daemon.mint(&[
        "tier",
        "create",
        "-f",
        dir.join("net.json").to_str().unwrap(),
    ]);
}

/// The instances of tier `net` placed on nodes: host name, address and node of each.
pub(crate) fn placed(daemon: &Daemon) -> Vec<(String, String, String)> {
    daemon
        .instances("net")
        .iter()
        .filter(|i| !i["node"].is_null())
        .map(|i| {
            (
                i["hostname"].as_str().unwrap().to_string(),
                i["address"].as_str().unwrap().to_string(),
                i["node"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The test's dnsmasq, in the bridge's namespace; stopped when dropped.
pub(crate) struct Dnsmasq(Child);

impl Dnsmasq {
    pub(crate) fn start(ns: &str, conf: &Path, log: &Path) -> Dnsmasq {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "dnsmasq", "--keep-in-foreground"])
            .arg(format!("--conf-file={}", conf.display()))
            .arg(format!("--log-facility={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dnsmasq");
        Dnsmasq(child)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Three libvirt domains boot over the network through the `redfish` driver: two become
/// instances of the real test master (its own systemd, host name and address, from memory),
/// then one is destroyed and its instance boots on the third with the same identity, while
/// the destroyed one's MAC gets the "not bound" script.
#[test]
fn tree_instances_boot_over_the_network_into_their_own_os_and_a_lost_nodes_instance_boots_on_another()
 {
    if let Some(why) = qemu_missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let (master, stage) = (debian_master_tree(), boot_stage());
    let _machine = crate::testbed::exclusive();
    let dir = scratch("netboot-vms");
    let mut lv = Libvirt::start(&dir.join("libvirt"), "198.18.9.254/24");
    lv.link_host("198.18.9.253/24");
    let (names, uuids, macs): (Vec<String>, Vec<String>, Vec<String>) = (0..3)
        .map(|i| {
            (
                format!("pxe-{i}"),
                format!("5a17e000-0f15-4000-8000-00000000010{i}"),
                format!("52:54:00:18:09:1{i}"),
            )
        })
        .fold(
            (vec![], vec![], vec![]),
            |(mut a, mut b, mut c), (x, y, z)| {
                a.push(x);
                b.push(y);
                c.push(z);
                (a, b, c)
            },
        );
    let serials: Vec<PathBuf> = (0..3)
        .map(|i| lv.define_with(&names[i], &uuids[i], &macs[i], 1, 1536))
        .collect();
    let bmc = Emulator::libvirt(&repo(), &dir.join("bmc"), &lv.uri, uuids.clone());
    let hosts = dir.join("dnsmasq.hosts");
    std::fs::write(
        dir.join("mint.toml"),
        format!(
            "[netboot]\nlisten = \"198.18.9.253:0\"\nstage = \"{}\"\ncmdline = \"console=ttyS0,115200 net.ifnames=0\"\ndnsmasq-hosts = \"{}\"\ndnsmasq-pid-file = \"{}\"\n",
            stage.display(),
            hosts.display(),
            dir.join("dnsmasq.pid").display()
        ),
    )
    .unwrap();
    let config = dir.join("mint.toml");
    let daemon = Daemon::start(
        &dir.join("data"),
        &[
            "--listen",
            "198.18.9.253:0",
            "--tls-self-signed",
            "--config",
            config.to_str().unwrap(),
        ],
        &repo(),
    );
    for i in 0..3 {
        daemon.mint(&[
            "node",
            "add",
            &names[i],
            "--cpus",
            "1",
            "--memory-mib",
            "1536",
            "--property",
            &format!("bmc-url={}", bmc.system_url(i)),
            "--property",
            &format!("mac={}", macs[i]),
        ]);
    }
    let imported = Instant::now();
    let image = daemon.mint(&["image", "import", master.to_str().unwrap()]);
    eprintln!(
        "imported the {} MB tree master in {:.1?}",
        image["size"].as_u64().unwrap_or(0) >> 20,
        imported.elapsed()
    );
    redfish_tier(&daemon, &dir, &image["digest"], 3, 900);
    let conf = dnsmasq_conf(&daemon, &dir, "br0");
    let base = boot_url(&std::fs::read_to_string(&conf).unwrap());
    let _dhcp = Dnsmasq::start(&lv.ns, &conf, &dir.join("dnsmasq.log"));

    let asked = Instant::now();
    daemon.mint(&["tier", "scale", "net", "2"]);
    let placed = placed(&daemon);
    assert_eq!(placed.len(), 2, "{placed:?}");
    let console = |node: &str| {
        let i = names.iter().position(|n| n == node).unwrap();
        std::fs::read_to_string(&serials[i]).unwrap_or_default()
    };
    let wait_answer = |address: &str, node: &str, limit: Duration| -> String {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(a) = lv.get(address) {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "{address} did not answer within {limit:?}; libvirt says {}; events: {}; the console ends:\n{}",
                lv.state(node),
                daemon.mint(&["events"]),
                console(node)
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    for (hostname, address, node) in &placed {
        assert_eq!(
            wait_answer(address, node, Duration::from_secs(600)).trim(),
            hostname
        );
        eprintln!(
            "{hostname} on {node} answers at {address} {:.1?} after the scale request",
            asked.elapsed()
        );
        let c = console(node);
        assert!(
            c.contains("mint boot stage: switching to the instance"),
            "{c}"
        );
        assert!(c.contains("digest checked"), "{c}");
    }
    let booted: Vec<Value> = daemon
        .mint(&["events"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "instance-booted")
        .cloned()
        .collect();
    assert_eq!(booted.len(), 2, "{booted:?}");
    eprintln!(
        "boot stage reports: {:?}",
        booted.iter().map(|e| &e["detail"]).collect::<Vec<_>>()
    );
    // The host is not the instance's address: a script asked from it reveals nothing.
    let (_, from_host) = get_text(&format!(
        "{base}/v1/boot/{}",
        macs[names.iter().position(|n| *n == placed[0].2).unwrap()]
    ));
    assert!(from_host.contains("bound to no instance"), "{from_host}");

    // The first instance's machine is lost: its instance boots on the free one, same identity.
    let (hostname, address, lost) = placed[0].clone();
    let spare = names
        .iter()
        .find(|n| placed.iter().all(|p| &p.2 != *n))
        .unwrap()
        .clone();
    let lost_at = Instant::now();
    lv.virsh(&["destroy", &lost]);
    let moved = daemon.wait_for(
        "the lost node's instance on the spare",
        Duration::from_secs(180),
        || {
            daemon
                .instances("net")
                .into_iter()
                .find(|i| i["hostname"] == hostname.as_str() && i["node"] == spare.as_str())
        },
    );
    assert_eq!(moved["address"], address.as_str());
    assert_eq!(
        wait_answer(&address, &spare, Duration::from_secs(600)).trim(),
        hostname
    );
    eprintln!(
        "{hostname} answers again at {address}, on {spare}, {:.1?} after {lost} was destroyed",
        lost_at.elapsed()
    );
    let lost_mac = &macs[names.iter().position(|n| *n == lost).unwrap()];
    let (_, unbound) = get_text(&format!("{base}/v1/boot/{lost_mac}"));
    assert!(unbound.contains("bound to no instance"), "{unbound}");
    let leases = std::fs::read_to_string(&hosts).unwrap();
    let spare_mac = &macs[names.iter().position(|n| *n == spare).unwrap()];
    // The lost node's MAC stays on the line only as the lease dnsmasq may abandon.
    assert!(
        leases.contains(&format!("{spare_mac},{lost_mac},{address},{hostname}")),
        "{leases}"
    );
}
