//! Reconciliation of one tier, split as a controller splits it: [`Engine::step`] reads the
//! tier, asks the planner ([`mint_model::plan`]) what to do, records the intents that need
//! no driver (bindings, instances leaving, rolls begun, deployments timed out) and returns
//! the driver calls to make as [`Effect`]s. [`Engine::carry_out`] makes one call and
//! commits what it says through a guarded store operation, so an answer that arrives after
//! a newer decision is discarded rather than applied.
//!
//! Architecture invariant: a step holds no lock and waits on no driver. Only the policy's
//! selection runs inside it; every driver call is an effect its caller runs when and how
//! it likes (the daemon: each in its own task, bounded by [`Permits`]).

use crate::{Engine, Progress, Result, config_value, now_ms, selection_request, wit_node};
use mint_model::InstanceState;
use mint_model::plan::{self, View};
use mint_model::records::{Instance, InstanceId, Node, Tier};
use mint_plugins::Kind;
use mint_plugins::types as wit;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

/// What one driver call is for: a closed set, so every caller handles every kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Deploy a freshly bound instance.
    Deploy,
    /// Ask about an unfinished deployment (and deploy again if the node lost it).
    Poll,
    /// Check a running instance's health.
    Check,
    /// Take an instance off its node.
    Undeploy,
    /// Redeploy a running instance on its node from the tier's new master.
    Roll,
}

/// One driver call to make, with what it is about as it was when it was planned.
#[derive(Debug, Clone)]
pub struct Effect {
    /// What the call does.
    pub action: Action,
    /// The instance, as committed when the call was planned: its deployment number is the
    /// guard its answer is committed under.
    pub instance: Instance,
    /// For a roll, the deployment being replaced (what `undeploy` is told about).
    pub previous: Option<Instance>,
    /// The node the instance is on.
    pub node: Node,
}

impl Effect {
    /// The instance the call is about.
    pub fn id(&self) -> &InstanceId {
        &self.instance.id
    }
    /// The endpoint the call reaches, by which calls are bounded per BMC host.
    pub fn endpoint(&self) -> Option<String> {
        self.node.endpoint()
    }
}

/// What a driver call came to.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Outcome {
    /// Whether the deployment finished (the instance is deployed).
    pub finished: bool,
    /// Whether the instance left its node.
    pub released: bool,
    /// Whether the deployment was given up (its node failed).
    pub failed: bool,
    /// Why the call failed or what it found failed, if it did.
    pub failure: Option<String>,
    /// Whether a guard discarded the answer (a newer decision stands).
    pub discarded: bool,
}

/// What a step knows of calls already made, and how often to ask about instances.
pub struct StepInput<'a> {
    /// Instances (by index) with a driver call in flight.
    pub busy: &'a BTreeSet<u32>,
    /// When each instance was last asked about (ms since the epoch).
    pub asked_ms: &'a BTreeMap<u32, u64>,
    /// Nodes whose agents report what they run (no driver health checks for them).
    pub reporting: &'a (dyn Fn(&str) -> bool + Sync),
    /// How often unfinished deployments are polled.
    pub poll_every_ms: u64,
    /// How often running instances are health-checked.
    pub check_every_ms: u64,
}

/// Bounds on driver calls shared by every tier: at most `limit` at once in all, and at most
/// `per_endpoint` at once to one endpoint (a BMC host or an agent), so a site's slow BMCs
/// neither flood the management network nor are asked for many things at once each.
pub struct Permits {
    limit: std::sync::atomic::AtomicUsize,
    per_endpoint: std::sync::atomic::AtomicUsize,
    global: Mutex<(usize, Arc<tokio::sync::Semaphore>)>,
    endpoints: Mutex<HashMap<String, (usize, Arc<tokio::sync::Semaphore>)>>,
}

/// The default bound of calls to one endpoint at once.
pub const PER_ENDPOINT: usize = 4;

/// Held while a driver call runs.
pub struct Held(#[allow(dead_code)] Vec<tokio::sync::OwnedSemaphorePermit>);

impl Permits {
    /// `limit` calls at once in all, `per_endpoint` to one endpoint.
    pub fn new(limit: usize, per_endpoint: usize) -> Permits {
        Permits {
            limit: limit.max(1).into(),
            per_endpoint: per_endpoint.max(1).into(),
            global: Mutex::new((0, Arc::new(tokio::sync::Semaphore::new(0)))),
            endpoints: Mutex::new(HashMap::new()),
        }
    }

    /// Changes the bounds for calls that start from now on (calls in flight keep theirs).
    pub fn set(&self, limit: usize, per_endpoint: usize) {
        self.limit
            .store(limit.max(1), std::sync::atomic::Ordering::Relaxed);
        self.per_endpoint
            .store(per_endpoint.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// The bound of calls at once in all.
    pub fn limit(&self) -> usize {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn semaphore(
        slot: &mut (usize, Arc<tokio::sync::Semaphore>),
        size: usize,
    ) -> Arc<tokio::sync::Semaphore> {
        // A changed bound takes effect through a fresh semaphore; permits of the old one
        // are returned to it and die with it.
        if slot.0 != size {
            *slot = (size, Arc::new(tokio::sync::Semaphore::new(size)));
        }
        slot.1.clone()
    }

    /// Waits for a permit for a call to `endpoint`: the endpoint's first, so a call waiting
    /// for a busy BMC does not hold one of the shared permits meanwhile.
    pub async fn acquire(&self, endpoint: Option<&str>) -> Held {
        let mut held = Vec::with_capacity(2);
        if let Some(e) = endpoint {
            let size = self.per_endpoint.load(std::sync::atomic::Ordering::Relaxed);
            let sem = {
                let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
                Self::semaphore(
                    map.entry(e.to_string())
                        .or_insert_with(|| (0, Arc::new(tokio::sync::Semaphore::new(0)))),
                    size,
                )
            };
            // Never closed, so acquiring cannot fail.
            if let Ok(p) = sem.acquire_owned().await {
                held.push(p);
            }
        }
        let sem = Self::semaphore(
            &mut self.global.lock().unwrap_or_else(|p| p.into_inner()),
            self.limit(),
        );
        if let Ok(p) = sem.acquire_owned().await {
            held.push(p);
        }
        Held(held)
    }
}

impl Engine {
    /// Plans one step of `tier_name` toward its intent and records what needs no driver:
    /// deployments past their timeout fail, surplus instances start leaving, a batch starts
    /// rolling, waiting instances are bound to the nodes the policy picks (as many as there
    /// are eligible free nodes; the rest wait, and `blocked` says what they need). Returns
    /// what it did and the driver calls to make.
    pub async fn step(
        &self,
        tier_name: &str,
        input: &StepInput<'_>,
    ) -> Result<(Progress, Vec<Effect>)> {
        let tier = self.store.tier(tier_name)?;
        let mut instances = self.store.instances(tier_name)?;
        let now = now_ms();
        let p = plan::plan(View {
            tier: &tier,
            instances: &instances,
            busy: input.busy,
            asked_ms: input.asked_ms,
            reporting: input.reporting,
            now_ms: now,
            poll_every_ms: input.poll_every_ms,
            check_every_ms: input.check_every_ms,
        });
        let mut progress = Progress::default();
        let mut effects = Vec::new();
        if p.is_empty() {
            return Ok((progress, effects));
        }
        let at =
            |instances: &[Instance], x: u32| instances.iter().find(|i| i.id.index == x).cloned();
        for x in &p.timed_out {
            let Some(i) = at(&instances, *x) else {
                continue;
            };
            let why = format!(
                "the deployment of {} did not finish within the tier's deploy timeout of {} s",
                i.id, tier.deploy_timeout_secs
            );
            if self.store.fail_guarded(
                &i.id,
                i.deployment,
                InstanceState::Deploying,
                InstanceState::Failed,
                &why,
            )? {
                progress.failed.push(i.id.clone());
                progress.blocked = Some(why);
            }
        }
        if !p.undeploy.is_empty() {
            let ids: Vec<InstanceId> = p
                .undeploy
                .iter()
                .filter_map(|x| at(&instances, *x))
                .map(|i| i.id)
                .collect();
            self.store
                .begin_undeploy(&ids, &format!("tier scaled in to {}", tier.desired))?;
            progress.undeployed = ids;
        }
        if !p.roll.is_empty() {
            let ids: Vec<InstanceId> = p
                .roll
                .iter()
                .filter_map(|x| at(&instances, *x))
                .map(|i| i.id)
                .collect();
            self.store.begin_roll(&ids)?;
            progress.rolled = ids;
        }
        let before = instances.clone();
        if !(p.timed_out.is_empty() && p.undeploy.is_empty() && p.roll.is_empty()) {
            instances = self.store.instances(tier_name)?;
        }
        let mut effect = |action, x: u32, previous: Option<Instance>| -> Result<()> {
            let Some(i) = at(&instances, x) else {
                return Ok(());
            };
            let Some(node) = i.node.as_deref() else {
                return Ok(());
            };
            effects.push(Effect {
                action,
                node: self.node(node)?,
                instance: i,
                previous,
            });
            Ok(())
        };
        // An instance that begins leaving while a call about it runs is undeployed once
        // that call has come back (the planner sees it undeploying and not busy).
        for x in p
            .undeploy
            .iter()
            .filter(|x| !input.busy.contains(x))
            .chain(&p.finish_undeploy)
        {
            effect(Action::Undeploy, *x, None)?;
        }
        for x in &p.roll {
            effect(Action::Roll, *x, at(&before, *x))?;
        }
        for x in &p.poll {
            effect(Action::Poll, *x, None)?;
        }
        for x in &p.check {
            effect(Action::Check, *x, None)?;
        }
        if !p.place.is_empty() {
            for i in self
                .place(&tier, &instances, &p.place, &mut progress)
                .await?
            {
                let node = self.node(i.node.as_deref().unwrap_or_default())?;
                effects.push(Effect {
                    action: Action::Deploy,
                    node,
                    instance: i,
                    previous: None,
                });
            }
        }
        Ok((progress, effects))
    }

    /// Binds waiting instances (`waiting`, in order) to nodes the policy picks, as many as
    /// there are eligible free nodes, in one transaction. Returns the instances as bound.
    async fn place(
        &self,
        tier: &Tier,
        instances: &[Instance],
        waiting: &[u32],
        progress: &mut Progress,
    ) -> Result<Vec<Instance>> {
        let want = waiting.len();
        let nodes = self.store.node_handles();
        let eligible = nodes
            .iter()
            .filter(|n| n.state.can_select() && n.instance.is_none() && n.meets(&tier.requirements))
            .count();
        let count = want.min(eligible);
        if count == 0 {
            progress.blocked = Some(plan::unplaced(0, want, &tier.requirements));
            return Ok(Vec::new());
        }
        let (request, names) = selection_request(tier, nodes.iter().map(|n| &**n), count as u32);
        let policy = self
            .plugins
            .get(&tier.policy.plugin, Kind::NodePolicy, "policy")?;
        let chosen = match policy
            .select(&request, &names, config_value(&tier.policy).as_ref())
            .await
        {
            Ok(c) => c.value,
            Err(e) => {
                progress.blocked = Some(e.to_string());
                return Ok(Vec::new());
            }
        };
        let binds: Vec<(InstanceId, String, serde_json::Value)> = chosen
            .iter()
            .zip(waiting)
            .filter_map(|(choice, x)| {
                let inst = instances.iter().find(|i| i.id.index == *x)?;
                let detail = serde_json::json!({
                    "policy": tier.policy.plugin, "score": choice.score, "reason": choice.reason,
                    "why-this-instance": format!("lowest-index {} instance", inst.state),
                });
                Some((
                    inst.id.clone(),
                    names[choice.candidate as usize].clone(),
                    detail,
                ))
            })
            .collect();
        // The store may bind fewer than asked when a node was taken meanwhile; the next
        // pass plans the rest.
        let bound_count = self.store.bind_many(&binds)?;
        let binds = &binds[..bound_count];
        if binds.len() < want {
            progress.blocked = Some(plan::unplaced(binds.len(), want, &tier.requirements));
        }
        // The records as bound: each binding began a new deployment, which the driver's
        // artifact URL names.
        let bound = self.store.instances(&tier.name)?;
        progress.deployed = binds.iter().map(|b| b.0.clone()).collect();
        Ok(bound
            .into_iter()
            .filter(|i| progress.deployed.contains(&i.id))
            .collect())
    }

    /// Makes one driver call and commits what it says, guarded by the deployment the call
    /// was about. Waits for a permit first (see [`Permits`]).
    pub async fn carry_out(&self, effect: &Effect) -> Result<Outcome> {
        let tier = self.store.tier(&effect.instance.id.tier)?;
        let driver = self
            .plugins
            .get(&tier.driver.plugin, Kind::Driver, "driver")?;
        let config = config_value(&tier.driver);
        let endpoint = effect.endpoint();
        let _held = self.permits.acquire(endpoint.as_deref()).await;
        let node = wit_node(&effect.node);
        let i = &effect.instance;
        let d = self.deployment(i);
        let report = |r: std::result::Result<
            mint_plugins::Called<wit::StatusReport>,
            mint_plugins::CallError,
        >| r.map(|c| c.value);
        match effect.action {
            Action::Deploy => {
                let r = report(driver.deploy(&node, &d, config.as_ref()).await);
                self.settle(&tier, i, r, InstanceState::Pooled)
            }
            Action::Poll => {
                let mut r = report(driver.status(&node, &d, config.as_ref()).await);
                if matches!(&r, Ok(s) if s.state == wit::InstanceState::Absent) {
                    // The node does not have it (the daemon stopped between binding and
                    // deploying): deploy again, which drivers make idempotent.
                    r = report(driver.deploy(&node, &d, config.as_ref()).await);
                }
                match r {
                    // A driver that cannot tell is asked again later; the deploy timeout
                    // bounds how long.
                    Err(e) => Ok(Outcome {
                        failure: Some(e.to_string()),
                        ..Outcome::default()
                    }),
                    r => self.settle(&tier, i, r, InstanceState::Failed),
                }
            }
            Action::Roll => {
                let old = self.deployment(effect.previous.as_ref().unwrap_or(i));
                let r = match driver.undeploy(&node, &old, config.as_ref()).await {
                    Ok(_) => report(driver.deploy(&node, &d, config.as_ref()).await),
                    Err(e) => Err(e),
                };
                let r = r.map_err(|e| {
                    format!("rolling {} to revision {} failed: {e}", i.id, tier.revision)
                });
                match r {
                    Err(why) => {
                        self.give_up(i, InstanceState::Deploying, InstanceState::Failed, why)
                    }
                    Ok(s) => self.settle(&tier, i, Ok(s), InstanceState::Failed),
                }
            }
            Action::Check => {
                let why = match report(driver.check(&node, &d, config.as_ref()).await) {
                    Ok(r) if r.state == wit::InstanceState::Failed => format!(
                        "health check: the driver reports {} failed: {}",
                        i.id, r.detail
                    ),
                    Ok(r) if r.state == wit::InstanceState::Absent => format!(
                        "health check: {} is no longer on its node ({})",
                        i.id, r.detail
                    ),
                    // A driver that cannot answer is left to the node's heartbeats.
                    _ => return Ok(Outcome::default()),
                };
                self.give_up(i, InstanceState::Deployed, InstanceState::Failed, why)
            }
            Action::Undeploy => match driver.undeploy(&node, &d, config.as_ref()).await {
                Ok(_) => {
                    let applied = self.store.release_guarded(
                        &i.id,
                        i.deployment,
                        &format!("tier scaled in to {}", tier.desired),
                    )?;
                    Ok(Outcome {
                        released: applied,
                        discarded: !applied,
                        ..Outcome::default()
                    })
                }
                // Still undeploying: asked again on a later step.
                Err(e) => Ok(Outcome {
                    failure: Some(format!("undeploying {} failed: {e}", i.id)),
                    ..Outcome::default()
                }),
            },
        }
    }

    /// Commits a deploy or status answer about `i`: running finishes the deployment,
    /// failed (or an error) gives it up with the instance becoming `on_failure`, anything
    /// else waits for a later poll.
    fn settle(
        &self,
        tier: &Tier,
        i: &Instance,
        r: std::result::Result<wit::StatusReport, mint_plugins::CallError>,
        on_failure: InstanceState,
    ) -> Result<Outcome> {
        match r {
            Ok(s) if s.state == wit::InstanceState::Running => {
                let waited_ms = now_ms().saturating_sub(i.since_ms);
                let detail = serde_json::json!({"driver": tier.driver.plugin, "detail": s.detail, "revision": i.revision, "after-ms": waited_ms});
                let discarded =
                    self.store
                        .finish_guarded(&[(i.id.clone(), i.deployment, detail)])?;
                Ok(Outcome {
                    finished: discarded.is_empty(),
                    discarded: !discarded.is_empty(),
                    ..Outcome::default()
                })
            }
            Ok(s) if s.state == wit::InstanceState::Failed => self.give_up(
                i,
                InstanceState::Deploying,
                InstanceState::Failed,
                format!("the driver reports the instance failed: {}", s.detail),
            ),
            Ok(_) => Ok(Outcome::default()),
            Err(e) => self.give_up(
                i,
                InstanceState::Deploying,
                on_failure,
                format!("the driver failed: {e}"),
            ),
        }
    }

    fn give_up(
        &self,
        i: &Instance,
        expected: InstanceState,
        to: InstanceState,
        why: String,
    ) -> Result<Outcome> {
        let applied = self
            .store
            .fail_guarded(&i.id, i.deployment, expected, to, &why)?;
        Ok(Outcome {
            failure: Some(why),
            failed: applied,
            discarded: !applied,
            ..Outcome::default()
        })
    }

    /// One whole reconciliation pass of a tier, its driver calls made before it returns:
    /// for embedding and tests, where nothing else runs. Unfinished deployments are polled
    /// at once; health is not checked (see [`Engine::check_health`]).
    pub async fn reconcile(&self, tier_name: &str) -> Result<Progress> {
        let (busy, asked) = (BTreeSet::new(), BTreeMap::new());
        let input = StepInput {
            busy: &busy,
            asked_ms: &asked,
            reporting: &|_| false,
            poll_every_ms: 0,
            check_every_ms: u64::MAX / 4,
        };
        let (mut progress, effects) = self.step(tier_name, &input).await?;
        self.carry_out_all(&effects, &mut progress).await?;
        Ok(progress)
    }

    /// Asks the driver about every deployed instance of a tier now. One the driver reports
    /// failed or gone fails its node, so reconciliation redeploys it, with its identity, on
    /// a fresh node. Returns what failed.
    pub async fn check_health(&self, tier_name: &str) -> Result<Vec<InstanceId>> {
        let mut effects = Vec::new();
        for i in self
            .store
            .instances(tier_name)?
            .into_iter()
            .filter(|i| i.state == InstanceState::Deployed)
        {
            let Some(node) = i.node.as_deref() else {
                continue;
            };
            effects.push(Effect {
                action: Action::Check,
                node: self.node(node)?,
                instance: i,
                previous: None,
            });
        }
        let mut progress = Progress::default();
        self.carry_out_all(&effects, &mut progress).await?;
        Ok(progress.failed)
    }

    async fn carry_out_all(&self, effects: &[Effect], progress: &mut Progress) -> Result<()> {
        let outcomes =
            futures_util::future::join_all(effects.iter().map(|e| self.carry_out(e))).await;
        for (e, o) in effects.iter().zip(outcomes) {
            let o = o?;
            if o.finished && e.action == Action::Poll {
                progress.finished.push(e.id().clone());
            }
            if o.failed {
                progress.failed.push(e.id().clone());
                progress.deployed.retain(|d| d != e.id());
            }
            if let Some(why) = o.failure {
                progress.blocked = Some(why);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Permits;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Runs `calls` calls to the endpoints `of(i)` through `permits`, each holding its
    /// permits 20 ms, and returns the most that ran at once to endpoint `a` and in all.
    fn peaks(
        permits: Arc<Permits>,
        calls: usize,
        of: fn(usize) -> Option<&'static str>,
    ) -> (usize, usize) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (at_a, all) = (
                Arc::new((AtomicUsize::new(0), AtomicUsize::new(0))),
                Arc::new((AtomicUsize::new(0), AtomicUsize::new(0))),
            );
            let tasks: Vec<_> = (0..calls)
                .map(|i| {
                    let (permits, at_a, all) = (permits.clone(), at_a.clone(), all.clone());
                    tokio::spawn(async move {
                        let endpoint = of(i);
                        let _held = permits.acquire(endpoint).await;
                        let counters: Vec<&(AtomicUsize, AtomicUsize)> = if endpoint == Some("a") {
                            vec![&*at_a, &*all]
                        } else {
                            vec![&*all]
                        };
                        for c in &counters {
                            let now = c.0.fetch_add(1, Ordering::SeqCst) + 1;
                            c.1.fetch_max(now, Ordering::SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        for c in &counters {
                            c.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            (at_a.1.load(Ordering::SeqCst), all.1.load(Ordering::SeqCst))
        })
    }

    #[test]
    fn calls_are_bounded_per_endpoint_and_in_all() {
        // One slow BMC host gets at most 2 at once, while other endpoints use the rest.
        let (a, all) = peaks(Arc::new(Permits::new(6, 2)), 24, |i| {
            if i % 2 == 0 {
                Some("a")
            } else {
                Some(["b", "c", "d"][i % 3])
            }
        });
        assert_eq!(a, 2, "calls to one endpoint at once");
        assert!(all > 2 && all <= 6, "{all} calls at once in all, bound 6");
        // Calls to no endpoint are bounded in all only.
        let (_, all) = peaks(Arc::new(Permits::new(5, 1)), 20, |_| None);
        assert_eq!(all, 5);
    }

    #[test]
    fn changed_bounds_apply_to_calls_that_start_later() {
        let p = Arc::new(Permits::new(1, 1));
        p.set(3, 3);
        let (a, _) = peaks(p, 9, |_| Some("a"));
        assert_eq!(a, 3);
    }
}
