//! The `agent` driver: deploys an instance through the `mint-agent` on its node, over the
//! agent's HTTP API at the node's `agent-url` property. The manifest's `node-endpoints`
//! lets each call reach exactly that node's agent and nothing else.
//!
//! `deploy` hands the agent the artifact's URL and answers `deploying` (or the agent's state
//! when it already has this deployment); the engine then polls `status`. `undeploy` asks the
//! agent to stop the instance and release its address.

use mint_sdk::driver::{Deployment, Driver, InstanceState, Node, StatusReport};
use mint_sdk::{Config, Error};
use serde_json::{Value, json};

/// The driver; see the crate documentation.
pub struct Agent;

#[cfg(target_arch = "wasm32")]
fn request(method: &str, url: &str, body: Option<&Value>) -> Result<(u16, String), String> {
    use wasi::http::outgoing_handler;
    use wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
    let (scheme, rest) = url.split_once("://").ok_or("the URL needs a scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let headers = Fields::new();
    if body.is_some() {
        headers.append("content-type", b"application/json").map_err(|e| format!("{e:?}"))?;
    }
    let req = OutgoingRequest::new(headers);
    req.set_method(&if method == "POST" { Method::Post } else { Method::Get }).map_err(|_| "method")?;
    req.set_scheme(Some(&if scheme == "https" { Scheme::Https } else { Scheme::Http })).map_err(|_| "scheme")?;
    req.set_authority(Some(authority)).map_err(|_| "authority")?;
    req.set_path_with_query(Some(path)).map_err(|_| "path")?;
    let out = req.body().map_err(|_| "request body")?;
    if let Some(b) = body {
        let stream = out.write().map_err(|_| "request stream")?;
        stream.blocking_write_and_flush(b.to_string().as_bytes()).map_err(|e| format!("{e:?}"))?;
        drop(stream);
    }
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    OutgoingBody::finish(out, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let resp = pending.get().ok_or("no response")?.map_err(|_| "response taken twice")?.map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let body = resp.consume().map_err(|_| "response body")?;
    let stream = body.stream().map_err(|_| "response stream")?;
    let mut text = Vec::new();
    while let Ok(chunk) = stream.blocking_read(64 * 1024) {
        text.extend(chunk);
        if text.len() > 1 << 20 {
            return Err("the agent's answer exceeds 1 MiB".into());
        }
    }
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

#[cfg(not(target_arch = "wasm32"))]
fn request(_: &str, _: &str, _: Option<&Value>) -> Result<(u16, String), String> {
    Err("the agent driver reaches agents only as a WebAssembly component".into())
}

/// Calls the agent and returns its JSON answer; a failure names the node and the agent's
/// own error.
fn call(node: &Node, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Error> {
    let base = node.require_property("agent-url")?.trim_end_matches('/');
    let url = format!("{base}{path}");
    let (status, text) = request(method, &url, body).map_err(|e| Error::external(format!("node `{}`: {method} {url}: {e}", node.name)))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|_| Error::external(format!("node `{}`: the agent answered {status} with something that is not JSON", node.name)))?;
    if !(200..300).contains(&status) {
        let msg = v["error"].as_str().unwrap_or("no message");
        return Err(Error::external(format!("node `{}`: the agent refused {path} ({status}): {msg}", node.name)));
    }
    Ok(v)
}

/// The agent's status as the engine's instance state, for deployment `d`.
fn report(node: &Node, v: &Value, d: &Deployment) -> Result<StatusReport, Error> {
    let detail = v["detail"].as_str().unwrap_or_default().to_string();
    let ours = v["tier"].as_str() == Some(d.tier.as_str()) && v["index"].as_u64() == Some(u64::from(d.index));
    let state = match v["state"].as_str() {
        Some("absent") => InstanceState::Absent,
        Some(_) if !ours => {
            return Ok(StatusReport::new(
                InstanceState::Failed,
                format!("node `{}` runs {}/{} instead", node.name, v["tier"].as_str().unwrap_or("?"), v["index"]),
            ));
        }
        Some("deploying") => InstanceState::Deploying,
        Some("running") => InstanceState::Running,
        Some("failed") => InstanceState::Failed,
        other => return Err(Error::external(format!("node `{}`: the agent reports an unknown state {other:?}", node.name))),
    };
    Ok(StatusReport::new(state, detail))
}

impl Driver for Agent {
    fn deploy(node: &Node, d: &Deployment, _config: &Config) -> Result<StatusReport, Error> {
        if !d.artifact.url.contains("://") {
            return Err(Error::invalid_input(format!(
                "artifact URL `{}` is relative; start the daemon with --advertise-url so nodes can reach it",
                d.artifact.url
            )));
        }
        let body = json!({
            "tier": d.tier, "index": d.index, "hostname": d.hostname,
            "artifact-url": d.artifact.url, "version": d.artifact.digest,
        });
        let v = call(node, "POST", "/v1/deploy", Some(&body))?;
        report(node, &v, d)
    }

    fn undeploy(node: &Node, _d: &Deployment, _config: &Config) -> Result<(), Error> {
        call(node, "POST", "/v1/undeploy", Some(&json!({}))).map(|_| ())
    }

    fn status(node: &Node, d: &Deployment, _config: &Config) -> Result<StatusReport, Error> {
        let v = call(node, "GET", "/v1/status", None)?;
        report(node, &v, d)
    }
}

mint_sdk::export_driver!(Agent);
