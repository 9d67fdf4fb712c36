//! The JSON API beside the SSE bridge, and health endpoints.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

use super::access::Caller;
use super::envelope::write_event;
use super::sse::parse_list;
use super::{ApiError, HttpState};
use crate::auth::Action;
use crate::engine::{Expected, NewEvent};

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
/// Needs the publish grant; counts against the caller's publish rate
/// before the body is read.
pub(crate) async fn publish(
    caller: Caller,
    State(state): State<HttpState>,
    Path(topic): Path<String>,
    Query(query): Query<PublishQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Publish, &topic)?;
    let event_type = query
        .event_type
        .ok_or_else(|| ApiError::bad_request("missing ?type=<event type>"))?;
    within_publish_rate(&state, &caller, &topic, 1)?;
    let payload = read_body(&state, &headers, body, state.settings.max_payload).await?;
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
        idempotency_key: text_header(&headers, "idempotency-key")?,
    };
    let expect = expected_position(&headers)?;
    let ack = state
        .engine
        .publish_expecting(&topic, vec![event], expect)
        .await?
        .pop()
        .ok_or(crate::engine::EngineError::EmptyBatch)?;
    Ok(Json(json!({
        "epoch": ack.epoch.to_string(),
        "offset": ack.offset,
        "version": ack.version,
        "duplicate": ack.duplicate,
    })))
}

/// One event of a `POST .../events:batch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem<'a> {
    #[serde(rename = "type")]
    event_type: String,
    /// The payload: JSON (kept as sent), or a string decoded per `encoding`.
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
    /// `json` (default): `data` is the payload as JSON text; `text`: `data`
    /// is a string whose content is the payload; `base64`: `data` is a
    /// base64 string of the payload bytes.
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default, deserialize_with = "header_object")]
    headers: Vec<(String, String)>,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// `POST /v1/topics/{topic}/events:batch`: a JSON array of `{"type",
/// "data", "headers", "idempotency_key", "encoding"}` appended atomically
/// (all or none, contiguous offsets); `Expected-Offset` / `Expected-Version`
/// apply to the batch. Answers `{"epoch", "results": [{offset, version,
/// duplicate}]}` in request order. The body is bounded by `limits.max_frame`.
pub(crate) async fn publish_batch(
    caller: Caller,
    State(state): State<HttpState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Publish, &topic)?;
    let body = read_body(&state, &headers, body, state.settings.max_batch_body).await?;
    let items: Vec<BatchItem<'_>> = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(format!(
            "the body must be a JSON array of {{\"type\", \"data\", \"headers\", \"idempotency_key\"}}: {e}"
        ))
    })?;
    if items.is_empty() {
        return Err(ApiError::bad_request(
            "a batch must hold at least one event",
        ));
    }
    let mut events = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let payload =
            batch_payload(&item).map_err(|e| ApiError::bad_request(format!("event {i}: {e}")))?;
        // Sizes, types and headers are the engine's to check, as for TCP.
        events.push(NewEvent {
            event_type: item.event_type,
            headers: item.headers,
            payload,
            idempotency_key: item.idempotency_key,
        });
    }
    within_publish_rate(&state, &caller, &topic, events.len())?;
    let expect = expected_position(&headers)?;
    let acks = state
        .engine
        .publish_expecting(&topic, events, expect)
        .await?;
    let epoch = acks.first().map(|a| a.epoch.to_string());
    let results: Vec<Value> = acks
        .iter()
        .map(|a| json!({"offset": a.offset, "version": a.version, "duplicate": a.duplicate}))
        .collect();
    Ok(Json(json!({"epoch": epoch, "results": results})))
}

/// A JSON object of string values as header pairs, in the order sent.
fn header_object<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(String, String)>, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of string header values")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(pair) = map.next_entry::<String, String>()? {
                pairs.push(pair);
            }
            Ok(pairs)
        }
    }
    deserializer.deserialize_map(Pairs)
}

/// The payload bytes of a batch item, per its `encoding`.
fn batch_payload(item: &BatchItem<'_>) -> Result<bytes::Bytes, String> {
    let string = || {
        serde_json::from_str::<String>(item.data.get())
            .map_err(|_| "with this encoding, data must be a JSON string".to_owned())
    };
    match item.encoding.as_deref() {
        None | Some("json") => Ok(bytes::Bytes::copy_from_slice(item.data.get().as_bytes())),
        Some("text") => Ok(string()?.into()),
        Some("base64") => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(string()?)
                .map(Into::into)
                .map_err(|e| format!("data is not valid base64: {e}"))
        }
        Some(other) => Err(format!("unknown encoding {other:?} (json, text or base64)")),
    }
}

/// Counts `events` against the caller's publish rate, or refuses them all.
fn within_publish_rate(
    state: &HttpState,
    caller: &Caller,
    topic: &str,
    events: usize,
) -> Result<(), ApiError> {
    let events = u32::try_from(events).unwrap_or(u32::MAX);
    state
        .auth
        .limits()
        .check_publish(&caller.principal, events)
        .map_err(|limited| {
            tracing::warn!(topic, events, "HTTP publish refused: over the publish rate");
            ApiError::limited(
                limited,
                "over this credential's publish rate (auth.rate.publish_per_second)",
            )
        })
}

/// A request header as text, if present (visible ASCII only).
fn text_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map(str::to_owned)
                .map_err(|_| ApiError::bad_request(format!("header {name} is not visible ASCII")))
        })
        .transpose()
}

/// The `Expected-Offset` / `Expected-Version` request headers.
fn expected_position(headers: &HeaderMap) -> Result<Expected, ApiError> {
    Ok(Expected {
        offset: number_header(headers, "expected-offset")?,
        version: number_header(headers, "expected-version")?,
    })
}

/// A request header as an unsigned number, if present.
fn number_header(headers: &HeaderMap, name: &str) -> Result<Option<u64>, ApiError> {
    text_header(headers, name)?
        .map(|v| {
            v.trim().parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("header {name} must be an unsigned integer"))
            })
        })
        .transpose()
}

/// Reads a request body of at most `max` bytes within `read_timeout`. A
/// declared `Content-Length` over the limit is refused before reading
/// anything; memory held is bounded by the limit, not by what the peer
/// claims or trickles.
pub(super) async fn read_body(
    state: &HttpState,
    headers: &HeaderMap,
    body: Body,
    max: u64,
) -> Result<bytes::Bytes, ApiError> {
    let too_large = || {
        crate::metrics::refused("max_payload");
        // The rest of the body is never read: the connection cannot be reused.
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body exceeds the limit of {max} bytes"),
        )
        .closing()
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > max) {
        return Err(too_large());
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = BytesMut::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::bad_request(format!("request body could not be read: {e}")).closing()
            })?;
            if (buf.len() + chunk.len()) as u64 > max {
                return Err(too_large());
            }
            if buf.is_empty() && declared == Some(chunk.len() as u64) {
                // The whole body in one piece: no copy.
                return Ok(chunk);
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(buf.freeze())
    };
    let timeout = state.settings.read_timeout;
    tokio::time::timeout(timeout, read).await.map_err(|_| {
        crate::metrics::refused("read_timeout");
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} (server.read_timeout)",
                humantime::format_duration(timeout)
            ),
        )
        .closing()
    })?
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct HistoryQuery {
    after: Option<u64>,
    types: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/topics/{topic}/history?after=N&types=a,b&limit=L`: at most
/// `limit` events and `max_history_bytes` of payload (at least one event,
/// so a page always moves on); `next_after` says where to continue. Needs
/// the subscribe grant.
pub(crate) async fn history(
    caller: Caller,
    State(state): State<HttpState>,
    Path(topic): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    caller.require(Action::Subscribe, &topic)?;
    let types = parse_list(query.types.as_deref());
    let limit = query.limit.unwrap_or(100).clamp(1, MAX_HISTORY);
    let page = state.engine.history_page(
        &topic,
        query.after.unwrap_or(0),
        &types,
        limit,
        state.settings.max_history_bytes,
    )?;
    let payload: usize = page.events.iter().map(|e| e.payload.len()).sum();
    // Written as text: a page of large events never exists as a tree of
    // `Value`s beside its serialised form.
    let mut out = Vec::with_capacity(payload + 160 * page.events.len() + 128);
    out.extend_from_slice(format!("{{\"epoch\":\"{}\",\"events\":[", page.epoch).as_bytes());
    for (i, e) in page.events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_event(&mut out, &topic, e);
    }
    out.extend_from_slice(
        format!(
            "],\"next_after\":{},\"first_available\":{},\"last_offset\":{}}}",
            page.next_after, page.first_available, page.last_offset
        )
        .as_bytes(),
    );
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        out,
    )
        .into_response())
}

/// `GET /v1/topics`: the topics any of the caller's grants names.
pub(crate) async fn list_topics(
    caller: Caller,
    State(state): State<HttpState>,
) -> Result<Json<Value>, ApiError> {
    caller.require_any_grant()?;
    let topics: Vec<Value> = state
        .engine
        .topics()
        .into_iter()
        .filter(|t| caller.principal.may_see(&t.name))
        .map(|t| {
            json!({
                "name": t.name,
                "epoch": t.epoch.to_string(),
                "last_offset": t.last_offset,
                "sealed": t.sealed,
            })
        })
        .collect();
    Ok(Json(json!({ "topics": topics })))
}

/// `GET /v1/topics/{topic}`: needs the subscribe grant.
pub(crate) async fn topic_info(
    caller: Caller,
    State(state): State<HttpState>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Subscribe, &topic)?;
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

/// `POST /v1/topics/{topic}/seal`: needs the admin grant.
pub(crate) async fn seal(
    caller: Caller,
    State(state): State<HttpState>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Admin, &topic)?;
    state.engine.seal(&topic).await?;
    Ok(Json(json!({"sealed": true})))
}

/// `DELETE /v1/topics/{topic}`: needs the admin grant.
pub(crate) async fn delete_topic(
    caller: Caller,
    State(state): State<HttpState>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Admin, &topic)?;
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

/// `GET /metrics`: Prometheus text exposition. Open like the health
/// endpoints: scrapers carry no token, and no topic is named unless listed
/// in `[metrics] topics`.
pub(crate) async fn metrics(State(state): State<HttpState>) -> Response {
    use crate::metrics as m;
    let stats = state.engine.stats();
    metrics::gauge!(m::TOPICS).set(stats.topics as f64);
    metrics::gauge!(m::RETAINED_EVENTS).set(stats.retained_events as f64);
    metrics::gauge!(m::RETAINED_BYTES).set(stats.retained_bytes as f64);
    metrics::gauge!(m::SUBSCRIPTIONS).set(stats.subscribers as f64);
    let mut body = m::handle().render();
    let metered = &state.settings.metered_topics;
    m::render_groups(&mut body, &state.engine.all_groups(), |topic| {
        metered.iter().any(|t| t == topic)
    });
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
