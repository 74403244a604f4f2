//! The plugin API: `GET /v1/plugins` lists every plugin the engine can name, `GET
//! /v1/plugins/{name}` inspects one, `POST /v1/plugins` installs a package (the body; its
//! minisign signature base64-encoded in the `Mint-Signature` header), `DELETE
//! /v1/plugins/{name}` removes an installed one. Installing replaces a plugin of the same
//! name for calls that start afterwards; calls in flight finish on the old version.

use crate::auth::Caller;
use crate::{ApiError, ApiResult, Shared, ok};
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::json;

/// The header that carries a package's signature (the `.minisig` file, base64).
pub const SIGNATURE_HEADER: &str = "mint-signature";

#[utoipa::path(get, path = "/v1/plugins", tag = "plugins",
    responses((status = 200, description = "Bundled and installed plugins (one that cannot be read is `{name, error}`)", body = [mint_core::PluginInfo])), security(("bearer" = [])))]
pub async fn list(State(app): State<Shared>) -> ApiResult {
    let listed = crate::off_async_threads(|| app.engine.plugins.list());
    let out: Vec<serde_json::Value> = listed
        .into_iter()
        .map(|r| match r {
            Ok(info) => serde_json::to_value(info).unwrap_or_default(),
            Err((name, error)) => json!({ "name": name, "error": error }),
        })
        .collect();
    ok(out)
}

#[utoipa::path(get, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path, description = "The plugin")),
    responses((status = 200, description = "The plugin: manifest, digest, signer, costs", body = mint_core::PluginInfo), (status = 404, description = "No such plugin", body = crate::views::ErrorBody)), security(("bearer" = [])))]
pub async fn show(State(app): State<Shared>, Path(name): Path<String>) -> ApiResult {
    let info =
        crate::off_async_threads(|| app.engine.plugins.info(&name)).map_err(|e| match e {
            mint_core::EngineError::Invalid(m) if m.starts_with("no plugin named") => {
                ApiError(StatusCode::NOT_FOUND, m)
            }
            other => other.into(),
        })?;
    ok(info)
}

#[utoipa::path(post, path = "/v1/plugins", tag = "plugins", request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A package, `mint plugin pack`'s file; its signature in `mint-signature`"),
    responses((status = 201, description = "Installed", body = mint_core::PluginInfo)), security(("bearer" = [])))]
pub async fn install(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    package: Bytes,
) -> ApiResult {
    use base64::Engine as _;
    let signature = match headers.get(SIGNATURE_HEADER) {
        None => None,
        Some(v) => {
            let text = v
                .to_str()
                .ok()
                .and_then(|t| base64::engine::general_purpose::STANDARD.decode(t.trim()).ok())
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError(StatusCode::BAD_REQUEST, format!("header `{SIGNATURE_HEADER}`: must be the .minisig file's text, base64-encoded")))?;
            Some(text)
        }
    };
    if package.is_empty() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "request body: send the package file's bytes (`mint plugin pack` makes one)".into(),
        ));
    }
    // Compiling a component takes from milliseconds to seconds; keep it off the workers
    // that serve other requests.
    let info =
        crate::off_async_threads(|| app.engine.install_plugin(&package, signature.as_deref()))?;
    let _ = app.engine.store.note(
        "plugin-installed",
        format!(
            "plugin `{}` {} ({}) installed, signed by {}",
            info.name, info.version, info.kind, info.signer
        ),
        json!({ "sha256": info.sha256, "signer": info.signer, "wit": info.wit }),
        &caller.label(),
    );
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

#[utoipa::path(delete, path = "/v1/plugins/{name}", tag = "plugins", params(("name" = String, Path, description = "The plugin")),
    responses((status = 200, description = "Removed", body = crate::views::Removed)), security(("bearer" = [])))]
pub async fn remove(
    State(app): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult {
    crate::off_async_threads(|| app.engine.remove_plugin(&name))?;
    let _ = app.engine.store.note(
        "plugin-removed",
        format!("plugin `{name}` removed"),
        json!({}),
        &caller.label(),
    );
    ok(json!({ "removed": name }))
}
