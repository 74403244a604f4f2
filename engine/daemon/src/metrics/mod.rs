//! `GET /metrics`: what the daemon is doing, in Prometheus' text format, for any operator
//! token (read-only included). Counts of the pool (instances by tier and state, pool depth,
//! nodes by state) are read from the store at each scrape; what only this daemon sees as it
//! happens (deployments' latency, plugin calls, reconciliation steps, heartbeats, refused
//! requests) is recorded here as it happens and kept in memory, so it starts from zero when
//! the daemon starts, as Prometheus expects of counters.
//!
//! Architecture invariant: recording never waits on anything but a short mutex, and
//! nothing here is on the path of a decision; a scrape reads the store as any GET does.

mod text;

use crate::{ApiError, App, Shared};
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use mint_model::{InstanceState, NodeState};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;
pub use text::CONTENT_TYPE;
use text::{Exposition, Histogram, Kind};

/// Deployments take from seconds (a container) to many minutes (a machine's firmware).
static DEPLOY_BOUNDS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Plugin calls: a policy's select takes milliseconds, a driver's call waits on a BMC.
static CALL_BOUNDS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0,
];
/// Reconciliation steps and HTTP requests.
static STEP_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Why a request was refused before its handler ran, as `mint_auth_failures_total` labels it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Refusal {
    /// No bearer credential.
    Missing,
    /// A credential nobody holds (revoked or never issued).
    Unknown,
    /// A known caller asking for what its identity does not reach.
    Forbidden,
    /// An address over its failed authentications, answered 429 unread.
    Braked,
}

impl Refusal {
    const ALL: [Refusal; 4] = [
        Refusal::Missing,
        Refusal::Unknown,
        Refusal::Forbidden,
        Refusal::Braked,
    ];
    fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing-credential",
            Refusal::Unknown => "unknown-credential",
            Refusal::Forbidden => "forbidden",
            Refusal::Braked => "too-many-failures",
        }
    }
}

/// How a heartbeat was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Beat {
    /// Taken.
    Accepted,
    /// Taken, and the agent told to stop an instance its node does not hold.
    Fenced,
    /// Refused (bad input, an unknown node, another node's credential).
    Refused,
}

impl Beat {
    const ALL: [Beat; 3] = [Beat::Accepted, Beat::Fenced, Beat::Refused];
    fn label(self) -> &'static str {
        match self {
            Beat::Accepted => "accepted",
            Beat::Fenced => "fenced",
            Beat::Refused => "refused",
        }
    }
}

/// Why an instance was deployed: a new deployment on a node (scale-out, replacing a failed
/// node) or a roll to a new master on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    ScaleOut,
    Roll,
}

/// Plugin calls, by plugin, call and outcome: wall time, and the parts of it spent in the
/// sandbox and waiting on outbound requests.
struct CallFamily {
    wall: Histogram,
    sandbox: Histogram,
    waiting: Histogram,
}

/// A deployment the reconciler started and has not seen end.
struct Pending {
    deployment: u64,
    cause: Cause,
    started_ms: u64,
}

/// What the daemon records as it happens.
pub struct Metrics {
    scale_out: Mutex<BTreeMap<String, Histogram>>,
    roll: Mutex<BTreeMap<String, Histogram>>,
    pending: Mutex<HashMap<(String, u32), Pending>>,
    calls: Mutex<BTreeMap<(String, &'static str, &'static str), CallFamily>>,
    steps: Mutex<Histogram>,
    step_failures: Mutex<u64>,
    heartbeats: Mutex<BTreeMap<Beat, u64>>,
    refusals: Mutex<BTreeMap<Refusal, u64>>,
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    request_seconds: Mutex<BTreeMap<String, Histogram>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            scale_out: Mutex::default(),
            roll: Mutex::default(),
            pending: Mutex::default(),
            calls: Mutex::default(),
            steps: Mutex::new(Histogram::new(&STEP_BOUNDS)),
            step_failures: Mutex::default(),
            heartbeats: Mutex::default(),
            refusals: Mutex::default(),
            requests: Mutex::default(),
            request_seconds: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    crate::auth::now_ms()
}

impl Metrics {
    /// The observer the plugin runtime tells of every finished call.
    pub fn plugin_observer(self: &std::sync::Arc<Self>) -> mint_plugins::CallObserver {
        let me = std::sync::Arc::downgrade(self);
        std::sync::Arc::new(move |c: &mint_plugins::CallRecord<'_>| {
            if let Some(me) = me.upgrade() {
                let mut calls = lock(&me.calls);
                let f = calls
                    .entry((c.plugin.to_string(), c.call, c.outcome))
                    .or_insert_with(|| CallFamily {
                        wall: Histogram::new(&CALL_BOUNDS),
                        sandbox: Histogram::new(&CALL_BOUNDS),
                        waiting: Histogram::new(&CALL_BOUNDS),
                    });
                f.wall.observe(c.elapsed.as_secs_f64());
                f.sandbox.observe(c.in_guest.as_secs_f64());
                f.waiting.observe(c.waited.as_secs_f64());
            }
        })
    }

    /// A deployment of `tier`'s instance `index` begins: its `deployment` number was
    /// committed at `started_ms`, which is when the engine decided on it.
    pub fn deployment_started(
        &self,
        tier: &str,
        index: u32,
        deployment: u64,
        cause: Cause,
        started_ms: u64,
    ) {
        lock(&self.pending).insert(
            (tier.to_string(), index),
            Pending {
                deployment,
                cause,
                started_ms,
            },
        );
    }

    /// A call about deployment `deployment` of `tier`'s instance `index` came back:
    /// `finished` says the instance runs, `ended` that the deployment is over either way
    /// (given up, or overtaken by a newer decision). A deployment this daemon did not see
    /// start (an earlier leader's) is not observed: its start is not known here.
    pub fn deployment_answered(
        &self,
        tier: &str,
        index: u32,
        deployment: u64,
        finished: bool,
        ended: bool,
    ) {
        if !finished && !ended {
            return;
        }
        let key = (tier.to_string(), index);
        let p = {
            let mut pending = lock(&self.pending);
            if pending.get(&key).is_none_or(|p| p.deployment != deployment) {
                return;
            }
            match pending.remove(&key) {
                Some(p) => p,
                None => return,
            }
        };
        if finished {
            let seconds = now_ms().saturating_sub(p.started_ms) as f64 / 1000.0;
            let family = match p.cause {
                Cause::ScaleOut => &self.scale_out,
                Cause::Roll => &self.roll,
            };
            lock(family)
                .entry(tier.to_string())
                .or_insert_with(|| Histogram::new(&DEPLOY_BOUNDS))
                .observe(seconds);
        }
    }

    /// Forgets deployments in progress, for a daemon that begins to lead: it did not see
    /// them start in this term.
    pub fn forget_pending(&self) {
        lock(&self.pending).clear();
    }

    /// One reconciliation step took `took`; `failed` if it could not plan.
    pub fn step(&self, took: Duration, failed: bool) {
        lock(&self.steps).observe(took.as_secs_f64());
        if failed {
            *lock(&self.step_failures) += 1;
        }
    }

    /// A heartbeat was answered so.
    pub fn heartbeat(&self, beat: Beat) {
        *lock(&self.heartbeats).entry(beat).or_default() += 1;
    }

    /// A request was refused before its handler, for this reason.
    pub fn refused(&self, why: Refusal) {
        *lock(&self.refusals).entry(why).or_default() += 1;
    }

    fn request(&self, route: &str, method: &str, status: u16, took: Duration) {
        *lock(&self.requests)
            .entry((route.to_string(), method.to_string(), status))
            .or_default() += 1;
        lock(&self.request_seconds)
            .entry(route.to_string())
            .or_insert_with(|| Histogram::new(&STEP_BOUNDS))
            .observe(took.as_secs_f64());
    }
}

/// The middleware that counts every request by route template (never by its path, which
/// would name tokens and digests), method and status.
pub async fn count_requests(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    app.metrics.request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// `GET /metrics`.
#[utoipa::path(get, path = "/metrics", tag = "daemon",
    responses((status = 200, description = "Prometheus' text format, version 0.0.4", content_type = "text/plain")), security(("bearer" = [])))]
pub async fn scrape(State(app): State<Shared>) -> Result<Response, ApiError> {
    let text = crate::off_async_threads(|| exposition(&app))?;
    Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response())
}

const INSTANCE_STATES: [(InstanceState, &str); 5] = [
    (InstanceState::Pooled, "pooled"),
    (InstanceState::Deploying, "deploying"),
    (InstanceState::Deployed, "deployed"),
    (InstanceState::Undeploying, "undeploying"),
    (InstanceState::Failed, "failed"),
];

const NODE_STATES: [(NodeState, &str); 5] = [
    (NodeState::Free, "free"),
    (NodeState::Deploying, "deploying"),
    (NodeState::InService, "in-service"),
    (NodeState::Failed, "failed"),
    (NodeState::Maintenance, "maintenance"),
];

/// The whole exposition: the store's counts read now, then what was recorded.
fn exposition(app: &App) -> Result<String, ApiError> {
    let m = &app.metrics;
    let store = &app.engine.store;
    let mut e = Exposition::default();
    e.family(
        "mint_build_info",
        Kind::Gauge,
        "Always 1; its label names the daemon's version.",
    );
    e.sample(
        "mint_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    e.family(
        "mint_leader",
        Kind::Gauge,
        "1 while this daemon leads (acts on the pool), 0 while it follows.",
    );
    e.sample(
        "mint_leader",
        &[],
        f64::from(u8::from(app.leadership.is_leading())),
    );

    let tiers = store.tiers()?;
    let mut counts = Vec::with_capacity(tiers.len());
    for t in &tiers {
        let inst = store.instances(&t.name)?;
        let mut by_state = [0u32; 5];
        for i in &inst {
            if let Some(k) = INSTANCE_STATES.iter().position(|(s, _)| *s == i.state) {
                by_state[k] += 1;
            }
        }
        let depth = inst.iter().filter(|i| !i.state.holds_node()).count();
        counts.push((by_state, depth));
    }
    e.family(
        "mint_tier_max_instances",
        Kind::Gauge,
        "K: the instances minted for the tier, its hard maximum.",
    );
    for t in &tiers {
        e.sample(
            "mint_tier_max_instances",
            &[("tier", &t.name)],
            f64::from(t.max_instances),
        );
    }
    e.family(
        "mint_tier_desired_instances",
        Kind::Gauge,
        "The instances the tier is asked to run.",
    );
    for t in &tiers {
        e.sample(
            "mint_tier_desired_instances",
            &[("tier", &t.name)],
            f64::from(t.desired),
        );
    }
    e.family(
        "mint_instances",
        Kind::Gauge,
        "The tier's instances by state (pooled, deploying, deployed, undeploying, failed).",
    );
    for (t, (by_state, _)) in tiers.iter().zip(&counts) {
        for ((_, name), n) in INSTANCE_STATES.iter().zip(by_state) {
            e.sample(
                "mint_instances",
                &[("tier", &t.name), ("state", name)],
                f64::from(*n),
            );
        }
    }
    e.family(
        "mint_pool_depth",
        Kind::Gauge,
        "The tier's instances on no node (pooled, or failed and waiting for a node): how many more it can deploy.",
    );
    for (t, (_, depth)) in tiers.iter().zip(&counts) {
        e.sample("mint_pool_depth", &[("tier", &t.name)], *depth as f64);
    }
    let nodes = store.node_handles();
    e.family("mint_nodes", Kind::Gauge, "Nodes by state.");
    for (state, name) in NODE_STATES {
        let n = nodes.iter().filter(|n| n.state == state).count();
        e.sample("mint_nodes", &[("state", name)], n as f64);
    }
    e.family(
        "mint_driver_calls_in_flight",
        Kind::Gauge,
        "Driver calls this daemon has in flight for the tier.",
    );
    for t in &tiers {
        let n = app.status.get(&t.name).in_flight.len();
        e.sample(
            "mint_driver_calls_in_flight",
            &[("tier", &t.name)],
            n as f64,
        );
    }

    let deploy_help = [
        (
            "mint_scale_out_seconds",
            &m.scale_out,
            "From the engine's decision to deploy an instance on a node (its binding) to the instance running there.",
        ),
        (
            "mint_roll_seconds",
            &m.roll,
            "From the decision to roll a deployed instance to the tier's new master to it running again.",
        ),
    ];
    for (name, family, help) in deploy_help {
        e.family(name, Kind::Histogram, help);
        let family = lock(family);
        for t in &tiers {
            let empty = Histogram::new(&DEPLOY_BOUNDS);
            let h = family.get(&t.name).unwrap_or(&empty);
            e.histogram(name, &[("tier", &t.name)], h);
        }
    }

    {
        let calls = lock(&m.calls);
        let parts: [(&str, &str, fn(&CallFamily) -> &Histogram); 3] = [
            (
                "mint_plugin_call_seconds",
                "Plugin calls' wall time, instantiation included, by plugin, call and outcome.",
                |f| &f.wall,
            ),
            (
                "mint_plugin_call_sandbox_seconds",
                "The part of each plugin call spent running the plugin's own code in its sandbox.",
                |f| &f.sandbox,
            ),
            (
                "mint_plugin_call_waiting_seconds",
                "The part of each plugin call spent waiting on its outbound HTTP requests (a BMC, an agent).",
                |f| &f.waiting,
            ),
        ];
        for (name, help, part) in parts {
            e.family(name, Kind::Histogram, help);
            for ((plugin, call, outcome), f) in calls.iter() {
                e.histogram(
                    name,
                    &[("plugin", plugin), ("call", call), ("outcome", outcome)],
                    part(f),
                );
            }
        }
    }

    e.family(
        "mint_reconcile_queue_depth",
        Kind::Gauge,
        "Tiers waiting for a reconciliation step.",
    );
    e.sample("mint_reconcile_queue_depth", &[], app.queue.depth() as f64);
    e.family(
        "mint_reconcile_step_seconds",
        Kind::Histogram,
        "How long one reconciliation step of one tier took (planning and committing; driver calls run after it).",
    );
    e.histogram("mint_reconcile_step_seconds", &[], &lock(&m.steps));
    e.family(
        "mint_reconcile_step_failures_total",
        Kind::Counter,
        "Reconciliation steps that could not plan (the store refused or failed).",
    );
    e.sample(
        "mint_reconcile_step_failures_total",
        &[],
        *lock(&m.step_failures) as f64,
    );

    e.family(
        "mint_heartbeats_total",
        Kind::Counter,
        "Agents' heartbeats by how they were answered.",
    );
    {
        let beats = lock(&m.heartbeats);
        for b in Beat::ALL {
            let n = beats.get(&b).copied().unwrap_or(0);
            e.sample("mint_heartbeats_total", &[("outcome", b.label())], n as f64);
        }
    }
    e.family(
        "mint_node_heartbeat_age_seconds",
        Kind::Gauge,
        "Seconds since the node's agent last reported to this daemon.",
    );
    for (node, age) in app.liveness.ages() {
        e.sample(
            "mint_node_heartbeat_age_seconds",
            &[("node", &node)],
            age.as_secs_f64(),
        );
    }
    e.family(
        "mint_auth_failures_total",
        Kind::Counter,
        "Requests refused before their handler ran, by why.",
    );
    {
        let refusals = lock(&m.refusals);
        for r in Refusal::ALL {
            let n = refusals.get(&r).copied().unwrap_or(0);
            e.sample(
                "mint_auth_failures_total",
                &[("reason", r.label())],
                n as f64,
            );
        }
    }
    e.family(
        "mint_http_requests_total",
        Kind::Counter,
        "API requests by route template, method and status code.",
    );
    for ((route, method, status), n) in lock(&m.requests).iter() {
        e.sample(
            "mint_http_requests_total",
            &[
                ("route", route),
                ("method", method),
                ("code", &status.to_string()),
            ],
            *n as f64,
        );
    }
    e.family(
        "mint_http_request_seconds",
        Kind::Histogram,
        "API requests' duration by route template.",
    );
    for (route, h) in lock(&m.request_seconds).iter() {
        e.histogram("mint_http_request_seconds", &[("route", route)], h);
    }
    Ok(e.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployment_is_observed_once_and_only_its_own_answer_counts() {
        let m = Metrics::default();
        m.deployment_started("web", 3, 7, Cause::ScaleOut, now_ms() - 2_000);
        // An answer about an older deployment of the same instance says nothing of this one.
        m.deployment_answered("web", 3, 6, true, true);
        assert!(lock(&m.scale_out).get("web").is_none());
        m.deployment_answered("web", 3, 7, false, false);
        m.deployment_answered("web", 3, 7, true, true);
        m.deployment_answered("web", 3, 7, true, true);
        let h = lock(&m.scale_out);
        let h = h.get("web").expect("observed");
        assert_eq!(h.count(), 1);
        assert!(
            h.sum_seconds() >= 2.0,
            "the latency counts from the decision"
        );
        assert!(lock(&m.roll).is_empty());
    }

    #[test]
    fn a_deployment_given_up_is_not_observed() {
        let m = Metrics::default();
        m.deployment_started("web", 1, 1, Cause::Roll, now_ms());
        m.deployment_answered("web", 1, 1, false, true);
        m.deployment_answered("web", 1, 1, true, true);
        assert!(lock(&m.roll).is_empty());
    }
}
