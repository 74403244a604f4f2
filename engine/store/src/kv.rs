//! The small key-value interface the store's transactions are written over, and its
//! embedded backend on sled.
//!
//! The interface is etcd's model, cut down to what the store needs: every commit gets the
//! next revision of the whole key space; every key remembers the revision that created it
//! and the one that last changed it; a commit applies its puts and deletes only if all of
//! its guards hold, and otherwise changes nothing. A store transaction reads through
//! [`Kv::get`] and [`Kv::range`], and commits with a guard on every key it read, so two
//! writers that raced each other cannot both land (optimistic concurrency, as etcd's
//! software transactional memory does it).
//!
//! Architecture invariant: nothing above this module depends on how a backend stores
//! revisions; only what [`Kv`] promises.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Mutex, RwLock, mpsc};

/// A revision of the whole key space: every commit makes the next one.
pub type Rev = u64;

/// One key's value with its revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: Vec<u8>,
    /// Its value.
    pub value: Vec<u8>,
    /// The revision of the commit that created the key (since it last did not exist).
    pub create_rev: Rev,
    /// The revision of the commit that last wrote it.
    pub mod_rev: Rev,
}

/// A condition a commit checks before it writes anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Guard {
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key exists and was last written at this revision.
    ModRev(Vec<u8>, Rev),
    /// The key exists and was created at this revision (a leader's fencing token).
    CreateRev(Vec<u8>, Rev),
}

/// A change a commit makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets a key's value.
    Put(Vec<u8>, Vec<u8>),
    /// Removes a key (nothing if it does not exist).
    Delete(Vec<u8>),
}

/// A committed change to one key, as a watch reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The revision of the commit.
    pub rev: Rev,
    /// The key.
    pub key: Vec<u8>,
    /// Its new value, or `None` if the commit deleted it.
    pub value: Option<Vec<u8>>,
}

/// Why a key-value operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// A commit's guard did not hold; nothing was written.
    #[error("a guard of the commit did not hold; nothing was written")]
    Conflict,
    /// A read or watch asked for a revision the backend no longer keeps.
    #[error("revision {asked} is no longer kept (the oldest kept is {oldest})")]
    Compacted {
        /// The revision asked for.
        asked: Rev,
        /// The oldest revision still kept.
        oldest: Rev,
    },
    /// The backend failed or cannot be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A commit is larger than the backend takes in one piece; nothing was written. The
    /// caller splits it into smaller commits.
    #[error("{0}")]
    TooLarge(String),
    /// A stored value does not decode.
    #[error("a stored value does not decode: {0}")]
    Corrupt(String),
}

/// What waiting on a watch found.
#[derive(Debug)]
pub enum Poll {
    /// A committed change.
    Change(Change),
    /// Nothing within the time given.
    Quiet,
    /// The backend ended the watch (it closed, restarted or compacted past it).
    Closed,
}

/// The committed changes under a key range, from the revision a watch started at.
pub struct Watch {
    rx: mpsc::Receiver<Change>,
}

impl Watch {
    /// A watch fed by a backend through `rx`.
    pub(crate) fn from_receiver(rx: mpsc::Receiver<Change>) -> Self {
        Watch { rx }
    }

    /// The next change, waiting at most `timeout`; `None` if none came or the backend
    /// closed the watch.
    pub fn next(&self, timeout: std::time::Duration) -> Option<Change> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// The next change, waiting at most `timeout`, telling a quiet watch from one that
    /// ended.
    pub fn poll(&self, timeout: std::time::Duration) -> Poll {
        match self.rx.recv_timeout(timeout) {
            Ok(c) => Poll::Change(c),
            Err(mpsc::RecvTimeoutError::Timeout) => Poll::Quiet,
            Err(mpsc::RecvTimeoutError::Disconnected) => Poll::Closed,
        }
    }
}

/// A key-value store with revisions and guarded commits. Implemented by sled (embedded)
/// and etcd.
pub trait Kv: Send + Sync {
    /// Where the store is, for error messages (a path or endpoints; never a credential).
    fn describe(&self) -> String;
    /// The most guards, and the most writes, one commit may have.
    fn max_ops(&self) -> usize {
        usize::MAX
    }
    /// One key, as of now.
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, KvError>;
    /// The keys in `[start, end)` in key order, at most `limit`, as of revision `at`
    /// (`None`: now), with the revision they were read at. All of them are from one
    /// revision.
    fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at: Option<Rev>,
    ) -> Result<(Vec<Entry>, Rev), KvError>;
    /// Applies `ops` in one commit if every guard holds, durably before it returns, and
    /// returns the commit's revision; otherwise writes nothing and returns
    /// [`KvError::Conflict`].
    fn commit(&self, guards: &[Guard], ops: &[Op]) -> Result<Rev, KvError>;
    /// Every change under `[start, end)` committed at revision `from` or later, as it
    /// commits.
    fn watch(&self, start: &[u8], end: &[u8], from: Rev) -> Result<Watch, KvError>;
    /// Leases, where the backend is shared between processes and so needs a leader; an
    /// embedded backend has one process, which always leads.
    fn leases(&self) -> Option<&dyn Leases> {
        None
    }
}

/// Leases: keys that live only while their holder keeps renewing, for electing one leader
/// among several daemons. Every call waits at most `within`, so a leader's renewal loop
/// can keep its own deadlines while the backend is slow or gone.
pub trait Leases: Send + Sync {
    /// A new lease of `ttl` (whole seconds, as etcd counts them).
    fn grant(&self, ttl: std::time::Duration, within: std::time::Duration) -> Result<i64, KvError>;
    /// Renews `lease`; returns the seconds it has left, 0 when it has already expired.
    fn renew(&self, lease: i64, within: std::time::Duration) -> Result<i64, KvError>;
    /// Ends `lease` now, deleting the keys attached to it.
    fn revoke(&self, lease: i64, within: std::time::Duration) -> Result<(), KvError>;
    /// Puts `key` = `value`, attached to `lease`, if `key` is absent. Returns whether this
    /// call put it, and the key as it is afterwards (whoever holds it).
    fn claim(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        within: std::time::Duration,
    ) -> Result<(bool, Option<Entry>), KvError>;
}

/// Follows the changes under `[start, end)` from revision `from`, on the calling thread,
/// until `apply` or `reload` says to stop (returns `None`) or the backend is dropped. A
/// watch that cannot start or ends (a restart, a compaction) is replaced, after a pause, by
/// `reload` (which reads the range afresh and returns its revision, none if that failed)
/// and a new watch. The
/// strong handle on the backend lives only for each call, so a follower never keeps a
/// dropped store's backend (and a sled directory's lock) alive.
pub(crate) fn follow_changes(
    kv: std::sync::Weak<dyn Kv>,
    (start, end): (&[u8], &[u8]),
    mut from: Rev,
    mut apply: impl FnMut(Option<Change>) -> Option<()>,
    mut reload: impl FnMut(&dyn Kv) -> Option<Option<Rev>>,
) {
    loop {
        let watch = match kv.upgrade() {
            Some(kv) => kv.watch(start, end, from),
            None => return,
        };
        if let Ok(watch) = watch {
            loop {
                let go_on = match watch.poll(std::time::Duration::from_millis(500)) {
                    Poll::Change(c) => apply(Some(c)),
                    // A quiet moment lets `apply` see whether anyone still reads.
                    Poll::Quiet => apply(None),
                    Poll::Closed => break,
                };
                if go_on.is_none() {
                    return;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let Some(kv) = kv.upgrade() else { return };
        match reload(kv.as_ref()) {
            None => return,
            Some(Some(rev)) => from = rev + 1,
            Some(None) => {}
        }
    }
}

/// The end of the range holding every key that starts with `prefix` (etcd's convention:
/// the prefix with its last byte below 0xff incremented; empty for all keys).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// Whether `key` is in `[start, end)`, an empty `end` meaning no upper bound.
fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

/// The key under which the sled backend keeps the current revision. Keys that start with
/// a NUL byte are the backend's own and never listed.
const REV_KEY: &[u8] = b"\0rev";

/// How many changes the sled backend keeps for watches that start in the past.
const HISTORY: usize = 16_384;

/// The embedded backend: one sled tree whose values carry their revisions.
///
/// sled keeps only the latest revision of each key, so a read "at" an older revision is
/// refused ([`KvError::Compacted`]); recent changes are kept in memory for watches. One
/// process owns a sled directory, so commits are serialised by a lock inside this backend,
/// and a range read takes the same lock to see one revision.
pub struct SledKv {
    db: sled::Db,
    tree: sled::Tree,
    path: String,
    /// Held for writing while a commit applies, for reading while a range reads.
    gate: RwLock<()>,
    watchers: Mutex<Watchers>,
}

struct Watchers {
    history: VecDeque<Change>,
    subscribers: Vec<(Vec<u8>, Vec<u8>, mpsc::Sender<Change>)>,
}

/// Values on disk: create revision, mod revision (both big-endian), then the bytes.
fn encode_entry(create_rev: Rev, mod_rev: Rev, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + value.len());
    v.extend_from_slice(&create_rev.to_be_bytes());
    v.extend_from_slice(&mod_rev.to_be_bytes());
    v.extend_from_slice(value);
    v
}

fn decode_entry(key: &[u8], raw: &[u8]) -> Result<Entry, KvError> {
    if raw.len() < 16 {
        return Err(KvError::Corrupt(format!(
            "the value of key {:?} is {} bytes, shorter than its revisions",
            String::from_utf8_lossy(key),
            raw.len()
        )));
    }
    let rev = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or([0; 8]));
    Ok(Entry {
        key: key.to_vec(),
        create_rev: rev(&raw[..8]),
        mod_rev: rev(&raw[8..16]),
        value: raw[16..].to_vec(),
    })
}

impl SledKv {
    /// Opens (or creates) the sled database in `dir`, waiting a bounded time for a
    /// handle closed a moment ago to release the directory's lock.
    pub fn open(dir: &Path) -> Result<SledKv, KvError> {
        let path = dir.display().to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::open(dir) {
                Ok(db) => break db,
                Err(e) if is_lock_held(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) if is_lock_held(&e) => {
                    return Err(KvError::Unavailable("another process (a running mint daemon?) holds this state directory; stop it or choose another --data-dir".into()));
                }
                Err(e) => return Err(KvError::Unavailable(e.to_string())),
            }
        };
        let tree = db
            .open_tree("kv")
            .map_err(|e| KvError::Unavailable(e.to_string()))?;
        Ok(SledKv {
            db,
            tree,
            path,
            gate: RwLock::new(()),
            watchers: Mutex::new(Watchers {
                history: VecDeque::new(),
                subscribers: Vec::new(),
            }),
        })
    }

    /// Whether the database holds the trees of mint's first store layout (one sled tree
    /// per kind of record) with data in them.
    pub fn has_old_layout(&self) -> bool {
        ["tiers", "instances", "nodes", "events"].iter().any(|t| {
            self.db
                .tree_names()
                .iter()
                .any(|n| n.as_ref() == t.as_bytes())
                && self.db.open_tree(t).map(|t| !t.is_empty()).unwrap_or(false)
        })
    }

    /// The records of mint's first store layout, tree by tree (name, then every key and
    /// value in key order), for the store to copy into the key space; empty trees left out.
    pub fn old_layout(&self) -> Result<Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>, KvError> {
        let mut out = Vec::new();
        for name in self.db.tree_names() {
            let name = String::from_utf8_lossy(&name).into_owned();
            if name == "kv" || name.starts_with("__sled") {
                continue;
            }
            let tree = self.db.open_tree(&name).map_err(unavailable)?;
            let entries = tree
                .iter()
                .map(|r| {
                    r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                        .map_err(unavailable)
                })
                .collect::<Result<Vec<_>, _>>()?;
            if !entries.is_empty() {
                out.push((name, entries));
            }
        }
        Ok(out)
    }

    /// Drops the trees of the first layout, once their records are in the key space.
    pub fn drop_old_layout(&self) -> Result<(), KvError> {
        for name in self.db.tree_names() {
            let n = String::from_utf8_lossy(&name).into_owned();
            if n != "kv" && !n.starts_with("__sled") {
                self.db.drop_tree(&name).map_err(unavailable)?;
            }
        }
        self.db.flush().map_err(unavailable)?;
        Ok(())
    }

    fn current(&self) -> Result<Rev, KvError> {
        match self.tree.get(REV_KEY).map_err(unavailable)? {
            Some(b) => Ok(u64::from_be_bytes(b.as_ref().try_into().map_err(|_| {
                KvError::Corrupt("the revision counter is not 8 bytes".into())
            })?)),
            None => Ok(0),
        }
    }

    fn read_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        // The gate guards no data of its own, so a panic while it was held poisons nothing.
        self.gate.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn unavailable(e: sled::Error) -> KvError {
    KvError::Unavailable(e.to_string())
}

/// Whether sled failed to open because another handle holds the directory's lock (sled
/// reports it as an I/O error whose text names the lock).
fn is_lock_held(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock"))
}

impl Kv for SledKv {
    fn describe(&self) -> String {
        self.path.clone()
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>, KvError> {
        let _g = self.read_gate();
        match self.tree.get(key).map_err(unavailable)? {
            Some(raw) if !key.starts_with(b"\0") => decode_entry(key, &raw).map(Some),
            _ => Ok(None),
        }
    }

    fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at: Option<Rev>,
    ) -> Result<(Vec<Entry>, Rev), KvError> {
        let _g = self.read_gate();
        let rev = self.current()?;
        if let Some(asked) = at.filter(|a| *a != rev) {
            return Err(KvError::Compacted { asked, oldest: rev });
        }
        let iter = if end.is_empty() {
            self.tree.range(start.to_vec()..)
        } else {
            self.tree.range(start.to_vec()..end.to_vec())
        };
        let mut out = Vec::new();
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(unavailable)?;
            if k.starts_with(b"\0") {
                continue;
            }
            out.push(decode_entry(&k, &v)?);
        }
        Ok((out, rev))
    }

    fn commit(&self, guards: &[Guard], ops: &[Op]) -> Result<Rev, KvError> {
        let _g = self.gate.write().unwrap_or_else(|p| p.into_inner());
        for g in guards {
            let (key, holds): (&[u8], Box<dyn Fn(Option<&Entry>) -> bool>) = match g {
                Guard::Absent(k) => (k, Box::new(|e: Option<&Entry>| e.is_none())),
                Guard::ModRev(k, r) => (
                    k,
                    Box::new(move |e: Option<&Entry>| e.is_some_and(|e| e.mod_rev == *r)),
                ),
                Guard::CreateRev(k, r) => (
                    k,
                    Box::new(move |e: Option<&Entry>| e.is_some_and(|e| e.create_rev == *r)),
                ),
            };
            let now = match self.tree.get(key).map_err(unavailable)? {
                Some(raw) => Some(decode_entry(key, &raw)?),
                None => None,
            };
            if !holds(now.as_ref()) {
                return Err(KvError::Conflict);
            }
        }
        let rev = self.current()? + 1;
        let mut batch = sled::Batch::default();
        let mut changes = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    let create_rev = match self.tree.get(k).map_err(unavailable)? {
                        Some(raw) => decode_entry(k, &raw)?.create_rev,
                        None => rev,
                    };
                    batch.insert(k.as_slice(), encode_entry(create_rev, rev, v));
                    changes.push(Change {
                        rev,
                        key: k.clone(),
                        value: Some(v.clone()),
                    });
                }
                Op::Delete(k) => {
                    batch.remove(k.as_slice());
                    changes.push(Change {
                        rev,
                        key: k.clone(),
                        value: None,
                    });
                }
            }
        }
        batch.insert(REV_KEY, &rev.to_be_bytes()[..]);
        self.tree.apply_batch(batch).map_err(unavailable)?;
        // An acknowledged change must survive a crash: flush before answering.
        self.db.flush().map_err(unavailable)?;
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.subscribers.retain(|(start, end, tx)| {
            changes
                .iter()
                .filter(|c| in_range(&c.key, start, end))
                .all(|c| tx.send(c.clone()).is_ok())
        });
        w.history.extend(changes);
        while w.history.len() > HISTORY {
            w.history.pop_front();
        }
        Ok(rev)
    }

    fn watch(&self, start: &[u8], end: &[u8], from: Rev) -> Result<Watch, KvError> {
        // Taken before the watchers so that no commit lands between the replay and the
        // subscription (commits take the gate first, then the watchers).
        let _g = self.read_gate();
        let current = self.current()?;
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        let oldest = w.history.front().map(|c| c.rev).unwrap_or(current + 1);
        if from <= current && from < oldest {
            return Err(KvError::Compacted {
                asked: from,
                oldest,
            });
        }
        let (tx, rx) = mpsc::channel();
        for c in w
            .history
            .iter()
            .filter(|c| c.rev >= from && in_range(&c.key, start, end))
        {
            let _ = tx.send(c.clone());
        }
        w.subscribers.push((start.to_vec(), end.to_vec(), tx));
        Ok(Watch::from_receiver(rx))
    }
}

/// What every backend must do with guards, checked the same way on each (sled's unit
/// tests, and the integration tests against a real etcd). Panics on the first difference.
pub mod conformance {
    use super::*;

    /// Absent, mod-revision and create-revision guards on an empty key space: a commit
    /// whose guard fails writes nothing; a key deleted and created again has a new create
    /// revision, so an old fencing token no longer matches it.
    pub fn guards_decide_whether_a_commit_lands(kv: &dyn Kv) {
        let put = |k: &str, v: &str| Op::Put(k.into(), v.into());
        let r1 = kv
            .commit(&[Guard::Absent(b"a".to_vec())], &[put("a", "1")])
            .unwrap();
        assert!(matches!(
            kv.commit(
                &[Guard::Absent(b"a".to_vec())],
                &[put("a", "2"), put("b", "2")]
            ),
            Err(KvError::Conflict)
        ));
        assert_eq!(
            kv.get(b"b").unwrap(),
            None,
            "a refused commit writes nothing"
        );
        let r2 = kv
            .commit(&[Guard::ModRev(b"a".to_vec(), r1)], &[put("a", "3")])
            .unwrap();
        let a = kv.get(b"a").unwrap().unwrap();
        assert_eq!(
            (a.value.as_slice(), a.create_rev, a.mod_rev),
            (&b"3"[..], r1, r2)
        );
        assert!(matches!(
            kv.commit(&[Guard::ModRev(b"a".to_vec(), r1)], &[put("a", "4")]),
            Err(KvError::Conflict)
        ));
        assert!(
            kv.commit(&[Guard::CreateRev(b"a".to_vec(), r1)], &[])
                .is_ok()
        );
        assert!(matches!(
            kv.commit(&[Guard::CreateRev(b"a".to_vec(), r2)], &[]),
            Err(KvError::Conflict)
        ));
        kv.commit(&[], &[Op::Delete(b"a".to_vec())]).unwrap();
        kv.commit(&[], &[put("a", "5")]).unwrap();
        assert!(matches!(
            kv.commit(&[Guard::CreateRev(b"a".to_vec(), r1)], &[]),
            Err(KvError::Conflict)
        ));
        kv.commit(&[], &[Op::Delete(b"a".to_vec()), Op::Delete(b"b".to_vec())])
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("mint-kv-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn guards_decide_whether_a_commit_lands() {
        let dir = scratch("guards");
        conformance::guards_decide_whether_a_commit_lands(&SledKv::open(&dir).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ranges_list_one_revision_and_watches_replay_from_one() {
        let dir = scratch("range");
        let kv = SledKv::open(&dir).unwrap();
        let first = kv
            .commit(
                &[],
                &[
                    Op::Put(b"p/1".to_vec(), b"x".to_vec()),
                    Op::Put(b"q/1".to_vec(), b"y".to_vec()),
                ],
            )
            .unwrap();
        let second = kv
            .commit(&[], &[Op::Put(b"p/2".to_vec(), b"z".to_vec())])
            .unwrap();
        let (all, rev) = kv
            .range(b"p/", &prefix_end(b"p/"), usize::MAX, None)
            .unwrap();
        assert_eq!(rev, second);
        assert_eq!(
            all.iter().map(|e| e.key.as_slice()).collect::<Vec<_>>(),
            [&b"p/1"[..], b"p/2"]
        );
        assert_eq!(
            kv.range(b"", b"", usize::MAX, None).unwrap().0.len(),
            3,
            "the revision key is not listed"
        );
        assert!(matches!(
            kv.range(b"p/", b"p0", 10, Some(first)),
            Err(KvError::Compacted { .. })
        ));
        let w = kv.watch(b"p/", &prefix_end(b"p/"), first).unwrap();
        kv.commit(
            &[],
            &[
                Op::Delete(b"p/1".to_vec()),
                Op::Put(b"q/2".to_vec(), b"w".to_vec()),
            ],
        )
        .unwrap();
        let seen: Vec<(Vec<u8>, bool)> =
            std::iter::from_fn(|| w.next(std::time::Duration::from_millis(200)))
                .map(|c| (c.key, c.value.is_some()))
                .collect();
        assert_eq!(
            seen,
            [
                (b"p/1".to_vec(), true),
                (b"p/2".to_vec(), true),
                (b"p/1".to_vec(), false)
            ]
        );
        drop(kv);
        // Revisions survive a reopen.
        let kv = SledKv::open(&dir).unwrap();
        assert_eq!(kv.range(b"", b"", 0, None).unwrap().1, second + 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn prefix_ends_bound_their_prefix() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"");
    }
}
