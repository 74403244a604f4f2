//! mint's pool engine: imports master images, mints every instance of a tier up front
//! (addresses, host names, customization), and drives each tier toward its desired number
//! of deployed instances through its policy and driver plugins.
//!
//! Architecture invariant: the engine decides nothing a plugin should decide and trusts
//! nothing a plugin says: the plugin host checks answers, the store checks invariants, and
//! the engine only sequences the two.

#![warn(missing_docs)]

pub mod images;
mod overlay;
pub mod spec;

use mint_model::records::{Image, Instance, InstanceId, Node, PluginRef, Tier};
use mint_model::{InstanceState, NodeState};
use mint_plugins::fixture::{RequirementsJson, SelectionBuilder, ip};
use mint_plugins::master::{DirMaster, MasterView};
use mint_plugins::types as wit;
use mint_plugins::{CallError, Kind, LoadError, Plugin, Runtime, RuntimeOptions};
use mint_store::{Store, StoreError};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub use images::{ImageError, ImageStore};
pub use spec::TierSpec;


/// Why an engine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A plugin call failed.
    #[error(transparent)]
    Call(#[from] CallError),
    /// An image could not be imported.
    #[error(transparent)]
    Image(#[from] ImageError),
}

type Result<T> = std::result::Result<T, EngineError>;

/// Plugins by name: bundled ones, loaded on first use and kept.
pub struct Registry {
    runtime: Runtime,
    loaded: RwLock<HashMap<String, Arc<Plugin>>>,
}

impl Registry {
    /// A registry whose compiled code is cached in `cache_dir`.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Registry> {
        let runtime = Runtime::new(RuntimeOptions { cache_dir, ..Default::default() }).map_err(EngineError::Invalid)?;
        Ok(Registry { runtime, loaded: RwLock::new(HashMap::new()) })
    }

    /// Loads every bundled plugin now (from the compiled-code cache when it has them), so
    /// that the first request does not pay for compiling and a broken plugin shows at start.
    pub fn preload_bundled(&self) -> Result<()> {
        for b in mint_plugins::bundled::ALL {
            let p = Arc::new(self.runtime.load_bundled(b.name).expect("listed in ALL")?);
            self.loaded.write().unwrap_or_else(|p| p.into_inner()).insert(b.name.to_string(), p);
        }
        Ok(())
    }

    /// The plugin `name`, which must be of `kind`; `field` names the reference in errors.
    pub fn get(&self, name: &str, kind: Kind, field: &str) -> Result<Arc<Plugin>> {
        if let Some(p) = self.loaded.read().unwrap_or_else(|p| p.into_inner()).get(name) {
            return check_kind(p.clone(), kind, field);
        }
        let p = match self.runtime.load_bundled(name) {
            Some(r) => Arc::new(r?),
            None => {
                let names: Vec<_> = mint_plugins::bundled::ALL.iter().map(|b| b.name).collect();
                return Err(EngineError::Invalid(format!("field `{field}`: no plugin named `{name}` (available: {})", names.join(", "))));
            }
        };
        self.loaded.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), p.clone());
        check_kind(p, kind, field)
    }
}

fn check_kind(p: Arc<Plugin>, kind: Kind, field: &str) -> Result<Arc<Plugin>> {
    if p.manifest().kind != kind {
        return Err(EngineError::Invalid(format!(
            "field `{field}`: plugin `{}` is a {}, not a {kind}",
            p.manifest().name,
            p.manifest().kind
        )));
    }
    Ok(p)
}

/// The engine: state, images and plugins.
pub struct Engine {
    /// The state database.
    pub store: Arc<Store>,
    /// The image store.
    pub images: ImageStore,
    /// Loaded plugins.
    pub plugins: Registry,
}

fn config_value(r: &PluginRef) -> Option<serde_json::Value> {
    if r.config.is_empty() { None } else { Some(serde_json::Value::Object(r.config.clone())) }
}

/// What a reconciliation pass did for one tier.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// Instances bound to nodes and handed to the driver.
    pub deployed: Vec<InstanceId>,
    /// Instances removed from their nodes.
    pub undeployed: Vec<InstanceId>,
    /// Why the pass could not do more, if it could not.
    pub blocked: Option<String>,
}

impl Engine {
    /// Opens the engine's state under `data_dir` (`state/`, `images/`, `cache/`).
    pub fn open(data_dir: &Path) -> Result<Engine> {
        Ok(Engine {
            store: Arc::new(Store::open(&data_dir.join("state"))?),
            images: ImageStore::open(&data_dir.join("images"))?,
            plugins: Registry::new(Some(data_dir.join("cache")))?,
        })
    }

    /// Imports a directory or tar archive as a master image.
    pub fn import_image(&self, source: &Path, name: Option<&str>) -> Result<Image> {
        let image = self.images.import(source, name)?;
        self.store.put_image(&image)?;
        Ok(image)
    }

    /// Creates a tier and mints all K of its instances before any node is chosen: each gets
    /// the next free address and its host name, and runs through the customization steps.
    /// Nothing is stored unless every instance minted.
    pub async fn create_tier(&self, spec: &TierSpec) -> Result<Tier> {
        let tier = spec.to_tier().map_err(EngineError::Invalid)?;
        self.store.image(&tier.image).map_err(|_| {
            EngineError::Invalid(format!("field `image`: no image `{}`; import it first (`mint image import`)", tier.image))
        })?;
        self.store.check_new_tier(&tier)?;
        self.plugins.get(&tier.policy.plugin, Kind::NodePolicy, "policy")?;
        self.plugins.get(&tier.driver.plugin, Kind::Driver, "driver")?;
        let steps = tier
            .customizers
            .iter()
            .map(|c| Ok((self.plugins.get(&c.plugin, Kind::Customizer, "customizers")?, config_value(c))))
            .collect::<Result<Vec<_>>>()?;

        let taken = |a| self.store.address_taken(a).unwrap_or(true);
        let addresses = tier.plan.allocate(tier.max_instances as u64, &taken).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let peers: Arc<[wit::Peer]> = addresses
            .iter()
            .enumerate()
            .map(|(i, a)| wit::Peer { index: i as u32, hostname: tier.hostname.render(&tier.name, i as u64), address: ip(*a) })
            .collect::<Vec<_>>()
            .into();
        let master: Arc<dyn MasterView> = Arc::new(DirMaster::new(self.images.tree(&tier.image)));
        let mut instances = Vec::with_capacity(addresses.len());
        for (i, address) in addresses.iter().enumerate() {
            let identity = wit::Instance {
                tier: tier.name.clone(),
                index: i as u32,
                hostname: peers[i].hostname.clone(),
                address: ip(*address),
                prefix_len: tier.plan.subnet.prefix_len(),
                gateway: tier.plan.gateway.map(ip),
                dns: tier.plan.dns.iter().copied().map(ip).collect(),
                peer_count: tier.max_instances,
            };
            let mut edits = Vec::new();
            for (step, config) in &steps {
                edits.extend(step.customize(&identity, peers.clone(), master.clone(), config.as_ref()).await?.value);
            }
            let (digest, bytes) = overlay::encode(&edits);
            self.store.put_overlay(&digest, &bytes)?;
            instances.push(Instance {
                id: InstanceId { tier: tier.name.clone(), index: i as u32 },
                hostname: identity.hostname,
                address: *address,
                state: InstanceState::Pooled,
                node: None,
                overlay: digest,
            });
        }
        self.store.create_tier(&tier, &instances)?;
        Ok(tier)
    }

    /// Sets a tier's desired count and runs one reconciliation pass for it.
    pub async fn scale(&self, tier: &str, desired: u32) -> Result<Progress> {
        self.store.set_desired(tier, desired)?;
        self.reconcile(tier).await
    }

    /// Drives a tier toward its desired count: selects nodes for missing instances
    /// through the policy and deploys undeployed instances on them, or removes surplus
    /// instances, highest index first.
    pub async fn reconcile(&self, tier_name: &str) -> Result<Progress> {
        let tier = self.store.tier(tier_name)?;
        let instances = self.store.instances(tier_name)?;
        let on_nodes: Vec<&Instance> = instances.iter().filter(|i| i.state.holds_node()).collect();
        let mut progress = Progress::default();
        let desired = tier.desired as usize;
        if on_nodes.len() > desired {
            let driver = self.plugins.get(&tier.driver.plugin, Kind::Driver, "driver")?;
            let mut surplus: Vec<&&Instance> = on_nodes.iter().collect();
            surplus.sort_by_key(|i| std::cmp::Reverse(i.id.index));
            for inst in surplus.into_iter().take(on_nodes.len() - desired) {
                let node = self.node(inst.node.as_deref().unwrap_or_default())?;
                driver.undeploy(&wit_node(&node), &deployment(inst), config_value(&tier.driver).as_ref()).await?;
                self.store.release(&inst.id, NodeState::Free, &format!("tier scaled in to {desired}"))?;
                progress.undeployed.push(inst.id.clone());
            }
            return Ok(progress);
        }
        let need = desired - on_nodes.len();
        if need == 0 {
            return Ok(progress);
        }
        // Which instances go: failed ones first (they were serving), then pooled ones,
        // lowest index first, so the choice is deterministic and the same every time.
        let mut waiting: Vec<&Instance> = instances.iter().filter(|i| i.state.can_deploy()).collect();
        waiting.sort_by_key(|i| (i.state != InstanceState::Failed, i.id.index));
        let nodes = self.store.nodes()?;
        let (request, names) = selection_request(&tier, &nodes, need as u32);
        let policy = self.plugins.get(&tier.policy.plugin, Kind::NodePolicy, "policy")?;
        let chosen = match policy.select(&request, &names, config_value(&tier.policy).as_ref()).await {
            Ok(c) => c.value,
            Err(e) => {
                progress.blocked = Some(e.to_string());
                return Ok(progress);
            }
        };
        let driver = self.plugins.get(&tier.driver.plugin, Kind::Driver, "driver")?;
        // Bind every chosen pair in one transaction, so the pass costs one durable write
        // however many instances it places; then hand each to the driver.
        let pairs: Vec<(&Instance, &String, &wit::Choice)> =
            chosen.iter().zip(waiting).map(|(c, i)| (i, &names[c.candidate as usize], c)).collect();
        let binds: Vec<(InstanceId, String, serde_json::Value)> = pairs
            .iter()
            .map(|(inst, node, choice)| {
                let detail = serde_json::json!({
                    "policy": tier.policy.plugin, "score": choice.score, "reason": choice.reason,
                    "why-this-instance": format!("lowest-index {} instance", inst.state),
                });
                (inst.id.clone(), node.to_string(), detail)
            })
            .collect();
        self.store.bind_many(&binds)?;
        let mut finished = Vec::new();
        for (inst, node_name, _) in &pairs {
            let node = self.node(node_name)?;
            match driver.deploy(&wit_node(&node), &deployment(inst), config_value(&tier.driver).as_ref()).await {
                Ok(r) if r.value.state == wit::InstanceState::Running => {
                    finished.push((inst.id.clone(), serde_json::json!({"driver": tier.driver.plugin, "detail": r.value.detail})));
                }
                Ok(_) => {}
                Err(e) => {
                    self.store.release(&inst.id, NodeState::Failed, &format!("the driver failed: {e}"))?;
                    progress.blocked = Some(e.to_string());
                    continue;
                }
            }
            progress.deployed.push(inst.id.clone());
        }
        self.store.finish_many(&finished)?;
        Ok(progress)
    }

    fn node(&self, name: &str) -> Result<Node> {
        Ok(self.store.node(name)?)
    }

    /// An overlay's edits, decoded, for showing or materializing an instance.
    pub fn overlay(&self, digest: &str) -> Result<serde_json::Value> {
        let bytes = self.store.overlay(digest)?;
        serde_json::from_slice(&bytes).map_err(|e| EngineError::Invalid(format!("overlay {digest} does not decode: {e}")))
    }
}

/// The policy's view: every free node, interned; names kept aside by index.
pub fn selection_request(tier: &Tier, nodes: &[Node], count: u32) -> (wit::SelectionRequest, Vec<String>) {
    let mut b = SelectionBuilder::default();
    for n in nodes {
        if n.instance.as_ref().is_some_and(|i| i.tier == tier.name) {
            b.placed(&n.labels);
        }
        if n.state.can_select() {
            b.candidate(&n.name, n.cpus, n.memory_mib, &n.arch, &n.labels, n.load);
        }
    }
    let r = &tier.requirements;
    let requirements = RequirementsJson {
        labels: r.labels.clone(),
        min_cpus: r.min_cpus,
        min_memory_mib: r.min_memory_mib,
        arch: r.arch.clone(),
    };
    let named = b.finish(&tier.name, count, &requirements);
    (named.request, named.names)
}

fn wit_node(n: &Node) -> wit::Node {
    let pairs = |m: &std::collections::BTreeMap<String, String>| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    wit::Node { name: n.name.clone(), properties: pairs(&n.properties), labels: pairs(&n.labels) }
}

fn deployment(i: &Instance) -> wit::Deployment {
    wit::Deployment {
        tier: i.id.tier.clone(),
        index: i.id.index,
        hostname: i.hostname.clone(),
        artifact: wit::Artifact {
            url: format!("/v1/artifacts/{}/{}", i.id.tier, i.id.index),
            digest: i.overlay.clone(),
            size: 0,
            format: "tree".into(),
        },
    }
}
