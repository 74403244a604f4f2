//! `GET /v1/events`: the event log, a page at a time, or followed as it grows
//! (`follow=true`) as server-sent events: one `id: SEQ` and `data: EVENT` frame per event,
//! so a browser's `EventSource` resumes after a dropped connection from `Last-Event-ID`.
//!
//! A stream reads the log as any page does (from the store, or a follower's cache), a few
//! times a second while nothing is new; the streams open at once are bounded, and every
//! one ends when the daemon stops, so none holds a shutdown up.

use crate::{ApiError, ApiResult, Shared, ok};
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use mint_model::records::Event;
use serde::Deserialize;
use std::time::{Duration, Instant};

/// How many event streams may be open at once; more are answered 429.
pub const MAX_STREAMS: usize = 64;

/// How often a stream looks for new events while there are none.
const POLL: Duration = Duration::from_millis(250);

/// How long a stream may say nothing before it sends a comment, so proxies and clients
/// can tell a quiet stream from a dead one.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The media type of a server-sent event stream.
pub const EVENT_STREAM: &str = "text/event-stream";

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    /// Only events after this sequence number.
    after: Option<u64>,
    /// At most this many (a page; 1000 by default, 10,000 at most).
    limit: Option<usize>,
    /// Only this tier's events.
    tier: Option<String>,
    /// Keep the answer open and send events as they are recorded.
    #[serde(default)]
    follow: bool,
}

/// `GET /v1/events`.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventQuery),
    responses((status = 200, description = "A page of events; with `follow=true` a `text/event-stream` of them", body = [mint_model::records::Event]), (status = 429, description = "Too many streams are open", body = crate::views::ErrorBody)), security(("bearer" = [])))]
pub async fn events(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<EventQuery>,
) -> ApiResult {
    if !q.follow {
        let mut e = app
            .engine
            .store
            .events(q.after, q.limit.unwrap_or(1000).min(10_000))?;
        if let Some(t) = q.tier {
            e.retain(|e| e.tier.as_deref() == Some(t.as_str()));
        }
        return ok(e);
    }
    // A reconnecting EventSource says where it was; an explicit `after` wins.
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let after = match q.after.or(resumed) {
        Some(a) => Some(a),
        // From now on: after the newest event, read once.
        None => newest(&app).await?,
    };
    let permit = app.event_streams.clone().try_acquire_owned().map_err(|_| {
        ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_STREAMS} event streams are open; close one or page with `after` instead of `follow=true`"),
        )
    })?;
    let state = Follow {
        app: app.clone(),
        after,
        tier: q.tier,
        quiet_since: Instant::now(),
        stop: app.stopping.clone(),
        _permit: permit,
    };
    let frames = futures_util::stream::unfold(state, |mut s| async move {
        let chunk = s.next().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), s))
    });
    Ok((
        [
            (header::CONTENT_TYPE, EVENT_STREAM),
            (header::CACHE_CONTROL, "no-cache"),
            // nginx and its kind buffer answers unless told not to.
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(frames),
    )
        .into_response())
}

/// The sequence number of the newest event, if there is one.
async fn newest(app: &Shared) -> Result<Option<u64>, ApiError> {
    let store_app = app.clone();
    let newest = tokio::task::spawn_blocking(move || store_app.engine.store.newest_event_seq())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(newest)
}

/// One open stream.
struct Follow {
    app: Shared,
    after: Option<u64>,
    tier: Option<String>,
    quiet_since: Instant,
    stop: tokio::sync::watch::Receiver<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Follow {
    /// The next frames to send: new events, or a keep-alive; none when the daemon stops.
    async fn next(&mut self) -> Option<String> {
        loop {
            if *self.stop.borrow() {
                return None;
            }
            let app = self.app.clone();
            let after = self.after;
            let read =
                tokio::task::spawn_blocking(move || app.engine.store.events(after, 500)).await;
            let events: Vec<Event> = match read {
                Ok(Ok(e)) => e,
                // The store failing is said once in the stream, which then ends; the client
                // resumes from the last id it saw.
                Ok(Err(e)) => {
                    return Some(format!(
                        "event: error\ndata: {}\n\n",
                        one_line(&e.to_string())
                    ));
                }
                Err(_) => return None,
            };
            if let Some(last) = events.last() {
                self.after = Some(last.seq);
            }
            let frames: String = events
                .iter()
                .filter(|e| self.tier.is_none() || e.tier == self.tier)
                .map(frame)
                .collect();
            if !frames.is_empty() {
                self.quiet_since = Instant::now();
                return Some(frames);
            }
            if !events.is_empty() {
                // A full page of other tiers' events: look again at once.
                continue;
            }
            if self.quiet_since.elapsed() >= KEEP_ALIVE {
                self.quiet_since = Instant::now();
                return Some(": keep-alive\n\n".into());
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = self.stop.changed() => return None,
            }
        }
    }
}

/// One event as a server-sent event frame.
fn frame(e: &Event) -> String {
    let data = serde_json::to_string(e).unwrap_or_default();
    format!("id: {}\ndata: {}\n\n", e.seq, one_line(&data))
}

/// A text on one line: a frame's field ends at a newline (JSON has none outside strings,
/// and escapes those inside; this guards messages that are not JSON).
fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}
