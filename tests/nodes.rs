//! Real nodes: Linux network namespaces on a bridge, one `mint-agent` in each, a daemon on
//! the host, and the `agent` driver between them (the bed is `testbed.rs`). After a deploy
//! the test reaches every instance at its pre-assigned address and gets its identity back.

use crate::support::{root, scratch};
use crate::testbed::{TestBed, addresses_in, get, master, sh};
use std::process::Command;
use std::time::{Duration, Instant};

/// A test bed in a fresh scratch directory.
fn bed(name: &str, nodes: usize, daemon_args: &[&str]) -> TestBed {
    TestBed::new(scratch(name), root(), nodes, daemon_args)
}

/// Imports the test master and creates tier `web` of `k` instances on 198.18.2.0/24 with
/// the agent driver; `extra` adds or replaces fields of the spec.
fn web_tier(bed: &TestBed, k: u32, extra: serde_json::Value) {
    let image = bed.mint(&[
        "image",
        "import",
        master(&bed.dir).to_str().unwrap(),
        "--name",
        "hello",
    ]);
    let mut spec = serde_json::json!({
        "name": "web", "image": image["digest"], "max-instances": k, "subnet": "198.18.2.0/24",
        "hostname": "web-{index:03}", "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "agent"},
    });
    for (key, value) in extra.as_object().into_iter().flatten() {
        spec[key] = value.clone();
    }
    let file = bed.dir.join("web.json");
    std::fs::write(&file, spec.to_string()).unwrap();
    bed.mint(&["tier", "create", "-f", file.to_str().unwrap()]);
}

/// Waits until `n` agents have registered their nodes.
fn wait_for_nodes(bed: &TestBed, n: usize) {
    bed.wait_for(
        &format!("{n} registered nodes"),
        Duration::from_secs(30),
        || (bed.mint(&["node", "list"]).as_array()?.len() == n).then_some(()),
    );
}

/// Checks that the service of instance `hostname` runs confined: its `/` is the
/// instance's root (the test master's few directories, none of the node's), its host name
/// is the instance's, and its mount and UTS namespaces are not the node's.
fn confined(hostname: &str) {
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains("hello")
                && String::from_utf8_lossy(&env)
                    .split('\0')
                    .any(|v| v == format!("MINT_HOSTNAME={hostname}"))
        })
        .unwrap_or_else(|| panic!("no service process of {hostname}"));
    let inside = |args: &[&str]| {
        let o = Command::new("nsenter")
            .arg("-t")
            .arg(pid.to_string())
            .args(args)
            .output()
            .expect("nsenter");
        assert!(
            o.status.success(),
            "nsenter {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    // The kernel's view of the service's `/`: the instance's root, none of the node's.
    let root = std::fs::read_dir(format!("/proc/{pid}/root")).unwrap();
    let mut names: Vec<String> = root
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert!(
        !names
            .iter()
            .any(|n| n == "work" || n == "root" || n == "var"),
        "the service sees the node's files: {names:?}"
    );
    assert!(
        names.iter().any(|n| n == "etc") && names.iter().any(|n| n == "usr"),
        "{names:?}"
    );
    let uts = inside(&["-u", "hostname"]);
    assert_eq!(uts.trim(), hostname, "the service's host name");
    for ns in ["mnt", "uts", "pid"] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap(),
            "the service shares the node's {ns} namespace"
        );
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}/root/work")).exists(),
        "the node's /work is visible to the service"
    );
}

#[test]
fn instances_deployed_by_agents_answer_at_their_pre_assigned_addresses() {
    let bed = bed("nodes-deploy", 6, &[]);
    web_tier(&bed, 8, serde_json::json!({"deploy-timeout-secs": 60}));

    // The agents register their nodes themselves.
    wait_for_nodes(&bed, 6);
    let node = &bed.mint(&["node", "list"])[0];
    assert!(
        node["properties"]["agent-url"]
            .as_str()
            .unwrap()
            .starts_with("https://198.18.1."),
        "{node}"
    );
    assert!(
        node["properties"]["agent-pin"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{node}"
    );

    bed.mint(&["tier", "scale", "web", "3"]);
    let inst = bed.wait_for("three running instances", Duration::from_secs(60), || {
        let inst = bed.mint(&["instance", "list", "web"]);
        (inst
            .as_array()?
            .iter()
            .filter(|i| i["state"] == "deployed")
            .count()
            == 3)
            .then_some(inst)
    });
    for i in inst
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "deployed")
    {
        let address = i["address"].as_str().unwrap();
        let answer = bed.wait_for("the instance to answer", Duration::from_secs(10), || {
            get(&format!("http://{address}/"))
        });
        assert_eq!(
            answer,
            format!("{} {address}\n", i["hostname"].as_str().unwrap()),
            "the instance answers with its own identity"
        );
        confined(i["hostname"].as_str().unwrap());
    }

    // The service of one instance dies on a healthy node: the health check sees it, the
    // node is failed and the instance answers again, from a free node, at its address.
    let sick = inst
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["state"] == "deployed")
        .unwrap()
        .clone();
    let (address, node) = (
        sick["address"].as_str().unwrap().to_string(),
        sick["node"].as_str().unwrap().to_string(),
    );
    let n: usize = node.trim_start_matches("node-").parse().unwrap();
    let agent_pid = bed.agents[n].id().to_string();
    let pids = Command::new("ip")
        .args(["netns", "pids", &bed.namespaces[n]])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter(|p| *p != agent_pid)
    {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    let index = sick["id"]["index"].as_u64().unwrap() as usize;
    bed.wait_for(
        "the instance redeployed after its health check failed",
        Duration::from_secs(60),
        || {
            let now = &bed.mint(&["instance", "list", "web"])[index];
            (now["state"] == "deployed" && now["node"] != node.as_str()).then_some(())
        },
    );
    let answer = bed.wait_for(
        "the instance to answer again",
        Duration::from_secs(10),
        || get(&format!("http://{address}/")),
    );
    assert_eq!(
        answer,
        format!("{} {address}\n", sick["hostname"].as_str().unwrap())
    );
    let events = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["events", "--tier", "web"])
        .envs(bed.cli_env())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("health check"),
        "the event says why"
    );
    let inst = bed.mint(&["instance", "list", "web"]);

    // Scaling in stops the service and releases the address on the node.
    bed.mint(&["tier", "scale", "web", "2"]);
    let gone = inst
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "deployed")
        .map(|i| i["address"].as_str().unwrap().to_string())
        .max_by_key(|a| a.rsplit('.').next().unwrap().parse::<u32>().unwrap())
        .unwrap();
    bed.wait_for(
        "the removed instance to stop answering",
        Duration::from_secs(10),
        || get(&format!("http://{gone}/")).is_none().then_some(()),
    );
    let events = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["events", "--tier", "web"])
        .envs(bed.cli_env())
        .output()
        .unwrap();
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("deployed") && events.contains("released"),
        "{events}"
    );
}

#[test]
fn a_failed_nodes_instance_comes_back_elsewhere_with_its_address_and_the_old_node_is_fenced() {
    let mut bed = bed("nodes-failure", 4, &["--node-timeout-secs", "2"]);
    web_tier(&bed, 4, serde_json::json!({"deploy-timeout-secs": 60}));
    wait_for_nodes(&bed, 4);
    bed.mint(&["tier", "scale", "web", "2"]);
    let running = |bed: &TestBed| -> Option<serde_json::Value> {
        let inst = bed.mint(&["instance", "list", "web"]);
        (inst
            .as_array()?
            .iter()
            .filter(|i| i["state"] == "deployed")
            .count()
            == 2)
            .then_some(inst)
    };
    let before = bed.wait_for("two running instances", Duration::from_secs(60), || {
        running(&bed)
    });
    let address = before[0]["address"].as_str().unwrap().to_string();
    let old_node = before[0]["node"].as_str().unwrap().to_string();
    let i: usize = old_node.trim_start_matches("node-").parse().unwrap();
    let ns = bed.namespaces[i].clone();
    bed.wait_for("web-000 to answer", Duration::from_secs(10), || {
        get(&format!("http://{address}/"))
    });

    // The node dies: its network goes and its agent with it. Its instance's service is
    // still there, unreachable, as on a machine that lost its link.
    sh(&["ip", "-n", &ns, "link", "set", "eth0", "down"]);
    let _ = bed.agents[i].kill();
    let _ = bed.agents[i].wait();

    let after = bed.wait_for(
        "web-000 back on another node",
        Duration::from_secs(60),
        || {
            let inst = bed.mint(&["instance", "list", "web"]);
            let i0 = &inst[0];
            (i0["state"] == "deployed" && i0["node"] != old_node.as_str()).then(|| inst.clone())
        },
    );
    assert_eq!(
        (after[0]["address"].as_str(), after[0]["hostname"].as_str()),
        (Some(address.as_str()), Some("web-000")),
        "same identity"
    );
    let answer = bed.wait_for(
        "web-000 to answer from its new node",
        Duration::from_secs(10),
        || get(&format!("http://{address}/")),
    );
    assert_eq!(answer, format!("web-000 {address}\n"));
    let nodes = bed.mint(&["node", "list"]);
    let old = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == old_node.as_str())
        .unwrap();
    assert_eq!(old["state"], "failed");
    let events = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["events"])
        .envs(bed.cli_env())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("no heartbeat from its agent"),
        "the event says why"
    );

    // The old node comes back with its agent, which still runs web-000: it is fenced, and
    // stops the instance and releases the address rather than contend for it.
    assert!(
        addresses_in(&ns).contains(&format!("{address}/24")),
        "the dead node still holds the address"
    );
    sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
    bed.agents[i] = bed.start_agent(i);
    bed.wait_for("the old node to be fenced", Duration::from_secs(20), || {
        (!addresses_in(&ns).contains(&format!("{address}/"))).then_some(())
    });
    let answer = bed.wait_for("web-000 to answer", Duration::from_secs(10), || {
        get(&format!("http://{address}/"))
    });
    assert_eq!(answer, format!("web-000 {address}\n"));
    let inst = bed.mint(&["instance", "list", "web"]);
    assert_eq!(
        inst[0]["node"], after[0]["node"],
        "the engine's record stays with the new node"
    );
}

/// The whole story on six namespace nodes: K = 8 minted, 3 deployed; load rises and the
/// rule grows the tier to 5; a node dies and its instance comes back on the free node with
/// the same address; load falls and the tier shrinks to its minimum.
#[test]
fn a_load_rule_grows_the_tier_a_dead_node_is_replaced_and_the_tier_shrinks() {
    let mut bed = bed("nodes-load", 6, &["--node-timeout-secs", "2"]);
    bed.set_load(500);
    web_tier(
        &bed,
        8,
        serde_json::json!({"autoscale": {"scale-out-above": 700, "scale-in-below": 200, "for-secs": 2, "step": 2, "cooldown-secs": 2, "min": 2, "max": 5}}),
    );
    wait_for_nodes(&bed, 6);
    bed.mint(&["tier", "scale", "web", "3"]);
    let deployed = |bed: &TestBed| -> usize {
        bed.mint(&["instance", "list", "web"])
            .as_array()
            .map(|a| a.iter().filter(|i| i["state"] == "deployed").count())
            .unwrap_or(0)
    };
    bed.wait_for("three running instances", Duration::from_secs(60), || {
        (deployed(&bed) == 3).then_some(())
    });
    // A load between the thresholds changes nothing.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(bed.mint(&["tier", "show", "web"])["tier"]["desired"], 3);

    bed.set_load(900);
    bed.wait_for(
        "the tier to grow to its max of 5",
        Duration::from_secs(60),
        || (deployed(&bed) == 5).then_some(()),
    );
    let events = bed.mint(&["events", "--tier", "web"]);
    let grew = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "autoscaled")
        .expect("an autoscaled event");
    assert!(
        grew["message"].as_str().unwrap().contains("above 700‰"),
        "{grew}"
    );
    assert_eq!(
        (
            grew["detail"]["from"].as_u64(),
            grew["detail"]["to"].as_u64()
        ),
        (Some(3), Some(5)),
        "one step of 2: {grew}"
    );
    assert!(grew["detail"]["average"].as_u64().unwrap() > 700);

    // A node of the tier dies; its instance comes back on the one free node.
    let inst = bed.mint(&["instance", "list", "web"]);
    let victim = inst
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["state"] == "deployed")
        .unwrap()
        .clone();
    let (address, old_node) = (
        victim["address"].as_str().unwrap().to_string(),
        victim["node"].as_str().unwrap().to_string(),
    );
    let i: usize = old_node.trim_start_matches("node-").parse().unwrap();
    sh(&[
        "ip",
        "-n",
        &bed.namespaces[i].clone(),
        "link",
        "set",
        "eth0",
        "down",
    ]);
    let _ = bed.agents[i].kill();
    let _ = bed.agents[i].wait();
    let index = victim["id"]["index"].as_u64().unwrap() as usize;
    bed.wait_for(
        "the instance back on the free node",
        Duration::from_secs(60),
        || {
            let now = &bed.mint(&["instance", "list", "web"])[index];
            (now["state"] == "deployed" && now["node"] != old_node.as_str()).then_some(())
        },
    );
    let answer = bed.wait_for(
        "the instance to answer at its address",
        Duration::from_secs(10),
        || get(&format!("http://{address}/")),
    );
    assert_eq!(
        answer,
        format!("{} {address}\n", victim["hostname"].as_str().unwrap())
    );
    assert_eq!(deployed(&bed), 5, "the tier is whole again");

    bed.set_load(100);
    bed.wait_for(
        "the tier to shrink to its min of 2",
        Duration::from_secs(60),
        || (deployed(&bed) == 2).then_some(()),
    );
    let events = bed.mint(&["events", "--tier", "web"]);
    let shrank: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "autoscaled" && e["detail"]["direction"] == "below")
        .collect();
    assert_eq!(
        shrank
            .iter()
            .map(|e| e["detail"]["to"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 2],
        "5 -> 3 -> 2, never below min"
    );
}

/// A stand-in for a misbehaving agent on 127.0.0.1: every request gets `body` with
/// status 200. It stops serving after two minutes, whatever happens to the test.
fn fake_agent(body: &'static str) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buf = [0u8; 8192];
                    let _ = s.read(&mut buf);
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(reply.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    url
}

/// Agents that cannot be reached, answer garbage, or never finish: each deployment ends in
/// a clear state with an event saying why, and no instance or identity is lost.
#[test]
fn unreachable_garbled_and_never_ready_agents_end_in_clear_states() {
    let dir = scratch("nodes-bad-agents");
    let (mut daemon, url) =
        crate::support::start_daemon_with(&dir.join("data"), &["--node-timeout-secs", "120"]);
    let mint = |args: &[&str]| -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_mint"))
            .args(args)
            .env("MINT_SERVER", &url)
            .current_dir(root())
            .output()
            .unwrap()
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let o = mint(&a);
        assert!(
            o.status.success(),
            "mint {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let image = json(&["image", "import", "tests/fixtures/master-ifupdown"]);
    let never_ready = fake_agent(
        r#"{"state": "deploying", "tier": "slow", "index": 0, "detail": "still booting"}"#,
    );
    let garbage = fake_agent("<html>not an agent</html>");
    for (node, role, agent_url) in [
        ("ghost", "ghost", "http://127.0.0.1:1".to_string()),
        ("slow", "slow", never_ready),
        ("garbled", "garbled", garbage),
    ] {
        let o = mint(&[
            "node",
            "add",
            node,
            "--cpus",
            "2",
            "--memory-mib",
            "1024",
            "--label",
            &format!("role={role}"),
            "--property",
            &format!("agent-url={agent_url}"),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for (i, name) in ["ghost", "slow", "garbled"].into_iter().enumerate() {
        let spec = serde_json::json!({
            "name": name, "image": image["digest"], "max-instances": 2, "subnet": format!("198.18.{}.0/24", 10 + i),
            "hostname": format!("{name}-{{index}}"), "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "agent"},
            "requirements": {"labels": {"role": name}}, "deploy-timeout-secs": 2,
        });
        let file = dir.join(format!("{name}.json"));
        std::fs::write(&file, spec.to_string()).unwrap();
        json(&["tier", "create", "-f", file.to_str().unwrap()]);
        let _ = mint(&["tier", "scale", name, "1"]);
    }
    let node_state = |name: &str| -> String {
        json(&["node", "list"])
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .map(|n| n["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while ["ghost", "slow", "garbled"]
        .iter()
        .any(|n| node_state(n) != "failed")
    {
        assert!(
            Instant::now() < deadline,
            "every bad node ends failed: {}",
            json(&["node", "list"])
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let events = String::from_utf8_lossy(&mint(&["events"]).stdout).into_owned();
    assert!(
        events.contains("node `ghost`") && events.contains("127.0.0.1:1"),
        "the unreachable node is named with its URL: {events}"
    );
    assert!(
        events.contains("did not finish within the tier's deploy timeout of 2 s"),
        "{events}"
    );
    assert!(
        events.contains("node `garbled`: the agent answered 200 with something that is not JSON"),
        "{events}"
    );
    for name in ["ghost", "slow", "garbled"] {
        let inst = json(&["instance", "list", name]);
        assert_eq!(
            inst.as_array().unwrap().len(),
            2,
            "all K instances of {name} are still there"
        );
        assert!(
            inst.as_array().unwrap().iter().all(|i| i["node"].is_null()),
            "none is left on a bad node: {inst}"
        );
    }

    // Nobody but a node's own agent heartbeats for it: not without a credential, not with
    // an operator's token.
    let admin = crate::support::admin_auth(&dir.join("data"));
    let hb = |node: &str, auth: &str, body: &str| {
        ureq::post(&format!("{url}/v1/nodes/{node}/heartbeat"))
            .set("Authorization", auth)
            .set("content-type", "application/json")
            .send_string(body)
    };
    assert!(matches!(
        hb("slow", "", "{}"),
        Err(ureq::Error::Status(401, _))
    ));
    assert!(matches!(
        hb("slow", &admin, "{}"),
        Err(ureq::Error::Status(403, _))
    ));
    // Garbage from an enrolled agent's heartbeat is refused, naming the field, and changes
    // nothing.
    let credential = crate::support::join(&url, &dir.join("data"), "prober");
    let own = format!("Bearer {credential}");
    assert!(
        matches!(hb("slow", &own, "{}"), Err(ureq::Error::Status(403, _))),
        "one node's credential does not speak for another"
    );
    match hb("prober", &own, "{\"load\": 5000}") {
        Err(ureq::Error::Status(400, r)) => {
            assert!(r.into_string().unwrap().contains("field `load`"))
        }
        other => panic!("a load above 1000: {:?}", other.map(|r| r.status())),
    }
    assert!(matches!(
        hb("prober", &own, "garbage"),
        Err(ureq::Error::Status(400, _))
    ));
    assert!(hb("prober", &own, "{\"load\": 10}").is_ok());
    assert_eq!(node_state("slow"), "failed");
    let _ = daemon.kill();
    let _ = daemon.wait();
}

/// Between the agents and the daemon, a stand-in for a tampering proxy: it passes every GET
/// through but announces a wrong digest for every artifact part.
fn tampering_proxy(
    upstream: std::sync::Arc<std::sync::Mutex<Option<(String, ureq::Agent)>>>,
) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            let Ok((s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut reader = BufReader::new(s);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            // The agent's credential passes through, as through any proxy.
            let mut auth = String::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = h.split_once(':')
                    && k.eq_ignore_ascii_case("authorization")
                {
                    auth = v.trim().to_string();
                }
            }
            let Some((base, http)) = upstream.lock().unwrap().clone() else {
                continue;
            };
            let body: Vec<u8> = match http
                .get(&format!("{base}{path}"))
                .set("Authorization", &auth)
                .call()
            {
                Ok(r) => {
                    let mut bytes = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes);
                    // A descriptor, by token or by capability URL.
                    if path.starts_with("/v1/artifacts/")
                        || (path.starts_with("/v1/cap/") && path.matches('/').count() == 5)
                    {
                        let mut v: serde_json::Value =
                            serde_json::from_slice(&bytes).unwrap_or_default();
                        for p in v["parts"].as_array_mut().into_iter().flatten() {
                            p["digest"] = format!("sha256:{}", "0".repeat(64)).into();
                        }
                        bytes = v.to_string().into_bytes();
                    }
                    bytes
                }
                Err(_) => Vec::new(),
            };
            let mut s = reader.into_inner();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body);
        }
    });
    port
}

/// An artifact whose bytes are not the digest announced for them is refused by the agent:
/// nothing is unpacked or brought up, the node ends failed with the reason in the event
/// log, and the instance keeps its identity in the pool.
#[test]
fn an_artifact_with_a_wrong_digest_is_refused_and_nothing_comes_up() {
    let upstream = std::sync::Arc::new(std::sync::Mutex::new(None));
    let port = tampering_proxy(upstream.clone());
    let advertise = format!("http://198.18.0.1:{port}");
    let bed = bed("nodes-digest", 1, &["--advertise-url", &advertise]);
    *upstream.lock().unwrap() = Some((bed.url.clone(), bed.http()));
    web_tier(&bed, 2, serde_json::json!({"hostname": "web-{index}"}));
    wait_for_nodes(&bed, 1);
    // The CLI waits for the deployment and says why it could not finish.
    let o = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["tier", "scale", "web", "1"])
        .envs(bed.cli_env())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("blocked") && err.contains("refusing it"),
        "{err}"
    );
    bed.wait_for("the node to be failed", Duration::from_secs(30), || {
        (bed.mint(&["node", "list"])[0]["state"] == "failed").then_some(())
    });
    let events = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["events", "--tier", "web"])
        .envs(bed.cli_env())
        .output()
        .unwrap();
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("not the sha256:0000") && events.contains("refusing it"),
        "{events}"
    );
    let inst = bed.mint(&["instance", "list", "web"]);
    assert_eq!(
        (inst[0]["state"].as_str(), inst[0]["address"].as_str()),
        (Some("failed"), Some("198.18.2.1")),
        "kept, identity and all"
    );
    assert!(
        !crate::testbed::addresses_in(&bed.namespaces[0]).contains("198.18.2.1"),
        "no address was brought up"
    );
    assert!(get("http://198.18.2.1/").is_none());
}

/// The daemon crashes right after it asked the agents to deploy, while they fetch the
/// artifacts from it: restarted on its state and address, it takes up the deployments where
/// they are (the agents keep trying to reach it meanwhile), and every instance ends running
/// once, on one node, at its address.
#[test]
fn a_daemon_crashing_mid_deploy_resumes_and_deploys_nothing_twice() {
    let mut bed = bed("nodes-restart", 4, &[]);
    web_tier(
        &bed,
        6,
        serde_json::json!({"hostname": "web-{index}", "deploy-timeout-secs": 60}),
    );
    wait_for_nodes(&bed, 4);
    bed.mint(&["tier", "scale", "web", "3"]);
    // At once: the agents are still fetching artifacts from the daemon that dies under them.
    bed.crash_and_restart_daemon(&[]);
    let inst = bed.wait_for(
        "three running instances after the restart",
        Duration::from_secs(60),
        || {
            let inst = bed.mint(&["instance", "list", "web"]);
            (inst
                .as_array()?
                .iter()
                .filter(|i| i["state"] == "deployed")
                .count()
                == 3)
                .then_some(inst)
        },
    );
    // Each agent runs at most one instance, and the three running ones are the three the
    // engine placed: nothing was deployed twice.
    let mut running = Vec::new();
    for i in 0..4 {
        let agent = format!("https://198.18.1.{}:7601", 10 + i);
        let http = bed.agent_http(i);
        // An agent serves TLS only, under the key it reported at registration.
        assert!(
            ureq::get(&format!("http://198.18.1.{}:7601/v1/status", 10 + i))
                .call()
                .is_err()
        );
        assert!(
            bed.http()
                .get(&format!("{agent}/v1/status"))
                .call()
                .is_err(),
            "the agent's certificate is not the daemon's"
        );
        // Only the engine, with its credential for the node, reaches an agent's API.
        assert!(matches!(
            http.get(&format!("{agent}/v1/status")).call(),
            Err(ureq::Error::Status(401, _))
        ));
        let forged = http.post(&format!("{agent}/v1/deploy")).set("Authorization", "Bearer mint_ea_0000").send_json(serde_json::json!({
            "tier": "web", "index": 7, "hostname": "intruder", "artifact-url": format!("{}/v1/artifacts/web/7", bed.url), "version": "x"
        }));
        assert!(
            matches!(forged, Err(ureq::Error::Status(401, _))),
            "a deploy without the engine's credential"
        );
        let status: serde_json::Value = http
            .get(&format!("{agent}/v1/status"))
            .set(
                "Authorization",
                &format!("Bearer {}", bed.engine_credential(i)),
            )
            .call()
            .unwrap()
            .into_json()
            .unwrap();
        if status["state"] == "running" {
            running.push((format!("node-{i}"), status["index"].as_u64().unwrap()));
        }
    }
    running.sort();
    let mut placed: Vec<(String, u64)> = inst
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "deployed")
        .map(|i| {
            (
                i["node"].as_str().unwrap().to_string(),
                i["id"]["index"].as_u64().unwrap(),
            )
        })
        .collect();
    placed.sort();
    assert_eq!(running, placed);
    for i in inst
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "deployed")
    {
        let address = i["address"].as_str().unwrap();
        assert_eq!(
            get(&format!("http://{address}/")).as_deref(),
            Some(format!("{} {address}\n", i["hostname"].as_str().unwrap()).as_str())
        );
    }
}

/// `GET path` on the bed's daemon as its admin, as JSON.
fn admin_get(bed: &TestBed, path: &str) -> serde_json::Value {
    let token = std::fs::read_to_string(bed.token_file()).unwrap();
    bed.http()
        .get(&format!("{}{path}", bed.url))
        .set("Authorization", &format!("Bearer {}", token.trim()))
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

/// What the engine sent of `digest` since it started (body bytes), by `GET /v1/blobs`.
fn bytes_served(bed: &TestBed, digest: &str) -> u64 {
    admin_get(bed, "/v1/blobs")["served"][digest]["bytes"]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn a_node_that_caches_the_master_fetches_only_the_instances_layer() {
    let bed = bed("nodes-cache", 2, &[]);
    web_tier(&bed, 2, serde_json::json!({"deploy-timeout-secs": 60}));
    wait_for_nodes(&bed, 2);
    let deployed = |n: usize| {
        bed.wait_for(&format!("{n} deployed"), Duration::from_secs(60), || {
            let inst = bed.mint(&["instance", "list", "web"]);
            let up: Vec<serde_json::Value> = inst
                .as_array()?
                .iter()
                .filter(|i| i["state"] == "deployed")
                .cloned()
                .collect();
            (up.len() == n).then_some(up)
        })
    };
    bed.mint(&["tier", "scale", "web", "1"]);
    let first = deployed(1).remove(0);
    let artifact = admin_get(&bed, "/v1/artifacts/web/0");
    let (master, master_size) = (
        artifact["parts"][0]["digest"].as_str().unwrap().to_string(),
        artifact["parts"][0]["size"].as_u64().unwrap(),
    );
    let (layer, layer_size) = (
        artifact["parts"][1]["digest"].as_str().unwrap().to_string(),
        artifact["parts"][1]["size"].as_u64().unwrap(),
    );
    assert_eq!(
        bytes_served(&bed, &master),
        master_size,
        "the master went to the node once"
    );
    assert!(
        layer_size < 64 << 10 && master_size > 1 << 20,
        "layer {layer_size} bytes, master {master_size}"
    );

    // The node reports what it caches; the instance leaves and comes back: the policy
    // prefers the node that has the master, which fetches only the layer.
    let node = first["node"].as_str().unwrap().to_string();
    bed.wait_for(
        "the node to report its cache",
        Duration::from_secs(10),
        || {
            let nodes = bed.mint(&["node", "list"]);
            nodes
                .as_array()?
                .iter()
                .find(|n| n["name"] == node.as_str())?["cached"]
                .as_array()?
                .iter()
                .any(|d| d == master.as_str())
                .then_some(())
        },
    );
    bed.mint(&["tier", "scale", "web", "0"]);
    deployed(0);
    bed.mint(&["tier", "scale", "web", "1"]);
    let again = deployed(1).remove(0);
    assert_eq!(
        again["node"],
        node.as_str(),
        "placed where the master is cached"
    );
    assert_eq!(
        bytes_served(&bed, &master),
        master_size,
        "the master was not sent again"
    );
    assert_eq!(
        bytes_served(&bed, &layer),
        2 * layer_size,
        "only the layer was"
    );
    let address = again["address"].as_str().unwrap();
    let answer = bed.wait_for("the instance to answer", Duration::from_secs(10), || {
        get(&format!("http://{address}/"))
    });
    assert_eq!(
        answer,
        format!("{} {address}\n", again["hostname"].as_str().unwrap())
    );
}

#[test]
fn an_http_cache_in_front_of_the_engine_sends_each_master_once() {
    let dir = scratch("nodes-http-cache");
    let ca = crate::testbed::TestCa::new(&dir);
    // The cache's port, chosen before the bed so the daemon starts knowing it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("https://198.18.0.1:{port}");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("data/mint.toml"),
        format!("[artifacts]\nblob-base = \"{base}\"\n"),
    )
    .unwrap();
    let bed = TestBed::with_ca(dir.clone(), root(), 6, &[], &ca);
    let nginx = crate::blob_cache::Nginx::start(
        &dir.join("nginx"),
        &format!("198.18.0.1:{port}"),
        bed.url.trim_start_matches("https://"),
        &ca,
    );
    web_tier(&bed, 6, serde_json::json!({"deploy-timeout-secs": 120}));
    wait_for_nodes(&bed, 6);
    let artifact = admin_get(&bed, "/v1/artifacts/web/0");
    let master = artifact["parts"][0]["digest"].as_str().unwrap().to_string();
    let master_size = artifact["parts"][0]["size"].as_u64().unwrap();
    assert_eq!(
        artifact["parts"][0]["url"].as_str().unwrap(),
        format!("{base}/v1/blobs/{master}"),
        "descriptors send nodes to the cache"
    );

    bed.mint(&["tier", "scale", "web", "6"]);
    let up = bed.wait_for("6 deployed", Duration::from_secs(180), || {
        let inst = bed.mint(&["instance", "list", "web"]);
        let up: Vec<serde_json::Value> = inst
            .as_array()?
            .iter()
            .filter(|i| i["state"] == "deployed")
            .cloned()
            .collect();
        (up.len() == 6).then_some(up)
    });
    for i in &up {
        let address = i["address"].as_str().unwrap();
        let answer = bed.wait_for("the instance to answer", Duration::from_secs(10), || {
            get(&format!("http://{address}/"))
        });
        assert_eq!(
            answer,
            format!("{} {address}\n", i["hostname"].as_str().unwrap())
        );
    }
    let master_path = format!("/v1/blobs/{master}");
    assert_eq!(
        nginx.requests_for(&master),
        6,
        "each node fetched the master from the cache"
    );
    assert_eq!(
        bytes_served(&bed, &master),
        master_size,
        "the engine sent the master once for six nodes"
    );
    for index in 0..6 {
        let layer = &admin_get(&bed, &format!("/v1/artifacts/web/{index}"))["parts"][1];
        assert_eq!(
            bytes_served(&bed, layer["digest"].as_str().unwrap()),
            layer["size"].as_u64().unwrap(),
            "instance {index}'s layer, once"
        );
    }

    // The engine decides who reads through the cache: a node its own parts, nobody else.
    let trust = mint_tls::ClientTrust::new(&mint_tls::Trust::Ca(ca.cert.clone())).unwrap();
    let http = ureq::AgentBuilder::new().tls_config(trust.config()).build();
    let status = |path: &str, auth: Option<&str>, range: Option<&str>| {
        let mut r = http
            .get(&format!("{base}{path}"))
            .timeout(Duration::from_secs(30));
        if let Some(a) = auth {
            r = r.set("Authorization", a);
        }
        if let Some(range) = range {
            r = r.set("Range", range);
        }
        match r.call() {
            Ok(resp) => (
                resp.status(),
                resp.header("X-Cache-Status")
                    .unwrap_or_default()
                    .to_string(),
                resp.into_string().map(|b| b.len()).unwrap_or(0),
            ),
            Err(ureq::Error::Status(code, resp)) => (
                code,
                resp.header("X-Cache-Status")
                    .unwrap_or_default()
                    .to_string(),
                0,
            ),
            Err(e) => panic!("GET {path}: {e}"),
        }
    };
    let node_of = |index: usize| {
        up.iter()
            .find(|i| i["id"]["index"] == index as u64)
            .unwrap()["node"]
            .as_str()
            .unwrap()
            .trim_start_matches("node-")
            .parse::<usize>()
            .unwrap()
    };
    let own = bed.node_auth(node_of(0));
    assert_eq!(status(&master_path, None, None).0, 401, "no credential");
    assert_eq!(
        status(&master_path, Some("Bearer mint_node_forged"), None).0,
        401,
        "a forged credential"
    );
    let (code, cache, len) = status(&master_path, Some(&own), Some("bytes=100-199"));
    assert_eq!(
        (code, cache.as_str(), len),
        (206, "HIT", 100),
        "a node resumes from the cache's copy"
    );
    let other_layer = admin_get(&bed, "/v1/artifacts/web/1")["parts"][1]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        status(&format!("/v1/blobs/{other_layer}"), Some(&own), None).0,
        403,
        "another instance's layer"
    );
    assert_eq!(
        status("/v1/tiers", Some(&own), None).0,
        404,
        "the cache serves blobs only"
    );
    let forged = format!(
        "/v1/cap/web/0/1.4102444800.{}/blob/{master}",
        "0".repeat(64)
    );
    assert_eq!(status(&forged, None, None).0, 403, "a forged capability");
    assert_eq!(bytes_served(&bed, &master), master_size, "still once");
}

#[test]
fn a_roll_fetches_the_new_master_once_per_node_and_the_cache_evicts_the_old_one() {
    // Each node's cache holds one master of this size, not two.
    let one = std::fs::metadata(env!("CARGO_BIN_EXE_mint-agent"))
        .unwrap()
        .len();
    let bound = (one * 3 / 2).to_string();
    let bed = TestBed::with_agent_args(
        scratch("nodes-roll-cache"),
        root(),
        2,
        &[],
        &["--cache-max-bytes", &bound],
    );
    web_tier(&bed, 2, serde_json::json!({"deploy-timeout-secs": 60}));
    wait_for_nodes(&bed, 2);
    let master_of = |index: u32| {
        let part = admin_get(&bed, &format!("/v1/artifacts/web/{index}"))["parts"][0].clone();
        (
            part["digest"].as_str().unwrap().to_string(),
            part["size"].as_u64().unwrap(),
        )
    };
    let deployed_with = |digest: &str| {
        bed.wait_for(
            &format!("both instances deployed with {digest}"),
            Duration::from_secs(120),
            || {
                let inst = bed.mint(&["instance", "list", "web"]);
                let up: Vec<serde_json::Value> = inst
                    .as_array()?
                    .iter()
                    .filter(|i| i["state"] == "deployed")
                    .cloned()
                    .collect();
                (up.len() == 2 && (0..2).all(|i| master_of(i).0 == digest)).then_some(up)
            },
        )
    };
    let (a, a_size) = master_of(0);
    bed.mint(&["tier", "scale", "web", "2"]);
    deployed_with(&a);
    assert_eq!(
        bytes_served(&bed, &a),
        2 * a_size,
        "the first master, once per node"
    );

    // A new master: the same root with one file changed. The roll replaces both instances.
    let root_dir = master(&bed.dir);
    std::fs::write(root_dir.join("etc/motd"), "rolled\n").unwrap();
    let image = bed.mint(&[
        "image",
        "import",
        root_dir.to_str().unwrap(),
        "--name",
        "hello-2",
    ]);
    bed.mint(&[
        "tier",
        "update-image",
        "web",
        image["digest"].as_str().unwrap(),
    ]);
    let (b, b_size) = master_of(0);
    assert_ne!(a, b, "the roll changed the master");
    let up = deployed_with(&b);
    let nodes: std::collections::BTreeSet<String> = up
        .iter()
        .map(|i| i["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        bytes_served(&bed, &b),
        nodes.len() as u64 * b_size,
        "the new master, once per node that runs it"
    );
    for i in &up {
        let address = i["address"].as_str().unwrap();
        let answer = bed.wait_for("the instance to answer", Duration::from_secs(10), || {
            get(&format!("http://{address}/"))
        });
        assert_eq!(
            answer,
            format!("{} {address}\n", i["hostname"].as_str().unwrap())
        );
    }
    // Within its bound, each node keeps the new master and has let the old one go.
    for node in &nodes {
        bed.wait_for(
            &format!("{node} to report only the new master"),
            Duration::from_secs(10),
            || {
                let list = bed.mint(&["node", "list"]);
                let cached = list
                    .as_array()?
                    .iter()
                    .find(|n| n["name"] == node.as_str())?["cached"]
                    .as_array()?
                    .clone();
                (cached.iter().any(|d| d == b.as_str()) && !cached.iter().any(|d| d == a.as_str()))
                    .then_some(())
            },
        );
        let hex = a.trim_start_matches("sha256:");
        assert!(
            !bed.dir.join(format!("{node}/cache/{hex}")).exists()
                && !bed.dir.join(format!("{node}/cache/{hex}.meta")).exists(),
            "{node} still keeps the old master"
        );
    }
}
