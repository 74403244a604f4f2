//! The node inventory in memory, fed by the store's own commits and by a watch on the
//! backend, so that it also follows what other writers (other daemons) commit.
//!
//! Each name remembers the revision its record was last known at, and an update older
//! than that is dropped: a refresh after a commit and the watch's report of the same
//! commit can arrive in either order and the index ends with the newer one.

use crate::kv::{Change, Kv, Rev, prefix_end};
use mint_model::records::Node;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, Weak};

/// Every node as last known, by name.
#[derive(Default)]
pub(crate) struct NodeIndex {
    pub(crate) nodes: BTreeMap<String, Arc<Node>>,
    /// The revision at which each name's record (or its absence) was last known.
    known_at: HashMap<String, Rev>,
}

impl NodeIndex {
    /// Records that at revision `rev` node `name` was `node` (`None`: absent), unless
    /// something newer is known already.
    pub(crate) fn apply(&mut self, name: &str, rev: Rev, node: Option<Node>) {
        if self.known_at.get(name).is_some_and(|&known| known >= rev) {
            return;
        }
        self.known_at.insert(name.to_string(), rev);
        match node {
            Some(n) => self.nodes.insert(name.to_string(), Arc::new(n)),
            None => self.nodes.remove(name),
        };
    }
}

/// Replaces the index with every node under `prefix` as of one revision, and returns the
/// revision.
pub(crate) fn load(
    kv: &dyn Kv,
    prefix: &str,
    index: &RwLock<NodeIndex>,
) -> Result<Rev, crate::StoreError> {
    let start = prefix.as_bytes();
    let (entries, rev) = kv
        .range(start, &prefix_end(start), usize::MAX, None)
        .map_err(|e| crate::kv_error(kv, e))?;
    let mut fresh = BTreeMap::new();
    for e in entries {
        let n: Node = crate::decode(&e.value)?;
        fresh.insert(n.name.clone(), n);
    }
    let mut index = index.write().unwrap_or_else(|p| p.into_inner());
    let names: Vec<String> = index.nodes.keys().cloned().collect();
    for name in names {
        if !fresh.contains_key(&name) {
            index.apply(&name, rev, None);
        }
    }
    for (name, n) in fresh {
        index.apply(&name, rev, Some(n));
    }
    Ok(rev)
}

/// Follows the backend's changes to nodes into `index` from revision `from`, on a thread
/// of its own, until the store (the last holder of `kv` and `index`) is gone. A watch the
/// backend cannot start or ends (a restart, a compaction) is replaced by a fresh load and
/// a new watch.
pub(crate) fn follow(
    kv: Weak<dyn Kv>,
    prefix: &'static str,
    index: Weak<RwLock<NodeIndex>>,
    from: Rev,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("mint-node-index".into())
        .spawn(move || {
            let end = prefix_end(prefix.as_bytes());
            let ix = index.clone();
            crate::kv::follow_changes(
                kv,
                (prefix.as_bytes(), &end),
                from,
                |change| {
                    let index = ix.upgrade()?;
                    if let Some(c) = change {
                        apply_change(&index, prefix, c);
                    }
                    Some(())
                },
                |kv| {
                    let index = index.upgrade()?;
                    Some(load(kv, prefix, &index).ok())
                },
            );
        })
        .map(|_| ())
}

fn apply_change(index: &RwLock<NodeIndex>, prefix: &str, c: Change) {
    let Some(name) = c.key.strip_prefix(prefix.as_bytes()) else {
        return;
    };
    let name = String::from_utf8_lossy(name).into_owned();
    // A record that does not decode is left as it was known; the store's own reads
    // report it where it matters.
    let node = match c.value {
        Some(v) => match crate::decode::<Node>(&v) {
            Ok(n) => Some(n),
            Err(_) => return,
        },
        None => None,
    };
    index
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .apply(&name, c.rev, node);
}
