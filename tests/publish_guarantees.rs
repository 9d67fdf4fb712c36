//! Publish guarantees: idempotency keys (a retry stores nothing and gets
//! the original ack, across a lost ack and a restart, until the window
//! ends), expected positions checked atomically (racing writers: exactly
//! one wins), and all-or-nothing batches — in the engine, over TCP and HTTP.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::engine::{open, options, release};
use common::proxy::Proxy;
use common::RawClient;
use ringcast::config::Durability;
use ringcast::engine::{Ack, Engine, EngineError, Expected, Faults, Health, NewEvent};
use ringcast_protocol::{AppendEvent, ClientMessage, ServerMessage};

fn stored(engine: &Engine, topic: &str) -> Vec<(u64, Bytes)> {
    engine
        .history(topic, 0, &[], usize::MAX)
        .map(|page| {
            page.events
                .iter()
                .map(|e| (e.offset, e.payload.clone()))
                .collect()
        })
        .unwrap_or_default()
}

fn keyed(payload: &'static str, key: &str) -> NewEvent {
    NewEvent::new("created", Bytes::from_static(payload.as_bytes())).key(key)
}

#[tokio::test]
async fn a_repeated_key_returns_the_original_ack_and_stores_nothing() {
    for durability in [Durability::Memory, Durability::Fsync] {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(options(dir.path(), durability)).await;
        engine
            .publish("t", NewEvent::new("created", "a"))
            .await
            .unwrap();
        let first = engine.publish("t", keyed("b", "k-1")).await.unwrap();
        assert!(!first.duplicate);
        assert_eq!(first.offset, 2);
        let again = engine.publish("t", keyed("other", "k-1")).await.unwrap();
        assert!(again.duplicate, "{durability:?}");
        assert_eq!(
            (again.epoch, again.offset, again.version),
            (first.epoch, first.offset, first.version)
        );
        // A batch mixing a repeat and new events: the repeat gets its
        // original, the new ones follow contiguously.
        let acks = engine
            .publish_batch("t", vec![keyed("c", "k-2"), keyed("x", "k-1")])
            .await
            .unwrap();
        assert_eq!(
            acks.iter()
                .map(|a| (a.offset, a.duplicate))
                .collect::<Vec<_>>(),
            vec![(3, false), (2, true)]
        );
        assert_eq!(
            stored(&engine, "t"),
            vec![
                (1, Bytes::from_static(b"a")),
                (2, Bytes::from_static(b"b")),
                (3, Bytes::from_static(b"c"))
            ]
        );
        release(engine).await;
    }
}

#[tokio::test]
async fn keys_survive_an_unclean_restart_in_fsync_mode() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(options(dir.path(), Durability::Fsync)).await;
    let mut originals = Vec::new();
    for i in 0..20 {
        let ack = engine
            .publish(
                "t",
                NewEvent::new("created", format!("{i}")).key(format!("k{i}")),
            )
            .await
            .unwrap();
        originals.push(ack);
    }
    let epoch = originals[0].epoch;
    // No close: the run is not marked clean.
    release(engine).await;
    let engine = open(options(dir.path(), Durability::Fsync)).await;
    for (i, original) in originals.iter().enumerate() {
        let ack = engine
            .publish("t", NewEvent::new("created", "retry").key(format!("k{i}")))
            .await
            .unwrap();
        assert!(ack.duplicate, "key k{i} is remembered after the restart");
        assert_eq!(
            (ack.offset, ack.version, ack.epoch),
            (original.offset, original.version, epoch)
        );
    }
    assert_eq!(stored(&engine, "t").len(), 20);
    let fresh = engine.publish("t", keyed("new", "k-new")).await.unwrap();
    assert_eq!((fresh.offset, fresh.duplicate), (21, false));
    release(engine).await;
}

#[tokio::test]
async fn keys_expire_after_the_window_also_across_a_restart() {
    for durability in [Durability::Memory, Durability::Fsync] {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path(), durability);
        opts.topics.dedup_window = Duration::from_secs(60);
        let clock = opts.clock.clone();
        let engine = open(opts).await;
        let first = engine.publish("t", keyed("a", "k")).await.unwrap();
        clock.advance(Duration::from_secs(59));
        assert!(
            engine
                .publish("t", keyed("a", "k"))
                .await
                .unwrap()
                .duplicate
        );
        clock.advance(Duration::from_secs(2));
        engine.maintain_at(std::time::SystemTime::now() + Duration::from_secs(61));
        let second = engine.publish("t", keyed("a", "k")).await.unwrap();
        assert!(!second.duplicate, "{durability:?}: the window is over");
        assert_eq!(second.offset, first.offset + 1);
        release(engine).await;
        if durability == Durability::Fsync {
            // The second key is within the window: still known after a
            // restart; once the window passes, not even the stored keys
            // bring it back.
            let mut opts = options(dir.path(), durability);
            opts.topics.dedup_window = Duration::from_secs(60);
            opts.clock = clock.clone();
            let engine = open(opts).await;
            let ack = engine.publish("t", keyed("a", "k")).await.unwrap();
            assert!(ack.duplicate);
            assert_eq!(ack.offset, second.offset);
            release(engine).await;
            clock.advance(Duration::from_secs(61));
            let mut opts = options(dir.path(), durability);
            opts.topics.dedup_window = Duration::from_secs(60);
            opts.clock = clock.clone();
            let engine = open(opts).await;
            let ack = engine.publish("t", keyed("a", "k")).await.unwrap();
            assert!(!ack.duplicate);
            assert_eq!(ack.offset, second.offset + 1);
            release(engine).await;
        }
    }
}

#[tokio::test]
async fn racing_writers_with_the_same_expected_position_exactly_one_wins() {
    for durability in [Durability::Memory, Durability::Fsync] {
        let dir = tempfile::tempdir().unwrap();
        let engine = open(options(dir.path(), durability)).await;
        for round in 0..10u64 {
            let expect = Expected {
                offset: Some(round),
                version: None,
            };
            let (a, b) = tokio::join!(
                engine.publish_expecting("t", vec![NewEvent::new("created", "a")], expect),
                engine.publish_expecting("t", vec![NewEvent::new("created", "b")], expect),
            );
            let (won, lost) = match (a, b) {
                (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
                other => panic!("exactly one must win: {other:?}"),
            };
            assert_eq!(won[0].offset, round + 1);
            match lost {
                EngineError::PositionMismatch { current_offset, .. } => {
                    assert_eq!(current_offset, round + 1)
                }
                e => panic!("expected a position mismatch, got {e:?}"),
            }
        }
        // Versions: per type, while other types move the offset.
        engine
            .publish("t", NewEvent::new("other", "x"))
            .await
            .unwrap();
        let expect = Expected {
            offset: None,
            version: Some(10),
        };
        let (a, b) = tokio::join!(
            engine.publish_expecting("t", vec![NewEvent::new("created", "a")], expect),
            engine.publish_expecting("t", vec![NewEvent::new("created", "b")], expect),
        );
        let lost = match (a, b) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => {
                assert_eq!(w[0].version, 11);
                l
            }
            other => panic!("exactly one must win: {other:?}"),
        };
        assert!(
            matches!(
                lost,
                EngineError::PositionMismatch {
                    current_version: 11,
                    ..
                }
            ),
            "{lost:?}"
        );
        assert_eq!(stored(&engine, "t").len(), 12);
        release(engine).await;
    }
}

#[tokio::test]
async fn an_invalid_batch_stores_nothing_and_batches_stay_contiguous() {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(options(dir.path(), Durability::Fsync)).await;
    let bad = vec![
        NewEvent::new("created", "a"),
        NewEvent::new("bad type!", "b"),
    ];
    assert!(matches!(
        engine.publish_batch("t", bad).await,
        Err(EngineError::InvalidType(_))
    ));
    let repeated = vec![keyed("a", "same"), keyed("b", "same")];
    assert!(matches!(
        engine.publish_batch("t", repeated).await,
        Err(EngineError::InvalidKey(_))
    ));
    let long = "k".repeat(129);
    assert!(matches!(
        engine.publish_batch("t", vec![keyed("a", &long)]).await,
        Err(EngineError::InvalidKey(_))
    ));
    let mixed = Expected {
        offset: None,
        version: Some(0),
    };
    let two_types = vec![NewEvent::new("created", "a"), NewEvent::new("paid", "b")];
    assert!(matches!(
        engine.publish_expecting("t", two_types, mixed).await,
        Err(EngineError::InvalidRequest(_))
    ));
    assert!(stored(&engine, "t").is_empty());
    // Concurrent batches of 5: each one's offsets are contiguous.
    let batches = (0..8).map(|p| {
        let engine = engine.clone();
        async move {
            let mut all = Vec::new();
            for _ in 0..10 {
                let events = (0..5)
                    .map(|i| NewEvent::new("created", format!("{p}-{i}")))
                    .collect();
                all.push(engine.publish_batch("t", events).await.unwrap());
            }
            all
        }
    });
    for batch in futures_util::future::join_all(batches)
        .await
        .into_iter()
        .flatten()
    {
        let offsets: Vec<u64> = batch.iter().map(|a| a.offset).collect();
        assert_eq!(offsets, (offsets[0]..offsets[0] + 5).collect::<Vec<_>>());
    }
    assert_eq!(stored(&engine, "t").len(), 400);
    release(engine).await;
}

fn append(request_id: u64, key: &str, expected_offset: Option<u64>) -> ClientMessage {
    ClientMessage::Append {
        request_id,
        topic: "orders".into(),
        events: vec![AppendEvent {
            event_type: "created".into(),
            headers: Vec::new(),
            payload: Bytes::from_static(b"{}"),
            idempotency_key: Some(key.into()),
        }],
        expected_offset,
        expected_version: None,
    }
}

#[tokio::test]
async fn tcp_retry_after_a_lost_ack_gets_the_original_offset() {
    let dir = tempfile::tempdir().unwrap();
    let broker = common::start(common::config(dir.path(), Durability::Fsync)).await;
    let proxy = Proxy::start(broker.tcp_addr()).await;
    let mut client = RawClient::handshake(proxy.addr()).await;
    client.send(&append(1, "order-1", Some(0))).await;
    // The broker stored it; the connection is cut before the client read
    // the ack.
    common::within(20, async {
        while broker.engine().info("orders").map_or(0, |i| i.last_offset) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    proxy.cut().await;
    let mut retry = RawClient::handshake(proxy.addr()).await;
    // The same request again, expectation included: a stored retry
    // succeeds even though the position moved.
    retry.send(&append(2, "order-1", Some(0))).await;
    match retry.recv().await {
        Some(ServerMessage::Appended {
            request_id: 2,
            results,
        }) => {
            assert_eq!(results.len(), 1);
            assert!(results[0].duplicate);
            assert_eq!(results[0].offset, 1);
        }
        other => panic!("expected Appended, got {other:?}"),
    }
    // A new key with a stale expectation: refused with the current offset.
    retry.send(&append(3, "order-2", Some(0))).await;
    match retry.recv().await {
        Some(ServerMessage::PositionMismatch {
            request_id: 3,
            current_offset,
            ..
        }) => assert_eq!(current_offset, 1),
        other => panic!("expected PositionMismatch, got {other:?}"),
    }
    assert_eq!(stored(broker.engine(), "orders").len(), 1);
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn http_idempotency_key_and_expected_offset() {
    let (broker, _dir) = common::memory_broker().await;
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}/v1/topics/orders/events?type=created",
        broker.http_addr()
    );
    let post = |key: &'static str, expect: Option<&'static str>| {
        let mut req = http.post(&url).header("Idempotency-Key", key).body("{}");
        if let Some(e) = expect {
            req = req.header("Expected-Offset", e);
        }
        req.send()
    };
    let first: serde_json::Value = post("a", Some("0")).await.unwrap().json().await.unwrap();
    assert_eq!(first["offset"], 1);
    assert_eq!(first["duplicate"], false);
    let again: serde_json::Value = post("a", Some("0")).await.unwrap().json().await.unwrap();
    assert_eq!(again["offset"], 1);
    assert_eq!(again["duplicate"], true);
    let conflict = post("b", Some("0")).await.unwrap();
    assert_eq!(conflict.status(), 409);
    let body: serde_json::Value = conflict.json().await.unwrap();
    assert_eq!(body["error"]["code"], "position_mismatch");
    assert_eq!(body["error"]["current_offset"], 1);
    let bad = post("c", Some("nope")).await.unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(stored(broker.engine(), "orders").len(), 1);
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn http_batches_are_atomic_keyed_and_expect_a_position() {
    let (broker, _dir) = common::memory_broker().await;
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}/v1/topics/orders/events:batch",
        broker.http_addr()
    );
    // Raw bodies: serde_json's json! would sort the header keys.
    let post = |body: serde_json::Value, expect: Option<&'static str>| {
        let mut req = http.post(&url).body(body.to_string());
        if let Some(e) = expect {
            req = req.header("Expected-Offset", e);
        }
        req.send()
    };
    let batch = r#"[
        {"type": "created", "data": {"id": 1}, "headers": {"trace": "t1", "b": "2"}, "idempotency_key": "k1"},
        {"type": "note", "data": "plain", "encoding": "text"},
        {"type": "blob", "data": "AP8=", "encoding": "base64", "idempotency_key": "k3"}
    ]"#;
    let first = http
        .post(&url)
        .header("Expected-Offset", "0")
        .body(batch)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let first: serde_json::Value = first.json().await.unwrap();
    let offsets: Vec<_> = first["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["offset"].as_u64().unwrap(),
                r["duplicate"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(offsets, [(1, false), (2, false), (3, false)]);
    assert!(first["epoch"].as_str().unwrap().parse::<u64>().is_ok());
    let events = broker.engine().history("orders", 0, &[], 10).unwrap();
    let payloads: Vec<_> = events.events.iter().map(|e| e.payload.clone()).collect();
    assert_eq!(
        payloads,
        [
            Bytes::from_static(br#"{"id": 1}"#),
            Bytes::from_static(b"plain"),
            Bytes::from_static(&[0x00, 0xff]),
        ]
    );
    assert_eq!(
        events.events[0].headers,
        vec![("trace".into(), "t1".into()), ("b".into(), "2".into())]
    );

    // A stale expectation is refused even for new keys; nothing stored.
    let stale = post(
        serde_json::json!([{"type": "created", "data": 1, "idempotency_key": "k9"}]),
        Some("0"),
    )
    .await
    .unwrap();
    assert_eq!(stale.status(), 409);
    let body: serde_json::Value = stale.json().await.unwrap();
    assert_eq!(body["error"]["current_offset"], 3);

    // One bad event (a repeated key, a bad encoding, an invalid type)
    // refuses the whole batch.
    for bad in [
        serde_json::json!([{"type": "a", "data": 1, "idempotency_key": "x"}, {"type": "a", "data": 2, "idempotency_key": "x"}]),
        serde_json::json!([{"type": "a", "data": 1}, {"type": "a", "data": 2, "encoding": "base64"}]),
        serde_json::json!([{"type": "a", "data": 1}, {"type": "", "data": 2}]),
        serde_json::json!([{"type": "a", "data": 1}, {"type": "a", "data": 2, "unknown": true}]),
        serde_json::json!([]),
    ] {
        let refused = post(bad.clone(), None).await.unwrap();
        assert_eq!(refused.status(), 400, "{bad}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    let last = broker.engine().info("orders").unwrap().last_offset;
    assert_eq!(last, 3, "a refused batch stored something");

    // The retry of the first batch is answered from the window, though the
    // position moved past its expectation.
    let retry: serde_json::Value = post(
        serde_json::json!([
            {"type": "created", "data": {"id": 1}, "idempotency_key": "k1"},
            {"type": "blob", "data": "AP8=", "encoding": "base64", "idempotency_key": "k3"},
        ]),
        Some("0"),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(retry["results"][0]["offset"], 1);
    assert_eq!(retry["results"][1]["offset"], 3);
    assert_eq!(retry["results"][1]["duplicate"], true);
    assert_eq!(stored(broker.engine(), "orders").len(), 3);
    broker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_version_2_client_is_never_sent_version_3_messages() {
    let (broker, _dir) = common::memory_broker().await;
    let mut c = RawClient::connect(broker.tcp_addr()).await;
    c.send(&ClientMessage::Hello {
        protocol_version: 2,
        client_name: "v2".into(),
        credentials: None,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Welcome {
            protocol_version: 2,
            ..
        })
    ));
    // Append does not exist in version 2: as undecodable as to a v2 server.
    c.send(&append(1, "k", None)).await;
    assert!(matches!(
        c.recv().await,
        Some(ServerMessage::Error {
            request_id: None,
            code: ringcast_protocol::ErrorCode::BadFrame,
            ..
        })
    ));
    c.expect_closed().await;
    assert_eq!(stored(broker.engine(), "orders").len(), 0);
    broker.shutdown().await.unwrap();
}

/// Polls `health()` until the store has repaired itself after a failed
/// pass (there is no event to await for it).
async fn healthy(engine: &Engine) {
    common::within(60, async {
        while engine.health() != Health::Ok {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Publishes one keyed event to "t".
async fn publish_keyed(engine: &Engine, payload: &str, key: &str) -> Result<Ack, EngineError> {
    common::within(
        60,
        engine.publish(
            "t",
            NewEvent::new("created", payload.as_bytes().to_vec()).key(key),
        ),
    )
    .await
}

/// Asserts that publishing every key of `acked` again returns its original
/// ack (same epoch when `epoch` says so) and stores nothing.
async fn assert_remembered(engine: &Engine, acked: &[(String, Ack)], same_epoch: bool, when: &str) {
    let before = stored(engine, "t").len();
    for (key, original) in acked {
        let ack = publish_keyed(engine, "retry", key).await.unwrap();
        assert!(ack.duplicate, "{when}: key {key} is remembered");
        assert_eq!(
            (ack.offset, ack.version),
            (original.offset, original.version),
            "{when}: key {key}"
        );
        if same_epoch {
            assert_eq!(ack.epoch, original.epoch, "{when}: key {key}");
        }
    }
    assert_eq!(stored(engine, "t").len(), before, "{when}: a retry stored");
}

/// Keyed publishes, then two passes refused by `inject`: after each repair
/// and after a reopen, every acknowledged key is remembered and the keys of
/// the refused passes are not.
async fn keys_survive_a_failed_pass(inject: impl Fn(&Faults), what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let mut opts = options(dir.path(), Durability::Fsync);
    opts.faults = Some(faults.clone());
    let engine = open(opts.clone()).await;
    let mut acked: Vec<(String, Ack)> = Vec::new();
    for i in 0..3 {
        let key = format!("k{i}");
        let ack = publish_keyed(&engine, &key, &key).await.unwrap();
        acked.push((key, ack));
    }
    let acks = engine
        .publish_batch(
            "t",
            vec![
                NewEvent::new("created", "k3").key("k3"),
                NewEvent::new("other", "k4").key("k4"),
            ],
        )
        .await
        .unwrap();
    acked.extend(["k3", "k4"].map(String::from).into_iter().zip(acks));
    assert_eq!(
        acked.iter().map(|(_, a)| a.offset).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );

    inject(&faults);
    let r = publish_keyed(&engine, "lost-1", "lost-1").await;
    assert!(
        matches!(r, Err(EngineError::StorageUnavailable(_))),
        "{what}: the failed pass is refused: {r:?}"
    );
    healthy(&engine).await;
    assert_remembered(&engine, &acked, true, &format!("{what}, repaired")).await;
    let ack = publish_keyed(&engine, "lost-1", "lost-1").await.unwrap();
    assert_eq!(
        (ack.offset, ack.duplicate),
        (6, false),
        "{what}: the refused key is not remembered"
    );
    acked.push(("lost-1".into(), ack));

    // Another failure; its key is tried again only after the reopen.
    inject(&faults);
    let r = publish_keyed(&engine, "lost-2", "lost-2").await;
    assert!(
        matches!(r, Err(EngineError::StorageUnavailable(_))),
        "{what}: {r:?}"
    );
    healthy(&engine).await;
    assert_remembered(&engine, &acked, true, &format!("{what}, repaired twice")).await;
    // The offset the refused key would have had goes to another event: a
    // trace of the failed pass left on disk would name it at the reopen.
    let ack = common::within(60, engine.publish("t", NewEvent::new("created", "filler")))
        .await
        .unwrap();
    assert_eq!(ack.offset, 7);
    common::engine::close(engine).await;

    let engine = open(opts).await;
    assert!(engine.recovery_report().damaged_topics.is_empty());
    assert_remembered(&engine, &acked, true, &format!("{what}, reopened")).await;
    let ack = publish_keyed(&engine, "lost-2", "lost-2").await.unwrap();
    assert_eq!(
        (ack.offset, ack.duplicate),
        (8, false),
        "{what}: the key refused before the reopen is not remembered"
    );
    let payloads: Vec<(u64, Bytes)> = stored(&engine, "t");
    let expected: Vec<(u64, Bytes)> = ["k0", "k1", "k2", "k3", "k4", "lost-1", "filler", "lost-2"]
        .into_iter()
        .enumerate()
        .map(|(i, p)| (i as u64 + 1, Bytes::from(p)))
        .collect();
    assert_eq!(payloads, expected, "{what}");
    common::engine::close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_acknowledged_publishes_survive_a_failed_write_and_its_repair() {
    // The writes of a keyed pass: keys file, event file, then sled's K, R
    // and M entries.
    for n in [1, 3, 4, 5] {
        keys_survive_a_failed_pass(|f| f.fail_nth_write(n), &format!("write {n} fails")).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_acknowledged_publishes_survive_a_failed_fsync_and_its_repair() {
    keys_survive_a_failed_pass(|f| f.fail_nth_sync(1), "the fsync fails").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_survive_a_delete_that_failed_to_persist() {
    // The failed delete removed the keys from disk (sled was flushed, the
    // fsync failed): the repair writes them again from memory.
    let dir = tempfile::tempdir().unwrap();
    let faults = Arc::new(Faults::default());
    let mut opts = options(dir.path(), Durability::Fsync);
    opts.faults = Some(faults.clone());
    let engine = open(opts.clone()).await;
    let mut acked: Vec<(String, Ack)> = Vec::new();
    for i in 0..5 {
        let key = format!("k{i}");
        let ack = publish_keyed(&engine, &key, &key).await.unwrap();
        acked.push((key, ack));
    }
    faults.fail_nth_sync(1);
    let r = common::within(60, engine.delete("t")).await;
    assert!(r.is_err(), "the delete failed to persist: {r:?}");
    healthy(&engine).await;
    assert_eq!(engine.info("t").unwrap().last_offset, 5);
    assert_remembered(&engine, &acked, true, "repaired").await;
    common::engine::close(engine).await;

    let engine = open(opts).await;
    assert!(engine.recovery_report().damaged_topics.is_empty());
    assert_eq!(stored(&engine, "t").len(), 5);
    assert_remembered(&engine, &acked, true, "reopened").await;
    let ack = publish_keyed(&engine, "new", "new").await.unwrap();
    assert_eq!((ack.offset, ack.duplicate), (6, false));
    common::engine::close(engine).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_in_interval_mode_survive_a_clean_close_and_a_drop() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path(), Durability::Interval);
    // No flusher tick: only the close, and dropping the engine, write the
    // passes' sled entries.
    opts.flush_interval = Duration::from_secs(3600);
    let engine = open(opts.clone()).await;
    let mut acked: Vec<(String, Ack)> = Vec::new();
    for i in 0..10 {
        let key = format!("k{i}");
        let ack = publish_keyed(&engine, &key, &key).await.unwrap();
        acked.push((key, ack));
    }
    common::engine::close(engine).await;

    let engine = open(opts.clone()).await;
    assert_remembered(&engine, &acked, true, "after a clean close").await;
    for i in 10..20 {
        let key = format!("k{i}");
        let ack = publish_keyed(&engine, &key, &key).await.unwrap();
        assert_eq!((ack.offset, ack.duplicate), (i + 1, false));
        acked.push((key, ack));
    }
    // No close: dropped.
    release(engine).await;

    let engine = open(opts).await;
    assert!(engine.recovery_report().damaged_topics.is_empty());
    assert_eq!(stored(&engine, "t").len(), 20);
    // An unclean stop in interval mode gives the topic a new epoch.
    assert_remembered(&engine, &acked, false, "after a drop").await;
    let ack = publish_keyed(&engine, "new", "new").await.unwrap();
    assert_eq!((ack.offset, ack.duplicate), (21, false));
    common::engine::close(engine).await;
}
