//! Pattern subscriptions in the SDK (and `ringcast sub 'orders.*'`) against
//! a scripted fake broker speaking the real protocol codec over loopback:
//! what the client sends to start and to resume, and how it treats what
//! comes back (epochs from `TopicJoined`, per-topic `End`, repeats,
//! `SubscriptionEnded`).

mod common;

use bytes::Bytes;
use common::{FakeBroker, Peer, WAIT};
use ringcast_client::{Client, Delivery, Error, ErrorCode, PatternSubscription, TopicPosition};
use ringcast_protocol::{ClientMessage, ServerMessage, Start, WireEvent, PROTOCOL_VERSION};
use tokio::time::timeout;

impl FakeBroker {
    /// Accepts a connection and completes the handshake.
    async fn accept(&self) -> Peer {
        let mut peer = self.accept_connection().await;
        match peer.recv().await {
            ClientMessage::Hello {
                protocol_version, ..
            } => assert_eq!(protocol_version, PROTOCOL_VERSION),
            other => panic!("expected Hello, got {other:?}"),
        }
        peer.welcome(0).await;
        peer
    }
}

/// A `SubscribePattern`: (request id, subscription id, start, positions).
type Asked = (u64, u64, Start, Option<Vec<TopicPosition>>);

impl Peer {
    /// Expects a `SubscribePattern` for `pattern`.
    async fn expect_pattern(&mut self, pattern: &str) -> Asked {
        match self.recv().await {
            ClientMessage::SubscribePattern {
                request_id,
                subscription_id,
                pattern: p,
                types,
                start,
                positions,
            } => {
                assert_eq!((p.as_str(), types.len()), (pattern, 0));
                (request_id, subscription_id, start, positions)
            }
            other => panic!("expected SubscribePattern, got {other:?}"),
        }
    }

    async fn push_event(&mut self, subscription_id: u64, topic: &str, offset: u64) {
        self.send(ServerMessage::Event {
            subscription_id,
            event: event(topic, offset),
        })
        .await;
    }
}

fn event(topic: &str, offset: u64) -> WireEvent {
    WireEvent {
        topic: topic.into(),
        offset,
        event_type: "created".into(),
        version: offset,
        timestamp_ms: 1_700_000_000_000 + offset,
        headers: vec![],
        payload: Bytes::from(format!("{{\"n\":{offset}}}")),
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

async fn next(sub: &mut PatternSubscription) -> Delivery {
    match timeout(WAIT, sub.next_delivery())
        .await
        .expect("a delivery")
    {
        Some(Ok(d)) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

fn offset_of(d: &Delivery) -> (String, u64) {
    match d {
        Delivery::Event(e) => (e.topic.clone(), e.offset),
        other => panic!("expected an event, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pattern_subscription_resumes_every_topic_with_its_own_epoch_and_offset() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = tokio::join!(
        async { Client::connect_with(broker.options()).await.unwrap() },
        broker.accept()
    );
    let subscribing = tokio::spawn({
        let client = client.clone();
        async move { client.subscribe_pattern("orders.*").earliest().send().await }
    });
    let (request_id, sid, start, positions) = peer.expect_pattern("orders.*").await;
    assert_eq!(
        (start, positions),
        (Start::Earliest, None),
        "a new subscription"
    );
    peer.send(ServerMessage::PatternSubscribed {
        request_id,
        subscription_id: sid,
        topics: vec![position("orders.eu", 9, 4, false)],
    })
    .await;
    let mut sub = subscribing.await.unwrap().unwrap();
    assert_eq!(sub.positions(), [position("orders.eu", 9, 4, false)]);

    peer.push_event(sid, "orders.eu", 5).await;
    peer.send(ServerMessage::TopicJoined {
        subscription_id: sid,
        position: position("orders.us", 11, 0, false),
    })
    .await;
    peer.push_event(sid, "orders.us", 1).await;
    peer.send(ServerMessage::End {
        subscription_id: sid,
        topic: "orders.eu".into(),
        last_offset: 5,
    })
    .await;
    peer.push_event(sid, "orders.us", 2).await;
    assert_eq!(offset_of(&next(&mut sub).await), ("orders.eu".into(), 5));
    assert_eq!(offset_of(&next(&mut sub).await), ("orders.us".into(), 1));
    assert_eq!(
        next(&mut sub).await,
        Delivery::End {
            topic: "orders.eu".into(),
            last_offset: 5
        },
        "one topic ended"
    );
    assert_eq!(offset_of(&next(&mut sub).await), ("orders.us".into(), 2));
    assert_eq!(
        sub.position("orders.us"),
        Some(&position("orders.us", 11, 2, false))
    );

    // The connection drops: the resume names every topic where it stands.
    drop(peer);
    let mut peer = broker.accept().await;
    let (request_id, resumed_sid, _, positions) = peer.expect_pattern("orders.*").await;
    assert_eq!(resumed_sid, sid);
    assert_eq!(
        positions,
        Some(vec![
            position("orders.eu", 9, 5, true),
            position("orders.us", 11, 2, false),
        ])
    );
    peer.send(ServerMessage::PatternSubscribed {
        request_id,
        subscription_id: sid,
        topics: vec![
            position("orders.eu", 9, 5, true),
            position("orders.us", 11, 2, false),
        ],
    })
    .await;
    // A repeat is dropped; the next one goes through.
    peer.push_event(sid, "orders.us", 2).await;
    peer.push_event(sid, "orders.us", 3).await;
    assert_eq!(offset_of(&next(&mut sub).await), ("orders.us".into(), 3));

    // The broker ends the whole subscription: a terminal error, then none.
    peer.send(ServerMessage::SubscriptionEnded {
        subscription_id: sid,
        code: ErrorCode::TooManyTopics,
        message: "too many".into(),
    })
    .await;
    match timeout(WAIT, sub.next_delivery()).await.unwrap() {
        Some(Err(Error::Server { code, .. })) => assert_eq!(code, ErrorCode::TooManyTopics),
        other => panic!("expected the broker's error, got {other:?}"),
    }
    assert!(sub.next_delivery().await.is_none());
}

#[tokio::test]
async fn resume_from_sends_saved_positions_as_a_resume() {
    let broker = FakeBroker::start().await;
    let (client, mut peer) = tokio::join!(
        async { Client::connect_with(broker.options()).await.unwrap() },
        broker.accept()
    );
    let saved = vec![position("orders.eu", 9, 5, false)];
    let subscribing = tokio::spawn({
        let client = client.clone();
        let saved = saved.clone();
        async move {
            client
                .subscribe_pattern("orders.*")
                .resume_from(saved)
                .send()
                .await
        }
    });
    let (request_id, _, start, positions) = peer.expect_pattern("orders.*").await;
    assert_eq!((start, positions), (Start::Live, Some(saved)));
    peer.send(ServerMessage::Error {
        request_id: Some(request_id),
        code: ErrorCode::TooManyTopics,
        message: "too many".into(),
    })
    .await;
    match subscribing.await.unwrap() {
        Err(Error::Server { code, .. }) => assert_eq!(code, ErrorCode::TooManyTopics),
        other => panic!("expected the refusal, got {other:?}"),
    }
}

/// `ringcast sub 'orders.*'` against the fake broker.
#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use serde_json::Value;
    use tokio::process::Command;

    #[tokio::test]
    async fn sub_with_a_wildcard_prints_every_matching_topic_and_goes_on_after_an_end() {
        let broker = FakeBroker::start().await;
        let child = Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .arg("--server")
            .arg(broker.addr())
            .args(["sub", "orders.*", "--count", "2"])
            .env_remove("RINGCAST_TOKEN")
            .env_remove("RINGCAST_CREDENTIALS")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut peer = broker.accept().await;
        let (request_id, sid, start, positions) = peer.expect_pattern("orders.*").await;
        assert_eq!((start, positions), (Start::Live, None));
        peer.send(ServerMessage::PatternSubscribed {
            request_id,
            subscription_id: sid,
            topics: vec![position("orders.eu", 9, 4, false)],
        })
        .await;
        peer.push_event(sid, "orders.eu", 5).await;
        peer.send(ServerMessage::End {
            subscription_id: sid,
            topic: "orders.eu".into(),
            last_offset: 5,
        })
        .await;
        peer.send(ServerMessage::TopicJoined {
            subscription_id: sid,
            position: position("orders.us", 11, 0, false),
        })
        .await;
        peer.push_event(sid, "orders.us", 1).await;

        let out = timeout(WAIT, child.wait_with_output())
            .await
            .expect("ringcast did not exit")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        let lines: Vec<Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert_eq!(
            (&lines[0]["topic"], &lines[0]["offset"], &lines[0]["epoch"]),
            (&Value::from("orders.eu"), &Value::from(5), &Value::from(9))
        );
        assert_eq!(
            lines[1],
            serde_json::json!({"end": {"topic": "orders.eu", "last_offset": 5}})
        );
        assert_eq!(
            (&lines[2]["topic"], &lines[2]["offset"], &lines[2]["epoch"]),
            (&Value::from("orders.us"), &Value::from(1), &Value::from(11))
        );
    }

    #[tokio::test]
    async fn sub_with_a_wildcard_refuses_a_resume_start() {
        let out = Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .args([
                "--server",
                "127.0.0.1:1",
                "sub",
                "orders.*",
                "--after-offset",
                "1:2",
            ])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("pattern"));
    }
}
