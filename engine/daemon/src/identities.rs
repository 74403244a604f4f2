//! The identity routes: operators' tokens (`/v1/tokens`), node enrollment
//! (`/v1/nodes/{name}/enroll`, which issues a one-time join token) and agent registration
//! (`/v1/agents/register`), where a join token is traded for the node's own credential.
//!
//! A secret is shown once, in the answer that creates it, and never again: the store keeps
//! its SHA-256 only, and no event, log line or listing carries it.

use crate::auth::{self, Caller};
use crate::{ApiError, ApiResult, Shared, body, ok};
use axum::Json;
use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::http::StatusCode;
use mint_model::NodeState;
use mint_model::records::{Enrollment, Node, Role, Token};
use serde::Deserialize;
use std::collections::BTreeMap;

type JsonBody<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;

/// A name an operator gives: letters, digits, `-`, `_` or `.`.
fn check_name(field: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("field `{field}`: `{name}` must be 1 to 64 letters, digits, `-`, `_` or `.`"),
        ));
    }
    Ok(())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    name: String,
    role: String,
}

/// `POST /v1/tokens`: a new operator token; the answer is the only place it appears.
#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = NewToken,
    responses((status = 200, description = "The token, shown this once", body = crate::views::NewTokenAnswer)), security(("bearer" = [])))]
pub async fn create_token(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    req: JsonBody<NewToken>,
) -> ApiResult {
    let req = body(req)?;
    check_name("name", &req.name)?;
    let role = Role::parse(&req.role)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("field `role`: {e}")))?;
    let secret = auth::new_secret(auth::OPERATOR_PREFIX)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let token = Token {
        name: req.name,
        role,
        hash: auth::hash(&secret),
        created_ms: auth::now_ms(),
    };
    app.engine.store.create_token(&token, &caller.label())?;
    ok(crate::views::NewTokenAnswer {
        name: token.name,
        role,
        token: secret,
    })
}

/// `GET /v1/tokens`: names, roles and creation times; never a token or its hash.
#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, description = "Names, roles, creation times", body = [crate::views::TokenListed])), security(("bearer" = [])))]
pub async fn list_tokens(State(app): State<Shared>) -> ApiResult {
    let tokens: Vec<_> = app
        .engine
        .store
        .tokens()?
        .into_iter()
        .map(|t| crate::views::TokenListed {
            name: t.name,
            role: t.role,
            created_ms: t.created_ms,
        })
        .collect();
    ok(tokens)
}

/// `DELETE /v1/tokens/{name}`: the token authenticates nothing from now on.
#[utoipa::path(delete, path = "/v1/tokens/{name}", tag = "tokens", params(("name" = String, Path, description = "The token's name")),
    responses((status = 200, description = "Revoked", body = crate::views::Revoked)), security(("bearer" = [])))]
pub async fn revoke_token(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    let t = app.engine.store.revoke_token(&name, &caller.label())?;
    ok(crate::views::Revoked {
        revoked: t.name,
        role: t.role,
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EnrollRequest {
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// How long the join token works, in seconds (default an hour, at most a week).
    #[serde(default = "hour")]
    ttl_secs: u64,
}

fn hour() -> u64 {
    3600
}

/// The longest a join token may live.
pub const MAX_JOIN_TTL_SECS: u64 = 7 * 24 * 3600;

/// `POST /v1/nodes/{name}/enroll`: a one-time join token for the node `name`, which its
/// agent trades for its own credential when it registers. Enrolling again replaces an
/// unused token; a node that joins again gets a new credential, and the old one dies.
#[utoipa::path(post, path = "/v1/nodes/{name}/enroll", tag = "nodes", params(("name" = String, Path, description = "The node")), request_body = EnrollRequest,
    responses((status = 200, description = "The one-time join token, shown this once", body = crate::views::Enrolled)), security(("bearer" = [])))]
pub async fn enroll(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    req: JsonBody<EnrollRequest>,
) -> ApiResult {
    let req = body(req)?;
    check_name("name", &name)?;
    if req.ttl_secs == 0 || req.ttl_secs > MAX_JOIN_TTL_SECS {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "field `ttl-secs`: {} is outside 1..={MAX_JOIN_TTL_SECS} (a week)",
                req.ttl_secs
            ),
        ));
    }
    let secret = auth::new_secret(auth::JOIN_PREFIX)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let expires_ms = auth::now_ms() + req.ttl_secs * 1000;
    let e = Enrollment {
        node: name.clone(),
        hash: auth::hash(&secret),
        labels: req.labels,
        expires_ms,
    };
    app.engine.store.enroll(&e, &caller.label())?;
    ok(crate::views::Enrolled {
        node: name,
        join_token: secret,
        expires_ms,
        labels: e.labels,
    })
}

/// What a node agent says of its node when it starts.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Registration {
    name: String,
    cpus: u32,
    memory_mib: u64,
    arch: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    /// Where the agent's API is, as the engine's drivers reach it.
    agent_url: String,
    /// The pin of the certificate the agent serves its API with (an `https` agent-url).
    #[serde(default)]
    agent_pin: Option<String>,
    #[serde(default)]
    macs: Vec<String>,
}

/// `POST /v1/agents/register`: with a join token, the node joins (added free, or its facts
/// refreshed) and the answer carries its new credential, once; with the node's credential,
/// a known node refreshes its facts. Nothing else registers a node: a known node's name
/// without its credential is refused and the node stays as it was.
#[utoipa::path(post, path = "/v1/agents/register", tag = "nodes", request_body = Registration,
    responses((status = 200, description = "The node, and its credential when it joined", body = crate::views::Registered)), security(("bearer" = [])))]
pub async fn register(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    r: JsonBody<Registration>,
) -> ApiResult {
    let r = body(r)?;
    check_name("name", &r.name)?;
    if r.cpus == 0 || r.memory_mib == 0 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "fields `cpus` and `memory-mib` must be above 0".into(),
        ));
    }
    mint_plugins::HostPattern::of_url(&r.agent_url)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("field `agent-url`: {e}")))?;
    let mut properties = BTreeMap::from([("agent-url".to_string(), r.agent_url)]);
    if let Some(pin) = r.agent_pin {
        let pin: mint_tls::Pin = pin
            .parse()
            .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("field `agent-pin`: {e}")))?;
        properties.insert(mint_plugins::AGENT_PIN.into(), pin.to_string());
    }
    if !r.macs.is_empty() {
        properties.insert("macs".into(), r.macs.join(","));
    }
    let node = Node {
        name: r.name,
        cpus: r.cpus,
        memory_mib: r.memory_mib,
        arch: r.arch,
        labels: r.labels,
        properties,
        state: NodeState::Free,
        instance: None,
        load: 0,
        cached: Vec::new(),
    };
    let credential = match &caller {
        Caller::Joining { hash } => {
            let secret = auth::new_secret(auth::NODE_PREFIX)
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            let c = app
                .engine
                .store
                .join(&node, hash, auth::now_ms(), &auth::hash(&secret))
                .map_err(|e| {
                    // A wrong join token is a failed authentication, braked like any other.
                    app.failures.count(peer.ip());
                    ApiError(StatusCode::FORBIDDEN, e.to_string())
                })?;
            // The agent keeps both: its own credential, and the one the engine will
            // present to its API (only a caller holding it may deploy there).
            Some((
                secret,
                app.engine
                    .capabilities
                    .agent_credential(&node.name, c.generation),
            ))
        }
        Caller::Node { name, hash } if *name == node.name => {
            app.engine
                .store
                .reregister(&node, hash)
                .map_err(|e| ApiError(StatusCode::FORBIDDEN, e.to_string()))?;
            None
        }
        other => {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "{} may not register node `{}`: a node registers with its join token, then its own credential",
                    other.label(),
                    node.name
                ),
            ));
        }
    };
    app.liveness.beat(&node.name, 0);
    let registered = app.engine.store.node(&node.name)?;
    let (credential, engine_credential) = credential.unzip();
    let answer = crate::views::Registered {
        node: registered,
        credential,
        engine_credential,
    };
    // A node that joined (or came back) may be what a waiting tier needs.
    crate::reconciler::queue_all(&app);
    ok(answer)
}

/// `GET /v1/whoami`: who the caller's credential is, so a client (the console) can offer
/// only what that identity may do.
#[utoipa::path(get, path = "/v1/whoami", tag = "tokens",
    responses((status = 200, description = "The caller", body = crate::views::Whoami)), security(("bearer" = [])))]
pub async fn whoami(Extension(caller): Extension<Caller>) -> ApiResult {
    ok(match caller {
        Caller::Operator { name, role } => crate::views::Whoami {
            kind: "operator".into(),
            name,
            role: Some(role),
        },
        Caller::Node { name, .. } => crate::views::Whoami {
            kind: "node".into(),
            name,
            role: None,
        },
        Caller::Joining { .. } => crate::views::Whoami {
            kind: "joining".into(),
            name: String::new(),
            role: None,
        },
    })
}
