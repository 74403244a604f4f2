//! mint's pool engine: imports master images, mints every instance of a tier up front
//! (addresses, host names, customization), and drives each tier toward its desired number
//! of deployed instances through its policy and driver plugins.
//!
//! Architecture invariant: the engine decides nothing a plugin should decide and trusts
//! nothing a plugin says: the plugin host checks answers, the store checks invariants, and
//! the engine only sequences the two.

#![warn(missing_docs)]

pub mod capability;
mod gc;
pub mod images;
pub mod netboot;
mod overlay;
pub mod reconcile;
mod registry;
pub mod spec;

use mint_model::InstanceState;
use mint_model::records::{DiskParts, Image, Instance, InstanceId, Node, PluginRef, Tier};
use mint_plugins::fixture::{RequirementsJson, SelectionBuilder, ip};
use mint_plugins::master::{EmptyMaster, MasterView};
use mint_plugins::types as wit;
use mint_plugins::{CallError, Kind, LoadError};
use mint_store::{Store, StoreError};
use std::path::Path;
use std::sync::Arc;

pub use gc::GcReport;
pub use images::{ImageError, ImageStore, SourceFormat};
pub use reconcile::{Action, Effect, Outcome, PER_ENDPOINT, Permits, StepInput};
pub use registry::{PluginInfo, PluginPolicy, Registry, Source};
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

/// The engine: state, images and plugins.
pub struct Engine {
    /// The state database.
    pub store: Arc<Store>,
    /// The image store.
    pub images: ImageStore,
    /// Loaded plugins.
    pub plugins: Registry,
    /// The daemon's URL as nodes reach it (`http://198.18.0.1:7600`), which artifact URLs
    /// handed to drivers start with; empty for URLs relative to the daemon.
    pub advertise: String,
    /// How many driver calls run at once, in all and per endpoint, for every tier alike.
    /// Drivers wait on nodes and BMCs for seconds; calling them one after another would
    /// make a site of many nodes take minutes, while unbounded calls would flood the BMC
    /// network. A daemon changes the bounds when its configuration is reloaded.
    pub permits: Permits,
    /// How often each running instance is health-checked (ms), each on its own jittered
    /// schedule.
    pub health_check_ms: std::sync::atomic::AtomicU64,
    /// Signs the capability URLs drivers hand BMCs.
    pub capabilities: capability::Capabilities,
    /// Blobs no record refers to that collection keeps (the deploy ISO the daemon serves).
    pub kept_blobs: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The indexes of tree masters read so far, by digest: minting reads one once for all
    /// K instances rather than once per customizer call.
    trees: std::sync::Mutex<std::collections::HashMap<String, Arc<images::tree::TreeIndex>>>,
}

/// The default interval of health checks (see [`Engine::health_check_ms`]).
pub const HEALTH_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The default bound of driver calls at once (see [`Engine::permits`]).
pub const DRIVER_CONCURRENCY: usize = 16;

fn config_value(r: &PluginRef) -> Option<serde_json::Value> {
    if r.config.is_empty() {
        None
    } else {
        Some(serde_json::Value::Object(r.config.clone()))
    }
}

/// How far a long operation (an import, minting a tier) has come: `done` of `total` units
/// of `phase` (`total` 0 while unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// What is being done: `reading`, `hashing`, `unpacking` or `minting`.
    pub phase: &'static str,
    /// Units done.
    pub done: u64,
    /// Units in all, or 0 while unknown.
    pub total: u64,
}

/// Receives [`Step`]s; called often, so it should be cheap (the daemon forwards them to
/// a channel and the CLI draws a bar).
pub type Report<'a> = &'a (dyn Fn(Step) + Send + Sync);

/// A report that goes nowhere.
pub fn quiet(_: Step) {}

/// What a node fetches to run an instance.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Artifact {
    /// The tier.
    pub tier: String,
    /// The instance's index.
    pub index: u32,
    /// Its host name.
    pub hostname: String,
    /// Its address.
    pub address: String,
    /// The prefix length of its subnet.
    pub prefix_len: u8,
    /// `tree` (`master`, the master's canonical tar, and `layer`, the instance's) or
    /// `disk` (`master`, `overlay`, `seed`).
    pub format: &'static str,
    /// The blobs, each at a stable URL named by its digest.
    pub parts: Vec<ArtifactPart>,
}

/// One blob of an artifact.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ArtifactPart {
    /// What it is: `master`, `layer`, `overlay` or `seed`.
    pub role: &'static str,
    /// Where to fetch it (relative to the daemon): `/v1/blobs/<digest>`.
    pub url: String,
    /// `sha256:<hex>` of its bytes.
    pub digest: String,
    /// Its length in bytes.
    pub size: u64,
    /// The file name to give it on the node (an overlay finds its master by this name).
    pub name: String,
}

/// What a reconciliation pass did for one tier.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    /// Instances bound to nodes and handed to the driver.
    pub deployed: Vec<InstanceId>,
    /// Instances removed from their nodes.
    pub undeployed: Vec<InstanceId>,
    /// Deployments the driver reported finished on a later pass (it had answered
    /// `deploying`).
    pub finished: Vec<InstanceId>,
    /// Deployed instances redeployed on their nodes to the tier's new master.
    pub rolled: Vec<InstanceId>,
    /// Deployments that failed or timed out; their nodes were declared failed and the
    /// instances wait, with their identities, for a fresh node.
    pub failed: Vec<InstanceId>,
    /// Why the pass could not do more, if it could not.
    pub blocked: Option<String>,
}

impl Engine {
    /// Opens the engine's state under `data_dir` (`state/`, `images/`, `cache/`, and
    /// `plugins/` for the site's own plugins).
    pub fn open(data_dir: &Path) -> Result<Engine> {
        Engine::open_at(
            data_dir,
            &mint_store::Location::Sled(data_dir.join("state")),
        )
    }

    /// [`Engine::open`] with the state at `state` instead (etcd, say); images, the cache and
    /// plugins stay under `data_dir`.
    pub fn open_at(data_dir: &Path, state: &mint_store::Location) -> Result<Engine> {
        Self::open_with(data_dir, data_dir, state)
    }

    /// Opens the engine with its own files in `data_dir` (the plugin cache), blobs and
    /// installed plugins in `shared_dir` (which every daemon of a shared store reads, and
    /// which is `data_dir` for a daemon alone), and its state at `state`.
    pub fn open_with(
        data_dir: &Path,
        shared_dir: &Path,
        state: &mint_store::Location,
    ) -> Result<Engine> {
        let store = Arc::new(Store::open_at(state)?);
        // The only writer of an embedded store finishes what a writer that stopped half-way
        // left (a tier minted in batches, a tier deleted in batches). On a shared store
        // that is the next leader's work, since a daemon that only opens it must not
        // remove a tier that the leader is minting now.
        if !store.is_shared() {
            for done in store.finish_interrupted()? {
                tracing::warn!("{done}");
            }
        }
        let key = store.secret("capabilities")?;
        let plugins = Registry::new(
            Some(data_dir.join("cache")),
            Some(shared_dir.join("plugins")),
        )?;
        // What the host adds to a driver's requests to a node's agent: the engine's
        // credential for the node's current enrollment.
        let (signer, records) = (capability::Capabilities::new(&key), store.clone());
        plugins
            .runtime()
            .set_engine_secrets(Arc::new(move |node: &str, property: &str| {
                if property != "agent-url" {
                    return None;
                }
                let generation = records.node_credential(node).ok().flatten()?.generation;
                mint_plugins::credentials::Authorization::bearer(
                    &signer.agent_credential(node, generation),
                )
                .ok()
            }));
        Ok(Engine {
            capabilities: capability::Capabilities::new(&key),
            store,
            images: ImageStore::open(&shared_dir.join("images"))?,
            plugins,
            advertise: String::new(),
            permits: Permits::new(DRIVER_CONCURRENCY, PER_ENDPOINT),
            kept_blobs: std::sync::Mutex::default(),
            health_check_ms: std::sync::atomic::AtomicU64::new(
                HEALTH_CHECK_EVERY.as_millis() as u64
            ),
            trees: Default::default(),
        })
    }

    /// Installs a plugin package (see [`Registry::install`]); a replacement must keep the
    /// kind of the plugin it replaces where tiers use it.
    pub fn install_plugin(&self, package: &[u8], signature: Option<&str>) -> Result<PluginInfo> {
        let tiers = self.store.tiers()?;
        self.plugins.install(package, signature, |name, kind| {
            tiers.iter().find_map(|t| {
                let uses = [
                    (&t.policy.plugin, Kind::NodePolicy),
                    (&t.driver.plugin, Kind::Driver),
                ]
                .into_iter()
                .chain(t.customizers.iter().map(|c| (&c.plugin, Kind::Customizer)));
                uses.into_iter()
                    .any(|(p, k)| p == name && k != kind)
                    .then(|| t.name.clone())
            })
        })
    }

    /// Removes an installed plugin that no tier uses.
    pub fn remove_plugin(&self, name: &str) -> Result<()> {
        let user = self.store.tiers()?.into_iter().find(|t| {
            t.policy.plugin == name
                || t.driver.plugin == name
                || t.customizers.iter().any(|c| c.plugin == name)
        });
        self.plugins.remove(name, user.map(|t| t.name))
    }

    /// Imports a master image, whose format is read from its contents (see
    /// [`images::detect`]).
    pub fn import_image(&self, source: &Path, name: Option<&str>) -> Result<Image> {
        self.import_image_reporting(source, name, None, &quiet)
    }

    /// [`Engine::import_image`] with a claimed format that the contents must match, reporting
    /// progress to `report`.
    pub fn import_image_reporting(
        &self,
        source: &Path,
        name: Option<&str>,
        claimed: Option<SourceFormat>,
        report: Report<'_>,
    ) -> Result<Image> {
        let mut image = self.images.import(source, name, claimed, report)?;
        // The same content imported again without a name keeps the name it was given.
        if name.is_none()
            && let Ok(known) = self.store.image(&image.digest)
        {
            image.name = known.name;
        }
        self.store.put_image(&image)?;
        Ok(image)
    }

    /// Creates a tier and mints all K of its instances before any node is chosen: each gets
    /// the next free address and its host name, and runs through the customization steps.
    /// Nothing is stored unless every instance minted.
    pub async fn create_tier(&self, spec: &TierSpec, by: &str) -> Result<Tier> {
        self.create_tier_reporting(spec, &quiet, by).await
    }

    /// [`Engine::create_tier`], reporting each minted instance to `report`; `by` is the
    /// identity the event log records.
    pub async fn create_tier_reporting(
        &self,
        spec: &TierSpec,
        report: Report<'_>,
        by: &str,
    ) -> Result<Tier> {
        // A tier file may name its master as `mint image import --name` did; the tier
        // records the digest, so a later import under the same name changes nothing here.
        let resolved;
        let spec = if spec.image.starts_with("sha256:") || spec.image.is_empty() {
            spec
        } else {
            let image = self
                .find_image(&spec.image)
                .map_err(|e| EngineError::Invalid(format!("field `image`: {e}")))?;
            resolved = TierSpec {
                image: image.digest,
                ..spec.clone()
            };
            &resolved
        };
        let tier = spec.to_tier().map_err(EngineError::Invalid)?;
        let image = self.store.image(&tier.image).map_err(|_| {
            EngineError::Invalid(format!(
                "field `image`: no image `{}`; import it first (`mint image import`)",
                tier.image
            ))
        })?;
        self.store.check_new_tier(&tier)?;
        self.plugins
            .get(&tier.policy.plugin, Kind::NodePolicy, "policy")?;
        self.plugins
            .get(&tier.driver.plugin, Kind::Driver, "driver")?;
        let taken = |a| self.store.address_taken(a).unwrap_or(true);
        let addresses = tier
            .plan
            .allocate(tier.max_instances as u64, &taken)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        let instances = self.mint(&tier, &image, &addresses, report).await?;
        self.store.create_tier(&tier, &instances, by)?;
        Ok(tier)
    }

    /// Mints one instance per address (index = position) of `tier` from `image`: each runs
    /// through the customizers, its edits are stored as an overlay and, for a disk master,
    /// its NoCloud seed is written. The blobs are durable when this returns.
    async fn mint(
        &self,
        tier: &Tier,
        image: &Image,
        addresses: &[std::net::IpAddr],
        report: Report<'_>,
    ) -> Result<Vec<Instance>> {
        let steps = tier
            .customizers
            .iter()
            .map(|c| {
                Ok((
                    self.plugins
                        .get(&c.plugin, Kind::Customizer, "customizers")?,
                    config_value(c),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let peers: Arc<[wit::Peer]> = addresses
            .iter()
            .enumerate()
            .map(|(i, a)| wit::Peer {
                index: i as u32,
                hostname: tier.hostname.render(&tier.name, i as u64),
                address: ip(*a),
            })
            .collect::<Vec<_>>()
            .into();
        // Customizers read a tree master's files; a disk master is opaque to them (its
        // instances get their identity from the NoCloud seed), so they see an empty one.
        let tree = if !image.is_tree() {
            None
        } else {
            Some(self.tree_index(&image.digest)?)
        };
        let master: Arc<dyn MasterView> = match &tree {
            Some(index) => Arc::new(images::tree::TarMaster(index.clone())),
            None => Arc::new(EmptyMaster),
        };
        // Every instance of a disk master shares one empty overlay backed by the master.
        let disk_overlay = if image.is_disk() {
            Some(self.images.disk_overlay(image)?)
        } else {
            None
        };
        let mut instances = Vec::with_capacity(addresses.len());
        let total = addresses.len() as u64;
        report(Step {
            phase: "minting",
            done: 0,
            total,
        });
        // Overlays are written together after the loop, in as few commits as the store
        // takes: one commit each would cost a round trip per instance on etcd.
        let mut overlays: Vec<(String, Vec<u8>)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
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
                edits.extend(
                    step.customize(&identity, peers.clone(), master.clone(), config.as_ref())
                        .await?
                        .value,
                );
            }
            let (digest, bytes) = overlay::encode(&edits);
            // A tree instance's layer is built here, once, so serving it reads a small
            // blob and nothing is built while a node waits.
            let layer = match &tree {
                Some(index) => Some(self.images.put_blob(&images::layer::build(
                    index,
                    &decode_edits(&digest, &bytes)?,
                )?)?),
                None => None,
            };
            if seen.insert(digest.clone()) {
                overlays.push((digest.clone(), bytes));
            }
            let disk = match (&disk_overlay, image.is_iso()) {
                (None, false) => None,
                (overlay, _) => {
                    let id = images::seed::SeedIdentity {
                        tier: &tier.name,
                        index: i as u32,
                        hostname: &identity.hostname,
                        address: *address,
                        prefix_len: tier.plan.subnet.prefix_len(),
                        gateway: tier.plan.gateway,
                        dns: &tier.plan.dns,
                        customization: &digest,
                    };
                    let volume = images::seed::volume(&images::seed::files(&id, &edits)?)?;
                    Some(DiskParts {
                        overlay: overlay.clone(),
                        seed: self.images.put_blob(&volume)?,
                    })
                }
            };
            instances.push(Instance {
                id: InstanceId {
                    tier: tier.name.clone(),
                    index: i as u32,
                },
                hostname: identity.hostname,
                address: *address,
                state: InstanceState::Pooled,
                node: None,
                overlay: digest,
                since_ms: 0,
                disk,
                revision: 0,
                deployment: 0,
                deployment_started_ms: 0,
                layer,
            });
            report(Step {
                phase: "minting",
                done: i as u64 + 1,
                total,
            });
        }
        // The blobs and overlays the instances refer to are durable before the tier that
        // refers to them.
        self.images.sync()?;
        self.store.put_overlays(&overlays)?;
        Ok(instances)
    }

    /// Replaces a tier's master with `image` (a digest or name of a new version of it): re-mints all K
    /// instances with their identities, then reconciliation rolls the deployed ones to it
    /// through the driver, `batch` at a time, lowest index first. Returns the new revision.
    pub async fn update_image(
        &self,
        tier_name: &str,
        image: &str,
        batch: u32,
        report: Report<'_>,
        by: &str,
    ) -> Result<u64> {
        let tier = self.store.tier(tier_name)?;
        let new = self
            .find_image(image)
            .map_err(|e| EngineError::Invalid(format!("field `image`: {e}")))?;
        if batch == 0 {
            return Err(EngineError::Invalid(
                "field `batch`: roll at least 1 instance at a time".into(),
            ));
        }
        let current = self.store.instances(tier_name)?;
        let addresses: Vec<std::net::IpAddr> = current.iter().map(|i| i.address).collect();
        let reminted = self.mint(&tier, &new, &addresses, report).await?;
        Ok(self
            .store
            .remint(tier_name, &new.digest, batch, &reminted, by)?)
    }

    /// Sets a tier's desired count (for the identity `by`) and runs one reconciliation
    /// pass for it, its driver calls included.
    pub async fn scale(&self, tier: &str, desired: u32, by: &str) -> Result<Progress> {
        self.store.set_desired(tier, desired, by)?;
        self.reconcile(tier).await
    }

    fn node(&self, name: &str) -> Result<Node> {
        Ok(self.store.node(name)?)
    }

    /// The index of tree master `digest`, read once and kept.
    pub fn tree_index(&self, digest: &str) -> Result<Arc<images::tree::TreeIndex>> {
        if let Some(t) = self
            .trees
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            return Ok(t.clone());
        }
        let index = Arc::new(images::tree::TreeIndex::read(&self.images.tar(digest))?);
        self.trees
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.to_string(), index.clone());
        Ok(index)
    }

    /// The layer of a tree instance: the one minted with it, or (for an instance minted
    /// before layers existed) built now from its overlay and recorded, once.
    fn layer(&self, tier: &Tier, inst: &Instance) -> Result<String> {
        if let Some(l) = inst
            .layer
            .as_ref()
            .filter(|l| self.images.locate(l).is_some())
        {
            return Ok(l.clone());
        }
        let key = format!("layer:{}:{}", tier.image, inst.overlay);
        if let Some(d) = self
            .store
            .artifact(&key)?
            .filter(|d| self.images.locate(d).is_some())
        {
            return Ok(d);
        }
        let bytes = self.store.overlay(&inst.overlay)?;
        let layer = images::layer::build(
            &*self.tree_index(&tier.image)?,
            &decode_edits(&inst.overlay, &bytes)?,
        )?;
        let digest = self.images.put_blob(&layer)?;
        self.images.sync()?;
        self.store.put_artifact(&key, &digest)?;
        Ok(digest)
    }

    /// Builds the root filesystem of instance `index` of a tree tier in `into` (a new
    /// directory on the daemon's host): the master's files unpacked from its canonical
    /// tar, then the instance's layer applied over them, as a node without overlayfs
    /// assembles it.
    pub fn materialize(
        &self,
        tier: &str,
        index: u32,
        into: &Path,
    ) -> Result<images::materialize::Materialized> {
        let t = self.store.tier(tier)?;
        let inst = self.instance(tier, index)?;
        let image = self.store.image(&t.image)?;
        if !image.is_tree() {
            return Err(EngineError::Invalid(format!(
                "tier `{tier}` runs a {} master: its instances are the master, booted, with their own NoCloud seed, served at /v1/artifacts/{tier}/{index}",
                image.format
            )));
        }
        let layer = self.layer(&t, &inst)?;
        let layer_path = self.images.locate(&layer).ok_or_else(|| {
            EngineError::Invalid(format!("the layer {layer} of {tier}/{index} is missing"))
        })?;
        Ok(images::materialize::materialize(
            &self.images.tar(&t.image),
            &layer_path,
            into,
        )?)
    }

    /// What a node fetches to run instance `index` of `tier`: for a tree master, the
    /// master (its canonical tar, shared by every instance) and the instance's layer; for
    /// a disk master, the master, the overlay backed by it and the instance's NoCloud seed.
    /// Nothing is built here but the layer of an instance minted before layers existed.
    pub fn artifact(&self, tier: &str, index: u32) -> Result<Artifact> {
        let t = self.store.tier(tier)?;
        let inst = self.instance(tier, index)?;
        let image = self.store.image(&t.image)?;
        let part = |role: &'static str, digest: &str, name: String| -> Result<ArtifactPart> {
            let path = self.images.locate(digest).ok_or_else(|| {
                EngineError::Invalid(format!(
                    "blob {digest} ({role} of {tier}/{index}) is missing from the image store"
                ))
            })?;
            let size = std::fs::metadata(&path)
                .map_err(|e| EngineError::Invalid(format!("cannot stat {}: {e}", path.display())))?
                .len();
            Ok(ArtifactPart {
                role,
                url: format!("/v1/blobs/{digest}"),
                digest: digest.to_string(),
                size,
                name,
            })
        };
        let hex = |d: &str| d.trim_start_matches("sha256:").to_string();
        let parts = match &inst.disk {
            Some(d) => {
                let mut parts = vec![part(
                    "master",
                    &image.digest,
                    format!("{}.{}", hex(&image.digest), image.format),
                )?];
                if let Some(o) = &d.overlay {
                    parts.push(part("overlay", o, format!("{}.qcow2", hex(o)))?);
                }
                parts.push(part("seed", &d.seed, "seed.img".into())?);
                parts
            }
            None => vec![
                part(
                    "master",
                    &image.digest,
                    format!("{}.tar", hex(&image.digest)),
                )?,
                part("layer", &self.layer(&t, &inst)?, "layer.tar".into())?,
            ],
        };
        Ok(Artifact {
            tier: tier.into(),
            index,
            hostname: inst.hostname,
            address: inst.address.to_string(),
            prefix_len: t.plan.subnet.prefix_len(),
            format: image.artifact_format(),
            parts,
        })
    }

    fn instance(&self, tier: &str, index: u32) -> Result<Instance> {
        self.store
            .instances(tier)?
            .into_iter()
            .find(|i| i.id.index == index)
            .ok_or_else(|| {
                EngineError::Store(StoreError::NotFound {
                    what: "instance",
                    name: format!("{tier}/{index}"),
                })
            })
    }

    /// An overlay's edits, decoded, for showing or materializing an instance.
    pub fn overlay(&self, digest: &str) -> Result<serde_json::Value> {
        let bytes = self.store.overlay(digest)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| EngineError::Invalid(format!("overlay {digest} does not decode: {e}")))
    }
}

/// An overlay's stored bytes as the edits a layer is built from.
fn decode_edits(digest: &str, bytes: &[u8]) -> Result<Vec<images::materialize::OverlayEdit>> {
    serde_json::from_slice(bytes)
        .map_err(|e| EngineError::Invalid(format!("overlay {digest} does not decode: {e}")))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The label the host gives a candidate whose agent caches the tier's master (value
/// `true`), so a policy can prefer nodes that need not fetch it.
pub const CACHED_MASTER_LABEL: &str = "mint.cached-master";

/// The policy's view: every free node, interned; names kept aside by index.
pub fn selection_request<'a>(
    tier: &Tier,
    nodes: impl IntoIterator<Item = &'a Node>,
    count: u32,
) -> (wit::SelectionRequest, Vec<String>) {
    let mut b = SelectionBuilder::default();
    for n in nodes {
        if n.instance.as_ref().is_some_and(|i| i.tier == tier.name) {
            b.placed(&n.labels);
        }
        if n.state.can_select() {
            if n.cached.contains(&tier.image) {
                // The host's own label: this node has the tier's master and fetches only
                // the instance's part (see CACHED_MASTER_LABEL).
                let mut labels = n.labels.clone();
                labels.insert(CACHED_MASTER_LABEL.into(), "true".into());
                b.candidate(&n.name, n.cpus, n.memory_mib, &n.arch, &labels, n.load);
            } else {
                b.candidate(&n.name, n.cpus, n.memory_mib, &n.arch, &n.labels, n.load);
            }
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
    let pairs = |m: &std::collections::BTreeMap<String, String>| {
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    wit::Node {
        name: n.name.clone(),
        properties: pairs(&n.properties),
        labels: pairs(&n.labels),
    }
}

impl Engine {
    /// What a driver gets to deploy `i`: its artifact as a capability URL for the
    /// instance's current deployment, which a BMC can fetch without a token.
    fn deployment(&self, i: &Instance) -> wit::Deployment {
        // Counted from the deployment's start, so every call about it (deploy, status,
        // undeploy) names the same URLs, which drivers compare with what a BMC holds.
        let expires = i.deployment_started_ms / 1000 + capability::TTL_SECS;
        let token = self
            .capabilities
            .token(&i.id.tier, i.id.index, i.deployment, expires);
        deployment(&self.advertise, i, &token)
    }

    /// The instance a capability token admits to: its MAC and expiry hold and it names
    /// the instance's current deployment, which holds a node. `None` otherwise, for every
    /// reason alike.
    pub fn capability_instance(&self, tier: &str, index: u32, token: &str) -> Option<Instance> {
        let deployment = self
            .capabilities
            .check(tier, index, token, now_ms() / 1000)
            .ok()?;
        let inst = self.instance(tier, index).ok()?;
        (inst.deployment == deployment && inst.state.holds_node()).then_some(inst)
    }
}

/// What a network-booting node boots: found by its MAC, the instance bound to it.
#[derive(Debug, Clone)]
pub struct NetbootTarget {
    /// The node whose `mac` property holds the MAC.
    pub node: String,
    /// The instance bound to it, deploying or deployed, of a tree master.
    pub instance: Instance,
    /// A capability for the instance's current deployment, valid as long as asked.
    pub token: String,
    /// The master, by digest.
    pub master: String,
    /// Where the master's canonical tar is.
    pub master_tar: std::path::PathBuf,
    /// The subnet's prefix length, which the boot stage brings the address up with.
    pub prefix_len: u8,
    /// The subnet's default gateway, if any.
    pub gateway: Option<std::net::IpAddr>,
}

/// Whether a node property `mac` (one MAC or several, comma-separated) names `mac`.
pub fn node_has_mac(n: &Node, mac: &str) -> bool {
    n.properties
        .get("mac")
        .is_some_and(|v| v.split(',').any(|m| m.trim().eq_ignore_ascii_case(mac)))
}

impl Engine {
    /// The instance the node with NIC `mac` boots, with a capability valid `ttl_secs`
    /// from now, or the tier's deploy timeout if that is longer. `None` when no node has that MAC, its node holds no instance that is
    /// being deployed or runs, or the instance's master is not a tree: one answer for all.
    pub fn netboot_target(&self, mac: &str, ttl_secs: u64) -> Option<NetbootTarget> {
        let node = self
            .store
            .nodes()
            .ok()?
            .into_iter()
            .find(|n| node_has_mac(n, mac))?;
        let id = node.instance.clone()?;
        let inst = self.instance(&id.tier, id.index).ok()?;
        let deployed = matches!(
            inst.state,
            InstanceState::Deploying | InstanceState::Deployed
        );
        if !deployed || inst.node.as_deref() != Some(node.name.as_str()) || inst.disk.is_some() {
            return None;
        }
        let t = self.store.tier(&id.tier).ok()?;
        let image = self.store.image(&t.image).ok()?;
        if !image.is_tree() {
            return None;
        }
        // The capability outlives neither its deployment (a new one makes it worthless) nor
        // the tier's deploy timeout, but lasts that long: a rack booting at once may take
        // longer than `ttl_secs` to fetch its instances and report.
        let ttl = ttl_secs.max(u64::from(t.deploy_timeout_secs));
        let expires = now_ms() / 1000 + ttl;
        let token = self
            .capabilities
            .token(&id.tier, id.index, inst.deployment, expires);
        Some(NetbootTarget {
            node: node.name,
            token,
            master_tar: self.images.tar(&t.image),
            master: t.image.clone(),
            prefix_len: t.plan.subnet.prefix_len(),
            gateway: t.plan.gateway,
            instance: inst,
        })
    }
}

fn deployment(base: &str, i: &Instance, token: &str) -> wit::Deployment {
    wit::Deployment {
        tier: i.id.tier.clone(),
        index: i.id.index,
        hostname: i.hostname.clone(),
        artifact: wit::Artifact {
            url: format!(
                "{}/v1/cap/{}/{}/{token}",
                base.trim_end_matches('/'),
                i.id.tier,
                i.id.index
            ),
            digest: i.overlay.clone(),
            size: 0,
            // An ISO master's instances have a seed and no overlay.
            format: match &i.disk {
                Some(d) if d.overlay.is_none() => "iso".into(),
                Some(_) => "disk".into(),
                None => "tree".into(),
            },
        },
    }
}
