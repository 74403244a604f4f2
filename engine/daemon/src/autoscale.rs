//! Load rules: the daemon decides by itself that a tier needs more (or fewer) instances,
//! from the loads its nodes' agents report, and says why in the event log with the figures
//! behind the decision.

use crate::App;
use mint_model::InstanceState;
use mint_model::records::Tier;
use serde_json::json;
use std::time::Duration;

/// Applies `tier`'s load rule once: at most one change of `desired`, none while a
/// deployment of the tier is unfinished or the cooldown runs.
pub fn decide(app: &App, tier: &Tier) {
    let Some(rule) = &tier.autoscale else { return };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if now_ms.saturating_sub(tier.autoscaled_at_ms) < u64::from(rule.cooldown_secs) * 1000 {
        return;
    }
    let Ok(instances) = app.engine.store.instances(&tier.name) else {
        return;
    };
    if instances
        .iter()
        .any(|i| i.state == InstanceState::Deploying)
    {
        return;
    }
    let window = Duration::from_secs(u64::from(rule.for_secs));
    let mut per_node = Vec::new();
    for i in instances
        .iter()
        .filter(|i| i.state == InstanceState::Deployed)
    {
        let Some(node) = &i.node else { continue };
        let (loads, covered) = app.liveness.loads(node, window);
        if !covered || loads.is_empty() {
            // Not enough history to say the load held for the whole window.
            return;
        }
        per_node.push((
            node.clone(),
            loads.iter().map(|l| u64::from(*l)).sum::<u64>() / loads.len() as u64,
        ));
    }
    if per_node.is_empty() {
        return;
    }
    let average = per_node.iter().map(|(_, l)| *l).sum::<u64>() / per_node.len() as u64;
    let max = rule
        .max
        .unwrap_or(tier.max_instances)
        .min(tier.max_instances);
    let deployed = per_node.len() as u32;
    let (to, direction, threshold) =
        if average > u64::from(rule.scale_out_above) && tier.desired < max {
            (
                (tier.desired.max(deployed) + rule.step).min(max),
                "above",
                rule.scale_out_above,
            )
        } else if average < u64::from(rule.scale_in_below) && tier.desired > rule.min {
            (
                tier.desired
                    .min(deployed)
                    .saturating_sub(rule.step)
                    .max(rule.min),
                "below",
                rule.scale_in_below,
            )
        } else {
            return;
        };
    if to == tier.desired {
        return;
    }
    let message = format!(
        "average load {average}‰ over {} s on {} nodes is {direction} {threshold}‰ (step {}, min {}, max {max})",
        rule.for_secs,
        per_node.len(),
        rule.step,
        rule.min
    );
    let detail = json!({
        "average": average, "threshold": threshold, "direction": direction, "window-secs": rule.for_secs,
        "nodes": per_node.iter().map(|(n, l)| json!({"node": n, "load": l})).collect::<Vec<_>>(), "from": tier.desired, "to": to,
    });
    match app.engine.store.autoscale(&tier.name, to, &message, detail) {
        Ok(_) => tracing::info!(tier = %tier.name, "{message}: {} -> {to}", tier.desired),
        Err(e) => tracing::warn!(tier = %tier.name, "the load rule could not scale: {e}"),
    }
}
