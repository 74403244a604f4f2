//! The `redfish` driver against OpenStack's Redfish emulator (sushy-tools, fake-driver
//! mode) on 127.0.0.1: virtual media, boot override and power, checked in the emulator's
//! own state after each step; BMC credentials that only the host handles; and BMCs that
//! refuse, fail, garble or stay silent.

use crate::bmc::{BadBmc, Emulator, Misbehaviour};
use crate::running::Daemon;
use crate::support::{root, scratch};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const PASSWORD: &str = "Fr0zen-Sushi-7";

/// Writes the daemon's configuration and the credentials file it names: one entry per
/// (endpoint, password), user `admin`, after the entries in `extra`.
fn configure(dir: &Path, credentials: &[(&str, &str)], extra: &str) -> std::path::PathBuf {
    let mut creds = String::from(extra);
    for (endpoint, password) in credentials {
        creds.push_str(&format!("[[credential]]\nendpoint = \"{endpoint}\"\nusername = \"admin\"\npassword = \"{password}\"\n"));
    }
    std::fs::write(dir.join("bmc-credentials.toml"), creds).unwrap();
    let config = dir.join("mint.toml");
    std::fs::write(
        &config,
        "[credentials]\nfile = \"bmc-credentials.toml\"\n[drivers]\nconcurrency = 4\n",
    )
    .unwrap();
    config
}

/// Imports a master (`master`, or a small ISO) and creates tier `name` of `k` instances
/// with the redfish driver.
fn disk_tier(
    d: &Daemon,
    dir: &Path,
    name: &str,
    k: u32,
    subnet: &str,
    driver_config: Value,
    labels: Value,
    master: Option<&Path>,
) {
    let disk = dir.join("live.iso");
    if !disk.exists() {
        crate::running::tiny_iso(&disk);
    }
    let disk = master.unwrap_or(&disk);
    let image = d.mint(&["image", "import", disk.to_str().unwrap()]);
    let spec = json!({
        "name": name, "image": image["digest"], "max-instances": k, "subnet": subnet,
        "hostname": format!("{name}-{{index:02}}"), "customizers": [{"plugin": "hostname"}],
        "driver": {"plugin": "redfish", "config": driver_config}, "deploy-timeout-secs": 60,
        "requirements": {"labels": labels},
    });
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, spec.to_string()).unwrap();
    d.mint(&["tier", "create", "-f", file.to_str().unwrap()]);
}

fn add_node(d: &Daemon, name: &str, bmc_url: &str, label: &str) {
    d.mint(&[
        "node",
        "add",
        name,
        "--cpus",
        "4",
        "--memory-mib",
        "4096",
        "--property",
        &format!("bmc-url={bmc_url}"),
        "--label",
        &format!("case={label}"),
    ]);
}

#[test]
fn the_redfish_driver_boots_instances_through_the_emulator() {
    let dir = scratch("redfish-deploy");
    let bmc = Emulator::start(&root(), &dir.join("bmc"), 1, 3, Some(("admin", PASSWORD)));
    let d = Daemon::start(
        &dir.join("data"),
        &[
            "--config",
            configure(&dir, &[(&bmc.base, PASSWORD)], "")
                .to_str()
                .unwrap(),
        ],
        &root(),
    );
    disk_tier(
        &d,
        &dir,
        "bm",
        4,
        "198.18.5.0/24",
        json!({"poll-ms": 100}),
        json!({}),
        None,
    );
    for i in 0..3 {
        add_node(&d, &format!("n{i}"), &bmc.system_url(i), "ok");
    }
    let node_index = |name: &str| name.trim_start_matches('n').parse::<usize>().unwrap();

    // Before: every system off, no media.
    for i in 0..3 {
        assert_eq!(bmc.system(i)["PowerState"], "Off");
        assert_eq!(bmc.media(i, "Cd")["Inserted"], false);
    }

    d.mint(&["tier", "scale", "bm", "2"]);
    let deployed = d.wait_for("two deployed instances", Duration::from_secs(60), || {
        let v: Vec<Value> = d
            .instances("bm")
            .into_iter()
            .filter(|i| i["state"] == "deployed")
            .collect();
        (v.len() == 2).then_some(v)
    });
    let mut used = Vec::new();
    let mut media_urls = Vec::new();
    for inst in &deployed {
        let i = node_index(inst["node"].as_str().unwrap());
        used.push(i);
        let index = inst["id"]["index"].as_u64().unwrap();
        // The media URLs are capability URLs for this deployment, under the daemon's own.
        let cap = format!("{}/v1/cap/bm/{index}/", d.url);
        // The emulator's own state: on, booting once from the CD that holds the master,
        // with the instance's seed on the removable device.
        let system = bmc.system(i);
        assert_eq!(system["PowerState"], "On", "{system}");
        assert_eq!(system["Boot"]["BootSourceOverrideTarget"], "Cd", "{system}");
        let cd = bmc.media(i, "Cd");
        let cd_url = cd["Image"].as_str().unwrap().to_string();
        assert!(
            cd_url.starts_with(&cap)
                && cd_url.ends_with("/master")
                && cd["Inserted"] == json!(true),
            "{cd}"
        );
        let seed = bmc.media(i, "Floppy");
        let seed_url = seed["Image"].as_str().unwrap().to_string();
        assert!(
            seed_url.starts_with(&cap) && seed_url.ends_with("/seed"),
            "{seed}"
        );
        media_urls.push(seed_url.clone());
        // What a BMC fetches from that URL, with no token, is this instance's identity.
        let bytes = ureq::get(&seed_url).call().unwrap();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut bytes.into_reader(), &mut body).unwrap();
        let hostname = inst["hostname"].as_str().unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains("local-hostname") && text.contains(hostname),
            "the seed names {hostname}"
        );
    }
    // Tampered with, a capability URL admits nothing.
    let forged = format!("{}0", media_urls[0].trim_end_matches("/seed"));
    assert!(matches!(
        ureq::get(&format!("{forged}/seed")).call(),
        Err(ureq::Error::Status(404, _))
    ));
    let idle = (0..3).find(|i| !used.contains(i)).unwrap();
    assert_eq!(
        bmc.system(idle)["PowerState"],
        "Off",
        "the third system was left alone"
    );
    assert_eq!(bmc.media(idle, "Cd")["Inserted"], false);
    // The emulator saw the deploys' requests and the downloads of both parts.
    assert!(
        bmc.log().contains("VirtualMedia.InsertMedia"),
        "{}",
        bmc.log()
    );

    // Scale in: the highest index leaves; its system powers off and its media are ejected.
    let top = deployed
        .iter()
        .max_by_key(|i| i["id"]["index"].as_u64())
        .unwrap();
    let top_system = node_index(top["node"].as_str().unwrap());
    d.mint(&["tier", "scale", "bm", "1"]);
    assert_eq!(
        bmc.media(top_system, "Cd")["Inserted"],
        false,
        "ejected when undeploy returns"
    );
    assert_eq!(bmc.media(top_system, "Floppy")["Inserted"], false);
    d.wait_for(
        "the undeployed system to power off",
        Duration::from_secs(30),
        || (bmc.system(top_system)["PowerState"] == "Off").then_some(()),
    );
    // The undeployed instance's capability URLs died with its deployment.
    let top_index = top["id"]["index"].as_u64().unwrap();
    for url in media_urls
        .iter()
        .filter(|u| u.contains(&format!("/v1/cap/bm/{top_index}/")))
    {
        assert!(
            matches!(ureq::get(url).call(), Err(ureq::Error::Status(404, _))),
            "{url} after undeploy"
        );
    }
    let still = deployed
        .iter()
        .find(|i| i["id"]["index"] != top["id"]["index"])
        .unwrap();
    assert_eq!(
        bmc.system(node_index(still["node"].as_str().unwrap()))["PowerState"],
        "On"
    );

    // The credentials reached the BMC (it requires them) but appear nowhere mint shows.
    let seen = [
        d.mint(&["events"]).to_string(),
        d.mint(&["node", "list"]).to_string(),
        d.mint(&["tier", "show", "bm"]).to_string(),
        d.mint(&["plugin", "inspect", "redfish"]).to_string(),
        d.log.lock().unwrap().clone(),
    ];
    for text in &seen {
        assert!(!text.contains(PASSWORD), "the BMC password leaked: {text}");
    }
    let info = d.mint(&["plugin", "inspect", "redfish"]);
    assert!(info["stats"]["calls"].as_u64().unwrap() >= 3, "{info}");
    assert!(
        info["stats"]["waited-ms"].as_f64().unwrap() > 0.0,
        "time waiting on the BMC is measured: {info}"
    );
}

#[test]
fn bmc_failures_are_clear_and_leave_the_pool_as_it_was() {
    let dir = scratch("redfish-failures");
    let good = Emulator::start(&root(), &dir.join("bmc"), 2, 2, Some(("admin", PASSWORD)));
    let (failing, garbled, silent) = (
        BadBmc::start(Misbehaviour::ServerError),
        BadBmc::start(Misbehaviour::Garbled),
        BadBmc::start(Misbehaviour::Silent),
    );
    // The emulator's endpoint is configured with a wrong password, so it answers 401; node
    // `missing` has the right one (a node's entry wins over its endpoint's), to reach 404.
    let right = ["missing", "qcow2"]
        .map(|n| {
            format!(
                "[[credential]]\nnode = \"{n}\"\nusername = \"admin\"\npassword = \"{PASSWORD}\"\n"
            )
        })
        .concat();
    let config = configure(&dir, &[(&good.base, "not-the-password")], &right);
    let d = Daemon::start(
        &dir.join("data"),
        &["--config", config.to_str().unwrap()],
        &root(),
    );
    let cases = [
        (
            "qcow2",
            good.system_url(1),
            "runs a qcow2 master; the deploy system writes raw disks: convert it (`qemu-img convert -O raw",
        ),
        (
            "unauthorized",
            good.system_url(0),
            "refused the credentials for GET",
        ),
        (
            "missing",
            format!("{}/redfish/v1/Systems/no-such-system", good.base),
            "(404 Not Found); check the node's `bmc-url` property",
        ),
        (
            "failing",
            format!("{}/redfish/v1/Systems/1", failing.base),
            "(500): the BMC's firmware is updating",
        ),
        (
            "garbled",
            format!("{}/redfish/v1/Systems/1", garbled.base),
            "malformed JSON",
        ),
        (
            "silent",
            format!("{}/redfish/v1/Systems/1", silent.base),
            "did not answer GET /redfish/v1/Systems/1 within 500 ms",
        ),
    ];
    // The qcow2 case's master is a disk: a small raw disk (an MBR) converted to qcow2.
    let qcow2 = dir.join("disk.qcow2");
    let mut mbr = vec![0u8; 2 << 20];
    mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(dir.join("disk.raw"), mbr).unwrap();
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(dir.join("disk.raw"))
        .arg(&qcow2)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (i, (case, url, _)) in cases.iter().enumerate() {
        add_node(&d, case, url, case);
        let master = if *case == "qcow2" {
            Some(qcow2.as_path())
        } else {
            None
        };
        disk_tier(
            &d,
            &dir,
            case,
            2,
            &format!("198.18.{}.0/24", 10 + i),
            json!({"request-timeout-ms": 500}),
            json!({"case": case}),
            master,
        );
        // The pass that tries the deploy fails, and the CLI says why.
        let o = d.run(&["tier", "scale", case, "1"]);
        assert_eq!(o.status.code(), Some(1), "{case}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(cases[i].2),
            "{case}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    for (case, _, needle) in &cases {
        let events = d.wait_for(
            &format!("the `{case}` node to fail"),
            Duration::from_secs(30),
            || {
                let n = d
                    .mint(&["node", "list"])
                    .as_array()?
                    .iter()
                    .find(|n| n["name"] == *case)?
                    .clone();
                (n["state"] == "failed").then(|| d.mint(&["events", "--tier", case]).to_string())
            },
        );
        assert!(
            events.contains(needle) && events.contains(&format!("node `{case}`")),
            "{case}: `{needle}` not in {events}"
        );
        assert!(!events.contains(PASSWORD) && !events.contains("not-the-password"));
        // Nothing deployed, both instances still in the pool with their identities.
        let inst = d.instances(case);
        assert_eq!(inst.len(), 2);
        assert!(
            inst.iter()
                .all(|i| i["state"] == "pooled" && i["node"].is_null()),
            "{case}: {inst:?}"
        );
    }
    // The emulator's systems were not touched: still off, nothing inserted.
    for i in 0..2 {
        assert_eq!(good.system(i)["PowerState"], "Off");
        assert_eq!(good.media(i, "Cd")["Inserted"], false);
        assert_eq!(good.media(i, "Floppy")["Inserted"], false);
    }
    assert!(
        failing.requests.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the failing BMC was asked"
    );

    // The operator fixes the password and signals the daemon, which reads its
    // configuration again; the repaired node then takes the tier's instance.
    configure(&dir, &[(&good.base, PASSWORD)], &right);
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    d.wait_for(
        "the configuration to be reloaded",
        Duration::from_secs(20),
        || {
            d.mint(&["events"])
                .as_array()?
                .iter()
                .any(|e| e["kind"] == "configuration-reloaded")
                .then_some(())
        },
    );
    d.mint(&["node", "state", "unauthorized", "free"]);
    d.wait_for(
        "the repaired node to run the instance",
        Duration::from_secs(60),
        || {
            d.instances("unauthorized")
                .iter()
                .any(|i| i["state"] == "deployed" && i["node"] == "unauthorized")
                .then_some(())
        },
    );
    assert_eq!(good.system(0)["PowerState"], "On");
    assert!(
        !d.log.lock().unwrap().contains(PASSWORD),
        "the reload logs no password"
    );
}

/// A BMC serving HTTPS with a self-signed certificate, as real ones do: under the default
/// trust (the system's roots) the deploy is refused with a message that names the fix and
/// the key the BMC presented; with the certificate as a CA, or its key pinned, the same
/// emulator deploys; `insecure` deploys too, and says so in the log on every use.
/// The daemon itself serves TLS with a self-signed certificate.
#[test]
fn a_self_signed_bmc_is_trusted_only_as_the_operator_configures() {
    let dir = scratch("redfish-tls");
    let cert = mint_tls::ServerCert::load(mint_tls::ServerSource::SelfSigned {
        dir: dir.join("bmc-tls"),
        names: vec![],
    })
    .unwrap();
    let (pem, key) = (dir.join("bmc-tls/cert.pem"), dir.join("bmc-tls/key.pem"));
    let bmc = Emulator::start_with(
        &root(),
        &dir.join("bmc"),
        3,
        4,
        Some(("admin", PASSWORD)),
        Some((&pem, &key)),
    );
    assert!(bmc.base.starts_with("https://"));
    std::fs::write(
        dir.join("bmc-credentials.toml"),
        format!(
            "[[credential]]\nendpoint = \"{}\"\nusername = \"admin\"\npassword = \"{PASSWORD}\"\n",
            bmc.base
        ),
    )
    .unwrap();
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let config = format!(
        "[credentials]\nfile = \"bmc-credentials.toml\"\n\
         [[endpoint]]\nnode = \"ca\"\ntls = {{ ca = \"bmc-tls/cert.pem\" }}\n\
         [[endpoint]]\nnode = \"pin\"\ntls = {{ pin = \"{}\" }}\n\
         [[endpoint]]\nnode = \"lab\"\ntls = \"insecure\"\n\
         [[endpoint]]\nnode = \"wrong-pin\"\ntls = {{ pin = \"{wrong}\" }}\n",
        cert.pin()
    );
    std::fs::write(dir.join("mint.toml"), config).unwrap();
    // The daemon serves TLS too: the driver reads its artifact's descriptor from it, which
    // the host checks against the daemon's own pin.
    let d = Daemon::start(
        &dir.join("data"),
        &[
            "--config",
            dir.join("mint.toml").to_str().unwrap(),
            "--tls-self-signed",
        ],
        &root(),
    );
    assert!(d.url.starts_with("https://"));
    for (i, case) in ["system", "ca", "pin", "lab", "wrong-pin"]
        .into_iter()
        .enumerate()
    {
        add_node(&d, case, &bmc.system_url(i % 4), case);
        disk_tier(
            &d,
            &dir,
            case,
            1,
            &format!("198.18.{}.0/24", 20 + i),
            json!({"poll-ms": 100}),
            json!({"case": case}),
            None,
        );
    }
    for case in ["system", "wrong-pin"] {
        let o = d.run(&["tier", "scale", case, "1"]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{case}: {err}");
        // What was refused, under which trust, the key presented, and the lines that fix it.
        assert!(
            err.contains("TLS refused")
                && err.contains(&bmc.base)
                && err.contains(&cert.pin().to_string()),
            "{case}: {err}"
        );
        assert!(
            err.contains("[[endpoint]]") && err.contains("tls = { pin = ") && err.contains("ca = "),
            "{case}: {err}"
        );
        assert!(!err.contains(PASSWORD));
        if case == "wrong-pin" {
            assert!(
                err.contains(&wrong),
                "the pin that did not match is named: {err}"
            );
        }
    }
    for case in ["ca", "pin", "lab"] {
        d.mint(&["tier", "scale", case, "1"]);
        d.wait_for(
            &format!("`{case}` deployed"),
            Duration::from_secs(60),
            || {
                d.instances(case)
                    .iter()
                    .any(|i| i["state"] == "deployed")
                    .then_some(())
            },
        );
    }
    let log = d.log.lock().unwrap().clone();
    assert!(
        log.contains("NOT verified") && log.contains("insecure"),
        "every insecure use is logged: {log}"
    );
    assert!(!log.contains(PASSWORD));
}

/// Creates a tier of `k` instances of the tree master with the `noop` driver, on nodes
/// labelled `case=NAME`, over the HTTP API, and returns how long the request took.
fn noop_tier(d: &Daemon, name: &str, k: u32, subnet: &str) -> Duration {
    let image = d.mint(&[
        "image",
        "import",
        "tests/fixtures/master-ifupdown",
        "--name",
        "tree",
    ]);
    let spec = json!({
        "name": name, "image": image["digest"], "max-instances": k, "subnet": subnet,
        "hostname": format!("{name}-{{index:02}}"), "driver": {"plugin": "noop"},
        "requirements": {"labels": {"case": name}},
    });
    timed(|| api(d, "POST", "/v1/tiers", Some(spec)))
}

/// One request to the daemon's API as its admin; panics unless it succeeds.
fn api(d: &Daemon, method: &str, path: &str, body: Option<Value>) -> Value {
    let r = ureq::request(method, &format!("{}{path}", d.url))
        .set("Authorization", &crate::support::admin_auth(&d.data))
        .timeout(Duration::from_secs(30));
    let r = match body {
        Some(b) => r.send_json(b),
        None => r.call(),
    };
    r.unwrap_or_else(|e| panic!("{method} {path}: {e}"))
        .into_json()
        .unwrap()
}

fn timed(f: impl FnOnce() -> Value) -> Duration {
    let started = std::time::Instant::now();
    f();
    started.elapsed()
}

fn counts(d: &Daemon, tier: &str) -> Value {
    api(d, "GET", &format!("/v1/tiers/{tier}"), None)["status"].clone()
}

#[test]
fn no_request_waits_behind_another_tiers_slow_bmcs() {
    let dir = scratch("redfish-head-of-line");
    // Twenty systems whose fake power changes land 1 to 11 s after they are asked.
    let bmc = Emulator::start(&root(), &dir.join("bmc"), 7, 20, Some(("admin", PASSWORD)));
    let config = configure(&dir, &[(&bmc.base, PASSWORD)], "");
    std::fs::write(&config, "[credentials]\nfile = \"bmc-credentials.toml\"\n[drivers]\nconcurrency = 32\nper-endpoint = 20\n").unwrap();
    let d = Daemon::start(
        &dir.join("data"),
        &["--config", config.to_str().unwrap()],
        &root(),
    );
    // Each deploy call waits for its power-on, so twenty calls hold the driver for seconds.
    disk_tier(
        &d,
        &dir,
        "slow",
        20,
        "198.18.30.0/24",
        json!({"poll-ms": 200, "wait-ms": 30000}),
        json!({"case": "slow"}),
        None,
    );
    for i in 0..20 {
        add_node(&d, &format!("s{i}"), &bmc.system_url(i), "slow");
    }
    assert!(noop_tier(&d, "quick", 3, "198.18.31.0/24") < Duration::from_secs(30));
    for i in 0..2 {
        d.mint(&[
            "node",
            "add",
            &format!("q{i}"),
            "--cpus",
            "2",
            "--memory-mib",
            "1024",
            "--label",
            "case=quick",
        ]);
    }
    let o = d.mint(&["tier", "scale", "slow", "20", "--no-wait"]);
    assert_eq!(o["will"]["deploy"], 20, "{o}");
    d.wait_for(
        "the slow tier's deploys in flight",
        Duration::from_secs(60),
        || (counts(&d, "slow")["in-flight"].as_array()?.len() >= 5).then_some(()),
    );

    // While twenty BMCs power on, another tier's requests answer at once.
    let scale = timed(|| {
        api(
            &d,
            "POST",
            "/v1/tiers/quick/scale",
            Some(json!({"instances": 2})),
        )
    });
    let node = timed(|| {
        api(
            &d,
            "POST",
            "/v1/nodes",
            Some(json!({"name": "q2", "cpus": 2, "memory-mib": 1024, "labels": {"case": "quick"}})),
        )
    });
    let create = noop_tier(&d, "other", 2, "198.18.32.0/24");
    eprintln!(
        "while 20 BMCs power on: scale {scale:?}, node add {node:?}, tier creation {create:?}"
    );
    for (what, took) in [
        ("scale", scale),
        ("node add", node),
        ("tier creation", create),
    ] {
        assert!(
            took < Duration::from_millis(200),
            "{what} took {took:?} while another tier deployed"
        );
    }
    d.wait_for("the quick tier at 2", Duration::from_secs(60), || {
        (counts(&d, "quick")["settled"] == true).then_some(())
    });
    let slow = counts(&d, "slow");
    assert!(
        slow["counts"]["deploying"].as_u64().unwrap_or(0) > 0,
        "the quick tier finished while the slow one still deployed: {slow}"
    );
    d.wait_for("the slow tier at 20", Duration::from_secs(240), || {
        (counts(&d, "slow")["settled"] == true).then_some(())
    });
    for i in 0..20 {
        assert_eq!(bmc.system(i)["PowerState"], "On");
    }
}

#[test]
fn a_late_deploy_answer_after_a_scale_in_is_discarded() {
    let dir = scratch("redfish-late-answer");
    let bmc = Emulator::start(&root(), &dir.join("bmc"), 8, 1, Some(("admin", PASSWORD)));
    let d = Daemon::start(
        &dir.join("data"),
        &[
            "--config",
            configure(&dir, &[(&bmc.base, PASSWORD)], "")
                .to_str()
                .unwrap(),
        ],
        &root(),
    );
    disk_tier(
        &d,
        &dir,
        "late",
        1,
        "198.18.33.0/24",
        json!({"poll-ms": 100, "wait-ms": 30000}),
        json!({}),
        None,
    );
    add_node(&d, "n0", &bmc.system_url(0), "late");
    d.mint(&["tier", "scale", "late", "1", "--no-wait"]);
    d.wait_for("the deploy in flight", Duration::from_secs(20), || {
        let st = counts(&d, "late");
        st["in-flight"]
            .as_array()?
            .iter()
            .any(|f| f["action"] == "deploy")
            .then_some(())
    });
    // Scaled in while the driver still waits for the power-on: the instance leaves at once,
    // and the deploy's answer, when it comes, no longer applies.
    let out = d.mint(&["tier", "scale", "late", "0"]);
    assert_eq!(out["undeployed"], "late/0", "{out}");
    let node = d.mint(&["node", "list"]).as_array().unwrap()[0].clone();
    assert_eq!(
        (node["state"].as_str(), node["instance"].is_null()),
        (Some("free"), true),
        "{node}"
    );
    let events = d.wait_for("the discarded answer", Duration::from_secs(30), || {
        let e = d.mint(&["events", "--tier", "late"]);
        e.as_array()?
            .iter()
            .any(|e| e["kind"] == "answer-discarded")
            .then_some(e)
    });
    let discarded = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "answer-discarded")
        .unwrap();
    assert!(
        discarded["message"].as_str().unwrap().contains("late/0"),
        "{discarded}"
    );
    assert!(
        !events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "deployed"),
        "the late answer was applied: {events}"
    );
    let inst = d.instances("late");
    assert_eq!(inst[0]["state"], "pooled");
    assert_eq!(
        d.mint(&["node", "list"]).as_array().unwrap()[0]["state"],
        "free"
    );
}
