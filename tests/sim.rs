//! The scale harness speaks the protocols it stands for: simulated agents enroll, register
//! and take deployments from a real daemon through the `agent` driver, and simulated BMCs
//! are powered on through the `redfish` driver.

use crate::running::Daemon;
use crate::support::{root, scratch};
use serde_json::json;
use std::time::Duration;

#[test]
fn simulated_agents_and_bmcs_take_real_deployments() {
    let dir = scratch("sim");
    std::fs::write(
        dir.join("creds.toml"),
        "[[credential]]\nusername = \"admin\"\npassword = \"sim\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("mint.toml"),
        "[credentials]\nfile = \"creds.toml\"\n",
    )
    .unwrap();
    let d = Daemon::start(
        &dir.join("data"),
        &["--config", dir.join("mint.toml").to_str().unwrap()],
        &root(),
    );
    let token = std::fs::read_to_string(d.data.join("admin.token")).unwrap();
    let engine = mint_sim::agents::Engine {
        url: d.url.clone(),
        admin_token: token.trim().into(),
        trust: None,
    };
    let options = mint_sim::agents::Options {
        deploy: Duration::from_millis(300),
        heartbeat: Duration::from_millis(500),
        dir: dir.join("sim"),
        ..Default::default()
    };
    let agents = mint_sim::agents::Agents::start(&engine, 12, options).unwrap();
    let nodes = d.mint(&["node", "list"]);
    assert_eq!(nodes.as_array().unwrap().len(), 12);
    assert!(
        nodes[0]["properties"]["agent-pin"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{}",
        nodes[0]
    );

    let image = d.mint(&["image", "import", "tests/fixtures/master-ifupdown"]);
    let spec = json!({"name": "web", "image": image["digest"], "max-instances": 12, "subnet": "198.18.40.0/24",
        "hostname": "web-{index}", "driver": {"plugin": "agent"}, "requirements": {"labels": {"zone": "z1"}}});
    std::fs::write(dir.join("web.json"), spec.to_string()).unwrap();
    d.mint(&[
        "tier",
        "create",
        "-f",
        dir.join("web.json").to_str().unwrap(),
    ]);
    // Zones z0..z9 round-robin: nodes 1 and 11 are in z1.
    let out = d.mint(&["tier", "scale", "web", "2"]);
    assert_eq!(out["status"]["counts"]["deployed"], 2, "{out}");
    // A third finds no node in z1: blocked, saying what it needs.
    let o = d.run(&["tier", "scale", "web", "3"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("1 needs a free node with zone=z1"), "{err}");
    assert!(
        agents.beats.0.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the agents heartbeat"
    );

    let bmcs = mint_sim::bmc::Bmcs::start(
        3,
        mint_sim::bmc::Options {
            power_on: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .unwrap();
    crate::running::tiny_iso(&dir.join("live.iso"));
    let image = d.mint(&["image", "import", dir.join("live.iso").to_str().unwrap()]);
    let spec = json!({"name": "bm", "image": image["digest"], "max-instances": 3, "subnet": "198.18.41.0/24",
        "hostname": "bm-{index}", "customizers": [{"plugin": "hostname"}], "driver": {"plugin": "redfish"}, "requirements": {"labels": {"role": "bm"}}});
    std::fs::write(dir.join("bm.json"), spec.to_string()).unwrap();
    d.mint(&[
        "tier",
        "create",
        "-f",
        dir.join("bm.json").to_str().unwrap(),
    ]);
    for (i, u) in bmcs.urls.iter().enumerate() {
        d.mint(&[
            "node",
            "add",
            &format!("bm{i}"),
            "--cpus",
            "8",
            "--memory-mib",
            "8192",
            "--label",
            "role=bm",
            "--property",
            &format!("bmc-url={u}"),
        ]);
    }
    assert_eq!(bmcs.powered_on(), 0);
    d.mint(&["tier", "scale", "bm", "3"]);
    assert_eq!(bmcs.powered_on(), 3);
    d.mint(&["tier", "scale", "bm", "0"]);
    assert_eq!(bmcs.powered_on(), 0, "undeploy powers the systems off");
}
