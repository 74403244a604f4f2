//! Leadership among daemons that share one store (etcd): one daemon leads, which means it
//! reconciles, runs driver calls and writes; the others follow, serving reads and passing
//! writes on to the leader (see [`crate::forward`]).
//!
//! Election is a key attached to a lease, as client-go's leader election does it: whoever
//! puts the key while it is absent leads, and keeps leading while it renews the lease. Its
//! fencing token is the key's create-revision, which every commit of the leader checks
//! ([`mint_store::Fencing`]) and which driver calls carry to agents, so that a leader which
//! was paused or cut off past its lease can neither write nor deploy once another leads.
//!
//! Architecture invariant: a leader stops acting (fences its own store, cancels its driver
//! calls) once it has gone `renew_deadline` without a confirmed renewal, which is before
//! the lease can expire and another daemon can take the key. The store's fence, not this
//! timing, is what keeps two leaders from both writing; the timing only keeps a leader
//! that lost its lease from trying.

use crate::Shared;
use mint_store::{Fencing, LEADER_KEY, kv::Rev};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The lease a leader holds, as client-go's default (15 s).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

/// The lease's timing: its length, how long a leader goes without a renewal before it stops
/// acting, and how often it renews (and followers look for a free key).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// The lease's time to live.
    pub ttl: Duration,
    /// The longest a leader acts without a confirmed renewal: two thirds of the lease.
    pub renew_deadline: Duration,
    /// How often the lease is renewed, and how long one renewal may take.
    pub retry: Duration,
}

impl Timing {
    /// client-go's proportions (15 s, 10 s, 2 s) for a lease of `ttl` (whole seconds, at
    /// least 2, as etcd grants them).
    pub fn with_ttl(ttl: Duration) -> Timing {
        let ttl = Duration::from_secs(ttl.as_secs().max(2));
        Timing {
            ttl,
            renew_deadline: ttl * 2 / 3,
            retry: ttl * 2 / 15,
        }
    }
}

/// What the leader key holds: who leads, and where the others reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Holder {
    /// The leader's API URL.
    pub url: String,
    /// A name for logs and `mint status`: the daemon's host and process.
    pub name: String,
}

/// This daemon's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// It leads, with this fencing token.
    Leader {
        /// The leader key's create-revision.
        token: Rev,
    },
    /// It follows; the leader, if one leads.
    Follower {
        /// The current leader, as last read.
        leader: Option<Holder>,
    },
}

/// This daemon's role, watched by whoever needs to know when it changes.
pub struct Leadership {
    role: watch::Sender<Role>,
    /// Whether the store is shared (and so an election runs); otherwise it always leads.
    pub shared: bool,
    /// The lease's timing.
    pub timing: Timing,
}

impl Leadership {
    /// The role of the only daemon of an embedded store: it leads, with no token.
    pub fn sole() -> Leadership {
        Leadership {
            role: watch::channel(Role::Leader { token: 0 }).0,
            shared: false,
            timing: Timing::with_ttl(DEFAULT_LEASE),
        }
    }

    /// A daemon of a shared store, following until it wins an election.
    pub fn elected(timing: Timing) -> Leadership {
        Leadership {
            role: watch::channel(Role::Follower { leader: None }).0,
            shared: true,
            timing,
        }
    }

    /// Whether this daemon leads now.
    pub fn is_leading(&self) -> bool {
        matches!(*self.role.borrow(), Role::Leader { .. })
    }

    /// The role now.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    fn set(&self, role: Role) {
        self.role.send_if_modified(|r| {
            let changed = *r != role;
            *r = role;
            changed
        });
    }
}

/// Runs the election until `stop` changes, then gives the lease up. The first try is
/// made before this returns, so a daemon that starts serving already knows who leads.
pub(crate) async fn start(app: Shared, holder: Holder, mut stop: watch::Receiver<bool>) {
    let value = serde_json::to_vec(&holder).unwrap_or_default();
    let a = app.clone();
    let _ = blocking(move || reclaim(&a)).await;
    let mut won = elect(&app, &value).await;
    tokio::spawn(async move {
        let timing = app.leadership.timing;
        loop {
            if let Some((lease, token, granted)) = won.take() {
                let stopped = hold(&app, lease, token, granted, &mut stop).await;
                step_down(&app, lease).await;
                if stopped {
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(timing.retry) => {}
                _ = stop.changed() => return,
            }
            won = elect(&app, &value).await;
        }
    });
}

/// One campaign and, if it is won, taking office; the lease, token and when the lease was
/// asked for, while this daemon leads.
async fn elect(app: &Shared, value: &[u8]) -> Option<(i64, Rev, Instant)> {
    let (lease, token, granted) = campaign(app, value).await?;
    if take_office(app, lease, token).await {
        Some((lease, token, granted))
    } else {
        step_down(app, lease).await;
        None
    }
}

/// The file in the data directory that names the lease this daemon holds, so that after a
/// crash the same daemon, restarted, ends its old lease at once instead of waiting it out.
/// That is safe because the data directory is locked by one process at a time.
const LEASE_FILE: &str = "leader.lease";

/// Ends the lease a crashed earlier run of this daemon held, if any.
fn reclaim(app: &Shared) {
    let path = app.data_dir.join(LEASE_FILE);
    let Some(lease) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
    else {
        return;
    };
    if let Some(l) = app.engine.store.leases() {
        match l.revoke(lease, app.leadership.timing.ttl) {
            Ok(()) => tracing::info!("ended the lease {lease:x} of this daemon's last run"),
            Err(e) => tracing::debug!("the last run's lease {lease:x}: {e}"),
        }
    }
    let _ = std::fs::remove_file(path);
}

/// Runs `f` on a blocking thread, since the store's calls block; `None` if it panicked.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

/// One try at the leader key: the lease, the token and when the lease was asked for, if
/// this daemon now leads. Otherwise it records who does.
async fn campaign(app: &Shared, value: &[u8]) -> Option<(i64, Rev, Instant)> {
    let (a, value) = (app.clone(), value.to_vec());
    let within = app.leadership.timing.retry;
    let ttl = app.leadership.timing.ttl;
    let outcome = blocking(move || -> Result<Option<(i64, Rev, Instant)>, String> {
        let store = &a.engine.store;
        let leases = store.leases().ok_or("the store has no leases")?;
        if let Some((held, _)) = store.leader().map_err(|e| e.to_string())? {
            a.leadership.set(Role::Follower {
                leader: serde_json::from_slice(&held).ok(),
            });
            return Ok(None);
        }
        let granted = Instant::now();
        let lease = leases.grant(ttl, within).map_err(|e| e.to_string())?;
        match leases.claim(LEADER_KEY, &value, lease, within) {
            Ok((true, Some(e))) => Ok(Some((lease, e.create_rev, granted))),
            Ok((_, now)) => {
                let _ = leases.revoke(lease, within);
                a.leadership.set(Role::Follower {
                    leader: now.and_then(|e| serde_json::from_slice(&e.value).ok()),
                });
                Ok(None)
            }
            Err(e) => {
                let _ = leases.revoke(lease, within);
                Err(e.to_string())
            }
        }
    })
    .await?;
    match outcome {
        Ok(won) => won,
        Err(e) => {
            tracing::warn!("election: {e}");
            app.leadership.set(Role::Follower { leader: None });
            None
        }
    }
}

/// Begins to lead with `token`: commits are fenced by it, driver calls carry it, and what
/// a new leader must do first is done; false if that failed.
async fn take_office(app: &Shared, lease: i64, token: Rev) -> bool {
    if let Err(e) = std::fs::write(app.data_dir.join(LEASE_FILE), lease.to_string()) {
        tracing::warn!("cannot record the lease in the data directory: {e}");
    }
    app.engine.store.set_fencing(Fencing::Token(token));
    app.engine.plugins.runtime().set_fencing_token(Some(token));
    let a = app.clone();
    match blocking(move || crate::on_leading(&a)).await {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            tracing::error!("taking over as leader failed ({e}); stepping down");
            return false;
        }
        None => {
            tracing::error!("taking over as leader failed; stepping down");
            return false;
        }
    }
    app.leadership.set(Role::Leader { token });
    tracing::info!("leading with fencing token {token}");
    true
}

/// Leads until a renewal is missing for the renew deadline, the key is no longer this
/// daemon's, or `stop` changes (then it returns true).
async fn hold(
    app: &Shared,
    lease: i64,
    token: Rev,
    granted: Instant,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let timing = app.leadership.timing;
    // The lease's time counts from no later than when it was asked for.
    let mut renewed = granted;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(timing.retry) => {}
            _ = stop.changed() => return true,
        }
        let sent = Instant::now();
        let a = app.clone();
        let within = timing.retry;
        let confirmed = blocking(move || {
            let store = &a.engine.store;
            let leases = store.leases()?;
            let left = leases.renew(lease, within).ok()?;
            let still = store.leader().ok()?.map(|(_, t)| t) == Some(token);
            Some(left > 0 && still)
        })
        .await
        .flatten();
        match confirmed {
            Some(true) => renewed = sent,
            Some(false) => {
                tracing::warn!("the lease or the leader key is no longer this daemon's");
                return false;
            }
            None => {}
        }
        if renewed.elapsed() >= timing.renew_deadline {
            tracing::warn!(
                "no renewal of the lease for {} ms; stopping before it can expire",
                renewed.elapsed().as_millis()
            );
            return false;
        }
    }
}

/// Stops acting: the store refuses this daemon's writes, driver calls in flight are
/// cancelled, and the lease is given up, so another daemon can lead at once.
async fn step_down(app: &Shared, lease: i64) {
    app.engine.store.set_fencing(Fencing::NotLeading);
    app.engine.plugins.runtime().set_fencing_token(None);
    app.leadership.set(Role::Follower { leader: None });
    app.calls
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .abort_all();
    let a = app.clone();
    let within = app.leadership.timing.retry;
    let _ = blocking(move || {
        if let Some(l) = a.engine.store.leases()
            && l.revoke(lease, within).is_ok()
        {
            let _ = std::fs::remove_file(a.data_dir.join(LEASE_FILE));
        }
    })
    .await;
    tracing::warn!("stopped leading");
}
