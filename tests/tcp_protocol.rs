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

// ---------------------------------------------------------------------------
// Hostile clients: memory and time they can make the broker spend.
// ---------------------------------------------------------------------------

/// A frame header announcing a body of `len` bytes.
fn header(len: u32) -> [u8; 4] {
    len.to_be_bytes()
}

#[tokio::test]
async fn a_large_frame_announced_before_hello_is_refused_and_closed() {
    let (broker, _dir) = memory_broker().await;
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send_raw(&header(4 * 1024 * 1024)).await;
    c.send_raw(b"abcd").await;
    expect_error(&mut c, None, ErrorCode::FrameTooLarge).await;
    c.expect_closed().await;
    // Others still get in.
    let mut ok = RawClient::handshake(broker.tcp_addr()).await;
    ok.send(&ClientMessage::Ping { request_id: 1 }).await;
    assert_eq!(ok.recv().await, Some(ServerMessage::Pong { request_id: 1 }));
    broker.shutdown().await.unwrap();
}

/// A broker whose frames must arrive whole within 300 ms.
async fn short_read_timeout_broker() -> (ringcast::broker::Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Memory);
    cfg.server.read_timeout = Duration::from_millis(300);
    let broker = start(cfg).await;
    (broker, dir)
}

#[tokio::test]
async fn a_frame_trickled_byte_by_byte_is_cut_off_after_the_read_timeout() {
    let (broker, _dir) = short_read_timeout_broker().await;
    let c = RawClient::handshake(broker.tcp_addr()).await;
    let (rd, mut wr) = c.stream.into_split();
    let mut frames = common::Frames::new(rd);
    use tokio::io::AsyncWriteExt;
    wr.write_all(&header(4 * 1024 * 1024)).await.unwrap();
    let started = std::time::Instant::now();
    // The attack itself: one byte every 20 ms, which would keep resetting a
    // deadline based on silence. It stops once the server has closed.
    let trickle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            if wr.write_all(&[0]).await.is_err() {
                return;
            }
        }
    });
    match within(30, frames.next()).await {
        Some(ServerMessage::Error {
            request_id: None,
            code: ErrorCode::BadFrame,
            message,
        }) => assert!(message.contains("read timeout"), "{message}"),
        other => panic!("expected a read-timeout error, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "cut off after only {:?}",
        started.elapsed()
    );
    assert_eq!(within(30, frames.next()).await, None, "then the close");
    within(30, trickle).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_read_timeout_is_per_frame_not_per_connection_nor_between_frames() {
    let (broker, _dir) = short_read_timeout_broker().await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    let mut ping = bytes::BytesMut::new();
    ringcast_protocol::encode_frame(&ClientMessage::Ping { request_id: 0 }, &mut ping).unwrap();
    // Time passing is the subject here: each frame arrives in two halves
    // 150 ms apart (within the timeout), and the connection lives on for
    // several timeouts, idle between frames as well.
    let half = ping.len() / 2;
    for request_id in 1..=6u64 {
        let mut frame = bytes::BytesMut::new();
        ringcast_protocol::encode_frame(&ClientMessage::Ping { request_id }, &mut frame).unwrap();
        c.send_raw(&frame[..half]).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.send_raw(&frame[half..]).await;
        assert_eq!(c.recv().await, Some(ServerMessage::Pong { request_id }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    broker.shutdown().await.unwrap();
}

/// The TCP outbound queue gauge, as `/metrics` reports it now.
async fn queued_bytes_gauge(broker: &ringcast::broker::Broker) -> f64 {
    let text = reqwest::get(format!("http://{}/metrics", broker.http_addr()))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix("ringcast_outbound_queued_bytes{transport=\"tcp\"} "))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_queues_at_most_its_byte_budget_then_gets_one_slow_consumer_gap() {
    const BUDGET: u64 = 256 * 1024;
    const PAYLOAD: usize = 64 * 1024;
    const EVENTS: u64 = 800; // 50 MiB, far beyond the ring and socket buffers
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Memory);
    cfg.limits.max_outbound_bytes = bytesize::ByteSize::b(BUDGET);
    // A ring far larger than what the sockets absorb before the stall, so
    // the subscriber falls behind it only while stalled.
    cfg.topics.max_events = 200;
    cfg.topics.max_bytes = bytesize::ByteSize::mib(64);
    // The stalled writer is not dropped (three heartbeats) during the test.
    cfg.server.heartbeat = Duration::from_secs(120);
    let broker = start(cfg).await;

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4 * 1024).unwrap();
    let mut stalled = socket.connect(broker.tcp_addr()).await.unwrap();
    common::write_msg(&mut stalled, &common::hello())
        .await
        .unwrap();
    common::write_msg(&mut stalled, &subscribe(1, 1, "firehose", Start::Live))
        .await
        .unwrap();
    let mut frames = common::Frames::new(stalled);
    assert!(matches!(
        within(20, frames.next()).await,
        Some(ServerMessage::Welcome { .. })
    ));
    assert!(matches!(
        within(20, frames.next()).await,
        Some(ServerMessage::Subscribed { next_offset: 1, .. })
    ));

    // Publish, sampling the gauge as it goes; the subscriber reads nothing.
    let mut publisher = RawClient::handshake(broker.tcp_addr()).await;
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let mut most = 0f64;
    for request_id in 1..=EVENTS {
        publisher
            .send(&ClientMessage::Publish {
                request_id,
                topic: "firehose".into(),
                event_type: "blob".into(),
                headers: vec![],
                payload: payload.clone(),
            })
            .await;
        match publisher.recv().await {
            Some(ServerMessage::Published { request_id: r, .. }) => assert_eq!(r, request_id),
            other => panic!("expected an ack, got {other:?}"),
        }
        if request_id % 8 == 0 {
            most = most.max(queued_bytes_gauge(&broker).await);
        }
    }
    // Still stalled: the queue is (about) full, and never more than the
    // budget plus one chunk (a pump's 64 KiB plus one event frame).
    let full = within(30, async {
        loop {
            let q = queued_bytes_gauge(&broker).await;
            if q >= (BUDGET / 2) as f64 {
                return q;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    most = most.max(full);
    let bound = (BUDGET + 64 * 1024 + PAYLOAD as u64 + 1024) as f64;
    assert!(
        most <= bound,
        "{most} bytes queued for a stalled peer (bound {bound})"
    );

    // The subscriber reads again: what was queued, in order, then exactly
    // one gap, then live events.
    let mut last = 0;
    let mut gap_at = None;
    let mut tail_published = false;
    let final_offset = EVENTS + 3;
    while last < final_offset {
        match within(60, frames.next()).await {
            Some(ServerMessage::Event { event, .. }) => {
                assert!(event.offset > last, "{} after {last}", event.offset);
                if let Some(current) = gap_at {
                    assert!(event.offset > current, "events after the gap are live");
                }
                last = event.offset;
            }
            Some(ServerMessage::Gap { gap, .. }) => {
                assert_eq!(gap.reason, ringcast_protocol::GapReason::SlowConsumer);
                assert_eq!(gap_at, None, "a second gap: {gap:?}");
                assert_eq!(gap.requested, last, "{gap:?}");
                assert!(gap.first_available > last + 1, "{gap:?}");
                gap_at = Some(gap.current);
                last = gap.current;
                // Live from here on: three more events must arrive.
                for request_id in EVENTS + 1..=final_offset {
                    publisher
                        .send(&publish(request_id, "firehose", "blob", "{}"))
                        .await;
                    assert!(matches!(
                        publisher.recv().await,
                        Some(ServerMessage::Published { .. })
                    ));
                }
                tail_published = true;
            }
            other => panic!("expected events and one gap, got {other:?}"),
        }
    }
    assert!(tail_published && gap_at.is_some(), "one slow-consumer gap");
    broker.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_beyond_the_in_flight_byte_limit_pause_reading_and_are_all_acked() {
    const PUBLISHES: u64 = 200;
    const PAYLOAD: usize = 16 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Fsync);
    // Four payloads in flight at most: reading pauses many times.
    cfg.limits.max_in_flight_bytes = bytesize::ByteSize::kib(64);
    let broker = start(cfg).await;
    let c = RawClient::handshake(broker.tcp_addr()).await;
    let (rd, mut wr) = c.stream.into_split();
    let mut frames = common::Frames::new(rd);
    // Everything is pipelined by a writer that does not wait for acks.
    let writer = tokio::spawn(async move {
        let payload = Bytes::from(vec![b'y'; PAYLOAD]);
        for request_id in 1..=PUBLISHES {
            let msg = ClientMessage::Publish {
                request_id,
                topic: "inflight".into(),
                event_type: "blob".into(),
                headers: vec![],
                payload: payload.clone(),
            };
            common::write_msg(&mut wr, &msg).await.unwrap();
        }
        wr
    });
    let mut offsets = vec![0; PUBLISHES as usize];
    for _ in 0..PUBLISHES {
        match within(60, frames.next()).await {
            Some(ServerMessage::Published {
                request_id,
                results,
            }) => offsets[request_id as usize - 1] = results[0].offset,
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    let want: Vec<u64> = (1..=PUBLISHES).collect();
    assert_eq!(offsets, want, "request i got offset i, each acked once");
    let _wr = within(30, writer).await.unwrap();
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn history_pages_end_at_max_history_bytes_and_next_after_reads_each_event_once() {
    const EVENTS: u64 = 30;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), Durability::Memory);
    cfg.limits.max_history_bytes = bytesize::ByteSize::kib(64);
    let broker = start(cfg).await;
    let mut c = RawClient::handshake(broker.tcp_addr()).await;
    let payload = "z".repeat(8 * 1024);
    for request_id in 1..=EVENTS {
        c.send(&publish(request_id, "paged", "t", &payload)).await;
        assert!(matches!(
            c.recv().await,
            Some(ServerMessage::Published { .. })
        ));
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut after = 0;
    for request_id in 100.. {
        c.send(&ClientMessage::History {
            request_id,
            topic: "paged".into(),
            after,
            types: vec![],
            limit: 1_000,
        })
        .await;
        let (events, next_after) = match c.recv().await {
            Some(ServerMessage::History {
                request_id: r,
                events,
                next_after,
                ..
            }) if r == request_id => (events, next_after),
            other => panic!("expected a history page, got {other:?}"),
        };
        if events.is_empty() {
            break;
        }
        let bytes: usize = events.iter().map(|e| e.payload.len()).sum();
        assert!(bytes <= 64 * 1024, "a page of {bytes} payload bytes");
        assert_eq!(next_after, events.last().unwrap().offset);
        seen.extend(events.iter().map(|e| e.offset));
        pages += 1;
        after = next_after;
        assert!(request_id < 100 + EVENTS, "paging does not progress");
    }
    let want: Vec<u64> = (1..=EVENTS).collect();
    assert_eq!(seen, want, "every event exactly once, in order");
    // 30 events of 8 KiB in pages of at most 64 KiB: at least four pages.
    assert!(pages >= 4, "{pages} pages");
    broker.shutdown().await.unwrap();
}
