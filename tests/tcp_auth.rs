//! Access control on the TCP front end, over real sockets with real tokens:
//! who is admitted at `hello`, what each grant allows (and that a refusal
//! never tells whether a topic exists), token expiry and `refresh`, the SDK
//! riding through expiring tokens without losing or repeating an event, rate
//! limits, and what a protocol version 1 client is sent.
//!
//! Expiry tests run on the wall clock (a token's `exp` is in whole seconds,
//! so their tokens live 1–3 s); rate-limit tests run on paused tokio time,
//! which drives the limiters.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::auth::{claims, hs256, hs256_config, sign_hs256, token, BACKEND_KEY};
use common::proxy::Proxy;
use common::{config, start, subscribe_live as subscribe, within, RawClient};
use ringcast::broker::Broker;
use ringcast::config::{Config, Durability};
use ringcast_client::{Client, ClientOptions, Delivery, Subscription};
use ringcast_protocol::{ClientMessage, ErrorCode, NewEvent, ServerMessage};

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

/// A memory-mode broker config with HS256 tokens and [`BACKEND_KEY`] on.
fn auth_config(dir: &std::path::Path) -> Config {
    hs256_config(config(dir, Durability::Memory), dir)
}

async fn auth_broker() -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(auth_config(dir.path())).await;
    (broker, dir)
}

/// Connects and sends a `Hello` of `version` with `credentials`; returns the
/// client and the server's answer.
async fn hello(
    addr: SocketAddr,
    version: u16,
    credentials: Option<&str>,
) -> (RawClient, Option<ServerMessage>) {
    let mut c = RawClient::connect(addr).await;
    c.send(&ClientMessage::Hello {
        protocol_version: version,
        client_name: "tcp-auth-test".into(),
        credentials: credentials.map(str::to_owned),
    })
    .await;
    let answer = c.recv().await;
    (c, answer)
}

/// A version 2 session with `credentials`, asserting it is welcomed.
async fn session(addr: SocketAddr, credentials: Option<&str>) -> RawClient {
    match hello(addr, 2, credentials).await {
        (
            c,
            Some(ServerMessage::Welcome {
                protocol_version: 2,
                ..
            }),
        ) => c,
        (_, other) => panic!("expected Welcome, got {other:?}"),
    }
}

/// Asserts `hello` with `credentials` is refused with `code` (connection
/// level) and the connection closed; returns the message.
async fn refused_hello(addr: SocketAddr, credentials: Option<&str>, code: ErrorCode) -> String {
    let (mut c, answer) = hello(addr, 2, credentials).await;
    let message = match answer {
        Some(ServerMessage::Error {
            request_id: None,
            code: got,
            message,
        }) if got == code => message,
        other => panic!("expected a connection-level {code:?}, got {other:?}"),
    };
    c.expect_closed().await;
    message
}

fn publish(request_id: u64, topic: &str) -> ClientMessage {
    ClientMessage::Publish {
        request_id,
        topic: topic.into(),
        event_type: "tick".into(),
        headers: vec![],
        payload: Bytes::from(format!("{{\"n\":{request_id}}}")),
    }
}

fn batch(request_id: u64, topic: &str, n: usize) -> ClientMessage {
    ClientMessage::PublishBatch {
        request_id,
        topic: topic.into(),
        events: (0..n)
            .map(|_| NewEvent {
                event_type: "tick".into(),
                headers: vec![],
                payload: Bytes::from_static(b"{}"),
            })
            .collect(),
    }
}

/// Sends `msg` and expects `Published` for it.
async fn published(c: &mut RawClient, msg: ClientMessage) -> u64 {
    c.send(&msg).await;
    match c.recv().await {
        Some(ServerMessage::Published {
            results,
            request_id,
        }) => {
            assert!(!results.is_empty(), "request {request_id}");
            results[0].offset
        }
        other => panic!("expected Published, got {other:?}"),
    }
}

/// Sends `msg` and expects `Subscribed`.
async fn subscribed(c: &mut RawClient, msg: ClientMessage) {
    c.send(&msg).await;
    match c.recv().await {
        Some(ServerMessage::Subscribed { .. }) => {}
        other => panic!("expected Subscribed, got {other:?}"),
    }
}

/// Sends `msg` and returns the request-level error answering it.
async fn request_error(c: &mut RawClient, msg: ClientMessage) -> (ErrorCode, String) {
    c.send(&msg).await;
    match c.recv().await {
        Some(ServerMessage::Error {
            request_id: Some(_),
            code,
            message,
        }) => (code, message),
        other => panic!("expected a request error for {}, got {other:?}", msg.kind()),
    }
}

/// Asserts the connection still serves requests.
async fn still_serves(c: &mut RawClient) {
    c.send(&ClientMessage::Ping { request_id: 9_999 }).await;
    match c.recv().await {
        Some(ServerMessage::Pong { request_id: 9_999 }) => {}
        other => panic!("expected Pong, got {other:?}"),
    }
}

/// A counter's value in the process-wide `/metrics` text, summed over the
/// series that carry every one of `labels`.
fn counter(name: &str, labels: &[(&str, &str)]) -> f64 {
    ringcast::metrics::handle()
        .render()
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let matches = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Waits (on the wall clock: tokens expire by it) until `exp` (Unix
/// seconds) is `margin` past.
async fn wall_clock_past(exp: u64, margin: Duration) {
    let at = UNIX_EPOCH + Duration::from_secs(exp) + margin;
    if let Ok(left) = at.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
}

fn exp_of(claims: &serde_json::Value) -> u64 {
    claims["exp"].as_u64().unwrap()
}

// ---------------------------------------------------------------------------
// Hello.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hello_without_credentials_is_unauthorized_and_closed_when_anonymous_clients_may_do_nothing(
) {
    let (broker, _dir) = auth_broker().await;
    let before = counter(
        "ringcast_auth_refusals_total",
        &[("transport", "tcp"), ("code", "unauthorized")],
    );
    let message = refused_hello(broker.tcp_addr(), None, ErrorCode::Unauthorized).await;
    assert!(message.contains("credentials required"), "{message}");
    // Empty credentials are no credentials.
    refused_hello(broker.tcp_addr(), Some(""), ErrorCode::Unauthorized).await;
    let after = counter(
        "ringcast_auth_refusals_total",
        &[("transport", "tcp"), ("code", "unauthorized")],
    );
    assert!(after >= before + 2.0, "{before} -> {after}");
}

#[tokio::test]
async fn hello_with_a_bad_signature_is_unauthorized() {
    let (broker, _dir) = auth_broker().await;
    let forged = sign_hs256(
        b"another-secret-another-secret-another-secret!!",
        &claims("u1", 60, &["a.*"], &["a.*"], true),
    );
    let message = refused_hello(broker.tcp_addr(), Some(&forged), ErrorCode::Unauthorized).await;
    assert!(message.contains("signature"), "{message}");
}

#[tokio::test]
async fn hello_with_an_expired_token_is_token_expired() {
    let (broker, _dir) = auth_broker().await;
    let expired = token("u1", &["a.*"], -5);
    let message = refused_hello(broker.tcp_addr(), Some(&expired), ErrorCode::TokenExpired).await;
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test]
async fn hello_with_the_wrong_audience_is_unauthorized() {
    let (broker, _dir) = auth_broker().await;
    let mut c = claims("u1", 60, &["a.*"], &["a.*"], false);
    c["aud"] = "someone-else".into();
    let message = refused_hello(broker.tcp_addr(), Some(&hs256(&c)), ErrorCode::Unauthorized).await;
    assert!(message.contains("audience"), "{message}");
}

#[tokio::test]
async fn an_unknown_api_key_is_unauthorized() {
    let (broker, _dir) = auth_broker().await;
    refused_hello(
        broker.tcp_addr(),
        Some("rk_not_a_key"),
        ErrorCode::Unauthorized,
    )
    .await;
}

#[tokio::test]
async fn a_valid_token_and_a_valid_api_key_are_welcomed_and_may_use_their_grants() {
    let (broker, _dir) = auth_broker().await;
    let mut backend = session(broker.tcp_addr(), Some(BACKEND_KEY)).await;
    assert_eq!(published(&mut backend, publish(1, "orders.eu")).await, 1);

    let mut user = session(broker.tcp_addr(), Some(&token("u1", &["orders.*"], 60))).await;
    subscribed(&mut user, subscribe(1, 1, "orders.eu")).await;
    assert_eq!(published(&mut backend, publish(2, "orders.eu")).await, 2);
    match user.recv().await {
        Some(ServerMessage::Event {
            subscription_id: 1,
            event,
        }) => assert_eq!(event.offset, 2),
        other => panic!("expected the event, got {other:?}"),
    }
}

#[tokio::test]
async fn credentials_that_grant_nothing_are_refused_at_hello() {
    let (broker, _dir) = auth_broker().await;
    let nothing = hs256(&claims("u1", 60, &[], &[], false));
    let message = refused_hello(broker.tcp_addr(), Some(&nothing), ErrorCode::Forbidden).await;
    assert!(message.contains("grant"), "{message}");
}

// ---------------------------------------------------------------------------
// Grants.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_grant_for_a_star_refuses_b_the_same_way_whether_b_exists_or_not() {
    let (broker, _dir) = auth_broker().await;
    // `b` exists, `nope` does not.
    let mut root = session(broker.tcp_addr(), Some(&token("root", &["*"], 60))).await;
    published(&mut root, publish(1, "b")).await;

    let mut c = session(broker.tcp_addr(), Some(&token("u1", &["a.*"], 60))).await;
    let requests = |topic: &str| {
        vec![
            publish(10, topic),
            batch(11, topic, 2),
            subscribe(12, 12, topic),
            ClientMessage::History {
                request_id: 13,
                topic: topic.into(),
                after: 0,
                types: vec![],
                limit: 10,
            },
            ClientMessage::TopicInfo {
                request_id: 14,
                topic: topic.into(),
            },
            ClientMessage::Seal {
                request_id: 15,
                topic: topic.into(),
            },
            ClientMessage::Delete {
                request_id: 16,
                topic: topic.into(),
            },
        ]
    };
    let before = counter(
        "ringcast_auth_refusals_total",
        &[("transport", "tcp"), ("code", "forbidden")],
    );
    for (existing, missing) in requests("b").into_iter().zip(requests("nope")) {
        let kind = existing.kind();
        let (code, message) = request_error(&mut c, existing).await;
        assert_eq!(code, ErrorCode::Forbidden, "{kind}: {message}");
        let (code_missing, message_missing) = request_error(&mut c, missing).await;
        assert_eq!(code_missing, ErrorCode::Forbidden, "{kind}");
        assert_eq!(
            message.replace("\"b\"", "T"),
            message_missing.replace("\"nope\"", "T"),
            "{kind}: the reply must not depend on whether the topic exists"
        );
    }
    let after = counter(
        "ringcast_auth_refusals_total",
        &[("transport", "tcp"), ("code", "forbidden")],
    );
    assert!(after >= before + 14.0, "{before} -> {after}");

    // Nothing happened to `b`, nothing was created, and the connection lives on.
    root.send(&ClientMessage::ListTopics { request_id: 2 })
        .await;
    match root.recv().await {
        Some(ServerMessage::Topics { topics, .. }) => {
            let names: Vec<_> = topics.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["b"]);
            assert_eq!(topics[0].last_offset, 1);
            assert!(!topics[0].sealed);
        }
        other => panic!("{other:?}"),
    }
    still_serves(&mut c).await;
    assert_eq!(published(&mut c, publish(20, "a.x")).await, 1);
}

#[tokio::test]
async fn a_sub_pattern_lets_u1_read_its_own_topic_and_not_u2s() {
    let (broker, _dir) = auth_broker().await;
    let u1 = hs256(&claims("u1", 60, &[], &["user:{sub}"], false));
    let mut c = session(broker.tcp_addr(), Some(&u1)).await;
    subscribed(&mut c, subscribe(1, 1, "user:u1")).await;
    let (code, _) = request_error(&mut c, subscribe(2, 2, "user:u2")).await;
    assert_eq!(code, ErrorCode::Forbidden);
    // Read, not write.
    let (code, _) = request_error(&mut c, publish(3, "user:u1")).await;
    assert_eq!(code, ErrorCode::Forbidden);
}

#[tokio::test]
async fn list_topics_shows_only_topics_the_grants_name() {
    let (broker, _dir) = auth_broker().await;
    let mut root = session(broker.tcp_addr(), Some(&token("root", &["*"], 60))).await;
    for (id, topic) in ["a.1", "a.2", "b.1", "user:u1", "user:u2"]
        .iter()
        .enumerate()
    {
        published(&mut root, publish(id as u64 + 1, topic)).await;
    }
    let grants = hs256(&claims("u1", 60, &["b.1"], &["a.*", "user:{sub}"], false));
    let mut c = session(broker.tcp_addr(), Some(&grants)).await;
    c.send(&ClientMessage::ListTopics { request_id: 1 }).await;
    match c.recv().await {
        Some(ServerMessage::Topics { topics, .. }) => {
            let mut names: Vec<_> = topics.iter().map(|t| t.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(names, ["a.1", "a.2", "b.1", "user:u1"]);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn anonymous_grants_work_without_a_token_and_anything_else_is_unauthorized() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = auth_config(dir.path());
    config.auth.anonymous = Some(ringcast::auth::GrantsConfig {
        subscribe: vec!["public.*".into()],
        ..Default::default()
    });
    let broker = start(config).await;
    let mut anon = session(broker.tcp_addr(), None).await;
    subscribed(&mut anon, subscribe(1, 1, "public.news")).await;
    let before = counter(
        "ringcast_auth_refusals_total",
        &[("transport", "tcp"), ("code", "unauthorized")],
    );
    let (code, message) = request_error(&mut anon, subscribe(2, 2, "private.x")).await;
    assert_eq!(code, ErrorCode::Unauthorized, "{message}");
    assert!(message.contains("credentials required"), "{message}");
    let (code, _) = request_error(&mut anon, publish(3, "public.news")).await;
    assert_eq!(code, ErrorCode::Unauthorized);
    assert!(
        counter(
            "ringcast_auth_refusals_total",
            &[("transport", "tcp"), ("code", "unauthorized")]
        ) >= before + 2.0
    );

    // A publisher with a token reaches the anonymous subscriber.
    let mut publisher = session(broker.tcp_addr(), Some(&token("p", &["public.*"], 60))).await;
    published(&mut publisher, publish(1, "public.news")).await;
    match anon.recv().await {
        Some(ServerMessage::Event {
            subscription_id: 1, ..
        }) => {}
        other => panic!("expected the event, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Expiry and refresh (wall clock).
// ---------------------------------------------------------------------------

#[tokio::test]
async fn without_refresh_the_connection_ends_with_token_expired_at_exp() {
    let (broker, _dir) = auth_broker().await;
    let short = claims("u1", 2, &["orders.*"], &["orders.*"], false);
    let mut c = session(broker.tcp_addr(), Some(&hs256(&short))).await;
    subscribed(&mut c, subscribe(1, 1, "orders.x")).await;
    let before = counter(
        "ringcast_auth_refusals_total",
        &[("transport", "tcp"), ("code", "token_expired")],
    );
    match within(10, c.recv()).await {
        Some(ServerMessage::Error {
            request_id: None,
            code: ErrorCode::TokenExpired,
            message,
        }) => assert!(message.contains("refresh"), "{message}"),
        other => panic!("expected TokenExpired, got {other:?}"),
    }
    assert!(
        SystemTime::now() >= UNIX_EPOCH + Duration::from_secs(exp_of(&short)),
        "expired before exp"
    );
    c.expect_closed().await;
    assert!(
        counter(
            "ringcast_auth_refusals_total",
            &[("transport", "tcp"), ("code", "token_expired")]
        ) >= before + 1.0
    );
}

#[tokio::test]
async fn refresh_before_expiry_keeps_the_subscription_past_the_original_exp() {
    let (broker, _dir) = auth_broker().await;
    let first = claims("u1", 2, &[], &["orders.*"], false);
    let mut c = session(broker.tcp_addr(), Some(&hs256(&first))).await;
    subscribed(&mut c, subscribe(1, 1, "orders.x")).await;

    let second = claims("u1", 60, &[], &["orders.*"], false);
    c.send(&ClientMessage::Refresh {
        request_id: 2,
        credentials: hs256(&second),
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::Refreshed {
            request_id: 2,
            expires_at_ms,
        }) => assert_eq!(expires_at_ms, exp_of(&second) * 1000),
        other => panic!("expected Refreshed, got {other:?}"),
    }

    // Not a synchronisation: the point is that the first token's exp passes.
    wall_clock_past(exp_of(&first), Duration::from_millis(300)).await;
    let mut backend = session(broker.tcp_addr(), Some(BACKEND_KEY)).await;
    let offset = published(&mut backend, publish(1, "orders.x")).await;
    match c.recv().await {
        Some(ServerMessage::Event {
            subscription_id: 1,
            event,
        }) => assert_eq!(event.offset, offset),
        other => panic!("expected the event after the old exp, got {other:?}"),
    }
    still_serves(&mut c).await;
}

#[tokio::test]
async fn refresh_to_a_narrower_grant_ends_the_uncovered_subscription_with_unsubscribed() {
    let (broker, _dir) = auth_broker().await;
    let mut backend = session(broker.tcp_addr(), Some(BACKEND_KEY)).await;
    // Stored topics, so that they outlive their subscribers.
    published(&mut backend, publish(1, "orders.a")).await;
    published(&mut backend, publish(2, "orders.b")).await;
    let wide = hs256(&claims("u1", 60, &[], &["orders.a", "orders.b"], false));
    let mut c = session(broker.tcp_addr(), Some(&wide)).await;
    subscribed(&mut c, subscribe(1, 1, "orders.a")).await;
    subscribed(&mut c, subscribe(2, 2, "orders.b")).await;

    let narrow = hs256(&claims("u1", 60, &[], &["orders.a"], false));
    c.send(&ClientMessage::Refresh {
        request_id: 3,
        credentials: narrow,
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::Unsubscribed {
            request_id: 3,
            subscription_id: 2,
        }) => {}
        other => panic!("expected Unsubscribed for subscription 2, got {other:?}"),
    }
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Refreshed { request_id: 3, .. })
    ));

    backend
        .send(&ClientMessage::TopicInfo {
            request_id: 3,
            topic: "orders.b".into(),
        })
        .await;
    match backend.recv().await {
        Some(ServerMessage::TopicInfo { info, .. }) => assert_eq!(info.subscribers, 0),
        other => panic!("{other:?}"),
    }
    let offset = published(&mut backend, publish(4, "orders.a")).await;
    match c.recv().await {
        Some(ServerMessage::Event {
            subscription_id: 1,
            event,
        }) => assert_eq!(event.offset, offset),
        other => panic!("expected the event on orders.a, got {other:?}"),
    }
    // The narrower grant is in force for new requests.
    let (code, _) = request_error(&mut c, subscribe(4, 4, "orders.b")).await;
    assert_eq!(code, ErrorCode::Forbidden);
}

#[tokio::test]
async fn a_refused_refresh_leaves_the_old_token_in_force() {
    let (broker, _dir) = auth_broker().await;
    let mut c = session(broker.tcp_addr(), Some(&token("u1", &["orders.*"], 60))).await;

    let refusals = [
        (
            token("u2", &["orders.*"], 60),
            ErrorCode::Forbidden,
            "same subject",
        ),
        (
            token("u1", &["orders.*"], -5),
            ErrorCode::TokenExpired,
            "expired",
        ),
        (
            sign_hs256(
                b"another-secret-another-secret-another-secret!!",
                &claims("u1", 60, &["orders.*"], &["orders.*"], false),
            ),
            ErrorCode::Unauthorized,
            "signature",
        ),
        (BACKEND_KEY.to_owned(), ErrorCode::Forbidden, "same subject"),
        (String::new(), ErrorCode::Unauthorized, "credentials"),
    ];
    for (id, (credentials, code, says)) in refusals.into_iter().enumerate() {
        let (got, message) = request_error(
            &mut c,
            ClientMessage::Refresh {
                request_id: id as u64,
                credentials,
            },
        )
        .await;
        assert_eq!(got, code, "{message}");
        assert!(message.contains(says), "{message}");
        assert_eq!(
            published(&mut c, publish(100 + id as u64, "orders.x")).await,
            id as u64 + 1,
            "the old token stays in force"
        );
    }
}

// ---------------------------------------------------------------------------
// The SDK through expiring tokens.
// ---------------------------------------------------------------------------

/// A token provider minting subscribe-on-`orders.*` tokens for `sub` that
/// live 2–3 s, counting its calls.
fn short_token_provider(
    options: ClientOptions,
    sub: &'static str,
    calls: Arc<AtomicUsize>,
) -> ClientOptions {
    options.with_token_provider(move || {
        calls.fetch_add(1, Ordering::SeqCst);
        let t = hs256(&claims(sub, 3, &[], &["orders.*"], false));
        Box::pin(async move { Ok(t) })
    })
}

/// A client for `u1` with [`short_token_provider`], subscribed to
/// `orders.ticks` from the earliest event.
async fn ticks_subscriber(
    options: ClientOptions,
    calls: Arc<AtomicUsize>,
) -> (Client, Subscription) {
    let subscriber = Client::connect_with(short_token_provider(options, "u1", calls))
        .await
        .unwrap();
    let sub = subscriber
        .subscribe("orders.ticks")
        .earliest()
        .send()
        .await
        .unwrap();
    (subscriber, sub)
}

/// Publishes `1, 2, …` to `topic` with [`BACKEND_KEY`] until `done` says so,
/// then `tail` more; returns the last offset.
async fn publish_until(
    broker: &Broker,
    topic: &str,
    mut done: impl FnMut() -> bool,
    tail: u64,
) -> u64 {
    let publisher = Client::connect_with(
        ClientOptions::new(broker.tcp_addr().to_string()).with_credentials(BACKEND_KEY),
    )
    .await
    .unwrap();
    // Paced, so the subscriber never falls behind the ring while it
    // reconnects: the test is about expiry, not slow consumers.
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut last = 0;
    let mut extra = 0;
    while extra < tail {
        tick.tick().await;
        let ack = publisher
            .publish(topic, "tick", last.to_string())
            .await
            .expect("the publisher's API key never expires");
        last = ack.offset;
        if done() {
            extra += 1;
        }
    }
    publisher.close().await.unwrap();
    last
}

/// Reads events until offset `last`, asserting each of `1..=last` comes
/// exactly once, in order.
async fn every_offset_once(sub: &mut Subscription, last: u64) {
    let mut offsets = Vec::new();
    while offsets.last() != Some(&last) {
        match within(30, sub.next_delivery()).await {
            Some(Ok(Delivery::Event(e))) => offsets.push(e.offset),
            other => panic!("after {} events: {other:?}", offsets.len()),
        }
    }
    assert_eq!(offsets, (1..=last).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_sdk_reconnects_with_a_fresh_token_at_expiry_and_delivers_every_offset_once() {
    let (broker, _dir) = auth_broker().await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let options = ClientOptions::new(proxy.addr().to_string())
        .with_reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50))
        .with_proactive_refresh(false);
    let (_subscriber, mut sub) = ticks_subscriber(options, calls.clone()).await;
    // Three tokens: the first two expired on the connection.
    let last = publish_until(
        &broker,
        "orders.ticks",
        || calls.load(Ordering::SeqCst) >= 3,
        20,
    )
    .await;
    every_offset_once(&mut sub, last).await;
    assert!(
        proxy.connections() >= 3,
        "{} connections: the tokens did not expire on the connection",
        proxy.connections()
    );
}

#[tokio::test]
async fn the_sdk_refreshes_before_expiry_without_closing_the_connection() {
    let (broker, _dir) = auth_broker().await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let options = ClientOptions::new(proxy.addr().to_string());
    let (subscriber, mut sub) = ticks_subscriber(options, calls.clone()).await;
    let started = SystemTime::now();
    // Four tokens, refreshed at half their life: by then the first two have
    // expired.
    let last = publish_until(
        &broker,
        "orders.ticks",
        || calls.load(Ordering::SeqCst) >= 4,
        20,
    )
    .await;
    every_offset_once(&mut sub, last).await;
    assert!(
        unix_secs(SystemTime::now()) > unix_secs(started) + 3,
        "the first tokens did not expire during the test"
    );
    assert_eq!(
        proxy.connections(),
        1,
        "the connection was closed: no proactive refresh"
    );
    subscriber.ping().await.unwrap();
}

#[tokio::test]
async fn the_sdk_without_a_provider_stops_at_expiry_with_token_expired() {
    let (broker, _dir) = auth_broker().await;
    let short = hs256(&claims("u1", 2, &[], &["orders.*"], false));
    let client = Client::connect_with(
        ClientOptions::new(broker.tcp_addr().to_string()).with_credentials(short),
    )
    .await
    .unwrap();
    let mut sub = client.subscribe("orders.x").send().await.unwrap();
    match within(10, sub.next_delivery()).await {
        Some(Err(e)) => assert_eq!(e.code(), Some(ErrorCode::TokenExpired), "{e}"),
        other => panic!("expected TokenExpired, got {other:?}"),
    }
    let e = client.ping().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::TokenExpired), "{e}");
}

#[tokio::test]
async fn the_sdk_refreshes_by_hand_and_reconnects_with_the_new_token() {
    let (broker, _dir) = auth_broker().await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let first = claims("u1", 2, &[], &["orders.*"], false);
    let client = Client::connect_with(
        ClientOptions::new(proxy.addr().to_string())
            .with_credentials(hs256(&first))
            .with_reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let second = claims("u1", 120, &[], &["orders.*"], false);
    let expires = client.refresh(hs256(&second)).await.unwrap();
    assert_eq!(
        expires,
        Some(UNIX_EPOCH + Duration::from_secs(exp_of(&second)))
    );
    let e = client
        .refresh(token("u2", &["orders.*"], 60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}");

    // Once the first token is dead, a reconnect can only work with the second.
    wall_clock_past(exp_of(&first), Duration::from_millis(300)).await;
    proxy.cut().await;
    within(10, async {
        loop {
            match client.ping().await {
                Ok(_) => break,
                // Sent before the client saw the cut.
                Err(ringcast_client::Error::ConnectionLost) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(proxy.connections(), 2);
}

// ---------------------------------------------------------------------------
// Rate limits (paused time drives the limiters).
// ---------------------------------------------------------------------------

/// A broker whose limiters run on the paused test clock: memory mode (no
/// blocking threads) and heartbeats far away, so that advancing the clock
/// only ever refills budgets.
async fn rate_limited_broker(rate: ringcast::auth::RateConfig) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = auth_config(dir.path());
    config.server.heartbeat = Duration::from_secs(3600);
    config.auth.rate = rate;
    let broker = start(config).await;
    (broker, dir)
}

#[tokio::test(start_paused = true)]
async fn publishes_over_the_rate_get_retry_later_while_other_credentials_publish_freely() {
    let (broker, _dir) = rate_limited_broker(ringcast::auth::RateConfig {
        publish_per_second: 1,
        publish_burst: 5,
        ..Default::default()
    })
    .await;
    let started = tokio::time::Instant::now();
    let limited_before = counter("ringcast_rate_limited_total", &[("limit", "publish")]);
    let mut a = session(broker.tcp_addr(), Some(&token("a", &["orders.*"], 600))).await;
    let mut b = session(broker.tcp_addr(), Some(BACKEND_KEY)).await;
    for id in 1..=5 {
        published(&mut a, publish(id, "orders.a")).await;
    }
    a.send(&publish(6, "orders.a")).await;
    let wait = match a.recv().await {
        Some(ServerMessage::RetryLater {
            request_id: Some(6),
            code: ErrorCode::RateLimited,
            message,
            retry_after_ms,
        }) => {
            assert!(
                retry_after_ms > 0 && retry_after_ms <= 1000,
                "{retry_after_ms}"
            );
            assert!(message.contains("retry after"), "{message}");
            Duration::from_millis(retry_after_ms)
        }
        other => panic!("expected RetryLater, got {other:?}"),
    };
    // Another credential has its own budget, whole.
    for id in 1..=5 {
        published(&mut b, publish(id, "orders.b")).await;
    }
    // A batch larger than the whole burst could never pass.
    let (code, message) = request_error(&mut a, batch(7, "orders.a", 6)).await;
    assert_eq!(code, ErrorCode::InvalidRequest);
    assert_eq!(
        message,
        "a batch of 6 events exceeds auth.rate.publish_burst (5)"
    );
    // Nothing of the refused requests was stored.
    a.send(&ClientMessage::TopicInfo {
        request_id: 8,
        topic: "orders.a".into(),
    })
    .await;
    match a.recv().await {
        Some(ServerMessage::TopicInfo { info, .. }) => assert_eq!(info.last_offset, 5),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "the paused clock moved by itself: {:?}",
        started.elapsed()
    );

    tokio::time::advance(wait).await;
    assert_eq!(published(&mut a, publish(9, "orders.a")).await, 6);
    assert!(
        counter("ringcast_rate_limited_total", &[("limit", "publish")]) >= limited_before + 2.0
    );
}

#[tokio::test(start_paused = true)]
async fn the_third_connection_within_the_burst_gets_retry_later_and_a_close() {
    let (broker, _dir) = rate_limited_broker(ringcast::auth::RateConfig {
        connections_per_second: 1,
        connection_burst: 2,
        ..Default::default()
    })
    .await;
    let limited_before = counter("ringcast_rate_limited_total", &[("limit", "connections")]);
    let key = Some(BACKEND_KEY);
    let _first = session(broker.tcp_addr(), key).await;
    let _second = session(broker.tcp_addr(), key).await;
    let (mut third, answer) = hello(broker.tcp_addr(), 2, key).await;
    let wait = match answer {
        Some(ServerMessage::RetryLater {
            request_id: None,
            code: ErrorCode::RateLimited,
            retry_after_ms,
            message,
        }) => {
            assert!(retry_after_ms > 0, "{message}");
            assert!(message.contains("connections_per_second"), "{message}");
            Duration::from_millis(retry_after_ms)
        }
        other => panic!("expected RetryLater, got {other:?}"),
    };
    third.expect_closed().await;
    // A client offering compression (`HelloExt`, version 5) gets the same
    // `RetryLater`, not the version-1 words of a frame the refusal cannot read.
    let mut ext = RawClient::connect(broker.tcp_addr()).await;
    ext.send(&ClientMessage::HelloExt {
        protocol_version: 5,
        client_name: "tcp-auth-test".into(),
        credentials: key.map(str::to_owned),
        compression: ringcast_protocol::CompressionOffer {
            codecs: vec![ringcast_protocol::Codec::LZ4],
            min_size: 128,
        },
    })
    .await;
    match ext.recv().await {
        Some(ServerMessage::RetryLater {
            request_id: None,
            code: ErrorCode::RateLimited,
            ..
        }) => {}
        other => panic!("expected RetryLater for a HelloExt, got {other:?}"),
    }
    ext.expect_closed().await;
    // A version 1 client is told in words it knows.
    let (mut old, answer) = hello(broker.tcp_addr(), 1, key).await;
    match answer {
        Some(ServerMessage::Error {
            request_id: None,
            code: ErrorCode::OverCapacity,
            message,
        }) => assert!(message.contains("retry after"), "{message}"),
        other => panic!("expected a version 1 error, got {other:?}"),
    }
    old.expect_closed().await;
    assert!(
        counter("ringcast_rate_limited_total", &[("limit", "connections")]) >= limited_before + 2.0
    );

    tokio::time::advance(wait).await;
    session(broker.tcp_addr(), key).await;
}

#[tokio::test]
async fn a_flood_of_refused_connections_holds_a_bounded_number_of_sockets() {
    // 256 refusals may be in flight (each waits up to a second for a hello
    // it never gets); beyond that a refused connection is closed at once.
    const FLOOD: usize = 320;
    common::ensure_open_files(2 * FLOOD as u64 + 256);
    let (broker, _dir) = rate_limited_broker(ringcast::auth::RateConfig {
        connections_per_second: 1,
        connection_burst: 1,
        ..Default::default()
    })
    .await;
    let _first = session(broker.tcp_addr(), Some(BACKEND_KEY)).await;
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(
            tokio::net::TcpStream::connect(broker.tcp_addr())
                .await
                .unwrap(),
        );
    }
    let (mut told, mut silent) = (0, 0);
    for mut stream in flood {
        use tokio::io::AsyncReadExt as _;
        let mut byte = [0u8; 1];
        // A reset counts as silent too: nothing was said.
        match within(10, stream.read(&mut byte)).await {
            Ok(0) | Err(_) => silent += 1,
            Ok(_) => told += 1,
        }
    }
    assert!(told >= 1, "refused connections are told why");
    assert!(told <= 256, "{told} refusals were in flight at once");
    assert!(silent >= FLOOD - 256, "{silent} closed without a word");
}

// ---------------------------------------------------------------------------
// Protocol version 1 clients.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_version_1_client_is_served_in_version_1_and_never_sent_version_2_codes() {
    let (broker, _dir) = auth_broker().await;
    // An expired token is `Unauthorized` to it.
    let (mut c, answer) = hello(broker.tcp_addr(), 1, Some(&token("u1", &["a.*"], -5))).await;
    assert!(
        matches!(
            answer,
            Some(ServerMessage::Error {
                request_id: None,
                code: ErrorCode::Unauthorized,
                ..
            })
        ),
        "{answer:?}"
    );
    c.expect_closed().await;

    let (mut c, answer) = hello(broker.tcp_addr(), 1, Some(&token("u1", &["a.*"], 60))).await;
    assert!(
        matches!(
            answer,
            Some(ServerMessage::Welcome {
                protocol_version: 1,
                ..
            })
        ),
        "{answer:?}"
    );
    assert_eq!(published(&mut c, publish(1, "a.x")).await, 1);
    let (code, message) = request_error(&mut c, publish(2, "b")).await;
    assert_eq!(code, ErrorCode::Unauthorized, "{message}");
    still_serves(&mut c).await;
    // Refresh does not exist in version 1: as undecodable as to a v1 server.
    c.send(&ClientMessage::Refresh {
        request_id: 3,
        credentials: token("u1", &["a.*"], 60),
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Error {
            request_id: None,
            code: ErrorCode::BadFrame,
            ..
        })
    ));
    c.expect_closed().await;
}

#[tokio::test(start_paused = true)]
async fn a_version_1_client_over_the_rate_gets_over_capacity_with_the_wait_in_words() {
    let (broker, _dir) = rate_limited_broker(ringcast::auth::RateConfig {
        publish_per_second: 1,
        publish_burst: 1,
        ..Default::default()
    })
    .await;
    let (mut c, answer) = hello(broker.tcp_addr(), 1, Some(BACKEND_KEY)).await;
    assert!(matches!(answer, Some(ServerMessage::Welcome { .. })));
    published(&mut c, publish(1, "orders.x")).await;
    let (code, message) = request_error(&mut c, publish(2, "orders.x")).await;
    assert_eq!(code, ErrorCode::OverCapacity);
    assert!(message.contains("retry after"), "{message}");
}

#[tokio::test]
async fn a_version_1_token_expiry_is_unauthorized() {
    let (broker, _dir) = auth_broker().await;
    let short = token("u1", &["orders.*"], 2);
    let (mut c, answer) = hello(broker.tcp_addr(), 1, Some(&short)).await;
    assert!(matches!(answer, Some(ServerMessage::Welcome { .. })));
    match within(10, c.recv()).await {
        Some(ServerMessage::Error {
            request_id: None,
            code: ErrorCode::Unauthorized,
            message,
        }) => assert!(message.contains("expired"), "{message}"),
        other => panic!("expected Unauthorized at expiry, got {other:?}"),
    }
    c.expect_closed().await;
}
