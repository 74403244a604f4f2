//! A node-selection policy written in Python (`plugins/python/least-loaded`), built with
//! componentize-py and run by the same host, checks and daemon as a Rust one.

use crate::running::Daemon;
use crate::support::{block_on, python_policy, root, scratch};
use mint_plugins::fixture::Fixture;
use mint_plugins::{Grants, Runtime, RuntimeOptions};
use serde_json::json;
use std::process::Command;

fn fixture() -> mint_plugins::fixture::SelectFixture {
    let text = std::fs::read_to_string(root().join("tests/fixtures/select.json")).unwrap();
    match serde_json::from_str::<Fixture>(&text).unwrap() {
        Fixture::Select(f) => f,
        _ => panic!("select.json is a select fixture"),
    }
}

#[test]
fn the_python_policy_chooses_the_least_loaded_eligible_nodes() {
    let rt = Runtime::new(RuntimeOptions {
        cache_dir: Some(scratch("python-cache")),
        ..Default::default()
    })
    .unwrap();
    let p = rt.load_file(&python_policy(), &Grants::default()).unwrap();
    assert_eq!(p.built_for().to_string(), "0.1.2");
    let named = fixture().request.to_wit();
    block_on(async {
        // b1-2 (2 cpus) and c1-1 (pool gpu) have load 0 but do not qualify; of the rest the
        // lightest come first.
        let c = p.select(&named.request, &named.names, None).await.unwrap();
        let names: Vec<&str> = c
            .value
            .iter()
            .map(|ch| named.names[ch.candidate as usize].as_str())
            .collect();
        assert_eq!(names, ["a1-1", "a2-1", "b1-1"]);
        assert_eq!(c.value[0].reason.as_deref(), Some("load 100"));
        assert_eq!(c.logs[0].message, "least-loaded chose");
        // Too few light nodes: its own refusal, with numbers.
        let e = p
            .select(
                &named.request,
                &named.names,
                Some(&json!({"max-load": 200})),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unsatisfiable")
                && e.contains("1 eligible nodes have load <= 200 (of 3 eligible), 3 needed"),
            "{e}"
        );
        let e = p
            .select(
                &named.request,
                &named.names,
                Some(&json!({"max-load": "low"})),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid input") && e.contains("`max-load`"),
            "{e}"
        );
    });
}

#[test]
fn the_python_policy_installs_as_a_package_and_places_instances() {
    let dir = scratch("python-daemon");
    let wasm = python_policy();
    let package = dir.join("least-loaded.mintpkg");
    let mint = || Command::new(env!("CARGO_BIN_EXE_mint"));
    let o = mint()
        .args(["plugin", "pack", "--manifest"])
        .arg(wasm.with_extension("toml"))
        .arg("--wasm")
        .arg(&wasm)
        .arg("-o")
        .arg(&package)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = |n: &str| dir.join(n);
    let g = Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(key("mint.pub"))
        .arg("-s")
        .arg(key("mint.key"))
        .output()
        .unwrap();
    assert!(g.status.success());
    let s = Command::new("minisign")
        .args(["-S", "-s"])
        .arg(key("mint.key"))
        .arg("-m")
        .arg(&package)
        .output()
        .unwrap();
    assert!(s.status.success());
    let public = std::fs::read_to_string(key("mint.pub"))
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    std::fs::write(
        dir.join("mint.toml"),
        format!("[plugins.trusted-keys]\nmint = [\"{public}\"]\n"),
    )
    .unwrap();
    let d = Daemon::start(
        &dir.join("data"),
        &["--config", dir.join("mint.toml").to_str().unwrap()],
        &root(),
    );
    let run = |args: &[&str]| d.mint(args);
    let info = run(&["plugin", "install", package.to_str().unwrap()]);
    assert_eq!(info["signer"]["vendor"]["vendor"], "mint");
    let master = dir.join("master");
    std::fs::create_dir_all(master.join("etc")).unwrap();
    std::fs::write(master.join("etc/hostname"), "localhost\n").unwrap();
    let image = run(&["image", "import", master.to_str().unwrap()]);
    for (n, cpus) in [("small", "1"), ("big-1", "8"), ("big-2", "8")] {
        run(&["node", "add", n, "--cpus", cpus, "--memory-mib", "4096"]);
    }
    let spec = json!({"name": "py", "image": image["digest"], "max-instances": 4, "subnet": "198.18.30.0/24", "hostname": "py-{index}",
        "customizers": [{"plugin": "hostname"}], "policy": {"plugin": "least-loaded"}, "driver": {"plugin": "noop"},
        "requirements": {"min_cpus": 4}});
    std::fs::write(dir.join("py.json"), spec.to_string()).unwrap();
    run(&[
        "tier",
        "create",
        "-f",
        dir.join("py.json").to_str().unwrap(),
    ]);
    run(&["tier", "scale", "py", "2"]);
    let mut nodes: Vec<String> = run(&["instance", "list", "py"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["node"].as_str().map(str::to_string))
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        ["big-1", "big-2"],
        "the node below min-cpus is never chosen"
    );
    let events = run(&["events", "--tier", "py"]).to_string();
    assert!(
        events.contains("least-loaded") && events.contains("load 0"),
        "{events}"
    );
}
