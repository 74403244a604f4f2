//! The lifecycle of instances and nodes: one closed enum each, with `can_*` predicates
//! that the store consults before every transition, so that an illegal change is refused
//! before anything is written.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where an instance is in its life. Every instance is minted `Pooled`; it carries its
/// identity through every state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Minted and customized, on no node.
    Pooled,
    /// Bound to a node; the driver is deploying it.
    Deploying,
    /// Running on its node.
    Deployed,
    /// Being removed from its node; it returns to the pool with its identity.
    Undeploying,
    /// Its node failed or its deployment failed; it waits to be redeployed elsewhere.
    Failed,
}

/// Where a node is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// In the inventory, holding no instance: a candidate for selection.
    Free,
    /// An instance is being deployed on it.
    Deploying,
    /// Runs an instance.
    InService,
    /// Declared failed; holds no instance until an operator returns it.
    Failed,
    /// Taken out by an operator; never selected.
    Maintenance,
}

/// A change of instance state, as the event log records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Before.
    pub from: InstanceState,
    /// After.
    pub to: InstanceState,
}

impl InstanceState {
    /// Whether the instance may be bound to a node and deployed: pooled or failed (a
    /// failed instance is redeployed on a fresh node with the same identity).
    pub fn can_deploy(self) -> bool {
        matches!(self, InstanceState::Pooled | InstanceState::Failed)
    }
    /// Whether a running instance may be redeployed on its node, to roll it to a new
    /// revision of its tier's master.
    pub fn can_roll(self) -> bool {
        self == InstanceState::Deployed
    }
    /// Whether the deployment may be declared finished.
    pub fn can_finish_deploy(self) -> bool {
        self == InstanceState::Deploying
    }
    /// Whether the instance may be removed from its node.
    pub fn can_undeploy(self) -> bool {
        matches!(self, InstanceState::Deploying | InstanceState::Deployed)
    }
    /// Whether the instance may be declared failed.
    pub fn can_fail(self) -> bool {
        matches!(
            self,
            InstanceState::Deploying | InstanceState::Deployed | InstanceState::Undeploying
        )
    }
    /// Whether the instance may return to the pool.
    pub fn can_return_to_pool(self) -> bool {
        matches!(self, InstanceState::Undeploying | InstanceState::Failed)
    }
    /// Whether the instance holds a node.
    pub fn holds_node(self) -> bool {
        matches!(
            self,
            InstanceState::Deploying | InstanceState::Deployed | InstanceState::Undeploying
        )
    }
    /// Whether `to` is a legal next state.
    pub fn can_become(self, to: InstanceState) -> bool {
        use InstanceState::*;
        match to {
            Deploying => self.can_deploy() || self.can_roll(),
            Deployed => self.can_finish_deploy(),
            Undeploying => self.can_undeploy(),
            Failed => self.can_fail(),
            Pooled => self.can_return_to_pool(),
        }
    }
    /// The state's name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pooled => "pooled",
            InstanceState::Deploying => "deploying",
            InstanceState::Deployed => "deployed",
            InstanceState::Undeploying => "undeploying",
            InstanceState::Failed => "failed",
        }
    }
}

impl NodeState {
    /// Whether a policy may be offered the node.
    pub fn can_select(self) -> bool {
        self == NodeState::Free
    }
    /// Whether the node may be removed from the inventory: only when it holds nothing.
    pub fn can_remove(self) -> bool {
        matches!(
            self,
            NodeState::Free | NodeState::Failed | NodeState::Maintenance
        )
    }
    /// Whether an operator may move the node to `to`. Free and maintenance are for nodes
    /// that hold nothing (a failed node returns to free once repaired); failed may be
    /// declared of any node, and its instance is then redeployed elsewhere. Deploying and
    /// in-service belong to the engine, which sets them while it deploys.
    pub fn operator_can_set(self, to: NodeState) -> bool {
        match to {
            NodeState::Free => matches!(
                self,
                NodeState::Free | NodeState::Failed | NodeState::Maintenance
            ),
            NodeState::Maintenance => matches!(
                self,
                NodeState::Free | NodeState::Failed | NodeState::Maintenance
            ),
            NodeState::Failed => true,
            NodeState::Deploying | NodeState::InService => false,
        }
    }
    /// The state's name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Free => "free",
            NodeState::Deploying => "deploying",
            NodeState::InService => "in-service",
            NodeState::Failed => "failed",
            NodeState::Maintenance => "maintenance",
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;
    use super::*;

    const ALL: [InstanceState; 5] = [Pooled, Deploying, Deployed, Undeploying, Failed];

    #[test]
    fn the_legal_transitions_are_exactly_these() {
        let legal = [
            (Pooled, Deploying),
            (Failed, Deploying),
            (Deploying, Deployed),
            (Deployed, Deploying),
            (Deploying, Undeploying),
            (Deployed, Undeploying),
            (Deploying, Failed),
            (Deployed, Failed),
            (Undeploying, Failed),
            (Undeploying, Pooled),
            (Failed, Pooled),
        ];
        for from in ALL {
            for to in ALL {
                assert_eq!(
                    from.can_become(to),
                    legal.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn only_states_on_a_node_hold_one() {
        assert_eq!(ALL.iter().filter(|s| s.holds_node()).count(), 3);
        assert!(!Pooled.holds_node() && !Failed.holds_node());
        assert!(NodeState::Free.can_select() && !NodeState::Maintenance.can_select());
        assert!(!NodeState::InService.can_remove());
    }

    #[test]
    fn operators_set_free_maintenance_and_failed_only() {
        use NodeState::*;
        let all = [Free, Deploying, InService, Failed, Maintenance];
        for from in all {
            assert!(
                from.operator_can_set(Failed),
                "any node can be declared failed"
            );
            assert!(!from.operator_can_set(Deploying) && !from.operator_can_set(InService));
            assert_eq!(from.operator_can_set(Free), from.can_remove(), "{from}");
            assert_eq!(
                from.operator_can_set(Maintenance),
                from.can_remove(),
                "{from}"
            );
        }
    }
}
