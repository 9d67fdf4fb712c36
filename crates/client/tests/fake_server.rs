//! The SDK against a scripted fake broker that speaks the real protocol codec
//! over loopback: handshake, pipelined replies, pushes, and — the point —
//! what the client does when the connection drops.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{event, FakeBroker, Peer, WAIT};
use futures_util::{SinkExt, StreamExt};
use ringcast_client::{
    Ack, AppendAck, Client, Delivery, Error, ErrorCode, GapReason, Start, WireGap,
};
use ringcast_protocol::{ClientMessage, ServerMessage, PROTOCOL_VERSION};
use tokio::net::TcpListener;
use tokio::time::timeout;

impl FakeBroker {
    /// Accepts a connection and reads its `Hello`, without answering it.
    async fn accept_hello(&self) -> Peer {
        let mut peer = self.accept_connection().await;
        match peer.recv().await {
            ClientMessage::Hello {
                protocol_version,
                client_name,
                credentials,
            } => {
                assert_eq!(protocol_version, PROTOCOL_VERSION);
                assert!(client_name.starts_with("ringcast-rs/"), "{client_name}");
                assert_eq!(credentials, None);
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        peer
    }

    /// Accepts a connection and completes the handshake.
    async fn accept(&self) -> Peer {
        let mut peer = self.accept_hello().await;
        peer.welcome(self.heartbeat_ms).await;
        peer
    }
}

/// A client connected to `broker`, and the broker's side of it.
async fn connected(broker: &FakeBroker) -> (Client, Peer) {
    tokio::join!(
        async { Client::connect_with(broker.options()).await.unwrap() },
        broker.accept()
    )
}

/// A ping answered on `peer`: the client still uses that connection.
async fn assert_same_connection(client: &Client, peer: &mut Peer) {
    let (rtt, ()) = tokio::join!(client.ping(), async {
        let ClientMessage::Ping { request_id } = peer.recv().await else {
            panic!("expected Ping")
        };
        peer.send(ServerMessage::Pong { request_id }).await;
    });
    rtt.unwrap();
}

impl Peer {
    /// Reads a one-event `Append` (how the SDK publishes to a protocol 3
    /// broker), asserting it carries a random key: (request id, topic,
    /// type, payload, key).
    async fn expect_publish(&mut self) -> (u64, String, String, Bytes, String) {
        match self.recv().await {
            ClientMessage::Append {
                request_id,
                topic,
                mut events,
                expected_offset: None,
                expected_version: None,
            } if events.len() == 1 => {
                let event = events.remove(0);
                let key = event.idempotency_key.expect("every publish has a key");
                assert_eq!(key.len(), 32, "16 random bytes in hex: {key}");
                (request_id, topic, event.event_type, event.payload, key)
            }
            other => panic!("expected a one-event Append, got {other:?}"),
        }
    }

    /// Answers `request_id` with one ack.
    async fn ack(&mut self, request_id: u64, epoch: u64, offset: u64, version: u64) {
        self.send(ServerMessage::Appended {
            request_id,
            results: vec![AppendAck {
                epoch,
                offset,
                version,
                duplicate: false,
            }],
        })
        .await;
    }

    /// Whether the client closes the connection, sending nothing but pings.
    async fn closed_by_client(&mut self) -> bool {
        loop {
            match timeout(WAIT, self.framed.next()).await {
                Ok(None | Some(Err(_))) => return true,
                Ok(Some(Ok(ClientMessage::Ping { .. }))) => continue,
                Ok(Some(Ok(_))) | Err(_) => return false,
            }
        }
    }

    /// Reads a `Subscribe`, returning its request id, subscription id and start.
    async fn expect_subscribe(&mut self, topic: &str) -> (u64, u64, Start) {
        match self.recv().await {
            ClientMessage::Subscribe {
                request_id,
                subscription_id,
                topic: t,
                start,
                ..
            } => {
                assert_eq!(t, topic);
                (request_id, subscription_id, start)
            }
            other => panic!("expected Subscribe, got {other:?}"),
        }
    }

    async fn subscribed(&mut self, request_id: u64, sub_id: u64, epoch: u64, next_offset: u64) {
        self.send(ServerMessage::Subscribed {
            request_id,
            subscription_id: sub_id,
            epoch,
            next_offset,
        })
        .await;
    }

    /// Sends `msgs` in one write, so that the client reads them at once.
    async fn send_together(&mut self, msgs: impl IntoIterator<Item = ServerMessage>) {
        for msg in msgs {
            self.framed.feed(msg).await.unwrap();
        }
        SinkExt::<ServerMessage>::flush(&mut self.framed)
            .await
            .unwrap();
    }

    async fn push_event(&mut self, sub_id: u64, offset: u64) {
        self.send(ServerMessage::Event {
            subscription_id: sub_id,
            event: event(offset),
        })
        .await;
    }
}

/// `Event` pushes for `sub_id` at `offsets`.
fn events(
    sub_id: u64,
    offsets: std::ops::RangeInclusive<u64>,
) -> impl Iterator<Item = ServerMessage> {
    offsets.map(move |offset| ServerMessage::Event {
        subscription_id: sub_id,
        event: event(offset),
    })
}

async fn next_offset(sub: &mut ringcast_client::Subscription) -> u64 {
    match timeout(WAIT, sub.next_delivery())
        .await
        .expect("no delivery")
    {
        Some(Ok(Delivery::Event(e))) => e.offset,
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_then_publish_gets_its_ack() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    assert_eq!(client.server_info().server_version, "fake");
    let (ack, ()) = tokio::join!(client.publish("orders", "created", "{}"), async {
        let (request_id, topic, event_type, payload, _) = peer.expect_publish().await;
        assert_eq!((topic.as_str(), event_type.as_str()), ("orders", "created"));
        assert_eq!(&payload[..], b"{}");
        peer.ack(request_id, 7, 1, 1).await;
    });
    assert_eq!(
        ack.unwrap(),
        Ack {
            epoch: 7,
            offset: 1,
            version: 1
        }
    );
}

#[tokio::test]
async fn publishes_are_pipelined_and_replies_are_matched_by_request_id() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let publishes = futures_util::future::join_all(
        (1..=3u64).map(|n| client.publish("orders", "created", n.to_string())),
    );
    let fake = async {
        // All three arrive before any is answered: nobody waited for an ack.
        let mut requests = Vec::new();
        for _ in 0..3 {
            let (request_id, _, _, payload, key) = peer.expect_publish().await;
            requests.push((request_id, payload, key));
        }
        let keys: std::collections::HashSet<_> = requests.iter().map(|r| r.2.clone()).collect();
        assert_eq!(keys.len(), 3, "one key per event");
        // Answer in reverse order; the ack's offset echoes the payload.
        for (request_id, payload, _) in requests.into_iter().rev() {
            let n: u64 = std::str::from_utf8(&payload).unwrap().parse().unwrap();
            peer.ack(request_id, 1, n, n).await;
        }
    };
    let (acks, ()) = tokio::join!(publishes, fake);
    let offsets: Vec<u64> = acks.into_iter().map(|a| a.unwrap().offset).collect();
    assert_eq!(offsets, [1, 2, 3]);
}

#[tokio::test]
async fn queued_publishes_leave_in_call_order() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let mut pending = Vec::new();
    for n in 0..50u32 {
        pending.push(
            client
                .queue_publish("orders", ringcast_client::new_event("t", n.to_string()))
                .await
                .unwrap(),
        );
    }
    for n in 0..50u32 {
        let (request_id, _, _, payload, _) = peer.expect_publish().await;
        assert_eq!(payload, Bytes::from(n.to_string()));
        peer.ack(request_id, 1, u64::from(n) + 1, 1).await;
    }
    for (n, ack) in pending.into_iter().enumerate() {
        assert_eq!(ack.await.unwrap().offset, n as u64 + 1);
    }
}

#[tokio::test]
async fn a_refused_handshake_is_a_refusal_with_the_brokers_code() {
    let broker = FakeBroker::start().await;
    let (result, ()) = tokio::join!(Client::connect_with(broker.options()), async {
        let mut peer = broker.accept_hello().await;
        peer.send(ServerMessage::Error {
            request_id: None,
            code: ErrorCode::Unauthorized,
            message: "bad token".into(),
        })
        .await;
    });
    match result {
        Err(e @ Error::Refused { .. }) => {
            assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
            assert_eq!(e.to_string(), "bad token (unauthorized)");
            assert!(!e.is_retryable());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_rate_limited_request_fails_with_its_retry_after_and_the_connection_lives_on() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (result, ()) = tokio::join!(client.publish("orders", "created", "{}"), async {
        let (request_id, ..) = peer.expect_publish().await;
        peer.send(ServerMessage::RetryLater {
            request_id: Some(request_id),
            code: ErrorCode::RateLimited,
            message: "slow down".into(),
            retry_after_ms: 1500,
        })
        .await;
    });
    let e = result.unwrap_err();
    assert!(matches!(e, Error::RetryLater { .. }), "{e:?}");
    assert_eq!(e.code(), Some(ErrorCode::RateLimited));
    assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
    assert!(e.is_retryable());
    assert_same_connection(&client, &mut peer).await;
}

#[tokio::test]
async fn refresh_sends_the_new_credentials_and_ends_the_subscriptions_the_broker_ends() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 7, 1).await;
    });
    let mut sub = sub.unwrap();
    let (expires, ()) = tokio::join!(client.refresh("tok2"), async {
        let ClientMessage::Refresh {
            request_id,
            credentials,
        } = peer.recv().await
        else {
            panic!("expected Refresh")
        };
        assert_eq!(credentials, "tok2");
        // The new grants do not cover the subscription: it ends first.
        peer.send(ServerMessage::Unsubscribed {
            request_id,
            subscription_id: sub.id(),
        })
        .await;
        peer.send(ServerMessage::Refreshed {
            request_id,
            expires_at_ms: 1_700_000_060_000,
        })
        .await;
    });
    assert_eq!(
        expires.unwrap(),
        Some(std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_060_000))
    );
    match timeout(WAIT, sub.next_delivery()).await.unwrap() {
        Some(Err(e)) => assert_eq!(e.code(), Some(ErrorCode::Forbidden), "{e}"),
        other => panic!("{other:?}"),
    }
    assert!(timeout(WAIT, sub.next_delivery()).await.unwrap().is_none());
}

#[tokio::test]
async fn token_expired_without_a_token_provider_ends_the_client_for_good() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 7, 1).await;
        peer.push_event(sub_id, 1).await;
        peer.send(ServerMessage::Error {
            request_id: None,
            code: ErrorCode::TokenExpired,
            message: "the token expired".into(),
        })
        .await;
    });
    let mut sub = sub.unwrap();
    assert_eq!(next_offset(&mut sub).await, 1);
    match timeout(WAIT, sub.next_delivery()).await.unwrap() {
        Some(Err(e)) => assert_eq!(e.code(), Some(ErrorCode::TokenExpired), "{e}"),
        other => panic!("{other:?}"),
    }
    let e = client.publish("orders", "created", "{}").await.unwrap_err();
    assert!(matches!(e, Error::Refused { .. }), "{e:?}");
    assert_eq!(e.code(), Some(ErrorCode::TokenExpired));
    // No reconnect: nothing arrives at the broker.
    assert!(
        timeout(Duration::from_millis(200), broker.listener.accept())
            .await
            .is_err(),
        "the client reconnected after a final refusal"
    );
}

#[tokio::test]
async fn connecting_to_a_closed_port_is_an_io_error() {
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    };
    match Client::connect(addr).await {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn server_errors_fail_one_request_and_the_connection_lives_on() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (result, ()) = tokio::join!(client.seal("orders"), async {
        let ClientMessage::Seal { request_id, .. } = peer.recv().await else {
            panic!("expected Seal")
        };
        peer.send(ServerMessage::Error {
            request_id: Some(request_id),
            code: ErrorCode::TopicNotFound,
            message: "no topic orders".into(),
        })
        .await;
    });
    match result {
        Err(Error::Server { code, message }) => {
            assert_eq!(code, ErrorCode::TopicNotFound);
            assert_eq!(message, "no topic orders");
        }
        other => panic!("{other:?}"),
    }
    assert_same_connection(&client, &mut peer).await;
}

#[tokio::test]
async fn a_resumed_subscription_continues_after_the_last_delivered_offset() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, sub_id) = tokio::join!(client.subscribe("orders").earliest().send(), async {
        let (request_id, sub_id, start) = peer.expect_subscribe("orders").await;
        assert_eq!(start, Start::Earliest);
        peer.subscribed(request_id, sub_id, 7, 4).await;
        for offset in 1..=3 {
            peer.push_event(sub_id, offset).await;
        }
        sub_id
    });
    let mut sub = sub.unwrap();
    assert_eq!(sub.epoch(), 7);
    for offset in 1..=3 {
        assert_eq!(next_offset(&mut sub).await, offset);
    }

    // The broker goes away; the client reconnects on its own.
    drop(peer);
    let mut peer = broker.accept().await;
    let (request_id, resumed_id, start) = peer.expect_subscribe("orders").await;
    assert_eq!(resumed_id, sub_id, "same subscription id");
    assert_eq!(
        start,
        Start::AfterOffset {
            epoch: 7,
            offset: 3
        }
    );
    peer.subscribed(request_id, sub_id, 7, 5).await;
    // A duplicate of offset 3 must not reach the caller.
    peer.push_event(sub_id, 3).await;
    peer.push_event(sub_id, 4).await;
    assert_eq!(next_offset(&mut sub).await, 4);
    assert_eq!(sub.last_offset(), Some(4));
}

#[tokio::test]
async fn a_live_subscription_with_nothing_delivered_resumes_from_subscribed() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(
        client.subscribe("orders").types(["created"]).send(),
        async {
            let (request_id, sub_id, start) = peer.expect_subscribe("orders").await;
            assert_eq!(start, Start::Live);
            peer.subscribed(request_id, sub_id, 5, 10).await;
        }
    );
    let _sub = sub.unwrap();

    // A graceful broker shutdown: Shutdown frame, then close.
    peer.send(ServerMessage::Shutdown {
        reason: "restarting".into(),
    })
    .await;
    drop(peer);
    let mut peer = broker.accept().await;
    match peer.recv().await {
        ClientMessage::Subscribe { types, start, .. } => {
            assert_eq!(types, ["created"]);
            assert_eq!(
                start,
                Start::AfterOffset {
                    epoch: 5,
                    offset: 9
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_gap_is_delivered_and_moves_the_resume_position() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let gap = WireGap {
        topic: "orders".into(),
        event_type: None,
        reason: GapReason::EpochChanged,
        epoch: 2,
        requested: 40,
        first_available: 1,
        current: 3,
    };
    let (sub, ()) = tokio::join!(
        client.subscribe("orders").after_offset(1, 40).send(),
        async {
            let (request_id, sub_id, start) = peer.expect_subscribe("orders").await;
            assert_eq!(
                start,
                Start::AfterOffset {
                    epoch: 1,
                    offset: 40
                }
            );
            peer.subscribed(request_id, sub_id, 2, 4).await;
            peer.send(ServerMessage::Gap {
                subscription_id: sub_id,
                gap: gap.clone(),
            })
            .await;
        }
    );
    let mut sub = sub.unwrap();
    match timeout(WAIT, sub.next_delivery()).await.unwrap() {
        Some(Ok(Delivery::Gap(g))) => assert_eq!(g, gap),
        other => panic!("{other:?}"),
    }
    assert_eq!(sub.epoch(), 2);
    drop(peer);
    let mut peer = broker.accept().await;
    let (_, _, start) = peer.expect_subscribe("orders").await;
    assert_eq!(
        start,
        Start::AfterOffset {
            epoch: 2,
            offset: 3
        }
    );
}

#[tokio::test]
async fn requests_in_flight_fail_with_connection_lost_and_are_not_retried() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (result, ()) = tokio::join!(client.topics(), async {
        assert!(matches!(
            peer.recv().await,
            ClientMessage::ListTopics { .. }
        ));
        drop(peer);
    });
    assert!(matches!(result, Err(Error::ConnectionLost)), "{result:?}");

    // After the reconnect the first frame is a new request, not the old one.
    let mut peer = broker.accept().await;
    assert_same_connection(&client, &mut peer).await;
}

#[tokio::test]
async fn publishes_in_flight_go_again_with_the_same_keys_in_order() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let mut pending = Vec::new();
    for n in 1..=3u64 {
        let event = ringcast_client::new_event("t", n.to_string());
        pending.push(client.queue_publish("orders", event).await.unwrap());
    }
    let mut first = Vec::new();
    for _ in 0..3 {
        first.push(peer.expect_publish().await);
    }
    // The first is acked; the connection drops before the others are.
    peer.ack(first[0].0, 1, 1, 1).await;
    let acked = pending.remove(0).await.unwrap();
    assert_eq!(acked.offset, 1);
    drop(peer);

    let mut peer = broker.accept().await;
    for (request_id, topic, _, payload, key) in &first[1..] {
        let again = peer.expect_publish().await;
        assert_eq!((&again.1, &again.3, &again.4), (topic, payload, key));
        let n: u64 = std::str::from_utf8(payload).unwrap().parse().unwrap();
        assert!(again.0 >= *request_id);
        peer.ack(again.0, 1, n, n).await;
    }
    let offsets: Vec<u64> = futures_util::future::join_all(pending)
        .await
        .into_iter()
        .map(|a| a.unwrap().offset)
        .collect();
    assert_eq!(offsets, [2, 3]);
    assert_same_connection(&client, &mut peer).await;
}

#[tokio::test]
async fn requests_issued_while_reconnecting_wait_for_the_new_connection() {
    let broker = FakeBroker::start().await;
    let (client, peer) = tokio::join!(
        async { Client::connect_with(broker.options()).await.unwrap() },
        broker.accept()
    );
    drop(peer);
    // The client is now reconnecting: it sent Hello and waits for Welcome.
    let mut peer = broker.accept_hello().await;
    let ping = tokio::spawn({
        let client = client.clone();
        async move { client.ping().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    peer.welcome(0).await;
    let ClientMessage::Ping { request_id } = peer.recv().await else {
        panic!("expected Ping")
    };
    peer.send(ServerMessage::Pong { request_id }).await;
    ping.await.unwrap().unwrap();
}

#[tokio::test]
async fn requests_time_out_when_the_broker_does_not_answer() {
    let broker = FakeBroker::start().await;
    let options = broker
        .options()
        .with_request_timeout(Duration::from_millis(100));
    let (client, mut peer) = tokio::join!(
        async { Client::connect_with(options).await.unwrap() },
        broker.accept()
    );
    let result = client.topics().await;
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
    assert!(matches!(
        peer.recv().await,
        ClientMessage::ListTopics { .. }
    ));
}

#[tokio::test]
async fn the_client_pings_when_idle_and_leaves_a_silent_broker() {
    let broker = FakeBroker::with_heartbeat(100).await;
    let (_client, mut peer) = tokio::join!(
        async { Client::connect_with(broker.options()).await.unwrap() },
        broker.accept()
    );
    // Idle for a heartbeat: the client pings.
    assert!(matches!(peer.recv().await, ClientMessage::Ping { .. }));
    // We never answer; after 3 heartbeats of silence the client gives up on
    // this connection and dials again.
    let started = std::time::Instant::now();
    let _second = broker.accept().await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(peer.closed_by_client().await);
}

#[tokio::test]
async fn heartbeats_from_the_broker_keep_the_connection_alive() {
    let broker = FakeBroker::with_heartbeat(200).await;
    let (client, mut peer) = connected(&broker).await;
    // For 7 heartbeat periods, the broker only sends Heartbeat and answers pings.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while tokio::time::Instant::now() < deadline {
        tokio::select! {
            msg = peer.recv() => match msg {
                ClientMessage::Ping { request_id } => {
                    pings += 1;
                    peer.send(ServerMessage::Pong { request_id }).await;
                }
                other => panic!("{other:?}"),
            },
            () = tokio::time::sleep(Duration::from_millis(180)) => {
                peer.send(ServerMessage::Heartbeat).await;
            }
        }
    }
    assert!(pings >= 3, "the client sent {pings} pings");
    // Still the same connection.
    assert_same_connection(&client, &mut peer).await;
}

#[tokio::test]
async fn end_finishes_the_subscription_and_it_is_not_resumed() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
        peer.push_event(sub_id, 1).await;
        peer.send(ServerMessage::End {
            subscription_id: sub_id,
            topic: "orders".into(),
            last_offset: 1,
        })
        .await;
    });
    let mut sub = sub.unwrap();
    assert_eq!(next_offset(&mut sub).await, 1);
    match sub.next_delivery().await {
        Some(Ok(Delivery::End { topic, last_offset })) => {
            assert_eq!((topic.as_str(), last_offset), ("orders", 1));
        }
        other => panic!("{other:?}"),
    }
    assert!(sub.next_delivery().await.is_none());

    drop(peer);
    let mut peer = broker.accept().await;
    let (rtt, ()) = tokio::join!(client.ping(), async {
        // No Subscribe first: the ended subscription is not resumed.
        let ClientMessage::Ping { request_id } = peer.recv().await else {
            panic!("expected Ping")
        };
        peer.send(ServerMessage::Pong { request_id }).await;
    });
    rtt.unwrap();
}

#[tokio::test]
async fn events_arriving_in_one_read_are_handed_over_in_order_before_the_end() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
        let end = ServerMessage::End {
            subscription_id: sub_id,
            topic: "orders".into(),
            last_offset: 300,
        };
        peer.send_together(events(sub_id, 1..=300).chain([end]))
            .await;
    });
    let mut sub = sub.unwrap();
    for offset in 1..=300 {
        assert_eq!(next_offset(&mut sub).await, offset);
    }
    assert!(matches!(
        sub.next_delivery().await,
        Some(Ok(Delivery::End {
            last_offset: 300,
            ..
        }))
    ));
    assert!(sub.next_delivery().await.is_none());
}

#[tokio::test]
async fn events_read_together_with_a_shutdown_are_delivered_and_not_resent() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
        // The shutdown ends the connection in the middle of the read.
        let shutdown = ServerMessage::Shutdown {
            reason: "restart".into(),
        };
        peer.send_together(events(sub_id, 1..=20).chain([shutdown]))
            .await;
    });
    let mut sub = sub.unwrap();
    // Delivered before any reconnect...
    for offset in 1..=20 {
        assert_eq!(next_offset(&mut sub).await, offset);
    }
    // ...and resumed after, not sent again.
    drop(peer);
    let mut peer = broker.accept().await;
    let (_, _, start) = peer.expect_subscribe("orders").await;
    assert_eq!(
        start,
        Start::AfterOffset {
            epoch: 1,
            offset: 20
        }
    );
}

#[tokio::test]
async fn dropping_a_subscription_unsubscribes_it() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, sub_id) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
        sub_id
    });
    drop(sub.unwrap());
    match peer.recv().await {
        ClientMessage::Unsubscribe {
            subscription_id, ..
        } => assert_eq!(subscription_id, sub_id),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unsubscribe_waits_for_the_broker() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
    });
    let (result, ()) = tokio::join!(sub.unwrap().unsubscribe(), async {
        let ClientMessage::Unsubscribe {
            request_id,
            subscription_id,
        } = peer.recv().await
        else {
            panic!("expected Unsubscribe")
        };
        peer.send(ServerMessage::Unsubscribed {
            request_id,
            subscription_id,
        })
        .await;
    });
    result.unwrap();
}

#[tokio::test]
async fn a_full_queue_pauses_the_subscription_and_resumes_it_after_the_last_delivered_event() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, sub_id) = tokio::join!(client.subscribe("orders").buffer(4).send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
        for offset in 1..=6 {
            peer.push_event(sub_id, offset).await;
        }
        sub_id
    });
    let mut sub = sub.unwrap();
    // Offset 5 did not fit: the client stops the subscription at the broker
    // (offset 6, arriving after, is dropped too)...
    match peer.recv().await {
        ClientMessage::Unsubscribe {
            subscription_id, ..
        } => assert_eq!(subscription_id, sub_id),
        other => panic!("{other:?}"),
    }
    // ...other requests still flow...
    assert_same_connection(&client, &mut peer).await;
    // ...and once half the queue is drained, it subscribes again, under a
    // new wire id, after the last event it delivered.
    assert_eq!(next_offset(&mut sub).await, 1);
    assert_eq!(next_offset(&mut sub).await, 2);
    let (request_id, new_id, start) = peer.expect_subscribe("orders").await;
    assert_ne!(new_id, sub_id);
    assert_eq!(
        start,
        Start::AfterOffset {
            epoch: 1,
            offset: 4
        }
    );
    // Late pushes under the old id are ignored.
    peer.push_event(sub_id, 6).await;
    peer.subscribed(request_id, new_id, 1, 8).await;
    for offset in 5..=7 {
        peer.push_event(new_id, offset).await;
    }
    for offset in 3..=7 {
        assert_eq!(next_offset(&mut sub).await, offset);
    }
    // The resumed subscription is the one dropped, under its new id.
    drop(sub);
    match peer.recv().await {
        ClientMessage::Unsubscribe {
            subscription_id, ..
        } => assert_eq!(subscription_id, new_id),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_refused_resubscribe_ends_the_subscription_with_the_error() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
    });
    let mut sub = sub.unwrap();
    drop(peer);
    let mut peer = broker.accept().await;
    let (request_id, _, _) = peer.expect_subscribe("orders").await;
    peer.send(ServerMessage::Error {
        request_id: Some(request_id),
        code: ErrorCode::TooManySubscriptions,
        message: "full".into(),
    })
    .await;
    match timeout(WAIT, sub.next_delivery()).await.unwrap() {
        Some(Err(Error::Server { code, .. })) => assert_eq!(code, ErrorCode::TooManySubscriptions),
        other => panic!("{other:?}"),
    }
    assert!(sub.next_delivery().await.is_none());
}

#[tokio::test]
async fn close_ends_subscriptions_and_later_requests() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
    });
    let mut sub = sub.unwrap();
    client.close().await.unwrap();
    assert!(matches!(
        sub.next_delivery().await,
        Some(Err(Error::Closed))
    ));
    assert!(sub.next_delivery().await.is_none());
    assert!(matches!(client.ping().await, Err(Error::Closed)));
    assert!(peer.closed_by_client().await);
    client.close().await.unwrap();
}

#[tokio::test]
async fn the_subscription_is_a_stream() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, ()) = tokio::join!(client.subscribe("orders").earliest(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 3).await;
        peer.push_event(sub_id, 1).await;
        peer.push_event(sub_id, 2).await;
        peer.send(ServerMessage::End {
            subscription_id: sub_id,
            topic: "orders".into(),
            last_offset: 2,
        })
        .await;
    });
    let items: Vec<_> = sub.unwrap().collect().await;
    assert_eq!(items.len(), 3);
    assert!(matches!(items[2], Ok(Delivery::End { last_offset: 2, .. })));
}

#[tokio::test]
async fn a_subscribe_in_flight_when_the_connection_drops_is_sent_again() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let fake = async {
        let (_, first_id, start) = peer.expect_subscribe("orders").await;
        assert_eq!(start, Start::Earliest);
        drop(peer);
        let mut peer = broker.accept().await;
        let (request_id, sub_id, start) = peer.expect_subscribe("orders").await;
        assert_eq!((sub_id, start), (first_id, Start::Earliest));
        peer.subscribed(request_id, sub_id, 3, 1).await;
        peer.push_event(sub_id, 1).await;
        peer
    };
    let (sub, _peer) = tokio::join!(client.subscribe("orders").earliest().send(), fake);
    let mut sub = sub.unwrap();
    assert_eq!(sub.epoch(), 3);
    assert_eq!(next_offset(&mut sub).await, 1);
}

#[tokio::test]
async fn a_subscription_paused_across_a_reconnect_resumes_once_drained() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = connected(&broker).await;
    let (sub, sub_id) = tokio::join!(client.subscribe("orders").buffer(2).send(), async {
        let (request_id, sub_id, _) = peer.expect_subscribe("orders").await;
        peer.subscribed(request_id, sub_id, 1, 1).await;
        for offset in 1..=3 {
            peer.push_event(sub_id, offset).await;
        }
        sub_id
    });
    let mut sub = sub.unwrap();
    assert!(matches!(
        peer.recv().await,
        ClientMessage::Unsubscribe { .. }
    ));

    // The connection drops while the subscription is paused, and the caller
    // drains its queue while the client is still reconnecting.
    drop(peer);
    let mut peer = broker.accept_hello().await;
    assert_eq!(next_offset(&mut sub).await, 1);
    assert_eq!(next_offset(&mut sub).await, 2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    peer.welcome(0).await;
    let (request_id, new_id, start) = peer.expect_subscribe("orders").await;
    assert_ne!(new_id, sub_id);
    assert_eq!(
        start,
        Start::AfterOffset {
            epoch: 1,
            offset: 2
        }
    );
    peer.subscribed(request_id, new_id, 1, 4).await;
    peer.push_event(new_id, 3).await;
    assert_eq!(next_offset(&mut sub).await, 3);
}
