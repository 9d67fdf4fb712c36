//! The HTTP front end over real loopback sockets against the real broker:
//! the SSE bridge read byte by byte through a small SSE parser that follows
//! the WHATWG `EventSource` rules, and the JSON API beside it.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::http::{parse_response, read_closing_response, read_response, RawResponse};
use common::sse::{Msg, SseEvent, SseParser};
use common::{config, within};
use reqwest::StatusCode;
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use serde_json::{json, Value};

// ---------------------------------------------------------------------------
// An SSE parser (WHATWG "event stream interpretation").
// ---------------------------------------------------------------------------

/// An open SSE response, read message by message.
struct SseStream {
    response: reqwest::Response,
    parser: SseParser,
    queue: VecDeque<Msg>,
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

    fn headers(&self) -> &reqwest::header::HeaderMap {
        self.response.headers()
    }

    /// What a browser would send as `Last-Event-ID` on reconnect.
    fn last_event_id(&self) -> String {
        self.parser.last_event_id.clone()
    }

    /// The next event or comment; `None` once the server closed the stream.
    async fn next_msg(&mut self) -> Option<Msg> {
        within(20, async {
            loop {
                if let Some(msg) = self.queue.pop_front() {
                    return Some(msg);
                }
                if self.closed {
                    return None;
                }
                match self.response.chunk().await {
                    Ok(Some(bytes)) => self.parser.feed(&bytes, &mut self.queue),
                    Ok(None) | Err(_) => self.closed = true,
                }
            }
        })
        .await
    }

    /// The next event, skipping heartbeat comments.
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            match self.next_msg().await? {
                Msg::Event(e) => return Some(e),
                Msg::Comment(_) => continue,
            }
        }
    }

    /// The next event, which must be of type `kind`.
    async fn expect(&mut self, kind: &str) -> SseEvent {
        let e = self
            .next_event()
            .await
            .unwrap_or_else(|| panic!("stream closed while waiting for `{kind}`"));
        assert_eq!(e.event, kind, "unexpected event {e:?}");
        e
    }

    /// The `ready` event every stream starts with.
    async fn ready(&mut self) -> Value {
        self.expect("ready").await.json()
    }

    /// The next events, which must have exactly these offsets, in order;
    /// returns them.
    async fn expect_offsets(&mut self, offsets: impl IntoIterator<Item = u64>) -> Vec<SseEvent> {
        let mut got = Vec::new();
        for want in offsets {
            let e = self
                .next_event()
                .await
                .unwrap_or_else(|| panic!("stream closed while waiting for offset {want}"));
            assert!(
                !matches!(e.event.as_str(), "ready" | "gap" | "end" | "shutdown"),
                "expected offset {want}, got {e:?}"
            );
            assert_eq!(e.offset(), want, "out of order or missing: {e:?}");
            got.push(e);
        }
        got
    }

    /// Asserts the server ends the stream with no further event.
    async fn expect_closed(&mut self) {
        if let Some(e) = self.next_event().await {
            panic!("expected the stream to close, got {e:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// A broker plus an HTTP client.
// ---------------------------------------------------------------------------

struct Api {
    broker: Broker,
    http: reqwest::Client,
    base: String,
    /// The config the broker was started with (to restart it).
    config: Config,
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
        config.validate().expect("test config is valid");
        let broker = common::start(config.clone()).await;
        let base = format!("http://{}", broker.http_addr());
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("HTTP client");
        Self {
            broker,
            http,
            base,
            config,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request and returns the status and the JSON body (`Null`
    /// when the body is empty).
    async fn send(&self, request: reqwest::RequestBuilder) -> (StatusCode, Value) {
        common::http::send_json(request, 20).await
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(self.url(path))).await
    }

    async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        self.send(self.http.post(self.url(path)).body(body)).await
    }

    async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.delete(self.url(path))).await
    }

    /// Publishes over HTTP and returns the acknowledgement.
    async fn publish(
        &self,
        topic: &str,
        event_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Value {
        let (status, ack) = self
            .post(
                &format!("/v1/topics/{topic}/events?type={event_type}"),
                body,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "publish refused: {ack}");
        ack
    }

    /// Publishes `n` JSON events of type `tick` and returns the epoch.
    async fn publish_ticks(&self, topic: &str, n: u64) -> String {
        let mut epoch = String::new();
        for i in 0..n {
            let ack = self
                .publish(topic, "tick", json!({ "i": i }).to_string())
                .await;
            epoch = ack["epoch"].as_str().expect("epoch is a string").to_owned();
        }
        epoch
    }

    /// Opens an SSE request with extra request headers, returning the raw
    /// response (which may be an error).
    async fn sse_response(&self, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self
            .http
            .get(self.url(path))
            .header("accept", "text/event-stream");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        within(20, request.send()).await.expect("SSE request sent")
    }

    /// Opens an SSE stream on `path` (which must succeed).
    async fn sse(&self, path: &str) -> SseStream {
        SseStream::new(self.sse_response(path, &[]).await)
    }

    /// Opens an SSE stream with extra request headers.
    async fn sse_with(&self, path: &str, headers: &[(&str, &str)]) -> SseStream {
        SseStream::new(self.sse_response(path, headers).await)
    }
}

/// Asserts `body` is `{"error": {"code": code, "message": <non-empty>}}`.
fn assert_error(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str) {
    assert_eq!(status, want_status, "body: {body}");
    assert_eq!(body["error"]["code"], want_code, "body: {body}");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error without message: {body}"));
    assert!(!message.is_empty(), "empty error message: {body}");
}

/// Reads an error response from a raw (SSE) request.
async fn error_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = within(20, response.bytes()).await.expect("body read");
    let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "error body {:?} is not JSON: {e}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, value)
}

// ---------------------------------------------------------------------------
// The SSE stream: envelope, ids, ready, retry.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn events_carry_epoch_offset_ids_their_type_and_a_json_envelope() {
    let api = Api::start().await;
    let json_ack = api
        .http
        .post(api.url("/v1/topics/orders/events?type=created"))
        .header("x-ringcast-header-correlation-id", "c-42")
        .header("X-Ringcast-Header-User-Id", "u7")
        .header("x-unrelated", "not carried")
        .body("{\"id\": 1,\n \"items\": [\"a\", \"b\"]}")
        .send()
        .await
        .unwrap();
    assert_eq!(json_ack.status(), StatusCode::OK);
    let ack: Value = json_ack.json().await.unwrap();
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        ack,
        json!({"epoch": epoch, "offset": 1, "version": 1, "duplicate": false})
    );
    api.publish("orders", "note", "plain text, not JSON\nwith a newline")
        .await;
    api.publish("orders", "created", vec![0xffu8, 0x00, 0xfe])
        .await;

    let mut s = api.sse("/v1/topics/orders/events?earliest=true").await;
    let ready = s.expect("ready").await;
    assert_eq!(ready.retry, Some(2000), "retry: is sent on connect");
    assert_eq!(ready.id.as_deref(), Some(&*format!("{epoch}:0")));
    assert_eq!(
        ready.json(),
        json!({
            "topic": "orders",
            "epoch": epoch,
            "offset": 3,
            "versions": {"created": 2, "note": 1},
        })
    );
    epoch
        .parse::<u64>()
        .expect("epoch is a decimal string of a u64");

    let events = s.expect_offsets(1..=3).await;
    let ids: Vec<_> = events.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(
        ids,
        [1, 2, 3].map(|o| format!("{epoch}:{o}")),
        "id: is <epoch>:<offset>"
    );
    let types: Vec<_> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(types, ["created", "note", "created"], "event: is the type");
    assert!(
        events.iter().all(|e| !e.data.contains('\n')),
        "each envelope is one data: line, even for payloads with newlines"
    );

    let first = events[0].json();
    let ts = first["ts"].as_u64().expect("ts is a number");
    assert!(
        ts > 1_600_000_000_000,
        "ts is ms since the Unix epoch: {ts}"
    );
    assert_eq!(
        first,
        json!({
            "topic": "orders",
            "type": "created",
            "version": 1,
            "offset": 1,
            "ts": ts,
            "headers": {"correlation-id": "c-42", "user-id": "u7"},
            "data": {"id": 1, "items": ["a", "b"]},
        }),
        "JSON payloads are inline, headers come from X-Ringcast-Header-*"
    );
    let text = events[1].json();
    assert_eq!(text["data"], "plain text, not JSON\nwith a newline");
    assert_eq!(
        (text["type"].as_str(), text["version"].as_u64()),
        (Some("note"), Some(1))
    );
    assert!(text.get("encoding").is_none());
    assert_eq!(text["headers"], json!({}));
    let binary = events[2].json();
    assert_eq!(binary["data"], "/wD+");
    assert_eq!(binary["encoding"], "base64");
    assert_eq!(binary["version"], 2);
}

#[tokio::test]
async fn the_stream_disables_caching_and_proxy_buffering() {
    let api = Api::start().await;
    let s = api.sse("/v1/topics/t/events").await;
    let h = s.headers();
    let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(header("x-accel-buffering").as_deref(), Some("no"));
}

#[tokio::test]
async fn cross_origin_reads_are_refused_by_default() {
    let api = Api::start().await;
    let (status, body) = error_of(
        api.sse_response(
            "/v1/topics/t/events",
            &[("origin", "https://anywhere.example")],
        )
        .await,
    )
    .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "origin_not_allowed");
    let response = api
        .http
        .get(api.url("/v1/topics"))
        .header("origin", "https://anywhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "no CORS grant: {:?}",
        response.headers()
    );
    // Without Origin (curl, backends) nothing changes; the broker's own
    // origin is no cross-site request either.
    assert_eq!(api.get("/v1/topics").await.0, StatusCode::OK);
    let own = api
        .http
        .get(api.url("/v1/topics"))
        .header("origin", api.base.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), StatusCode::OK);
}

#[tokio::test]
async fn cors_allows_configured_origins_and_no_other() {
    let api = Api::start_with(|c| {
        c.server.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    let allowed = api
        .sse_with("/v1/topics/t/events", &[("origin", "https://app.example")])
        .await;
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );
    let (status, body) = error_of(
        api.sse_response("/v1/topics/t/events", &[("origin", "https://evil.example")])
            .await,
    )
    .await;
    assert_error(status, &body, StatusCode::FORBIDDEN, "origin_not_allowed");

    let preflight = |method: &'static str| {
        api.http
            .request(reqwest::Method::OPTIONS, api.url("/v1/topics/t/events"))
            .header("origin", "https://app.example")
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let read = preflight("GET").await.unwrap();
    assert!(read.status().is_success(), "{}", read.status());
    assert_eq!(
        read.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    // A read origin may not write: its preflight for a POST gets no grant.
    let write = preflight("POST").await.unwrap();
    assert!(
        write.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        write.headers()
    );
}

// ---------------------------------------------------------------------------
// Filters and start modes.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn types_filter_delivers_only_the_named_types() {
    let api = Api::start().await;
    for t in ["a", "b", "a", "c", "b"] {
        api.publish("f", t, "{}").await;
    }
    let mut s = api.sse("/v1/topics/f/events?earliest=true&types=a,c").await;
    s.ready().await;
    let got = s.expect_offsets([1, 3, 4]).await;
    let types: Vec<_> = got.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(types, ["a", "a", "c"]);
    api.publish("f", "b", "{}").await;
    api.publish("f", "c", "{}").await;
    s.expect_offsets([7]).await;
}

#[tokio::test]
async fn earliest_replays_everything_retained_then_continues_live() {
    let api = Api::start().await;
    api.publish_ticks("e", 3).await;
    let mut s = api.sse("/v1/topics/e/events?earliest=true").await;
    s.ready().await;
    s.expect_offsets(1..=3).await;
    api.publish_ticks("e", 2).await;
    s.expect_offsets(4..=5).await;
}

#[tokio::test]
async fn without_a_start_the_stream_is_live() {
    let api = Api::start().await;
    let epoch = api.publish_ticks("l", 3).await;
    let mut s = api.sse("/v1/topics/l/events").await;
    let ready = s.expect("ready").await;
    assert_eq!(ready.json()["offset"], 3);
    assert_eq!(
        ready.id.as_deref(),
        Some(&*format!("{epoch}:3")),
        "a reconnect before any event resumes after the current offset"
    );
    api.publish_ticks("l", 1).await;
    s.expect_offsets([4]).await;
}

#[tokio::test]
async fn last_event_id_query_parameter_resumes_after_that_offset() {
    let api = Api::start().await;
    let epoch = api.publish_ticks("q", 5).await;
    let mut s = api
        .sse(&format!("/v1/topics/q/events?last_event_id={epoch}:2"))
        .await;
    let ready = s.expect("ready").await;
    assert_eq!(ready.id.as_deref(), Some(&*format!("{epoch}:2")));
    s.expect_offsets(3..=5).await;
}

#[tokio::test]
async fn last_event_id_header_takes_precedence_over_the_query() {
    let api = Api::start().await;
    let epoch = api.publish_ticks("p", 6).await;
    let id = format!("{epoch}:4");
    let mut over_earliest = api
        .sse_with(
            "/v1/topics/p/events?earliest=true",
            &[("last-event-id", &id)],
        )
        .await;
    over_earliest.ready().await;
    over_earliest.expect_offsets(5..=6).await;
    let mut over_query = api
        .sse_with(
            &format!("/v1/topics/p/events?last_event_id={epoch}:1&earliest=true"),
            &[("last-event-id", &id)],
        )
        .await;
    over_query.ready().await;
    over_query.expect_offsets(5..=6).await;
}

#[tokio::test]
async fn after_versions_resumes_named_types_and_starts_the_others_live() {
    let api = Api::start().await;
    // offsets:         1    2    3    4    5    6    7
    let mut epoch = String::new();
    for t in ["a", "b", "a", "b", "c", "a", "b"] {
        epoch = api.publish("v", t, "{}").await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let mut s = api
        .sse(&format!(
            "/v1/topics/v/events?after_versions=a:1,b:2&epoch={epoch}"
        ))
        .await;
    let ready = s.expect("ready").await;
    assert_eq!(
        ready.json()["versions"],
        json!({"a": 3, "b": 3, "c": 1}),
        "ready tells the current versions"
    );
    assert_eq!(
        ready.id.as_deref(),
        Some(&*format!("{epoch}:2:8")),
        "during the replay, ids name where it ends (offset 8 is live)"
    );
    let got = s.expect_offsets([3, 6, 7]).await;
    let ids: Vec<_> = got.iter().map(|e| e.id.clone().unwrap()).collect();
    assert_eq!(ids, [3, 6, 7].map(|o| format!("{epoch}:{o}:8")));
    let versions: Vec<_> = got
        .iter()
        .map(|e| (e.event.clone(), e.json()["version"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        versions,
        [("a".into(), 2), ("a".into(), 3), ("b".into(), 3)]
    );
    api.publish("v", "c", "{}").await;
    let live = s.expect_offsets([8]).await;
    assert_eq!(live[0].event, "c", "a type not named starts live");
    assert_eq!(
        live[0].id.as_deref(),
        Some(&*format!("{epoch}:8")),
        "live events have plain ids"
    );
}

#[tokio::test]
async fn heartbeat_comments_keep_an_idle_stream_alive() {
    let api = Api::start_with(|c| c.server.heartbeat = Duration::from_millis(100)).await;
    let mut s = api.sse("/v1/topics/idle/events").await;
    s.ready().await;
    for _ in 0..2 {
        match s.next_msg().await {
            Some(Msg::Comment(text)) => assert_eq!(text, "hb"),
            other => panic!("expected a heartbeat comment, got {other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Resume, gap, end.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_reconnect_with_last_event_id_gets_exactly_the_missed_events_in_order() {
    let api = Api::start().await;
    api.publish_ticks("r", 4).await;
    let mut s = api.sse("/v1/topics/r/events?earliest=true").await;
    s.ready().await;
    s.expect_offsets(1..=4).await;
    let last = s.last_event_id();
    drop(s);

    api.publish_ticks("r", 7).await;
    let mut s = api
        .sse_with(
            "/v1/topics/r/events?earliest=true",
            &[("last-event-id", &last)],
        )
        .await;
    s.ready().await;
    s.expect_offsets(5..=11).await;
    // Nothing else was queued: the next event is the next one published.
    api.publish("r", "marker", "{}").await;
    let marker = s.expect("marker").await;
    assert_eq!(marker.offset(), 12);
}

#[tokio::test]
async fn a_reconnect_past_retention_gets_one_gap_then_live() {
    let api = Api::start_with(|c| c.topics.max_events = 3).await;
    api.publish_ticks("g", 2).await;
    let mut s = api.sse("/v1/topics/g/events?earliest=true").await;
    s.ready().await;
    s.expect_offsets(1..=2).await;
    let last = s.last_event_id();
    drop(s);

    let epoch = api.publish_ticks("g", 8).await; // offsets 3..=10; 8..=10 retained
    let mut s = api
        .sse_with("/v1/topics/g/events", &[("last-event-id", &last)])
        .await;
    s.ready().await;
    let gap = s.expect("gap").await;
    assert_eq!(
        gap.json(),
        json!({
            "topic": "g",
            "type": null,
            "reason": "retention",
            "epoch": epoch,
            "requested": 2,
            "first_available": 8,
            "current": 10,
        })
    );
    assert_eq!(
        gap.id.as_deref(),
        Some(&*format!("{epoch}:10")),
        "a reconnect after the gap does not repeat it"
    );
    api.publish_ticks("g", 1).await;
    s.expect_offsets([11]).await;

    // The browser would reconnect with the gap's id: no second gap.
    let mut again = api
        .sse_with(
            "/v1/topics/g/events",
            &[("last-event-id", &gap.id.unwrap())],
        )
        .await;
    again.ready().await;
    again.expect_offsets([11]).await;
}

#[tokio::test]
async fn a_last_event_id_of_another_epoch_gets_an_epoch_changed_gap() {
    let api = Api::start().await;
    let epoch: u64 = api.publish_ticks("ep", 3).await.parse().unwrap();
    let stale = format!("{}:2", epoch ^ 1);
    let mut s = api
        .sse_with("/v1/topics/ep/events", &[("last-event-id", &stale)])
        .await;
    s.ready().await;
    let gap = s.expect("gap").await.json();
    assert_eq!(gap["reason"], "epoch_changed");
    assert_eq!(gap["epoch"], epoch.to_string());
    assert_eq!(gap["current"], 3);
    api.publish_ticks("ep", 1).await;
    s.expect_offsets([4]).await;
}

#[tokio::test]
async fn sealing_ends_the_stream_and_a_reconnect_after_the_end_gets_204() {
    let api = Api::start().await;
    let epoch = api.publish_ticks("s", 3).await;
    let mut s = api.sse("/v1/topics/s/events?earliest=true").await;
    s.ready().await;
    s.expect_offsets(1..=3).await;

    let (status, body) = api.post("/v1/topics/s/seal", "").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"sealed": true})));
    let end = s.expect("end").await;
    assert_eq!(end.json(), json!({"topic": "s", "last_offset": 3}));
    s.expect_closed().await;

    // EventSource reconnects with the last id it saw; 204 makes it stop.
    let last = s.last_event_id();
    assert_eq!(last, format!("{epoch}:3"));
    let response = api
        .sse_response("/v1/topics/s/events", &[("last-event-id", &last)])
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // A client that had not seen everything still gets the rest, then end.
    let mut behind = api
        .sse_with(
            "/v1/topics/s/events",
            &[("last-event-id", &format!("{epoch}:1"))],
        )
        .await;
    behind.ready().await;
    behind.expect_offsets(2..=3).await;
    behind.expect("end").await;
    behind.expect_closed().await;
}

// ---------------------------------------------------------------------------
// The JSON API.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn publish_answers_epoch_offset_and_per_type_version() {
    let api = Api::start().await;
    let a1 = api.publish("pub", "a", "{}").await;
    let a2 = api.publish("pub", "a", "{}").await;
    let b1 = api.publish("pub", "b", "{}").await;
    let epoch = a1["epoch"].as_str().unwrap();
    epoch.parse::<u64>().expect("decimal epoch");
    assert_eq!(
        a1,
        json!({"epoch": epoch, "offset": 1, "version": 1, "duplicate": false})
    );
    assert_eq!(
        a2,
        json!({"epoch": epoch, "offset": 2, "version": 2, "duplicate": false})
    );
    assert_eq!(
        b1,
        json!({"epoch": epoch, "offset": 3, "version": 1, "duplicate": false})
    );
}

#[tokio::test]
async fn history_pages_carry_the_same_envelope_as_sse_data() {
    let api = Api::start().await;
    api.publish("h", "a", "{\"n\": 1}").await;
    api.publish("h", "b", "text").await;
    api.publish("h", "a", vec![1u8, 0xff]).await;
    api.publish("h", "b", "[1, 2]").await;
    api.publish("h", "a", "{}").await;

    let mut s = api.sse("/v1/topics/h/events?earliest=true").await;
    let epoch = s.ready().await["epoch"].clone();
    let sse: Vec<Value> = s
        .expect_offsets(1..=5)
        .await
        .iter()
        .map(SseEvent::json)
        .collect();

    let mut paged = Vec::new();
    let mut after = 0;
    let mut pages = 0;
    loop {
        let (status, page) = api
            .get(&format!("/v1/topics/h/history?after={after}&limit=2"))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert_eq!(page["epoch"], epoch);
        let events = page["events"].as_array().expect("events array").clone();
        if events.is_empty() {
            assert_eq!(page["next_after"], after, "an empty page stays put");
            break;
        }
        assert!(events.len() <= 2);
        pages += 1;
        after = page["next_after"].as_u64().expect("next_after");
        assert_eq!(after, events.last().unwrap()["offset"].as_u64().unwrap());
        paged.extend(events);
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, sse, "history and SSE data are the same envelope");

    let (_, only_b) = api.get("/v1/topics/h/history?types=b").await;
    let offsets: Vec<_> = only_b["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 4]);
    assert_eq!(only_b["last_offset"], 5);
    assert_eq!(only_b["first_available"], 1);
}

#[tokio::test]
async fn topics_are_listed_by_name_and_described_by_info() {
    let api = Api::start().await;
    let (_, empty) = api.get("/v1/topics").await;
    assert_eq!(empty, json!({"topics": []}));
    let zeta = api.publish_ticks("zeta", 1).await;
    let alpha = api.publish("alpha", "x", "{}").await["epoch"].clone();
    api.publish("alpha", "y", "{}").await;
    api.publish("alpha", "x", "{}").await;

    let (status, list) = api.get("/v1/topics").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        list,
        json!({"topics": [
            {"name": "alpha", "epoch": alpha, "last_offset": 3, "sealed": false},
            {"name": "zeta", "epoch": zeta, "last_offset": 1, "sealed": false},
        ]})
    );

    let _subscriber = api.sse("/v1/topics/alpha/events").await;
    let (status, info) = api.get("/v1/topics/alpha").await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["name"], "alpha");
    assert_eq!(info["epoch"], alpha);
    assert_eq!(info["first_offset"], 1);
    assert_eq!(info["last_offset"], 3);
    assert_eq!(info["versions"], json!({"x": 2, "y": 1}));
    assert_eq!(info["retained_events"], 3);
    assert!(info["retained_bytes"].as_u64().unwrap() > 0);
    assert_eq!(info["subscribers"], 1);
    assert_eq!(info["sealed"], false);
    assert_eq!(info["retention"]["max_events"], 10_000);
}

#[tokio::test]
async fn seal_refuses_publishes_and_delete_starts_a_new_epoch() {
    let api = Api::start().await;
    let old_epoch = api.publish_ticks("life", 2).await;
    let (status, body) = api.post("/v1/topics/life/seal", "").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"sealed": true})));
    assert_eq!(api.get("/v1/topics/life").await.1["sealed"], true);

    let (status, body) = api.post("/v1/topics/life/events?type=tick", "{}").await;
    assert_error(status, &body, StatusCode::CONFLICT, "topic_sealed");

    let (status, body) = api.delete("/v1/topics/life").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"deleted": true})));
    let (status, body) = api.get("/v1/topics/life").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "topic_not_found");

    let ack = api.publish("life", "tick", "{}").await;
    assert_eq!(ack["offset"], 1, "a re-created topic starts at offset 1");
    assert_ne!(ack["epoch"], old_epoch.as_str(), "and has a new epoch");
}

#[tokio::test]
async fn health_endpoints_answer_alive_and_ready() {
    let api = Api::start().await;
    assert_eq!(
        api.get("/healthz").await,
        (StatusCode::OK, json!({"status": "ok"}))
    );
    assert_eq!(
        api.get("/readyz").await,
        (StatusCode::OK, json!({"status": "ready"}))
    );
}

// ---------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn malformed_requests_get_400_with_an_error_body() {
    let api = Api::start().await;
    let epoch = api.publish_ticks("ok", 3).await;

    let (status, body) = api.post("/v1/topics/bad!topic/events?type=t", "{}").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_topic");
    let (status, body) = api.post("/v1/topics/ok/events", "{}").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "bad_request");
    let (status, body) = api.post("/v1/topics/ok/events?type=bad%20type", "{}").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_type");
    let (status, body) = api.get("/v1/topics/bad!topic/history").await;
    assert_error(status, &body, StatusCode::BAD_REQUEST, "invalid_topic");

    // (path, Last-Event-ID header, expected code)
    let no_header = String::new();
    let sse_cases = [
        (
            "/v1/topics/bad!topic/events".into(),
            no_header.clone(),
            "invalid_topic",
        ),
        (
            "/v1/topics/ok/events".into(),
            "not-an-id".into(),
            "bad_request",
        ),
        (
            "/v1/topics/ok/events?last_event_id=12".into(),
            no_header.clone(),
            "bad_request",
        ),
        (
            "/v1/topics/ok/events".into(),
            format!("{epoch}:99"),
            "invalid_start",
        ),
        (
            "/v1/topics/ok/events?after_versions=tick:1".into(),
            no_header.clone(),
            "bad_request",
        ),
        (
            format!("/v1/topics/ok/events?after_versions=tick&epoch={epoch}"),
            no_header,
            "bad_request",
        ),
    ];
    for (path, last_event_id, code) in sse_cases {
        let headers: &[(&str, &str)] = if last_event_id.is_empty() {
            &[]
        } else {
            &[("last-event-id", &last_event_id)]
        };
        let (status, body) = error_of(api.sse_response(&path, headers).await).await;
        assert_error(status, &body, StatusCode::BAD_REQUEST, code);
    }
}

#[tokio::test]
async fn unknown_topics_and_routes_get_404_with_an_error_body() {
    let api = Api::start().await;
    let (status, body) = api.get("/v1/topics/nowhere").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "topic_not_found");
    let (status, body) = api.get("/v1/topics/nowhere/history").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "topic_not_found");
    let (status, body) = api.get("/v2/anything").await;
    assert_error(status, &body, StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn a_payload_over_max_payload_gets_413() {
    let api = Api::start_with(|c| c.limits.max_payload = bytesize::ByteSize::kib(1)).await;
    let (status, body) = api
        .post("/v1/topics/big/events?type=blob", vec![b'x'; 1025])
        .await;
    assert_error(
        status,
        &body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    let ack = api.publish("big", "blob", vec![b'x'; 1024]).await;
    assert_eq!(ack["offset"], 1, "a payload at the limit is accepted");
}

#[tokio::test]
async fn sse_connections_over_the_limit_get_503_until_one_closes() {
    let api = Api::start_with(|c| {
        c.limits.max_sse_connections = 1;
        c.server.heartbeat = Duration::from_millis(50);
    })
    .await;
    let mut first = api.sse("/v1/topics/t/events").await;
    first.ready().await;
    let (status, body) = error_of(api.sse_response("/v1/topics/t/events", &[]).await).await;
    assert_error(
        status,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "too_many_connections",
    );

    // The server notices the closed connection at its next write (a
    // heartbeat at the latest) and frees the slot.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let response = api.sse_response("/v1/topics/t/events", &[]).await;
        if response.status() == StatusCode::OK {
            SseStream::new(response).ready().await;
            break;
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------
// Shutdown and kill.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn graceful_shutdown_sends_a_shutdown_event_before_closing_the_stream() {
    let api = Api::start_with(|c| c.server.shutdown_timeout = Duration::from_secs(60)).await;
    api.publish_ticks("bye", 1).await;
    let mut s = api.sse("/v1/topics/bye/events?earliest=true").await;
    s.ready().await;
    s.expect_offsets([1]).await;

    let Api { broker, .. } = api;
    let started = Instant::now();
    let shutdown = tokio::spawn(broker.shutdown());
    let event = s.expect("shutdown").await;
    assert!(event.json()["reason"].is_string(), "{event:?}");
    s.expect_closed().await;
    within(20, shutdown)
        .await
        .expect("shutdown task")
        .expect("shutdown succeeds");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the stream closed promptly, not at shutdown_timeout"
    );
}

#[tokio::test]
async fn killing_the_broker_drops_open_sse_streams() {
    let api = Api::start().await;
    let mut s = api.sse("/v1/topics/k/events").await;
    s.ready().await;
    let Api { broker, .. } = api;
    within(20, broker.kill()).await;
    // A crash closes every connection: the client sees the end of the
    // stream, with no `shutdown` event (and no heartbeat: the default is 15s).
    match tokio::time::timeout(Duration::from_secs(5), s.next_msg()).await {
        Ok(None) => {}
        Ok(Some(msg)) => panic!("expected the killed broker to drop the stream, got {msg:?}"),
        Err(_) => panic!("the SSE stream is still open 5s after Broker::kill returned"),
    }
}

#[tokio::test]
async fn a_killed_broker_restarts_on_its_data_dir_while_an_sse_client_was_connected() {
    let api = Api::start_with(|c| c.storage.durability = Durability::Fsync).await;
    api.publish_ticks("crash", 2).await;
    let mut s = api.sse("/v1/topics/crash/events?earliest=true").await;
    s.ready().await;
    s.expect_offsets(1..=2).await;

    let Api {
        broker,
        config,
        _dir,
        ..
    } = api;
    within(20, broker.kill()).await;
    // Like a daemon restarted by systemd after a crash: same data dir, while
    // the browser is still trying to reconnect.
    let broker = Broker::start(config)
        .await
        .expect("a killed broker can be restarted on its data dir");
    assert_eq!(broker.engine().info("crash").unwrap().last_offset, 2);
    drop(s);
    broker.shutdown().await.expect("clean shutdown");
}

// ---------------------------------------------------------------------------
// Hostile and stalled clients.
// ---------------------------------------------------------------------------

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Waits until the server closes `stream` (end of stream or reset),
/// discarding whatever it still sends.
async fn expect_server_closes(stream: &mut TcpStream) {
    within(20, async {
        let mut buf = [0u8; 65536];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

impl Api {
    /// A new raw connection to the HTTP listener.
    /// Sends `request` on a new connection and reads the response the
    /// server answers before closing it.
    async fn exchange_closing(&self, request: &[u8]) -> RawResponse {
        let mut raw = self.raw().await;
        raw.write_all(request).await.unwrap();
        read_closing_response(&mut raw).await
    }

    async fn raw(&self) -> TcpStream {
        TcpStream::connect(self.broker.http_addr())
            .await
            .expect("connect")
    }

    /// A raw connection with a small receive buffer that has asked for an
    /// SSE stream and read up to its `ready` event; returns the bytes read
    /// after the response head.
    async fn raw_sse(&self, path: &str, http_version: &str) -> (TcpStream, Vec<u8>) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(self.broker.http_addr()).await.unwrap();
        stream
            .write_all(
                format!(
                    "GET {path} HTTP/{http_version}\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut bytes = Vec::new();
        within(20, async {
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

    /// The value of a gauge line (`name{labels}`) in `/metrics`, 0 if absent.
    async fn metric(&self, series: &str) -> f64 {
        let text = common::fetch_text(&self.http, self.url("/metrics")).await;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().expect("a metric value"))
    }

    /// Waits until `topic` has no subscriber left.
    async fn await_no_subscribers(&self, topic: &str) {
        within(20, async {
            loop {
                let (_, info) = self.get(&format!("/v1/topics/{topic}")).await;
                if info["subscribers"] == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }
}

const QUEUED_SSE: &str = "ringcast_outbound_queued_bytes{transport=\"sse\"}";

/// Held by the tests whose SSE streams queue large amounts: the queued-bytes
/// gauge is process-wide, so one of them must not read another's backlog.
static BIG_QUEUES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn a_content_length_over_max_payload_is_refused_with_413_before_the_body_arrives() {
    let api = Api::start_with(|c| c.limits.max_payload = bytesize::ByteSize::kib(1)).await;
    // The rest of the 10 GB never comes: the answer must not wait for it.
    let response = api
        .exchange_closing(
            b"POST /v1/topics/big/events?type=blob HTTP/1.1\r\nHost: localhost\r\n\
              Content-Length: 10000000000\r\n\r\n0123456789",
        )
        .await;
    assert_eq!(response.status, 413, "{}", response.head);
    assert_eq!(response.json()["error"]["code"], "payload_too_large");
    assert!(
        api.get("/v1/topics/big").await.0 == StatusCode::NOT_FOUND,
        "nothing was published"
    );
}

#[tokio::test]
async fn a_body_that_does_not_arrive_within_read_timeout_gets_408_and_is_closed() {
    let api = Api::start_with(|c| c.server.read_timeout = Duration::from_millis(300)).await;
    let response = api
        .exchange_closing(
            b"POST /v1/topics/slow/events?type=t HTTP/1.1\r\nHost: localhost\r\n\
              Content-Length: 100\r\n\r\n0123456789",
        )
        .await;
    assert_eq!(response.status, 408, "{}", response.head);
    let body = response.json();
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("read_timeout"));
}

#[tokio::test]
async fn headers_that_do_not_arrive_within_read_timeout_close_the_connection() {
    let api = Api::start_with(|c| c.server.read_timeout = Duration::from_millis(300)).await;
    let mut raw = api.raw().await;
    raw.write_all(b"GET /healthz HTTP/1.1\r\nHost: te")
        .await
        .unwrap();
    expect_server_closes(&mut raw).await;
}

#[tokio::test]
async fn connections_over_max_http_connections_are_closed_at_accept() {
    let api = Api::start_with(|c| c.limits.max_http_connections = 2).await;
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut raw = api.raw().await;
        raw.write_all(healthz).await.unwrap();
        assert_eq!(read_response(&mut raw).await.status, 200);
        held.push(raw);
    }
    let mut third = api.raw().await;
    let _ = third.write_all(healthz).await;
    expect_server_closes(&mut third).await;

    // A closed connection gives its place back.
    drop(held.pop());
    within(20, async {
        loop {
            let mut raw = api.raw().await;
            let _ = raw
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let _ = raw.read_to_end(&mut buf).await;
            if buf.starts_with(b"HTTP/1.1 200") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    drop(held);
    let refused = "ringcast_limit_refusals_total{limit=\"max_http_connections\"}";
    let counted = within(20, async {
        loop {
            // Needs a free connection itself.
            if let Ok(Ok(r)) = tokio::time::timeout(
                Duration::from_secs(2),
                api.http.get(api.url("/healthz")).send(),
            )
            .await
            {
                if r.status() == StatusCode::OK {
                    break api.metric(refused).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(counted >= 1.0, "refusals are counted: {counted}");
}

#[tokio::test]
async fn requests_over_max_http_requests_get_503_over_capacity_at_once() {
    let api = Api::start_with(|c| c.limits.max_http_requests = 1).await;
    // One request in flight: its body is half sent.
    let mut slow = api.raw().await;
    slow.write_all(
        b"POST /v1/topics/cap/events?type=t HTTP/1.1\r\nHost: localhost\r\n\
          Content-Length: 10\r\n\r\n12345",
    )
    .await
    .unwrap();
    let body = within(20, async {
        loop {
            let (status, body) = api.get("/v1/topics").await;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                return body;
            }
            assert_eq!(status, StatusCode::OK, "{body}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_error(
        StatusCode::SERVICE_UNAVAILABLE,
        &body,
        StatusCode::SERVICE_UNAVAILABLE,
        "over_capacity",
    );
    // Health probes and SSE streams have their own limits.
    assert_eq!(api.get("/healthz").await.0, StatusCode::OK);
    api.sse("/v1/topics/cap/events").await.ready().await;

    slow.write_all(b"67890").await.unwrap();
    let response = read_response(&mut slow).await;
    assert_eq!(response.status, 200, "{}", response.head);
    assert_eq!(response.json()["offset"], 1);
    assert_eq!(
        api.get("/v1/topics").await.0,
        StatusCode::OK,
        "the permit is back"
    );
}

#[tokio::test]
async fn a_history_page_over_max_history_bytes_ends_early_and_next_after_continues() {
    let api = Api::start_with(|c| c.limits.max_history_bytes = bytesize::ByteSize::kib(64)).await;
    for i in 0..10u8 {
        api.publish("hb", "blob", vec![b'a' + i; 20 * 1024]).await;
    }
    api.publish("hb", "huge", vec![b'z'; 100 * 1024]).await;
    api.publish("hb", "blob", "{}").await;

    let mut seen = Vec::new();
    let mut sizes = Vec::new();
    let mut after = 0;
    loop {
        let (status, page) = api
            .get(&format!("/v1/topics/hb/history?after={after}&limit=1000"))
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let events = page["events"].as_array().unwrap();
        if events.is_empty() {
            break;
        }
        let payload: usize = events
            .iter()
            .map(|e| e["data"].as_str().map_or(2, str::len))
            .sum();
        assert!(
            payload <= 64 * 1024 || events.len() == 1,
            "a page holds at most max_history_bytes of payload, or one event: {payload}"
        );
        sizes.push(events.len());
        seen.extend(events.iter().map(|e| e["offset"].as_u64().unwrap()));
        after = page["next_after"].as_u64().unwrap();
        assert_eq!(Some(after), seen.last().copied());
    }
    assert_eq!(
        seen,
        (1..=12).collect::<Vec<_>>(),
        "every event exactly once"
    );
    assert_eq!(
        sizes,
        [3, 3, 3, 1, 1, 1],
        "pages end early; an event over the cap comes alone"
    );
}

#[tokio::test]
async fn an_after_versions_stream_cut_mid_replay_resumes_with_exactly_the_rest() {
    let api = Api::start().await;
    let mut epoch = String::new();
    // a at offsets 1, 4, ... 28 (versions 1..10), b at 2, 5, ... 29, c at 3, 6, ... 30.
    for i in 0..30 {
        let t = ["a", "b", "c"][i % 3];
        epoch = api.publish("cut", t, "{}").await["epoch"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    let path = format!("/v1/topics/cut/events?after_versions=a:3,b:5&epoch={epoch}");
    let replay = [10, 13, 16, 17, 19, 20, 22, 23, 25, 26, 28, 29];

    let mut uncut = api.sse(&path).await;
    uncut.ready().await;
    let mut cut = api.sse(&path).await;
    cut.ready().await;
    let before = cut.expect_offsets(replay[..5].iter().copied()).await;
    // What a browser cut after the fifth event sends.
    let last = before[4].id.clone().unwrap();
    assert_eq!(last, format!("{epoch}:19:31"));
    drop(cut);
    for t in ["a", "b", "c"] {
        api.publish("cut", t, "{}").await;
    }

    let rest: Vec<u64> = replay[5..].iter().copied().chain(31..=33).collect();
    let mut resumed = api.sse_with(&path, &[("last-event-id", &last)]).await;
    resumed.ready().await;
    let got = resumed.expect_offsets(rest.iter().copied()).await;
    let want = uncut
        .expect_offsets(replay.iter().copied().chain(31..=33))
        .await;
    let ids = |events: &[SseEvent]| -> Vec<(Option<String>, String)> {
        events
            .iter()
            .map(|e| (e.id.clone(), e.data.clone()))
            .collect()
    };
    assert_eq!(
        ids(&got),
        ids(&want[5..]),
        "the resumed stream has exactly what the uncut one had after the cut"
    );
    api.publish("cut", "c", "{}").await;
    resumed.expect_offsets([34]).await;
    uncut.expect_offsets([34]).await;
}

#[tokio::test]
async fn an_sse_client_that_stops_reading_queues_at_most_max_outbound_bytes_then_is_dropped() {
    const MAX: u64 = 128 * 1024;
    const EVENT: usize = 32 * 1024;
    let _serial = BIG_QUEUES.lock().await;
    let api = Api::start_with(|c| {
        c.server.heartbeat = Duration::from_millis(500);
        c.limits.max_outbound_bytes = bytesize::ByteSize::b(MAX);
        c.topics.max_events = 64;
    })
    .await;
    let (_stalled, _) = api.raw_sse("/v1/topics/stall/events", "1.1").await;
    // Every SSE stream of this test binary adds to the gauge; the others
    // hold a few small events at most.
    let bound = (MAX + EVENT as u64 + 64 * 1024) as f64;
    let payload = vec![b'x'; EVENT];
    let mut peak = 0.0f64;
    for i in 0.. {
        assert!(i < 4000, "the stream never queued bytes (peak {peak})");
        api.publish("stall", "big", payload.clone()).await;
        let queued = api.metric(QUEUED_SSE).await;
        assert!(queued <= bound, "{queued} bytes queued, over {bound}");
        peak = peak.max(queued);
        if peak >= (MAX / 2) as f64 {
            break;
        }
    }
    // Publishing goes on; the stream holds no more.
    for _ in 0..20 {
        api.publish("stall", "big", payload.clone()).await;
        let queued = api.metric(QUEUED_SSE).await;
        assert!(queued <= bound, "{queued} bytes queued, over {bound}");
    }
    // No write progress for three heartbeats: the connection is dropped
    // and its subscription with it.
    api.await_no_subscribers("stall").await;
}

#[tokio::test]
async fn an_sse_client_that_falls_behind_gets_one_slow_consumer_gap_then_live_events() {
    const EVENT: usize = 32 * 1024;
    let _serial = BIG_QUEUES.lock().await;
    let api = Api::start_with(|c| {
        // Long enough that pausing does not count as gone.
        c.server.heartbeat = Duration::from_secs(10);
        c.limits.max_outbound_bytes = bytesize::ByteSize::kib(128);
        c.topics.max_events = 16;
    })
    .await;
    // HTTP/1.0: close-delimited, so the bytes after the head are the stream.
    let (mut raw, mut bytes) = api.raw_sse("/v1/topics/behind/events", "1.0").await;
    // Far more than socket buffers, the outbound limit and the ring hold.
    let payload = vec![b'y'; EVENT];
    for _ in 0..400 {
        api.publish("behind", "big", payload.clone()).await;
    }
    let mut parser = SseParser::default();
    let mut queue = VecDeque::new();
    let mut offsets = Vec::new();
    let mut gaps = Vec::new();
    within(60, async {
        let mut buf = vec![0u8; 65536];
        loop {
            parser.feed(&std::mem::take(&mut bytes), &mut queue);
            while let Some(msg) = queue.pop_front() {
                if let Msg::Event(e) = msg {
                    match e.event.as_str() {
                        "ready" => {}
                        "gap" => {
                            gaps.push((offsets.len(), e.json()));
                            // The stream is live again: these come next.
                            for _ in 0..3 {
                                api.publish("behind", "big", "{}").await;
                            }
                        }
                        _ => offsets.push(e.offset()),
                    }
                }
            }
            if offsets.last() == Some(&403) {
                return;
            }
            let n = raw.read(&mut buf).await.expect("SSE read");
            assert!(n > 0, "stream closed after {offsets:?}");
            bytes.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert_eq!(gaps.len(), 1, "one gap: {gaps:?}");
    let (at, gap) = &gaps[0];
    assert_eq!(gap["reason"], "slow_consumer", "{gap}");
    let current = gap["current"].as_u64().unwrap();
    assert!(
        offsets[..*at].windows(2).all(|w| w[1] == w[0] + 1),
        "contiguous before the gap"
    );
    assert_eq!(offsets.first(), Some(&1));
    // The stream continues from the newest retained event, so the gap is
    // never the last thing it sends; then live.
    assert_eq!(current, 399, "{gap}");
    assert_eq!(
        offsets[*at..],
        [400, 401, 402, 403],
        "after the gap: the newest retained event, then live"
    );
}
