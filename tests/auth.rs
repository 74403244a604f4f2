//! Who may reach what, against a real daemon over HTTP: the attack catalogue of operator
//! tokens, node credentials and join tokens. Each case is its own test.

use crate::running::Daemon;
use crate::support::{admin_auth, join, root, scratch};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;

/// Every route of the API but `/v1/health`, with a concrete path and a body where it takes
/// one; `mutates` for the ones a read-only token may not call.
const ROUTES: &[(&str, &str, bool)] = &[
    ("GET", "/v1/images", false),
    ("POST", "/v1/images", true),
    ("POST", "/v1/images/gc", true),
    ("GET", "/v1/images/debian", false),
    ("DELETE", "/v1/images/debian", true),
    ("GET", "/v1/tiers", false),
    ("POST", "/v1/tiers", true),
    ("GET", "/v1/tiers/web", false),
    ("DELETE", "/v1/tiers/web", true),
    ("POST", "/v1/tiers/web/scale", true),
    ("POST", "/v1/tiers/web/image", true),
    ("GET", "/v1/tiers/web/instances", false),
    ("POST", "/v1/tiers/web/instances/0/materialize", true),
    ("GET", "/v1/nodes", false),
    ("POST", "/v1/nodes", true),
    ("DELETE", "/v1/nodes/n1", true),
    ("POST", "/v1/nodes/n1/state", true),
    ("POST", "/v1/nodes/n1/enroll", true),
    ("POST", "/v1/nodes/n1/heartbeat", true),
    ("GET", "/v1/events", false),
    ("POST", "/v1/agents/register", true),
    ("GET", "/v1/plugins", false),
    ("POST", "/v1/plugins", true),
    ("GET", "/v1/plugins/spread", false),
    ("DELETE", "/v1/plugins/spread", true),
    ("GET", "/v1/artifacts/web/0", false),
    ("GET", "/v1/artifacts/web/0/layer", false),
    ("HEAD", "/v1/artifacts/web/0/layer", false),
    ("GET", "/v1/blobs", false),
    (
        "GET",
        "/v1/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        false,
    ),
    (
        "HEAD",
        "/v1/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000",
        false,
    ),
    (
        "GET",
        "/v1/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000/access",
        false,
    ),
    ("GET", "/v1/tokens", false),
    ("POST", "/v1/tokens", true),
    ("DELETE", "/v1/tokens/ci", true),
    ("GET", "/metrics", false),
    ("GET", "/v1/whoami", false),
];

/// The status of `method path` with `Authorization: auth` (none when empty).
fn status(url: &str, method: &str, path: &str, auth: &str) -> u16 {
    let mut r =
        ureq::request(method, &format!("{url}{path}")).timeout(std::time::Duration::from_secs(30));
    if !auth.is_empty() {
        r = r.set("Authorization", auth);
    }
    let answer = if method == "POST" {
        r.send_json(json!({}))
    } else {
        r.call()
    };
    match answer {
        Ok(resp) => resp.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

/// A daemon with the quickstart's master and tier, and two nodes that joined with join
/// tokens, each holding one deployed instance (noop driver): what the cases attack.
struct Site {
    daemon: Daemon,
    data: PathBuf,
    dir: PathBuf,
    /// The nodes' credentials, by name.
    nodes: Vec<(String, String)>,
}

impl Site {
    fn new(name: &str) -> Site {
        Site::with(name, &[])
    }

    /// A site whose daemon also gets `extra` arguments.
    fn with(name: &str, extra: &[&str]) -> Site {
        let dir = scratch(name);
        let data = dir.join("data");
        // The nodes send no heartbeats; they must not time out during a case.
        let mut args = vec!["--node-timeout-secs", "600"];
        args.extend_from_slice(extra);
        let daemon = Daemon::start(&data, &args, &root());
        daemon.mint(&[
            "image",
            "import",
            "tests/fixtures/master-ifupdown",
            "--name",
            "debian",
        ]);
        daemon.mint(&["tier", "create", "-f", "tests/fixtures/web-tier.toml"]);
        let nodes: Vec<(String, String)> = ["n1", "n2"]
            .iter()
            .map(|n| (n.to_string(), join(&daemon.url, &data, n)))
            .collect();
        daemon.mint(&["tier", "scale", "web", "2"]);
        Site {
            daemon,
            data,
            dir,
            nodes,
        }
    }

    fn admin(&self) -> String {
        admin_auth(&self.data)
    }

    fn node_auth(&self, i: usize) -> String {
        format!("Bearer {}", self.nodes[i].1)
    }

    /// The index of the instance bound to node `i`.
    fn instance_of(&self, i: usize) -> u64 {
        let nodes = self.daemon.mint(&["node", "list"]);
        let n = nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == self.nodes[i].0.as_str())
            .unwrap()
            .clone();
        n["instance"]["index"]
            .as_u64()
            .expect("the node holds an instance")
    }

    fn get_json(&self, path: &str, auth: &str) -> Value {
        ureq::get(&format!("{}{path}", self.daemon.url))
            .set("Authorization", auth)
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    }

    /// A read-only token made through the CLI.
    fn read_only(&self) -> String {
        let o = self
            .daemon
            .run(&["token", "create", "--name", "ci", "--role", "read-only"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        format!("Bearer {}", String::from_utf8_lossy(&o.stdout).trim())
    }
}

#[test]
fn every_route_refuses_a_missing_wrong_or_foreign_credential() {
    let site = Site::with("auth-anonymous", &["--max-auth-failures", "100000"]);
    let url = &site.daemon.url;
    for bad in [
        "",
        "Bearer mint_op_not-a-token",
        "Bearer ",
        "Bearer",
        "Basic YWRtaW46YWRtaW4=",
        &site.admin().replace("Bearer ", "Token "),
    ] {
        for (method, path, _) in ROUTES {
            assert_eq!(
                status(url, method, path, bad),
                401,
                "{method} {path} with `{bad}`"
            );
        }
    }
    assert_eq!(
        status(url, "GET", "/v1/health", ""),
        200,
        "health needs no credential"
    );
}

#[test]
fn a_read_only_token_reads_state_but_changes_nothing_and_never_reads_artifacts() {
    let site = Site::new("auth-read-only");
    let ro = site.read_only();
    let before = site.get_json("/v1/tiers", &site.admin());
    for (method, path, mutates) in ROUTES {
        let artifacts = path.starts_with("/v1/artifacts/")
            || path.starts_with("/v1/blobs/")
            || path.starts_with("/v1/tokens");
        let code = status(&site.daemon.url, method, path, &ro);
        if *mutates || artifacts {
            assert_eq!(code, 403, "{method} {path} with a read-only token");
        } else {
            assert!(
                code == 200 || code == 404,
                "{method} {path} with a read-only token: {code}"
            );
        }
    }
    // The seed and root filesystem of an instance, by the URLs an admin would use.
    let desc = site.get_json("/v1/artifacts/web/0", &site.admin());
    let blob = desc["parts"][0]["url"].as_str().unwrap();
    assert_eq!(status(&site.daemon.url, "GET", blob, &ro), 403);
    assert_eq!(
        site.get_json("/v1/tiers", &site.admin()),
        before,
        "nothing changed"
    );
}

#[test]
fn a_node_credential_reaches_no_operator_route() {
    let site = Site::new("auth-node-routes");
    let own = site.node_auth(0);
    for (method, path, _) in ROUTES {
        let node_route = path.starts_with("/v1/artifacts/")
            || path.starts_with("/v1/blobs/")
            || *path == "/v1/agents/register"
            || path.ends_with("/heartbeat");
        if !node_route {
            assert_eq!(
                status(&site.daemon.url, method, path, &own),
                403,
                "{method} {path} with a node credential"
            );
        }
    }
}

#[test]
fn a_node_heartbeats_only_as_itself() {
    let site = Site::new("auth-heartbeat");
    let url = &site.daemon.url;
    let hb =
        |node: &str, auth: &str| status(url, "POST", &format!("/v1/nodes/{node}/heartbeat"), auth);
    assert_eq!(hb("n1", &site.node_auth(0)), 200);
    assert_eq!(
        hb("n2", &site.node_auth(0)),
        403,
        "n1's credential heartbeating as n2"
    );
    assert_eq!(hb("n1", &site.admin()), 403, "an operator is not a node");
}

#[test]
fn a_node_reads_only_its_own_instance() {
    let site = Site::new("auth-node-artifacts");
    let (mine, theirs) = (site.instance_of(0), site.instance_of(1));
    let own = site.node_auth(0);
    let url = &site.daemon.url;
    assert_eq!(
        status(url, "GET", &format!("/v1/artifacts/web/{mine}"), &own),
        200
    );
    let desc = site.get_json(&format!("/v1/artifacts/web/{mine}"), &own);
    assert_eq!(
        status(url, "GET", desc["parts"][0]["url"].as_str().unwrap(), &own),
        200,
        "its own root filesystem"
    );
    // Another node's instance, by descriptor, part and blob digest; an unbound one; one
    // that does not exist: all the same 404.
    let theirs_desc = site.get_json(&format!("/v1/artifacts/web/{theirs}"), &site.admin());
    // The master is shared by the tier's instances; the layer is the other instance's own.
    let their_blob = theirs_desc["parts"][1]["url"].as_str().unwrap().to_string();
    for (path, id) in [
        (
            format!("/v1/artifacts/web/{theirs}"),
            format!("web/{theirs}"),
        ),
        (
            format!("/v1/artifacts/web/{theirs}/layer"),
            format!("web/{theirs}"),
        ),
        ("/v1/artifacts/web/5".to_string(), "web/5".to_string()),
        ("/v1/artifacts/web/99".to_string(), "web/99".to_string()),
        ("/v1/artifacts/nosuch/0".to_string(), "nosuch/0".to_string()),
    ] {
        match ureq::get(&format!("{url}{path}"))
            .set("Authorization", &own)
            .call()
        {
            Err(ureq::Error::Status(404, resp)) => {
                let v: Value = resp.into_json().unwrap();
                assert_eq!(v["error"], format!("no instance named `{id}`"), "{path}");
            }
            other => panic!(
                "{path} with n1's credential: {:?}",
                other.map(|r| r.status())
            ),
        }
    }
    assert_eq!(
        status(url, "GET", &their_blob, &own),
        404,
        "another node's blob by digest"
    );
    assert_eq!(status(url, "HEAD", &their_blob, &own), 404);
}

#[test]
fn join_tokens_work_once_for_their_node_before_they_expire() {
    let site = Site::new("auth-join");
    let url = &site.daemon.url;
    let enroll = |name: &str, ttl: u64| -> String {
        let v: Value = ureq::post(&format!("{url}/v1/nodes/{name}/enroll"))
            .set("Authorization", &site.admin())
            .send_json(json!({"ttl-secs": ttl}))
            .unwrap()
            .into_json()
            .unwrap();
        v["join-token"].as_str().unwrap().to_string()
    };
    let register = |name: &str, token: &str| -> u16 {
        let body = json!({"name": name, "cpus": 1, "memory-mib": 512, "arch": "x86_64", "agent-url": "http://127.0.0.1:9"});
        match ureq::post(&format!("{url}/v1/agents/register"))
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(body)
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, _)) => c,
            Err(e) => panic!("{e}"),
        }
    };
    let nodes = || {
        site.daemon
            .mint(&["node", "list"])
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    let token = enroll("n3", 3600);
    assert_eq!(
        register("n4", &token),
        403,
        "a join token for another node name"
    );
    assert!(!nodes().contains(&"n4".to_string()));
    assert_eq!(register("n3", &token), 200);
    assert_eq!(register("n3", &token), 403, "reused");
    let short = enroll("n5", 1);
    std::thread::sleep(std::time::Duration::from_millis(1200));
    assert_eq!(register("n5", &short), 403, "expired");
    assert_eq!(register("n6", "mint_jt_made-up"), 403, "never issued");
    assert_eq!(nodes(), ["n1", "n2", "n3"], "nothing else registered");
    let events = site.daemon.mint(&["events"]).to_string();
    assert!(
        events.contains("\"by\":\"node:n3\""),
        "the join is the node's own act: {events}"
    );
}

#[test]
fn a_known_nodes_name_cannot_be_taken_over() {
    let site = Site::new("auth-hijack");
    let url = &site.daemon.url;
    let before = site.daemon.mint(&["node", "list"]);
    let hijack = json!({"name": "n1", "cpus": 64, "memory-mib": 1, "arch": "x86_64", "agent-url": "http://198.18.99.99:7601"});
    let other_join = {
        let v: Value = ureq::post(&format!("{url}/v1/nodes/n9/enroll"))
            .set("Authorization", &site.admin())
            .send_json(json!({}))
            .unwrap()
            .into_json()
            .unwrap();
        format!("Bearer {}", v["join-token"].as_str().unwrap())
    };
    for auth in ["".to_string(), other_join, site.node_auth(1), site.admin()] {
        let mut r = ureq::post(&format!("{url}/v1/agents/register"));
        if !auth.is_empty() {
            r = r.set("Authorization", &auth);
        }
        let code = match r.send_json(hijack.clone()) {
            Ok(resp) => resp.status(),
            Err(ureq::Error::Status(c, _)) => c,
            Err(e) => panic!("{e}"),
        };
        assert!(
            code == 401 || code == 403,
            "registering as n1 with `{}`: {code}",
            auth.split(' ').next().unwrap_or("")
        );
    }
    assert_eq!(
        site.daemon.mint(&["node", "list"]),
        before,
        "n1 is unchanged: same agent-url, instance and facts"
    );
    // Its own credential refreshes it.
    let mine = ureq::post(&format!("{url}/v1/agents/register"))
        .set("Authorization", &site.node_auth(0))
        .send_json(hijack)
        .unwrap();
    assert_eq!(mine.status(), 200);
}

#[test]
fn tokens_are_created_listed_and_revoked_and_events_name_who_acted() {
    let site = Site::new("auth-tokens");
    let ro = site.read_only();
    let listed = site.daemon.mint(&["token", "list"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "ci"]);
    assert!(
        !listed.to_string().contains("sha256")
            && !listed
                .to_string()
                .contains(ro.trim_start_matches("Bearer ")),
        "no token or hash is listed"
    );
    assert_eq!(status(&site.daemon.url, "GET", "/v1/tiers", &ro), 200);
    site.daemon.mint(&["token", "revoke", "ci"]);
    assert_eq!(
        status(&site.daemon.url, "GET", "/v1/tiers", &ro),
        401,
        "revoked"
    );
    let o = site
        .daemon
        .run(&["token", "create", "--name", "admin", "--role", "admin"]);
    assert_eq!(o.status.code(), Some(1), "names are unique");
    let events = site.daemon.mint(&["events"]);
    let by = |kind: &str| -> Vec<String> {
        events
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == kind)
            .map(|e| e["by"].as_str().unwrap_or("-").to_string())
            .collect()
    };
    assert_eq!(by("tier-created"), ["admin:admin"]);
    assert_eq!(by("scale-requested"), ["admin:admin"]);
    assert_eq!(by("token-revoked"), ["admin:admin"]);
    assert!(
        by("bound").iter().all(|b| b == "mint"),
        "the engine's own decisions are the engine's"
    );
}

#[test]
fn a_token_file_others_may_read_stops_the_daemon() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("auth-token-mode");
    let data = dir.join("data");
    drop(Daemon::start(&data, &[], &root()));
    let file = data.join("admin.token");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["daemon", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("readable by group or others") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn no_secret_appears_in_logs_events_answers_or_cli_output() {
    let site = Site::new("auth-no-leaks");
    let ro = site.read_only();
    let admin = site.admin();
    let mut secrets: Vec<String> = vec![
        admin.trim_start_matches("Bearer ").into(),
        ro.trim_start_matches("Bearer ").into(),
    ];
    secrets.extend(site.nodes.iter().map(|(_, c)| c.clone()));
    // A pending join token, too.
    let v: Value = ureq::post(&format!("{}/v1/nodes/n7/enroll", site.daemon.url))
        .set("Authorization", &admin)
        .send_json(json!({}))
        .unwrap()
        .into_json()
        .unwrap();
    secrets.push(v["join-token"].as_str().unwrap().into());
    // Everything an operator can read back.
    let mut seen = String::new();
    for args in [
        &["events"][..],
        &["node", "list"],
        &["token", "list"],
        &["tier", "list"],
        &["instance", "list", "web"],
        &["plugin", "list"],
    ] {
        let o = site.daemon.run(args);
        seen.push_str(&String::from_utf8_lossy(&o.stdout));
        seen.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    seen.push_str(&site.daemon.log.lock().unwrap());
    // Everything the daemon wrote to disk but the token file itself.
    for entry in walk(&site.data) {
        if entry.file_name().is_some_and(|n| n != "admin.token") {
            seen.push_str(&String::from_utf8_lossy(
                &std::fs::read(&entry).unwrap_or_default(),
            ));
        }
    }
    for s in &secrets {
        assert!(
            !seen.contains(s.as_str()),
            "a secret ({}...) leaked",
            &s[..12]
        );
    }
    assert!(
        seen.contains("token-created") && seen.contains("node-enrolled"),
        "what was searched is what was made"
    );
    let _ = &site.dir;
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn failed_authentications_from_one_address_are_braked() {
    let dir = scratch("auth-brake");
    let daemon = Daemon::start(&dir.join("data"), &[], &root());
    let admin = admin_auth(&dir.join("data"));
    assert_eq!(status(&daemon.url, "GET", "/v1/tiers", &admin), 200);
    for i in 0..20 {
        assert_eq!(
            status(
                &daemon.url,
                "GET",
                "/v1/tiers",
                &format!("Bearer mint_op_guess-{i}")
            ),
            401,
            "guess {i}"
        );
    }
    // From now on, for a minute, nothing from this address is looked at: not even a good
    // token tells a guesser anything.
    assert_eq!(
        status(&daemon.url, "GET", "/v1/tiers", "Bearer mint_op_guess-21"),
        429
    );
    assert_eq!(status(&daemon.url, "GET", "/v1/tiers", &admin), 429);
    assert_eq!(
        status(&daemon.url, "GET", "/v1/health", ""),
        200,
        "health is not braked"
    );
}

#[test]
fn request_bodies_are_bounded() {
    let dir = scratch("auth-bodies");
    let daemon = Daemon::start(&dir.join("data"), &[], &root());
    let admin = admin_auth(&dir.join("data"));
    // A body of 2 MiB: the daemon stops reading at its bound and answers 413. The body is
    // written from another thread, since the daemon may close before it has all of it.
    let addr = daemon.url.trim_start_matches("http://").to_string();
    for path in ["/v1/tiers", "/v1/nodes", "/v1/images", "/v1/tokens"] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let body = format!("{{\"name\": \"{}\"}}", "x".repeat(2 << 20));
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let _ = w
                .write_all(head.as_bytes())
                .and_then(|_| w.write_all(body.as_bytes()));
        });
        let mut answer = [0u8; 12];
        s.read_exact(&mut answer).unwrap();
        assert_eq!(
            &answer,
            b"HTTP/1.1 413",
            "{path}: {}",
            String::from_utf8_lossy(&answer)
        );
        drop(s);
        let _ = writer.join();
    }
    assert_eq!(
        daemon.mint(&["node", "list"]),
        json!([]),
        "nothing was added"
    );
}

#[test]
fn materialize_writes_only_below_its_root() {
    let site = Site::new("auth-materialize");
    // Unconfigured, it is off.
    let o = site
        .daemon
        .run(&["instance", "materialize", "web", "0", "--into", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("materialize is off"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(site);

    let dir = scratch("auth-materialize-root");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("mint.toml"),
        "[materialize]\nroot = \"../root\"\n",
    )
    .unwrap();
    let d = Daemon::start(&data, &[], &root());
    d.mint(&[
        "image",
        "import",
        "tests/fixtures/master-ifupdown",
        "--name",
        "debian",
    ]);
    d.mint(&["tier", "create", "-f", "tests/fixtures/web-tier.toml"]);
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("root/link")).unwrap();
    for (into, why) in [
        ("/etc/mint-materialized", "outside the materialize root"),
        ("../outside/x", "no `..`"),
        ("a/../../outside/x", "no `..`"),
        ("link/x", "is a symlink"),
        (
            outside.join("x").to_str().unwrap(),
            "outside the materialize root",
        ),
    ] {
        let o = d.run(&["instance", "materialize", "web", "0", "--into", into]);
        assert_eq!(o.status.code(), Some(1), "{into}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(why),
            "{into}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(!std::path::Path::new("/etc/mint-materialized").exists());
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "nothing written outside"
    );
    d.mint(&[
        "instance",
        "materialize",
        "web",
        "0",
        "--into",
        "ok/web-000",
    ]);
    assert_eq!(
        std::fs::read_to_string(dir.join("root/ok/web-000/etc/hostname"))
            .unwrap()
            .trim(),
        "web-000"
    );
}

/// Imports hold the long-operation bound while they read: four reading from FIFOs that
/// nobody writes yet keep it full, so a fifth long operation (an import, a tier creation) is
/// answered 429 at once; once the four end, the same import goes through.
#[test]
fn long_operations_beyond_the_bound_are_answered_429() {
    let dir = scratch("auth-long-ops");
    let data = dir.join("data");
    let daemon = Daemon::start(&data, &[], &root());
    let admin = admin_auth(&data);
    let url = daemon.url.clone();
    let import = move |path: &std::path::Path| -> Result<u16, u16> {
        match ureq::post(&format!("{url}/v1/images"))
            .set("Authorization", &admin)
            .timeout(std::time::Duration::from_secs(60))
            .send_json(json!({"path": path}))
        {
            Ok(r) => Ok(r.status()),
            Err(ureq::Error::Status(code, _)) => Err(code),
            Err(e) => panic!("{e}"),
        }
    };
    let fifos: Vec<PathBuf> = (0..mint_daemon::MAX_LONG_OPERATIONS)
        .map(|i| dir.join(format!("fifo-{i}")))
        .collect();
    for f in &fifos {
        assert!(Command::new("mkfifo").arg(f).status().unwrap().success());
    }
    // Each held import asks again while it is refused: the probes below take a permit for
    // a moment each, and one may be out just when a held import arrives.
    let held: Vec<_> = fifos
        .iter()
        .cloned()
        .map(|f| {
            let import = import.clone();
            std::thread::spawn(move || {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                loop {
                    match import(&f) {
                        Err(429) if std::time::Instant::now() < deadline => {
                            std::thread::sleep(std::time::Duration::from_millis(20))
                        }
                        other => return other,
                    }
                }
            })
        })
        .collect();
    let master = dir.join("master");
    std::fs::create_dir_all(master.join("etc")).unwrap();
    std::fs::write(master.join("etc/hostname"), "debian\n").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match import(&master) {
            Err(429) => break,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the bound never filled: {other:?}"
                );
                // The import got in before the four held it: that image is simply there.
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }
    let refused = daemon.refused(&[
        "tier",
        "create",
        "-f",
        root()
            .join("tests/fixtures/web-tier.toml")
            .to_str()
            .unwrap(),
    ]);
    assert!(refused.contains("retry"), "{refused}");
    // The writers come and go without a byte: each held import ends, refused as no format.
    for f in &fifos {
        drop(std::fs::OpenOptions::new().write(true).open(f).unwrap());
    }
    for h in held {
        assert_eq!(h.join().unwrap(), Err(400));
    }
    assert_eq!(
        import(&master),
        Ok(200),
        "with the bound free again the import goes through"
    );
}
