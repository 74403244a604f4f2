//! The `agent` driver: deploys an instance through the `mint-agent` on its node, over the
//! agent's HTTP API at the node's `agent-url` property. The manifest's `node-endpoints`
//! lets each call reach exactly that node's agent and nothing else.
//!
//! `deploy` hands the agent the artifact's URL and answers `deploying` (or the agent's state
//! when it already has this deployment); the engine then polls `status`. `undeploy` asks the
//! agent to stop the instance and release its address.

use mint_sdk::driver::{Deployment, Driver, InstanceState, Node, StatusReport};
use mint_sdk::http::{Method, Request};
use mint_sdk::{Config, Error};
use serde_json::{Value, json};

/// The driver; see the crate documentation.
pub struct Agent;

/// Calls the agent and returns its JSON answer; a failure names the node and the agent's
/// own error.
fn call(node: &Node, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Error> {
    let base = node.require_property("agent-url")?.trim_end_matches('/');
    let url = format!("{base}{path}");
    let m = if method == "POST" {
        Method::Post
    } else {
        Method::Get
    };
    let request = match body {
        Some(b) => Request::json(m, &url, b),
        None => Request::new(m, &url),
    };
    let answer = request
        .send()
        .map_err(|e| Error::external(format!("node `{}`: {method} {url}: {e}", node.name)))?;
    let status = answer.status;
    let v: Value = answer.json().map_err(|_| {
        Error::external(format!(
            "node `{}`: the agent answered {status} with something that is not JSON",
            node.name
        ))
    })?;
    if !answer.is_success() {
        let msg = v["error"].as_str().unwrap_or("no message");
        return Err(Error::external(format!(
            "node `{}`: the agent refused {path} ({status}): {msg}",
            node.name
        )));
    }
    Ok(v)
}

/// The agent's status as the engine's instance state, for deployment `d`.
fn report(node: &Node, v: &Value, d: &Deployment) -> Result<StatusReport, Error> {
    let detail = v["detail"].as_str().unwrap_or_default().to_string();
    let ours = v["tier"].as_str() == Some(d.tier.as_str())
        && v["index"].as_u64() == Some(u64::from(d.index));
    let state = match v["state"].as_str() {
        Some("absent") => InstanceState::Absent,
        Some(_) if !ours => {
            return Ok(StatusReport::new(
                InstanceState::Failed,
                format!(
                    "node `{}` runs {}/{} instead",
                    node.name,
                    v["tier"].as_str().unwrap_or("?"),
                    v["index"]
                ),
            ));
        }
        Some("deploying") => InstanceState::Deploying,
        Some("running") => InstanceState::Running,
        Some("failed") => InstanceState::Failed,
        other => {
            return Err(Error::external(format!(
                "node `{}`: the agent reports an unknown state {other:?}",
                node.name
            )));
        }
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
