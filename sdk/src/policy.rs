//! Node-selection policies: choose which free nodes receive a tier's next instances.
//!
//! A policy sees all candidates in one call. Candidates are anonymous records of scalars,
//! named by their index; labels arrive interned (as indexes into the request's
//! `label_keys` and `label_values`), so comparing failure domains is comparing integers.
//! [`Request::key`], [`Request::label`] and [`Request::value_name`] translate.

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "node-policy-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_node_policy",
        default_bindings_module: "mint_sdk::policy::bindings",
        runtime_path: "mint_sdk::__private::wit_bindgen::rt",
        additional_derives: [PartialEq],
    });
}

use crate::{Config, Error};
use bindings::exports::mint::plugin::node_policy as wit;

pub use wit::{Candidate, Choice, LabelRef, Placement, Requirements, SelectionRequest as Request};

crate::common::impl_plugin_error_conversion!(bindings::mint::plugin::types);

/// A node-selection policy. Implement it and name the type in [`export_policy!`].
pub trait Policy {
    /// Chooses `request.count` nodes among `request.candidates`.
    ///
    /// The host checks the answer: exactly `count` distinct candidates, each meeting the
    /// requirements. Return [`Error::unsatisfiable`] when there are too few eligible
    /// nodes; [`Request::require_count`] does that check and says how many were found.
    fn select(request: &Request, config: &Config) -> Result<Vec<Choice>, Error>;
}

impl Choice {
    /// Chooses the candidate at `index`, with no score and no reason.
    pub fn new(index: usize) -> Self {
        Self {
            candidate: index as u32,
            score: None,
            reason: None,
        }
    }
    /// Adds a score for the event log.
    pub fn with_score(mut self, score: f64) -> Self {
        self.score = Some(score);
        self
    }
    /// Adds a short reason for the event log.
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

impl Request {
    /// The index of label key `name` (`"rack"`), or none when no node carries it.
    pub fn key(&self, name: &str) -> Option<u32> {
        self.label_keys
            .iter()
            .position(|k| k == name)
            .map(|i| i as u32)
    }

    /// The text of a label value index.
    pub fn value_name(&self, value: u32) -> &str {
        self.label_values
            .get(value as usize)
            .map(String::as_str)
            .unwrap_or("?")
    }

    /// The labels of `candidate`.
    pub fn labels_of(&self, candidate: &Candidate) -> &[LabelRef] {
        let start = candidate.labels_start as usize;
        self.labels
            .get(start..start.saturating_add(candidate.labels_len as usize))
            .unwrap_or(&[])
    }

    /// The value index of label `key` on `candidate`, or none.
    pub fn label(&self, candidate: &Candidate, key: u32) -> Option<u32> {
        self.labels_of(candidate)
            .iter()
            .find(|l| l.key == key)
            .map(|l| l.value)
    }

    /// Whether the host says `candidate` caches the tier's master already (the host's
    /// `mint.cached-master` label), so deploying there fetches only the instance's part.
    pub fn has_master_cached(&self, candidate: &Candidate) -> bool {
        self.key("mint.cached-master")
            .and_then(|k| self.label(candidate, k))
            .is_some_and(|v| self.value_name(v) == "true")
    }

    /// Whether `candidate` meets the request's requirements (labels, cpus, memory,
    /// architecture), the same check the host makes on the answer.
    pub fn is_eligible(&self, candidate: &Candidate) -> bool {
        let r = &self.requirements;
        let start = candidate.labels_start as usize;
        let Some(labels) = self
            .labels
            .get(start..start.saturating_add(candidate.labels_len as usize))
        else {
            return false;
        };
        candidate.cpus >= r.min_cpus
            && candidate.memory_mib >= r.min_memory_mib
            && r.arch.is_none_or(|a| a == candidate.arch)
            && r.labels.iter().all(|want| labels.contains(want))
    }

    /// The eligible candidates with their indexes, in the request's order.
    pub fn eligible(&self) -> impl Iterator<Item = (usize, &Candidate)> {
        self.candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| self.is_eligible(c))
    }

    /// An [`Error::unsatisfiable`] unless `chosen` has exactly `count` entries.
    pub fn require_count(&self, chosen: &[Choice]) -> Result<(), Error> {
        if chosen.len() == self.count as usize {
            Ok(())
        } else {
            Err(Error::unsatisfiable(format!(
                "tier `{}` asked for {} nodes but only {} of {} free nodes are eligible",
                self.tier,
                self.count,
                chosen.len(),
                self.candidates.len()
            )))
        }
    }
}

impl Placement {
    /// The value index of label `key` on this placed node, or none.
    pub fn label(&self, key: u32) -> Option<u32> {
        self.labels.iter().find(|l| l.key == key).map(|l| l.value)
    }
}

#[doc(hidden)]
pub fn __select<P: Policy>(
    request: Request,
) -> Result<Vec<Choice>, bindings::mint::plugin::types::PluginError> {
    let config = crate::common::host_config()?;
    P::select(&request, &config).map_err(Into::into)
}

/// Exports a type that implements [`Policy`] as this component's node-selection policy.
#[macro_export]
macro_rules! export_policy {
    ($ty:ty) => {
        // Only a component exports the world; natively (unit tests) the names the
        // bindings export are not valid symbol names for the platform's linker.
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __MintPolicyExport;
            impl $crate::policy::bindings::exports::mint::plugin::node_policy::Guest for __MintPolicyExport {
                fn select(
                    request: $crate::policy::Request,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::policy::Choice>,
                    $crate::policy::bindings::mint::plugin::types::PluginError,
                > {
                    $crate::policy::__select::<$ty>(request)
                }
            }
            $crate::policy::bindings::__export_node_policy!(__MintPolicyExport with_types_in $crate::policy::bindings);
        };
    };
}
