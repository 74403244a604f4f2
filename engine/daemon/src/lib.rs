//! mint's daemon: serves the HTTP/JSON API over the pool engine and runs the
//! level-triggered reconciliation loop that drives every tier toward its desired count.
//!
//! Architecture invariant: the daemon holds no state of its own but what it is doing right
//! now (calls in flight, see `reconciler`). Everything it acknowledges is in the store, so
//! a restarted daemon serves exactly what was acknowledged. A request records intent and
//! answers; the reconciler carries it out, and no request waits behind a driver.

mod artifacts;
pub mod auth;
mod autoscale;
pub mod config;
mod confine;
mod console;
mod delivery;
mod events;
mod forward;
mod identities;
pub mod leader;
mod liveness;
mod metrics;
mod netboot;
mod openapi;
mod plugins;
mod reconciler;
mod tls;
mod views;
pub use tls::PIN_FILE;

use auth::Caller;
use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use mint_core::{Engine, EngineError, Report, SourceFormat, Step, TierSpec, quiet};
use mint_model::NodeState;
use mint_model::records::Node;
use mint_store::StoreError;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How often every tier is queued for a step when nothing asks for one sooner.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(1);

struct App {
    engine: Engine,
    /// When each node's agent last reported, and the loads it reported.
    liveness: liveness::Liveness,
    /// Tiers waiting for a reconciliation step.
    queue: reconciler::Queue,
    /// What the reconciler is doing for each tier.
    status: reconciler::Statuses,
    /// Driver calls in flight, each in its own task.
    calls: std::sync::Mutex<tokio::task::JoinSet<()>>,
    /// Writers of the image store's files (imports, artifact builds) share it; garbage
    /// collection and image deletion take it alone, so they never see half-written files
    /// as garbage.
    image_files: tokio::sync::RwLock<()>,
    /// Where the daemon keeps its state (the admin token file is there).
    data_dir: std::path::PathBuf,
    /// Failed authentications by address.
    failures: auth::Failures,
    /// The one directory `materialize` may write below (none: it is off).
    materialize_root: std::sync::RwLock<Option<std::path::PathBuf>>,
    /// Long operations (imports, tier creations, new masters) running at once: each reads
    /// or writes a whole image, so a flood of them would exhaust the disk's bandwidth.
    long_operations: Arc<tokio::sync::Semaphore>,
    /// Whether requests go unauthenticated (a loopback benchmark's daemon only).
    unauthenticated: bool,
    /// Blob transfers: their bound, pace, checks and counts.
    delivery: delivery::Delivery,
    /// Network boot: scripts, boot files, leases.
    netboot: netboot::Netboot,
    /// Whether this daemon leads (it always does on an embedded store).
    leadership: leader::Leadership,
    /// How a follower trusts the leader's certificate when it forwards a write.
    peer_trust: Option<mint_tls::ClientTrust>,
    /// Event streams open now (see [`events::MAX_STREAMS`]).
    event_streams: Arc<tokio::sync::Semaphore>,
    /// Becomes true when the daemon stops, which ends what streams.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// What the daemon records for `/metrics` as it happens.
    metrics: Arc<metrics::Metrics>,
    /// The data directory's lock, held while the daemon runs (see [`lock_data_dir`]).
    _data_lock: Option<std::fs::File>,
}

/// Locks the data directory for this process alone: a shared store has no lock of its own
/// (as sled's directory has), and what the directory names, such as the lease of this
/// daemon's last run, may only be acted on by one process.
fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("--data-dir: cannot create {}: {e}", data_dir.display()))?;
    let path = data_dir.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("--data-dir: cannot open {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; it changes no memory.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "--data-dir {}: another mint daemon uses this directory; give each daemon its own",
            data_dir.display()
        ));
    }
    Ok(f)
}

/// How many long operations may run at once; more are answered 429.
pub const MAX_LONG_OPERATIONS: usize = 4;

/// The largest request body of any route but plugin installation.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A permit for one long operation, or the 429 that says to retry later.
fn long_permit(app: &App) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    app.long_operations.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_LONG_OPERATIONS} imports, tier creations or master updates are running; retry when one has finished"),
        )
    })
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
            EngineError::Store(StoreError::Fenced(_)) => StatusCode::SERVICE_UNAVAILABLE,
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

type ApiResult = Result<Response, ApiError>;

/// A `200` JSON answer, serialised straight from the records (no intermediate `Value`:
/// listing a large tier is dominated by encoding).
fn ok(v: impl serde::Serialize) -> ApiResult {
    Ok(Json(v).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ImportRequest {
    /// A directory, archive, OCI layout or disk image on the daemon's host.
    path: String,
    name: Option<String>,
    /// The format the source must be (read from its contents when absent).
    #[serde(default)]
    format: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ScaleRequest {
    instances: i64,
}

/// A node as an operator adds it.
#[derive(Deserialize, utoipa::ToSchema)]
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

/// Turns a JSON body's rejection into the API's error shape.
fn body<T>(r: Result<Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    r.map(|Json(v)| v).map_err(|e| {
        // A body over the limit is 413, with the limit named; any other rejection is bad input.
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body: larger than the {MAX_BODY_BYTES} bytes this route takes"),
            )
        } else {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("request body: {}", e.body_text()),
            )
        }
    })
}

/// The media type of a progress stream: one JSON object per line.
pub const NDJSON: &str = "application/x-ndjson";

/// Whether the client asked for a progress stream (`Accept: application/x-ndjson`).
fn wants_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(NDJSON))
}

/// Forwards progress steps to a stream, at most one every 100 ms besides the first and
/// the last of each phase, so a K of a million does not send a million lines.
struct Forward {
    tx: tokio::sync::mpsc::UnboundedSender<Value>,
    last: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Forward {
    fn step(&self, s: Step) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let edge = s.done == 0 || s.done == s.total;
        if edge || last.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            *last = Some(std::time::Instant::now());
            let _ = self.tx.send(json!({ "progress": s }));
        }
    }
}

/// Answers a long operation. Without a progress stream, one JSON document as any other
/// route. With one, a `200` NDJSON stream of `{"progress": {...}}` lines and then one
/// `{"result": ...}` line, or `{"error": "...", "status": N}` where the plain answer would
/// have had that status. The work runs in its own task, so a client that goes away does not
/// cut an operation in the middle (each operation is one transaction in any case).
async fn long_operation<F>(stream: bool, work: F) -> Response
where
    F: FnOnce(Report<'_>) -> futures_util::future::BoxFuture<'_, Result<Value, ApiError>>
        + Send
        + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let forward = Forward {
        tx: tx.clone(),
        last: std::sync::Mutex::new(None),
    };
    let task = tokio::spawn(async move {
        let report = move |s: Step| forward.step(s);
        let result = if stream {
            work(&report).await
        } else {
            work(&quiet).await
        };
        let _ = tx.send(match &result {
            Ok(v) => json!({ "result": v }),
            Err(ApiError(status, message)) => {
                json!({ "error": message, "status": status.as_u16() })
            }
        });
        result
    });
    if !stream {
        return match task.await {
            Ok(Ok(v)) => Json(v).into_response(),
            Ok(Err(e)) => e.into_response(),
            Err(e) => ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the operation stopped: {e}"),
            )
            .into_response(),
        };
    }
    let lines = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|v| v.map(|v| Ok::<_, std::convert::Infallible>(format!("{v}\n"))))
    });
    ([(header::CONTENT_TYPE, NDJSON)], Body::from_stream(lines)).into_response()
}

/// Imports a master from a path on the daemon's host: a directory, a tar archive, an OCI
/// layout, a qcow2 or raw disk image, or a bootable ISO.
#[utoipa::path(post, path = "/v1/images", tag = "images", request_body = ImportRequest,
    responses((status = 200, description = "The image (or an NDJSON progress stream with `Accept: application/x-ndjson`)", body = mint_model::records::Image),
        (status = 400, description = "The path or format is refused", body = views::ErrorBody),
        (status = 429, description = "Too many long operations run", body = views::ErrorBody)),
    security(("bearer" = [])))]
async fn import_image(
    State(app): State<Shared>,
    headers: HeaderMap,
    req: Result<Json<ImportRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body(req) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let claimed = match req.format.as_deref().map(SourceFormat::parse).transpose() {
        Ok(c) => c,
        Err(e) => return ApiError(StatusCode::BAD_REQUEST, e).into_response(),
    };
    let permit = match long_permit(&app) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    long_operation(wants_stream(&headers), move |report| {
        Box::pin(async move {
            let _permit = permit;
            let _files = app.image_files.read().await;
            // Importing reads and writes the whole image: off the async threads.
            let path = std::path::Path::new(&req.path);
            let image = off_async_threads(|| {
                app.engine
                    .import_image_reporting(path, req.name.as_deref(), claimed, report)
            })?;
            serde_json::to_value(image)
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        })
    })
    .await
}

/// Runs blocking work without stalling the other tasks of a multi-threaded runtime (on a
/// single-threaded one, as in some embeddings, it simply runs).
fn off_async_threads<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Every master image.
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, description = "The images", body = [mint_model::records::Image])), security(("bearer" = [])))]
async fn list_images(State(app): State<Shared>) -> ApiResult {
    ok(app.engine.store.images()?)
}

/// `DELETE /v1/images/{id}`: refused while a tier uses the image.
#[utoipa::path(delete, path = "/v1/images/{id}", tag = "images", params(("id" = String, Path, description = "The image's digest")),
    responses((status = 200, description = "The image deleted", body = views::DeletedImage),
        (status = 409, description = "A tier uses it", body = views::ErrorBody)), security(("bearer" = [])))]
async fn delete_image(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let _files = app.image_files.write().await;
    let image = off_async_threads(|| app.engine.delete_image(&id, &caller.label()))?;
    ok(views::DeletedImage { deleted: image })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct GcRequest {
    #[serde(default)]
    keep_masters: bool,
}

/// `POST /v1/images/gc`: removes masters no tier uses and blobs no instance refers to.
#[utoipa::path(post, path = "/v1/images/gc", tag = "images", request_body = GcRequest,
    responses((status = 200, description = "What was removed", body = mint_core::GcReport)), security(("bearer" = [])))]
async fn gc(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    req: Result<Json<GcRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let req = body(req)?;
    let _files = app.image_files.write().await;
    ok(off_async_threads(|| {
        app.engine.gc(req.keep_masters, &caller.label())
    })?)
}

/// One image, by digest or by name (the newest import of that name).
#[utoipa::path(get, path = "/v1/images/{id}", tag = "images", params(("id" = String, Path, description = "A digest or a name")),
    responses((status = 200, description = "The image and the tiers that use it", body = views::ImageView),
        (status = 404, description = "No such image", body = views::ErrorBody)), security(("bearer" = [])))]
async fn show_image(State(app): State<Shared>, Path(id): Path<String>) -> ApiResult {
    let images = app.engine.store.images()?;
    let found = images
        .into_iter()
        .filter(|i| i.digest == id || i.name == id)
        .last();
    let image = found.ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no image with digest or name `{id}`; `mint image list` shows them"),
        )
    })?;
    let tiers: Vec<String> = app
        .engine
        .store
        .tiers()?
        .into_iter()
        .filter(|t| t.image == image.digest)
        .map(|t| t.name)
        .collect();
    ok(views::ImageView { image, tiers })
}

/// Creates a tier from its specification and mints all K instances.
#[utoipa::path(post, path = "/v1/tiers", tag = "tiers", request_body(content = Object, description = "A tier specification, as `mint tier create -f` reads it"),
    responses((status = 200, description = "The tier (or an NDJSON progress stream)", body = mint_model::records::Tier),
        (status = 400, description = "A field is refused", body = views::ErrorBody)), security(("bearer" = [])))]
async fn create_tier(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    spec: Result<Json<TierSpec>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let spec = match body(spec) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let permit = match long_permit(&app) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    long_operation(wants_stream(&headers), move |report| {
        Box::pin(async move {
            let _permit = permit;
            let tier = app
                .engine
                .create_tier_reporting(&spec, report, &caller.label())
                .await?;
            app.queue.add(&tier.name);
            serde_json::to_value(tier)
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        })
    })
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UpdateImageRequest {
    image: String,
    #[serde(default = "one")]
    batch: u32,
}

fn one() -> u32 {
    1
}

/// `POST /v1/tiers/{name}/image`: re-mints the tier's instances from a new master; the
/// reconciliation loop then rolls the deployed ones, `batch` at a time.
#[utoipa::path(post, path = "/v1/tiers/{name}/image", tag = "tiers", params(("name" = String, Path, description = "The tier")), request_body = UpdateImageRequest,
    responses((status = 200, description = "The tier's new revision", body = views::Revised)), security(("bearer" = [])))]
async fn update_image(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    req: Result<Json<UpdateImageRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body(req) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let permit = match long_permit(&app) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    long_operation(wants_stream(&headers), move |report| {
        Box::pin(async move {
            let _permit = permit;
            let _files = app.image_files.read().await;
            let revision = app
                .engine
                .update_image(&name, &req.image, req.batch, report, &caller.label())
                .await?;
            app.queue.add(&name);
            serde_json::to_value(views::Revised {
                tier: name,
                revision,
            })
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
        })
    })
    .await
}

/// A tier as the API shows it: its record, how many instances hold nodes, and what the
/// reconciler is doing for it.
fn tier_view(app: &App, t: &mint_model::records::Tier) -> Result<views::TierView, ApiError> {
    let inst = app.engine.store.instances(&t.name)?;
    let deployed = inst.iter().filter(|i| i.state.holds_node()).count();
    let status = app.status.get(&t.name);
    Ok(views::TierView {
        tier: t.clone(),
        deployed,
        status: views::TierStatusView {
            generation: t.generation,
            observed_generation: status.observed_generation,
            counts: mint_model::plan::Counts::of(&inst),
            settled: mint_model::plan::settled(t, &inst),
            in_flight: status.in_flight.into_values().collect(),
            blocked: status.blocked,
            last_failure: status.last_failure,
        },
    })
}

/// Every tier with its reconciliation status.
#[utoipa::path(get, path = "/v1/tiers", tag = "tiers",
    responses((status = 200, description = "The tiers", body = [views::TierView])), security(("bearer" = [])))]
async fn list_tiers(State(app): State<Shared>) -> ApiResult {
    let mut out = Vec::new();
    for t in app.engine.store.tiers()? {
        out.push(tier_view(&app, &t)?);
    }
    ok(out)
}

/// One tier with its reconciliation status.
#[utoipa::path(get, path = "/v1/tiers/{name}", tag = "tiers", params(("name" = String, Path, description = "The tier")),
    responses((status = 200, description = "The tier", body = views::TierView),
        (status = 404, description = "No such tier", body = views::ErrorBody)), security(("bearer" = [])))]
async fn show_tier(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let t = app.engine.store.tier(&name)?;
    ok(tier_view(&app, &t)?)
}

/// Deletes a tier whose instances are all in the pool.
#[utoipa::path(delete, path = "/v1/tiers/{name}", tag = "tiers", params(("name" = String, Path, description = "The tier")),
    responses((status = 200, description = "Deleted", body = views::Deleted),
        (status = 409, description = "Instances still hold nodes", body = views::ErrorBody)), security(("bearer" = [])))]
async fn delete_tier(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    app.engine.store.delete_tier(&name, &caller.label())?;
    app.status.forget(&name);
    ok(views::Deleted { deleted: name })
}

/// Records how many instances the tier should run; the reconciler carries it out.
#[utoipa::path(post, path = "/v1/tiers/{name}/scale", tag = "tiers", params(("name" = String, Path, description = "The tier")), request_body = ScaleRequest,
    responses((status = 200, description = "The intent recorded and what will happen", body = views::ScaleAnswer),
        (status = 400, description = "Not a count from 0 to K", body = views::ErrorBody)), security(("bearer" = [])))]
async fn scale(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    req: Result<Json<ScaleRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let req = body(req)?;
    let n = u32::try_from(req.instances).map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "field `instances`: {} is not a count from 0 up",
                req.instances
            ),
        )
    })?;
    // The intent is recorded and the answer says what will happen; the reconciler
    // carries it out, and `GET /v1/tiers/{name}` follows it (`mint tier scale` waits).
    let generation = app.engine.store.set_desired(&name, n, &caller.label())?;
    app.queue.add(&name);
    let inst = app.engine.store.instances(&name)?;
    let counts = mint_model::plan::Counts::of(&inst);
    let active = counts.active();
    ok(views::ScaleAnswer {
        tier: name,
        desired: n,
        generation,
        counts,
        will: views::Will {
            deploy: n.saturating_sub(active),
            undeploy: active.saturating_sub(n),
        },
    })
}

/// The tier's K instances with their identities, states and nodes.
#[utoipa::path(get, path = "/v1/tiers/{name}/instances", tag = "tiers", params(("name" = String, Path, description = "The tier")),
    responses((status = 200, description = "The instances", body = [mint_model::records::Instance])), security(("bearer" = [])))]
async fn instances(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    app.engine.store.tier(&name)?;
    ok(app.engine.store.instances(&name)?)
}

/// Adds a node to the inventory (for BMC drivers; agents register themselves).
#[utoipa::path(post, path = "/v1/nodes", tag = "nodes", request_body = NodeSpec,
    responses((status = 200, description = "The node", body = Node),
        (status = 400, description = "A field is refused", body = views::ErrorBody)), security(("bearer" = [])))]
async fn add_node(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    spec: Result<Json<NodeSpec>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let s = body(spec)?;
    if s.name.is_empty()
        || !s
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "field `name`: `{}` must be letters, digits, `-`, `_` or `.`",
                s.name
            ),
        ));
    }
    if s.cpus == 0 || s.memory_mib == 0 {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "fields `cpus` and `memory-mib` must be above 0".into(),
        ));
    }
    let node = Node {
        name: s.name,
        cpus: s.cpus,
        memory_mib: s.memory_mib,
        arch: s.arch,
        labels: s.labels,
        properties: s.properties,
        state: if s.maintenance {
            NodeState::Maintenance
        } else {
            NodeState::Free
        },
        instance: None,
        load: 0,
        cached: Vec::new(),
    };
    app.engine.store.add_node(&node, &caller.label())?;
    // A new node may be what a waiting tier needs.
    reconciler::queue_all(&app);
    ok(node)
}

/// The node inventory.
#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, description = "The nodes", body = [Node])), security(("bearer" = [])))]
async fn list_nodes(State(app): State<Shared>) -> ApiResult {
    ok(app.engine.store.nodes()?)
}

/// Removes a node that holds no instance.
#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "nodes", params(("name" = String, Path, description = "The node")),
    responses((status = 200, description = "Removed", body = views::Removed)), security(("bearer" = [])))]
async fn remove_node(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    app.engine.store.remove_node(&name, &caller.label())?;
    ok(views::Removed { removed: name })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct MaterializeRequest {
    /// A new directory on the daemon's host.
    into: String,
}

/// Builds an instance's root filesystem in a new directory below the configured root.
#[utoipa::path(post, path = "/v1/tiers/{name}/instances/{index}/materialize", tag = "tiers",
    params(("name" = String, Path, description = "The tier"), ("index" = u32, Path, description = "The instance's index")), request_body = MaterializeRequest,
    responses((status = 200, description = "What was written", body = views::MaterializedInto),
        (status = 403, description = "Materialize is off", body = views::ErrorBody)), security(("bearer" = [])))]
async fn materialize(
    State(app): State<Shared>,
    Path((name, index)): Path<(String, u32)>,
    req: Result<Json<MaterializeRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let req = body(req)?;
    let root = app
        .materialize_root
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(root) = root else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "materialize is off: the operator allows it below one directory, `[materialize] root = \"DIR\"` in the daemon's mint.toml".into(),
        ));
    };
    let into = confine::new_dir_under(&root, &req.into)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let done = off_async_threads(|| app.engine.materialize(&name, index, &into))?;
    ok(views::MaterializedInto {
        done,
        into: into.display().to_string(),
    })
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NodeStateRequest {
    state: String,
    #[serde(default)]
    reason: Option<String>,
}

/// Sets a node free, in maintenance or failed (its instance then moves, identity kept).
#[utoipa::path(post, path = "/v1/nodes/{name}/state", tag = "nodes", params(("name" = String, Path, description = "The node")), request_body = NodeStateRequest,
    responses((status = 200, description = "The node", body = Node)), security(("bearer" = [])))]
async fn set_node_state(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    req: Result<Json<NodeStateRequest>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let req = body(req)?;
    let to = match req.state.as_str() {
        "free" => NodeState::Free,
        "maintenance" => NodeState::Maintenance,
        "failed" => NodeState::Failed,
        other => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("field `state`: `{other}` cannot be set; use free, maintenance or failed"),
            ));
        }
    };
    // A call in flight for the node's instance may answer later; the store's guard discards
    // that answer, since the instance is no longer in that deployment on this node.
    app.engine.store.set_node_state(
        &name,
        to,
        req.reason.as_deref().unwrap_or("set by an operator"),
        &caller.label(),
    )?;
    reconciler::queue_all(&app);
    ok(app.engine.store.node(&name)?)
}

/// `GET /v1/health`, the one route without authentication. A caller on the daemon's own
/// host (loopback) is also told where the first admin token is: the file is the daemon
/// user's alone (mode 0600), so only that user (or root) can read it, which is how the CLI
/// on the same host works with no setup.
#[utoipa::path(get, path = "/v1/health", tag = "daemon",
    responses((status = 200, description = "The daemon answers", body = views::Health)), security(()))]
async fn health(
    State(app): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> ApiResult {
    let role = match app.leadership.role() {
        leader::Role::Leader { token } => views::LeaderRole {
            leads: true,
            fencing_token: Some(token),
            leader: None,
        },
        leader::Role::Follower { leader } => views::LeaderRole {
            leads: false,
            fencing_token: None,
            leader: leader.map(|h| h.url),
        },
    };
    ok(views::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        role,
        token_file: peer.ip().is_loopback().then(|| {
            app.data_dir
                .join(auth::ADMIN_TOKEN_FILE)
                .display()
                .to_string()
        }),
    })
}

/// The API's routes over an engine.
fn router(app: Shared) -> Router {
    // Without a bearer credential: health, and capability URLs, which carry their own proof.
    let open = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi::document))
        .route("/ui", get(console::page))
        .route("/ui/{file}", get(console::file))
        .route(
            "/v1/cap/{tier}/{index}/{token}",
            get(artifacts::cap_describe),
        )
        .route(
            "/v1/cap/{tier}/{index}/{token}/{role}",
            get(artifacts::cap_part)
                .head(artifacts::cap_part)
                .post(artifacts::cap_written),
        )
        .route(
            "/v1/cap/{tier}/{index}/{token}/blob/{digest}",
            get(artifacts::cap_blob).head(artifacts::cap_blob),
        )
        .route(
            "/v1/cap/{tier}/{index}/{token}/blob/{digest}/access",
            get(artifacts::cap_blob_access),
        )
        .merge(netboot::boot_routes());
    let authenticated = Router::new()
        .route("/v1/images", get(list_images).post(import_image))
        .route("/v1/images/gc", post(gc))
        .route("/v1/images/{id}", get(show_image).delete(delete_image))
        .route("/v1/tiers", get(list_tiers).post(create_tier))
        .route("/v1/tiers/{name}", get(show_tier).delete(delete_tier))
        .route("/v1/tiers/{name}/scale", post(scale))
        .route("/v1/tiers/{name}/image", post(update_image))
        .route("/v1/tiers/{name}/instances", get(instances))
        .route(
            "/v1/tiers/{name}/instances/{index}/materialize",
            post(materialize),
        )
        .route("/v1/nodes", get(list_nodes).post(add_node))
        .route("/v1/nodes/{name}", axum::routing::delete(remove_node))
        .route("/v1/nodes/{name}/state", post(set_node_state))
        .route("/v1/events", get(events::events))
        .route("/v1/netboot/dnsmasq", get(netboot::dnsmasq))
        .route("/v1/agents/register", post(identities::register))
        .route("/v1/nodes/{name}/heartbeat", post(liveness::heartbeat))
        .route(
            "/v1/plugins",
            get(plugins::list)
                .post(plugins::install)
                .layer(axum::extract::DefaultBodyLimit::max(
                    mint_plugins::package::MAX_PACKAGE_BYTES as usize,
                )),
        )
        .route(
            "/v1/plugins/{name}",
            get(plugins::show).delete(plugins::remove),
        )
        .route("/v1/artifacts/{tier}/{index}", get(artifacts::describe))
        .route(
            "/v1/artifacts/{tier}/{index}/{role}",
            get(artifacts::part).head(artifacts::part),
        )
        .route(
            "/v1/blobs/{digest}",
            get(artifacts::blob).head(artifacts::blob),
        )
        .route("/v1/blobs/{digest}/access", get(artifacts::access))
        .route("/v1/blobs", get(artifacts::served))
        .route(
            "/v1/tokens",
            get(identities::list_tokens).post(identities::create_token),
        )
        .route(
            "/v1/tokens/{name}",
            axum::routing::delete(identities::revoke_token),
        )
        .route("/v1/nodes/{name}/enroll", post(identities::enroll))
        .route("/v1/whoami", get(identities::whoami))
        .route("/metrics", get(metrics::scrape))
        .route_layer(axum::middleware::from_fn_with_state(
            app.clone(),
            auth::require,
        ));
    open.merge(authenticated)
        // Every body is bounded; plugin packages have their own, larger bound above.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "no such API route; see README for /v1/...".into(),
            )
        })
        // Outermost, so a follower passes a write on before anything here looks at it.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            forward::writes_to_leader,
        ))
        // Outside even that, so forwarded requests are counted where they arrived.
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            metrics::count_requests,
        ))
        .with_state(app)
}

/// The tick: nodes silent too long are declared failed, and every tier is queued. Only the
/// leader acts.
fn tick(app: &Shared) {
    if !app.leadership.is_leading() {
        return;
    }
    liveness::fail_silent_nodes(app);
    reconciler::queue_all(app);
    netboot::keep_hosts_current(app);
}

/// What a daemon does when it becomes the leader of a shared store, before it acts: it
/// starts finishing what the last leader left half-done (a tier minted or deleted in
/// batches), writes the first admin token if the site has none, reloads the plugins installed in the
/// shared directory, and forgets what it knew of calls and heartbeats from an earlier term,
/// so every unfinished deployment is asked about (its BMC or agent read) before it is acted
/// on, and every node gets a full timeout of grace.
pub(crate) fn on_leading(app: &Shared) -> Result<(), String> {
    // A half-minted tier is no tier (nothing selects for it), so removing it, which can
    // take a while for a large one, runs beside the new leader's work instead of before.
    let finishing = app.clone();
    tokio::runtime::Handle::current().spawn_blocking(move || {
        match finishing.engine.store.finish_interrupted() {
            Ok(done) => done.iter().for_each(|d| tracing::warn!("{d}")),
            Err(e) => tracing::warn!("finishing what the last leader left failed: {e}"),
        }
    });
    auth::first_admin_token(&app.data_dir, &app.engine.store)?;
    for problem in app.engine.plugins.preload_installed() {
        tracing::warn!("{problem}");
    }
    app.status.clear();
    app.liveness.clear();
    app.metrics.forget_pending();
    reconciler::queue_all(app);
    Ok(())
}

/// How the daemon serves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the API listens.
    pub listen: SocketAddr,
    /// The URL nodes reach the daemon at (default `http://LISTEN`).
    pub advertise: Option<String>,
    /// How long an agent-managed node may miss heartbeats before it is declared failed.
    pub node_timeout: Duration,
    /// The configuration file; `<data-dir>/mint.toml` when absent, if that exists.
    pub config: Option<std::path::PathBuf>,
    /// Failed authentications one address may make in a minute before it is answered 429.
    pub max_auth_failures: u32,
    /// The certificate to serve TLS with; none serves plain HTTP, which only a loopback
    /// address may.
    pub tls: Option<mint_tls::ServerSource>,
    /// Serve without authentication: every request acts as the identity its route expects.
    /// Only on loopback and only from the library (there is no flag): it exists so a
    /// benchmark can measure what authentication and TLS cost.
    pub unauthenticated: bool,
    /// Where the state lives; `None` is sled in `<data-dir>/state`.
    pub state: Option<mint_store::Location>,
    /// The leader's lease on a shared store ([`leader::DEFAULT_LEASE`] when `None`).
    pub lease: Option<Duration>,
    /// The directory every daemon of a shared store reads blobs and installed plugins
    /// from (`<data-dir>` when `None`, which suits one daemon only).
    pub shared_dir: Option<std::path::PathBuf>,
    /// The CA that issued the other daemons' certificates, for forwarding writes to the
    /// leader; `None` trusts exactly this daemon's own certificate (one for all daemons).
    pub peer_ca: Option<std::path::PathBuf>,
}

impl Options {
    /// Serving on `listen`, advertised as itself, nodes failed after 10 s of silence.
    pub fn new(listen: SocketAddr) -> Options {
        Options {
            listen,
            advertise: None,
            node_timeout: Duration::from_secs(10),
            config: None,
            max_auth_failures: auth::MAX_FAILURES,
            tls: None,
            unauthenticated: false,
            state: None,
            lease: None,
            shared_dir: None,
            peer_ca: None,
        }
    }
}

/// What a daemon that has started serving tells its caller.
#[derive(Debug, Clone)]
pub struct Ready {
    /// The bound address.
    pub addr: SocketAddr,
    /// The URL the API answers at (`http://` or `https://` and the bound address).
    pub url: String,
    /// The pin of the certificate served, when serving TLS.
    pub pin: Option<mint_tls::Pin>,
}

/// Serves the API until `shutdown` resolves, reconciling in the background.
pub async fn serve(
    data_dir: &std::path::Path,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(&Ready),
) -> Result<(), String> {
    let Options {
        listen,
        advertise,
        node_timeout,
        config,
        max_auth_failures,
        tls,
        unauthenticated,
        state,
        lease,
        shared_dir,
        peer_ca,
    } = options;
    // Checked before anything is opened or written, so a refused start changes nothing.
    if tls.is_none() && !listen.ip().is_loopback() {
        return Err(format!(
            "refusing to serve plain HTTP on {listen}, which is not a loopback address: give --tls-self-signed (a certificate made and kept in DATA_DIR/tls), or --tls-cert FILE --tls-key FILE"
        ));
    }
    if unauthenticated && !listen.ip().is_loopback() {
        return Err(format!(
            "an unauthenticated daemon serves loopback only, not {listen}"
        ));
    }
    let config_path = config.or_else(|| Some(data_dir.join("mint.toml")).filter(|p| p.is_file()));
    let config = match &config_path {
        Some(path) => config::Config::read(path)?,
        None => config::Config::default_for_daemon(),
    };
    let state = state.unwrap_or_else(|| mint_store::Location::Sled(data_dir.join("state")));
    // Taken before the state is opened, so a second daemon on this directory opens nothing.
    let data_lock = match &state {
        mint_store::Location::Etcd { .. } => Some(lock_data_dir(data_dir)?),
        mint_store::Location::Sled(_) => None,
    };
    let shared = shared_dir.as_deref().unwrap_or(data_dir);
    let mut engine = Engine::open_with(data_dir, shared, &state).map_err(|e| e.to_string())?;
    let leadership = if engine.store.is_shared() {
        // Nothing is written until this daemon is elected; meanwhile it reads from a cache.
        engine.store.set_fencing(mint_store::Fencing::NotLeading);
        engine.store.start_read_cache().map_err(|e| e.to_string())?;
        leader::Leadership::elected(leader::Timing::with_ttl(
            lease.unwrap_or(leader::DEFAULT_LEASE),
        ))
    } else {
        leader::Leadership::sole()
    };
    let materialize_root = config.materialize_root.clone();
    if let Some(root) = &materialize_root {
        std::fs::create_dir_all(root)
            .map_err(|e| format!("materialize.root: cannot create {}: {e}", root.display()))?;
    }
    let delivery = delivery::Delivery::default();
    let netboot = netboot::Netboot::default();
    config.apply(&engine, &delivery, &netboot);
    engine
        .plugins
        .preload_bundled()
        .map_err(|e| e.to_string())?;
    for problem in engine.plugins.preload_installed() {
        tracing::warn!("{problem}");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let cert = match tls {
        Some(source) => Some(tls::start(data_dir, source, bound, advertise.as_deref())?),
        None => None,
    };
    let listener = match &cert {
        Some(c) => mint_tls::Incoming::tls(listener, c.acceptor())
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?,
        None => mint_tls::Incoming::plain(listener),
    };
    // Drivers hand nodes artifact URLs under this address.
    let advertise = advertise.unwrap_or_else(|| {
        format!(
            "{}://{bound}",
            if cert.is_some() { "https" } else { "http" }
        )
    });
    mint_plugins::HostPattern::of_url(&advertise).map_err(|e| format!("--advertise-url: {e}"))?;
    engine.advertise = advertise;
    if !leadership.shared {
        auth::first_admin_token(data_dir, &engine.store)?;
    }
    let peer_trust = match (&peer_ca, &cert) {
        (Some(ca), _) => Some(
            mint_tls::ClientTrust::new(&mint_tls::Trust::Ca(ca.clone()))
                .map_err(|e| format!("--peer-ca {}: {e}", ca.display()))?,
        ),
        (None, Some(c)) => Some(
            mint_tls::ClientTrust::new(&mint_tls::Trust::Pin(c.pin()))
                .map_err(|e| e.to_string())?,
        ),
        (None, None) => None,
    };
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let metrics = Arc::new(metrics::Metrics::default());
    engine
        .plugins
        .runtime()
        .set_observer(metrics.plugin_observer());
    let app = Arc::new(App {
        engine,
        liveness: liveness::Liveness::new(node_timeout),
        queue: reconciler::Queue::default(),
        status: reconciler::Statuses::default(),
        calls: std::sync::Mutex::new(tokio::task::JoinSet::new()),
        image_files: tokio::sync::RwLock::new(()),
        data_dir: data_dir.to_path_buf(),
        failures: auth::Failures::new(max_auth_failures),
        materialize_root: std::sync::RwLock::new(materialize_root),
        long_operations: Arc::new(tokio::sync::Semaphore::new(MAX_LONG_OPERATIONS)),
        unauthenticated,
        delivery,
        netboot,
        leadership,
        peer_trust,
        event_streams: Arc::new(tokio::sync::Semaphore::new(events::MAX_STREAMS)),
        stopping: stop_rx.clone(),
        metrics,
        _data_lock: data_lock,
    });
    let pin = cert.as_ref().map(|c| c.pin());
    app.engine.plugins.runtime().set_engine_pin(pin);
    app.delivery.set_engine_pin(pin.map(|p| p.to_string()));
    config::reload_on_hangup(app.clone(), config_path, cert, stop_rx.clone());
    let workers = reconciler::start(app.clone(), stop_rx.clone());
    let scrubbing = app.clone();
    let mut scrub_stop = stop_rx.clone();
    let scrubber = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(scrubbing.delivery.scrub_every()) => {
                    artifacts::scrub(&scrubbing).await;
                    // The event log keeps the newest events only, so it stays bounded.
                    if scrubbing.leadership.is_leading()
                        && let Err(e) = scrubbing.engine.store.trim_events(mint_store::EVENTS_KEPT)
                    {
                        tracing::warn!("trimming the event log failed: {e}");
                    }
                }
                _ = scrub_stop.changed() => break,
            }
        }
    });
    // The boot listener: plain HTTP for firmware, serving only the boot routes.
    let booting = match app.netboot.listen() {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|e| format!("netboot.listen: cannot listen on {at}: {e}"))?;
            app.netboot
                .set_url(l.local_addr().map_err(|e| e.to_string())?);
            let mut stop = stop_rx.clone();
            let service =
                netboot::router(app.clone()).into_make_service_with_connect_info::<SocketAddr>();
            Some(tokio::spawn(async move {
                let _ = axum::serve(l, service)
                    .with_graceful_shutdown(async move {
                        let _ = stop.changed().await;
                    })
                    .await;
            }))
        }
        None => None,
    };
    if app.leadership.shared {
        let holder = leader::Holder {
            url: app.engine.advertise.clone(),
            name: format!(
                "mint daemon {} at {}",
                std::process::id(),
                app.engine.advertise
            ),
        };
        leader::start(app.clone(), holder, stop_rx.clone()).await;
    }
    let looping = app.clone();
    let ticker = tokio::spawn(async move {
        tick(&looping);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RECONCILE_EVERY) => tick(&looping),
                _ = stop_rx.changed() => break,
            }
        }
    });
    let scheme = if listener.is_tls() { "https" } else { "http" };
    on_ready(&Ready {
        addr: bound,
        url: format!("{scheme}://{bound}"),
        pin,
    });
    // `tap_io` makes the peer's address available to handlers for any listener.
    axum::serve(
        listener.tap_io(|_| ()),
        router(app.clone()).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await
    .map_err(|e| e.to_string())?;
    // Let steps in progress finish their transactions; driver calls in flight are cut off
    // (each commits in one transaction or not at all, and the next daemon polls them).
    let _ = ticker.await;
    scrubber.abort();
    if let Some(b) = booting {
        b.abort();
    }
    for w in workers {
        let _ = w.await;
    }
    let mut calls = std::mem::take(&mut *app.calls.lock().unwrap_or_else(|p| p.into_inner()));
    calls.shutdown().await;
    Ok(())
}
