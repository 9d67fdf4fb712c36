//! The SDK against a real broker, when one is running:
//!
//! ```text
//! cargo run --bin ringcastd -- --durability memory --tcp-listen 127.0.0.1:17411 --http-listen 127.0.0.1:17480
//! RINGCAST_TEST_SERVER=127.0.0.1:17411 cargo test -p ringcast-client --test live_broker -- --ignored
//! ```
//!
//! Ignored by default: the SDK does not depend on the server crate, so the
//! broker's own test suite (the root `tests/`) covers the two together.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ringcast_client::{new_event, Client, Delivery, Error, ErrorCode};

fn server() -> String {
    std::env::var("RINGCAST_TEST_SERVER").expect("set RINGCAST_TEST_SERVER=host:port")
}

/// A topic name no earlier run used.
fn fresh_topic(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}.{nanos}")
}

#[tokio::test]
#[ignore = "needs a running broker: RINGCAST_TEST_SERVER=host:port"]
async fn pipelined_publishes_reach_a_subscriber_in_order() {
    let client = Client::connect(server()).await.unwrap();
    let topic = fresh_topic("live.order");
    let mut sub = client.subscribe(&topic).send().await.unwrap();
    let mut acks = Vec::new();
    for n in 0..2_000u32 {
        acks.push(
            client
                .queue_publish(&topic, new_event("n", n.to_string()))
                .await
                .unwrap(),
        );
    }
    for (n, ack) in acks.into_iter().enumerate() {
        assert_eq!(ack.await.unwrap().offset, n as u64 + 1);
    }
    for offset in 1..=2_000u64 {
        match sub.next_delivery().await {
            Some(Ok(Delivery::Event(e))) => assert_eq!(e.offset, offset),
            other => panic!("{other:?}"),
        }
    }
    client.seal(&topic).await.unwrap();
    assert!(matches!(
        sub.next_delivery().await,
        Some(Ok(Delivery::End {
            last_offset: 2_000,
            ..
        }))
    ));
    let err = client.publish(&topic, "n", "x").await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Server {
                code: ErrorCode::TopicSealed,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
#[ignore = "needs a running broker: RINGCAST_TEST_SERVER=host:port"]
async fn a_paused_slow_consumer_misses_nothing_silently() {
    let client = Client::connect(server()).await.unwrap();
    let topic = fresh_topic("live.slow");
    let mut sub = client.subscribe(&topic).buffer(16).send().await.unwrap();
    let total = 3_000u64;
    let events: Vec<_> = (0..total).map(|n| new_event("n", n.to_string())).collect();
    for chunk in events.chunks(500) {
        client.publish_batch(&topic, chunk.to_vec()).await.unwrap();
    }
    // Read slowly at first, then drain; every offset is an event or inside a gap.
    let mut next = 1u64;
    while next <= total {
        let delivery = tokio::time::timeout(Duration::from_secs(10), sub.next_delivery())
            .await
            .expect("stalled")
            .unwrap()
            .unwrap();
        match delivery {
            Delivery::Event(e) => {
                assert_eq!(e.offset, next, "hole or duplicate");
                next += 1;
                if next < 100 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Delivery::Gap(g) => {
                assert_eq!(g.event_type, None);
                next = g.current + 1;
            }
            Delivery::End { .. } => panic!("unexpected end"),
        }
    }
}
