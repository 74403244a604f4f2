//! mint's daemon: serves the HTTP/JSON API over the pool engine and runs the
//! level-triggered reconciliation loop that drives every tier toward its desired count.
//!
//! Architecture invariant: the daemon holds no state of its own. Everything it answers
//! comes from the store, so a restarted daemon serves exactly what was acknowledged.
//! Reconciliation passes are serialised: one pass at a time, whether the loop or a
//! request started it.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use mint_core::{Engine, EngineError, Progress, TierSpec};
use mint_model::NodeState;
use mint_model::records::Node;
use mint_store::StoreError;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often the loop reconciles every tier when nothing asks it to sooner.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

struct App {
    engine: Engine,
    reconciling: tokio::sync::Mutex<()>,
}

type Shared = Arc<App>;

/// An API error: a status and a message that names the field or the thing.
struct ApiError(StatusCode, String);

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let status = match &e {
            EngineError::Invalid(_) | EngineError::Image(_) => StatusCode::BAD_REQUEST,
            EngineError::Store(StoreError::Refused(_)) => StatusCode::CONFLICT,
            EngineError::Store(StoreError::NotFound { .. }) => StatusCode::NOT_FOUND,
            EngineError::Call(_) => StatusCode::BAD_GATEWAY,
            EngineError::Load(_) | EngineError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        EngineError::Store(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn ok(v: impl serde::Serialize) -> ApiResult {
    serde_json::to_value(v).map(Json).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRequest {
    /// A directory or tar archive on the daemon's host.
    path: String,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaleRequest {
    instances: i64,
}

/// A node as an operator adds it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct NodeSpec {
    name: String,
    cpus: u32,
    memory_mib: u64,
    #[serde(default = "x86_64")]
    arch: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    properties: BTreeMap<String, String>,
    #[serde(default)]
    maintenance: bool,
}

fn x86_64() -> String {
    "x86_64".into()
}

#[derive(Deserialize)]
struct EventQuery {
    after: Option<u64>,
    limit: Option<usize>,
    tier: Option<String>,
}

/// Turns a JSON body's rejection into the API's error shape.
fn body<T>(r: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    r.map(|Json(v)| v).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("request body: {}", e.body_text())))
}

async fn import_image(State(app): State<Shared>, req: Result<Json<ImportRequest>, axum::extract::rejection::JsonRejection>) -> ApiResult {
    let req = body(req)?;
    let image = app.engine.import_image(std::path::Path::new(&req.path), req.name.as_deref())?;
    ok(image)
}

async fn list_images(State(app): State<Shared>) -> ApiResult {
    ok(app.engine.store.images()?)
}

async fn create_tier(State(app): State<Shared>, spec: Result<Json<TierSpec>, axum::extract::rejection::JsonRejection>) -> ApiResult {
    let spec = body(spec)?;
    let _pass = app.reconciling.lock().await;
    ok(app.engine.create_tier(&spec).await?)
}

async fn list_tiers(State(app): State<Shared>) -> ApiResult {
    let mut out = Vec::new();
    for t in app.engine.store.tiers()? {
        let inst = app.engine.store.instances(&t.name)?;
        let deployed = inst.iter().filter(|i| i.state.holds_node()).count();
        out.push(json!({ "tier": t, "deployed": deployed }));
    }
    ok(out)
}

async fn show_tier(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let t = app.engine.store.tier(&name)?;
    let inst = app.engine.store.instances(&name)?;
    let deployed = inst.iter().filter(|i| i.state.holds_node()).count();
    ok(json!({ "tier": t, "deployed": deployed }))
}

async fn delete_tier(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let _pass = app.reconciling.lock().await;
    app.engine.store.delete_tier(&name)?;
    ok(json!({ "deleted": name }))
}

async fn scale(State(app): State<Shared>, Path(name): Path<String>, req: Result<Json<ScaleRequest>, axum::extract::rejection::JsonRejection>) -> ApiResult {
    let req = body(req)?;
    let n = u32::try_from(req.instances)
        .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("field `instances`: {} is not a count from 0 up", req.instances)))?;
    let _pass = app.reconciling.lock().await;
    let p: Progress = app.engine.scale(&name, n).await?;
    ok(p)
}

async fn instances(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    app.engine.store.tier(&name)?;
    ok(app.engine.store.instances(&name)?)
}

async fn add_node(State(app): State<Shared>, spec: Result<Json<NodeSpec>, axum::extract::rejection::JsonRejection>) -> ApiResult {
    let s = body(spec)?;
    if s.name.is_empty() || !s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(ApiError(StatusCode::BAD_REQUEST, format!("field `name`: `{}` must be letters, digits, `-`, `_` or `.`", s.name)));
    }
    if s.cpus == 0 || s.memory_mib == 0 {
        return Err(ApiError(StatusCode::BAD_REQUEST, "fields `cpus` and `memory-mib` must be above 0".into()));
    }
    let node = Node {
        name: s.name,
        cpus: s.cpus,
        memory_mib: s.memory_mib,
        arch: s.arch,
        labels: s.labels,
        properties: s.properties,
        state: if s.maintenance { NodeState::Maintenance } else { NodeState::Free },
        instance: None,
        load: 0,
    };
    app.engine.store.add_node(&node)?;
    ok(node)
}

async fn list_nodes(State(app): State<Shared>) -> ApiResult {
    ok(app.engine.store.nodes()?)
}

async fn remove_node(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    app.engine.store.remove_node(&name)?;
    ok(json!({ "removed": name }))
}

async fn events(State(app): State<Shared>, Query(q): Query<EventQuery>) -> ApiResult {
    let mut e = app.engine.store.events(q.after, q.limit.unwrap_or(1000).min(10_000))?;
    if let Some(t) = q.tier {
        e.retain(|e| e.tier.as_deref() == Some(t.as_str()));
    }
    ok(e)
}

async fn health() -> ApiResult {
    ok(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// The API's routes over an engine.
fn router(app: Shared) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/images", get(list_images).post(import_image))
        .route("/v1/tiers", get(list_tiers).post(create_tier))
        .route("/v1/tiers/{name}", get(show_tier).delete(delete_tier))
        .route("/v1/tiers/{name}/scale", post(scale))
        .route("/v1/tiers/{name}/instances", get(instances))
        .route("/v1/nodes", get(list_nodes).post(add_node))
        .route("/v1/nodes/{name}", axum::routing::delete(remove_node))
        .route("/v1/events", get(events))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such API route; see README for /v1/...".into()) })
        .with_state(app)
}

/// One reconciliation pass over every tier.
async fn reconcile_all(app: &App) {
    let _pass = app.reconciling.lock().await;
    let tiers = match app.engine.store.tiers() {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("cannot list tiers: {e}");
            return;
        }
    };
    for t in tiers {
        match app.engine.reconcile(&t.name).await {
            Ok(p) if p.blocked.is_some() => tracing::warn!(tier = %t.name, "blocked: {}", p.blocked.unwrap_or_default()),
            Ok(_) => {}
            Err(e) => tracing::warn!(tier = %t.name, "reconcile failed: {e}"),
        }
    }
}

/// Serves the API on `listen` until `shutdown` resolves, reconciling in the background.
pub async fn serve(
    data_dir: &std::path::Path,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), String> {
    let engine = Engine::open(data_dir).map_err(|e| e.to_string())?;
    engine.plugins.preload_bundled().map_err(|e| e.to_string())?;
    let app = Arc::new(App { engine, reconciling: tokio::sync::Mutex::new(()) });
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let looping = app.clone();
    let reconciler = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_EVERY) => reconcile_all(&looping).await,
                _ = stop_rx.changed() => break,
            }
        }
    });
    on_ready(bound);
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await
        .map_err(|e| e.to_string())?;
    // Let a pass in progress finish its transaction before the process ends.
    let _ = reconciler.await;
    Ok(())
}
