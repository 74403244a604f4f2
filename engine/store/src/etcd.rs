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

use crate::kv::{Change, Entry, Guard, Kv, KvError, Leases, Op, Rev, Watch, prefix_end};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions,
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
        let client = wait(&runtime, CALL_TIMEOUT, async move {
            Client::connect(u, Some(options)).await
        })
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
        self.call_within(CALL_TIMEOUT, f)
    }

    /// Runs `f` on the backend's runtime and waits at most `within` for it.
    fn call_within<T: Send + 'static>(
        &self,
        within: Duration,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, KvError> {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or_else(|| KvError::Unavailable("the etcd client is closed".into()))?;
        wait(runtime, within, f)?.map_err(|e| {
            KvError::Unavailable(format!("etcd at {} failed: {e}", self.endpoints.join(",")))
        })
    }
}

/// Runs `f` on `runtime` and waits, from any thread, at most `within` (and a little) for
/// its answer.
fn wait<T: Send + 'static>(
    runtime: &tokio::runtime::Runtime,
    within: Duration,
    f: impl Future<Output = T> + Send + 'static,
) -> Result<T, KvError> {
    let (tx, rx) = mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(tokio::time::timeout(within, f).await);
    });
    match rx.recv_timeout(within + Duration::from_millis(100)) {
        Ok(Ok(v)) => Ok(v),
        _ => Err(KvError::Unavailable(format!(
            "etcd did not answer within {} ms",
            within.as_millis()
        ))),
    }
}

impl Leases for EtcdKv {
    fn grant(&self, ttl: Duration, within: Duration) -> Result<i64, KvError> {
        let mut c = self.client.lease_client();
        let secs = ttl.as_secs().max(1) as i64;
        let r = self.call_within(within, async move { c.grant(secs, None).await })?;
        Ok(r.id())
    }

    fn renew(&self, lease: i64, within: Duration) -> Result<i64, KvError> {
        let mut c = self.client.lease_client();
        self.call_within(within, async move {
            let (mut keeper, mut answers) = c.keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(answers.message().await?.map(|m| m.ttl()).unwrap_or(0))
        })
    }

    fn revoke(&self, lease: i64, within: Duration) -> Result<(), KvError> {
        let mut c = self.client.lease_client();
        self.call_within(within, async move { c.revoke(lease).await.map(|_| ()) })
    }

    fn claim(
        &self,
        key: &[u8],
        value: &[u8],
        lease: i64,
        within: Duration,
    ) -> Result<(bool, Option<Entry>), KvError> {
        let k = self.ns(key);
        let txn = Txn::new()
            .when([Compare::version(k.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    k.clone(),
                    value.to_vec(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::get(k.clone(), None),
            ])
            .or_else([TxnOp::get(k, None)]);
        let mut c = self.client.kv_client();
        let r = self.call_within(within, async move { c.txn(txn).await })?;
        let now = r.op_responses().into_iter().find_map(|o| match o {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|k| entry(self, k))),
            _ => None,
        });
        Ok((r.succeeded(), now.flatten()))
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

    fn leases(&self) -> Option<&dyn Leases> {
        Some(self)
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
    cluster: LocalCluster,
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
        let cluster = LocalCluster::start_named(dir, &[name])?;
        let endpoint = cluster.endpoints()[0].clone();
        Ok(LocalMember { cluster, endpoint })
    }

    /// The member's directory (its log is `etcd.log` there).
    pub fn dir(&self) -> &std::path::Path {
        &self.cluster.dir
    }
}

/// A cluster of etcd members on loopback, for tests that kill and restart members.
pub struct LocalCluster {
    dir: std::path::PathBuf,
    names: Vec<String>,
    ports: Vec<(u16, u16)>,
    children: Vec<Option<std::process::Child>>,
}

impl LocalCluster {
    /// Starts `n` members under `dir` and waits at most 30 s until every one answers.
    pub fn start(dir: &std::path::Path, n: usize) -> Result<LocalCluster, String> {
        let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        Self::start_named(dir, &refs)
    }

    fn start_named(dir: &std::path::Path, names: &[&str]) -> Result<LocalCluster, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut ports = Vec::new();
        for _ in names {
            ports.push((free_port()?, free_port()?));
        }
        let mut cluster = LocalCluster {
            dir: dir.to_path_buf(),
            names: names.iter().map(|n| n.to_string()).collect(),
            ports,
            children: names.iter().map(|_| None).collect(),
        };
        for i in 0..names.len() {
            cluster.spawn(i, "new")?;
        }
        for i in 0..names.len() {
            cluster.wait_for(i)?;
        }
        Ok(cluster)
    }

    /// Every member's client endpoint, `127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|(c, _)| format!("127.0.0.1:{c}"))
            .collect()
    }

    fn spawn(&mut self, i: usize, state: &str) -> Result<(), String> {
        let name = &self.names[i];
        let member_dir = self.dir.join(name);
        std::fs::create_dir_all(&member_dir)
            .map_err(|e| format!("{}: {e}", member_dir.display()))?;
        let initial: Vec<String> = self
            .names
            .iter()
            .zip(&self.ports)
            .map(|(n, (_, p))| format!("{n}=http://127.0.0.1:{p}"))
            .collect();
        let (client, peer) = self.ports[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(member_dir.join("etcd.log"))
            .map_err(|e| format!("{}: {e}", member_dir.display()))?;
        let child = std::process::Command::new("etcd")
            .arg(format!("--name={name}"))
            .arg(format!("--data-dir={}", member_dir.join("data").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-state={state}"))
            .arg("--initial-cluster-token=mint-test")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!("cannot run etcd ({e}); `cargo xtask setup` installs Debian's etcd-server")
            })?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn wait_for(&self, i: usize) -> Result<(), String> {
        let endpoint = format!("127.0.0.1:{}", self.ports[i].0);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if EtcdKv::connect(std::slice::from_ref(&endpoint), "/").is_ok() {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!(
                    "etcd did not answer at {endpoint} within 30 s: {}",
                    std::fs::read_to_string(self.dir.join(&self.names[i]).join("etcd.log"))
                        .unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills member `i` (SIGKILL, as a crash).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data, and waits at most 30 s until it answers.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.kill(i);
        self.spawn(i, "existing")?;
        self.wait_for(i)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
