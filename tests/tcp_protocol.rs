//! The TCP protocol over real loopback sockets against the real broker,
//! byte-level: handshake, requests, pushes, malformed input, limits.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{config, expect_error, memory_broker, start, within, RawClient};
use ringcast::config::Durability;
use ringcast_protocol::{
    ClientMessage, ErrorCode, NewEvent, ServerMessage, Start, PROTOCOL_VERSION,
};

fn publish(request_id: u64, topic: &str, t: &str, payload: &str) -> ClientMessage {
    ClientMessage::Publish {
        request_id,
        topic: topic.into(),
        event_type: t.into(),
        headers: vec![],
        payload: Bytes::from(payload.to_owned()),
    }
}

fn subscribe(request_id: u64, sid: u64, topic: &str, start: Start) -> ClientMessage {
    ClientMessage::Subscribe {
        request_id,
        subscription_id: sid,
        topic: topic.into(),
        types: vec![],
        start,
    }
}

#[tokio::test]
async fn publish_then_subscribe_round_trip_with_acks_and_pushes() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    c.send(&subscribe(1, 7, "orders", Start::Live)).await;
    let epoch = match c.recv().await {
        Some(ServerMessage::Subscribed {
            request_id: 1,
            subscription_id: 7,
            epoch,
            next_offset: 1,
        }) => epoch,
        other => panic!("{other:?}"),
    };
    c.send(&ClientMessage::Publish {
        request_id: 2,
        topic: "orders".into(),
        event_type: "created".into(),
        headers: vec![("user-id".into(), "u1".into())],
        payload: Bytes::from_static(b"{\"id\":1}"),
    })
    .await;
    let mut acked = false;
    let mut pushed = false;
    while !(acked && pushed) {
        match c.recv().await {
            Some(ServerMessage::Published {
                request_id: 2,
                results,
            }) => {
                assert_eq!(results.len(), 1);
                assert_eq!(
                    (results[0].epoch, results[0].offset, results[0].version),
                    (epoch, 1, 1)
                );
                acked = true;
            }
            Some(ServerMessage::Event {
                subscription_id: 7,
                event,
            }) => {
                assert_eq!(event.topic, "orders");
                assert_eq!((event.offset, event.version), (1, 1));
                assert_eq!(event.event_type, "created");
                assert_eq!(event.headers, vec![("user-id".into(), "u1".into())]);
                assert_eq!(&event.payload[..], b"{\"id\":1}");
                assert!(event.timestamp_ms > 1_600_000_000_000);
                pushed = true;
            }
            other => panic!("{other:?}"),
        }
    }
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn pipelined_publishes_are_appended_in_order_and_all_acked() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(config(dir.path(), Durability::Fsync)).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    const N: u64 = 2_000;
    // Everything is written before any ack is read.
    let mut wire = bytes::BytesMut::new();
    for i in 0..N {
        ringcast_protocol::encode_frame(&publish(i, "p", "t", &i.to_string()), &mut wire).unwrap();
    }
    c.send_raw(&wire).await;
    let mut offsets = vec![0; N as usize];
    for _ in 0..N {
        match c.recv().await {
            Some(ServerMessage::Published {
                request_id,
                results,
            }) => {
                offsets[request_id as usize] = results[0].offset;
            }
            other => panic!("{other:?}"),
        }
    }
    let want: Vec<u64> = (1..=N).collect();
    assert_eq!(offsets, want, "request i must get offset i+1");
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_batch_is_validated_as_a_whole() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    let ok = |t: &str| NewEvent {
        event_type: t.into(),
        headers: vec![],
        payload: Bytes::from_static(b"x"),
    };
    c.send(&ClientMessage::PublishBatch {
        request_id: 1,
        topic: "b".into(),
        events: vec![ok("a"), ok("bad type"), ok("a")],
    })
    .await;
    expect_error(&mut c, Some(1), ErrorCode::InvalidType).await;
    c.send(&ClientMessage::PublishBatch {
        request_id: 2,
        topic: "b".into(),
        events: vec![ok("a"), ok("b"), ok("a")],
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::Published {
            request_id: 2,
            results,
        }) => {
            let got: Vec<(u64, u64)> = results.iter().map(|a| (a.offset, a.version)).collect();
            assert_eq!(got, vec![(1, 1), (2, 1), (3, 2)]);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn every_start_mode_over_the_wire() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    for (i, t) in ["a", "b", "a", "b", "a"].iter().enumerate() {
        c.send(&publish(i as u64, "s", t, "x")).await;
        assert!(matches!(
            c.recv().await,
            Some(ServerMessage::Published { .. })
        ));
    }
    let epoch = broker.engine().info("s").unwrap().epoch;
    let cases = vec![
        (Start::Earliest, vec![1, 2, 3, 4, 5]),
        (Start::AfterOffset { epoch, offset: 3 }, vec![4, 5]),
        (
            Start::AfterVersions {
                epoch,
                versions: vec![("a".into(), 2), ("b".into(), 2)],
            },
            vec![5],
        ),
        (Start::Live, vec![]),
    ];
    for (sid, (start, want)) in cases.into_iter().enumerate() {
        let sid = sid as u64 + 10;
        c.send(&subscribe(100 + sid, sid, "s", start.clone())).await;
        assert!(
            matches!(c.recv().await, Some(ServerMessage::Subscribed { subscription_id, .. }) if subscription_id == sid)
        );
        let mut got = Vec::new();
        for _ in 0..want.len() {
            match c.recv().await {
                Some(ServerMessage::Event {
                    subscription_id,
                    event,
                }) if subscription_id == sid => got.push(event.offset),
                other => panic!("{start:?}: {other:?}"),
            }
        }
        assert_eq!(got, want, "{start:?}");
        c.send(&ClientMessage::Unsubscribe {
            request_id: 200 + sid,
            subscription_id: sid,
        })
        .await;
        assert!(matches!(
            c.recv().await,
            Some(ServerMessage::Unsubscribed { subscription_id, .. }) if subscription_id == sid
        ));
    }
    // After unsubscribing, nothing more is pushed: a ping is answered next.
    c.send(&publish(50, "s", "a", "after")).await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Published { .. })
    ));
    c.send(&ClientMessage::Ping { request_id: 51 }).await;
    assert_eq!(c.recv().await, Some(ServerMessage::Pong { request_id: 51 }));
}

#[tokio::test]
async fn semantic_errors_get_a_reply_and_the_connection_lives_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Memory);
    cfg.limits.max_payload = bytesize::ByteSize::kib(1);
    cfg.limits.max_subscriptions_per_connection = 2;
    let broker = start(cfg).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;

    c.send(&publish(1, "bad topic", "t", "x")).await;
    expect_error(&mut c, Some(1), ErrorCode::InvalidTopic).await;
    c.send(&publish(2, "t", "t", &"x".repeat(2048))).await;
    expect_error(&mut c, Some(2), ErrorCode::PayloadTooLarge).await;
    c.send(&ClientMessage::PublishBatch {
        request_id: 3,
        topic: "t".into(),
        events: vec![],
    })
    .await;
    expect_error(&mut c, Some(3), ErrorCode::InvalidRequest).await;
    c.send(&ClientMessage::TopicInfo {
        request_id: 4,
        topic: "nope".into(),
    })
    .await;
    expect_error(&mut c, Some(4), ErrorCode::TopicNotFound).await;
    c.send(&ClientMessage::Unsubscribe {
        request_id: 5,
        subscription_id: 99,
    })
    .await;
    expect_error(&mut c, Some(5), ErrorCode::UnknownSubscription).await;
    broker.engine().create("t").unwrap();
    let epoch = broker.engine().info("t").unwrap().epoch;
    c.send(&subscribe(
        10,
        4,
        "t",
        Start::AfterOffset { epoch, offset: 50 },
    ))
    .await;
    expect_error(&mut c, Some(10), ErrorCode::InvalidStart).await;
    c.send(&subscribe(6, 1, "t", Start::Live)).await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Subscribed { .. })
    ));
    c.send(&subscribe(7, 1, "t", Start::Live)).await;
    expect_error(&mut c, Some(7), ErrorCode::DuplicateSubscription).await;
    c.send(&subscribe(8, 2, "t", Start::Live)).await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Subscribed { .. })
    ));
    c.send(&subscribe(9, 3, "t", Start::Live)).await;
    expect_error(&mut c, Some(9), ErrorCode::TooManySubscriptions).await;

    c.send(&ClientMessage::Seal {
        request_id: 11,
        topic: "t".into(),
    })
    .await;
    // Both subscriptions end, then the seal is acknowledged (any order).
    let mut ends = 0;
    let mut ok = false;
    while !(ok && ends == 2) {
        match c.recv().await {
            Some(ServerMessage::End { last_offset: 0, .. }) => ends += 1,
            Some(ServerMessage::Ok { request_id: 11 }) => ok = true,
            other => panic!("{other:?}"),
        }
    }
    c.send(&publish(12, "t", "t", "late")).await;
    expect_error(&mut c, Some(12), ErrorCode::TopicSealed).await;
    c.send(&ClientMessage::Ping { request_id: 13 }).await;
    assert_eq!(c.recv().await, Some(ServerMessage::Pong { request_id: 13 }));
}

/// A client that keeps publishing and receiving while others misbehave.
async fn healthy_client_round_trip(addr: std::net::SocketAddr, n: u64) {
    let mut c = RawClient::handshake(addr).await;
    c.send(&subscribe(1, 1, "healthy", Start::Live)).await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Subscribed { .. })
    ));
    for i in 0..n {
        c.send(&publish(100 + i, "healthy", "t", "ok")).await;
        let mut acked = false;
        let mut pushed = false;
        while !(acked && pushed) {
            match c.recv().await {
                Some(ServerMessage::Published { .. }) => acked = true,
                Some(ServerMessage::Event { .. }) => pushed = true,
                other => panic!("healthy client got {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_answered_then_closed_while_others_keep_working() {
    let (broker, _dir) = memory_broker().await;
    let addr = broker.tcp_addr();
    let healthy = tokio::spawn(healthy_client_round_trip(addr, 200));

    // Random bytes as the first frame: a length prefix that is too large.
    let mut c = RawClient::connect(addr).await;
    c.send_raw(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).await;
    expect_error(&mut c, None, ErrorCode::FrameTooLarge).await;
    c.expect_closed().await;

    // A frame with garbage inside.
    let mut c = RawClient::connect(addr).await;
    c.send_raw(&[0, 0, 0, 5, 9, 9, 9, 9, 9]).await;
    expect_error(&mut c, None, ErrorCode::BadFrame).await;
    c.expect_closed().await;

    // A huge length prefix after the handshake.
    let mut c = RawClient::handshake(addr).await;
    c.send_raw(&[0xff, 0xff, 0xff, 0xff]).await;
    expect_error(&mut c, None, ErrorCode::FrameTooLarge).await;
    c.expect_closed().await;

    // A first frame that is not hello.
    let mut c = RawClient::connect(addr).await;
    c.send(&ClientMessage::Ping { request_id: 1 }).await;
    expect_error(&mut c, None, ErrorCode::BadHello).await;
    c.expect_closed().await;

    // A hello of another protocol version.
    let mut c = RawClient::connect(addr).await;
    c.send(&ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION + 1,
        client_name: "future".into(),
        credentials: None,
    })
    .await;
    expect_error(&mut c, None, ErrorCode::UnsupportedVersion).await;
    c.expect_closed().await;

    // An unknown message tag.
    let mut c = RawClient::handshake(addr).await;
    c.send_raw(&[0, 0, 0, 4, 0, 0, 0, 200]).await;
    expect_error(&mut c, None, ErrorCode::BadFrame).await;
    c.expect_closed().await;

    // A frame cut off mid-way, then the client vanishes.
    let mut c = RawClient::handshake(addr).await;
    c.send_raw(&[0, 0, 0, 100, 0, 0, 0, 1, 0]).await;
    drop(c);

    // Random garbage in many sizes after a handshake never kills the server.
    for seed in 0..20u64 {
        let mut c = RawClient::handshake(addr).await;
        let garbage: Vec<u8> = (0..(seed * 37 % 300))
            .map(|i| (i.wrapping_mul(2654435761) >> (seed % 7)) as u8)
            .collect();
        c.send_raw(&garbage).await;
        drop(c);
    }

    within(60, healthy).await.unwrap();
    // The server still accepts and serves new clients.
    healthy_client_round_trip(addr, 5).await;
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Memory);
    cfg.limits.max_tcp_connections = 2;
    let broker = start(cfg).await;
    let a = RawClient::handshake(broker.tcp_addr()).await;
    let _b = RawClient::handshake(broker.tcp_addr()).await;
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    expect_error(&mut c, None, ErrorCode::TooManyConnections).await;
    c.expect_closed().await;
    // A slot frees when a client leaves. The server notices the close
    // asynchronously, so retry until the permit is back.
    drop(a);
    within(10, async {
        loop {
            let mut c = RawClient::connect(broker.tcp_addr()).await;
            c.send(&ClientMessage::Hello {
                protocol_version: PROTOCOL_VERSION,
                client_name: "again".into(),
                credentials: None,
            })
            .await;
            match c.recv().await {
                Some(ServerMessage::Welcome { .. }) => break,
                Some(ServerMessage::Error {
                    code: ErrorCode::TooManyConnections,
                    ..
                }) => tokio::task::yield_now().await,
                other => panic!("{other:?}"),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn idle_connections_get_heartbeats_and_silent_peers_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Memory);
    cfg.server.heartbeat = Duration::from_millis(100);
    let broker = start(cfg).await;
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send(&ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client_name: "sleepy".into(),
        credentials: None,
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::Welcome { heartbeat_ms, .. }) => assert_eq!(heartbeat_ms, 100),
        other => panic!("{other:?}"),
    }
    assert_eq!(c.recv_any().await, Some(ServerMessage::Heartbeat));
    // The client never sends anything: after three heartbeats it is dropped.
    loop {
        match c.recv_any().await {
            Some(ServerMessage::Heartbeat) => continue,
            None => break,
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn history_topics_info_and_delete_over_the_wire() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    for i in 0..5 {
        c.send(&publish(
            i,
            "h",
            if i % 2 == 0 { "even" } else { "odd" },
            "x",
        ))
        .await;
        assert!(matches!(
            c.recv().await,
            Some(ServerMessage::Published { .. })
        ));
    }
    c.send(&ClientMessage::History {
        request_id: 10,
        topic: "h".into(),
        after: 1,
        types: vec!["even".into()],
        limit: 1,
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::History {
            request_id: 10,
            events,
            next_after,
            first_available,
        }) => {
            assert_eq!(events.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![3]);
            assert_eq!((next_after, first_available), (3, 1));
        }
        other => panic!("{other:?}"),
    }
    c.send(&ClientMessage::ListTopics { request_id: 11 }).await;
    match c.recv().await {
        Some(ServerMessage::Topics { topics, .. }) => {
            assert_eq!(topics.len(), 1);
            assert_eq!((topics[0].name.as_str(), topics[0].last_offset), ("h", 5));
        }
        other => panic!("{other:?}"),
    }
    c.send(&ClientMessage::TopicInfo {
        request_id: 12,
        topic: "h".into(),
    })
    .await;
    match c.recv().await {
        Some(ServerMessage::TopicInfo { info, .. }) => {
            assert_eq!(info.versions, vec![("even".into(), 3), ("odd".into(), 2)]);
            assert_eq!(
                (info.first_offset, info.last_offset, info.retained_events),
                (1, 5, 5)
            );
            assert_eq!(info.max_events, 10_000);
        }
        other => panic!("{other:?}"),
    }
    c.send(&ClientMessage::Delete {
        request_id: 13,
        topic: "h".into(),
    })
    .await;
    assert_eq!(c.recv().await, Some(ServerMessage::Ok { request_id: 13 }));
    c.send(&ClientMessage::TopicInfo {
        request_id: 14,
        topic: "h".into(),
    })
    .await;
    expect_error(&mut c, Some(14), ErrorCode::TopicNotFound).await;
}

#[tokio::test]
async fn graceful_shutdown_tells_connected_clients() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    let stopping = tokio::spawn(broker.shutdown());
    match c.recv().await {
        Some(ServerMessage::Shutdown { reason }) => assert!(!reason.is_empty()),
        other => panic!("{other:?}"),
    }
    c.expect_closed().await;
    within(20, stopping).await.unwrap().unwrap();
}
