//! Plugin packages through the daemon: signed with Debian's `minisign` as a vendor would,
//! trusted per vendor in the daemon's configuration, installed, inspected, replaced while a
//! call runs, removed; and every way a package can be wrong, each refused with nothing
//! changed. Also the WIT compatibility rule on real components.

use crate::running::Daemon;
use crate::support::{guest, load_guest, root, runtime, scratch};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn start(data: &Path, config: &Path) -> Daemon {
    Daemon::start(data, &["--config", config.to_str().unwrap()], &root())
}

fn installed(d: &Daemon) -> Vec<Value> {
    d.mint(&["plugin", "list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["source"] == "installed")
        .cloned()
        .collect()
}

fn sh(cmd: &mut Command) -> Output {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A minisign key pair without a password: (public key line, secret key file).
fn keypair(dir: &Path, name: &str) -> (String, PathBuf) {
    let (public, secret) = (
        dir.join(format!("{name}.pub")),
        dir.join(format!("{name}.key")),
    );
    sh(Command::new("minisign")
        .args(["-G", "-W", "-p"])
        .arg(&public)
        .arg("-s")
        .arg(&secret));
    let text = std::fs::read_to_string(&public).unwrap();
    (text.lines().nth(1).unwrap().trim().to_string(), secret)
}

/// The key ID minisign prints in a public key file's comment.
fn key_id(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join(format!("{name}.pub"))).unwrap();
    text.lines()
        .next()
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string()
}

/// Packs guest `wasm` with a manifest into `out` through `mint plugin pack`.
fn pack(dir: &Path, out: &str, wasm: &Path, manifest: &str) -> PathBuf {
    let m = dir.join(format!("{out}.toml"));
    std::fs::write(&m, manifest).unwrap();
    let package = dir.join(out);
    sh(Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["plugin", "pack", "--manifest"])
        .arg(&m)
        .arg("--wasm")
        .arg(wasm)
        .arg("-o")
        .arg(&package));
    package
}

fn sign(package: &Path, secret: &Path) {
    sh(Command::new("minisign")
        .args(["-S", "-s"])
        .arg(secret)
        .arg("-m")
        .arg(package));
}

fn picker(version: &str, pick: &str, busy_ms: u64, vendor: &str) -> String {
    format!(
        "name = \"picker\"\nversion = \"{version}\"\nkind = \"node-policy\"\nwit = \"mint:plugin@0.1.2\"\nvendor = \"{vendor}\"\ndescription = \"picks the {pick} nodes\"\n[capabilities]\ntimeout-ms = 20000\n[config]\npick = \"{pick}\"\nbusy-ms = {busy_ms}\n"
    )
}

fn config(dir: &Path, acme_key: &str, extra: &str) -> PathBuf {
    let path = dir.join("mint.toml");
    std::fs::write(
        &path,
        format!("[plugins.trusted-keys]\nacme = [\"{acme_key}\"]\n{extra}"),
    )
    .unwrap();
    path
}

/// A tree master and a tier `t` of 3 instances using `policy`.
fn tier(d: &Daemon, dir: &Path, policy: &str) {
    let master = dir.join("master");
    std::fs::create_dir_all(master.join("etc")).unwrap();
    std::fs::write(master.join("etc/hostname"), "localhost\n").unwrap();
    let image = d.mint(&["image", "import", master.to_str().unwrap()]);
    let spec = json!({"name": "t", "image": image["digest"], "max-instances": 3, "subnet": "198.18.20.0/24", "hostname": "t-{index}",
        "policy": {"plugin": policy}, "driver": {"plugin": "noop"}, "customizers": [{"plugin": "hostname"}]});
    std::fs::write(dir.join("t.json"), spec.to_string()).unwrap();
    d.mint(&["tier", "create", "-f", dir.join("t.json").to_str().unwrap()]);
}

#[test]
fn signed_packages_install_and_bad_ones_change_nothing() {
    let dir = scratch("packages-install");
    let (acme, acme_secret) = keypair(&dir, "acme");
    let (_, rogue_secret) = keypair(&dir, "rogue");
    let d = start(&dir.join("data"), &config(&dir, &acme, ""));
    let wasm = guest("versioned");

    let v1 = pack(
        &dir,
        "picker-1.mintpkg",
        &wasm,
        &picker("1.0.0", "first", 0, "acme"),
    );
    sign(&v1, &acme_secret);
    let info = d.mint(&["plugin", "install", v1.to_str().unwrap()]);
    assert_eq!(
        (info["name"].as_str(), info["version"].as_str()),
        (Some("picker"), Some("1.0.0"))
    );
    let shown = d.mint(&["plugin", "inspect", "picker"]);
    assert_eq!(shown["world"], "mint:plugin/node-policy-plugin");
    assert_eq!(shown["wit"], "mint:plugin@0.1.2");
    assert_eq!(shown["signer"]["vendor"]["vendor"], "acme");
    assert_eq!(
        shown["signer"]["vendor"]["key-id"],
        key_id(&dir, "acme"),
        "the key ID minisign printed"
    );
    assert!(
        shown["signer"]["vendor"]["comment"]
            .as_str()
            .unwrap()
            .contains("picker-1.mintpkg"),
        "{shown}"
    );
    assert_eq!(shown["capabilities"]["memory-mib"], 64);
    assert_eq!(shown["config"]["pick"], "first");
    let before = installed(&d);
    let events_before = d.mint(&["events"]).as_array().unwrap().len();

    // Each bad package is refused with a message naming the problem and the fix.
    let v2 = pack(
        &dir,
        "picker-2.mintpkg",
        &wasm,
        &picker("2.0.0", "last", 0, "acme"),
    );
    let cases: Vec<(Vec<String>, String)> = {
        // Unsigned.
        let unsigned = vec!["--unsigned".to_string()];
        // v2's bytes with v1's signature: the signature does not match the bytes.
        std::fs::copy(
            format!("{}.minisig", v1.display()),
            format!("{}.minisig", v2.display()),
        )
        .unwrap();
        // Signed by a key the operator does not trust.
        let rogue = pack(
            &dir,
            "picker-rogue.mintpkg",
            &wasm,
            &picker("3.0.0", "last", 0, "acme"),
        );
        sign(&rogue, &rogue_secret);
        // Signed by acme but claiming another vendor.
        let other = pack(
            &dir,
            "picker-other.mintpkg",
            &wasm,
            &picker("4.0.0", "last", 0, "globex"),
        );
        sign(&other, &acme_secret);
        // A driver that asks for a host the operator did not grant.
        let driver = pack(
            &dir,
            "reacher.mintpkg",
            &guest("http-driver"),
            "name = \"reacher\"\nversion = \"1.0.0\"\nkind = \"driver\"\nwit = \"0.1.1\"\n[capabilities]\nallowed-outbound-hosts = [\"http://198.18.9.9:8080\"]\n",
        );
        sign(&driver, &acme_secret);
        // A bundled plugin's name.
        let spread = pack(
            &dir,
            "spread.mintpkg",
            &wasm,
            &picker("9.0.0", "last", 0, "acme").replace("\"picker\"", "\"spread\""),
        );
        sign(&spread, &acme_secret);
        // Bytes that are not a package at all, signed.
        let junk = dir.join("junk.mintpkg");
        std::fs::write(&junk, b"this is not a tar").unwrap();
        sign(&junk, &acme_secret);
        let s = |p: &Path| p.to_str().unwrap().to_string();
        vec![
            ([vec![s(&v2)], unsigned].concat(), "the package is not signed".into()),
            (vec![s(&v2)], "does not match the package's bytes".into()),
            (vec![s(&rogue)], format!("signed with key {}, which is not among the trusted keys", key_id(&dir, "rogue"))),
            (vec![s(&other)], "says `vendor = \"globex\"` but the package is signed with a key of vendor `acme`".into()),
            (vec![s(&driver)], "requests outbound access to http://198.18.9.9:8080, which the operator has not granted".into()),
            (vec![s(&spread)], "is the name of a plugin built into mint".into()),
            (vec![s(&junk)], "not a mint plugin package".into()),
        ]
    };
    for (args, needle) in &cases {
        let mut full = vec!["plugin", "install"];
        full.extend(args.iter().map(String::as_str));
        let e = d.refused(&full);
        assert!(
            e.contains(needle.as_str()),
            "{args:?}: `{needle}` not in {e}"
        );
        assert_eq!(
            installed(&d).len(),
            before.len(),
            "nothing installed by {args:?}"
        );
        assert_eq!(
            d.mint(&["plugin", "inspect", "picker"])["version"],
            "1.0.0",
            "v1 still current after {args:?}"
        );
    }
    assert!(
        d.refused(&[
            "plugin",
            "install",
            &format!("{}", dir.join("reacher.mintpkg").display())
        ])
        .contains("[plugins.grants]")
    );
    // A bare component is not a package: the CLI says how to make one.
    let o = d.run(&["plugin", "install", wasm.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mint plugin pack"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        d.mint(&["events"]).as_array().unwrap().len(),
        events_before,
        "refusals record nothing"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("data/plugins"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("picker")],
        "no staging left behind"
    );

    // In use by a tier: not removable; after the tier goes, removed.
    tier(&d, &dir, "picker");
    assert!(
        d.refused(&["plugin", "remove", "picker"])
            .contains("tier `t` uses plugin `picker`")
    );
    // The installed plugin survives a restart, verified again against the trust; what an
    // install cut short by a crash left behind is cleared.
    drop(d);
    std::fs::create_dir_all(dir.join("data/plugins/.staging-picker-1/x")).unwrap();
    let d = start(&dir.join("data"), &config(&dir, &acme, ""));
    assert_eq!(d.mint(&["plugin", "inspect", "picker"])["version"], "1.0.0");
    assert!(!dir.join("data/plugins/.staging-picker-1").exists());
    // A daemon that no longer trusts the vendor's key refuses to load it.
    drop(d);
    let (other_key, _) = keypair(&dir, "other");
    let d = start(&dir.join("data"), &config(&dir, &other_key, ""));
    let e = d.refused(&["plugin", "inspect", "picker"]);
    assert!(e.contains("not among the trusted keys"), "{e}");
    drop(d);
    let d = start(&dir.join("data"), &config(&dir, &acme, ""));
    d.mint(&["tier", "delete", "t"]);
    d.mint(&["plugin", "remove", "picker"]);
    assert!(installed(&d).is_empty());
    assert!(
        d.refused(&["plugin", "inspect", "picker"])
            .contains("no plugin named `picker`")
    );
    assert!(
        d.refused(&["plugin", "remove", "spread"])
            .contains("built into mint")
    );

    // With the grant, the driver installs.
    drop(d);
    let d = start(
        &dir.join("data"),
        &config(
            &dir,
            &acme,
            "[plugins.grants]\nreacher = [\"http://198.18.9.9:8080\"]\n",
        ),
    );
    d.mint(&[
        "plugin",
        "install",
        dir.join("reacher.mintpkg").to_str().unwrap(),
    ]);
    assert_eq!(
        d.mint(&["plugin", "inspect", "reacher"])["capabilities"]["allowed-outbound-hosts"],
        json!(["http://198.18.9.9:8080"])
    );
}

#[test]
fn replacing_a_plugin_lets_calls_in_flight_finish_on_the_old_version() {
    let dir = scratch("packages-replace");
    let (acme, secret) = keypair(&dir, "acme");
    let d = start(&dir.join("data"), &config(&dir, &acme, ""));
    let wasm = guest("versioned");
    // v1 works for a while (BUSY_MS) and picks the first node; v2 answers at once and picks the last.
    // (An install syncs files to disk, which can take a second on a busy machine.)
    // v1 works long enough that an install on a loaded machine (it compiles v2 and syncs
    // files) still finishes well before it.
    const BUSY_MS: u64 = 9000;
    let v1 = pack(
        &dir,
        "v1.mintpkg",
        &wasm,
        &picker("1.0.0", "first", BUSY_MS, "acme"),
    );
    let v2 = pack(
        &dir,
        "v2.mintpkg",
        &wasm,
        &picker("2.0.0", "last", 0, "acme"),
    );
    sign(&v1, &secret);
    sign(&v2, &secret);
    d.mint(&["plugin", "install", v1.to_str().unwrap()]);
    for n in ["a", "b", "c"] {
        d.mint(&["node", "add", n, "--cpus", "2", "--memory-mib", "1024"]);
    }
    tier(&d, &dir, "picker");

    let (url, root) = (d.url.clone(), root());
    let scale = std::thread::spawn(move || {
        Command::new(env!("CARGO_BIN_EXE_mint"))
            .args(["--json", "tier", "scale", "t", "1"])
            .env("MINT_SERVER", url)
            .current_dir(root)
            .output()
            .unwrap()
    });
    // Replace v1 while its select is running: the request is recorded before its pass
    // starts, and v1 then works for BUSY_MS.
    // Watched over HTTP directly: a CLI process per poll is slow to start on a loaded
    // machine, and a late look would miss the window.
    let auth = crate::support::admin_auth(&dir.join("data"));
    d.wait_for("the scale request", Duration::from_secs(20), || {
        let events: serde_json::Value = ureq::get(&format!("{}/v1/events?tier=t", d.url))
            .set("Authorization", &auth)
            .call()
            .ok()?
            .into_json()
            .ok()?;
        events
            .as_array()?
            .iter()
            .any(|e| e["kind"] == "scale-requested")
            .then_some(())
    });
    let started = Instant::now();
    d.mint(&["plugin", "install", v2.to_str().unwrap()]);
    if scale.is_finished() {
        let o = scale.join().unwrap();
        panic!(
            "the install returned after {:?}, when v1's call was no longer in flight: {} {}",
            started.elapsed(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let installed_in = started.elapsed();
    let o = scale.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let on = |index: usize| d.mint(&["instance", "list", "t"])[index]["node"].clone();
    assert_eq!(
        on(0),
        "a",
        "the call in flight finished on v1, which picks the first node"
    );
    assert_eq!(d.mint(&["plugin", "inspect", "picker"])["version"], "2.0.0");
    // The next call runs v2.
    d.mint(&["tier", "scale", "t", "2"]);
    assert_eq!(on(1), "c", "v2 picks the last node");
    let events = d.mint(&["events"]).to_string();
    assert!(
        events.contains("pick first") && events.contains("pick last"),
        "{events}"
    );
    assert!(
        events.contains("plugin `picker` 2.0.0 (node-policy) installed, signed by acme"),
        "{events}"
    );
    assert!(
        installed_in < Duration::from_millis(BUSY_MS),
        "installing did not wait for the call: {installed_in:?}"
    );
}

#[test]
fn plugins_built_for_an_older_compatible_wit_still_load() {
    let rt = runtime();
    // Built against the frozen mint:plugin@0.1.0 WIT; this engine speaks 0.1.2.
    let p = load_guest(&rt, "compat-0-1-0", "node-policy", "").unwrap();
    assert_eq!(p.built_for().to_string(), "0.1.0");
    let mut b = mint_plugins::fixture::SelectionBuilder::default();
    for n in ["a", "b"] {
        b.candidate(n, 2, 1024, "x86_64", &Default::default(), 0);
    }
    let named = b.finish("t", 1, &Default::default());
    let called = crate::support::block_on(p.select(&named.request, &named.names, None)).unwrap();
    assert_eq!(called.value.len(), 1);
    assert_eq!(called.logs[0].message, "built for mint:plugin@0.1.0");
    // A manifest that claims an incompatible version is refused, naming both.
    let e = load_guest(&rt, "versioned", "node-policy", "")
        .map(|_| ())
        .and_then(|_| {
            let m = mint_plugins::Manifest::parse(
                "m",
                "name = \"v\"\nversion = \"1\"\nkind = \"node-policy\"\nwit = \"0.2.0\"\n",
            )
            .unwrap();
            rt.load(
                m,
                &std::fs::read(guest("versioned")).unwrap(),
                "v",
                &Default::default(),
            )
            .map(|_| ())
        });
    let e = e.unwrap_err().to_string();
    assert!(
        e.contains("mint:plugin@0.2.0") && e.contains("mint:plugin@0.1.2"),
        "{e}"
    );
}
