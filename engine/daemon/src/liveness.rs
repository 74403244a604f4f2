//! Node liveness: agents' heartbeats with their load, the failure detector that declares a
//! silent node failed (so reconciliation redeploys its instance, with the same identity, on
//! a fresh node), and fencing: an agent that reports an instance its node no longer holds,
//! such as one coming back after its node was declared failed, is told to stop it.
//!
//! Heartbeats live in memory: after a restart every node gets a full timeout of grace from
//! the moment the daemon first looks at it, so a restart never fails healthy nodes.

use crate::auth::Caller;
use crate::{ApiError, ApiResult, App, Shared, body, ok};
use axum::Json;
use axum::extract::{Extension, Path, State};
use mint_model::NodeState;
use mint_model::records::InstanceId;
use serde::Deserialize;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Loads kept per node, for load rules that look back over a duration.
const HISTORY: usize = 600;

/// What the daemon knows of one agent.
struct Seen {
    at: Instant,
    loads: VecDeque<(Instant, u32)>,
}

/// Heartbeats by node name.
pub struct Liveness {
    seen: Mutex<HashMap<String, Seen>>,
    timeout: Duration,
}

impl Liveness {
    /// Nodes are declared failed after `timeout` without a heartbeat.
    pub fn new(timeout: Duration) -> Liveness {
        Liveness {
            seen: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    /// Forgets every heartbeat, for a daemon that begins to lead: each node gets a full
    /// timeout of grace from the moment it is first looked at, as after a restart.
    pub fn clear(&self) {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Records a heartbeat.
    pub fn beat(&self, node: &str, load: u32) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let s = seen.entry(node.to_string()).or_insert_with(|| Seen {
            at: now,
            loads: VecDeque::new(),
        });
        s.at = now;
        s.loads.push_back((now, load));
        while s.loads.len() > HISTORY {
            s.loads.pop_front();
        }
    }

    /// How long each node heard from has been silent, by name.
    pub fn ages(&self) -> Vec<(String, Duration)> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut ages: Vec<_> = seen
            .iter()
            .map(|(n, s)| (n.clone(), s.at.elapsed()))
            .collect();
        ages.sort();
        ages
    }

    /// How long `node` has been silent; a node not heard of since the daemon started
    /// begins its grace now.
    fn silence(&self, node: &str) -> Duration {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.entry(node.to_string())
            .or_insert_with(|| Seen {
                at: Instant::now(),
                loads: VecDeque::new(),
            })
            .at
            .elapsed()
    }

    /// The node's loads reported within the last `window`, oldest first, and whether the
    /// reports cover the whole window (the first is at least `window` old).
    pub fn loads(&self, node: &str, window: Duration) -> (Vec<u32>, bool) {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = seen.get(node) else {
            return (Vec::new(), false);
        };
        let covered = s.loads.front().is_some_and(|(t, _)| t.elapsed() >= window);
        (
            s.loads
                .iter()
                .filter(|(t, _)| t.elapsed() <= window)
                .map(|(_, l)| *l)
                .collect(),
            covered,
        )
    }
}

/// Declares failed every agent-managed node silent for longer than the timeout (nodes
/// without an `agent-url` are managed by other means and never time out here).
pub fn fail_silent_nodes(app: &App) {
    let nodes = app.engine.store.node_handles();
    for n in nodes
        .iter()
        .filter(|n| n.properties.contains_key("agent-url"))
    {
        if matches!(n.state, NodeState::Failed | NodeState::Maintenance) {
            continue;
        }
        let silence = app.liveness.silence(&n.name);
        if silence > app.liveness.timeout {
            let reason = format!(
                "no heartbeat from its agent for {:.1} s (timeout {:.1} s)",
                silence.as_secs_f64(),
                app.liveness.timeout.as_secs_f64()
            );
            match app.engine.store.fail_node(&n.name, &reason) {
                Ok(held) => tracing::warn!(node = %n.name, instance = ?held, "{reason}"),
                Err(e) => tracing::warn!(node = %n.name, "cannot declare the node failed: {e}"),
            }
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    #[serde(default)]
    load: u32,
    /// The instance the agent runs, if any.
    #[serde(default)]
    instance: Option<InstanceId>,
    /// What the instance is doing on the node (`deploying`, `running`, `failed`); agents
    /// from before it was reported send none.
    #[serde(default)]
    state: Option<String>,
    /// Why, when it failed.
    #[serde(default)]
    detail: Option<String>,
    /// The masters the node caches (agents from before the cache send none).
    #[serde(default)]
    cached: Option<Vec<String>>,
}

/// `POST /v1/nodes/{name}/heartbeat`: the agent is alive, reports its load (per mille of
/// its capacity, 0-1000) and what it runs. The answer says whether to fence: stop the
/// instance because the node does not hold it (any more). An unknown node is 404, telling
/// the agent to register again.
#[utoipa::path(post, path = "/v1/nodes/{name}/heartbeat", tag = "nodes", params(("name" = String, Path, description = "The node")), request_body = Heartbeat,
    responses((status = 200, description = "Whether to fence", body = crate::views::HeartbeatAnswer), (status = 404, description = "Unknown node: register again", body = crate::views::ErrorBody)), security(("bearer" = [])))]
pub async fn heartbeat(
    State(app): State<Shared>,
    caller: Extension<Caller>,
    name: Path<String>,
    h: Result<Json<Heartbeat>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let answer = beat(&app, caller, name, h).await;
    app.metrics.heartbeat(match &answer {
        Ok((_, true)) => crate::metrics::Beat::Fenced,
        Ok((_, false)) => crate::metrics::Beat::Accepted,
        Err(_) => crate::metrics::Beat::Refused,
    });
    answer.map(|(r, _)| r)
}

/// [`heartbeat`]'s work: its answer, and whether it fences.
async fn beat(
    app: &Shared,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    h: Result<Json<Heartbeat>, axum::extract::rejection::JsonRejection>,
) -> Result<(axum::response::Response, bool), ApiError> {
    // Only the node's own agent speaks for it: another node's credential, or an operator's
    // token, would let it keep a dead node alive or learn whether to fence it.
    if !matches!(&caller, Caller::Node { name: own, .. } if *own == name) {
        return Err(ApiError(
            axum::http::StatusCode::FORBIDDEN,
            format!(
                "{} may not heartbeat for node `{name}`; each agent heartbeats with its own credential",
                caller.label()
            ),
        ));
    }
    let h = body(h)?;
    if h.load > 1000 {
        return Err(ApiError(
            axum::http::StatusCode::BAD_REQUEST,
            format!(
                "field `load`: {} is above 1000 (per mille of the node's capacity)",
                h.load
            ),
        ));
    }
    let node = app.engine.store.node(&name)?;
    app.liveness.beat(&name, h.load);
    if let Some(cached) = h.cached.clone() {
        if cached.len() > 10_000
            || cached
                .iter()
                .any(|d| d.len() != 71 || !d.starts_with("sha256:"))
        {
            return Err(ApiError(
                axum::http::StatusCode::BAD_REQUEST,
                "field `cached`: a list of at most 10,000 `sha256:<hex>` digests".into(),
            ));
        }
        app.engine.store.set_node_cached(&name, cached)?;
    }
    let fence = match (&h.instance, node.state) {
        (Some(i), NodeState::Failed) => Some(format!(
            "node `{name}` was declared failed; its instance {i} runs elsewhere now"
        )),
        (Some(i), _) if node.instance.as_ref() != Some(i) => {
            Some(format!("node `{name}` does not hold {i}"))
        }
        _ => None,
    };
    if let Some(why) = &fence {
        tracing::warn!(node = %name, "fencing: {why}");
    }
    // The node's health check: a deployed instance its agent reports failed fails its node,
    // so the instance is placed again elsewhere with its identity (guarded: only the
    // deployment the node holds now).
    if fence.is_none()
        && h.state.as_deref() == Some("failed")
        && let Some(id) = &h.instance
        && let Ok(inst) = app
            .engine
            .store
            .instances(&id.tier)
            .map(|all| all.into_iter().find(|i| i.id == *id))
        && let Some(inst) = inst.filter(|i| {
            i.state == mint_model::InstanceState::Deployed
                && i.node.as_deref() == Some(name.as_str())
        })
    {
        let why = format!(
            "health check: the agent reports {id} failed: {}",
            h.detail.as_deref().unwrap_or("no detail")
        );
        let state = mint_model::InstanceState::Deployed;
        if app.engine.store.fail_guarded(
            id,
            inst.deployment,
            state,
            mint_model::InstanceState::Failed,
            &why,
        )? {
            tracing::warn!(node = %name, "{why}");
            app.queue.add(&id.tier);
        }
    }
    let fenced = fence.is_some();
    Ok((ok(json!({ "fence": fenced, "reason": fence }))?, fenced))
}
