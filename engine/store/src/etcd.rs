//! The distributed backend: the key-value interface over an etcd cluster (v3 API), for
//! sites where one machine's embedded database is not enough.
//!
//! Every key lives under a namespace (`/mint/` unless told), so one etcd can serve other
//! users too. Guards become the transaction's compares (`version = 0` for an absent key,
//! `mod_revision` and `create_revision` for the others), and the store's revisions are
//! etcd's own. etcd refuses a transaction with more than 128 compares or operations
//! (`--max-txn-ops`) or a request over 1.5 MiB; such a commit is refused here, before it is
//! sent, with [`KvError::TooLarge`], so callers split their work into batches.
//!
//! The store is synchronous and etcd's client is not: calls run on a small runtime owned
//! by this backend, and the caller's thread waits for the answer, as it waits for a disk
//! with sled, so the backend can be called from any thread, inside a runtime or not.

use crate::kv::{Change, Entry, Guard, Kv, KvError, Op, Rev, Watch, prefix_end};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions,
};
use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

/// How many compares, and how many operations, etcd takes in one transaction by default.
pub const MAX_TXN_OPS: usize = 128;
/// The largest request etcd takes by default (1.5 MiB), less room for the envelope.
pub const MAX_REQUEST_BYTES: usize = 1536 * 1024 - 16 * 1024;
/// How long one call waits for etcd before it reports it unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How many keys one page of a range reads: a page stays well under the client's 4 MiB
/// message limit for records of a few KiB.
const PAGE: i64 = 500;

/// A connection to an etcd cluster, with the namespace mint's keys live under.
pub struct EtcdKv {
    client: Client,
    endpoints: Vec<String>,
    namespace: Vec<u8>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl EtcdKv {
    /// Connects to the cluster at `endpoints` (`HOST:PORT` or `http://HOST:PORT`), keeping
    /// every key under `namespace`.
    pub fn connect(endpoints: &[String], namespace: &str) -> Result<EtcdKv, KvError> {
        if endpoints.is_empty() {
            return Err(KvError::Unavailable(
                "no etcd endpoint given; name at least one HOST:PORT".into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("mint-etcd")
            .enable_all()
            .build()
            .map_err(|e| {
                KvError::Unavailable(format!("cannot start the etcd client's runtime: {e}"))
            })?;
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let u = urls.clone();
        let client = wait(
            &runtime,
            async move { Client::connect(u, Some(options)).await },
        )
        .and_then(|r| r.map_err(|e| KvError::Unavailable(e.to_string())))
        .map_err(|e| {
            KvError::Unavailable(format!("cannot reach etcd at {}: {e}", urls.join(",")))
        })?;
        let kv = EtcdKv {
            client,
            endpoints: urls,
            namespace: namespace.as_bytes().to_vec(),
            runtime: Some(runtime),
        };
        // The connection is lazy; one read proves the cluster answers.
        kv.get(b"meta/ping")?;
        Ok(kv)
    }

    fn ns(&self, key: &[u8]) -> Vec<u8> {
        let mut k = self.namespace.clone();
        k.extend_from_slice(key);
        k
    }

    /// A range's end inside the namespace: an empty `end` is the namespace's end.
    fn ns_end(&self, end: &[u8]) -> Vec<u8> {
        if end.is_empty() {
            match prefix_end(&self.namespace) {
                e if e.is_empty() => vec![0],
                e => e,
            }
        } else {
            self.ns(end)
        }
    }

    fn strip(&self, key: &[u8]) -> Vec<u8> {
        key.strip_prefix(self.namespace.as_slice())
            .unwrap_or(key)
            .to_vec()
    }

    /// Runs `f` on the backend's runtime and waits for it.
    fn call<T: Send + 'static>(
        &self,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, KvError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| KvError::Unavailable("the etcd client is closed".into()))?;
        wait(runtime, f)?.map_err(|e| {
            KvError::Unavailable(format!("etcd at {} failed: {e}", self.endpoints.join(",")))
        })
    }
}

/// Runs `f` on `runtime` and waits, from any thread, at most [`CALL_TIMEOUT`] (and a
/// little) for its answer.
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> Result<T, KvError> {
    let (tx, rx) = mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(tokio::time::timeout(CALL_TIMEOUT, f).await);
    });
    match rx.recv_timeout(CALL_TIMEOUT + Duration::from_secs(1)) {
        Ok(Ok(v)) => Ok(v),
        _ => Err(KvError::Unavailable(format!(
            "etcd did not answer within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

impl Drop for EtcdKv {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused inside another runtime; the store may
        // be dropped anywhere, so the runtime is let go of without waiting.
        if let Some(r) = self.runtime.take() {
            r.shutdown_background();
        }
    }
}

fn entry(kv: &EtcdKv, k: &etcd_client::KeyValue) -> Entry {
    Entry {
        key: kv.strip(k.key()),
        value: k.value().to_vec(),
        create_rev: k.create_revision() as Rev,
        mod_rev: k.mod_revision() as Rev,
    }
}

impl Kv for EtcdKv {
    fn describe(&self) -> String {
        format!(
            "etcd://{}",
            self.endpoints
                .iter()
                .map(|e| e.trim_start_matches("http://"))
                .collect::<Vec<_>>()
                .join(",")
        )
    }

    fn max_ops(&self) -> usize {
        MAX_TXN_OPS
    }

    fn get(&self, key: &[u8]) -> Result<Option<Entry>, KvError> {
        let mut c = self.client.kv_client();
        let k = self.ns(key);
        let r = self.call(async move { c.get(k, None).await })?;
        Ok(r.kvs().first().map(|kv| entry(self, kv)))
    }

    fn range(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
        at: Option<Rev>,
    ) -> Result<(Vec<Entry>, Rev), KvError> {
        let end = self.ns_end(end);
        let mut from = self.ns(start);
        let mut rev = at.unwrap_or(0) as i64;
        let mut out = Vec::new();
        loop {
            let want = (limit - out.len()).min(PAGE as usize) as i64;
            if want == 0 {
                break;
            }
            let mut c = self.client.kv_client();
            let (f, e) = (from.clone(), end.clone());
            // Every page after the first reads at the first page's revision, so the whole
            // range is one revision however many pages it takes.
            let options = GetOptions::new()
                .with_range(e)
                .with_limit(want)
                .with_revision(rev);
            let r = self
                .call(async move { c.get(f, Some(options)).await })
                .map_err(|e| match e {
                    KvError::Unavailable(m) if m.contains("compacted") => KvError::Compacted {
                        asked: rev as Rev,
                        oldest: 0,
                    },
                    e => e,
                })?;
            if rev == 0 {
                rev = r.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in r.kvs() {
                out.push(entry(self, kv));
            }
            match r.kvs().last() {
                Some(last) if r.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok((out, rev as Rev))
    }

    fn commit(&self, guards: &[Guard], ops: &[Op]) -> Result<Rev, KvError> {
        let bytes: usize = ops
            .iter()
            .map(|o| match o {
                Op::Put(k, v) => k.len() + v.len() + self.namespace.len() + 8,
                Op::Delete(k) => k.len() + self.namespace.len() + 8,
            })
            .sum::<usize>()
            + guards.len() * 64;
        if guards.len() > MAX_TXN_OPS || ops.len() > MAX_TXN_OPS || bytes > MAX_REQUEST_BYTES {
            return Err(KvError::TooLarge(format!(
                "a commit of {} guards, {} writes and about {} KiB is over etcd's limits ({MAX_TXN_OPS} of each, 1.5 MiB)",
                guards.len(),
                ops.len(),
                bytes / 1024
            )));
        }
        let compares: Vec<Compare> = guards
            .iter()
            .map(|g| match g {
                Guard::Absent(k) => Compare::version(self.ns(k), CompareOp::Equal, 0),
                Guard::ModRev(k, r) => {
                    Compare::mod_revision(self.ns(k), CompareOp::Equal, *r as i64)
                }
                Guard::CreateRev(k, r) => {
                    Compare::create_revision(self.ns(k), CompareOp::Equal, *r as i64)
                }
            })
            .collect();
        let writes: Vec<TxnOp> = ops
            .iter()
            .map(|o| match o {
                Op::Put(k, v) => TxnOp::put(self.ns(k), v.clone(), None),
                Op::Delete(k) => TxnOp::delete(self.ns(k), None),
            })
            .collect();
        let mut c = self.client.kv_client();
        let txn = Txn::new().when(compares).and_then(writes);
        let r = self.call(async move { c.txn(txn).await })?;
        if !r.succeeded() {
            return Err(KvError::Conflict);
        }
        Ok(r.header().map(|h| h.revision()).unwrap_or(0) as Rev)
    }

    fn watch(&self, start: &[u8], end: &[u8], from: Rev) -> Result<Watch, KvError> {
        let mut c = self.client.watch_client();
        let (key, end) = (self.ns(start), self.ns_end(end));
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(from as i64)
            .with_prev_key();
        let mut stream = self.call(async move { c.watch(key, Some(options)).await })?;
        // The first answer says whether the watch began or its revision is compacted away.
        let first = self.call(async move {
            let m = stream.message().await;
            m.map(|m| (m, stream))
        })?;
        let (first, mut stream) = first;
        if let Some(m) = &first
            && m.canceled()
        {
            return Err(match m.compact_revision() {
                r if r > 0 => KvError::Compacted {
                    asked: from,
                    oldest: r as Rev,
                },
                _ => KvError::Unavailable(format!("etcd refused the watch: {}", m.cancel_reason())),
            });
        }
        let (tx, rx) = mpsc::channel();
        let namespace = self.namespace.clone();
        let forward = move |m: &etcd_client::WatchResponse| -> bool {
            for e in m.events() {
                let Some(kv) = e.kv() else { continue };
                let key = kv
                    .key()
                    .strip_prefix(namespace.as_slice())
                    .unwrap_or(kv.key())
                    .to_vec();
                let value = match e.event_type() {
                    EventType::Put => Some(kv.value().to_vec()),
                    EventType::Delete => None,
                };
                if tx
                    .send(Change {
                        rev: kv.mod_revision() as Rev,
                        key,
                        value,
                    })
                    .is_err()
                {
                    return false;
                }
            }
            !m.canceled()
        };
        if let Some(m) = &first
            && !forward(m)
        {
            return Ok(Watch::from_receiver(rx));
        }
        if let Some(runtime) = &self.runtime {
            runtime.spawn(async move {
                // Ends when the receiver is dropped (the next send fails) or etcd ends
                // the watch; the receiver then sees the channel closed.
                while let Ok(Some(m)) = stream.message().await {
                    if !forward(&m) {
                        break;
                    }
                }
            });
        }
        Ok(Watch::from_receiver(rx))
    }
}

/// An etcd member alone in its cluster on loopback, started from Debian's `etcd-server`
/// for tests and benchmarks: its own data directory, free ports, stopped and its directory
/// removed on drop.
pub struct LocalMember {
    child: std::process::Child,
    dir: std::path::PathBuf,
    /// Its client endpoint, `127.0.0.1:PORT`.
    pub endpoint: String,
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

impl LocalMember {
    /// Starts member `name` with its data under `dir` (created, and removed on drop), and
    /// waits at most 30 s until it answers.
    pub fn start(dir: &std::path::Path, name: &str) -> Result<LocalMember, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (client, peer) = (free_port()?, free_port()?);
        let log = std::fs::File::create(dir.join("etcd.log"))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let child = std::process::Command::new("etcd")
            .arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster={name}=http://127.0.0.1:{peer}"))
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot run etcd ({e}); `cargo xtask setup` installs Debian's etcd-server")
            })?;
        let member = LocalMember {
            child,
            dir: dir.to_path_buf(),
            endpoint: format!("127.0.0.1:{client}"),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if EtcdKv::connect(std::slice::from_ref(&member.endpoint), "/").is_ok() {
                return Ok(member);
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "etcd did not answer at {} within 30 s: {}",
                    member.endpoint,
                    std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LocalMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
