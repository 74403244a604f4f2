//! A follower's read cache: the whole key space of a shared store held in memory and kept
//! current by a watch, so a daemon that follows serves reads without a round trip to the
//! cluster. It is a cache of committed state, never a source of truth: a leader reads the
//! backend itself (its transactions' guards need the newest revisions), and commits always
//! go to the backend.

use crate::kv::{Change, Entry, Guard, Kv, KvError, Leases, Op, Rev, Watch};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock, Weak};

#[derive(Default)]
struct Mirror {
    entries: BTreeMap<Vec<u8>, Entry>,
    /// The revision the mirror is complete at.
    rev: Rev,
}

impl Mirror {
    fn apply(&mut self, c: Change) {
        match c.value {
            Some(value) => {
                // A key that exists keeps its create-revision; a new one is created now.
                let create_rev = self
                    .entries
                    .get(&c.key)
                    .map(|e| e.create_rev)
                    .unwrap_or(c.rev);
                self.entries.insert(
                    c.key.clone(),
                    Entry {
                        key: c.key,
                        value,
                        create_rev,
                        mod_rev: c.rev,
                    },
                );
            }
            None => {
                self.entries.remove(&c.key);
            }
        }
        self.rev = self.rev.max(c.rev);
    }
}

/// The backend's whole key space, mirrored; reads come from the mirror, everything else
/// goes to the backend.
pub struct CachedKv {
    inner: Arc<dyn Kv>,
    mirror: Arc<RwLock<Mirror>>,
}

impl CachedKv {
    /// Loads the whole key space of `inner` and follows it on a thread of its own until
    /// this cache is dropped.
    pub fn start(inner: Arc<dyn Kv>) -> Result<CachedKv, KvError> {
        let mirror = Arc::new(RwLock::new(load(inner.as_ref())?));
        let from = mirror.read().unwrap_or_else(|p| p.into_inner()).rev + 1;
        let (kv, m) = (Arc::downgrade(&inner), Arc::downgrade(&mirror));
        std::thread::Builder::new()
            .name("mint-read-cache".into())
            .spawn(move || follow(kv, m, from))
            .map_err(|e| KvError::Unavailable(format!("cannot start the read cache: {e}")))?;
        Ok(CachedKv { inner, mirror })
    }

    /// How many keys the cache holds.
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    /// Whether the cache holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The revision the cache is complete at.
    pub fn rev(&self) -> Rev {
        self.read().rev
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Mirror> {
        self.mirror.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn load(kv: &dyn Kv) -> Result<Mirror, KvError> {
    let (entries, rev) = kv.range(b"", b"", usize::MAX, None)?;
    Ok(Mirror {
        entries: entries.into_iter().map(|e| (e.key.clone(), e)).collect(),
        rev,
    })
}

/// Applies the backend's changes to the mirror; a watch that ends (a restart of the
/// cluster, a compaction) is replaced by a fresh load and a new watch.
fn follow(kv: Weak<dyn Kv>, mirror: Weak<RwLock<Mirror>>, from: Rev) {
    let m = mirror.clone();
    crate::kv::follow_changes(
        kv,
        (b"", b""),
        from,
        |change| {
            let m = m.upgrade()?;
            if let Some(c) = change {
                m.write().unwrap_or_else(|p| p.into_inner()).apply(c);
            }
            Some(())
        },
        |kv| {
            let m = mirror.upgrade()?;
            Some(load(kv).ok().map(|fresh| {
                let rev = fresh.rev;
                *m.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                rev
            }))
        },
    );
}

impl Kv for CachedKv {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn max_ops(&self) -> usize {
        self.inner.max_ops()
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>, KvError> {
        Ok(self.read().entries.get(key).cloned())
    }

    fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at: Option<Rev>,
    ) -> Result<(Vec<Entry>, Rev), KvError> {
        let m = self.read();
        // A read at another revision than the mirror's is the backend's to answer.
        if at.is_some_and(|r| r != m.rev) {
            drop(m);
            return self.inner.range(start, end, limit, at);
        }
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end.to_vec())
        };
        let found = m
            .entries
            .range((Bound::Included(start.to_vec()), upper))
            .take(limit)
            .map(|(_, e)| e.clone())
            .collect();
        Ok((found, m.rev))
    }

    fn commit(&self, guards: &[Guard], ops: &[Op]) -> Result<Rev, KvError> {
        self.inner.commit(guards, ops)
    }

    fn watch(&self, start: &[u8], end: &[u8], from: Rev) -> Result<Watch, KvError> {
        self.inner.watch(start, end, from)
    }

    fn leases(&self) -> Option<&dyn Leases> {
        self.inner.leases()
    }
}
