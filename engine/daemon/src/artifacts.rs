//! The artifact server: what nodes fetch to run an instance. `GET /v1/artifacts/{tier}/{index}`
//! describes an instance's parts, and `GET /v1/artifacts/{tier}/{index}/{role}` serves one
//! part by its role (a BMC takes one URL per virtual-media device and cannot read the
//! descriptor); `GET` or `HEAD /v1/blobs/{digest}` serves each part's
//! bytes at a stable URL, with its digest as a strong ETag (`If-None-Match` answers 304)
//! and single byte ranges (`Range: bytes=a-b`, `a-`, `-n`; 206, or 416 when unsatisfiable),
//! so an agent or a BMC can resume a large download. Blobs never change, so they carry
//! `Cache-Control: immutable` and any HTTP cache can front the engine. Each is checked
//! against its digest before it is first served (see `delivery.rs`); a corrupt one is
//! quarantined and answered 410, naming what to do. `GET /v1/blobs` tells what each blob
//! cost on the wire. With `[artifacts] blob-base`, descriptors send nodes to an HTTP cache
//! for blobs, which asks `GET /v1/blobs/{digest}/access` whether each node may read one.

use crate::auth::Caller;
use crate::{ApiError, Shared, ok};
use axum::body::Body;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::io::SeekFrom;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// The answer to a node asking for an instance that is not bound to it: the same as for
/// an instance that does not exist, so a node learns nothing about other tiers.
fn not_found_instance(tier: &str, index: u32) -> ApiError {
    ApiError::from(mint_store::StoreError::NotFound {
        what: "instance",
        name: format!("{tier}/{index}"),
    })
}

/// Whether `caller` may read instance `tier/index`'s artifact: operators (the router lets
/// only admins reach here) may; a node only the instance bound to it.
fn may_read(app: &Shared, caller: &Caller, tier: &str, index: u32) -> Result<(), ApiError> {
    match caller {
        Caller::Node { name, .. } => {
            let bound = app.engine.store.node(name).ok().and_then(|n| n.instance);
            if bound.is_some_and(|i| i.tier == tier && i.index == index) {
                Ok(())
            } else {
                Err(not_found_instance(tier, index))
            }
        }
        _ => Ok(()),
    }
}

/// `GET /v1/artifacts/{tier}/{index}`.
#[utoipa::path(get, path = "/v1/artifacts/{tier}/{index}", tag = "artifacts", params(("tier" = String, Path, description = "The tier"), ("index" = u32, Path, description = "The instance's index")),
    responses((status = 200, description = "The instance's artifact descriptor: its parts with digests and URLs", body = mint_core::Artifact), (status = 404, description = "No such instance, or not this node's", body = crate::views::ErrorBody)), security(("bearer" = [])))]
pub async fn describe(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((tier, index)): Path<(String, u32)>,
) -> Result<Response, ApiError> {
    may_read(&app, &caller, &tier, index)?;
    let mut artifact = {
        let _files = app.image_files.read().await;
        crate::off_async_threads(|| app.engine.artifact(&tier, index))?
    };
    if let Some(base) = app.delivery.blob_base() {
        for p in &mut artifact.parts {
            p.url = format!("{base}/v1/blobs/{}", p.digest);
        }
    }
    ok(artifact)
}

/// `GET` and `HEAD /v1/artifacts/{tier}/{index}/{role}`: the part of that role, served as
/// its blob is.
#[utoipa::path(get, path = "/v1/artifacts/{tier}/{index}/{role}", tag = "artifacts", params(("tier" = String, Path, description = "The tier"), ("index" = u32, Path, description = "The instance's index"), ("role" = String, Path, description = "The part: `layer`, `disk`, `seed`, `kernel`, `initrd`, ...")),
    responses((status = 200, description = "The part's bytes (ranges, ETag, digests)", content_type = "application/octet-stream")), security(("bearer" = [])))]
pub async fn part(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    method: Method,
    headers: HeaderMap,
    Path((tier, index, role)): Path<(String, u32, String)>,
) -> Response {
    if let Err(e) = may_read(&app, &caller, &tier, index) {
        return e.into_response();
    }
    let described = {
        let _files = app.image_files.read().await;
        crate::off_async_threads(|| app.engine.artifact(&tier, index))
    };
    let artifact = match described {
        Ok(a) => a,
        Err(e) => return ApiError::from(e).into_response(),
    };
    match artifact.parts.iter().find(|p| p.role == role) {
        Some(p) => serve(&app, method, &headers, &p.digest).await,
        None => {
            let roles: Vec<&str> = artifact.parts.iter().map(|p| p.role).collect();
            ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "instance {tier}/{index} ({}) has no part `{role}`; its parts are {}",
                    artifact.format,
                    roles.join(", ")
                ),
            )
            .into_response()
        }
    }
}

/// A parsed `Range` header against a blob of `len` bytes: `None` for the whole blob,
/// `Some(Ok((start, end)))` for an inclusive satisfiable range, `Some(Err(()))` when the
/// range cannot be satisfied. Several ranges are answered with the whole blob, as HTTP
/// allows.
fn range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = headers
        .get(header::RANGE)?
        .to_str()
        .ok()?
        .trim()
        .strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    let r = match (a.is_empty(), b.is_empty()) {
        (true, false) => {
            let n: u64 = b.parse().ok()?;
            if n == 0 || len == 0 {
                Err(())
            } else {
                Ok((len.saturating_sub(n), len - 1))
            }
        }
        (false, _) => {
            let start: u64 = a.parse().ok()?;
            let end: u64 = if b.is_empty() {
                len.saturating_sub(1)
            } else {
                b.parse::<u64>().ok()?.min(len.saturating_sub(1))
            };
            if start >= len || end < start {
                Err(())
            } else {
                Ok((start, end))
            }
        }
        (true, true) => return None,
    };
    Some(r)
}

/// Whether `caller` may read blob `digest`: a node only the parts of the instance bound to
/// it; operators (the router lets only those who read artifacts reach here) any blob.
async fn may_read_blob(app: &Shared, caller: &Caller, digest: &str) -> bool {
    let Caller::Node { name, .. } = caller else {
        return true;
    };
    let bound = app.engine.store.node(name).ok().and_then(|n| n.instance);
    let parts = match bound {
        Some(id) => {
            let _files = app.image_files.read().await;
            crate::off_async_threads(|| app.engine.artifact(&id.tier, id.index))
                .map(|a| a.parts)
                .unwrap_or_default()
        }
        None => Vec::new(),
    };
    parts.iter().any(|p| p.digest == digest)
}

/// `GET` and `HEAD /v1/blobs/{digest}`. A node may read only the parts of the instance
/// bound to it; any other digest is answered as one that does not exist.
#[utoipa::path(get, path = "/v1/blobs/{digest}", tag = "artifacts", params(("digest" = String, Path, description = "`sha256:<hex>`")),
    responses((status = 200, description = "The blob's bytes", content_type = "application/octet-stream"), (status = 404, description = "No such blob, or not this node's", body = crate::views::ErrorBody)), security(("bearer" = [])))]
pub async fn blob(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    method: Method,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Response {
    if !may_read_blob(&app, &caller, &digest).await {
        return no_blob(&digest).into_response();
    }
    serve(&app, method, &headers, &digest).await
}

/// `GET /v1/blobs/{digest}/access`: whether the caller may read that blob, for an HTTP
/// cache in front of the engine to ask before it answers from its copy (nginx's
/// `auth_request`): 204 when it may, 403 when it may not or no such blob is stored, one
/// answer for both so that a node learns nothing about blobs that are not its own. A
/// quarantined blob is still admitted: the cache's copy was checked when the engine sent
/// it, and on a miss the engine itself answers 410 with what to do.
#[utoipa::path(get, path = "/v1/blobs/{digest}/access", tag = "artifacts", params(("digest" = String, Path, description = "`sha256:<hex>`")),
    responses((status = 204, description = "The caller may read the blob (an HTTP cache's auth request)"), (status = 403, description = "It may not")), security(("bearer" = [])))]
pub async fn access(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(digest): Path<String>,
) -> Response {
    let stored =
        app.engine.images.locate(&digest).is_some() || app.delivery.is_quarantined(&digest);
    if stored && may_read_blob(&app, &caller, &digest).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ApiError(
            StatusCode::FORBIDDEN,
            format!("this credential may not read blob `{digest}`"),
        )
        .into_response()
    }
}

/// The answer to a capability that admits nothing (forged, expired, or for a deployment
/// that has ended): one answer for every reason.
pub(crate) fn no_capability() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no artifact at this capability URL (it may have expired, or its deployment ended)".into(),
    )
}

/// `GET /v1/cap/{tier}/{index}/{token}`: the descriptor of the deployment a capability
/// names, with its parts' URLs under the same capability.
#[utoipa::path(get, path = "/v1/cap/{tier}/{index}/{token}", tag = "capabilities", params(("tier" = String, Path, description = "The tier"), ("index" = u32, Path, description = "The instance's index"), ("token" = String, Path, description = "The capability (an HMAC over the tier, index, deployment and expiry)")),
    responses((status = 200, description = "The descriptor, its parts' URLs under the same capability", body = Object), (status = 403, description = "The capability is wrong, expired or of another deployment", body = crate::views::ErrorBody)), security(()))]
pub async fn cap_describe(
    State(app): State<Shared>,
    Path((tier, index, token)): Path<(String, u32, String)>,
) -> Result<Response, ApiError> {
    let Some(inst) = app.engine.capability_instance(&tier, index, &token) else {
        return Err(no_capability());
    };
    let mut artifact = {
        let _files = app.image_files.read().await;
        crate::off_async_threads(|| app.engine.artifact(&tier, index))?
    };
    let base = app.delivery.blob_base();
    for p in &mut artifact.parts {
        p.url = match &base {
            // Through the cache, by digest (which the cache keys on), under the capability
            // (which the engine checks for the cache).
            Some(base) => format!("{base}/v1/cap/{tier}/{index}/{token}/blob/{}", p.digest),
            None => format!("/v1/cap/{tier}/{index}/{token}/{}", p.role),
        };
    }
    let mut v = serde_json::to_value(&artifact)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    // A disk instance on a BMC is written to the server's disk by the deploy system: where
    // its parts are, and what it reported for this deployment.
    if artifact.format == "disk"
        && let Some((digest, size)) = app.delivery.deploy_iso()
    {
        let cap = format!("/v1/cap/{tier}/{index}/{token}");
        v["deploy"] = serde_json::json!({
            "iso": format!("{cap}/deploy-iso"), "iso-digest": digest, "iso-size": size,
            "config": format!("{cap}/deploy-config"), "report": format!("{cap}/written"),
        });
        if let Some(w) = app.delivery.written(&tier, index, inst.deployment) {
            v["written"] = w;
        }
    }
    // A network-booted tree instance: what its boot stage reported.
    if artifact.format == "tree"
        && let Some(b) = app.delivery.written(&tier, index, inst.deployment)
    {
        v["booted"] = b;
    }
    ok(v)
}

/// The deploy system's configuration for a deployment: a floppy-sized FAT volume labelled
/// `MINTDEPLOY` holding `deploy.json` (the deployment's descriptor and report URLs under its
/// capability, the engine's pin, and the instance's address, which the deploy system
/// borrows). Built on request: it carries the capability, which is the deployment's.
fn deploy_config(app: &Shared, tier: &str, index: u32, token: &str) -> Result<Vec<u8>, ApiError> {
    let inst = app
        .engine
        .capability_instance(tier, index, token)
        .ok_or_else(no_capability)?;
    let t = app
        .engine
        .store
        .tier(tier)
        .map_err(mint_core::EngineError::from)?;
    let cap = format!(
        "{}/v1/cap/{tier}/{index}/{token}",
        app.engine.advertise.trim_end_matches('/')
    );
    let config = serde_json::json!({
        "descriptor": cap, "report": format!("{cap}/written"), "pin": app.delivery.engine_pin(),
        "address": inst.address.to_string(), "prefix-len": t.plan.subnet.prefix_len(), "gateway": t.plan.gateway.map(|g| g.to_string()),
    });
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    mint_core::images::seed::fat_volume(*b"MINTDEPLOY ", &[("deploy.json", text)])
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// `POST /v1/cap/{tier}/{index}/{token}/written` (the deploy system's report: the disk
/// written and checked, or why not) and `.../booted` (the boot stage's: the instance
/// fetched, checked and unpacked, or why not): kept for the deployment's descriptor, where
/// a driver reads it, and noted as an event.
#[utoipa::path(post, path = "/v1/cap/{tier}/{index}/{token}/{role}", tag = "capabilities", params(("tier" = String, Path, description = "The tier"), ("index" = u32, Path, description = "The instance's index"), ("token" = String, Path, description = "The capability (an HMAC over the tier, index, deployment and expiry)"), ("role" = String, Path, description = "The part: `layer`, `disk`, `seed`, `kernel`, `initrd`, ...")),
    responses((status = 200, description = "What the deploy system wrote, noted as an event", body = Object)), security(()))]
pub async fn cap_written(
    State(app): State<Shared>,
    Path((tier, index, token, role)): Path<(String, u32, String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Some(inst) = app
        .engine
        .capability_instance(&tier, index, &token)
        .filter(|i| match role.as_str() {
            "written" => i.disk.is_some(),
            "booted" => i.disk.is_none(),
            _ => false,
        })
    else {
        return Err(no_capability());
    };
    if body.len() > 16 << 10 {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "a report is at most 16 KiB".into(),
        ));
    }
    let report: serde_json::Value = serde_json::from_slice(&body)
        .ok()
        .filter(|v: &serde_json::Value| v["ok"].is_boolean())
        .ok_or_else(|| {
            ApiError(
                StatusCode::BAD_REQUEST,
                "field `ok`: a report is a JSON object with `ok` true or false".into(),
            )
        })?;
    let ok_ = report["ok"] == true;
    let why = || {
        report["error"]
            .as_str()
            .unwrap_or("no reason given")
            .to_string()
    };
    let (kind, what) = match (role.as_str(), ok_) {
        ("written", true) => (
            "disk-written",
            format!(
                "the deploy system wrote {tier}/{index}'s master to {} ({} bytes; fetched and written in {} ms)",
                report["target"].as_str().unwrap_or("the disk"),
                report["bytes"],
                report["fetch-write-ms"]
            ),
        ),
        ("written", false) => (
            "disk-write-failed",
            format!(
                "the deploy system could not write {tier}/{index}'s disk: {}",
                why()
            ),
        ),
        (_, true) => (
            "instance-booted",
            format!(
                "the boot stage unpacked {tier}/{index} ({} bytes fetched and checked in {} ms, {} ms after power-on) and switches into it",
                report["bytes"], report["fetch-unpack-ms"], report["booted-ms"]
            ),
        ),
        (_, false) => (
            "boot-failed",
            format!("the boot stage could not boot {tier}/{index}: {}", why()),
        ),
    };
    tracing::info!("{what}");
    let _ = app
        .engine
        .store
        .note(kind, what, report.clone(), mint_model::records::ENGINE);
    app.delivery
        .set_written(&tier, index, inst.deployment, report);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Whether the capability `token` for `tier/index` admits blob `digest` (one of that
/// instance's parts).
async fn cap_admits(app: &Shared, tier: &str, index: u32, token: &str, digest: &str) -> bool {
    if app.engine.capability_instance(tier, index, token).is_none() {
        return false;
    }
    let _files = app.image_files.read().await;
    crate::off_async_threads(|| app.engine.artifact(tier, index))
        .is_ok_and(|a| a.parts.iter().any(|p| p.digest == digest))
}

/// `GET` and `HEAD /v1/cap/{tier}/{index}/{token}/blob/{digest}`: one part by its digest,
/// under a capability: the form a descriptor gives when an HTTP cache fronts the engine.
#[utoipa::path(get, path = "/v1/cap/{tier}/{index}/{token}/blob/{digest}", tag = "capabilities", params(("tier" = String, Path, description = "The tier"), ("index" = u32, Path, description = "The instance's index"), ("token" = String, Path, description = "The capability (an HMAC over the tier, index, deployment and expiry)"), ("digest" = String, Path, description = "`sha256:<hex>`")),
    responses((status = 200, description = "The blob's bytes", content_type = "application/octet-stream")), security(()))]
pub async fn cap_blob(
    State(app): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Path((tier, index, token, digest)): Path<(String, u32, String, String)>,
) -> Response {
    if !cap_admits(&app, &tier, index, &token, &digest).await {
        return no_capability().into_response();
    }
    serve(&app, method, &headers, &digest).await
}

/// `GET /v1/cap/{tier}/{index}/{token}/blob/{digest}/access`: whether the capability
/// admits that blob, for the cache (204 or 403, as `/v1/blobs/{digest}/access`).
#[utoipa::path(get, path = "/v1/cap/{tier}/{index}/{token}/blob/{digest}/access", tag = "capabilities", params(("tier" = String, Path, description = "The tier"), ("index" = u32, Path, description = "The instance's index"), ("token" = String, Path, description = "The capability (an HMAC over the tier, index, deployment and expiry)"), ("digest" = String, Path, description = "`sha256:<hex>`")),
    responses((status = 204, description = "The capability admits the blob"), (status = 403, description = "It does not")), security(()))]
pub async fn cap_blob_access(
    State(app): State<Shared>,
    Path((tier, index, token, digest)): Path<(String, u32, String, String)>,
) -> Response {
    if cap_admits(&app, &tier, index, &token, &digest).await {
        StatusCode::NO_CONTENT.into_response()
    } else {
        ApiError(
            StatusCode::FORBIDDEN,
            "this capability admits no such blob (it may have expired, or its deployment ended)"
                .into(),
        )
        .into_response()
    }
}

/// `GET` and `HEAD /v1/cap/{tier}/{index}/{token}/{role}`: one part, by capability.
#[utoipa::path(get, path = "/v1/cap/{tier}/{index}/{token}/{role}", tag = "capabilities", params(("tier" = String, Path, description = "The tier"), ("index" = u32, Path, description = "The instance's index"), ("token" = String, Path, description = "The capability (an HMAC over the tier, index, deployment and expiry)"), ("role" = String, Path, description = "The part: `layer`, `disk`, `seed`, `kernel`, `initrd`, ...")),
    responses((status = 200, description = "The part's bytes", content_type = "application/octet-stream")), security(()))]
pub async fn cap_part(
    State(app): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Path((tier, index, token, role)): Path<(String, u32, String, String)>,
) -> Response {
    if app
        .engine
        .capability_instance(&tier, index, &token)
        .is_none()
    {
        return no_capability().into_response();
    }
    if role == "kernel" || role == "modules" {
        return crate::netboot::cap_boot_file(State(app), method, Path((tier, index, token, role)))
            .await;
    }
    if role == "deploy-config" {
        return match deploy_config(&app, &tier, index, &token) {
            Ok(bytes) => (
                [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
                if method == Method::HEAD {
                    Vec::new()
                } else {
                    bytes
                },
            )
                .into_response(),
            Err(e) => e.into_response(),
        };
    }
    if role == "deploy-iso" {
        return match app.delivery.deploy_iso() {
            Some((digest, _)) => serve(&app, method, &headers, &digest).await,
            None => ApiError(StatusCode::NOT_FOUND, "this engine serves no deploy ISO; give the daemon `[deploy] iso = \"FILE\"` (`cargo xtask deploy-iso` builds one)".into()).into_response(),
        };
    }
    let described = {
        let _files = app.image_files.read().await;
        crate::off_async_threads(|| app.engine.artifact(&tier, index))
    };
    match described.map(|a| a.parts.into_iter().find(|p| p.role == role)) {
        Ok(Some(p)) => serve(&app, method, &headers, &p.digest).await,
        Ok(None) => no_capability().into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

fn no_blob(digest: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("no blob `{digest}`; blob URLs come from /v1/artifacts/{{tier}}/{{index}}"),
    )
}

/// The answer for a blob found corrupt on the engine's disk.
fn quarantined(digest: &str) -> ApiError {
    ApiError(
        StatusCode::GONE,
        format!(
            "blob {digest} is corrupt on the engine's disk and was quarantined; import its master again (or restore the file) and redeploy"
        ),
    )
}

/// Checks `digest`'s stored bytes (once per daemon start, unless a scrub asks again);
/// quarantines and reports a corrupt one.
pub(crate) async fn check_blob(app: &Shared, digest: &str) -> Result<(), ApiError> {
    if app.delivery.is_quarantined(digest) {
        return Err(quarantined(digest));
    }
    let (a, d) = (app.clone(), digest.to_string());
    let checked = app
        .delivery
        .checked(digest, move || {
            a.engine
                .images
                .verify(&d)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await;
    let Err(why) = checked else { return Ok(()) };
    app.delivery.quarantine(digest);
    let (a, d) = (app.clone(), digest.to_string());
    let moved = tokio::task::spawn_blocking(move || a.engine.images.quarantine(&d)).await;
    let to = match moved {
        Ok(Ok(Some(p))) => p.display().to_string(),
        Ok(Ok(None)) => "nowhere (it is gone)".into(),
        Ok(Err(e)) => format!("nowhere ({e})"),
        Err(e) => format!("nowhere ({e})"),
    };
    tracing::error!("blob {digest} is corrupt: {why}; quarantined to {to}");
    let _ = app.engine.store.note(
        "blob-quarantined",
        format!("blob {digest} is corrupt on the engine's disk ({why}); moved to {to}, no node is offered it"),
        serde_json::json!({ "digest": digest, "to": to }),
        mint_model::records::ENGINE,
    );
    Err(quarantined(digest))
}

/// Checks every stored blob again, quarantining and reporting the corrupt ones.
pub(crate) async fn scrub(app: &Shared) {
    app.delivery.recheck_all();
    let stored = app.engine.images.stored();
    let mut bad = 0;
    for digest in &stored {
        let _files = app.image_files.read().await;
        if check_blob(app, digest).await.is_err() {
            bad += 1;
        }
    }
    tracing::info!("scrub: {} blobs checked, {bad} corrupt", stored.len());
}

/// `GET /v1/blobs`: what each blob cost on the wire since the daemon started, and the
/// blobs quarantined.
#[utoipa::path(get, path = "/v1/blobs", tag = "artifacts",
    responses((status = 200, description = "Transfer counts and quarantined blobs", body = crate::views::Delivered)), security(("bearer" = [])))]
pub async fn served(State(app): State<Shared>) -> Result<Response, ApiError> {
    ok(crate::views::Delivered {
        served: app.delivery.served(),
        quarantined: app.delivery.quarantined(),
    })
}

async fn serve(app: &Shared, method: Method, headers: &HeaderMap, digest: &str) -> Response {
    if let Err(e) = check_blob(app, digest).await {
        return e.into_response();
    }
    let Some(path) = app.engine.images.locate(digest) else {
        return no_blob(digest).into_response();
    };
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            return ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot open blob {digest}: {e}"),
            )
            .into_response();
        }
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(e) => {
            return ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot stat blob {digest}: {e}"),
            )
            .into_response();
        }
    };
    let etag = format!("\"{digest}\"");
    let mut base = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "public, max-age=31536000, immutable")
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            "Digest",
            HeaderValue::from_str(&format!("sha-256={}", sha256_base64(&digest)))
                .unwrap_or(HeaderValue::from_static("")),
        );
    let matches = |h: &HeaderValue| {
        h.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    };
    if headers.get(header::IF_NONE_MATCH).is_some_and(matches) {
        app.delivery.request(digest, true);
        return base
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .unwrap_or_default();
    }
    let (status, start, count) = match range(headers, len) {
        None => (StatusCode::OK, 0, len),
        Some(Ok((a, b))) => {
            base = base.header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{len}"));
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
        Some(Err(())) => {
            return base
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap_or_default();
        }
    };
    let base = base.status(status).header(header::CONTENT_LENGTH, count);
    if method == Method::HEAD {
        return base.body(Body::empty()).unwrap_or_default();
    }
    if let Err(e) = file.seek(SeekFrom::Start(start)).await {
        return ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read blob {digest}: {e}"),
        )
        .into_response();
    }
    app.delivery.request(digest, false);
    // A place among the transfers in flight, held until the body is sent (or the client
    // goes away and the stream is dropped).
    let permit = app.delivery.transfer().await;
    let state = (
        file.take(count),
        vec![0u8; crate::delivery::CHUNK],
        permit,
        app.clone(),
        digest.to_string(),
    );
    let chunks =
        futures_util::stream::unfold(state, |(mut r, mut buf, permit, app, digest)| async move {
            match r.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    app.delivery.pace(n).await;
                    app.delivery.count(&digest, n as u64);
                    Some((
                        Ok::<_, std::io::Error>(axum::body::Bytes::copy_from_slice(&buf[..n])),
                        (r, buf, permit, app, digest),
                    ))
                }
                Err(e) => Some((Err(e), (r, buf, permit, app, digest))),
            }
        });
    base.body(Body::from_stream(chunks)).unwrap_or_default()
}

/// The base64 of a `sha256:<hex>` digest's bytes, for the `Digest` header.
fn sha256_base64(digest: &str) -> String {
    use base64::Engine as _;
    let bytes = hex::decode(digest.trim_start_matches("sha256:")).unwrap_or_default();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
