//! How the host trusts the certificates of nodes' management endpoints (BMCs), per node or
//! per endpoint as the operator configures: the system's roots (the default), a CA file, a
//! pinned key, or, for a lab, nothing. The engine's own agents are pinned by what they
//! reported at registration (the node property [`AGENT_PIN`]).

use crate::credentials::{Scope, describe};
use crate::manifest::HostPattern;
use mint_tls::{ClientTrust, Trust};
use std::sync::Arc;

/// The node property holding the pin of the node agent's certificate.
pub const AGENT_PIN: &str = "agent-pin";

/// The trust for one request's endpoint, and what chose it (for messages).
#[derive(Debug, Clone)]
pub struct EndpointTrust {
    /// The loaded trust.
    pub trust: Arc<ClientTrust>,
    /// Where it came from: `node \`n1\``, `endpoint https://...`, `default`, or the agent's pin.
    pub from: String,
}

/// The operator's TLS choices for node endpoints. Lookup prefers an entry for the node,
/// then one for the endpoint, then the default entry, then the system's roots.
#[derive(Debug, Clone, Default)]
pub struct TlsPolicies {
    entries: Vec<(Scope, EndpointTrust)>,
}

impl TlsPolicies {
    /// Adds the entry for `node` or `endpoint` (neither: the default). `at` names the
    /// entry in errors.
    pub fn add(
        &mut self,
        at: &str,
        node: Option<String>,
        endpoint: Option<String>,
        trust: Trust,
    ) -> Result<(), String> {
        let scope = match (node, endpoint) {
            (Some(_), Some(_)) => return Err(format!("{at}: give `node` or `endpoint`, not both")),
            (Some(n), None) if n.is_empty() => return Err(format!("{at}: field `node` is empty")),
            (Some(n), None) => Scope::Node(n),
            (None, Some(e)) => Scope::Endpoint(
                HostPattern::of_url(&e).map_err(|m| format!("{at}: field `endpoint`: {m}"))?,
            ),
            (None, None) => Scope::Default,
        };
        if self.entries.iter().any(|(s, _)| *s == scope) {
            return Err(format!(
                "{at}: another entry already covers the same {}",
                describe(&scope)
            ));
        }
        let loaded = ClientTrust::new(&trust).map_err(|e| format!("{at}: field `tls`: {e}"))?;
        self.entries.push((
            scope.clone(),
            EndpointTrust {
                trust: Arc::new(loaded),
                from: describe(&scope),
            },
        ));
        Ok(())
    }

    /// The trust for requests about `node` to `endpoint`, if an entry covers them.
    pub fn lookup(&self, node: &str, endpoint: &HostPattern) -> Option<&EndpointTrust> {
        let find = |want: &dyn Fn(&Scope) -> bool| {
            self.entries.iter().find(|(s, _)| want(s)).map(|(_, t)| t)
        };
        find(&|s| matches!(s, Scope::Node(n) if n == node))
            .or_else(|| find(&|s| matches!(s, Scope::Endpoint(p) if p == endpoint)))
            .or_else(|| find(&|s| *s == Scope::Default))
    }

    /// What the entries say, for the daemon's log.
    pub fn summary(&self) -> Vec<String> {
        self.entries
            .iter()
            .map(|(_, t)| format!("{}: {}", t.from, t.trust.trust()))
            .collect()
    }
}

/// The system's roots, loaded once; the error says why they cannot be.
pub(crate) fn system() -> Result<EndpointTrust, String> {
    static SYSTEM: std::sync::OnceLock<Result<Arc<ClientTrust>, String>> =
        std::sync::OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            ClientTrust::new(&Trust::System)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        })
        .clone()
        .map(|trust| EndpointTrust {
            trust,
            from: "the default (no `[[endpoint]]` entry covers it)".into(),
        })
}
