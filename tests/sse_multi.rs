//! `GET /v1/events`: one SSE stream over several named topics and topic
//! patterns, over real loopback sockets against the real broker. Every
//! message carries the id of every topic's position; a reconnect with it
//! (`Last-Event-ID`) must resume each topic exactly, with gaps, ends and
//! joins per topic.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::http::parse_response;
use common::sse::{SseEvent, SseParser};
use common::{config, within};
use reqwest::StatusCode;
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability, TopicOverride};
use ringcast::engine::NewEvent;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long any one expected message may take (they take milliseconds).
const WAIT_SECS: u64 = 10;

/// An open SSE response, read message by message.
struct SseStream {
    response: reqwest::Response,
    parser: SseParser,
    queue: VecDeque<SseEvent>,
    closed: bool,
}

impl SseStream {
    fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), StatusCode::OK, "SSE request refused");
        Self {
            response,
            parser: SseParser::default(),
            queue: VecDeque::new(),
            closed: false,
        }
    }

    /// What a browser would send as `Last-Event-ID` on reconnect.
    fn last_event_id(&self) -> String {
        self.parser.last_event_id.clone()
    }

    /// The next message; `None` once the server closed the stream. Every
    /// message but `error` must carry an id (the stream's whole position).
    async fn next(&mut self) -> Option<SseEvent> {
        let e = within(WAIT_SECS, async {
            loop {
                if let Some(e) = self.queue.pop_front() {
                    return Some(e);
                }
                if self.closed {
                    return None;
                }
                match self.response.chunk().await {
                    Ok(Some(bytes)) => self.parser.feed_events(&bytes, &mut self.queue),
                    Ok(None) | Err(_) => self.closed = true,
                }
            }
        })
        .await?;
        if e.event != "error" {
            let id = e.id.as_deref().unwrap_or_else(|| panic!("no id: {e:?}"));
            assert!(!id.is_empty(), "empty id: {e:?}");
        }
        Some(e)
    }

    /// The next message, which must be of type `kind`.
    async fn expect(&mut self, kind: &str) -> SseEvent {
        let e = self
            .next()
            .await
            .unwrap_or_else(|| panic!("stream closed while waiting for `{kind}`"));
        assert_eq!(e.event, kind, "unexpected message {e:?}");
        e
    }

    /// The `ready` message every stream starts with (its data).
    async fn ready(&mut self) -> Value {
        self.expect("ready").await.json()
    }

    /// The next `n` messages, whatever they are.
    async fn take(&mut self, n: usize) -> Vec<SseEvent> {
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match self.next().await {
                Some(e) => got.push(e),
                None => panic!("stream closed after {got:?}, {n} messages expected"),
            }
        }
        got
    }

    /// Asserts the server ends the stream with no further message.
    async fn expect_closed(&mut self) {
        if let Some(e) = self.next().await {
            panic!("expected the stream to close, got {e:?}");
        }
    }
}

/// The offsets of the events among `messages`, by topic, in arrival order.
fn offsets_by_topic(messages: &[SseEvent]) -> BTreeMap<String, Vec<u64>> {
    let mut by_topic: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in messages.iter().filter(|e| !e.is_control()) {
        by_topic.entry(e.topic()).or_default().push(e.offset());
    }
    by_topic
}

/// `from..=to` as a vector (empty when `from > to`).
fn span(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

/// The `topics` of a `ready` message as `(topic, epoch, offset, ended)`,
/// in the order given.
fn ready_topics(ready: &Value) -> Vec<(String, String, u64, bool)> {
    ready["topics"]
        .as_array()
        .unwrap_or_else(|| panic!("ready without topics: {ready}"))
        .iter()
        .map(|t| {
            (
                t["topic"].as_str().expect("topic").to_owned(),
                t["epoch"].as_str().expect("epoch is a string").to_owned(),
                t["offset"].as_u64().expect("offset"),
                t["ended"].as_bool().expect("ended"),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// A broker plus an HTTP client.
// ---------------------------------------------------------------------------

struct Api {
    broker: Broker,
    http: reqwest::Client,
    base: String,
    /// Sent as a Bearer token with every request, when set.
    token: Option<String>,
    _dir: tempfile::TempDir,
}

impl Api {
    /// A memory-mode broker with default settings.
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A memory-mode broker with settings changed by `tweak`.
    async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), Durability::Memory);
        tweak(&mut config);
        Self::start_config(config, dir).await
    }

    async fn start_config(config: Config, dir: tempfile::TempDir) -> Self {
        config.validate().expect("test config is valid");
        let broker = common::start(config).await;
        let base = format!("http://{}", broker.http_addr());
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("HTTP client");
        Self {
            broker,
            http,
            base,
            token: None,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        common::http::send_json(self.authorized(request), 20).await
    }

    /// Publishes one JSON event over HTTP; returns `(epoch, offset)`.
    async fn publish(&self, topic: &str, event_type: &str, body: Value) -> (String, u64) {
        let (status, ack) = self
            .send(
                self.http
                    .post(self.url(&format!("/v1/topics/{topic}/events?type={event_type}")))
                    .body(body.to_string()),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "publish to {topic} refused: {ack}");
        let epoch = ack["epoch"].as_str().expect("epoch is a string").to_owned();
        (epoch, ack["offset"].as_u64().expect("offset"))
    }

    /// Publishes `n` events of type `tick`; returns the epoch and the last offset.
    async fn ticks(&self, topic: &str, n: u64) -> (String, u64) {
        let mut last = (String::new(), 0);
        for i in 0..n {
            last = self.publish(topic, "tick", json!({ "i": i })).await;
        }
        last
    }

    async fn seal(&self, topic: &str) {
        let (status, body) = self
            .send(
                self.http
                    .post(self.url(&format!("/v1/topics/{topic}/seal"))),
            )
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!({"sealed": true})));
    }

    async fn delete(&self, topic: &str) {
        let (status, body) = self
            .send(self.http.delete(self.url(&format!("/v1/topics/{topic}"))))
            .await;
        assert_eq!((status, body), (StatusCode::OK, json!({"deleted": true})));
    }

    /// `GET /v1/events?{query}`, with `Last-Event-ID: {last_id}` when given.
    async fn open(&self, query: &str, last_id: Option<&str>) -> reqwest::Response {
        let mut request = self
            .http
            .get(self.url(&format!("/v1/events?{query}")))
            .header("accept", "text/event-stream");
        if let Some(id) = last_id {
            request = request.header("last-event-id", id);
        }
        within(20, self.authorized(request).send())
            .await
            .expect("SSE request sent")
    }

    /// A new stream (which must be accepted).
    async fn stream(&self, query: &str) -> SseStream {
        SseStream::new(self.open(query, None).await)
    }

    /// A reconnect with `last_id` (which must be accepted).
    async fn resume(&self, query: &str, last_id: &str) -> SseStream {
        SseStream::new(self.open(query, Some(last_id)).await)
    }

    /// A stream request that must be refused: its status and JSON body.
    async fn refused(&self, query: &str, last_id: Option<&str>) -> (StatusCode, Value) {
        let response = self.open(query, last_id).await;
        let status = response.status();
        let body = within(20, response.bytes()).await.expect("body read");
        let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "{status}: body {:?} is not JSON: {e}",
                String::from_utf8_lossy(&body)
            )
        });
        (status, value)
    }
}

/// Asserts `body` is `{"error": {"code": code, "message": <non-empty>}}`.
fn assert_error(got: (StatusCode, Value), status: StatusCode, code: &str) {
    let (got_status, body) = got;
    assert_eq!(got_status, status, "body: {body}");
    assert_eq!(body["error"]["code"], code, "body: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "error without message: {body}");
}

// ---------------------------------------------------------------------------
// Resume: every topic exactly, per-topic gaps.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_resume_gets_every_topics_missed_events_once_and_one_retention_gap_for_the_trimmed_topic()
{
    // `c` keeps its last 3 events; the others keep everything.
    let api = Api::start_with(|c| {
        c.topics.overrides.push(TopicOverride {
            pattern: "c".into(),
            max_events: Some(3),
            ..TopicOverride::default()
        })
    })
    .await;
    let topics = ["a", "b", "c", "orders.1", "orders.2"];
    let mut epochs = BTreeMap::new();
    for t in topics {
        let (epoch, offset) = api.publish(t, "seed", json!({})).await;
        assert_eq!(offset, 1);
        epochs.insert(t, epoch);
    }
    let query = "topic=a&topic=b&topic=c&topic=orders.*";
    let mut s = api.stream(query).await;
    let ready = s.ready().await;
    assert_eq!(ready["patterns"], json!(["orders.*"]));
    let mut listed = ready_topics(&ready);
    // Named topics first, in URL order; pattern matches after them.
    listed[3..].sort();
    let want: Vec<_> = topics
        .iter()
        .map(|t| (t.to_string(), epochs[t].clone(), 1, false))
        .collect();
    assert_eq!(listed, want, "{ready}");

    // Interleaved publishers: offsets 2..=4 on every topic.
    for round in 0..3 {
        for t in topics {
            api.publish(t, "tick", json!({ "round": round })).await;
        }
    }
    let first = s.take(8).await;
    let mut had: BTreeMap<String, u64> = topics.iter().map(|t| (t.to_string(), 1)).collect();
    for e in &first {
        assert_eq!(e.event, "tick", "{e:?}");
        let had = had.get_mut(&e.topic()).expect("one of the stream's topics");
        assert_eq!(e.offset(), *had + 1, "per-topic order: {e:?}");
        *had = e.offset();
    }
    let last = s.last_event_id();
    assert_eq!(first[7].id.as_deref(), Some(last.as_str()));
    // Cut: whatever the broker sent after the 8th event is lost with it.
    drop(s);

    // While away: offsets 5..=6 everywhere, and 7..=10 on `c`, which then
    // retains 8..=10 only.
    for round in 3..5 {
        for t in topics {
            api.publish(t, "tick", json!({ "round": round })).await;
        }
    }
    api.ticks("c", 4).await;

    let mut s = api.resume(query, &last).await;
    s.ready().await;
    let missed: usize = topics
        .iter()
        .filter(|t| **t != "c")
        .map(|t| (6 - had[*t]) as usize)
        .sum();
    let got = s.take(missed + 1).await;
    let gaps: Vec<Value> = got
        .iter()
        .filter(|e| e.event == "gap")
        .map(SseEvent::json)
        .collect();
    assert_eq!(
        gaps,
        [json!({
            "topic": "c",
            "type": null,
            "reason": "retention",
            "epoch": epochs["c"],
            "requested": had["c"],
            "first_available": 8,
            "current": 10,
        })],
        "one gap, for the trimmed topic only: {got:#?}"
    );
    for e in got.iter().filter(|e| e.event != "gap") {
        assert_eq!(e.event, "tick", "{e:?}");
    }
    let want: BTreeMap<String, Vec<u64>> = topics
        .iter()
        .filter(|t| **t != "c")
        .map(|t| (t.to_string(), span(had[*t] + 1, 6)))
        .filter(|(_, offsets)| !offsets.is_empty())
        .collect();
    assert_eq!(
        offsets_by_topic(&got),
        want,
        "every missed event once, in order, per topic"
    );

    // Nothing else was queued: the next event of every topic is the next
    // one published (`c` continues live after its gap, as a single-topic
    // stream does).
    for t in topics {
        api.publish(t, "marker", json!({})).await;
    }
    let markers = s.take(topics.len()).await;
    assert!(markers.iter().all(|e| e.event == "marker"), "{markers:#?}");
    let want: BTreeMap<String, Vec<u64>> = topics
        .iter()
        .map(|t| (t.to_string(), vec![if *t == "c" { 11 } else { 7 }]))
        .collect();
    assert_eq!(offsets_by_topic(&markers), want);

    // A reconnect after the gap does not repeat it.
    let last = s.last_event_id();
    drop(s);
    let mut s = api.resume(query, &last).await;
    s.ready().await;
    api.publish("c", "marker", json!({})).await;
    let e = s.next().await.expect("the stream goes on");
    assert_eq!(
        (e.event.as_str(), e.topic(), e.offset()),
        ("marker", "c".to_owned(), 12)
    );
}

#[tokio::test]
async fn the_ready_id_resumes_every_topic_with_nothing_lost_and_every_message_has_an_id() {
    let api = Api::start().await;
    for t in ["a", "b", "orders.1"] {
        api.publish(t, "seed", json!({})).await;
    }
    let query = "topic=a&topic=b&topic=orders.*";
    let response = api.open(query, None).await;
    assert_eq!(
        response.headers()["content-type"],
        "text/event-stream",
        "an SSE response"
    );
    let mut s = SseStream::new(response);
    let ready = s.expect("ready").await;
    let ready_id = ready.id.clone().unwrap();
    // The documented id: base64url without padding, format byte 1.
    let bytes = URL_SAFE_NO_PAD
        .decode(&ready_id)
        .unwrap_or_else(|e| panic!("{ready_id:?} is not base64url: {e}"));
    assert_eq!(bytes[0], 1, "format byte of {ready_id:?}");

    // One event on each topic, and one on a topic the pattern brings in.
    api.publish("a", "tick", json!({"n": "a2"})).await;
    api.publish("orders.1", "tick", json!({"n": "o2"})).await;
    api.publish("b", "tick", json!({"n": "b2"})).await;
    api.publish("orders.new", "tick", json!({"n": "new1"}))
        .await;
    let live = s.take(4).await;
    let mut ids: Vec<&str> = live.iter().map(|e| e.id.as_deref().unwrap()).collect();
    ids.push(&ready_id);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 5, "each message moves the id on: {live:#?}");
    drop(s);

    // A client that saw only `ready` misses none of them.
    let mut again = api.resume(query, &ready_id).await;
    let ready = again.ready().await;
    let mut listed = ready_topics(&ready);
    listed.sort();
    let offsets: Vec<(String, u64)> = listed.into_iter().map(|t| (t.0, t.2)).collect();
    // Positions as of the id: orders.new joins from its first event.
    assert_eq!(
        offsets,
        [("a", 1), ("b", 1), ("orders.1", 1), ("orders.new", 0)].map(|(t, o)| (t.to_owned(), o))
    );
    let replayed = again.take(4).await;
    let key = |e: &SseEvent| {
        let v = e.json();
        (e.topic(), e.offset(), e.event.clone(), v["data"].clone())
    };
    let mut want: Vec<_> = live.iter().map(key).collect();
    let mut got: Vec<_> = replayed.iter().map(key).collect();
    want.sort_by_key(|k| (k.0.clone(), k.1));
    got.sort_by_key(|k| (k.0.clone(), k.1));
    assert_eq!(got, want);

    // And the last id of that stream resumes with nothing repeated.
    let last = again.last_event_id();
    drop(again);
    let mut third = api.resume(query, &last).await;
    third.ready().await;
    api.publish("orders.new", "marker", json!({})).await;
    let next = third.expect("marker").await;
    assert_eq!((next.topic(), next.offset()), ("orders.new".to_owned(), 2));
}

#[tokio::test]
async fn ids_of_another_selection_and_malformed_ids_are_refused_with_invalid_start() {
    let api = Api::start().await;
    api.publish("a", "seed", json!({})).await;
    api.publish("orders.1", "seed", json!({})).await;
    let mut s = api.stream("topic=a&topic=b&topic=orders.*").await;
    s.ready().await;
    api.publish("b", "tick", json!({})).await;
    s.expect("tick").await;
    let id = s.last_event_id();
    drop(s);

    // The same selection written otherwise: commas, repeats.
    for same in [
        "topic=a,b,orders.*",
        "topic=a&topic=b&topic=a&topic=orders.*&topic=orders.*",
        "topic=a&topic=b&topic=orders.*&types=",
    ] {
        let mut s = api.resume(same, &id).await;
        s.ready().await;
    }
    // And through the query parameter instead of the header.
    let encoded: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
    let mut s = api
        .stream(&format!(
            "topic=a&topic=b&topic=orders.*&last_event_id={encoded}"
        ))
        .await;
    s.ready().await;
    drop(s);

    // Another selection: other order, fewer, more, another pattern.
    for other in [
        "topic=b&topic=a&topic=orders.*",
        "topic=a&topic=b",
        "topic=a&topic=b&topic=c&topic=orders.*",
        "topic=a&topic=b&topic=orders.?",
    ] {
        assert_error(
            api.refused(other, Some(&id)).await,
            StatusCode::BAD_REQUEST,
            "invalid_start",
        );
    }
    let query = "topic=a&topic=b&topic=orders.*";
    let bytes = URL_SAFE_NO_PAD.decode(&id).unwrap();
    let mut format2 = bytes.clone();
    format2[0] = 2;
    let mut trailing = bytes.clone();
    trailing.push(0);
    for bad in [
        "garbage!".to_owned(),
        "7:12".to_owned(),
        id[..id.len() - 3].to_owned(),
        URL_SAFE_NO_PAD.encode(&format2),
        URL_SAFE_NO_PAD.encode(&trailing),
        URL_SAFE_NO_PAD.encode(&bytes[..5]),
    ] {
        assert_error(
            api.refused(query, Some(&bad)).await,
            StatusCode::BAD_REQUEST,
            "invalid_start",
        );
    }
    assert_error(
        api.refused(&format!("{query}&last_event_id=%21%21"), None)
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_start",
    );
}

// ---------------------------------------------------------------------------
// Patterns: topics that join later.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn topics_created_after_the_stream_opened_arrive_from_their_first_event() {
    let api = Api::start().await;
    api.publish("orders.1", "seed", json!({})).await;
    let mut s = api.stream("topic=orders.*").await;
    let ready = s.ready().await;
    assert_eq!(ready_topics(&ready).len(), 1, "{ready}");

    // Five publishes at once to a topic that does not exist yet (the first
    // creates it while the others queue), and a batch creating another.
    let burst = (0..5).map(|i| api.publish("orders.new", "tick", json!({ "i": i })));
    futures::future::join_all(burst).await;
    let batch = json!([
        {"type": "tick", "data": {"i": 0}},
        {"type": "tick", "data": {"i": 1}},
        {"type": "tick", "data": {"i": 2}},
        {"type": "tick", "data": {"i": 3}},
    ]);
    let (status, ack) = api
        .send(
            api.http
                .post(api.url("/v1/topics/orders.batch/events:batch"))
                .body(batch.to_string()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{ack}");
    api.publish("orders.1", "tick", json!({})).await;

    let got = s.take(10).await;
    let want: BTreeMap<String, Vec<u64>> = [
        ("orders.1", vec![2]),
        ("orders.batch", span(1, 4)),
        ("orders.new", span(1, 5)),
    ]
    .map(|(t, o)| (t.to_owned(), o))
    .into();
    assert_eq!(offsets_by_topic(&got), want, "{got:#?}");

    api.publish("orders.new", "marker", json!({})).await;
    let next = s.expect("marker").await;
    assert_eq!((next.topic(), next.offset()), ("orders.new".to_owned(), 6));
}

#[tokio::test]
async fn a_topic_created_while_the_client_was_away_arrives_from_its_first_event_on_resume() {
    let api = Api::start().await;
    api.publish("orders.1", "seed", json!({})).await;
    let query = "topic=a&topic=orders.*";
    let mut s = api.stream(query).await;
    s.ready().await;
    api.publish("a", "tick", json!({})).await;
    assert_eq!(s.expect("tick").await.offset(), 1);
    let last = s.last_event_id();
    drop(s);

    api.ticks("orders.late", 3).await;
    api.ticks("orders.1", 1).await;
    api.ticks("a", 1).await;
    let mut s = api.resume(query, &last).await;
    let ready = s.ready().await;
    let mut listed: Vec<(String, u64)> = ready_topics(&ready)
        .into_iter()
        .map(|t| (t.0, t.2))
        .collect();
    listed[1..].sort();
    assert_eq!(
        listed,
        [("a", 1), ("orders.1", 1), ("orders.late", 0)].map(|(t, o)| (t.to_owned(), o))
    );
    let got = s.take(5).await;
    let want: BTreeMap<String, Vec<u64>> = [
        ("a", vec![2]),
        ("orders.1", vec![2]),
        ("orders.late", span(1, 3)),
    ]
    .map(|(t, o)| (t.to_owned(), o))
    .into();
    assert_eq!(offsets_by_topic(&got), want, "{got:#?}");
    api.publish("orders.late", "marker", json!({})).await;
    let next = s.expect("marker").await;
    assert_eq!((next.topic(), next.offset()), ("orders.late".to_owned(), 4));
}

// ---------------------------------------------------------------------------
// Limits and refusals.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn more_topics_and_patterns_than_max_stream_topics_are_refused() {
    let api = Api::start_with(|c| c.limits.max_stream_topics = 3).await;
    // At the limit; repeats count once.
    for ok in [
        "topic=a&topic=b&topic=orders.*",
        "topic=a&topic=a&topic=b,b&topic=orders.*&topic=orders.*",
    ] {
        let mut s = api.stream(ok).await;
        s.ready().await;
    }
    for over in [
        "topic=a&topic=b&topic=c&topic=orders.*",
        "topic=a,b,c,d",
        "topic=a.*&topic=b.*&topic=c.*&topic=d.*",
    ] {
        assert_error(
            api.refused(over, None).await,
            StatusCode::BAD_REQUEST,
            "too_many_topics",
        );
    }
}

#[tokio::test]
async fn a_pattern_matching_more_than_max_pattern_matches_topics_is_refused() {
    let api = Api::start_with(|c| c.limits.max_pattern_matches = 2).await;
    api.ticks("orders.1", 1).await;
    api.ticks("orders.2", 1).await;
    // Named topics do not count against it.
    let query = "topic=a&topic=b&topic=c&topic=orders.*";
    let mut s = api.stream(query).await;
    assert_eq!(ready_topics(&s.ready().await).len(), 5);
    drop(s);
    api.ticks("orders.3", 1).await;
    assert_error(
        api.refused(query, None).await,
        StatusCode::BAD_REQUEST,
        "too_many_topics",
    );
    // Two patterns share the limit.
    assert_error(
        api.refused("topic=orders.1*&topic=orders.2*&topic=orders.3*", None)
            .await,
        StatusCode::BAD_REQUEST,
        "too_many_topics",
    );
}

#[tokio::test]
async fn pattern_matches_growing_past_the_limit_while_streaming_end_the_stream_with_an_error() {
    let api = Api::start_with(|c| c.limits.max_pattern_matches = 2).await;
    api.ticks("orders.1", 1).await;
    let query = "topic=a&topic=orders.*";
    let mut s = api.stream(query).await;
    s.ready().await;
    // The second match is within the limit.
    api.ticks("orders.2", 1).await;
    let e = s.expect("tick").await;
    assert_eq!((e.topic(), e.offset()), ("orders.2".to_owned(), 1));
    let last = s.last_event_id();

    api.ticks("orders.3", 1).await;
    let error = s.expect("error").await;
    assert_eq!(error.json()["code"], "too_many_topics", "{error:?}");
    assert!(error.json()["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    s.expect_closed().await;
    assert_eq!(s.last_event_id(), last, "the error moves no position");

    // A reconnect is refused the same way, explicitly.
    assert_error(
        api.refused(query, Some(&last)).await,
        StatusCode::BAD_REQUEST,
        "too_many_topics",
    );
}

#[tokio::test]
async fn malformed_selections_are_refused_with_400() {
    let api = Api::start().await;
    api.ticks("a", 1).await;
    for (query, code) in [
        ("", "bad_request"),
        ("types=x", "bad_request"),
        ("topic=", "bad_request"),
        ("topic=a&after_versions=x:1&epoch=1", "bad_request"),
        ("topic=a&epoch=1", "bad_request"),
        ("topic=a&earliest=yes", "bad_request"),
        ("topic=a%20b", "invalid_topic"),
        ("topic=a&topic=%C3%A9", "invalid_topic"),
        ("topic=orders.%2A%24", "bad_request"),
        ("topic=user:%7Bsub%7D", "bad_request"),
        ("topic=orders.%7Bx%7D", "bad_request"),
        ("topic=a&types=b%20c", "invalid_type"),
    ] {
        let (status, body) = api.refused(query, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert_eq!(body["error"]["code"], code, "{query}: {body}");
    }
}

// ---------------------------------------------------------------------------
// Ends: sealed and deleted topics.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn sealing_one_topic_ends_it_alone_and_sealing_every_named_topic_ends_the_stream() {
    let api = Api::start().await;
    let (epoch_a, _) = api.ticks("a", 2).await;
    api.ticks("b", 1).await;
    let query = "topic=a&topic=b";
    let mut s = api.stream(query).await;
    s.ready().await;

    api.seal("a").await;
    let end = s.expect("end").await;
    assert_eq!(end.json(), json!({"topic": "a", "last_offset": 2}));
    let after_a = s.last_event_id();
    // `a` takes no more events; `b` goes on.
    let (status, body) = api
        .send(
            api.http
                .post(api.url("/v1/topics/a/events?type=tick"))
                .body("{}"),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    api.ticks("b", 1).await;
    let e = s.expect("tick").await;
    assert_eq!((e.topic(), e.offset()), ("b".to_owned(), 2));

    api.seal("b").await;
    let end = s.expect("end").await;
    assert_eq!(end.json(), json!({"topic": "b", "last_offset": 2}));
    s.expect_closed().await;

    // EventSource reconnects with the last id it saw; 204 makes it stop.
    let last = s.last_event_id();
    let response = api.open(query, Some(&last)).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // A client that stopped after `a`'s end gets `b`'s rest, then the end.
    let mut behind = api.resume(query, &after_a).await;
    let ready = behind.ready().await;
    assert_eq!(
        ready_topics(&ready)[0],
        ("a".to_owned(), epoch_a, 2, true),
        "{ready}"
    );
    let e = behind.expect("tick").await;
    assert_eq!((e.topic(), e.offset()), ("b".to_owned(), 2));
    assert_eq!(behind.expect("end").await.topic(), "b");
    behind.expect_closed().await;
}

#[tokio::test]
async fn a_stream_with_a_pattern_outlives_its_sealed_topics() {
    let api = Api::start().await;
    api.ticks("a", 1).await;
    api.ticks("orders.1", 1).await;
    let query = "topic=a&topic=orders.*";
    let mut s = api.stream(query).await;
    s.ready().await;
    api.seal("a").await;
    api.seal("orders.1").await;
    let ends = s.take(2).await;
    let mut ended: Vec<String> = ends
        .iter()
        .inspect(|e| assert_eq!(e.event, "end", "{e:?}"))
        .map(SseEvent::topic)
        .collect();
    ended.sort();
    assert_eq!(ended, ["a", "orders.1"]);
    // Still open: a new match joins.
    api.ticks("orders.2", 1).await;
    let e = s.expect("tick").await;
    assert_eq!((e.topic(), e.offset()), ("orders.2".to_owned(), 1));
    let last = s.last_event_id();
    drop(s);

    // A reconnect knows both ended: no second `end`, no 204 (the pattern
    // may still bring topics in).
    let mut s = api.resume(query, &last).await;
    let ready = s.ready().await;
    let mut listed: Vec<(String, u64, bool)> = ready_topics(&ready)
        .into_iter()
        .map(|t| (t.0, t.2, t.3))
        .collect();
    listed[1..].sort();
    assert_eq!(
        listed,
        [
            ("a", 1, true),
            ("orders.1", 1, true),
            ("orders.2", 1, false)
        ]
        .map(|(t, o, ended)| (t.to_owned(), o, ended))
    );
    api.publish("orders.2", "marker", json!({})).await;
    let e = s.next().await.expect("the stream goes on");
    assert_eq!((e.event.as_str(), e.offset()), ("marker", 2), "{e:?}");
}

#[tokio::test]
async fn a_pattern_topic_deleted_while_away_gets_an_epoch_changed_gap_and_the_others_resume_exactly(
) {
    let api = Api::start().await;
    api.ticks("a", 1).await;
    api.ticks("orders.1", 1).await;
    let (old_epoch, _) = api.ticks("orders.2", 1).await;
    let query = "topic=a&topic=orders.*";
    let mut s = api.stream(query).await;
    s.ready().await;
    api.ticks("orders.2", 1).await;
    let e = s.expect("tick").await;
    assert_eq!((e.topic(), e.offset()), ("orders.2".to_owned(), 2));
    let last = s.last_event_id();
    drop(s);

    api.delete("orders.2").await;
    api.ticks("a", 2).await;
    api.ticks("orders.1", 1).await;
    let mut s = api.resume(query, &last).await;
    s.ready().await;
    let got = s.take(4).await;
    let gaps: Vec<Value> = got
        .iter()
        .filter(|e| e.event == "gap")
        .map(SseEvent::json)
        .collect();
    assert_eq!(gaps.len(), 1, "{got:#?}");
    let gap = &gaps[0];
    assert_eq!(
        (
            &gap["topic"],
            &gap["type"],
            &gap["reason"],
            &gap["requested"]
        ),
        (
            &json!("orders.2"),
            &Value::Null,
            &json!("epoch_changed"),
            &json!(2)
        ),
        "{gap}"
    );
    assert_ne!(gap["epoch"], json!(old_epoch), "{gap}");
    let want: BTreeMap<String, Vec<u64>> = [("a", span(2, 3)), ("orders.1", vec![2])]
        .map(|(t, o)| (t.to_owned(), o))
        .into();
    assert_eq!(offsets_by_topic(&got), want, "{got:#?}");
    let after_gap = s.last_event_id();

    // Created again: the new topic from its first event.
    api.ticks("orders.2", 2).await;
    let got = s.take(2).await;
    assert_eq!(
        offsets_by_topic(&got),
        [("orders.2".to_owned(), span(1, 2))].into()
    );
    drop(s);

    // A reconnect with the id after the gap does not repeat it.
    let mut s = api.resume(query, &after_gap).await;
    s.ready().await;
    let got = s.take(2).await;
    assert_eq!(
        offsets_by_topic(&got),
        [("orders.2".to_owned(), span(1, 2))].into(),
        "{got:#?}"
    );
}

/// The `end` of a deleted pattern topic names it (the member stays, ended,
/// until the topic is gone for good or stored again).
#[tokio::test]
async fn deleting_a_pattern_topic_while_connected_ends_it_by_name() {
    let api = Api::start().await;
    api.ticks("orders.1", 1).await;
    api.ticks("orders.2", 3).await;
    let mut s = api.stream("topic=orders.*").await;
    s.ready().await;
    api.delete("orders.2").await;
    let end = s.expect("end").await;
    assert_eq!(
        end.json(),
        json!({"topic": "orders.2", "last_offset": 3}),
        "the end names the deleted topic"
    );
}

#[tokio::test]
async fn a_pattern_topic_deleted_and_created_again_while_connected_ends_then_starts_from_its_first_event(
) {
    let api = Api::start().await;
    api.ticks("orders.1", 1).await;
    api.ticks("orders.2", 3).await;
    let query = "topic=orders.*";
    let mut s = api.stream(query).await;
    s.ready().await;
    api.delete("orders.2").await;
    s.expect("end").await;
    let after_end = s.last_event_id();

    api.ticks("orders.2", 3).await;
    let got = s.take(3).await;
    assert_eq!(
        offsets_by_topic(&got),
        [("orders.2".to_owned(), span(1, 3))].into(),
        "{got:#?}"
    );
    drop(s);

    // A reconnect with the id of the end gets the new topic whole.
    let mut s = api.resume(query, &after_end).await;
    s.ready().await;
    let got = s.take(3).await;
    assert_eq!(
        offsets_by_topic(&got),
        [("orders.2".to_owned(), span(1, 3))].into(),
        "{got:#?}"
    );
}

/// A raw HTTP/1.0 SSE request (close-delimited body) over a socket with a
/// small receive buffer; returns the socket and the body bytes read so far
/// (up to the `ready` message).
async fn raw_stream(api: &Api, query: &str) -> (TcpStream, Vec<u8>) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(api.broker.http_addr()).await.unwrap();
    let request = format!(
        "GET /v1/events?{query} HTTP/1.0\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut bytes = Vec::new();
    within(WAIT_SECS, async {
        let mut buf = [0u8; 4096];
        while !bytes.windows(13).any(|w| w == b"event: ready\n") {
            let n = stream.read(&mut buf).await.expect("SSE read");
            assert!(n > 0, "SSE stream closed: {bytes:?}");
            bytes.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let response = parse_response(&bytes);
    assert_eq!(response.status, 200, "{}", response.head);
    (stream, response.body)
}

/// The "created" notice of the new `orders.2` can come while the old one
/// still has events (and its `End`) to hand out: the new topic joins when
/// the old one's `End` is taken.
#[tokio::test]
async fn a_pattern_topic_created_again_before_the_stream_took_its_end_still_joins() {
    const EVENT: usize = 64 * 1024;
    let api = Api::start_with(|c| {
        c.limits.max_outbound_bytes = bytesize::ByteSize::kib(64);
    })
    .await;
    api.ticks("orders.1", 1).await;
    api.ticks("orders.2", 1).await;
    let (mut raw, mut bytes) = raw_stream(&api, "topic=orders.*").await;
    // The client does not read: far more than the socket buffers and the
    // outbound limit hold, so the stream stops taking deliveries.
    let payload = Value::String("y".repeat(EVENT));
    for _ in 0..128 {
        api.publish("orders.1", "big", payload.clone()).await;
    }
    // Meanwhile `orders.2` goes and comes back.
    api.delete("orders.2").await;
    api.ticks("orders.2", 3).await;

    let mut parser = SseParser::default();
    let mut queue = VecDeque::new();
    let mut seen = Vec::new();
    let finished = tokio::time::timeout(Duration::from_secs(WAIT_SECS), async {
        let mut buf = vec![0u8; 65536];
        loop {
            parser.feed_events(&std::mem::take(&mut bytes), &mut queue);
            while let Some(e) = queue.pop_front() {
                if e.event != "ready" {
                    let topic = e.topic();
                    let offset = (!e.is_control()).then(|| e.offset());
                    seen.push((e.event.clone(), topic, offset));
                }
            }
            let new = seen
                .iter()
                .filter(|(kind, t, _)| kind == "tick" && t == "orders.2")
                .count();
            if new == 3 {
                return;
            }
            let n = raw.read(&mut buf).await.expect("SSE read");
            assert!(n > 0, "stream closed after {seen:?}");
            bytes.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let big = seen.iter().filter(|(kind, _, _)| kind == "big").count();
    let others: Vec<_> = seen.iter().filter(|(kind, _, _)| kind != "big").collect();
    assert!(
        finished.is_ok(),
        "the new orders.2 never arrived: {big} big events, and {others:?}"
    );
    let orders2: Vec<_> = seen.iter().filter(|(_, t, _)| t == "orders.2").collect();
    assert_eq!(big, 128);
    assert_eq!(
        orders2,
        [
            &("end".to_owned(), "orders.2".to_owned(), None),
            &("tick".to_owned(), "orders.2".to_owned(), Some(1)),
            &("tick".to_owned(), "orders.2".to_owned(), Some(2)),
            &("tick".to_owned(), "orders.2".to_owned(), Some(3)),
        ]
    );
}

#[tokio::test]
async fn a_slow_consumer_gap_is_for_the_topic_that_fell_behind_only() {
    const EVENT: usize = 32 * 1024;
    let api = Api::start_with(|c| {
        c.limits.max_outbound_bytes = bytesize::ByteSize::kib(64);
        c.topics.overrides.push(TopicOverride {
            pattern: "big".into(),
            max_events: Some(16),
            ..TopicOverride::default()
        })
    })
    .await;
    api.ticks("a", 1).await;
    api.ticks("big", 1).await;
    let (mut raw, mut bytes) = raw_stream(&api, "topic=a&topic=big").await;
    // The client does not read: far more than the socket buffers, the
    // outbound limit and `big`'s ring hold. `a` keeps everything.
    let payload = Value::String("y".repeat(EVENT));
    for i in 0..400 {
        api.publish("big", "big", payload.clone()).await;
        if i % 20 == 0 {
            api.publish("a", "tick", json!({ "i": i })).await;
        }
    }
    let (_, last_a) = api.publish("a", "marker", json!({})).await;
    let (_, last_big) = api.publish("big", "marker", json!({})).await;
    assert_eq!((last_a, last_big), (22, 402));

    let mut parser = SseParser::default();
    let mut queue = VecDeque::new();
    let mut seen: Vec<SseEvent> = Vec::new();
    within(WAIT_SECS, async {
        let mut buf = vec![0u8; 65536];
        loop {
            parser.feed_events(&std::mem::take(&mut bytes), &mut queue);
            seen.extend(queue.drain(..).filter(|e| e.event != "ready"));
            if seen.iter().filter(|e| e.event == "marker").count() == 2 {
                return;
            }
            let n = raw.read(&mut buf).await.expect("SSE read");
            assert!(n > 0, "stream closed after {} messages", seen.len());
            bytes.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let gaps: Vec<(usize, Value)> = seen
        .iter()
        .enumerate()
        .filter(|(_, e)| e.event == "gap")
        .map(|(i, e)| (i, e.json()))
        .collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    let (at, gap) = &gaps[0];
    assert_eq!(
        (&gap["topic"], &gap["reason"]),
        (&json!("big"), &json!("slow_consumer")),
        "{gap}"
    );
    let requested = gap["requested"].as_u64().unwrap();
    let current = gap["current"].as_u64().unwrap();
    let offsets = offsets_by_topic(&seen);
    assert_eq!(offsets["a"], span(2, 22), "`a` lost nothing");
    let before = offsets_by_topic(&seen[..*at]);
    assert_eq!(before["big"], span(2, requested), "`big` up to its gap");
    let after = offsets_by_topic(&seen[*at..]);
    assert_eq!(after["big"], span(current + 1, 402), "`big` after its gap");
}

// ---------------------------------------------------------------------------
// Types, envelopes, access.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_types_filter_applies_to_every_topic_and_each_event_names_its_topic() {
    let api = Api::start().await;
    api.ticks("a", 1).await;
    api.ticks("orders.1", 1).await;
    let query = "topic=a&topic=orders.*&types=keep,also";
    let mut s = api.stream(query).await;
    s.ready().await;
    api.publish("a", "drop", json!({"n": 1})).await;
    api.publish("orders.1", "keep", json!({"n": 2})).await;
    api.publish("a", "keep", json!({"n": 3})).await;
    api.publish("orders.1", "drop", json!({"n": 4})).await;
    api.publish("orders.2", "drop", json!({"n": 5})).await;
    api.publish("orders.2", "also", json!({"n": 6})).await;
    api.publish("orders.1", "also", json!({"n": 7})).await;

    let got = s.take(4).await;
    let mut envelopes: Vec<Value> = got
        .iter()
        .map(|e| {
            let mut v = e.json();
            assert_eq!(v["type"], json!(e.event), "the event type is the SSE type");
            assert!(v["ts"].as_u64().is_some_and(|ts| ts > 0), "{v}");
            v.as_object_mut().unwrap().remove("ts");
            v
        })
        .collect();
    envelopes.sort_by_key(|v| (v["topic"].to_string(), v["offset"].as_u64()));
    let envelope = |topic: &str, kind: &str, version: u64, offset: u64, n: u64| {
        json!({"topic": topic, "type": kind, "version": version, "offset": offset,
               "headers": {}, "data": {"n": n}})
    };
    assert_eq!(
        envelopes,
        [
            envelope("a", "keep", 1, 3, 3),
            envelope("orders.1", "keep", 1, 2, 2),
            envelope("orders.1", "also", 1, 4, 7),
            envelope("orders.2", "also", 1, 2, 6),
        ]
    );
    let last = s.last_event_id();
    drop(s);

    // The filter holds on resume too.
    api.publish("a", "drop", json!({"n": 8})).await;
    api.publish("a", "also", json!({"n": 9})).await;
    let mut s = api.resume(query, &last).await;
    s.ready().await;
    let e = s.expect("also").await;
    assert_eq!((e.topic(), e.offset()), ("a".to_owned(), 5));
}

#[tokio::test]
async fn named_topics_need_the_subscribe_grant_and_unreadable_pattern_matches_are_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::auth::hs256_config(config(dir.path(), Durability::Memory), dir.path());
    let mut api = Api::start_config(config, dir).await;
    api.token = Some(common::auth::token(
        "reader",
        &["a", "orders.1", "orders.3*"],
        600,
    ));
    let engine = api.broker.engine();
    for t in ["a", "b", "orders.1", "orders.2"] {
        engine
            .publish(t, NewEvent::new("seed", "{}"))
            .await
            .unwrap();
    }

    let (status, body) = api.refused("topic=a&topic=b", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    let mut s = api.stream("topic=a&topic=orders.*").await;
    let ready = s.ready().await;
    let listed: Vec<String> = ready_topics(&ready).into_iter().map(|t| t.0).collect();
    assert_eq!(listed, ["a", "orders.1"], "{ready}");
    // Topics it may not read, old or new, stay out; one it may joins.
    for t in ["orders.2", "orders.9", "orders.30", "orders.1"] {
        engine
            .publish(t, NewEvent::new("tick", "{}"))
            .await
            .unwrap();
    }
    let got = s.take(2).await;
    assert_eq!(
        offsets_by_topic(&got),
        [
            ("orders.1".to_owned(), vec![2]),
            ("orders.30".to_owned(), vec![1])
        ]
        .into(),
        "{got:#?}"
    );
    engine
        .publish("a", NewEvent::new("marker", "{}"))
        .await
        .unwrap();
    let next = s.expect("marker").await;
    assert_eq!((next.topic(), next.offset()), ("a".to_owned(), 2));
}

/// A named topic that did not exist when the stream opened (the stream's
/// subscribe made a placeholder, whose epoch dies with it) is in the id at
/// epoch 0: the resume takes the stored topic from its first event.
#[tokio::test]
async fn a_named_topic_created_while_the_client_was_away_arrives_from_its_first_event() {
    // Frequent heartbeats: the broker sees a closed connection at the next one.
    let api = Api::start_with(|c| c.server.heartbeat = Duration::from_millis(50)).await;
    api.ticks("a", 1).await;
    let query = "topic=a&topic=later";
    let mut s = api.stream(query).await;
    let ready = s.expect("ready").await;
    let id = ready.id.clone().unwrap();
    drop(s);
    // `later` existed only for the stream (an ephemeral topic): it goes
    // with the stream's subscription once the broker sees the client gone.
    within(WAIT_SECS, async {
        while api.broker.engine().info("later").is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    api.ticks("later", 2).await;
    let mut s = api.resume(query, &id).await;
    s.ready().await;
    api.publish("later", "marker", json!({})).await;
    let mut got = Vec::new();
    while got.last().is_none_or(|e: &SseEvent| e.event != "marker") {
        got.push(s.next().await.expect("the stream goes on"));
    }
    let got: Vec<(String, Value)> = got.iter().map(|e| (e.event.clone(), e.json())).collect();
    assert_eq!(
        got.iter()
            .map(|(kind, v)| (kind.as_str(), &v["offset"]))
            .collect::<Vec<_>>(),
        [
            ("tick", &json!(1)),
            ("tick", &json!(2)),
            ("marker", &json!(3))
        ],
        "the client had nothing of `later`: it gets all of it, not a gap: {got:#?}"
    );
}

/// A pattern topic deleted and created again while the client was away:
/// one gap (epoch_changed) for what the old one had, then the new topic
/// from its first event; the others resume exactly.
#[tokio::test]
async fn a_pattern_topic_re_created_while_away_gets_a_gap_then_its_first_event() {
    let api = Api::start().await;
    api.ticks("a", 1).await;
    let (old_epoch, _) = api.ticks("orders.1", 2).await;
    let query = "topic=a&topic=orders.*";
    let mut s = api.stream(query).await;
    s.ready().await;
    api.ticks("orders.1", 1).await;
    let e = s.expect("tick").await;
    assert_eq!((e.topic(), e.offset()), ("orders.1".to_owned(), 3));
    let last = s.last_event_id();
    drop(s);

    api.delete("orders.1").await;
    let (new_epoch, _) = api.ticks("orders.1", 2).await;
    assert_ne!(new_epoch, old_epoch);
    api.ticks("a", 1).await;
    let mut s = api.resume(query, &last).await;
    s.ready().await;
    let got = s.take(4).await;
    let gaps: Vec<Value> = got
        .iter()
        .filter(|e| e.event == "gap")
        .map(SseEvent::json)
        .collect();
    assert_eq!(gaps.len(), 1, "{got:#?}");
    assert_eq!(
        (
            &gaps[0]["topic"],
            &gaps[0]["reason"],
            &gaps[0]["requested"],
            &gaps[0]["current"]
        ),
        (
            &json!("orders.1"),
            &json!("epoch_changed"),
            &json!(3),
            &json!(0)
        ),
        "{got:#?}"
    );
    let want: BTreeMap<String, Vec<u64>> = [("a", vec![2]), ("orders.1", span(1, 2))]
        .map(|(t, o)| (t.to_owned(), o))
        .into();
    assert_eq!(offsets_by_topic(&got), want, "{got:#?}");
}
