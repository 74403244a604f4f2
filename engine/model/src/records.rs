//! The records mint keeps: tiers, their instances, nodes and events. Plain data, shared by
//! the store (which persists them) and the API (which shows them).

use crate::address::AddressPlan;
use crate::hostname::HostnamePattern;
use crate::state::{InstanceState, NodeState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A plugin reference with the configuration a tier gives it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PluginRef {
    /// The plugin's name (bundled or installed).
    pub plugin: String,
    /// Configuration laid over the plugin's defaults.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub config: serde_json::Map<String, serde_json::Value>,
}

/// What a tier asks of its nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Requirements {
    /// Labels every node must carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Minimum cpus.
    #[serde(default)]
    pub min_cpus: u32,
    /// Minimum memory in MiB.
    #[serde(default)]
    pub min_memory_mib: u64,
    /// Required architecture.
    #[serde(default)]
    pub arch: Option<String>,
}

/// A tier: one kind of computing function, with one master and at most K instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Tier {
    /// Unique name.
    pub name: String,
    /// The master image's digest (`sha256:...`).
    pub image: String,
    /// K: the hard maximum of instances, all minted at creation.
    pub max_instances: u32,
    /// Where addresses come from.
    pub plan: AddressPlan,
    /// How instances are named: a pattern with `{index}` (`{index:03}`) and `{tier}`.
    #[schema(value_type = String)]
    pub hostname: HostnamePattern,
    /// What nodes must offer.
    #[serde(default)]
    pub requirements: Requirements,
    /// The node-selection policy.
    pub policy: PluginRef,
    /// Customization steps, in order.
    pub customizers: Vec<PluginRef>,
    /// The provisioning driver.
    pub driver: PluginRef,
    /// How long a deployment may stay unfinished before its node is declared failed.
    #[serde(default = "default_deploy_timeout")]
    pub deploy_timeout_secs: u32,
    /// How many times the tier's master has been replaced (0 for the first); an instance
    /// deployed from an older revision is rolled to this one.
    #[serde(default)]
    pub revision: u64,
    /// How many deployed instances are rolled to a new revision at once.
    #[serde(default = "one")]
    pub rollout_batch: u32,
    /// The load rule that changes `desired` by itself, if the tier has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
    /// When the load rule last changed `desired` (ms since the epoch), for its cooldown.
    #[serde(default)]
    pub autoscaled_at_ms: u64,
    /// How many instances should be deployed.
    pub desired: u32,
    /// Counts changes of the tier's intent (its desired count, its master): what an
    /// operator follows to see a request carried out.
    #[serde(default)]
    pub generation: u64,
}

fn one() -> u32 {
    1
}

/// A tier's load rule. A node's load is what its agent reports, per mille of its capacity.
/// Over the last `for-secs`, each of the tier's nodes' reports are averaged and those
/// averages averaged; above `scale-out-above` the tier grows by `step` (up to `max`), below
/// `scale-in-below` it shrinks by `step` (down to `min`), at most once per `cooldown-secs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Autoscale {
    /// Grow above this average load (per mille).
    pub scale_out_above: u32,
    /// Shrink below this average load (per mille).
    pub scale_in_below: u32,
    /// How long the average must hold, in seconds.
    pub for_secs: u32,
    /// Instances added or removed per decision.
    #[serde(default = "one")]
    pub step: u32,
    /// Seconds between decisions.
    #[serde(default)]
    pub cooldown_secs: u32,
    /// Never fewer deployed instances than this.
    #[serde(default)]
    pub min: u32,
    /// Never more than this (at most K; K when absent).
    #[serde(default)]
    pub max: Option<u32>,
}

impl Autoscale {
    /// Checks the rule against a tier of `k` instances; the message names the field.
    pub fn check(&self, k: u32) -> Result<(), String> {
        let bad = |f: &str, m: String| Err(format!("field `autoscale.{f}`: {m}"));
        if self.scale_out_above > 1000 || self.scale_in_below >= self.scale_out_above {
            return bad(
                "scale-in-below",
                format!(
                    "{} must be below scale-out-above ({}), which is at most 1000",
                    self.scale_in_below, self.scale_out_above
                ),
            );
        }
        if self.for_secs == 0 || self.for_secs > 3600 {
            return bad("for-secs", format!("{} is outside 1..=3600", self.for_secs));
        }
        if self.step == 0 {
            return bad("step", "add or remove at least 1 instance".into());
        }
        let max = self.max.unwrap_or(k);
        if max > k || self.min > max {
            return bad(
                "max",
                format!(
                    "need min ({}) <= max ({max}) <= max-instances ({k})",
                    self.min
                ),
            );
        }
        Ok(())
    }
}

/// The deploy timeout of a tier that does not set one: ten minutes, enough for a BMC to
/// boot a machine from virtual media.
pub fn default_deploy_timeout() -> u32 {
    600
}

/// Identifies an instance: its tier and index.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
pub struct InstanceId {
    /// The tier.
    pub tier: String,
    /// 0-based, below K.
    pub index: u32,
}

impl std::fmt::Display for InstanceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.tier, self.index)
    }
}

/// One minted instance: an identity, its customization, and where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Instance {
    /// Tier and index.
    pub id: InstanceId,
    /// Its host name, unique across tiers.
    pub hostname: String,
    /// Its address, unique across tiers.
    #[schema(value_type = String)]
    pub address: IpAddr,
    /// Where it is in its life.
    pub state: InstanceState,
    /// The node it is bound to while it holds one.
    pub node: Option<String>,
    /// Digest of its customization overlay (the customizers' edits).
    pub overlay: String,
    /// When it entered its current state, in milliseconds since the Unix epoch (0 for a
    /// freshly minted instance): how long a deployment has been running, across restarts.
    #[serde(default)]
    pub since_ms: u64,
    /// For an instance of a disk or ISO master, its parts besides the master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskParts>,
    /// For an instance of a tree master, the digest of its layer: its edits as a small
    /// tar (removals as whiteouts) that a node lays over the master it caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<String>,
    /// The tier revision of what is (being) deployed on its node; below the tier's
    /// revision, the instance is rolled to the new master.
    #[serde(default)]
    pub revision: u64,
    /// Counts the instance's deployments: bumped each time it is bound to a node or rolled,
    /// so what was handed out for one deployment (a BMC's capability URL) dies with it.
    #[serde(default)]
    pub deployment: u64,
    /// When the current deployment began (milliseconds since the Unix epoch): what it
    /// hands out expires counting from here, so every call about it names the same URLs.
    #[serde(default)]
    pub deployment_started_ms: u64,
}

/// What an instance of a disk master is made of besides the master: a qcow2 overlay whose
/// backing file is the master (the same empty overlay for every instance of a master, so
/// it is stored once) and its own NoCloud seed. Both are blobs named by their digests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskParts {
    /// Digest of the qcow2 overlay (a disk master's; an ISO master boots read-only, with
    /// none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<String>,
    /// Digest of the `cidata` volume.
    pub seed: String,
}

/// A node of the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Node {
    /// Unique name.
    pub name: String,
    /// Cpus.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Architecture, as `x86_64` or `aarch64`.
    pub arch: String,
    /// Labels (failure domains such as `zone` and `rack`, pools, ...).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Driver-specific connection details.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Where it is in its life.
    pub state: NodeState,
    /// The instance it holds.
    pub instance: Option<InstanceId>,
    /// Last load the node reported, in thousandths.
    #[serde(default)]
    pub load: u32,
    /// The masters (digests) its agent reports it caches, so a policy can prefer a node
    /// that need not fetch the tier's master.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached: Vec<String>,
}

impl Node {
    /// The endpoint a driver reaches for this node, as `host:port` of the first property
    /// holding an `http(s)://` URL (`bmc-url`, `agent-url`, ...), by which driver calls are
    /// bounded per BMC host. `None` for a node reached by no URL.
    pub fn endpoint(&self) -> Option<String> {
        self.properties.values().find_map(|v| {
            let rest = v
                .strip_prefix("https://")
                .or_else(|| v.strip_prefix("http://"))?;
            let authority = rest.split(['/', '?', '#']).next()?;
            // Credentials in a URL are no part of the endpoint's name.
            let host = authority.rsplit('@').next()?;
            (!host.is_empty()).then(|| host.to_ascii_lowercase())
        })
    }
    /// Whether the node meets `r`.
    pub fn meets(&self, r: &Requirements) -> bool {
        self.cpus >= r.min_cpus
            && self.memory_mib >= r.min_memory_mib
            && r.arch.as_ref().is_none_or(|a| *a == self.arch)
            && r.labels.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// An entry of the event log: what happened and why, with the figures behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Position in the log, increasing.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The tier it concerns, if any.
    pub tier: Option<String>,
    /// A short kind, as `tier-created`, `selected`, `bound`, `deployed`.
    pub kind: String,
    /// A sentence for people.
    pub message: String,
    /// Structured detail (scores, reasons, driver results).
    #[serde(default)]
    pub detail: serde_json::Value,
    /// Who made the change: an operator's token (`admin:NAME`, `read-only:NAME`), a node
    /// (`node:NAME`), or `mint` for the engine's own decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// The identity of the engine itself in the event log: reconciliation, failure detection
/// and load rules act as `mint`.
pub const ENGINE: &str = "mint";

/// What an operator's token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Read the pool's state (GET), never artifact bytes or seeds.
    ReadOnly,
}

impl Role {
    /// Whether the role may change anything.
    pub fn can_write(self) -> bool {
        self == Role::Admin
    }

    /// Whether the role may read instances' artifacts: root filesystems and seeds carry
    /// host keys, SSH keys and user-data.
    pub fn can_read_artifacts(self) -> bool {
        self == Role::Admin
    }

    /// The role's name, as the CLI and the event log spell it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }

    /// Parses a role's name.
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "read-only" => Ok(Role::ReadOnly),
            other => Err(format!("`{other}` is not a role; use admin or read-only")),
        }
    }
}

/// An operator's bearer token as the store keeps it: never the token, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    /// Unique name, as `ci` or `admin`.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// `sha256:<hex>` of the token.
    pub hash: String,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// Whose a credential is, as authentication finds it by the credential's hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Principal {
    /// An operator's token.
    Operator {
        /// The token's name.
        name: String,
        /// What it may do.
        role: Role,
    },
    /// A node's agent.
    Node {
        /// The node.
        name: String,
    },
}

impl Principal {
    /// How the event log names it: `admin:NAME`, `read-only:NAME` or `node:NAME`.
    pub fn label(&self) -> String {
        match self {
            Principal::Operator { name, role } => format!("{}:{name}", role.name()),
            Principal::Node { name } => format!("node:{name}"),
        }
    }
}

/// A pending enrollment: the one-time join token an operator issued for a node name, and
/// the labels the node gets when it joins. Only the token's SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// The node name the token admits.
    pub node: String,
    /// `sha256:<hex>` of the join token.
    pub hash: String,
    /// Labels given at enrollment; they win over what the agent reports.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// When the token stops working, in milliseconds since the Unix epoch.
    pub expires_ms: u64,
}

/// The credential a node's agent traded its join token for: only its SHA-256 is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCredential {
    /// The node.
    pub node: String,
    /// `sha256:<hex>` of the credential.
    pub hash: String,
    /// Bumped by every enrollment, so what was derived from an earlier one is dead.
    pub generation: u64,
}

/// A master image in the image store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Image {
    /// `sha256:<hex>` of the image's canonical tar (tree images) or of the disk file.
    pub digest: String,
    /// A name for people (the imported file or directory's name, or one given).
    pub name: String,
    /// `tree` (a root filesystem), `qcow2` or `raw` (a disk), or `iso` (a bootable ISO 9660
    /// image, booted as a CD).
    pub format: String,
    /// Bytes stored: the canonical tar, or the disk file.
    pub size: u64,
    /// Files, directories and links in a tree image; 0 for a disk.
    pub entries: u64,
    /// What it was imported from: `dir`, `tar`, `tar+gzip`, `tar+zstd`, `oci`, `qcow2`, `raw`.
    #[serde(default)]
    pub source: String,
    /// A disk's size as a guest sees it; 0 for a tree.
    #[serde(default)]
    pub virtual_size: u64,
}

impl Image {
    /// Whether the image is a disk (its instances are qcow2 overlays plus a NoCloud seed)
    /// rather than a tree (its instances are overlays of file edits).
    pub fn is_disk(&self) -> bool {
        self.format == "qcow2" || self.format == "raw"
    }

    /// Whether the image is a bootable ISO: booted as a (virtual) CD, read-only, its
    /// instances only a NoCloud seed.
    pub fn is_iso(&self) -> bool {
        self.format == "iso"
    }

    /// Whether the image is a tree (a root filesystem) rather than a file a machine boots.
    pub fn is_tree(&self) -> bool {
        !self.is_disk() && !self.is_iso()
    }

    /// The artifact format of its instances: `tree`, `disk` or `iso`.
    pub fn artifact_format(&self) -> &'static str {
        if self.is_disk() {
            "disk"
        } else if self.is_iso() {
            "iso"
        } else {
            "tree"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nodes_endpoint_is_the_host_and_port_of_its_url() {
        let node = |props: &[(&str, &str)]| Node {
            name: "n".into(),
            cpus: 1,
            memory_mib: 1,
            arch: "x86_64".into(),
            labels: BTreeMap::new(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            state: crate::NodeState::Free,
            instance: None,
            load: 0,
            cached: Vec::new(),
        };
        assert_eq!(
            node(&[("bmc-url", "https://10.1.0.17/redfish/v1/Systems/1")])
                .endpoint()
                .as_deref(),
            Some("10.1.0.17")
        );
        assert_eq!(
            node(&[("agent-url", "https://user:pw@Node-3:7601")])
                .endpoint()
                .as_deref(),
            Some("node-3:7601")
        );
        assert_eq!(node(&[("rack", "r1")]).endpoint(), None);
        assert_eq!(node(&[]).endpoint(), None);
    }
}
