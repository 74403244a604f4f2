//! What an operator submits to create a tier, and its validation into a `Tier`. Every
//! error names the field and says what would fix it.

use mint_model::address::Reserved;
use mint_model::records::{PluginRef, Requirements, Tier};
use mint_model::{AddressPlan, Cidr, HostnamePattern};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// A tier as the API and tier files describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TierSpec {
    /// Unique name: lowercase letters, digits and `-`.
    pub name: String,
    /// The master image: its digest (`sha256:...`) or the name it was imported under.
    pub image: String,
    /// K, the hard maximum of instances; all are minted at creation.
    pub max_instances: u32,
    /// The subnet, as `198.18.0.0/24`.
    pub subnet: String,
    /// Reserved ranges, as `198.18.0.2-198.18.0.9` or single addresses.
    #[serde(default)]
    pub reserved: Vec<String>,
    /// The default gateway.
    #[serde(default)]
    pub gateway: Option<String>,
    /// DNS servers.
    #[serde(default)]
    pub dns: Vec<String>,
    /// Host-name pattern, as `web-{index:03}`.
    pub hostname: String,
    /// What nodes must offer.
    #[serde(default)]
    pub requirements: Requirements,
    /// Node-selection policy (default `spread`).
    #[serde(default = "default_policy")]
    pub policy: PluginRef,
    /// Customization steps (default `hostname`, then `network`).
    #[serde(default = "default_customizers")]
    pub customizers: Vec<PluginRef>,
    /// Provisioning driver.
    pub driver: PluginRef,
    /// Seconds a deployment may stay unfinished (the driver reporting `deploying`) before
    /// its node is declared failed and the instance goes elsewhere (default 600).
    #[serde(default = "mint_model::records::default_deploy_timeout")]
    pub deploy_timeout_secs: u32,
    /// A load rule that scales the tier by itself.
    #[serde(default)]
    pub autoscale: Option<mint_model::records::Autoscale>,
}

fn default_policy() -> PluginRef {
    PluginRef {
        plugin: "spread".into(),
        config: Default::default(),
    }
}

fn default_customizers() -> Vec<PluginRef> {
    ["hostname", "network"]
        .into_iter()
        .map(|p| PluginRef {
            plugin: p.into(),
            config: Default::default(),
        })
        .collect()
}

/// The largest K a tier may ask for.
pub const MAX_K: u32 = 1_000_000;

/// The longest deploy timeout a tier may set: one day.
pub const MAX_DEPLOY_TIMEOUT: u32 = 86_400;

fn bad(field: &str, message: String) -> String {
    format!("field `{field}`: {message}")
}

fn parse_ip(field: &str, s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| bad(field, format!("`{s}` is not an IP address")))
}

impl TierSpec {
    /// Checks the spec and builds the tier (with no instance deployed).
    pub fn to_tier(&self) -> Result<Tier, String> {
        if self.name.is_empty()
            || self.name.len() > 63
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            || self.name.starts_with('-')
        {
            return Err(bad(
                "name",
                format!(
                    "`{}` must be 1-63 lowercase letters, digits and `-`",
                    self.name
                ),
            ));
        }
        if self.max_instances == 0 || self.max_instances > MAX_K {
            return Err(bad(
                "max-instances",
                format!("{} is outside 1..={MAX_K}", self.max_instances),
            ));
        }
        if self.deploy_timeout_secs == 0 || self.deploy_timeout_secs > MAX_DEPLOY_TIMEOUT {
            return Err(bad(
                "deploy-timeout-secs",
                format!(
                    "{} is outside 1..={MAX_DEPLOY_TIMEOUT}",
                    self.deploy_timeout_secs
                ),
            ));
        }
        if let Some(a) = &self.autoscale {
            a.check(self.max_instances)?;
        }
        if !self.image.starts_with("sha256:") {
            return Err(bad(
                "image",
                format!(
                    "`{}` is not an image; give the name it was imported under or the `sha256:...` digest `mint image import` printed",
                    self.image
                ),
            ));
        }
        let subnet: Cidr = self.subnet.parse().map_err(|e| bad("subnet", e))?;
        let reserved = self
            .reserved
            .iter()
            .map(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                Ok(Reserved {
                    first: parse_ip("reserved", a.trim())?,
                    last: parse_ip("reserved", b.trim())?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let gateway = self
            .gateway
            .as_deref()
            .map(|g| parse_ip("gateway", g))
            .transpose()?;
        let dns = self
            .dns
            .iter()
            .map(|d| parse_ip("dns", d))
            .collect::<Result<Vec<_>, _>>()?;
        let plan = AddressPlan {
            subnet,
            reserved,
            gateway,
            dns,
        };
        plan.check().map_err(|e| e.to_string())?;
        let hostname = HostnamePattern::parse(&self.hostname).map_err(|e| e.to_string())?;
        hostname.name(&self.name, 0).map_err(|e| e.to_string())?;
        if self.customizers.is_empty() {
            return Err(bad(
                "customizers",
                "at least one step is needed to give instances their identity, as `hostname`"
                    .into(),
            ));
        }
        Ok(Tier {
            name: self.name.clone(),
            image: self.image.clone(),
            max_instances: self.max_instances,
            plan,
            hostname,
            requirements: self.requirements.clone(),
            policy: self.policy.clone(),
            customizers: self.customizers.clone(),
            driver: self.driver.clone(),
            deploy_timeout_secs: self.deploy_timeout_secs,
            revision: 0,
            rollout_batch: 1,
            autoscale: self.autoscale.clone(),
            autoscaled_at_ms: 0,
            generation: 0,
            desired: 0,
        })
    }
}
