//! Readable JSON inputs for one plugin call, as `mint plugin run --input` takes them, and
//! their conversion to the WIT types (interning labels the way the engine does).

use crate::master::{DirMaster, EmptyMaster, MasterView};
use crate::types::*;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// One call's input, by plugin kind.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Fixture {
    /// For a node policy.
    Select(SelectFixture),
    /// For a customizer.
    Customize(CustomizeFixture),
    /// For a driver.
    Drive(DriveFixture),
}

/// Input of a `select` call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectFixture {
    /// The request.
    pub request: SelectRequestJson,
    /// Configuration laid over the manifest's defaults.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// A selection request with labels as maps.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SelectRequestJson {
    /// The tier.
    pub tier: String,
    /// How many nodes.
    pub count: u32,
    /// Requirements.
    #[serde(default)]
    pub requirements: RequirementsJson,
    /// Nodes already running the tier.
    #[serde(default)]
    pub placed: Vec<BTreeMap<String, String>>,
    /// Free nodes.
    pub candidates: Vec<NodeJson>,
}

/// Node requirements.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RequirementsJson {
    /// Labels every chosen node must carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Minimum cpus.
    #[serde(default)]
    pub min_cpus: u32,
    /// Minimum memory.
    #[serde(default)]
    pub min_memory_mib: u64,
    /// Required architecture.
    #[serde(default)]
    pub arch: Option<String>,
}

/// A free node.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct NodeJson {
    /// Name.
    pub name: String,
    /// Cpus.
    pub cpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Architecture (default x86_64).
    #[serde(default = "x86_64")]
    pub arch: String,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Load in thousandths.
    #[serde(default)]
    pub load: u32,
}

fn x86_64() -> String {
    "x86_64".into()
}

/// Interns label keys and values into a request's tables.
#[derive(Default)]
pub struct Interner {
    keys: Vec<String>,
    key_ix: BTreeMap<String, u32>,
    values: Vec<String>,
    value_ix: BTreeMap<String, u32>,
}

fn intern(table: &mut Vec<String>, index: &mut BTreeMap<String, u32>, s: &str) -> u32 {
    if let Some(&i) = index.get(s) {
        return i;
    }
    table.push(s.to_string());
    let i = (table.len() - 1) as u32;
    index.insert(s.to_string(), i);
    i
}

impl Interner {
    /// The index of key `k`.
    pub fn key(&mut self, k: &str) -> u32 {
        intern(&mut self.keys, &mut self.key_ix, k)
    }
    /// The index of value `v`.
    pub fn value(&mut self, v: &str) -> u32 {
        intern(&mut self.values, &mut self.value_ix, v)
    }
    /// A label map as references.
    pub fn labels<'a>(
        &mut self,
        labels: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Vec<LabelRef> {
        labels
            .into_iter()
            .map(|(k, v)| LabelRef {
                key: self.key(k),
                value: self.value(v),
            })
            .collect()
    }
    /// The finished tables (keys, values).
    pub fn into_tables(self) -> (Vec<String>, Vec<String>) {
        (self.keys, self.values)
    }
}

/// A selection request with its candidates' names by index, which the WIT request does
/// not carry.
#[derive(Debug, Clone)]
pub struct NamedRequest {
    /// The request as a policy receives it.
    pub request: SelectionRequest,
    /// Candidate names by index.
    pub names: Vec<String>,
}

/// Builds a selection request the way the engine lays it out: labels interned, every
/// candidate's labels appended to one request-wide list it names by slice, and candidate
/// names kept aside by index. The one place that knows this layout on the host side.
#[derive(Default)]
pub struct SelectionBuilder {
    interner: Interner,
    labels: Vec<LabelRef>,
    candidates: Vec<Candidate>,
    names: Vec<String>,
    placed: Vec<Placement>,
}

impl SelectionBuilder {
    /// Adds a free node as the next candidate.
    pub fn candidate(
        &mut self,
        name: &str,
        cpus: u32,
        memory_mib: u64,
        arch: &str,
        labels: &BTreeMap<String, String>,
        load: u32,
    ) {
        let start = self.labels.len() as u32;
        let refs = self.interner.labels(labels);
        self.labels.extend(refs);
        let arch = self.interner.value(arch);
        self.candidates.push(Candidate {
            cpus,
            memory_mib,
            arch,
            labels_start: start,
            labels_len: self.labels.len() as u32 - start,
            load,
        });
        self.names.push(name.to_string());
    }

    /// Records a node that already runs an instance of the tier.
    pub fn placed(&mut self, labels: &BTreeMap<String, String>) {
        let labels = self.interner.labels(labels);
        self.placed.push(Placement { labels });
    }

    /// The finished request for `count` nodes of `tier` meeting `requirements`.
    pub fn finish(
        mut self,
        tier: &str,
        count: u32,
        requirements: &RequirementsJson,
    ) -> NamedRequest {
        let requirements = Requirements {
            labels: self.interner.labels(&requirements.labels),
            min_cpus: requirements.min_cpus,
            min_memory_mib: requirements.min_memory_mib,
            arch: requirements.arch.as_deref().map(|a| self.interner.value(a)),
        };
        let (label_keys, label_values) = self.interner.into_tables();
        NamedRequest {
            request: SelectionRequest {
                tier: tier.to_string(),
                count,
                requirements,
                label_keys,
                label_values,
                placed: self.placed,
                labels: self.labels,
                candidates: self.candidates,
            },
            names: self.names,
        }
    }
}

impl SelectRequestJson {
    /// The WIT request, candidates sorted by name as the engine passes them.
    pub fn to_wit(&self) -> NamedRequest {
        let mut b = SelectionBuilder::default();
        for p in &self.placed {
            b.placed(p);
        }
        let mut nodes: Vec<&NodeJson> = self.candidates.iter().collect();
        nodes.sort_by(|a, c| a.name.cmp(&c.name));
        for n in nodes {
            b.candidate(&n.name, n.cpus, n.memory_mib, &n.arch, &n.labels, n.load);
        }
        b.finish(&self.tier, self.count, &self.requirements)
    }
}

/// Input of a `customize` call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomizeFixture {
    /// The instance's identity.
    pub instance: InstanceJson,
    /// The tier's instances (default: this one alone).
    #[serde(default)]
    pub peers: Vec<PeerJson>,
    /// A directory holding the master's root filesystem, relative to the fixture file.
    #[serde(default)]
    pub master: Option<String>,
    /// Configuration laid over the manifest's defaults.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// An instance identity with textual addresses.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct InstanceJson {
    /// Tier.
    pub tier: String,
    /// Index.
    pub index: u32,
    /// Host name.
    pub hostname: String,
    /// Address.
    pub address: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
    /// Gateway.
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// DNS servers.
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

/// A peer with a textual address.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct PeerJson {
    /// Index.
    pub index: u32,
    /// Host name.
    pub hostname: String,
    /// Address.
    pub address: IpAddr,
}

/// The WIT form of an address.
pub fn ip(a: IpAddr) -> IpAddress {
    match a {
        IpAddr::V4(v) => {
            let [a, b, c, d] = v.octets();
            IpAddress::Ipv4((a, b, c, d))
        }
        IpAddr::V6(v) => {
            let [a, b, c, d, e, f, g, h] = v.segments();
            IpAddress::Ipv6((a, b, c, d, e, f, g, h))
        }
    }
}

impl CustomizeFixture {
    /// The WIT instance, its peers and its master; `base` resolves a relative master path.
    pub fn to_wit(&self, base: &Path) -> (Instance, Arc<[Peer]>, Arc<dyn MasterView>) {
        let i = &self.instance;
        let mut peers: Vec<Peer> = self
            .peers
            .iter()
            .map(|p| Peer {
                index: p.index,
                hostname: p.hostname.clone(),
                address: ip(p.address),
            })
            .collect();
        if peers.is_empty() {
            peers.push(Peer {
                index: i.index,
                hostname: i.hostname.clone(),
                address: ip(i.address),
            });
        }
        let instance = Instance {
            tier: i.tier.clone(),
            index: i.index,
            hostname: i.hostname.clone(),
            address: ip(i.address),
            prefix_len: i.prefix_len,
            gateway: i.gateway.map(ip),
            dns: i.dns.iter().copied().map(ip).collect(),
            peer_count: peers.len() as u32,
        };
        let master: Arc<dyn MasterView> = match &self.master {
            Some(dir) => Arc::new(DirMaster::new(base.join(dir))),
            None => Arc::new(EmptyMaster),
        };
        (instance, Arc::from(peers), master)
    }
}

/// Input of a driver call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveFixture {
    /// `deploy`, `undeploy` or `status`.
    pub call: String,
    /// The node.
    pub node: NodeRecordJson,
    /// The deployment.
    pub deployment: DeploymentJson,
    /// Configuration laid over the manifest's defaults.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

/// A node record with maps.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecordJson {
    /// Name.
    pub name: String,
    /// Connection properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A deployment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentJson {
    /// Tier.
    pub tier: String,
    /// Index.
    pub index: u32,
    /// Host name.
    pub hostname: String,
    /// Artifact URL.
    pub url: String,
    /// Artifact digest.
    #[serde(default)]
    pub digest: String,
    /// Artifact size.
    #[serde(default)]
    pub size: u64,
    /// Artifact format.
    #[serde(default = "tree")]
    pub format: String,
}

fn tree() -> String {
    "tree".into()
}

impl DriveFixture {
    /// The WIT node and deployment.
    pub fn to_wit(&self) -> (Node, Deployment) {
        let pairs =
            |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let n = &self.node;
        let d = &self.deployment;
        (
            Node {
                name: n.name.clone(),
                properties: pairs(&n.properties),
                labels: pairs(&n.labels),
            },
            Deployment {
                tier: d.tier.clone(),
                index: d.index,
                hostname: d.hostname.clone(),
                artifact: Artifact {
                    url: d.url.clone(),
                    digest: d.digest.clone(),
                    size: d.size,
                    format: d.format.clone(),
                },
            },
        )
    }
}
