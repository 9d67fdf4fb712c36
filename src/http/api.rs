//! The JSON API beside the SSE bridge, and health endpoints.

use axum::body::{to_bytes, Body};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

use super::envelope::event_value;
use super::sse::parse_list;
use super::{ApiError, HttpState};
use crate::engine::NewEvent;

/// Prefix of request headers carried into the event's headers.
pub(crate) const HEADER_PREFIX: &str = "x-ringcast-header-";
/// Most events in one history page.
const MAX_HISTORY: usize = 1_000;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct PublishQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
}

/// `POST /v1/topics/{topic}/events?type=T`: the body is the payload;
/// `X-Ringcast-Header-<name>: <value>` request headers become event headers.
/// Answers `{epoch, offset, version}` once the event is acknowledged.
pub(crate) async fn publish(
    State(state): State<HttpState>,
    Path(topic): Path<String>,
    Query(query): Query<PublishQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let event_type = query
        .event_type
        .ok_or_else(|| ApiError::bad_request("missing ?type=<event type>"))?;
    let max = state.settings.max_payload;
    let payload = to_bytes(body, usize::try_from(max).unwrap_or(usize::MAX))
        .await
        .map_err(|_| {
            crate::metrics::refused("max_payload");
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("payload exceeds the limit of {max} bytes"),
            )
        })?;
    let mut event_headers = Vec::new();
    for (name, value) in &headers {
        if let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) {
            let value = value.to_str().map_err(|_| {
                ApiError::bad_request(format!("header {name} is not visible ASCII"))
            })?;
            event_headers.push((key.to_owned(), value.to_owned()));
        }
    }
    let event = NewEvent {
        event_type,
        headers: event_headers,
        payload,
    };
    let ack = state.engine.publish(&topic, event).await?;
    Ok(Json(json!({
        "epoch": ack.epoch.to_string(),
        "offset": ack.offset,
        "version": ack.version,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct HistoryQuery {
    after: Option<u64>,
    types: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/topics/{topic}/history?after=N&types=a,b&limit=L`.
pub(crate) async fn history(
    State(state): State<HttpState>,
    Path(topic): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Json<Value>, ApiError> {
    let types = parse_list(query.types.as_deref());
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_HISTORY);
    let page = state
        .engine
        .history(&topic, query.after.unwrap_or(0), &types, limit)?;
    let events: Vec<Value> = page.events.iter().map(|e| event_value(&topic, e)).collect();
    Ok(Json(json!({
        "epoch": page.epoch.to_string(),
        "events": events,
        "next_after": page.next_after,
        "first_available": page.first_available,
        "last_offset": page.last_offset,
    })))
}

/// `GET /v1/topics`.
pub(crate) async fn list_topics(State(state): State<HttpState>) -> Json<Value> {
    let topics: Vec<Value> = state
        .engine
        .topics()
        .into_iter()
        .map(|t| {
            json!({
                "name": t.name,
                "epoch": t.epoch.to_string(),
                "last_offset": t.last_offset,
                "sealed": t.sealed,
            })
        })
        .collect();
    Json(json!({ "topics": topics }))
}

/// `GET /v1/topics/{topic}`.
pub(crate) async fn topic_info(
    State(state): State<HttpState>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let i = state.engine.info(&topic)?;
    let versions: serde_json::Map<String, Value> = i
        .versions
        .iter()
        .map(|(t, v)| (t.clone(), json!(v)))
        .collect();
    Ok(Json(json!({
        "name": i.name,
        "epoch": i.epoch.to_string(),
        "first_offset": i.first_offset,
        "last_offset": i.last_offset,
        "versions": versions,
        "retention": {
            "max_events": i.retention.max_events,
            "max_age_ms": i.retention.max_age.map_or(0, |d| d.as_millis() as u64),
            "max_bytes": i.retention.max_bytes,
        },
        "retained_events": i.retained_events,
        "retained_bytes": i.retained_bytes,
        "subscribers": i.subscribers,
        "sealed": i.sealed,
    })))
}

/// `POST /v1/topics/{topic}/seal`.
pub(crate) async fn seal(
    State(state): State<HttpState>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.engine.seal(&topic).await?;
    Ok(Json(json!({"sealed": true})))
}

/// `DELETE /v1/topics/{topic}`.
pub(crate) async fn delete_topic(
    State(state): State<HttpState>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.engine.delete(&topic).await?;
    Ok(Json(json!({"deleted": true})))
}

/// `GET /healthz`: the process is alive and serving HTTP.
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: storage recovered, listeners bound and the store
/// accepting writes; 503 (with the reason) while starting, shutting down,
/// or while the store repairs itself after a storage error.
pub(crate) async fn readyz(State(state): State<HttpState>) -> Response {
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        )
            .into_response()
    };
    if !state.ready.load(Ordering::Acquire) || state.shutdown.is_cancelled() {
        return not_ready("starting or shutting down".into());
    }
    match state.engine.health() {
        crate::engine::Health::Ok => Json(json!({"status": "ready"})).into_response(),
        crate::engine::Health::Degraded(why) => {
            not_ready(format!("storage cannot accept writes: {why}"))
        }
    }
}

/// `GET /metrics`: Prometheus text exposition.
pub(crate) async fn metrics(State(state): State<HttpState>) -> Response {
    use crate::metrics as m;
    let stats = state.engine.stats();
    metrics::gauge!(m::TOPICS).set(stats.topics as f64);
    metrics::gauge!(m::RETAINED_EVENTS).set(stats.retained_events as f64);
    metrics::gauge!(m::RETAINED_BYTES).set(stats.retained_bytes as f64);
    metrics::gauge!(m::SUBSCRIPTIONS).set(stats.subscribers as f64);
    let body = m::handle().render();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Any other path.
pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}
