//! Pattern subscriptions over TCP (`SubscribePattern`, protocol version 5)
//! against the real broker on loopback: raw frames for what the protocol
//! promises (which topics, per-topic ends, limits, old clients), and the
//! SDK's `subscribe_pattern` for exact per-topic resume through cut
//! connections.
//!
//! Connections are cut with [`common::proxy::Proxy`]; everything awaited
//! has a timeout, nothing waits on a timer.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::proxy::Proxy;
use common::{config, expect_error, memory_broker, start, within, RawClient};
use ringcast::config::Durability;
use ringcast::engine::{NewEvent, TopicOverride};
use ringcast_client::{Client, ClientOptions, Delivery, PatternSubscription};
use ringcast_protocol::{
    ClientMessage, ErrorCode, GapReason, ServerMessage, Start, TopicPosition, WireEvent,
};

fn subscribe_pattern(
    request_id: u64,
    subscription_id: u64,
    pattern: &str,
    start: Start,
    positions: Option<Vec<TopicPosition>>,
) -> ClientMessage {
    ClientMessage::SubscribePattern {
        request_id,
        subscription_id,
        pattern: pattern.into(),
        types: vec![],
        start,
        positions,
    }
}

fn position(topic: &str, epoch: u64, offset: u64, ended: bool) -> TopicPosition {
    TopicPosition {
        topic: topic.into(),
        epoch,
        offset,
        ended,
    }
}

async fn publish(broker: &ringcast::broker::Broker, topic: &str, n: u64) -> ringcast::engine::Ack {
    broker
        .engine()
        .publish(topic, NewEvent::new("created", n.to_string()))
        .await
        .expect("published")
}

/// Expects `PatternSubscribed` for `request_id` and returns its topics.
async fn expect_subscribed(c: &mut RawClient, request_id: u64) -> Vec<TopicPosition> {
    match c.recv().await {
        Some(ServerMessage::PatternSubscribed {
            request_id: r,
            topics,
            ..
        }) if r == request_id => topics,
        other => panic!("expected PatternSubscribed, got {other:?}"),
    }
}

/// Reads pushes until `done` says enough, failing on anything but a push
/// of `subscription_id`.
async fn pushes(
    c: &mut RawClient,
    subscription_id: u64,
    mut done: impl FnMut(&[ServerMessage]) -> bool,
) -> Vec<ServerMessage> {
    let mut got = Vec::new();
    while !done(&got) {
        let msg = c.recv().await.expect("connection open");
        let sid = match &msg {
            ServerMessage::Event {
                subscription_id, ..
            }
            | ServerMessage::Gap {
                subscription_id, ..
            }
            | ServerMessage::End {
                subscription_id, ..
            }
            | ServerMessage::TopicJoined {
                subscription_id, ..
            }
            | ServerMessage::SubscriptionEnded {
                subscription_id, ..
            } => *subscription_id,
            other => panic!("expected a push, got {other:?}"),
        };
        assert_eq!(sid, subscription_id, "{msg:?}");
        got.push(msg);
    }
    got
}

/// The offsets of the events of `topic` among `msgs`, in arrival order.
fn offsets(msgs: &[ServerMessage], topic: &str) -> Vec<u64> {
    msgs.iter()
        .filter_map(|m| match m {
            ServerMessage::Event { event, .. } if event.topic == topic => Some(event.offset),
            _ => None,
        })
        .collect()
}

fn events(msgs: &[ServerMessage]) -> usize {
    msgs.iter()
        .filter(|m| matches!(m, ServerMessage::Event { .. }))
        .count()
}

#[tokio::test]
async fn a_pattern_subscription_gets_existing_and_later_matching_topics_and_no_others() {
    let (broker, _dir) = memory_broker().await;
    let eu = publish(&broker, "orders.eu", 1).await;
    publish(&broker, "payments.eu", 1).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;

    c.send(&subscribe_pattern(1, 7, "orders.*", Start::Earliest, None))
        .await;
    let topics = expect_subscribed(&mut c, 1).await;
    assert_eq!(topics, [position("orders.eu", eu.epoch, 0, false)]);

    publish(&broker, "orders.eu", 2).await;
    publish(&broker, "payments.eu", 2).await;
    // Created after the subscription: joins from its first event.
    let us = publish(&broker, "orders.us", 1).await;
    publish(&broker, "orders.us", 2).await;
    let got = pushes(&mut c, 7, |got| events(got) == 4).await;

    assert_eq!(offsets(&got, "orders.eu"), [1, 2]);
    assert_eq!(offsets(&got, "orders.us"), [1, 2]);
    assert!(offsets(&got, "payments.eu").is_empty());
    let joined = got
        .iter()
        .position(|m| matches!(m, ServerMessage::TopicJoined { .. }))
        .expect("orders.us was announced");
    assert_eq!(
        got[joined],
        ServerMessage::TopicJoined {
            subscription_id: 7,
            position: position("orders.us", us.epoch, 0, false),
        }
    );
    let first_us = got
        .iter()
        .position(|m| matches!(m, ServerMessage::Event { event, .. } if event.topic == "orders.us"))
        .unwrap();
    assert!(
        joined < first_us,
        "TopicJoined comes before the topic's events"
    );
    assert_eq!(got.len(), 5, "nothing else: {got:?}");
}

#[tokio::test]
async fn a_live_pattern_subscription_lists_each_topic_at_its_last_offset() {
    let (broker, _dir) = memory_broker().await;
    publish(&broker, "orders.eu", 1).await;
    let eu = publish(&broker, "orders.eu", 2).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    c.send(&subscribe_pattern(1, 1, "orders.*", Start::Live, None))
        .await;
    assert_eq!(
        expect_subscribed(&mut c, 1).await,
        [position("orders.eu", eu.epoch, 2, false)]
    );
    publish(&broker, "orders.eu", 3).await;
    let got = pushes(&mut c, 1, |got| events(got) == 1).await;
    assert_eq!(offsets(&got, "orders.eu"), [3]);
}

#[tokio::test]
async fn sealing_one_topic_ends_only_that_topic() {
    let (broker, _dir) = memory_broker().await;
    publish(&broker, "orders.a", 1).await;
    publish(&broker, "orders.b", 1).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    c.send(&subscribe_pattern(1, 3, "orders.*", Start::Live, None))
        .await;
    assert_eq!(expect_subscribed(&mut c, 1).await.len(), 2);

    broker.engine().seal("orders.a").await.unwrap();
    let got = pushes(&mut c, 3, |got| !got.is_empty()).await;
    assert_eq!(
        got,
        [ServerMessage::End {
            subscription_id: 3,
            topic: "orders.a".into(),
            last_offset: 1,
        }]
    );

    publish(&broker, "orders.b", 2).await;
    let got = pushes(&mut c, 3, |got| events(got) == 1).await;
    assert_eq!(offsets(&got, "orders.b"), [2]);
    // The id is still taken: the subscription lives.
    c.send(&subscribe_pattern(2, 3, "other.*", Start::Live, None))
        .await;
    expect_error(&mut c, Some(2), ErrorCode::DuplicateSubscription).await;
}

#[tokio::test]
async fn too_many_matches_are_refused_at_the_start_and_end_the_subscription_later() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Memory);
    config.limits.max_pattern_matches = 2;
    let broker = start(config).await;
    for topic in ["wide.1", "wide.2", "wide.3", "narrow.1", "narrow.2"] {
        publish(&broker, topic, 1).await;
    }
    let mut c = RawClient::handshake(broker.tcp_addr()).await;

    c.send(&subscribe_pattern(1, 1, "wide.*", Start::Live, None))
        .await;
    expect_error(&mut c, Some(1), ErrorCode::TooManyTopics).await;

    c.send(&subscribe_pattern(2, 1, "narrow.*", Start::Live, None))
        .await;
    assert_eq!(expect_subscribed(&mut c, 2).await.len(), 2);
    publish(&broker, "narrow.3", 1).await;
    match pushes(&mut c, 1, |got| !got.is_empty()).await.as_slice() {
        [ServerMessage::SubscriptionEnded { code, message, .. }] => {
            assert_eq!(*code, ErrorCode::TooManyTopics, "{message}");
        }
        other => panic!("expected SubscriptionEnded, got {other:?}"),
    }
    // Over (and the pattern still too wide).
    c.send(&subscribe_pattern(3, 2, "narrow.*", Start::Live, None))
        .await;
    expect_error(&mut c, Some(3), ErrorCode::TooManyTopics).await;
    c.send(&ClientMessage::Ping { request_id: 4 }).await;
    assert_eq!(c.recv().await, Some(ServerMessage::Pong { request_id: 4 }));
}

#[tokio::test]
async fn bad_patterns_and_starts_are_refused_and_the_connection_lives_on() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    for (id, pattern) in [(1, ""), (2, "orders/*"), (3, "user:{sub}")] {
        c.send(&subscribe_pattern(id, id, pattern, Start::Live, None))
            .await;
        expect_error(&mut c, Some(id), ErrorCode::InvalidTopic).await;
    }
    let after = Start::AfterOffset {
        epoch: 1,
        offset: 1,
    };
    c.send(&subscribe_pattern(4, 4, "orders.*", after, None))
        .await;
    expect_error(&mut c, Some(4), ErrorCode::InvalidStart).await;
    let bad = vec![position("no/such", 1, 1, false)];
    c.send(&subscribe_pattern(5, 5, "orders.*", Start::Live, Some(bad)))
        .await;
    expect_error(&mut c, Some(5), ErrorCode::InvalidTopic).await;
    c.send(&subscribe_pattern(6, 6, "orders.*", Start::Live, None))
        .await;
    assert!(expect_subscribed(&mut c, 6).await.is_empty());
}

#[tokio::test]
async fn a_resume_continues_each_listed_topic_and_reports_one_gone() {
    let (broker, _dir) = memory_broker().await;
    let a = publish(&broker, "orders.a", 1).await;
    publish(&broker, "orders.a", 2).await;
    let sealed = publish(&broker, "orders.sealed", 1).await;
    broker.engine().seal("orders.sealed").await.unwrap();
    let fresh = publish(&broker, "orders.fresh", 1).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;

    let positions = vec![
        position("orders.a", a.epoch, 1, false),
        position("orders.gone", 99, 3, false),
        position("orders.sealed", sealed.epoch, 1, true),
    ];
    c.send(&subscribe_pattern(
        1,
        2,
        "orders.*",
        Start::Live,
        Some(positions),
    ))
    .await;
    let topics: BTreeMap<String, TopicPosition> = expect_subscribed(&mut c, 1)
        .await
        .into_iter()
        .map(|p| (p.topic.clone(), p))
        .collect();
    assert_eq!(topics["orders.a"], position("orders.a", a.epoch, 1, false));
    assert!(topics["orders.sealed"].ended, "{topics:?}");
    assert!(topics["orders.gone"].ended, "{topics:?}");
    // Not named by the resume: created meanwhile, so from its first event.
    assert_eq!(
        topics["orders.fresh"],
        position("orders.fresh", fresh.epoch, 0, false)
    );

    let got = pushes(&mut c, 2, |got| events(got) == 2 && got.len() >= 3).await;
    assert_eq!(offsets(&got, "orders.a"), [2]);
    assert_eq!(offsets(&got, "orders.fresh"), [1]);
    match got
        .iter()
        .find(|m| matches!(m, ServerMessage::Gap { .. }))
        .expect("a gap for the gone topic")
    {
        ServerMessage::Gap { gap, .. } => {
            assert_eq!(gap.topic, "orders.gone");
            assert_eq!((gap.epoch, gap.reason), (0, GapReason::EpochChanged));
        }
        _ => unreachable!(),
    }
    assert_eq!(got.len(), 3, "no End again for the sealed topic: {got:?}");
}

#[tokio::test]
async fn a_resume_naming_an_old_epoch_of_a_recreated_topic_gets_one_gap_then_the_new_epoch() {
    let (broker, _dir) = memory_broker().await;
    let old = publish(&broker, "orders.a", 1).await;
    broker.engine().delete("orders.a").await.unwrap();
    let new = publish(&broker, "orders.a", 1).await;
    publish(&broker, "orders.a", 2).await;
    assert_ne!(old.epoch, new.epoch);
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    let positions = vec![position("orders.a", old.epoch, 1, false)];
    c.send(&subscribe_pattern(
        1,
        4,
        "orders.*",
        Start::Live,
        Some(positions),
    ))
    .await;
    let topics = expect_subscribed(&mut c, 1).await;
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0].epoch, new.epoch, "{topics:?}");
    let got = pushes(&mut c, 4, |got| events(got) == 2).await;
    match &got[0] {
        ServerMessage::Gap { gap, .. } => {
            assert_eq!(
                (gap.topic.as_str(), gap.reason, gap.epoch, gap.requested),
                ("orders.a", GapReason::EpochChanged, new.epoch, 1)
            );
        }
        other => panic!("expected the epoch gap first, got {other:?}"),
    }
    assert_eq!(offsets(&got, "orders.a"), [1, 2]);
    assert_eq!(got.len(), 3, "{got:?}");
}

#[tokio::test]
async fn a_version_4_client_sending_subscribe_pattern_gets_bad_frame_and_a_close() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send(&ClientMessage::Hello {
        protocol_version: 4,
        client_name: "v4".into(),
        credentials: None,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Welcome {
            protocol_version: 4,
            ..
        })
    ));
    c.send(&subscribe_pattern(1, 1, "orders.*", Start::Live, None))
        .await;
    expect_error(&mut c, None, ErrorCode::BadFrame).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn the_connections_listing_shows_a_pattern_subscription_as_one_entry() {
    let (broker, _dir) = memory_broker().await;
    publish(&broker, "orders.a", 1).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    c.send(&subscribe_pattern(1, 5, "orders.*", Start::Live, None))
        .await;
    expect_subscribed(&mut c, 1).await;
    let listed: Vec<_> = broker
        .connections()
        .list()
        .into_iter()
        .flat_map(|conn| conn.subscriptions)
        .map(|s| (s.topic, s.subscription_id))
        .collect();
    assert_eq!(listed, [("orders.*".to_owned(), Some(5))]);
}

#[tokio::test]
async fn grants_filter_the_matches_and_a_refresh_applies_to_later_ones_or_ends_the_subscription() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::auth::hs256_config(config(dir.path(), Durability::Memory), dir.path());
    let broker = start(config).await;
    for topic in ["orders.eu", "orders.secret"] {
        publish(&broker, topic, 1).await;
    }
    let token = |subscribe: &[&str]| {
        common::auth::hs256(&common::auth::claims("u1", 3600, &[], subscribe, false))
    };
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send(&ClientMessage::Hello {
        protocol_version: ringcast_protocol::PROTOCOL_VERSION,
        client_name: "pattern-auth".into(),
        credentials: Some(token(&["orders.eu"])),
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Welcome { .. })
    ));

    c.send(&subscribe_pattern(1, 1, "orders.*", Start::Live, None))
        .await;
    let topics = expect_subscribed(&mut c, 1).await;
    let names: Vec<&str> = topics.iter().map(|p| p.topic.as_str()).collect();
    assert_eq!(names, ["orders.eu"], "only what the grants name");

    // Wider grants: a topic created later that they cover joins.
    c.send(&ClientMessage::Refresh {
        request_id: 2,
        credentials: token(&["orders.eu", "orders.new"]),
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Refreshed { request_id: 2, .. })
    ));
    publish(&broker, "orders.secret", 2).await;
    publish(&broker, "orders.new", 1).await;
    let got = pushes(&mut c, 1, |got| events(got) == 1).await;
    assert_eq!(offsets(&got, "orders.new"), [1]);
    assert!(offsets(&got, "orders.secret").is_empty());

    // Narrower grants that no longer cover a topic it delivers: ended.
    c.send(&ClientMessage::Refresh {
        request_id: 3,
        credentials: token(&["orders.eu"]),
    })
    .await;
    assert_eq!(
        c.recv().await,
        Some(ServerMessage::Unsubscribed {
            request_id: 3,
            subscription_id: 1,
        })
    );
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Refreshed { request_id: 3, .. })
    ));
}

// ---- the SDK ---------------------------------------------------------

fn fast_reconnect(addr: SocketAddr) -> ClientOptions {
    ClientOptions::new(addr.to_string())
        .with_client_name("tcp-pattern-test")
        .with_reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50))
}

/// What one topic delivered, in order: event offsets, and `0` for a gap
/// (after which `gaps` holds it).
#[derive(Debug, Default)]
struct Seen {
    by_topic: BTreeMap<String, Vec<u64>>,
    gaps: Vec<ringcast_client::WireGap>,
    ends: Vec<(String, u64)>,
}

impl Seen {
    fn offsets(&self, topic: &str) -> &[u64] {
        self.by_topic.get(topic).map_or(&[], Vec::as_slice)
    }
}

/// Reads deliveries into `seen` until `done` holds.
async fn read_until(sub: &mut PatternSubscription, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    while !done(seen) {
        match within(30, sub.next_delivery()).await {
            Some(Ok(Delivery::Event(WireEvent { topic, offset, .. }))) => {
                seen.by_topic.entry(topic).or_default().push(offset);
            }
            Some(Ok(Delivery::Gap(gap))) => {
                seen.by_topic.entry(gap.topic.clone()).or_default().push(0);
                seen.gaps.push(gap);
            }
            Some(Ok(Delivery::End { topic, last_offset })) => seen.ends.push((topic, last_offset)),
            Some(Err(e)) => panic!("subscription failed: {e}"),
            None => panic!("subscription ended"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_resumes_every_matching_topic_exactly_after_a_cut() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Memory);
    config.topics.overrides.push(TopicOverride {
        pattern: "orders.trimmed".into(),
        max_events: Some(3),
        ..TopicOverride::default()
    });
    let broker = start(config).await;
    publish(&broker, "orders.a", 1).await;
    publish(&broker, "orders.trimmed", 1).await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let client = Client::connect_with(fast_reconnect(proxy.addr()))
        .await
        .unwrap();
    let mut sub = client
        .subscribe_pattern("orders.*")
        .earliest()
        .send()
        .await
        .unwrap();
    let mut seen = Seen::default();
    publish(&broker, "orders.a", 2).await;
    read_until(&mut sub, &mut seen, |s| {
        s.offsets("orders.a").len() == 2 && s.offsets("orders.trimmed").len() == 1
    })
    .await;

    // Away: more of both, a trim of one, a new topic, a non-matching one.
    assert_eq!(
        proxy.pause().await,
        1,
        "the subscriber's connection was cut"
    );
    for n in 3..=4 {
        publish(&broker, "orders.a", n).await;
    }
    for n in 2..=8 {
        publish(&broker, "orders.trimmed", n).await;
    }
    for n in 1..=2 {
        publish(&broker, "orders.new", n).await;
    }
    publish(&broker, "payments.x", 1).await;
    let trimmed = broker.engine().info("orders.trimmed").unwrap();
    assert_eq!((trimmed.first_offset, trimmed.last_offset), (6, 8));
    proxy.resume();

    read_until(&mut sub, &mut seen, |s| {
        s.offsets("orders.a").len() == 4 && s.offsets("orders.new").len() == 2 && !s.gaps.is_empty()
    })
    .await;
    publish(&broker, "orders.trimmed", 9).await;
    read_until(&mut sub, &mut seen, |s| {
        s.offsets("orders.trimmed").len() == 3
    })
    .await;

    assert_eq!(seen.offsets("orders.a"), [1, 2, 3, 4]);
    assert_eq!(seen.offsets("orders.new"), [1, 2]);
    assert_eq!(
        seen.offsets("orders.trimmed"),
        [1, 0, 9],
        "one gap, then live"
    );
    let gap = &seen.gaps[0];
    assert_eq!(
        (
            gap.topic.as_str(),
            gap.reason,
            gap.requested,
            gap.first_available,
            gap.current
        ),
        ("orders.trimmed", GapReason::Retention, 1, 6, 8)
    );
    assert_eq!(seen.gaps.len(), 1, "a gap only for the trimmed topic");
    assert!(!seen.by_topic.contains_key("payments.x"));

    // A topic joining while connected, a seal, then another cut: the joined
    // topic resumes in the epoch its TopicJoined named; the sealed one stays
    // ended.
    let later = publish(&broker, "orders.later", 1).await;
    broker.engine().seal("orders.a").await.unwrap();
    read_until(&mut sub, &mut seen, |s| {
        s.offsets("orders.later").len() == 1 && !s.ends.is_empty()
    })
    .await;
    assert_eq!(seen.ends, [("orders.a".to_owned(), 4)]);
    assert_eq!(
        sub.position("orders.later"),
        Some(&TopicPosition {
            topic: "orders.later".into(),
            epoch: later.epoch,
            offset: 1,
            ended: false,
        })
    );
    assert_eq!(proxy.pause().await, 1);
    publish(&broker, "orders.later", 2).await;
    proxy.resume();
    read_until(&mut sub, &mut seen, |s| {
        s.offsets("orders.later").len() == 2
    })
    .await;
    assert_eq!(seen.offsets("orders.later"), [1, 2]);
    publish(&broker, "orders.new", 3).await;
    read_until(&mut sub, &mut seen, |s| s.offsets("orders.new").len() == 3).await;

    assert_eq!(seen.offsets("orders.new"), [1, 2, 3]);
    assert_eq!(seen.offsets("orders.a"), [1, 2, 3, 4], "nothing again");
    assert_eq!(seen.ends.len(), 1, "no second End for the sealed topic");
    assert_eq!(seen.gaps.len(), 1);
    let topics: BTreeSet<&str> = seen.by_topic.keys().map(String::as_str).collect();
    assert_eq!(
        topics,
        ["orders.a", "orders.later", "orders.new", "orders.trimmed"].into()
    );
    assert_eq!(proxy.connections(), 3, "two reconnects, after the pauses");
    client.close().await.unwrap();
}
