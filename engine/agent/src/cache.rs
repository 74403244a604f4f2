//! The node's cache of masters by digest, so a node fetches each master once however many
//! deployments, replacements and rolls it sees.
//!
//! A tree master is kept unpacked (`<dir>/<hex>/`, the lower directory of instance roots),
//! a disk master as its file (`<dir>/<hex>.blob`). Every blob is downloaded to
//! `<dir>/partial/<hex>`, resumed with `Range` after a cut, and checked against its digest
//! before it is used. The cache is bounded in bytes: the least recently used masters no
//! deployment holds go first. `<dir>/<hex>.meta` records each entry's size and last use,
//! so a restarted agent knows its cache without walking it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a download keeps trying (and resuming): the engine may be restarting, and the
/// driver's deploy timeout, not a cut connection, decides when a deployment has failed.
pub const FETCH_PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum Form {
    Tree,
    File,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    form: Form,
    size: u64,
    used_ms: u64,
}

/// The cache.
pub struct Cache {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    /// One download at a time: a second deployment wanting the same master waits for the
    /// first to finish it instead of fetching it twice.
    fetching: Mutex<()>,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<String, Meta>,
    held: HashMap<String, usize>,
}

/// A master held for a deployment: it is not evicted while a lease on it lives.
pub struct Lease {
    cache: Arc<Cache>,
    hex: String,
    /// Where the master is: its unpacked tree or its file.
    pub path: PathBuf,
    /// Bytes downloaded to get it (0 when it was cached).
    pub fetched: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut inner = self.cache.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = inner.held.get_mut(&self.hex) {
            *n -= 1;
            if *n == 0 {
                inner.held.remove(&self.hex);
            }
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The hex of a `sha256:<hex>` digest, refusing anything else (it names files).
fn hex_of(digest: &str) -> Result<String, String> {
    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(format!("`{digest}` is not a sha256 digest"))
    }
}

/// Disk use of a tree, in bytes of its files.
fn tree_size(p: &Path) -> u64 {
    let Ok(m) = p.symlink_metadata() else {
        return 0;
    };
    if !m.is_dir() {
        return m.len();
    }
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| tree_size(&e.path()))
        .sum::<u64>()
        + 4096
}

/// How a blob is fetched: GET `url`, from byte `from` on (`Range`) when it is not 0.
pub type Get<'a> = &'a dyn Fn(&str, u64) -> Result<ureq::Response, ureq::Error>;

impl Cache {
    /// The cache in `dir` (created), bounded to `max_bytes`.
    pub fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Arc<Cache>> {
        std::fs::create_dir_all(dir.join("partial"))?;
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(hex) = name.strip_suffix(".meta")
                && let Ok(text) = std::fs::read(e.path())
                && let Ok(meta) = serde_json::from_slice::<Meta>(&text)
            {
                entries.insert(hex.to_string(), meta);
            } else if name.starts_with(".unpack-") {
                // An unpack cut short by a restart.
                let _ = mint_layers::remove_any(&e.path());
            }
        }
        // An entry without its meta was never finished; one whose files are gone is dropped.
        entries.retain(|hex, m| match m.form {
            Form::Tree => dir.join(hex).is_dir(),
            Form::File => dir.join(format!("{hex}.blob")).is_file(),
        });
        Ok(Arc::new(Cache {
            dir: dir.to_path_buf(),
            max_bytes,
            inner: Mutex::new(Inner {
                entries,
                held: HashMap::new(),
            }),
            fetching: Mutex::new(()),
        }))
    }

    /// The digests of the masters cached, for heartbeats.
    pub fn digests(&self) -> Vec<String> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .keys()
            .map(|h| format!("sha256:{h}"))
            .collect()
    }

    /// Bytes held in all.
    pub fn bytes(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .values()
            .map(|m| m.size)
            .sum()
    }

    fn path(&self, hex: &str, form: Form) -> PathBuf {
        match form {
            Form::Tree => self.dir.join(hex),
            Form::File => self.dir.join(format!("{hex}.blob")),
        }
    }

    /// Holds the entry `hex` if it is cached, marking it used.
    fn hold(self: &Arc<Self>, hex: &str, form: Form) -> Option<Lease> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let meta = inner.entries.get_mut(hex).filter(|m| m.form == form)?;
        meta.used_ms = now_ms();
        let meta = meta.clone();
        *inner.held.entry(hex.to_string()).or_default() += 1;
        drop(inner);
        let _ = std::fs::write(
            self.dir.join(format!("{hex}.meta")),
            serde_json::to_vec(&meta).unwrap_or_default(),
        );
        Some(Lease {
            cache: self.clone(),
            hex: hex.to_string(),
            path: self.path(hex, form),
            fetched: 0,
        })
    }

    /// Holds a master already cached, after an agent restart (the deployment that used it
    /// still runs).
    pub fn hold_cached(self: &Arc<Self>, digest: &str) -> Option<Lease> {
        let hex = hex_of(digest).ok()?;
        self.hold(&hex, Form::Tree)
            .or_else(|| self.hold(&hex, Form::File))
    }

    /// The unpacked tree of tree master `digest`, fetched from `url` when not cached.
    /// Returns the lease and warnings (special files the agent may not create).
    pub fn tree(
        self: &Arc<Self>,
        digest: &str,
        url: &str,
        get: Get<'_>,
    ) -> Result<(Lease, Vec<String>), String> {
        let hex = hex_of(digest)?;
        let _one = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = self.hold(&hex, Form::Tree) {
            return Ok((l, Vec::new()));
        }
        let (blob, fetched) = self.download(&hex, url, get)?;
        let staging = self.dir.join(format!(".unpack-{hex}"));
        let _ = mint_layers::remove_any(&staging);
        let file = std::fs::File::open(&blob)
            .map_err(|e| format!("cannot open {}: {e}", blob.display()))?;
        let unpacked = mint_layers::unpack(
            std::io::BufReader::new(file),
            &staging,
            mint_layers::Whiteouts::Keep,
        )
        .map_err(|e| format!("unpacking the master {digest}: {e}"));
        let _ = std::fs::remove_file(&blob);
        let unpacked = match unpacked {
            Ok(u) => u,
            Err(e) => {
                let _ = mint_layers::remove_any(&staging);
                return Err(e);
            }
        };
        let at = self.path(&hex, Form::Tree);
        let _ = mint_layers::remove_any(&at);
        std::fs::rename(&staging, &at)
            .map_err(|e| format!("cannot keep the master in the cache: {e}"))?;
        let mut lease = self.admit(&hex, Form::Tree, tree_size(&at));
        lease.fetched = fetched;
        Ok((lease, unpacked.warnings))
    }

    /// The file of disk master `digest`, fetched from `url` when not cached.
    pub fn file(self: &Arc<Self>, digest: &str, url: &str, get: Get<'_>) -> Result<Lease, String> {
        let hex = hex_of(digest)?;
        let _one = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = self.hold(&hex, Form::File) {
            return Ok(l);
        }
        let (blob, fetched) = self.download(&hex, url, get)?;
        let at = self.path(&hex, Form::File);
        std::fs::rename(&blob, &at)
            .map_err(|e| format!("cannot keep the master in the cache: {e}"))?;
        let size = std::fs::metadata(&at).map(|m| m.len()).unwrap_or(0);
        let mut lease = self.admit(&hex, Form::File, size);
        lease.fetched = fetched;
        Ok(lease)
    }

    /// Records a new entry, held, and evicts what the bound no longer allows.
    fn admit(self: &Arc<Self>, hex: &str, form: Form, size: u64) -> Lease {
        let meta = Meta {
            form,
            size,
            used_ms: now_ms(),
        };
        let _ = std::fs::write(
            self.dir.join(format!("{hex}.meta")),
            serde_json::to_vec(&meta).unwrap_or_default(),
        );
        {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.entries.insert(hex.to_string(), meta);
            *inner.held.entry(hex.to_string()).or_default() += 1;
        }
        self.evict();
        Lease {
            cache: self.clone(),
            hex: hex.to_string(),
            path: self.path(hex, form),
            fetched: 0,
        }
    }

    /// Removes the least recently used entries no lease holds until the cache fits its
    /// bound (a held master is never removed, even if that leaves the cache over it).
    pub fn evict(&self) -> Vec<String> {
        let mut gone = Vec::new();
        loop {
            let victim = {
                let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
                let total: u64 = inner.entries.values().map(|m| m.size).sum();
                if total <= self.max_bytes {
                    break;
                }
                let held = inner.held.clone();
                let Some((hex, meta)) = inner
                    .entries
                    .iter()
                    .filter(|(h, _)| !held.contains_key(*h))
                    .min_by_key(|(_, m)| m.used_ms)
                    .map(|(h, m)| (h.clone(), m.clone()))
                else {
                    break;
                };
                inner.entries.remove(&hex);
                (hex, meta)
            };
            let (hex, meta) = victim;
            let _ = std::fs::remove_file(self.dir.join(format!("{hex}.meta")));
            let _ = mint_layers::remove_any(&self.path(&hex, meta.form));
            tracing::info!(
                "cache: evicted sha256:{hex} ({} bytes) to stay within {} bytes",
                meta.size,
                self.max_bytes
            );
            gone.push(hex);
        }
        gone
    }

    /// Downloads blob `hex` from `url` to `partial/<hex>`, resuming what an earlier
    /// attempt left, and checks its digest. Returns the file and the bytes fetched now.
    fn download(&self, hex: &str, url: &str, get: Get<'_>) -> Result<(PathBuf, u64), String> {
        download(&self.dir.join("partial").join(hex), hex, url, get)
    }
}

/// Downloads `url` to `to`, resuming from what `to` holds already (`Range`), retrying while
/// the server cannot be reached, answers 5xx or the stream is cut, for at most
/// [`FETCH_PATIENCE`]; the result must hash to `hex` or it is removed and refused. Returns
/// the path and the bytes fetched.
pub fn download(to: &Path, hex: &str, url: &str, get: Get<'_>) -> Result<(PathBuf, u64), String> {
    let deadline = Instant::now() + FETCH_PATIENCE;
    let mut fetched = 0u64;
    let mut last_error;
    loop {
        let have = std::fs::metadata(to).map(|m| m.len()).unwrap_or(0);
        match get(url, have) {
            Ok(resp) => {
                let resumed = resp.status() == 206;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(resumed)
                    .write(true)
                    .truncate(!resumed)
                    .open(to)
                    .map_err(|e| format!("cannot write {}: {e}", to.display()))?;
                let mut reader = resp.into_reader();
                let mut buf = vec![0u8; 1 << 16];
                let cut = loop {
                    match reader.read(&mut buf) {
                        Ok(0) => break None,
                        Ok(n) => {
                            file.write_all(&buf[..n])
                                .map_err(|e| format!("writing {}: {e}", to.display()))?;
                            fetched += n as u64;
                        }
                        Err(e) => break Some(e),
                    }
                };
                drop(file);
                match cut {
                    None => break,
                    Some(e) => last_error = format!("the download was cut: {e}"),
                }
            }
            // Everything is here already: the range starts at the end.
            Err(ureq::Error::Status(416, _)) if have > 0 => break,
            Err(ureq::Error::Status(code, r)) if code < 500 => {
                let body = r.into_string().unwrap_or_default();
                let _ = std::fs::remove_file(to);
                return Err(format!("GET {url}: {code} {}", body.trim()));
            }
            Err(e) => last_error = format!("GET {url}: {e}"),
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "{last_error}; gave up after {}s (it resumes from byte {} next time)",
                FETCH_PATIENCE.as_secs(),
                std::fs::metadata(to).map(|m| m.len()).unwrap_or(0)
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let got = hash_file(to)?;
    if got != hex {
        let _ = std::fs::remove_file(to);
        return Err(format!(
            "the blob's digest is sha256:{got}, not the sha256:{hex} the engine announced; refusing it"
        ));
    }
    Ok((to.to_path_buf(), fetched))
}

fn hash_file(p: &Path) -> Result<String, String> {
    let mut f = std::fs::File::open(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    f.rewind().map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit_sized(cache: &Arc<Cache>, n: u8, size: usize) -> Lease {
        let hex = format!("{:064x}", n);
        std::fs::create_dir_all(cache.dir.join(&hex)).unwrap();
        std::fs::write(cache.dir.join(&hex).join("f"), vec![0u8; size]).unwrap();
        cache.admit(&hex, Form::Tree, size as u64)
    }

    #[test]
    fn the_least_recently_used_unheld_master_goes_first() {
        let dir = std::env::temp_dir().join(format!("mint-agent-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cache = Cache::open(&dir, 3000).unwrap();
        let a = admit_sized(&cache, 1, 1000);
        std::thread::sleep(Duration::from_millis(5));
        let b = admit_sized(&cache, 2, 1000);
        std::thread::sleep(Duration::from_millis(5));
        drop(a);
        drop(b);
        // `a` was used again after `b`, so `b` is the least recently used now.
        let a = cache.hold_cached(&format!("sha256:{:064x}", 1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let c = admit_sized(&cache, 3, 1500);
        let have = cache.digests();
        assert_eq!(have.len(), 2, "{have:?}");
        assert!(
            !have.iter().any(|d| d.ends_with(&format!("{:064x}", 2))),
            "b went: {have:?}"
        );
        assert!(!dir.join(format!("{:064x}", 2)).exists());
        // Everything held: nothing can go, even over the bound.
        let d = admit_sized(&cache, 4, 2000);
        assert_eq!(cache.digests().len(), 3);
        assert!(cache.bytes() > 3000);
        drop((a, c, d));
        // A restarted agent knows its cache from the meta files.
        let again = Cache::open(&dir, 3000).unwrap();
        assert_eq!(again.digests().len(), 3);
        again.evict();
        assert!(again.bytes() <= 3000, "{}", again.bytes());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A server on loopback that answers its first request with half of `body` (and a
    /// length promising all of it) and then hangs up, and every later one as asked:
    /// whole, or from the byte a `Range: bytes=N-` names. Returns its URL and the `Range`
    /// headers it saw.
    fn cutting_server(body: Vec<u8>) -> (String, Arc<Mutex<Vec<Option<String>>>>) {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/blob", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (n, conn) in listener.incoming().take(3).enumerate() {
                let Ok(mut conn) = conn else { return };
                let mut range = None;
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range:") {
                        range = Some(v.trim().to_string());
                    }
                }
                log.lock().unwrap().push(range.clone());
                let from: usize = range
                    .as_deref()
                    .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
                    .unwrap_or(0);
                let rest = &body[from..];
                let head = if from > 0 {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                        rest.len(),
                        body.len() - 1,
                        body.len()
                    )
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        rest.len()
                    )
                };
                let _ = conn.write_all(head.as_bytes());
                let sent = if n == 0 {
                    &rest[..rest.len() / 2]
                } else {
                    rest
                };
                let _ = conn.write_all(sent);
            }
        });
        (url, seen)
    }

    #[test]
    fn a_cut_download_resumes_from_where_it_stopped() {
        let body: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let hex = hex::encode(Sha256::digest(&body));
        let (url, seen) = cutting_server(body.clone());
        let dir = std::env::temp_dir().join(format!("mint-agent-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let http = ureq::AgentBuilder::new().build();
        let get = |url: &str, from: u64| {
            let r = http.get(url).timeout(Duration::from_secs(10));
            if from > 0 {
                r.set("Range", &format!("bytes={from}-")).call()
            } else {
                r.call()
            }
        };
        let (path, fetched) = download(&dir.join("blob"), &hex, &url, &get).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), body);
        assert_eq!(
            fetched,
            body.len() as u64,
            "each byte fetched once: the second request asked only for the rest"
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, vec![None, Some(format!("bytes={}-", body.len() / 2))]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
