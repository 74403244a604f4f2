//! mint's state on disk, in an embedded sled database: tiers, their instances, the node
//! inventory and the event log. Every change is one multi-tree transaction that checks
//! the pool's invariants before it writes and appends the event that explains it, so a
//! refused change writes nothing and a crash never leaves half a change.
//!
//! Architecture invariant: only this crate knows sled. Callers see `mint-model` records.
//!
//! Writers are serialised by a process-wide lock: sled's transactions cannot scan a tree,
//! and checks such as "no two tiers' address plans overlap" need a scan, so the scan and
//! the transaction happen under the same lock. Readers take no lock.
//!
//! The node inventory is also kept in memory, refreshed by the single writer after each
//! commit that touches a node: every selection reads the whole inventory, and iterating
//! thousands of records out of sled costs more than the selection itself.

use mint_model::records::{
    ENGINE, Enrollment, Event, Image, Instance, InstanceId, Node, NodeCredential, Principal, Tier,
    Token,
};
use mint_model::{InstanceState, NodeState};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree, abort};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a store operation failed. A refused operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request breaks a rule of the pool; the message names what and how to fix it.
    #[error("{0}")]
    Refused(String),
    /// A named thing does not exist.
    #[error("no {what} named `{name}`")]
    NotFound {
        /// `tier`, `node` or `instance`.
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// The database failed.
    #[error("the state database at {path} failed: {message}")]
    Storage {
        /// Where the database is.
        path: String,
        /// sled's explanation.
        message: String,
    },
    /// A record on disk does not decode (a newer or damaged database).
    #[error(
        "a stored record does not decode ({0}); the database may be from a newer mint or damaged"
    )]
    Corrupt(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// The database and its trees.
pub struct Store {
    db: sled::Db,
    path: String,
    tiers: sled::Tree,
    instances: sled::Tree,
    addresses: sled::Tree,
    hostnames: sled::Tree,
    nodes: sled::Tree,
    events: sled::Tree,
    images: sled::Tree,
    overlays: sled::Tree,
    artifacts: sled::Tree,
    /// Operators' tokens, pending enrollments and node credentials, by key prefix
    /// (`token/`, `enroll/`, `cred/`), and every credential's hash (`hash/`), which says
    /// whose it is: what authentication looks up.
    identities: sled::Tree,
    write: Mutex<()>,
    /// Every node as last committed, by name; changed only under `write`.
    node_index: RwLock<BTreeMap<String, Arc<Node>>>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// An instance's key: tier name, a NUL, the index big-endian, so a tier's instances are
/// one ordered range.
fn instance_key(id: &InstanceId) -> Vec<u8> {
    let mut k = id.tier.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&id.index.to_be_bytes());
    k
}

fn tier_prefix(tier: &str) -> Vec<u8> {
    let mut k = tier.as_bytes().to_vec();
    k.push(0);
    k
}

/// Whether two `sha256:<hex>` hashes are equal, compared in constant time: how long the
/// comparison takes says nothing about where they differ.
pub fn same_hash(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a driver's answer about `deployment` of `id` no longer applies.
fn discarded_message(id: &InstanceId, deployment: u64, now: &Instance, said: &str) -> String {
    let what = if now.deployment != deployment {
        format!("deployment {} has begun since", now.deployment)
    } else {
        format!("the instance is {} now", now.state)
    };
    format!(
        "a late answer for {id} (the driver {said} deployment {deployment}) was discarded: {what}"
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether sled failed to open because another handle holds the directory's lock (sled
/// reports it as an I/O error whose text names the lock).
fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock"))
}

/// The trees one transaction touches.
struct Tx<'a> {
    tiers: &'a TransactionalTree,
    instances: &'a TransactionalTree,
    addresses: &'a TransactionalTree,
    hostnames: &'a TransactionalTree,
    nodes: &'a TransactionalTree,
    events: &'a TransactionalTree,
    identities: &'a TransactionalTree,
    /// Who the transaction acts for, recorded in its events.
    by: &'a str,
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<StoreError>>;

fn refuse<T>(message: String) -> TxResult<T> {
    abort(StoreError::Refused(message))
}

impl Tx<'_> {
    fn get<T: DeserializeOwned>(tree: &TransactionalTree, key: &[u8]) -> TxResult<Option<T>> {
        match tree.get(key)? {
            None => Ok(None),
            Some(b) => decode(&b)
                .map(Some)
                .map_err(ConflictableTransactionError::Abort),
        }
    }
    fn put<T: Serialize>(tree: &TransactionalTree, key: &[u8], v: &T) -> TxResult<()> {
        tree.insert(key, encode(v))?;
        Ok(())
    }
    fn instance(&self, id: &InstanceId) -> TxResult<Instance> {
        match Self::get(self.instances, &instance_key(id))? {
            Some(i) => Ok(i),
            None => abort(StoreError::NotFound {
                what: "instance",
                name: id.to_string(),
            }),
        }
    }
    fn node(&self, name: &str) -> TxResult<Node> {
        match Self::get(self.nodes, name.as_bytes())? {
            Some(n) => Ok(n),
            None => abort(StoreError::NotFound {
                what: "node",
                name: name.into(),
            }),
        }
    }
    /// Takes `inst` off its node: the node becomes `node_state` holding nothing, the
    /// instance `to` on no node; both are written. Returns the node's name.
    fn unbind(
        &self,
        inst: &mut Instance,
        node_state: NodeState,
        to: InstanceState,
    ) -> TxResult<String> {
        let node = inst.node.take().unwrap_or_default();
        let mut n = self.node(&node)?;
        n.state = node_state;
        n.instance = None;
        Self::put(self.nodes, node.as_bytes(), &n)?;
        inst.state = to;
        inst.since_ms = now_ms();
        Self::put(self.instances, &instance_key(&inst.id), inst)?;
        Ok(node)
    }

    fn event(
        &self,
        tier: Option<&str>,
        kind: &str,
        message: String,
        detail: serde_json::Value,
    ) -> TxResult<()> {
        let seq = self.events.generate_id()?;
        let e = Event {
            seq,
            at_ms: now_ms(),
            tier: tier.map(str::to_string),
            kind: kind.into(),
            message,
            detail,
            by: Some(self.by.to_string()),
        };
        Self::put(self.events, &seq.to_be_bytes(), &e)
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.display().to_string();
        let storage = |e: sled::Error| StoreError::Storage {
            path: path.clone(),
            message: e.to_string(),
        };
        // sled locks its directory. A store closed a moment ago (a restart in the same
        // process, or a previous daemon still exiting) releases the lock only when its
        // background flusher stops, so a held lock is retried for a bounded time before it
        // is reported as another process using the state.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::open(dir) {
                Ok(db) => break db,
                Err(e) if is_lock_held(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) if is_lock_held(&e) => {
                    return Err(StoreError::Storage {
                        path: path.clone(),
                        message: "another process (a running mint daemon?) holds this state directory; stop it or choose another --data-dir".into(),
                    });
                }
                Err(e) => return Err(storage(e)),
            }
        };
        let tree = |name: &str| db.open_tree(name).map_err(storage);
        let store = Store {
            tiers: tree("tiers")?,
            instances: tree("instances")?,
            addresses: tree("addresses")?,
            hostnames: tree("hostnames")?,
            nodes: tree("nodes")?,
            events: tree("events")?,
            images: tree("images")?,
            overlays: tree("overlays")?,
            artifacts: tree("artifacts")?,
            identities: tree("identities")?,
            path: path.clone(),
            db,
            write: Mutex::new(()),
            node_index: RwLock::new(BTreeMap::new()),
        };
        let all: Vec<Node> = store.all(store.nodes.iter())?;
        *store.node_index.write().unwrap_or_else(|p| p.into_inner()) = all
            .into_iter()
            .map(|n| (n.name.clone(), Arc::new(n)))
            .collect();
        Ok(store)
    }

    /// Re-reads the named nodes from the database into the in-memory index after a commit
    /// that may have changed them. Called with the write lock held, so no commit can land
    /// between the read and the update.
    fn refresh_nodes<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<()> {
        let mut fresh = Vec::new();
        for name in names {
            let node = match self
                .nodes
                .get(name.as_bytes())
                .map_err(|e| self.storage(e))?
            {
                Some(b) => Some(Arc::new(decode::<Node>(&b)?)),
                None => None,
            };
            fresh.push((name.to_string(), node));
        }
        let mut index = self.node_index.write().unwrap_or_else(|p| p.into_inner());
        for (name, node) in fresh {
            match node {
                Some(n) => index.insert(name, n),
                None => index.remove(&name),
            };
        }
        Ok(())
    }

    fn storage(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Storage {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Runs `f` as one transaction over every tree for the engine itself, then makes it
    /// durable.
    fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T> {
        self.transact_as(ENGINE, f)
    }

    /// [`Store::transact`] for the identity `by`, which its events record.
    fn transact_as<T>(&self, by: &str, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T> {
        let r = (
            &self.tiers,
            &self.instances,
            &self.addresses,
            &self.hostnames,
            &self.nodes,
            &self.events,
            &self.identities,
        )
            .transaction(
                |(tiers, instances, addresses, hostnames, nodes, events, identities)| {
                    f(&Tx {
                        tiers,
                        instances,
                        addresses,
                        hostnames,
                        nodes,
                        events,
                        identities,
                        by,
                    })
                },
            );
        let value = match r {
            Ok(v) => v,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(self.storage(e)),
        };
        // An acknowledged change must survive a crash: flush before answering.
        self.db.flush().map_err(|e| self.storage(e))?;
        Ok(value)
    }

    /// One record by key, or `NotFound` naming `what`.
    fn get_one<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &str,
        what: &'static str,
    ) -> Result<T> {
        match tree.get(key.as_bytes()).map_err(|e| self.storage(e))? {
            Some(b) => decode(&b),
            None => Err(StoreError::NotFound {
                what,
                name: key.into(),
            }),
        }
    }

    /// Every record of a tree (or of a key prefix of it), in key order.
    fn all<T: DeserializeOwned>(&self, iter: sled::Iter) -> Result<Vec<T>> {
        iter.values()
            .map(|v| decode(&v.map_err(|e| self.storage(e))?))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        // A writer that panicked left no partial transaction behind, so the lock's
        // poisoning carries no meaning here.
        self.write.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a tier with all K of its minted instances, in one transaction. Refused, with
    /// nothing written, if the name is taken, the plan overlaps another tier's, the instance
    /// count differs from K, or an address or host name is already held.
    pub fn create_tier(&self, tier: &Tier, instances: &[Instance], by: &str) -> Result<()> {
        let _w = self.lock();
        self.check_new_tier(tier)?;
        // Checked under the write lock, which deleting an image also takes.
        if !self
            .images
            .contains_key(tier.image.as_bytes())
            .map_err(|e| self.storage(e))?
        {
            return Err(StoreError::Refused(format!(
                "field `image`: no image `{}`; import it first",
                tier.image
            )));
        }
        if instances.len() != tier.max_instances as usize {
            return Err(StoreError::Refused(format!(
                "tier `{}` has max-instances {} but {} instances were minted",
                tier.name,
                tier.max_instances,
                instances.len()
            )));
        }
        self.transact_as(by, |tx| {
            Tx::put(tx.tiers, tier.name.as_bytes(), tier)?;
            for i in instances {
                let id = i.id.to_string();
                if i.id.tier != tier.name || i.state != InstanceState::Pooled || i.node.is_some() {
                    return refuse(format!("instance {id} is not a fresh pooled instance of tier `{}`", tier.name));
                }
                let addr = i.address.to_string();
                if let Some(holder) = tx.addresses.insert(addr.as_bytes(), id.as_bytes())? {
                    return refuse(format!("address {addr} is already held by {}", String::from_utf8_lossy(&holder)));
                }
                if let Some(holder) = tx.hostnames.insert(i.hostname.as_bytes(), id.as_bytes())? {
                    return refuse(format!("host name {} is already held by {}", i.hostname, String::from_utf8_lossy(&holder)));
                }
                Tx::put(tx.instances, &instance_key(&i.id), i)?;
            }
            tx.event(
                Some(&tier.name),
                "tier-created",
                format!("tier `{}` created with {} instances minted in {}", tier.name, tier.max_instances, tier.plan.subnet),
                serde_json::json!({ "max-instances": tier.max_instances, "subnet": tier.plan.subnet }),
            )
        })
    }

    /// Records an imported master image (idempotent: the digest names the content).
    pub fn put_image(&self, image: &Image) -> Result<()> {
        let _w = self.lock();
        self.images
            .insert(image.digest.as_bytes(), encode(image))
            .map_err(|e| self.storage(e))?;
        self.db.flush().map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Deletes an image's record. Refused while any tier uses it, naming the tiers.
    pub fn delete_image(&self, digest: &str, by: &str) -> Result<Image> {
        let _w = self.lock();
        let image: Image = self.get_one(&self.images, digest, "image")?;
        let users: Vec<String> = self
            .tiers()?
            .into_iter()
            .filter(|t| t.image == digest)
            .map(|t| t.name)
            .collect();
        if !users.is_empty() {
            return Err(StoreError::Refused(format!(
                "image {} ({}) is the master of tier(s) {}; delete those tiers first",
                image.name,
                digest,
                users.join(", ")
            )));
        }
        self.images
            .remove(digest.as_bytes())
            .map_err(|e| self.storage(e))?;
        self.transact_as(by, |tx| {
            tx.event(
                None,
                "image-deleted",
                format!("image {} ({digest}) deleted", image.name),
                serde_json::Value::Null,
            )
        })?;
        Ok(image)
    }

    /// Every overlay digest stored.
    pub fn overlay_digests(&self) -> Result<Vec<String>> {
        self.overlays
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k.map_err(|e| self.storage(e))?).into_owned()))
            .collect()
    }

    /// Removes overlays no instance refers to any more. The caller computes `unused` with
    /// no tier being created meanwhile (the daemon holds its operation lock).
    pub fn remove_overlays(&self, unused: &[String]) -> Result<()> {
        let _w = self.lock();
        for d in unused {
            self.overlays
                .remove(d.as_bytes())
                .map_err(|e| self.storage(e))?;
        }
        self.db.flush().map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Every image, by digest.
    pub fn images(&self) -> Result<Vec<Image>> {
        self.all(self.images.iter())
    }

    /// One image, by digest.
    pub fn image(&self, digest: &str) -> Result<Image> {
        self.get_one(&self.images, digest, "image")
    }

    /// Stores an instance's customization overlay under its digest. Overlays are content
    /// addressed, so instances with identical edits share one, and writing one twice is
    /// harmless; they are made durable with the tier that refers to them.
    pub fn put_overlay(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        self.overlays
            .insert(digest.as_bytes(), bytes)
            .map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Records that the artifact built from `key` (for example a tree instance's root
    /// filesystem from its master and overlay) is the blob `digest`. Artifacts are derived
    /// data: losing this record only means building the artifact again.
    pub fn put_artifact(&self, key: &str, digest: &str) -> Result<()> {
        self.artifacts
            .insert(key.as_bytes(), digest.as_bytes())
            .map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// The blob built for `key`, if one was recorded.
    pub fn artifact(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .artifacts
            .get(key.as_bytes())
            .map_err(|e| self.storage(e))?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Every recorded artifact, as (key, digest).
    pub fn artifacts(&self) -> Result<Vec<(String, String)>> {
        self.artifacts
            .iter()
            .map(|r| {
                let (k, v) = r.map_err(|e| self.storage(e))?;
                Ok((
                    String::from_utf8_lossy(&k).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect()
    }

    /// Forgets the artifact recorded for `key`.
    pub fn forget_artifact(&self, key: &str) -> Result<()> {
        self.artifacts
            .remove(key.as_bytes())
            .map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// An overlay's bytes.
    pub fn overlay(&self, digest: &str) -> Result<Vec<u8>> {
        match self
            .overlays
            .get(digest.as_bytes())
            .map_err(|e| self.storage(e))?
        {
            Some(b) => Ok(b.to_vec()),
            None => Err(StoreError::NotFound {
                what: "overlay",
                name: digest.into(),
            }),
        }
    }

    /// Deletes a tier whose instances are all off nodes, freeing its addresses and host
    /// names for other tiers. Refused while any instance holds a node.
    pub fn delete_tier(&self, name: &str, by: &str) -> Result<()> {
        let _w = self.lock();
        self.tier(name)?;
        let instances = self.instances(name)?;
        let on_nodes = instances.iter().filter(|i| i.state.holds_node()).count();
        if on_nodes > 0 {
            return Err(StoreError::Refused(format!(
                "tier `{name}` has {on_nodes} instances on nodes; scale it to 0 first"
            )));
        }
        self.transact_as(by, |tx| {
            for i in &instances {
                tx.instances.remove(instance_key(&i.id))?;
                tx.addresses.remove(i.address.to_string().as_bytes())?;
                tx.hostnames.remove(i.hostname.as_bytes())?;
            }
            tx.tiers.remove(name.as_bytes())?;
            tx.event(
                Some(name),
                "tier-deleted",
                format!(
                    "tier `{name}` deleted; its {} identities are free again",
                    instances.len()
                ),
                serde_json::Value::Null,
            )
        })
    }

    /// Whether a tier could be created now: its name is free and its subnet overlaps no
    /// other tier's. Creating it checks again under the write lock; checking first spares
    /// minting K instances for a request that would be refused.
    pub fn check_new_tier(&self, tier: &Tier) -> Result<()> {
        for other in self.tiers()? {
            if other.name == tier.name {
                return Err(StoreError::Refused(format!(
                    "a tier named `{}` exists; choose another `name` or delete it first",
                    tier.name
                )));
            }
            if other.plan.subnet.overlaps(&tier.plan.subnet) {
                return Err(StoreError::Refused(format!(
                    "field `subnet`: {} overlaps {} of tier `{}`; give each tier its own subnet",
                    tier.plan.subnet, other.plan.subnet, other.name
                )));
            }
        }
        Ok(())
    }

    /// Every tier, by name.
    pub fn tiers(&self) -> Result<Vec<Tier>> {
        self.all(self.tiers.iter())
    }

    /// One tier.
    pub fn tier(&self, name: &str) -> Result<Tier> {
        self.get_one(&self.tiers, name, "tier")
    }

    /// A tier's instances, by index.
    pub fn instances(&self, tier: &str) -> Result<Vec<Instance>> {
        self.all(self.instances.scan_prefix(tier_prefix(tier)))
    }

    /// Every address held by any instance, for allocating a new tier's addresses.
    pub fn address_taken(&self, address: std::net::IpAddr) -> Result<bool> {
        self.addresses
            .contains_key(address.to_string().as_bytes())
            .map_err(|e| self.storage(e))
    }

    /// Sets how many instances of a tier should be deployed (0 to K).
    pub fn set_desired(&self, tier: &str, desired: u32, by: &str) -> Result<u64> {
        self.change_desired(tier, desired, None, by, |before| {
            (
                "scale-requested",
                format!("tier `{tier}` scaled from {before} to {desired}"),
                serde_json::json!({"from": before, "to": desired}),
            )
        })
    }

    /// Sets a tier's desired count because its load rule says so, recording the reason and
    /// the figures behind it, and when (for the rule's cooldown).
    pub fn autoscale(
        &self,
        tier: &str,
        desired: u32,
        message: &str,
        detail: serde_json::Value,
    ) -> Result<u64> {
        self.change_desired(tier, desired, Some(now_ms()), ENGINE, |before| {
            (
                "autoscaled",
                format!("tier `{tier}` scaled from {before} to {desired}: {message}"),
                detail.clone(),
            )
        })
    }

    /// One change of a tier's desired count (refused above K), with the event `event` makes
    /// of the count before; `autoscaled_at` marks a load rule's decision. Returns the tier's
    /// new generation.
    fn change_desired(
        &self,
        tier: &str,
        desired: u32,
        autoscaled_at: Option<u64>,
        by: &str,
        event: impl Fn(u32) -> (&'static str, String, serde_json::Value),
    ) -> Result<u64> {
        let _w = self.lock();
        self.transact_as(by, |tx| {
            let Some(mut t) = Tx::get::<Tier>(tx.tiers, tier.as_bytes())? else {
                return abort(StoreError::NotFound {
                    what: "tier",
                    name: tier.into(),
                });
            };
            if desired > t.max_instances {
                return refuse(format!(
                    "cannot scale tier `{tier}` to {desired}: its max-instances (K) is {}",
                    t.max_instances
                ));
            }
            let (kind, message, mut detail) = event(t.desired);
            t.desired = desired;
            t.generation += 1;
            if let Some(at) = autoscaled_at {
                t.autoscaled_at_ms = at;
            }
            if let Some(d) = detail.as_object_mut() {
                d.insert("generation".into(), t.generation.into());
            }
            Tx::put(tx.tiers, tier.as_bytes(), &t)?;
            tx.event(Some(tier), kind, message, detail)?;
            Ok(t.generation)
        })
    }

    /// Adds a node to the inventory; it starts free unless it is in maintenance.
    pub fn add_node(&self, node: &Node, by: &str) -> Result<()> {
        let _w = self.lock();
        if node.instance.is_some()
            || !matches!(node.state, NodeState::Free | NodeState::Maintenance)
        {
            return Err(StoreError::Refused(format!(
                "node `{}` must be added free or in maintenance, holding no instance",
                node.name
            )));
        }
        self.transact_as(by, |tx| {
            if tx.nodes.get(node.name.as_bytes())?.is_some() {
                return refuse(format!(
                    "a node named `{}` exists; remove it first or choose another name",
                    node.name
                ));
            }
            Tx::put(tx.nodes, node.name.as_bytes(), node)?;
            tx.event(
                None,
                "node-added",
                format!(
                    "node `{}` added ({} cpus, {} MiB, {})",
                    node.name, node.cpus, node.memory_mib, node.arch
                ),
                serde_json::json!({"labels": node.labels}),
            )
        })?;
        self.refresh_nodes([node.name.as_str()])
    }

    /// Records an event about something outside the store's records (a plugin installed
    /// or removed), so the event log tells the whole story.
    pub fn note(
        &self,
        kind: &str,
        message: String,
        detail: serde_json::Value,
        by: &str,
    ) -> Result<()> {
        let _w = self.lock();
        self.transact_as(by, |tx| {
            tx.event(None, kind, message.clone(), detail.clone())
        })
    }

    /// Records an event about a tier that changes no record (the engine's own
    /// observations, such as a tier blocked for want of nodes).
    pub fn note_tier(
        &self,
        tier: &str,
        kind: &str,
        message: String,
        detail: serde_json::Value,
    ) -> Result<()> {
        let _w = self.lock();
        self.transact(|tx| tx.event(Some(tier), kind, message.clone(), detail.clone()))
    }

    /// Stores a new operator token (only its hash). Refused if the name is taken.
    pub fn create_token(&self, t: &Token, by: &str) -> Result<()> {
        let _w = self.lock();
        self.transact_as(by, |tx| {
            let key = format!("token/{}", t.name);
            if tx.identities.get(key.as_bytes())?.is_some() {
                return refuse(format!(
                    "a token named `{}` exists; revoke it first or choose another `--name`",
                    t.name
                ));
            }
            if tx
                .identities
                .get(format!("hash/{}", t.hash).as_bytes())?
                .is_some()
            {
                return refuse("that token is in use already; create a new one".into());
            }
            Tx::put(tx.identities, key.as_bytes(), t)?;
            Tx::put(
                tx.identities,
                format!("hash/{}", t.hash).as_bytes(),
                &Principal::Operator {
                    name: t.name.clone(),
                    role: t.role,
                },
            )?;
            tx.event(
                None,
                "token-created",
                format!("token `{}` created with role {}", t.name, t.role.name()),
                serde_json::json!({"name": t.name, "role": t.role}),
            )
        })
    }

    /// The engine's secret named `name` (32 random bytes), made at its first use and kept
    /// in the store, so every daemon on the same state signs alike.
    pub fn secret(&self, name: &str) -> Result<[u8; 32]> {
        let key = format!("secret/{name}");
        let _w = self.lock();
        if let Some(v) = self
            .identities
            .get(key.as_bytes())
            .map_err(|e| self.storage(e))?
        {
            return v
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("secret `{name}` is not 32 bytes")));
        }
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes)
            .map_err(|e| self.storage(format!("no random bytes from the operating system: {e}")))?;
        self.identities
            .insert(key.as_bytes(), &bytes[..])
            .map_err(|e| self.storage(e))?;
        self.db.flush().map_err(|e| self.storage(e))?;
        Ok(bytes)
    }

    /// Every operator token's record (names, roles and hashes; never a token).
    pub fn tokens(&self) -> Result<Vec<Token>> {
        self.all(self.identities.scan_prefix("token/"))
    }

    /// Revokes an operator token: from this commit on it authenticates nothing.
    pub fn revoke_token(&self, name: &str, by: &str) -> Result<Token> {
        let _w = self.lock();
        self.transact_as(by, |tx| {
            let key = format!("token/{name}");
            let Some(t) = Tx::get::<Token>(tx.identities, key.as_bytes())? else {
                return abort(StoreError::NotFound {
                    what: "token",
                    name: name.into(),
                });
            };
            tx.identities.remove(key.as_bytes())?;
            tx.identities
                .remove(format!("hash/{}", t.hash).as_bytes())?;
            tx.event(
                None,
                "token-revoked",
                format!("token `{name}` revoked"),
                serde_json::json!({"name": name}),
            )?;
            Ok(t)
        })
    }

    /// Whose credential has the hash `hash`, if anyone's.
    pub fn principal(&self, hash: &str) -> Result<Option<Principal>> {
        match self
            .identities
            .get(format!("hash/{hash}").as_bytes())
            .map_err(|e| self.storage(e))?
        {
            Some(b) => decode(&b).map(Some),
            None => Ok(None),
        }
    }

    /// Records a pending enrollment for a node name, replacing any earlier one for it.
    pub fn enroll(&self, e: &Enrollment, by: &str) -> Result<()> {
        let _w = self.lock();
        self.transact_as(by, |tx| {
            Tx::put(tx.identities, format!("enroll/{}", e.node).as_bytes(), e)?;
            tx.event(
                None,
                "node-enrolled",
                format!(
                    "node `{}` may join once with a join token until {}",
                    e.node, e.expires_ms
                ),
                serde_json::json!({"node": e.node, "labels": e.labels, "expires-ms": e.expires_ms}),
            )
        })
    }

    /// A pending enrollment, if there is one for `node`.
    pub fn enrollment(&self, node: &str) -> Result<Option<Enrollment>> {
        match self
            .identities
            .get(format!("enroll/{node}").as_bytes())
            .map_err(|e| self.storage(e))?
        {
            Some(b) => decode(&b).map(Some),
            None => Ok(None),
        }
    }

    /// A node's credential record, if it has one.
    pub fn node_credential(&self, node: &str) -> Result<Option<NodeCredential>> {
        match self
            .identities
            .get(format!("cred/{node}").as_bytes())
            .map_err(|e| self.storage(e))?
        {
            Some(b) => decode(&b).map(Some),
            None => Ok(None),
        }
    }

    /// A node joins with its one-time join token: in one transaction the enrollment whose
    /// token hashes to `join_hash` is used up (it must be unexpired at `now_ms`), the node
    /// is added or its facts refreshed (keeping its state and instance; the enrollment's
    /// labels win), and its credential becomes the one hashing to `credential_hash`, with
    /// the next generation. Refused, writing nothing, for any other token.
    pub fn join(
        &self,
        node: &Node,
        join_hash: &str,
        now_ms: u64,
        credential_hash: &str,
    ) -> Result<NodeCredential> {
        let _w = self.lock();
        let credential = self.transact_as(&format!("node:{}", node.name), |tx| {
            let key = format!("enroll/{}", node.name);
            let pending = Tx::get::<Enrollment>(tx.identities, key.as_bytes())?;
            let Some(e) = pending.filter(|e| same_hash(&e.hash, join_hash)) else {
                return refuse(format!("no enrollment of node `{}` matches this join token; `mint node enroll {}` issues one", node.name, node.name));
            };
            if e.expires_ms <= now_ms {
                return refuse(format!("the join token for node `{}` expired; `mint node enroll {}` issues a new one", node.name, node.name));
            }
            tx.identities.remove(key.as_bytes())?;
            let cred_key = format!("cred/{}", node.name);
            let generation = match Tx::get::<NodeCredential>(tx.identities, cred_key.as_bytes())? {
                Some(old) => {
                    tx.identities.remove(format!("hash/{}", old.hash).as_bytes())?;
                    old.generation + 1
                }
                None => 1,
            };
            let c = NodeCredential { node: node.name.clone(), hash: credential_hash.to_string(), generation };
            Tx::put(tx.identities, cred_key.as_bytes(), &c)?;
            Tx::put(tx.identities, format!("hash/{credential_hash}").as_bytes(), &Principal::Node { name: node.name.clone() })?;
            let mut joined = node.clone();
            joined.labels.extend(e.labels.clone());
            Self::put_registered(tx, &joined, "joined")?;
            Ok(c)
        })?;
        self.refresh_nodes([node.name.as_str()])?;
        Ok(credential)
    }

    /// A known node's agent registers again with its credential (after a restart): its
    /// facts and properties are refreshed, its state and instance kept. Refused, writing
    /// nothing, unless `credential_hash` is the node's current credential's.
    pub fn reregister(&self, node: &Node, credential_hash: &str) -> Result<()> {
        let _w = self.lock();
        self.transact_as(&format!("node:{}", node.name), |tx| {
            let current =
                Tx::get::<NodeCredential>(tx.identities, format!("cred/{}", node.name).as_bytes())?;
            if !current.is_some_and(|c| same_hash(&c.hash, credential_hash)) {
                return refuse(format!(
                    "node `{}` registers only with its own credential",
                    node.name
                ));
            }
            let mut n = node.clone();
            if let Some(known) = Tx::get::<Node>(tx.nodes, node.name.as_bytes())? {
                // Labels an operator gave at enrollment stay; the agent adds its own.
                let mut labels = known.labels.clone();
                labels.extend(node.labels.clone());
                n.labels = labels;
            }
            Self::put_registered(tx, &n, "re-registered")
        })?;
        self.refresh_nodes([node.name.as_str()])
    }

    /// Writes a registering node: new ones start free, known ones keep their state,
    /// instance and load.
    fn put_registered(tx: &Tx<'_>, node: &Node, verb: &str) -> TxResult<()> {
        let n = match Tx::get::<Node>(tx.nodes, node.name.as_bytes())? {
            Some(known) => Node {
                state: known.state,
                instance: known.instance.clone(),
                load: known.load,
                ..node.clone()
            },
            None => Node {
                state: NodeState::Free,
                instance: None,
                ..node.clone()
            },
        };
        Tx::put(tx.nodes, node.name.as_bytes(), &n)?;
        tx.event(
            None,
            "node-registered",
            format!(
                "node `{}` {verb} ({} cpus, {} MiB, {})",
                n.name, n.cpus, n.memory_mib, n.arch
            ),
            serde_json::json!({"properties": n.properties, "labels": n.labels}),
        )
    }

    /// Removes a node that holds no instance.
    pub fn remove_node(&self, name: &str, by: &str) -> Result<()> {
        let _w = self.lock();
        self.transact_as(by, |tx| {
            let n = tx.node(name)?;
            if !n.state.can_remove() || n.instance.is_some() {
                return refuse(format!(
                    "node `{name}` is {} and holds an instance; scale its tier in first",
                    n.state
                ));
            }
            tx.nodes.remove(name.as_bytes())?;
            // Its agent's credential dies with it: the name may join again only through
            // a new enrollment.
            if let Some(c) =
                Tx::get::<NodeCredential>(tx.identities, format!("cred/{name}").as_bytes())?
            {
                tx.identities
                    .remove(format!("hash/{}", c.hash).as_bytes())?;
                tx.identities.remove(format!("cred/{name}").as_bytes())?;
            }
            tx.event(
                None,
                "node-removed",
                format!("node `{name}` removed"),
                serde_json::Value::Null,
            )
        })?;
        self.refresh_nodes([name])
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<Node>> {
        Ok(self.node_handles().iter().map(|n| Node::clone(n)).collect())
    }

    /// Every node, by name, as shared handles to the last committed records: what a
    /// selection reads, without copying the inventory.
    pub fn node_handles(&self) -> Vec<Arc<Node>> {
        self.node_index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Whether node `name` exists and has the property `key`, read from the in-memory index
    /// without copying the record (asked for every running instance on every step).
    pub fn node_has_property(&self, name: &str, key: &str) -> bool {
        self.node_index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .is_some_and(|n| n.properties.contains_key(key))
    }

    /// One node by name.
    pub fn node(&self, name: &str) -> Result<Node> {
        match self
            .node_index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            Some(n) => Ok(Node::clone(n)),
            None => Err(StoreError::NotFound {
                what: "node",
                name: name.into(),
            }),
        }
    }

    /// Binds a pooled (or failed) instance to a free node and marks both deploying, in one
    /// transaction. Refused if either is not in a state that allows it, the node does not
    /// meet the tier's requirements, or the tier already has K instances on nodes.
    pub fn bind(&self, id: &InstanceId, node: &str, detail: serde_json::Value) -> Result<()> {
        self.bind_many(&[(id.clone(), node.to_string(), detail)])
    }

    /// Binds several instances of one tier to nodes in one transaction (one flush), all or
    /// none, with the checks of [`Store::bind`] for each.
    pub fn bind_many(&self, binds: &[(InstanceId, String, serde_json::Value)]) -> Result<()> {
        let Some(first) = binds.first() else {
            return Ok(());
        };
        let tier_name = first.0.tier.clone();
        if binds.iter().any(|b| b.0.tier != tier_name) {
            return Err(StoreError::Refused(
                "one bind_many call binds instances of one tier".into(),
            ));
        }
        let _w = self.lock();
        // Counted under the write lock, so no other writer can change it before the
        // transaction below commits.
        let on_nodes = self
            .instances(&tier_name)?
            .iter()
            .filter(|i| i.state.holds_node())
            .count();
        self.transact(|tx| {
            let Some(tier) = Tx::get::<Tier>(tx.tiers, tier_name.as_bytes())? else {
                return abort(StoreError::NotFound { what: "tier", name: tier_name.clone() });
            };
            if on_nodes + binds.len() > tier.max_instances as usize {
                return refuse(format!(
                    "tier `{}` has {on_nodes} instances on nodes; {} more would exceed its maximum of {}",
                    tier.name,
                    binds.len(),
                    tier.max_instances
                ));
            }
            for (id, node, detail) in binds {
                let mut inst = tx.instance(id)?;
                let mut n = tx.node(node)?;
                if !inst.state.can_deploy() {
                    return refuse(format!("instance {id} is {}; only pooled or failed instances can be deployed", inst.state));
                }
                if !n.state.can_select() || n.instance.is_some() {
                    return refuse(format!("node `{node}` is {}, not free", n.state));
                }
                if !n.meets(&tier.requirements) {
                    return refuse(format!("node `{node}` does not meet the requirements of tier `{}`", tier.name));
                }
                inst.state = InstanceState::Deploying;
                inst.node = Some(node.to_string());
                inst.since_ms = now_ms();
                inst.revision = tier.revision;
                inst.deployment += 1;
                inst.deployment_started_ms = inst.since_ms;
                n.state = NodeState::Deploying;
                n.instance = Some(id.clone());
                Tx::put(tx.instances, &instance_key(id), &inst)?;
                Tx::put(tx.nodes, node.as_bytes(), &n)?;
                tx.event(Some(&id.tier), "bound", format!("instance {id} ({}, {}) bound to node `{node}`", inst.hostname, inst.address), detail.clone())?;
            }
            Ok(())
        })?;
        self.refresh_nodes(binds.iter().map(|b| b.1.as_str()))
    }

    /// Replaces a tier's master: every instance gets the overlay (and disk parts) minted
    /// from the new master with its unchanged identity, the tier's revision goes up, and
    /// deployed instances become due to roll, `batch` at a time. `reminted` must hold every
    /// instance of the tier, with the same host names and addresses; states are kept.
    pub fn remint(
        &self,
        tier_name: &str,
        image: &str,
        batch: u32,
        reminted: &[Instance],
        by: &str,
    ) -> Result<u64> {
        let _w = self.lock();
        if !self
            .images
            .contains_key(image.as_bytes())
            .map_err(|e| self.storage(e))?
        {
            return Err(StoreError::Refused(format!(
                "field `image`: no image `{image}`; import it first"
            )));
        }
        if batch == 0 {
            return Err(StoreError::Refused(
                "field `batch`: roll at least 1 instance at a time".into(),
            ));
        }
        let revision = self.transact_as(by, |tx| {
            let Some(mut tier) = Tx::get::<Tier>(tx.tiers, tier_name.as_bytes())? else {
                return abort(StoreError::NotFound { what: "tier", name: tier_name.into() });
            };
            if reminted.len() != tier.max_instances as usize {
                return refuse(format!("tier `{tier_name}` has {} instances but {} were reminted", tier.max_instances, reminted.len()));
            }
            for new in reminted {
                let mut inst = tx.instance(&new.id)?;
                if inst.hostname != new.hostname || inst.address != new.address {
                    return refuse(format!("instance {} would change its identity; a new master keeps identities", new.id));
                }
                inst.overlay = new.overlay.clone();
                inst.disk = new.disk.clone();
                inst.layer = new.layer.clone();
                Tx::put(tx.instances, &instance_key(&new.id), &inst)?;
            }
            let old = std::mem::replace(&mut tier.image, image.to_string());
            tier.revision += 1;
            tier.generation += 1;
            tier.rollout_batch = batch;
            Tx::put(tx.tiers, tier_name.as_bytes(), &tier)?;
            tx.event(
                Some(tier_name),
                "master-updated",
                format!("tier `{tier_name}` reminted from {old} to {image} (revision {}); deployed instances roll {batch} at a time", tier.revision),
                serde_json::json!({"from": old, "to": image, "revision": tier.revision, "batch": batch}),
            )?;
            Ok(tier.revision)
        })?;
        Ok(revision)
    }

    /// Starts rolling deployed instances to their tier's current revision: each becomes
    /// deploying again on the node it holds.
    pub fn begin_roll(&self, ids: &[InstanceId]) -> Result<()> {
        let _w = self.lock();
        let nodes = self.transact(|tx| {
            let mut nodes = Vec::new();
            for id in ids {
                let mut inst = tx.instance(id)?;
                let Some(tier) = Tx::get::<Tier>(tx.tiers, id.tier.as_bytes())? else {
                    return abort(StoreError::NotFound { what: "tier", name: id.tier.clone() });
                };
                if !inst.state.can_roll() || inst.revision >= tier.revision {
                    return refuse(format!("instance {id} is {} at revision {}; only deployed instances behind the tier's revision {} roll", inst.state, inst.revision, tier.revision));
                }
                let node = inst.node.clone().unwrap_or_default();
                let mut n = tx.node(&node)?;
                let from = inst.revision;
                inst.state = InstanceState::Deploying;
                inst.since_ms = now_ms();
                inst.revision = tier.revision;
                inst.deployment += 1;
                inst.deployment_started_ms = inst.since_ms;
                n.state = NodeState::Deploying;
                Tx::put(tx.instances, &instance_key(id), &inst)?;
                Tx::put(tx.nodes, node.as_bytes(), &n)?;
                tx.event(
                    Some(&id.tier),
                    "rolling",
                    format!("instance {id} rolls from revision {from} to {} on node `{node}`", tier.revision),
                    serde_json::json!({"from": from, "to": tier.revision}),
                )?;
                nodes.push(node);
            }
            Ok(nodes)
        })?;
        self.refresh_nodes(nodes.iter().map(String::as_str))
    }

    /// Records finished deployments, each only if its instance is still deploying in the
    /// deployment the answer is about (`(id, deployment, detail)`): a late answer about a
    /// deployment since taken back, failed or replaced is discarded with an event, and the
    /// newer decision stands. Returns the discarded ones. One transaction.
    pub fn finish_guarded(
        &self,
        done: &[(InstanceId, u64, serde_json::Value)],
    ) -> Result<Vec<InstanceId>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let _w = self.lock();
        let (nodes, discarded) = self.transact(|tx| {
            let (mut nodes, mut discarded) = (Vec::new(), Vec::new());
            for (id, deployment, detail) in done {
                let mut inst = tx.instance(id)?;
                if !inst.state.can_finish_deploy() || inst.deployment != *deployment {
                    tx.event(
                        Some(&id.tier),
                        "answer-discarded",
                        discarded_message(id, *deployment, &inst, "finished"),
                        detail.clone(),
                    )?;
                    discarded.push(id.clone());
                    continue;
                }
                let node = inst.node.clone().unwrap_or_default();
                let mut n = tx.node(&node)?;
                inst.state = InstanceState::Deployed;
                inst.since_ms = now_ms();
                n.state = NodeState::InService;
                Tx::put(tx.instances, &instance_key(id), &inst)?;
                Tx::put(tx.nodes, node.as_bytes(), &n)?;
                tx.event(
                    Some(&id.tier),
                    "deployed",
                    format!("instance {id} runs on node `{node}`"),
                    detail.clone(),
                )?;
                nodes.push(node);
            }
            Ok((nodes, discarded))
        })?;
        self.refresh_nodes(nodes.iter().map(String::as_str))?;
        Ok(discarded)
    }

    /// Starts taking instances off their nodes: each becomes undeploying and keeps its node
    /// until the driver has undeployed it ([`Store::release_guarded`]).
    pub fn begin_undeploy(&self, ids: &[InstanceId], reason: &str) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let _w = self.lock();
        self.transact(|tx| {
            for id in ids {
                let mut inst = tx.instance(id)?;
                if !inst.state.can_undeploy() {
                    return refuse(format!("instance {id} is {}; only deploying or deployed instances can be undeployed", inst.state));
                }
                let from = inst.state;
                inst.state = InstanceState::Undeploying;
                inst.since_ms = now_ms();
                Tx::put(tx.instances, &instance_key(id), &inst)?;
                let node = inst.node.as_deref().unwrap_or_default();
                tx.event(Some(&id.tier), "undeploying", format!("instance {id} leaves node `{node}` ({from} before): {reason}"), serde_json::Value::Null)?;
            }
            Ok(())
        })
    }

    /// Returns an undeploying instance to the pool and frees its node, if it is still
    /// undeploying in `deployment`; otherwise the answer is discarded with an event.
    /// Returns whether it was applied.
    pub fn release_guarded(&self, id: &InstanceId, deployment: u64, reason: &str) -> Result<bool> {
        let _w = self.lock();
        let node = self.transact(|tx| {
            let mut inst = tx.instance(id)?;
            if inst.state != InstanceState::Undeploying || inst.deployment != deployment {
                tx.event(
                    Some(&id.tier),
                    "answer-discarded",
                    discarded_message(id, deployment, &inst, "undeployed"),
                    serde_json::Value::Null,
                )?;
                return Ok(None);
            }
            let node = tx.unbind(&mut inst, NodeState::Free, InstanceState::Pooled)?;
            tx.event(
                Some(&id.tier),
                "released",
                format!("instance {id} returned to the pool from node `{node}`: {reason}"),
                serde_json::Value::Null,
            )?;
            Ok(Some(node))
        })?;
        self.refresh_nodes(node.as_deref())?;
        Ok(node.is_some())
    }

    /// Gives up a deployment that failed, if its instance is still `expected` in
    /// `deployment`: its node is declared failed, and the instance becomes `to` (failed, to
    /// be redeployed first elsewhere; or pooled, for a deployment that never ran). Otherwise
    /// the answer is discarded with an event. Returns whether it was applied.
    pub fn fail_guarded(
        &self,
        id: &InstanceId,
        deployment: u64,
        expected: InstanceState,
        to: InstanceState,
        reason: &str,
    ) -> Result<bool> {
        let _w = self.lock();
        let node = self.transact(|tx| {
            let mut inst = tx.instance(id)?;
            if inst.state != expected || inst.deployment != deployment {
                let detail = serde_json::json!({ "reason": reason });
                tx.event(
                    Some(&id.tier),
                    "answer-discarded",
                    discarded_message(id, deployment, &inst, "failed"),
                    detail,
                )?;
                return Ok(None);
            }
            let node = tx.unbind(&mut inst, NodeState::Failed, to)?;
            let then = if to == InstanceState::Failed {
                "waits for a fresh node"
            } else {
                "returned to the pool"
            };
            tx.event(
                Some(&id.tier),
                "node-failed",
                format!("node `{node}` failed: {reason}; instance {id} {then}"),
                serde_json::Value::Null,
            )?;
            Ok(Some(node))
        })?;
        self.refresh_nodes(node.as_deref())?;
        Ok(node.is_some())
    }

    /// Declares a node failed: it leaves the pool of candidates, and the instance it held
    /// becomes failed (off any node, identity kept) so that reconciliation redeploys it
    /// elsewhere with the same address and host name.
    pub fn fail_node(&self, name: &str, reason: &str) -> Result<Option<InstanceId>> {
        self.fail_node_as(name, reason, ENGINE)
    }

    /// [`Store::fail_node`] for the identity `by` (an operator declaring it).
    fn fail_node_as(&self, name: &str, reason: &str, by: &str) -> Result<Option<InstanceId>> {
        let _w = self.lock();
        let held = self.transact_as(by, |tx| {
            let mut n = tx.node(name)?;
            let held = n.instance.take();
            n.state = NodeState::Failed;
            Tx::put(tx.nodes, name.as_bytes(), &n)?;
            if let Some(id) = &held {
                let mut inst = tx.instance(id)?;
                inst.state = InstanceState::Failed;
                inst.node = None;
                inst.since_ms = now_ms();
                Tx::put(tx.instances, &instance_key(id), &inst)?;
            }
            let tier = held.as_ref().map(|i| i.tier.as_str());
            let what = held
                .as_ref()
                .map(|i| format!("; instance {i} failed with it"))
                .unwrap_or_default();
            tx.event(
                tier,
                "node-failed",
                format!("node `{name}` failed: {reason}{what}"),
                serde_json::Value::Null,
            )?;
            Ok(held.clone())
        });
        self.refresh_nodes([name])?;
        held
    }

    /// Sets a node's state as an operator asks: `failed` as [`Store::fail_node`]; `free` or
    /// `maintenance` only for a node that holds no instance. Refused, with nothing written,
    /// for any other change.
    pub fn set_node_state(&self, name: &str, to: NodeState, reason: &str, by: &str) -> Result<()> {
        if to == NodeState::Failed {
            return self.fail_node_as(name, reason, by).map(|_| ());
        }
        let _w = self.lock();
        let r = self.transact_as(by, |tx| {
            let mut n = tx.node(name)?;
            if !n.state.operator_can_set(to) || n.instance.is_some() {
                return refuse(format!(
                    "node `{name}` is {}{}; only a node that holds no instance can be set {to} (scale its tier in, or declare it failed)",
                    n.state,
                    n.instance.as_ref().map(|i| format!(" holding {i}")).unwrap_or_default()
                ));
            }
            let from = n.state;
            n.state = to;
            Tx::put(tx.nodes, name.as_bytes(), &n)?;
            tx.event(None, "node-state", format!("node `{name}` set from {from} to {to}: {reason}"), serde_json::json!({"from": from, "to": to}))
        });
        self.refresh_nodes([name])?;
        r
    }

    /// Records the masters node `name`'s agent caches, when they changed (one event each
    /// time, naming what came and went).
    pub fn set_node_cached(&self, name: &str, mut cached: Vec<String>) -> Result<bool> {
        cached.sort();
        cached.dedup();
        if self.node(name)?.cached == cached {
            return Ok(false);
        }
        let _w = self.lock();
        let r = self.transact_as(&format!("node:{name}"), |tx| {
            let mut n = tx.node(name)?;
            let came: Vec<&String> = cached.iter().filter(|d| !n.cached.contains(d)).collect();
            let went: Vec<&String> = n.cached.iter().filter(|d| !cached.contains(d)).collect();
            let message = format!(
                "node `{name}` caches {} master(s): {} came, {} went",
                cached.len(),
                came.len(),
                went.len()
            );
            let detail = serde_json::json!({"came": came, "went": went});
            n.cached = cached.clone();
            Tx::put(tx.nodes, name.as_bytes(), &n)?;
            tx.event(None, "node-cache", message, detail)
        });
        self.refresh_nodes([name])?;
        r.map(|_| true)
    }

    /// Events with a sequence number above `after`, oldest first, at most `limit`.
    pub fn events(&self, after: Option<u64>, limit: usize) -> Result<Vec<Event>> {
        let start = after
            .map(|a| a.saturating_add(1))
            .unwrap_or(0)
            .to_be_bytes();
        self.events
            .range(start..)
            .values()
            .take(limit)
            .map(|v| decode(&v.map_err(|e| self.storage(e))?))
            .collect()
    }

    /// Checks every invariant of the pool over the whole database and lists what is
    /// broken (empty when all hold). Used by tests after crashes and random operations.
    pub fn check_invariants(&self) -> Result<Vec<String>> {
        let mut broken = Vec::new();
        let nodes = self.nodes()?;
        let mut addr = std::collections::HashMap::new();
        let mut host = std::collections::HashMap::new();
        for t in self.tiers()? {
            let inst = self.instances(&t.name)?;
            if inst.len() != t.max_instances as usize {
                broken.push(format!(
                    "tier {} has {} instances, not K = {}",
                    t.name,
                    inst.len(),
                    t.max_instances
                ));
            }
            let on_nodes = inst.iter().filter(|i| i.state.holds_node()).count();
            if on_nodes > t.max_instances as usize {
                broken.push(format!(
                    "tier {} has {on_nodes} instances on nodes, above K",
                    t.name
                ));
            }
            for i in &inst {
                if let Some(o) = addr.insert(i.address, i.id.clone()) {
                    broken.push(format!("address {} held by {} and {}", i.address, o, i.id));
                }
                if let Some(o) = host.insert(i.hostname.clone(), i.id.clone()) {
                    broken.push(format!(
                        "host name {} held by {} and {}",
                        i.hostname, o, i.id
                    ));
                }
                match (&i.node, i.state.holds_node()) {
                    (Some(n), true) => match nodes.iter().find(|x| &x.name == n) {
                        Some(node) if node.instance.as_ref() == Some(&i.id) => {}
                        _ => broken.push(format!(
                            "instance {} claims node {n}, which does not hold it",
                            i.id
                        )),
                    },
                    (None, false) => {}
                    _ => broken.push(format!(
                        "instance {} is {} with node {:?}",
                        i.id, i.state, i.node
                    )),
                }
            }
        }
        for n in &nodes {
            if let Some(id) = &n.instance {
                let holds = self
                    .instances(&id.tier)?
                    .iter()
                    .any(|i| &i.id == id && i.node.as_deref() == Some(n.name.as_str()));
                if !holds {
                    broken.push(format!(
                        "node {} claims instance {id}, which is not on it",
                        n.name
                    ));
                }
            }
        }
        Ok(broken)
    }
}
