//! The whole sequence through the `mint` CLI against a real daemon process: import a
//! master, create a tier (all K minted), add nodes, deploy, scale out and in, read the
//! event log; then restart the daemon and find everything acknowledged still there.

use crate::support::{root, scratch, start_daemon};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// A daemon process on an ephemeral loopback port, stopped when dropped.
struct Daemon {
    child: Child,
    url: String,
}

impl Daemon {
    fn start(data: &Path) -> Daemon {
        let (child, url) = start_daemon(data);
        Daemon { child, url }
    }

    fn mint(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_mint"))
            .args(args)
            .env("MINT_SERVER", &self.url)
            .current_dir(root())
            .output()
            .unwrap()
    }

    /// Runs a CLI command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.mint(args);
        assert!(
            o.status.success(),
            "mint {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Stops the daemon with SIGTERM and waits (bounded) for a graceful exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(
                    status.success(),
                    "the daemon exits cleanly on SIGTERM: {status}"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the daemon did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_whole_sequence_through_the_cli_survives_a_restart() {
    let dir = scratch("daemon-e2e");
    let data = dir.join("data");
    let d = Daemon::start(&data);

    let image = d.json(&[
        "image",
        "import",
        "tests/fixtures/master-ifupdown",
        "--name",
        "debian",
    ]);
    let digest = image["digest"].as_str().unwrap().to_string();
    // The fixture names its master `debian`; the tier records the digest that name had.
    d.ok(&["tier", "create", "-f", "tests/fixtures/web-tier.toml"]);
    assert_eq!(
        d.json(&["tier", "show", "web"])["tier"]["image"],
        digest.as_str()
    );

    // All K instances exist with their identities before any node is known.
    let inst = d.json(&["instance", "list", "web"]);
    assert_eq!(inst.as_array().unwrap().len(), 8);
    assert!(
        inst.as_array()
            .unwrap()
            .iter()
            .all(|i| i["state"] == "pooled")
    );
    assert_eq!(inst[2]["hostname"], "web-002");
    assert_eq!(inst[2]["address"], "198.18.0.4");

    for (n, zone) in [
        ("a1", "a"),
        ("a2", "a"),
        ("b1", "b"),
        ("b2", "b"),
        ("c1", "c"),
        ("c2", "c"),
    ] {
        d.ok(&[
            "node",
            "add",
            &format!("node-{n}"),
            "--cpus",
            "4",
            "--memory-mib",
            "8192",
            "--label",
            &format!("zone={zone}"),
        ]);
    }
    let out = d.ok(&["tier", "scale", "web", "3"]);
    assert!(out.contains("deployed [web/0 web/1 web/2]"), "{out}");
    let out = d.ok(&["tier", "scale", "web", "5"]);
    assert!(out.contains("deployed [web/3 web/4]"), "{out}");
    let out = d.ok(&["tier", "scale", "web", "4"]);
    assert!(out.contains("undeployed [web/4]"), "{out}");

    // Bad requests: clear errors, documented exit codes, nothing changed.
    let o = d.mint(&["tier", "scale", "web", "9"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("its max-instances (K) is 8"));
    let o = d.mint(&["tier", "scale", "web", "-1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("field `instances`"));
    let o = d.mint(&["node", "add", "node-a1", "--cpus", "4", "--memory-mib", "1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("a node named `node-a1` exists"));
    let o = d.mint(&["tier", "show", "nosuch"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no tier named `nosuch`"));

    let events = d.ok(&["events", "--tier", "web"]);
    assert!(
        events.contains("scale-requested") && events.contains("bound") && events.contains("zone="),
        "{events}"
    );

    let before = d.json(&["instance", "list", "web"]);
    d.stop();

    let d = Daemon::start(&data);
    assert_eq!(
        d.json(&["instance", "list", "web"]),
        before,
        "nothing acknowledged is lost across a restart"
    );
    let tiers = d.json(&["tier", "list"]);
    assert_eq!(tiers[0]["deployed"], 4);
    // Scaling out again reuses the pooled instance 4 with its identity.
    d.ok(&["tier", "scale", "web", "5"]);
    let after = d.json(&["instance", "list", "web"]);
    assert_eq!(after[4]["state"], "deployed");
    assert_eq!(after[4]["address"], before[4]["address"]);

    // An operator declares the node of web/0 failed: the instance comes back on the one
    // free node with its address and name; the failed node is repaired, set aside for
    // maintenance, and returned.
    let failed = after[0]["node"].as_str().unwrap().to_string();
    let o = d.mint(&["node", "state", &failed, "maintenance"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "a node holding an instance cannot go to maintenance"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("holding web/0"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        d.mint(&["node", "state", &failed, "in-service"])
            .status
            .code(),
        Some(2)
    );
    d.ok(&[
        "node",
        "state",
        &failed,
        "failed",
        "--reason",
        "disk errors",
    ]);
    d.ok(&["tier", "scale", "web", "5"]);
    let moved = d.json(&["instance", "list", "web"]);
    assert_eq!(moved[0]["state"], "deployed");
    assert_ne!(moved[0]["node"], after[0]["node"]);
    assert_eq!(
        (&moved[0]["address"], &moved[0]["hostname"]),
        (&after[0]["address"], &after[0]["hostname"])
    );
    assert!(d.ok(&["events", "--tier", "web"]).contains("disk errors"));
    d.ok(&["node", "state", &failed, "maintenance"]);
    assert_eq!(d.json(&["node", "state", &failed, "free"])["state"], "free");

    // A tier with instances on nodes cannot be deleted; scaled to 0 it can, and its
    // addresses are free for a new tier on the same subnet.
    let o = d.mint(&["tier", "delete", "web"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("scale it to 0 first"));
    d.ok(&["tier", "scale", "web", "0"]);
    d.ok(&["tier", "delete", "web"]);
    assert_eq!(d.json(&["tier", "list"]), serde_json::json!([]));
    assert!(
        d.json(&["node", "list"])
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["state"] == "free")
    );
    d.ok(&["tier", "create", "-f", "tests/fixtures/web-tier.toml"]);
    assert_eq!(
        d.json(&["instance", "list", "web"])[2]["address"],
        "198.18.0.4"
    );
    d.stop();
}

#[test]
fn apply_creates_what_a_file_declares_once() {
    let dir = scratch("daemon-apply");
    let d = Daemon::start(&dir.join("data"));
    d.ok(&[
        "image",
        "import",
        "tests/fixtures/master-ifupdown",
        "--name",
        "debian",
    ]);
    let file = root().join("tests/fixtures/site.toml");
    let first = d.json(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(
        first["created"],
        serde_json::json!(["node node-a1", "node node-b1", "tier api"])
    );
    let again = d.json(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(again["created"], serde_json::json!([]));
    assert_eq!(
        d.json(&["instance", "list", "api"])
            .as_array()
            .unwrap()
            .len(),
        4
    );
    std::fs::write(dir.join("bad.toml"), "[[nodes]]\nname = \"x\"\n").unwrap();
    let o = d.mint(&["apply", "-f", dir.join("bad.toml").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown section `nodes`"));
    d.stop();
}

#[test]
fn a_daemon_that_is_not_running_is_exit_code_4() {
    let o = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["tier", "list"])
        .env("MINT_SERVER", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the mint daemon"));
}

#[test]
fn imports_and_minting_draw_progress_and_images_show_their_tiers() {
    let dir = scratch("daemon-progress");
    // The daemon's configuration lets materialize write below one directory.
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::write(
        dir.join("data/mint.toml"),
        "[materialize]\nroot = \"../materialized\"\n",
    )
    .unwrap();
    let d = Daemon::start(&dir.join("data"));
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let o = d.mint(&[
        "image",
        "import",
        "tests/fixtures/master-ifupdown",
        "--name",
        "debian",
        "--progress",
        "always",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("hashing"),
        "a bar for the import: {}",
        err(&o)
    );
    let digest = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap()
        .to_string();

    let spec = std::fs::read_to_string(root().join("tests/fixtures/web-tier.toml"))
        .unwrap()
        .replace("\"debian\"", &format!("\"{digest}\""));
    let spec_file = dir.join("web.toml");
    std::fs::write(&spec_file, spec).unwrap();
    let o = d.mint(&[
        "tier",
        "create",
        "-f",
        spec_file.to_str().unwrap(),
        "--progress",
        "always",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    assert!(
        err(&o).contains("minting") && err(&o).contains("8/8 100%"),
        "a bar for minting: {}",
        err(&o)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("tier web created: 8 instances minted"));
    let into = dir.join("materialized/web-002");
    let out = d.ok(&["instance", "materialize", "web", "2", "--into", "web-002"]);
    assert!(
        out.contains("web/2 materialized in") && out.contains("edits"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(into.join("etc/hostname")).unwrap(),
        "web-002\n"
    );
    artifacts_are_served_with_digests_etags_and_ranges(
        &d.url,
        &crate::support::admin_auth(&dir.join("data")),
    );
    // Without a terminal and by default, no bar.
    let o = d.mint(&["image", "import", "tests/fixtures/master-ifupdown"]);
    assert!(
        o.status.success() && !err(&o).contains("hashing"),
        "{}",
        err(&o)
    );

    // A refusal that comes at the end of a streamed operation is still exit code 1 with
    // the daemon's message, and nothing is created.
    let o = d.mint(&[
        "tier",
        "create",
        "-f",
        spec_file.to_str().unwrap(),
        "--progress",
        "always",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    assert!(err(&o).contains("a tier named `web` exists"), "{}", err(&o));
    assert_eq!(d.json(&["tier", "list"]).as_array().unwrap().len(), 1);

    let shown = d.json(&["image", "show", "debian"]);
    assert_eq!(
        (shown["image"]["digest"].as_str(), &shown["tiers"]),
        (Some(digest.as_str()), &serde_json::json!(["web"]))
    );
    let text = d.ok(&["image", "show", &digest]);
    assert!(
        text.contains("name     debian") && text.contains("tiers    web"),
        "re-imported without a name, it keeps its name: {text}"
    );
    let out = d.ok(&[
        "tier",
        "update-image",
        "web",
        "debian",
        "--batch",
        "2",
        "--progress",
        "never",
    ]);
    assert!(out.contains("re-minted at revision 1"), "{out}");
    assert!(
        d.ok(&["events", "--tier", "web"])
            .contains("master-updated")
    );
    let o = d.mint(&["image", "delete", "debian"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("is the master of tier(s) web"),
        "{}",
        err(&o)
    );
    let gc = d.json(&["image", "gc", "--keep-masters"]);
    assert_eq!(gc["masters"], serde_json::json!([]), "{gc}");
    assert!(
        d.ok(&["image", "gc"]).contains("removed 0 masters"),
        "the one master is in use"
    );
    let o = d.mint(&["image", "show", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err(&o).contains("no image with digest or name `nosuch`"),
        "{}",
        err(&o)
    );
    d.stop();
}

/// The artifact server as an agent uses it: the descriptor, then the blob whole, in
/// ranges, conditionally, and by HEAD.
fn artifacts_are_served_with_digests_etags_and_ranges(base: &str, auth: &str) {
    use sha2::Digest;
    let get = |path: &str| {
        ureq::get(&format!("{base}{path}"))
            .set("Authorization", auth)
            .call()
    };
    let desc: serde_json::Value = get("/v1/artifacts/web/2").unwrap().into_json().unwrap();
    assert_eq!(
        (desc["format"].as_str(), desc["hostname"].as_str()),
        (Some("tree"), Some("web-002"))
    );
    assert_eq!(desc["parts"][0]["role"], "master");
    // The instance's layer: its own edits (its host name among them) as a small tar.
    let part = &desc["parts"][1];
    assert_eq!(part["role"], "layer");
    let (url, digest) = (
        part["url"].as_str().unwrap(),
        part["digest"].as_str().unwrap(),
    );
    let again: serde_json::Value = get("/v1/artifacts/web/2").unwrap().into_json().unwrap();
    assert_eq!(
        again["parts"][1]["digest"], part["digest"],
        "the same blob every time"
    );

    let resp = get(url).unwrap();
    assert_eq!(resp.header("ETag"), Some(format!("\"{digest}\"").as_str()));
    assert_eq!(resp.header("Accept-Ranges"), Some("bytes"));
    let mut whole = Vec::new();
    std::io::Read::read_to_end(&mut resp.into_reader(), &mut whole).unwrap();
    assert_eq!(whole.len() as u64, part["size"].as_u64().unwrap());
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&whole))),
        digest,
        "the bytes are their digest"
    );
    let mut tar = tar::Archive::new(&whole[..]);
    let hostname = tar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_str() == Some("etc/hostname"))
        .map(|mut e| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            s
        });
    assert_eq!(hostname.as_deref(), Some("web-002\n"));

    let ranged = |spec: &str| {
        ureq::get(&format!("{base}{url}"))
            .set("Authorization", auth)
            .set("Range", spec)
            .call()
    };
    let r = ranged("bytes=100-199").unwrap();
    assert_eq!(
        (r.status(), r.header("Content-Range").map(str::to_string)),
        (206, Some(format!("bytes 100-199/{}", whole.len())))
    );
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
    assert_eq!(body, whole[100..200]);
    let mut tail = Vec::new();
    std::io::Read::read_to_end(&mut ranged("bytes=-10").unwrap().into_reader(), &mut tail).unwrap();
    assert_eq!(tail, whole[whole.len() - 10..]);
    match ranged(&format!("bytes={}-", whole.len() + 5)) {
        Err(ureq::Error::Status(416, r)) => assert_eq!(
            r.header("Content-Range"),
            Some(format!("bytes */{}", whole.len()).as_str())
        ),
        other => panic!("an unsatisfiable range: {:?}", other.map(|r| r.status())),
    }
    let cached = ureq::get(&format!("{base}{url}"))
        .set("Authorization", auth)
        .set("If-None-Match", &format!("\"{digest}\""))
        .call()
        .unwrap();
    assert_eq!(cached.status(), 304);
    let head = ureq::head(&format!("{base}{url}"))
        .set("Authorization", auth)
        .call()
        .unwrap();
    assert_eq!(
        head.header("Content-Length"),
        Some(whole.len().to_string().as_str())
    );
    match get(&format!("/v1/blobs/sha256:{}", "0".repeat(64))) {
        Err(ureq::Error::Status(404, _)) => {}
        other => panic!("an unknown blob: {:?}", other.map(|r| r.status())),
    }
}

#[test]
fn a_blob_corrupt_on_the_engines_disk_is_quarantined_and_reported() {
    let dir = scratch("daemon-quarantine");
    let d = Daemon::start(&dir.join("data"));
    let err = |o: &Output| String::from_utf8_lossy(&o.stderr).into_owned();
    let o = d.mint(&[
        "image",
        "import",
        "tests/fixtures/master-ifupdown",
        "--name",
        "debian",
    ]);
    assert!(o.status.success(), "{}", err(&o));
    let digest = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap()
        .to_string();
    let spec = std::fs::read_to_string(root().join("tests/fixtures/web-tier.toml"))
        .unwrap()
        .replace("\"debian\"", &format!("\"{digest}\""));
    std::fs::write(dir.join("web.toml"), spec).unwrap();
    let o = d.mint(&[
        "tier",
        "create",
        "-f",
        dir.join("web.toml").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", err(&o));

    let auth = crate::support::admin_auth(&dir.join("data"));
    let get = |path: &str| {
        ureq::get(&format!("{}{path}", d.url))
            .set("Authorization", &auth)
            .call()
    };
    let desc: serde_json::Value = get("/v1/artifacts/web/3").unwrap().into_json().unwrap();
    let layer = desc["parts"][1]["digest"].as_str().unwrap().to_string();
    let url = desc["parts"][1]["url"].as_str().unwrap().to_string();
    // One byte flipped at rest, before the daemon first serves the blob.
    let file = dir
        .join("data/images/blobs")
        .join(layer.trim_start_matches("sha256:"));
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[600] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    for _ in 0..2 {
        match get(&url) {
            Err(ureq::Error::Status(410, r)) => {
                let v: serde_json::Value = r.into_json().unwrap();
                assert!(
                    v["error"]
                        .as_str()
                        .unwrap()
                        .contains("corrupt on the engine's disk and was quarantined"),
                    "{v}"
                );
            }
            other => panic!("a corrupt blob: {:?}", other.map(|r| r.status())),
        }
    }
    assert!(
        !file.exists()
            && dir
                .join("data/images/quarantine")
                .join(layer.trim_start_matches("sha256:"))
                .exists(),
        "moved aside"
    );
    let served: serde_json::Value = get("/v1/blobs").unwrap().into_json().unwrap();
    assert_eq!(served["quarantined"], serde_json::json!([layer]));
    assert!(
        d.ok(&["events"]).contains("blob-quarantined"),
        "reported in the event log"
    );
    // Other blobs are served as before.
    let other: serde_json::Value = get("/v1/artifacts/web/2").unwrap().into_json().unwrap();
    assert_eq!(
        get(other["parts"][1]["url"].as_str().unwrap())
            .unwrap()
            .status(),
        200
    );
    d.stop();
}
