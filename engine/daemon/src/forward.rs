//! A follower passes writes on to the leader: every request that may change something
//! (any method but GET and HEAD) is forwarded, as it came, to the leader's URL from the
//! leader key, and the leader's answer is streamed back. So clients, agents and boot
//! stages may talk to any daemon of a site; they never need to know which one leads.
//!
//! The caller's credential goes on to the leader, which authenticates it itself, so a
//! follower grants nothing the leader would not.

use crate::leader::Role;
use crate::{ApiError, Shared};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// How long connecting to the leader may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The header a forwarded request carries, naming the follower it came through; a request
/// that already has it is not forwarded again, so two daemons that each think the other
/// leads cannot pass a request back and forth.
pub const FORWARDED_HEADER: &str = "mint-forwarded-by";

/// Middleware: a follower forwards writes to the leader; reads, and everything on a
/// leader, are served here.
pub async fn writes_to_leader(State(app): State<Shared>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) || app.leadership.is_leading() {
        return next.run(req).await;
    }
    let leader = match app.leadership.role() {
        Role::Follower { leader: Some(h) } => h,
        _ => {
            return ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                "no daemon leads at the moment (an election is under way); retry in a few seconds"
                    .into(),
            )
            .into_response();
        }
    };
    if req.headers().contains_key(FORWARDED_HEADER) {
        return ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "this daemon does not lead either; the leader it knows of is {} and a new one may be taking over: retry in a few seconds",
                leader.url
            ),
        )
        .into_response();
    }
    match forward(&app, &leader.url, req).await {
        Ok(r) => r,
        Err(why) => ApiError(
            StatusCode::BAD_GATEWAY,
            format!("this daemon follows; passing the request to the leader at {} failed: {why}; retry, since a new leader may be taking over", leader.url),
        )
        .into_response(),
    }
}

/// Sends `req` to the daemon at `base` and returns its answer.
async fn forward(app: &Shared, base: &str, req: Request) -> Result<Response, String> {
    let url: axum::http::Uri = base
        .parse()
        .map_err(|e| format!("the leader's URL {base}: {e}"))?;
    let tls = url.scheme_str() == Some("https");
    let host = url
        .host()
        .ok_or_else(|| format!("the leader's URL {base} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connecting timed out".to_string())?
    .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = path.parse().map_err(|e| format!("{e}"))?;
    for hop in [header::CONNECTION, header::TE, header::UPGRADE] {
        parts.headers.remove(hop);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{host}:{port}")) {
        parts.headers.insert(header::HOST, v);
    }
    if let Ok(v) = HeaderValue::from_str(&app.engine.advertise) {
        parts.headers.insert(FORWARDED_HEADER, v);
    }
    let req = axum::http::Request::from_parts(parts, body);
    let response = if tls {
        let name = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => tokio_rustls::rustls::pki_types::ServerName::from(ip),
            Err(_) => tokio_rustls::rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("the leader's host {host}: {e}"))?,
        };
        let trust = app
            .peer_trust
            .as_ref()
            .ok_or("no trust for other daemons' certificates is set (give --peer-ca, or serve every daemon with one certificate)")?;
        let connector = tokio_rustls::TlsConnector::from(trust.config());
        let io = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| "the TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS: {e}"))?;
        send(TokioIo::new(io), req).await?
    } else {
        send(TokioIo::new(tcp), req).await?
    };
    Ok(response.map(Body::new).into_response())
}

async fn send<I>(
    io: I,
    req: axum::http::Request<Body>,
) -> Result<axum::http::Response<hyper::body::Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        tokio::time::timeout(CONNECT_TIMEOUT, hyper::client::conn::http1::handshake(io))
            .await
            .map_err(|_| "the HTTP handshake timed out".to_string())?
            .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| format!("HTTP: {e}"))
}
