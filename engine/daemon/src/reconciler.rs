//! The daemon's reconciler: a work queue keyed by tier, a bounded pool of workers that each
//! run one step of one tier at a time, and the driver calls those steps return, each run in
//! its own task. A tier is queued when its intent, its nodes or its deployments change, and
//! every tier again on a tick, so the loop is level-triggered: a lost wake-up costs at most
//! one tick.
//!
//! Architecture invariant: no lock is held across a plugin call. A tier's step runs on one
//! worker at a time (the queue never hands out a tier that is being worked on), driver
//! calls run outside any step, and what they answer is committed under the store's guards.

use crate::App;
use mint_core::{Action, Effect, Progress, StepInput};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// How many tiers are stepped at once.
pub const WORKERS: usize = 8;

/// Tiers waiting for a step, as client-go's work queue keeps keys: a tier is queued at
/// most once, and a tier queued while it is being worked on is handed out again only
/// after that step is done.
#[derive(Default)]
pub struct Queue {
    state: Mutex<QueueState>,
    ready: Notify,
}

#[derive(Default)]
struct QueueState {
    order: VecDeque<String>,
    dirty: HashSet<String>,
    working: HashSet<String>,
}

impl Queue {
    /// Queues `tier` for a step.
    pub fn add(&self, tier: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !s.dirty.insert(tier.to_string()) {
            return;
        }
        if !s.working.contains(tier) {
            s.order.push_back(tier.to_string());
            drop(s);
            self.ready.notify_one();
        }
    }

    /// The next tier to step, marked as being worked on.
    async fn next(&self) -> String {
        loop {
            // Registered before looking, so a wake-up between the look and the wait is kept.
            let notified = self.ready.notified();
            {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(t) = s.order.pop_front() {
                    s.dirty.remove(&t);
                    s.working.insert(t.clone());
                    return t;
                }
            }
            notified.await;
        }
    }

    /// How many tiers wait for a step (those being worked on not counted).
    pub fn depth(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .order
            .len()
    }

    /// Marks `tier`'s step done, queueing it again if it was queued meanwhile.
    fn done(&self, tier: &str) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.working.remove(tier);
        if s.dirty.contains(tier) {
            s.order.push_back(tier.to_string());
            drop(s);
            self.ready.notify_one();
        }
    }
}

/// A driver call in flight, as `mint tier show` reports it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct InFlight {
    /// The instance's index.
    pub index: u32,
    /// What the call does: `deploy`, `poll`, `check`, `undeploy` or `roll`.
    #[schema(value_type = String)]
    pub action: Action,
    /// The node.
    pub node: String,
    /// When it started (ms since the epoch).
    pub since_ms: u64,
}

/// What the reconciler knows of one tier beyond the store: calls in flight, when each
/// instance was last asked about, and the last step's outcome. Kept in memory: after a
/// restart nothing is in flight, and the first step asks about every unfinished deployment.
#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct TierStatus {
    /// Calls in flight, by instance index.
    pub in_flight: BTreeMap<u32, InFlight>,
    /// When each instance was last asked about by `status`.
    #[serde(skip)]
    pub asked_ms: BTreeMap<u32, u64>,
    /// Why the tier cannot reach its intent, if it cannot (a placement short of nodes, a
    /// policy's refusal); cleared when a step finds nothing in its way.
    pub blocked: Option<String>,
    /// The last failure of a driver call, with the instance it was about.
    pub last_failure: Option<String>,
    /// The generation the last step worked toward.
    pub observed_generation: u64,
}

/// Every tier's status.
#[derive(Default)]
pub struct Statuses(Mutex<HashMap<String, TierStatus>>);

impl Statuses {
    /// A copy of `tier`'s status.
    pub fn get(&self, tier: &str) -> TierStatus {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(tier)
            .cloned()
            .unwrap_or_default()
    }
    fn with<T>(&self, tier: &str, f: impl FnOnce(&mut TierStatus) -> T) -> T {
        f(self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tier.to_string())
            .or_default())
    }
    /// Forgets every tier's calls and questions, for a daemon that begins to lead: what it
    /// knew from an earlier term is stale, and the first step asks about everything.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Forgets a deleted tier.
    pub fn forget(&self, tier: &str) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(tier);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How often an unfinished deployment is polled.
pub const POLL_EVERY_MS: u64 = 1000;

/// Queues every tier (the tick, and changes that concern any tier, such as a new node).
pub fn queue_all(app: &App) {
    match app.engine.store.tiers() {
        Ok(tiers) => tiers.iter().for_each(|t| app.queue.add(&t.name)),
        Err(e) => tracing::error!("cannot list tiers: {e}"),
    }
}

/// Starts the workers; they stop when `stop` changes.
pub fn start(
    app: Arc<App>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WORKERS)
        .map(|_| {
            let (app, mut stop) = (app.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    let tier = tokio::select! {
                        t = app.queue.next() => t,
                        _ = stop.changed() => return,
                    };
                    step(&app, &tier).await;
                    app.queue.done(&tier);
                }
            })
        })
        .collect()
}

/// One step of one tier: the load rule, the plan and its intents, then its driver calls
/// started in their own tasks.
async fn step(app: &Arc<App>, tier: &str) {
    // Only the leader reconciles; a tier queued before this daemon stopped leading waits
    // for the next leader's own tick.
    if !app.leadership.is_leading() {
        return;
    }
    let t = match app.engine.store.tier(tier) {
        Ok(t) => t,
        Err(_) => {
            app.status.forget(tier);
            return;
        }
    };
    crate::autoscale::decide(app, &t);
    let (busy, asked): (BTreeSet<u32>, BTreeMap<u32, u64>) = app.status.with(tier, |s| {
        (s.in_flight.keys().copied().collect(), s.asked_ms.clone())
    });
    // Nodes with an agent report their instance's state by heartbeat.
    let store = &app.engine.store;
    let reporting = |name: &str| store.node_has_property(name, "agent-url");
    let input = StepInput {
        busy: &busy,
        asked_ms: &asked,
        reporting: &reporting,
        poll_every_ms: POLL_EVERY_MS,
        check_every_ms: app
            .engine
            .health_check_ms
            .load(std::sync::atomic::Ordering::Relaxed),
    };
    let generation = t.generation;
    let started = std::time::Instant::now();
    let stepped = app.engine.step(tier, &input).await;
    app.metrics.step(started.elapsed(), stepped.is_err());
    let (progress, effects) = match stepped {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(tier, "step failed: {e}");
            let blocked = Some(e.to_string());
            app.status.with(tier, |s| s.blocked = blocked);
            return;
        }
    };
    record_blocked(app, tier, &progress, effects.is_empty(), generation);
    for effect in effects {
        launch(app, effect);
    }
}

/// Keeps the step's `blocked`, and records it as an event when it changes, so a tier that
/// waits for nodes says so once, not on every tick.
fn record_blocked(app: &App, tier: &str, progress: &Progress, idle: bool, generation: u64) {
    let changed = app.status.with(tier, |s| {
        if s.observed_generation != generation {
            // A new intent: failures met on the way to the old one say nothing of it.
            s.last_failure = None;
        }
        s.observed_generation = generation;
        let was = s.blocked.clone();
        match &progress.blocked {
            Some(b) => s.blocked = Some(b.clone()),
            // A step that did something, or found nothing to do, is no longer blocked.
            None if !idle || progress == &Progress::default() => s.blocked = None,
            None => {}
        }
        (was != s.blocked).then(|| s.blocked.clone()).flatten()
    });
    if let Some(why) = changed {
        tracing::warn!(tier, "blocked: {why}");
        let _ = app.engine.store.note_tier(
            tier,
            "blocked",
            format!("tier `{tier}` is blocked: {why}"),
            serde_json::json!({ "generation": generation }),
        );
    }
}

/// Runs one driver call in its own task; when it comes back, the tier is queued again.
fn launch(app: &Arc<App>, effect: Effect) {
    let tier = effect.id().tier.clone();
    let index = effect.id().index;
    let flight = InFlight {
        index,
        action: effect.action,
        node: effect.node.name.clone(),
        since_ms: now_ms(),
    };
    let cause = match effect.action {
        Action::Deploy => Some(crate::metrics::Cause::ScaleOut),
        Action::Roll => Some(crate::metrics::Cause::Roll),
        _ => None,
    };
    let deployment = effect.instance.deployment;
    if let Some(cause) = cause {
        app.metrics.deployment_started(
            &tier,
            index,
            deployment,
            cause,
            effect.instance.deployment_started_ms,
        );
    }
    app.status.with(&tier, |s| {
        s.in_flight.insert(index, flight);
        if matches!(effect.action, Action::Poll | Action::Check) {
            s.asked_ms.insert(index, now_ms());
        }
    });
    let app2 = app.clone();
    let task = async move {
        let outcome = app2.engine.carry_out(&effect).await;
        if let Ok(o) = &outcome {
            app2.metrics.deployment_answered(
                &tier,
                index,
                deployment,
                o.finished,
                o.failed || o.discarded || o.released,
            );
        }
        let failure = match outcome {
            Ok(o) => o.failure.map(|f| format!("{}: {f}", effect.id())),
            Err(e) => Some(format!("{}: {e}", effect.id())),
        };
        app2.status.with(&tier, |s| {
            s.in_flight.remove(&index);
            if let Some(f) = failure {
                tracing::warn!(tier = %tier, "{f}");
                s.last_failure = Some(f);
            }
        });
        app2.queue.add(&tier);
    };
    let mut calls = app.calls.lock().unwrap_or_else(|p| p.into_inner());
    // Finished tasks are reaped as new ones start, so the set stays as large as what runs.
    while calls.try_join_next().is_some() {}
    calls.spawn(task);
}

#[cfg(test)]
mod tests {
    use super::Queue;
    use std::time::Duration;

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_tier_is_queued_once_and_never_handed_to_two_workers() {
        run(async {
            let q = Queue::default();
            q.add("a");
            q.add("b");
            q.add("a");
            assert_eq!(q.next().await, "a");
            // Queued again while it is worked on: not handed out until that step is done.
            q.add("a");
            assert_eq!(q.next().await, "b");
            let waiting = tokio::time::timeout(Duration::from_millis(50), q.next()).await;
            assert!(
                waiting.is_err(),
                "`a` was handed out while a worker held it"
            );
            q.done("a");
            assert_eq!(q.next().await, "a");
            q.done("a");
            q.done("b");
            assert!(
                tokio::time::timeout(Duration::from_millis(50), q.next())
                    .await
                    .is_err(),
                "nothing is queued"
            );
        });
    }

    #[test]
    fn a_worker_waiting_is_woken_by_an_add() {
        run(async {
            let q = std::sync::Arc::new(Queue::default());
            let waiter = tokio::spawn({
                let q = q.clone();
                async move { q.next().await }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            q.add("late");
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(5), waiter)
                    .await
                    .unwrap()
                    .unwrap(),
                "late"
            );
        });
    }
}
