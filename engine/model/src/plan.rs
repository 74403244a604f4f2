//! The pool's decisions for one tier, as pure functions: given the tier, its instances and
//! what the engine is already doing, which instances to place on nodes, take off their
//! nodes, roll to a new master, poll or health-check. The engine carries a plan out; the
//! store commits each step with a guard, so a plan made from a stale view can only be
//! refused, never applied wrongly.
//!
//! Architecture invariant: nothing here waits, reads a clock or calls a plugin. The time
//! is an input, and so is the set of instances with a driver call in flight, which the
//! planner never gives a second call.

use crate::records::{Instance, Requirements, Tier};
use crate::state::InstanceState;
use std::collections::{BTreeMap, BTreeSet};

/// What the planner sees of one tier.
#[derive(Clone, Copy)]
pub struct View<'a> {
    /// The tier, with its desired count and revision.
    pub tier: &'a Tier,
    /// All K of its instances.
    pub instances: &'a [Instance],
    /// Indexes of instances with a driver call in flight.
    pub busy: &'a BTreeSet<u32>,
    /// When each instance was last asked about by `status` (ms since the epoch), whether
    /// to follow its deployment or to check its health.
    pub asked_ms: &'a BTreeMap<u32, u64>,
    /// Nodes whose agents report what they run with every heartbeat: their instances need
    /// no health check through the driver.
    pub reporting: &'a (dyn Fn(&str) -> bool + Sync),
    /// Now, in ms since the epoch.
    pub now_ms: u64,
    /// How often an unfinished deployment is polled.
    pub poll_every_ms: u64,
    /// How often a deployed instance is health-checked (each on its own jittered schedule).
    pub check_every_ms: u64,
}

/// What to do for one tier. Every list holds instance indexes, in the order to act.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Instances to take off their nodes (highest index first): recorded undeploying now,
    /// then undeployed by the driver.
    pub undeploy: Vec<u32>,
    /// Undeploying instances whose driver `undeploy` should be (re)issued.
    pub finish_undeploy: Vec<u32>,
    /// Deployed instances behind the tier's revision to redeploy on their nodes.
    pub roll: Vec<u32>,
    /// Unfinished deployments to ask about.
    pub poll: Vec<u32>,
    /// Unfinished deployments past the tier's deploy timeout: their nodes are failed.
    pub timed_out: Vec<u32>,
    /// Deployed instances whose health check is due.
    pub check: Vec<u32>,
    /// Instances waiting for a node, in the order to place them (failed ones first, since
    /// they were serving; then lowest index). As many as the tier lacks.
    pub place: Vec<u32>,
}

impl Plan {
    /// Whether the plan does nothing.
    pub fn is_empty(&self) -> bool {
        *self == Plan::default()
    }
}

/// A tier's instances counted by what they are doing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Counts {
    /// Running on their nodes.
    pub deployed: u32,
    /// Being deployed (or rolled).
    pub deploying: u32,
    /// Leaving their nodes.
    pub undeploying: u32,
    /// Waiting for a fresh node after a failure.
    pub failed: u32,
    /// Minted, on no node.
    pub pooled: u32,
}

impl Counts {
    /// Counts `instances`.
    pub fn of(instances: &[Instance]) -> Counts {
        let mut c = Counts::default();
        for i in instances {
            *match i.state {
                InstanceState::Deployed => &mut c.deployed,
                InstanceState::Deploying => &mut c.deploying,
                InstanceState::Undeploying => &mut c.undeploying,
                InstanceState::Failed => &mut c.failed,
                InstanceState::Pooled => &mut c.pooled,
            } += 1;
        }
        c
    }
    /// Instances that count toward the desired count: deployed or being deployed.
    pub fn active(&self) -> u32 {
        self.deployed + self.deploying
    }
}

/// Whether a tier has reached its intent: exactly `desired` instances deployed, none on
/// its way, none leaving, none behind the tier's revision.
pub fn settled(tier: &Tier, instances: &[Instance]) -> bool {
    let c = Counts::of(instances);
    c.deployed == tier.desired
        && c.deploying == 0
        && c.undeploying == 0
        && instances
            .iter()
            .all(|i| i.state != InstanceState::Deployed || i.revision >= tier.revision)
}

/// A deterministic offset in `[0, every)` for one instance, so that health checks of
/// many instances deployed at once spread over the interval instead of arriving together.
pub fn jitter(tier: &str, index: u32, every_ms: u64) -> u64 {
    // FNV-1a over the identity: stable across restarts and cheap.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tier.bytes().chain(index.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    if every_ms == 0 { 0 } else { h % every_ms }
}

/// Plans one step toward the tier's intent.
pub fn plan(v: View<'_>) -> Plan {
    let tier = v.tier;
    let idle = |i: &&Instance| !v.busy.contains(&i.id.index);
    let mut p = Plan::default();
    let counts = Counts::of(v.instances);
    let active = counts.active();
    let desired = tier.desired.min(tier.max_instances);
    let timeout_ms = u64::from(tier.deploy_timeout_secs) * 1000;
    let asked = |i: &Instance| v.asked_ms.get(&i.id.index).copied().unwrap_or(0);

    // Unfinished deployments: past the timeout they fail (a call in flight or not: a BMC
    // that never answers must not hold the instance); otherwise they are polled on a
    // schedule, never while a call about them is in flight.
    for i in v
        .instances
        .iter()
        .filter(|i| i.state == InstanceState::Deploying)
    {
        if v.now_ms.saturating_sub(i.since_ms) > timeout_ms {
            p.timed_out.push(i.id.index);
        } else if idle(&i) && v.now_ms.saturating_sub(asked(i).max(i.since_ms)) >= v.poll_every_ms {
            p.poll.push(i.id.index);
        }
    }
    let timed_out = p.timed_out.len() as u32;

    // Instances leaving their nodes finish leaving whenever no call about them runs.
    p.finish_undeploy = v
        .instances
        .iter()
        .filter(|i| i.state == InstanceState::Undeploying)
        .filter(idle)
        .map(|i| i.id.index)
        .collect();

    // Health checks, each on its own schedule, for instances whose nodes do not report.
    for i in v
        .instances
        .iter()
        .filter(|i| i.state == InstanceState::Deployed)
        .filter(idle)
    {
        let Some(node) = i.node.as_deref() else {
            continue;
        };
        if (v.reporting)(node) {
            continue;
        }
        let since = asked(i).max(i.since_ms);
        if v.now_ms.saturating_sub(since)
            >= v.check_every_ms + jitter(&tier.name, i.id.index, v.check_every_ms / 2)
        {
            p.check.push(i.id.index);
        }
    }

    // Timed-out deployments are about to fail and free their nodes; they are not counted
    // as active, so their replacements are placed in the same step.
    let active = active - timed_out;
    if active > desired {
        // Scale in: the highest indexes leave first, those still deploying before those
        // running at the same index order (index decides; it is deterministic).
        let mut surplus: Vec<&Instance> = v
            .instances
            .iter()
            .filter(|i| {
                matches!(i.state, InstanceState::Deployed | InstanceState::Deploying)
                    && !p.timed_out.contains(&i.id.index)
            })
            .collect();
        surplus.sort_by_key(|i| std::cmp::Reverse(i.id.index));
        p.undeploy = surplus
            .into_iter()
            .take((active - desired) as usize)
            .map(|i| i.id.index)
            .collect();
        p.poll.retain(|x| !p.undeploy.contains(x));
        p.check.retain(|x| !p.undeploy.contains(x));
        return p;
    }
    if active < desired {
        let mut waiting: Vec<&Instance> = v
            .instances
            .iter()
            .filter(|i| i.state.can_deploy())
            .collect();
        waiting.sort_by_key(|i| (i.state != InstanceState::Failed, i.id.index));
        // The places go to the instances first in line; one that a call still holds (a
        // failed one whose failure was committed a moment ago) keeps its place for the next
        // step rather than giving it to a pooled one, so a lost node's instance, with its
        // identity, is the one that comes back.
        p.place = waiting
            .into_iter()
            .take((desired - active) as usize)
            .filter(idle)
            .map(|i| i.id.index)
            .collect();
        return p;
    }
    // At the desired count: roll a batch to the tier's revision once no deployment of the
    // tier is unfinished, so each batch waits for the one before.
    if counts.deploying == 0 {
        let mut stale: Vec<&Instance> = v
            .instances
            .iter()
            .filter(|i| i.state.can_roll() && i.revision < tier.revision)
            .filter(idle)
            .collect();
        stale.sort_by_key(|i| i.id.index);
        p.roll = stale
            .into_iter()
            .take(tier.rollout_batch.max(1) as usize)
            .map(|i| i.id.index)
            .collect();
        p.check.retain(|x| !p.roll.contains(x));
    }
    p
}

/// Says what a partial placement still needs: `"2 of 5 placed; 3 need a free node with
/// zone=c"`, naming the tier's requirements.
pub fn unplaced(placed: usize, wanted: usize, requirements: &Requirements) -> String {
    let mut needs = Vec::new();
    for (k, v) in &requirements.labels {
        needs.push(format!("{k}={v}"));
    }
    if requirements.min_cpus > 0 {
        needs.push(format!("at least {} CPUs", requirements.min_cpus));
    }
    if requirements.min_memory_mib > 0 {
        needs.push(format!(
            "at least {} MiB of memory",
            requirements.min_memory_mib
        ));
    }
    if let Some(arch) = &requirements.arch {
        needs.push(format!("arch {arch}"));
    }
    let missing = wanted - placed.min(wanted);
    let verb = if missing == 1 { "needs" } else { "need" };
    let with = if needs.is_empty() {
        String::new()
    } else {
        format!(" with {}", needs.join(", "))
    };
    format!("{placed} of {wanted} placed; {missing} {verb} a free node{with}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{InstanceId, PluginRef};
    use crate::{AddressPlan, Cidr, HostnamePattern};

    fn tier(k: u32, desired: u32) -> Tier {
        Tier {
            name: "web".into(),
            image: "sha256:00".into(),
            max_instances: k,
            plan: AddressPlan {
                subnet: Cidr::new(std::net::IpAddr::from([198, 18, 0, 0]), 24).expect("subnet"),
                reserved: Vec::new(),
                gateway: None,
                dns: Vec::new(),
            },
            hostname: HostnamePattern::parse("web-{index}").expect("pattern"),
            requirements: Requirements::default(),
            policy: PluginRef {
                plugin: "spread".into(),
                config: Default::default(),
            },
            customizers: Vec::new(),
            driver: PluginRef {
                plugin: "noop".into(),
                config: Default::default(),
            },
            deploy_timeout_secs: 60,
            revision: 0,
            rollout_batch: 1,
            autoscale: None,
            autoscaled_at_ms: 0,
            desired,
            generation: 0,
        }
    }

    fn instance(index: u32, state: InstanceState) -> Instance {
        Instance {
            id: InstanceId {
                tier: "web".into(),
                index,
            },
            hostname: format!("web-{index}"),
            address: std::net::IpAddr::from([198, 18, 0, index as u8 + 1]),
            state,
            node: state.holds_node().then(|| format!("n{index}")),
            overlay: String::new(),
            since_ms: 0,
            disk: None,
            revision: 0,
            deployment: 0,
            deployment_started_ms: 0,
            layer: None,
        }
    }

    fn view<'a>(
        t: &'a Tier,
        inst: &'a [Instance],
        busy: &'a BTreeSet<u32>,
        asked: &'a BTreeMap<u32, u64>,
        now_ms: u64,
    ) -> View<'a> {
        View {
            tier: t,
            instances: inst,
            busy,
            asked_ms: asked,
            reporting: &|_| false,
            now_ms,
            poll_every_ms: 1000,
            check_every_ms: 10_000,
        }
    }

    #[test]
    fn places_failed_instances_first_then_lowest_index() {
        use InstanceState::*;
        let t = tier(5, 3);
        let inst = [
            instance(0, Pooled),
            instance(1, Deployed),
            instance(2, Pooled),
            instance(3, Failed),
            instance(4, Pooled),
        ];
        let p = plan(view(&t, &inst, &BTreeSet::new(), &BTreeMap::new(), 0));
        assert_eq!(p.place, vec![3, 0]);
        assert!(p.undeploy.is_empty() && p.roll.is_empty());
    }

    #[test]
    fn a_failed_instance_a_call_still_holds_keeps_its_place_from_a_pooled_one() {
        use InstanceState::*;
        let t = tier(3, 2);
        let inst = [
            instance(0, Failed),
            instance(1, Deployed),
            instance(2, Pooled),
        ];
        let busy = BTreeSet::from([0]);
        let p = plan(view(&t, &inst, &busy, &BTreeMap::new(), 0));
        assert!(p.place.is_empty(), "{:?}", p.place);
        let p = plan(view(&t, &inst, &BTreeSet::new(), &BTreeMap::new(), 0));
        assert_eq!(p.place, vec![0]);
    }

    #[test]
    fn scales_in_from_the_highest_index_and_finishes_leaving() {
        use InstanceState::*;
        let t = tier(5, 1);
        let inst = [
            instance(0, Deployed),
            instance(1, Deploying),
            instance(2, Deployed),
            instance(3, Undeploying),
            instance(4, Pooled),
        ];
        let busy = BTreeSet::from([1]);
        let p = plan(view(&t, &inst, &busy, &BTreeMap::new(), 10));
        assert_eq!(
            p.undeploy,
            vec![2, 1],
            "a deploy in flight is taken off too; its late answer is the store's to discard"
        );
        assert_eq!(p.finish_undeploy, vec![3]);
        assert!(
            p.poll.is_empty(),
            "instance 1 leaves, and a call about it runs"
        );
    }

    #[test]
    fn polls_on_a_schedule_and_times_out_even_a_busy_deployment() {
        use InstanceState::*;
        let t = tier(3, 3);
        let mut inst = [
            instance(0, Deploying),
            instance(1, Deploying),
            instance(2, Deploying),
        ];
        inst[2].since_ms = 0;
        inst[0].since_ms = 59_000;
        inst[1].since_ms = 59_000;
        let asked = BTreeMap::from([(1, 60_500)]);
        let busy = BTreeSet::from([2]);
        let p = plan(view(&t, &inst, &busy, &asked, 61_000));
        assert_eq!(p.poll, vec![0], "1 was asked 500 ms ago");
        assert_eq!(p.timed_out, vec![2]);
        assert_eq!(p.place, Vec::<u32>::new(), "no instance is free to place");
    }

    #[test]
    fn rolls_one_batch_only_when_nothing_deploys() {
        use InstanceState::*;
        let mut t = tier(3, 3);
        t.revision = 1;
        t.rollout_batch = 2;
        let inst = [
            instance(0, Deployed),
            instance(1, Deployed),
            instance(2, Deployed),
        ];
        let p = plan(view(&t, &inst, &BTreeSet::new(), &BTreeMap::new(), 0));
        assert_eq!(p.roll, vec![0, 1]);
        let mut rolling = inst.clone();
        rolling[0].state = Deploying;
        rolling[0].revision = 1;
        assert!(
            plan(view(&t, &rolling, &BTreeSet::new(), &BTreeMap::new(), 0))
                .roll
                .is_empty()
        );
    }

    #[test]
    fn health_checks_are_spread_and_skip_reporting_nodes() {
        use InstanceState::*;
        let t = tier(64, 64);
        let inst: Vec<Instance> = (0..64).map(|i| instance(i, Deployed)).collect();
        let due = |now| {
            plan(view(&t, &inst, &BTreeSet::new(), &BTreeMap::new(), now))
                .check
                .len()
        };
        assert_eq!(due(9_999), 0);
        let early = due(12_000);
        assert!(
            early > 0 && early < 64,
            "{early} of 64 due 2 s into a 5 s jitter window"
        );
        assert_eq!(due(15_000), 64);
        let (busy, asked) = (BTreeSet::new(), BTreeMap::new());
        let mut v = view(&t, &inst, &busy, &asked, 15_000);
        v.reporting = &|node| node != "n7";
        assert_eq!(plan(v).check, vec![7]);
    }

    #[test]
    fn says_what_a_partial_placement_needs() {
        let mut r = Requirements::default();
        r.labels.insert("zone".into(), "c".into());
        assert_eq!(
            unplaced(2, 5, &r),
            "2 of 5 placed; 3 need a free node with zone=c"
        );
        assert_eq!(
            unplaced(0, 1, &Requirements::default()),
            "0 of 1 placed; 1 needs a free node"
        );
    }

    /// A small deterministic generator, so a failing case can be replayed from its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }
        fn chance(&mut self, per_cent: u64) -> bool {
            self.below(100) < per_cent
        }
    }

    /// A world for the planner: one tier, a number of free nodes, driver calls that finish
    /// after a random number of steps and sometimes fail, nodes that fail, and restarts that
    /// forget every call in flight. The planner's plans are carried out as the engine does,
    /// and after each step the rules are checked.
    struct World {
        tier: Tier,
        inst: Vec<Instance>,
        free: Vec<String>,
        /// Calls in flight: index, steps left, whether it will fail, the deployment it is
        /// about, and what it is.
        calls: Vec<(u32, u32, bool, u64, Call)>,
        asked: BTreeMap<u32, u64>,
        now: u64,
        next_node: u32,
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Call {
        Deploy,
        Undeploy,
        Check,
    }

    impl World {
        fn new(rng: &mut Rng) -> World {
            let k = 1 + rng.below(12) as u32;
            let mut tier = tier(k, rng.below(u64::from(k) + 1) as u32);
            tier.rollout_batch = 1 + rng.below(3) as u32;
            let inst = (0..k)
                .map(|i| instance(i, InstanceState::Pooled))
                .map(|mut i| {
                    i.node = None;
                    i
                })
                .collect();
            let free = (0..rng.below(16)).map(|n| format!("free-{n}")).collect();
            World {
                tier,
                inst,
                free,
                calls: Vec::new(),
                asked: BTreeMap::new(),
                now: 1,
                next_node: 0,
            }
        }

        fn busy(&self) -> BTreeSet<u32> {
            self.calls.iter().map(|c| c.0).collect()
        }

        fn release(&mut self, i: usize, fail_node: bool) {
            let node = self.inst[i].node.take().expect("a node");
            if !fail_node {
                self.free.push(node);
            }
        }

        /// Carries out one plan and checks it against the rules.
        fn step(&mut self, rng: &mut Rng, chaos: bool) {
            let busy = self.busy();
            let asked = self.asked.clone();
            let p = plan(View {
                tier: &self.tier,
                instances: &self.inst,
                busy: &busy,
                asked_ms: &asked,
                reporting: &|_| false,
                now_ms: self.now,
                poll_every_ms: 1000,
                check_every_ms: 10_000,
            });
            let st = |x: &u32| self.inst[*x as usize].state;
            // No second call for a busy instance.
            for x in p
                .poll
                .iter()
                .chain(&p.check)
                .chain(&p.roll)
                .chain(&p.finish_undeploy)
                .chain(&p.place)
            {
                assert!(
                    !busy.contains(x),
                    "a call planned for busy instance {x}: {p:?}"
                );
            }
            assert!(p.place.iter().all(|x| st(x).can_deploy()));
            assert!(p.roll.iter().all(|x| st(x).can_roll()));
            assert!(p.undeploy.iter().all(|x| st(x).can_undeploy()));
            assert!(
                p.poll
                    .iter()
                    .chain(&p.timed_out)
                    .all(|x| st(x) == InstanceState::Deploying)
            );
            assert!(p.check.iter().all(|x| st(x) == InstanceState::Deployed));
            assert!(
                p.place.is_empty() || p.undeploy.is_empty(),
                "placing and taking off at once: {p:?}"
            );
            let c = Counts::of(&self.inst);
            assert!(c.active() + c.undeploying <= self.tier.max_instances);
            assert!(p.place.len() as u32 <= self.tier.desired, "{p:?}");
            let mut seen = BTreeSet::new();
            for x in p
                .undeploy
                .iter()
                .chain(&p.roll)
                .chain(&p.place)
                .chain(&p.timed_out)
            {
                assert!(seen.insert(*x), "instance {x} has two decisions: {p:?}");
            }

            // Carry it out as the engine does.
            for x in &p.timed_out {
                let i = *x as usize;
                self.release(i, true);
                self.inst[i].state = InstanceState::Failed;
            }
            for x in &p.undeploy {
                self.inst[*x as usize].state = InstanceState::Undeploying;
            }
            for x in &p.finish_undeploy {
                self.calls.push((
                    *x,
                    rng.below(3) as u32,
                    false,
                    self.inst[*x as usize].deployment,
                    Call::Undeploy,
                ));
            }
            for x in &p.roll {
                let i = &mut self.inst[*x as usize];
                i.state = InstanceState::Deploying;
                i.revision = self.tier.revision;
                i.deployment += 1;
                i.since_ms = self.now;
                self.calls.push((
                    *x,
                    rng.below(4) as u32,
                    chaos && rng.chance(10),
                    i.deployment,
                    Call::Deploy,
                ));
            }
            // The policy places what fits.
            for x in &p.place {
                let Some(node) = self.free.pop() else { break };
                let i = &mut self.inst[*x as usize];
                i.state = InstanceState::Deploying;
                i.node = Some(node);
                i.deployment += 1;
                i.since_ms = self.now;
                i.revision = self.tier.revision;
                self.calls.push((
                    *x,
                    rng.below(4) as u32,
                    chaos && rng.chance(10),
                    i.deployment,
                    Call::Deploy,
                ));
            }
            // A poll asks `status`, which finishes the deployment when it runs (or deploys
            // it again when the node lost it); a health check may find the instance failed.
            for (x, call) in p
                .poll
                .iter()
                .map(|x| (x, Call::Deploy))
                .chain(p.check.iter().map(|x| (x, Call::Check)))
            {
                self.asked.insert(*x, self.now);
                let fails = chaos && rng.chance(5);
                self.calls.push((
                    *x,
                    rng.below(2) as u32,
                    fails,
                    self.inst[*x as usize].deployment,
                    call,
                ));
            }

            // Calls come back, each committed only if its instance is still in the
            // deployment it was about (the store's guard).
            let mut back = Vec::new();
            self.calls.retain_mut(|c| {
                if c.1 == 0 {
                    back.push(*c);
                    false
                } else {
                    c.1 -= 1;
                    true
                }
            });
            for (x, _, fails, deployment, call) in back {
                let i = x as usize;
                if self.inst[i].deployment != deployment {
                    continue;
                }
                match (call, self.inst[i].state) {
                    (Call::Undeploy, InstanceState::Undeploying) => {
                        self.release(i, false);
                        self.inst[i].state = InstanceState::Pooled;
                    }
                    (Call::Deploy, InstanceState::Deploying)
                    | (Call::Check, InstanceState::Deployed)
                        if fails =>
                    {
                        self.release(i, true);
                        self.inst[i].state = InstanceState::Failed;
                    }
                    (Call::Deploy, InstanceState::Deploying) => {
                        self.inst[i].state = InstanceState::Deployed
                    }
                    // A late answer about a decision since replaced: the guard discards it.
                    _ => {}
                }
            }

            self.now += 1 + rng.below(3000);
            if !chaos {
                return;
            }
            // The world changes: intent, a node failure, new nodes, a new master, a restart.
            if rng.chance(10) {
                self.tier.desired = rng.below(u64::from(self.tier.max_instances) + 1) as u32;
            }
            if rng.chance(5) {
                let held: Vec<usize> = (0..self.inst.len())
                    .filter(|&i| self.inst[i].state.holds_node())
                    .collect();
                if !held.is_empty() {
                    let i = held[rng.below(held.len() as u64) as usize];
                    self.release(i, true);
                    self.inst[i].state = InstanceState::Failed;
                }
            }
            if rng.chance(10) {
                self.next_node += 1;
                self.free.push(format!("added-{}", self.next_node));
            }
            if rng.chance(3) {
                self.tier.revision += 1;
            }
            if rng.chance(3) {
                self.calls.clear();
                self.asked.clear();
            }
        }

        /// Runs with nothing changing but time, with enough nodes and calls that succeed,
        /// and says whether the tier reached its intent.
        fn settle(&mut self, rng: &mut Rng) -> bool {
            while self.free.len() < self.tier.max_instances as usize {
                self.next_node += 1;
                self.free.push(format!("spare-{}", self.next_node));
            }
            for c in &mut self.calls {
                c.2 = false;
            }
            for _ in 0..200 {
                if settled(&self.tier, &self.inst) && self.calls.is_empty() {
                    return true;
                }
                self.step(rng, false);
            }
            false
        }
    }

    #[test]
    fn ten_thousand_random_worlds_keep_the_rules_and_converge() {
        let seed = std::env::var("MINT_PLAN_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed_1234_abcd_0001u64);
        let mut rng = Rng(seed);
        for _ in 0..10_000 {
            let mut w = World::new(&mut rng);
            for _ in 0..rng.below(40) {
                w.step(&mut rng, true);
            }
        }
        // Convergence is checked on a subset: with spare nodes and nothing changing, every
        // tier reaches its intent.
        let mut rng = Rng(seed ^ 0xffff);
        for case in 0..1000 {
            let mut w = World::new(&mut rng);
            for _ in 0..rng.below(30) {
                w.step(&mut rng, true);
            }
            assert!(
                w.settle(&mut rng),
                "case {case} (seed {seed}) did not settle: {:?} {:?}",
                w.tier,
                w.inst.iter().map(|i| i.state).collect::<Vec<_>>()
            );
        }
    }
}
