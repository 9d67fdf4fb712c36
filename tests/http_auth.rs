//! Access control on the HTTP API and the SSE bridge, cross-site protection
//! and rate limits, over real loopback sockets with real tokens (HS256 with
//! `common::auth::SECRET`) and the API key `BACKEND_KEY`.

mod common;

use std::time::Duration;

use common::auth::{claims, hs256, hs256_config, sign_hs256, token, AUDIENCE, BACKEND_KEY};
use common::http::{expect_closed_after_response, read_response, RawResponse};
use common::{config, within};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use ringcast::auth::unix_now;
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use ringcast::engine::NewEvent;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// A broker with auth on, an HTTP client, and a small SSE reader.
// ---------------------------------------------------------------------------

struct Api {
    broker: Broker,
    http: reqwest::Client,
    base: String,
    _dir: tempfile::TempDir,
}

impl Api {
    /// A memory-mode broker with HS256 tokens and `BACKEND_KEY` (see
    /// `hs256_config`), changed by `tweak`.
    async fn start_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = hs256_config(config(dir.path(), Durability::Memory), dir.path());
        tweak(&mut config);
        Self::start_config(config, dir).await
    }

    /// A broker without auth (the default config), changed by `tweak`.
    async fn open_with(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path(), Durability::Memory);
        tweak(&mut config);
        Self::start_config(config, dir).await
    }

    async fn start_config(config: Config, dir: tempfile::TempDir) -> Self {
        config.validate().expect("test config is valid");
        let broker = common::start(config).await;
        let base = format!("http://{}", broker.http_addr());
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        Self {
            broker,
            http,
            base,
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A request with `credential` as a Bearer token (none when `None`).
    fn request(
        &self,
        method: Method,
        path: &str,
        credential: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match credential {
            Some(c) => r.bearer_auth(c),
            None => r,
        }
    }

    /// Publishes one event straight into the engine (no HTTP, no auth).
    async fn seed(&self, topic: &str, n: u64) {
        for _ in 0..n {
            self.broker
                .engine()
                .publish(topic, NewEvent::new("tick", "{}"))
                .await
                .expect("seed publish");
        }
    }

    /// Publishes over HTTP with `credential`, which must be accepted.
    async fn publish(&self, topic: &str, credential: &str) -> Value {
        let (status, _, body) = reply(
            self.request(
                Method::POST,
                &format!("/v1/topics/{topic}/events?type=tick"),
                Some(credential),
            )
            .body("{}"),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "publish refused: {body}");
        body
    }

    fn last_offset(&self, topic: &str) -> Option<u64> {
        self.broker.engine().info(topic).ok().map(|i| i.last_offset)
    }

    /// The sum of the values of `/metrics` lines of `name` whose labels
    /// include every one of `labels` (`key="value"`).
    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = common::fetch_text(&self.http, self.url("/metrics")).await;
        metric_in(&text, name, labels)
    }
}

fn metric_in(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            (rest.is_empty() || rest.starts_with('{')).then_some(())?;
            labels
                .iter()
                .all(|label| rest.contains(label))
                .then(|| value.parse::<f64>().expect("a metric value"))
        })
        .sum()
}

/// Sends `request`: status, headers and the JSON body (`Null` when empty).
async fn reply(request: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, Value) {
    within(20, async {
        let response = request.send().await.expect("request sent");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("body read");
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or_else(|e| {
                panic!("body {:?} is not JSON: {e}", String::from_utf8_lossy(&body))
            })
        };
        (status, headers, value)
    })
    .await
}

/// Asserts an error reply: status, `error.code` and a non-empty message.
fn assert_refused(
    got: &(StatusCode, HeaderMap, Value),
    status: StatusCode,
    code: &str,
    what: &str,
) {
    let (s, headers, body) = got;
    assert_eq!(*s, status, "{what}: {body}");
    assert_eq!(body["error"]["code"], code, "{what}: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{what}: no message in {body}"
    );
    if status == StatusCode::UNAUTHORIZED {
        let challenge = headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("{what}: a 401 without WWW-Authenticate"));
        assert!(challenge.starts_with("Bearer"), "{what}: {challenge}");
    }
}

/// One SSE message.
#[derive(Debug, Clone)]
struct SseEvent {
    id: Option<String>,
    event: String,
    data: String,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{self:?}: {e}"))
    }

    fn offset(&self) -> u64 {
        self.json()["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("{self:?}"))
    }
}

/// An open SSE response read event by event (the server writes `\n` line
/// ends, one `data:` line per event; comments are skipped).
struct Sse {
    response: reqwest::Response,
    buf: String,
    /// What `EventSource.lastEventId` would hold.
    last_event_id: String,
}

impl Sse {
    fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), StatusCode::OK, "SSE refused");
        Self {
            response,
            buf: String::new(),
            last_event_id: String::new(),
        }
    }

    /// The next event; `None` once the server ended the stream.
    async fn next(&mut self) -> Option<SseEvent> {
        within(20, async {
            loop {
                while let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let mut e = SseEvent {
                        id: None,
                        event: "message".into(),
                        data: String::new(),
                    };
                    let mut has_data = false;
                    for line in block.lines() {
                        if let Some(id) = line.strip_prefix("id: ") {
                            e.id = Some(id.to_owned());
                            self.last_event_id = id.to_owned();
                        } else if let Some(event) = line.strip_prefix("event: ") {
                            e.event = event.to_owned();
                        } else if let Some(data) = line.strip_prefix("data: ") {
                            e.data = data.to_owned();
                            has_data = true;
                        }
                    }
                    if has_data {
                        return Some(e);
                    }
                }
                match self.response.chunk().await {
                    Ok(Some(bytes)) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                    Ok(None) | Err(_) => return None,
                }
            }
        })
        .await
    }

    async fn expect(&mut self, kind: &str) -> SseEvent {
        let e = self
            .next()
            .await
            .unwrap_or_else(|| panic!("stream closed while waiting for `{kind}`"));
        assert_eq!(e.event, kind, "{e:?}");
        e
    }

    /// The next events, which must be exactly these offsets, in order.
    async fn expect_offsets(&mut self, offsets: impl IntoIterator<Item = u64>) {
        for want in offsets {
            let e = self.expect("tick").await;
            assert_eq!(e.offset(), want, "{e:?}");
        }
    }

    async fn expect_closed(&mut self) {
        if let Some(e) = self.next().await {
            panic!("expected the stream to end, got {e:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Every route: which credentials are refused, how.
// ---------------------------------------------------------------------------

/// The `/v1` routes and the grant each needs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Route {
    Publish,
    History,
    Info,
    Sse,
    List,
    Seal,
    Delete,
}

impl Route {
    /// In an order where each still finds the topic as the previous left it.
    const ALL: [Route; 7] = [
        Route::Publish,
        Route::History,
        Route::Info,
        Route::Sse,
        Route::List,
        Route::Seal,
        Route::Delete,
    ];

    fn request(self, api: &Api, topic: &str, credential: Option<&str>) -> reqwest::RequestBuilder {
        let (method, path) = match self {
            Route::Publish => (Method::POST, format!("/v1/topics/{topic}/events?type=tick")),
            Route::History => (Method::GET, format!("/v1/topics/{topic}/history")),
            Route::Info => (Method::GET, format!("/v1/topics/{topic}")),
            Route::Sse => (Method::GET, format!("/v1/topics/{topic}/events")),
            Route::List => (Method::GET, "/v1/topics".to_owned()),
            Route::Seal => (Method::POST, format!("/v1/topics/{topic}/seal")),
            Route::Delete => (Method::DELETE, format!("/v1/topics/{topic}")),
        };
        let r = api.request(method, &path, credential);
        if self == Route::Publish {
            r.body("{}")
        } else {
            r
        }
    }

    /// Sends the request; an SSE stream that opened is answered as its
    /// status alone (the stream is dropped).
    async fn send(
        self,
        api: &Api,
        topic: &str,
        credential: Option<&str>,
    ) -> (StatusCode, HeaderMap, Value) {
        let request = self.request(api, topic, credential);
        if self == Route::Sse {
            return stream_status(request).await;
        }
        reply(request).await
    }
}

/// A token for `sub` with every grant on `patterns` (admin included).
fn all_on(sub: &str, patterns: &[&str], ttl_secs: i64) -> String {
    hs256(&json!({
        "sub": sub,
        "aud": AUDIENCE,
        "exp": unix_now() as i64 + ttl_secs,
        "ringcast": {"publish": patterns, "subscribe": patterns, "admin": patterns},
    }))
}

#[tokio::test]
async fn every_route_refuses_missing_invalid_and_expired_credentials_with_401() {
    let api = Api::start_with(|_| {}).await;
    api.seed("orders.1", 1).await;
    let everything = |ttl| hs256(&claims("alice", ttl, &["*"], &["*"], true));
    let mut wrong_audience = claims("alice", 300, &["*"], &["*"], true);
    wrong_audience["aud"] = json!("someone-else");
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no credentials", None, "unauthorized"),
        (
            "a bad signature",
            Some(sign_hs256(
                b"another-secret-another-secret-another-secret!!",
                &claims("alice", 300, &["*"], &["*"], true),
            )),
            "unauthorized",
        ),
        ("an expired token", Some(everything(-10)), "token_expired"),
        (
            "a wrong audience",
            Some(hs256(&wrong_audience)),
            "unauthorized",
        ),
        (
            "an unknown API key",
            Some("rk_not_a_key".into()),
            "unauthorized",
        ),
    ];
    let before_http = api
        .metric(
            "ringcast_auth_refusals_total",
            &["transport=\"http\"", "code=\"unauthorized\""],
        )
        .await;
    let before_sse = api
        .metric(
            "ringcast_auth_refusals_total",
            &["transport=\"sse\"", "code=\"token_expired\""],
        )
        .await;
    for route in Route::ALL {
        for (what, credential, code) in &cases {
            let got = route.send(&api, "orders.1", credential.as_deref()).await;
            assert_refused(
                &got,
                StatusCode::UNAUTHORIZED,
                code,
                &format!("{route:?} with {what}"),
            );
        }
    }
    // Nothing was published, sealed or deleted.
    assert_eq!(api.last_offset("orders.1"), Some(1));
    assert!(!api.broker.engine().info("orders.1").unwrap().sealed);
    let after_http = api
        .metric(
            "ringcast_auth_refusals_total",
            &["transport=\"http\"", "code=\"unauthorized\""],
        )
        .await;
    let after_sse = api
        .metric(
            "ringcast_auth_refusals_total",
            &["transport=\"sse\"", "code=\"token_expired\""],
        )
        .await;
    assert!(
        after_http - before_http >= 6.0 * 4.0,
        "{before_http} -> {after_http}"
    );
    assert!(after_sse - before_sse >= 1.0, "{before_sse} -> {after_sse}");
}

#[tokio::test]
async fn a_grant_on_other_topics_is_forbidden_alike_whether_the_topic_exists_or_not() {
    let api = Api::start_with(|_| {}).await;
    let a_only = all_on("alice", &["a.*"], 300);
    let mut refusals = Vec::new();
    for route in Route::ALL.into_iter().filter(|r| *r != Route::List) {
        let got = route.send(&api, "b", Some(&a_only)).await;
        assert_refused(
            &got,
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("{route:?} on b"),
        );
        refusals.push((got.0, got.2));
    }
    assert!(
        api.broker.engine().info("b").is_err(),
        "a refused publish or subscribe created nothing"
    );
    api.seed("b", 2).await;
    for (route, before) in Route::ALL
        .into_iter()
        .filter(|r| *r != Route::List)
        .zip(&refusals)
    {
        let got = route.send(&api, "b", Some(&a_only)).await;
        assert_eq!(
            (got.0, &got.2),
            (before.0, &before.1),
            "{route:?}: the same refusal once b exists"
        );
    }
    let info = api.broker.engine().info("b").unwrap();
    assert_eq!(
        (info.last_offset, info.sealed),
        (2, false),
        "b is untouched"
    );

    // The same token is served on its own topics, and lists only those.
    api.seed("a.one", 1).await;
    for route in Route::ALL {
        let got = route.send(&api, "a.one", Some(&a_only)).await;
        assert_eq!(got.0, StatusCode::OK, "{route:?} on a.one: {}", got.2);
        if route == Route::List {
            let names: Vec<&str> = got.2["topics"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap())
                .collect();
            assert_eq!(names, ["a.one"], "b is not listed");
        }
    }
    assert!(api.broker.engine().info("a.one").is_err(), "deleted");
}

#[tokio::test]
async fn sub_patterns_grant_each_caller_its_own_topic_only() {
    let api = Api::start_with(|_| {}).await;
    let alice = all_on("alice", &["user:{sub}"], 300);
    api.seed("user:bob", 1).await;
    for route in Route::ALL.into_iter().filter(|r| *r != Route::List) {
        let got = route.send(&api, "user:bob", Some(&alice)).await;
        assert_refused(
            &got,
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("{route:?} on user:bob"),
        );
        let got = route.send(&api, "user:alice", Some(&alice)).await;
        assert_eq!(got.0, StatusCode::OK, "{route:?} on user:alice: {}", got.2);
    }
    assert_eq!(api.last_offset("user:bob"), Some(1));
}

#[tokio::test]
async fn the_backend_api_key_is_served_within_its_grants() {
    let api = Api::start_with(|_| {}).await;
    api.seed("billing.1", 1).await;
    for route in [Route::Publish, Route::History, Route::Info, Route::Sse] {
        let got = route.send(&api, "orders.7", Some(BACKEND_KEY)).await;
        assert_eq!(got.0, StatusCode::OK, "{route:?}: {}", got.2);
    }
    let (status, _, list) = Route::List.send(&api, "", Some(BACKEND_KEY)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["topics"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["topics"][0]["name"], "orders.7");
    for route in [Route::Seal, Route::Delete] {
        let got = route.send(&api, "orders.7", Some(BACKEND_KEY)).await;
        assert_refused(
            &got,
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("{route:?} without admin"),
        );
    }
    let got = Route::Publish
        .send(&api, "billing.1", Some(BACKEND_KEY))
        .await;
    assert_refused(
        &got,
        StatusCode::FORBIDDEN,
        "forbidden",
        "publish outside orders.*",
    );
    let admin = hs256(&claims("ops", 300, &[], &[], true));
    for route in [Route::Seal, Route::Delete] {
        let got = route.send(&api, "orders.7", Some(&admin)).await;
        assert_eq!(got.0, StatusCode::OK, "{route:?} with admin: {}", got.2);
    }
}

#[tokio::test]
async fn health_and_metrics_need_no_credentials() {
    let api = Api::start_with(|_| {}).await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = within(20, api.http.get(api.url(path)).send())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
}

// ---------------------------------------------------------------------------
// SSE: cookie and query tokens, expiry mid-stream.
// ---------------------------------------------------------------------------

/// Opens an SSE request with extra headers: its status, and the error body
/// when refused (an opened stream is dropped).
async fn sse_status(
    api: &Api,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut r = api.http.get(api.url(path));
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    stream_status(r).await
}

/// Sends a request for a stream: its status, and the error body when
/// refused (an opened stream is dropped).
async fn stream_status(request: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, Value) {
    let response = within(20, request.send()).await.expect("request sent");
    let status = response.status();
    let headers = response.headers().clone();
    if status == StatusCode::OK {
        return (status, headers, Value::Null);
    }
    let body = within(20, response.json::<Value>())
        .await
        .expect("a JSON error");
    (status, headers, body)
}

#[tokio::test]
async fn an_sse_stream_takes_its_token_from_the_header_a_cookie_or_the_query_in_that_order() {
    let api = Api::start_with(|_| {}).await;
    api.seed("orders.sse", 2).await;
    let good = token("alice", &["orders.*"], 300);
    let bad = sign_hs256(
        b"another-secret-another-secret-another-secret!!",
        &claims("x", 300, &[], &["*"], false),
    );
    let path = "/v1/topics/orders.sse/events?earliest=true";

    let cookie = format!("theme=dark; ringcast_token={good}");
    let mut s = Sse::new(
        api.http
            .get(api.url(path))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap(),
    );
    s.expect("ready").await;
    s.expect_offsets([1, 2]).await;

    let mut s = Sse::new(
        api.http
            .get(api.url(&format!("{path}&access_token={good}")))
            .send()
            .await
            .unwrap(),
    );
    s.expect("ready").await;
    s.expect_offsets([1, 2]).await;

    // The header wins: a good one over a bad cookie works, a bad one over
    // a good cookie is refused (never a fallback).
    let bad_cookie = format!("ringcast_token={bad}");
    let got = sse_status(
        &api,
        path,
        &[
            ("authorization", &format!("Bearer {good}")),
            ("cookie", &bad_cookie),
        ],
    )
    .await;
    assert_eq!(got.0, StatusCode::OK);
    let got = sse_status(
        &api,
        path,
        &[
            ("authorization", &format!("Bearer {bad}")),
            ("cookie", &cookie),
        ],
    )
    .await;
    assert_refused(
        &got,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "bad header, good cookie",
    );
    // The cookie wins over the query.
    let got = sse_status(
        &api,
        &format!("{path}&access_token={good}"),
        &[("cookie", &bad_cookie)],
    )
    .await;
    assert_refused(
        &got,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "bad cookie, good query",
    );
    // Cookies and query tokens are for the SSE stream only.
    let got = reply(
        api.http
            .get(api.url("/v1/topics/orders.sse"))
            .header("cookie", &cookie),
    )
    .await;
    assert_refused(
        &got,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "info with a cookie",
    );
}

#[tokio::test]
async fn query_tokens_are_refused_when_turned_off() {
    let api = Api::start_with(|c| c.auth.query_token = false).await;
    let good = token("alice", &["orders.*"], 300);
    let got = sse_status(
        &api,
        &format!("/v1/topics/orders.q/events?access_token={good}"),
        &[],
    )
    .await;
    assert_refused(
        &got,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "query token turned off",
    );
    assert!(got.2["error"]["message"]
        .as_str()
        .unwrap()
        .contains("auth.query_token"));
    assert!(
        !got.2.to_string().contains(&good),
        "the token is not echoed"
    );
}

#[tokio::test]
async fn a_token_that_expires_mid_stream_ends_it_and_a_fresh_one_resumes_exactly() {
    let api = Api::start_with(|_| {}).await;
    let topic = "orders.expiring";
    let short = token("alice", &["orders.*"], 3);
    let mut s = Sse::new(
        api.request(
            Method::GET,
            &format!("/v1/topics/{topic}/events"),
            Some(&short),
        )
        .send()
        .await
        .unwrap(),
    );
    let ready = s.expect("ready").await.json();
    for _ in 0..3 {
        api.publish(topic, BACKEND_KEY).await;
    }
    s.expect_offsets(1..=3).await;
    let epoch = ready["epoch"].as_str().unwrap().to_owned();
    let last = format!("{epoch}:3");

    let error = s.expect("error").await;
    assert_eq!(error.id, None, "no id: the last event id stays put");
    assert_eq!(error.json()["code"], "token_expired", "{error:?}");
    assert!(error.json()["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    s.expect_closed().await;
    assert_eq!(s.last_event_id, last);

    // Published while the client was away.
    for _ in 0..2 {
        api.publish(topic, BACKEND_KEY).await;
    }
    let old = sse_status(
        &api,
        &format!("/v1/topics/{topic}/events"),
        &[("authorization", &format!("Bearer {short}"))],
    )
    .await;
    assert_refused(
        &old,
        StatusCode::UNAUTHORIZED,
        "token_expired",
        "the old token",
    );

    let fresh = token("alice", &["orders.*"], 300);
    let mut s = Sse::new(
        api.request(
            Method::GET,
            &format!("/v1/topics/{topic}/events"),
            Some(&fresh),
        )
        .header("last-event-id", &s.last_event_id)
        .send()
        .await
        .unwrap(),
    );
    s.expect("ready").await;
    s.expect_offsets([4, 5]).await;
    api.publish(topic, BACKEND_KEY).await;
    s.expect_offsets([6]).await;

    // What a page does: ?last_event_id= and ?access_token=.
    let mut s = Sse::new(
        api.http
            .get(api.url(&format!(
                "/v1/topics/{topic}/events?last_event_id={last}&access_token={fresh}"
            )))
            .send()
            .await
            .unwrap(),
    );
    s.expect("ready").await;
    s.expect_offsets(4..=6).await;
}

// ---------------------------------------------------------------------------
// Rate limits.
// ---------------------------------------------------------------------------

/// Keeps a paused clock still: tokio does not auto-advance paused time while
/// a `spawn_blocking` task runs (`tokio::time::pause`, "Preventing
/// auto-advance"). Without it, the runtime — idle for an instant while a
/// request crosses a real socket — would jump to the next timer (hyper's
/// header timeout, the test's own `within`), refilling rate budgets at
/// random. With it, only `tokio::time::advance` moves time.
struct StillClock(Option<std::sync::mpsc::Sender<()>>);

impl StillClock {
    fn hold() -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = rx.recv();
        });
        Self(Some(tx))
    }
}

impl Drop for StillClock {
    fn drop(&mut self) {
        // Ends the blocking task.
        self.0.take();
    }
}

#[tokio::test(start_paused = true)]
async fn a_credential_over_its_publish_rate_gets_429_while_another_keeps_full_service() {
    let _still = StillClock::hold();
    let api = Api::start_with(|c| {
        c.auth.rate.publish_per_second = 1;
        c.auth.rate.publish_burst = 3;
        c.server.heartbeat = Duration::from_secs(3600);
    })
    .await;
    let alice = token("alice", &["rate.*"], 300);
    let bob = token("bob", &["rate.*"], 300);
    let before = api
        .metric("ringcast_rate_limited_total", &["limit=\"publish\""])
        .await;
    for _ in 0..3 {
        api.publish("rate.t", &alice).await;
    }
    let publish = |who: &str| {
        api.request(
            Method::POST,
            "/v1/topics/rate.t/events?type=tick",
            Some(who),
        )
        .body("{}")
    };
    let got = reply(publish(&alice)).await;
    assert_refused(
        &got,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "alice's 4th",
    );
    assert_eq!(got.1["retry-after"], "1");
    let ms = got.2["error"]["retry_after_ms"]
        .as_u64()
        .expect("retry_after_ms");
    assert!((1..=1000).contains(&ms), "{ms}");
    for _ in 0..3 {
        api.publish("rate.t", &bob).await;
    }
    assert_eq!(
        api.last_offset("rate.t"),
        Some(6),
        "the refused publish stored nothing"
    );

    tokio::time::advance(Duration::from_secs(1)).await;
    api.publish("rate.t", &alice).await;
    let got = reply(publish(&alice)).await;
    assert_refused(
        &got,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "alice again",
    );
    let after = api
        .metric("ringcast_rate_limited_total", &["limit=\"publish\""])
        .await;
    assert!(after - before >= 2.0, "{before} -> {after}");
}

#[tokio::test]
async fn sse_streams_over_the_per_credential_limit_get_429_until_one_closes() {
    let api = Api::start_with(|c| {
        c.auth.rate.sse_per_credential = 1;
        c.server.heartbeat = Duration::from_millis(50);
    })
    .await;
    let alice = token("alice", &["orders.*"], 300);
    let bob = token("bob", &["orders.*"], 300);
    let path = "/v1/topics/orders.s/events";
    let open = |who: &str| api.request(Method::GET, path, Some(who)).send();
    let mut first = Sse::new(open(&alice).await.unwrap());
    first.expect("ready").await;
    let got = stream_status(api.request(Method::GET, path, Some(&alice))).await;
    assert_refused(
        &got,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "alice's 2nd stream",
    );
    let mut other = Sse::new(open(&bob).await.unwrap());
    other.expect("ready").await;

    // The server notices the closed stream at its next heartbeat at the
    // latest and gives the slot back.
    drop(first);
    within(20, async {
        loop {
            let response = open(&alice).await.unwrap();
            if response.status() == StatusCode::OK {
                Sse::new(response).expect("ready").await;
                return;
            }
            assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let counted = api
        .metric(
            "ringcast_rate_limited_total",
            &["limit=\"sse_per_credential\""],
        )
        .await;
    assert!(counted >= 1.0, "{counted}");
}

async fn raw_get(stream: &mut TcpStream, path: &str, host: &str) -> RawResponse {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(stream).await
}

#[tokio::test(start_paused = true)]
async fn new_connections_over_the_per_ip_rate_get_429_and_are_closed() {
    let _still = StillClock::hold();
    let api = Api::start_with(|c| {
        c.auth.rate.connections_per_second = 1;
        c.auth.rate.connection_burst = 2;
        c.server.heartbeat = Duration::from_secs(3600);
    })
    .await;
    let addr = api.broker.http_addr();
    let connect = || TcpStream::connect(addr);
    let mut first = connect().await.unwrap();
    assert_eq!(
        raw_get(&mut first, "/healthz", "localhost").await.status,
        200
    );
    let mut second = connect().await.unwrap();
    assert_eq!(
        raw_get(&mut second, "/healthz", "localhost").await.status,
        200
    );

    let mut third = connect().await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let refused = read_response(&mut third).await;
    expect_closed_after_response(&mut third).await;
    assert_eq!(refused.status, 429, "{}", refused.head);
    let head = refused.head.to_ascii_lowercase();
    assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
    let body: Value = serde_json::from_slice(&refused.body).unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");

    tokio::time::advance(Duration::from_secs(1)).await;
    let mut fourth = connect().await.unwrap();
    assert_eq!(
        raw_get(&mut fourth, "/healthz", "localhost").await.status,
        200
    );
    // Counted; read over a connection already open.
    let metrics = raw_get(&mut first, "/metrics", "localhost").await;
    let text = String::from_utf8(metrics.body).unwrap();
    let counted = metric_in(
        &text,
        "ringcast_rate_limited_total",
        &["limit=\"connections\""],
    );
    assert!(counted >= 1.0, "{counted}");
}

// ---------------------------------------------------------------------------
// Cross-site protection.
// ---------------------------------------------------------------------------

/// The writes a hostile page can send without a preflight.
fn simple_writes(
    api: &Api,
    topic: &str,
    origin: &str,
) -> Vec<(&'static str, reqwest::RequestBuilder)> {
    let with = |r: reqwest::RequestBuilder| {
        r.header("origin", origin)
            .header("content-type", "text/plain")
            .body("x")
    };
    vec![
        (
            "seal",
            with(api.http.post(api.url(&format!("/v1/topics/{topic}/seal")))),
        ),
        (
            "delete",
            with(api.http.delete(api.url(&format!("/v1/topics/{topic}")))),
        ),
        (
            "publish",
            with(
                api.http
                    .post(api.url(&format!("/v1/topics/{topic}/events?type=tick"))),
            ),
        ),
    ]
}

#[tokio::test]
async fn a_cross_origin_text_plain_write_from_an_unlisted_origin_is_refused_and_changes_nothing() {
    // The threat: a loopback broker without auth, and any page on the web.
    let api =
        Api::open_with(|c| c.server.cors_origins = vec!["https://reader.example".into()]).await;
    api.seed("victim", 2).await;
    let before = api
        .metric(
            "ringcast_auth_refusals_total",
            &["code=\"origin_not_allowed\""],
        )
        .await;
    for origin in ["https://evil.example", "https://reader.example", "null"] {
        for (what, request) in simple_writes(&api, "victim", origin) {
            let got = reply(request).await;
            assert_refused(
                &got,
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                &format!("{what} from {origin}"),
            );
            assert!(
                got.1.get("access-control-allow-origin").is_none(),
                "{what}: {:?}",
                got.1
            );
        }
    }
    let info = api.broker.engine().info("victim").expect("still there");
    assert_eq!((info.last_offset, info.sealed), (2, false), "unchanged");
    let after = api
        .metric(
            "ringcast_auth_refusals_total",
            &["code=\"origin_not_allowed\""],
        )
        .await;
    assert!(after - before >= 9.0, "{before} -> {after}");
    // The same writes without Origin (curl, a backend) are served.
    let (status, _, _) = reply(
        api.http
            .post(api.url("/v1/topics/victim/events?type=tick"))
            .body("{}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn listed_write_origins_may_write_with_their_origin_reflected_and_credentials() {
    let api =
        Api::open_with(|c| c.server.cors_write_origins = vec!["https://admin.example".into()])
            .await;
    api.seed("mine", 1).await;
    for (what, request) in simple_writes(&api, "mine", "https://admin.example") {
        // Seal, delete, then a publish that creates the topic anew.
        let (status, headers, body) = reply(request).await;
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
        assert_eq!(
            headers["access-control-allow-origin"], "https://admin.example",
            "{what}"
        );
        assert_eq!(
            headers["access-control-allow-credentials"], "true",
            "{what}"
        );
    }
    let preflight = within(
        20,
        api.http
            .request(Method::OPTIONS, api.url("/v1/topics/mine"))
            .header("origin", "https://admin.example")
            .header("access-control-request-method", "DELETE")
            .header(
                "access-control-request-headers",
                "authorization,content-type,idempotency-key,x-ringcast-header-user-id",
            )
            .send(),
    )
    .await
    .unwrap();
    assert!(preflight.status().is_success());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "https://admin.example");
    assert_eq!(h["access-control-allow-credentials"], "true");
    let methods = h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_ascii_uppercase();
    assert!(methods.contains("DELETE"), "{methods}");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    // A listed origin may send what it asks for, event headers included.
    for name in [
        "authorization",
        "content-type",
        "idempotency-key",
        "x-ringcast-header-user-id",
    ] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
}

#[tokio::test]
async fn a_listed_read_origin_gets_itself_and_credentials_and_a_wildcard_gets_a_star_without() {
    let listed =
        Api::open_with(|c| c.server.cors_origins = vec!["https://app.example".into()]).await;
    let (status, h, _) = reply(
        listed
            .http
            .get(listed.url("/v1/topics"))
            .header("origin", "https://app.example"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-credentials"], "true");
    let vary = h
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .join(",");
    assert!(vary.contains("origin"), "{vary}");
    let exposed = h["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "{exposed}");

    let star =
        Api::open_with(|c| c.server.cors_origins = vec!["*".into(), "https://app.example".into()])
            .await;
    let (status, h, _) = reply(
        star.http
            .get(star.url("/v1/topics"))
            .header("origin", "https://any.example"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h.get("access-control-allow-credentials").is_none(), "{h:?}");
    // A listed origin beside "*" still gets itself, with credentials.
    let (_, h, _) = reply(
        star.http
            .get(star.url("/v1/topics"))
            .header("origin", "https://app.example"),
    )
    .await;
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-credentials"], "true");
    // "*" is for reads: no preflight grant for a write, and the write is refused.
    let preflight = |method: &'static str| {
        star.http
            .request(Method::OPTIONS, star.url("/v1/topics/t/events"))
            .header("origin", "https://any.example")
            .header("access-control-request-method", method)
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let read = within(20, preflight("GET")).await.unwrap();
    assert_eq!(read.headers()["access-control-allow-origin"], "*");
    let write = within(20, preflight("POST")).await.unwrap();
    assert!(
        write.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        write.headers()
    );
    for (what, request) in simple_writes(&star, "t", "https://any.example") {
        assert_refused(
            &reply(request).await,
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            what,
        );
    }
}

#[tokio::test]
async fn a_loopback_broker_refuses_foreign_host_headers_and_answers_loopback_names() {
    let api = Api::open_with(|c| c.server.allowed_hosts = vec!["ringcast.internal".into()]).await;
    let port = api.broker.http_addr().port();
    let mut raw = TcpStream::connect(api.broker.http_addr()).await.unwrap();
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "ringcast.internal".into(),
    ] {
        let r = raw_get(&mut raw, "/v1/topics", &host).await;
        assert_eq!(r.status, 200, "{host}: {}", r.head);
    }
    for host in ["evil.example", "evil.example:7480"] {
        let r = raw_get(&mut raw, "/v1/topics", host).await;
        assert_eq!(r.status, 403, "{host}");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "host_not_allowed");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.allowed_hosts"));
    }
}

#[tokio::test]
async fn a_listener_on_all_interfaces_does_not_check_host() {
    let api = Api::start_with(|c| c.server.http_listen = "0.0.0.0:0".parse().unwrap()).await;
    let port = api.broker.http_addr().port();
    let mut raw = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    assert_eq!(
        raw_get(&mut raw, "/healthz", "evil.example").await.status,
        200
    );
}
