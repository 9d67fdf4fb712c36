//! The HTTP pull API of consumer groups, for workers in any language:
//! at-least-once work distribution with explicit acks over plain JSON.
//!
//! | route | what | grant |
//! | --- | --- | --- |
//! | `GET /v1/topics/{topic}/groups` | the topic's groups | subscribe |
//! | `PUT /v1/topics/{topic}/groups/{group}` | create (201) or find (200); changing settings is an update | subscribe; admin to update |
//! | `GET /v1/topics/{topic}/groups/{group}` | info: lag, pending, members, counters | subscribe |
//! | `DELETE /v1/topics/{topic}/groups/{group}` | delete | admin |
//! | `POST .../groups/{group}/fetch` | long poll for work | subscribe |
//! | `POST .../ack`, `.../nack`, `.../in_progress`, `.../term` | settle offsets | subscribe |
//! | `POST .../redrive` | republish the group's dead letters | admin |
//!
//! A `PUT` body holds any of `start` (`"earliest"`, `"live"` or
//! `{"after_offset": N}`), `ack_wait_ms`, `max_deliver`, `backoff_ms`,
//! `max_ack_pending` and `dead_letter_topic` (`null` = `<topic>.dlq`). A new
//! group takes the defaults for what is left out; for an existing group a
//! field left out keeps its value, `start` is ignored, and a body that asks
//! for nothing different answers 200 with the group as it is.
//!
//! A fetch answers `{"epoch", "events": [envelope + "attempt"], "gaps":
//! [gap]}` with the same envelope as SSE and history. A waiting fetch
//! holds one of `limits.max_http_requests`, ends early (with what it has,
//! possibly nothing) when the broker shuts down or the caller's session
//! ends, and is dropped with its connection: it holds no event while it
//! waits, so a worker that goes away takes nothing with it.
//!
//! Bodies are bounded by `limits.max_frame`; unknown fields are refused,
//! so a misspelt option is a 400 rather than a silent default.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::Caller;
use super::envelope::{gap_json, write_event};
use super::{ApiError, HttpState};
use crate::auth::Action;
use crate::engine::{
    EngineError, Fetched, GroupConfig, GroupInfo, GroupStart, Settle, Settled, MAX_FETCH,
    MAX_FETCH_WAIT,
};

/// Longest `delay_ms` of a nack or step of `backoff_ms`, and longest
/// `ack_wait_ms` (24 h, the engine's bound on `ack_wait`).
const MAX_DELAY: Duration = Duration::from_secs(24 * 3600);

/// The routes of this module, to merge into the API router (they share its
/// request limit).
pub(crate) fn routes() -> Router<HttpState> {
    const GROUP: &str = "/v1/topics/{topic}/groups/{group}";
    Router::new()
        .route("/v1/topics/{topic}/groups", get(list))
        .route(GROUP, get(info).put(create).delete(delete))
        .route(&format!("{GROUP}/fetch"), post(fetch))
        .route(&format!("{GROUP}/ack"), post(settle::<OffsetsBody<false>>))
        .route(&format!("{GROUP}/nack"), post(settle::<NackBody>))
        .route(
            &format!("{GROUP}/in_progress"),
            post(settle::<OffsetsBody<true>>),
        )
        .route(&format!("{GROUP}/term"), post(settle::<TermBody>))
        .route(&format!("{GROUP}/redrive"), post(redrive))
}

// ---------------------------------------------------------------------------
// Request bodies.
// ---------------------------------------------------------------------------

/// `start` in a `PUT` body.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StartJson {
    Earliest,
    Live,
    AfterOffset(u64),
}

/// A `PUT` body: every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GroupOptions {
    start: Option<StartJson>,
    ack_wait_ms: Option<u64>,
    max_deliver: Option<u32>,
    backoff_ms: Option<Vec<u64>>,
    max_ack_pending: Option<u32>,
    /// Absent: keep (or default); `null`: `<topic>.dlq`; a name: that topic.
    #[serde(deserialize_with = "present")]
    dead_letter_topic: Option<Option<String>>,
}

/// Tells a field sent as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl GroupOptions {
    /// `base` with the fields this body sets; the delays are checked here
    /// (a `Duration` cannot hold every `u64` of milliseconds).
    fn apply(&self, mut base: GroupConfig) -> Result<GroupConfig, ApiError> {
        if let Some(start) = self.start {
            base.start = match start {
                StartJson::Earliest => GroupStart::Earliest,
                StartJson::Live => GroupStart::Live,
                StartJson::AfterOffset(o) => GroupStart::AfterOffset(o),
            };
        }
        if let Some(ms) = self.ack_wait_ms {
            base.ack_wait = delay("ack_wait_ms", ms)?;
        }
        if let Some(n) = self.max_deliver {
            base.max_deliver = n;
        }
        if let Some(steps) = &self.backoff_ms {
            base.backoff = steps
                .iter()
                .map(|&ms| delay("backoff_ms", ms))
                .collect::<Result<_, _>>()?;
        }
        if let Some(n) = self.max_ack_pending {
            base.max_ack_pending = n;
        }
        if let Some(dlq) = &self.dead_letter_topic {
            base.dead_letter_topic = dlq.clone();
        }
        // The engine checks it too; here the message comes before any
        // grant check, so a bad body is a 400 whoever sends it.
        base.validate()
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e))?;
        Ok(base)
    }
}

/// `ms` as a duration of at most [`MAX_DELAY`].
fn delay(field: &str, ms: u64) -> Result<Duration, ApiError> {
    let d = Duration::from_millis(ms);
    if d > MAX_DELAY {
        return Err(ApiError::bad_request(format!(
            "{field} must be at most {} ms (24 h)",
            MAX_DELAY.as_millis()
        )));
    }
    Ok(d)
}

/// A `fetch` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FetchBody {
    consumer: String,
    /// Most events to hand out (1 to [`MAX_FETCH`]; default 1).
    #[serde(default)]
    max: Option<u64>,
    /// How long to wait for work when there is none (default 0: answer at
    /// once; at most [`MAX_FETCH_WAIT`]).
    #[serde(default)]
    wait_ms: Option<u64>,
    /// Most events this consumer may hold unacked (0 = the group's limit).
    #[serde(default)]
    max_in_flight: u32,
}

/// A settle request's body: its JSON shape (for errors) and the action.
trait SettleBody: DeserializeOwned + Send {
    /// The expected shape, named in the error for a malformed body.
    const SHAPE: &'static str;
    /// The offsets and what to do with them.
    fn into_parts(self) -> Result<(Vec<u64>, Settle), ApiError>;
}

/// An `ack` body (`IN_PROGRESS` false) or an `in_progress` body (true).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OffsetsBody<const IN_PROGRESS: bool> {
    offsets: Vec<u64>,
}

impl<const IN_PROGRESS: bool> SettleBody for OffsetsBody<IN_PROGRESS> {
    const SHAPE: &'static str = "{\"offsets\": [..]}";
    fn into_parts(self) -> Result<(Vec<u64>, Settle), ApiError> {
        let how = if IN_PROGRESS {
            Settle::InProgress
        } else {
            Settle::Ack
        };
        Ok((self.offsets, how))
    }
}

/// A `nack` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NackBody {
    offsets: Vec<u64>,
    /// Delay before redelivery; absent = the group's backoff.
    #[serde(default)]
    delay_ms: Option<u64>,
}

impl SettleBody for NackBody {
    const SHAPE: &'static str = "{\"offsets\": [..], \"delay_ms\"}";
    fn into_parts(self) -> Result<(Vec<u64>, Settle), ApiError> {
        let delay = self.delay_ms.map(|ms| delay("delay_ms", ms)).transpose()?;
        Ok((self.offsets, Settle::Nack(delay)))
    }
}

/// A `term` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TermBody {
    offsets: Vec<u64>,
    #[serde(default)]
    reason: Option<String>,
}

impl SettleBody for TermBody {
    const SHAPE: &'static str = "{\"offsets\": [..], \"reason\"}";
    fn into_parts(self) -> Result<(Vec<u64>, Settle), ApiError> {
        Ok((self.offsets, Settle::Term(self.reason.unwrap_or_default())))
    }
}

/// Reads a JSON body of at most `limits.max_frame` bytes within
/// `server.read_timeout`; `what` describes the expected shape in the error.
/// An empty body reads as `empty` when given, else it is an error.
async fn read_json<T: DeserializeOwned>(
    state: &HttpState,
    headers: &HeaderMap,
    body: Body,
    what: &str,
    empty: Option<&str>,
) -> Result<T, ApiError> {
    let bytes = super::api::read_body(state, headers, body, state.settings.max_batch_body).await?;
    let text: &[u8] = match (bytes.iter().all(u8::is_ascii_whitespace), empty) {
        (true, Some(default)) => default.as_bytes(),
        _ => &bytes,
    };
    let bad = |e: &dyn std::fmt::Display| {
        ApiError::bad_request(format!("the body must be a JSON object {what}: {e}"))
    };
    // Serde would take an array for a struct, field by field.
    if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(bad(&"it is not an object"));
    }
    serde_json::from_slice(text).map_err(|e| bad(&e))
}

// ---------------------------------------------------------------------------
// Answers.
// ---------------------------------------------------------------------------

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn config_json(c: &GroupConfig) -> Value {
    let start = match c.start {
        GroupStart::Earliest => json!("earliest"),
        GroupStart::Live => json!("live"),
        GroupStart::AfterOffset(o) => json!({ "after_offset": o }),
    };
    json!({
        "start": start,
        "ack_wait_ms": ms(c.ack_wait),
        "max_deliver": c.max_deliver,
        "backoff_ms": c.backoff.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        "max_ack_pending": c.max_ack_pending,
        "dead_letter_topic": c.dead_letter_topic,
    })
}

/// A group as JSON; `sample` adds the oldest pending events.
fn info_json(i: &GroupInfo, sample: bool) -> Value {
    let members: Vec<Value> = i
        .members
        .iter()
        .map(|m| {
            json!({
                "consumer": m.consumer,
                "sessions": m.sessions,
                "in_flight": m.in_flight,
                "max_in_flight": m.max_in_flight,
                "idle_ms": m.idle_ms,
            })
        })
        .collect();
    let mut v = json!({
        "topic": i.topic,
        "group": i.group,
        "epoch": i.epoch.to_string(),
        "config": config_json(&i.config),
        "dead_letter_topic": i.dead_letter_topic,
        "ack_floor": i.ack_floor,
        "next_offset": i.next_offset,
        "last_offset": i.last_offset,
        "lag": i.lag,
        "pending": i.pending,
        "in_flight": i.in_flight,
        "oldest_pending_ms": i.oldest_pending_ms,
        "members": members,
        "delivered": i.delivered,
        "redelivered": i.redelivered,
        "acked": i.acked,
        "dead_lettered": i.dead_lettered,
        "lost": i.lost,
    });
    if sample {
        v["pending_sample"] = i
            .pending_sample
            .iter()
            .map(|p| {
                json!({
                    "offset": p.offset,
                    "attempt": p.attempt,
                    "consumer": p.consumer,
                    "due_in_ms": p.due_in_ms,
                    "first_delivered_ms": p.first_delivered_ms,
                })
            })
            .collect();
    }
    v
}

fn settled_json(s: Settled) -> Json<Value> {
    Json(json!({
        "applied": s.applied,
        "already_done": s.already_done,
        "unknown": s.unknown,
    }))
}

/// The answer of a fetch, written as text (a page of large events never
/// exists as a tree of `Value`s beside its serialised form).
fn fetched_response(topic: &str, f: &Fetched) -> Response {
    let payload: usize = f.deliveries.iter().map(|d| d.event.payload.len()).sum();
    let mut out = Vec::with_capacity(payload + 176 * f.deliveries.len() + 64);
    out.extend_from_slice(format!("{{\"epoch\":\"{}\",\"events\":[", f.epoch).as_bytes());
    for (i, d) in f.deliveries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_event(&mut out, topic, &d.event);
        // The envelope is an object: its closing brace makes room for one
        // more field.
        out.pop();
        out.extend_from_slice(format!(",\"attempt\":{}}}", d.attempt).as_bytes());
    }
    out.extend_from_slice(b"],\"gaps\":[");
    for (i, g) in f.gaps.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(gap_json(g).as_bytes());
    }
    out.extend_from_slice(b"]}");
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        out,
    )
        .into_response()
}

// ---------------------------------------------------------------------------
// Handlers.
// ---------------------------------------------------------------------------

/// `GET /v1/topics/{topic}/groups`: `{"groups": [info]}` by name (without
/// the pending sample; ask a group's info for it).
async fn list(
    caller: Caller,
    State(state): State<HttpState>,
    Path(topic): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Subscribe, &topic)?;
    let groups: Vec<Value> = state
        .engine
        .groups(&topic)?
        .iter()
        .map(|i| info_json(i, false))
        .collect();
    Ok(Json(json!({ "groups": groups })))
}

/// `GET /v1/topics/{topic}/groups/{group}`.
async fn info(
    caller: Caller,
    State(state): State<HttpState>,
    Path((topic, group)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Subscribe, &topic)?;
    let i = state.engine.group_info(&topic, &group)?;
    Ok(Json(info_json(&i, true)))
}

/// Whether `a` and `b` differ in more than their start (which applies only
/// at creation).
fn settings_differ(a: &GroupConfig, b: &GroupConfig) -> bool {
    GroupConfig {
        start: b.start,
        ..a.clone()
    } != *b
}

/// `PUT /v1/topics/{topic}/groups/{group}`: idempotent. A missing group is
/// created (201; the subscribe grant suffices); an existing one answers 200
/// as it is, or, when the body asks for other settings, is updated (200;
/// needs admin). Two concurrent creates may both answer 201.
async fn create(
    caller: Caller,
    State(state): State<HttpState>,
    Path((topic, group)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require(Action::Subscribe, &topic)?;
    let options: GroupOptions = read_json(
        &state,
        &headers,
        body,
        "of group options {\"start\", \"ack_wait_ms\", \"max_deliver\", \"backoff_ms\", \
         \"max_ack_pending\", \"dead_letter_topic\"}",
        Some("{}"),
    )
    .await?;
    // Dead letters are appended by the broker: naming where they go is
    // publishing there.
    if let Some(Some(dlq)) = &options.dead_letter_topic {
        caller.require(Action::Publish, dlq)?;
    }
    let engine = &state.engine;
    let existing = match engine.group_info(&topic, &group) {
        Ok(i) => Some(i),
        Err(EngineError::GroupNotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let (info, created) = match existing {
        Some(current) => {
            let wanted = options.apply(current.config.clone())?;
            if settings_differ(&current.config, &wanted) {
                (
                    update(&caller, &state, &topic, &group, wanted).await?,
                    false,
                )
            } else {
                (current, false)
            }
        }
        None => {
            let wanted = options.apply(GroupConfig::default())?;
            let info = engine
                .create_group(&topic, &group, wanted.clone(), false)
                .await?;
            // Another request created it first, with other settings: this
            // body is an update of that group.
            if settings_differ(&info.config, &wanted) {
                let wanted = options.apply(info.config.clone())?;
                (
                    update(&caller, &state, &topic, &group, wanted).await?,
                    false,
                )
            } else {
                (info, true)
            }
        }
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(info_json(&info, true))).into_response())
}

/// Changes an existing group's settings: needs the admin grant.
async fn update(
    caller: &Caller,
    state: &HttpState,
    topic: &str,
    group: &str,
    config: GroupConfig,
) -> Result<GroupInfo, ApiError> {
    caller.require(Action::Admin, topic)?;
    let info = state
        .engine
        .create_group(topic, group, config, true)
        .await?;
    tracing::info!(topic, group, "consumer group settings changed over HTTP");
    Ok(info)
}

/// `DELETE /v1/topics/{topic}/groups/{group}`: needs the admin grant.
async fn delete(
    caller: Caller,
    State(state): State<HttpState>,
    Path((topic, group)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Admin, &topic)?;
    state.engine.delete_group(&topic, &group).await?;
    Ok(Json(json!({"deleted": true})))
}

/// `POST .../fetch` `{"consumer", "max", "wait_ms", "max_in_flight"}`:
/// hands out up to `max` events, waiting up to `wait_ms` when there are
/// none. Ends early, with what it has, when the broker shuts down or the
/// caller's session ends.
async fn fetch(
    caller: Caller,
    State(state): State<HttpState>,
    Path((topic, group)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    caller.require(Action::Subscribe, &topic)?;
    let req: FetchBody = read_json(
        &state,
        &headers,
        body,
        "{\"consumer\", \"max\", \"wait_ms\", \"max_in_flight\"}",
        None,
    )
    .await?;
    let max = req.max.unwrap_or(1);
    if max == 0 || max > MAX_FETCH as u64 {
        return Err(ApiError::bad_request(format!(
            "max must be between 1 and {MAX_FETCH}"
        )));
    }
    let wait = Duration::from_millis(req.wait_ms.unwrap_or(0));
    if wait > MAX_FETCH_WAIT {
        return Err(ApiError::bad_request(format!(
            "wait_ms must be at most {} (a long poll longer than that should be repeated)",
            MAX_FETCH_WAIT.as_millis()
        )));
    }
    // A session that ends sooner ends the wait with it (nothing is handed
    // out past it).
    let wait = match caller.principal.remaining() {
        Some(left) => wait.min(left),
        None => wait,
    };
    let fetching = state.engine.fetch(
        &topic,
        &group,
        &req.consumer,
        max as usize,
        wait,
        req.max_in_flight,
    );
    // A shutting-down broker answers at once, handing out nothing: hyper's
    // graceful shutdown waits for every request in flight, a waiting fetch
    // included. Dropping the fetch while it waits loses nothing: events are
    // handed out only in the step that returns them.
    let fetched = tokio::select! {
        biased;
        () = state.shutdown.cancelled() => Fetched {
            epoch: state.engine.info(&topic).map(|i| i.epoch).unwrap_or(0),
            ..Fetched::default()
        },
        f = fetching => f?,
    };
    if !fetched.deliveries.is_empty() {
        metrics::counter!(crate::metrics::DELIVERED, "transport" => "http_group")
            .increment(fetched.deliveries.len() as u64);
    }
    Ok(fetched_response(&topic, &fetched))
}

/// `POST .../ack` `{"offsets"}` (done, never delivered again),
/// `.../nack` `{"offsets", "delay_ms"}` (redeliver after the delay, absent:
/// the group's backoff), `.../in_progress` `{"offsets"}` (each deadline
/// moves a whole `ack_wait` on) and `.../term` `{"offsets", "reason"}`
/// (dead-letter now). Answers `{"applied", "already_done", "unknown"}` once
/// the change is stored (a term: once its dead letters' append was tried).
async fn settle<B: SettleBody>(
    caller: Caller,
    State(state): State<HttpState>,
    Path((topic, group)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Subscribe, &topic)?;
    let req: B = read_json(&state, &headers, body, B::SHAPE, None).await?;
    let (offsets, how) = req.into_parts()?;
    Ok(settled_json(
        state.engine.settle(&topic, &group, &offsets, how).await?,
    ))
}

/// `POST .../redrive`: republishes the group's dead letters to the topic
/// (each once); `{"redriven": n}`. Needs the admin grant.
async fn redrive(
    caller: Caller,
    State(state): State<HttpState>,
    Path((topic, group)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Action::Admin, &topic)?;
    let n = state.engine.redrive(&topic, &group).await?;
    Ok(Json(json!({ "redriven": n })))
}
