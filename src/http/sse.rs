//! `GET /v1/topics/{topic}/events`: the SSE bridge for plain `EventSource`.
//!
//! Start, in order of precedence: the `Last-Event-ID` header, the
//! `last_event_id` query parameter (both an event id, below), then
//! `after_versions=a:5,b:3&epoch=E`, then `earliest=true`, else live.
//!
//! Every event carries an id, so the browser's automatic reconnect (same
//! URL, `Last-Event-ID` header) resumes exactly:
//! - `<epoch>:<offset>`: resume after `offset`.
//! - `<epoch>:<offset>:<live_from>`: sent while an `after_versions` stream
//!   replays (offsets below `live_from`, where its live part starts). Resumes
//!   after `offset` with the URL's `after_versions` still filtering the
//!   replay below `live_from`, so a stream cut during its replay continues
//!   with exactly the events it would have had.
//!
//! `gap` events carry the id of the position the stream continues from, so a
//! reconnect after a gap does not repeat it.
//!
//! A stream hands hyper at most `max_outbound_bytes` that the peer has not
//! read (counted below hyper, at the socket). Beyond it the stream stops
//! pulling from its subscription, which falls behind the ring and later gets
//! `gap(slow_consumer)`. A peer that stops reading altogether is cut off by
//! the connection's write watchdog (see [`super::serve`]), which frees the slot.
//!
//! Access: the caller needs the subscribe grant on the topic (credentials
//! from the `Authorization` header, the `auth.cookie` cookie or
//! `?access_token=`, see [`super::access`]) and one of its
//! `auth.rate.sse_per_credential` slots, held while the stream lives. When
//! the credential's session ends (`exp` plus `auth.leeway`), the stream sends
//! `event: error` with `{"code": "token_expired", "message"}` and ends. That
//! message has no `id:`, so the browser's last event id stays at the last
//! event delivered: a reconnect with a fresh token and that id
//! (`Last-Event-ID` or `?last_event_id=`) misses nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use super::access::SseCaller;
use super::compress::{encoded_sse_response, negotiate, Coding, Compressor};
use super::conn::ConnIo;
use super::conn::Peer;
use super::envelope::{event_json, gap_json};
use super::stream_id::{self, Entry, StreamSelection};
use super::{ApiError, HttpState};
use crate::auth::{Action, SseSlot, TopicPattern};
use crate::conns::{ConnGuard, ConnKind, SubHandle};
use crate::engine::{
    Delivery, Encoding, Event, MultiDelivery, MultiSubscription, Selection, Start, Subscription,
};

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

/// An SSE event id: `<epoch>:<offset>`, or `<epoch>:<offset>:<live_from>`
/// during the replay of an `after_versions` stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EventId {
    /// The topic's epoch.
    pub(crate) epoch: u64,
    /// The last offset the client has.
    pub(crate) offset: u64,
    /// Where the replay of the original `after_versions` stream ends.
    pub(crate) live_from: Option<u64>,
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.offset)?;
        if let Some(live_from) = self.live_from {
            write!(f, ":{live_from}")?;
        }
        Ok(())
    }
}

/// Parses `<epoch>:<offset>` or `<epoch>:<offset>:<live_from>`.
pub(crate) fn parse_event_id(id: &str) -> Result<EventId, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "event id {id:?} is not <epoch>:<offset> or <epoch>:<offset>:<live_from>"
        ))
    };
    let mut parts = id.trim().split(':');
    let mut number = || -> Option<u64> { parts.next()?.parse().ok() };
    let epoch = number().ok_or_else(bad)?;
    let offset = number().ok_or_else(bad)?;
    let live_from = match parts.next() {
        None => None,
        Some(n) => Some(n.parse().map_err(|_| bad())?),
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(EventId {
        epoch,
        offset,
        live_from,
    })
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
            // Types may hold ':' themselves; the version is after the last.
            let (t, v) = item.rsplit_once(':').ok_or_else(|| {
                ApiError::bad_request(format!("after_versions item {item:?} is not type:version"))
            })?;
            let v = v.parse().map_err(|_| {
                ApiError::bad_request(format!("version {v:?} of type {t:?} is not a number"))
            })?;
            Ok((t.to_owned(), v))
        })
        .collect()
}

/// The id a stream resumes after: the `Last-Event-ID` header (a blank one
/// counts as absent), else the `last_event_id` query parameter.
fn last_event_id<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Result<Option<&'a str>, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::bad_request("Last-Event-ID is not ASCII"))
        })
        .transpose()?
        .filter(|v| !v.trim().is_empty());
    Ok(header.or(query))
}

fn start_of(query: &EventsQuery, headers: &HeaderMap) -> Result<Start, ApiError> {
    if let Some(id) = last_event_id(headers, query.last_event_id.as_deref())? {
        let EventId {
            epoch,
            offset,
            live_from,
        } = parse_event_id(id)?;
        return Ok(match live_from {
            None => Start::AfterOffset { epoch, offset },
            Some(live_from) => Start::AfterOffsetVersions {
                epoch,
                offset,
                // The URL is the original one: its versions still filter
                // the rest of the replay.
                versions: match &query.after_versions {
                    Some(v) => parse_versions(v)?,
                    None => Vec::new(),
                },
                live_from,
            },
        });
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

/// `GET /v1/topics/{topic}/events` (see the module docs).
pub(crate) async fn events(
    SseCaller(caller): SseCaller,
    State(state): State<HttpState>,
    Path(topic): Path<String>,
    Query(query): Query<EventsQuery>,
    socket: Socket,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = caller.require(Action::Subscribe, &topic) {
        return e.into_response();
    }
    let start = match start_of(&query, &headers) {
        Ok(start) => start,
        Err(e) => return e.into_response(),
    };
    if let Start::AfterOffset { epoch, offset } | Start::AfterOffsetVersions { epoch, offset, .. } =
        start
    {
        // A browser reconnecting after `end` of a sealed topic: 204 tells
        // EventSource to stop reconnecting.
        if let Ok(info) = state.engine.info(&topic) {
            if info.sealed && info.epoch == epoch && offset >= info.last_offset {
                return StatusCode::NO_CONTENT.into_response();
            }
        }
    }
    let opened = sse_slot(&state, &caller, socket.peer, &topic)
        .and_then(|access| open(&state, &topic, &query, start, socket.conn, access));
    match opened {
        Ok(stream) => {
            let coding = negotiate(&headers);
            encoded_sse_response(coding, body(stream, coding))
        }
        Err(e) => e.into_response(),
    }
}

/// What `GET /v1/events` asks for.
struct ManyQuery {
    selection: StreamSelection,
    types: Vec<String>,
    earliest: bool,
    last_event_id: Option<String>,
}

/// Parses the query of `GET /v1/events`: repeatable `topic` (a name or a
/// pattern; commas separate several), `types`, `earliest`, `last_event_id`.
fn parse_many(raw: &str, settings: &super::HttpSettings) -> Result<ManyQuery, ApiError> {
    let mut topics: Vec<String> = Vec::new();
    let mut patterns: Vec<TopicPattern> = Vec::new();
    let mut types = Vec::new();
    let mut earliest = false;
    let mut last_event_id = None;
    for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
        match &*key {
            "topic" => {
                for item in parse_list(Some(&value)) {
                    if item.contains(['*', '?', '{']) {
                        let pattern = match TopicPattern::compile(&item, None) {
                            Ok(Some(p)) => p,
                            Ok(None) => {
                                return Err(ApiError::bad_request(format!(
                                    "topic pattern {item:?}: {{sub}} is for grants, not streams"
                                )))
                            }
                            Err(e) => return Err(ApiError::bad_request(e.to_string())),
                        };
                        if !patterns.iter().any(|p| p.as_str() == pattern.as_str()) {
                            patterns.push(pattern);
                        }
                    } else {
                        crate::engine::validate_topic(&item)?;
                        if !topics.contains(&item) {
                            topics.push(item);
                        }
                    }
                }
            }
            "types" => types.extend(parse_list(Some(&value))),
            "earliest" => {
                earliest = match &*value {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(ApiError::bad_request(format!(
                            "earliest={other:?}: true or false"
                        )))
                    }
                }
            }
            "last_event_id" => last_event_id = Some(value.into_owned()),
            "after_versions" | "epoch" => {
                return Err(ApiError::bad_request(
                    "after_versions needs a single topic: use /v1/topics/{topic}/events",
                ))
            }
            // access_token and anything else a page adds.
            _ => {}
        }
    }
    if topics.is_empty() && patterns.is_empty() {
        return Err(ApiError::bad_request(
            "name at least one topic or pattern: /v1/events?topic=a&topic=orders.*",
        ));
    }
    let named = topics.len() + patterns.len();
    if named > settings.max_stream_topics {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_topics",
            format!(
                "{named} topics and patterns, at most {} per stream (limits.max_stream_topics)",
                settings.max_stream_topics
            ),
        ));
    }
    if !patterns.is_empty() && settings.max_pattern_matches == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "too_many_topics",
            "patterns are off on this broker (limits.max_pattern_matches = 0)",
        ));
    }
    Ok(ManyQuery {
        selection: StreamSelection::new(topics, patterns),
        types,
        earliest,
        last_event_id,
    })
}

/// `GET /v1/events?topic=a&topic=orders.*`: one stream over several topics
/// and patterns (see the module docs).
pub(crate) async fn events_many(
    SseCaller(caller): SseCaller,
    State(state): State<HttpState>,
    RawQuery(raw): RawQuery,
    socket: Socket,
    headers: HeaderMap,
) -> Response {
    let raw = raw.as_deref().unwrap_or("");
    match open_many(&state, &caller, raw, &headers, socket) {
        Ok(Some(stream)) => {
            let coding = negotiate(&headers);
            encoded_sse_response(coding, body(stream, coding))
        }
        // Every topic ended and nothing can join: EventSource stops.
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.into_response(),
    }
}

fn open_many(
    state: &HttpState,
    caller: &super::access::Caller,
    raw: &str,
    headers: &HeaderMap,
    socket: Socket,
) -> Result<Option<SseStream>, ApiError> {
    let query = parse_many(raw, &state.settings)?;
    for t in &query.selection.topics {
        caller.require(Action::Subscribe, t)?;
    }
    let positions =
        match last_event_id(headers, query.last_event_id.as_deref())? {
            Some(id) => Some(stream_id::decode(&query.selection, id).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_start", e.to_string())
            })?),
            None => None,
        };
    let access = sse_slot(state, caller, socket.peer, "(many)")?;
    let permit = sse_permit(state, "(many)")?;
    let principal = caller.principal.clone();
    let sub = state.engine.subscribe_many(Selection {
        topics: query.selection.topics.clone(),
        patterns: query.selection.patterns.clone(),
        types: query.types,
        resumed: positions.is_some(),
        positions: positions.unwrap_or_default(),
        fresh: if query.earliest {
            Start::Earliest
        } else {
            Start::Live
        },
        max_matches: state.settings.max_pattern_matches,
        allow: Arc::new(move |topic: &str| principal.may(Action::Subscribe, topic)),
    })?;
    if sub.finished() {
        return Ok(None);
    }
    let mut many = Many {
        sub,
        selection: query.selection,
        id: String::new(),
        id_bytes: Vec::new(),
        registered: HashMap::new(),
    };
    for i in 0..many.sub.member_slots() {
        many.advance(&access.registered, i, 0);
    }
    many.update_id();
    let topics: Vec<serde_json::Value> = many
        .sub
        .members()
        .map(|m| {
            json!({
                "topic": &*m.name,
                "epoch": m.position.epoch.to_string(),
                "offset": m.position.offset,
                "ended": m.position.ended,
            })
        })
        .collect();
    let patterns: Vec<&str> = many.selection.patterns.iter().map(|p| p.as_str()).collect();
    let ready = json!({"topics": topics, "patterns": patterns});
    let prelude = prelude(state, &many.id, &ready);
    tracing::debug!(
        topics = many.selection.topics.len(),
        patterns = patterns.len(),
        "SSE stream over many topics opened"
    );
    let source = Source::Many(Box::new(many));
    Ok(Some(SseStream::new(
        state,
        source,
        prelude,
        socket.conn,
        access,
        permit,
    )))
}

/// The connection a stream is served on: its socket accounting (and
/// whether hyper frames the body in chunks) and its peer.
pub(crate) struct Socket {
    /// `None` when served outside [`super::serve`] (no socket accounting).
    conn: Option<(Arc<ConnIo>, bool)>,
    /// The peer's address (unspecified outside [`super::serve`]).
    peer: SocketAddr,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Socket {
    type Rejection = Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Infallible> {
        // hyper frames an HTTP/1.1 stream as chunks (counted as written
        // bytes); an HTTP/1.0 one is close-delimited, with no framing.
        let chunked = parts.version >= Version::HTTP_11;
        Ok(Self {
            conn: parts
                .extensions
                .get::<Arc<ConnIo>>()
                .map(|c| (c.clone(), chunked)),
            peer: parts
                .extensions
                .get::<Peer>()
                .map_or(SocketAddr::from(([0, 0, 0, 0], 0)), |p| p.0),
        })
    }
}

/// What a stream holds for its caller: a slot of its credential, and when
/// its session ends.
struct Access {
    slot: SseSlot,
    ends: Option<tokio::time::Instant>,
    /// Its entry in the connections registry (`GET /v1/connections`).
    registered: ConnGuard,
}

/// One of `max_sse_connections`, or the 503 that refuses the stream.
fn sse_permit(state: &HttpState, what: &str) -> Result<OwnedSemaphorePermit, ApiError> {
    state.sse_permits.clone().try_acquire_owned().map_err(|_| {
        tracing::warn!(what, "SSE connection refused: too many connections");
        crate::metrics::refused("max_sse_connections");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_connections",
            format!(
                "too many SSE connections (limit {})",
                state.settings.max_sse_connections
            ),
        )
    })
}

/// The credential's SSE slot, or the 429 that refuses the stream.
fn sse_slot(
    state: &HttpState,
    caller: &super::access::Caller,
    peer: SocketAddr,
    what: &str,
) -> Result<Access, ApiError> {
    let slot = state
        .auth
        .limits()
        .sse_slot(&caller.principal)
        .map_err(|limit| {
            tracing::warn!(
                what,
                limit,
                "SSE stream refused: too many for this credential"
            );
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "this credential already has {limit} SSE streams open \
                 (auth.rate.sse_per_credential); close one first"
                ),
            )
        })?;
    let subject = caller.principal.subject().map(str::to_owned);
    Ok(Access {
        slot,
        ends: caller.principal.deadline(),
        registered: state.connections().register(ConnKind::Sse, peer, subject),
    })
}

fn open(
    state: &HttpState,
    topic: &str,
    query: &EventsQuery,
    start: Start,
    conn: Option<(Arc<ConnIo>, bool)>,
    access: Access,
) -> Result<SseStream, ApiError> {
    let replay_bound = match &start {
        Start::AfterVersions { .. } => Some(u64::MAX),
        Start::AfterOffsetVersions { live_from, .. } => Some(*live_from),
        _ => None,
    };
    let types = parse_list(query.types.as_deref());
    let permit = sse_permit(state, topic)?;
    let sub = state.engine.subscribe(topic, types, start)?;
    let info = state.engine.info(topic)?;
    let epoch = sub.epoch();
    // Events below it are the replay of a resume by versions: their ids
    // name it, so that a reconnect keeps filtering by versions up to it.
    let live_from = replay_bound.map_or(0, |bound| bound.min(sub.live_offset()));
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
    let start_id = EventId {
        epoch,
        offset: sub.start_offset() - 1,
        live_from: (sub.start_offset() < live_from).then_some(live_from),
    }
    .to_string();
    let prelude = prelude(state, &start_id, &ready);
    tracing::debug!(topic, "SSE stream opened");
    let registered = access
        .registered
        .subscription(topic, epoch, sub.start_offset() - 1);
    let source = Source::One(One {
        sub,
        topic: topic.to_owned(),
        live_from,
        start_id,
        registered,
    });
    Ok(SseStream::new(state, source, prelude, conn, access, permit))
}

/// `retry:` and the `ready` message every stream starts with.
fn prelude(state: &HttpState, id: &str, ready: &serde_json::Value) -> Bytes {
    let mut prelude = BytesMut::new();
    prelude.extend_from_slice(format!("retry: {}\n", state.settings.retry.as_millis()).as_bytes());
    put_frame(&mut prelude, Some(id), "ready", &ready.to_string());
    prelude.freeze()
}

/// The body of an SSE response: the stream's chunks, counted against its
/// socket as hyper takes them.
///
/// Compressed when `coding` says so: each chunk on its own, flushed, so an
/// event is never held back, and counted as it goes to the socket.
fn body(
    stream: SseStream,
    coding: Option<Coding>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let compressor = coding.map(Compressor::new);
    futures_util::stream::unfold((stream, compressor), |(mut s, mut z)| async move {
        loop {
            let chunk = match (s.next().await, &mut z) {
                (Some(chunk), Some(z)) => z.compress(&chunk),
                (Some(chunk), None) => chunk,
                // The end of a compressed stream (gzip's trailer).
                (None, z) => z.take()?.finish(),
            };
            if chunk.is_empty() {
                continue;
            }
            if let Some(out) = &mut s.outbound {
                out.handed(chunk.len());
            }
            s.bytes_out.increment(chunk.len() as u64);
            return Some((Ok::<_, Infallible>(chunk), (s, z)));
        }
    })
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

/// Appends the shared message `frame` of an event with `id` in place of
/// the id line it was built with.
fn put_with_id(buf: &mut BytesMut, id: &str, frame: &Bytes) {
    let rest = frame
        .iter()
        .position(|b| *b == b'\n')
        .map_or(&frame[..], |i| &frame[i + 1..]);
    buf.extend_from_slice(b"id: ");
    buf.extend_from_slice(id.as_bytes());
    buf.extend_from_slice(b"\n");
    buf.extend_from_slice(rest);
}

/// The shared SSE message of `event` on `topic` (its own `epoch:offset` id).
fn shared_frame<'e>(sub: &Subscription, topic: &str, event: &'e Event) -> &'e Bytes {
    let epoch = sub.epoch();
    sub.encoded(event, Encoding::Sse, || {
        let mut f = BytesMut::new();
        let id = format!("{epoch}:{}", event.offset);
        put_frame(
            &mut f,
            Some(&id),
            &event.event_type,
            &event_json(topic, event),
        );
        f.freeze()
    })
}

/// What one stream has handed hyper against what its connection wrote to
/// the socket: the bytes queued for a peer that has not read them.
///
/// The response head and anything earlier responses on the connection left
/// unwritten are not counted (a few hundred bytes, not growing).
struct SocketBacklog {
    conn: Arc<ConnIo>,
    /// Whether hyper adds chunk framing to each chunk.
    chunked: bool,
    /// `conn.written()` when the stream opened.
    base: u64,
    /// Body bytes handed to hyper, with their chunk framing.
    handed: u64,
    /// What the gauge holds for this stream.
    reported: u64,
    gauge: metrics::Gauge,
    max: u64,
}

impl SocketBacklog {
    fn queued(&self) -> u64 {
        self.handed
            .saturating_sub(self.conn.written().saturating_sub(self.base))
    }

    fn handed(&mut self, len: usize) {
        // hyper writes `<len in hex>\r\n<chunk>\r\n`.
        let framing = if self.chunked {
            (usize::BITS - len.leading_zeros()).div_ceil(4).max(1) as usize + 4
        } else {
            0
        };
        self.handed += (len + framing) as u64;
        self.report();
    }

    fn rebase(&mut self) {
        self.base = self.conn.written();
        self.handed = 0;
    }

    fn report(&mut self) {
        let queued = self.queued();
        if queued != self.reported {
            self.gauge.increment(queued as f64 - self.reported as f64);
            self.reported = queued;
        }
    }
}

impl Drop for SocketBacklog {
    fn drop(&mut self) {
        self.gauge.decrement(self.reported as f64);
    }
}

/// What a stream reads: one topic, or many (`GET /v1/events`).
// The single-topic stream is the common case: inline, it costs one
// allocation less per stream.
#[allow(clippy::large_enum_variant)]
enum Source {
    One(One),
    Many(Box<Many>),
}

/// A delivery of either source.
enum Item {
    One(Delivery),
    Many(MultiDelivery),
}

impl Source {
    async fn recv(&mut self) -> Option<Item> {
        match self {
            Self::One(one) => one.sub.recv().await.map(Item::One),
            Self::Many(many) => many.sub.recv().await.map(Item::Many),
        }
    }

    fn try_recv(&mut self) -> Option<Item> {
        match self {
            Self::One(one) => one.sub.try_recv().map(Item::One),
            Self::Many(many) => many.sub.try_recv().map(Item::Many),
        }
    }

    /// Appends the message of `item`; true when the stream ends with it.
    fn put(&mut self, item: Item, buf: &mut BytesMut, events: &mut u64, conn: &ConnGuard) -> bool {
        match (self, item) {
            (Self::One(one), Item::One(d)) => one.put(d, buf, events),
            (Self::Many(many), Item::Many(d)) => many.put(d, buf, events, conn),
            // Each source yields only its own kind.
            _ => false,
        }
    }

    fn name(&self) -> &str {
        match self {
            Self::One(one) => &one.topic,
            Self::Many(_) => "(many)",
        }
    }
}

/// A single-topic stream (`GET /v1/topics/{topic}/events`).
struct One {
    sub: Subscription,
    topic: String,
    /// Events below this offset are replay by versions (see module docs).
    live_from: u64,
    /// The id a reconnect resumes this stream's start with.
    start_id: String,
    /// Its subscription in the connections registry.
    registered: SubHandle,
}

impl One {
    fn put(&mut self, d: Delivery, buf: &mut BytesMut, events: &mut u64) -> bool {
        match d {
            Delivery::Event(e) => {
                // The whole message is built once per event and shared by
                // every SSE subscriber.
                let frame = shared_frame(&self.sub, &self.topic, &e);
                if e.offset < self.live_from {
                    // Replay by versions: the shared message with this
                    // stream's own id line.
                    let id = EventId {
                        epoch: self.sub.epoch(),
                        offset: e.offset,
                        live_from: Some(self.live_from),
                    };
                    put_with_id(buf, &id.to_string(), frame);
                } else {
                    buf.extend_from_slice(frame);
                }
                *events += 1;
                self.registered.advance(self.sub.epoch(), e.offset, 1);
                false
            }
            Delivery::Gap(g) => {
                tracing::warn!(topic = %self.topic, reason = g.reason.as_str(), "SSE subscriber gap");
                // A per-type gap is about versions, resolved at the start: a
                // reconnect resumes that start.
                let id = match g.event_type {
                    Some(_) => self.start_id.clone(),
                    None => {
                        self.registered.advance(g.epoch, g.current, 0);
                        format!("{}:{}", g.epoch, g.current)
                    }
                };
                put_frame(buf, Some(&id), "gap", &gap_json(&g));
                false
            }
            Delivery::End { last_offset } => {
                let data = json!({"topic": self.topic, "last_offset": last_offset});
                put_frame(buf, None, "end", &data.to_string());
                true
            }
        }
    }
}

/// A multi-topic stream (`GET /v1/events`): every message carries the id
/// of the whole position (see [`super::stream_id`]).
struct Many {
    sub: MultiSubscription,
    selection: StreamSelection,
    /// The id of the last message, rebuilt for each.
    id: String,
    /// Scratch for encoding `id` (no allocation per event).
    id_bytes: Vec<u8>,
    /// Each member's subscription in the connections registry.
    registered: HashMap<Arc<str>, SubHandle>,
}

impl Many {
    /// Records where member `member` stands in the connections registry.
    fn advance(&mut self, conn: &ConnGuard, member: usize, events: u64) {
        let Some(m) = self.sub.member(member) else {
            return;
        };
        let p = m.position;
        // A lookup per event; the name's `Arc` is cloned only to register.
        match self.registered.get(&m.name) {
            Some(handle) => handle.advance(p.epoch, p.offset, events),
            None => {
                let handle = conn.subscription(&m.name, p.epoch, p.offset);
                handle.advance(p.epoch, p.offset, events);
                self.registered.insert(m.name.clone(), handle);
            }
        }
    }

    /// Forgets the registry entries of topics no longer streamed (after a
    /// prune dropped members).
    fn forget_ended(&mut self) {
        let live: std::collections::HashSet<&str> = self
            .sub
            .members()
            .filter(|m| !m.position.ended)
            .map(|m| &*m.name)
            .collect();
        self.registered.retain(|name, _| live.contains(&**name));
    }

    /// Rebuilds `id` from the members' positions.
    fn update_id(&mut self) {
        let entries = self.sub.members().map(|m| Entry {
            name: &m.name,
            pattern: m.pattern,
            position: m.position,
        });
        stream_id::encode(&self.selection, entries, &mut self.id_bytes, &mut self.id);
    }

    fn put(
        &mut self,
        d: MultiDelivery,
        buf: &mut BytesMut,
        events: &mut u64,
        conn: &ConnGuard,
    ) -> bool {
        let (member, delivery) = match d {
            MultiDelivery::Topic { member, delivery } => (member, delivery),
            MultiDelivery::TooManyMatches { limit } => {
                tracing::warn!(
                    limit,
                    "SSE stream ended: its patterns match too many topics"
                );
                let error = json!({
                    "code": "too_many_topics",
                    "message": format!(
                        "the stream's patterns now match more than {limit} topics \
                         (limits.max_pattern_matches); narrow them"
                    ),
                });
                put_frame(buf, None, "error", &error.to_string());
                return true;
            }
        };
        self.update_id();
        match delivery {
            Delivery::Event(e) => {
                let frame = self
                    .sub
                    .member(member)
                    .and_then(|m| Some((m.subscription()?, &m.name)))
                    .map(|(sub, topic)| shared_frame(sub, topic, &e));
                match frame {
                    Some(frame) => put_with_id(buf, &self.id, frame),
                    None => {
                        let topic = self.sub.member(member).map_or("", |m| &*m.name);
                        put_frame(buf, Some(&self.id), &e.event_type, &event_json(topic, &e));
                    }
                }
                *events += 1;
                self.advance(conn, member, 1);
            }
            Delivery::Gap(g) => {
                tracing::warn!(topic = %g.topic, reason = g.reason.as_str(), "SSE subscriber gap");
                put_frame(buf, Some(&self.id), "gap", &gap_json(&g));
                self.advance(conn, member, 0);
            }
            Delivery::End { last_offset } => {
                let topic = self.sub.member(member).map_or("", |m| &*m.name);
                let data = json!({"topic": topic, "last_offset": last_offset});
                put_frame(buf, Some(&self.id), "end", &data.to_string());
                if let Some(m) = self.sub.member(member) {
                    self.registered.remove(&m.name);
                }
            }
        }
        self.sub.finished()
    }
}

/// One subscriber's `text/event-stream` body: every delivery ready at once
/// goes out as one chunk; a comment keeps an idle stream alive.
struct SseStream {
    connections: metrics::Gauge,
    delivered: metrics::Counter,
    bytes_out: metrics::Counter,
    source: Source,
    prelude: Option<Bytes>,
    shutdown: CancellationToken,
    heartbeat: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// `None` when served outside [`super::serve`] (no socket accounting).
    outbound: Option<SocketBacklog>,
    done: bool,
    /// Fires when the caller's session ends; `None` = never.
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Cancelled when an operator closes the stream (`DELETE /v1/connections/{id}`).
    closed: CancellationToken,
    /// Its entry in the connections registry.
    registered: ConnGuard,
    _slot: SseSlot,
    _permit: OwnedSemaphorePermit,
}

impl Drop for SseStream {
    fn drop(&mut self) {
        self.connections.decrement(1.0);
    }
}

/// What the stream does next.
enum Wake {
    Shutdown,
    Closed,
    Expired,
    Delivery(Option<Item>),
    Heartbeat,
}

/// Resolves when `expires` fires; never when it is `None`.
async fn expiry(expires: &mut Option<Pin<Box<tokio::time::Sleep>>>) {
    match expires {
        Some(sleep) => sleep.as_mut().await,
        None => std::future::pending().await,
    }
}

impl SseStream {
    fn new(
        state: &HttpState,
        source: Source,
        prelude: Bytes,
        conn: Option<(Arc<ConnIo>, bool)>,
        access: Access,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        let connections = metrics::gauge!(crate::metrics::CONNECTIONS, "transport" => "sse");
        connections.increment(1.0);
        let heartbeat = state.settings.heartbeat;
        let outbound = conn.map(|(conn, chunked)| SocketBacklog {
            base: conn.written(),
            conn,
            chunked,
            handed: 0,
            reported: 0,
            gauge: metrics::gauge!(crate::metrics::OUTBOUND_QUEUED_BYTES, "transport" => "sse"),
            max: state.settings.max_outbound_bytes as u64,
        });
        Self {
            connections,
            delivered: metrics::counter!(crate::metrics::DELIVERED, "transport" => "sse"),
            bytes_out: metrics::counter!(crate::metrics::BYTES_OUT, "transport" => "sse"),
            source,
            prelude: Some(prelude),
            shutdown: state.shutdown.clone(),
            heartbeat,
            idle: Box::pin(tokio::time::sleep(heartbeat)),
            outbound,
            done: false,
            expires: access.ends.map(|at| Box::pin(tokio::time::sleep_until(at))),
            closed: access.registered.closed(),
            registered: access.registered,
            _slot: access.slot,
            _permit: permit,
        }
    }

    async fn next(&mut self) -> Option<Bytes> {
        if let Some(prelude) = self.prelude.take() {
            return Some(prelude);
        }
        if self.done {
            return None;
        }
        // Room for the next chunk: over the limit, wait for the peer to read
        // instead of pulling more (the subscription falls behind instead).
        let mut budget = CHUNK;
        if let Some(out) = &mut self.outbound {
            loop {
                let queued = out.queued();
                out.report();
                if queued < out.max {
                    budget = budget.min((out.max - queued) as usize);
                    break;
                }
                // A peer that never reads again is cut off by the
                // connection's write watchdog (see `serve`).
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = expiry(&mut self.expires) => break,
                    _ = out.conn.progressed() => {}
                    _ = tokio::time::sleep(self.heartbeat) => {
                        if !out.conn.blocked() {
                            // Nothing waits to be written, so nothing is
                            // queued: the estimate drifted (a head or framing
                            // not as assumed). Start counting afresh rather
                            // than wait for progress that cannot come.
                            tracing::debug!(stream = self.source.name(), queued, "SSE outbound estimate reset");
                            out.rebase();
                        }
                    }
                }
            }
        }
        let wake = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => Wake::Shutdown,
            _ = self.closed.cancelled() => Wake::Closed,
            // Before deliveries: nothing is sent past the session's end.
            _ = expiry(&mut self.expires) => Wake::Expired,
            d = self.source.recv() => Wake::Delivery(d),
            _ = &mut self.idle => Wake::Heartbeat,
        };
        let first = match wake {
            Wake::Shutdown => {
                self.done = true;
                let mut buf = BytesMut::new();
                let reason = json!({"reason": "the broker is shutting down; reconnect"});
                put_frame(&mut buf, None, "shutdown", &reason.to_string());
                return Some(buf.freeze());
            }
            Wake::Closed => {
                self.done = true;
                tracing::info!(
                    stream = self.source.name(),
                    "SSE stream closed by an operator"
                );
                let mut buf = BytesMut::new();
                let reason = json!({"reason": "closed by an administrator; reconnect to resume"});
                put_frame(&mut buf, None, "shutdown", &reason.to_string());
                return Some(buf.freeze());
            }
            Wake::Expired => {
                self.done = true;
                crate::metrics::auth_refused("sse", "token_expired");
                tracing::info!(
                    stream = self.source.name(),
                    "SSE stream ended: the token expired"
                );
                let mut buf = BytesMut::new();
                let error = json!({
                    "code": "token_expired",
                    "message": "the token has expired; reconnect with a fresh one and the last event id",
                });
                // No id: the client's last event id stays at the last event.
                put_frame(&mut buf, None, "error", &error.to_string());
                return Some(buf.freeze());
            }
            Wake::Delivery(d) => d?,
            Wake::Heartbeat => {
                self.idle
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.heartbeat);
                if let Source::Many(many) = &mut self.source {
                    if many.sub.prune() {
                        many.forget_ended();
                    }
                }
                return Some(Bytes::from_static(b": hb\n\n"));
            }
        };
        let mut buf = BytesMut::new();
        let mut events = 0;
        let mut item = Some(first);
        while let Some(it) = item.take() {
            if self.source.put(it, &mut buf, &mut events, &self.registered) {
                self.done = true;
                break;
            }
            if buf.len() < budget {
                item = self.source.try_recv();
            }
        }
        self.delivered.increment(events);
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + self.heartbeat);
        Some(buf.freeze())
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    use super::*;

    fn query(
        after_versions: Option<String>,
        epoch: Option<String>,
        last: Option<String>,
    ) -> EventsQuery {
        EventsQuery {
            types: None,
            earliest: None,
            after_versions,
            epoch,
            last_event_id: last,
        }
    }

    fn event_id() -> impl Strategy<Value = EventId> {
        (
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(epoch, offset, live_from)| EventId {
                epoch,
                offset,
                live_from,
            })
    }

    #[test]
    fn a_replay_id_with_the_url_versions_resumes_by_offset_and_versions() {
        let q = query(Some("a:5,b:3".into()), Some("9".into()), None);
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_static("7:12:40"));
        assert_eq!(
            start_of(&q, &headers).unwrap(),
            Start::AfterOffsetVersions {
                epoch: 7,
                offset: 12,
                versions: vec![("a".into(), 5), ("b".into(), 3)],
                live_from: 40,
            }
        );
        headers.insert("last-event-id", HeaderValue::from_static("7:41"));
        assert_eq!(
            start_of(&q, &headers).unwrap(),
            Start::AfterOffset {
                epoch: 7,
                offset: 41
            }
        );
        for bad in ["", "7", "7:", ":1", "7:1:", "7:1:2:3", "-1:2", "7:1:x"] {
            assert!(parse_event_id(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn event_ids_round_trip(id in event_id()) {
            prop_assert_eq!(parse_event_id(&id.to_string()).unwrap(), id);
        }

        #[test]
        fn versions_round_trip(items in proptest::collection::vec(("[A-Za-z0-9._:-]{1,20}", any::<u64>()), 0..8)) {
            let text = items.iter().map(|(t, v)| format!("{t}:{v}")).collect::<Vec<_>>().join(",");
            prop_assert_eq!(parse_versions(&text).unwrap(), items);
        }

        #[test]
        fn parsers_never_panic_on_arbitrary_text(s in "\\PC*", t in "[0-9:,a-z ]{0,40}") {
            let _ = parse_event_id(&s);
            let _ = parse_event_id(&t);
            let _ = parse_versions(&s);
            let _ = parse_versions(&t);
            let _ = parse_list(Some(&s));
        }

        #[test]
        fn start_of_never_panics(
            after_versions in proptest::option::of("[0-9:,a-z]{0,30}|\\PC{0,30}"),
            epoch in proptest::option::of("[0-9]{0,22}|\\PC{0,10}"),
            last in proptest::option::of("[0-9:]{0,50}|\\PC{0,30}"),
            header in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            id in proptest::option::of(event_id()),
        ) {
            let q = query(after_versions, epoch, last);
            let mut headers = HeaderMap::new();
            if let Some(Ok(v)) = header.map(|h| HeaderValue::from_bytes(&h)) {
                headers.insert("last-event-id", v);
            }
            let _ = start_of(&q, &headers);
            if let Some(id) = id {
                // An id the stream produced always resumes.
                headers.insert("last-event-id", HeaderValue::from_str(&id.to_string()).unwrap());
                let start = start_of(&query(None, None, None), &headers).unwrap();
                let resumed = match start {
                    Start::AfterOffset { epoch, offset } => EventId { epoch, offset, live_from: None },
                    Start::AfterOffsetVersions { epoch, offset, live_from, .. } => EventId { epoch, offset, live_from: Some(live_from) },
                    other => panic!("{other:?}"),
                };
                prop_assert_eq!(resumed, id);
            }
        }
    }
}
