//! Commands that show the pool as it changes: `mint events --follow` and `mint tier
//! watch NAME` read the daemon's server-sent event stream (`GET /v1/events?follow=true`),
//! resuming after a dropped connection from the last event seen; `mint status` is one
//! screen of the whole site.

use crate::Failure;
use crate::client::{Conn, call, call_failure, print, refusal, s, url};
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Write};
use std::time::{Duration, Instant};

/// Silence after which a stream is taken for dead (the daemon speaks every 15 s).
const STREAM_SILENCE: Duration = Duration::from_secs(45);

/// What to do after an event.
enum Next {
    More,
    Stop,
}

/// Follows the event stream from after `after` (from now when `None`), calling `on` with
/// each event, and with `None` whenever nothing came for 250 ms, until it says stop. A
/// connection that drops is opened again from the last event seen; a first connection
/// that fails is an error.
fn follow(
    conn: &Conn,
    tier: Option<&str>,
    mut after: Option<u64>,
    on: &mut dyn FnMut(Option<&Value>) -> Next,
) -> Result<(), Failure> {
    let agent = conn.streaming_agent(STREAM_SILENCE)?;
    let mut connected_once = false;
    let mut backoff = Duration::from_millis(250);
    loop {
        let mut path = "/v1/events?follow=true".to_string();
        if let Some(t) = tier {
            path.push_str(&format!("&tier={t}"));
        }
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        let mut req = agent.get(&url(conn, &path));
        if let Some(a) = conn.authorization()? {
            req = req.set("Authorization", &a);
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => return Err(refusal(code, r)),
            Err(e) if !connected_once => return call_failure(conn, e),
            Err(e) => {
                eprintln!("mint: the event stream is unavailable ({e}); retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if after.is_none() {
            // The stream starts after the newest event; asking it once keeps `after` known
            // should the connection need opening again.
            after = Some(newest(conn)?);
        }
        connected_once = true;
        backoff = Duration::from_millis(250);
        // Frames are read on their own thread so the caller can act on quiet spells.
        let (tx, rx) = std::sync::mpsc::channel::<Result<Value, String>>();
        let reader = std::io::BufReader::new(resp.into_reader());
        std::thread::spawn(move || read_frames(reader, tx));
        loop {
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok(Ok(event)) => {
                    if let Some(seq) = event["seq"].as_u64() {
                        after = Some(seq);
                    }
                    if let Next::Stop = on(Some(&event)) {
                        return Ok(());
                    }
                }
                Ok(Err(e)) => {
                    eprintln!("mint: {e}; resuming");
                    break;
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if let Next::Stop = on(None) {
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    eprintln!("mint: the event stream ended; resuming");
                    break;
                }
            }
        }
    }
}

/// The newest event's sequence number (0 with none), from the last page of the log.
fn newest(conn: &Conn) -> Result<u64, Failure> {
    let mut after = None;
    loop {
        let path = match after {
            Some(a) => format!("/v1/events?limit=10000&after={a}"),
            None => "/v1/events?limit=10000".into(),
        };
        let page = call(conn, "GET", &path, None)?;
        let page = page.as_array().cloned().unwrap_or_default();
        match page.last().and_then(|e| e["seq"].as_u64()) {
            Some(last) if page.len() == 10_000 => after = Some(last),
            Some(last) => return Ok(last),
            None => return Ok(after.unwrap_or(0)),
        }
    }
}

/// Reads server-sent event frames and sends each `data:` as JSON; ends at the stream's end.
fn read_frames(reader: impl BufRead, tx: std::sync::mpsc::Sender<Result<Value, String>>) {
    let (mut data, mut kind) = (String::new(), String::new());
    for line in reader.lines() {
        let Ok(line) = line else {
            return;
        };
        if line.is_empty() {
            if !data.is_empty() {
                let sent = if kind == "error" {
                    tx.send(Err(format!("the daemon's stream failed: {data}")))
                } else {
                    match serde_json::from_str(&data) {
                        Ok(v) => tx.send(Ok(v)),
                        Err(e) => tx.send(Err(format!("an event that is not JSON: {e}"))),
                    }
                };
                if sent.is_err() {
                    return;
                }
            }
            data.clear();
            kind.clear();
        } else if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.strip_prefix(' ').unwrap_or(d));
        } else if let Some(k) = line.strip_prefix("event:") {
            kind = k.trim().to_string();
        }
        // `id:` is carried in the event itself (`seq`); comments (`:`) keep the line alive.
    }
}

/// One event as `mint events` prints it.
pub(crate) fn event_row(e: &Value) -> String {
    let detail = if e["detail"].is_null() {
        String::new()
    } else {
        format!("  {}", e["detail"])
    };
    format!(
        "{:>6} {:<16} {}{detail}",
        s(&e["seq"]),
        s(&e["kind"]),
        s(&e["message"])
    )
}

/// `mint events --follow`: every event from `after` (or from now) as it is recorded; with
/// `--json`, one JSON object per line.
pub fn events_follow(conn: &Conn, tier: Option<String>, after: Option<u64>) -> Result<(), Failure> {
    let json = conn.json;
    let mut out = std::io::stdout();
    follow(conn, tier.as_deref(), after, &mut |e| {
        let Some(e) = e else {
            return Next::More;
        };
        let line = if json { e.to_string() } else { event_row(e) };
        // A reader that went away (a closed pipe) ends the command.
        match writeln!(out, "{line}").and_then(|_| out.flush()) {
            Ok(()) => Next::More,
            Err(_) => Next::Stop,
        }
    })
}

/// `mint tier watch NAME`: the tier's instances, drawn again whenever its events say
/// something changed (at most four times a second); until interrupted, or with
/// `until_settled` until the tier has reached its intent.
pub fn tier_watch(conn: &Conn, name: &str, until_settled: bool) -> Result<(), Failure> {
    let mut w = Watch {
        name,
        terminal: std::io::stdout().is_terminal() && !conn.json,
        dirty: false,
        last_draw: Instant::now(),
        failed: None,
    };
    // Where the log stands before the first drawing: whatever changes after it is in the
    // stream, so no change between the drawing and the stream's start goes unseen.
    let after = newest(conn)?;
    if w.draw(conn)? && until_settled {
        return Ok(());
    }
    follow(conn, Some(name), Some(after), &mut |event| {
        w.dirty |= event.is_some();
        if !w.dirty || w.last_draw.elapsed() < Duration::from_millis(250) {
            return Next::More;
        }
        match w.draw(conn) {
            Ok(true) if until_settled => Next::Stop,
            Ok(_) => Next::More,
            Err(e) => {
                w.failed = Some(e);
                Next::Stop
            }
        }
    })?;
    w.failed.map_or(Ok(()), Err)
}

/// A tier being watched.
struct Watch<'a> {
    name: &'a str,
    /// Whether each drawing replaces the last on the screen.
    terminal: bool,
    /// Whether an event came since the last drawing.
    dirty: bool,
    last_draw: Instant,
    failed: Option<Failure>,
}

impl Watch<'_> {
    /// Draws the tier as it is now; answers whether it is settled.
    fn draw(&mut self, conn: &Conn) -> Result<bool, Failure> {
        self.dirty = false;
        self.last_draw = Instant::now();
        let name = self.name;
        let tier = call(conn, "GET", &format!("/v1/tiers/{name}"), None)?;
        let instances = call(conn, "GET", &format!("/v1/tiers/{name}/instances"), None)?;
        let mut out = std::io::stdout();
        let text = if conn.json {
            json!({ "tier": tier, "instances": instances }).to_string()
        } else if self.terminal {
            format!("\x1b[H\x1b[2J{}", watch_frame(name, &tier, &instances))
        } else {
            watch_frame(name, &tier, &instances)
        };
        let _ = writeln!(out, "{text}").and_then(|_| out.flush());
        Ok(tier["status"]["settled"] == true)
    }
}

/// One drawing of a watched tier: a summary line and its instances.
fn watch_frame(name: &str, tier: &Value, instances: &Value) -> String {
    let c = &tier["status"]["counts"];
    let mut text = format!(
        "tier {name}: {} of {} running (desired {}), {} deploying, {} undeploying, {} failed, {} in the pool; {}\n",
        s(&c["deployed"]),
        s(&tier["tier"]["max_instances"]),
        s(&tier["tier"]["desired"]),
        s(&c["deploying"]),
        s(&c["undeploying"]),
        s(&c["failed"]),
        s(&c["pooled"]),
        if tier["status"]["settled"] == true {
            "settled"
        } else {
            "in progress"
        }
    );
    text.push_str(&format!(
        "{:>5}  {:<16} {:<28} {:<12} NODE\n",
        "INDEX", "HOSTNAME", "ADDRESS", "STATE"
    ));
    for i in instances.as_array().into_iter().flatten() {
        text.push_str(&format!(
            "{:>5}  {:<16} {:<28} {:<12} {}\n",
            s(&i["id"]["index"]),
            s(&i["hostname"]),
            s(&i["address"]),
            s(&i["state"]),
            s(&i["node"])
        ));
    }
    text
}

/// `mint status`: the daemon's role, each tier's counts and pool depth, nodes by state,
/// and the driver calls in flight.
pub fn status(conn: &Conn) -> Result<(), Failure> {
    let health = call(conn, "GET", "/v1/health", None)?;
    let tiers = call(conn, "GET", "/v1/tiers", None)?;
    let nodes = call(conn, "GET", "/v1/nodes", None)?;
    let mut by_state = serde_json::Map::new();
    for state in ["free", "deploying", "in-service", "failed", "maintenance"] {
        let n = nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["state"] == state)
            .count();
        by_state.insert(state.into(), json!(n));
    }
    let mut rows = Vec::new();
    let mut in_flight = Vec::new();
    for t in tiers.as_array().into_iter().flatten() {
        let name = s(&t["tier"]["name"]);
        let c = &t["status"]["counts"];
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        rows.push(json!({
            "tier": name,
            "max-instances": t["tier"]["max_instances"],
            "desired": t["tier"]["desired"],
            "counts": c,
            "pool-depth": n("pooled") + n("failed"),
            "settled": t["status"]["settled"],
            "blocked": t["status"]["blocked"],
        }));
        for f in t["status"]["in-flight"].as_array().into_iter().flatten() {
            in_flight.push(json!({
                "tier": name,
                "index": f["index"],
                "action": f["action"],
                "node": f["node"],
                "since-ms": f["since-ms"],
            }));
        }
    }
    let v = json!({
        "daemon": { "version": health["version"], "role": health["role"] },
        "tiers": rows,
        "nodes": by_state,
        "in-flight": in_flight,
    });
    print(conn, &v, |v| {
        let role = &v["daemon"]["role"];
        let role = if role["leads"] == true {
            format!("leading (fencing token {})", s(&role["fencing-token"]))
        } else if role["leads"] == false {
            format!("following {}", s(&role["leader"]))
        } else {
            "leading".into()
        };
        println!(
            "mint {} at {}: {role}",
            s(&v["daemon"]["version"]),
            url(conn, "")
        );
        println!();
        println!(
            "{:<16} {:>5} {:>8} {:>8} {:>9} {:>11} {:>7} {:>5}  STATE",
            "TIER", "K", "DESIRED", "RUNNING", "DEPLOYING", "UNDEPLOYING", "FAILED", "POOL"
        );
        for r in v["tiers"].as_array().into_iter().flatten() {
            let c = &r["counts"];
            let state = match (r["settled"] == true, r["blocked"].as_str()) {
                (true, _) => "settled".to_string(),
                (false, Some(b)) => format!("blocked: {b}"),
                (false, None) => "in progress".to_string(),
            };
            println!(
                "{:<16} {:>5} {:>8} {:>8} {:>9} {:>11} {:>7} {:>5}  {state}",
                s(&r["tier"]),
                s(&r["max-instances"]),
                s(&r["desired"]),
                s(&c["deployed"]),
                s(&c["deploying"]),
                s(&c["undeploying"]),
                s(&c["failed"]),
                s(&r["pool-depth"]),
            );
        }
        println!();
        let n = &v["nodes"];
        println!(
            "nodes: {} free, {} deploying, {} in service, {} failed, {} in maintenance",
            s(&n["free"]),
            s(&n["deploying"]),
            s(&n["in-service"]),
            s(&n["failed"]),
            s(&n["maintenance"])
        );
        let flights = v["in-flight"].as_array().cloned().unwrap_or_default();
        if flights.is_empty() {
            println!("in flight: nothing");
        } else {
            println!("in flight:");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            for f in flights {
                let secs =
                    now.saturating_sub(f["since-ms"].as_u64().unwrap_or(now)) as f64 / 1000.0;
                println!(
                    "  {}/{} {} on node {} for {secs:.1} s",
                    s(&f["tier"]),
                    s(&f["index"]),
                    s(&f["action"]),
                    s(&f["node"])
                );
            }
        }
    });
    Ok(())
}
