//! `GET /v1/topics/{topic}/events`: the SSE bridge for plain `EventSource`.
//!
//! Start, in order of precedence: the `Last-Event-ID` header, the
//! `last_event_id` query parameter (both `<epoch>:<offset>`), then
//! `after_versions=a:5,b:3&epoch=E`, then `earliest=true`, else live.
//! Every event carries `id: <epoch>:<offset>`, so the browser's automatic
//! reconnect resumes exactly; `gap` events carry the id of the position the
//! stream continues from, so a reconnect after a gap does not repeat it.

use std::convert::Infallible;
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::envelope::{event_json, gap_json};
use super::{ApiError, HttpState};
use crate::engine::{Delivery, Start, Subscription};

/// Query parameters of the SSE endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct EventsQuery {
    types: Option<String>,
    earliest: Option<bool>,
    after_versions: Option<String>,
    epoch: Option<String>,
    last_event_id: Option<String>,
}

/// Parses `<epoch>:<offset>`.
pub(crate) fn parse_event_id(id: &str) -> Result<(u64, u64), ApiError> {
    let bad = || ApiError::bad_request(format!("event id {id:?} is not <epoch>:<offset>"));
    let (epoch, offset) = id.trim().split_once(':').ok_or_else(bad)?;
    Ok((
        epoch.parse().map_err(|_| bad())?,
        offset.parse().map_err(|_| bad())?,
    ))
}

/// Parses a comma-separated list, dropping empty items.
pub(crate) fn parse_list(s: Option<&str>) -> Vec<String> {
    s.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

fn parse_versions(s: &str) -> Result<Vec<(String, u64)>, ApiError> {
    parse_list(Some(s))
        .into_iter()
        .map(|item| {
            let (t, v) = item.split_once(':').ok_or_else(|| {
                ApiError::bad_request(format!("after_versions item {item:?} is not type:version"))
            })?;
            let v = v.parse().map_err(|_| {
                ApiError::bad_request(format!("version {v:?} of type {t:?} is not a number"))
            })?;
            Ok((t.to_owned(), v))
        })
        .collect()
}

fn start_of(query: &EventsQuery, headers: &HeaderMap) -> Result<Start, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request("Last-Event-ID is not ASCII"))
        })
        .transpose()?
        .filter(|v| !v.trim().is_empty());
    if let Some(id) = header.or(query.last_event_id.as_deref()) {
        let (epoch, offset) = parse_event_id(id)?;
        return Ok(Start::AfterOffset { epoch, offset });
    }
    if let Some(versions) = &query.after_versions {
        let epoch = query
            .epoch
            .as_deref()
            .ok_or_else(|| ApiError::bad_request("after_versions needs epoch"))?
            .parse()
            .map_err(|_| ApiError::bad_request("epoch is not a number"))?;
        return Ok(Start::AfterVersions {
            epoch,
            versions: parse_versions(versions)?,
        });
    }
    if query.earliest == Some(true) {
        return Ok(Start::Earliest);
    }
    Ok(Start::Live)
}

pub(crate) async fn events(
    State(state): State<HttpState>,
    Path(topic): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let start = match start_of(&query, &headers) {
        Ok(start) => start,
        Err(e) => return e.into_response(),
    };
    if let Start::AfterOffset { epoch, offset } = start {
        // A browser reconnecting after `end` of a sealed topic: 204 tells
        // EventSource to stop reconnecting.
        if let Ok(info) = state.engine.info(&topic) {
            if info.sealed && info.epoch == epoch && offset >= info.last_offset {
                return StatusCode::NO_CONTENT.into_response();
            }
        }
    }
    match open(&state, &topic, &query, start) {
        Ok(stream) => {
            let mut response = Body::from_stream(stream).into_response();
            let h = response.headers_mut();
            h.insert(
                "content-type",
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert("cache-control", HeaderValue::from_static("no-cache"));
            h.insert("x-accel-buffering", HeaderValue::from_static("no"));
            response
        }
        Err(e) => e.into_response(),
    }
}

fn open(
    state: &HttpState,
    topic: &str,
    query: &EventsQuery,
    start: Start,
) -> Result<impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static, ApiError> {
    let by_versions = matches!(start, Start::AfterVersions { .. });
    let types = parse_list(query.types.as_deref());
    let permit = state.sse_permits.clone().try_acquire_owned().map_err(|_| {
        tracing::warn!(topic, "SSE connection refused: too many connections");
        crate::metrics::refused("max_sse_connections");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!(
                "too many SSE connections (limit {})",
                state.settings.max_sse_connections
            ),
        )
    })?;
    let sub = state.engine.subscribe(topic, types, start)?;
    let info = state.engine.info(topic)?;
    let epoch = sub.epoch();
    let versions: serde_json::Map<String, serde_json::Value> = info
        .versions
        .iter()
        .map(|(t, v)| (t.clone(), json!(v)))
        .collect();
    let ready = json!({
        "topic": topic,
        "epoch": epoch.to_string(),
        "offset": info.last_offset,
        "versions": versions,
    });
    // A reconnect before the first event resumes where this stream starts.
    // Not for a resume by versions: by offset it would replay other types.
    let ready_id = (!by_versions).then(|| format!("{epoch}:{}", sub.start_offset() - 1));
    let mut prelude = BytesMut::new();
    prelude.extend_from_slice(format!("retry: {}\n", state.settings.retry.as_millis()).as_bytes());
    put_frame(
        &mut prelude,
        ready_id.as_deref(),
        "ready",
        &ready.to_string(),
    );
    tracing::debug!(topic, "SSE stream opened");
    let connections = metrics::gauge!(crate::metrics::CONNECTIONS, "transport" => "sse");
    connections.increment(1.0);
    let heartbeat = state.settings.heartbeat;
    let stream = SseStream {
        connections,
        delivered: metrics::counter!(crate::metrics::DELIVERED, "transport" => "sse"),
        bytes_out: metrics::counter!(crate::metrics::BYTES_OUT, "transport" => "sse"),
        sub,
        topic: topic.to_owned(),
        prelude: Some(prelude.freeze()),
        shutdown: state.shutdown.clone(),
        heartbeat,
        idle: Box::pin(tokio::time::sleep(heartbeat)),
        done: false,
        _permit: permit,
    };
    Ok(futures_util::stream::unfold(stream, |mut s| async move {
        s.next().await.map(|chunk| (Ok::<_, Infallible>(chunk), s))
    }))
}

/// Most bytes of SSE text handed to hyper as one body chunk.
const CHUNK: usize = 64 * 1024;

/// Appends one SSE message. `event` and `id` never hold a newline (types
/// and ids are validated), and `data` is one line of JSON.
fn put_frame(buf: &mut BytesMut, id: Option<&str>, event: &str, data: &str) {
    if let Some(id) = id {
        buf.extend_from_slice(b"id: ");
        buf.extend_from_slice(id.as_bytes());
        buf.extend_from_slice(b"\n");
    }
    buf.extend_from_slice(b"event: ");
    buf.extend_from_slice(event.as_bytes());
    buf.extend_from_slice(b"\ndata: ");
    buf.extend_from_slice(data.as_bytes());
    buf.extend_from_slice(b"\n\n");
}

/// One subscriber's `text/event-stream` body: every delivery ready at once
/// goes out as one chunk; a comment keeps an idle stream alive.
struct SseStream {
    connections: metrics::Gauge,
    delivered: metrics::Counter,
    bytes_out: metrics::Counter,
    sub: Subscription,
    topic: String,
    prelude: Option<Bytes>,
    shutdown: CancellationToken,
    heartbeat: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    done: bool,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SseStream {
    fn drop(&mut self) {
        self.connections.decrement(1.0);
    }
}

impl SseStream {
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(prelude) = self.prelude.take() {
            return Some(prelude);
        }
        if self.done {
            return None;
        }
        let first = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => {
                self.done = true;
                let mut buf = BytesMut::new();
                let reason = json!({"reason": "the broker is shutting down; reconnect"});
                put_frame(&mut buf, None, "shutdown", &reason.to_string());
                return Some(buf.freeze());
            }
            d = self.sub.recv() => d?,
            _ = &mut self.idle => {
                self.idle.as_mut().reset(tokio::time::Instant::now() + self.heartbeat);
                return Some(Bytes::from_static(b": hb\n\n"));
            }
        };
        let mut buf = BytesMut::new();
        let mut events = 0;
        let mut delivery = Some(first);
        while let Some(d) = delivery.take() {
            match d {
                Delivery::Event(e) => {
                    // The whole message is built once per event and shared
                    // by every SSE subscriber.
                    let epoch = self.sub.epoch();
                    let frame = e.sse_data.get_or_init(|| {
                        let mut f = BytesMut::new();
                        let id = format!("{epoch}:{}", e.offset);
                        put_frame(
                            &mut f,
                            Some(&id),
                            &e.event_type,
                            &event_json(&self.topic, &e),
                        );
                        f.freeze()
                    });
                    buf.extend_from_slice(frame);
                    events += 1;
                }
                Delivery::Gap(g) => {
                    tracing::warn!(topic = %self.topic, reason = g.reason.as_str(), "SSE subscriber gap");
                    let id = format!("{}:{}", g.epoch, g.current);
                    put_frame(&mut buf, Some(&id), "gap", &gap_json(&g));
                }
                Delivery::End { last_offset } => {
                    self.done = true;
                    let data = json!({"topic": self.topic, "last_offset": last_offset});
                    put_frame(&mut buf, None, "end", &data.to_string());
                    break;
                }
            }
            if buf.len() < CHUNK {
                delivery = self.sub.try_recv();
            }
        }
        self.delivered.increment(events);
        self.bytes_out.increment(buf.len() as u64);
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + self.heartbeat);
        Some(buf.freeze())
    }
}
