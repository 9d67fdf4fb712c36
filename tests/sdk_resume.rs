//! The Rust client SDK (`ringcast-client`) against the real broker over
//! loopback: publishing, every start mode, and the promise that reconnects
//! are invisible — a subscription resumes exactly after the last event it
//! delivered, through cut connections and broker restarts, with one gap only
//! when the broker no longer has what was missed.
//!
//! Connections are cut with [`common::proxy::Proxy`] between the client and the
//! broker, from the reading side (after so many events), never on timers.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::proxy::Proxy;
use common::sdk::{expect_events, next};
use common::{config, ensure_open_files, memory_broker, start, within};
use ringcast::config::Durability;
use ringcast_client::{
    new_event, Ack, Bytes, Client, ClientOptions, Delivery, GapReason, NewEventExt, Subscription,
    WireGap,
};

/// Options for a client that reconnects quickly, so that tests spend their
/// time on the resume and not in backoff.
fn fast_reconnect(addr: SocketAddr) -> ClientOptions {
    ClientOptions::new(addr.to_string())
        .with_client_name("sdk-resume-test")
        .with_reconnect_backoff(Duration::from_millis(5), Duration::from_millis(50))
}

async fn connect(addr: SocketAddr) -> Client {
    Client::connect_with(fast_reconnect(addr))
        .await
        .expect("client connects")
}

fn now_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_millis()).unwrap()
}

/// Asserts the next delivery is `End` at `last_offset` and the stream is over.
async fn expect_end(sub: &mut Subscription, last_offset: u64) {
    match next(sub).await {
        Delivery::End {
            topic,
            last_offset: last,
        } => {
            assert_eq!(topic, sub.topic());
            assert_eq!(last, last_offset);
        }
        other => panic!("expected End at {last_offset}, got {other:?}"),
    }
    assert!(
        within(5, sub.next_delivery()).await.is_none(),
        "nothing follows End"
    );
}

/// Queues one `tick` event per number (payload: the number), pipelined,
/// then awaits every ack in order.
/// Reads `sub` to its `End`, asserting it holds exactly the events 1 to
/// `events` (offset n carries payload "n": no duplicate, no hole, nothing
/// stored twice or out of order), and cuts every connection through `proxy`
/// after each `cut_every`-th; returns how many connections the cuts dropped.
async fn read_to_end_cutting(
    sub: &mut Subscription,
    proxy: &Proxy,
    events: u64,
    cut_every: u64,
) -> usize {
    let mut expected = 1;
    let mut cut = 0;
    loop {
        match next(sub).await {
            Delivery::Event(event) => {
                assert_eq!(event.offset, expected, "duplicate or hole");
                assert_eq!(
                    event.payload,
                    expected.to_string(),
                    "stored twice or out of order"
                );
                expected += 1;
                // Not after the last event: the publisher may then be
                // sending what comes next (a seal), which a cut would fail.
                if event.offset % cut_every == 0 && event.offset < events {
                    cut += proxy.cut().await;
                }
            }
            Delivery::End { last_offset, .. } => {
                assert_eq!(last_offset, events);
                break;
            }
            gap @ Delivery::Gap(_) => panic!("nothing was trimmed, yet got {gap:?}"),
        }
    }
    assert_eq!(expected, events + 1, "every offset was delivered");
    cut
}

async fn publish_pipelined(client: &Client, topic: &str, numbers: RangeInclusive<u64>) -> Vec<Ack> {
    let mut pending = Vec::new();
    for n in numbers {
        let event = new_event("tick", n.to_string());
        pending.push(client.queue_publish(topic, event).await.expect("queued"));
    }
    let mut acks = Vec::with_capacity(pending.len());
    for ack in pending {
        acks.push(ack.await.expect("acked"));
    }
    acks
}

#[tokio::test]
async fn publish_subscribe_round_trip_through_the_sdk() {
    let (broker, _dir) = memory_broker().await;
    let publisher = connect(broker.tcp_addr()).await;
    let subscriber = connect(broker.tcp_addr()).await;
    let mut sub = subscriber.subscribe("orders").send().await.unwrap();
    assert_eq!(sub.topic(), "orders");
    assert_eq!(sub.start_next_offset(), 1);
    assert_eq!(sub.last_offset(), None);

    let before = now_ms();
    let ack = publisher
        .publish_event(
            "orders",
            new_event("created", r#"{"id":1}"#)
                .header("correlation-id", "c-1")
                .header("user-id", "u-7"),
        )
        .await
        .unwrap();
    let after = now_ms();
    let epoch = sub.epoch();
    assert_eq!(
        ack,
        Ack {
            epoch,
            offset: 1,
            version: 1
        }
    );
    assert_eq!(publisher.info("orders").await.unwrap().epoch, epoch);

    let [created] = expect_events(&mut sub, 1..=1).await.try_into().unwrap();
    assert_eq!(created.topic, "orders");
    assert_eq!(created.event_type, "created");
    assert_eq!(created.version, 1);
    assert!(
        (before..=after).contains(&created.timestamp_ms),
        "timestamp {} outside [{before}, {after}]",
        created.timestamp_ms
    );
    assert_eq!(
        created.headers,
        vec![
            ("correlation-id".to_owned(), "c-1".to_owned()),
            ("user-id".to_owned(), "u-7".to_owned())
        ]
    );
    assert_eq!(created.payload, Bytes::from_static(br#"{"id":1}"#));

    // A batch is acked per event; payloads are opaque bytes, not only UTF-8.
    let binary = Bytes::from_static(&[0x00, 0x9f, 0x92, 0x96, 0xff]);
    let acks = publisher
        .publish_batch(
            "orders",
            vec![
                new_event("created", r#"{"id":2}"#),
                new_event("paid", binary.clone()).header("causation-id", "c-1"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        acks,
        vec![
            Ack {
                epoch,
                offset: 2,
                version: 2
            },
            Ack {
                epoch,
                offset: 3,
                version: 1
            }
        ]
    );
    let [second, paid] = expect_events(&mut sub, 2..=3).await.try_into().unwrap();
    assert_eq!((second.event_type.as_str(), second.version), ("created", 2));
    assert_eq!(second.payload, Bytes::from_static(br#"{"id":2}"#));
    assert!(second.headers.is_empty());
    assert_eq!((paid.event_type.as_str(), paid.version), ("paid", 1));
    assert_eq!(paid.payload, binary);
    assert_eq!(
        paid.headers,
        vec![("causation-id".to_owned(), "c-1".to_owned())]
    );
    assert!(created.timestamp_ms <= second.timestamp_ms);
    assert!(second.timestamp_ms <= paid.timestamp_ms);
    assert_eq!(sub.last_offset(), Some(3));
    assert_eq!(sub.epoch(), epoch);
}

/// `(offset, type, version)` of a delivered event.
type Seen = (u64, &'static str, u64);

#[tokio::test]
async fn every_start_mode_through_the_sdk() {
    let (broker, _dir) = memory_broker().await;
    let client = connect(broker.tcp_addr()).await;
    let topic = "starts";
    // Offsets 1..=5: a1 b1 a2 b2 a3.
    let mut epoch = 0;
    for t in ["a", "b", "a", "b", "a"] {
        epoch = client.publish(topic, t, "x").await.unwrap().epoch;
    }

    let builders = [
        client.subscribe(topic).types(["a"]).live(),
        client.subscribe(topic).types(["a"]).earliest(),
        client.subscribe(topic).types(["a"]).after_offset(epoch, 3),
        client.subscribe(topic).after_versions(epoch, [("a", 2)]),
        client
            .subscribe(topic)
            .types(["b"])
            .after_versions(epoch, [("b", 1)]),
    ];
    let mut subs = Vec::new();
    for builder in builders {
        let sub = builder.send().await.expect("subscribed");
        assert_eq!(sub.epoch(), epoch);
        assert_eq!(
            sub.start_next_offset(),
            6,
            "Subscribed.next_offset is the offset the next published event will get \
             (docs/protocol.md), whatever the start"
        );
        subs.push(sub);
    }

    // Offsets 6 and 7: b3 a4; then the topic is complete.
    client.publish(topic, "b", "x").await.unwrap();
    client.publish(topic, "a", "x").await.unwrap();
    client.seal(topic).await.unwrap();

    let expected: [(&str, &[Seen]); 5] = [
        ("live, types [a]", &[(7, "a", 4)]),
        (
            "earliest, types [a]",
            &[(1, "a", 1), (3, "a", 2), (5, "a", 3), (7, "a", 4)],
        ),
        ("after offset 3, types [a]", &[(5, "a", 3), (7, "a", 4)]),
        (
            "after versions {a: 2}, every type (b starts live)",
            &[(5, "a", 3), (6, "b", 3), (7, "a", 4)],
        ),
        (
            "after versions {b: 1}, types [b]",
            &[(4, "b", 2), (6, "b", 3)],
        ),
    ];
    for ((name, want), mut sub) in expected.into_iter().zip(subs) {
        let mut got = Vec::new();
        loop {
            match next(&mut sub).await {
                Delivery::Event(e) => got.push((e.offset, e.event_type, e.version)),
                Delivery::End { last_offset, .. } => {
                    assert_eq!(last_offset, 7, "{name}");
                    break;
                }
                gap @ Delivery::Gap(_) => panic!("{name}: unexpected {gap:?}"),
            }
        }
        let want: Vec<(u64, String, u64)> =
            want.iter().map(|&(o, t, v)| (o, t.to_owned(), v)).collect();
        assert_eq!(got, want, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_under_load_resumes_with_no_duplicate_and_no_hole() {
    const EVENTS: u64 = 5_000;
    const CUT_EVERY: u64 = 500;
    const TOPIC: &str = "load";
    let (broker, _dir) = memory_broker().await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let publisher = connect(broker.tcp_addr()).await;
    let subscriber = connect(proxy.addr()).await;
    let mut sub = subscriber.subscribe(TOPIC).earliest().send().await.unwrap();

    let publishing = tokio::spawn(async move {
        let acks = publish_pipelined(&publisher, TOPIC, 1..=EVENTS).await;
        let offsets: Vec<u64> = acks.iter().map(|a| a.offset).collect();
        assert_eq!(offsets, (1..=EVENTS).collect::<Vec<_>>());
        publisher.seal(TOPIC).await.expect("sealed");
    });

    let cut = read_to_end_cutting(&mut sub, &proxy, EVENTS, CUT_EVERY).await;
    assert!(within(5, sub.next_delivery()).await.is_none());
    within(30, publishing).await.unwrap();
    assert!(cut > 0, "the cuts dropped live connections");
    assert!(
        proxy.connections() > 1,
        "the client reconnected ({} connections through the proxy, {cut} cut)",
        proxy.connections()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_stream_resumes_exactly() {
    const TOPIC: &str = "restart";
    let dir = tempfile::tempdir().unwrap();
    let broker = start(config(dir.path(), Durability::Fsync)).await;
    let addr = broker.tcp_addr();
    let subscriber = connect(addr).await;
    let mut sub = subscriber.subscribe(TOPIC).earliest().send().await.unwrap();

    let before = connect(addr).await;
    let acks = publish_pipelined(&before, TOPIC, 1..=300).await;
    let epoch = acks[0].epoch;
    expect_events(&mut sub, 1..=150).await;
    before.close().await.unwrap();
    broker.shutdown().await.expect("graceful shutdown");

    let mut again = config(dir.path(), Durability::Fsync);
    again.server.tcp_listen = addr;
    let broker = start(again).await;
    assert_eq!(broker.tcp_addr(), addr);
    let after = connect(addr).await;
    let acks = publish_pipelined(&after, TOPIC, 301..=600).await;
    for (ack, offset) in acks.iter().zip(301..) {
        assert_eq!((ack.epoch, ack.offset), (epoch, offset));
    }
    after.seal(TOPIC).await.unwrap();

    let events = expect_events(&mut sub, 151..=600).await;
    for event in &events {
        assert_eq!(event.payload, event.offset.to_string());
    }
    expect_end(&mut sub, 600).await;
    assert_eq!(sub.epoch(), epoch, "the restart kept the topic's history");
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_after_retention_was_exceeded_gets_one_gap_then_live() {
    const TOPIC: &str = "small";
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path(), Durability::Memory);
    config.topics.max_events = 10;
    let broker = start(config).await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let publisher = connect(broker.tcp_addr()).await;
    let subscriber = connect(proxy.addr()).await;
    let mut sub = subscriber.subscribe(TOPIC).live().send().await.unwrap();
    let epoch = sub.epoch();

    publish_pipelined(&publisher, TOPIC, 1..=5).await;
    expect_events(&mut sub, 1..=5).await;

    assert_eq!(
        proxy.pause().await,
        1,
        "the subscriber's connection was cut"
    );
    publish_pipelined(&publisher, TOPIC, 6..=55).await;
    let info = broker.engine().info(TOPIC).unwrap();
    assert_eq!((info.first_offset, info.last_offset), (46, 55));
    proxy.resume();

    match next(&mut sub).await {
        Delivery::Gap(gap) => assert_eq!(
            gap,
            WireGap {
                topic: TOPIC.into(),
                event_type: None,
                reason: GapReason::Retention,
                epoch,
                requested: 5,
                first_available: info.first_offset,
                current: info.last_offset,
            }
        ),
        other => panic!("expected one retention gap, got {other:?}"),
    }
    assert_eq!(sub.last_offset(), Some(55));

    publish_pipelined(&publisher, TOPIC, 56..=58).await;
    let events = expect_events(&mut sub, 56..=58).await;
    assert_eq!(events[0].payload, "56");
    publisher.seal(TOPIC).await.unwrap();
    expect_end(&mut sub, 58).await;
    assert_eq!(proxy.connections(), 2, "one reconnect, after the pause");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_clients_publish_and_receive() {
    const CLIENTS: usize = 200;
    const PER_CLIENT: usize = 5;
    const TOTAL: u64 = (CLIENTS * PER_CLIENT) as u64;
    const TOPIC: &str = "crowd";
    // Both ends of every connection live in this process.
    ensure_open_files(2 * CLIENTS as u64 + 256);
    let (broker, _dir) = memory_broker().await;
    broker.engine().create(TOPIC).unwrap();
    let addr = broker.tcp_addr();

    let clients: Vec<Client> = within(
        60,
        futures::future::join_all((0..CLIENTS).map(|_| connect(addr))),
    )
    .await;
    let subs = within(
        60,
        futures::future::join_all(clients.iter().map(|c| c.subscribe(TOPIC).live().send())),
    )
    .await;
    assert_eq!(broker.engine().info(TOPIC).unwrap().subscribers, CLIENTS);

    let readers: Vec<_> = subs
        .into_iter()
        .map(|sub| {
            let mut sub = sub.expect("subscribed");
            tokio::spawn(async move {
                let mut events = Vec::with_capacity(TOTAL as usize);
                loop {
                    match next(&mut sub).await {
                        Delivery::Event(e) => events.push((e.offset, e.payload)),
                        Delivery::End { last_offset, .. } => {
                            assert_eq!(last_offset, TOTAL);
                            return events;
                        }
                        gap @ Delivery::Gap(_) => panic!("unexpected {gap:?}"),
                    }
                }
            })
        })
        .collect();

    let publishers = clients.iter().enumerate().map(|(i, client)| async move {
        let mut acks = Vec::with_capacity(PER_CLIENT);
        for seq in 0..PER_CLIENT {
            let payload = format!("{i}:{seq}");
            let ack = client.publish(TOPIC, "msg", payload.clone()).await;
            acks.push((ack.expect("acked").offset, payload));
        }
        acks
    });
    let acked = within(60, futures::future::join_all(publishers)).await;
    for acks in &acked {
        assert!(
            acks.windows(2).all(|w| w[0].0 < w[1].0),
            "one client's events are appended in its order: {acks:?}"
        );
    }
    let by_offset: HashMap<u64, String> = acked.into_iter().flatten().collect();
    assert_eq!(by_offset.len(), TOTAL as usize);
    clients[0].seal(TOPIC).await.unwrap();

    for reader in readers {
        let events = within(60, reader).await.unwrap();
        let offsets: Vec<u64> = events.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, (1..=TOTAL).collect::<Vec<_>>());
        for (offset, payload) in events {
            assert_eq!(payload, by_offset[&offset], "payload at offset {offset}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_publishes_from_one_client_are_acked_in_order() {
    const EVENTS: u64 = 10_000;
    let (broker, _dir) = memory_broker().await;
    let client = connect(broker.tcp_addr()).await;
    let acks = within(60, publish_pipelined(&client, "pipeline", 1..=EVENTS)).await;
    let epoch = acks[0].epoch;
    for (ack, n) in acks.iter().zip(1..) {
        assert_eq!(
            *ack,
            Ack {
                epoch,
                offset: n,
                version: n
            }
        );
    }
    let page = client.history("pipeline", 0, &[], 10).await.unwrap();
    let payloads: Vec<Bytes> = page.events.into_iter().map(|e| e.payload).collect();
    let want: Vec<Bytes> = (1..=10).map(|n: u64| Bytes::from(n.to_string())).collect();
    assert_eq!(payloads, want, "appended in call order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_during_an_after_versions_replay_resumes_without_replaying_unnamed_types() {
    const TOPIC: &str = "versions";
    let (broker, _dir) = memory_broker().await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let publisher = connect(broker.tcp_addr()).await;
    // Offsets 1..=100 alternate a (odd offsets, versions 1..=50) and b.
    let mut epoch = 0;
    for n in 1..=100u64 {
        let t = if n % 2 == 1 { "a" } else { "b" };
        epoch = publisher
            .publish(TOPIC, t, n.to_string())
            .await
            .unwrap()
            .epoch;
    }
    let subscriber = connect(proxy.addr()).await;
    // Every a after version 0; b is not named, so it starts live (offset 101).
    let mut sub = subscriber
        .subscribe(TOPIC)
        .after_versions(epoch, [("a", 0)])
        .send()
        .await
        .unwrap();

    let mut got = Vec::new();
    for _ in 0..10 {
        match next(&mut sub).await {
            Delivery::Event(e) => got.push((e.offset, e.event_type)),
            other => panic!("expected an event, got {other:?}"),
        }
    }
    assert_eq!(proxy.cut().await, 1);
    publisher.publish(TOPIC, "b", "101").await.unwrap();
    publisher.seal(TOPIC).await.unwrap();
    loop {
        match next(&mut sub).await {
            Delivery::Event(e) => got.push((e.offset, e.event_type)),
            Delivery::End { last_offset, .. } => {
                assert_eq!(last_offset, 101);
                break;
            }
            gap @ Delivery::Gap(_) => panic!("unexpected {gap:?}"),
        }
    }
    let want: Vec<(u64, String)> = (1..=99)
        .step_by(2)
        .map(|o| (o, "a".to_owned()))
        .chain([(101, "b".to_owned())])
        .collect();
    assert_eq!(
        got, want,
        "the replay of a, then b live; no b from before the subscription"
    );
    assert_eq!(proxy.connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_flight_across_repeated_cuts_are_stored_exactly_once_in_order() {
    const EVENTS: u64 = 4_000;
    const CUT_EVERY: u64 = 400;
    const TOPIC: &str = "exactly-once";
    let dir = tempfile::tempdir().unwrap();
    let broker = start(config(dir.path(), Durability::Fsync)).await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    // The publisher goes through the proxy: its acks are what the cuts lose.
    let publisher = connect(proxy.addr()).await;
    let subscriber = connect(broker.tcp_addr()).await;
    let mut sub = subscriber.subscribe(TOPIC).earliest().send().await.unwrap();
    let sealer = subscriber.clone();

    let publishing = tokio::spawn(async move {
        let acks = publish_pipelined(&publisher, TOPIC, 1..=EVENTS).await;
        // Every publish succeeded, once, at the offset of its number.
        let offsets: Vec<u64> = acks.iter().map(|a| a.offset).collect();
        assert_eq!(offsets, (1..=EVENTS).collect::<Vec<_>>());
        // Over the direct connection: the subscriber lags the publisher, so
        // a cut of the proxy can fall while the seal is in flight.
        sealer.seal(TOPIC).await.expect("sealed");
    });

    let cut = read_to_end_cutting(&mut sub, &proxy, EVENTS, CUT_EVERY).await;
    within(60, publishing).await.unwrap();
    assert!(cut > 0, "the cuts dropped live connections");
    // Some publishes were stored but their acks lost: their retries were
    // answered as duplicates.
    let metrics = common::fetch_text(
        &reqwest::Client::new(),
        format!("http://{}/metrics", broker.http_addr()),
    )
    .await;
    let duplicates: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("ringcast_duplicate_publishes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(duplicates > 0.0, "no retry met a stored event:\n{metrics}");
    broker.shutdown().await.unwrap();
}
