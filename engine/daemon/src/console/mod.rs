//! `GET /ui`: the web console, one page whose HTML, script and style are compiled into the
//! daemon (no CDN, nothing fetched from elsewhere). The page itself holds no data and needs
//! no token; it signs in with an operator token and reads everything through the API with
//! it, so it reaches exactly what that token reaches. A strict Content-Security-Policy lets
//! it load only its own files and talk only to this daemon.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// Only this daemon's own files and API: no inline script, no other origin, no framing.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

/// The console's page.
#[utoipa::path(get, path = "/ui", tag = "console",
    responses((status = 200, description = "The web console", content_type = "text/html")), security(()))]
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

/// The console's script and style.
#[utoipa::path(get, path = "/ui/{file}", tag = "console", params(("file" = String, Path, description = "`app.js` or `style.css`")),
    responses((status = 200, description = "The file"), (status = 404, description = "No such file")), security(()))]
pub async fn file(Path(file): Path<String>) -> Response {
    match file.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", SCRIPT),
        "style.css" => asset("text/css; charset=utf-8", STYLE),
        _ => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({ "error": format!("the console has no file `{file}`; it is app.js, style.css and the page at /ui") })),
        )
            .into_response(),
    }
}
