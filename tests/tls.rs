//! TLS on the wire, against a real daemon and real agents: plain HTTP refused beyond
//! loopback, clients (the CLI, agents) trusting the daemon only by a pin or a CA file and
//! never on first use, and a certificate replaced under a running daemon on SIGHUP.

use crate::running::Daemon;
use crate::support::{admin_auth, root, scratch};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tls_daemon(name: &str) -> (std::path::PathBuf, Daemon) {
    let dir = scratch(name);
    let d = Daemon::start(&dir.join("data"), &["--tls-self-signed"], &root());
    assert!(d.url.starts_with("https://127.0.0.1:"), "{}", d.url);
    (dir, d)
}

/// `mint tier list` against `d` with `trust` arguments; exit code and stderr.
fn cli(d: &Daemon, trust: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["tier", "list"])
        .args(trust)
        .env("MINT_SERVER", &d.url)
        .current_dir(&d.cwd)
        .output()
        .unwrap();
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn plain_http_beyond_loopback_refuses_to_start_and_names_the_flag() {
    let dir = scratch("tls-refuse");
    let data = dir.join("data");
    for listen in ["0.0.0.0:0", "198.18.0.1:0", "[::]:0"] {
        let o = Command::new(env!("CARGO_BIN_EXE_mint"))
            .args(["daemon", "--listen", listen, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{listen}: {err}");
        assert!(
            err.contains("--tls-self-signed")
                && err.contains("--tls-cert FILE --tls-key FILE")
                && err.contains("not a loopback"),
            "{listen}: {err}"
        );
    }
    assert!(!data.exists(), "a refused start writes nothing");
}

#[test]
fn the_cli_trusts_the_daemon_by_pin_or_ca_never_on_first_use() {
    let (_dir, d) = tls_daemon("tls-cli");
    let pin = d.pin().expect("the pin file");
    d.wait_for(
        "the daemon to print its pin",
        Duration::from_secs(10),
        || {
            d.log
                .lock()
                .unwrap()
                .contains(&format!("certificate key {pin}"))
                .then_some(())
        },
    );
    // No trust given: the system's roots do not know a self-signed certificate.
    let (code, err) = cli(&d, &[]);
    assert_eq!(code, Some(4), "{err}");
    assert!(
        err.contains("--pin") && err.contains("server.pin"),
        "the refusal says how to trust the daemon: {err}"
    );
    // Another key pinned: refused, naming both keys.
    let wrong = format!("sha256:{}", "cd".repeat(32));
    let (code, err) = cli(&d, &["--pin", &wrong]);
    assert_eq!(code, Some(4), "{err}");
    assert!(err.contains(&wrong) && err.contains(&pin), "{err}");
    // The right pin, or the certificate as a CA: the CLI finds the local admin token too.
    assert_eq!(cli(&d, &["--pin", &pin]).0, Some(0));
    let ca = d.data.join("tls/cert.pem");
    assert_eq!(cli(&d, &["--ca", ca.to_str().unwrap()]).0, Some(0));
    // A malformed pin is bad usage, named.
    let (code, err) = cli(&d, &["--pin", "sha256:nothex"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--pin"), "{err}");
    // Plain HTTP to the TLS port gets nothing.
    let plain = d.url.replace("https://", "http://");
    assert!(
        ureq::get(&format!("{plain}/v1/health"))
            .timeout(Duration::from_secs(5))
            .call()
            .is_err()
    );
}

/// Waits for `child`'s stderr to contain `needle` (for at most `limit`); returns what it read.
fn read_until(child: &mut std::process::Child, needle: &str, limit: Duration) -> String {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + limit;
    let mut seen = String::new();
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&line);
            seen.push('\n');
            if line.contains(needle) {
                break;
            }
        }
    }
    seen
}

#[test]
fn an_agent_with_a_wrong_pin_refuses_to_connect() {
    let (dir, d) = tls_daemon("tls-agent");
    let pin = d.pin().unwrap();
    let enrolled = d.mint(&[
        "node",
        "enroll",
        "n1",
        "--output",
        dir.join("join").to_str().unwrap(),
    ]);
    assert!(enrolled.is_object() || enrolled.is_null());
    let port = crate::bmc::free_port();
    let agent = |pin: &str, stderr: Stdio| {
        Command::new(env!("CARGO_BIN_EXE_mint-agent"))
            .args([
                "run",
                "--engine",
                &d.url,
                "--pin",
                pin,
                "--name",
                "n1",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--heartbeat-ms",
                "200",
            ])
            .arg("--root")
            .arg(dir.join("node"))
            .arg("--join-token-file")
            .arg(dir.join("join"))
            .stderr(stderr)
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let wrong = format!("sha256:{}", "ef".repeat(32));
    let mut a = agent(&wrong, Stdio::piped());
    let said = read_until(&mut a, "not the pinned", Duration::from_secs(20));
    let _ = a.kill();
    let _ = a.wait();
    assert!(
        said.contains("not the pinned") && said.contains(&wrong),
        "{said}"
    );
    assert!(
        !dir.join("node/credential").exists(),
        "no credential was traded"
    );
    let listed = d.mint(&["node", "list"]).to_string();
    assert!(
        !listed.contains("agent-url"),
        "nothing registered: {listed}"
    );
    // The same join token, still unused, works with the right pin.
    let mut a = agent(&pin, Stdio::null());
    let node = d.wait_for("the agent to register", Duration::from_secs(20), || {
        let nodes = d.mint(&["node", "list"]);
        nodes
            .as_array()?
            .iter()
            .find(|n| n["properties"]["agent-url"].is_string())
            .cloned()
    });
    let _ = a.kill();
    let _ = a.wait();
    assert_eq!(
        node["properties"]["agent-url"],
        format!("https://127.0.0.1:{port}")
    );
    let agent_cert = std::fs::read(dir.join("node/tls/cert.pem")).unwrap();
    let agent_pin = mint_tls::Pin::of_certificate(&crate::testbed::pem_to_der(&agent_cert))
        .unwrap()
        .to_string();
    assert_eq!(
        node["properties"]["agent-pin"],
        agent_pin.as_str(),
        "the engine pins the key the agent serves"
    );
}

#[test]
fn sighup_serves_a_new_certificate_to_new_connections() {
    let (_dir, d) = tls_daemon("tls-reload");
    let old = d.pin().unwrap();
    // An operator's renewal: a new key and certificate in the same place.
    std::fs::remove_file(d.data.join("tls/cert.pem")).unwrap();
    std::fs::remove_file(d.data.join("tls/key.pem")).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &d.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let new = d.wait_for("the pin file to change", Duration::from_secs(20), || {
        d.pin().filter(|p| *p != old)
    });
    assert_eq!(
        cli(&d, &["--pin", &new]).0,
        Some(0),
        "the new certificate is served"
    );
    let (code, err) = cli(&d, &["--pin", &old]);
    assert_eq!(code, Some(4), "the old one is gone: {err}");
    let events = d.mint(&["events"]).to_string();
    assert!(
        events.contains("certificate-reloaded") && events.contains(&new),
        "{events}"
    );
    // Tokens still work over the new certificate.
    let auth = admin_auth(&d.data);
    let http = crate::testbed::pinned(&new);
    assert_eq!(
        http.get(&format!("{}/v1/tiers", d.url))
            .set("Authorization", &auth)
            .call()
            .unwrap()
            .status(),
        200
    );
}
