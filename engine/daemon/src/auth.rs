//! Who is calling and what they may reach. Every route but `/v1/health` and
//! `/v1/openapi.json` (and capability URLs and boot routes) needs a bearer
//! credential: an operator's token (role `admin` or `read-only`), a node's credential, or
//! (to register, once) a node's join token. The store keeps only SHA-256 hashes; a
//! credential is found by its hash and compared in constant time.
//!
//! The rules, in one place ([`authorize`]): admins reach everything; read-only tokens
//! reach GET and HEAD routes but never artifacts, blobs or tokens; a node reaches its own
//! registration and heartbeat and the artifacts of the instance bound to it (the artifact
//! handlers narrow that further); a join token reaches registration only.

use crate::{ApiError, Shared};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use mint_model::records::{Principal, Role, Token};
use sha2::{Digest, Sha256};
use std::path::Path;

/// The prefixes that say what a credential is, so a leaked one is recognisable.
pub const OPERATOR_PREFIX: &str = "mint_op_";
/// A node's credential.
pub const NODE_PREFIX: &str = "mint_nc_";
/// A one-time join token.
pub const JOIN_PREFIX: &str = "mint_jt_";

/// The file an operator's first admin token is written to, in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// The caller of a request, once authenticated.
#[derive(Debug, Clone)]
pub enum Caller {
    /// An operator's token.
    Operator {
        /// The token's name.
        name: String,
        /// What it may do.
        role: Role,
    },
    /// A node's agent, by its credential.
    Node {
        /// The node.
        name: String,
        /// `sha256:<hex>` of the credential it presented, which a re-registration
        /// checks again inside its transaction.
        hash: String,
    },
    /// A join token, not yet traded: only registration checks it (against the node's
    /// enrollment), so it carries its hash.
    Joining {
        /// `sha256:<hex>` of the join token.
        hash: String,
    },
}

impl Caller {
    /// How the event log names the caller.
    pub fn label(&self) -> String {
        match self {
            Caller::Operator { name, role } => Principal::Operator {
                name: name.clone(),
                role: *role,
            }
            .label(),
            Caller::Node { name, .. } => Principal::Node { name: name.clone() }.label(),
            Caller::Joining { .. } => "joining-node".into(),
        }
    }
}

/// A new random credential with `prefix`: 32 bytes from the operating system, base64url.
pub fn new_secret(prefix: &str) -> Result<String, String> {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| format!("the operating system gave no random bytes: {e}"))?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// `sha256:<hex>` of a credential, the only form the store keeps.
pub fn hash(secret: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(secret.trim().as_bytes()))
    )
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Makes sure the operator has a way in: at the first start (no `admin` token known and no
/// token file), writes a new admin token to `<data-dir>/admin.token` with mode 0600 and
/// records its hash. A token file that others than its owner may read is refused: the
/// daemon would be handing out admin rights.
pub fn first_admin_token(data_dir: &Path, store: &mint_store::Store) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if let Ok(meta) = std::fs::metadata(&path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "{} is readable by group or others (mode {mode:o}); an admin token must be the daemon user's alone: chmod 600 {}",
                path.display(),
                path.display()
            ));
        }
        return Ok(());
    }
    let known = store.tokens().map_err(|e| e.to_string())?;
    if known.iter().any(|t| t.name == "admin") {
        // The operator removed the file on purpose; the token in the store stays valid
        // until revoked, and other tokens reach the daemon.
        return Ok(());
    }
    let secret = new_secret(OPERATOR_PREFIX)?;
    let token = Token {
        name: "admin".into(),
        role: Role::Admin,
        hash: hash(&secret),
        created_ms: now_ms(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot write the admin token to {}: {e}", path.display()))?;
    f.write_all(format!("{secret}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    store
        .create_token(&token, mint_model::records::ENGINE)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Finds the caller of a bearer credential, or none for a credential nobody holds.
fn identify(app: &crate::App, bearer: &str) -> Result<Option<Caller>, ApiError> {
    let h = hash(bearer);
    if bearer.starts_with(JOIN_PREFIX) {
        return Ok(Some(Caller::Joining { hash: h }));
    }
    // The lookup is by hash, which a guess cannot steer, so its timing says nothing about
    // any stored credential.
    Ok(app.engine.store.principal(&h)?.map(|p| match p {
        Principal::Operator { name, role } => Caller::Operator { name, role },
        Principal::Node { name } => Caller::Node {
            name,
            hash: h.clone(),
        },
    }))
}

/// Whether `caller` may make a `method` request to the route `route`; `Err` is the
/// status and why.
pub fn authorize(
    caller: &Caller,
    method: &Method,
    route: &str,
) -> Result<(), (StatusCode, String)> {
    let reads = *method == Method::GET || *method == Method::HEAD;
    let artifacts = route.starts_with("/v1/artifacts/") || route.starts_with("/v1/blobs/");
    match caller {
        Caller::Operator {
            role: Role::Admin, ..
        } => Ok(()),
        Caller::Operator { name, role } => {
            if !reads || route.starts_with("/v1/tokens") {
                Err((
                    StatusCode::FORBIDDEN,
                    format!(
                        "token `{name}` is {}: it may read the pool's state, not change it or manage tokens; use an admin token",
                        role.name()
                    ),
                ))
            } else if artifacts && !role.can_read_artifacts() {
                Err((
                    StatusCode::FORBIDDEN,
                    format!(
                        "token `{name}` is {}: artifacts and seeds (keys, user-data) need an admin token",
                        role.name()
                    ),
                ))
            } else {
                Ok(())
            }
        }
        Caller::Node { name, .. } => {
            let own = (*method == Method::POST
                && (route == "/v1/agents/register" || route == "/v1/nodes/{name}/heartbeat"))
                || (reads && artifacts);
            if own {
                Ok(())
            } else {
                Err((
                    StatusCode::FORBIDDEN,
                    format!(
                        "node `{name}`'s credential reaches only its own registration, heartbeats and artifacts"
                    ),
                ))
            }
        }
        Caller::Joining { .. } if *method == Method::POST && route == "/v1/agents/register" => {
            Ok(())
        }
        Caller::Joining { .. } => Err((
            StatusCode::UNAUTHORIZED,
            "a join token only registers its node (mint-agent --join-token)".into(),
        )),
    }
}

/// Failed authentications one address may make within [`FAILURE_WINDOW`] before every
/// request from it is answered 429 until the window ends (the daemon's default;
/// `--max-auth-failures` sets another).
pub const MAX_FAILURES: u32 = 20;
/// See [`MAX_FAILURES`].
pub const FAILURE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Failed authentications by address, and how many an address may make per window.
pub struct Failures {
    seen: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (std::time::Instant, u32)>>,
    limit: u32,
}

impl Failures {
    /// A brake at `limit` failures per window.
    pub fn new(limit: u32) -> Failures {
        Failures {
            seen: Default::default(),
            limit: limit.max(1),
        }
    }

    /// Whether `ip` used up its failures in the current window.
    fn braked(&self, ip: std::net::IpAddr) -> bool {
        let map = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&ip)
            .is_some_and(|(since, n)| since.elapsed() < FAILURE_WINDOW && *n >= self.limit)
    }

    /// Counts one failure from `ip`.
    pub(crate) fn count(&self, ip: std::net::IpAddr) {
        let mut map = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        // A flood of addresses must not grow the map without bound: forget old windows.
        if map.len() > 10_000 {
            map.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        let e = map.entry(ip).or_insert((std::time::Instant::now(), 0));
        if e.0.elapsed() >= FAILURE_WINDOW {
            *e = (std::time::Instant::now(), 0);
        }
        e.1 += 1;
    }
}

/// The middleware every route but `/v1/health` runs through: authenticates the bearer
/// credential, applies [`authorize`], and hands the handler its [`Caller`]. An address
/// that failed to authenticate [`MAX_FAILURES`] times within a minute is answered 429,
/// without its credential being looked at, until the minute is over.
pub(crate) async fn require(State(app): State<Shared>, mut req: Request, next: Next) -> Response {
    if app.unauthenticated {
        let caller = unauthenticated_caller(&req);
        req.extensions_mut().insert(caller);
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(ip) = peer
        && app.failures.braked(ip)
    {
        app.metrics.refused(crate::metrics::Refusal::Braked);
        let mut r = ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many failed authentications from {ip}; wait a minute"),
        )
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("60"));
        return r;
    }
    let failed = |app: &Shared| {
        if let Some(ip) = peer {
            app.failures.count(ip);
        }
    };
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string);
    let unauthorized = |why: &str| {
        let mut r = ApiError(StatusCode::UNAUTHORIZED, format!("{why}: send `Authorization: Bearer TOKEN` (the daemon's first admin token is in <data-dir>/{ADMIN_TOKEN_FILE}; `mint token create` makes more)")).into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        r
    };
    let Some(bearer) = bearer else {
        failed(&app);
        app.metrics.refused(crate::metrics::Refusal::Missing);
        return unauthorized("no bearer credential");
    };
    let caller = match identify(&app, &bearer) {
        Ok(Some(c)) => c,
        Ok(None) => {
            failed(&app);
            app.metrics.refused(crate::metrics::Refusal::Unknown);
            return unauthorized("this credential is not known (revoked, or never issued)");
        }
        Err(e) => return e.into_response(),
    };
    if let Err((status, why)) = authorize(&caller, req.method(), &route) {
        app.metrics.refused(crate::metrics::Refusal::Forbidden);
        return ApiError(status, why).into_response();
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// Who a request acts as on a daemon serving without authentication (a loopback
/// benchmark's): the node its path names on a node's own routes, else an admin.
fn unauthenticated_caller(req: &Request) -> Caller {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str())
        .unwrap_or_default();
    match route.strip_prefix("/v1/nodes/{name}/") {
        Some(_) => {
            let name = req
                .uri()
                .path()
                .split('/')
                .nth(3)
                .unwrap_or_default()
                .to_string();
            Caller::Node {
                name,
                hash: String::new(),
            }
        }
        None => Caller::Operator {
            name: "unauthenticated".into(),
            role: Role::Admin,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_reach_what_they_should() {
        let admin = Caller::Operator {
            name: "a".into(),
            role: Role::Admin,
        };
        let ro = Caller::Operator {
            name: "ci".into(),
            role: Role::ReadOnly,
        };
        let node = Caller::Node {
            name: "n1".into(),
            hash: "sha256:00".into(),
        };
        let join = Caller::Joining {
            hash: "sha256:00".into(),
        };
        assert!(authorize(&admin, &Method::POST, "/v1/tiers/{name}/scale").is_ok());
        assert!(authorize(&ro, &Method::GET, "/v1/tiers").is_ok());
        assert_eq!(
            authorize(&ro, &Method::POST, "/v1/tiers/{name}/scale")
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            authorize(&ro, &Method::GET, "/v1/blobs/{digest}")
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            authorize(&ro, &Method::GET, "/v1/artifacts/{tier}/{index}")
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            authorize(&ro, &Method::GET, "/v1/tokens").unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        assert!(authorize(&node, &Method::POST, "/v1/nodes/{name}/heartbeat").is_ok());
        assert!(authorize(&node, &Method::GET, "/v1/artifacts/{tier}/{index}").is_ok());
        assert_eq!(
            authorize(&node, &Method::GET, "/v1/tiers").unwrap_err().0,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            authorize(&node, &Method::POST, "/v1/tiers/{name}/scale")
                .unwrap_err()
                .0,
            StatusCode::FORBIDDEN
        );
        assert!(authorize(&join, &Method::POST, "/v1/agents/register").is_ok());
        assert_eq!(
            authorize(&join, &Method::GET, "/v1/tiers").unwrap_err().0,
            StatusCode::UNAUTHORIZED
        );
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let (a, b) = (
            new_secret(OPERATOR_PREFIX).unwrap(),
            new_secret(OPERATOR_PREFIX).unwrap(),
        );
        assert_ne!(a, b);
        assert!(a.starts_with(OPERATOR_PREFIX) && a.len() == OPERATOR_PREFIX.len() + 43);
        assert_eq!(
            hash(&a),
            hash(&format!("{a}\n")),
            "a token read from a file hashes the same"
        );
        assert!(
            mint_store::same_hash(&hash(&a), &hash(&a))
                && !mint_store::same_hash(&hash(&a), &hash(&b))
        );
    }
}
