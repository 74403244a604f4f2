//! `GET /metrics` against a real daemon: what a scrape says after a scale-out, who may
//! scrape, Debian's `promtool check metrics` on the live text, the Grafana dashboard's
//! queries against the exported names, and a real Prometheus scraping the daemon and
//! answering every one of the dashboard's queries.

use crate::support::{join, root, web_site};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `GET url` with `Authorization: auth` (none when empty): status, content type, body.
fn get(url: &str, auth: &str) -> (u16, String, String) {
    let mut r = ureq::get(url).timeout(Duration::from_secs(30));
    if !auth.is_empty() {
        r = r.set("Authorization", auth);
    }
    match r.call() {
        Ok(resp) => {
            let ct = resp.header("content-type").unwrap_or_default().to_string();
            (resp.status(), ct, resp.into_string().unwrap_or_default())
        }
        Err(ureq::Error::Status(code, resp)) => {
            (code, String::new(), resp.into_string().unwrap_or_default())
        }
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// The samples of an exposition, by series (name and labels as written).
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("a value: {l}")),
            };
            (series.to_string(), value)
        })
        .collect()
}

/// The families an exposition declares (`# TYPE NAME KIND`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every query of the dashboard in the repository, with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = root().join("docs/grafana/mint.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            out.push((
                p["title"].as_str().unwrap_or_default().to_string(),
                t["expr"].as_str().expect("an expr").to_string(),
            ));
        }
    }
    out
}

/// The metric names a query names: words that begin `mint_`, less a histogram's
/// `_bucket`, `_sum` or `_count`.
fn names_in(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("mint_") {
        let start = i + at;
        let word =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if word {
            let name = &expr[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_string());
        }
        i = end;
    }
    out
}

/// A Prometheus server from Debian's package, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts one scraping `target` (host:port) every second with the bearer token in
    /// `token_file`.
    fn start(dir: &std::path::Path, target: &str, token_file: &std::path::Path) -> Prometheus {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // The job docs/observing.md shows, with this daemon's address and token file.
        let doc = std::fs::read_to_string(root().join("docs/observing.md")).unwrap();
        let job = doc
            .split("```yaml\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("docs/observing.md shows a Prometheus job");
        assert!(job.contains("127.0.0.1:7600") && job.contains("prometheus.token"));
        let job = job
            .replace("127.0.0.1:7600", target)
            .replace("prometheus.token", &token_file.display().to_string());
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{job}"),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Debian's prometheus (cargo xtask setup installs it)");
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    /// An instant query's answer, or why it failed.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let answer = ureq::get(&format!("{}/api/v1/query", self.url))
            .query("query", expr)
            .timeout(Duration::from_secs(10))
            .call();
        let body: Value = match answer {
            Ok(r) => r.into_json().map_err(|e| e.to_string())?,
            Err(ureq::Error::Status(code, r)) => {
                return Err(format!("{code}: {}", r.into_string().unwrap_or_default()));
            }
            Err(e) => return Err(e.to_string()),
        };
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Waits (bounded) until `expr` answers one series whose value is `want`.
    fn wait_for(&self, expr: &str, want: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        while Instant::now() < deadline {
            match self.query(expr) {
                Ok(r) if r.len() == 1 && r[0]["value"][1] == want => return,
                Ok(r) => last = format!("{r:?}"),
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("Prometheus never answered {expr} = {want} within {limit:?}; last: {last}");
    }
}

#[test]
fn a_scrape_is_checked_by_promtool_and_answers_prometheus_and_the_dashboard() {
    let d = web_site("metrics", &[]);
    let dir = d
        .data
        .parent()
        .expect("the scratch directory")
        .to_path_buf();
    // `mint tier scale` waits until the tier is settled.
    d.mint(&["tier", "scale", "web", "3"]);
    let token_file = dir.join("prometheus.token");
    d.mint(&[
        "token",
        "create",
        "--name",
        "prometheus",
        "--role",
        "read-only",
        "--output",
        token_file.to_str().unwrap(),
    ]);
    let read_only = format!(
        "Bearer {}",
        std::fs::read_to_string(&token_file).unwrap().trim()
    );
    let metrics = format!("{}/metrics", d.url);

    // Who may scrape: any operator token; nobody without one, no node's credential.
    assert_eq!(get(&metrics, "").0, 401);
    assert_eq!(get(&metrics, "Bearer mint_op_nobody-holds-this").0, 401);
    let credential = join(&d.url, &d.data, "agent-1");
    assert_eq!(get(&metrics, &format!("Bearer {credential}")).0, 403);
    let beat = ureq::post(&format!("{}/v1/nodes/agent-1/heartbeat", d.url))
        .set("Authorization", &format!("Bearer {credential}"))
        .send_json(serde_json::json!({"load": 10}))
        .expect("a heartbeat");
    assert_eq!(beat.status(), 200);

    let (code, content_type, text) = get(&metrics, &read_only);
    assert_eq!(code, 200, "{text}");
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    assert!(
        !text.contains(read_only.trim_start_matches("Bearer ")) && !text.contains(&credential),
        "a scrape names no credential"
    );
    let s = samples(&text);
    let value = |series: &str| -> f64 {
        *s.get(series)
            .unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
    };
    assert_eq!(value(r#"mint_instances{tier="web",state="deployed"}"#), 3.0);
    assert_eq!(value(r#"mint_instances{tier="web",state="pooled"}"#), 5.0);
    assert_eq!(value(r#"mint_pool_depth{tier="web"}"#), 5.0);
    assert_eq!(value(r#"mint_tier_max_instances{tier="web"}"#), 8.0);
    assert_eq!(value(r#"mint_tier_desired_instances{tier="web"}"#), 3.0);
    assert_eq!(value(r#"mint_nodes{state="in-service"}"#), 3.0);
    assert_eq!(
        value(r#"mint_nodes{state="free"}"#),
        4.0,
        "three left and the agent's"
    );
    assert_eq!(value("mint_leader"), 1.0);
    assert_eq!(value(r#"mint_scale_out_seconds_count{tier="web"}"#), 3.0);
    assert_eq!(
        value(r#"mint_scale_out_seconds_bucket{tier="web",le="+Inf"}"#),
        3.0
    );
    assert!(
        value(r#"mint_plugin_call_seconds_count{plugin="noop",call="deploy",outcome="ok"}"#) >= 3.0
    );
    assert!(
        value(r#"mint_plugin_call_seconds_count{plugin="spread",call="select",outcome="ok"}"#)
            >= 1.0
    );
    assert!(s.contains_key(
        r#"mint_plugin_call_sandbox_seconds_sum{plugin="spread",call="select",outcome="ok"}"#
    ));
    assert!(value("mint_reconcile_step_seconds_count") >= 1.0);
    assert_eq!(value(r#"mint_heartbeats_total{outcome="accepted"}"#), 1.0);
    assert!(s.contains_key(r#"mint_node_heartbeat_age_seconds{node="agent-1"}"#));
    assert_eq!(
        value(r#"mint_auth_failures_total{reason="missing-credential"}"#),
        1.0
    );
    assert_eq!(
        value(r#"mint_auth_failures_total{reason="unknown-credential"}"#),
        1.0
    );
    assert_eq!(
        value(r#"mint_auth_failures_total{reason="forbidden"}"#),
        1.0
    );
    assert!(
        value(
            r#"mint_http_requests_total{route="/v1/tiers/{name}/scale",method="POST",code="200"}"#
        ) >= 1.0
    );

    // Debian's promtool reads the live scrape as Prometheus would and lints it.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("Debian's promtool (cargo xtask setup installs prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    // Every metric the dashboard queries is one the daemon exports.
    let exported = families(&text);
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "the dashboard has its panels");
    for (panel, expr) in &queries {
        let names = names_in(expr);
        assert!(
            !names.is_empty(),
            "panel `{panel}`: `{expr}` names no mint metric"
        );
        for n in names {
            assert!(
                exported.contains(&n),
                "panel `{panel}` queries `{n}`, which the daemon does not export (it exports {exported:?})"
            );
        }
    }

    // A real Prometheus scrapes the daemon with the read-only token and answers queries
    // about it, the dashboard's among them.
    let target = d.url.trim_start_matches("http://").to_string();
    let prometheus = Prometheus::start(&dir, &target, &token_file);
    prometheus.wait_for(r#"up{job="mint"}"#, "1", Duration::from_secs(90));
    prometheus.wait_for(
        r#"mint_instances{tier="web",state="deployed"}"#,
        "3",
        Duration::from_secs(30),
    );
    prometheus.wait_for(
        r#"mint_scale_out_seconds_count{tier="web"}"#,
        "3",
        Duration::from_secs(30),
    );
    for (panel, expr) in &queries {
        let answer = prometheus
            .query(expr)
            .unwrap_or_else(|e| panic!("panel `{panel}`: Prometheus refused `{expr}`: {e}"));
        // A rate needs two scrapes in its window, and a failure panel may rightly be empty;
        // every other query has something to show for this daemon.
        if !expr.contains("rate(") {
            assert!(
                !answer.is_empty(),
                "panel `{panel}`: `{expr}` answered nothing"
            );
        }
    }
}

#[test]
fn names_are_read_out_of_queries() {
    let n = names_in(
        "histogram_quantile(0.9, sum by (le) (rate(mint_a_seconds_bucket[5m]))) / mint_b_total + xmint_c",
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        vec!["mint_a_seconds".to_string(), "mint_b_total".to_string()]
    );
}
