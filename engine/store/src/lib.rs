//! mint's state: tiers, their instances, the node inventory, identities and the event
//! log, kept in a key-value store with revisions ([`kv::Kv`]: sled embedded, by
//! default). Every change is one guarded commit that checks the pool's invariants before
//! it writes and appends the event that explains it, so a refused change writes nothing
//! and a crash never leaves half a change.
//!
//! Architecture invariant: only this crate knows how records are laid out as keys, and
//! only [`kv`] knows sled. Callers see `mint-model` records.
//!
//! Architecture invariant: the pool's invariants are kept by the guards of each commit,
//! never by a lock. A transaction reads through the store, remembers the revision of every
//! key it read, and commits only if none of them changed since; otherwise it runs again on
//! what is there now. So two writers (two threads, or two daemons on one etcd) can never
//! both land changes that together break a rule. Uniqueness (a tier's name, an address, a
//! host name, a node's one instance) is a key that must be absent or unchanged; checks
//! that scan (no two tiers' subnets overlap) guard a version key that every change of the
//! scanned set writes. Writers of one process still take turns on a local lock, only so
//! that they do not make each other run again.
//!
//! The node inventory is also kept in memory, refreshed after each of this store's commits
//! that touches a node and fed by a watch on the backend for everyone else's: every
//! selection reads the whole inventory, and iterating thousands of records out of the
//! store costs more than the selection itself. It is a cache of committed state; every
//! transaction reads the records themselves.

pub mod cache;
pub mod etcd;
pub mod kv;
mod node_index;

use kv::{Entry, Guard, Kv, KvError, Op, Rev, prefix_end};
use mint_model::records::{
    ENGINE, Enrollment, Event, Image, Instance, InstanceId, Node, NodeCredential, Principal, Tier,
    Token,
};
use mint_model::{InstanceState, NodeState};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
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
        /// The backend's explanation.
        message: String,
    },
    /// A record on disk does not decode (a newer or damaged database).
    #[error(
        "a stored record does not decode ({0}); the database may be from a newer mint or damaged"
    )]
    Corrupt(String),
    /// This writer no longer leads (or never did), so its commit was refused: another
    /// daemon's fencing token is in the leader key. Nothing was written.
    #[error("{0}")]
    Fenced(String),
}

type Result<T> = std::result::Result<T, StoreError>;

/// The kinds of record, each under its own key prefix.
mod keys {
    pub const TIERS: &str = "tiers/";
    /// Tiers whose instances are being written in batches: not yet tiers, so nothing
    /// reconciles or selects for them (see [`super::Store::create_tier`]).
    pub const MINTING: &str = "minting/";
    /// Tiers whose instances are being removed in batches.
    pub const DELETING: &str = "deleting/";
    pub const INSTANCES: &str = "instances/";
    pub const ADDRESSES: &str = "addresses/";
    pub const HOSTNAMES: &str = "hostnames/";
    pub const NODES: &str = "nodes/";
    pub const EVENTS: &str = "events/";
    pub const IMAGES: &str = "images/";
    pub const OVERLAYS: &str = "overlays/";
    pub const ARTIFACTS: &str = "artifacts/";
    /// Operators' tokens, pending enrollments and node credentials, by key prefix
    /// (`token/`, `enroll/`, `cred/`), every credential's hash (`hash/`), which says whose
    /// it is (what authentication looks up), and the engine's secrets (`secret/`).
    pub const IDENTITIES: &str = "identities/";
    /// The store's own counters and version keys.
    pub const META: &str = "meta/";
    /// The sequence number the next event gets.
    pub const EVENT_SEQ: &str = "event-seq";
    /// Written by every commit that creates or deletes a tier: what a scan of the tiers
    /// guards.
    pub const TIER_SET: &str = "tier-set";
}

/// How many of the newest events the daemon keeps ([`Store::trim_events`]): a bound on
/// the log however long the daemon runs, and more than a day of a busy site's changes.
pub const EVENTS_KEPT: u64 = 100_000;

/// How often a transaction runs again after its commit lost a race before it gives up.
const MAX_ATTEMPTS: u32 = 64;

/// The state, over a key-value backend.
pub struct Store {
    kv: Arc<dyn Kv>,
    /// Writers of this process take turns, so that they do not make each other's commits
    /// lose races and run again. The guards, not this lock, keep the invariants.
    turn: Mutex<()>,
    /// Every node as last committed, by name, by any writer: refreshed after this
    /// store's own commits and fed by a watch on the backend.
    node_index: Arc<RwLock<node_index::NodeIndex>>,
    /// Whether commits carry a fencing token (see [`Fencing`]).
    fencing: RwLock<Fencing>,
    /// The read cache a following daemon reads from (see [`Store::start_read_cache`]).
    cache: std::sync::OnceLock<Arc<cache::CachedKv>>,
}

/// The key a shared store's leader holds, attached to its lease; its create-revision is the
/// leader's fencing token.
pub const LEADER_KEY: &[u8] = b"meta/leader";

/// Whether this store's commits are fenced by a leader's token.
///
/// A store shared by several daemons is written only by the one that leads: every commit
/// it makes also requires that the leader key's create-revision is still its token, so a
/// leader that was paused past its lease, or cut off, writes nothing once another has
/// taken over, however late its commits arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fencing {
    /// No token: the only writer (sled, or a tool working on a store no daemon leads).
    Off,
    /// Fenced, and not leading: every write is refused with [`StoreError::Fenced`].
    NotLeading,
    /// Leading with this token.
    Token(Rev),
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// An instance's key within its prefix: tier name, a NUL, the index big-endian, so a
/// tier's instances are one ordered range.
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

fn full_key(prefix: &str, key: &[u8]) -> Vec<u8> {
    let mut k = prefix.as_bytes().to_vec();
    k.extend_from_slice(key);
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

type TxResult<T> = std::result::Result<T, StoreError>;

fn refuse<T>(message: String) -> TxResult<T> {
    Err(StoreError::Refused(message))
}

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(e)
}

/// One attempt at a transaction: what it read (with the revision it saw, `None` for a key
/// that was absent) and what it will write, applied over the reads so that it sees its
/// own writes.
struct Attempt<'a> {
    kv: &'a dyn Kv,
    reads: RefCell<HashMap<Vec<u8>, Option<Rev>>>,
    writes: RefCell<BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    /// The next event's sequence number, once the transaction has read it.
    next_seq: Cell<Option<u64>>,
    /// Which run of the transaction this is (1 for the first).
    run: u32,
}

impl<'a> Attempt<'a> {
    fn new(kv: &'a dyn Kv, run: u32) -> Self {
        Attempt {
            run,
            kv,
            reads: RefCell::new(HashMap::new()),
            writes: RefCell::new(BTreeMap::new()),
            next_seq: Cell::new(None),
        }
    }

    fn storage(&self, e: KvError) -> StoreError {
        kv_error(self.kv, e)
    }

    fn note_read(&self, key: &[u8], e: Option<&Entry>) {
        self.reads
            .borrow_mut()
            .entry(key.to_vec())
            .or_insert(e.map(|e| e.mod_rev));
    }

    fn get(&self, key: &[u8]) -> TxResult<Option<Vec<u8>>> {
        if let Some(w) = self.writes.borrow().get(key) {
            return Ok(w.clone());
        }
        let e = self.kv.get(key).map_err(|e| self.storage(e))?;
        self.note_read(key, e.as_ref());
        Ok(e.map(|e| e.value))
    }

    /// Every key under `prefix`, as this transaction sees it. Each key listed is guarded;
    /// a key added under the prefix by another writer is not, so a caller whose rule
    /// depends on the whole set also reads a version key that such writers write.
    fn scan(&self, prefix: &[u8]) -> TxResult<Vec<(Vec<u8>, Vec<u8>)>> {
        let (entries, _) = self
            .kv
            .range(prefix, &prefix_end(prefix), usize::MAX, None)
            .map_err(|e| self.storage(e))?;
        let mut out: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for e in entries {
            self.note_read(&e.key, Some(&e));
            out.insert(e.key, e.value);
        }
        for (k, w) in self.writes.borrow().range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match w {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out.into_iter().collect())
    }

    /// Every value under `prefix` as committed, guarding none of them: for a caller
    /// whose rule depends on records that never change once written, guarded by a
    /// version key instead.
    fn scan_unguarded(&self, prefix: &[u8]) -> TxResult<Vec<Vec<u8>>> {
        let (entries, _) = self
            .kv
            .range(prefix, &prefix_end(prefix), usize::MAX, None)
            .map_err(|e| self.storage(e))?;
        Ok(entries.into_iter().map(|e| e.value).collect())
    }

    fn put(&self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.borrow_mut().insert(key, Some(value));
    }

    fn delete(&self, key: Vec<u8>) {
        self.writes.borrow_mut().insert(key, None);
    }

    /// The commit: a guard for every key read, then every write.
    fn into_commit(self) -> (Vec<Guard>, Vec<Op>) {
        let guards = self
            .reads
            .into_inner()
            .into_iter()
            .map(|(k, rev)| match rev {
                Some(r) => Guard::ModRev(k, r),
                None => Guard::Absent(k),
            })
            .collect();
        let ops = self
            .writes
            .into_inner()
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => Op::Put(k, v),
                None => Op::Delete(k),
            })
            .collect();
        (guards, ops)
    }
}

fn kv_error(kv: &dyn Kv, e: KvError) -> StoreError {
    match e {
        KvError::Corrupt(m) => StoreError::Corrupt(m),
        e => StoreError::Storage {
            path: kv.describe(),
            message: e.to_string(),
        },
    }
}

/// One kind of record within a transaction: the keys under one prefix.
struct Tree<'t> {
    at: &'t Attempt<'t>,
    prefix: &'static str,
}

impl Tree<'_> {
    fn get(&self, key: impl AsRef<[u8]>) -> TxResult<Option<Vec<u8>>> {
        self.at.get(&full_key(self.prefix, key.as_ref()))
    }
    /// Sets `key` and returns what it held before.
    fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> TxResult<Option<Vec<u8>>> {
        let k = full_key(self.prefix, key.as_ref());
        let old = self.at.get(&k)?;
        self.at.put(k, value.as_ref().to_vec());
        Ok(old)
    }
    /// Sets `key` on condition that it is absent when the commit lands, without reading it
    /// first (a read is a round trip to etcd): for keys that are almost always free.
    fn claim(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        let k = full_key(self.prefix, key.as_ref());
        self.at.reads.borrow_mut().entry(k.clone()).or_insert(None);
        self.at.put(k, value.as_ref().to_vec());
    }
    /// Sets `key` without reading it: a write no rule depends on what it replaces.
    fn set(&self, key: impl AsRef<[u8]>, value: Vec<u8>) {
        self.at.put(full_key(self.prefix, key.as_ref()), value);
    }
    fn remove(&self, key: impl AsRef<[u8]>) -> TxResult<()> {
        self.at.delete(full_key(self.prefix, key.as_ref()));
        Ok(())
    }
    /// Every record under `key_prefix` within this kind, in key order.
    fn scan<T: DeserializeOwned>(&self, key_prefix: &[u8]) -> TxResult<Vec<T>> {
        self.at
            .scan(&full_key(self.prefix, key_prefix))?
            .iter()
            .map(|(_, v)| decode(v))
            .collect()
    }
}

/// The kinds of record one transaction touches.
struct Tx<'a> {
    at: &'a Attempt<'a>,
    tiers: Tree<'a>,
    instances: Tree<'a>,
    addresses: Tree<'a>,
    hostnames: Tree<'a>,
    nodes: Tree<'a>,
    events: Tree<'a>,
    images: Tree<'a>,
    identities: Tree<'a>,
    meta: Tree<'a>,
    minting: Tree<'a>,
    deleting: Tree<'a>,
    /// Who the transaction acts for, recorded in its events.
    by: &'a str,
}

impl<'a> Tx<'a> {
    fn new(at: &'a Attempt<'a>, by: &'a str) -> Self {
        let tree = |prefix| Tree { at, prefix };
        Tx {
            at,
            tiers: tree(keys::TIERS),
            instances: tree(keys::INSTANCES),
            addresses: tree(keys::ADDRESSES),
            hostnames: tree(keys::HOSTNAMES),
            nodes: tree(keys::NODES),
            events: tree(keys::EVENTS),
            images: tree(keys::IMAGES),
            identities: tree(keys::IDENTITIES),
            meta: tree(keys::META),
            minting: tree(keys::MINTING),
            deleting: tree(keys::DELETING),
            by,
        }
    }

    fn get<T: DeserializeOwned>(tree: &Tree<'_>, key: impl AsRef<[u8]>) -> TxResult<Option<T>> {
        match tree.get(key)? {
            None => Ok(None),
            Some(b) => decode(&b).map(Some),
        }
    }
    fn put<T: Serialize>(tree: &Tree<'_>, key: impl AsRef<[u8]>, v: &T) -> TxResult<()> {
        tree.set(key, encode(v));
        Ok(())
    }
    fn instance(&self, id: &InstanceId) -> TxResult<Instance> {
        match Self::get(&self.instances, instance_key(id))? {
            Some(i) => Ok(i),
            None => abort(StoreError::NotFound {
                what: "instance",
                name: id.to_string(),
            }),
        }
    }
    fn node(&self, name: &str) -> TxResult<Node> {
        match Self::get(&self.nodes, name)? {
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
        Self::put(&self.nodes, &node, &n)?;
        inst.state = to;
        inst.since_ms = now_ms();
        Self::put(&self.instances, instance_key(&inst.id), inst)?;
        Ok(node)
    }

    /// Every tier, including those being minted or deleted, guarded as a set: a tier
    /// created or deleted by another writer before this commit makes it run again. The
    /// records themselves are not guarded one by one (a tier's name and subnet never
    /// change), so the commit stays small however many tiers there are.
    fn all_tiers(&self) -> TxResult<Vec<Tier>> {
        self.meta.get(keys::TIER_SET)?;
        let mut all = Vec::new();
        for prefix in [keys::TIERS, keys::MINTING, keys::DELETING] {
            for v in self.at.scan_unguarded(prefix.as_bytes())? {
                all.push(decode(&v)?);
            }
        }
        Ok(all)
    }

    /// Refuses `tier` if its image is missing, or its name or subnet clashes with any
    /// tier's (read in the transaction, so an image deleted or a tier created meanwhile
    /// makes it run again).
    fn check_tier_can_join(&self, tier: &Tier) -> TxResult<()> {
        if self.images.get(&tier.image)?.is_none() {
            return refuse(format!(
                "field `image`: no image `{}`; import it first",
                tier.image
            ));
        }
        if let Some(why) = new_tier_refusal(&self.all_tiers()?, tier) {
            return refuse(why);
        }
        self.tier_set_changed()
    }

    /// Writes fresh instances with the addresses and host names they hold, refusing any
    /// identity held already.
    fn mint(&self, instances: &[Instance]) -> TxResult<()> {
        // The first run claims every identity without reading it, so minting costs one
        // round trip per batch; only a run after a lost race reads, to name the holder.
        if self.at.run == 1 {
            for i in instances {
                let id = i.id.to_string();
                self.addresses.claim(i.address.to_string(), &id);
                self.hostnames.claim(&i.hostname, &id);
                self.instances.claim(instance_key(&i.id), encode(i));
            }
            return Ok(());
        }
        for i in instances {
            let id = i.id.to_string();
            let addr = i.address.to_string();
            if let Some(holder) = self.addresses.insert(&addr, &id)? {
                return refuse(format!(
                    "address {addr} is already held by {}",
                    String::from_utf8_lossy(&holder)
                ));
            }
            if let Some(holder) = self.hostnames.insert(&i.hostname, &id)? {
                return refuse(format!(
                    "host name {} is already held by {}",
                    i.hostname,
                    String::from_utf8_lossy(&holder)
                ));
            }
            if self
                .instances
                .insert(instance_key(&i.id), encode(i))?
                .is_some()
            {
                return refuse(format!("instance {id} exists already"));
            }
        }
        Ok(())
    }

    fn tier_created(&self, tier: &Tier) -> TxResult<()> {
        self.event(
            Some(&tier.name),
            "tier-created",
            format!(
                "tier `{}` created with {} instances minted in {}",
                tier.name, tier.max_instances, tier.plan.subnet
            ),
            serde_json::json!({ "max-instances": tier.max_instances, "subnet": tier.plan.subnet }),
        )
    }

    fn tier_deleted(&self, name: &str, count: usize) -> TxResult<()> {
        self.event(
            Some(name),
            "tier-deleted",
            format!("tier `{name}` deleted; its {count} identities are free again"),
            serde_json::Value::Null,
        )
    }

    /// Marks the set of tiers changed (see [`Tx::all_tiers`]).
    fn tier_set_changed(&self) -> TxResult<()> {
        let n = match self.meta.get(keys::TIER_SET)? {
            Some(b) => decode::<u64>(&b)? + 1,
            None => 1,
        };
        Self::put(&self.meta, keys::TIER_SET, &n)
    }

    fn event(
        &self,
        tier: Option<&str>,
        kind: &str,
        message: String,
        detail: serde_json::Value,
    ) -> TxResult<()> {
        let seq = match self.at.next_seq.get() {
            Some(s) => s,
            None => match self.meta.get(keys::EVENT_SEQ)? {
                Some(b) => decode(&b)?,
                None => 0,
            },
        };
        self.at.next_seq.set(Some(seq + 1));
        Self::put(&self.meta, keys::EVENT_SEQ, &(seq + 1))?;
        let e = Event {
            seq,
            at_ms: now_ms(),
            tier: tier.map(str::to_string),
            kind: kind.into(),
            message,
            detail,
            by: Some(self.by.to_string()),
        };
        Self::put(&self.events, seq.to_be_bytes(), &e)
    }
}

/// Where the state lives: the embedded database in a directory (the default), or an etcd
/// cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// sled, in this directory.
    Sled(std::path::PathBuf),
    /// etcd, at these endpoints (`HOST:PORT`), with every key under `namespace`.
    Etcd {
        /// The cluster's client endpoints.
        endpoints: Vec<String>,
        /// The prefix of every key mint writes.
        namespace: String,
    },
}

/// The namespace mint's keys live under in etcd unless the URL names another.
pub const DEFAULT_NAMESPACE: &str = "/mint/";

impl Location {
    /// Reads `--store`: `sled` (the directory `default_dir`) or
    /// `etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]`. The error names the fix.
    pub fn parse(s: &str, default_dir: &Path) -> std::result::Result<Location, String> {
        if s == "sled" {
            return Ok(Location::Sled(default_dir.to_path_buf()));
        }
        let usage = "give `sled` or etcd://HOST:PORT[,HOST:PORT...][/NAMESPACE]";
        let Some(rest) = s.strip_prefix("etcd://") else {
            return Err(format!("--store: `{s}` is not a store mint knows; {usage}"));
        };
        let (hosts, ns) = match rest.split_once('/') {
            Some((h, ns)) => (h, ns.trim_matches('/')),
            None => (rest, ""),
        };
        if hosts.is_empty() {
            return Err(format!("--store: `{s}` names no endpoint; {usage}"));
        }
        let namespace = match ns {
            "" => DEFAULT_NAMESPACE.to_string(),
            ns => format!("/{ns}/"),
        };
        let mut endpoints = Vec::new();
        for e in hosts.split(',') {
            let addr: std::net::SocketAddr = e
                .parse()
                .map_err(|_| format!("--store: etcd endpoint `{e}` is not an IP:PORT; {usage}"))?;
            // State holds credentials' hashes and the engine's secrets, and this client
            // speaks to etcd without TLS: it stays on this machine.
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "--store: etcd endpoint `{e}` is not on loopback; mint talks to etcd without TLS, so it reaches only an etcd on this machine (or a loopback proxy that adds TLS)"
                ));
            }
            endpoints.push(addr.to_string());
        }
        Ok(Location::Etcd {
            endpoints,
            namespace,
        })
    }
}

/// Copies the records of mint's first sled layout (one tree per kind of record, keyed as
/// the prefixes' keys are now) into the key space in one commit, then drops the old trees.
/// A crash between the two leaves the copy in place, and the next open only drops them.
fn migrate(kv: &kv::SledKv) -> std::result::Result<(), KvError> {
    let seq_key = full_key(keys::META, keys::EVENT_SEQ.as_bytes());
    if kv.get(&seq_key)?.is_none() {
        let mut ops = Vec::new();
        let mut next_seq = 0u64;
        for (tree, entries) in kv.old_layout()? {
            let prefix = format!("{tree}/");
            if tree == "events" {
                if let Some((k, _)) = entries.last() {
                    let last = u64::from_be_bytes(k.as_slice().try_into().unwrap_or([0; 8]));
                    next_seq = last + 1;
                }
            }
            ops.extend(
                entries
                    .into_iter()
                    .map(|(k, v)| Op::Put(full_key(&prefix, &k), v)),
            );
        }
        ops.push(Op::Put(seq_key.clone(), encode(&next_seq)));
        ops.push(Op::Put(
            full_key(keys::META, keys::TIER_SET.as_bytes()),
            encode(&1u64),
        ));
        kv.commit(&[Guard::Absent(seq_key)], &ops)?;
    }
    kv.drop_old_layout()
}

fn on_nodes_refusal(name: &str, on_nodes: usize) -> String {
    format!("tier `{name}` has {on_nodes} instances on nodes; scale it to 0 first")
}

/// Why `tier` cannot join `others`: its name is taken or its subnet overlaps another's.
fn new_tier_refusal(others: &[Tier], tier: &Tier) -> Option<String> {
    for other in others {
        if other.name == tier.name {
            return Some(format!(
                "a tier named `{}` exists; choose another `name` or delete it first",
                tier.name
            ));
        }
        if other.plan.subnet.overlaps(&tier.plan.subnet) {
            return Some(format!(
                "field `subnet`: {} overlaps {} of tier `{}`; give each tier its own subnet",
                tier.plan.subnet, other.plan.subnet, other.name
            ));
        }
    }
    None
}

impl Store {
    /// Opens (or creates) the embedded database in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let path = dir.display().to_string();
        let kv = kv::SledKv::open(dir).map_err(|e| StoreError::Storage {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if kv.has_old_layout() {
            migrate(&kv).map_err(|e| StoreError::Storage {
                path,
                message: format!("moving the state of an older mint (one sled tree per record kind) into the key space failed: {e}"),
            })?;
        }
        Store::with_kv(Arc::new(kv))
    }

    /// Opens the store at `location`.
    pub fn open_at(location: &Location) -> Result<Store> {
        match location {
            Location::Sled(dir) => Store::open(dir),
            Location::Etcd {
                endpoints,
                namespace,
            } => {
                let kv = etcd::EtcdKv::connect(endpoints, namespace).map_err(|e| {
                    StoreError::Storage {
                        path: format!("etcd://{}", endpoints.join(",")),
                        message: e.to_string(),
                    }
                })?;
                Store::with_kv(Arc::new(kv))
            }
        }
    }

    /// Where this store's state is (a path or `etcd://` endpoints).
    pub fn describe(&self) -> String {
        self.kv.describe()
    }

    /// The store over any key-value backend.
    pub fn with_kv(kv: Arc<dyn Kv>) -> Result<Store> {
        let index = Arc::new(RwLock::new(node_index::NodeIndex::default()));
        let rev = node_index::load(kv.as_ref(), keys::NODES, &index)?;
        node_index::follow(
            Arc::downgrade(&kv),
            keys::NODES,
            Arc::downgrade(&index),
            rev + 1,
        )
        .map_err(|e| StoreError::Storage {
            path: kv.describe(),
            message: format!("cannot start the thread that follows the node inventory: {e}"),
        })?;
        Ok(Store {
            kv,
            turn: Mutex::new(()),
            node_index: index,
            fencing: RwLock::new(Fencing::Off),
            cache: std::sync::OnceLock::new(),
        })
    }

    /// Re-reads the named nodes into the in-memory index after a commit that may have
    /// changed them, so this store reads its own writes without waiting for the watch.
    fn refresh_nodes<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<()> {
        for name in names {
            let key = full_key(keys::NODES, name.as_bytes());
            let mut end = key.clone();
            end.push(0);
            let (found, rev) = self
                .kv
                .range(&key, &end, 1, None)
                .map_err(|e| self.storage(e))?;
            let node = match found.first() {
                Some(e) => Some(decode::<Node>(&e.value)?),
                None => None,
            };
            self.node_index
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .apply(name, rev, node);
        }
        Ok(())
    }

    fn storage(&self, e: KvError) -> StoreError {
        kv_error(self.kv.as_ref(), e)
    }

    /// Runs `f` as one transaction for the engine itself.
    fn transact<T>(&self, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T> {
        self.transact_as(ENGINE, f)
    }

    /// Runs `f` as one transaction for the identity `by`, which its events record: `f`
    /// reads and writes through its [`Tx`], and the commit lands only if nothing `f` read
    /// has changed since; otherwise `f` runs again on the new state. An error from `f`
    /// writes nothing.
    fn transact_as<T>(&self, by: &str, f: impl Fn(&Tx<'_>) -> TxResult<T>) -> Result<T> {
        let _turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        for attempt in 1..=MAX_ATTEMPTS {
            let at = Attempt::new(self.reads(), attempt);
            let value = f(&Tx::new(&at, by))?;
            let (mut guards, ops) = at.into_commit();
            if ops.is_empty() {
                return Ok(value);
            }
            let fence = self.fence_guard()?;
            guards.extend(fence);
            match self.kv.commit(&guards, &ops) {
                Ok(_) => return Ok(value),
                Err(KvError::Conflict) => {
                    self.check_fence()?;
                    // Another writer landed first; a short, growing pause spreads the
                    // writers that raced out.
                    std::thread::sleep(std::time::Duration::from_micros(
                        50 * u64::from(attempt.min(20)),
                    ));
                }
                Err(e) => return Err(self.storage(e)),
            }
        }
        Err(StoreError::Storage {
            path: self.kv.describe(),
            message: format!(
                "a change lost the race to other writers {MAX_ATTEMPTS} times; try again"
            ),
        })
    }

    /// Writes without guards, outside any transaction: for records no rule depends on
    /// (content-addressed overlays, derived artifacts).
    fn write(&self, ops: Vec<Op>) -> Result<()> {
        let guards: Vec<Guard> = self.fence_guard()?.into_iter().collect();
        match self.kv.commit(&guards, &ops) {
            Ok(_) => Ok(()),
            Err(KvError::Conflict) => {
                self.check_fence()?;
                Err(StoreError::Storage {
                    path: self.kv.describe(),
                    message: "an unguarded write conflicted".into(),
                })
            }
            Err(e) => Err(self.storage(e)),
        }
    }

    /// Starts holding the whole store in memory, fed by a watch, for a daemon that follows:
    /// while this store is not leading ([`Fencing::NotLeading`]) its reads come from that
    /// cache instead of a round trip to the backend each. A leading store reads the backend
    /// itself, since its guards need the newest revisions.
    pub fn start_read_cache(&self) -> Result<()> {
        if self.cache.get().is_some() {
            return Ok(());
        }
        let c = cache::CachedKv::start(self.kv.clone()).map_err(|e| self.storage(e))?;
        let _ = self.cache.set(Arc::new(c));
        Ok(())
    }

    /// Where reads go: the read cache while following, the backend otherwise.
    fn reads(&self) -> &dyn Kv {
        match self.cache.get() {
            Some(c) if self.fencing() == Fencing::NotLeading => c.as_ref(),
            _ => self.kv.as_ref(),
        }
    }

    /// Sets whether, and with which token, this store's commits are fenced.
    pub fn set_fencing(&self, fencing: Fencing) {
        *self.fencing.write().unwrap_or_else(|p| p.into_inner()) = fencing;
    }

    /// How this store's commits are fenced now.
    pub fn fencing(&self) -> Fencing {
        *self.fencing.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The backend's leases, if it is shared between processes (etcd).
    pub fn leases(&self) -> Option<&dyn kv::Leases> {
        self.kv.leases()
    }

    /// Whether several processes may write this store, so that one must lead.
    pub fn is_shared(&self) -> bool {
        self.kv.leases().is_some()
    }

    /// The leader key as it is now: its holder's value and its token (create-revision).
    pub fn leader(&self) -> Result<Option<(Vec<u8>, Rev)>> {
        Ok(self
            .kv
            .get(LEADER_KEY)
            .map_err(|e| self.storage(e))?
            .map(|e| (e.value, e.create_rev)))
    }

    /// The guard a commit carries under the current fencing, or why it may not commit.
    fn fence_guard(&self) -> Result<Option<Guard>> {
        match self.fencing() {
            Fencing::Off => Ok(None),
            Fencing::NotLeading => Err(StoreError::Fenced(
                "this daemon does not lead, so it writes nothing; the leader does".into(),
            )),
            Fencing::Token(t) => Ok(Some(Guard::CreateRev(LEADER_KEY.to_vec(), t))),
        }
    }

    /// After a refused commit: whether the fence was what refused it.
    fn check_fence(&self) -> Result<()> {
        let Fencing::Token(mine) = self.fencing() else {
            return Ok(());
        };
        let now = self.leader()?.map(|(_, t)| t);
        if now != Some(mine) {
            return Err(StoreError::Fenced(format!(
                "fencing token {mine} is no longer the leader's ({}); this daemon stopped leading, and its change was not written",
                match now {
                    Some(t) => format!("the leader's is {t}"),
                    None => "no daemon leads".into(),
                }
            )));
        }
        Ok(())
    }

    /// One key's bytes, as of now.
    fn raw(&self, prefix: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .reads()
            .get(&full_key(prefix, key))
            .map_err(|e| self.storage(e))?
            .map(|e| e.value))
    }

    /// One record by key, or `NotFound` naming `what`.
    fn get_one<T: DeserializeOwned>(
        &self,
        prefix: &str,
        key: &str,
        what: &'static str,
    ) -> Result<T> {
        match self.raw(prefix, key.as_bytes())? {
            Some(b) => decode(&b),
            None => Err(StoreError::NotFound {
                what,
                name: key.into(),
            }),
        }
    }

    /// Every entry under a kind's prefix followed by `key_prefix`, in key order.
    fn entries(&self, prefix: &str, key_prefix: &[u8]) -> Result<Vec<Entry>> {
        let start = full_key(prefix, key_prefix);
        Ok(self
            .reads()
            .range(&start, &prefix_end(&start), usize::MAX, None)
            .map_err(|e| self.storage(e))?
            .0)
    }

    /// Every record of a kind (or of a key prefix within it), in key order.
    fn all<T: DeserializeOwned>(&self, prefix: &str, key_prefix: &[u8]) -> Result<Vec<T>> {
        self.entries(prefix, key_prefix)?
            .iter()
            .map(|e| decode(&e.value))
            .collect()
    }

    /// Stores a tier with all K of its minted instances, in one transaction. Refused, with
    /// nothing written, if the name is taken, the plan overlaps another tier's, the instance
    /// count differs from K, or an address or host name is already held.
    pub fn create_tier(&self, tier: &Tier, instances: &[Instance], by: &str) -> Result<()> {
        self.check_new_tier(tier)?;
        if instances.len() != tier.max_instances as usize {
            return Err(StoreError::Refused(format!(
                "tier `{}` has max-instances {} but {} instances were minted",
                tier.name,
                tier.max_instances,
                instances.len()
            )));
        }
        if let Some(i) = instances.iter().find(|i| {
            i.id.tier != tier.name || i.state != InstanceState::Pooled || i.node.is_some()
        }) {
            return Err(StoreError::Refused(format!(
                "instance {} is not a fresh pooled instance of tier `{}`",
                i.id, tier.name
            )));
        }
        // Three writes per instance, and a few for the tier and its event.
        if 3 * instances.len() + 8 <= self.kv.max_ops() {
            return self.transact_as(by, |tx| {
                tx.check_tier_can_join(tier)?;
                Tx::put(&tx.tiers, &tier.name, tier)?;
                tx.mint(instances)?;
                tx.tier_created(tier)
            });
        }
        // Too many for one commit of this backend: the tier is recorded as minting, its
        // instances are written in batches, and one last commit makes it a tier. Until
        // then nothing sees it as a tier; if this stops half-way, whoever opens the store
        // next removes what was written (`finish_interrupted`).
        self.transact_as(by, |tx| {
            tx.check_tier_can_join(tier)?;
            Tx::put(&tx.minting, &tier.name, tier)
        })?;
        for batch in instances.chunks(self.batch(3)) {
            let written = self.transact_as(by, |tx| {
                if tx.minting.get(&tier.name)?.is_none() {
                    return refuse(format!("the creation of tier `{}` was abandoned while it was minted; create it again", tier.name));
                }
                tx.mint(batch)
            });
            if let Err(e) = written {
                self.abandon_minting(&tier.name, by, None)?;
                return Err(e);
            }
        }
        self.transact_as(by, |tx| {
            if tx.minting.get(&tier.name)?.is_none() {
                return refuse(format!(
                    "the creation of tier `{}` was abandoned while it was minted; create it again",
                    tier.name
                ));
            }
            tx.minting.remove(&tier.name)?;
            Tx::put(&tx.tiers, &tier.name, tier)?;
            tx.tier_created(tier)
        })
    }

    /// How many items of `ops_each` writes one commit of this backend takes, leaving room
    /// for the records every commit may write besides (an event and its counter).
    fn batch(&self, ops_each: usize) -> usize {
        (self.kv.max_ops().saturating_sub(8) / ops_each).max(1)
    }

    /// Removes a tier being minted and every instance written for it (in batches), with
    /// the event that says why, if `why` is given.
    fn abandon_minting(&self, name: &str, by: &str, why: Option<&str>) -> Result<()> {
        self.remove_instances(name, by)?;
        self.transact_as(by, |tx| {
            tx.minting.remove(name)?;
            tx.tier_set_changed()?;
            match why {
                Some(why) => tx.event(
                    Some(name),
                    "tier-abandoned",
                    format!("the creation of tier `{name}` did not finish ({why}); the instances written for it were removed, and its identities are free"),
                    serde_json::Value::Null,
                ),
                None => Ok(()),
            }
        })
    }

    /// Deletes a tier's instances and the addresses and host names they hold, in
    /// batches. An index key is deleted only while it still names the instance, so a
    /// collision with another tier never frees that tier's identity.
    fn remove_instances(&self, tier: &str, by: &str) -> Result<()> {
        let per = self.batch(4);
        loop {
            let start = full_key(keys::INSTANCES, &tier_prefix(tier));
            let (batch, _) = self
                .kv
                .range(&start, &prefix_end(&start), per, None)
                .map_err(|e| self.storage(e))?;
            if batch.is_empty() {
                return Ok(());
            }
            self.transact_as(by, |tx| {
                for e in &batch {
                    let Some(i) =
                        Tx::get::<Instance>(&tx.instances, &e.key[keys::INSTANCES.len()..])?
                    else {
                        continue;
                    };
                    let id = i.id.to_string();
                    tx.instances.remove(instance_key(&i.id))?;
                    if tx.addresses.get(i.address.to_string())?.as_deref() == Some(id.as_bytes()) {
                        tx.addresses.remove(i.address.to_string())?;
                    }
                    if tx.hostnames.get(&i.hostname)?.as_deref() == Some(id.as_bytes()) {
                        tx.hostnames.remove(&i.hostname)?;
                    }
                }
                Ok(())
            })?;
        }
    }

    /// Finishes what a writer that stopped half-way left: a tier still minting is
    /// removed with the instances written for it (the request that minted them is gone,
    /// so a tier ends with 0 or K instances), and a tier being deleted is deleted. Run by
    /// whoever opens the store to act on it. Returns what it did, one line each.
    pub fn finish_interrupted(&self) -> Result<Vec<String>> {
        let mut done = Vec::new();
        for t in self.all::<Tier>(keys::MINTING, b"")? {
            self.abandon_minting(&t.name, ENGINE, Some("its writer stopped"))?;
            done.push(format!(
                "removed tier `{}`, whose minting was interrupted",
                t.name
            ));
        }
        for t in self.all::<Tier>(keys::DELETING, b"")? {
            self.finish_delete(&t.name, ENGINE, t.max_instances as usize)?;
            done.push(format!("finished deleting tier `{}`", t.name));
        }
        Ok(done)
    }

    /// Records an imported master image (idempotent: the digest names the content).
    pub fn put_image(&self, image: &Image) -> Result<()> {
        self.write(vec![Op::Put(
            full_key(keys::IMAGES, image.digest.as_bytes()),
            encode(image),
        )])
    }

    /// Deletes an image's record. Refused while any tier uses it, naming the tiers.
    pub fn delete_image(&self, digest: &str, by: &str) -> Result<Image> {
        self.transact_as(by, |tx| {
            let Some(image) = Tx::get::<Image>(&tx.images, digest)? else {
                return abort(StoreError::NotFound {
                    what: "image",
                    name: digest.into(),
                });
            };
            let users: Vec<String> = tx
                .all_tiers()?
                .into_iter()
                .filter(|t| t.image == digest)
                .map(|t| t.name)
                .collect();
            if !users.is_empty() {
                return refuse(format!(
                    "image {} ({}) is the master of tier(s) {}; delete those tiers first",
                    image.name,
                    digest,
                    users.join(", ")
                ));
            }
            tx.images.remove(digest)?;
            tx.event(
                None,
                "image-deleted",
                format!("image {} ({digest}) deleted", image.name),
                serde_json::Value::Null,
            )?;
            Ok(image)
        })
    }

    /// Every overlay digest stored.
    pub fn overlay_digests(&self) -> Result<Vec<String>> {
        Ok(self
            .entries(keys::OVERLAYS, b"")?
            .iter()
            .map(|e| String::from_utf8_lossy(&e.key[keys::OVERLAYS.len()..]).into_owned())
            .collect())
    }

    /// Removes overlays no instance refers to any more. The caller computes `unused` with
    /// no tier being created meanwhile (the daemon holds its operation lock).
    pub fn remove_overlays(&self, unused: &[String]) -> Result<()> {
        if unused.is_empty() {
            return Ok(());
        }
        self.write(
            unused
                .iter()
                .map(|d| Op::Delete(full_key(keys::OVERLAYS, d.as_bytes())))
                .collect(),
        )
    }

    /// Every image, by digest.
    pub fn images(&self) -> Result<Vec<Image>> {
        self.all(keys::IMAGES, b"")
    }

    /// One image, by digest.
    pub fn image(&self, digest: &str) -> Result<Image> {
        self.get_one(keys::IMAGES, digest, "image")
    }

    /// Stores an instance's customization overlay under its digest. Overlays are content
    /// addressed, so instances with identical edits share one, and writing one twice is
    /// harmless.
    pub fn put_overlay(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        self.write(vec![Op::Put(
            full_key(keys::OVERLAYS, digest.as_bytes()),
            bytes.to_vec(),
        )])
    }

    /// Stores several overlays as [`Store::put_overlay`] does, in as few commits as the
    /// backend takes (by count, and under 1 MiB of overlays each).
    pub fn put_overlays(&self, overlays: &[(String, Vec<u8>)]) -> Result<()> {
        let mut batch: Vec<Op> = Vec::new();
        let mut bytes = 0;
        for (digest, data) in overlays {
            if !batch.is_empty() && (batch.len() >= self.batch(1) || bytes + data.len() > 1 << 20) {
                self.write(std::mem::take(&mut batch))?;
                bytes = 0;
            }
            bytes += data.len();
            batch.push(Op::Put(
                full_key(keys::OVERLAYS, digest.as_bytes()),
                data.clone(),
            ));
        }
        if !batch.is_empty() {
            self.write(batch)?;
        }
        Ok(())
    }

    /// Records that the artifact built from `key` (for example a tree instance's root
    /// filesystem from its master and overlay) is the blob `digest`. Artifacts are derived
    /// data: losing this record only means building the artifact again.
    pub fn put_artifact(&self, key: &str, digest: &str) -> Result<()> {
        self.write(vec![Op::Put(
            full_key(keys::ARTIFACTS, key.as_bytes()),
            digest.as_bytes().to_vec(),
        )])
    }

    /// The blob built for `key`, if one was recorded.
    pub fn artifact(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .raw(keys::ARTIFACTS, key.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Every recorded artifact, as (key, digest).
    pub fn artifacts(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .entries(keys::ARTIFACTS, b"")?
            .into_iter()
            .map(|e| {
                (
                    String::from_utf8_lossy(&e.key[keys::ARTIFACTS.len()..]).into_owned(),
                    String::from_utf8_lossy(&e.value).into_owned(),
                )
            })
            .collect())
    }

    /// Forgets the artifact recorded for `key`.
    pub fn forget_artifact(&self, key: &str) -> Result<()> {
        self.write(vec![Op::Delete(full_key(keys::ARTIFACTS, key.as_bytes()))])
    }

    /// An overlay's bytes.
    pub fn overlay(&self, digest: &str) -> Result<Vec<u8>> {
        self.raw(keys::OVERLAYS, digest.as_bytes())?
            .ok_or_else(|| StoreError::NotFound {
                what: "overlay",
                name: digest.into(),
            })
    }

    /// Deletes a tier whose instances are all off nodes, freeing its addresses and host
    /// names for other tiers. Refused while any instance holds a node.
    pub fn delete_tier(&self, name: &str, by: &str) -> Result<()> {
        let t = self.tier(name)?;
        if 4 * t.max_instances as usize + 8 <= self.kv.max_ops() {
            return self.transact_as(by, |tx| {
                if tx.tiers.get(name)?.is_none() {
                    return abort(StoreError::NotFound {
                        what: "tier",
                        name: name.into(),
                    });
                }
                let instances: Vec<Instance> = tx.instances.scan(&tier_prefix(name))?;
                let on_nodes = instances.iter().filter(|i| i.state.holds_node()).count();
                if on_nodes > 0 {
                    return refuse(on_nodes_refusal(name, on_nodes));
                }
                for i in &instances {
                    tx.instances.remove(instance_key(&i.id))?;
                    tx.addresses.remove(i.address.to_string())?;
                    tx.hostnames.remove(&i.hostname)?;
                }
                tx.tiers.remove(name)?;
                tx.tier_set_changed()?;
                tx.tier_deleted(name, instances.len())
            });
        }
        // Too many instances for one commit: the tier leaves the tiers first, so nothing
        // binds its instances from then on (a bind reads the tier record and is guarded
        // by it); then, with the set of instances on nodes only able to shrink, one look
        // says whether any still holds a node.
        self.transact_as(by, |tx| {
            let Some(t) = Tx::get::<Tier>(&tx.tiers, name)? else {
                return abort(StoreError::NotFound {
                    what: "tier",
                    name: name.into(),
                });
            };
            tx.tiers.remove(name)?;
            Tx::put(&tx.deleting, name, &t)?;
            tx.tier_set_changed()
        })?;
        let on_nodes = self
            .instances(name)?
            .iter()
            .filter(|i| i.state.holds_node())
            .count();
        if on_nodes > 0 {
            self.transact_as(by, |tx| {
                if let Some(t) = Tx::get::<Tier>(&tx.deleting, name)? {
                    tx.deleting.remove(name)?;
                    Tx::put(&tx.tiers, name, &t)?;
                    tx.tier_set_changed()?;
                }
                Ok(())
            })?;
            return Err(StoreError::Refused(on_nodes_refusal(name, on_nodes)));
        }
        self.finish_delete(name, by, t.max_instances as usize)
    }

    /// Removes a tier in `deleting/` with its instances, and records that it is gone.
    fn finish_delete(&self, name: &str, by: &str, count: usize) -> Result<()> {
        self.remove_instances(name, by)?;
        self.transact_as(by, |tx| {
            tx.deleting.remove(name)?;
            tx.tier_set_changed()?;
            tx.tier_deleted(name, count)
        })
    }

    /// Whether a tier could be created now: its name is free and its subnet overlaps no
    /// other tier's. Creating it checks again inside its transaction; checking first
    /// spares minting K instances for a request that would be refused.
    pub fn check_new_tier(&self, tier: &Tier) -> Result<()> {
        match new_tier_refusal(&self.tiers()?, tier) {
            Some(why) => Err(StoreError::Refused(why)),
            None => Ok(()),
        }
    }

    /// Every tier, by name.
    pub fn tiers(&self) -> Result<Vec<Tier>> {
        self.all(keys::TIERS, b"")
    }

    /// One tier.
    pub fn tier(&self, name: &str) -> Result<Tier> {
        self.get_one(keys::TIERS, name, "tier")
    }

    /// A tier's instances, by index.
    pub fn instances(&self, tier: &str) -> Result<Vec<Instance>> {
        self.all(keys::INSTANCES, &tier_prefix(tier))
    }

    /// Every address held by any instance, for allocating a new tier's addresses.
    pub fn address_taken(&self, address: std::net::IpAddr) -> Result<bool> {
        Ok(self
            .raw(keys::ADDRESSES, address.to_string().as_bytes())?
            .is_some())
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
        self.transact_as(by, |tx| {
            let Some(mut t) = Tx::get::<Tier>(&tx.tiers, tier.as_bytes())? else {
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
            Tx::put(&tx.tiers, tier.as_bytes(), &t)?;
            tx.event(Some(tier), kind, message, detail)?;
            Ok(t.generation)
        })
    }

    /// Adds a node to the inventory; it starts free unless it is in maintenance.
    pub fn add_node(&self, node: &Node, by: &str) -> Result<()> {
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
            Tx::put(&tx.nodes, node.name.as_bytes(), node)?;
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
        self.transact(|tx| tx.event(Some(tier), kind, message.clone(), detail.clone()))
    }

    /// Stores a new operator token (only its hash). Refused if the name is taken.
    pub fn create_token(&self, t: &Token, by: &str) -> Result<()> {
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
            Tx::put(&tx.identities, key.as_bytes(), t)?;
            Tx::put(
                &tx.identities,
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
        let mut fresh = [0u8; 32];
        getrandom::getrandom(&mut fresh).map_err(|e| StoreError::Storage {
            path: self.kv.describe(),
            message: format!("no random bytes from the operating system: {e}"),
        })?;
        // Made only if absent when the commit lands: two daemons asking at once agree on
        // the first one committed.
        let v = self.transact(|tx| match tx.identities.get(&key)? {
            Some(v) => Ok(v),
            None => {
                tx.identities.set(&key, fresh.to_vec());
                Ok(fresh.to_vec())
            }
        })?;
        v.as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt(format!("secret `{name}` is not 32 bytes")))
    }

    /// Every operator token's record (names, roles and hashes; never a token).
    pub fn tokens(&self) -> Result<Vec<Token>> {
        self.all(keys::IDENTITIES, b"token/")
    }

    /// Revokes an operator token: from this commit on it authenticates nothing.
    pub fn revoke_token(&self, name: &str, by: &str) -> Result<Token> {
        self.transact_as(by, |tx| {
            let key = format!("token/{name}");
            let Some(t) = Tx::get::<Token>(&tx.identities, key.as_bytes())? else {
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
        match self.raw(keys::IDENTITIES, format!("hash/{hash}").as_bytes())? {
            Some(b) => decode(&b).map(Some),
            None => Ok(None),
        }
    }

    /// Records a pending enrollment for a node name, replacing any earlier one for it.
    pub fn enroll(&self, e: &Enrollment, by: &str) -> Result<()> {
        self.transact_as(by, |tx| {
            Tx::put(&tx.identities, format!("enroll/{}", e.node).as_bytes(), e)?;
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
        match self.raw(keys::IDENTITIES, format!("enroll/{node}").as_bytes())? {
            Some(b) => decode(&b).map(Some),
            None => Ok(None),
        }
    }

    /// A node's credential record, if it has one.
    pub fn node_credential(&self, node: &str) -> Result<Option<NodeCredential>> {
        match self.raw(keys::IDENTITIES, format!("cred/{node}").as_bytes())? {
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
        let credential = self.transact_as(&format!("node:{}", node.name), |tx| {
            let key = format!("enroll/{}", node.name);
            let pending = Tx::get::<Enrollment>(&tx.identities, key.as_bytes())?;
            let Some(e) = pending.filter(|e| same_hash(&e.hash, join_hash)) else {
                return refuse(format!("no enrollment of node `{}` matches this join token; `mint node enroll {}` issues one", node.name, node.name));
            };
            if e.expires_ms <= now_ms {
                return refuse(format!("the join token for node `{}` expired; `mint node enroll {}` issues a new one", node.name, node.name));
            }
            tx.identities.remove(key.as_bytes())?;
            let cred_key = format!("cred/{}", node.name);
            let generation = match Tx::get::<NodeCredential>(&tx.identities, cred_key.as_bytes())? {
                Some(old) => {
                    tx.identities.remove(format!("hash/{}", old.hash).as_bytes())?;
                    old.generation + 1
                }
                None => 1,
            };
            let c = NodeCredential { node: node.name.clone(), hash: credential_hash.to_string(), generation };
            Tx::put(&tx.identities, cred_key.as_bytes(), &c)?;
            Tx::put(&tx.identities, format!("hash/{credential_hash}").as_bytes(), &Principal::Node { name: node.name.clone() })?;
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
        self.transact_as(&format!("node:{}", node.name), |tx| {
            let current = Tx::get::<NodeCredential>(
                &tx.identities,
                format!("cred/{}", node.name).as_bytes(),
            )?;
            if !current.is_some_and(|c| same_hash(&c.hash, credential_hash)) {
                return refuse(format!(
                    "node `{}` registers only with its own credential",
                    node.name
                ));
            }
            let mut n = node.clone();
            if let Some(known) = Tx::get::<Node>(&tx.nodes, node.name.as_bytes())? {
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
        let n = match Tx::get::<Node>(&tx.nodes, node.name.as_bytes())? {
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
        Tx::put(&tx.nodes, node.name.as_bytes(), &n)?;
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
                Tx::get::<NodeCredential>(&tx.identities, format!("cred/{name}").as_bytes())?
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
            .nodes
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
            .nodes
            .get(name)
            .is_some_and(|n| n.properties.contains_key(key))
    }

    /// One node by name.
    pub fn node(&self, name: &str) -> Result<Node> {
        match self
            .node_index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .nodes
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
            .map(|_| ())
    }

    /// Binds several instances of one tier to nodes, with the checks of [`Store::bind`]
    /// for each, in as few commits as the backend takes (one on sled; about 30 binds each
    /// on etcd), each all or none. Returns how many of `binds`, from the first, were
    /// bound: all of them, or fewer when a later commit was refused (a node taken by
    /// another writer meanwhile), whose refusal is returned only if nothing was bound.
    pub fn bind_many(&self, binds: &[(InstanceId, String, serde_json::Value)]) -> Result<usize> {
        let Some(first) = binds.first() else {
            return Ok(0);
        };
        let tier_name = first.0.tier.clone();
        if binds.iter().any(|b| b.0.tier != tier_name) {
            return Err(StoreError::Refused(
                "one bind_many call binds instances of one tier".into(),
            ));
        }
        let mut bound = 0;
        for chunk in binds.chunks(self.batch(4)) {
            match self.bind_chunk(&tier_name, chunk) {
                Ok(()) => bound += chunk.len(),
                Err(e) if bound == 0 => return Err(e),
                Err(_) => break,
            }
            self.refresh_nodes(chunk.iter().map(|b| b.1.as_str()))?;
        }
        Ok(bound)
    }

    /// One commit of [`Store::bind_many`].
    fn bind_chunk(
        &self,
        tier_name: &str,
        binds: &[(InstanceId, String, serde_json::Value)],
    ) -> Result<()> {
        self.transact(|tx| {
            let Some(tier) = Tx::get::<Tier>(&tx.tiers, tier_name.as_bytes())? else {
                return abort(StoreError::NotFound { what: "tier", name: tier_name.to_string() });
            };
            // A tier has exactly K instances, each on at most one node, so refusing any
            // other index keeps at most K on nodes without counting them: the count would
            // need a guard on all K records.
            if let Some((id, _, _)) = binds.iter().find(|b| b.0.index >= tier.max_instances) {
                return refuse(format!(
                    "instance {id} is not one of tier `{}`'s K = {} instances; binding it would exceed its maximum",
                    tier.name, tier.max_instances
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
                Tx::put(&tx.instances, &instance_key(id), &inst)?;
                Tx::put(&tx.nodes, node.as_bytes(), &n)?;
                tx.event(Some(&id.tier), "bound", format!("instance {id} ({}, {}) bound to node `{node}`", inst.hostname, inst.address), detail.clone())?;
            }
            Ok(())
        })
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
        if batch == 0 {
            return Err(StoreError::Refused(
                "field `batch`: roll at least 1 instance at a time".into(),
            ));
        }
        let revision = self.transact_as(by, |tx| {
            if tx.images.get(image)?.is_none() {
                return refuse(format!("field `image`: no image `{image}`; import it first"));
            }
            let Some(mut tier) = Tx::get::<Tier>(&tx.tiers, tier_name.as_bytes())? else {
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
                Tx::put(&tx.instances, &instance_key(&new.id), &inst)?;
            }
            let old = std::mem::replace(&mut tier.image, image.to_string());
            tier.revision += 1;
            tier.generation += 1;
            tier.rollout_batch = batch;
            Tx::put(&tx.tiers, tier_name.as_bytes(), &tier)?;
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
    /// deploying again on the node it holds. In as few commits as the backend takes, each
    /// all or none; a refused one stops the rest.
    pub fn begin_roll(&self, ids: &[InstanceId]) -> Result<()> {
        for chunk in ids.chunks(self.batch(3)) {
            self.begin_roll_chunk(chunk)?;
        }
        Ok(())
    }

    /// One commit of [`Store::begin_roll`].
    fn begin_roll_chunk(&self, ids: &[InstanceId]) -> Result<()> {
        let nodes = self.transact(|tx| {
            let mut nodes = Vec::new();
            for id in ids {
                let mut inst = tx.instance(id)?;
                let Some(tier) = Tx::get::<Tier>(&tx.tiers, id.tier.as_bytes())? else {
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
                Tx::put(&tx.instances, &instance_key(id), &inst)?;
                Tx::put(&tx.nodes, node.as_bytes(), &n)?;
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
    /// newer decision stands. Returns the discarded ones. In as few commits as the backend
    /// takes (one on sled).
    pub fn finish_guarded(
        &self,
        done: &[(InstanceId, u64, serde_json::Value)],
    ) -> Result<Vec<InstanceId>> {
        let mut discarded = Vec::new();
        for chunk in done.chunks(self.batch(3)) {
            discarded.extend(self.finish_guarded_chunk(chunk)?);
        }
        Ok(discarded)
    }

    /// One commit of [`Store::finish_guarded`].
    fn finish_guarded_chunk(
        &self,
        done: &[(InstanceId, u64, serde_json::Value)],
    ) -> Result<Vec<InstanceId>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
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
                Tx::put(&tx.instances, &instance_key(id), &inst)?;
                Tx::put(&tx.nodes, node.as_bytes(), &n)?;
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
    /// until the driver has undeployed it ([`Store::release_guarded`]). In as few commits
    /// as the backend takes, each all or none; a refused one stops the rest.
    pub fn begin_undeploy(&self, ids: &[InstanceId], reason: &str) -> Result<()> {
        for chunk in ids.chunks(self.batch(2)) {
            self.begin_undeploy_chunk(chunk, reason)?;
        }
        Ok(())
    }

    /// One commit of [`Store::begin_undeploy`].
    fn begin_undeploy_chunk(&self, ids: &[InstanceId], reason: &str) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.transact(|tx| {
            for id in ids {
                let mut inst = tx.instance(id)?;
                if !inst.state.can_undeploy() {
                    return refuse(format!("instance {id} is {}; only deploying or deployed instances can be undeployed", inst.state));
                }
                let from = inst.state;
                inst.state = InstanceState::Undeploying;
                inst.since_ms = now_ms();
                Tx::put(&tx.instances, &instance_key(id), &inst)?;
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
        let held = self.transact_as(by, |tx| {
            let mut n = tx.node(name)?;
            let held = n.instance.take();
            n.state = NodeState::Failed;
            Tx::put(&tx.nodes, name.as_bytes(), &n)?;
            if let Some(id) = &held {
                let mut inst = tx.instance(id)?;
                inst.state = InstanceState::Failed;
                inst.node = None;
                inst.since_ms = now_ms();
                Tx::put(&tx.instances, &instance_key(id), &inst)?;
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
            Tx::put(&tx.nodes, name.as_bytes(), &n)?;
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
            Tx::put(&tx.nodes, name.as_bytes(), &n)?;
            tx.event(None, "node-cache", message, detail)
        });
        self.refresh_nodes([name])?;
        r.map(|_| true)
    }

    /// Deletes the events older than the newest `keep`, in batches, and returns how many
    /// went. Events never change once written, so nothing guards their deletion.
    pub fn trim_events(&self, keep: u64) -> Result<u64> {
        let next: u64 = match self.raw(keys::META, keys::EVENT_SEQ.as_bytes())? {
            Some(b) => decode(&b)?,
            None => 0,
        };
        let Some(cutoff) = next.checked_sub(keep).filter(|c| *c > 0) else {
            return Ok(0);
        };
        let (start, end) = (
            full_key(keys::EVENTS, &0u64.to_be_bytes()),
            full_key(keys::EVENTS, &cutoff.to_be_bytes()),
        );
        let mut removed = 0;
        loop {
            let (old, _) = self
                .kv
                .range(&start, &end, self.batch(1), None)
                .map_err(|e| self.storage(e))?;
            if old.is_empty() {
                return Ok(removed);
            }
            removed += old.len() as u64;
            self.write(old.into_iter().map(|e| Op::Delete(e.key)).collect())?;
        }
    }

    /// The sequence number of the newest event recorded, if any.
    pub fn newest_event_seq(&self) -> Result<Option<u64>> {
        let next: u64 = match self.raw(keys::META, keys::EVENT_SEQ.as_bytes())? {
            Some(b) => decode(&b)?,
            None => 0,
        };
        Ok(next.checked_sub(1))
    }

    /// Events with a sequence number above `after`, oldest first, at most `limit`.
    pub fn events(&self, after: Option<u64>, limit: usize) -> Result<Vec<Event>> {
        let start = full_key(
            keys::EVENTS,
            &after
                .map(|a| a.saturating_add(1))
                .unwrap_or(0)
                .to_be_bytes(),
        );
        let end = prefix_end(keys::EVENTS.as_bytes());
        self.reads()
            .range(&start, &end, limit, None)
            .map_err(|e| self.storage(e))?
            .0
            .iter()
            .map(|e| decode(&e.value))
            .collect()
    }

    /// Checks every invariant of the pool over the whole database and lists what is
    /// broken (empty when all hold). Used by tests after crashes and random operations, and
    /// while other writers work: tiers, instances and nodes are read at one revision, so
    /// what is checked is one committed state.
    pub fn check_invariants(&self) -> Result<Vec<String>> {
        let mut tries = 0;
        let (tiers, instances, nodes) = loop {
            tries += 1;
            match self.snapshot() {
                Ok(s) => break s,
                Err(KvError::Compacted { .. }) if tries < 100 => continue,
                Err(e) => return Err(self.storage(e)),
            }
        };
        let tiers: Vec<Tier> = tiers
            .iter()
            .map(|e| decode(&e.value))
            .collect::<Result<_>>()?;
        let instances: Vec<Instance> = instances
            .iter()
            .map(|e| decode(&e.value))
            .collect::<Result<_>>()?;
        let nodes: Vec<Node> = nodes
            .iter()
            .map(|e| decode(&e.value))
            .collect::<Result<_>>()?;
        let mut broken = Vec::new();
        let mut addr = std::collections::HashMap::new();
        let mut host = std::collections::HashMap::new();
        for t in &tiers {
            let inst: Vec<&Instance> = instances.iter().filter(|i| i.id.tier == t.name).collect();
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
                let holds = instances
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

    /// Tiers, instances and nodes, all as of one revision.
    fn snapshot(&self) -> std::result::Result<(Vec<Entry>, Vec<Entry>, Vec<Entry>), KvError> {
        let all = |prefix: &str, at| {
            let p = prefix.as_bytes();
            self.kv.range(p, &prefix_end(p), usize::MAX, at)
        };
        let (tiers, rev) = all(keys::TIERS, None)?;
        let (instances, _) = all(keys::INSTANCES, Some(rev))?;
        let (nodes, _) = all(keys::NODES, Some(rev))?;
        Ok((tiers, instances, nodes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_directory_of_the_first_layout_is_moved_into_the_key_space() {
        let dir = std::env::temp_dir().join(format!("mint-store-migrate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let node = Node {
            name: "n1".into(),
            cpus: 4,
            memory_mib: 4096,
            arch: "x86_64".into(),
            labels: Default::default(),
            properties: Default::default(),
            state: NodeState::Free,
            instance: None,
            load: 0,
            cached: Vec::new(),
        };
        let event = |seq: u64| Event {
            seq,
            at_ms: 1,
            tier: None,
            kind: "node-added".into(),
            message: "old".into(),
            detail: serde_json::Value::Null,
            by: Some("admin:test".into()),
        };
        {
            // What mint wrote before the key-value store: one sled tree per kind.
            let db = sled::open(&dir).unwrap();
            db.open_tree("nodes")
                .unwrap()
                .insert("n1", encode(&node))
                .unwrap();
            let events = db.open_tree("events").unwrap();
            for seq in [0u64, 1, 7] {
                events
                    .insert(seq.to_be_bytes(), encode(&event(seq)))
                    .unwrap();
            }
            let who = Principal::Node { name: "n1".into() };
            db.open_tree("identities")
                .unwrap()
                .insert("hash/sha256:ab", encode(&who))
                .unwrap();
            db.flush().unwrap();
        }
        {
            let s = Store::open(&dir).unwrap();
            assert_eq!(s.node("n1").unwrap().cpus, 4);
            assert!(
                matches!(s.principal("sha256:ab").unwrap(), Some(Principal::Node { name }) if name == "n1")
            );
            let seqs: Vec<u64> = s.events(None, 10).unwrap().iter().map(|e| e.seq).collect();
            assert_eq!(seqs, [0, 1, 7]);
            s.note("test", "new".into(), serde_json::Value::Null, "admin:test")
                .unwrap();
            assert_eq!(
                s.events(Some(7), 10).unwrap()[0].seq,
                8,
                "numbers go on after the old ones"
            );
        }
        // Moved once: the old trees are gone, and a reopen reads the same.
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.events(None, 10).unwrap().len(), 4);
        assert_eq!(s.nodes().unwrap().len(), 1);
        drop(s);
        let db = sled::open(&dir).unwrap();
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"nodes"));
        drop(db);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
