//! Watching a daemon as it works, against a real daemon process: the server-sent event
//! stream (resumption, its bound, its end when the daemon stops), `mint events --follow`,
//! `mint tier watch`, `mint status`, JSON logs from the daemon and the agent, and the
//! completion scripts and manual pages the CLI generates.

use crate::running::Daemon;
use crate::support::{admin_auth, root, scratch, web_site};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// A `mint` command left running with its stdout read line by line, killed when dropped.
struct Running {
    child: Child,
    lines: Receiver<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(d: &Daemon, args: &[&str]) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mint"))
            .args(args)
            .env("MINT_SERVER", &d.url)
            .current_dir(&d.cwd)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mint");
        let out = child.stdout.take().expect("piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Running { child, lines }
    }

    /// Lines until one satisfies `done` (returned last), for at most `limit`.
    fn until(&self, limit: Duration, what: &str, done: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let last = done(&l);
                    seen.push(l);
                    if last {
                        return seen;
                    }
                }
                Err(_) => panic!("no line for {what} within {limit:?}; saw {seen:#?}"),
            }
        }
    }
}

/// The newest event's sequence number.
fn newest(d: &Daemon) -> u64 {
    d.mint(&["events"])
        .as_array()
        .and_then(|e| e.last())
        .and_then(|e| e["seq"].as_u64())
        .expect("events")
}

#[test]
fn events_follow_and_tier_watch_show_a_scale_as_it_happens_and_status_sums_it_up() {
    let d = web_site("observe-follow", &[]);
    let from = newest(&d).to_string();
    let events = Running::start(
        &d,
        &[
            "events", "--follow", "--json", "--tier", "web", "--after", &from,
        ],
    );
    let watch = Running::start(&d, &["tier", "watch", "web", "--json"]);
    let first = watch.until(Duration::from_secs(30), "the first drawing", |_| true);
    let frame: Value = serde_json::from_str(&first[0]).expect("a JSON frame");
    assert_eq!(frame["tier"]["status"]["counts"]["deployed"], 0);
    assert_eq!(frame["instances"].as_array().unwrap().len(), 8);

    d.mint(&["tier", "scale", "web", "3", "--no-wait"]);
    let frames = watch.until(Duration::from_secs(60), "a drawing with 3 deployed", |l| {
        let f: Value = serde_json::from_str(l).unwrap_or_default();
        f["tier"]["status"]["counts"]["deployed"] == 3 && f["tier"]["status"]["settled"] == true
    });
    let last: Value = serde_json::from_str(frames.last().unwrap()).unwrap();
    let running: Vec<&Value> = last["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "deployed")
        .collect();
    assert_eq!(running.len(), 3);
    assert!(
        running
            .iter()
            .all(|i| i["node"].is_string() && i["address"].is_string())
    );

    let seen = events.until(Duration::from_secs(60), "three deployed events", {
        let count = std::cell::Cell::new(0);
        move |l| {
            let e: Value = serde_json::from_str(l).unwrap_or_default();
            if e["kind"] == "deployed" {
                count.set(count.get() + 1);
            }
            count.get() == 3
        }
    });
    let kinds: Vec<Value> = seen
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].clone())
        .collect();
    assert_eq!(
        kinds.first(),
        Some(&Value::from("scale-requested")),
        "{kinds:?}"
    );
    assert!(kinds.contains(&Value::from("bound")), "{kinds:?}");
    let seqs: Vec<u64> = seen
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]) && seqs[0] > from.parse().unwrap(),
        "in order, after --after: {seqs:?}"
    );

    let status = d.mint(&["status"]);
    let web = &status["tiers"][0];
    assert_eq!(web["tier"], "web");
    assert_eq!(web["pool-depth"], 5);
    assert_eq!(web["desired"], 3);
    assert_eq!(status["nodes"]["in-service"], 3);
    assert_eq!(status["nodes"]["free"], 3);
    let text = Command::new(env!("CARGO_BIN_EXE_mint"))
        .arg("status")
        .env("MINT_SERVER", &d.url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("nodes: 3 free, 0 deploying, 3 in service, 0 failed, 0 in maintenance")
            && text.contains("in flight: nothing")
            && text
                .lines()
                .any(|l| l.starts_with("web ") && l.trim_end().ends_with("settled")),
        "{text}"
    );
}

/// Reads a server-sent event stream's frames: (id, data) pairs, until `n` or the end.
fn frames(reader: impl Read, n: usize) -> Vec<(u64, Value)> {
    let mut out = Vec::new();
    let (mut id, mut data) = (None, String::new());
    for line in BufReader::new(reader).lines().map_while(Result::ok) {
        if line.is_empty() {
            if let (Some(i), false) = (id.take(), data.is_empty()) {
                out.push((i, serde_json::from_str(&data).expect("JSON data")));
                if out.len() == n {
                    break;
                }
            }
            data.clear();
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        }
    }
    out
}

#[test]
fn the_event_stream_resumes_from_last_event_id_is_bounded_and_ends_with_the_daemon() {
    let d = web_site("observe-sse", &[]);
    let auth = admin_auth(&d.data);
    let url = format!("{}/v1/events?follow=true", d.url);
    let start = newest(&d);
    let stream = |last: Option<u64>| {
        let mut r = ureq::get(&url)
            .set("Authorization", &auth)
            .timeout(Duration::from_secs(60));
        if let Some(l) = last {
            r = r.set("Last-Event-ID", &l.to_string());
        }
        r.call().expect("a stream")
    };
    // From Last-Event-ID on: the events after it, each with its sequence number as its id.
    let resp = stream(Some(start - 3));
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let got = frames(resp.into_reader(), 3);
    assert_eq!(
        got.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![start - 2, start - 1, start]
    );
    assert!(got.iter().all(|(i, e)| e["seq"] == *i));

    // Without one: from now, so the next frame is the next event recorded.
    let resp = stream(None);
    let reader = std::thread::spawn(move || frames(resp.into_reader(), 1));
    std::thread::sleep(Duration::from_millis(500));
    d.mint(&["tier", "scale", "web", "1", "--no-wait"]);
    let next = reader.join().unwrap();
    assert_eq!(next[0].1["kind"], "scale-requested");
    assert_eq!(next[0].0, start + 1);

    // At most 64 streams at once: the 65th is told why and how else to read.
    let open: Vec<ureq::Response> = (0..64).map(|_| stream(None)).collect();
    let refused = ureq::get(&url)
        .set("Authorization", &auth)
        .timeout(Duration::from_secs(10))
        .call();
    match refused {
        Err(ureq::Error::Status(429, r)) => {
            let body = r.into_string().unwrap();
            assert!(body.contains("64 event streams are open"), "{body}");
        }
        other => panic!("the 65th stream: {:?}", other.map(|r| r.status())),
    }
    drop(open);
    // A dropped stream's place is free again once the daemon writes to it and finds it
    // gone: at the next event, or its keep-alive.
    d.mint(&["tier", "scale", "web", "0", "--no-wait"]);
    let deadline = Instant::now() + Duration::from_secs(40);
    while ureq::get(&url)
        .set("Authorization", &auth)
        .timeout(Duration::from_secs(10))
        .call()
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "closed streams were never released"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // An open stream does not hold the daemon's stop up.
    let held = stream(None);
    let pid = d.pid().to_string();
    let stopped = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut rest = String::new();
    let _ = held.into_reader().read_to_string(&mut rest);
    while Command::new("kill")
        .args(["-0", &pid])
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
        && stopped.elapsed() < Duration::from_secs(20)
    {
        // A zombie until the test's handle reaps it: its stream ended, which is the point.
        if std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        stopped.elapsed() < Duration::from_secs(20),
        "the daemon took {:?} to stop with a stream open",
        stopped.elapsed()
    );
}

#[test]
fn the_daemon_and_the_agent_log_one_json_object_per_line() {
    let dir = scratch("observe-logs");
    let d = Daemon::start(&dir.join("data"), &["--log-format", "json"], &root());
    d.mint(&[
        "node",
        "enroll",
        "n1",
        "--output",
        dir.join("join").to_str().unwrap(),
    ]);
    let port = crate::bmc::free_port();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_mint-agent"))
        .args([
            "--log-format",
            "json",
            "run",
            "--engine",
            &d.url,
            "--name",
            "n1",
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--heartbeat-ms",
            "200",
        ])
        .arg("--root")
        .arg(dir.join("node"))
        .arg("--join-token-file")
        .arg(dir.join("join"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = channel();
    let err = agent.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut agent_lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !agent_lines.iter().any(|l: &String| l.contains("serving")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => agent_lines.push(l),
            Err(_) => panic!("the agent never said where it serves: {agent_lines:#?}"),
        }
    }
    d.wait_for("the agent to register", Duration::from_secs(20), || {
        d.mint(&["node", "list"])
            .as_array()?
            .iter()
            .find(|n| n["name"] == "n1")
            .cloned()
    });
    let _ = agent.kill();
    let _ = agent.wait();
    let daemon_lines = d.log.lock().unwrap().clone();
    let join = std::fs::read_to_string(dir.join("join")).unwrap();
    for (who, line) in daemon_lines
        .lines()
        .map(|l| ("daemon", l))
        .chain(agent_lines.iter().map(|l| ("agent", l.as_str())))
    {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{who} wrote a line that is not JSON ({e}): {line}"));
        assert!(
            v["timestamp"].is_string()
                && v["level"].is_string()
                && v["fields"]["message"].is_string(),
            "{who}: {line}"
        );
        assert!(
            !line.contains(join.trim()),
            "{who} logged the join token: {line}"
        );
    }
    assert!(daemon_lines.lines().any(|l| l.contains("serving http://")));
}

#[test]
fn completion_scripts_load_in_bash_and_man_pages_cover_every_subcommand() {
    let dir = scratch("observe-shell");
    let mint = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_mint"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mint {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    };
    let bash = mint(&["completion", "bash"]);
    let script = dir.join("mint.bash");
    std::fs::write(&script, &bash).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        syntax.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&syntax.stderr)
    );
    let loaded = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p mint", script.display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success()
            && said.starts_with("complete ")
            && said.trim_end().ends_with(" mint"),
        "complete -p mint: {said}{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    // The script completes subcommands and their flags from the CLI's own definition.
    for word in ["tier", "watch", "--until-settled", "status", "completion"] {
        assert!(bash.contains(word), "the bash script knows `{word}`");
    }
    assert!(mint(&["completion", "zsh"]).starts_with("#compdef mint"));
    assert!(mint(&["completion", "fish"]).contains("complete -c mint"));
    let refused = Command::new(env!("CARGO_BIN_EXE_mint"))
        .args(["completion", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("bash"));

    let pages = dir.join("man");
    let listed = mint(&["man", "--out-dir", pages.to_str().unwrap()]);
    for page in [
        "mint.1",
        "mint-tier.1",
        "mint-tier-scale.1",
        "mint-tier-watch.1",
        "mint-status.1",
        "mint-daemon.1",
    ] {
        let path = pages.join(page);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is roff"
        );
        assert!(listed.contains(path.to_str().unwrap()), "{page} is listed");
    }
    let scale = std::fs::read_to_string(pages.join("mint-tier-scale.1")).unwrap();
    assert!(
        scale.contains("no\\-wait"),
        "the page names the command's flags"
    );
}
