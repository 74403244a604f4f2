//! Delivering blobs to many nodes at once: a bound on transfers in flight (more wait their
//! turn, first come first served), an optional bandwidth cap shared chunk by chunk so
//! every transfer gets an equal part of it, a digest check of each blob before it is first
//! served after a start (and by a periodic scrub) that quarantines a corrupt one instead of
//! offering it to every node, and counts of what each blob cost on the wire.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OnceCell, Semaphore};

/// The default bound of blob transfers in flight.
pub const TRANSFERS: usize = 64;

/// The size of the chunks bodies are streamed in (and the cap is shared by).
pub const CHUNK: usize = 1 << 16;

/// What each blob cost on the wire since the daemon started.
#[derive(Debug, Default, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Served {
    /// Requests answered with (part of) its body.
    pub requests: u64,
    /// Body bytes sent.
    pub bytes: u64,
    /// Requests answered 304 (the client's cache had it).
    pub not_modified: u64,
}

/// The delivery state of a daemon.
pub struct Delivery {
    transfers: Mutex<Arc<Semaphore>>,
    bound: std::sync::atomic::AtomicUsize,
    /// Bytes per second all transfers share; 0 for no cap.
    rate: std::sync::atomic::AtomicU64,
    /// Seconds between scrubs.
    scrub_secs: std::sync::atomic::AtomicU64,
    /// When the shared cap next has room: each chunk reserves its share in turn.
    next_free: tokio::sync::Mutex<Instant>,
    checked: Mutex<BTreeMap<String, Arc<OnceCell<Result<(), String>>>>>,
    quarantined: Mutex<HashSet<String>>,
    served: Mutex<BTreeMap<String, Served>>,
    /// Where descriptors send nodes for blobs: a cache's origin, or none for the engine.
    blob_base: Mutex<Option<String>>,
    /// The deploy ISO's digest and size, when one is configured.
    deploy_iso: Mutex<Option<(String, u64)>>,
    /// The pin of the certificate the engine serves, which deploy systems trust.
    engine_pin: Mutex<Option<String>>,
    /// What deploy systems and boot stages reported, by deployment (tier, index, deployment
    /// number).
    written: Mutex<BTreeMap<(String, u32, u64), serde_json::Value>>,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            transfers: Mutex::new(Arc::new(Semaphore::new(TRANSFERS))),
            bound: TRANSFERS.into(),
            rate: 0.into(),
            scrub_secs: (24 * 3600).into(),
            next_free: tokio::sync::Mutex::new(Instant::now()),
            checked: Mutex::default(),
            quarantined: Mutex::default(),
            served: Mutex::default(),
            blob_base: Mutex::default(),
            deploy_iso: Mutex::default(),
            engine_pin: Mutex::default(),
            written: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Delivery {
    /// Sets the bounds for transfers that start from now on (those in flight finish under
    /// the old ones).
    pub fn set(&self, transfers: usize, bytes_per_sec: u64, scrub: Duration) {
        self.scrub_secs
            .store(scrub.as_secs().max(1), std::sync::atomic::Ordering::Relaxed);
        if self
            .bound
            .swap(transfers, std::sync::atomic::Ordering::Relaxed)
            != transfers
        {
            *lock(&self.transfers) = Arc::new(Semaphore::new(transfers));
        }
        self.rate
            .store(bytes_per_sec, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sends nodes to `base` (an HTTP cache fronting the engine) for blobs from now on.
    pub fn set_blob_base(&self, base: Option<String>) {
        *lock(&self.blob_base) = base;
    }

    /// Serves `iso` (digest, size) as the deploy ISO from now on.
    pub fn set_deploy_iso(&self, iso: Option<(String, u64)>) {
        *lock(&self.deploy_iso) = iso;
    }

    /// Tells deploy systems to trust the engine's certificate by `pin` from now on.
    pub fn set_engine_pin(&self, pin: Option<String>) {
        *lock(&self.engine_pin) = pin;
    }

    /// The pin of the engine's certificate, when it serves TLS.
    pub fn engine_pin(&self) -> Option<String> {
        lock(&self.engine_pin).clone()
    }

    /// The deploy ISO's digest and size, if one is configured.
    pub fn deploy_iso(&self) -> Option<(String, u64)> {
        lock(&self.deploy_iso).clone()
    }

    /// Keeps what the deploy system of a deployment reported (the last report wins; at most
    /// 10,000 are kept, the oldest deployments' dropped first).
    pub fn set_written(&self, tier: &str, index: u32, deployment: u64, report: serde_json::Value) {
        let mut w = lock(&self.written);
        w.insert((tier.to_string(), index, deployment), report);
        while w.len() > 10_000 {
            let oldest = w.iter().min_by_key(|(k, _)| k.2).map(|(k, _)| k.clone());
            match oldest {
                Some(k) => w.remove(&k),
                None => break,
            };
        }
    }

    /// What the deploy system of a deployment reported, if it has.
    pub fn written(&self, tier: &str, index: u32, deployment: u64) -> Option<serde_json::Value> {
        lock(&self.written)
            .get(&(tier.to_string(), index, deployment))
            .cloned()
    }

    /// The origin of the HTTP cache fronting the engine's blobs, if one does.
    pub fn blob_base(&self) -> Option<String> {
        lock(&self.blob_base).clone()
    }

    /// How long until the next scrub.
    pub fn scrub_every(&self) -> Duration {
        Duration::from_secs(self.scrub_secs.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A place among the transfers in flight, waited for in arrival order.
    pub async fn transfer(&self) -> tokio::sync::OwnedSemaphorePermit {
        let s = lock(&self.transfers).clone();
        s.acquire_owned()
            .await
            .expect("the transfer semaphore is never closed")
    }

    /// Waits until the shared cap has room for `n` more bytes. Chunks of all transfers
    /// queue on one lock in turn, so each gets an equal share.
    pub async fn pace(&self, n: usize) {
        let rate = self.rate.load(std::sync::atomic::Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        let start = {
            let mut next = self.next_free.lock().await;
            let start = (*next).max(Instant::now());
            *next = start + Duration::from_secs_f64(n as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(start.into()).await;
    }

    /// Whether `digest` was quarantined since the daemon started.
    pub fn is_quarantined(&self, digest: &str) -> bool {
        lock(&self.quarantined).contains(digest)
    }

    /// The check of `digest` since the start: run once (concurrent first requests wait
    /// for the same check) by `check`, which hashes the stored file.
    pub async fn checked<F>(&self, digest: &str, check: F) -> Result<(), String>
    where
        F: FnOnce() -> Result<(), String> + Send + 'static,
    {
        let cell = lock(&self.checked)
            .entry(digest.to_string())
            .or_default()
            .clone();
        cell.get_or_init(|| async move {
            tokio::task::spawn_blocking(check)
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        })
        .await
        .clone()
    }

    /// Records that `digest` is corrupt and kept aside.
    pub fn quarantine(&self, digest: &str) {
        lock(&self.quarantined).insert(digest.to_string());
    }

    /// The blobs quarantined since the start.
    pub fn quarantined(&self) -> Vec<String> {
        let mut q: Vec<String> = lock(&self.quarantined).iter().cloned().collect();
        q.sort();
        q
    }

    /// Forgets every check, so each blob is checked again before it is next served.
    pub fn recheck_all(&self) {
        lock(&self.checked).clear();
    }

    /// Counts `bytes` of `digest`'s body sent.
    pub fn count(&self, digest: &str, bytes: u64) {
        lock(&self.served)
            .entry(digest.to_string())
            .or_default()
            .bytes += bytes;
    }

    /// Counts one request for `digest` (`not_modified` for a 304).
    pub fn request(&self, digest: &str, not_modified: bool) {
        let mut s = lock(&self.served);
        let e = s.entry(digest.to_string()).or_default();
        if not_modified {
            e.not_modified += 1;
        } else {
            e.requests += 1;
        }
    }

    /// What every blob cost since the start.
    pub fn served(&self) -> BTreeMap<String, Served> {
        lock(&self.served).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three transfers pacing chunks under one cap for a while: each gets about a third.
    #[test]
    fn the_shared_cap_is_shared_equally() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let counts = rt.block_on(async {
            let d = Arc::new(Delivery::default());
            // 4 MiB/s: a 64 KiB chunk every 16 ms, whichever transfer it belongs to.
            d.set(8, 4 << 20, Duration::from_secs(3600));
            let until = Instant::now() + Duration::from_millis(900);
            let tasks: Vec<_> = (0..3)
                .map(|_| {
                    let d = d.clone();
                    tokio::spawn(async move {
                        let mut n = 0u32;
                        while Instant::now() < until {
                            d.pace(CHUNK).await;
                            n += 1;
                        }
                        n
                    })
                })
                .collect();
            let mut counts = Vec::new();
            for t in tasks {
                counts.push(t.await.unwrap());
            }
            counts
        });
        let total: u32 = counts.iter().sum();
        assert!(total >= 20, "too few chunks to judge: {counts:?}");
        for c in &counts {
            assert!(
                (c * 3).abs_diff(total) <= total / 5 + 3,
                "unequal shares: {counts:?}"
            );
        }
    }
}
