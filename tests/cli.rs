//! The `mint` binary as a plugin author uses it: `mint plugin run` on fixtures, with the
//! documented exit codes.

use crate::support::*;
use std::process::{Command, Output};

fn mint(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("run mint")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn plugin_run_drives_each_kind_on_fixtures() {
    let o = mint(&[
        "plugin",
        "run",
        "spread",
        "--input",
        "tests/fixtures/select.json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let chosen: Vec<&str> = v["chosen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["node"].as_str().unwrap())
        .collect();
    // Zone a already holds one instance, b1-2 is too small and c1-1 lacks the pool label.
    assert_eq!(chosen, ["b1-1", "a2-1", "a1-1"]);

    let o = mint(&[
        "plugin",
        "run",
        "bundled:network",
        "--input",
        "tests/fixtures/customize.json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let interfaces = v["edits"][0]["contents"].as_str().unwrap();
    assert!(
        interfaces.contains("iface eth0 inet static\n    address 198.18.0.14/24"),
        "{interfaces}"
    );

    let o = mint(&[
        "plugin",
        "run",
        "noop",
        "--input",
        "tests/fixtures/deploy.json",
        "--config",
        "{}",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("\"state\": \"running\""),
        "{}",
        stdout(&o)
    );
}

#[test]
fn plugin_run_loads_from_disk_and_reports_failures_with_exit_codes() {
    let dir = scratch("cli-plugins");
    let wasm = dir.join("panic.wasm");
    std::fs::copy(guest("panic"), &wasm).unwrap();
    std::fs::write(
        dir.join("panic.toml"),
        "name = \"panic\"\nversion = \"0.1.0\"\nkind = \"node-policy\"\nwit = \"0.1.0\"\n",
    )
    .unwrap();
    let o = mint(&[
        "plugin",
        "run",
        wasm.to_str().unwrap(),
        "--input",
        "tests/fixtures/select.json",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("deliberate panic while choosing 3 nodes"),
        "{}",
        stderr(&o)
    );

    // A manifest with a misspelt field: a load failure naming the field.
    std::fs::write(
        dir.join("panic.toml"),
        "name = \"panic\"\nversoin = \"0.1.0\"\nkind = \"node-policy\"\nwit = \"0.1.0\"\n",
    )
    .unwrap();
    let o = mint(&[
        "plugin",
        "run",
        wasm.to_str().unwrap(),
        "--input",
        "tests/fixtures/select.json",
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("versoin"), "{}", stderr(&o));

    // Bad usage: an unknown plugin, an unreadable fixture, a bad grant.
    let o = mint(&[
        "plugin",
        "run",
        "nosuch",
        "--input",
        "tests/fixtures/select.json",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("bundled: spread, binpack, hostname, network, hosts, ssh-keys, files, cloud-init, noop, agent, redfish"), "{}", stderr(&o));
    let o = mint(&[
        "plugin",
        "run",
        "spread",
        "--input",
        "tests/fixtures/nope.json",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let o = mint(&[
        "plugin",
        "run",
        "noop",
        "--input",
        "tests/fixtures/deploy.json",
        "--allow-host",
        "127.0.0.1",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("needs a scheme"), "{}", stderr(&o));
}

#[test]
fn plugin_list_and_inspect() {
    let data = crate::support::scratch("cli-plugin-list");
    let (mut daemon, url) = crate::support::start_daemon(&data);
    let o = mint(&["--server", &url, "plugin", "list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in [
        "spread", "binpack", "hostname", "network", "noop", "agent", "redfish",
    ] {
        assert!(stdout(&o).contains(name), "{}", stdout(&o));
    }
    let o = mint(&["--server", &url, "plugin", "inspect", "spread"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["world"], "mint:plugin/node-policy-plugin");
    assert_eq!(v["wit"], "mint:plugin@0.1.2");
    assert_eq!(v["signer"], "bundled");
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
    let o = mint(&["--server", &url, "plugin", "inspect", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no plugin named `nosuch`")
            && stderr(&o).contains("mint plugin install"),
        "{}",
        stderr(&o)
    );
    let _ = daemon.kill();
    let _ = daemon.wait();
    // A local file is inspected without a daemon, for authors.
    let dir = crate::support::scratch("cli-plugin-inspect-file");
    std::fs::copy(crate::support::guest("panic"), dir.join("panic.wasm")).unwrap();
    std::fs::write(
        dir.join("panic.toml"),
        "name = \"panic\"\nversion = \"0.1.0\"\nkind = \"node-policy\"\nwit = \"0.1.0\"\n",
    )
    .unwrap();
    let o = mint(&[
        "plugin",
        "inspect",
        dir.join("panic.wasm").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        v["wit"], "mint:plugin@0.1.2",
        "read from the component, not the manifest"
    );
}
